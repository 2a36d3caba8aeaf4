"""The Gaussian NLL Triton kernels against the float64 reference (Triton's interpreter without a GPU).

Each check runs one public call three times: on the Triton backend and on the eager reference in the
input dtype, and on the reference in float64 with the same (rounded) inputs. The kernels pass when
their error against float64 is at most twice the eager reference's plus a small atol, for the value
and for the gradient of every input, under a random grad_output (elementwise for ``"none"``). Every
buffer the kernels write (outputs, gradients, partial sums) starts filled with NaN, so an unwritten
element fails.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before triton is imported (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedvae as fv  # noqa: E402
from fusedvae.testing import assert_within_twice_eager  # noqa: E402

# the module, not the function that fusedvae.kernels re-exports under the same name
kgnll = importlib.import_module("fusedvae.kernels.gaussian_nll")
kcommon = importlib.import_module("fusedvae.kernels._common")
ksse = importlib.import_module("fusedvae.kernels.sum_squared_error")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
REDUCTIONS = ("none", "sum", "mean", "batchmean", "per_sample")


@pytest.fixture(autouse=True)
def _nan_filled_buffers(nan_filled_outputs):
    """Every buffer the kernels write starts as NaN (conftest's ``nan_filled_outputs``)."""


def randn(gen, shape, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen, dtype=F64) * scale + shift).to(DEVICE)


# ---------------------------------------------------------------------------------------------
# One call on a backend, and the 2x-eager bound
# ---------------------------------------------------------------------------------------------


