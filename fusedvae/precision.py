"""Dtype rules shared by every backend: compute in float32 (float64 for float64 inputs), return torch's promoted dtype."""

from __future__ import annotations

import functools

import torch


def result_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype torch's type promotion gives the (floating-point) inputs: what every op returns.

    As in torch, 0-dimensional tensors count only when every input is 0-dimensional, so a float32
    scalar ``log_sigma`` leaves a bfloat16 ``x`` bfloat16.
    """
    present = [t for t in tensors if t is not None]
    dimensioned = [t for t in present if t.dim() > 0] or present
    return functools.reduce(torch.promote_types, [t.dtype for t in dimensioned])


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (half inputs are upcast)."""
    return torch.float64 if result_dtype(*tensors) == torch.float64 else torch.float32
