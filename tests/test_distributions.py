"""fusedvae.distributions against torch.distributions: values, gradients, shapes, the noise, the exact KL.

Every test that runs an op runs on the PyTorch reference and on the Triton kernels (through
Triton's interpreter without a GPU). Values are compared in float64 at a tight tolerance, except
where float32 is the point (the KL near collapse).
"""

from __future__ import annotations

import doctest
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributions as TD

import fusedvae as fv
import fusedvae.distributions as D

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


def _params(gen, *shape, dtype=F64, grad=True):
    loc = torch.randn(shape, generator=gen, dtype=dtype)
    logvar = torch.randn(shape, generator=gen, dtype=dtype)
    return loc.requires_grad_(grad), logvar.requires_grad_(grad)


def _pair(loc, logvar, form):
    """(fusedvae Normal, torch Normal) of the same parameters; ``form`` picks how fusedvae's is built."""
    scale = torch.exp(0.5 * logvar)
    ours = D.Normal(loc, logvar=logvar) if form == "logvar" else D.Normal(loc, scale)
    return ours, TD.Normal(loc, scale)


def _grads(out, inputs, weights):
    # retain_graph: the torch and fusedvae distributions under comparison share their scale's graph
    return torch.autograd.grad(out, inputs, weights, allow_unused=True, retain_graph=True)


# ---------------------------------------------------------------------------------------------- construction


def test_is_a_torch_normal_and_other_names_are_torchs():
    q = D.Normal(torch.zeros(3), torch.ones(3))
    assert isinstance(q, TD.Normal) and isinstance(q, TD.Distribution) and q.has_rsample
    assert D.Independent is TD.Independent and D.Bernoulli is TD.Bernoulli and D.constraints is TD.constraints
    with pytest.raises(AttributeError, match="no_such_name"):
        D.no_such_name  # noqa: B018
    d = D.DiagonalNormal(torch.zeros(2, 3), torch.ones(2, 3))
    assert isinstance(d, TD.Independent) and isinstance(d.base_dist, D.Normal)


def test_constructor_needs_exactly_one_of_scale_and_logvar():
    with pytest.raises(TypeError, match="scale and logvar, got neither"):
        D.Normal(torch.zeros(3))
    with pytest.raises(TypeError, match="got both"):
        D.Normal(torch.zeros(3), torch.ones(3), logvar=torch.zeros(3))
    with pytest.raises(ValueError, match="scale"):  # torch's validation, unchanged
        D.Normal(torch.zeros(3), -torch.ones(3), validate_args=True)
    with pytest.raises(ValueError, match="event_dims"):
        D.DiagonalNormal(torch.zeros(2, 3), torch.ones(2, 3), event_dims=3)


@pytest.mark.parametrize("loc_shape, param_shape", [((4, 3), (4, 3)), ((3,), (4, 3)), ((4, 1), (3,)), ((), ())])
def test_shapes_and_broadcasting_match_torch(gen, loc_shape, param_shape):
    loc = torch.randn(loc_shape, generator=gen, dtype=F64)
    logvar = torch.randn(param_shape, generator=gen, dtype=F64)
    ours, theirs = D.Normal(loc, logvar=logvar), TD.Normal(loc, torch.exp(0.5 * logvar))
    for a, b in ((ours, theirs), (D.Normal(loc, torch.exp(0.5 * logvar)), theirs)):
        assert a.batch_shape == b.batch_shape and a.event_shape == b.event_shape == ()
        for name in ("mean", "mode", "stddev", "variance", "loc", "scale"):
            got, want = getattr(a, name), getattr(b, name)
            assert got.shape == want.shape, name
            torch.testing.assert_close(got, want, **TIGHT)
    assert ours.logvar is not None and ours.logvar.shape == theirs.batch_shape
    assert D.Normal(0.0, 1.0).batch_shape == TD.Normal(0.0, 1.0).batch_shape == ()
    assert D.Normal(0.0, logvar=0.0).scale.item() == 1.0