def run(backend, fn, inputs, dtype, grad_out, views=None):
    """``fn(**inputs)`` on ``backend``; tensor inputs cast to ``dtype`` (their own dtype if a dict) as leaves.

    ``views`` maps an input name to a function applied to its leaf before the call (a non-contiguous
    view with the same values, say). Returns the output and the gradients of the leaves that
    require grad (in ``inputs`` order), under grad_output ``grad_out(output)``.
    """
    views = views or {}
    leaves, args = [], {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            leaf = value.detach().to(dtype[name] if isinstance(dtype, dict) else dtype)
            leaf.requires_grad_(value.requires_grad)
            if value.requires_grad:
                leaves.append(leaf)
            value = views.get(name, lambda t: t)(leaf)
        args[name] = value
    with fv.use_backend(backend):
        out = fn(**args)
    grads = torch.autograd.grad(out, leaves, grad_out(out).to(out.dtype)) if leaves else ()
    return [out.detach()] + [g.detach() for g in grads]


def check(fn, inputs, dtype, gen, views=None, atol_eps=8.0):
    """The Triton backend within 2x the eager reference's error (plus atol) of float64, value and grads."""
    low = {n: (v.detach().to(dtype[n] if isinstance(dtype, dict) else dtype) if isinstance(v, torch.Tensor) else v)
           for n, v in inputs.items()}
    exact_inputs = {n: (v.to(F64).requires_grad_(inputs[n].requires_grad) if isinstance(v, torch.Tensor) else v)
                    for n, v in low.items()}
    seeds = {}

    def grad_out(out):
        if "g" not in seeds:  # one random grad_output shared by the three runs: not 1, elementwise for "none"
            seeds["g"] = (torch.rand(out.shape, generator=gen, dtype=F64) * 1.5 + 0.25).to(DEVICE)
        return seeds["g"]

    kernel = run("triton", fn, inputs, dtype, grad_out, views)
    eager = run("reference", fn, inputs, dtype, grad_out)
    exact = run("reference", fn, exact_inputs, F64, grad_out)
    names = ["value"] + [n for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    out_dtype = eager[0].dtype
    for name, k, e, x in zip(names, kernel, eager, exact):
        assert_within_twice_eager(name, k, e, x, out_dtype if name == "value" else e.dtype, atol_eps)
    return kernel


def nll(x, mean, log_sigma, reduction, full=True):
    return fv.gaussian_nll(x, mean, log_sigma, reduction=reduction, full=full)


# ---------------------------------------------------------------------------------------------
# gaussian_nll: every log_sigma broadcast, every reduction
# ---------------------------------------------------------------------------------------------

SHAPE = (3, 5, 4, 7)  # B, C, H, W: odd sizes
SIGMA_SHAPES = {
    "float": None,
    "0-dim": (),
    "per-channel (C,1,1)": (5, 1, 1),
    "per-channel (1,C,1,1)": (1, 5, 1, 1),
    "per-sample (B,1,1,1)": (3, 1, 1, 1),
    "per-element": SHAPE,
    "per-width (W,)": (7,),
    "alternating (B,1,H,1)": (3, 1, 4, 1),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("sigma", list(SIGMA_SHAPES))
def test_gaussian_nll_broadcasts_and_reductions(sigma, reduction, gen):
    x = randn(gen, SHAPE).requires_grad_()
    mean = randn(gen, SHAPE).requires_grad_()
    shape = SIGMA_SHAPES[sigma]
    log_sigma = 0.3 if shape is None else randn(gen, shape, 0.5).requires_grad_()
    full = reduction != "sum"
    check(nll, {"x": x, "mean": mean, "log_sigma": log_sigma, "reduction": reduction, "full": full},
          torch.float32, gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "batchmean", "per_sample"])
@pytest.mark.parametrize("sigma_shape", [(3, 1, 1), (2, 3, 5, 9)])
def test_gaussian_nll_dtypes(dtype, reduction, sigma_shape, gen):
    x = randn(gen, (2, 3, 5, 9)).requires_grad_()
    mean = randn(gen, (2, 3, 5, 9)).requires_grad_()
    log_sigma = randn(gen, sigma_shape, 0.3).requires_grad_()
    out = check(nll, {"x": x, "mean": mean, "log_sigma": log_sigma, "reduction": reduction}, dtype, gen)
    assert [t.dtype for t in out] == [dtype] * 4  # the public op returns the input dtype, as torch does


@pytest.mark.parametrize("sigma_dtype", [torch.float32, torch.float64])
def test_gaussian_nll_mixed_dtypes(gen, sigma_dtype):
    """bf16 data with a float32 (float64) σ parameter: result dtype float32 (float64), each gradient in its input's
    dtype (float64 gradients stored into bfloat16: the interpreter's direct conversion gave zeros, _common.to_element)."""
    x = randn(gen, (2, 3, 4, 5)).requires_grad_()
    mean = randn(gen, (2, 3, 4, 5)).requires_grad_()
    log_sigma = randn(gen, (3, 1, 1), 0.3).requires_grad_()
    dtypes = {"x": torch.bfloat16, "mean": torch.bfloat16, "log_sigma": sigma_dtype}
    out = check(nll, {"x": x, "mean": mean, "log_sigma": log_sigma, "reduction": "none"}, dtypes, gen)
    assert [t.dtype for t in out] == [sigma_dtype, torch.bfloat16, torch.bfloat16, sigma_dtype]


def _strided_copy(t):  # same values, transposed memory layout
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _padded(t):  # same values, every row a slice of a wider buffer
    return torch.cat([t, torch.zeros_like(t)], dim=-1)[..., : t.shape[-1]]


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "decoder-chunk"])
def test_gaussian_nll_non_contiguous(layout, gen):
    shape = (3, 4, 5, 6)
    x = randn(gen, shape).requires_grad_()
    mean = randn(gen, shape).requires_grad_()
    if layout == "decoder-chunk":  # mean and a per-element log_sigma are the halves of one output
        log_sigma = randn(gen, shape, 0.5).requires_grad_()
        views = {"mean": lambda m: torch.cat([m, m], 1)[:, :4], "log_sigma": lambda s: torch.cat([s, s], 1)[:, 4:]}
    else:
        log_sigma = randn(gen, (4, 1, 1), 0.5).requires_grad_()
        view = {"transposed": _strided_copy, "sliced": _padded,
                "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last)}[layout]
        views = {"x": view, "mean": _padded if layout == "transposed" else view}
    for reduction in ("none", "sum"):
        check(nll, {"x": x, "mean": mean, "log_sigma": log_sigma, "reduction": reduction}, torch.float32, gen,
              views=views)


def test_gaussian_nll_expanded_grad_output(gen):
    """``"none"`` then ``.sum()``: the grad_output reaching the kernel is an expanded (stride 0) tensor."""
    x, mean, s = randn(gen, (4, 6, 5)), randn(gen, (4, 6, 5)), randn(gen, (6, 1), 0.5)
    grads = []
    for backend in ("triton", "reference"):
        m, ls = mean.clone().requires_grad_(), s.clone().requires_grad_()
        with fv.use_backend(backend):
            (fv.gaussian_nll(x, m, ls, reduction="none").sum() * 0.75).backward()
        grads.append((m.grad, ls.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_gaussian_nll_rank7_fallback(gen):
    """σ alternating broadcast / non-broadcast four times: the documented materialising fallback, still exact."""
    shape = (2, 3, 2, 3, 2, 3, 2)
    x = randn(gen, shape).requires_grad_()
    mean = randn(gen, shape).requires_grad_()
    log_sigma = randn(gen, (2, 1, 2, 1, 2, 1, 2), 0.5).requires_grad_()
    for reduction in ("none", "sum", "per_sample"):
        check(nll, {"x": x, "mean": mean, "log_sigma": log_sigma, "reduction": reduction}, torch.float32, gen)


def test_gaussian_nll_int64_index_path(gen, monkeypatch):
    """The 64-bit index math (taken for tensors past 2^31 elements) gives the same bits on small ones."""
    x, mean = randn(gen, (3, 5, 33)), randn(gen, (3, 5, 33))
    s = randn(gen, (5, 1), 0.5)

    def once():
        m, ls = mean.clone().requires_grad_(), s.clone().requires_grad_()
        with fv.use_backend("triton"):
            out = fv.gaussian_nll(x, m, ls, reduction="per_sample")
            out.backward(torch.linspace(0.5, 1.5, 3, dtype=F64, device=out.device))
        return out, m.grad, ls.grad

    narrow = once()
    monkeypatch.setattr(kcommon, "INT32_LIMIT", 1)
    wide = once()
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Edge cases: empty tensors, |log_sigma| up to 80, determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4)])
def test_gaussian_nll_empty(shape):
    x = torch.randn(shape, device=DEVICE)
    mean = torch.randn(shape, device=DEVICE, requires_grad=True)
    log_sigma = torch.zeros(3 if shape[1] == 3 else 1, 1, device=DEVICE).requires_grad_()
    for reduction in REDUCTIONS:
        outs = []
        for backend in ("triton", "reference"):
            with fv.use_backend(backend):
                out = fv.gaussian_nll(x, mean, log_sigma, reduction=reduction)
                outs.append((out, *torch.autograd.grad(out.sum(), (mean, log_sigma))))
        for a, b in zip(*outs):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, equal_nan=True)


