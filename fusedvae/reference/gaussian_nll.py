"""Gaussian negative log-likelihood: the log-sigma form, the torch-compatible variance form, and the SSE."""

from __future__ import annotations

import math

import torch

from ..precision import compute_dtype, result_dtype
from ..reductions import reduce

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_nll(
    x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor, *, full: bool, reduction: str
) -> torch.Tensor:
    """``r^2/2 + s [+ log(2 pi)/2]`` with ``r = (x - mean) * exp(-s)``, ``s = log_sigma`` broadcast to x.

    ``r`` is formed before squaring so that |s| up to 80 cannot overflow float32 unless the true
    value does. ``reduction``: ``"none"`` (result dtype) or ``"sum"``/``"per_sample"`` (compute dtype).
    """
    dtype = compute_dtype(x, mean, log_sigma)
    x_, mean_, s = x.to(dtype), mean.to(dtype), log_sigma.to(dtype)
    r = (x_ - mean_) * torch.exp(-s)
    nll = 0.5 * r * r + s
    if full:
        nll = nll + HALF_LOG_2PI
    if reduction == "none":
        return nll.to(result_dtype(x, mean, log_sigma))
    return reduce(nll, reduction)


def sum_squared_error(x: torch.Tensor, mean: torch.Tensor, *, per_sample: bool) -> torch.Tensor:
    """``sum((x - mean)^2)`` over everything (shape ``()``) or over all but dim 0 (shape ``(B,)``), in compute dtype."""
    dtype = compute_dtype(x, mean)
    squared = (x.to(dtype) - mean.to(dtype)).square()
    return reduce(squared, "per_sample" if per_sample else "sum")


def gaussian_nll_var(
    input: torch.Tensor, target: torch.Tensor, var: torch.Tensor, *, full: bool, eps: float, reduction: str
) -> torch.Tensor:
    """``torch.nn.functional.gaussian_nll_loss``'s formula: ``0.5 (log v + (input - target)^2 / v)``, ``v = max(var, eps)``.

    The clamp is applied out of autograd's sight, as torch does, so the gradient reaches every
    entry of ``var``, clamped or not.
    """
    dtype = compute_dtype(input, target, var)
    var_ = var.to(dtype).clone()
    with torch.no_grad():
        var_.clamp_(min=eps)
    loss = 0.5 * (torch.log(var_) + (input.to(dtype) - target.to(dtype)) ** 2 / var_)
    if full:
        loss = loss + HALF_LOG_2PI
    if reduction == "none":
        return loss.to(result_dtype(input, target, var))
    return reduce(loss, reduction)
