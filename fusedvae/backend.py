"""Which implementation runs an op: the PyTorch reference or the Triton kernels.

``FUSEDVAE_BACKEND`` (read at every call) or :func:`use_backend` picks one of

- ``"auto"`` (default): Triton for CUDA tensors, ``native`` for CPU tensors, the reference for
  anything else (meta tensors, other devices);
- ``"triton"``: the Triton kernels always; CPU tensors need ``TRITON_INTERPRET=1`` (Triton's
  interpreter), otherwise a clear ``RuntimeError``;
- ``"native"``: :mod:`fusedvae.native`, each op as a few ATen calls, noise from ``torch.randn``;
- ``"reference"``: the plain PyTorch reference always.

The noise streams: ``triton`` and ``reference`` share one Philox stream keyed by a (seed, offset)
drawn from torch's generator (bit-equal samples across the two); ``native`` draws ``torch.randn``
from that generator (the stream ``torch.randn_like`` gives). Both follow ``torch.manual_seed`` and
``generator=``; a sample is reproducible on one backend, not across ``native`` and the others.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "native", "reference")

class _Override(threading.local):
    name: str | None = None  # a class default: reading it unset raises (and costs) nothing


_override = _Override()


_PARSED_ENV: dict[str, str] = {}  # FUSEDVAE_BACKEND's raw value -> its backend: parsed once per distinct value


def _requested_backend() -> str:
    name = _override.name
    if name is not None:
        return name  # use_backend checked it
    raw = os.environ.get("FUSEDVAE_BACKEND", "auto")
    name = _PARSED_ENV.get(raw)
    if name is None:
        name = raw.strip().lower()
        if name not in BACKENDS:
            raise ValueError(f"FUSEDVAE_BACKEND must be one of {BACKENDS}, got {name!r}")
        _PARSED_ENV[raw] = name
    return name


# Looked up once: Dynamo (torch 2.11) cannot trace importlib.util.find_spec inside a compiled op call.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked once, at import)."""
    return _TRITON_FOUND


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton runs kernels on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (``"auto"``, ``"triton"``, ``"native"``, ...).

    Overrides ``FUSEDVAE_BACKEND`` for the current thread; nests.

    Example::

        >>> import torch, fusedvae as fv
        >>> with fv.use_backend("reference"):
        ...     kl = fv.kl_normal(torch.randn(4, 8), torch.randn(4, 8))
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = _override.name
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


def backend_for(tensor: torch.Tensor) -> str:
    """The backend, ``"triton"``, ``"native"`` or ``"reference"``, that an op on ``tensor`` runs on now.

    Raises ``RuntimeError`` when ``"triton"`` is forced where it cannot run (no Triton installed,
    or a CPU tensor without ``TRITON_INTERPRET=1``).

    Example::

        >>> import torch, fusedvae as fv
        >>> fv.backend_for(torch.zeros(3))  # a CPU tensor under the default "auto"
        'native'
    """
    requested = _requested_backend()
    if requested in ("reference", "native"):
        return requested
    if requested == "auto":
        if tensor.is_cpu:
            return "native"
        return "triton" if tensor.is_cuda and _TRITON_FOUND else "reference"
    if not triton_available():
        raise RuntimeError("backend 'triton' was requested but the triton package is not installed")
    if not tensor.is_cuda and not triton_interpreter_enabled():
        raise RuntimeError(
            f"backend 'triton' on a {tensor.device.type} tensor needs Triton's interpreter: "
            "set TRITON_INTERPRET=1 before importing triton, or use a CUDA tensor"
        )
    return "triton"