def test_gaussian_nll_empty_var_and_sse():
    x = torch.randn(0, 5, device=DEVICE, requires_grad=True)
    with fv.use_backend("triton"):
        assert fv.gaussian_nll_loss(x, x.detach(), torch.ones(0, 5, device=DEVICE), reduction="sum").item() == 0.0
        assert fv.gaussian_nll_loss(x, x.detach(), 1.0, reduction="none").shape == (0, 5)
        out = fv.gaussian_nll_optimal(x, torch.zeros(0, 5, device=DEVICE), reduction="sum")
        assert out.shape == ()


@pytest.mark.parametrize("fast", [False, pytest.param(True, marks=pytest.mark.skipif(
    not kgnll.fastmath.EMULATED, reason="the FAST path is emulated under TRITON_INTERPRET=1"))])
def test_gaussian_nll_extreme_log_sigma(fast, gen, monkeypatch):
    """|s| up to 80 in float32: r is formed before squaring, so nothing overflows where the truth is finite.

    ``fast``: the FAST path emulated (a per-element σ's exp is ``exp_accurate``'s ex2.approx form there).
    """
    if fast:
        monkeypatch.setattr(kgnll.fastmath, "is_fast", lambda t: True)
    s = torch.tensor([-80.0, -40.0, -1.0, 0.0, 1.0, 40.0, 80.0], dtype=F64).repeat(3).reshape(3, 7).to(DEVICE)
    u = randn(gen, (3, 7))
    x = (u * torch.exp(s)).float().double()  # x - mean = sigma * u: r = u is O(1)
    mean = torch.zeros_like(x)
    for reduction in ("none", "sum", "per_sample"):
        out = check(nll, {"x": x.clone().requires_grad_(), "mean": mean.clone().requires_grad_(),
                          "log_sigma": s.clone().requires_grad_(), "reduction": reduction},
                    torch.float32, gen)
        for t in out:
            assert torch.isfinite(t).all()


def test_gaussian_nll_extreme_scalar_log_sigma(gen):
    for value in (-80.0, 80.0):
        x = (randn(gen, (4, 9)) * math.exp(value)).float().double()
        out = check(nll, {"x": x, "mean": torch.zeros_like(x).requires_grad_(),
                          "log_sigma": torch.tensor(value, dtype=F64, device=DEVICE).requires_grad_(),
                          "reduction": "batchmean"}, torch.float32, gen)
        assert all(torch.isfinite(t).all() for t in out)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on exp overflow and log(0)
