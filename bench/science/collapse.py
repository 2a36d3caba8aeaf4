"""Study 4: posterior collapse against the decoder variance σ² (Lucas et al. 2019)."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch

import fusedvae as fv
from fusedvae.analysis.diagnostics import active_units, collapsed_fraction

from .common import (
    SEED_STRIDE,
    Claim,
    Context,
    StudyResult,
    claims_text,
    evaluate_gaussian_vae,
    load_image_data,
    markdown_table,
    mean_sd,
    outcome_of,
    posterior,
    seed_table,
    train_mlp_vae,
    write_csv,
)
from .plots import figure, save

LATENT = 16
FIXED_SIGMA2 = (0.005, 0.02, 0.05, 0.1, 0.2)
LEARNED_INIT = (0.01, 0.1, 1.0)
EPS, DELTA = 0.01, 0.01


def _train_one(ctx: Context, x: torch.Tensor, x_test: torch.Tensor, mode: str, sigma2: float, index: int) -> dict:
    """One training (fixed or learned σ², one seed index) and its collapse diagnostics; the sorted per-dim KL as ``curve``."""
    steps = ctx.steps(2000, 5)
    ctx.log(f"study 4: {mode} sigma^2 (init) {sigma2:g}, seed {index} ({steps} steps)")
    model, likelihood = train_mlp_vae(
        x, LATENT, steps, log_sigma=0.5 * math.log(sigma2), learn_sigma=mode == "learned", seed=ctx.seed(4, index)
    )
    mu, logvar = posterior(model, x)
    kl = fv.kl_normal(mu, logvar, reduction="none")  # (N, LATENT): KL per datapoint and dimension
    scores = evaluate_gaussian_vae(model, x_test, likelihood.log_sigma.detach(), n_samples=2 if ctx.quick else 10)
    return {
        "sigma2_mode": mode,
        "sigma2_init": sigma2,
        "seed": index,
        "sigma2_final": float(torch.exp(2 * likelihood.log_sigma.detach())),
        "collapsed_fraction": float(collapsed_fraction(kl, EPS, DELTA).fraction),
        "collapsed_fraction_eps0.1": float(collapsed_fraction(kl, 0.1, DELTA).fraction),
        "active_units": active_units(mu).count,
        "total_kl": float(kl.sum(1).mean()),
        "test_nll_bound_nats_per_dim": scores["neg_elbo_per_dim"],
        "curve": np.sort(kl.mean(0).cpu().numpy())[::-1],
    }


def run(ctx: Context) -> StudyResult:
    start = time.perf_counter()
    data = load_image_data(ctx, seed=0)
    x, x_test = data.flat("train").to(ctx.device), data.flat("test").to(ctx.device)
    steps = ctx.steps(2000, 5)
    runs = [("fixed", s) for s in FIXED_SIGMA2] + [("learned", s) for s in LEARNED_INIT]
    results = ctx.map(_train_one, [(ctx, x, x_test, mode, sigma2, i) for mode, sigma2 in runs for i in ctx.seeds])
    curves: dict[tuple[str, float], list[np.ndarray]] = {}
    for result in results:
        curves.setdefault((result["sigma2_mode"], result["sigma2_init"]), []).append(result.pop("curve"))
    table = pd.DataFrame(results)
    csvs = [write_csv(ctx, "study4_collapse.csv", table)]
    keys = ["sigma2_mode", "sigma2_init"]
    means = table.groupby(keys, sort=False).mean(numeric_only=True).reset_index()
    sds = table.groupby(keys, sort=False).std(numeric_only=True).reset_index().fillna(0.0)

    fig, axes = figure(2)
    fixed, fixed_sd = means[means.sigma2_mode == "fixed"], sds[sds.sigma2_mode == "fixed"]
    learned, learned_sd = means[means.sigma2_mode == "learned"], sds[sds.sigma2_mode == "learned"]
    ax = axes[0]
    ax.errorbar(fixed.sigma2_init, fixed.collapsed_fraction, yerr=fixed_sd.collapsed_fraction, fmt="o-", capsize=3,
                label=f"fixed σ², (ε, δ) = ({EPS}, {DELTA})")
    ax.errorbar(fixed.sigma2_init, fixed["collapsed_fraction_eps0.1"], yerr=fixed_sd["collapsed_fraction_eps0.1"],
                fmt="s--", capsize=3, label="fixed σ², ε = 0.1")
    ax.errorbar(learned.sigma2_final, learned.collapsed_fraction, xerr=learned_sd.sigma2_final,
                yerr=learned_sd.collapsed_fraction, fmt="r^", ms=9, capsize=3, label="learned σ² (at its final value)")
    for i, (_, row) in enumerate(learned.iterrows()):
        ax.annotate(f"init {row.sigma2_init:g}", (row.sigma2_final, row.collapsed_fraction), fontsize=7,
                    xytext=(6, 6 + 11 * i), textcoords="offset points", arrowprops={"arrowstyle": "-", "lw": 0.5})
    ax.set_xscale("log")
    ax.set_xlabel("σ²")
    ax.set_ylabel("fraction of collapsed latent dimensions")
    ax.set_title(f"Posterior collapse vs decoder variance (mean ± sd, {len(ctx.seeds)} seeds)")
    ax.legend(fontsize=7)
    ax = axes[1]
    for (mode, sigma2), seed_curves in curves.items():
        ax.plot(np.mean(seed_curves, axis=0), marker=".", ls="-" if mode == "fixed" else "--",
                label=f"{mode} σ²{'' if mode == 'fixed' else ' init'}={sigma2:g}")
    ax.axhline(EPS, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("latent dimension (sorted)")
    ax.set_ylabel("mean KL per dimension (nats, mean over seeds)")
    ax.set_title("Per-dimension KL")
    ax.legend(fontsize=6)
    figure_name = save(fig, ctx.out_dir / "study4_collapse.png")

    monotone, init_order = [], []
    for index in ctx.seeds:
        run_ = table[table.seed == index]
        fractions = run_[run_.sigma2_mode == "fixed"].collapsed_fraction.to_numpy()
        monotone.append(bool(np.all(np.diff(fractions) >= 0)) and fractions[-1] > fractions[0])
        units = run_[run_.sigma2_mode == "learned"].set_index("sigma2_init").active_units
        init_order.append(bool(units[LEARNED_INIT[0]] > units[LEARNED_INIT[-1]]))
    claims = [
        Claim(f"collapsed fraction grows with fixed σ² ({FIXED_SIGMA2[0]:g} → {FIXED_SIGMA2[-1]:g}, never falling)", monotone),
        Claim(f"learned σ² started at {LEARNED_INIT[-1]:g} ends with fewer active units than started at "
              f"{LEARNED_INIT[0]:g}", init_order),
    ]
    outcome = outcome_of(claims)
    groups = {key: sub for key, sub in table.groupby(keys, sort=False)}
    learned_units = [groups[("learned", s)].active_units for s in LEARNED_INIT]
    between_within = ""
    if len(ctx.seeds) > 1:  # is the start's effect larger than the seed's?
        unit_means = [float(u.mean()) for u in learned_units]
        pooled_sd = float(np.sqrt(np.mean([float(u.var(ddof=1)) for u in learned_units])))
        between_within = (f" (the means of the starts span {max(unit_means) - min(unit_means):.1f} active units; seeds of "
                          f"one start differ by a pooled sd of {pooled_sd:.1f})")
    verdict = (
        f"Collapsed fraction for fixed σ² = {', '.join(f'{s:g}' for s in FIXED_SIGMA2)}: "
        f"{', '.join(mean_sd(groups[('fixed', s)].collapsed_fraction, '{:.2f}') for s in FIXED_SIGMA2)}; "
        f"learned σ² from {', '.join(f'{s:g}' for s in LEARNED_INIT)} ends at σ² = "
        f"{', '.join(mean_sd(groups[('learned', s)].sigma2_final, '{:.3g}') for s in LEARNED_INIT)} with "
        f"{', '.join(mean_sd(groups[('learned', s)].collapsed_fraction, '{:.2f}') for s in LEARNED_INIT)} collapsed and "
        f"{', '.join(mean_sd(u, '{:.1f}') for u in learned_units)} active units{between_within}. {claims_text(claims)}."
    )
    body = [
        markdown_table(seed_table(table, keys, {"sigma2_final": "{:.4f}", "total_kl": "{:.2f}",
                                                "active_units": "{:.1f}"}, default="{:.3f}")),
        f"Mean ± standard deviation over {len(ctx.seeds)} seeds (each seed's row in the CSV). "
        f"`collapsed_fraction`: share of the {LATENT} latent dimensions with P_x[KL_d(x) < ε] ≥ 1 − δ over the training "
        f"images, (ε, δ) = ({EPS}, {DELTA}) (`analysis.diagnostics.collapsed_fraction`); the ε = 0.1 column is looser. "
        "Active units: Var_x E[z_d|x] > 0.01. σ² is in [0, 1] pixel units (the pixel variance of the data averages ≈ 0.1). "
        "For the learned σ², compare the spread between starts with the spread between seeds of one start: a "
        "difference between starts smaller than the seed-to-seed spread is not evidence that the start matters.",
    ]
    method = (
        f"{data.name}: an MLP VAE (64-128-128-{LATENT}) trained {steps} Adam steps (batch 128) with `fv.vae_loss`, "
        f"with σ² fixed at {', '.join(f'{s:g}' for s in FIXED_SIGMA2)}, and with a learned shared σ² "
        f"(`fv.nn.GaussianLikelihood`) started from {', '.join(f'{s:g}' for s in LEARNED_INIT)}; each setting with "
        f"{len(ctx.seeds)} seeds (seed index s: torch seed {ctx.seed(4, 0)} + {SEED_STRIDE}·s, the same for every setting)."
    )
    return StudyResult(
        number=4, slug="collapse", title="Posterior collapse against σ²",
        papers="Lucas, Tucker, Grosse & Norouzi 2019, “Don't blame the ELBO! A linear VAE perspective on posterior collapse”",
        claim=(
            "Posterior collapse is driven by the decoder variance: the larger σ², the more latent dimensions are "
            "(ε, δ)-collapsed; and when σ² is learned, its initial value still matters, because dimensions that collapse "
            "early (while σ² is large) tend not to recover."
        ),
        method=method, body=body, figures=[figure_name], csvs=csvs, verdict=verdict, outcome=outcome,
        seconds=time.perf_counter() - start, claims=claims,
    )
