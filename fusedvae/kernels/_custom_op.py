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