def test_shapes_that_do_not_broadcast_raise_torchs_class():
    ours = D.Normal(torch.zeros(3), torch.ones(3), validate_args=False)
    theirs = TD.Normal(torch.zeros(3), torch.ones(3), validate_args=False)
    for p, q in ((ours, TD.Normal(torch.zeros(2), torch.ones(2))), (theirs, D.Normal(torch.zeros(2), torch.ones(2)))):
        with pytest.raises(RuntimeError):
            TD.kl_divergence(theirs, TD.Normal(torch.zeros(2), torch.ones(2)))
        with pytest.raises(RuntimeError, match=r"batch_shape \(3,\) does not broadcast") as info:
            D.kl_divergence(p, q)
        assert isinstance(info.value, ValueError)
    with pytest.raises(RuntimeError):
        theirs.log_prob(torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"value \(2,\)") as info:
        ours.log_prob(torch.zeros(2))
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError):  # with validation, torch's own check comes first, in both
        D.Normal(torch.zeros(3), torch.ones(3)).log_prob(torch.zeros(2))


def test_expand_matches_torch(gen):
    loc, logvar = _params(gen, 3, grad=False)
    for form in ("logvar", "scale"):
        ours, theirs = _pair(loc, logvar, form)
        big, big_theirs = ours.expand((2, 3)), theirs.expand((2, 3))
        assert type(big) is D.Normal and big.batch_shape == big_theirs.batch_shape == (2, 3)
        torch.testing.assert_close(big.logvar, logvar.expand(2, 3), **TIGHT)
        x = torch.randn(5, 2, 3, generator=gen, dtype=F64)
        torch.testing.assert_close(big.log_prob(x), big_theirs.log_prob(x), **TIGHT)
        assert big.rsample((4,)).shape == (4, 2, 3) and big._validate_args == ours._validate_args
    d = D.DiagonalNormal(loc, logvar=logvar)
    big = d.expand((5,))
    assert type(big) is D.DiagonalNormal and big.batch_shape == (5,) and big.event_shape == (3,)
    assert type(big.base_dist) is D.Normal and big.logvar.shape == (5, 3)


# ---------------------------------------------------------------------------------------------- values, gradients


@pytest.mark.parametrize("form", ["logvar", "scale"])
@pytest.mark.usefixtures("backend")
def test_log_prob_entropy_cdf_values_and_gradients_match_torch(gen, form):
    loc, logvar = _params(gen, 4, 3)
    ours, theirs = _pair(loc, logvar, form)
    value = torch.randn(2, 4, 3, generator=gen, dtype=F64, requires_grad=True)  # sample dims broadcast
    for method, args in (("log_prob", (value,)), ("log_prob", (value[0, 0],)), ("entropy", ()), ("cdf", (value,))):
        got, want = getattr(ours, method)(*args), getattr(theirs, method)(*args)
        assert got.shape == want.shape and got.dtype == want.dtype, method
        torch.testing.assert_close(got, want, **TIGHT)
        inputs = (loc, logvar, value)
        weights = torch.rand(want.shape, generator=gen, dtype=F64) + 0.5  # a grad_output that is not 1
        for a, b in zip(_grads(got, inputs, weights), _grads(want, inputs, weights)):
            if b is None:
                assert a is None or (a == 0).all()
            else:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # a Python number, which torch scores when validation is off
    lenient = D.Normal(loc, logvar=logvar, validate_args=False)
    torch.testing.assert_close(lenient.log_prob(0.1), TD.Normal(loc, theirs.scale, validate_args=False).log_prob(0.1),
                               **TIGHT)


@pytest.mark.usefixtures("backend")
def test_log_prob_float32_and_a_float64_value():
    gen = torch.Generator().manual_seed(1)
    loc, logvar = _params(gen, 5, 2, dtype=torch.float32)
    ours, theirs = _pair(loc, logvar, "logvar")
    x = torch.randn(5, 2, generator=gen)
    torch.testing.assert_close(ours.log_prob(x), theirs.log_prob(x), rtol=1e-5, atol=1e-5)
    assert ours.log_prob(x.double()).dtype == theirs.log_prob(x.double()).dtype == F64


# ---------------------------------------------------------------------------------------------- rsample


@pytest.mark.parametrize("sample_shape", [(), (3,), (2, 3), [2], torch.Size([1, 1])])
@pytest.mark.usefixtures("backend")
def test_rsample_shapes_match_torch(gen, sample_shape):
    loc, logvar = _params(gen, 4, 3, dtype=torch.float32)
    ours, theirs = _pair(loc, logvar, "logvar")
    z = ours.rsample(sample_shape)
    assert z.shape == theirs.rsample(sample_shape).shape and z.dtype == loc.dtype and z.requires_grad
    s = ours.sample(sample_shape)
    assert s.shape == z.shape and not s.requires_grad
    assert D.DiagonalNormal(loc, logvar=logvar).rsample(sample_shape).shape == z.shape
    empty = ours.rsample((0, 2))
    assert empty.shape == (0, 2, 4, 3)


