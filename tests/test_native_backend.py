"""The ``native`` backend (``auto`` on a CPU): the reference's values and gradients, torch's noise stream,
the KL's accuracy contract, and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch

import fusedvae as fv
from fusedvae import native


def _grads(backend, fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    with fv.use_backend(backend):
        out = fn(*leaves)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5)) * 0.7 + 1.3
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def _assert_same(fn, *tensors, rtol=2e-5, atol=1e-5):
    out, grads = _grads("native", fn, *tensors)
    ref, ref_grads = _grads("reference", fn, *tensors)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for got, want in zip(grads, ref_grads):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_auto_runs_native_on_cpu_tensors(monkeypatch):
    monkeypatch.delenv("FUSEDVAE_BACKEND", raising=False)
    with fv.use_backend("auto"):
        assert fv.backend_for(torch.zeros(2)) == "native"
        assert fv.backend_for(torch.zeros(2, device="meta")) == "reference"


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none", "per_sample", "per_dim"])
@pytest.mark.parametrize("prior", [None, "element", "dim", "scalar"])
def test_kl_matches_the_reference(gen, reduction, prior):
    mu, lv = torch.randn(37, 11, generator=gen), torch.randn(37, 11, generator=gen)
    shapes = {"element": (37, 11), "dim": (11,), "scalar": ()}
    tensors = [mu, lv]
    if prior:
        tensors += [torch.randn(shapes[prior], generator=gen) * 0.5, torch.randn(shapes[prior], generator=gen) * 0.5]
    _assert_same(lambda *t: fv.kl_normal(*t, reduction=reduction), *tensors)
    # rsample_kl's KL and its gradients, with z left out of the loss (the noise differs between backends)
    _assert_same(lambda *t: fv.rsample_kl(*t, n_samples=2, reduction=reduction)[1], *tensors)


@pytest.mark.parametrize("sigma", [(), (1,), (3, 1, 1), (5, 1, 1, 1), (5, 3, 4, 6)])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none", "per_sample"])
def test_gaussian_nll_matches_the_reference(gen, sigma, reduction):
    x, mean = torch.rand(5, 3, 4, 6, generator=gen), torch.rand(5, 3, 4, 6, generator=gen)
    log_sigma = torch.randn(sigma, generator=gen) * 0.4
    for full in (True, False):
        _assert_same(lambda *t: fv.gaussian_nll(*t, reduction=reduction, full=full), x, mean, log_sigma,  # noqa: B023
                     atol=1e-4)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "none", "per_sample"])
def test_gaussian_nll_optimal_and_loss_match_the_reference(gen, per_sample, reduction):
    x, mean = torch.rand(6, 3, 5, 5, generator=gen), torch.rand(6, 3, 5, 5, generator=gen)
    _assert_same(lambda *t: fv.gaussian_nll_optimal(*t, per_sample=per_sample, reduction=reduction), x, mean,
                 atol=1e-4)
    var = torch.rand(6, 3, 5, 5, generator=gen) + 0.1
    _assert_same(lambda *t: fv.gaussian_nll_loss(*t, reduction="sum" if reduction == "none" else "mean"), mean, x, var)


def test_noise_is_torch_randn_and_reproducible(gen):
    mu, lv = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
    with fv.use_backend("native"):
        torch.manual_seed(7)
        z = fv.rsample(mu, lv, n_samples=3)
        torch.manual_seed(7)
        z_again, _ = fv.rsample_kl(mu, lv, n_samples=3)
        own = torch.Generator().manual_seed(7)
        z_gen = fv.rsample(mu, lv, n_samples=3, generator=own)
    assert torch.equal(z, z_again) and torch.equal(z, z_gen)  # rsample_kl's z is rsample's bit for bit
    torch.manual_seed(7)
    eps = torch.randn(3, 16, 8)  # the stream torch.randn_like draws
    torch.testing.assert_close(z, mu + torch.exp(0.5 * lv) * eps, rtol=1e-6, atol=1e-6)
    with fv.use_backend("native"):
        assert not torch.equal(fv.rsample(mu, lv), fv.rsample(mu, lv))  # the generator advances


def test_sample_gradients(gen):
    mu = torch.randn(9, 4, generator=gen, requires_grad=True)
    lv = torch.randn(9, 4, generator=gen, requires_grad=True)
    with fv.use_backend("native"):
        z = fv.rsample(mu, lv, n_samples=3)
    grad_z = torch.randn(z.shape, generator=gen)
    z.backward(grad_z)
    eps = (z - mu) / torch.exp(0.5 * lv)
    torch.testing.assert_close(mu.grad, grad_z.sum(0))
    torch.testing.assert_close(lv.grad, (grad_z * eps * torch.exp(0.5 * lv) / 2).sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [1e-2, -1e-2, 1e-4, -1e-4, 1e-6, -1e-6])
@pytest.mark.parametrize("op", ["kl_normal", "rsample_kl"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_kl_is_exact_near_a_collapsed_dimension(d, op, reduction):
    """float32 relative error < 1e-5 down to |lv - lv_p| = 1e-6, where the textbook formula returns 0."""
    lv_p = torch.full((64, 8), 0.3)
    lv = (lv_p.double() + d).float()
    mu = torch.zeros(64, 8)
    exact = fv.reference.kl_normal_elementwise(mu.double(), lv.double(), None, lv_p.double())
    for prior in (False, True):
        args = (mu, lv, mu, lv_p) if prior else (mu, (lv.double() - 0.3).float())
        want = exact if prior else fv.reference.kl_normal_elementwise(mu.double(), args[1].double())
        with fv.use_backend("native"):
            got = getattr(fv, op)(*args, reduction=reduction)
        got = got[1] if op == "rsample_kl" else got
        want = want.sum() if reduction == "sum" else want
        assert torch.all((got.double() - want).abs() <= 1e-5 * want.abs()), (prior, got, want)


@pytest.mark.parametrize("scale", [1e-3, 0.05, 0.5, 3.0])
def test_fast_kl_sum_stays_within_the_contract(gen, scale):
    """The fast float32 sum is kept only when its error bound holds; either way the KL is within 1e-5."""
    mu = torch.randn(300, 20, generator=gen) * scale
    lv = torch.randn(300, 20, generator=gen) * scale
    lv_p = torch.randn(20, generator=gen) * scale
    for args in ((mu, lv), (mu, lv, None, lv_p)):
        want = fv.reference.kl_normal_elementwise(*[None if t is None else t.double() for t in args]).sum()
        with fv.use_backend("native"):
            for got in (fv.kl_normal(*args, reduction="sum"), fv.rsample_kl(*args, reduction="sum")[1]):
                assert abs(got.double() - want) <= 1e-5 * want


def test_error_bound_decides_the_path():
    assert native._fast_sum_is_exact(torch.tensor(1000.0), 8192, 1.0)   # mean g ~ 0.12: the fast sum
    assert not native._fast_sum_is_exact(torch.tensor(1e-6), 8192, 1.0)  # collapsed: the float64 path
    assert not native._fast_sum_is_exact(torch.tensor(math.nan), 8192, 1.0)
    # from exp(d) - 1 the bound grows with the element count: kept at a mean sum(g + m) / n of 1, not of 0.05
    assert native._fast_sum_is_exact(torch.tensor(8192.0), 8192, 1.0, from_exp=True)
    assert not native._fast_sum_is_exact(torch.tensor(0.05 * 8192), 8192, 1.0, from_exp=True)
    assert native._fast_sum_is_exact(torch.tensor(0.05 * 8192), 8192, 1.0)


@pytest.mark.parametrize("scale", [2.0, 0.2, 1e-3])  # the exp path, the expm1 path, the float64 path
def test_each_kl_sum_path_gives_the_reference_value_and_gradients(gen, scale):
    mu = torch.randn(64, 16, generator=gen, dtype=torch.float64) * scale
    lv = torch.randn(64, 16, generator=gen, dtype=torch.float64) * scale
    lv_p = torch.randn(16, generator=gen, dtype=torch.float64) * scale
    for args in ((mu, lv), (mu, lv, torch.zeros(16, dtype=torch.float64), lv_p)):
        leaves = [t.float().requires_grad_(True) for t in args]
        with fv.use_backend("native"):
            kl = fv.kl_normal(*leaves, reduction="batchmean")
        kl.backward()
        exact = [t.clone().requires_grad_(True) for t in args]
        want = fv.reference.kl_normal_elementwise(*exact).sum() / 64
        want.backward()
        assert abs(kl.double() - want) <= 1e-5 * want
        for got, ref in zip(leaves, exact):  # e^d - 1 from float32 exp: within ~1e-7 absolute, as torch's formula
            torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-5, atol=1e-7 / 64)


def test_one_sample_has_no_sample_dimension_and_torchs_stream(gen):
    mu = torch.randn(6, 5, generator=gen, requires_grad=True)
    lv = torch.randn(6, 5, generator=gen, requires_grad=True)
    with fv.use_backend("native"):
        torch.manual_seed(11)
        z, kl = fv.rsample_kl(mu, lv)
        torch.manual_seed(11)
        z_alone = fv.rsample(mu, lv)
    torch.manual_seed(11)
    eps = torch.randn_like(mu)
    assert z.shape == mu.shape and torch.equal(z, z_alone)
    torch.testing.assert_close(z, mu + torch.exp(0.5 * lv) * eps, rtol=1e-6, atol=1e-6)
    grad_z = torch.randn(z.shape, generator=gen)
    torch.autograd.backward([z, kl], [grad_z, torch.ones(())])
    torch.testing.assert_close(mu.grad, grad_z + mu.detach() / 6)
    want_lv = grad_z * eps * torch.exp(0.5 * lv.detach()) / 2 + torch.expm1(lv.detach()) / 12
    torch.testing.assert_close(lv.grad, want_lv, rtol=1e-5, atol=1e-6)


def test_finite_at_extreme_log_scales():
    for value in (80.0, -80.0):
        lv = torch.full((4, 3), value, requires_grad=True)
        mu = torch.zeros(4, 3, requires_grad=True)
        with fv.use_backend("native"):
            z, kl = fv.rsample_kl(mu, lv, torch.zeros(3), torch.full((3,), value / 2))
            (kl + z.sum() * 0).backward()
        assert torch.isfinite(kl) and torch.isfinite(lv.grad).all()
        x, mean = torch.full((2, 5), 1e-32), torch.zeros(2, 5, requires_grad=True)
        log_sigma = torch.tensor(value, requires_grad=True)
        with fv.use_backend("native"):
            nll = fv.gaussian_nll(x, mean, log_sigma)
            nll.backward()
        assert torch.isfinite(nll) and torch.isfinite(log_sigma.grad) and torch.isfinite(mean.grad).all()


def test_half_precision_inputs_give_half_results(gen):
    mu, lv = torch.randn(8, 4, generator=gen).bfloat16(), torch.randn(8, 4, generator=gen).bfloat16()
    with fv.use_backend("native"):
        z, kl = fv.rsample_kl(mu, lv)
        assert z.dtype == torch.bfloat16 and kl.dtype == torch.bfloat16
        with fv.use_backend("reference"):
            want = fv.kl_normal(mu, lv)
        torch.testing.assert_close(kl, want)


def test_under_torch_compile_matches_eager(gen):
    import torch._inductor.config

    mu, lv = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    x, mean = torch.rand(8, 3, generator=gen), torch.rand(8, 3, generator=gen)

    def loss(mu, lv, x, mean):
        z, kl = fv.rsample_kl(mu, lv, torch.zeros(6), torch.zeros(6))
        return fv.gaussian_nll(x, mean, torch.zeros(())) + kl + z.square().mean()

    with fv.use_backend("native"), torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        results = []
        for fn in (loss, compiled):
            leaves = [t.clone().requires_grad_(True) for t in (mu, lv, x, mean)]
            torch.manual_seed(3)
            value = fn(*leaves)
            value.backward()
            results.append((value.detach(), [t.grad for t in leaves]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("var_shape, target_shape", [((6, 3, 5, 5), (6, 3, 5, 5)), ((1, 3, 1, 1), (3, 5, 5)),
                                                     ((6, 1, 1, 1), (6, 3, 5, 5)), ((6, 3, 5), (6, 3, 5, 5))])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
def test_gaussian_nll_loss_broadcasts_as_the_reference(gen, var_shape, target_shape, reduction):
    mean, x = torch.rand(6, 3, 5, 5, generator=gen), torch.rand(target_shape, generator=gen)
    var = torch.rand(var_shape, generator=gen) + 0.05
    var.view(-1)[0] = 1e-9  # clamped at eps, its gradient still flows (as in torch)
    for full in (False, True):
        _assert_same(lambda *t: fv.gaussian_nll_loss(*t, full=full, reduction=reduction, check_var=False),  # noqa: B023
                     mean, x, var,
                     rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_samples", [None, 2])
def test_learned_prior_sample_is_rsamples_and_its_gradients_are_exact(gen, n_samples):
    mu = torch.randn(12, 6, generator=gen, requires_grad=True)
    lv = torch.randn(12, 6, generator=gen, requires_grad=True)
    prior_mu = torch.randn(6, generator=gen, requires_grad=True)
    prior_lv = (torch.randn(6, generator=gen) * 0.3).requires_grad_(True)
    with fv.use_backend("native"):
        torch.manual_seed(5)
        z, kl = fv.rsample_kl(mu, lv, prior_mu, prior_lv, n_samples=n_samples)
        torch.manual_seed(5)
        alone = fv.rsample(mu, lv, n_samples=n_samples)
    assert torch.equal(z, alone)  # bit for bit, as documented
    grad_z = torch.randn(z.shape, generator=gen)
    got = torch.autograd.grad([z, kl], [mu, lv, prior_mu, prior_lv], [grad_z, torch.ones(())])
    eps = ((z - mu) / torch.exp(0.5 * lv)).detach()
    leaves = [t.detach().double().requires_grad_(True) for t in (mu, lv, prior_mu, prior_lv)]
    want_z = leaves[0] + eps.double() * torch.exp(0.5 * leaves[1])
    want_kl = fv.reference.kl_normal_elementwise(*leaves).sum() / 12
    want = torch.autograd.grad([want_z, want_kl], leaves, [grad_z.double(), torch.ones((), dtype=torch.float64)])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
