"""A drop-in for diffusers' ``DiagonalGaussianDistribution``, computed by fusedvae's ops and kernels.

Two ways in, for the posterior of ``diffusers.AutoencoderKL`` (and of every other diffusers
autoencoder built on the same class)::

    from fusedvae.compat.diffusers import DiagonalGaussianDistribution   # 1. change one import

    from fusedvae.compat import diffusers as fvd
    with fvd.patch():                                                     # 2. or patch diffusers
        posterior = vae.encode(x).latent_dist      # a fusedvae DiagonalGaussianDistribution
        z = posterior.sample()                     # fusedvae's Philox sample, differentiable
        kl = posterior.kl()                        # exact near collapse, summed over dims [1, 2, 3]

    with fvd.patch(per_sample=True):                                      # video latents (B, C, T, H, W)
        kl = vae.encode(video).latent_dist.kl()    # one KL per sample, summed over C, T, H, W

The class keeps diffusers' constructor, attributes, method signatures, return shapes and values;
what differs:

- ``sample()`` draws fusedvae's Philox noise, not torch's ``randn``: the same distribution, a
  different stream. ``torch.manual_seed`` or ``generator=`` still make it reproducible.
- ``kl()`` computes ``exp(d) - 1 - d`` without cancellation, so it is accurate near a collapsed
  dimension where diffusers' float32 formula returns 0 or noise.
- ``std`` and ``var`` are computed when read, never stored (diffusers materialises both).
- deterministic ``kl()``/``nll()`` return a zero of shape ``(1,)`` on the posterior's device and in
  its dtype (diffusers' is a float32 CPU tensor, which cannot be added to a CUDA loss).
- ``per_sample=True`` (an argument of the class and of :func:`patch`) sums ``kl()`` and ``nll()``
  over every non-batch dim: one value per sample for 5-D video latents ``(B, C, T, H, W)``, where
  diffusers' hard-coded dims ``[1, 2, 3]`` give one value per (sample, width column). 4-D latents
  give diffusers' values either way.

This module imports diffusers; ``import fusedvae`` never imports it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence

import torch

from .. import functional as fvf
from ..nn import DiagonalGaussian

try:
    from diffusers.models.autoencoders import vae as _diffusers_vae
except ImportError as error:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "fusedvae.compat.diffusers needs the diffusers package: pip install diffusers"
    ) from error

__all__ = ["DiagonalGaussianDistribution", "DiffusersPatch", "OriginalDiagonalGaussianDistribution", "is_patched", "patch"]

#: diffusers' own class, as it was when this module was imported (what :func:`patch` restores).
OriginalDiagonalGaussianDistribution = _diffusers_vae.DiagonalGaussianDistribution

_CLAMP_MIN, _CLAMP_MAX = -30.0, 20.0
_DEFAULT_DIMS = (1, 2, 3)
_SEED_BOUND = 2**62


def _generator_for(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """``generator`` itself when it is on ``device``'s type (or None); else one on ``device`` seeded from it.

    diffusers' pipelines pass CPU generators for CUDA latents. fusedvae's ops take a generator on
    the tensors' device, so a seed is drawn from the given generator (advancing it, so successive
    calls differ) and keys a fresh generator on ``device``: reproducible from the caller's generator.
    """
    if generator is None or not isinstance(generator, torch.Generator) or generator.device.type == device.type:
        return generator  # (a wrong type is left for fusedvae's own check to name)
    seed = int(torch.randint(0, _SEED_BOUND, (), generator=generator, device=generator.device))
    local = torch.Generator(device=device)
    local.manual_seed(seed)
    return local


def _normalise_dims(dims: int | Sequence[int], ndim: int) -> list[int] | None:
    """Sorted non-negative dims, or None when they cannot be normalised (torch.sum then names the error)."""
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) and -ndim <= d < ndim for d in dims):
        return None
    return sorted({d % ndim for d in dims})


class DiagonalGaussianDistribution(DiagonalGaussian, OriginalDiagonalGaussianDistribution):
    """diffusers' ``DiagonalGaussianDistribution`` on fusedvae's ops: same API, same values.

    A :class:`fusedvae.nn.DiagonalGaussian` (whose ops it runs) and, for ``isinstance`` checks, a
    subclass of diffusers' class (none of whose code it runs).

    Args:
        parameters: ``(B, 2C, ...)``: the mean and the log-variance, chunked from dim 1.
        deterministic: a point mass at the mean: ``std`` and ``var`` are zeros, ``sample()`` is the
            mean, ``kl()`` and ``nll()`` are 0.
        per_sample: ``kl()`` and ``nll()`` (without ``dims``) sum over every non-batch dim, shape
            ``(B,)`` for latents of any rank (video: ``(B, C, T, H, W)``); ``False`` keeps diffusers'
            dims ``[1, 2, 3]``. ``None`` (the default, and what diffusers' own code passes) takes
            the setting of the innermost active :func:`patch` (``False`` outside one).

    Attributes:
        parameters, mean, deterministic: as diffusers.
        logvar: clamped to [-30, 20] (zero gradient outside, as diffusers).
        std, var: ``exp(logvar / 2)`` and ``exp(logvar)``, computed when read (zeros when deterministic).

    Beyond diffusers' methods it keeps :class:`~fusedvae.nn.DiagonalGaussian`'s ``rsample``,
    ``rsample_kl`` (sample and KL in one fused call), ``log_prob`` and ``entropy``; those ignore
    ``deterministic``.

    Example::

        >>> import torch
        >>> from fusedvae.compat.diffusers import DiagonalGaussianDistribution
        >>> posterior = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4))
        >>> posterior.sample().shape, posterior.kl().shape, posterior.nll(posterior.mode()).shape
        (torch.Size([2, 4, 4, 4]), torch.Size([2]), torch.Size([2]))
    """

    def __init__(
        self, parameters: torch.Tensor, deterministic: bool = False, *, per_sample: bool | None = None
    ) -> None:
        self.parameters = parameters
        mean, logvar = torch.chunk(parameters, 2, dim=1)
        super().__init__(mean, torch.clamp(logvar, _CLAMP_MIN, _CLAMP_MAX))
        self.deterministic = deterministic
        self.per_sample = _patched_per_sample if per_sample is None else bool(per_sample)

    @property
    def std(self) -> torch.Tensor:
        return torch.zeros_like(self.mean) if self.deterministic else super().std

    @property
    def var(self) -> torch.Tensor:
        return torch.zeros_like(self.mean) if self.deterministic else super().var

    def _zero(self) -> torch.Tensor:
        return torch.zeros(1, dtype=self.mean.dtype, device=self.mean.device)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """A reparameterized sample ``mean + std * eps``, differentiable in ``parameters`` (as diffusers').

        Args:
            generator: ``None`` (torch's default generator: ``torch.manual_seed`` controls it), a
                generator on any device (a CPU one for CUDA latents, as diffusers' pipelines pass),
                or a list of ``B`` generators, one per batch element (as diffusers' ``randn_tensor``).
        """
        if self.deterministic:
            return self.mean.clone()
        if isinstance(generator, (list, tuple)):
            if len(generator) != 1:
                if len(generator) != self.mean.shape[0]:
                    raise ValueError(
                        f"generator is a list of {len(generator)} generators but the batch has {self.mean.shape[0]}"
                    )
                return torch.cat([
                    fvf.rsample(self.mean[i : i + 1], self.logvar[i : i + 1],
                                generator=_generator_for(g, self.mean.device))
                    for i, g in enumerate(generator)
                ])
            generator = generator[0]
        return self.rsample(generator=_generator_for(generator, self.mean.device))

    def kl(self, other: DiagonalGaussian | OriginalDiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """``KL(self || other)``, ``other`` defaulting to N(0, I), summed over [1, 2, 3] (all but 0 with ``per_sample``).

        ``other`` is anything with ``mean`` and ``logvar`` (this class, diffusers', fusedvae's
        DiagonalGaussian); its ``deterministic`` is not consulted. Exact near collapse.
        """
        if self.deterministic:
            return self._zero()
        if self.per_sample or self.mean.dim() == 4:
            return super().kl(other, reduction="per_sample")
        return super().kl(other, reduction="none").sum(dim=list(_DEFAULT_DIMS))

    def nll(self, sample: torch.Tensor, dims: Sequence[int] | None = None) -> torch.Tensor:
        """``-log q(sample)`` with the ``log(2 pi)/2`` constant, summed over ``dims``.

        ``dims`` defaults to diffusers' ``[1, 2, 3]``, or every non-batch dim with ``per_sample``.
        """
        if self.deterministic:
            return self._zero()
        if dims is None:
            ndim = sample.dim() if isinstance(sample, torch.Tensor) else 0
            dims = list(range(1, ndim)) if self.per_sample else list(_DEFAULT_DIMS)
        ndim = sample.dim() if isinstance(sample, torch.Tensor) else 0
        if ndim > 1 and _normalise_dims(dims, ndim) == list(range(1, ndim)):
            return super().nll(sample, reduction="per_sample")
        return (-self.log_prob(sample)).sum(dim=dims)

    def mode(self) -> torch.Tensor:
        return self.mean


# ----------------------------------------------------------------------------------------------
# patch(): swap the class inside diffusers.

_ATTRIBUTE = "DiagonalGaussianDistribution"
_lock = threading.RLock()
_depth = 0
#: What a posterior built with ``per_sample=None`` (as diffusers builds it) uses: the innermost patch's setting.
_patched_per_sample = False


def _diffusers_modules() -> list[object]:
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "diffusers" or name.startswith("diffusers."))]


def _swap(old: type, new: type) -> int:
    """Rebind every name bound to ``old`` in a loaded diffusers module to ``new``; returns how many."""
    count = 0
    for module in _diffusers_modules():
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):  # __dict__, not getattr: never trigger a lazy import
            if value is old:
                setattr(module, name, new)
                count += 1
    return count


def is_patched() -> bool:
    """True while diffusers' ``AutoencoderKL`` builds fusedvae posteriors."""
    from diffusers.models.autoencoders import autoencoder_kl

    return getattr(autoencoder_kl, _ATTRIBUTE) is DiagonalGaussianDistribution


class DiffusersPatch:
    """The handle :func:`patch` returns: a context manager, or call :meth:`undo` (idempotent)."""

    def __init__(self, per_sample: bool = False) -> None:
        global _depth, _patched_per_sample
        if not isinstance(per_sample, bool):
            raise TypeError(f"per_sample must be a bool, got {type(per_sample).__name__}")
        from diffusers.models.autoencoders import autoencoder_kl  # noqa: F401 - load AutoencoderKL's module first

        with _lock:
            if _depth == 0:
                _swap(OriginalDiagonalGaussianDistribution, DiagonalGaussianDistribution)
            _depth += 1
            self._previous_per_sample, _patched_per_sample = _patched_per_sample, per_sample
        self.per_sample = per_sample
        self._active = True

    @property
    def active(self) -> bool:
        return self._active

    def undo(self) -> None:
        """Restore diffusers' class (once the outermost of nested patches is undone)."""
        global _depth, _patched_per_sample
        with _lock:
            if not self._active:
                return
            self._active = False
            _depth -= 1
            _patched_per_sample = self._previous_per_sample
            if _depth == 0:
                # also the modules diffusers imported lazily while patched: they bound the fusedvae class
                _swap(DiagonalGaussianDistribution, OriginalDiagonalGaussianDistribution)

    def __enter__(self) -> DiffusersPatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()


def patch(per_sample: bool = False) -> DiffusersPatch:
    """Make diffusers build fusedvae's :class:`DiagonalGaussianDistribution`, until undone.

    Args:
        per_sample: the posteriors diffusers builds meanwhile sum ``kl()`` and ``nll()`` over
            every non-batch dim, one value per sample (for video autoencoders, whose latents are
            ``(B, C, T, H, W)``); ``False`` keeps diffusers' dims ``[1, 2, 3]``.

    Rebinds ``DiagonalGaussianDistribution`` in every loaded diffusers module (``vae``, where it
    is defined; ``autoencoder_kl``, where ``AutoencoderKL`` looks it up; the other autoencoders);
    modules diffusers imports later pick it up from ``vae``. Undoing restores the original
    everywhere, also on an exception inside the ``with`` block. Patches nest; the outermost undo
    restores, and each undo restores the ``per_sample`` setting its patch replaced. Code outside
    diffusers that imported the class by name keeps what it imported.

    Example::

        >>> import torch
        >>> from diffusers import AutoencoderKL
        >>> from fusedvae.compat import diffusers as fvd
        >>> vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32)
        >>> with fvd.patch():
        ...     posterior = vae.encode(torch.randn(1, 3, 16, 16)).latent_dist
        >>> type(posterior) is fvd.DiagonalGaussianDistribution, fvd.is_patched()
        (True, False)
        >>> handle = fvd.patch()          # or as a plain call
        >>> handle.undo()
    """
    return DiffusersPatch(per_sample)
