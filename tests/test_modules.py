"""fv.nn: GaussianLikelihood, DiagonalGaussian and BatchNormMean, on the reference backend, float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from float64_inputs import F64, HALF_LOG_2PI, assert_close, grads, randn
from torch.distributions import Normal, kl_divergence

import fusedvae as fv


@pytest.fixture(autouse=True)
def _reference_backend():
    with fv.use_backend("reference"):
        yield


def per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], -1).sum(1)


def sigma_vae_nll(x, m, *, per_sample_sigma, min_log_sigma=-6.0):
    """σ-VAE reference NLL (sum over elements, full), plain torch."""
    dims = tuple(range(1, x.dim())) if per_sample_sigma else tuple(range(x.dim()))
    s = ((x - m) ** 2).mean(dims, keepdim=True).sqrt().log()
    if min_log_sigma is not None:
        s = min_log_sigma + F.softplus(s - min_log_sigma)
    return (0.5 * ((x - m) / s.exp()) ** 2 + s + HALF_LOG_2PI).sum()


# ---------------------------------------------------------------------------- GaussianLikelihood


@pytest.mark.parametrize("shape", [(), (3, 1, 1), (3, 5, 4)])
def test_gaussian_likelihood_learned(gen, shape):
    likelihood = fv.nn.GaussianLikelihood(shape, init_log_sigma=0.3).double()
    assert isinstance(likelihood.log_sigma, torch.nn.Parameter)
    assert likelihood.log_sigma.shape == shape and likelihood.log_sigma.dtype == F64
    assert torch.equal(likelihood.log_sigma.detach(), torch.full(shape, 0.3).double())  # created float32
    assert [p for p in likelihood.parameters()] == [likelihood.log_sigma]
    with torch.no_grad():
        likelihood.log_sigma.copy_(randn(gen, *shape, scale=0.4))
    x, m = randn(gen, 6, 3, 5, 4), randn(gen, 6, 3, 5, 4, requires_grad=True)
    nll = likelihood(x, m)
    ls = likelihood.log_sigma
    want = -Normal(m, ls.exp().expand_as(m)).log_prob(x).sum() / 6
    assert_close(nll, want)
    for a, b in zip(grads(nll, [m, ls], torch.tensor(0.7, dtype=F64)), grads(want, [m, ls], torch.tensor(0.7, dtype=F64))):
        assert a.shape == b.shape
        assert_close(a, b)
    assert torch.equal(likelihood.current_log_sigma(x, m), ls.detach())
    # an optimiser step moves log sigma
    before = ls.detach().clone()
    nll.backward()
    torch.optim.SGD(likelihood.parameters(), lr=0.1).step()
    assert not torch.equal(ls.detach(), before)


def test_gaussian_likelihood_fixed(gen):
    likelihood = fv.nn.GaussianLikelihood((3, 1, 1), init_log_sigma=-0.5, learnable=False).double()
    assert list(likelihood.parameters()) == []
    assert "log_sigma" in dict(likelihood.named_buffers()) and "log_sigma" in likelihood.state_dict()
    assert likelihood.log_sigma.dtype == F64 and not likelihood.log_sigma.requires_grad
    x, m = randn(gen, 4, 3, 2, 2), randn(gen, 4, 3, 2, 2, requires_grad=True)
    nll = likelihood(x, m)
    assert_close(nll, (0.5 * ((x - m) / math.exp(-0.5)) ** 2 - 0.5 + HALF_LOG_2PI).sum() / 4)
    nll.backward()
    assert m.grad is not None and likelihood.log_sigma.grad is None


@pytest.mark.parametrize("reduction, full", [("sum", False), ("mean", True), ("none", True), ("per_sample", False)])
def test_gaussian_likelihood_passes_reduction_and_full(gen, reduction, full):
    likelihood = fv.nn.GaussianLikelihood((4,), reduction=reduction, full=full).double()
    x, m = randn(gen, 3, 4), randn(gen, 3, 4)
    assert_close(likelihood(x, m), fv.gaussian_nll(x, m, likelihood.log_sigma, reduction=reduction, full=full))


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_gaussian_likelihood_optimal(gen, mode):
    likelihood = fv.nn.GaussianLikelihood(optimal=mode)
    assert list(likelihood.parameters()) == [] and list(likelihood.buffers()) == []
    x = randn(gen, 5, 3, 4)
    m = (x + randn(gen, 5, 3, 4) * torch.logspace(-3, 0, 5, dtype=F64).reshape(5, 1, 1)).requires_grad_()
    nll = likelihood(x, m)
    want = sigma_vae_nll(x, m, per_sample_sigma=mode == "sample") / 5
    assert_close(nll, want)
    assert_close(grads(nll, [m])[0], grads(want, [m])[0])
    sigma = likelihood.current_log_sigma(x, m)
    assert sigma.shape == ((5,) if mode == "sample" else ()) and not sigma.requires_grad
    assert_close(sigma, fv.optimal_log_sigma(x, m, per_sample=mode == "sample"))
    unclipped = fv.nn.GaussianLikelihood(optimal=mode, min_log_sigma=None)
    assert_close(unclipped(x, m), sigma_vae_nll(x, m, per_sample_sigma=mode == "sample", min_log_sigma=None) / 5)


def test_gaussian_likelihood_rejects_bad_arguments():
    with pytest.raises(ValueError, match="optimal"):
        fv.nn.GaussianLikelihood(optimal="global")
    with pytest.raises(ValueError, match="reduction"):
        fv.nn.GaussianLikelihood(reduction="per_dim")


# ------------------------------------------------------------------------------ DiagonalGaussian


SHAPES = [(6, 5), (3, 4, 2, 3), (2, 3, 2, 2, 3)]  # 2-D, 4-D and 5-D: reductions over every non-batch dim


def _normal(mean, logvar):
    return Normal(mean, torch.exp(0.5 * logvar))


@pytest.mark.parametrize("shape", SHAPES)
def test_diagonal_gaussian_kl_matches_torch_distributions(gen, shape):
    mean, logvar = randn(gen, *shape, requires_grad=True), randn(gen, *shape, requires_grad=True)
    q = fv.nn.DiagonalGaussian(mean, logvar)
    kl = q.kl()
    want = per_sample(kl_divergence(_normal(mean, logvar), Normal(torch.zeros_like(mean), torch.ones_like(mean))))
    assert kl.shape == (shape[0],)
    assert_close(kl, want)
    g = randn(gen, shape[0], shift=0.5)
    for a, b in zip(grads(kl, [mean, logvar], g), grads(want, [mean, logvar], g)):
        assert_close(a, b)
    # against another diagonal Gaussian, gradients reaching both
    p_mean, p_logvar = randn(gen, *shape, requires_grad=True), randn(gen, *shape, requires_grad=True)
    p = fv.nn.DiagonalGaussian(p_mean, p_logvar)
    kl_qp = q.kl(p)
    want_qp = per_sample(kl_divergence(_normal(mean, logvar), _normal(p_mean, p_logvar)))
    assert_close(kl_qp, want_qp)
    inputs = [mean, logvar, p_mean, p_logvar]
    for a, b in zip(grads(kl_qp, inputs, g), grads(want_qp, inputs, g)):
        assert_close(a, b)
    assert_close(q.kl(p, reduction="batchmean"), want_qp.mean())
    assert q.kl(reduction="per_dim").shape == shape[1:]
    assert torch.equal(q.kl(q.__class__(mean.detach(), logvar.detach()), reduction="none"), torch.zeros(shape, dtype=F64))


@pytest.mark.parametrize("shape", SHAPES)
def test_diagonal_gaussian_nll_log_prob_entropy(gen, shape):
    mean, logvar = randn(gen, *shape, requires_grad=True), randn(gen, *shape, requires_grad=True)
    q = fv.nn.DiagonalGaussian(mean, logvar)
    normal = _normal(mean, logvar)
    sample = randn(gen, *shape)
    assert_close(q.log_prob(sample), normal.log_prob(sample))
    assert q.log_prob(sample).shape == shape
    nll = q.nll(sample)
    want = -per_sample(normal.log_prob(sample))
    assert_close(nll, want)
    g = randn(gen, shape[0], shift=0.5)
    for a, b in zip(grads(nll, [mean, logvar], g), grads(want, [mean, logvar], g)):
        assert_close(a, b)
    assert_close(q.nll(sample, reduction="sum"), want.sum())
    entropy = q.entropy()
    assert_close(entropy, per_sample(normal.entropy()))
    assert_close(grads(entropy, [logvar], g)[0], grads(per_sample(normal.entropy()), [logvar], g)[0])
    assert_close(q.entropy(reduction="none"), normal.entropy())
    assert_close(q.entropy(reduction="batchmean"), normal.entropy().sum() / shape[0])
    assert_close(q.entropy(reduction="mean"), normal.entropy().mean())
    assert q.mode() is mean
    assert_close(q.std, normal.stddev)
    assert_close(q.var, normal.variance)


def test_diagonal_gaussian_sampling(gen):
    mean, logvar = randn(gen, 4, 3, 2, requires_grad=True), randn(gen, 4, 3, 2, requires_grad=True)
    q = fv.nn.DiagonalGaussian(mean, logvar)
    z = q.rsample(generator=torch.Generator().manual_seed(3))
    assert z.shape == (4, 3, 2) and z.requires_grad
    assert torch.equal(z, fv.rsample(mean, logvar, generator=torch.Generator().manual_seed(3)))
    assert q.rsample(5).shape == (5, 4, 3, 2)
    s = q.sample(generator=torch.Generator().manual_seed(3))
    assert not s.requires_grad and s.grad_fn is None
    assert torch.equal(s, z.detach())
    assert q.sample(2).shape == (2, 4, 3, 2)
    torch.manual_seed(12)
    a = q.rsample()
    torch.manual_seed(12)
    assert torch.equal(q.rsample(), a)
    zk, kl = q.rsample_kl(generator=torch.Generator().manual_seed(3))
    assert torch.equal(zk, z)
    assert_close(kl, q.kl())
    g_mu, g_lv = grads(z, [mean, logvar], torch.full_like(z, 0.5))
    assert_close(g_mu, torch.full_like(z, 0.5))
    assert_close(g_lv, 0.5 * (z - mean).detach() / 2)


def test_diagonal_gaussian_rejects_bad_input(gen):
    with pytest.raises(ValueError, match=r"logvar.*\(4, 3\).*\(4, 2\)"):
        fv.nn.DiagonalGaussian(randn(gen, 4, 3), randn(gen, 4, 2))
    with pytest.raises(TypeError, match="mean"):
        fv.nn.DiagonalGaussian(torch.ones(4, 3, dtype=torch.int64), randn(gen, 4, 3))
    q = fv.nn.DiagonalGaussian(randn(gen, 4, 3), randn(gen, 4, 3))
    with pytest.raises(ValueError, match="reduction"):
        q.kl(reduction="average")
    with pytest.raises(ValueError, match="reduction"):
        q.entropy(reduction="per_dim")


# --------------------------------------------------------------------------------- BatchNormMean


@pytest.mark.parametrize("gamma", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("shape", [(256, 8), (64, 8, 5)])
def test_batch_norm_mean_training_output_std_is_gamma(gen, gamma, shape):
    bn = fv.nn.BatchNormMean(8, gamma=gamma).double()
    with torch.no_grad():
        bn.shift.copy_(randn(gen, 8))
    mu = randn(gen, *shape, scale=3.0, shift=1.5)
    out = bn(mu)
    dims = (0,) if len(shape) == 2 else (0, 2)
    batch_var = mu.var(dims, unbiased=False)
    # std over the batch is gamma * sqrt(var / (var + eps)): gamma to ~1e-6 relative for var ~ 9
    std = out.std(dims, unbiased=False)
    scale = bn.scale  # gamma, as stored (the module is created in float32, then .double())
    assert_close(scale, torch.full((8,), gamma).double(), rtol=0, atol=0)
    assert_close(std, scale * torch.sqrt(batch_var / (batch_var + bn.eps)), rtol=1e-9, atol=0)
    assert_close(std, torch.full((8,), gamma, dtype=F64), rtol=1e-5, atol=0)
    assert_close(out.mean(dims), bn.shift.detach(), rtol=0, atol=1e-10)
    # running statistics move toward the batch's (momentum 0.1, unbiased running var as BatchNorm)
    n = math.prod(shape) // 8
    assert_close(bn.running_mean, 0.1 * mu.mean(dims))
    assert_close(bn.running_var, 0.9 + 0.1 * mu.var(dims, unbiased=False) * n / (n - 1))


def test_batch_norm_mean_eval_uses_running_statistics(gen):
    bn = fv.nn.BatchNormMean(4, gamma=0.5).double()
    for _ in range(5):
        bn(randn(gen, 32, 4, scale=2.0, shift=1.0))
    bn.eval()
    mu = randn(gen, 3, 4)
    out = bn(mu)
    want = 0.5 * (mu - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) + bn.shift
    assert_close(out, want)
    running = (bn.running_mean.clone(), bn.running_var.clone())
    bn(mu)
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])


def test_batch_norm_mean_shift_learnable_scale_fixed(gen):
    bn = fv.nn.BatchNormMean(4, gamma=0.7).double()
    assert [name for name, _ in bn.named_parameters()] == ["shift"]
    assert "scale" in dict(bn.named_buffers()) and not bn.scale.requires_grad
    assert torch.equal(bn.scale, torch.full((4,), 0.7).double())
    mu = randn(gen, 16, 4, requires_grad=True)
    target = randn(gen, 16, 4)
    out = bn(mu)
    loss = ((out - target) ** 2).sum()
    loss.backward()
    assert bn.shift.grad is not None and bn.scale.grad is None and mu.grad is not None
    assert_close(bn.shift.grad, (2 * (out.detach() - target)).sum(0))
    scale_before, shift_before = bn.scale.clone(), bn.shift.detach().clone()
    torch.optim.SGD(bn.parameters(), lr=0.01).step()
    assert torch.equal(bn.scale, scale_before)
    assert not torch.equal(bn.shift.detach(), shift_before)


def test_batch_norm_mean_rejects_nonpositive_gamma():
    for gamma in (0.0, -1.0):
        with pytest.raises(ValueError, match="gamma"):
            fv.nn.BatchNormMean(4, gamma=gamma)
