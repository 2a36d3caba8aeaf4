"""fusedvae: fused Triton kernels for Gaussian VAE losses, with a plain-PyTorch reference.

    import fusedvae as fv
    z, kl = fv.rsample_kl(mu, logvar)              # sample + KL in one pass
    nll = fv.gaussian_nll(x, decoder(z), log_sigma)
"""

from . import distributions, nn
from .backend import backend_for, use_backend
from .betatc import betatc_decomposition, betatc_loss
from .functional import (
    gaussian_nll,
    gaussian_nll_loss,
    gaussian_nll_optimal,
    kl_normal,
    optimal_log_sigma,
    rsample,
    rsample_kl,
)
from .vae_loss import VAELoss, vae_loss

__version__ = "0.1.0"

__all__ = [
    "VAELoss",
    "backend_for",
    "betatc_decomposition",
    "betatc_loss",
    "distributions",
    "gaussian_nll",
    "gaussian_nll_loss",
    "gaussian_nll_optimal",
    "kl_normal",
    "nn",
    "optimal_log_sigma",
    "rsample",
    "rsample_kl",
    "use_backend",
    "vae_loss",
]
