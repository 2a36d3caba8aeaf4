"""The kernels' FAST (GPU-only) path run on CPU: :mod:`fusedvae.kernels.fastmath`'s PTX emulated under the interpreter.

Under ``TRITON_INTERPRET=1`` each PTX wrapper computes its function with plain Triton math, off by the
instruction's documented worst-case error (``fastmath.EMULATED``), and ``sin/cos.approx`` give NaN outside
[-pi, pi]. Forcing ``fastmath.is_fast`` to True then runs the FAST path's own logic (Philox's ``mul.hi/lo``, the
series near ``u1 = 1``, the centred angle, eight normals a thread for 16-bit tensors, ``exp_accurate_f32``, the
nll's ``rcp.approx``) and holds it to its documented bounds: ``|d eps| <= 1e-6 (1 + radius)``, the KL contract
(relative error < 1e-5 down to ``|d| = 1e-6``, finite to ``|logvar| = 80``), the nll's 2x-eager bound.
On a GPU the FAST path runs for real in the other test files; this file is skipped there.
"""

from __future__ import annotations

import importlib
import math
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from noise_checks import (  # noqa: E402
    assert_kl_accurate_near_collapse,
    assert_kl_finite_and_accurate_to_logvar_80,
    assert_standard_normal,
)

import fusedvae as fv  # noqa: E402
from fusedvae import reference  # noqa: E402
from fusedvae.kernels import _common as kcommon  # noqa: E402
from fusedvae.kernels import fastmath  # noqa: E402
from fusedvae.kernels import philox as kphilox  # noqa: E402
from fusedvae.kernels import sample_kl as ksample_kl  # noqa: E402
from fusedvae.testing import assert_within_twice_eager  # noqa: E402

kgnll = importlib.import_module("fusedvae.kernels.gaussian_nll")  # the module (fusedvae.kernels exports a function)
pytestmark = pytest.mark.skipif(not fastmath.EMULATED, reason="the FAST path is emulated under TRITON_INTERPRET=1")

F32, F64 = torch.float32, torch.float64
#: The FAST noise bound: |eps - eps_exact| <= FAST_EPS_ABS (1 + radius) (fusedvae.kernels.philox._box_muller_fast).
FAST_EPS_ABS = 1e-6
EPS32 = torch.finfo(F32).eps


@pytest.fixture(autouse=True)
def _fast_and_nan_filled(nan_filled_outputs, monkeypatch):
    """FAST on for CPU tensors (the test hook); every output and gradient buffer starts as NaN."""
    monkeypatch.setattr(fastmath, "is_fast", lambda t: True)
    monkeypatch.setattr(ksample_kl, "TILING_OVERRIDE", None)


def radius_of(seed: int, offset: int, numel: int) -> torch.Tensor:
    """``sqrt(-2 log u1)`` (float64) of logical indices ``offset ..``: lanes 0, 1 of a block use r0, lanes 2, 3 r2."""
    index = torch.arange(numel, dtype=torch.int64) + offset
    block, mask = index >> 2, reference.philox.MASK32
    counter = (block & mask, (block >> 32) & mask, torch.zeros_like(block), torch.zeros_like(block))
    r0, _, r2, _ = reference.philox4x32(counter, (seed & mask, (seed >> 32) & mask))
    u1 = ((torch.where((index & 3) >= 2, r2, r0) >> 8) + 1).to(F64) * 2.0**-24
    return torch.sqrt(-2.0 * torch.log(u1))


def fast_eps_excess(got: torch.Tensor, seed: int, offset: int) -> float:
    """max(|got - exact| / (1 + radius)) over the normals ``got`` of indices ``offset ..`` (to compare with 1e-6)."""
    want = reference.philox_normal(seed, offset, got.numel(), dtype=F64)
    return ((got.double().flatten() - want).abs() / (1.0 + radius_of(seed, offset, got.numel()))).max().item()


# ---------------------------------------------------------------------------------------------
# The hook and Philox
# ---------------------------------------------------------------------------------------------


def test_the_hook_takes_the_fast_path(monkeypatch):
    """Forced FAST differs from the exact path (the emulated errors) and stays within its bound of it."""
    fast = kphilox.philox_normal(5, 8, 4096)
    monkeypatch.setattr(fastmath, "is_fast", lambda t: False)
    exact = kphilox.philox_normal(5, 8, 4096)
    assert not torch.equal(fast, exact)
    assert (fast - exact).abs().max().item() < 7e-6


