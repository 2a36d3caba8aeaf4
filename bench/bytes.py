"""The fewest bytes each op must move: the one place the suite's byte counts are defined.

Rule: every input tensor is read once and every output written once; in the backward pass every
input is read once again (each op's gradient formula needs all of them, see below), every output's
gradient is read once, and every input that requires grad has its gradient written once. The
Philox noise is never counted: the kernels regenerate it from (seed, offset, index) instead of
storing it. ``full`` (forward then backward, two passes) is the sum of the two. Sizes are those
of the tensors actually passed, so a broadcast log σ or prior counts its own elements, not the
broadcast ones, and the dtype's element size is the tensor's own.

    forward  = Σ_inputs |t| + Σ_outputs |o|
    backward = Σ_inputs |t| + Σ_outputs |o| (the grad_outputs) + Σ_{inputs requiring grad} |t|
    full     = forward + backward

Per op, with ``E`` elements in the big tensors (mu or x), ``S`` in log σ (1, C, B or E), ``P`` in
a learned prior (E per element, D per latent dimension), ``b`` bytes per element; scalar outputs
(the reduced loss, its grad) are counted too but are negligible:

| op / variant | forward (read; write) | backward (read; write) | full |
| --- | --- | --- | --- |
| rsample_kl, standard prior | mu, lv; z, kl: 3E | mu, lv, dz; dmu, dlv: 5E | 8E |
| rsample_kl, learned prior | mu, lv, mu_p, lv_p; z, kl: 3E + 2P | mu, lv, mu_p, lv_p, dz; 4 grads: 5E + 4P | 8E + 6P |
| kl_normal, standard prior | mu, lv; kl: 2E | mu, lv; dmu, dlv: 4E | 6E |
| kl_normal, learned prior | mu, lv, mu_p, lv_p: 2E + 2P | all four; 4 grads: 4E + 4P | 6E + 6P |
| gaussian_nll (x needs no grad) | x, m, s: 2E + S | x, m, s; dm, ds: 3E + 2S | 5E + 3S |
| gaussian_nll_optimal (global or per sample) | x, m: 2E | x, m; dm: 3E | 5E |
| gaussian_nll_loss (per-element var) | input, target, var: 3E | all three; dinput, dvar: 5E | 8E |

(times ``b``). Why every input is read again in the backward pass: ``dz/dlv = exp(lv/2) eps / 2``
needs lv, ``dkl/dmu = (mu - mu_p) exp(-lv_p)`` needs mu and the prior, ``dnll/dm = (m - x)
exp(-2s)`` needs x, m and s, the optimal σ's ``dm = c (m - x)`` needs x and m, and the
variance form needs input, target and var. Nothing the forward pass computed is assumed kept
(a kernel may keep a scalar such as the SSE; that is free here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MODES = ("forward", "backward", "full")


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bytes_min(
    mode: str, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], grad_inputs: Sequence[torch.Tensor]
) -> int:
    """Fewest bytes one call moves in ``mode`` (``forward``, ``backward`` or ``full``); see the module docstring.

    Args:
        inputs: every tensor the op reads (data, parameters, priors, log σ).
        outputs: every tensor it returns (z, the reduced loss).
        grad_inputs: the inputs that require grad (their gradients are written in the backward pass).
    """
    forward = _nbytes(inputs) + _nbytes(outputs)
    backward = _nbytes(inputs) + _nbytes(outputs) + _nbytes(grad_inputs)
    if mode == "forward":
        return forward
    if mode == "backward":
        return backward
    if mode == "full":
        return forward + backward
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
