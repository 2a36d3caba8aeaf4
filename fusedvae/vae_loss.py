"""The whole Gaussian-VAE objective in one call, built on the fused sample + KL."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from . import functional as fvf


class VAELoss(NamedTuple):
    """``loss = nll + beta * kl_term``, with ``nll`` and ``kl`` per datapoint (batch means)."""

    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor


_OPTIMAL = {"optimal": False, "optimal_per_sample": True}


def _check_beta(beta: object, batch_size: int) -> float | torch.Tensor:
    if isinstance(beta, torch.Tensor):
        if beta.shape != (batch_size,):
            raise ValueError(f"beta as a tensor must have shape (B,) = ({batch_size},), got {tuple(beta.shape)}")
        return beta
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float or a tensor of shape (B,), got {type(beta).__name__}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    return float(beta)


def vae_loss(
    x: torch.Tensor,
    decoder: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    log_sigma: torch.Tensor | float | str | None = 0.0,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    beta: float | torch.Tensor = 1.0,
    capacity: float | None = None,
    free_bits: float = 0.0,
    min_log_sigma: float | None = -6.0,
    full: bool = True,
    generator: torch.Generator | None = None,
) -> VAELoss:
    """Negative ELBO of a Gaussian VAE: sample z and its KL in one fused call, decode, add the NLL.

    ``z, kl = rsample_kl(mu, logvar, prior)``; ``mean = decoder(z)``; ``nll = gaussian_nll(x, mean, σ)``;
    ``loss = nll + beta * kl`` (or ``nll + beta * |kl - capacity|``, Burgess et al. 2018), all per datapoint.

    Args:
        x: data ``(B, ...)``.
        decoder: maps z ``(B, *latent)`` to the decoder mean ``(B, ...)``, or to ``(mean, log_sigma)``
            for a decoder with its own scale head (then pass ``log_sigma=None``).
        mu, logvar: encoder output ``(B, *latent)``.
        log_sigma: decoder log-scale: a float (fixed), a tensor broadcastable to x (learned, e.g.
            an ``nn.Parameter``), ``"optimal"`` or ``"optimal_per_sample"`` (σ-VAE), or ``None``
            when the decoder returns it.
        prior_mu, prior_logvar: the prior, broadcastable to mu (``None``: N(0, I)).
        beta: KL weight, a float, or a tensor of shape ``(B,)`` for a weight per example.
        capacity: the target KL ``C`` of ``|kl - C|``; needs a float ``beta``.
        free_bits: nats per latent element below which the KL is held (needs a float ``beta``).
        min_log_sigma: soft lower bound for the optimal σ.
        full: include ``log(2 pi) / 2`` per element in the NLL.
        generator: the torch generator for the noise.

    Returns:
        :class:`VAELoss` ``(loss, nll, kl)``, each a scalar.

    Example::

        >>> import torch, fusedvae as fv
        >>> decoder = torch.nn.Linear(8, 20)
        >>> x, mu, logvar = torch.randn(32, 20), torch.randn(32, 8), torch.randn(32, 8)
        >>> out = fv.vae_loss(x, decoder, mu, logvar, log_sigma="optimal", beta=0.5)
        >>> out.loss.backward()
    """
    if not callable(decoder):
        raise TypeError(f"decoder must be callable, got {type(decoder).__name__}")
    batch_size = mu.shape[0] if isinstance(mu, torch.Tensor) and mu.dim() else 0
    beta = _check_beta(beta, batch_size)
    per_example = isinstance(beta, torch.Tensor)
    if per_example and (capacity is not None or free_bits):
        raise ValueError("capacity and free_bits act on the batch KL; they need a float beta, not a tensor")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, (int, float))):
        raise TypeError(f"capacity must be a float or None, got {type(capacity).__name__}")
    reduction = "per_sample" if per_example else "batchmean"

    z, kl = fvf.rsample_kl(
        mu, logvar, prior_mu, prior_logvar, generator=generator, reduction=reduction, free_bits=free_bits
    )
    decoded = decoder(z)
    if isinstance(decoded, tuple):
        if log_sigma is not None:
            raise ValueError("the decoder returned (mean, log_sigma); pass log_sigma=None")
        mean, log_sigma = decoded
    elif log_sigma is None:
        raise ValueError("log_sigma=None needs a decoder that returns (mean, log_sigma)")
    else:
        mean = decoded

    if isinstance(log_sigma, str):
        if log_sigma not in _OPTIMAL:
            raise ValueError(f"log_sigma as a string must be one of {tuple(_OPTIMAL)}, got {log_sigma!r}")
        nll = fvf.gaussian_nll_optimal(
            x, mean, per_sample=_OPTIMAL[log_sigma], min_log_sigma=min_log_sigma, reduction=reduction, full=full
        )
    else:
        nll = fvf.gaussian_nll(x, mean, log_sigma, reduction=reduction, full=full)

    if per_example:
        loss = (nll + beta.to(nll.dtype) * kl).mean()
        return VAELoss(loss, nll.mean(), kl.mean())
    kl_term = kl if capacity is None else (kl - float(capacity)).abs()
    return VAELoss(nll + beta * kl_term, nll, kl)