@pytest.mark.parametrize("seed, offset", [(1234, 0), (2**62 - 1, 2**32 - 701), (0xDEADBEEF12345, 2**40 + 11)])
def test_philox_words_bit_for_bit(seed, offset):
    """PTX mul.hi/mul.lo (emulated): the reference's words exactly."""
    numel = 1000
    words = kphilox.philox_words(seed, offset, numel)
    index = torch.arange(numel, dtype=torch.int64) + offset
    mask = reference.philox.MASK32
    counter = (index & mask, (index >> 32) & mask, torch.zeros_like(index), torch.zeros_like(index))
    for got, want in zip(words, reference.philox4x32(counter, (seed & mask, (seed >> 32) & mask))):
        assert torch.equal(got, want)


@pytest.mark.parametrize("offset", [2**33 - 1000, 2**33 - 999])  # whole Philox blocks, and one block per element
def test_philox_normal_within_the_fast_bound(offset):
    seed = 987654321987
    got = kphilox.philox_normal(seed, offset, 2**15)
    assert fast_eps_excess(got, seed, offset) <= FAST_EPS_ABS


def test_fast_box_muller_over_every_u1_near_one_and_every_angle_end():
    """The series' range (w = 1 - u1 < 1/64), its edge, and the angles next to -pi, 0 and pi, word by word."""
    # r0's top 24 bits k give u1 = (k + 1) 2^-24; k near 2^24 - 1 is u1 near 1 (radius near 0)
    top = 2**24 - 1
    ks = torch.cat([torch.arange(top - 300, top + 1), torch.arange(top - 2**18 - 64, top - 2**18 + 64)])
    angles = torch.tensor([0, 1, 2**23 - 1, 2**23, 2**23 + 1, 2**24 - 1, 2**22, 3 * 2**22])
    ra = (ks[:, None] << 8).expand(-1, angles.numel()).flatten()
    rb = (angles[None, :] << 8).expand(ks.numel(), -1).flatten()

    import triton
    import triton.language as tl

    @triton.jit
    def pair_kernel(ra_ptr, rb_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        a = tl.load(ra_ptr + i, mask=m).to(tl.uint32)
        b = tl.load(rb_ptr + i, mask=m).to(tl.uint32)
        n0, n1 = kphilox._box_muller(a, b, tl.float32, True)
        tl.store(out_ptr + i, n0, mask=m)
        tl.store(out_ptr + n + i, n1, mask=m)

    n = ra.numel()
    out = torch.empty(2, n)
    pair_kernel[(triton.cdiv(n, 1024),)](ra, rb, out, n, BLOCK=1024)
    u1 = ((ra >> 8) + 1).to(F64) * 2.0**-24
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = 2 * math.pi * (rb >> 8).to(F64) * 2.0**-24
    for got, want in zip(out, (radius * torch.cos(angle), radius * torch.sin(angle))):
        err = (got.double() - want).abs() / (1.0 + radius)
        assert torch.isfinite(got).all()
        assert err.max().item() <= FAST_EPS_ABS, err.max().item()


# ---------------------------------------------------------------------------------------------
# z against the reference: dtypes, offsets, sample counts, row lengths, layouts
# ---------------------------------------------------------------------------------------------

Z_CASES = {
    # id: (shape, offset, n_samples, transposed)
    "whole-blocks-K1": ((5, 16), 2**33 + 8, 1, False),
    "odd-offset-K4": ((5, 16), 2**33 + 6, 4, False),
    "row-of-13-K4": ((6, 13), 8, 4, False),
    "wide-rows-K1": ((3, 64), 4, 1, False),
    "transposed-K1": ((6, 12), 12, 1, True),
}


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(Z_CASES))
def test_z_within_the_fast_bound(case, dtype):
    shape, offset, n_samples, transposed = Z_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    mu = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    lv = (torch.randn(shape, generator=gen, dtype=F64) * 1.5).to(dtype)
    if transposed:
        mu, lv = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (mu, lv))
        assert not mu.is_contiguous()
    seed = 2**61 + 12345
    z, _ = ksample_kl.rsample_kl(mu, lv, None, None, n_samples=n_samples, seed=seed, offset=offset, sample=True,
                                 kl=False, reduction="sum")
    want = reference.rsample(mu.double(), lv.double(), n_samples=n_samples, seed=seed, offset=offset)
    z, want = z.reshape(n_samples, *shape).double(), want.reshape(n_samples, *shape)
    radius = radius_of(seed, offset, n_samples * mu.numel()).reshape(n_samples, *shape)
    sd = torch.exp(0.5 * lv.double())
    # the noise bound; 8 float32 ulps of sd radius (exp_accurate_f32) and of |mu|; the output's rounding
    bound = (sd * (FAST_EPS_ABS * (1.0 + radius) + 8 * EPS32 * radius.clamp(min=1.0)) + 8 * EPS32 * mu.double().abs()
             + torch.finfo(dtype).eps * want.abs())
    excess = ((z - want).abs() / bound).max().item()
    assert excess <= 1.0, excess


