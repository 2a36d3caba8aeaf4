"""Posterior-collapse diagnostics: active units, collapsed dimensions, and BN-VAE's aggregate-posterior KL bound.

All three take encoder outputs gathered over a dataset (or a large sample of it), shape ``(N, D)``:
``N`` datapoints, ``D`` latent dimensions. They work in the inputs' dtype (float32 or float64).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..reference.kl import kl_normal_elementwise


class ActiveUnits(NamedTuple):
    """``count``: how many dimensions are active (a Python int); ``variances``: shape ``(D,)``."""

    count: int
    variances: torch.Tensor


class CollapsedDims(NamedTuple):
    """``fraction``: share of dimensions collapsed (0-d tensor); ``collapsed``: bool mask, shape ``(D,)``."""

    fraction: torch.Tensor
    collapsed: torch.Tensor


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> ActiveUnits:
    """Active units (Burda et al. 2016): dimension ``d`` is active when ``Var_x(E[z_d | x]) > threshold``.

    ``E[z | x]`` of a Gaussian encoder is its mean ``mu``, so the statistic is the variance over
    the data of each column of ``mu`` (population variance, ``correction=0``).

    Args:
        mu: posterior means over the data, shape ``(N, D)`` (or ``(N, *latent)``), floating point.
        threshold: the activity threshold; Burda et al. use 0.01.

    Returns:
        ``ActiveUnits(count, variances)`` with ``variances`` of shape ``mu.shape[1:]``.

    Example::

        >>> import torch
        >>> from fusedvae.analysis.diagnostics import active_units
        >>> mu = torch.randn(1000, 4, dtype=torch.float64) * torch.tensor([1.0, 0.5, 0.01, 0.0], dtype=torch.float64)
        >>> active_units(mu).count
        2
    """
    variances = mu.var(dim=0, correction=0)
    return ActiveUnits(int((variances > threshold).sum()), variances)


def collapsed_fraction(kl: torch.Tensor, eps: float = 0.01, delta: float = 0.01) -> CollapsedDims:
    """Fraction of (ε, δ)-collapsed dimensions (Lucas et al. 2019, "Don't blame the ELBO").

    Dimension ``d`` is collapsed when ``P_x[KL(q(z_d | x) || p(z_d)) < eps] >= 1 - delta``: its KL is
    below ``eps`` for all but a fraction ``delta`` of the data.

    Args:
        kl: per-datapoint, per-dimension KL, shape ``(N, D)`` (or ``(N, *latent)``), e.g.
            ``kl_normal_elementwise(mu, logvar)`` or ``fusedvae.kl_normal(mu, logvar, reduction="none")``.
        eps: the KL threshold in nats.
        delta: the tolerated share of datapoints above ``eps``.

    Returns:
        ``CollapsedDims(fraction, collapsed)``: the fraction as a 0-d tensor of ``kl``'s dtype and
        the bool mask of collapsed dimensions, shape ``kl.shape[1:]``.

    Example::

        >>> import torch
        >>> from fusedvae.analysis.diagnostics import collapsed_fraction
        >>> kl = torch.rand(500, 4, dtype=torch.float64) * torch.tensor([1.0, 1.0, 1e-3, 1e-4], dtype=torch.float64)
        >>> collapsed_fraction(kl).fraction
        tensor(0.5000, dtype=torch.float64)
    """
    below = (kl < eps).to(kl.dtype).mean(dim=0)  # P_x[KL_d < eps], per dimension
    collapsed = below >= 1.0 - delta
    return CollapsedDims(collapsed.to(kl.dtype).mean(), collapsed)


def aggregate_posterior_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """BN-VAE's lower bound on KL(q(z_d) || N(0, 1)) per dimension, ``q(z) = mean_x q(z | x)`` (Zhu et al. 2020).

    The aggregate posterior, a mixture of the N Gaussians, has per-dimension mean ``mean(mu)`` and
    variance ``var(mu) + mean(exp(logvar))`` (population variance). Among all distributions with those
    moments the Gaussian is closest to N(0, 1), so

        ``KL(q(z_d) || N(0, 1)) >= KL(N(mean(mu), var(mu) + mean(exp(logvar))) || N(0, 1))``.

    It is 0 only when the aggregate matches the prior's first two moments; BN-VAE's fixed scale
    ``gamma > 1`` makes ``var(mu) = gamma^2 > 1``, so the bound is > 0: a "posterior hole".

    Args:
        mu, logvar: posterior means and log-variances over the data, shape ``(N, D)``.

    Returns:
        The bound per dimension, shape ``(D,)``, in the inputs' dtype.

    Example::

        >>> import torch
        >>> from fusedvae.analysis.diagnostics import aggregate_posterior_kl
        >>> mu = 2.0 * torch.randn(4096, 3, dtype=torch.float64)          # gamma = 2
        >>> logvar = torch.full((4096, 3), -4.0, dtype=torch.float64)
        >>> bool((aggregate_posterior_kl(mu, logvar) > 0.5).all())
        True
    """
    if mu.shape != logvar.shape:
        raise ValueError(f"logvar must have the shape of mu, {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    mean = mu.mean(dim=0)
    var = mu.var(dim=0, correction=0) + torch.exp(logvar).mean(dim=0)
    return kl_normal_elementwise(mean, torch.log(var))