def test_exp_and_log_helpers_match_float64():
    """The libdevice-free float32 exp / log used on every device: about 1 ulp over their whole range."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, e_ptr, l_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=1.0)
        tl.store(e_ptr + offs, kcommon.exp_f32(x), mask=offs < n)
        tl.store(l_ptr + offs, kcommon.log_f32(tl.abs(x)), mask=offs < n)

    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, 1e-7, -1e-7, 1.0 + 2**-23, 1.0 - 2**-24, 1e-40, 3e38, math.inf, -math.inf, math.nan])
    x = torch.cat([torch.rand(12000, generator=g, dtype=F64) * 194 - 105,  # exp over its range
                   torch.exp(torch.rand(12000, generator=g, dtype=F64) * 174 - 87),  # log over its range
                   1 + (torch.rand(4000, generator=g, dtype=F64) - 0.5) * 0.1,  # log near 1
                   special.double()]).float().to(DEVICE)
    e, log = torch.empty_like(x), torch.empty_like(x)
    kernel[(triton.cdiv(x.numel(), 4096),)](x, e, log, x.numel(), BLOCK=4096)
    e_true, l_true = torch.exp(x.double()), torch.log(x.double().abs())

    def ulps(got, want):
        ulp = torch.finfo(torch.float32).eps * torch.exp2(torch.floor(torch.log2(want.abs())))
        return ((got.double() - want) / ulp).abs()

    normal = (e_true > 1.2e-38) & (e_true < 3.4e38)
    assert ulps(e, e_true)[normal].max().item() < 1.5
    assert torch.equal(torch.isinf(e), torch.isinf(e_true.float())) and (e[x < -104] == 0).all()
    finite = torch.isfinite(l_true) & (l_true != 0)
    assert ulps(log, l_true)[finite].max().item() < 1.0
    assert torch.equal(log[~finite & ~torch.isnan(x)], l_true.float()[~finite & ~torch.isnan(x)])
    assert torch.isnan(e[torch.isnan(x)]).all() and torch.isnan(log[torch.isnan(x)]).all()


@pytest.mark.parametrize("tile, width", [(1024, 132), (128, 40)])
@pytest.mark.parametrize("sigma", ["scalar", "per-channel", "per-width", "per-element"])
def test_gaussian_nll_bitwise_deterministic(sigma, tile, width, gen, monkeypatch):
    """Several programs, r-chunks and loop iterations: two runs give the same bits, and the right values.

    The small tile splits even a (4, 5, 40) tensor into several chunks and iterations per program.
    """
    monkeypatch.setattr(kcommon, "BROADCAST_TILE", tile)
    shape = (4, 5, width)
    x, mean = randn(gen, shape).float(), randn(gen, shape).float()
    sigma_shape = {"scalar": (), "per-channel": (5, 1), "per-width": (1, width), "per-element": shape}[sigma]
    s = randn(gen, sigma_shape, 0.5).float()
    weights = torch.linspace(0.1, 1.0, 4, device=DEVICE)
    results = []
    for backend in ("triton", "triton", "reference"):
        m, ls = mean.clone().requires_grad_(), s.clone().requires_grad_()
        with fv.use_backend(backend):
            total = fv.gaussian_nll(x, m, ls, reduction="batchmean")
            per = fv.gaussian_nll(x, m, ls, reduction="per_sample")
            none = fv.gaussian_nll(x, m, ls, reduction="none")
            (total * 0.3 + (per * weights).sum() + (none * 0.01).sum()).backward()
        results.append((total, per, none, m.grad, ls.grad))
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    for a, b in zip(results[0], results[2]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_gaussian_nll_zero_dim(gen):
    x, mean, s = randn(gen, ()).requires_grad_(), randn(gen, ()).requires_grad_(), randn(gen, ()).requires_grad_()
    for reduction in ("none", "sum", "mean"):
        check(nll, {"x": x, "mean": mean, "log_sigma": s, "reduction": reduction}, torch.float32, gen)


# ---------------------------------------------------------------------------------------------
# Optimal σ: gaussian_nll_optimal and optimal_log_sigma (sum_squared_error)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("min_log_sigma", [None, -6.0, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "none", "per_sample"])
def test_gaussian_nll_optimal(per_sample, min_log_sigma, reduction, gen):
    x = randn(gen, (3, 2, 5, 7)).requires_grad_()
    mean = randn(gen, (3, 2, 5, 7)).requires_grad_()
    if reduction == "per_sample" and min_log_sigma == -6.0:
        x = torch.cat([x[:1] * 5, x[1:]]).detach().requires_grad_()  # samples with different SSE

    def fn(x, mean):
        return fv.gaussian_nll_optimal(x, mean, per_sample=per_sample, min_log_sigma=min_log_sigma,
                                       reduction=reduction)

    check(fn, {"x": x, "mean": mean}, torch.float32, gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_gaussian_nll_optimal_dtypes(dtype, gen):
    x = randn(gen, (4, 3, 11)).requires_grad_()
    mean = randn(gen, (4, 3, 11)).requires_grad_()

    def fn(x, mean):
        return fv.gaussian_nll_optimal(x, mean, per_sample=True, reduction="sum")

    check(fn, {"x": x, "mean": mean}, dtype, gen)


@pytest.mark.parametrize("per_sample", [False, True])
def test_optimal_log_sigma(per_sample, gen):
    x, mean = randn(gen, (5, 3, 7)), randn(gen, (5, 3, 7))
    for min_log_sigma in (None, -6.0):
        with fv.use_backend("triton"):
            got = fv.optimal_log_sigma(x.float(), mean.float(), per_sample=per_sample, min_log_sigma=min_log_sigma)
        with fv.use_backend("reference"):
            want = fv.optimal_log_sigma(x, mean, per_sample=per_sample, min_log_sigma=min_log_sigma)
        assert got.dtype == torch.float32 and got.shape == ((5,) if per_sample else ())
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_sum_squared_error_backend_entry(gen):
    """The backend function itself: shapes, compute dtype, and gradients in x and mean."""
    from fusedvae import reference

    x = randn(gen, (3, 4, 5)).float().requires_grad_()
    mean = randn(gen, (3, 4, 5)).float().requires_grad_()
    for per_sample in (False, True):
        got = ksse.sum_squared_error(x, mean, per_sample=per_sample)
        want = reference.sum_squared_error(x, mean, per_sample=per_sample)
        torch.testing.assert_close(got, want)
        g = torch.rand(want.shape, dtype=torch.float32, device=DEVICE) + 0.5
        torch.testing.assert_close(torch.autograd.grad(got, (x, mean), g), torch.autograd.grad(want, (x, mean), g))


# ---------------------------------------------------------------------------------------------
# gaussian_nll_loss: torch.nn.functional.gaussian_nll_loss's drop-in
# ---------------------------------------------------------------------------------------------

VAR_CASES = {
    "full": ((6, 5), (6, 5)),
    "var (B,1)": ((6, 5), (6, 1)),
    "var (B,) one dim short": ((6, 5), (6,)),
    "float var": ((6, 5), None),
    "heteroscedastic one dim short of input": ((2, 3, 4, 5), (2, 1, 4, 5)),
    "1-D": ((7,), (7,)),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(VAR_CASES))
def test_gaussian_nll_loss_matches_torch(case, reduction, gen):
    shape, var_shape = VAR_CASES[case]
    full = case in ("full", "1-D")
    input = randn(gen, shape).requires_grad_()
    target = randn(gen, shape).requires_grad_()
    if var_shape is None:
        var = 0.7
    else:
        var = (torch.rand(var_shape, generator=gen, dtype=F64).to(DEVICE) + 0.1)
        if case == "full":  # entries below eps: clamped, the clamp invisible to autograd
            var[0, :3] = torch.tensor([1e-9, 0.0, 5e-7])
        var.requires_grad_()
    inputs = {"input": input, "target": target, "var": var}
    want_grad = [n for n, v in inputs.items() if isinstance(v, torch.Tensor)]

    def run_torch(dtype):
        args = {n: (v.detach().to(dtype).requires_grad_() if isinstance(v, torch.Tensor) else v) for n, v in inputs.items()}
        out = F.gaussian_nll_loss(args["input"], args["target"], args["var"], full=full, reduction=reduction)
        return out, args

    g = (torch.rand(run_torch(F64)[0].shape, generator=gen, dtype=F64) + 0.5).to(DEVICE)
    results = {}
    for name, dtype in (("exact", F64), ("eager", torch.float32)):
        out, args = run_torch(dtype)
        results[name] = [out.detach()] + list(torch.autograd.grad(out, [args[n] for n in want_grad], g.to(dtype)))
    args = {n: (v.detach().float().requires_grad_() if isinstance(v, torch.Tensor) else v) for n, v in inputs.items()}
    with fv.use_backend("triton"):
        out = fv.gaussian_nll_loss(args["input"], args["target"], args["var"], full=full, reduction=reduction)
    kernel = [out.detach()] + list(torch.autograd.grad(out, [args[n] for n in want_grad], g.float()))
    for what, k, e, x in zip(["value"] + want_grad, kernel, results["eager"], results["exact"]):
        assert_within_twice_eager(what, k, e, x, torch.float32)


@pytest.mark.parametrize("reduction", ["batchmean", "per_sample"])
def test_gaussian_nll_loss_fusedvae_reductions(reduction, gen):
    input = randn(gen, (4, 3, 5)).requires_grad_()
    target = randn(gen, (4, 3, 5)).requires_grad_()
    var = (torch.rand((3, 1), generator=gen, dtype=F64).to(DEVICE) + 0.2).requires_grad_()

    def fn(input, target, var):
        return fv.gaussian_nll_loss(input, target, var, full=True, reduction=reduction)

    check(fn, {"input": input, "target": target, "var": var}, torch.float32, gen)


def test_gaussian_nll_loss_broadcast_target(gen):
    """A target that broadcasts to input: its gradient is summed over the broadcast positions."""
    input = randn(gen, (4, 6)).requires_grad_()
    target = randn(gen, (1, 6)).requires_grad_()
    var = (torch.rand((4, 1), generator=gen, dtype=F64).to(DEVICE) + 0.2).requires_grad_()

    def fn(input, target, var):
        return fv.gaussian_nll_loss(input, target, var, reduction="sum")

    check(fn, {"input": input, "target": target, "var": var}, torch.float32, gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_gaussian_nll_loss_dtypes(dtype, gen):
    input = randn(gen, (5, 8)).requires_grad_()
    target = randn(gen, (5, 8)).requires_grad_()
    var = (torch.rand((5, 8), generator=gen, dtype=F64).to(DEVICE) + 0.2).requires_grad_()

    def fn(input, target, var):
        return fv.gaussian_nll_loss(input, target, var, reduction="none")

    check(fn, {"input": input, "target": target, "var": var}, dtype, gen)


@pytest.mark.parametrize("eps, full", [(1.5, False), (1e-6, True)])
def test_gaussian_nll_loss_per_element_var_sum_masked_lanes(eps, full, gen):
    """A per-element variance is read in the tile loop; masked lanes add nothing, with or without their select."""
    input, target = randn(gen, (6, 37)).requires_grad_(), randn(gen, (6, 37)).requires_grad_()
    var = (torch.rand((6, 37), generator=gen, dtype=F64).to(DEVICE) * 3 + 0.1).requires_grad_()

    def fn(input, target, var):
        return fv.gaussian_nll_loss(input, target, var, full=full, eps=eps, reduction="sum")

    check(fn, {"input": input, "target": target, "var": var}, torch.float32, gen)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on the inf lane
def test_clamped_variance_log_within_1_1_ulp():
    """The variance log without special cases (the FAST path's, here with a plain division): <= 1.1 ulp, log(1) = 0.

    log(1) must be exactly 0: a masked lane (v = 1, d = 0) then adds exactly 0 to a sum without a select.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=1.0)
        tl.store(y_ptr + offs, kgnll._log_clamped_f32(x, False), mask=offs < n)

    g = torch.Generator().manual_seed(1)
    special = torch.tensor([2.0**-126, 1.0, 2.0, 0.5, 1.4142135, 1.4142137, 0.70710677, 0.7071068, 3.4028235e38,
                            1.0 - 2**-24, 1.0 + 2**-23, 1e-6, math.inf], dtype=F64)
    x = torch.cat([torch.rand(16000, generator=g, dtype=F64).add(1.0) * torch.exp2(  # every binade
                       torch.randint(-126, 128, (16000,), generator=g).double()),
                   1 + (torch.rand(4000, generator=g, dtype=F64) - 0.5) * 2.0**-6,  # near 1
                   special]).float().to(DEVICE)
    y = torch.empty_like(x)
    kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    want = torch.log(x.double())
    finite = torch.isfinite(want) & (want != 0)
    ulp = torch.finfo(torch.float32).eps * torch.exp2(torch.floor(torch.log2(want[finite].abs())))
    err = ((y[finite].double() - want[finite]) / ulp).abs()
    assert err.max().item() <= 1.1, err.max().item()
    assert y[x == 1.0].eq(0.0).all() and y[x == math.inf].eq(math.inf).all()


