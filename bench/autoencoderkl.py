"""A tiny diffusers ``AutoencoderKL`` and its latent-diffusion training step, eager and fused.

Benchmark scaffolding, not part of the package: shared by ``examples/train_autoencoderkl.py``, the
training-loop benchmark and the tests, from a checkout::

    from bench import autoencoderkl as akl
    from fusedvae.compat.diffusers import patch

    step = akl.AutoencoderKLTrainStep(akl.tiny_autoencoderkl().to(device), fused=True)
    with patch():                      # the fused step needs the patched AutoencoderKL
        losses = step(x)               # x: (B, 3, 32, 32) in [-1, 1]

The loss is latent diffusion's autoencoder loss (Rombach et al. 2022, ``LPIPSWithDiscriminator``)
without its perceptual and adversarial terms, with a squared-error reconstruction so that it is a
Gaussian NLL::

    nll  = sum((x - x_rec)^2 / exp(logvar) + logvar) / B        # logvar: one learned scalar
    loss = nll + kl_weight * sum(posterior.kl()) / B

Per element ``(x - m)^2 / exp(lv) + lv = 2 * ((x - m)^2 / (2 sigma^2) + log sigma)`` with
``log sigma = lv / 2``, so ``nll == 2 * fv.gaussian_nll(x, m, logvar / 2, full=False,
reduction="batchmean")`` exactly (in real arithmetic; in float32 to a few ulps), values and
gradients alike. Unlike the original code, ``logvar`` is in the optimizer.

Importing this module imports diffusers.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
from torch import nn

from fusedvae import functional as fvf
from fusedvae.compat.diffusers import DiagonalGaussianDistribution

__all__ = [
    "TINY_CONFIG", "AutoencoderKLTrainStep", "StepLosses", "latent_diffusion_losses", "ldm_nll_eager", "ldm_nll_fused",
    "tiny_autoencoderkl",
]

#: A small AutoencoderKL for 3x32x32 images: two levels (32, 64 channels), a 4x16x16 latent.
TINY_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
}


def tiny_autoencoderkl(**overrides: Any) -> nn.Module:
    """A freshly initialised ``diffusers.AutoencoderKL`` from :data:`TINY_CONFIG` (updated by ``overrides``); no download."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**TINY_CONFIG, **overrides})


def ldm_nll_eager(x: torch.Tensor, reconstruction: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Latent diffusion's ``rec / exp(logvar) + logvar`` summed and divided by the batch size, written as there."""
    rec = (x.contiguous() - reconstruction.contiguous()) ** 2
    nll = rec / torch.exp(logvar) + logvar
    return torch.sum(nll) / nll.shape[0]


def ldm_nll_fused(x: torch.Tensor, reconstruction: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The same value as :func:`ldm_nll_eager`, by one fused Gaussian NLL with ``log sigma = logvar / 2``."""
    return 2.0 * fvf.gaussian_nll(x, reconstruction, 0.5 * logvar, full=False, reduction="batchmean")


class StepLosses(NamedTuple):
    """One step's losses (``logvar``: its value in that step), tensors; reading them synchronises with the device."""

    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    logvar: torch.Tensor


def latent_diffusion_losses(
    model: nn.Module,
    logvar: torch.Tensor,
    x: torch.Tensor,
    *,
    fused: bool,
    kl_weight: float = 1e-4,
    generator: torch.Generator | None = None,
) -> StepLosses:
    """Encode, sample, decode and the loss of the module docstring: ``(loss, nll, kl, logvar)``.

    Args:
        model: a diffusers ``AutoencoderKL``, unmodified.
        logvar: the learned scalar log-variance, 0-dim.
        x: ``(B, C, H, W)`` images, the model's dtype.
        fused: ``False``: the NLL by :func:`ldm_nll_eager` and the posterior as the model builds it;
            ``True``: the NLL by :func:`ldm_nll_fused`, and the posterior must be fusedvae's (call
            inside :func:`fusedvae.compat.diffusers.patch`; a ``RuntimeError`` says so otherwise).
        kl_weight: weight of the per-datapoint KL.
        generator: for ``posterior.sample``.

    Returns:
        :class:`StepLosses` of 0-dim tensors; ``loss`` is attached to the graph.
    """
    posterior = model.encode(x).latent_dist
    if fused and not isinstance(posterior, DiagonalGaussianDistribution):
        raise RuntimeError(
            "the fused AutoencoderKL step needs fusedvae's posterior: run it inside "
            "`with fusedvae.compat.diffusers.patch():`"
        )
    z = posterior.sample(generator=generator)
    reconstruction = model.decode(z).sample
    nll = (ldm_nll_fused if fused else ldm_nll_eager)(x, reconstruction, logvar)
    kl = posterior.kl()
    kl = torch.sum(kl) / kl.shape[0]
    return StepLosses(nll + kl_weight * kl, nll, kl, logvar.detach().clone())


class AutoencoderKLTrainStep:
    """One optimizer step of an ``AutoencoderKL`` on the latent-diffusion Gaussian loss.

    ``posterior = model.encode(x).latent_dist; z = posterior.sample(); x_rec = model.decode(z).sample``,
    then the loss of the module docstring, backward, Adam step.

    Args:
        model: a diffusers ``AutoencoderKL``, unmodified.
        fused: ``False``: the loss by :func:`ldm_nll_eager` and the posterior as the model builds
            it (diffusers' class, unpatched). ``True``: the loss by :func:`ldm_nll_fused`, and the
            posterior must be fusedvae's: call the step inside :func:`fusedvae.compat.diffusers.patch`
            (a ``RuntimeError`` says so otherwise).
        kl_weight: weight of the per-datapoint KL.
        lr: Adam's learning rate, for the model and ``logvar`` alike.
        logvar_init: the learned scalar log-variance's initial value (latent diffusion's 0).

    Attributes:
        model, logvar (an ``nn.Parameter`` in the optimizer), optimizer.
    """

    def __init__(
        self, model: nn.Module, *, fused: bool, kl_weight: float = 1e-4, lr: float = 1e-3, logvar_init: float = 0.0
    ) -> None:
        self.model = model
        self.fused = bool(fused)
        self.kl_weight = float(kl_weight)
        device = next(model.parameters()).device
        self.logvar = nn.Parameter(torch.full((), float(logvar_init), device=device))
        self.optimizer = torch.optim.Adam([*model.parameters(), self.logvar], lr=lr)

    @classmethod
    def pair(cls, model: nn.Module, **kwargs: Any) -> tuple[AutoencoderKLTrainStep, AutoencoderKLTrainStep]:
        """An eager and a fused step on two identical copies of ``model`` (for side-by-side runs)."""
        return cls(copy.deepcopy(model), fused=False, **kwargs), cls(copy.deepcopy(model), fused=True, **kwargs)

    def losses(self, x: torch.Tensor, generator: torch.Generator | None = None) -> StepLosses:
        """The forward pass: ``(loss, nll, kl, logvar)``, loss attached to the graph."""
        return latent_diffusion_losses(self.model, self.logvar, x, fused=self.fused, kl_weight=self.kl_weight,
                                       generator=generator)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> StepLosses:
        """Forward, backward and an optimizer step on the batch ``x``; returns the losses, detached."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        out = self.losses(x, generator)
        out.loss.backward()
        self.optimizer.step()
        return StepLosses(*(t.detach() for t in out))