@pytest.mark.parametrize("dtype, pairs", [(torch.bfloat16, True), (torch.float16, True), (F32, False)])
def test_16_bit_whole_blocks_draw_eight_normals_a_thread(monkeypatch, dtype, pairs):
    """The cases above cover philox_normal_tile_pairs (16-bit, whole blocks, one-dim rows) under FAST."""
    calls = []
    real = kphilox.philox_normal_tile_pairs
    monkeypatch.setattr(kphilox, "philox_normal_tile_pairs", lambda *a: calls.append(1) or real(*a))
    mu = torch.zeros(5, 16, dtype=dtype)
    ksample_kl.rsample_kl(mu, mu, None, None, n_samples=1, seed=1, offset=8, sample=True, kl=False, reduction="sum")
    assert bool(calls) == pairs


def test_noise_statistics_of_the_fast_path():
    """262144 FAST normals through the sample kernel: moments, Kolmogorov-Smirnov, tails, neighbours, the bound."""
    zeros = torch.zeros(64, 1024)
    seed, offset = 99, 2**34
    eps, _ = ksample_kl.rsample_kl(zeros, zeros, None, None, n_samples=4, seed=seed, offset=offset, sample=True,
                                   kl=False, reduction="sum")
    x = eps.double().flatten()
    n = x.numel()
    assert_standard_normal(x, tails=(1.0, 2.0, 3.0, 4.0))
    # sd = exp(0) by exp_accurate_f32 (emulated ex2 2^-22 high): within 8 ulps of eps beyond the noise bound
    excess = ((x - reference.philox_normal(seed, offset, n, dtype=F64)).abs()
              - FAST_EPS_ABS * (1.0 + radius_of(seed, offset, n)) - 8 * EPS32 * x.abs()).max().item()
    assert excess <= 0.0, excess


