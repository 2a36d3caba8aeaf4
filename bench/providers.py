"""The providers a benchmark compares, and the context each one runs in.

- ``torch``: what users write today instead of fusedvae, eager: the loss code of the public VAE
  codebases (:mod:`bench.baselines`; in a training loop, that model's own codebase's loss).
- ``torch+compile``: ``torch.compile`` (inductor) of exactly that code, compiled before timing.
- ``fusedvae``: the public ops on the default backend (``"auto"``: the Triton kernels on CUDA
  tensors, :mod:`fusedvae.native` on CPU tensors).
- ``fusedvae+compile`` (training loops): the whole step compiled with the default backend.
- ``reference``: fusedvae's plain-PyTorch specification (``fv.use_backend("reference")``), with
  ``--providers reference`` only: a readable specification, never the denominator of a speed-up.

Speed-ups are always against ``torch`` and ``torch+compile``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

import fusedvae as fv

MICRO_PROVIDERS = ("torch", "torch+compile", "fusedvae")
TRAIN_PROVIDERS = ("torch", "torch+compile", "fusedvae", "fusedvae+compile")
#: Every provider ``--providers`` accepts; the defaults above leave ``reference`` out.
ALL_PROVIDERS = TRAIN_PROVIDERS + ("reference",)
BASELINES = ("torch", "torch+compile")
FUSED = ("fusedvae", "fusedvae+compile")
BACKEND = {"torch": "auto", "torch+compile": "auto", "fusedvae": "auto", "fusedvae+compile": "auto",
           "reference": "reference"}


def is_compiled(provider: str) -> bool:
    return provider.endswith("compile")


def uses_baseline(provider: str) -> bool:
    """True for the providers that run :mod:`bench.baselines` (the code users write) instead of fusedvae."""
    return provider in BASELINES


def backend_label(provider: str, tensor: torch.Tensor) -> str:
    """What ``provider`` runs on ``tensor``: ``torch`` (the baselines), or fusedvae's backend for it."""
    if uses_baseline(provider):
        return "torch"
    with fv.use_backend(BACKEND[provider]):
        return fv.backend_for(tensor)


def configure_dynamo(*, retain_graph: bool = False) -> None:
    """Room for one compiled graph per benchmark case without falling back to eager; eager's random draws.

    ``fallback_random``: inductor would otherwise replace ``torch.randn`` (the baselines' and the native
    backend's noise) and the ``torch.randint`` that draws the Philox key with its own generator, and a
    compiled run would see other noise than an eager one.
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
