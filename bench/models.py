"""The VAEs the training loops run. Each ``forward(x)`` returns the per-datapoint loss ``nll + kl``.

Only the loss path differs between providers. With ``model.baseline`` set (:func:`use_baselines`,
the ``torch`` providers) it is the loss code of that model's public codebase, from
:mod:`bench.baselines`: the PyTorch examples' VAE for the MLP, the σ-VAE authors' for the conv
σ-VAE, VDVAE's for the hierarchical VAE, diffusers' own posterior for the AutoencoderKL. Otherwise
it calls fusedvae (``fv.rsample_kl``, ``fv.gaussian_nll``, ``fv.gaussian_nll_optimal`` through
``fv.nn.GaussianLikelihood``) on the provider's backend. Both paths compute the same loss (equal
values up to float rounding for the same noise), so the same weights measure every provider.

1. :class:`MLPVAE`: Kingma & Welling (2013), 784-400-20, Gaussian decoder with a per-pixel
   log-variance head.
2. :class:`ConvSigmaVAE`: a convolutional σ-VAE (Rybkin et al. 2021) on 64x64x3 images, with a
   learned shared σ, the optimal σ (one per batch), or a per-pixel σ predicted by the decoder.
3. :class:`HierarchicalVAE`: a VDVAE-style (Child 2021) top-down hierarchy on 32x32x3 images with
   many stochastic layers; each has a learned diagonal prior p(z_l | z_<l), a posterior
   q(z_l | x, z_<l), both in log σ as VDVAE's, and one ``fv.rsample_kl(q_mu, 2 q_logσ, p_mu, 2 p_logσ)``
   on its latent map (VDVAE's ``draw_gaussian_diag_samples`` and ``gaussian_analytical_kl`` for ``torch``).
4. :class:`LatentDiffusionAutoencoder`: an unmodified diffusers ``AutoencoderKL`` on latent
   diffusion's Gaussian loss (:mod:`fusedvae.compat.autoencoderkl`). Here the loss path is not
   chosen by the backend but by :func:`fusedvae.compat.diffusers.patch`, which the fusedvae providers
   run inside (:attr:`ModelSpec.context`): the ``torch`` providers time diffusers' own posterior and
   latent diffusion's loss as written, the others the patched posterior and the fused NLL.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fusedvae as fv

from . import baselines


def use_baselines(module: nn.Module, baseline: bool) -> nn.Module:
    """Switch every submodule with a ``baseline`` flag to the public codebases' loss code (True) or fusedvae's."""
    for child in module.modules():
        if hasattr(child, "baseline"):
            child.baseline = baseline
    return module


class MLPVAE(nn.Module):
    """784-400-20 (Kingma & Welling 2013, their MNIST model), decoder mean and per-pixel log-variance."""

    def __init__(self, x_dim: int = 784, hidden: int = 400, z_dim: int = 20) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(x_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * x_dim))
        self.baseline = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        if self.baseline:  # the PyTorch examples' VAE, its Bernoulli decoder made Gaussian with torch's own NLL
            z = baselines.reparameterize(mu, logvar)
            mean, x_logvar = self.decoder(z).chunk(2, dim=1)
            nll = baselines.gaussian_nll_loss(mean, x, x_logvar.exp(), full=True, reduction="sum")
            return (nll + baselines.kl_standard_normal(mu, logvar).sum()) / x.shape[0]
        z, kl = fv.rsample_kl(mu, logvar)
        mean, x_logvar = self.decoder(z).chunk(2, dim=1)
        return fv.gaussian_nll(x, mean, 0.5 * x_logvar) + kl


def _down(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU())


def _up(c_in: int, c_out: int, last: bool = False) -> nn.Module:
    conv = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)
    return conv if last else nn.Sequential(conv, nn.SiLU())


class ConvSigmaVAE(nn.Module):
    """σ-VAE on ``size`` x ``size`` x 3: four stride-2 convolutions down, four transposed up.

    ``sigma``: ``"learned"`` (one learned log σ shared by every pixel), ``"optimal"`` (σ² = MSE of the
    batch, Rybkin et al.'s calibrated decoder) or ``"per-pixel"`` (the decoder predicts log σ per
    pixel and channel).
    """

    SIGMAS = ("learned", "optimal", "per-pixel")

    def __init__(self, sigma: str = "learned", *, size: int = 64, width: int = 32, z_dim: int = 128) -> None:
        super().__init__()
        if sigma not in self.SIGMAS:
            raise ValueError(f"sigma must be one of {self.SIGMAS}, got {sigma!r}")
        self.sigma = sigma
        self.bottom = size // 16
        w = width
        self.encoder = nn.Sequential(_down(3, w), _down(w, 2 * w), _down(2 * w, 4 * w), _down(4 * w, 8 * w), nn.Flatten(),
                                     nn.Linear(8 * w * self.bottom**2, 2 * z_dim))
        self.project = nn.Linear(z_dim, 8 * w * self.bottom**2)
        out_channels = 6 if sigma == "per-pixel" else 3
        self.decoder = nn.Sequential(_up(8 * w, 4 * w), _up(4 * w, 2 * w), _up(2 * w, w), _up(w, out_channels, last=True))
        if sigma == "learned":
            self.likelihood = fv.nn.GaussianLikelihood(())
        elif sigma == "optimal":
            self.likelihood = fv.nn.GaussianLikelihood(optimal="batch")
        self.baseline = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        if self.baseline:
            return self._baseline_loss(x, mu, logvar)
        z, kl = fv.rsample_kl(mu, logvar)
        h = F.silu(self.project(z)).view(x.shape[0], -1, self.bottom, self.bottom)
        out = self.decoder(h)
        if self.sigma == "per-pixel":
            mean, log_sigma = out.chunk(2, dim=1)
            return fv.gaussian_nll(x, mean, log_sigma) + kl
        return self.likelihood(x, out) + kl

    def _baseline_loss(self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """The σ-VAE authors' loss: their gaussian_nll at a learned, optimal or predicted log σ, the textbook KL."""
        z = baselines.reparameterize(mu, logvar)
        out = self.decoder(F.silu(self.project(z)).view(x.shape[0], -1, self.bottom, self.bottom))
        if self.sigma == "per-pixel":
            out, log_sigma = out.chunk(2, dim=1)
        elif self.sigma == "optimal":
            log_sigma = baselines.optimal_log_sigma(x, out)
        else:
            log_sigma = self.likelihood.log_sigma
        rec = baselines.gaussian_nll(out, log_sigma, x).sum()
        return (rec + baselines.kl_standard_normal(mu, logvar).sum()) / x.shape[0]


