"""The reference ops against closed forms, torch.distributions and torch.autograd.gradcheck, in float64.

Every test here runs the public ops (``fv.*``) under the ``"reference"`` backend on the CPU; the
reference is the specification the kernels are later held to, so these tests check its
mathematics: values, gradients (against docs/design.md's formulas), accuracy near collapse, the
Philox noise, and the identities between the β-VAE and the σ-VAE.
"""

from __future__ import annotations

import decimal
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from float64_inputs import F64, HALF_LOG_2PI, assert_close, grads, randn
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.distributions import Normal, kl_divergence

import fusedvae as fv
from fusedvae.reference import exp_minus_one_minus_x, philox4x32, philox_normal
from fusedvae.seeding import draw_seed_offset
from fusedvae.testing import kl_closed_form

KL_REDUCTIONS = ("none", "sum", "mean", "batchmean", "per_sample", "per_dim")
REDUCTIONS = ("none", "sum", "mean", "batchmean", "per_sample")


@pytest.fixture(autouse=True)
def _reference_backend():
    with fv.use_backend("reference"):
        yield


def reduce_ref(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """The reductions written out in plain torch."""
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.mean()
    if reduction == "batchmean":
        return values.sum() / values.shape[0]
    if reduction == "per_sample":
        return values.reshape(values.shape[0], -1).sum(1)
    if reduction == "per_dim":
        return values.sum(0)
    raise AssertionError(reduction)


def kl_torch(mu, lv, mu_p=None, lv_p=None):
    mu_p = torch.zeros_like(mu) if mu_p is None else mu_p
    lv_p = torch.zeros_like(lv) if lv_p is None else lv_p
    p = Normal(mu_p.expand_as(mu), torch.exp(0.5 * lv_p).expand_as(mu))
    return kl_divergence(Normal(mu, torch.exp(0.5 * lv)), p)


# --------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
@pytest.mark.parametrize("prior", ["standard", "learned_full", "learned_broadcast", "floats"])
def test_kl_matches_closed_form_and_torch_distributions(gen, reduction, prior):
    mu, lv = randn(gen, 5, 3, 4), randn(gen, 5, 3, 4, scale=1.5)
    if prior == "standard":
        mu_p = lv_p = None
        ref_prior = {}
    elif prior == "learned_full":
        mu_p, lv_p = randn(gen, 5, 3, 4), randn(gen, 5, 3, 4)
        ref_prior = dict(mu_p=mu_p, lv_p=lv_p)
    elif prior == "learned_broadcast":
        mu_p, lv_p = randn(gen, 3, 1), randn(gen, 1, 4)
        ref_prior = dict(mu_p=mu_p, lv_p=lv_p)
    else:
        mu_p, lv_p = 0.7, -0.4
        ref_prior = dict(mu_p=torch.tensor(0.7, dtype=F64), lv_p=torch.tensor(-0.4, dtype=F64))
    kl = fv.kl_normal(mu, lv, mu_p, lv_p, reduction=reduction)
    closed = reduce_ref(kl_closed_form(mu, lv, **ref_prior), reduction)
    dist = reduce_ref(kl_torch(mu, lv, ref_prior.get("mu_p"), ref_prior.get("lv_p")), reduction)
    assert kl.dtype == F64 and kl.shape == closed.shape
    assert_close(kl, closed)
    assert_close(kl, dist)


def test_kl_reduction_shapes(gen):
    mu, lv = randn(gen, 6, 2, 3), randn(gen, 6, 2, 3)
    shapes = {
        "none": (6, 2, 3), "sum": (), "mean": (), "batchmean": (), "per_sample": (6,), "per_dim": (2, 3),
    }
    for reduction, shape in shapes.items():
        assert fv.kl_normal(mu, lv, reduction=reduction).shape == shape
    assert fv.kl_normal(mu, lv).shape == ()  # batchmean by default
    assert_close(fv.kl_normal(mu, lv), fv.kl_normal(mu, lv, reduction="sum") / 6)


def test_kl_of_a_distribution_with_itself_is_exactly_zero(gen):
    for dtype in (torch.float32, F64):
        mu = randn(gen, 7, 5, dtype=dtype, scale=3, requires_grad=True)
        lv = randn(gen, 7, 5, dtype=dtype, scale=3, requires_grad=True)
        kl = fv.kl_normal(mu, lv, mu.detach(), lv.detach(), reduction="none")
        assert torch.equal(kl, torch.zeros_like(kl))
        g_mu, g_lv = grads(kl, [mu, lv], randn(gen, 7, 5, dtype=dtype))
        assert torch.equal(g_mu, torch.zeros_like(g_mu)) and torch.equal(g_lv, torch.zeros_like(g_lv))


def test_kl_gradients_match_design_formulas(gen):
    mu, lv = randn(gen, 4, 6, requires_grad=True), randn(gen, 4, 6, scale=2, requires_grad=True)
    mu_p, lv_p = randn(gen, 4, 6, requires_grad=True), randn(gen, 4, 6, requires_grad=True)
    g = randn(gen, 4, 6, shift=0.5)
    kl = fv.kl_normal(mu, lv, mu_p, lv_p, reduction="none")
    g_mu, g_lv, g_mu_p, g_lv_p = grads(kl, [mu, lv, mu_p, lv_p], g)
    with torch.no_grad():
        d = lv - lv_p
        dmu = (mu - mu_p) * torch.exp(-lv_p)
        assert_close(g_mu, g * dmu)
        assert_close(g_lv, g * torch.expm1(d) / 2)
        assert_close(g_mu_p, -g * dmu)
        assert_close(g_lv_p, g * (1 - torch.exp(d) - (mu - mu_p) ** 2 * torch.exp(-lv_p)) / 2)


@pytest.mark.parametrize("reduction", ["none", "per_sample", "per_dim", "batchmean"])
def test_kl_broadcast_prior_gradients_match_torch_distributions(gen, reduction):
    mu, lv = randn(gen, 5, 3, 2, requires_grad=True), randn(gen, 5, 3, 2, requires_grad=True)
    mu_p, lv_p = randn(gen, 3, 1, requires_grad=True), randn(gen, 1, 2, requires_grad=True)
    kl = fv.kl_normal(mu, lv, mu_p, lv_p, reduction=reduction)
    ref = reduce_ref(kl_torch(mu, lv, mu_p, lv_p), reduction)
    g = randn(gen, *kl.shape, shift=0.3)
    for got, want in zip(grads(kl, [mu, lv, mu_p, lv_p], g), grads(ref, [mu, lv, mu_p, lv_p], g)):
        assert got.shape == want.shape
        assert_close(got, want)
    assert grads(kl, [mu_p], g)[0].shape == (3, 1)


def _free_bits_inputs(gen):
    # Latent dims 0..2 are nearly collapsed (batch-mean KL << 0.5), dims 3..5 are active (KL >> 0.5).
    scale = torch.tensor([0.05, 0.1, 0.02, 2.0, 3.0, 1.5], dtype=F64)
    mu = (randn(gen, 8, 6) * scale + scale).requires_grad_()
    lv = (randn(gen, 8, 6) * scale * 0.5).requires_grad_()
    return mu, lv


def test_free_bits_value_and_zero_gradient_below_lambda(gen):
    mu, lv = _free_bits_inputs(gen)
    lam = 0.5
    kl = fv.kl_normal(mu, lv, free_bits=lam)
    per_dim_mean = kl_closed_form(mu, lv).mean(0)
    below = per_dim_mean < lam
    assert below[:3].all() and not below[3:].any()
    assert_close(kl, per_dim_mean.clamp(min=lam).sum())
    g = torch.tensor(1.7, dtype=F64)
    g_mu, g_lv = grads(kl, [mu, lv], g)
    assert torch.equal(g_mu[:, :3], torch.zeros_like(g_mu[:, :3]))
    assert torch.equal(g_lv[:, :3], torch.zeros_like(g_lv[:, :3]))
    with torch.no_grad():
        assert_close(g_mu[:, 3:], g * mu[:, 3:] / 8)
        assert_close(g_lv[:, 3:], g * torch.expm1(lv[:, 3:]) / 2 / 8)
    # rsample_kl applies the same free bits
    _, kl2 = fv.rsample_kl(mu, lv, free_bits=lam)
    assert_close(kl2, kl)


def test_free_bits_per_latent_element_for_multidimensional_latents(gen):
    mu, lv = randn(gen, 4, 2, 3, scale=0.5), randn(gen, 4, 2, 3, scale=0.5)
    lam = 0.2
    kl = fv.kl_normal(mu, lv, free_bits=lam)
    assert_close(kl, kl_closed_form(mu, lv).mean(0).clamp(min=lam).sum())


def test_free_bits_zero_is_plain_batchmean(gen):
    mu, lv = randn(gen, 4, 3), randn(gen, 4, 3)
    assert torch.equal(fv.kl_normal(mu, lv, free_bits=0.0), fv.kl_normal(mu, lv))


@pytest.mark.parametrize("reduction", ["none", "batchmean", "per_sample", "per_dim"])
def test_kl_gradcheck(gen, reduction):
    mu, lv = randn(gen, 3, 4, requires_grad=True), randn(gen, 3, 4, requires_grad=True)
    mu_p, lv_p = randn(gen, 1, 4, requires_grad=True), randn(gen, 3, 1, requires_grad=True)
    fn = lambda a, b, c, d: fv.kl_normal(a, b, c, d, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (mu, lv, mu_p, lv_p))
    # small |lv - lv_p| exercises the series branch of g(d)
    lv_near = (lv_p.detach() + 1e-3 * randn(gen, 3, 4)).requires_grad_()
    assert torch.autograd.gradcheck(fn, (mu, lv_near, mu_p, lv_p))


def test_kl_gradcheck_free_bits(gen):
    mu, lv = _free_bits_inputs(gen)
    assert torch.autograd.gradcheck(lambda a, b: fv.kl_normal(a, b, free_bits=0.5), (mu, lv))


# ------------------------------------------------------------------------------------ KL accuracy


def g_exact(d: torch.Tensor) -> torch.Tensor:
    """``exp(d) - 1 - d`` to full float64 precision, through 50-digit decimal arithmetic."""
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        values = [decimal.Decimal(float(v)) for v in d.to(F64).reshape(-1)]
        return torch.tensor([float(v.exp() - 1 - v) for v in values], dtype=F64).reshape(d.shape)


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return ((approx.to(F64) - exact) / exact).abs()


@pytest.mark.parametrize("prior", ["standard", "learned"])
def test_float32_kl_relative_error_near_collapse(gen, prior):
    magnitudes = torch.logspace(-6, 1, 71, dtype=F64)
    d = torch.cat([magnitudes, -magnitudes])
    mu = randn(gen, d.numel(), dtype=torch.float32)
    if prior == "standard":
        lv = d.to(torch.float32)
        lv_p = mu_p = None
        mu = torch.zeros_like(mu)  # a mean term would hide g(d); keep only g(d)/2
        kl64 = fv.kl_normal(mu.to(F64), lv.to(F64), reduction="none")
    else:
        lv_p = randn(gen, d.numel(), dtype=torch.float32, scale=2.0)
        lv = (lv_p.to(F64) + d).to(torch.float32)
        mu_p = mu  # equal means: the KL is g(lv - lv_p)/2 alone
        kl64 = fv.kl_normal(mu.to(F64), lv.to(F64), mu_p.to(F64), lv_p.to(F64), reduction="none")
    # the float64 reference on the same float32 inputs, cross-checked against 50-digit arithmetic
    d_exact = lv.to(F64) - (0.0 if lv_p is None else lv_p.to(F64))
    assert (d_exact != 0).all()
    assert_close(kl64, 0.5 * g_exact(d_exact), rtol=1e-14, atol=0)
    kl32 = fv.kl_normal(mu, lv, mu_p, lv_p, reduction="none")
    assert kl32.dtype == torch.float32
    assert _relative_error(kl32, kl64).max() < 1e-5


def test_textbook_kl_formula_fails_near_collapse_where_fusedvae_does_not():
    d = torch.tensor([1e-6, -1e-6, 1e-5, -1e-5, 1e-4, -1e-4], dtype=torch.float32)
    exact = 0.5 * g_exact(d)
    textbook = 0.5 * (torch.exp(d) - d - 1.0)  # float32, as written in most VAE code
    assert _relative_error(textbook, exact).min() > 0.5  # 100%-ish wrong at every point
    assert textbook[4].item() == 0.0  # docs/design.md's measurement: d = 1e-4 gives 0 instead of 5e-9
    ours = fv.kl_normal(torch.zeros_like(d), d, reduction="none")
    assert _relative_error(ours, exact).max() < 1e-6
    # in float64, even expm1(d) - d loses ~1e-10 relative at |d| = 1e-6; the series does not
    assert_close(exp_minus_one_minus_x(d.to(F64)), g_exact(d), rtol=1e-14, atol=0)
    assert _relative_error(torch.expm1(d.to(F64)) - d.to(F64), g_exact(d)).max() > 1e-12


def test_kl_finite_for_logvar_up_to_80(gen):
    n = 64
    lv = torch.linspace(-80, 80, n, dtype=torch.float32)
    mu = randn(gen, n, dtype=torch.float32, scale=3).requires_grad_()
    lv.requires_grad_()
    kl = fv.kl_normal(mu, lv, reduction="none")
    assert torch.isfinite(kl).all()
    assert _relative_error(kl, fv.kl_normal(mu.detach().to(F64), lv.detach().to(F64), reduction="none")).max() < 1e-5
    g_mu, g_lv = grads(kl, [mu, lv], torch.full((n,), 0.5))
    assert torch.isfinite(g_mu).all() and torch.isfinite(g_lv).all()
    # a learned prior out to |lv_p| = 80, with |lv|, |lv - lv_p| <= 80
    lv_p = torch.linspace(80, -80, n, dtype=torch.float32)
    lv2 = (lv_p + 40 * torch.sin(torch.arange(n, dtype=torch.float32))).clamp(-80, 80)
    mu_p = randn(gen, n, dtype=torch.float32)
    args = (mu.detach(), lv2, mu_p, lv_p)
    kl_p = fv.kl_normal(*args, reduction="none")
    assert torch.isfinite(kl_p).all()
    assert _relative_error(kl_p, fv.kl_normal(*[t.to(F64) for t in args], reduction="none")).max() < 1e-5
    assert torch.isfinite(fv.kl_normal(*args, reduction="sum"))


# -------------------------------------------------------------------------------------- rsample


def test_rsample_shapes(gen):
    mu, lv = randn(gen, 4, 3, 2), randn(gen, 4, 3, 2)
    assert fv.rsample(mu, lv).shape == (4, 3, 2)
    assert fv.rsample(mu, lv, n_samples=1).shape == (1, 4, 3, 2)
    assert fv.rsample(mu, lv, n_samples=5).shape == (5, 4, 3, 2)
    z, kl = fv.rsample_kl(mu, lv, n_samples=3, reduction="per_sample")
    assert z.shape == (3, 4, 3, 2) and kl.shape == (4,)
    assert fv.rsample(mu, lv).dtype == F64
    assert fv.rsample(mu.float(), lv.float()).dtype == torch.float32


def test_rsample_reproducible_with_manual_seed_and_generator(gen):
    mu, lv = randn(gen, 6, 5), randn(gen, 6, 5)
    torch.manual_seed(123)
    a = fv.rsample(mu, lv)
    b = fv.rsample(mu, lv)
    torch.manual_seed(123)
    assert torch.equal(fv.rsample(mu, lv), a)
    assert not torch.equal(a, b)  # the default generator advanced
    torch.manual_seed(124)
    assert not torch.equal(fv.rsample(mu, lv), a)
    za = fv.rsample(mu, lv, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(0)  # the default generator does not matter when one is passed
    zb = fv.rsample(mu, lv, generator=torch.Generator().manual_seed(9))
    assert torch.equal(za, zb)
    assert not torch.equal(za, fv.rsample(mu, lv, generator=torch.Generator().manual_seed(10)))


@pytest.mark.parametrize("n_samples", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_rsample_kl_z_equals_rsample_bitwise(gen, n_samples, dtype):
    mu, lv = randn(gen, 5, 7, dtype=dtype), randn(gen, 5, 7, dtype=dtype)
    mu_p, lv_p = randn(gen, 7, dtype=dtype), randn(gen, 7, dtype=dtype)
    torch.manual_seed(77)
    z1 = fv.rsample(mu, lv, n_samples=n_samples)
    torch.manual_seed(77)
    z2, kl = fv.rsample_kl(mu, lv, mu_p, lv_p, n_samples=n_samples)
    assert torch.equal(z1, z2)
    z3, _ = fv.rsample_kl(mu, lv, n_samples=n_samples, generator=torch.Generator().manual_seed(5))
    assert torch.equal(z3, fv.rsample(mu, lv, n_samples=n_samples, generator=torch.Generator().manual_seed(5)))
    assert_close(kl, fv.kl_normal(mu, lv, mu_p, lv_p), rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


def test_rsample_noise_is_philox_keyed_by_logical_index(gen):
    """docs/design.md: sample k, element i (row-major) uses Philox counter offset + k * numel + i."""
    mu, lv = randn(gen, 4, 6), randn(gen, 4, 6)
    seed, offset = draw_seed_offset(torch.Generator().manual_seed(31))
    eps = philox_normal(seed, offset, 3 * mu.numel(), dtype=F64).reshape(3, 4, 6)
    z = fv.rsample(mu, lv, n_samples=3, generator=torch.Generator().manual_seed(31))
    assert_close(z, mu + torch.exp(lv / 2) * eps, rtol=1e-15, atol=1e-15)
    # A non-contiguous mu is sampled by its logical (row-major) index, not its memory layout.
    mu_t, lv_t = mu.t(), lv.t()
    z_t = fv.rsample(mu_t, lv_t, generator=torch.Generator().manual_seed(31))
    z_c = fv.rsample(mu_t.contiguous(), lv_t.contiguous(), generator=torch.Generator().manual_seed(31))
    assert torch.equal(z_t, z_c)


def test_rsample_noise_statistics(gen):
    n = 100_000
    mu, lv = randn(gen, 400, 250), randn(gen, 400, 250)
    z = fv.rsample(mu, lv, n_samples=2, generator=torch.Generator().manual_seed(2024))
    eps = ((z - mu) * torch.exp(-lv / 2)).reshape(2, n)
    e = eps[0]
    # Standard errors for n = 1e5 N(0,1) draws: mean 1/sqrt(n) = 0.0032, variance sqrt(2/n) = 0.0045,
    # excess kurtosis sqrt(24/n) = 0.0155, correlations 1/sqrt(n) = 0.0032. Tolerances are 5 standard errors.
    se = 1 / math.sqrt(n)
    mean, var = e.mean(), e.var()
    kurtosis = ((e - mean) ** 4).mean() / var**2
    assert abs(mean) < 5 * se
    assert abs(var - 1) < 5 * math.sqrt(2 / n)
    assert abs(kurtosis - 3) < 5 * math.sqrt(24 / n)
    assert abs(torch.corrcoef(torch.stack([e[:-1], e[1:]]))[0, 1]) < 5 * se  # neighbouring elements
    assert abs(torch.corrcoef(eps)[0, 1]) < 5 * se  # two samples of the same element
    # Kolmogorov-Smirnov: sup |ECDF - Phi| below the 0.1% critical value 1.95 / sqrt(n).
    s = e.sort().values
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    ecdf_hi = torch.arange(1, n + 1, dtype=F64) / n
    ks = torch.maximum(ecdf_hi - cdf, cdf - (ecdf_hi - 1 / n)).max()
    assert ks < 1.95 * se
    assert torch.isfinite(eps).all()


def test_rsample_gradient_identities(gen):
    mu, lv = randn(gen, 5, 4, requires_grad=True), randn(gen, 5, 4, requires_grad=True)
    z = fv.rsample(mu, lv, generator=torch.Generator().manual_seed(1))
    g = randn(gen, 5, 4, shift=0.5)
    g_mu, g_lv = grads(z, [mu, lv], g)
    assert_close(g_mu, g)  # dz/dmu = 1
    assert_close(g_lv, g * (z.detach() - mu.detach()) / 2)  # dz/dlv = exp(lv/2) eps / 2 = (z - mu) / 2
    zk = fv.rsample(mu, lv, n_samples=3, generator=torch.Generator().manual_seed(1))
    gk = randn(gen, 3, 5, 4, shift=0.5)
    g_mu, g_lv = grads(zk, [mu, lv], gk)
    assert_close(g_mu, gk.sum(0))
    assert_close(g_lv, (gk * (zk.detach() - mu.detach()) / 2).sum(0))


@pytest.mark.parametrize("n_samples", [None, 2])
def test_rsample_gradcheck(gen, n_samples):
    mu, lv = randn(gen, 3, 4, requires_grad=True), randn(gen, 3, 4, requires_grad=True)

    def fn(a, b):  # a fresh generator each call: the same noise for every evaluation
        return fv.rsample(a, b, n_samples=n_samples, generator=torch.Generator().manual_seed(17))

    assert torch.autograd.gradcheck(fn, (mu, lv))

    def fn_kl(a, b):
        z, kl = fv.rsample_kl(a, b, n_samples=n_samples, generator=torch.Generator().manual_seed(17))
        return z, kl

    assert torch.autograd.gradcheck(fn_kl, (mu, lv))


# ------------------------------------------------------------------------------------- Philox


@pytest.mark.parametrize(
    "counter, key, expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox4x32_10_known_answers(counter, key, expected):
    """Random123's kat_vectors for philox4x32 with 10 rounds."""
    words = philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    assert tuple(int(w) for w in words) == expected


def test_philox_normal_logical_index_and_key():
    seed, offset = 0x1234_5678_9ABC_DEF0, 2**32 - 3  # the counter's low word carries into the high word
    batch = philox_normal(seed, offset, 8, dtype=F64)
    one_by_one = torch.cat([philox_normal(seed, offset + i, 1, dtype=F64) for i in range(8)])
    assert torch.equal(batch, one_by_one)
    assert torch.isfinite(batch).all()
    assert not torch.equal(philox_normal(seed ^ (1 << 40), offset, 8, dtype=F64), batch)  # key's high word counts
    assert len(set(batch.tolist())) == 8
    # float32 and float64 Box-Muller on the same integers agree to float32 rounding
    assert_close(philox_normal(seed, offset, 8, dtype=torch.float32).to(F64), batch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_philox_normal_in_cpu_chunks_is_the_one_pass_stream(dtype):
    """On a CPU long draws are made CPU_CHUNK elements at a time: the same values as one pass, across the seams."""
    from fusedvae.reference.philox import CPU_CHUNK, _box_muller_of_philox

    seed, offset, numel = 987654321, 2**32 - CPU_CHUNK - 1, 2 * CPU_CHUNK + 3  # a seam meets the counter's carry
    chunked = philox_normal(seed, offset, numel, dtype=dtype)
    assert chunked.shape == (numel,) and chunked.dtype == dtype
    assert torch.equal(chunked, _box_muller_of_philox(seed, offset, numel, dtype, "cpu"))
    tail = philox_normal(seed, offset + numel - 5, 5, dtype=dtype)
    assert torch.equal(chunked[-5:], tail)


# --------------------------------------------------------------------------------- gaussian_nll


def nll_closed_form(x, m, s, full=True):
    s = torch.as_tensor(s, dtype=x.dtype)
    return 0.5 * ((x - m) / torch.exp(s)) ** 2 + s + (HALF_LOG_2PI if full else 0.0)


LOG_SIGMA_SHAPES = {
    "float": None,
    "0-dim": (),
    "channel": (3, 1, 1),
    "sample": (4, 1, 1, 1),
    "channel4d": (1, 3, 1, 1),
    "width": (5,),
    "full": (4, 3, 2, 5),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ls_kind", list(LOG_SIGMA_SHAPES))
def test_gaussian_nll_values_and_gradients(gen, reduction, ls_kind):
    x = randn(gen, 4, 3, 2, 5, requires_grad=True)
    m = randn(gen, 4, 3, 2, 5, requires_grad=True)
    shape = LOG_SIGMA_SHAPES[ls_kind]
    if shape is None:
        ls = -0.3
        ls_t = torch.tensor(ls, dtype=F64)
    else:
        ls = ls_t = randn(gen, *shape, scale=0.5, requires_grad=True)
    nll = fv.gaussian_nll(x, m, ls, reduction=reduction)
    closed = reduce_ref(nll_closed_form(x, m, ls_t), reduction)
    dist = reduce_ref(-Normal(m, torch.exp(ls_t).expand_as(m)).log_prob(x), reduction)
    assert nll.shape == closed.shape and nll.dtype == F64
    assert_close(nll, closed)
    assert_close(nll, dist)
    g = randn(gen, *nll.shape, shift=0.4)
    inputs = [x, m] + ([ls] if shape is not None else [])
    got = grads(nll, inputs, g)
    for a, b in zip(got, grads(dist, inputs, g)):
        assert a.shape == b.shape
        assert_close(a, b)
    # docs/design.md's formulas, elementwise, then summed over log_sigma's broadcast positions
    # the grad_output each element receives through the reduction
    ones = torch.ones(x.shape, dtype=F64, requires_grad=True)
    (g_el,) = torch.autograd.grad(reduce_ref(ones, reduction), [ones], g)
    with torch.no_grad():
        r = (x - m) * torch.exp(-ls_t)
        assert_close(got[1], g_el * (m - x) * torch.exp(-2 * ls_t))
        assert_close(got[0], -got[1])
        if shape is not None:
            expected_ls = (g_el * (1 - r**2)).sum_to_size(ls.shape)
            assert_close(got[2], expected_ls)


def test_gaussian_nll_full_false(gen):
    x, m, ls = randn(gen, 3, 4), randn(gen, 3, 4), randn(gen, 4)
    for reduction in REDUCTIONS:
        full = fv.gaussian_nll(x, m, ls, reduction=reduction, full=True)
        part = fv.gaussian_nll(x, m, ls, reduction=reduction, full=False)
        const = reduce_ref(torch.full((3, 4), HALF_LOG_2PI, dtype=F64), reduction)
        assert_close(full - part, const)
        assert_close(part, reduce_ref(nll_closed_form(x, m, ls, full=False), reduction))


def test_gaussian_nll_gradcheck(gen):
    x, m = randn(gen, 2, 3, 2, requires_grad=True), randn(gen, 2, 3, 2, requires_grad=True)
    for shape in [(), (3, 1), (2, 1, 1), (2, 3, 2)]:
        ls = randn(gen, *shape, scale=0.5, requires_grad=True)
        for reduction, full in [("none", True), ("batchmean", False), ("per_sample", True)]:
            fn = lambda a, b, c: fv.gaussian_nll(a, b, c, reduction=reduction, full=full)  # noqa: E731, B023
            assert torch.autograd.gradcheck(fn, (x, m, ls))


def test_gaussian_nll_finite_for_log_sigma_up_to_80():
    f32 = torch.float32
    ls = torch.tensor([-80.0, -60.0, -20.0, 0.0, 20.0, 60.0, 80.0], dtype=f32, requires_grad=True)
    # |x - m| small enough at large negative log_sigma that the true NLL fits in float32
    diff = torch.tensor([1e-20, 1e-15, 0.3, -1.2, 2.0, -5.0, 7.0], dtype=f32)
    x, m = (0.5 * diff).requires_grad_(), (-0.5 * diff).requires_grad_()
    nll = fv.gaussian_nll(x, m, ls, reduction="none")
    exact = nll_closed_form(x.detach().to(F64), m.detach().to(F64), ls.detach().to(F64))
    assert (exact.abs() < torch.finfo(f32).max).all()
    assert torch.isfinite(nll).all()
    assert _relative_error(nll, exact).max() < 1e-5
    (g_ls,) = grads(nll, [ls], torch.full((7,), 0.5))
    assert torch.isfinite(g_ls).all()  # 1 - r^2 is finite wherever the NLL is


# --------------------------------------------------------------------------- gaussian_nll_optimal


def sigma_vae_reference(x, m, *, per_sample, min_log_sigma, full=True, reduction="sum"):
    """The σ-VAE reference (Rybkin et al. 2021, orybkin/sigma-vae-pytorch), in plain torch."""
    dims = tuple(range(1, x.dim())) if per_sample else tuple(range(x.dim()))
    log_sigma = ((x - m) ** 2).mean(dims, keepdim=True).sqrt().log()
    if min_log_sigma is not None:
        log_sigma = min_log_sigma + F.softplus(log_sigma - min_log_sigma)  # softclip
    nll = 0.5 * torch.pow((x - m) / log_sigma.exp(), 2) + log_sigma
    if full:
        nll = nll + 0.5 * np.log(2 * np.pi)
    return reduce_ref(nll, reduction)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("min_log_sigma", [None, -6.0, -2.0])
def test_optimal_log_sigma_is_log_rms(gen, per_sample, min_log_sigma):
    x = randn(gen, 5, 3, 4)
    m = (x + randn(gen, 5, 3, 4) * torch.logspace(-3, 0, 5, dtype=F64).reshape(5, 1, 1)).requires_grad_()
    dims = (1, 2) if per_sample else (0, 1, 2)
    mse = ((x - m.detach()) ** 2).mean(dims)
    expected = 0.5 * torch.log(mse)  # sigma* = sqrt(MSE)
    if min_log_sigma is not None:
        expected = min_log_sigma + F.softplus(expected - min_log_sigma)
    got = fv.optimal_log_sigma(x, m, per_sample=per_sample, min_log_sigma=min_log_sigma)
    assert got.shape == ((5,) if per_sample else ())
    assert not got.requires_grad and got.grad_fn is None
    assert_close(got, expected)
    if min_log_sigma is None:
        assert_close(torch.exp(got), mse.sqrt())


def test_optimal_log_sigma_soft_clip_is_active_near_the_bound(gen):
    x = randn(gen, 6, 8)
    m = x + 1e-3 * randn(gen, 6, 8)  # sigma* ~ 1e-3, log sigma* ~ -6.9 < -6
    raw = fv.optimal_log_sigma(x, m, min_log_sigma=None)
    clipped = fv.optimal_log_sigma(x, m, min_log_sigma=-6.0)
    assert raw < -6.5
    assert clipped > -6.0
    assert_close(clipped, -6.0 + torch.log1p(torch.exp(raw + 6.0)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("min_log_sigma", [None, -6.0])
@pytest.mark.parametrize("scale", [1.0, 2e-3])
def test_gaussian_nll_optimal_matches_sigma_vae_reference(gen, reduction, per_sample, min_log_sigma, scale):
    x = randn(gen, 4, 3, 5, requires_grad=True)
    m = (x.detach() + scale * randn(gen, 4, 3, 5)).requires_grad_()
    for full in (True, False):
        got = fv.gaussian_nll_optimal(
            x, m, per_sample=per_sample, min_log_sigma=min_log_sigma, reduction=reduction, full=full
        )
        want = sigma_vae_reference(x, m, per_sample=per_sample, min_log_sigma=min_log_sigma, full=full,
                                   reduction=reduction)
        assert got.shape == want.shape and got.dtype == F64
        assert_close(got, want, rtol=1e-10, atol=1e-10)
        g = randn(gen, *got.shape, shift=0.5)
        for a, b in zip(grads(got, [x, m], g), grads(want, [x, m], g)):
            assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("min_log_sigma", [None, -6.0])
def test_gaussian_nll_optimal_gradcheck(gen, per_sample, min_log_sigma):
    x = randn(gen, 3, 4, requires_grad=True)
    for scale in (1.0, 3e-3):
        m = (x.detach() + scale * randn(gen, 3, 4)).requires_grad_()
        for reduction in ("batchmean", "none"):
            fn = lambda a, b: fv.gaussian_nll_optimal(  # noqa: E731
                a, b, per_sample=per_sample, min_log_sigma=min_log_sigma, reduction=reduction  # noqa: B023
            )
            assert torch.autograd.gradcheck(fn, (x, m))


def test_gaussian_nll_optimal_at_optimum_has_zero_sigma_gradient(gen):
    """At s = log sqrt(MSE) the NLL is stationary in s: the σ path adds nothing to d/dmean (no clip)."""
    x, m = randn(gen, 4, 6), randn(gen, 4, 6, requires_grad=True)
    got = fv.gaussian_nll_optimal(x, m, min_log_sigma=None, reduction="sum")
    s = fv.optimal_log_sigma(x, m, min_log_sigma=None)
    fixed = fv.gaussian_nll(x, m, s, reduction="sum")
    assert_close(got, fixed)
    assert_close(grads(got, [m], torch.tensor(1.3, dtype=F64))[0], grads(fixed, [m], torch.tensor(1.3, dtype=F64))[0])


# ---------------------------------------------------------------------------- gaussian_nll_loss


def test_gaussian_nll_loss_gradcheck(gen):
    inp, tgt = randn(gen, 4, 3, requires_grad=True), randn(gen, 4, 3, requires_grad=True)
    var = (torch.rand(4, 1, generator=gen, dtype=F64) + 0.1).requires_grad_()
    for reduction in ("none", "mean", "sum", "batchmean", "per_sample"):
        fn = lambda a, b, c: fv.gaussian_nll_loss(a, b, c, full=True, reduction=reduction)  # noqa: E731, B023
        assert torch.autograd.gradcheck(fn, (inp, tgt, var))


# --------------------------------------------------------------------------------- identities


def test_beta_vae_equals_sigma_vae_with_fixed_sigma_squared_beta_over_two(gen):
    """β-VAE as usually written, L_β = SSE/B + β·KL (mse_loss(reduction='sum') per datapoint), equals β times the
    σ-VAE objective L_σ = gaussian_nll(σ² = β/2, full=False) + KL, minus the constant β·(n/B)·log σ:

        L_σ = SSE / (2σ² B) + (n/B) log σ + KL = (SSE/B + β KL) / β + (n/B) log σ   with 2σ² = β,

    so every parameter gradient of L_β is exactly β times that of L_σ.
    """
    beta = 0.37
    B, D, L = 6, 10, 3
    x = randn(gen, B, D)
    decoder = torch.nn.Linear(L, D).double()
    mu, lv = randn(gen, B, L, requires_grad=True), randn(gen, B, L, requires_grad=True)
    params = [mu, lv, *decoder.parameters()]
    log_sigma = 0.5 * math.log(beta / 2)

    sigma_vae = fv.vae_loss(x, decoder, mu, lv, log_sigma=log_sigma, beta=1.0, full=False,
                            generator=torch.Generator().manual_seed(4))
    z, kl = fv.rsample_kl(mu, lv, generator=torch.Generator().manual_seed(4))
    beta_vae = F.mse_loss(decoder(z), x, reduction="sum") / B + beta * kl
    constant = (D * log_sigma)  # (n / B) log σ
    assert_close(beta_vae, beta * (sigma_vae.loss - constant))
    for a, b in zip(grads(beta_vae, params, None), grads(sigma_vae.loss, params, None)):
        assert_close(a, beta * b)

    # The same identity in fusedvae's own convention, nll = SSE/(2B) at σ = 1: L = nll + β KL has the
    # gradients of β times the σ-VAE with σ² = β.
    own = fv.vae_loss(x, decoder, mu, lv, log_sigma=0.0, beta=beta, full=False,
                      generator=torch.Generator().manual_seed(4))
    sigma2 = fv.vae_loss(x, decoder, mu, lv, log_sigma=0.5 * math.log(beta), beta=1.0, full=False,
                         generator=torch.Generator().manual_seed(4))
    assert_close(own.loss, beta * (sigma2.loss - D * 0.5 * math.log(beta)))
    for a, b in zip(grads(own.loss, params, None), grads(sigma2.loss, params, None)):
        assert_close(a, beta * b)


# --------------------------------------------------------------------------- property tests


_finite = st.floats(-12, 12, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(
    mu=hnp.arrays(np.float64, (3, 4), elements=_finite),
    lv=hnp.arrays(np.float64, (3, 4), elements=_finite),
    mu_p=hnp.arrays(np.float64, (4,), elements=_finite),
    lv_p=hnp.arrays(np.float64, (4,), elements=_finite),
)
def test_property_kl_nonnegative_and_zero_against_itself(mu, lv, mu_p, lv_p):
    with fv.use_backend("reference"):
        for dtype in (torch.float32, F64):
            t = [torch.from_numpy(a).to(dtype) for a in (mu, lv, mu_p, lv_p)]
            kl = fv.kl_normal(*t, reduction="none")
            assert (kl >= 0).all()
            assert (fv.kl_normal(t[0], t[1], reduction="none") >= 0).all()
            self_kl = fv.kl_normal(t[0], t[1], t[0], t[1], reduction="none")
            assert torch.equal(self_kl, torch.zeros_like(self_kl))
        kl64 = fv.kl_normal(*[torch.from_numpy(a) for a in (mu, lv, mu_p, lv_p)], reduction="none")
        ref = kl_torch(*[torch.from_numpy(a) for a in (mu, lv)],
                       torch.from_numpy(mu_p), torch.from_numpy(lv_p))
        torch.testing.assert_close(kl64, ref, rtol=1e-9, atol=1e-9)
