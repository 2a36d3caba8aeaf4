"""The public API on the reference backend: the torch drop-in, vae_loss, bad input, NaN, empty batches, backends.

Everything here runs on the CPU under ``fv.use_backend("reference")`` (the backend tests manage
the selection themselves), in float64 wherever a number is checked.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from float64_inputs import F64, HALF_LOG_2PI, assert_close, grads, randn
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedvae as fv
from fusedvae import backend as backend_module
from fusedvae.testing import kl_closed_form


@pytest.fixture(autouse=True)
def _reference_backend():
    with fv.use_backend("reference"):
        yield


def uniform(gen, *shape, low, high, dtype=F64, requires_grad=False):
    """torch.testing.make_tensor's float distribution: uniform on [low, high)."""
    t = torch.rand(shape, generator=gen, dtype=dtype) * (high - low) + low
    return t.requires_grad_(requires_grad)


def nll_closed_form(x, m, s, full=True):
    s = torch.as_tensor(s, dtype=x.dtype)
    return 0.5 * ((x - m) / torch.exp(s)) ** 2 + s + (HALF_LOG_2PI if full else 0.0)


# ------------------------------------------------------------------ gaussian_nll_loss: the drop-in

S = 5  # torch's OpInfo size


def _opinfo_shapes():
    """The (input, target, var) shapes and reductions of torch's ``sample_inputs_gaussian_nll_loss``."""
    for shape in ((S,), (S, S), (S, S, S)):
        variants = [shape, (*shape[:-1], 1), shape[:-1]]  # its gen_shape: same, broadcast, one dim short
        for reduction in ("none", "mean", "sum"):
            for target_shape in variants:
                for var_shape in variants:
                    yield shape, target_shape, var_shape, reduction


@pytest.mark.parametrize("shape, target_shape, var_shape, reduction", list(_opinfo_shapes()))
def test_gaussian_nll_loss_matches_torch_on_opinfo_samples(gen, shape, target_shape, var_shape, reduction):
    eps_values = torch.rand(2, generator=gen, dtype=F64) * (1e-3 - 1e-6) + 1e-6
    for kwargs in ({}, {"full": True}, {"eps": float(eps_values[0])}, {"full": True, "eps": float(eps_values[1])}):
        inp = uniform(gen, *shape, low=-9, high=9, requires_grad=True)
        tgt = uniform(gen, *target_shape, low=-9, high=9, requires_grad=True)
        var = uniform(gen, *var_shape, low=0.1, high=9, requires_grad=True)
        got = fv.gaussian_nll_loss(inp, tgt, var, reduction=reduction, **kwargs)
        want = F.gaussian_nll_loss(inp, tgt, var, reduction=reduction, **kwargs)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert_close(got, want)
        g = randn(gen, *want.shape, shift=0.5)
        for a, b in zip(grads(got, [inp, tgt, var], g), grads(want, [inp, tgt, var], g)):
            assert a.shape == b.shape
            assert_close(a, b)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gaussian_nll_loss_float_var_and_float32(gen, reduction):
    for dtype in (F64, torch.float32):
        inp, tgt = randn(gen, 4, 3, dtype=dtype, requires_grad=True), randn(gen, 4, 3, dtype=dtype)
        got = fv.gaussian_nll_loss(inp, tgt, 0.7, full=True, reduction=reduction)
        want = F.gaussian_nll_loss(inp, tgt, 0.7, full=True, reduction=reduction)
        assert got.dtype == want.dtype == dtype
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else {}
        assert_close(got, want, **tol)
        g = randn(gen, *want.shape, dtype=dtype, shift=0.5)
        assert_close(grads(got, [inp], g)[0], grads(want, [inp], g)[0], **tol)


@pytest.mark.parametrize("eps", [1e-6, 1e-3])
def test_gaussian_nll_loss_gradient_passes_through_the_eps_clamp(gen, eps):
    inp, tgt = randn(gen, 3, 4, requires_grad=True), randn(gen, 3, 4)
    var = uniform(gen, 3, 4, low=0.1, high=2.0)
    var[0, 1], var[1, 2], var[2, 0] = 0.0, 1e-9, eps / 2  # below eps: clamped
    var.requires_grad_()
    got = fv.gaussian_nll_loss(inp, tgt, var, eps=eps, reduction="none")
    want = F.gaussian_nll_loss(inp, tgt, var, eps=eps, reduction="none")
    assert_close(got, want)
    g = randn(gen, 3, 4, shift=0.5)
    g_got, g_want = grads(got, [inp, var], g), grads(want, [inp, var], g)
    for a, b in zip(g_got, g_want):
        assert_close(a, b)
    clamped = var.detach() < eps
    assert (g_got[1][clamped] != 0).all()  # the clamp is invisible to autograd, as in torch
    with torch.no_grad():  # d/dvar at the clamped value v = eps: (1/v - (x - t)^2 / v^2) / 2
        d2 = (inp - tgt) ** 2
        assert_close(g_got[1][clamped], (g * 0.5 * (1 / eps - d2 / eps**2))[clamped])


def _bad_gaussian_nll_loss_inputs():
    """(name, input, target, var, kwargs, what fusedvae's message says): each one torch raises on."""
    inp, tgt, var = torch.randn(10, 2, 3), torch.randn(10, 2, 3), torch.rand(10, 2, 3)
    return [
        ("unknown reduction", inp, tgt, var, {"reduction": "abc"}, "abc is not valid"),
        ("reduction not a str", inp, tgt, var, {"reduction": None}, "reduction must be a str"),
        ("var of the wrong size", inp, tgt, torch.rand(10, 2, 2), {}, r"var is of incorrect size.*\(10, 2, 2\)"),
        ("var larger than input", torch.randn(3), torch.randn(3), torch.rand(2, 3), {}, "var is of incorrect size"),
        ("negative var", inp, tgt, -var, {}, "var has negative entry"),
        ("negative float var", inp, tgt, -1.0, {}, "var has negative entry"),
        ("var None", inp, tgt, None, {}, "var must be a torch.Tensor"),
        ("var a list", inp, tgt, [1.0], {}, "var must be a torch.Tensor"),
        ("var a bool", inp, tgt, True, {}, "var must be a torch.Tensor"),
        ("var a numpy float32", inp, tgt, np.float32(0.5), {}, "var must be a torch.Tensor"),
        ("integer var tensor", inp, tgt, torch.ones(10, 2, 3, dtype=torch.long), {}, "var must be a floating-point"),
        ("complex var", inp, tgt, torch.ones(10, 2, 3, dtype=torch.cfloat), {}, "var must be a floating-point"),
        ("target that does not broadcast", inp, torch.randn(10, 2, 2), var, {}, r"target of shape \(10, 2, 2\)"),
        ("target a list", inp, [1.0], var, {}, "target must be a torch.Tensor"),
        ("input a list", [1.0], tgt, var, {}, "input must be a torch.Tensor"),
        ("bool input", torch.ones(10, 2, 3, dtype=torch.bool), tgt, var, {}, "input must be a floating-point"),
        ("eps a str", inp, tgt, var, {"eps": "a"}, "eps must be a float"),
    ]


