"""The one accuracy comparator of the kernels, shared by the test suite and ``python -m fusedvae.parity``.

A backend's result passes when its error against the float64 reference is at most twice the error
of the eager reference run in the same dtype, plus a floor of a few units in the last place::

    |kernel - exact| <= 2 |eager - exact| + floor * max|exact|      (max over elements)

Twice the eager error, because the eager reference is what a user would run instead: a kernel may
round differently, but not be less accurate. Also the closed-form KL the tests compare against.
"""

from __future__ import annotations

import math

import torch

__all__ = ["assert_within_twice_eager", "errors_against_exact", "kl_closed_form"]


def errors_against_exact(kernel: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """``(kernel error, eager error)``, each ``max|value - exact| / max|exact|`` over the finite elements of ``exact``.

    The kernel's error is infinite when its non-finite elements are not exactly those of ``exact``
    (a NaN from an unwritten element, an overflow the reference does not have). A zero ``exact``
    gives absolute errors. Example::

        >>> exact = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> kernel_err, eager_err = errors_against_exact(exact + 1e-6, exact.float(), exact)
        >>> round(kernel_err, 9), eager_err
        (5e-07, 0.0)
    """
    k, e, x = kernel.detach().double().cpu(), eager.detach().double().cpu(), exact.detach().double().cpu()
    finite = torch.isfinite(x)
    if not torch.equal(torch.isfinite(k), finite):
        return math.inf, 0.0
    if not finite.any():
        return 0.0, 0.0
    k, e, x = k[finite], e[finite], x[finite]
    scale = x.abs().max().item()
    scale = scale if scale > 0 else 1.0
    return (k - x).abs().max().item() / scale, (e - x).abs().max().item() / scale


def assert_within_twice_eager(
    name: str,
    kernel: torch.Tensor,
    eager: torch.Tensor,
    exact: torch.Tensor,
    dtype: torch.dtype,
    atol_ulps: float = 8.0,
) -> None:
    """Raise AssertionError unless ``kernel`` is within twice ``eager``'s error of ``exact`` plus ``atol_ulps`` ulps.

    ``kernel`` and ``eager`` must have ``exact``'s shape and the same dtype; ``dtype`` sets the ulp
    (the compute dtype, or the half dtype of a half-precision result). Example::

        >>> exact = torch.linspace(1, 2, 5, dtype=torch.float64)
        >>> assert_within_twice_eager("x", exact.float(), exact.float(), exact, torch.float32)
    """
    assert kernel.shape == exact.shape and eager.shape == exact.shape, (name, kernel.shape, eager.shape, exact.shape)
    assert kernel.dtype == eager.dtype, (name, kernel.dtype, eager.dtype)
    if exact.numel() == 0:
        return
    kernel_err, eager_err = errors_against_exact(kernel, eager, exact)
    floor = atol_ulps * torch.finfo(dtype).eps
    assert kernel_err <= 2.0 * eager_err + floor, (
        f"{name}: kernel error {kernel_err:.3e} > 2 x eager {eager_err:.3e} + {floor:.3e} (relative to max|exact|)"
    )


def kl_closed_form(mu, lv, mu_p=0.0, lv_p=0.0) -> torch.Tensor:
    """Textbook KL(N(mu, e^lv) || N(mu_p, e^lv_p)) per element: accurate in float64 away from a collapsed dimension.

    Example::

        >>> kl_closed_form(torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
        tensor([0., 0.], dtype=torch.float64)
    """
    mu_p = torch.as_tensor(mu_p, dtype=mu.dtype)
    lv_p = torch.as_tensor(lv_p, dtype=mu.dtype)
    return 0.5 * (lv_p - lv + (torch.exp(lv) + (mu - mu_p) ** 2) / torch.exp(lv_p) - 1.0)
