"""The fused sample + KL Triton kernels against the float64 reference (Triton's interpreter without a GPU).

Every comparison runs the same call three times: the Triton kernels and the eager reference in the
input dtype, and the reference in float64 on the same (rounded) inputs. The kernels pass when their
error against float64 is at most twice the eager reference's plus a small atol, for values and for
the gradients of all four inputs under random grad_outputs. Every buffer the kernels write (outputs,
partial sums, gradients) starts filled with NaN, so an unwritten element fails.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from noise_checks import assert_kl_accurate_near_collapse, assert_kl_finite_and_accurate_to_logvar_80  # noqa: E402

import fusedvae as fv  # noqa: E402
from fusedvae import reference  # noqa: E402
from fusedvae.kernels import _common as kcommon  # noqa: E402
from fusedvae.kernels import philox as kphilox  # noqa: E402
from fusedvae.kernels import sample_kl as ksample_kl  # noqa: E402
from fusedvae.seeding import draw_seed_offset  # noqa: E402
from fusedvae.testing import assert_within_twice_eager  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
HALF = (torch.float16, torch.bfloat16)
#: On a GPU float32 noise takes the hardware approximations (:mod:`fusedvae.kernels.fastmath`, the FAST path):
#: ``|eps - eps_exact| <= FAST_EPS_ABS (1 + radius)``, radius <= 5.77, where the interpreter is within a few ulps.
FAST_EPS_ABS = 1e-6 if DEVICE == "cuda" else 0.0
#: The 2x-eager floor, in ulps of max|exact|, for z and dlogvar (sd x eps) in float32: FAST_EPS_ABS (1 + 5.77) is
#: ~57 float32 ulps of a z whose largest |value| is ~sd; the interpreter keeps the 8 of every other output.
NOISE_ULPS = 64.0 if DEVICE == "cuda" else 8.0


@pytest.fixture(autouse=True)
def _nan_filled_outputs(nan_filled_outputs, monkeypatch):
    """Every output, gradient and partial-sum buffer of the kernels starts as NaN; the launchers' tilings."""
    monkeypatch.setattr(ksample_kl, "TILING_OVERRIDE", None)


def randn(gen, shape, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen, dtype=F64) * scale + shift).to(DEVICE)


