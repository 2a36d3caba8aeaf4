"""Study 6: SGVB estimators A and B (Kingma & Welling 2014) and the IWAE bound (Burda et al. 2016)."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch

import fusedvae as fv
from fusedvae.analysis.estimators import iwae_bound, kl_estimator_a, log_importance_weights

from .common import (
    MLPVAE,
    SEED_STRIDE,
    Batches,
    Claim,
    Context,
    StudyResult,
    claims_text,
    load_image_data,
    markdown_table,
    mean_sd,
    outcome_of,
    seed_table,
    train_loop,
    write_csv,
)
from .plots import figure, save

LATENT = 16
KS = (1, 5, 50)
GRAD_DRAWS = 32


def _loss(model: MLPVAE, log_sigma: torch.Tensor, batch: torch.Tensor, estimator: str) -> torch.Tensor:
    mu, logvar = model.encode(batch)
    if estimator == "B":  # analytic KL: fusedvae's fused sample + KL
        return fv.vae_loss(batch, model.decode, mu, logvar, log_sigma=log_sigma).loss
    z = fv.rsample(mu, logvar)  # estimator A: the KL from the same sample, log q(z|x) - log p(z)
    nll = fv.gaussian_nll(batch, model.decode(z), log_sigma)
    return nll + kl_estimator_a(z, mu, logvar).sum(-1).mean()


@torch.no_grad()
def _iwae(model: MLPVAE, log_sigma: torch.Tensor, x: torch.Tensor, k: int, repeats: int) -> tuple[float, float]:
    """Mean over x of the IWAE bound L_K (repeated ``repeats`` times), and its standard error over repeats."""
    model.eval()
    mu, logvar = model.encode(x)
    values = []
    for _ in range(repeats):
        z = fv.rsample(mu, logvar, n_samples=k)  # (K, B, d)
        mean = model.decode(z.reshape(-1, z.shape[-1]))
        log_lik = -fv.gaussian_nll(x.repeat(k, 1), mean, log_sigma, reduction="per_sample").reshape(k, -1)
        values.append(float(iwae_bound(log_importance_weights(log_lik, z, mu, logvar)).mean()))
    model.train()
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(repeats)) if repeats > 1 else float("nan")


def _grad_variance(model: MLPVAE, log_sigma: torch.nn.Parameter, batch: torch.Tensor, estimator: str, draws: int) -> dict:
    """Total variance (summed over parameters) of the minibatch gradient over noise draws, encoder and decoder."""
    grads = {"encoder": [], "decoder": []}
    encoder = [p for n, p in model.named_parameters() if not n.startswith("decoder")]
    decoder = [p for n, p in model.named_parameters() if n.startswith("decoder")]
    for _ in range(draws):
        model.zero_grad(set_to_none=True)
        _loss(model, log_sigma, batch, estimator).backward()
        grads["encoder"].append(torch.cat([p.grad.flatten() for p in encoder]))
        grads["decoder"].append(torch.cat([p.grad.flatten() for p in decoder]))
    model.zero_grad(set_to_none=True)
    out = {}
    for part, values in grads.items():
        stacked = torch.stack(values)
        out[f"{part}_grad_variance"] = float(stacked.var(0).sum())
        out[f"{part}_grad_norm2"] = float(stacked.mean(0).square().sum())
    return out


def _train_one(ctx: Context, x: torch.Tensor, x_test: torch.Tensor, estimator: str, index: int) -> dict:
    """Train with one estimator for one seed index: its convergence curve, IWAE bounds and (B only) the trained
    parameters' gradient variance under both estimators."""
    steps = ctx.steps(1500, 6)
    every = max(steps // 15, 1)
    repeats = 2 if ctx.quick else 5
    ctx.log(f"study 6: estimator {estimator}, seed {index} ({steps} steps)")
    torch.manual_seed(ctx.seed(6, index))
    model = MLPVAE(x.shape[1], LATENT).to(ctx.device)
    log_sigma = torch.nn.Parameter(torch.zeros((), device=ctx.device))
    curves, bounds, variances = [], [], []

    def record(step: int) -> None:
        elbo, _ = _iwae(model, log_sigma.detach(), x_test, 1, 2)
        curves.append({"estimator": estimator, "seed": index, "step": step, "test_elbo": elbo,
                       "log_sigma": float(log_sigma.detach())})

    record(0)
    train_loop(lambda b, _: _loss(model, log_sigma, b, estimator), [*model.parameters(), log_sigma],
               Batches(x, 128, seed=ctx.seed(7, index)), steps, lr=2e-3, callback=record, every=every,
               sigma_params=[log_sigma])
    for k in KS:
        value, stderr = _iwae(model, log_sigma.detach(), x_test, k, repeats)
        bounds.append({"trained_with": estimator, "K": k, "seed": index, "iwae_bound": value, "stderr": stderr})
    if estimator == "B":  # both estimators' gradient variance at the parameters B trained to
        variances = _variances(ctx, model, log_sigma, x, "trained", index)
    return {"curves": curves, "bounds": bounds, "variances": variances}


def _variances(ctx: Context, model, log_sigma, x: torch.Tensor, when: str, index: int) -> list[dict]:
    batch = Batches(x, 128, seed=ctx.seed(11, index)).next()
    torch.manual_seed(ctx.seed(12, index))
    return [{"parameters": when, "estimator": estimator, "seed": index,
             **_grad_variance(model, log_sigma, batch, estimator, 4 if ctx.quick else GRAD_DRAWS)}
            for estimator in ("A", "B")]


def _init_variances(ctx: Context, x: torch.Tensor, index: int) -> dict:
    """Both estimators' gradient variance at the initial parameters of seed index ``index``."""
    torch.manual_seed(ctx.seed(6, index))
    model, log_sigma = MLPVAE(x.shape[1], LATENT).to(ctx.device), torch.nn.Parameter(torch.zeros((), device=ctx.device))
    return {"curves": [], "bounds": [], "variances": _variances(ctx, model, log_sigma, x, "init", index)}


def run(ctx: Context) -> StudyResult:
    start = time.perf_counter()
    data = load_image_data(ctx, seed=0)
    x, x_test = data.flat("train").to(ctx.device), data.flat("test").to(ctx.device)
    steps = ctx.steps(1500, 6)
    every = max(steps // 15, 1)
    repeats = 2 if ctx.quick else 5
    results = ctx.map(_init_variances, [(ctx, x, i) for i in ctx.seeds])
    results += ctx.map(_train_one, [(ctx, x, x_test, e, i) for e in ("B", "A") for i in ctx.seeds])
    curves = [row for r in results for row in r["curves"]]
    bounds = [row for r in results for row in r["bounds"]]
    variances = [row for r in results for row in r["variances"]]  # init rows first, then trained

    curves_df, bounds_df = pd.DataFrame(curves), pd.DataFrame(bounds)
    var_df = pd.DataFrame(variances)
    csvs = [write_csv(ctx, "study6_convergence.csv", curves_df), write_csv(ctx, "study6_iwae.csv", bounds_df),
            write_csv(ctx, "study6_grad_variance.csv", var_df)]
    dim = x.shape[1]

    fig, axes = figure(2)
    ax = axes[0]
    for estimator, group in curves_df.groupby("estimator"):
        by_step = group.groupby("step").test_elbo
        mean, sd = by_step.mean() / dim, by_step.std().fillna(0.0) / dim
        ax.plot(mean.index, mean, marker=".", label=f"trained with estimator {estimator}")
        ax.fill_between(mean.index, mean - sd, mean + sd, alpha=0.25)
    ax.set_xlabel("step")
    ax.set_ylabel(f"test ELBO (nats / dim, mean ± sd over {len(ctx.seeds)} seeds)")
    ax.set_title("Convergence")
    low = float(curves_df[curves_df.step >= steps // 5].test_elbo.min()) / dim if steps >= 5 else None
    if low is not None:
        ax.set_ylim(bottom=low - 0.05 * abs(low) - 0.05)
    ax.legend(fontsize=8)
    ax = axes[1]
    for estimator, group in bounds_df.groupby("trained_with"):
        by_k = group.groupby("K").iwae_bound
        ax.errorbar(by_k.mean().index, by_k.mean() / dim, yerr=by_k.std().fillna(0.0) / dim, marker="o", capsize=3,
                    label=f"trained with estimator {estimator}")
    ax.set_xscale("log")
    ax.set_xlabel("K (importance samples)")
    ax.set_ylabel("test IWAE bound L_K (nats / dim, mean ± sd over seeds)")
    ax.set_title("IWAE bound against K")
    ax.legend(fontsize=8)
    figure_name = save(fig, ctx.out_dir / "study6_estimators.png")

    final_step = curves_df.step.max()
    monotone, lower_init, lower_trained, b_not_worse = [], [], [], []
    ratios: dict[str, list[float]] = {"init": [], "trained": []}
    gaps: dict[str, list[float]] = {"A": [], "B": []}
    finals: dict[str, list[float]] = {"A": [], "B": []}
    for index in ctx.seeds:
        pivot = bounds_df[bounds_df.seed == index].pivot(index="trained_with", columns="K", values="iwae_bound")
        monotone.append(all(bool(np.all(np.diff(pivot.loc[e, list(KS)].to_numpy()) > 0)) for e in pivot.index))
        for e in pivot.index:
            gaps[e].append(float(pivot.loc[e, KS[-1]] - pivot.loc[e, KS[0]]))
        var = var_df[var_df.seed == index].set_index(["parameters", "estimator"]).encoder_grad_variance
        for when in ratios:
            ratios[when].append(float(var.loc[(when, "A")] / var.loc[(when, "B")]))
        lower_init.append(ratios["init"][-1] > 1)
        lower_trained.append(ratios["trained"][-1] > 1)
        final = curves_df[(curves_df.step == final_step) & (curves_df.seed == index)].set_index("estimator").test_elbo
        for e in finals:
            finals[e].append(float(final[e]))
        b_not_worse.append(bool(final["B"] >= final["A"] - 0.1))
    claims = [
        Claim("IWAE L_1 < L_5 < L_50 for both estimators", monotone),
        Claim("B's encoder gradient has lower variance than A's at init", lower_init),
        Claim("B's encoder gradient has lower variance than A's at the trained parameters", lower_trained),
        Claim("B's final test ELBO at least A's (within 0.1 nats)", b_not_worse),
    ]
    outcome = outcome_of(claims)
    verdict = (
        f"Estimator B's encoder gradient has {mean_sd(ratios['init'], '{:.3g}')}× (at init) and "
        f"{mean_sd(ratios['trained'], '{:.2g}')}× (trained) less variance than A's; final test ELBO B "
        f"{mean_sd(np.array(finals['B']) / dim, '{:.3f}')} vs A {mean_sd(np.array(finals['A']) / dim, '{:.3f}')} nats/dim; "
        f"L_50 − L_1 = {mean_sd(gaps['B'], '{:.2f}')} (B) and {mean_sd(gaps['A'], '{:.2f}')} (A) nats per image. "
        f"{claims_text(claims)}."
    )
    bounds_df = bounds_df.assign(per_dim=bounds_df.iwae_bound / dim)
    body = [
        f"**IWAE bounds on the test set** (nats per image; per_dim = per pixel; mean ± standard deviation over "
        f"{len(ctx.seeds)} seeds; `stderr`, each seed's standard error over {repeats} repeats, averaged):",
        markdown_table(seed_table(bounds_df, ["trained_with", "K"], {"stderr": "{:.3f}", "per_dim": "{:.4f}"},
                                  default="{:.3f}")),
        "**Gradient variance** over "
        f"{GRAD_DRAWS} noise draws on one batch of 128, at the same parameters for both estimators (summed over "
        "parameters; `grad_norm2` is the squared norm of the mean gradient, for scale; mean ± sd over seeds, the "
        "parameters being each seed's own):",
        markdown_table(seed_table(var_df, ["parameters", "estimator"], default="{:.4g}")),
        "**Convergence** (test ELBO, nats per image, one-sample estimate averaged twice) every "
        f"{every} steps is in `study6_convergence.csv`; final: B {mean_sd(finals['B'], '{:.3f}')}, "
        f"A {mean_sd(finals['A'], '{:.3f}')}.",
    ]
    method = (
        f"{data.name}: an MLP VAE (64-128-128-{LATENT}, learned shared σ_x) trained {steps} Adam steps (batch 128, the "
        f"same seed and batches for both estimators; {len(ctx.seeds)} seeds: torch seed 6 + {SEED_STRIDE}·s) "
        f"with estimator B (analytic KL: `fv.vae_loss`) and with estimator A (z from `fv.rsample`, "
        "NLL from `fv.gaussian_nll`, KL from the sample by `analysis.estimators.kl_estimator_a`). The IWAE bound "
        f"(`log_importance_weights` + `iwae_bound`, K samples from `fv.rsample(n_samples=K)`) "
        f"for K ∈ {{{', '.join(map(str, KS))}}}."
    )
    return StudyResult(
        number=6, slug="estimators", title="Estimators A and B, IWAE",
        papers="Kingma & Welling 2014, “Auto-encoding variational Bayes”; Burda, Grosse & Salakhutdinov 2016, "
        "“Importance weighted autoencoders”",
        claim=(
            "Both SGVB estimators are unbiased for the same ELBO, but B, which integrates the KL analytically, has "
            "lower variance and typically trains at least as well as A. The importance-weighted bound L_K increases "
            "with K (L_1 = ELBO ≤ L_5 ≤ L_50 ≤ log p(x)), and L_K − L_1 measures how far the posterior is from exact."
        ),
        method=method, body=body, figures=[figure_name], csvs=csvs, verdict=verdict, outcome=outcome,
        seconds=time.perf_counter() - start, claims=claims,
    )
