"""REPORT.md: a summary table of verdicts, then one section per study."""

from __future__ import annotations

from .common import DEFAULT_DATA, Context, StudyResult, env_summary


def write_report(ctx: Context, results: list[StudyResult], total_seconds: float, failures: dict[str, str]) -> str:
    lines = [
        "# Science suite: do the VAE papers' results hold with fusedvae's ops in the training loop?",
        "",
        "Every model below is trained with fusedvae's public ops (`fv.rsample_kl`, `fv.kl_normal`, `fv.gaussian_nll`, "
        "`fv.gaussian_nll_optimal`, `fv.vae_loss`, `fv.nn.*`) and measured with the plain-PyTorch reference "
        "(`fusedvae.reference.linear`, `.diagnostics`, `.estimators`, `.betatc`). Each study states the paper's claim, "
        "what was run, the numbers, and whether they bear the claim out.",
        "",
        f"- Machine: {env_summary(ctx.device)}",
        f"- Mode: {'QUICK (a handful of steps on tiny data: the code path only, the numbers mean nothing)' if ctx.quick else 'full'}",
        "- Data: "
        + ("scikit-learn's digits (1797 real 8x8 images, dequantised) for studies 1-4 and 6; synthetic data from a known "
           "generative model for study 5"
           if ctx.data in DEFAULT_DATA else
           f"`{ctx.data}` for studies 2, 3, 4 and 6; scikit-learn's digits for study 1; synthetic data for study 5"),
        f"- Wall time: {total_seconds / 60:.1f} min (all studies; on a CPU, drawing the Philox noise in the reference "
        "backend is a large share of each training step)",
        "- Reproduce: `python -m bench.science` (or `python -m bench run --suite science`); `--quick` for the smoke path.",
        "",
        "| # | study | outcome | verdict | time |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.number} | [{r.title}](#{_anchor(f'{r.number}. {r.title}')}) | **{r.outcome}** | {r.verdict} | {r.seconds:.0f} s |")
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
        lines += [f"**Verdict: {r.outcome}.** {r.verdict}", "", f"Data: {', '.join(f'[`{c}`]({c})' for c in r.csvs)}."]
    text = "\n".join(lines) + "\n"
    (ctx.out_dir / "REPORT.md").write_text(text)
    return "REPORT.md"


def _anchor(title: str) -> str:
    """GitHub's heading slug: lower case; letters, digits, '_' and '-' kept; spaces to '-'; the rest dropped."""
    heading = f"{title}".lower()
    return "".join(c if (c.isalnum() or c in "_-") else ("-" if c == " " else "") for c in heading)
