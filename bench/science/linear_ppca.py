"""Study 1: the linear VAE recovers probabilistic PCA (Lucas et al. 2019, "Don't blame the ELBO")."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch
from torch import nn

import fusedvae as fv
from fusedvae.analysis.diagnostics import collapsed_fraction
from fusedvae.analysis.linear import linear_vae_elbo, ppca_fit, ppca_log_likelihood

from .common import (
    SEED_STRIDE,
    Batches,
    Claim,
    Context,
    StudyResult,
    claims_text,
    load_digits_images,
    markdown_table,
    mean_sd,
    outcome_of,
    seed_table,
    train_loop,
    write_csv,
)
from .plots import figure, save

LATENT_SIZES = (1, 2, 4, 8, 16, 32)
COLLAPSE_Q = 8
EPS, DELTA = 0.01, 0.01


class LinearVAE(nn.Module):
    """Lucas et al.'s linear VAE: ``q(z|x) = N(V (x - b), diag(exp(logvar)))``, ``p(x|z) = N(W z + b, σ² I)``."""

    def __init__(self, dim: int, latent: int, *, log_sigma: float = 0.0, learn_sigma: bool = True) -> None:
        super().__init__()
        self.W = nn.Parameter(0.1 * torch.randn(dim, latent))
        self.b = nn.Parameter(torch.zeros(dim))
        self.V = nn.Parameter(0.01 * torch.randn(latent, dim))
        self.logvar = nn.Parameter(torch.zeros(latent))
        sigma = torch.tensor(float(log_sigma))
        if learn_sigma:
            self.log_sigma = nn.Parameter(sigma)
        else:
            self.register_buffer("log_sigma", sigma)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """The negative stochastic ELBO per datapoint: fusedvae's fused sample + KL, then its Gaussian NLL."""
        mu = (x - self.b) @ self.V.T
        z, kl = fv.rsample_kl(mu, self.logvar.expand_as(mu))
        return fv.gaussian_nll(x, z @ self.W.T + self.b, self.log_sigma) + kl

    @torch.no_grad()
    def mc_elbo(self, x: torch.Tensor, n_samples: int) -> float:
        return -float(sum(self.loss(x) for _ in range(n_samples)) / n_samples)

    def float64(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().double() for name, p in [*self.named_parameters(), *self.named_buffers()]}


def _train(x: torch.Tensor, q: int, steps: int, *, log_sigma: float | None, seed: int) -> LinearVAE:
    torch.manual_seed(seed)
    model = LinearVAE(x.shape[1], q, log_sigma=0.0 if log_sigma is None else log_sigma, learn_sigma=log_sigma is None)
    model.to(x.device)
    train_loop(lambda batch, _: model.loss(batch), list(model.parameters()), Batches(x, x.shape[0]), steps, lr=3e-2)
    return model


def _fit_one(ctx: Context, x: torch.Tensor, q: int, index: int) -> dict:
    """Train the linear VAE with latent size ``q`` and a learned σ² (one seed index); compare it with pPCA's MLE."""
    steps = ctx.steps(2000, 5)
    ctx.log(f"study 1: linear VAE q={q}, seed {index} ({steps} steps)")
    x64 = x.double()
    shift = -x.shape[1] * math.log(17.0)  # log-densities in grey-level units (see run)
    fit = ppca_fit(x64, q)
    model = _train(x, q, steps, log_sigma=None, seed=ctx.seed(q, index))
    p = model.float64()
    sigma2 = torch.exp(2 * p["log_sigma"])
    analytic = float(linear_vae_elbo(x64, p["b"], p["W"], sigma2, p["V"], p["logvar"]))
    trained_ll = float(ppca_log_likelihood(x64, p["b"], p["W"], sigma2))
    mc = model.mc_elbo(x, 4 if ctx.quick else 50)
    gram = p["W"].T @ p["W"]
    norms = gram.diagonal().sqrt()
    cosine = gram / (norms[:, None] * norms[None, :])
    off = float((cosine - torch.eye(q, dtype=cosine.dtype)).abs().max()) if q > 1 else 0.0
    ll = float(fit.log_likelihood) + shift
    return {
        "q": q,
        "seed": index,
        "ppca_ll_mle": ll,
        "trained_ll": trained_ll + shift,
        "elbo_analytic": analytic + shift,
        "elbo_stochastic": mc + shift,
        "gap_nats": ll - (analytic + shift),
        "gap_rel_pct": 100 * (ll - (analytic + shift)) / abs(ll),
        "sigma2_mle": float(fit.sigma2),
        "sigma2_learned": float(sigma2),
        "max_offdiag_cos_WtW": off,
    }


