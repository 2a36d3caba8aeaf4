"""KL and ELBO estimators: SGVB estimator A (Monte Carlo) and B (analytic KL), and the IWAE bound.

Kingma & Welling (2014) estimate the KL term of the ELBO either from the sample,
``log q(z|x) - log p(z)`` (estimator A), or in closed form (estimator B). Burda et al. (2016) tighten
the ELBO with K importance samples: ``L_K = log (1/K) sum_k w_k``, ``log w_k = log p(x|z_k) +
log p(z_k) - log q(z_k|x)``. All functions work in float32 or float64.
"""

from __future__ import annotations

import math

import torch

from ..reference.gaussian_nll import gaussian_nll
from ..reference.kl import kl_normal_elementwise


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``log N(z; mu, exp(logvar))`` per element (a diagonal Gaussian's log-density, log(2π) included).

    Args:
        z, mu, logvar: broadcastable to one another, e.g. z ``(K, B, D)`` and mu, logvar ``(B, D)``.

    Returns:
        The elementwise log-density, the broadcast shape.

    Example::

        >>> import torch
        >>> from fusedvae.analysis.estimators import log_normal
        >>> log_normal(torch.zeros(1), torch.zeros(1), torch.zeros(1))  # -log(2 pi) / 2
        tensor([-0.9189])
    """
    return -gaussian_nll(z, mu, 0.5 * logvar, full=True, reduction="none")


def _standard_if_none(prior: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device) if prior is None else prior


def kl_estimator_a(
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
) -> torch.Tensor:
    """SGVB estimator A of the KL term: ``log q(z|x) - log p(z)`` per element, from a sample ``z ~ q(z|x)``.

    ``q(z|x) = N(mu, exp(logvar))``; ``p(z) = N(prior_mu, exp(prior_logvar))``, N(0, I) by default.
    Its expectation over ``z`` is the analytic KL, :func:`kl_estimator_b`.

    Args:
        z: samples, shape ``mu.shape`` or ``(K, *mu.shape)`` for K samples per datapoint.
        mu, logvar: the posterior, same shape ``(B, ...)``.
        prior_mu, prior_logvar: broadcastable to ``mu``; ``None`` means 0.

    Returns:
        The per-element estimate, shape of ``z``; sum over latent dims for a per-datapoint KL.

    Example::

        >>> import torch
        >>> from fusedvae.analysis.estimators import kl_estimator_a, kl_estimator_b
        >>> _ = torch.manual_seed(0)
        >>> mu, logvar = torch.randn(4, 3, dtype=torch.float64), 0.5 * torch.randn(4, 3, dtype=torch.float64)
        >>> z = mu + torch.exp(0.5 * logvar) * torch.randn(100_000, 4, 3, dtype=torch.float64)  # 100k samples
        >>> torch.allclose(kl_estimator_a(z, mu, logvar).mean(0), kl_estimator_b(mu, logvar), atol=0.05)
        True
    """
    prior_mu, prior_logvar = _standard_if_none(prior_mu, mu), _standard_if_none(prior_logvar, mu)
    return log_normal(z, mu, logvar) - log_normal(z, prior_mu, prior_logvar)


def kl_estimator_b(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
) -> torch.Tensor:
    """SGVB estimator B of the KL term: the analytic KL(q(z|x) || p(z)) per element.

    The same function as :func:`fusedvae.reference.kl.kl_normal_elementwise` (exact near collapse).

    Args:
        mu, logvar: the posterior, same shape; prior_mu, prior_logvar: broadcastable, ``None`` = 0.

    Example::

        >>> import torch
        >>> from fusedvae.analysis.estimators import kl_estimator_b
        >>> kl_estimator_b(torch.tensor([1.0]), torch.tensor([0.0]))
        tensor([0.5000])
    """
    return kl_normal_elementwise(mu, logvar, prior_mu, prior_logvar)


def log_importance_weights(
    log_likelihood: torch.Tensor,
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log w = log p(x|z) + log p(z) - log q(z|x)`` for each sample: the IWAE log-weights.

    Args:
        log_likelihood: the decoder's ``log p(x | z_k)`` per sample and datapoint, shape ``(K, B)``
            (e.g. ``-fusedvae.gaussian_nll(x, decoder(z), log_sigma, reduction="per_sample")`` per k).
        z: the samples, shape ``(K, B, *latent)``, drawn from ``q(z|x) = N(mu, exp(logvar))``.
        mu, logvar: the posterior, shape ``(B, *latent)``.
        prior_mu, prior_logvar: the diagonal Gaussian prior, broadcastable; ``None`` means N(0, I).

    Returns:
        The log-weights, shape ``(K, B)``; a single one (K = 1) is the usual one-sample ELBO estimate.

    Example::

        >>> import torch
        >>> from fusedvae.analysis.estimators import log_importance_weights
        >>> mu, logvar = torch.randn(8, 2), torch.randn(8, 2)
        >>> z = mu + torch.exp(0.5 * logvar) * torch.randn(5, 8, 2)
        >>> log_importance_weights(torch.randn(5, 8), z, mu, logvar).shape
        torch.Size([5, 8])
    """
    if z.shape[: log_likelihood.dim()] != log_likelihood.shape:
        raise ValueError(
            f"log_likelihood of shape {tuple(log_likelihood.shape)} must be the leading shape of z, "
            f"{tuple(z.shape)}"
        )
    log_q_over_p = kl_estimator_a(z, mu, logvar, prior_mu, prior_logvar)
    latent_dims = tuple(range(log_likelihood.dim(), z.dim()))
    return log_likelihood - log_q_over_p.sum(dim=latent_dims)


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """The importance-weighted bound ``L_K = logsumexp_k(log w_k) - log K`` (Burda et al. 2016).

    ``L_1`` is the ELBO; ``E[L_K]`` increases with ``K`` towards ``log p(x)``, and for every draw
    ``L_K >= mean_k(log w_k)`` (Jensen).

    Args:
        log_weights: shape ``(K, B, ...)``, from :func:`log_importance_weights`.

    Returns:
        The bound per datapoint, shape ``(B, ...)``.

    Example::

        >>> import torch
        >>> from fusedvae.analysis.estimators import iwae_bound
        >>> iwae_bound(torch.log(torch.tensor([[1.0], [3.0]])))  # log((1 + 3) / 2)
        tensor([0.6931])
    """
    if log_weights.dim() == 0:
        raise ValueError("log_weights must have a sample dimension (dim 0), got a 0-dimensional tensor")
    return torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0])