@pytest.mark.parametrize("case", _bad_gaussian_nll_loss_inputs(), ids=lambda case: case[0])
def test_gaussian_nll_loss_raises_an_instance_of_the_class_torch_raises(case):
    _, inp, tgt, var, kwargs, message = case
    with pytest.raises(Exception) as theirs:
        F.gaussian_nll_loss(inp, tgt, var, **kwargs)
    with pytest.raises(Exception, match=message) as ours:
        fv.gaussian_nll_loss(inp, tgt, var, **kwargs)
    assert isinstance(ours.value, type(theirs.value)), (type(ours.value).__mro__, type(theirs.value))
    assert isinstance(ours.value, (ValueError, TypeError))  # and fusedvae's own contract


def test_gaussian_nll_loss_error_classes_are_both():
    from fusedvae.validation import DeviceError, DtypeError, NotATensorError, ShapeError

    for cls, bases in ((ShapeError, (ValueError, RuntimeError)), (DeviceError, (ValueError, RuntimeError)),
                       (DtypeError, (TypeError, RuntimeError, NotImplementedError)),
                       (NotATensorError, (TypeError, AttributeError))):
        assert all(issubclass(cls, base) for base in bases)
    # other ops keep plain TypeErrors: an AttributeError would mislead hasattr
    with pytest.raises(TypeError) as info:
        fv.kl_normal([1.0], torch.zeros(1))
    assert type(info.value) is TypeError


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gaussian_nll_loss_scalar_var_forms(gen, reduction):
    """A float, an int and a 0-dim tensor var (torch rejects the last two, pytorch/pytorch#149131)."""
    inp, tgt = randn(gen, 4, 3, 2, requires_grad=True), randn(gen, 4, 3, 2)
    want = F.gaussian_nll_loss(inp, tgt, 0.7, full=True, reduction=reduction)
    assert_close(fv.gaussian_nll_loss(inp, tgt, 0.7, full=True, reduction=reduction), want)
    var = torch.tensor(0.7, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="var is of incorrect size"):
        F.gaussian_nll_loss(inp, tgt, var)
    got = fv.gaussian_nll_loss(inp, tgt, var, full=True, reduction=reduction)
    expanded = var.expand(inp.shape)
    want = F.gaussian_nll_loss(inp, tgt, expanded, full=True, reduction=reduction)
    assert got.shape == want.shape
    assert_close(got, want)
    g = randn(gen, *want.shape, shift=0.5)
    (g_got,), (g_want,) = grads(got, [var], g), grads(want, [var], g)
    assert g_got.shape == () and g_got != 0
    assert_close(g_got, g_want)
    with pytest.raises(TypeError):
        F.gaussian_nll_loss(inp, tgt, 2)
    assert_close(fv.gaussian_nll_loss(inp, tgt, 2, reduction=reduction),
                 F.gaussian_nll_loss(inp, tgt, 2.0, reduction=reduction))
    with pytest.raises(ValueError, match="var has negative"):
        fv.gaussian_nll_loss(inp, tgt, torch.tensor(-0.5, dtype=F64))


def test_gaussian_nll_loss_integer_data_as_torch(gen):
    counts = torch.randint(0, 6, (4, 3), generator=gen)
    mean = randn(gen, 4, 3, requires_grad=True)
    for inp, tgt, var in ((mean, counts, torch.rand(4, 3, dtype=F64)), (counts, counts.flip(0), torch.rand(4, 1)),
                          (counts, mean, torch.rand(4, 3) + 0.5)):
        got = fv.gaussian_nll_loss(inp, tgt, var, reduction="none")
        want = F.gaussian_nll_loss(inp, tgt, var, reduction="none")
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_gaussian_nll_loss_check_var_compiles_without_a_graph_break(gen, compiler, backend):
    if backend == "triton":
        if not backend_module.triton_available():
            pytest.skip("triton is not installed")
        import fusedvae.kernels  # noqa: F401  registers the fusedvae:: custom ops
    torch._dynamo.reset()
    with fv.use_backend(backend):
        try:
            loss = lambda i, t, v: fv.gaussian_nll_loss(i, t, v, full=True)  # noqa: E731
            fn = torch.compile(loss, fullgraph=True, backend=compiler)
            inp, tgt = randn(gen, 4, 3, requires_grad=True), randn(gen, 4, 3)
            var = uniform(gen, 4, 1, low=0.1, high=2.0, requires_grad=True)
            got, want = fn(inp, tgt, var), F.gaussian_nll_loss(inp, tgt, var, full=True)
            assert_close(got, want)
            g = randn(gen, shift=0.5)
            for a, b in zip(grads(got, [inp, var], g), grads(want, [inp, var], g)):
                assert_close(a, b)
            bad = var.detach().clone()
            bad[2, 0] = -0.1
            with pytest.raises(RuntimeError, match="var has negative entry"):  # the assertion, when the graph runs
                fn(inp, tgt, bad)
            # NaN is not negative: no assertion, as torch's check (NaN < 0 is False)
            nan = var.detach().clone()
            nan[1, 0] = float("nan")
            assert torch.isnan(fn(inp, tgt, nan))
            counts = torch._dynamo.utils.counters["graph_break"]
            assert not counts, dict(counts)
        finally:
            torch._dynamo.reset()