def _collapse_one(ctx: Context, x: torch.Tensor, q: int, sigma2: float, lam: np.ndarray, sigma2_mle: float, index: int) -> dict:
    """Train the linear VAE with σ² fixed (one seed index); count its collapsed dimensions against pPCA's prediction."""
    steps = ctx.steps(2000, 5)
    ctx.log(f"study 1: linear VAE q={q}, fixed sigma^2={sigma2:.4g}, seed {index}")
    model = _train(x, q, steps, log_sigma=0.5 * math.log(sigma2), seed=ctx.seed(100 + q, index))
    with torch.no_grad():
        mu = (x - model.b) @ model.V.T
        kl = fv.kl_normal(mu, model.logvar.expand_as(mu), reduction="none")
    collapsed = collapsed_fraction(kl, EPS, DELTA)
    kl_dims = kl.mean(0).cpu().numpy()
    return {
        "q": q,
        "sigma2": sigma2,
        "seed": index,
        "sigma2_over_mle": sigma2 / sigma2_mle,
        "collapsed_dims": int(collapsed.collapsed.sum()),
        "predicted_collapsed": int((lam <= sigma2).sum()),
        "collapsed_fraction": float(collapsed.fraction),
        "kl_total": float(kl_dims.sum()),
        "per_dim_kl": " ".join(f"{v:.3g}" for v in np.sort(kl_dims)[::-1]),
    }