@pytest.mark.parametrize("form", ["logvar", "scale"])
@pytest.mark.usefixtures("backend")
def test_rsample_statistics(gen, form):
    loc, logvar = _params(gen, 3, 4, dtype=torch.float32, grad=False)
    logvar = 2.0 * logvar  # scales from about e^-3 to e^3
    ours, theirs = _pair(loc, logvar, form)
    n = 2000
    z = ours.rsample((n,))
    eps = ((z - loc) / theirs.scale).double()
    count = eps.numel()
    assert abs(eps.mean().item()) < 5 / count**0.5
    assert abs(eps.std().item() - 1) < 5 / (2 * count) ** 0.5
    assert abs((eps**3).mean().item()) < 5 * (15 / count) ** 0.5
    # every element has its own mean and spread, not just the pool
    per_element = eps.std(0)
    assert (per_element - 1).abs().max().item() < 6 / (2 * n) ** 0.5
    assert eps.mean(0).abs().max().item() < 6 / n**0.5
    # the sample draws are independent: no correlation between consecutive samples
    assert abs((eps[1:] * eps[:-1]).mean().item()) < 5 / count**0.5


@pytest.mark.parametrize("form", ["logvar", "scale"])
@pytest.mark.usefixtures("backend")
def test_rsample_gradients_equal_torchs_on_the_same_noise(gen, form):
    loc, logvar = _params(gen, 3, 4)
    ours, theirs = _pair(loc, logvar, form)
    z = ours.rsample((2,))
    eps = ((z - loc) / theirs.scale).detach()  # the noise fusedvae drew
    torch_z = loc + eps * theirs.scale  # torch's rsample on that noise
    torch.testing.assert_close(z, torch_z, **TIGHT)
    weights = torch.rand(z.shape, generator=gen, dtype=F64) + 0.5
    got, want = _grads(z, (loc, logvar), weights), _grads(torch_z, (loc, logvar), weights)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(got[0], weights.sum(0), **TIGHT)  # dz/dloc = 1
    # from a scale leaf, dz/dscale = eps
    scale = torch.exp(0.5 * logvar).detach().requires_grad_()
    z = D.Normal(loc, scale).rsample()
    (grad,) = torch.autograd.grad(z, scale, weights[0])
    torch.testing.assert_close(grad, weights[0] * (z - loc).detach() / scale.detach(), rtol=1e-9, atol=1e-11)


@pytest.mark.usefixtures("backend")
def test_rsample_is_reproducible_and_fresh():
    q = D.Normal(torch.zeros(2, 5), logvar=torch.zeros(2, 5))
    torch.manual_seed(3)
    a = q.rsample((2,))
    torch.manual_seed(3)
    assert torch.equal(q.rsample((2,)), a)
    assert not torch.equal(q.rsample((2,)), a)
    assert not torch.equal(a[0], a[1])
    b = q.sample((2,), generator=torch.Generator().manual_seed(4))
    assert torch.equal(q.rsample((2,), generator=torch.Generator().manual_seed(4)), b)
    # the first of K samples is fusedvae's single sample under the same key
    torch.manual_seed(5)
    single = fv.rsample(q.loc, q.logvar, n_samples=3)
    torch.manual_seed(5)
    assert torch.equal(q.rsample((3,)), single)


# ---------------------------------------------------------------------------------------------- kl_divergence


def test_kl_dispatch_picks_fusedvae_for_every_pair_with_a_fusedvae_side():
    ours, theirs = D.Normal(0.0, 1.0), TD.Normal(0.0, 1.0)
    from torch.distributions.kl import _dispatch_kl

    for p, q in ((ours, ours), (ours, theirs), (theirs, ours)):
        assert _dispatch_kl(type(p), type(q)) is D._kl_normal
    assert _dispatch_kl(TD.Normal, TD.Normal) is not D._kl_normal  # torch's own pair is left alone
    diag = D.DiagonalNormal(torch.zeros(3), torch.ones(3))
    assert _dispatch_kl(type(diag), type(diag)) is D._kl_diagonal_normal