_FAST_COMPILE = r"""
import json, torch
from bench.static.capture import cuda_like, intercept
from fusedvae.kernels import gaussian_nll_var
out = {}
with intercept(90, compile=True) as rec:
    for name, var_shape, eps in (("per-element", (64, 3, 32, 32), 1e-6), ("per-channel", (1, 3, 1, 1), 1e-6),
                                 ("eps0", (64, 3, 32, 32), 0.0), ("channels-last", (1, 3, 1, 1), 1e-6)):
        x, t = cuda_like(torch.empty(64, 3, 32, 32, requires_grad=True)), cuda_like(torch.empty(64, 3, 32, 32))
        if name == "channels-last":
            x, t = (u.contiguous(memory_format=torch.channels_last) for u in (x, t))
        var = cuda_like(torch.empty(var_shape, requires_grad=True))
        rec.launches = []
        loss = gaussian_nll_var(x, t, var, full=False, eps=eps, reduction="sum")
        torch.autograd.graph._engine_run_backward((loss,), (torch.ones(()),), False, False, (x, var), True, False)
        out[name] = [(l.key, l.compiled.asm["ptx"]) for l in rec.launches]
print(json.dumps(out))
"""


def test_fast_path_compiles_to_hardware_approximations():
    """On a CUDA float32 launch (compiled for sm_90 with a stub driver) the variance form divides by rcp.approx.

    No IEEE division (``div.rn``, its slow path) and no approximate-division sequence (``div.full``) is left
    in the forward or backward kernel; a per-element variance is read in the tile loop (``V_FULL``). With
    ``eps = 0`` a variance may be 0 or subnormal, where ``rcp.approx.ftz`` flushes: the exact path stays.
    """
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", _FAST_COMPILE], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launches = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("per-element", "per-channel", "channels-last"):
        assert len(launches[name]) == 2, [k for k, _ in launches[name]]  # forward and backward
        for key, ptx in launches[name]:
            assert "('FAST', True)" in key, key
            assert "rcp.approx.ftz.f32" in ptx, key
            assert "div.rn.f32" not in ptx and "div.full.f32" not in ptx and "lg2.approx" not in ptx, key
    forward_key = launches["per-element"][0][0]
    assert "_gaussian_nll_fwd_kernel" in forward_key and "('V_FULL', True)" in forward_key, forward_key
    assert "_gaussian_nll_fwd_interleaved_kernel" in launches["channels-last"][0][0]
    assert "_gaussian_nll_bwd_interleaved_kernel" in launches["channels-last"][1][0]
    for key, ptx in launches["eps0"]:
        assert "('FAST', False)" in key and "div.rn.f32" in ptx, key


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "rank 7"])
def test_per_element_operand_fakes_match_the_kernels(layout, gen):
    """A per-element σ / variance changes the forward's plan (a full operand): the fakes follow the same plan."""
    shape = (2, 3, 1, 2, 3, 2, 2) if layout == "rank 7" else (3, 4, 5)
    x, m, s = (randn(gen, shape).float() for _ in range(3))
    if layout == "transposed":
        x, s = x.transpose(0, 2), s.transpose(0, 2)
        m = m.transpose(0, 2).contiguous()
    elif layout == "rank 7":
        x = x.permute(6, 5, 4, 3, 2, 1, 0).contiguous().permute(6, 5, 4, 3, 2, 1, 0)
    var = s.abs() + 0.1
    for op, args in ((torch.ops.fusedvae.gaussian_nll_forward, (x, m, s, True, "none")),
                     (torch.ops.fusedvae.gaussian_nll_var_forward, (x, m, var, False, 1e-6, "none")),
                     (torch.ops.fusedvae.gaussian_nll_var_forward, (x, m, var, True, 1e-6, "sum"))):
        torch.library.opcheck(op, args, test_utils=("test_faketensor",))


