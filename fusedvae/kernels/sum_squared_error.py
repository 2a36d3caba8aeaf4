"""``sum_squared_error``: ``Σ (x - m)^2``, global or per sample (all the optimal σ of the σ-VAE needs).

Runs the Gaussian-NLL family's kernels (:mod:`.gaussian_nll`) with ``OP_SSE``; this file holds its
custom ops with autograd and the backend entry point. Forward reads x and m once and writes one
partial sum per program; backward reads them again and writes each gradient needed.
"""

from __future__ import annotations

import torch

from . import _custom_op
from .gaussian_nll import OP_SSE, _backward, _backward_outputs, _fake_backward, _fake_forward, _forward, _needs

__all__ = ["sum_squared_error"]


def _sum_squared_error_forward_impl(x, mean, per_sample):
    return _forward(OP_SSE, x, mean, None, tuple(x.shape), reduction="per_sample" if per_sample else "sum")


_sum_squared_error_forward_op = torch.library.custom_op(
    _custom_op.op_name("sum_squared_error_forward"), _sum_squared_error_forward_impl,
    mutates_args=(),
    schema="(Tensor x, Tensor mean, bool per_sample) -> Tensor",
)


@_sum_squared_error_forward_op.register_fake
def _(x, mean, per_sample):
    return _fake_forward(x, mean, None, tuple(x.shape), "per_sample" if per_sample else "sum")


def _sum_squared_error_backward_impl(grad, x, mean, per_sample, need_x, need_mean):
    shape = tuple(x.shape)
    grads = _backward(OP_SSE, x, mean, None, shape, grad, reduction="per_sample" if per_sample else "sum",
                      needs=(need_x, need_mean, False))
    return _backward_outputs(x, mean, None, shape, grads)[:2]


_sum_squared_error_backward_op = torch.library.custom_op(
    _custom_op.op_name("sum_squared_error_backward"), _sum_squared_error_backward_impl,
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor mean, bool per_sample, bool need_x, bool need_mean) -> (Tensor, Tensor)",
)


@_sum_squared_error_backward_op.register_fake
def _(grad, x, mean, per_sample, need_x, need_mean):
    reduction = "per_sample" if per_sample else "sum"
    return _fake_backward(x, mean, None, tuple(x.shape), grad, reduction, (need_x, need_mean, False))[:2]


def _sum_squared_error_setup_context(ctx, inputs, output):
    x, mean, per_sample = inputs
    ctx.save_for_backward(x, mean)
    ctx.per_sample = per_sample


def _sum_squared_error_backward(run_backward, ctx, grad):
    x, mean = ctx.saved_tensors
    needs = _needs(ctx, 2)
    if not any(needs):
        return None, None, None
    dx, dm = run_backward(grad, x, mean, ctx.per_sample, *needs)
    return dx if needs[0] else None, dm if needs[1] else None, None


_SumSquaredError = _custom_op.register(
    _sum_squared_error_forward_op, _sum_squared_error_forward_impl, _sum_squared_error_setup_context,
    _sum_squared_error_backward, torch.ops.fusedvae.sum_squared_error_backward, _sum_squared_error_backward_impl,
)


def sum_squared_error(x: torch.Tensor, mean: torch.Tensor, *, per_sample: bool) -> torch.Tensor:
    """``sum((x - mean)^2)``, shape ``()`` or ``(B,)`` (``per_sample``), compute dtype, differentiable in both."""
    return _custom_op.call(torch.ops.fusedvae.sum_squared_error_forward, _SumSquaredError, x, mean, bool(per_sample))