@pytest.mark.parametrize(
    "pair", ["fused-fused", "fused-torch", "torch-fused", "fused-torch-scale"],
)
@pytest.mark.parametrize("p_shape, q_shape", [((4, 3), (4, 3)), ((4, 3), (3,)), ((3,), (4, 3)), ((), (2,))])
@pytest.mark.usefixtures("backend")
def test_kl_values_gradients_and_shapes_match_torch(gen, pair, p_shape, q_shape):
    p_loc, p_logvar = _params(gen, *p_shape)
    q_loc, q_logvar = _params(gen, *q_shape)
    p_scale, q_scale = torch.exp(0.5 * p_logvar), torch.exp(0.5 * q_logvar)
    kinds = pair.split("-")
    p = D.Normal(p_loc, logvar=p_logvar) if kinds[0] == "fused" else TD.Normal(p_loc, p_scale)
    if kinds[1] == "fused":
        q = D.Normal(q_loc, logvar=q_logvar)
    else:
        q = (D.Normal if len(kinds) == 3 else TD.Normal)(q_loc, q_scale)
    got = D.kl_divergence(p, q)
    want = TD.kl_divergence(TD.Normal(p_loc, p_scale), TD.Normal(q_loc, q_scale))
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    inputs = (p_loc, p_logvar, q_loc, q_logvar)
    weights = torch.rand(want.shape, generator=gen, dtype=F64) + 0.5
    for a, b in zip(_grads(got, inputs, weights), _grads(want, inputs, weights)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.usefixtures("backend")
def test_kl_near_collapse_is_exact_where_torchs_formula_is_not():
    gen = torch.Generator().manual_seed(6)
    # a posterior a hair away from N(0, 1): KL = 0.5 (mu^2 + g(lv)), g(d) = exp(d) - 1 - d ~ d^2 / 2
    mu = 1e-4 * torch.randn(64, generator=gen, dtype=F64)
    logvar = 1e-4 * torch.randn(64, generator=gen, dtype=F64)
    exact = 0.5 * (mu**2 + torch.expm1(logvar) - logvar)
    mu32, logvar32 = mu.float(), logvar.float()
    prior = TD.Normal(torch.zeros(64), torch.ones(64))
    rel = lambda v: ((v.double() - exact).abs() / exact).max().item()  # noqa: E731
    torchs = rel(TD.kl_divergence(TD.Normal(mu32, torch.exp(0.5 * logvar32)), prior))
    ours = rel(D.kl_divergence(D.Normal(mu32, logvar=logvar32), prior))
    assert ours < 1e-5 and torchs > 0.1, (ours, torchs)
    # also the reverse order, and a fusedvae prior
    reverse_exact = 0.5 * (mu**2 * torch.exp(-logvar) + torch.expm1(-logvar) + logvar)
    reverse = D.kl_divergence(D.Normal(0.0, logvar=torch.zeros(64)), D.Normal(mu32, logvar=logvar32)).double()
    assert ((reverse - reverse_exact).abs() / reverse_exact).max().item() < 1e-4
    # built from scale, the log round trip costs some digits but not the value
    assert rel(D.kl_divergence(D.Normal(mu32, torch.exp(0.5 * logvar32)), prior)) < 1e-2


@pytest.mark.usefixtures("backend")
def test_diagonal_normal_equals_independent_of_normal(gen):
    loc, logvar = _params(gen, 2, 3, 4)
    q_loc, q_logvar = _params(gen, 3, 4)
    for k in (1, 2):
        ours = D.DiagonalNormal(loc, logvar=logvar, event_dims=k)
        theirs = TD.Independent(TD.Normal(loc, torch.exp(0.5 * logvar)), k)
        prior_ours = D.DiagonalNormal(q_loc, logvar=q_logvar, event_dims=k)
        prior_theirs = TD.Independent(TD.Normal(q_loc, torch.exp(0.5 * q_logvar)), k)
        assert ours.batch_shape == theirs.batch_shape and ours.event_shape == theirs.event_shape
        x = torch.randn(5, 2, 3, 4, generator=gen, dtype=F64)
        torch.testing.assert_close(ours.log_prob(x), theirs.log_prob(x), **TIGHT)
        torch.testing.assert_close(ours.entropy(), theirs.entropy(), **TIGHT)
        want = TD.kl_divergence(theirs, prior_theirs)
        for got in (D.kl_divergence(ours, prior_ours), D.kl_divergence(ours, prior_theirs),
                    D.kl_divergence(TD.Independent(D.Normal(loc, logvar=logvar), k), prior_theirs)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
        weights = torch.rand(want.shape, generator=gen, dtype=F64) + 0.5
        inputs = (loc, logvar, q_loc, q_logvar)
        got = _grads(D.kl_divergence(ours, prior_ours), inputs, weights)
        for a, b in zip(got, _grads(want, inputs, weights)):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    with pytest.raises(NotImplementedError):
        D.kl_divergence(D.DiagonalNormal(loc, logvar=logvar, event_dims=1),
                        D.DiagonalNormal(loc, logvar=logvar, event_dims=2))


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.usefixtures("backend")
def test_the_torch_distributions_way_compiles_with_fullgraph(compiler):
    """Normal, Independent, rsample, kl_divergence, log_prob: one graph, eager's numbers and noise.

    (torch's own kl_divergence cannot be traced with fullgraph=True: its rule lookup calls ``min``
    on a generator. fusedvae.distributions.kl_divergence calls fusedvae's rules directly.)
    """
    import fusedvae.kernels  # noqa: F401  registers the fusedvae:: custom ops

    def step(loc, logvar, x):
        q = D.Independent(D.Normal(loc, logvar=logvar), 1)
        prior = D.Independent(D.Normal(torch.zeros_like(loc), torch.ones_like(loc)), 1)
        z = q.rsample()
        return (D.kl_divergence(q, prior) - D.Normal(z, 1.0).log_prob(x).sum(-1)).mean(), z

    gen = torch.Generator().manual_seed(7)
    loc, logvar = _params(gen, 4, 3, dtype=torch.float32)
    x = torch.randn(4, 3, generator=gen)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(step, fullgraph=True, backend=compiler)
        torch.manual_seed(8)
        loss, z = compiled(loc, logvar, x)
        grads = torch.autograd.grad(loss, (loc, logvar))
    finally:
        torch._dynamo.reset()
    torch.manual_seed(8)
    eager_loss, eager_z = step(loc, logvar, x)
    assert torch.equal(z, eager_z)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, torch.autograd.grad(eager_loss, (loc, logvar))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kl_divergence_is_torchs_for_every_pair(gen):
    loc, logvar = _params(gen, 2, 3)
    pairs = [
        (D.Normal(loc, logvar=logvar), TD.Normal(0.5, 2.0)),
        (TD.Normal(loc, 1.5), D.Normal(loc.flip(0), logvar=logvar)),
        (D.DiagonalNormal(loc, logvar=logvar), TD.Independent(TD.Normal(loc * 0, 1.0), 1)),
        (TD.Independent(TD.Normal(loc, 1.0), 2), D.DiagonalNormal(loc.flip(1), logvar=logvar, event_dims=2)),
        (TD.Normal(loc, 1.0), TD.Normal(0.0, 1.0)),  # torch's own pair: torch's function
        (TD.Bernoulli(0.3), TD.Bernoulli(0.6)),
    ]
    for p, q in pairs:
        torch.testing.assert_close(D.kl_divergence(p, q), TD.kl_divergence(p, q), **TIGHT)
    with pytest.raises(NotImplementedError):
        D.kl_divergence(D.DiagonalNormal(loc, logvar=logvar), D.DiagonalNormal(loc, logvar=logvar, event_dims=2))


def test_docstring_examples():
    result = doctest.testmod(D, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------- the example


def test_the_distributions_example_trains_with_either_import(tmp_path):
    example = Path(__file__).resolve().parent.parent / "examples" / "train_distributions_vae.py"
    done = subprocess.run([sys.executable, str(example), "--steps", "30", "--log-every", "10"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    finals = {}
    for line in done.stdout.splitlines():
        if line.startswith("final"):
            _, name, loss, first = line.split()
            finals[name] = (float(loss), float(first))
    assert set(finals) == {"torch.distributions", "fusedvae.distributions"}, done.stdout
    for name, (loss, first) in finals.items():
        assert math.isfinite(loss) and loss < first, (name, loss, first)  # it trains