# ---------------------------------------------------------------------------------------------
# Gradients, the KL contract, the spread backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, offset", [((7, 13), 2**35 + 17), ((6, 16), 2**35 + 16)])
@pytest.mark.parametrize("reduction", ["per_dim", "sum"])
def test_values_and_grads_against_float64(shape, offset, reduction):
    gen = torch.Generator().manual_seed(11)
    mu, lv = (torch.randn(shape, generator=gen) for _ in range(2))
    pmu, plv = torch.randn(shape[1:], generator=gen) * 0.7, torch.randn(shape[0], 1, generator=gen) * 0.7
    leaves = [t.requires_grad_() for t in (mu, lv, pmu, plv)]
    kw = dict(n_samples=2, seed=12345, offset=offset, sample=True, kl=True, reduction=reduction)
    z, kl = ksample_kl.rsample_kl(*leaves, **kw)
    gz = torch.randn(z.shape, generator=gen)
    gk = torch.randn(kl.shape, generator=gen) if kl.dim() else torch.tensor(0.7)
    grads = torch.autograd.grad([z, kl], leaves, [gz, gk])
    up = [t.detach().double().requires_grad_() for t in leaves]
    zr, klr = reference.rsample_kl(*up, **kw)
    want = torch.autograd.grad([zr, klr], up, [gz.double(), gk.double()])
    sd = torch.exp(0.5 * lv.detach().double())
    # z: sd times the noise bound (radius <= 5.77) plus rounding; dlogvar sums sd |dz| eps / 2 over 2 samples
    torch.testing.assert_close(z.double(), zr.detach(), rtol=1e-5, atol=1e-5 + 7 * FAST_EPS_ABS * sd.max().item())
    torch.testing.assert_close(kl.double(), klr.detach(), rtol=1e-5, atol=1e-5)
    grad_atol = 1e-5 + 0.5 * 7 * FAST_EPS_ABS * (sd * gz.abs().sum(0)).max().item()
    for name, got, expected in zip(("mu", "logvar", "prior_mu", "prior_logvar"), grads, want):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=grad_atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("shape, n_samples", [((6, 16), 1), ((5, 32), 2), ((3, 2, 8), 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_values_and_grads_within_twice_eager(shape, n_samples, dtype):
    """16-bit inputs (eight normals a thread where a row is one dim): the backward regenerates the forward's noise."""
    gen = torch.Generator().manual_seed(16 * n_samples + len(shape))
    inputs = [torch.randn(shape, generator=gen, dtype=F64), torch.randn(shape, generator=gen, dtype=F64),
              torch.randn(shape[1:], generator=gen, dtype=F64) * 0.7, torch.randn(shape[-1], generator=gen, dtype=F64)]
    kw = dict(n_samples=n_samples, seed=4321, offset=2**36 + 32, sample=True, kl=True, reduction="per_dim")
    outputs = {}
    for name, op, dt in (("kernel", ksample_kl.rsample_kl, dtype), ("eager", reference.rsample_kl, dtype),
                         ("exact", reference.rsample_kl, F64)):
        leaves = [t.to(dtype).to(dt).requires_grad_() for t in inputs]
        z, kl = op(*leaves, **kw)
        gen_g = torch.Generator().manual_seed(5)
        gz, gk = (torch.randn(t.shape, generator=gen_g, dtype=F64).to(t.dtype) for t in (z, kl))
        outputs[name] = [z.detach(), kl.detach(), *torch.autograd.grad([z, kl], leaves, [gz, gk])]
    names = ("z", "kl", "dmu", "dlogvar", "dprior_mu", "dprior_logvar")
    for name, k, e, x in zip(names, outputs["kernel"], outputs["eager"], outputs["exact"]):
        assert_within_twice_eager(name, k, e, x, k.dtype if k.dtype == dtype else F32)


@pytest.mark.parametrize("prior_logvar", [None, 0.3])
def test_kl_and_its_gradient_accurate_near_collapse(prior_logvar):
    """|d| from 1e-6 up through the series cutoff: relative error < 1e-5 in float32 with exp_accurate_f32."""
    assert_kl_accurate_near_collapse(prior_logvar, "cpu")


def test_finite_and_accurate_for_logvar_up_to_80():
    assert_kl_finite_and_accurate_to_logvar_80(torch.Generator().manual_seed(80), "cpu")


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_coarse_exp_error_grows_with_the_argument_only_as_documented(scale):
    """exp_coarse_f32 against float64 exp over [-87, 87]: relative error <= |SCALE x| 7.5e-8 + 2^-22 (+2 ulp slack)."""
    import triton
    import triton.language as tl

    @triton.jit
    def exp_kernel(x_ptr, out_ptr, n, SCALE: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        tl.store(out_ptr + i, fastmath.exp_coarse_f32(tl.load(x_ptr + i, mask=m), SCALE), mask=m)

    x = torch.linspace(-87.0, 87.0, 20001) / scale
    out = torch.empty_like(x)
    exp_kernel[(triton.cdiv(x.numel(), 4096),)](x, out, x.numel(), SCALE=scale, BLOCK=4096)
    arg = scale * x.double()
    rel = (out.double() / torch.exp(arg) - 1.0).abs()
    bound = arg.abs() * 7.5e-8 + 2.0**-22 + 2 * EPS32
    assert (rel <= bound).all(), (rel / bound).max()
    assert rel[arg.abs() > 40].max() > 1e-7  # the argument's rounding is there (what makes it 16-bit only)


@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 80.0), (torch.float16, 10.0)])
@pytest.mark.parametrize("prior", [False, True])
def test_16_bit_results_take_the_coarse_exp_within_one_rounding(monkeypatch, dtype, bound, prior):
    """16-bit in and out: every exp is ex2.approx(x log2 e) (COARSE); z and the KL stay within one 16-bit rounding.

    The coarse exp is off by up to |x| 7.5e-8 relative (emulated pessimistically here), 6e-6 at |logvar| = 80: two
    orders below a bfloat16 half-ulp, so each result is the exact value rounded, give or take that rounding.
    """
    flags = []
    real = kcommon.coarse_exp
    monkeypatch.setattr(kcommon, "coarse_exp", lambda *d: flags.append(real(*d)) or flags[-1])
    gen = torch.Generator().manual_seed(int(bound) + prior)
    shape = (8, 16)
    mu = (torch.randn(shape, generator=gen, dtype=F64) * 3).to(dtype)
    lv = torch.linspace(-bound, bound, mu.numel(), dtype=F64).reshape(shape).to(dtype)
    pmu, plv = ((torch.randn(shape[1:], generator=gen, dtype=F64)).to(dtype),
                torch.linspace(-1.0, 1.0, shape[1], dtype=F64).to(dtype)) if prior else (None, None)
    kw = dict(n_samples=1, seed=77, offset=2**33 + 16, sample=True, kl=True, reduction="none")
    z, kl = ksample_kl.rsample_kl(mu, lv, pmu, plv, **kw)
    assert flags and all(flags)
    up = [None if t is None else t.double() for t in (mu, lv, pmu, plv)]
    zr, klr = reference.rsample_kl(*up, **kw)
    eps = torch.finfo(dtype).eps
    radius = radius_of(77, 2**33 + 16, mu.numel()).reshape(1, *shape)
    # z: the FAST noise bound times sd, then one rounding; the KL: one rounding (values in the 16-bit range)
    z_bound = torch.exp(0.5 * up[1]) * FAST_EPS_ABS * (1.0 + radius) + eps * zr.abs() + 1e-30
    assert ((z.double() - zr).abs() / z_bound).max().item() <= 1.0
    assert torch.isfinite(kl).all()
    assert ((kl.double() - klr).abs() / (eps * klr.abs() + 1e-30)).max().item() <= 1.0


@pytest.mark.parametrize("offset, prior", [(2**33 + 8, False), (2**33 + 7, True)])  # whole blocks or not
def test_spread_backward(monkeypatch, offset, prior):
    """K = 64 samples of a 3 x 4 posterior: chunks across programs (forward and backward), as the loop to rounding."""
    gen = torch.Generator().manual_seed(offset + prior)
    mu, lv = (torch.randn(3, 4, generator=gen).requires_grad_() for _ in range(2))
    plv = torch.randn(4, generator=gen).requires_grad_() if prior else None
    gz, gk = torch.randn(64, 3, 4, generator=gen), torch.randn(3, generator=gen)
    kw = dict(n_samples=64, seed=77, offset=offset, sample=True, kl=True, reduction="per_sample")
    leaves = [mu, lv] + ([plv] if prior else [])
    grids = []
    real_kernel = ksample_kl._sample_kl_backward_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real_kernel[grid]

    monkeypatch.setattr(ksample_kl, "_sample_kl_backward_kernel", Spy())
    spread = ksample_kl.rsample_kl(mu, lv, None, plv, **kw)
    spread_grads = torch.autograd.grad(spread, leaves, [gz, gk])
    assert grids[0][1] > 1  # the samples in chunks across programs
    monkeypatch.setattr(ksample_kl._common, "target_programs", lambda device: 1)
    looped = ksample_kl.rsample_kl(mu, lv, None, plv, **kw)
    looped_grads = torch.autograd.grad(looped, leaves, [gz, gk])
    assert grids[-1][1] == 1
    for a, b in zip(spread, looped):
        assert torch.equal(a, b)
    for a, b in zip(spread_grads, looped_grads):  # 64 terms summed in another order (seen: 1.7e-6 apart at 0.36)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    up = [t.detach().double().requires_grad_() for t in leaves]
    z_ref, kl_ref = reference.rsample_kl(up[0], up[1], None, up[2] if prior else None, **kw)
    sd = torch.exp(0.5 * lv.detach().double())
    torch.testing.assert_close(spread[0].double(), z_ref.detach(), rtol=1e-5,
                               atol=1e-5 + 7 * FAST_EPS_ABS * sd.max().item())
    want_grads = torch.autograd.grad((z_ref, kl_ref), up, [gz.double(), gk.double()])
    grad_atol = 8e-5 + 0.5 * 7 * FAST_EPS_ABS * (sd * gz.abs().sum(0)).max().item()
    for got, expected in zip(spread_grads, want_grads):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=grad_atol)