def test_gaussian_nll_loss_accepts_per_channel_var_that_torch_rejects(gen):
    inp, tgt = randn(gen, 4, 3, 5, 6, requires_grad=True), randn(gen, 4, 3, 5, 6, requires_grad=True)
    var = uniform(gen, 1, 3, 1, 1, low=0.1, high=3.0, requires_grad=True)
    with pytest.raises(ValueError, match="var is of incorrect size"):
        F.gaussian_nll_loss(inp, tgt, var)
    for reduction in ("none", "mean", "sum"):
        got = fv.gaussian_nll_loss(inp, tgt, var, full=True, reduction=reduction)
        want = F.gaussian_nll_loss(inp, tgt, var.expand_as(inp), full=True, reduction=reduction)
        assert_close(got, want)
        g = randn(gen, *want.shape, shift=0.5)
        for a, b in zip(grads(got, [inp, tgt, var], g), grads(want, [inp, tgt, var], g)):
            assert a.shape == b.shape
            assert_close(a, b)
    # other broadcastable vars: per channel without the batch dim, per sample
    for shape in [(3, 1, 1), (4, 1, 1, 1), (6,)]:
        v = uniform(gen, *shape, low=0.1, high=3.0)
        assert_close(fv.gaussian_nll_loss(inp, tgt, v), F.gaussian_nll_loss(inp, tgt, v.expand_as(inp)))


def test_gaussian_nll_loss_fusedvae_reductions(gen):
    inp, tgt, var = randn(gen, 4, 3, 2), randn(gen, 4, 3, 2), uniform(gen, 4, 3, 1, low=0.1, high=2)
    none = F.gaussian_nll_loss(inp, tgt, var, reduction="none")
    assert_close(fv.gaussian_nll_loss(inp, tgt, var, reduction="batchmean"), none.sum() / 4)
    assert_close(fv.gaussian_nll_loss(inp, tgt, var, reduction="per_sample"), none.sum((1, 2)))
    with pytest.raises(ValueError, match="per_dim is not valid"):
        fv.gaussian_nll_loss(inp, tgt, var, reduction="per_dim")


def test_gaussian_nll_loss_check_var_false(gen):
    inp, tgt = randn(gen, 4, 3), randn(gen, 4, 3)
    var = uniform(gen, 4, 3, low=0.1, high=2.0)
    assert torch.equal(fv.gaussian_nll_loss(inp, tgt, var, check_var=False), fv.gaussian_nll_loss(inp, tgt, var))
    var[1, 1] = -0.5
    with pytest.raises(ValueError, match="var has negative"):
        fv.gaussian_nll_loss(inp, tgt, var)
    got = fv.gaussian_nll_loss(inp, tgt, var, check_var=False, eps=1e-3, reduction="none")
    v = var.clamp(min=1e-3)  # skipped check: the negative entry is clamped like any other below eps
    assert_close(got, 0.5 * (torch.log(v) + (inp - tgt) ** 2 / v))


def test_gaussian_nll_loss_gradcheck(gen):
    inp, tgt = randn(gen, 3, 4, requires_grad=True), randn(gen, 3, 4, requires_grad=True)
    var = uniform(gen, 1, 4, low=0.2, high=2.0, requires_grad=True)
    for reduction in ("none", "mean", "batchmean"):
        fn = lambda a, b, c: fv.gaussian_nll_loss(a, b, c, full=True, reduction=reduction)  # noqa: E731, B023
        assert torch.autograd.gradcheck(fn, (inp, tgt, var))


@st.composite
def _drop_in_shapes(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))

    def variant():
        kind = draw(st.sampled_from(["same", "ones", "short", "leading"]))
        if kind == "same":
            return shape
        if kind == "ones":  # some dims set to 1
            return tuple(1 if draw(st.booleans()) else n for n in shape)
        if kind == "short":  # one dim short: torch's homoscedastic rule
            return shape[:-1]
        return shape[draw(st.integers(0, len(shape))):]  # trailing dims only (numpy broadcasting)

    return shape, variant(), variant()


