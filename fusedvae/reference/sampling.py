"""Reparameterized sampling ``z = mu + exp(lv/2) * eps`` with Philox noise, and the fused sample + KL."""

from __future__ import annotations

import torch

from ..precision import compute_dtype, result_dtype
from ..reductions import reduce
from ..seeding import check_key, key_from_ints
from .kl import kl_normal_elementwise
from .philox import philox_normal


# Under torch.compile the noise is one opaque op: inductor, left to lower philox_normal's ten rounds
# of int64 arithmetic itself, inlines every intermediate into each use and does not finish (over
# 15 minutes on a 256 x 32 input, CPU). Eager calls run philox_normal directly.
# The key is read on the host inside the op, so the traced graph holds the key tensor, not its values.
@torch.library.custom_op("fusedvae::reference_philox_normal", mutates_args=())
def _philox_normal_op(key: torch.Tensor, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    seed, offset = key.tolist()
    return philox_normal(seed, offset, numel, dtype=dtype, device=device)


@_philox_normal_op.register_fake
def _(key: torch.Tensor, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype, device=device)


def _noise(key: torch.Tensor, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _philox_normal_op(key, numel, dtype, device)
    seed, offset = key.tolist()
    return philox_normal(seed, offset, numel, dtype=dtype, device=device)


def _key(mu: torch.Tensor, key: torch.Tensor | None, seed: int | None, offset: int | None) -> torch.Tensor:
    """``key``, or the key tensor of the explicit ints ``seed`` and ``offset``."""
    if key is not None:
        return check_key(key, mu.device)
    if seed is None or offset is None:
        raise ValueError("pass key (a (2,) int64 tensor [seed, offset]) or both seed and offset")
    return key_from_ints(seed, offset, mu.device)


def rsample(
    mu: torch.Tensor, logvar: torch.Tensor, *, n_samples: int, key: torch.Tensor | None = None,
    seed: int | None = None, offset: int | None = None,
) -> torch.Tensor:
    """``n_samples`` draws of shape ``(n_samples, *mu.shape)``, noise keyed by ``key = [seed, offset]``.

    ``key`` is the ``(2,)`` int64 tensor of :func:`fusedvae.seeding.draw_key` on ``mu``'s device (read
    on the host: the specification is not graph-captured), or pass the ints ``seed`` and ``offset``.
    Sample ``k``, element ``i`` (row-major) has logical index ``offset + k * mu.numel() + i``. Example::

        >>> z = rsample(torch.zeros(2, 4), torch.zeros(2, 4), n_samples=3, key=torch.tensor([1, 8]))
        >>> z.shape
        torch.Size([3, 2, 4])
    """
    dtype = compute_dtype(mu, logvar)
    eps = _noise(_key(mu, key, seed, offset), n_samples * mu.numel(), dtype, mu.device)
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
    key: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int | None = None,
    sample: bool,
    kl: bool,
    reduction: str,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backend entry point: z when ``sample``, the KL reduced by ``reduction`` when ``kl``.

    ``reduction`` is ``"none"`` (result dtype) or ``"sum"``, ``"per_sample"``, ``"per_dim"`` (compute dtype).
    The noise key is ``key`` or the ints ``seed`` and ``offset``, as in :func:`rsample` (unused without ``sample``).
    """
    z = rsample(mu, logvar, n_samples=n_samples, key=key, seed=seed, offset=offset) if sample else None
    if not kl:
        return z, None
    dtype = compute_dtype(mu, logvar, prior_mu, prior_logvar)
    upcast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    elementwise = kl_normal_elementwise(upcast(mu), upcast(logvar), upcast(prior_mu), upcast(prior_logvar))
    if reduction == "none":
        return z, elementwise.to(result_dtype(mu, logvar, prior_mu, prior_logvar))
    return z, reduce(elementwise, reduction)
