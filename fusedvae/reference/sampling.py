"""Reparameterized sampling ``z = mu + exp(lv/2) * eps`` with Philox noise, and the fused sample + KL."""

from __future__ import annotations

import torch

from ..precision import compute_dtype, result_dtype
from ..reductions import reduce
from .kl import kl_normal_elementwise
from .philox import philox_normal


# Under torch.compile the noise is one opaque op: inductor, left to lower philox_normal's ten rounds
# of int64 arithmetic itself, inlines every intermediate into each use and does not finish (over
# 15 minutes on a 256 x 32 input, CPU). Eager calls run philox_normal directly.
@torch.library.custom_op("fusedvae::reference_philox_normal", mutates_args=())
def _philox_normal_op(seed: int, offset: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return philox_normal(seed, offset, numel, dtype=dtype, device=device)


@_philox_normal_op.register_fake
def _(seed: int, offset: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype, device=device)


def _noise(seed: int, offset: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _philox_normal_op(seed, offset, numel, dtype, device)
    return philox_normal(seed, offset, numel, dtype=dtype, device=device)


def rsample(mu: torch.Tensor, logvar: torch.Tensor, *, n_samples: int, seed: int, offset: int) -> torch.Tensor:
    """``n_samples`` draws of shape ``(n_samples, *mu.shape)``.

    Sample ``k``, element ``i`` (row-major) has logical index ``k * mu.numel() + i``.
    """
    dtype = compute_dtype(mu, logvar)
    eps = _noise(seed, offset, n_samples * mu.numel(), dtype, mu.device)
    eps = eps.reshape(n_samples, *mu.shape)
    z = mu.to(dtype) + torch.exp(0.5 * logvar.to(dtype)) * eps
    return z.to(result_dtype(mu, logvar))


def rsample_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None,
    prior_logvar: torch.Tensor | None,
    *,
    n_samples: int,
    seed: int,
    offset: int,
    sample: bool,
    kl: bool,
    reduction: str,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backend entry point: z when ``sample``, the KL reduced by ``reduction`` when ``kl``.

    ``reduction`` is ``"none"`` (result dtype) or ``"sum"``, ``"per_sample"``, ``"per_dim"`` (compute dtype).
    """
    z = rsample(mu, logvar, n_samples=n_samples, seed=seed, offset=offset) if sample else None
    if not kl:
        return z, None
    dtype = compute_dtype(mu, logvar, prior_mu, prior_logvar)
    upcast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    elementwise = kl_normal_elementwise(upcast(mu), upcast(logvar), upcast(prior_mu), upcast(prior_logvar))
    if reduction == "none":
        return z, elementwise.to(result_dtype(mu, logvar, prior_mu, prior_logvar))
    return z, reduce(elementwise, reduction)