def eps_of(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------------------
# Running one call on a backend, and the 2x-eager bound
# ---------------------------------------------------------------------------------------------


def run_op(backend, op, inputs, dtypes, kwargs, grad_outputs, seed):
    """``op`` (``"rsample_kl"``, ``"rsample"``, ``"kl_normal"``) on ``backend``; returns outputs and input grads.

    ``inputs`` are float64 tensors (or floats / None for the priors) cast to ``dtypes``; every
    tensor input is a leaf that requires grad. ``grad_outputs`` makes the random grad_output of
    each output (float64, cast to the output's dtype, so all backends see the same values).
    """
    leaves = []
    for value, dtype in zip(inputs, dtypes):
        if isinstance(value, torch.Tensor):
            value = value.detach().to(dtype).requires_grad_(True)
        leaves.append(value)
    mu, lv, pmu, plv = leaves
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    with fv.use_backend(backend):
        if op == "rsample_kl":
            z, kl = fv.rsample_kl(mu, lv, pmu, plv, generator=generator, **kwargs)
            outputs = [z, kl]
        elif op == "rsample":
            outputs = [fv.rsample(mu, lv, generator=generator, **kwargs)]
        else:
            outputs = [fv.kl_normal(mu, lv, pmu, plv, **kwargs)]
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    gos = [g(out).to(out.dtype) for g, out in zip(grad_outputs, outputs)]
    grads = torch.autograd.grad(outputs, tensors, gos, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]
    return [o.detach() for o in outputs], grads


def make_grad_outputs(gen, n):
    seeds = torch.randint(0, 2**31, (n,), generator=gen).tolist()
    return [
        (lambda out, s=s: torch.randn(out.shape, generator=torch.Generator().manual_seed(s), dtype=F64).to(out.device))
        for s in seeds
    ]


def compare_to_reference(gen, op, inputs, dtypes, kwargs):
    """The kernels and the eager reference in ``dtypes`` against the reference in float64."""
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    n_outputs = 2 if op == "rsample_kl" else 1
    grad_outputs = make_grad_outputs(gen, n_outputs)
    kernel = run_op("triton", op, inputs, dtypes, kwargs, grad_outputs, seed)
    eager = run_op("reference", op, inputs, dtypes, kwargs, grad_outputs, seed)
    # The float64 reference sees the inputs exactly as the kernels did (rounded to their dtype).
    rounded = [v.detach().to(d).to(F64) if isinstance(v, torch.Tensor) else v for v, d in zip(inputs, dtypes)]
    exact = run_op("reference", op, rounded, [F64] * 4, kwargs, grad_outputs, seed)
    compute_dtype = torch.float64 if F64 in dtypes else torch.float32
    names = ["z", "kl"] if op == "rsample_kl" else [op]
    noisy = ("z", "rsample", "dlogvar") if op != "kl_normal" else ()

    def check(name, k, e, x):
        ulps = NOISE_ULPS if name in noisy and compute_dtype == torch.float32 else 8.0
        assert_within_twice_eager(name, k, e, x, k.dtype if k.dtype in HALF else compute_dtype, ulps)

    for name, k, e, x in zip(names, kernel[0], eager[0], exact[0]):
        check(name, k, e, x)
    all_names = ("mu", "logvar", "prior_mu", "prior_logvar")
    tensor_names = [n for n, v in zip(all_names, inputs) if isinstance(v, torch.Tensor)]
    for name, k, e, x in zip(tensor_names, kernel[1], eager[1], exact[1]):
        check(f"d{name}", k, e, x)
    return kernel


# ---------------------------------------------------------------------------------------------
# Philox
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed, offset",
    [(1234, 0), (2**62 - 1, 2**32 - 700), (0xDEADBEEF12345, 2**62 - 3000), (7, 2**40 + 11)],
)
def test_philox_words_match_the_reference_bit_for_bit(seed, offset):
    numel = 2000
    words = kphilox.philox_words(seed, offset, numel, device=DEVICE).cpu()
    index = torch.arange(numel, dtype=torch.int64) + offset
    mask = reference.philox.MASK32
    counter = (index & mask, (index >> 32) & mask, torch.zeros_like(index), torch.zeros_like(index))
    expected = reference.philox4x32(counter, (seed & mask, (seed >> 32) & mask))
    for got, want in zip(words, expected):
        assert torch.equal(got, want)


def box_muller_radius(seed: int, offset: int, numel: int) -> torch.Tensor:
    """``sqrt(-2 log u1)`` per logical index (float64, CPU): the scale of eps's rounding error.

    Index ``j`` is lane ``j % 4`` of Philox block ``j // 4``; lanes 0, 1 share the radius of word r0,
    lanes 2, 3 that of r2. Within a few ulps *of this scale* leaves room for a GPU's cos/sin/log,
    whose error is absolute (cos near zero); the interpreter's numpy math is within ~2 ulps anyway.
    """
    index = torch.arange(numel, dtype=torch.int64) + offset
    block = index >> 2
    mask = reference.philox.MASK32
    counter = (block & mask, (block >> 32) & mask, torch.zeros_like(block), torch.zeros_like(block))
    r0, _, r2, _ = reference.philox4x32(counter, (seed & mask, (seed >> 32) & mask))
    word = torch.where((index & 3) >= 2, r2, r0)
    u1 = ((word >> 8) + 1).to(F64) * 2.0**-24
    return torch.sqrt(-2.0 * torch.log(u1))


@pytest.mark.parametrize("offset", [2**33 - 1000, 2**33 - 999])  # whole Philox blocks, and not
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_philox_normal_within_a_few_ulps_of_the_reference(dtype, offset):
    seed, numel = 987654321987, 4096
    got = kphilox.philox_normal(seed, offset, numel, dtype=dtype, device=DEVICE).cpu()
    want = reference.philox_normal(seed, offset, numel, dtype=dtype)
    radius = box_muller_radius(seed, offset, numel)
    fast = FAST_EPS_ABS * (1.0 + radius) if dtype == torch.float32 else 0.0  # the GPU's approximations
    excess = ((got - want).abs() - fast).clamp(min=0.0)
    ulps = (excess / (eps_of(dtype) * radius.clamp(min=1.0))).max().item()
    assert ulps <= 8.0, ulps


# ---------------------------------------------------------------------------------------------
# Values and gradients against the float64 reference
# ---------------------------------------------------------------------------------------------