# ---------------------------------------------------------------------------------------------
# gaussian_nll / gaussian_nll_loss: rcp.approx divisions and the clamped log
# ---------------------------------------------------------------------------------------------


def _check_nll(fn, inputs, gen, monkeypatch):
    """The Triton backend (FAST taken) within 2x eager's error + 8 ulps of float64, value and gradients."""
    taken = []
    real_fast = kgnll._fast
    monkeypatch.setattr(kgnll, "_fast", lambda *a: taken.append(real_fast(*a)) or taken[-1])
    results = {}
    for name, backend, dtype in (("kernel", "triton", F32), ("eager", "reference", F32), ("exact", "reference", F64)):
        args = {n: (v.detach().to(dtype).requires_grad_() if isinstance(v, torch.Tensor) else v)
                for n, v in inputs.items()}
        with fv.use_backend(backend):
            out = fn(**args)
        if "g" not in results:
            results["g"] = torch.rand(out.shape, generator=gen, dtype=F64) * 1.5 + 0.25
        tensors = [v for v in args.values() if isinstance(v, torch.Tensor)]
        results[name] = [out.detach(), *torch.autograd.grad(out, tensors, results["g"].to(out.dtype))]
    assert taken and all(taken)  # every launch took the FAST path
    names = ["value"] + [n for n, v in inputs.items() if isinstance(v, torch.Tensor)]
    for name, k, e, x in zip(names, results["kernel"], results["eager"], results["exact"]):
        assert_within_twice_eager(name, k, e, x, F32)


