"""REPORT.md: a summary table of verdicts, then one section per study."""

from __future__ import annotations

import platform

import numpy as np
import torch

import fusedvae as fv

from .common import DEFAULT_DATA, SEED_STRIDE, Context, StudyResult, env_summary


def _versions() -> str:
    from bench.device import git_commit, triton_version

    return (f"Python {platform.python_version()}, torch {torch.__version__}, triton {triton_version()}, "
            f"numpy {np.__version__}, fusedvae {fv.__version__}; commit {git_commit()}")


def write_report(
    ctx: Context, results: list[StudyResult], total_seconds: float, failures: dict[str, str],
    load: tuple[tuple[float, ...], tuple[float, ...]] | None = None, cpu_seconds: float | None = None,
) -> str:
    """Write ``REPORT.md``: the run's conditions, a table of verdicts, then one section per study."""
    n_seeds = len(ctx.seeds)
    conditions = (
        f"; load average {load[0][0]:.1f} at the start and {load[1][0]:.1f} at the end "
        f"(on {_cores()} cores: above that, other work shared the CPU and the times are inflated)" if load else ""
    )
    lines = [
        "# Science suite: do the VAE papers' results hold with fusedvae's ops in the training loop?",
        "",
        "Every model below is trained with fusedvae's public ops (`fv.rsample_kl`, `fv.kl_normal`, `fv.gaussian_nll`, "
        "`fv.gaussian_nll_optimal`, `fv.vae_loss`, `fv.nn.*`) and measured with the plain-PyTorch research tools "
        "(`fusedvae.analysis.linear`, `.diagnostics`, `.estimators`, `.betatc`). Each study states the paper's claim, "
        "what was run, the numbers, and whether they bear the claim out.",
        "",
        f"- Machine: {env_summary(ctx.device)}",
        f"- Versions: {_versions()}",
        "- Mode: " + ("QUICK (a handful of steps on tiny data: the code path only, the numbers mean nothing)"
                      if ctx.quick else "full"),
        f"- Seeds: {n_seeds} per training (seed index s adds {SEED_STRIDE}·s to each training's seed: new weights, "
        "minibatch order and noise; the data and its split stay fixed). Figures are mean ± standard deviation over the "
        "seeds; the CSVs hold every seed's value (`seed` column). A verdict says **bears out** only when each of its "
        "claims holds for every seed; otherwise each claim says for how many seeds it held.",
        "- Data: "
        + ("scikit-learn's digits (1797 real 8x8 images, dequantised) for studies 1-4 and 6; synthetic data from a known "
           "generative model for study 5"
           if ctx.data in DEFAULT_DATA else
           f"`{ctx.data}` for studies 2, 3, 4 and 6; scikit-learn's digits for study 1; synthetic data for study 5"),
        f"- Wall time: {total_seconds / 60:.1f} min for all studies with {ctx.jobs} worker process"
        f"{'es' if ctx.jobs > 1 else ''} of one thread each"
        + (f", {cpu_seconds / 60:.1f} CPU-minutes in all (what the run costs, less sensitive to other load than the "
           "wall time)" if cpu_seconds is not None else "")
        + f"{conditions}. Per study below.",
        "- Reproduce: `python -m bench.science` (or `python -m bench run --suite science`); `--quick` for the smoke path.",
        "",
        "| # | study | outcome | verdict | time |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        link = f"[{r.title}](#{_anchor(f'{r.number}. {r.title}')})"
        lines.append(f"| {r.number} | {link} | **{r.outcome}** | {r.verdict} | {r.seconds:.0f} s |")
    for name, error in failures.items():
        lines.append(f"| – | {name} | **failed** | `{error}` | – |")
    for r in results:
        lines += [
            "",
            f"## {r.number}. {r.title}",
            "",
            f"*Paper:* {r.papers}",
            "",
            f"**Claim.** {r.claim}",
            "",
            f"**What was run.** {r.method}",
            "",
            "**Results.**",
            "",
        ]
        for block in r.body:
            lines += [block, ""]
        for fig in r.figures:
            lines += [f"![{r.title}]({fig})", ""]
        if r.claims:
            lines += [f"**Claims, seed by seed** ({n_seeds} seed{'s' if n_seeds > 1 else ''}):", ""]
            lines += [f"- {claim.text}: {claim.tally()} ({', '.join('yes' if h else 'no' for h in claim.holds)})"
                      for claim in r.claims]
            lines.append("")
        lines += [f"**Verdict: {r.outcome}.** {r.verdict}", "", f"Data: {', '.join(f'[`{c}`]({c})' for c in r.csvs)}."]
    text = "\n".join(lines) + "\n"
    (ctx.out_dir / "REPORT.md").write_text(text)
    return "REPORT.md"


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def _anchor(title: str) -> str:
    """GitHub's heading slug: lower case; letters, digits, '_' and '-' kept; spaces to '-'; the rest dropped."""
    heading = f"{title}".lower()
    return "".join(c if (c.isalnum() or c in "_-") else ("-" if c == " " else "") for c in heading)
