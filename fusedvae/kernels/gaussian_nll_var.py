"""``gaussian_nll_var``: torch's ``gaussian_nll_loss``, ``0.5 (log v + (input - target)^2 / v)``, ``v = max(var, eps)``.

Runs the Gaussian-NLL family's kernels (:mod:`.gaussian_nll`) with ``OP_VAR`` and ``var`` as the
broadcast operand; this file holds its custom ops with autograd and the backend entry point. A target
that broadcasts to the input gets its gradient through a full-size float buffer summed down (+2N
bytes, only in that case).
"""

from __future__ import annotations

import torch

from . import _custom_op
from .gaussian_nll import OP_VAR, _backward, _backward_outputs, _fake_backward, _fake_forward, _forward, _needs

__all__ = ["gaussian_nll_var"]


def _var_shape(input: torch.Tensor, target: torch.Tensor, var: torch.Tensor) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(input.shape, target.shape, var.shape))



def _gaussian_nll_var_forward_impl(input, target, var, full, eps, reduction):
    shape = _var_shape(input, target, var)
    return _forward(OP_VAR, input, target, var, shape, reduction=reduction, full=full, eps=eps)


_gaussian_nll_var_forward_op = torch.library.custom_op(
    _custom_op.op_name("gaussian_nll_var_forward"), _gaussian_nll_var_forward_impl,
    mutates_args=(),
    schema="(Tensor input, Tensor target, Tensor var, bool full, float eps, str reduction) -> Tensor",
)


@_gaussian_nll_var_forward_op.register_fake
def _(input, target, var, full, eps, reduction):
    return _fake_forward(input, target, var, _var_shape(input, target, var), reduction)


def _gaussian_nll_var_backward_impl(grad, input, target, var, eps, reduction, need_input, need_target, need_var):
    shape = _var_shape(input, target, var)
    grads = _backward(OP_VAR, input, target, var, shape, grad, reduction=reduction,
                      needs=(need_input, need_target, need_var), eps=eps)
    return _backward_outputs(input, target, var, shape, grads)


_gaussian_nll_var_backward_op = torch.library.custom_op(
    _custom_op.op_name("gaussian_nll_var_backward"), _gaussian_nll_var_backward_impl,
    mutates_args=(),
    schema="(Tensor grad, Tensor input, Tensor target, Tensor var, float eps, str reduction, bool need_input, "
    "bool need_target, bool need_var) -> (Tensor, Tensor, Tensor)",
)


@_gaussian_nll_var_backward_op.register_fake
def _(grad, input, target, var, eps, reduction, need_input, need_target, need_var):
    shape = _var_shape(input, target, var)
    return _fake_backward(input, target, var, shape, grad, reduction, (need_input, need_target, need_var))


def _gaussian_nll_var_setup_context(ctx, inputs, output):
    input, target, var, _full, eps, reduction = inputs
    ctx.save_for_backward(input, target, var)
    ctx.eps, ctx.reduction = eps, reduction


def _gaussian_nll_var_backward(run_backward, ctx, grad):
    input, target, var = ctx.saved_tensors
    needs = _needs(ctx, 3)
    if not any(needs):
        return (None,) * 6
    di, dt, dv = run_backward(grad, input, target, var, ctx.eps, ctx.reduction, *needs)
    return di if needs[0] else None, dt if needs[1] else None, dv if needs[2] else None, None, None, None


_GaussianNLLVar = _custom_op.register(
    _gaussian_nll_var_forward_op, _gaussian_nll_var_forward_impl, _gaussian_nll_var_setup_context,
    _gaussian_nll_var_backward, torch.ops.fusedvae.gaussian_nll_var_backward, _gaussian_nll_var_backward_impl,
)


def gaussian_nll_var(
    input: torch.Tensor, target: torch.Tensor, var: torch.Tensor, *, full: bool, eps: float, reduction: str
) -> torch.Tensor:
    """torch's ``gaussian_nll_loss`` formula ``0.5 (log v + (input - target)^2 / v)``, ``v = max(var, eps)``.

    The clamp is invisible to autograd: every entry of ``var`` gets ``(1/v - (input - target)^2/v^2)/2``
    at the clamped ``v``, summed over its broadcast positions.
    """
    return _custom_op.call(torch.ops.fusedvae.gaussian_nll_var_forward, _GaussianNLLVar, input, target, var,
                           bool(full), float(eps), reduction)
