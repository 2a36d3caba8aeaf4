"""The providers a benchmark compares, and the context each one runs in.

- ``eager``: the plain PyTorch reference ops (``fv.use_backend("reference")``).
- ``compile``: ``torch.compile`` (inductor) of the same reference code, compiled once before timing.
- ``fusedvae``: the public ops on the default backend (``"auto"``: the Triton kernels on CUDA
  tensors, the reference on CPU tensors, so on a CPU ``fusedvae`` measures what ``eager`` does).
- ``fusedvae+compile`` (training loops): the whole step compiled with the default backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

import fusedvae as fv

MICRO_PROVIDERS = ("eager", "compile", "fusedvae")
TRAIN_PROVIDERS = ("eager", "compile", "fusedvae", "fusedvae+compile")
BACKEND = {"eager": "reference", "compile": "reference", "fusedvae": "auto", "fusedvae+compile": "auto"}
FUSED = ("fusedvae", "fusedvae+compile")


def is_compiled(provider: str) -> bool:
    return provider.endswith("compile")


def backend_label(provider: str, tensor: torch.Tensor) -> str:
    """The implementation ``provider`` runs on ``tensor``: ``reference`` or ``triton``."""
    with fv.use_backend(BACKEND[provider]):
        return fv.backend_for(tensor)


def configure_dynamo(*, retain_graph: bool = False) -> None:
    """Room for one compiled graph per benchmark case without falling back to eager; eager's random draws.

    ``fallback_random``: inductor would otherwise replace the ``torch.randint`` that draws the noise's
    (seed, offset) with its own generator, and a compiled run would see other noise than an eager one.
    ``retain_graph`` (the micro-benchmarks' ``backward`` mode runs one graph's backward many times):
    AOTAutograd's donated buffers (the backward reusing saved tensors' memory) forbid that, so they
    are turned off.
    """
    import torch._dynamo.config as config
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    if retain_graph and hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))


@contextlib.contextmanager
def provider_context(provider: str) -> Iterator[None]:
    """Everything the provider's calls (compilation included) must run inside."""
    if provider not in BACKEND:
        raise ValueError(f"unknown provider {provider!r}; choose from {tuple(BACKEND)}")
    with fv.use_backend(BACKEND[provider]):
        yield