def _memory_reversed(t):
    """``t``'s values with its dims reversed in memory (every dim non-mergeable in logical order)."""
    dims = tuple(range(t.dim()))[::-1]
    return t.permute(dims).contiguous().permute(dims)


@pytest.mark.parametrize("case", ["rank 7 alternating σ", "channels_last per-channel var", "channels_last per-element var"])
def test_operands_seen_in_memory_order(case, gen):
    """The kernels see every operand through ``x``'s memory order: values, gradients and output strides unchanged.

    Rank 7 with σ alternating four times also takes the materialising fallback, in the permuted order.
    """
    if case == "rank 7 alternating σ":
        shape = (2, 3, 2, 3, 2, 3, 2)
        inputs = {"x": randn(gen, shape).requires_grad_(), "mean": randn(gen, shape).requires_grad_(),
                  "log_sigma": randn(gen, (2, 1, 2, 1, 2, 1, 2), 0.5).requires_grad_()}
        views = {"x": _memory_reversed, "mean": _memory_reversed}
        for reduction in ("none", "sum", "per_sample"):
            out = check(nll, {**inputs, "reduction": reduction}, torch.float32, gen, views=views)
            if reduction == "none":
                assert out[0].stride() == _memory_reversed(torch.empty(shape)).stride()
        return
    shape = (3, 4, 5, 6)
    var_shape = (4, 1, 1) if "per-channel" in case else shape
    inputs = {"input": randn(gen, shape).requires_grad_(), "target": randn(gen, shape).requires_grad_(),
              "var": (torch.rand(var_shape, generator=gen, dtype=F64).to(DEVICE) + 0.1).requires_grad_()}
    cl = lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t  # noqa: E731
    for reduction in ("none", "sum", "batchmean"):
        def fn(input, target, var, reduction=reduction):
            return fv.gaussian_nll_loss(input, target, var, reduction=reduction)

        out = check(fn, inputs, torch.float32, gen, views={"input": cl, "target": cl, "var": cl})
        if reduction == "none":
            assert out[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_per_element_sigma_gradient_follows_x_layout(layout, gen):
    """A per-element σ's gradient is written in x's memory order (no copy); the fake backward says the same."""
    shape = (2, 3, 4, 5)
    x, m, s = (randn(gen, shape).float() for _ in range(3))
    if layout == "channels_last":
        x, s = (t.contiguous(memory_format=torch.channels_last) for t in (x, s))
    else:
        x, s = (t.transpose(1, 3).contiguous().transpose(1, 3) for t in (x, s))
    g = torch.rand(shape, generator=gen, dtype=F64).float().to(DEVICE)
    args = (g, x, m, s, "none", True, True, True)
    torch.library.opcheck(torch.ops.fusedvae.gaussian_nll_backward, args, test_utils=("test_faketensor",))
    ds = torch.ops.fusedvae.gaussian_nll_backward(*args)[2]
    assert ds.stride() == x.stride()
    var = s.abs() + 0.1
    args = (g, x, m, var, 1e-6, "none", True, True, True)
    torch.library.opcheck(torch.ops.fusedvae.gaussian_nll_var_backward, args, test_utils=("test_faketensor",))
    assert torch.ops.fusedvae.gaussian_nll_var_backward(*args)[2].stride() == x.stride()


_KERNELS = ("_gaussian_nll_fwd_kernel", "_gaussian_nll_fwd_interleaved_kernel", "_gaussian_nll_bwd_kernel",
            "_gaussian_nll_bwd_interleaved_kernel")


def _spy_launches(monkeypatch) -> list[str]:
    """The names of the Gaussian-NLL kernels launched from now on, in order."""
    launched = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    for name in _KERNELS:
        monkeypatch.setattr(kgnll, name, Spy(name, getattr(kgnll, name)))
    return launched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels, sigma", [(3, "per-channel"), (3, "per-sample-channel"), (4, "per-channel"),
                                              (5, "per-channel"), (6, "per-sample-channel")])