F32 = torch.float32
CASES = [
    # (id, op, mu shape, prior_mu shape, prior_logvar shape, dtypes (mu, lv, pmu, plv), kwargs, transpose)
    ("std-prior-batchmean", "rsample_kl", (7, 13), None, None, (F32,) * 4, dict(reduction="batchmean"), False),
    ("row-prior-sum-K3", "rsample_kl", (7, 13), (13,), (13,), (F32,) * 4, dict(reduction="sum", n_samples=3), False),
    ("1xD-prior-per_dim", "rsample_kl", (7, 13), (1, 13), (13,), (F32,) * 4, dict(reduction="per_dim"), False),
    ("scalar-prior-per_sample-K2", "rsample_kl", (7, 13), (), (), (F32,) * 4,
     dict(reduction="per_sample", n_samples=2), False),
    ("Bx1-prior-none", "rsample_kl", (7, 13), (7, 1), (7, 13), (F32,) * 4, dict(reduction="none"), False),
    ("3d-channel-prior-mean-transposed", "rsample_kl", (3, 5, 7), (5, 1), (1, 5, 1), (F32,) * 4,
     dict(reduction="mean"), True),
    ("3d-full-prior-none-fp16", "rsample_kl", (3, 5, 7), (3, 5, 7), (3, 5, 7), (torch.float16,) * 4,
     dict(reduction="none", n_samples=2), False),
    ("bf16-row-prior-batchmean", "rsample_kl", (7, 13), (13,), (13,), (torch.bfloat16,) * 4,
     dict(reduction="batchmean"), False),
    ("fp16-mu-fp32-prior-none", "rsample_kl", (5, 6), (6,), (5, 6), (torch.float16, torch.float16, F32, F32),
     dict(reduction="none"), False),
    # float64 priors with bfloat16 mu: float64 gradients stored into bfloat16 (the interpreter's direct conversion
    # gave NaN: kernels._common.to_element)
    ("bf16-mu-fp64-prior-sum", "rsample_kl", (5, 8), (5, 8), (8,), (torch.bfloat16, torch.bfloat16, F64, F64),
     dict(reduction="sum", n_samples=2), False),
    ("fp64-per_sample-K2", "rsample_kl", (4, 6), (6,), (4, 1), (F64,) * 4,
     dict(reduction="per_sample", n_samples=2), False),
    ("float-priors-sum", "rsample_kl", (6, 5), 0.5, -1.0, (F32,) * 4, dict(reduction="sum"), False),
    ("1d-per_sample", "rsample_kl", (11,), (11,), (), (F32,) * 4, dict(reduction="per_sample"), False),
    ("0d-sum-K2", "rsample_kl", (), (), (), (F32,) * 4, dict(reduction="sum", n_samples=2), False),
    ("5d-fallback-layout-per_dim", "rsample_kl", (2, 3, 4, 5, 3), (3, 1, 5, 1), None, (F32,) * 4,
     dict(reduction="per_dim"), True),
    ("free-bits", "rsample_kl", (9, 4), None, None, (F32,) * 4, dict(free_bits=0.3), False),
    ("rsample-K4", "rsample", (5, 7), None, None, (F32,) * 4, dict(n_samples=4), False),
    ("rsample-transposed-bf16", "rsample", (6, 9), None, None, (torch.bfloat16,) * 4, dict(), True),
    ("kl_normal-prior-per_dim", "kl_normal", (8, 3, 5), (3, 5), (3, 1), (F32,) * 4, dict(reduction="per_dim"), False),
    ("kl_normal-fp64-none", "kl_normal", (4, 7), (7,), (4, 7), (F64,) * 4, dict(reduction="none"), False),
]


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values and shape, laid out with dim 0 innermost (non-contiguous)."""
    if t.dim() < 2:
        return t
    return t.transpose(0, -1).contiguous().transpose(0, -1)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_values_and_grads_match_the_float64_reference(gen, case):
    _, op, shape, pmu_shape, plv_shape, dtypes, kwargs, transpose = case
    mu = randn(gen, shape)
    lv = randn(gen, shape, scale=1.5)
    if transpose:
        mu, lv = _transposed(mu), _transposed(lv)
        assert mu.dim() < 2 or not mu.is_contiguous()
    priors = [
        randn(gen, s, scale=0.7) if isinstance(s, tuple) else s for s in (pmu_shape, plv_shape)
    ]
    compare_to_reference(gen, op, [mu, lv, *priors], dtypes, kwargs)


def test_forward_and_backward_may_tile_differently(gen, monkeypatch):
    """The noise is keyed by the logical index: grads are the same whatever tiling each pass uses."""
    mu, lv = randn(gen, (7, 13)).requires_grad_(), randn(gen, (7, 13)).requires_grad_()
    pmu, plv = randn(gen, (13,)).requires_grad_(), randn(gen, (7, 1)).requires_grad_()
    gz, gk = randn(gen, (2, 7, 13)), randn(gen, (13,))
    kw = dict(n_samples=2, seed=12345, offset=2**35 + 17, sample=True, kl=True, reduction="per_dim")

    def run(forward_tiling, backward_tiling):
        monkeypatch.setattr(ksample_kl, "TILING_OVERRIDE", forward_tiling)
        z, kl = ksample_kl.rsample_kl(mu, lv, pmu, plv, **kw)
        monkeypatch.setattr(ksample_kl, "TILING_OVERRIDE", backward_tiling)
        grads = torch.autograd.grad([z, kl], [mu, lv, pmu, plv], [gz, gk])
        return z, kl, grads

    z0, kl0, g0 = run(None, None)
    z1, kl1, g1 = run((2, 4, 2), (4, 2, 1))  # 8 and 14 programs, partial sums across programs
    assert torch.equal(z0, z1)
    assert torch.equal(g0[0], g1[0]) and torch.equal(g0[1], g1[1])  # elementwise: bitwise
    torch.testing.assert_close(kl0, kl1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g0[2], g1[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g0[3], g1[3], rtol=1e-6, atol=1e-6)
    with fv.use_backend("reference"):
        zr, klr = reference.rsample_kl(mu, lv, pmu, plv, **kw)
        gr = torch.autograd.grad([zr, klr], [mu, lv, pmu, plv], [gz, gk])
    torch.testing.assert_close(kl1, klr, rtol=1e-5, atol=1e-5)
    # dlogvar = sum over samples of sd dz eps / 2: on a GPU the FAST eps bound times sd |dz| (sd, |dz| up to ~4)
    atol = 1e-5 + 16 * FAST_EPS_ABS * 7
    for got, want in zip(g1, gr):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("reduction", ["sum", "per_sample", "per_dim", "none"])
def test_multi_program_reductions_match_the_reference(gen, monkeypatch, reduction):
    monkeypatch.setattr(ksample_kl, "TILING_OVERRIDE", (2, 4, 2))
    mu, lv = randn(gen, (9, 11)).float(), randn(gen, (9, 11)).float()
    pmu, plv = randn(gen, (9, 1)).float(), randn(gen, ()).float()
    kw = dict(n_samples=1, seed=5, offset=6, sample=False, kl=True, reduction=reduction)
    _, kl = ksample_kl.rsample_kl(mu, lv, pmu, plv, **kw)
    _, want = reference.rsample_kl(*(t.double() for t in (mu, lv, pmu, plv)), **kw)
    assert kl.shape == want.shape and kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Noise: seeds, bit-for-bit z, statistics
# ---------------------------------------------------------------------------------------------


def test_rsample_kl_z_equals_rsample_bit_for_bit_and_kl_equals_kl_normal(gen):
    mu, lv = randn(gen, (6, 10)).float(), randn(gen, (6, 10)).float()
    pmu, plv = randn(gen, (10,)).float(), randn(gen, (10,)).float()
    with fv.use_backend("triton"):
        for n_samples in (None, 3):
            torch.manual_seed(42)
            z_alone = fv.rsample(mu, lv, n_samples=n_samples)
            torch.manual_seed(42)
            z_fused, kl_fused = fv.rsample_kl(mu, lv, pmu, plv, n_samples=n_samples, reduction="none")
            assert torch.equal(z_alone, z_fused)
        assert torch.equal(kl_fused, fv.kl_normal(mu, lv, pmu, plv, reduction="none"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_z_equals_the_reference_z_within_a_few_ulps(gen, dtype):
    n_samples, shape = 3, (16, 24)
    mu, lv = randn(gen, shape).to(dtype), randn(gen, shape).to(dtype)
    g = torch.Generator(device=DEVICE)
    with fv.use_backend("triton"):
        z = fv.rsample_kl(mu, lv, n_samples=n_samples, generator=g.manual_seed(3))[0]
    with fv.use_backend("reference"):
        want = fv.rsample_kl(mu, lv, n_samples=n_samples, generator=g.manual_seed(3))[0]
    seed, offset = draw_seed_offset(g.manual_seed(3))
    radius = box_muller_radius(seed, offset, n_samples * mu.numel()).reshape(n_samples, *shape).to(DEVICE)
    # z = mu + sd * eps: a few ulps of |mu| + sd * max(1, radius); on a GPU (float32) the approximations' bound
    # on eps, and 4 more ulps of sd * radius for its exp (fastmath.exp_accurate_f32)
    sd = torch.exp(0.5 * lv.to(F64))
    scale = mu.abs().to(F64) + sd * radius.clamp(min=1.0)
    fast = sd * (FAST_EPS_ABS * (1.0 + radius) + (4 * eps_of(dtype) * radius if FAST_EPS_ABS else 0.0))
    fast = fast if dtype == torch.float32 else 0.0
    ulps = (((z - want).abs().to(F64) - fast).clamp(min=0.0) / (eps_of(dtype) * scale)).max().item()
    assert ulps <= 8.0, ulps


def test_seeds_reproducible_through_manual_seed_and_generator(gen):
    mu, lv = randn(gen, (5, 8)).float(), randn(gen, (5, 8)).float()
    with fv.use_backend("triton"):
        torch.manual_seed(0)
        a = fv.rsample(mu, lv)
        torch.manual_seed(0)
        b = fv.rsample(mu, lv)
        c = fv.rsample(mu, lv)
        assert torch.equal(a, b) and not torch.equal(b, c)
        state = torch.get_rng_state()
        d = fv.rsample(mu, lv, generator=torch.Generator(device=DEVICE).manual_seed(9))
        assert torch.equal(state, torch.get_rng_state())  # generator= leaves the global RNG alone
        e = fv.rsample(mu, lv, generator=torch.Generator(device=DEVICE).manual_seed(9))
        f = fv.rsample(mu, lv, generator=torch.Generator(device=DEVICE).manual_seed(10))
        assert torch.equal(d, e) and not torch.equal(e, f)


def test_noise_statistics():
    """eps = z for mu = 0, lv = 0: mean 0, variance 1, skew 0, kurtosis 3, independent across samples and elements."""
    shape, n_samples = (64, 256), 4
    zeros = torch.zeros(shape, device=DEVICE)
    with fv.use_backend("triton"):
        eps = fv.rsample(zeros, zeros, n_samples=n_samples, generator=torch.Generator(device=DEVICE).manual_seed(1))
    eps = eps.double().cpu()
    x = eps.flatten()
    n = x.numel()
    mean, var = x.mean().item(), x.var().item()
    standard = (x - mean) / var**0.5
    skew, kurtosis = (standard**3).mean().item(), (standard**4).mean().item()
    assert abs(mean) < 5 / n**0.5
    assert abs(var - 1) < 5 * (2 / n) ** 0.5
    assert abs(skew) < 5 * (6 / n) ** 0.5
    assert abs(kurtosis - 3) < 5 * (24 / n) ** 0.5
    per_sample = eps.reshape(n_samples, -1)
    m = per_sample.shape[1]
    correlation = torch.corrcoef(per_sample)
    off_diagonal = correlation[~torch.eye(n_samples, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 5 / m**0.5  # independent across samples
    neighbours = torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1].item()
    assert abs(neighbours) < 5 / n**0.5  # and across consecutive logical indices
    # uniform coverage: the probability integral transform of eps is uniform on (0, 1)
    pit = torch.special.ndtr(x)
    counts = torch.histc(pit, bins=16, min=0.0, max=1.0)
    expected = n / 16
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 50.0  # 15 degrees of freedom: p < 1e-5


# ---------------------------------------------------------------------------------------------
# Determinism, accuracy near collapse, extremes, empty tensors, the saved context
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "per_dim"])
def test_two_runs_bitwise_equal(gen, monkeypatch, reduction):
    monkeypatch.setattr(ksample_kl, "TILING_OVERRIDE", (2, 4, 2))
    leaves = [randn(gen, s).float().requires_grad_() for s in ((7, 13), (7, 13), (13,), ())]
    gz = randn(gen, (2, 7, 13)).float()

    def run():
        z, kl = ksample_kl.rsample_kl(*leaves, n_samples=2, seed=77, offset=88, sample=True, kl=True,
                                      reduction=reduction)
        gk = torch.full_like(kl, 0.37)
        return [z, kl, *torch.autograd.grad([z, kl], leaves, [gz, gk])]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_int64_index_path_gives_the_same_bits(gen, monkeypatch):
    """The 64-bit index math (taken where an offset may pass 2^31) gives the bits of the 32-bit one."""
    leaves = [randn(gen, s).float().requires_grad_() for s in ((6, 12), (6, 12), (12,), (6, 1))]
    gz = randn(gen, (2, 6, 12)).float()

    def run():
        z, kl = ksample_kl.rsample_kl(*leaves, n_samples=2, seed=5, offset=2**40 + 8, sample=True, kl=True,
                                      reduction="per_dim")
        return [z, kl, *torch.autograd.grad([z, kl], leaves, [gz, torch.full_like(kl, 0.5)])]

    narrow = run()
    monkeypatch.setattr(kcommon, "INT32_LIMIT", 1)
    for a, b in zip(narrow, run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("prior_logvar", [None, 0.3])
def test_kl_and_its_gradient_accurate_near_collapse(prior_logvar):
    """|d| from 1e-6 up through the series cutoff: relative error < 1e-5 in float32 (the textbook form has 100%)."""
    assert_kl_accurate_near_collapse(prior_logvar, DEVICE)


def test_finite_for_logvar_up_to_80(gen):
    assert_kl_finite_and_accurate_to_logvar_80(gen, DEVICE)


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0,)])
@pytest.mark.parametrize("reduction", ["none", "sum", "per_sample", "per_dim"])
def test_empty_tensors(shape, reduction):
    mu = torch.zeros(shape, device=DEVICE, requires_grad=True)
    lv = torch.zeros(shape, device=DEVICE, requires_grad=True)
    pmu = torch.zeros(shape[1:], device=DEVICE, requires_grad=True)
    kw = dict(n_samples=2, seed=1, offset=2, sample=True, kl=True, reduction=reduction)
    z, kl = ksample_kl.rsample_kl(mu, lv, pmu, None, **kw)
    z_ref, kl_ref = reference.rsample_kl(mu, lv, pmu, None, **kw)
    assert z.shape == z_ref.shape == (2, *shape) and z.dtype == z_ref.dtype
    assert kl.shape == kl_ref.shape and kl.dtype == kl_ref.dtype
    assert torch.equal(kl, kl_ref)
    grads = torch.autograd.grad([z.sum(), kl.sum()], [mu, lv, pmu], allow_unused=True)
    for g, t in zip(grads, (mu, lv, pmu)):
        assert g is None or (g.shape == t.shape and not g.any())


def test_context_keeps_the_inputs_and_the_key_only(gen):
    leaves = [randn(gen, (4, 6)).float().requires_grad_() for _ in range(2)]
    key = fv.seeding.key_from_ints(11, 12, DEVICE)
    z, _ = ksample_kl.rsample_kl(*leaves, None, None, n_samples=3, key=key, sample=True, kl=True, reduction="sum")
    saved = [t for t in z.grad_fn.saved_tensors if t is not None]
    assert len(saved) == 3
    assert all(any(s.data_ptr() == leaf.data_ptr() for leaf in leaves) for s in saved[:2])
    assert saved[2].data_ptr() == key.data_ptr() and saved[2].numel() * saved[2].element_size() == 16
    assert all(s.numel() < z.numel() for s in saved)


def test_bad_input_raises_before_any_kernel_launch(monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel launched on bad input")

    monkeypatch.setattr(ksample_kl, "sample_kl_forward", no_launch)
    mu = torch.zeros(3, 4, device=DEVICE)
    with fv.use_backend("triton"):
        with pytest.raises(ValueError, match="logvar"):
            fv.rsample_kl(mu, torch.zeros(3, 5, device=DEVICE))
        with pytest.raises(ValueError, match="prior_mu"):
            fv.kl_normal(mu, mu, torch.zeros(5, device=DEVICE))
        with pytest.raises(ValueError, match="n_samples"):
            fv.rsample(mu, mu, n_samples=0)
        with pytest.raises(ValueError, match="reduction"):
            fv.kl_normal(mu, mu, reduction="avg")