class ResBlock(nn.Module):
    """VDVAE's bottleneck block: 1x1, 3x3, 3x3, 1x1 with GELUs, optionally residual."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, *, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.net = nn.Sequential(
            nn.GELU(), nn.Conv2d(c_in, c_mid, 1), nn.GELU(), nn.Conv2d(c_mid, c_mid, 3, padding=1),
            nn.GELU(), nn.Conv2d(c_mid, c_mid, 3, padding=1), nn.GELU(), nn.Conv2d(c_mid, c_out, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return x + out if self.residual else out


class TopDownBlock(nn.Module):
    """One stochastic layer: prior and posterior on a latent map, the fused sample + KL, the residual update."""

    def __init__(self, width: int, z_channels: int) -> None:
        super().__init__()
        self.z_channels = z_channels
        mid = max(width // 4, 4)
        self.prior = ResBlock(width, mid, 2 * z_channels + width, residual=False)
        self.posterior = ResBlock(2 * width, mid, 2 * z_channels, residual=False)
        self.z_proj = nn.Conv2d(z_channels, width, 1)
        self.out = ResBlock(width, mid, width)
        self.baseline = False

    def forward(self, h: torch.Tensor, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the next activation and this layer's KL summed over the batch (nats)."""
        prior = self.prior(h)
        # As in VDVAE the networks output log σ (not log-variance); fusedvae takes log-variances: 2 log σ.
        p_mu, p_logsigma, h_prior = prior.split([self.z_channels, self.z_channels, h.shape[1]], dim=1)
        q_mu, q_logsigma = self.posterior(torch.cat([h, encoded], dim=1)).chunk(2, dim=1)
        if self.baseline:  # VDVAE's vae_helpers
            z = baselines.draw_gaussian_diag_samples(q_mu, q_logsigma)
            kl = baselines.gaussian_analytical_kl(q_mu, p_mu, q_logsigma, p_logsigma).sum()
        else:
            z, kl = fv.rsample_kl(q_mu, 2 * q_logsigma, p_mu, 2 * p_logsigma, reduction="sum")
        h = h + h_prior + self.z_proj(z)
        return self.out(h), kl