def run(ctx: Context) -> StudyResult:
    start = time.perf_counter()
    data = load_digits_images(0, quick=ctx.quick)  # values in (0, 1): (grey level + u) / 17
    x = data.flat("train").to(ctx.device)
    x64 = x.double()
    # Report log-densities in the dataset's own units (grey levels 0..16, dequantised to [0, 17)):
    # x_grey = 17 x, so every log-density shifts by -D log 17; differences (gaps) are unit-free.
    steps = ctx.steps(2000, 5)
    sizes = LATENT_SIZES if not ctx.quick else (1, 2)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(x64.T, correction=0)).flip(0)
    table = pd.DataFrame(ctx.map(_fit_one, [(ctx, x, q, i) for q in sizes for i in ctx.seeds]))
    csvs = [write_csv(ctx, "study1_linear_ppca.csv", table)]

    # Fixed sigma^2 above the MLE: pPCA's optimum zeroes column i of W when lambda_i <= sigma^2,
    # so the linear VAE should collapse exactly those latent dimensions.
    q = COLLAPSE_Q if not ctx.quick else 2
    lam = eigenvalues[:q].cpu().numpy()
    sigma2_mle = float(eigenvalues[q:].mean())
    candidates = [sigma2_mle] + [float(np.sqrt(lam[k - 1] * lam[k])) for k in (6, 4, 2) if k < q] + [2.0 * float(lam[0])]
    collapse = pd.DataFrame(ctx.map(_collapse_one, [(ctx, x, q, s, lam, sigma2_mle, i) for s in candidates for i in ctx.seeds]))
    csvs.append(write_csv(ctx, "study1_linear_collapse.csv", collapse))
    means = table.groupby("q", sort=False).mean(numeric_only=True).reset_index()

    # Figure: ELBO against q; per-dim KL for each fixed sigma^2 (means over seeds).
    fig, axes = figure(2)
    ax = axes[0]
    ax.plot(means.q, means.ppca_ll_mle, "k-", marker="o", label="pPCA log-likelihood at the MLE (exact)")
    ax.plot(means.q, means.elbo_analytic, "C1--", marker="s", label="linear VAE: analytic ELBO (trained)")
    ax.plot(means.q, means.elbo_stochastic, "C2:", marker="^", label="linear VAE: stochastic ELBO (50 samples)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("latent size q")
    ax.set_ylabel(f"nats per image (grey-level units; mean of {len(ctx.seeds)} seeds)")
    ax.set_title("Linear VAE = pPCA on digits")
    ax.legend(fontsize=8)
    ax = axes[1]
    order = np.arange(1, q + 1)
    for sigma2, group in collapse.groupby("sigma2", sort=False):
        curve = np.mean([np.array(v.split(), dtype=float) for v in group.per_dim_kl], axis=0)  # each sorted already
        ax.plot(order, curve, marker="o", label=f"σ²={sigma2:.3g} ({mean_sd(group.collapsed_dims, '{:.1f}')} collapsed, "
                f"predicted {group.predicted_collapsed.iloc[0]})")
    ax.axhline(EPS, color="grey", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("latent dimension (sorted by KL)")
    ax.set_ylabel("mean KL per dimension (nats)")
    ax.set_title(f"Fixed σ² ≥ σ²_MLE (q={q}): collapse")
    ax.legend(fontsize=7)
    figure_name = save(fig, ctx.out_dir / "study1_linear_ppca.png")

    within, orthogonal, matches, monotone = [], [], [], []
    for index in ctx.seeds:
        fits, runs = table[table.seed == index], collapse[collapse.seed == index]
        within.append(bool(fits.gap_rel_pct.max() < 0.5))
        orthogonal.append(bool(fits.max_offdiag_cos_WtW.max() < 0.2))
        matches.append(bool((runs.collapsed_dims == runs.predicted_collapsed).all()))
        monotone.append(bool(np.all(np.diff(runs.collapsed_dims.to_numpy()) >= 0)))
    claims = [
        Claim(f"trained ELBO within 0.5% of the exact pPCA log-likelihood for every q = {sizes[0]}..{sizes[-1]}", within),
        Claim("columns of W orthogonal (|cos| < 0.2) for every q", orthogonal),
        Claim("with σ² fixed, the collapsed dimensions are the ones pPCA predicts, at every σ²", matches),
        Claim("collapsed count never falls as σ² grows", monotone),
    ]
    outcome = outcome_of(claims)
    per_seed_worst = table.groupby("seed")
    verdict = (
        f"Trained ELBO within {mean_sd(per_seed_worst.gap_rel_pct.max(), '{:.2f}')}% "
        f"({mean_sd(per_seed_worst.gap_nats.max(), '{:.3f}')} nats; the worst q of each seed) of the exact pPCA "
        f"log-likelihood for q = {sizes[0]}..{sizes[-1]}; columns of W orthogonal to |cos| ≤ "
        f"{table.max_offdiag_cos_WtW.max():.2f}; with σ² fixed above σ²_MLE the collapsed counts are "
        f"{', '.join(mean_sd(g.collapsed_dims, '{:.1f}') for _, g in collapse.groupby('sigma2', sort=False))} "
        f"(pPCA predicts {', '.join(str(g.predicted_collapsed.iloc[0]) for _, g in collapse.groupby('sigma2', sort=False))}). "
        f"{claims_text(claims)}."
    )
    body = [
        markdown_table(
            seed_table(table, ["q"], {"gap_rel_pct": "{:.3f}", "gap_nats": "{:.4f}", "sigma2_learned": "{:.4g}",
                                      "max_offdiag_cos_WtW": "{:.3f}"}, default="{:.3f}",
                       columns=["ppca_ll_mle", "trained_ll", "elbo_analytic", "elbo_stochastic", "gap_nats", "gap_rel_pct",
                                "sigma2_learned", "max_offdiag_cos_WtW"]),
        ),
        f"Mean ± standard deviation over {len(ctx.seeds)} seeds (each seed's row in the CSV). "
        "Log-densities are per image in the dataset's grey-level units (x ∈ [0, 17)^64 after dequantisation); "
        "in [0, 1] units add 64·log 17 = 181.33 nats. The gap in nats does not depend on the units; the "
        "relative gap does (it is measured against |log-likelihood| in grey-level units). "
        "`max_offdiag_cos_WtW` is the largest |cosine| between two columns of W (0 when WᵀW is diagonal). "
        f"σ²_learned is in [0, 1] units; the MLE values are {', '.join(f'{v:.4g}' for v in means.sigma2_mle)}.",
        f"**Collapse with σ² fixed** (q = {q}; a dimension is collapsed when its KL is below ε = {EPS} nats for "
        f"at least {100 * (1 - DELTA):.0f}% of the data; pPCA predicts column i of W is zero when λ_i ≤ σ²; "
        "per-dimension KLs of every seed in the CSV):",
        markdown_table(seed_table(collapse, ["sigma2"], {"sigma2_over_mle": "{:.2f}", "kl_total": "{:.3f}",
                                                         "collapsed_fraction": "{:.3f}", "collapsed_dims": "{:.1f}"},
                                  columns=["sigma2_over_mle", "collapsed_dims", "predicted_collapsed", "collapsed_fraction",
                                           "kl_total"])),
    ]
    method = (
        f"Digits ({x.shape[0]} training images, 64 pixels, dequantised). For each q, a linear VAE "
        f"(encoder V(x − b) with a learned diagonal variance shared across x; decoder Wz + b; learned σ²) trained "
        f"full-batch with Adam (lr 3e-2, cosine decay, {steps} steps) on fusedvae's one-sample stochastic ELBO "
        "(`fv.rsample_kl` + `fv.gaussian_nll`). Compared with `analysis.linear.ppca_fit` (closed-form MLE) and "
        "`linear_vae_elbo` (analytic ELBO) in float64. Then q = 8 with σ² fixed at σ²_MLE, between eigenvalues, "
        f"and above λ₁. Every training with {len(ctx.seeds)} seeds (torch seed q, or 100 + q, plus {SEED_STRIDE}·s)."
    )
    return StudyResult(
        number=1, slug="linear_ppca", title="Linear VAE = pPCA",
        papers="Lucas, Tucker, Grosse & Norouzi 2019, “Don't blame the ELBO! A linear VAE perspective on posterior collapse”",
        claim=(
            "A linear VAE with a diagonal Gaussian posterior recovers probabilistic PCA: at its optimum the ELBO equals the "
            "exact pPCA log-likelihood (the posterior is exact because WᵀW is diagonal there). With σ² held above the MLE, "
            "the directions whose eigenvalue is below σ² collapse (their KL goes to 0)."
        ),
        method=method, body=body, figures=[figure_name], csvs=csvs, verdict=verdict, outcome=outcome,
        seconds=time.perf_counter() - start, claims=claims,
    )
