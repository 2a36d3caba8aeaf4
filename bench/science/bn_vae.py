"""Study 3: BN-VAE's fixed batch-norm scale γ on the posterior mean (Zhu et al. 2020)."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch

import fusedvae as fv
from fusedvae.reference.diagnostics import active_units, aggregate_posterior_kl, collapsed_fraction

from .common import Context, StudyResult, evaluate_gaussian_vae, load_image_data, markdown_table, posterior, train_mlp_vae, write_csv
from .plots import figure, save

GAMMAS = (0.0, 0.3, 0.6, 1.0, 1.5, 2.0)
LATENT = 16
SIGMA2 = 0.2  # a fixed decoder variance at which the plain VAE collapses most dimensions (see study 4)


def run(ctx: Context) -> StudyResult:
    start = time.perf_counter()
    data = load_image_data(ctx, seed=0)
    x, x_test = data.flat("train").to(ctx.device), data.flat("test").to(ctx.device)
    steps = ctx.steps(1200, 5)
    rows, per_dim_kl, per_dim_bound = [], {}, {}
    for gamma in GAMMAS:
        ctx.log(f"study 3: BN-VAE gamma={gamma:g} ({steps} steps)")
        model, likelihood = train_mlp_vae(
            x, LATENT, steps, log_sigma=0.5 * math.log(SIGMA2), bn_gamma=gamma or None, seed=3
        )
        mu, logvar = posterior(model, x_test)  # eval mode: BN uses its running statistics
        kl = fv.kl_normal(mu, logvar, reduction="none")
        kl_dim = kl.mean(0)
        bound = aggregate_posterior_kl(mu.double(), logvar.double())
        per_dim_kl[gamma] = kl_dim.cpu().numpy()
        per_dim_bound[gamma] = bound.cpu().numpy()
        scores = evaluate_gaussian_vae(model, x_test, likelihood.log_sigma, n_samples=2 if ctx.quick else 10)
        rows.append(
            {
                "gamma": gamma,
                "min_dim_kl": float(kl_dim.min()),
                "mean_dim_kl": float(kl_dim.mean()),
                "gamma2_over_2": gamma**2 / 2,
                "total_kl": float(kl_dim.sum()),
                "active_units": active_units(mu).count,
                "collapsed_fraction": float(collapsed_fraction(kl).fraction),
                "agg_kl_bound_min": float(bound.min()),
                "agg_kl_bound_mean": float(bound.mean()),
                "agg_kl_bound_floor": 0.5 * (gamma**2 - 1 - math.log(gamma**2)) if gamma > 1 else 0.0,
                "nll_bound_nats_per_dim": scores["neg_elbo_per_dim"],
                "mse": scores["mse"],
            }
        )
    table = pd.DataFrame(rows)
    per_dim = pd.DataFrame(
        [{"gamma": g, "dim": d, "kl": float(per_dim_kl[g][d]), "agg_kl_bound": float(per_dim_bound[g][d])}
         for g in GAMMAS for d in range(len(per_dim_kl[g]))]
    )
    csvs = [write_csv(ctx, "study3_bn_vae.csv", table), write_csv(ctx, "study3_bn_vae_per_dim.csv", per_dim)]

    fig, axes = figure(2)
    for gamma in GAMMAS:
        axes[0].plot(np.sort(per_dim_kl[gamma])[::-1], marker=".", label=f"γ={gamma:g}" + (" (no BN)" if gamma == 0 else ""))
        axes[1].plot(np.sort(per_dim_bound[gamma])[::-1], marker=".", label=f"γ={gamma:g}")
    for gamma in GAMMAS[1:]:
        axes[0].axhline(gamma**2 / 2, color="grey", lw=0.5, ls=":")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("latent dimension (sorted)")
    axes[0].set_ylabel("mean KL per dimension (nats, test)")
    axes[0].set_title("Per-dimension KL (dotted: γ²/2)")
    axes[0].legend(fontsize=7)
    axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[1].set_xlabel("latent dimension (sorted)")
    axes[1].set_ylabel("lower bound on KL(q(z_d) || N(0,1))")
    axes[1].set_title("Aggregate posterior vs prior (posterior hole)")
    axes[1].legend(fontsize=7)
    figure_name = save(fig, ctx.out_dir / "study3_bn_vae.png")

    bn = table[table.gamma > 0]
    plain = table[table.gamma == 0].iloc[0]
    no_collapse = bool((bn.min_dim_kl > 0.5 * bn.gamma2_over_2).all() and (bn.collapsed_fraction == 0).all())
    plain_collapses = plain.collapsed_fraction > 0
    hole = table[table.gamma > 1]
    holes = bool((hole.agg_kl_bound_min > 0.5 * hole.agg_kl_bound_floor).all())
    small = table[(table.gamma > 0) & (table.gamma <= 1)]
    no_hole = bool((small.agg_kl_bound_mean < hole.agg_kl_bound_mean.min()).all())
    checks = [no_collapse, holes, no_hole]
    outcome = "bears out" if all(checks) else ("partly" if any(checks) else "does not bear out")
    verdict = (
        f"Every dimension keeps KL ≥ {bn.min_dim_kl.min():.3g} nats for γ > 0 (γ²/2 = {bn.gamma2_over_2.min():.3g} at the "
        f"smallest γ; {'no' if no_collapse else 'some'} collapsed dims) against "
        f"{plain.collapsed_fraction:.0%} collapsed without BN; the aggregate-posterior bound is "
        f"{', '.join(f'{v:.2f}' for v in hole.agg_kl_bound_min)} nats per dim (min) for γ = "
        f"{', '.join(f'{g:g}' for g in hole.gamma)} (a posterior hole) vs ≤ {small.agg_kl_bound_mean.max():.3f} for γ ≤ 1."
    )
    body = [
        markdown_table(table, {"gamma": "{:g}", "collapsed_fraction": "{:.2f}", "mse": "{:.4f}"}, default="{:.3f}"),
        "KL per dimension averaged over the test images, in nats; `gamma2_over_2` is BN-VAE's lower bound on the "
        "expected KL of each dimension (the batch-normalised means have variance γ² per dimension). "
        "`agg_kl_bound_*`: `reference.diagnostics.aggregate_posterior_kl`, the moment-matched lower bound on "
        "KL(q(z_d) ‖ N(0, 1)) for the aggregate posterior q(z) = mean_x q(z|x); its floor "
        "½(γ² − 1 − log γ²) for γ > 1 follows from Var q(z_d) ≥ γ². `collapsed_fraction`: (ε, δ) = (0.01, 0.01). "
        "fusedvae's `BatchNormMean` requires γ > 0, so the γ = 0 row is the same VAE without the BN layer.",
    ]
    method = (
        f"{data.name}: an MLP VAE (64-128-128-{LATENT}, Gaussian decoder with σ² fixed at {SIGMA2}, a value at which the "
        f"plain VAE collapses most dimensions) trained {steps} Adam steps (batch 128) with `fv.vae_loss`; the "
        "posterior mean goes through `fv.nn.BatchNormMean(γ)`. Diagnostics on the test set in eval mode."
    )
    return StudyResult(
        number=3, slug="bn_vae", title="BN-VAE and γ",
        papers="Zhu, Bi, Liu, Ma, Li & Wu 2020, “A batch normalized inference network keeps the KL vanishing away”",
        claim=(
            "Batch-normalising the posterior mean with a fixed scale γ > 0 keeps every dimension's expected KL above γ²/2, "
            "so no dimension collapses; for γ > 1 the aggregate posterior's variance exceeds the prior's, so it no longer "
            "matches the prior (the aggregate-posterior KL bound is > 0: a posterior hole)."
        ),
        method=method, body=body, figures=[figure_name], csvs=csvs, verdict=verdict, outcome=outcome,
        seconds=time.perf_counter() - start,
    )