class HierarchicalVAE(nn.Module):
    """A VDVAE-like hierarchical VAE on ``size`` x ``size`` x 3 images.

    Bottom-up: a residual encoder keeps its activation at every resolution (``size`` down to 4).
    Top-down: from a learned constant at 4x4, ``layers[r]`` stochastic layers per resolution
    (upsampled by 2 between resolutions), then a 1x1 convolution to the decoder mean; the data
    likelihood has a learned per-channel σ. Loss: NLL plus the sum of every layer's KL.
    """

    def __init__(self, *, size: int = 32, width: int = 64, z_channels: int = 16,
                 layers: tuple[int, ...] = (2, 4, 4, 2)) -> None:
        super().__init__()
        self.resolutions = [4 * 2**i for i in range(len(layers))]
        if self.resolutions[-1] != size:
            raise ValueError(f"{len(layers)} resolutions from 4 end at {self.resolutions[-1]}, not the image size {size}")
        mid = max(width // 4, 4)
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.encoder = nn.ModuleList(ResBlock(width, mid, width) for _ in self.resolutions)
        self.h0 = nn.Parameter(torch.zeros(1, width, 4, 4))
        self.decoder = nn.ModuleList(
            nn.ModuleList(TopDownBlock(width, z_channels) for _ in range(count)) for count in layers)
        self.head = nn.Conv2d(width, 3, 1)
        self.likelihood = fv.nn.GaussianLikelihood((3, 1, 1))
        self.baseline = False

    @property
    def n_stochastic_layers(self) -> int:
        return sum(len(blocks) for blocks in self.decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activations = {}
        h = self.stem(x)
        for resolution, block in zip(reversed(self.resolutions), self.encoder):
            h = block(h)
            activations[resolution] = h
            h = F.avg_pool2d(h, 2)
        h = self.h0.expand(x.shape[0], -1, -1, -1)
        kl_total = 0.0
        for index, (resolution, blocks) in enumerate(zip(self.resolutions, self.decoder)):
            if index:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            for block in blocks:
                h, kl = block(h, activations[resolution])
                kl_total = kl_total + kl
        if self.baseline:  # VDVAE's likelihood is a logistic mixture; a Gaussian one is the σ-VAE's formula
            nll = baselines.gaussian_nll(self.head(h), self.likelihood.log_sigma, x).sum()
        else:
            nll = fv.gaussian_nll(x, self.head(h), self.likelihood.log_sigma, reduction="sum")
        return (nll + kl_total) / x.shape[0]


class LatentDiffusionAutoencoder(nn.Module):
    """diffusers' ``AutoencoderKL`` (from :data:`fusedvae.compat.autoencoderkl.TINY_CONFIG` updated by
    ``config``) with latent diffusion's learned scalar log-variance; ``forward(x)`` is the loss of
    :func:`fusedvae.compat.autoencoderkl.latent_diffusion_losses`, fused while diffusers is patched.
    Images in [0, 1] are mapped to diffusers' [-1, 1]."""

    def __init__(self, *, kl_weight: float = 1e-4, **config) -> None:
        super().__init__()
        from .autoencoderkl import tiny_autoencoderkl

        self.vae = tiny_autoencoderkl(**config)
        self.logvar = nn.Parameter(torch.zeros(()))
        self.kl_weight = kl_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fusedvae.compat.diffusers import is_patched

        from .autoencoderkl import latent_diffusion_losses

        return latent_diffusion_losses(self.vae, self.logvar, 2 * x - 1, fused=is_patched(),
                                       kl_weight=self.kl_weight).loss


def _patched_unless_baseline(provider: str) -> AbstractContextManager:
    from fusedvae.compat.diffusers import patch

    from .providers import uses_baseline

    return contextlib.nullcontext() if uses_baseline(provider) else patch()


@dataclass(frozen=True)
class ModelSpec:
    """One training benchmark: a model, its variant, its input shape and per-process batch.

    ``context(provider)``, when given, is entered around every step of that provider (compilation
    included), inside the provider's own context. ``unfused_backend`` names, for the ``backend``
    column, what the ``torch`` providers' loss path runs when it is not :mod:`bench.baselines`.
    """

    model: str
    variant: str
    channels: int
    size: int
    batch: int
    build: Callable[[], nn.Module]
    context: Callable[[str], AbstractContextManager] | None = None
    unfused_backend: str | None = None  # the backend label of the torch providers when not "torch" (diffusers)

    @property
    def name(self) -> str:
        return f"{self.model}:{self.variant}"


MODELS = ("mlp", "conv", "hier", "akl")


def model_specs(preset: str, device_type: str) -> list[ModelSpec]:
    """The training benchmarks for a preset (``full``, ``quick`` or ``tiny``) on a device type."""
    gpu = device_type == "cuda"
    if preset == "tiny":
        batch = {"mlp": 8, "conv": 2, "hier": 2, "akl": 2}
        akl = dict(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=2)
        akl_size = 16
        conv = dict(size=32, width=4, z_dim=8)
        hier = dict(size=16, width=8, z_channels=2, layers=(1, 1, 1))
        conv_size, hier_size = 32, 16
    elif preset == "quick" and not gpu:
        batch = {"mlp": 64, "conv": 8, "hier": 8, "akl": 8}
        akl, akl_size = {}, 32
        conv = dict(size=64, width=16, z_dim=64)
        hier = dict(size=32, width=16, z_channels=4, layers=(2, 2, 2, 1))
        conv_size, hier_size = 64, 32
    else:
        batch = {"mlp": 128, "conv": 64, "hier": 32, "akl": 32} if gpu else {"mlp": 128, "conv": 32, "hier": 16, "akl": 16}
        akl = dict(block_out_channels=(64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 3,
                   up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2) if gpu else {}
        akl_size = 64 if gpu else 32
        conv = dict(size=64, width=32, z_dim=128)
        hier = dict(size=32, width=64, z_channels=16, layers=(3, 6, 6, 3)) if gpu else \
            dict(size=32, width=32, z_channels=8, layers=(2, 4, 4, 2))
        conv_size, hier_size = 64, 32
    n_layers = sum(hier["layers"])
    specs = [ModelSpec("mlp", "784-400-20", 1, 28, batch["mlp"], lambda: MLPVAE())]
    for sigma in ConvSigmaVAE.SIGMAS:
        specs.append(ModelSpec("conv-sigma-vae", f"{sigma}-sigma", 3, conv_size, batch["conv"],
                               lambda sigma=sigma: ConvSigmaVAE(sigma, **conv)))
    specs.append(ModelSpec("hierarchical-vae", f"{n_layers}-layers", 3, hier_size, batch["hier"],
                           lambda: HierarchicalVAE(**hier)))
    if importlib.util.find_spec("diffusers") is not None:  # an optional dependency (pip install fusedvae[bench])
        specs.append(ModelSpec("autoencoderkl", f"ldm-{akl_size}px", 3, akl_size, batch["akl"],
                               lambda: LatentDiffusionAutoencoder(**akl), context=_patched_unless_baseline,
                               unfused_backend="diffusers"))
    return specs


def select_models(specs: list[ModelSpec], spec: str | None) -> list[ModelSpec]:
    """``spec``: comma-separated ``mlp``, ``conv``, ``hier``, ``akl`` (or full model names, or ``model:variant``)."""
    if not spec or spec == "all":
        return specs
    aliases = {"mlp": "mlp", "conv": "conv-sigma-vae", "hier": "hierarchical-vae", "akl": "autoencoderkl"}
    chosen = []
    for item in spec.split(","):
        model, _, variant = item.strip().partition(":")
        model = aliases.get(model, model)
        matches = [s for s in specs if s.model == model and (not variant or s.variant.startswith(variant))]
        if not matches:
            raise SystemExit(f"--models: nothing matches {item!r}; known: {', '.join(s.name for s in specs)}")
        chosen.extend(m for m in matches if m not in chosen)
    return chosen
