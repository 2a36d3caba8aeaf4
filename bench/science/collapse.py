"""Study 4: posterior collapse against the decoder variance σ² (Lucas et al. 2019)."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch

import fusedvae as fv
from fusedvae.analysis.diagnostics import active_units, collapsed_fraction

from .common import Context, StudyResult, evaluate_gaussian_vae, load_image_data, markdown_table, posterior, train_mlp_vae, write_csv
from .plots import figure, save

LATENT = 16
FIXED_SIGMA2 = (0.005, 0.02, 0.05, 0.1, 0.2)
LEARNED_INIT = (0.01, 0.1, 1.0)
EPS, DELTA = 0.01, 0.01


def run(ctx: Context) -> StudyResult:
    start = time.perf_counter()
    data = load_image_data(ctx, seed=0)
    x, x_test = data.flat("train").to(ctx.device), data.flat("test").to(ctx.device)
    steps = ctx.steps(2000, 5)
    runs = [("fixed", s) for s in FIXED_SIGMA2] + [("learned", s) for s in LEARNED_INIT]
    rows, curves = [], {}
    for mode, sigma2 in runs:
        ctx.log(f"study 4: {mode} sigma^2 (init) {sigma2:g} ({steps} steps)")
        model, likelihood = train_mlp_vae(
            x, LATENT, steps, log_sigma=0.5 * math.log(sigma2), learn_sigma=mode == "learned", seed=4
        )
        mu, logvar = posterior(model, x)
        kl = fv.kl_normal(mu, logvar, reduction="none")  # (N, LATENT): KL per datapoint and dimension
        collapsed = collapsed_fraction(kl, EPS, DELTA)
        curves[(mode, sigma2)] = np.sort(kl.mean(0).cpu().numpy())[::-1]
        final_sigma2 = float(torch.exp(2 * likelihood.log_sigma.detach()))
        scores = evaluate_gaussian_vae(model, x_test, likelihood.log_sigma.detach(), n_samples=2 if ctx.quick else 10)
        rows.append(
            {
                "sigma2_mode": mode,
                "sigma2_init": sigma2,
                "sigma2_final": final_sigma2,
                "collapsed_fraction": float(collapsed.fraction),
                "collapsed_fraction_eps0.1": float(collapsed_fraction(kl, 0.1, DELTA).fraction),
                "active_units": active_units(mu).count,
                "total_kl": float(kl.sum(1).mean()),
                "test_nll_bound_nats_per_dim": scores["neg_elbo_per_dim"],
            }
        )
    table = pd.DataFrame(rows)
    csvs = [write_csv(ctx, "study4_collapse.csv", table)]

    fig, axes = figure(2)
    fixed = table[table.sigma2_mode == "fixed"]
    learned = table[table.sigma2_mode == "learned"]
    ax = axes[0]
    ax.plot(fixed.sigma2_init, fixed.collapsed_fraction, "o-", label=f"fixed σ², (ε, δ) = ({EPS}, {DELTA})")
    ax.plot(fixed.sigma2_init, fixed["collapsed_fraction_eps0.1"], "s--", label=f"fixed σ², ε = 0.1")
    ax.plot(learned.sigma2_final, learned.collapsed_fraction, "r^", ms=9, label="learned σ² (at its final value)")
    for i, (_, row) in enumerate(learned.iterrows()):
        ax.annotate(f"init {row.sigma2_init:g}", (row.sigma2_final, row.collapsed_fraction), fontsize=7,
                    xytext=(6, 6 + 11 * i), textcoords="offset points", arrowprops={"arrowstyle": "-", "lw": 0.5})
    ax.set_xscale("log")
    ax.set_xlabel("σ²")
    ax.set_ylabel("fraction of collapsed latent dimensions")
    ax.set_title("Posterior collapse vs decoder variance")
    ax.legend(fontsize=7)
    ax = axes[1]
    for (mode, sigma2), curve in curves.items():
        ax.plot(curve, marker=".", ls="-" if mode == "fixed" else "--", label=f"{mode} σ²{'' if mode == 'fixed' else ' init'}={sigma2:g}")
    ax.axhline(EPS, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("latent dimension (sorted)")
    ax.set_ylabel("mean KL per dimension (nats)")
    ax.set_title("Per-dimension KL")
    ax.legend(fontsize=6)
    figure_name = save(fig, ctx.out_dir / "study4_collapse.png")

    fractions = fixed.collapsed_fraction.to_numpy()
    monotone = bool(np.all(np.diff(fractions) >= 0)) and fractions[-1] > fractions[0]
    spread = float(learned.collapsed_fraction.max() - learned.collapsed_fraction.min())
    au_spread = int(learned.active_units.max() - learned.active_units.min())
    init_matters = spread > 0 or au_spread >= 2
    outcome = "bears out" if monotone and init_matters else ("partly" if monotone or init_matters else "does not bear out")
    verdict = (
        f"Collapsed fraction rises with fixed σ² ({', '.join(f'{f:.2f}' for f in fractions)} for σ² = "
        f"{', '.join(f'{s:g}' for s in FIXED_SIGMA2)}{'' if monotone else ': not monotone'}); learned σ² from "
        f"{', '.join(f'{s:g}' for s in LEARNED_INIT)} ends at σ² = {', '.join(f'{s:.3g}' for s in learned.sigma2_final)} "
        f"with {', '.join(f'{f:.2f}' for f in learned.collapsed_fraction)} collapsed and "
        f"{', '.join(str(a) for a in learned.active_units)} active units: the initial value "
        f"{'still matters' if init_matters else 'does not matter here'}."
    )
    body = [
        markdown_table(table, {"sigma2_init": "{:g}", "sigma2_final": "{:.4f}", "total_kl": "{:.2f}"}, default="{:.3f}"),
        f"`collapsed_fraction`: share of the {LATENT} latent dimensions with P_x[KL_d(x) < ε] ≥ 1 − δ over the training "
        f"images, (ε, δ) = ({EPS}, {DELTA}) (`reference.diagnostics.collapsed_fraction`); the ε = 0.1 column is looser. "
        "Active units: Var_x E[z_d|x] > 0.01. σ² is in [0, 1] pixel units (the pixel variance of the data averages ≈ 0.1).",
    ]
    method = (
        f"{data.name}: an MLP VAE (64-128-128-{LATENT}) trained {steps} Adam steps (batch 128) with `fv.vae_loss`, "
        f"with σ² fixed at {', '.join(f'{s:g}' for s in FIXED_SIGMA2)}, and with a learned shared σ² "
        f"(`fv.nn.GaussianLikelihood`) started from {', '.join(f'{s:g}' for s in LEARNED_INIT)}; same seed for all."
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
        seconds=time.perf_counter() - start,
    )