NLL_VAR_SHAPES = {"per-element": (4, 3, 5, 7), "per-channel": (3, 1, 1), "per-sample": (4, 1, 1, 1), "float": None}


@pytest.mark.parametrize("reduction", ["sum", "none", "mean"])
@pytest.mark.parametrize("var_shape", list(NLL_VAR_SHAPES))
def test_gaussian_nll_loss_fast(var_shape, reduction, monkeypatch):
    gen = torch.Generator().manual_seed(len(var_shape) * 7 + len(reduction))
    shape = (4, 3, 5, 7)
    x, target = torch.randn(shape, generator=gen, dtype=F64), torch.randn(shape, generator=gen, dtype=F64)
    if NLL_VAR_SHAPES[var_shape] is None:
        var = 0.7
    else:  # variances over several binades, some clamped by eps, one exactly 1 (log 1 = 0)
        var = torch.exp(torch.randn(NLL_VAR_SHAPES[var_shape], generator=gen, dtype=F64) * 3)
        if var_shape == "per-element":
            var[0, 0, 0, :3] = torch.tensor([1e-9, 0.0, 1.0])
            var[1, 0, 0, 0] = 1.0 + 2.0**-20

    def fn(input, target, var):
        return fv.gaussian_nll_loss(input, target, var, full=True, eps=1e-6, reduction=reduction)

    _check_nll(fn, {"input": x, "target": target, "var": var}, gen, monkeypatch)


@pytest.mark.parametrize("sigma_shape", [(4, 3, 5, 7), (3, 1, 1), ()])
@pytest.mark.parametrize("reduction", ["sum", "per_sample", "none"])
def test_gaussian_nll_fast(sigma_shape, reduction, monkeypatch):
    gen = torch.Generator().manual_seed(len(sigma_shape) * 5 + len(reduction))
    shape = (4, 3, 5, 7)
    x, mean = torch.randn(shape, generator=gen, dtype=F64), torch.randn(shape, generator=gen, dtype=F64)
    log_sigma = torch.randn(sigma_shape, generator=gen, dtype=F64) * 2

    def fn(x, mean, log_sigma):
        return fv.gaussian_nll(x, mean, log_sigma, reduction=reduction, full=True)

    _check_nll(fn, {"x": x, "mean": mean, "log_sigma": log_sigma}, gen, monkeypatch)
