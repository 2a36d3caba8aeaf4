"""The research tools (:mod:`fusedvae.analysis`): diagnostics, estimators, linear models and the β-TC decomposition.

Everything runs on the CPU in float64. Statistical checks draw from a seeded generator (fresh random
inputs, reproducible) and compare against the standard error of the very sample they use, so a
tolerance of k standard errors has a known false-failure rate instead of a hand-tuned epsilon.
"""

from __future__ import annotations

import doctest
import importlib
import itertools
import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

import fusedvae as fv
from fusedvae.analysis.betatc import betatc_decomposition, log_aggregate_posterior, mss_log_weights
from fusedvae.analysis.diagnostics import active_units, aggregate_posterior_kl, collapsed_fraction
from fusedvae.analysis.estimators import (
    iwae_bound,
    kl_estimator_a,
    kl_estimator_b,
    log_importance_weights,
    log_normal,
)
from fusedvae.analysis.linear import (
    linear_vae_elbo,
    linear_vae_optimal_encoder,
    ppca_fit,
    ppca_log_likelihood,
)
from fusedvae.reference.kl import kl_normal_elementwise

F64 = torch.float64
#: Standard errors allowed in a Monte Carlo comparison: a Gaussian 5-sigma event has probability 6e-7.
Z = 5.0


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20240917)


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def rand(gen, *shape):
    return torch.rand(*shape, generator=gen, dtype=F64)


def correlated_data(gen, n=400, d=7):
    """Data with a spread of eigenvalues and a nonzero mean: x = a A^T + b."""
    mixing = randn(gen, d, d) * torch.linspace(2.0, 0.3, d, dtype=F64)
    return randn(gen, n, d) @ mixing.T + randn(gen, d)


def mean_and_stderr(samples, dim=0):
    return samples.mean(dim), samples.std(dim) / math.sqrt(samples.shape[dim])


@pytest.mark.parametrize("module", ["diagnostics", "estimators", "linear", "betatc"])
def test_docstring_examples_run(module):
    mod = importlib.import_module(f"fusedvae.analysis.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    "old, new",
    [(f"fusedvae.reference.{m}", f"fusedvae.analysis.{m}") for m in ("diagnostics", "estimators", "linear", "betatc")]
    + [("fusedvae.reference.reductions", "fusedvae.reductions")],
)
def test_moved_modules_keep_a_deprecated_alias(old, new, monkeypatch):
    import sys

    import fusedvae.reference

    name = old.rsplit(".", 1)[1]

    def forget_alias():
        # as in a new process (hasattr would import it through the package's __getattr__: look in vars)
        if name in vars(fusedvae.reference):
            monkeypatch.delattr(fusedvae.reference, name)
        monkeypatch.delitem(sys.modules, old, raising=False)

    forget_alias()
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        alias = importlib.import_module(old)
    assert alias is importlib.import_module(new)
    forget_alias()
    with pytest.warns(DeprecationWarning):
        assert getattr(fusedvae.reference, name) is alias


def test_reference_holds_the_specification_only():
    import fusedvae.reference

    public = set(fusedvae.reference.__all__)
    assert not public & {"diagnostics", "estimators", "linear", "betatc", "reductions"}


# ---------------------------------------------------------------- linear models


def test_ppca_log_likelihood_matches_multivariate_normal(gen):
    x = correlated_data(gen)
    mean, W, sigma2 = randn(gen, 7), randn(gen, 7, 3), 0.3 + rand(gen, ())
    expected = MultivariateNormal(mean, W @ W.T + sigma2 * torch.eye(7, dtype=F64)).log_prob(x)
    got = ppca_log_likelihood(x, mean, W, sigma2, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ppca_log_likelihood(x, mean, W, sigma2, reduction="sum"), expected.sum())
    torch.testing.assert_close(ppca_log_likelihood(x, mean, W, float(sigma2)), expected.mean())


