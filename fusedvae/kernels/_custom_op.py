"""What every kernel file needs to expose its launchers as ``torch.library`` custom ops.

Why custom ops: ``torch.compile`` (Dynamo) cannot trace a Triton launch under the interpreter at all,
and on a GPU tracing through the launchers' Python stride logic is fragile. A custom op is one opaque
node in the graph: Dynamo and AOTAutograd see only its schema and its fake (shape/dtype/stride)
implementation, and the real launcher runs at execution time. Each kernel file registers its forward
and backward launchers as ops in the ``fusedvae`` namespace and ties them together with
``register_autograd`` (see the comment at the top of the ``# custom ops`` section of
:mod:`.sample_kl` for why that replaced the autograd.Function classes).

APIs relied on, all present since torch 2.4: ``torch.library.custom_op(name, mutates_args=(),
schema=...)``, ``CustomOpDef.register_fake``, ``CustomOpDef.register_autograd(backward,
setup_context=...)``. Schemas are written out (not inferred from annotations: these modules use
``from __future__ import annotations``, which torch 2.4's schema inference does not resolve).

Rules the ops follow: every output is a fresh tensor (never an input or a view of one); an output
that a call does not produce (z of a KL-only call, a gradient nobody asked for) is an empty
placeholder of shape ``(0,)``, because a custom op cannot return None; the noise key is a ``Tensor``
(``(2,)`` int64 on the op's device, from :func:`fusedvae.seeding.draw_key`), never read on the host,
so a captured CUDA graph replays a fresh draw and Dynamo sees no data-dependent integer.
"""

from __future__ import annotations

import functools

import torch

NAMESPACE = "fusedvae"


def op_name(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def absent(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for an output a call does not produce (a custom op cannot return None)."""
    return torch.empty((0,), dtype=like.dtype, device=like.device)


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the contiguous strides the fake implementations promise (a no-op when it has them)."""
    return t if t.is_contiguous() else t.contiguous()


# Eager route ----------------------------------------------------------------------------------
# The custom ops exist for torch.compile; in eager mode their dispatch (autograd_impl, redispatch,
# backend_impl, the dynamo-disable wrapper, fill_defaults) was about half the host time of a full
# forward+backward call, which made small calls launch-bound on a GPU. So the public entries run a
# plain autograd.Function in eager mode, built from the SAME implementation, setup_context and
# backward as the op (the backward calling the backward op's implementation instead of the op):
# both routes run the same launchers and give bitwise-equal values (tests/test_eager_route.py).


def _plain(t: torch.Tensor) -> bool:
    # A tensor subclass (FakeTensor, DTensor, ...) or a meta tensor must meet the op (its fake impl,
    # its subclass dispatch); so must any tracer that works by a dispatch mode (make_fx, export).
    return (type(t) is torch.Tensor or type(t) is torch.nn.Parameter) and t.device.type != "meta"


def register(op, forward_impl, setup_context, backward, backward_op, backward_impl) -> type[torch.autograd.Function]:
    """Tie ``op`` to its backward and return the eager-mode autograd.Function of the same op.

    ``backward(run_backward, ctx, *grads)`` gets ``backward_op`` under the custom op (an opaque node
    in compiled backward graphs) and ``backward_impl`` (the backward op's plain implementation) in
    the eager Function; ``forward_impl`` is the forward op's implementation, ``setup_context`` is
    shared (the Function's forward calls it). Example::

        _Fn = register(_fwd_op, _fwd_impl, _setup, _bwd, torch.ops.fusedvae.x_backward, _bwd_impl)
        out = call(torch.ops.fusedvae.x_forward, _Fn, a, b)
    """
    op.register_autograd(functools.partial(backward, backward_op), setup_context=setup_context)

    # forward(ctx, ...) runs setup_context itself: a Function that defines setup_context pays an
    # inspect.signature bind on every apply (~20-30 us here); functorch transforms, which need that
    # form, take the op instead (see call).
    def forward(ctx, *inputs):
        output = forward_impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(f"Eager_{forward_impl.__name__.strip('_').removesuffix('_impl')}", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(functools.partial(backward, backward_impl)),
    })


def call(op, function: type[torch.autograd.Function], first: torch.Tensor, *args):
    """``op(first, *args)`` while compiling or tracing, under functorch transforms, or for a subclass / meta
    ``first``; else ``function.apply(first, *args)``.

    Only the first tensor is inspected: the launchers' device checks reject mixed devices either way.
    """
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or not _plain(first)
            or torch._C._are_functorch_transforms_active()):
        return op(first, *args)
    return function.apply(first, *args)