@settings(max_examples=60, deadline=None)
@given(
    shapes=_drop_in_shapes(),
    reduction=st.sampled_from(["none", "mean", "sum"]),
    full=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_gaussian_nll_loss_matches_torch(shapes, reduction, full, seed):
    shape, target_shape, var_shape = shapes
    g = torch.Generator().manual_seed(seed)
    inp = uniform(g, *shape, low=-3, high=3, requires_grad=True)
    tgt = uniform(g, *target_shape, low=-3, high=3, requires_grad=True)
    var = uniform(g, *var_shape, low=0.1, high=3, requires_grad=True)
    with fv.use_backend("reference"):
        try:
            torch.broadcast_shapes(inp.shape, tgt.shape)
        except RuntimeError:  # a target that does not broadcast: torch fails in the arithmetic
            with pytest.raises(ValueError, match="target"):
                fv.gaussian_nll_loss(inp, tgt, var, full=full, reduction=reduction)
            return
        try:
            want = F.gaussian_nll_loss(inp, tgt, var, full=full, reduction=reduction)
        except ValueError as error:  # torch rejects a var it cannot take; fusedvae takes any broadcastable one
            assert "var is of incorrect size" in str(error)
            assert torch.broadcast_shapes(var.shape, inp.shape) == inp.shape
            want = F.gaussian_nll_loss(inp, tgt, var.expand(inp.shape), full=full, reduction=reduction)
        got = fv.gaussian_nll_loss(inp, tgt, var, full=full, reduction=reduction)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        go = torch.rand(want.shape, generator=g, dtype=F64) + 0.5
        for a, b in zip(grads(got, [inp, tgt, var], go), grads(want, [inp, tgt, var], go)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------- vae_loss


def _decoder(latent: int, data: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(latent, 16), torch.nn.Tanh(), torch.nn.Linear(16, data)).double()


class _ScaleHeadDecoder(torch.nn.Module):
    """A decoder with its own log-scale head: returns (mean, log_sigma)."""

    def __init__(self, latent, data):
        super().__init__()
        torch.manual_seed(1)
        self.mean = torch.nn.Linear(latent, data).double()
        self.scale = torch.nn.Linear(latent, data).double()

    def forward(self, z):
        return self.mean(z), 0.3 * torch.tanh(self.scale(z))


def _sigma_vae_nll(x, m, *, per_sample, min_log_sigma=-6.0):
    """Per-sample NLL under the σ-VAE's optimal σ, plain torch (σ-VAE reference)."""
    dims = tuple(range(1, x.dim())) if per_sample else tuple(range(x.dim()))
    s = ((x - m) ** 2).mean(dims, keepdim=True).sqrt().log()
    if min_log_sigma is not None:
        s = min_log_sigma + F.softplus(s - min_log_sigma)
    return nll_closed_form(x, m, s).reshape(x.shape[0], -1).sum(1)


def _vae_inputs(gen, B=6, L=3, D=8):
    x = randn(gen, B, D)
    mu, lv = randn(gen, B, L, requires_grad=True), randn(gen, B, L, scale=0.5, requires_grad=True)
    return x, mu, lv


@pytest.mark.parametrize(
    "sigma", ["fixed", "learned_scalar", "learned_per_element", "optimal", "optimal_per_sample", "decoder_head"]
)
def test_vae_loss_matches_manual_composition(gen, sigma):
    B, L, D = 6, 3, 8
    x, mu, lv = _vae_inputs(gen, B, L, D)
    decoder = _ScaleHeadDecoder(L, D) if sigma == "decoder_head" else _decoder(L, D)
    params = [mu, lv, *decoder.parameters()]
    log_sigma, optimal = {
        "fixed": (-0.4, None),
        "learned_scalar": (torch.tensor(0.2, dtype=F64, requires_grad=True), None),
        "learned_per_element": (randn(gen, D, scale=0.3, requires_grad=True), None),
        "optimal": ("optimal", "optimal"),
        "optimal_per_sample": ("optimal_per_sample", "optimal_per_sample"),
        "decoder_head": (None, None),
    }[sigma]
    if isinstance(log_sigma, torch.Tensor):
        params.append(log_sigma)
    beta = 0.7
    torch.manual_seed(42)
    out = fv.vae_loss(x, decoder, mu, lv, log_sigma=log_sigma, beta=beta)
    assert isinstance(out, fv.VAELoss) and out.loss.shape == out.nll.shape == out.kl.shape == ()
    # torch.manual_seed(42) drove the noise; a generator seeded 42 makes the same draws
    nll, kl = _manual_from_generator(x, decoder, mu, lv, torch.Generator().manual_seed(42), log_sigma=log_sigma,
                                     optimal=optimal)
    want = nll.mean() + beta * kl.mean()
    assert_close(out.nll, nll.mean())
    assert_close(out.kl, kl.mean())
    assert_close(out.loss, want)
    for a, b in zip(grads(out.loss, params), grads(want, params)):
        assert_close(a, b, rtol=1e-9, atol=1e-11)


def _manual_from_generator(x, decoder, mu, lv, generator, *, log_sigma, optimal, prior=(0.0, 0.0)):
    z = fv.rsample(mu, lv, generator=generator)
    kl = kl_closed_form(mu, lv, *prior).sum(1)
    out = decoder(z)
    if isinstance(out, tuple):
        out, log_sigma = out
    if optimal is not None:
        nll = _sigma_vae_nll(x, out, per_sample=optimal == "optimal_per_sample")
    else:
        nll = nll_closed_form(x, out, log_sigma).reshape(x.shape[0], -1).sum(1)
    return nll, kl


def test_vae_loss_uses_rsample_kl_noise_and_generator(gen):
    x, mu, lv = _vae_inputs(gen)
    decoder = _decoder(3, 8)
    seen = []
    out = fv.vae_loss(x, lambda z: seen.append(z) or decoder(z), mu, lv, generator=torch.Generator().manual_seed(8))
    z, kl = fv.rsample_kl(mu, lv, generator=torch.Generator().manual_seed(8))
    assert torch.equal(seen[0], z)
    assert torch.equal(out.kl, kl)


def test_vae_loss_learned_prior(gen):
    x, mu, lv = _vae_inputs(gen)
    mu_p, lv_p = randn(gen, 3, requires_grad=True), randn(gen, 3, requires_grad=True)
    decoder = _decoder(3, 8)
    out = fv.vae_loss(x, decoder, mu, lv, prior_mu=mu_p, prior_logvar=lv_p, generator=torch.Generator().manual_seed(3))
    nll, kl = _manual_from_generator(x, decoder, mu, lv, torch.Generator().manual_seed(3), log_sigma=0.0,
                                     optimal=None, prior=(mu_p, lv_p))
    want = nll.mean() + kl.mean()
    assert_close(out.loss, want)
    for a, b in zip(grads(out.loss, [mu, lv, mu_p, lv_p]), grads(want, [mu, lv, mu_p, lv_p])):
        assert_close(a, b)


@pytest.mark.parametrize("log_sigma", [0.0, -0.3, "optimal", "optimal_per_sample"])
def test_vae_loss_per_sample_beta(gen, log_sigma):
    x, mu, lv = _vae_inputs(gen)
    decoder = _decoder(3, 8)
    beta = torch.rand(6, generator=gen, dtype=F64) * 2
    out = fv.vae_loss(x, decoder, mu, lv, beta=beta, log_sigma=log_sigma, generator=torch.Generator().manual_seed(5))
    optimal = log_sigma if isinstance(log_sigma, str) else None
    nll, kl = _manual_from_generator(x, decoder, mu, lv, torch.Generator().manual_seed(5), log_sigma=log_sigma,
                                     optimal=optimal)
    want = (nll + beta * kl).mean()
    assert_close(out.loss, want)
    assert_close(out.nll, nll.mean())
    assert_close(out.kl, kl.mean())
    params = [mu, lv, *decoder.parameters()]
    for a, b in zip(grads(out.loss, params), grads(want, params)):
        assert_close(a, b)
    # a constant beta tensor equals the float beta
    const = fv.vae_loss(x, decoder, mu, lv, beta=torch.full((6,), 0.3, dtype=F64), log_sigma=log_sigma,
                        generator=torch.Generator().manual_seed(5))
    flt = fv.vae_loss(x, decoder, mu, lv, beta=0.3, log_sigma=log_sigma, generator=torch.Generator().manual_seed(5))
    assert_close(const.loss, flt.loss)


@pytest.mark.parametrize("capacity_offset", [-0.5, 0.5])
def test_vae_loss_capacity(gen, capacity_offset):
    x, mu, lv = _vae_inputs(gen)
    decoder = _decoder(3, 8)
    plain = fv.vae_loss(x, decoder, mu, lv, generator=torch.Generator().manual_seed(2))
    capacity = float(plain.kl.detach()) + capacity_offset
    beta = 4.0
    out = fv.vae_loss(x, decoder, mu, lv, beta=beta, capacity=capacity, generator=torch.Generator().manual_seed(2))
    assert_close(out.kl, plain.kl)
    assert_close(out.loss, plain.nll + beta * (plain.kl - capacity).abs())
    # d/dmu of beta |kl - C| is -beta sign(C - kl) dkl/dmu
    (g_kl,) = grads(plain.kl, [mu])
    (g_nll,) = grads(plain.nll, [mu])
    (g_out,) = grads(out.loss, [mu])
    assert_close(g_out, g_nll - math.copysign(beta, capacity_offset) * g_kl)


def test_vae_loss_free_bits(gen):
    x, mu, lv = _vae_inputs(gen)
    decoder = _decoder(3, 8)
    lam = 0.4
    out = fv.vae_loss(x, decoder, mu, lv, free_bits=lam, generator=torch.Generator().manual_seed(2))
    assert_close(out.kl, kl_closed_form(mu, lv).mean(0).clamp(min=lam).sum())


def test_vae_loss_errors(gen):
    x, mu, lv = _vae_inputs(gen)
    decoder = _decoder(3, 8)
    head = _ScaleHeadDecoder(3, 8)
    bad = [
        (dict(beta=torch.ones(5)), ValueError, r"beta.*\(6,\).*\(5,\)"),
        (dict(beta=-1.0), ValueError, "beta"),
        (dict(beta="1"), TypeError, "beta"),
        (dict(beta=torch.ones(6), capacity=1.0), ValueError, "capacity"),
        (dict(beta=torch.ones(6), free_bits=0.1), ValueError, "free_bits"),
        (dict(capacity="3"), TypeError, "capacity"),
        (dict(log_sigma="best"), ValueError, "log_sigma"),
        (dict(log_sigma=None), ValueError, "log_sigma"),
        (dict(free_bits=-0.1), ValueError, "free_bits"),
        (dict(log_sigma=torch.zeros(7)), ValueError, "log_sigma"),
    ]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            fv.vae_loss(x, decoder, mu, lv, **kwargs)
    with pytest.raises(ValueError, match="log_sigma=None"):
        fv.vae_loss(x, head, mu, lv, log_sigma=0.0)
    with pytest.raises(TypeError, match="decoder"):
        fv.vae_loss(x, "decoder", mu, lv)
    with pytest.raises(ValueError, match="logvar"):
        fv.vae_loss(x, decoder, mu, lv[:, :2])
    with pytest.raises(ValueError, match=r"mean.*\(6, 9\).*\(6, 8\)"):
        fv.vae_loss(randn(gen, 6, 9), decoder, mu, lv)


# ------------------------------------------------------------------------------------ bad input


def _ops_with_reduction(gen):
    """(name, call(reduction)) for every op that takes a reduction."""
    mu, lv, x, m = randn(gen, 4, 3), randn(gen, 4, 3), randn(gen, 4, 3), randn(gen, 4, 3)
    var = uniform(gen, 4, 3, low=0.1, high=1)
    return {
        "kl_normal": lambda r: fv.kl_normal(mu, lv, reduction=r),
        "rsample_kl": lambda r: fv.rsample_kl(mu, lv, reduction=r),
        "gaussian_nll": lambda r: fv.gaussian_nll(x, m, 0.1, reduction=r),
        "gaussian_nll_optimal": lambda r: fv.gaussian_nll_optimal(x, m, reduction=r),
        "gaussian_nll_loss": lambda r: fv.gaussian_nll_loss(x, m, var, reduction=r),
    }


@pytest.mark.parametrize("reduction", ["average", "MEAN", None, 3])
def test_unknown_reduction_is_rejected(gen, reduction):
    for call in _ops_with_reduction(gen).values():
        with pytest.raises(ValueError, match="reduction|is not valid"):
            call(reduction)
    for name in ("gaussian_nll", "gaussian_nll_optimal", "gaussian_nll_loss"):  # per_dim is the KL's only
        with pytest.raises(ValueError):
            _ops_with_reduction(gen)[name]("per_dim")


def test_shape_mismatch_names_arguments_and_shapes(gen):
    a, b = randn(gen, 4, 3), randn(gen, 4, 2)
    cases = [
        (lambda: fv.kl_normal(a, b), r"logvar.*\(4, 3\).*\(4, 2\)"),
        (lambda: fv.rsample(a, b), r"logvar.*\(4, 3\).*\(4, 2\)"),
        (lambda: fv.rsample_kl(a, b), r"logvar.*\(4, 3\).*\(4, 2\)"),
        (lambda: fv.kl_normal(a, a, b), r"prior_mu.*\(4, 2\).*\(4, 3\)"),
        (lambda: fv.kl_normal(a, a, None, randn(gen, 5, 3)), r"prior_logvar.*\(5, 3\)"),
        (lambda: fv.kl_normal(a, a, randn(gen, 1, 4, 3)), r"prior_mu.*\(1, 4, 3\)"),  # may not grow mu
        (lambda: fv.gaussian_nll(a, b, 0.0), r"mean.*\(4, 3\).*\(4, 2\)"),
        (lambda: fv.gaussian_nll(a, a, randn(gen, 2)), r"log_sigma.*\(2,\)"),
        (lambda: fv.gaussian_nll(a, a, randn(gen, 4)), r"log_sigma.*\(4,\)"),
        (lambda: fv.gaussian_nll_optimal(a, b), r"mean.*\(4, 3\).*\(4, 2\)"),
        (lambda: fv.optimal_log_sigma(a, b), r"mean.*\(4, 3\).*\(4, 2\)"),
        (lambda: fv.gaussian_nll_loss(a, a, uniform(gen, 4, 2, low=0.1, high=1)), "var is of incorrect size"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_mixed_devices_are_rejected(gen):
    cpu = randn(gen, 4, 3)
    meta = torch.empty(4, 3, device="meta", dtype=F64)
    cases = [
        (lambda: fv.kl_normal(cpu, meta), "logvar on meta"),
        (lambda: fv.kl_normal(cpu, cpu, meta), "prior_mu on meta"),
        (lambda: fv.kl_normal(cpu, cpu, None, meta), "prior_logvar on meta"),
        (lambda: fv.rsample(meta, cpu), "mu on meta"),
        (lambda: fv.rsample_kl(cpu, meta), "logvar on meta"),
        (lambda: fv.gaussian_nll(cpu, meta, 0.0), "mean on meta"),
        (lambda: fv.gaussian_nll(cpu, cpu, torch.zeros((), device="meta", dtype=F64)), "log_sigma on meta"),
        (lambda: fv.gaussian_nll_optimal(meta, cpu), "x on meta"),
        (lambda: fv.optimal_log_sigma(cpu, meta), "mean on meta"),
        (lambda: fv.gaussian_nll_loss(cpu, cpu, meta), "var on meta"),
        (lambda: fv.gaussian_nll_loss(cpu, meta, cpu.abs()), "target on meta"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_dtypes_are_rejected(gen, dtype):
    good = randn(gen, 4, 3)
    bad = torch.ones(4, 3, dtype=dtype)
    cases = [
        (lambda: fv.kl_normal(bad, good), "mu"),
        (lambda: fv.kl_normal(good, bad), "logvar"),
        (lambda: fv.kl_normal(good, good, bad), "prior_mu"),
        (lambda: fv.kl_normal(good, good, None, bad), "prior_logvar"),
        (lambda: fv.rsample(bad, good), "mu"),
        (lambda: fv.rsample_kl(good, bad), "logvar"),
        (lambda: fv.gaussian_nll(bad, good, 0.0), "x"),
        (lambda: fv.gaussian_nll(good, bad, 0.0), "mean"),
        (lambda: fv.gaussian_nll(good, good, torch.zeros((), dtype=dtype)), "log_sigma"),
        (lambda: fv.gaussian_nll_optimal(good, bad), "mean"),
        (lambda: fv.optimal_log_sigma(bad, good), "x"),
        (lambda: fv.gaussian_nll_loss(good, good, bad), "var"),
    ]
    if dtype is torch.bool:  # integer data torch's function takes, and so does the drop-in; bool data it rejects
        cases += [(lambda: fv.gaussian_nll_loss(bad, good, good.abs()), "input"),
                  (lambda: fv.gaussian_nll_loss(good, bad, good.abs()), "target")]
    for call, name in cases:
        with pytest.raises(TypeError, match=rf"^{name} must be a floating-point tensor.*{dtype}"):
            call()


def test_non_tensor_arguments_are_rejected(gen):
    t = randn(gen, 4, 3)
    with pytest.raises(TypeError, match="mu must be a torch.Tensor"):
        fv.kl_normal(np.zeros((4, 3)), t)
    with pytest.raises(TypeError, match="log_sigma"):
        fv.gaussian_nll(t, t, None)
    with pytest.raises(TypeError, match="log_sigma"):
        fv.gaussian_nll(t, t, "0.0")
    with pytest.raises(TypeError, match="generator"):
        fv.rsample(t, t, generator=42)
    with pytest.raises(TypeError, match="min_log_sigma"):
        fv.gaussian_nll_optimal(t, t, min_log_sigma="low")
    with pytest.raises(TypeError, match="free_bits"):
        fv.kl_normal(t, t, free_bits="1")


def test_free_bits_needs_batchmean(gen):
    mu, lv = randn(gen, 4, 3), randn(gen, 4, 3)
    for reduction in ("none", "sum", "mean", "per_sample", "per_dim"):
        with pytest.raises(ValueError, match=f"free_bits.*{reduction}"):
            fv.kl_normal(mu, lv, reduction=reduction, free_bits=0.5)
        with pytest.raises(ValueError, match="free_bits"):
            fv.rsample_kl(mu, lv, reduction=reduction, free_bits=0.5)
    with pytest.raises(ValueError, match="free_bits"):
        fv.kl_normal(mu, lv, free_bits=-1.0)
    with pytest.raises(ValueError, match="free_bits"):
        fv.kl_normal(mu, lv, free_bits=float("nan"))


@pytest.mark.parametrize(
    "n_samples, error", [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError), ("3", TypeError)]
)
def test_bad_n_samples(gen, n_samples, error):
    mu, lv = randn(gen, 4, 3), randn(gen, 4, 3)
    with pytest.raises(error, match="n_samples"):
        fv.rsample(mu, lv, n_samples=n_samples)
    with pytest.raises(error, match="n_samples"):
        fv.rsample_kl(mu, lv, n_samples=n_samples)


def test_zero_dim_inputs_need_no_batch_for_elementwise_reductions(gen):
    mu, lv = randn(gen), randn(gen)
    assert fv.rsample(mu, lv).shape == () and fv.rsample(mu, lv, n_samples=3).shape == (3,)
    assert_close(fv.kl_normal(mu, lv, reduction="sum"), kl_closed_form(mu, lv))
    for reduction in ("batchmean", "per_sample", "per_dim"):
        with pytest.raises(ValueError, match="batch dimension"):
            fv.kl_normal(mu, lv, reduction=reduction)
    with pytest.raises(ValueError, match="per_sample"):
        fv.gaussian_nll_optimal(mu, lv, per_sample=True)


# --------------------------------------------------------------------------------------- NaN in


def test_nan_in_gives_nan_out_where_it_belongs(gen):
    def with_nan(t, index=(1, 2)):
        t = t.clone()
        t[index] = math.nan
        return t

    mu, lv, mu_p, lv_p = (randn(gen, 4, 3) for _ in range(4))
    where = torch.zeros(4, 3, dtype=torch.bool)
    where[1, 2] = True
    for args in [(with_nan(mu), lv, mu_p, lv_p), (mu, with_nan(lv), mu_p, lv_p),
                 (mu, lv, with_nan(mu_p), lv_p), (mu, lv, mu_p, with_nan(lv_p))]:
        none = fv.kl_normal(*args, reduction="none")
        assert torch.equal(torch.isnan(none), where)
        assert torch.equal(torch.isnan(fv.kl_normal(*args, reduction="per_sample")), where.any(1))
        assert torch.equal(torch.isnan(fv.kl_normal(*args, reduction="per_dim")), where.any(0))
        assert torch.isnan(fv.kl_normal(*args)).item()
        assert torch.isnan(fv.kl_normal(*args, free_bits=0.1)).item()
    for args in [(with_nan(mu), lv), (mu, with_nan(lv))]:
        assert torch.equal(torch.isnan(fv.rsample(*args)), where)
        z, kl = fv.rsample_kl(*args, n_samples=2)
        assert torch.equal(torch.isnan(z), where.expand(2, 4, 3)) and torch.isnan(kl).item()
    x, m, s = randn(gen, 4, 3), randn(gen, 4, 3), randn(gen, 4, 3)
    for args in [(with_nan(x), m, s), (x, with_nan(m), s), (x, m, with_nan(s))]:
        assert torch.equal(torch.isnan(fv.gaussian_nll(*args, reduction="none")), where)
        assert torch.isnan(fv.gaussian_nll(*args)).item()
    for args in [(with_nan(x), m), (x, with_nan(m))]:
        assert torch.isnan(fv.gaussian_nll_optimal(*args)).item()
        assert torch.isnan(fv.gaussian_nll_optimal(*args, per_sample=True, reduction="per_sample"))[1].item()
        assert torch.isnan(fv.optimal_log_sigma(*args)).item()
    var = uniform(gen, 4, 3, low=0.1, high=1)
    for args in [(with_nan(x), m, var), (x, with_nan(m), var), (x, m, with_nan(var))]:
        assert torch.equal(torch.isnan(fv.gaussian_nll_loss(*args, reduction="none")), where)
        assert torch.isnan(fv.gaussian_nll_loss(*args)).item()
    decoder = _decoder(3, 3)
    assert torch.isnan(fv.vae_loss(with_nan(x), decoder, mu, lv).loss).item()


# -------------------------------------------------------------------------------- empty batches


def test_empty_batches_give_zero_sums_and_empty_elementwise_results(gen):
    e = torch.empty(0, 3, dtype=F64, requires_grad=True)
    f = torch.empty(0, 3, dtype=F64, requires_grad=True)
    zero = torch.zeros((), dtype=F64)

    def check(call, extra_shape=(0, 3)):
        total = call("sum")
        assert total.shape == () and torch.equal(total.detach(), zero)
        none = call("none")
        assert none.shape == extra_shape
        assert call("per_sample").shape == (0,)
        for reduction in ("mean", "batchmean"):  # a mean of nothing is NaN, as torch.mean's
            assert torch.isnan(call(reduction)).item()

    check(lambda r: fv.kl_normal(e, f, reduction=r))
    assert torch.equal(fv.kl_normal(e, f, reduction="per_dim").detach(), torch.zeros(3, dtype=F64))
    check(lambda r: fv.rsample_kl(e, f, reduction=r)[1])
    check(lambda r: fv.gaussian_nll(e, f, 0.3, reduction=r))
    check(lambda r: fv.gaussian_nll(e, f, torch.zeros(3, dtype=F64), reduction=r))
    check(lambda r: fv.gaussian_nll_optimal(e, f, reduction=r))
    check(lambda r: fv.gaussian_nll_optimal(e, f, per_sample=True, reduction=r))
    check(lambda r: fv.gaussian_nll_loss(e, f, torch.ones(0, 1, dtype=F64), reduction=r))
    for reduction in ("sum", "none", "mean"):
        torch.testing.assert_close(
            fv.gaussian_nll_loss(e, f, torch.ones(0, 3, dtype=F64), reduction=reduction),
            F.gaussian_nll_loss(e, f, torch.ones(0, 3, dtype=F64), reduction=reduction),
            equal_nan=True,
        )
    assert fv.rsample(e, f).shape == (0, 3)
    assert fv.rsample(e, f, n_samples=2).shape == (2, 0, 3)
    # backward through an empty batch works and gives empty gradients
    total = fv.kl_normal(e, f, reduction="sum") + fv.gaussian_nll(e, f, 0.0, reduction="sum")
    assert [g.shape for g in grads(total, [e, f])] == [(0, 3), (0, 3)]
    # an empty latent: per-sample sums of nothing are zero
    mu0 = torch.empty(4, 0, dtype=F64)
    assert torch.equal(fv.kl_normal(mu0, mu0, reduction="per_sample"), torch.zeros(4, dtype=F64))
    assert torch.equal(fv.gaussian_nll_optimal(mu0, mu0, per_sample=True, reduction="per_sample"),
                       torch.zeros(4, dtype=F64))


# --------------------------------------------------------------------------- dtypes and layouts


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_return_their_dtype(gen, dtype):
    mu, lv = randn(gen, 8, 5, dtype=dtype), randn(gen, 8, 5, dtype=dtype)
    x, m, var = randn(gen, 8, 5, dtype=dtype), randn(gen, 8, 5, dtype=dtype), uniform(gen, 8, 5, low=.2, high=2,
                                                                                        dtype=dtype)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}[dtype]
    up = lambda *ts: [t.to(F64) for t in ts]  # noqa: E731
    pairs = [
        (fv.kl_normal(mu, lv, reduction="none"), fv.kl_normal(*up(mu, lv), reduction="none")),
        (fv.kl_normal(mu, lv), fv.kl_normal(*up(mu, lv))),
        (fv.gaussian_nll(x, m, 0.2, reduction="none"), fv.gaussian_nll(*up(x, m), 0.2, reduction="none")),
        (fv.gaussian_nll(x, m, 0.2), fv.gaussian_nll(*up(x, m), 0.2)),
        (fv.gaussian_nll_optimal(x, m), fv.gaussian_nll_optimal(*up(x, m))),
        (fv.gaussian_nll_loss(x, m, var, reduction="sum"), fv.gaussian_nll_loss(*up(x, m, var), reduction="sum")),
        (fv.rsample(mu, lv, generator=torch.Generator().manual_seed(1)),
         fv.rsample(*up(mu, lv), generator=torch.Generator().manual_seed(1))),
    ]
    for got, want in pairs:
        assert got.dtype == dtype
        torch.testing.assert_close(got.to(F64), want, rtol=tol, atol=tol)
    assert fv.optimal_log_sigma(x, m).dtype == torch.float32  # documented: float32 unless float64 in
    # mixed inputs promote as torch does
    assert fv.kl_normal(mu.float(), lv.double()).dtype == F64
    # a 0-dim log_sigma does not promote, as in torch's own (x - m) * exp(-s)
    s64 = torch.tensor(0.1, dtype=F64)
    assert fv.gaussian_nll(x, m, s64).dtype == ((x - m) * torch.exp(-s64)).dtype == dtype
    assert fv.gaussian_nll(x, m, s64.reshape(1)).dtype == F64


def test_non_contiguous_inputs(gen):
    mu, lv = randn(gen, 5, 8)[:, ::2], randn(gen, 4, 5).t()
    assert not mu.is_contiguous() and not lv.is_contiguous()
    for reduction in ("none", "per_sample", "per_dim", "sum"):
        assert_close(fv.kl_normal(mu, lv, reduction=reduction),
                     fv.kl_normal(mu.contiguous(), lv.contiguous(), reduction=reduction))
    x, m = randn(gen, 3, 4, 6).transpose(1, 2), randn(gen, 3, 6, 4)[..., ::1]
    s = randn(gen, 4, 1).t()  # (1, 4) stride-odd view
    assert_close(fv.gaussian_nll(x, m, s, reduction="none"), fv.gaussian_nll(x.contiguous(), m, s.contiguous(),
                                                                            reduction="none"))
    assert_close(fv.gaussian_nll_optimal(x, m), fv.gaussian_nll_optimal(x.contiguous(), m))
    var = uniform(gen, 4, 6, low=0.1, high=1).t()
    assert_close(fv.gaussian_nll_loss(x, m, var), fv.gaussian_nll_loss(x.contiguous(), m, var.contiguous()))


def test_two_runs_are_bitwise_equal(gen):
    mu, lv, x, m = randn(gen, 33, 17), randn(gen, 33, 17), randn(gen, 33, 17), randn(gen, 33, 17)
    runs = [
        lambda: fv.kl_normal(mu, lv),
        lambda: fv.rsample_kl(mu, lv, generator=torch.Generator().manual_seed(0))[0],
        lambda: fv.gaussian_nll(x, m, 0.1),
        lambda: fv.gaussian_nll_optimal(x, m, per_sample=True),
        lambda: fv.gaussian_nll_loss(x, m, lv.exp()),
    ]
    for run in runs:
        assert torch.equal(run(), run())


# ------------------------------------------------------------------------------------- backends


@pytest.fixture
def no_override(monkeypatch):
    """Step out of this module's use_backend("reference") so the environment decides."""
    monkeypatch.setattr(backend_module._override, "name", None)
    monkeypatch.delenv("FUSEDVAE_BACKEND", raising=False)
    return monkeypatch


def test_backend_default_is_auto_and_cpu_runs_native(no_override):
    assert fv.backend_for(torch.zeros(3)) == "native"
    assert fv.backend_for(torch.zeros(3, device="meta")) == "reference"


@pytest.mark.parametrize("value, expected", [("auto", "native"), ("reference", "reference"),
                                             (" Reference ", "reference"), ("AUTO", "native"), ("native", "native")])
def test_backend_env_values_on_cpu(no_override, value, expected):
    no_override.setenv("FUSEDVAE_BACKEND", value)
    assert fv.backend_for(torch.zeros(3)) == expected
    assert torch.isfinite(fv.kl_normal(torch.randn(2, 3), torch.randn(2, 3)))


def test_backend_env_triton_on_cpu_needs_the_interpreter(no_override):
    no_override.setenv("FUSEDVAE_BACKEND", "triton")
    no_override.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fv.backend_for(torch.zeros(3))
    no_override.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fv.backend_for(torch.zeros(3))
    no_override.setenv("TRITON_INTERPRET", "1")
    if backend_module.triton_available():
        assert fv.backend_for(torch.zeros(3)) == "triton"
    else:
        with pytest.raises(RuntimeError, match="not installed"):
            fv.backend_for(torch.zeros(3))


def test_backend_invalid_name(no_override):
    no_override.setenv("FUSEDVAE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FUSEDVAE_BACKEND.*'cuda'"):
        fv.backend_for(torch.zeros(3))
    with pytest.raises(ValueError, match="FUSEDVAE_BACKEND"):
        fv.kl_normal(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="backend.*'cuda'"):
        with fv.use_backend("cuda"):
            pass  # pragma: no cover
    with fv.use_backend("reference"):  # the context manager overrides even a bad environment
        assert fv.backend_for(torch.zeros(3)) == "reference"


def test_use_backend_nests_and_restores(no_override):
    no_override.setenv("FUSEDVAE_BACKEND", "triton")
    no_override.setenv("TRITON_INTERPRET", "1")
    cpu = torch.zeros(3)
    expected_triton = "triton" if backend_module.triton_available() else None
    with fv.use_backend("reference"):
        assert fv.backend_for(cpu) == "reference"
        with fv.use_backend("auto"):
            assert fv.backend_for(cpu) == "native"
            with fv.use_backend("reference"):
                assert fv.backend_for(cpu) == "reference"
            assert fv.backend_for(cpu) == "native"
        if expected_triton:
            with fv.use_backend("triton"):
                assert fv.backend_for(cpu) == "triton"
        assert fv.backend_for(cpu) == "reference"
        with pytest.raises(KeyError):
            with fv.use_backend("auto"):
                raise KeyError("restored on the way out of an exception")
        assert fv.backend_for(cpu) == "reference"
    assert backend_module._override.name is None
    if expected_triton:
        assert fv.backend_for(cpu) == "triton"  # back to the environment's choice
    no_override.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError):
        fv.backend_for(cpu)


def test_use_backend_is_per_thread(no_override):
    no_override.setenv("FUSEDVAE_BACKEND", "triton")
    no_override.delenv("TRITON_INTERPRET", raising=False)
    seen = {}

    def other_thread():
        try:
            seen["backend"] = fv.backend_for(torch.zeros(3))
        except RuntimeError as error:
            seen["backend"] = error

    with fv.use_backend("reference"):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert fv.backend_for(torch.zeros(3)) == "reference"
    assert isinstance(seen["backend"], RuntimeError)  # the override did not leak into the other thread
