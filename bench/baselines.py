"""What users write today instead of fusedvae: the ``torch`` provider's code, in one readable module.

Every function below is the loss code of a public VAE codebase, as written there (names and
argument orders kept, so a reader can compare line by line); the benchmarks time it eagerly
(provider ``torch``) and under ``torch.compile`` (``torch+compile``), and ``tests/test_baselines.py``
checks that fusedvae computes the same values and gradients wherever no noise is involved.

- PyTorch examples' VAE (``pytorch/examples``, ``vae/main.py``): :func:`reparameterize` and the
  textbook KL :func:`kl_standard_normal`; with a Gaussian decoder its reconstruction term is
  ``F.gaussian_nll_loss`` (:func:`gaussian_nll_loss`).
- The σ-VAE authors (Rybkin et al. 2021, ``orybkin/sigma-vae-pytorch``): :func:`gaussian_nll`,
  :func:`softclip` and the optimal σ, :func:`optimal_log_sigma`.
- VDVAE (Child 2021, ``openai/vdvae``, ``vae_helpers.py``): :func:`draw_gaussian_diag_samples`
  and :func:`gaussian_analytical_kl`, both in log σ.
- The learned-prior KL in log-variances as hierarchical VAEs write it: :func:`kl_learned_prior`.
- diffusers' ``AutoencoderKL``: its own ``DiagonalGaussianDistribution`` (not repeated here; see
  :mod:`bench.models`).

Below them, the micro-benchmark ops (same signature and reduction as :mod:`bench.micro`'s fused
ones: per-datapoint sums, ``"mean"`` for ``gaussian_nll_loss``) built from those functions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- PyTorch examples' VAE


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``z = mu + eps * std``, ``eps = randn_like(std)``, as in ``pytorch/examples`` (any shape)."""
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    return mu + eps * std


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(0, I)) per datapoint, ``(B, D) -> (B,)``, the textbook formula.

    Example::

        >>> kl_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3))
        tensor([0., 0.])
    """
    return -0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp(), dim=1)


def gaussian_nll_loss(input: torch.Tensor, target: torch.Tensor, var: torch.Tensor, **kwargs) -> torch.Tensor:
    """``torch.nn.functional.gaussian_nll_loss``: what a Gaussian decoder with a variance head calls."""
    return F.gaussian_nll_loss(input, target, var, **kwargs)


# ---------------------------------------------------------------- σ-VAE (Rybkin et al.)


def gaussian_nll(mu: torch.Tensor, log_sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Elementwise ``-log N(x; mu, e^{2 log_sigma})`` as the σ-VAE code writes it (note: mean first, then log σ)."""
    return 0.5 * torch.pow((x - mu) / log_sigma.exp(), 2) + log_sigma + 0.5 * np.log(2 * np.pi)


def softclip(tensor: torch.Tensor, min: float) -> torch.Tensor:
    """Soft lower bound ``min + softplus(tensor - min)``."""
    return min + F.softplus(tensor - min)


def optimal_log_sigma(x: torch.Tensor, x_hat: torch.Tensor, *, per_sample: bool = False) -> torch.Tensor:
    """The σ-VAE's analytic log σ: ``log sqrt(MSE)`` over the batch (or per sample), soft-clipped at -6."""
    dims = list(range(1, x.dim())) if per_sample else list(range(x.dim()))
    log_sigma = ((x - x_hat) ** 2).mean(dims, keepdim=True).sqrt().log()
    return softclip(log_sigma, -6)


# ---------------------------------------------------------------- VDVAE (Child 2021)


def gaussian_analytical_kl(mu1, mu2, logsigma1, logsigma2):
    """KL(N(mu1, e^{2 logsigma1}) || N(mu2, e^{2 logsigma2})) elementwise, VDVAE's ``vae_helpers.py``."""
    return -0.5 + logsigma2 - logsigma1 + 0.5 * (logsigma1.exp() ** 2 + (mu1 - mu2) ** 2) / (logsigma2.exp() ** 2)


def draw_gaussian_diag_samples(mu, logsigma):
    """``exp(logsigma) * eps + mu``, VDVAE's ``vae_helpers.py``."""
    eps = torch.empty_like(mu).normal_(0.0, 1.0)
    return torch.exp(logsigma) * eps + mu


# ---------------------------------------------------------------- learned prior, in log-variances


def kl_learned_prior(mu, logvar, prior_mu, prior_logvar):
    """KL(N(mu, e^lv) || N(mu_p, e^lv_p)) elementwise, the form hierarchical VAEs write with log-variances."""
    return (-0.5 + prior_logvar / 2 - logvar / 2
            + 0.5 * (torch.exp(logvar) + (mu - prior_mu) ** 2) / torch.exp(prior_logvar))


# ---------------------------------------------------------------- the micro-benchmark ops


def rsample_kl(mu, logvar):
    """Sample and the per-datapoint KL to N(0, I) (batch mean), as a VAE's forward writes them."""
    return reparameterize(mu, logvar), kl_standard_normal(mu, logvar).mean()


def rsample_kl_prior(mu, logvar, prior_mu, prior_logvar):
    """Sample and the per-datapoint KL to a learned prior (broadcast to ``mu``), ``(B, D)`` latents."""
    return reparameterize(mu, logvar), torch.sum(kl_learned_prior(mu, logvar, prior_mu, prior_logvar), dim=1).mean()


def kl_normal(mu, logvar):
    return (kl_standard_normal(mu, logvar).mean(),)


def kl_normal_prior(mu, logvar, prior_mu, prior_logvar):
    return (torch.sum(kl_learned_prior(mu, logvar, prior_mu, prior_logvar), dim=1).mean(),)


def gaussian_nll_learned(x, mean, log_sigma):
    """The σ-VAE's NLL summed over every pixel, per datapoint; ``log_sigma`` broadcasts to ``x``."""
    return (gaussian_nll(mean, log_sigma, x).sum() / x.shape[0],)


def gaussian_nll_optimal(x, mean):
    return (gaussian_nll(mean, optimal_log_sigma(x, mean), x).sum() / x.shape[0],)


def gaussian_nll_optimal_per_sample(x, mean):
    return (gaussian_nll(mean, optimal_log_sigma(x, mean, per_sample=True), x).sum() / x.shape[0],)


def gaussian_nll_loss_op(x, mean, var):
    """``F.gaussian_nll_loss(mean, x, var)`` with torch's defaults (``reduction="mean"``, the variance check)."""
    return (gaussian_nll_loss(mean, x, var),)