def test_channels_last_per_channel_sigma_interleaved(channels, sigma, dtype, gen, monkeypatch):
    """Channels-last x with σ / var per channel runs the interleaved kernels (the channel innermost in memory).

    Tile 128 lanes (float64 takes half the tile): several tiles per program, a partial last tile, and (C = 3,
    5, 6) the lanes past the step idle. Values and gradients within 2x eager for every reduction, two runs
    bitwise equal, "none" channels-last. The backward is interleaved too, except under "none" with this
    test's contiguous grad_output (tiled).
    """
    monkeypatch.setattr(kcommon, "BROADCAST_TILE", 256 if dtype == F64 else 128)
    launched = _spy_launches(monkeypatch)
    grids = []
    real = kgnll._interleaved
    monkeypatch.setattr(kgnll, "_interleaved", lambda *args: grids.append(real(*args)) or grids[-1])
    shape = (3, channels, 9, 11)
    small = (channels, 1, 1) if sigma == "per-channel" else (3, channels, 1, 1)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t  # noqa: E731
    x, mean = randn(gen, shape).requires_grad_(), randn(gen, shape).requires_grad_()
    log_sigma = randn(gen, small, 0.5).requires_grad_()
    var = (torch.rand(small, generator=gen, dtype=F64).to(DEVICE) + 0.05).requires_grad_()
    for reduction in ("none", "sum", "per_sample", "batchmean"):
        launched.clear()
        out = check(nll, {"x": x, "mean": mean, "log_sigma": log_sigma, "reduction": reduction}, dtype, gen,
                    views={"x": cl, "mean": cl})
        bwd = "_gaussian_nll_bwd_kernel" if reduction == "none" else "_gaussian_nll_bwd_interleaved_kernel"
        assert launched == ["_gaussian_nll_fwd_interleaved_kernel", bwd], (reduction, launched)
        if reduction == "none":
            assert out[0].is_contiguous(memory_format=torch.channels_last)
    for reduction, full in (("none", True), ("sum", False), ("batchmean", True)):
        def fn(input, target, var, reduction=reduction, full=full):  # eps 0.3 clamps some variances
            return fv.gaussian_nll_loss(input, target, var, full=full, eps=0.3, reduction=reduction)

        launched.clear()
        check(fn, {"input": x, "target": mean, "var": var}, dtype, gen, views={"input": cl, "target": cl})
        assert launched[0] == "_gaussian_nll_fwd_interleaved_kernel", launched
        assert launched[1] == ("_gaussian_nll_bwd_kernel" if reduction == "none" else
                               "_gaussian_nll_bwd_interleaved_kernel"), launched
    grids = [g for g in grids if g is not None]
    assert any(g.step < g.block for g in grids) == (channels != 4)
    xs, ms = cl(x.detach().to(dtype)), cl(mean.detach().to(dtype))
    with fv.use_backend("triton"):
        runs = [fv.gaussian_nll(xs, ms, log_sigma.detach().to(dtype), reduction="per_sample") for _ in range(2)]
        monkeypatch.setattr(kcommon, "INT32_LIMIT", 1)  # the 64-bit index math gives the same bits
        runs.append(fv.gaussian_nll(xs, ms, log_sigma.detach().to(dtype), reduction="per_sample"))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert grids[-1].int64 and not grids[-2].int64
    assert max(g.n_tiles for g in grids) > 1 and max(g.chunk_iters for g in grids) > 1


