"""Checks that the noise and KL tests of several files share (imported by name, as ``float64_inputs`` is)."""

from __future__ import annotations

import math

import torch

import fusedvae as fv
from fusedvae import reference

F64 = torch.float64


def assert_standard_normal(x: torch.Tensor, tails=(1.0, 2.0, 3.0)) -> None:
    """Moments, Kolmogorov-Smirnov, tail counts beyond ``tails`` sigma and lag-1..8 correlations of 1-D ``x``.

    Each bound is ~5 standard errors (the KS one ``sqrt(n) D < 1.95``: p = 0.001), so a correct generator
    fails about once in a thousand seeds, a wrong one at any n worth testing.
    """
    x = x.double().flatten()
    n = x.numel()
    mean, var = x.mean().item(), x.var().item()
    standard = (x - mean) / var**0.5
    assert abs(mean) < 5 / n**0.5
    assert abs(var - 1) < 5 * (2 / n) ** 0.5
    assert abs((standard**3).mean().item()) < 5 * (6 / n) ** 0.5
    assert abs((standard**4).mean().item() - 3) < 5 * (24 / n) ** 0.5
    cdf = torch.special.ndtr(x.sort().values)
    grid = torch.arange(1, n + 1, dtype=F64) / n
    d = torch.maximum(grid - cdf, cdf - (grid - 1 / n)).max().item()
    assert d * n**0.5 < 1.95, d * n**0.5
    for t in tails:  # the count beyond t sigma is binomial(n, 2 (1 - Phi(t)))
        p = math.erfc(t / 2**0.5)
        count = (x.abs() > t).sum().item()
        assert abs(count - n * p) < 5 * (n * p * (1 - p)) ** 0.5 + 1, (t, count, n * p)
    for lag in range(1, 9):  # logical neighbours 1..8 apart (one Philox block is 4 wide)
        r = torch.corrcoef(torch.stack([x[:-lag], x[lag:]]))[0, 1].item()
        assert abs(r) < 5 / n**0.5, (lag, r)


def assert_kl_finite_and_accurate_to_logvar_80(gen: torch.Generator, device) -> None:
    """``fv.rsample_kl`` on the triton backend with |logvar| up to 80, standard and learned prior: z, KL and
    gradients finite, the elementwise KL within twice the eager float32 error of the float64 value (+1e-6)."""
    lv = torch.cat([torch.linspace(-80, 80, 41, dtype=F64), torch.tensor([-80.0, 80.0], dtype=F64)])
    lv = lv.reshape(1, -1).expand(3, -1).float().to(device).requires_grad_()
    mu = torch.randn(tuple(lv.shape), generator=gen, dtype=F64).float().to(device).requires_grad_()
    # a prior log-variance in [-3, 3]: d = lv - lv_p stays within float32's exp range (|d| < 88)
    plv = (torch.rand(lv.shape[1], generator=gen, dtype=F64) * 6 - 3).float().to(device).requires_grad_()
    with fv.use_backend("triton"):
        for prior in (None, plv):
            z, kl = fv.rsample_kl(mu, lv, None, prior, n_samples=2, reduction="none")
            grads = torch.autograd.grad([z.sum(), kl.sum()], [mu, lv] + ([] if prior is None else [prior]))
            for t in (z, kl, *grads):
                assert torch.isfinite(t).all()
            up = (lambda t: None if t is None else t.detach().double())  # noqa: E731
            exact = reference.kl_normal_elementwise(up(mu), up(lv), None, up(prior))
            eager = reference.kl_normal_elementwise(mu.detach(), lv.detach(), None, prior)
            # elementwise relative errors: the values span e^-80 .. e^80
            kernel_err = ((kl.double() - exact) / exact).abs().max().item()
            eager_err = ((eager.double() - exact) / exact).abs().max().item()
            assert kernel_err <= 2 * eager_err + 1e-6, (kernel_err, eager_err)


def assert_kl_accurate_near_collapse(prior_logvar: float | None, device) -> None:
    """``fv.kl_normal`` (triton backend, float32) and its logvar gradient for |d| from 1e-6 up through the series
    cutoff: relative error < 1e-5 (the textbook form has 100%)."""
    magnitudes = torch.logspace(-6, 0.3, 120, dtype=F64)
    d64 = torch.cat([magnitudes, -magnitudes, torch.tensor([0.4999, 0.5, 0.5001, -0.4999, -0.5, -0.5001], dtype=F64)])
    base = 0.0 if prior_logvar is None else prior_logvar
    plv = None if prior_logvar is None else torch.full_like(d64, base).float().to(device)
    lv = (base + d64).float().to(device).requires_grad_()
    mu = torch.zeros_like(lv)
    # the d the kernel sees: lv - lv_p is exact in float32 here (Sterbenz), so this is exact
    d = lv.detach().double() - (0.0 if plv is None else plv.double())
    exact_g = torch.expm1(d) - d
    with fv.use_backend("triton"):
        kl = fv.kl_normal(mu, lv, None, plv, reduction="none")
        grad_out = torch.linspace(0.5, 1.5, kl.numel(), device=device).reshape(kl.shape)
        (dlv,) = torch.autograd.grad(kl, lv, grad_out)
    rel = ((kl.double() - 0.5 * exact_g).abs() / (0.5 * exact_g)).max().item()
    assert rel < 1e-5, rel
    exact_dlv = grad_out.double() * 0.5 * torch.expm1(d)
    rel_grad = ((dlv.double() - exact_dlv).abs() / exact_dlv.abs()).max().item()
    assert rel_grad < 1e-5, rel_grad
