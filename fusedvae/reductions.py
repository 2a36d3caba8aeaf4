"""Reductions. A backend computes ``"none"``, ``"sum"``, ``"per_sample"``, ``"per_dim"``; ``"mean"`` and
``"batchmean"`` are the sum divided, by :func:`finish`, once for every backend."""

from __future__ import annotations

import math

import torch

#: The backend reduction each public reduction is computed from.
BACKEND_REDUCTION = {
    "none": "none",
    "sum": "sum",
    "mean": "sum",
    "batchmean": "sum",
    "per_sample": "per_sample",
    "per_dim": "per_dim",
}


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"none"``: as is; ``"sum"``: a scalar; ``"per_sample"``: sum over all but dim 0; ``"per_dim"``: over dim 0."""
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "per_sample":
        return values.sum(dim=tuple(range(1, values.dim()))) if values.dim() > 1 else values
    if reduction == "per_dim":
        return values.sum(dim=0)
    raise ValueError(f"unknown backend reduction {reduction!r}")


def scale_of(reduction: str, *, batch_size: int, numel: int) -> float:
    """The factor that turns a ``"sum"`` into ``reduction`` (``"sum"``, ``"mean"`` or ``"batchmean"``); NaN when empty.

    For a backend that multiplies it in inside its op (:mod:`fusedvae.native`) instead of :func:`finish`'s division.

    Example::

        >>> scale_of("batchmean", batch_size=4, numel=32)
        0.25
    """
    if reduction == "mean":
        return 1.0 / numel if numel else math.nan
    if reduction == "batchmean":
        return 1.0 / batch_size if batch_size else math.nan
    return 1.0


def finish(reduced: torch.Tensor, reduction: str, *, batch_size: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Divide a backend sum for ``"mean"`` (by ``numel``) or ``"batchmean"`` (by ``batch_size``); cast to ``dtype``.

    An empty mean is NaN, as ``torch.mean`` of an empty tensor is.
    """
    if reduction == "mean":
        reduced = reduced / numel if numel else reduced * math.nan
    elif reduction == "batchmean":
        reduced = reduced / batch_size if batch_size else reduced * math.nan
    return reduced.to(dtype)


def apply_reduction(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Any public reduction of elementwise ``values`` (``(B, ...)``), in their dtype."""
    reduced = reduce(values, BACKEND_REDUCTION[reduction])
    batch_size = values.shape[0] if values.dim() else 1
    return finish(reduced, reduction, batch_size=batch_size, numel=values.numel(), dtype=values.dtype)