@pytest.mark.parametrize("op", ["gaussian_nll", "gaussian_nll_loss"])
def test_channels_last_grad_output_interleaved_backward(op, gen, monkeypatch):
    """``"none"`` with a channels-last grad_output (as autograd passes for a channels-last loss): the interleaved
    backward reads it per element; every gradient within 2x eager, x's layout kept, repeat runs bitwise equal."""
    monkeypatch.setattr(kcommon, "BROADCAST_TILE", 128)
    launched = _spy_launches(monkeypatch)
    shape = (2, 3, 10, 13)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    values = {"x": randn(gen, shape), "mean": randn(gen, shape),
              "small": torch.rand((3, 1, 1), generator=gen, dtype=F64).to(DEVICE) + 0.2}
    g = cl(torch.rand(shape, generator=gen, dtype=F64).to(DEVICE) + 0.25)

    def grads(backend, dtype):
        leaves = [v.to(dtype).requires_grad_() for v in values.values()]
        x, mean, small = cl(leaves[0]), cl(leaves[1]), leaves[2]
        with fv.use_backend(backend):
            if op == "gaussian_nll":
                out = fv.gaussian_nll(x, mean, small, reduction="none")
            else:
                out = fv.gaussian_nll_loss(x, mean, small, eps=0.3, full=True, reduction="none")
        return torch.autograd.grad(out, leaves, g.to(dtype))

    kernel = grads("triton", torch.float32)
    assert launched == ["_gaussian_nll_fwd_interleaved_kernel", "_gaussian_nll_bwd_interleaved_kernel"], launched
    eager, exact = grads("reference", torch.float32), grads("reference", F64)
    for name, k, e, x in zip(values, kernel, eager, exact):
        assert_within_twice_eager(name, k, e, x, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(kernel, grads("triton", torch.float32)))


@pytest.mark.skipif(not kgnll.fastmath.EMULATED, reason="the FAST path is emulated under TRITON_INTERPRET=1")
@pytest.mark.parametrize("op", ["gaussian_nll", "gaussian_nll_loss"])
def test_channels_last_interleaved_fast_path_emulated(op, gen, monkeypatch):
    """The interleaved kernels' FAST branch (``rcp.approx`` for 1/v, the clamped log) within 2x eager, emulated."""
    monkeypatch.setattr(kgnll.fastmath, "is_fast", lambda t: True)
    launched = _spy_launches(monkeypatch)
    shape = (3, 3, 9, 11)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    x, mean = randn(gen, shape).requires_grad_(), randn(gen, shape).requires_grad_()
    small = torch.exp(randn(gen, (3, 1, 1), 2.0))  # over several binades; eps 1e-6 clamps none of them
    small[1] = 1.0  # log 1 = 0
    for reduction in ("none", "sum"):
        if op == "gaussian_nll":
            check(nll, {"x": x, "mean": mean, "log_sigma": small.log().requires_grad_(), "reduction": reduction},
                  torch.float32, gen, views={"x": cl, "mean": cl})
        else:
            def fn(input, target, var, reduction=reduction):
                return fv.gaussian_nll_loss(input, target, var, full=True, eps=1e-6, reduction=reduction)

            check(fn, {"input": x, "target": mean, "var": small.requires_grad_()}, torch.float32, gen,
                  views={"input": cl, "target": cl})
    assert launched == ["_gaussian_nll_fwd_interleaved_kernel", "_gaussian_nll_bwd_kernel",  # "none": contiguous g
                        "_gaussian_nll_fwd_interleaved_kernel", "_gaussian_nll_bwd_interleaved_kernel"], launched