def test_ppca_fit_closed_form(gen):
    x, q = correlated_data(gen), 3
    fit = ppca_fit(x, q)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(x.T, correction=0)).flip(0)
    # sigma2_MLE is the mean discarded eigenvalue; W^T W = Lambda_q - sigma2 I (orthogonal columns).
    torch.testing.assert_close(fit.sigma2, eigenvalues[q:].mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(fit.W.T @ fit.W, torch.diag(eigenvalues[:q] - fit.sigma2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fit.mean, x.mean(0))
    # The closed-form maximum equals the direct multivariate-normal log-likelihood at the fit ...
    covariance = fit.W @ fit.W.T + fit.sigma2 * torch.eye(7, dtype=F64)
    direct = MultivariateNormal(fit.mean, covariance).log_prob(x).mean()
    torch.testing.assert_close(fit.log_likelihood, direct, rtol=1e-12, atol=1e-12)
    # ... and it is a maximum: zero gradient, and every random perturbation is lower.
    W, s2 = fit.W.clone().requires_grad_(), fit.sigma2.clone().requires_grad_()
    ppca_log_likelihood(x, fit.mean, W, s2).backward()
    assert W.grad.abs().max() < 1e-10 and s2.grad.abs() < 1e-10
    for _ in range(5):
        W, sigma2 = fit.W + 0.05 * randn(gen, 7, q), fit.sigma2 * (1 + 0.1 * rand(gen, ()))
        worse = ppca_log_likelihood(x, fit.mean, W, sigma2)
        assert worse < fit.log_likelihood


def test_linear_vae_elbo_equals_ppca_log_likelihood_at_the_optimum(gen):
    x = correlated_data(gen)
    fit = ppca_fit(x, 3)
    V, logvar = linear_vae_optimal_encoder(fit.W, fit.sigma2)
    elbo = linear_vae_elbo(x, fit.mean, fit.W, fit.sigma2, V, logvar, reduction="none")
    exact = ppca_log_likelihood(x, fit.mean, fit.W, fit.sigma2, reduction="none")
    # q(z|x) is then the exact posterior, so the bound is tight for every datapoint, not just on average.
    torch.testing.assert_close(elbo, exact, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(elbo.mean(), fit.log_likelihood, rtol=1e-12, atol=1e-12)


def test_linear_vae_elbo_is_below_the_ppca_log_likelihood_elsewhere(gen):
    x = correlated_data(gen)
    fit = ppca_fit(x, 3)
    V_opt, logvar_opt = linear_vae_optimal_encoder(fit.W, fit.sigma2)
    # A perturbed encoder on the optimal decoder.
    for _ in range(5):
        V = V_opt + 0.1 * randn(gen, 3, 7)
        logvar = logvar_opt + 0.3 * randn(gen, 3)
        assert linear_vae_elbo(x, fit.mean, fit.W, fit.sigma2, V, logvar) < fit.log_likelihood - 1e-6
    # Any decoder: even with its best diagonal encoder, ELBO <= its own log-likelihood <= the pPCA maximum.
    for _ in range(5):
        W, sigma2 = randn(gen, 7, 3), 0.2 + rand(gen, ())
        V, logvar = linear_vae_optimal_encoder(W, sigma2)
        elbo = linear_vae_elbo(x, fit.mean, W, sigma2, V, logvar, reduction="none")
        log_p = ppca_log_likelihood(x, fit.mean, W, sigma2, reduction="none")
        assert (elbo <= log_p + 1e-12).all() and log_p.mean() < fit.log_likelihood
    # A rotated optimum, W R: same likelihood, but a diagonal posterior can no longer be exact.
    rotation, _ = torch.linalg.qr(randn(gen, 3, 3))
    W = fit.W @ rotation
    torch.testing.assert_close(ppca_log_likelihood(x, fit.mean, W, fit.sigma2), fit.log_likelihood)
    V, logvar = linear_vae_optimal_encoder(W, fit.sigma2)
    assert linear_vae_elbo(x, fit.mean, W, fit.sigma2, V, logvar) < fit.log_likelihood - 1e-6


def test_linear_vae_optimal_encoder_is_stationary(gen):
    x = correlated_data(gen)
    W, sigma2 = randn(gen, 7, 3), 0.2 + rand(gen, ())
    V, logvar = (t.clone().requires_grad_() for t in linear_vae_optimal_encoder(W, sigma2))
    linear_vae_elbo(x, x.mean(0), W, sigma2, V, logvar).backward()
    assert V.grad.abs().max() < 1e-10 and logvar.grad.abs().max() < 1e-10


def test_linear_vae_elbo_matches_monte_carlo(gen):
    """The closed form against a sampled ELBO: log p(x|z) + log p(z) - log q(z|x), z ~ q, averaged."""
    x = correlated_data(gen, n=20)
    mean, W, sigma2 = x.mean(0), randn(gen, 7, 3), 0.5 + rand(gen, ())
    V, logvar = randn(gen, 3, 7) * 0.3, randn(gen, 3) * 0.5
    mu = (x - mean) @ V.T
    z = mu + torch.exp(0.5 * logvar) * randn(gen, 20_000, 20, 3)
    log_likelihood = Normal(z @ W.T + mean, sigma2.sqrt()).log_prob(x).sum(-1)
    samples = log_importance_weights(log_likelihood, z, mu, logvar.expand_as(mu))
    estimate, stderr = mean_and_stderr(samples)
    exact = linear_vae_elbo(x, mean, W, sigma2, V, logvar, reduction="none")
    assert ((estimate - exact).abs() < Z * stderr).all()


# ---------------------------------------------------------------- estimators


def test_log_normal_matches_torch_distributions(gen):
    z, mu, logvar = randn(gen, 3, 5, 4), randn(gen, 5, 4), randn(gen, 5, 4)
    torch.testing.assert_close(log_normal(z, mu, logvar), Normal(mu, torch.exp(0.5 * logvar)).log_prob(z))


@pytest.mark.parametrize("prior", ["standard", "diagonal"])
def test_estimator_a_averages_to_estimator_b(gen, prior):
    mu, logvar = randn(gen, 6, 4), 0.7 * randn(gen, 6, 4)
    prior_mu, prior_logvar = (None, None) if prior == "standard" else (randn(gen, 4), 0.5 * randn(gen, 4))
    z = mu + torch.exp(0.5 * logvar) * randn(gen, 100_000, 6, 4)
    samples = kl_estimator_a(z, mu, logvar, prior_mu, prior_logvar)
    # Per element: log q - log p from torch.distributions.
    if prior == "standard":
        p = Normal(torch.zeros((), dtype=F64), 1.0)
    else:
        p = Normal(prior_mu, torch.exp(0.5 * prior_logvar))
    torch.testing.assert_close(samples[:3], Normal(mu, torch.exp(0.5 * logvar)).log_prob(z[:3]) - p.log_prob(z[:3]))
    estimate, stderr = mean_and_stderr(samples)
    analytic = kl_estimator_b(mu, logvar, prior_mu, prior_logvar)
    torch.testing.assert_close(analytic, kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), p))
    assert ((estimate - analytic).abs() < Z * stderr).all()


def _toy_model(gen, batch=4, dim=2, s=0.5):
    """p(z) = N(0, I), p(x|z) = N(z, s^2 I): log p(x) = log N(x; 0, (1 + s^2) I), posterior N(x/(1+s^2), s^2/(1+s^2)).

    The encoder is deliberately off (shifted mean, inflated variance) so the bounds have visible gaps.
    """
    x = randn(gen, batch, dim)
    log_px = Normal(0.0, math.sqrt(1 + s * s)).log_prob(x).sum(-1)
    mu = x / (1 + s * s) + 0.5
    logvar = torch.full_like(x, math.log(s * s / (1 + s * s)) + 1.0)

    def log_weights(k, replicates):
        z = mu + torch.exp(0.5 * logvar) * randn(gen, k, replicates, batch, dim)
        log_likelihood = Normal(z, s).log_prob(x).sum(-1)  # (k, R, B)
        flat = lambda t: t.reshape(k, replicates * batch, *t.shape[3:])  # noqa: E731
        rows = lambda t: t.expand(replicates, batch, dim).reshape(-1, dim)  # noqa: E731
        weights = log_importance_weights(flat(log_likelihood), flat(z), rows(mu), rows(logvar))
        return weights.reshape(k, replicates, batch)

    return log_px, log_weights


def test_log_importance_weights_and_iwae_with_one_sample_is_the_elbo(gen):
    log_px, log_weights = _toy_model(gen)
    w = log_weights(1, 1)[:, 0]  # (1, B)
    torch.testing.assert_close(iwae_bound(w), w[0], rtol=0, atol=0)
    many = log_weights(1, 200_000)[0]  # (R, B): one-sample ELBO estimates
    estimate, stderr = mean_and_stderr(many)
    assert (estimate < log_px).all()  # a visible gap: the encoder is not the posterior


def test_iwae_bound_is_above_the_elbo_and_monotone_in_k(gen):
    log_px, log_weights = _toy_model(gen)
    # For every draw, logmeanexp >= mean (Jensen): L_K >= the K-sample average ELBO.
    w = log_weights(16, 1000)
    assert (iwae_bound(w) >= w.mean(0) - 1e-12).all()
    # In expectation, L_1 < L_2 < L_8 < L_32 < log p(x); independent replicates, so a difference's
    # standard error is the root sum of squares of the two.
    means, errors = [], []
    for k in (1, 2, 8, 32):
        m, e = mean_and_stderr(iwae_bound(log_weights(k, 8000)))
        means.append(m)
        errors.append(e)
    for (m1, e1), (m2, e2) in zip(zip(means, errors), zip(means[1:], errors[1:])):
        assert (m2 - m1 > Z * torch.sqrt(e1**2 + e2**2)).all()
    assert (means[-1] < log_px).all()
    # The K = 32 bound closes most of the ELBO's gap.
    assert ((log_px - means[-1]) < 0.5 * (log_px - means[0])).all()


# ---------------------------------------------------------------- β-TC decomposition


@pytest.mark.parametrize("sampling", ["mws", "mss"])
def test_betatc_terms_sum_exactly_to_estimator_a(gen, sampling):
    mu, logvar = randn(gen, 64, 5), randn(gen, 64, 5)
    z = mu + torch.exp(0.5 * logvar) * randn(gen, 64, 5)
    for prior_mu, prior_logvar in ((None, None), (randn(gen, 5), 0.5 * randn(gen, 5))):
        terms = betatc_decomposition(
            z, mu, logvar, 10_000, sampling=sampling, prior_mu=prior_mu, prior_logvar=prior_logvar
        )
        kl_a = kl_estimator_a(z, mu, logvar, prior_mu, prior_logvar).sum(-1).mean()
        torch.testing.assert_close(sum(terms), kl_a, rtol=1e-12, atol=1e-12)
        assert all(t.shape == () and torch.isfinite(t) for t in terms)


@pytest.mark.parametrize("sampling", ["mws", "mss"])
def test_betatc_terms_sum_to_the_average_kl_in_expectation(gen, sampling):
    # The sum equals the batch mean of estimator A exactly (test above), so the only error against
    # the batch's average analytic KL is estimator A's sampling noise: Z standard errors of its mean.
    batch = 2048
    mu, logvar = randn(gen, batch, 3), 0.5 * randn(gen, batch, 3)
    z = mu + torch.exp(0.5 * logvar) * randn(gen, batch, 3)
    total = sum(betatc_decomposition(z, mu, logvar, 50_000, sampling=sampling))
    _, stderr = mean_and_stderr(kl_estimator_a(z, mu, logvar).sum(-1))
    average_kl = kl_normal_elementwise(mu, logvar).sum(-1).mean()
    assert (total - average_kl).abs() < Z * stderr
    assert Z * stderr < 0.2 * average_kl  # the check has teeth: the tolerance is a fraction of the KL


def test_mss_estimates_the_aggregate_posterior_without_bias(gen):
    """Average the MSS estimate of q(z) over every ordered batch: it equals (1/N) sum_n q(z|x_n) exactly."""
    n, batch, dim = 6, 4, 2
    mu, logvar = randn(gen, n, dim), 0.5 * randn(gen, n, dim)
    z_star = mu[0] + torch.exp(0.5 * logvar[0]) * randn(gen, dim)  # drawn from datapoint 0
    exact_joint = torch.logsumexp(log_normal(z_star, mu, logvar).sum(-1), 0) - math.log(n)
    exact_marginals = torch.logsumexp(log_normal(z_star, mu, logvar), 0) - math.log(n)
    for position in range(batch):  # where datapoint 0 sits in the batch
        joints, marginals = [], []
        for others in itertools.permutations(range(1, n), batch - 1):
            index = list(others[:position]) + [0] + list(others[position:])
            z = mu[index] + torch.exp(0.5 * logvar[index]) * randn(gen, batch, dim)
            z[position] = z_star
            estimate = log_aggregate_posterior(z, mu[index], logvar[index], n, sampling="mss")
            joints.append(estimate.joint[position].exp())
            marginals.append(estimate.marginals[position].exp())
        torch.testing.assert_close(torch.stack(joints).mean().log(), exact_joint, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.stack(marginals).mean(0).log(), exact_marginals, rtol=1e-12, atol=1e-12)


def test_mws_and_mss_formulas(gen):
    batch, n = 5, 1000
    mu, logvar = randn(gen, batch, 3), randn(gen, batch, 3)
    z = mu + torch.exp(0.5 * logvar) * randn(gen, batch, 3)
    densities = Normal(mu[None], torch.exp(0.5 * logvar[None])).log_prob(z[:, None]).exp()  # (i, j, d)
    mws = log_aggregate_posterior(z, mu, logvar, n, sampling="mws")
    torch.testing.assert_close(mws.joint, (densities.prod(-1).sum(1) / (n * batch)).log())
    torch.testing.assert_close(mws.marginals, (densities.sum(1) / (n * batch)).log())
    weights = mss_log_weights(batch, n).exp()
    m = batch - 1
    for i in range(batch):
        for j in range(batch):
            expected = 1 / n if i == j else (n - m) / (n * m) if j == (i + 1) % batch else 1 / m
            assert math.isclose(weights[i, j].item(), expected, rel_tol=1e-14)
    torch.testing.assert_close(weights.sum(1), torch.ones(batch, dtype=F64))
    mss = log_aggregate_posterior(z, mu, logvar, n, sampling="mss")
    torch.testing.assert_close(mss.joint, (weights * densities.prod(-1)).sum(1).log())
    torch.testing.assert_close(mss.marginals, (weights[..., None] * densities).sum(1).log())


def test_betatc_total_correlation_of_independent_codes(gen):
    """A factorised aggregate posterior (independent dims, narrow posteriors around independent means):
    the total correlation is small next to the mutual information and dimension-wise KL."""
    batch = 1024
    mu, logvar = 1.5 * randn(gen, batch, 3), torch.full((batch, 3), -3.0, dtype=F64)
    z = mu + torch.exp(0.5 * logvar) * randn(gen, batch, 3)
    terms = betatc_decomposition(z, mu, logvar, batch, sampling="mss")
    assert terms.mutual_information > 1.0 and terms.dimensionwise_kl > 0.1
    assert terms.total_correlation.abs() < 0.25 * terms.mutual_information


# ---------------------------------------------------------------- diagnostics


def test_active_units_on_known_variances(gen):
    scales = torch.tensor([1.0, 0.2, 0.09, 0.05, 0.0], dtype=F64)  # variances 1, 0.04, 0.0081, 0.0025, 0
    signs = torch.ones(1000, 1, dtype=F64)
    signs[::2] = -1.0  # exactly half +1, half -1: population variance exactly scale^2
    mu = signs * scales + randn(gen, 5)  # an arbitrary shift per dimension changes nothing
    result = active_units(mu)
    assert result.count == 2
    torch.testing.assert_close(result.variances, scales**2, rtol=1e-12, atol=1e-15)
    assert active_units(mu, threshold=0.005).count == 3
    assert active_units(mu, threshold=1.5).count == 0


def test_collapsed_fraction_on_constructed_kl(gen):
    n, eps = 1000, 0.01
    kl = rand(gen, n, 5) * 0.009  # every entry below eps
    kl[:5, 1] = 1.0 + rand(gen, 5)  # 0.5% above eps: collapsed at delta = 0.01
    kl[:20, 2] = 1.0 + rand(gen, 20)  # 2% above: not collapsed at delta = 0.01, collapsed at 0.03
    kl[:, 3] = 0.5 + rand(gen, n)  # never below
    result = collapsed_fraction(kl, eps=eps, delta=0.01)
    assert result.collapsed.tolist() == [True, True, False, False, True]
    torch.testing.assert_close(result.fraction, torch.tensor(0.6, dtype=F64))
    torch.testing.assert_close(collapsed_fraction(kl, eps=eps, delta=0.03).fraction, torch.tensor(0.8, dtype=F64))
    torch.testing.assert_close(collapsed_fraction(kl, eps=0.001, delta=0.01).fraction, torch.tensor(0.0, dtype=F64))


def test_collapse_diagnostics_agree_on_an_encoder(gen):
    """Collapsed dims (posterior = prior up to 1e-3) are inactive; informative dims are active."""
    n = 2000
    informative = torch.tensor([True, False, True, False, False, True])
    mu = torch.where(informative, randn(gen, n, 6), 1e-3 * randn(gen, n, 6))
    logvar = torch.where(informative, -2.0 + 0.1 * randn(gen, n, 6), 1e-3 * randn(gen, n, 6))
    collapsed = collapsed_fraction(kl_normal_elementwise(mu, logvar))
    active = active_units(mu)
    assert collapsed.collapsed.tolist() == (~informative).tolist()
    assert active.count == 3 and (active.variances > 0.01).tolist() == informative.tolist()
    torch.testing.assert_close(collapsed.fraction, torch.tensor(0.5, dtype=F64))


def test_aggregate_posterior_kl_is_zero_when_the_aggregate_matches_the_prior(gen):
    n = 500
    logvar = math.log(0.25) + 0.3 * randn(gen, n, 4)  # heterogeneous posterior variances
    spread = 1.0 - torch.exp(logvar).mean(0)  # what var(mu) must be for a unit total variance
    raw = randn(gen, n, 4)
    mu = (raw - raw.mean(0)) / raw.std(0, correction=0) * spread.sqrt()  # mean exactly 0
    torch.testing.assert_close(aggregate_posterior_kl(mu, logvar), torch.zeros(4, dtype=F64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("gamma", [1.2, 2.0])
def test_aggregate_posterior_kl_is_positive_for_bn_vae_gamma_above_one(gen, gamma):
    n = 256
    bn = fv.nn.BatchNormMean(4, gamma=gamma).double().train()
    mu = bn(3.0 * randn(gen, n, 4) + 1.0).detach()
    logvar = -1.0 + 0.5 * randn(gen, n, 4)
    bound = aggregate_posterior_kl(mu, logvar)
    # mean(mu) = 0 (the shift starts at 0), var(mu) ~= gamma^2: the bound exceeds KL(N(0, gamma^2) || N(0, 1)).
    variance = mu.var(0, correction=0) + torch.exp(logvar).mean(0)
    expected = kl_divergence(Normal(mu.mean(0), variance.sqrt()), Normal(0.0, 1.0))
    torch.testing.assert_close(bound, expected)
    floor = 0.5 * (gamma**2 * 0.999 - 1.0 - math.log(gamma**2 * 0.999))
    assert (bound > floor).all() and floor > 0


def test_aggregate_posterior_kl_lower_bounds_the_true_kl(gen):
    """Against KL(q(z) || N(0, 1)) of the 1-D mixture q(z) = mean_n N(mu_n, e^lv_n), by quadrature."""
    n = 40
    mu, logvar = 1.5 * randn(gen, n, 1) + 0.3, -1.0 + 0.5 * randn(gen, n, 1)
    grid = torch.linspace(-15.0, 15.0, 60_001, dtype=F64)
    log_q = torch.logsumexp(log_normal(grid[:, None], mu[:, 0], logvar[:, 0]), dim=1) - math.log(n)
    integrand = log_q.exp() * (log_q - Normal(0.0, 1.0).log_prob(grid))
    true_kl = torch.trapezoid(integrand, grid)
    bound = aggregate_posterior_kl(mu, logvar)[0]
    assert 0 < bound < true_kl


# ---------------------------------------------------------------- bad input


def test_bad_input_is_rejected():
    x = torch.randn(10, 4, dtype=F64)
    with pytest.raises(ValueError, match="q must"):
        ppca_fit(x, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        ppca_fit(x[0], 2)
    with pytest.raises(ValueError, match="reduction"):
        ppca_log_likelihood(x, x.mean(0), torch.randn(4, 2, dtype=F64), 1.0, reduction="per_dim")
    mu, logvar = torch.randn(8, 3), torch.randn(8, 3)
    with pytest.raises(ValueError, match="sampling"):
        betatc_decomposition(mu, mu, logvar, 100, sampling="mcmc")
    with pytest.raises(ValueError, match="logvar"):
        betatc_decomposition(mu, mu, logvar[:, :2], 100)
    with pytest.raises(ValueError, match="batch_size"):
        mss_log_weights(8, 4)
    with pytest.raises(ValueError, match="logvar"):
        aggregate_posterior_kl(mu, logvar[:4])
    with pytest.raises(ValueError, match="log_likelihood"):
        log_importance_weights(torch.randn(2, 8), torch.randn(3, 8, 3), mu, logvar)
    with pytest.raises(ValueError, match="log_weights"):
        iwae_bound(torch.tensor(1.0))
