"""Modules over the functional ops: a Gaussian likelihood with its σ_x, a diagonal-Gaussian posterior, BN-VAE's mean."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as fvf
from .reductions import apply_reduction
from .validation import KL_REDUCTIONS, check_reduction, check_same_shape, check_tensor

_OPTIMAL_MODES = (None, "batch", "sample")


class GaussianLikelihood(nn.Module):
    """Gaussian decoder likelihood ``-log N(x; mean, σ_x²)`` with σ_x learned, fixed, or optimal (σ-VAE).

    Args:
        log_sigma_shape: shape of the learned/fixed log σ_x, broadcast to x from the right:
            ``()`` shared, ``(C, 1, 1)`` per channel, ``(C, H, W)`` per element.
        init_log_sigma: its initial value.
        learnable: make log σ_x an ``nn.Parameter`` (else a buffer: a fixed σ_x).
        optimal: ``None``, ``"batch"`` or ``"sample"``: use the analytically optimal σ_x (one for the
            batch, or one per sample) instead of a stored one.
        min_log_sigma: soft lower bound for the optimal σ_x.
        full, reduction: as :func:`fusedvae.gaussian_nll`.

    Example::

        >>> import torch, fusedvae as fv
        >>> likelihood = fv.nn.GaussianLikelihood((3, 1, 1))      # learned, per channel
        >>> x, mean = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
        >>> likelihood(x, mean).backward()
    """

    def __init__(
        self,
        log_sigma_shape: tuple[int, ...] = (),
        *,
        init_log_sigma: float = 0.0,
        learnable: bool = True,
        optimal: str | None = None,
        min_log_sigma: float | None = -6.0,
        full: bool = True,
        reduction: str = "batchmean",
    ) -> None:
        super().__init__()
        if optimal not in _OPTIMAL_MODES:
            raise ValueError(f"optimal must be one of {_OPTIMAL_MODES}, got {optimal!r}")
        self.optimal = optimal
        self.min_log_sigma = min_log_sigma
        self.full = full
        self.reduction = check_reduction(reduction)
        if optimal is None:
            initial = torch.full(tuple(log_sigma_shape), float(init_log_sigma))
            if learnable:
                self.log_sigma = nn.Parameter(initial)
            else:
                self.register_buffer("log_sigma", initial)

    def forward(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """The NLL of ``x`` ``(B, ...)`` under the decoder mean ``mean`` (same shape), reduced."""
        if self.optimal is None:
            return fvf.gaussian_nll(x, mean, self.log_sigma, reduction=self.reduction, full=self.full)
        return fvf.gaussian_nll_optimal(
            x, mean, per_sample=self.optimal == "sample", min_log_sigma=self.min_log_sigma,
            reduction=self.reduction, full=self.full,
        )

    def current_log_sigma(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """log σ_x as used for ``(x, mean)``, detached: the stored one, or the optimal one."""
        if self.optimal is None:
            return self.log_sigma.detach()
        return fvf.optimal_log_sigma(x, mean, per_sample=self.optimal == "sample", min_log_sigma=self.min_log_sigma)


class DiagonalGaussian:
    """A diagonal Gaussian ``N(mean, exp(logvar))`` over ``(B, ...)``, reducing over every non-batch dim.

    A replacement for diffusers' ``DiagonalGaussianDistribution`` whose reductions are not tied to
    4-D tensors; ``std`` and ``var`` are computed only when read.

    Example::

        >>> import torch, fusedvae as fv
        >>> q = fv.nn.DiagonalGaussian(torch.randn(4, 16), torch.randn(4, 16))
        >>> z = q.rsample()
        >>> q.kl().shape, q.nll(z).shape
        (torch.Size([4]), torch.Size([4]))
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        check_tensor("mean", mean)
        check_tensor("logvar", logvar)
        check_same_shape("logvar", logvar, "mean", mean)
        self.mean = mean
        self.logvar = logvar

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def rsample(self, n_samples: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterized sample, differentiable in mean and logvar (see :func:`fusedvae.rsample`)."""
        return fvf.rsample(self.mean, self.logvar, n_samples=n_samples, generator=generator)

    def sample(self, n_samples: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """A sample without gradient."""
        with torch.no_grad():
            return self.rsample(n_samples, generator)

    def rsample_kl(
        self, other: DiagonalGaussian | None = None, *, reduction: str = "per_sample",
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A sample and ``KL(self || other)`` in one fused call (see :func:`fusedvae.rsample_kl`)."""
        prior_mu, prior_logvar = (None, None) if other is None else (other.mean, other.logvar)
        return fvf.rsample_kl(self.mean, self.logvar, prior_mu, prior_logvar, generator=generator, reduction=reduction)

    def kl(self, other: DiagonalGaussian | None = None, *, reduction: str = "per_sample") -> torch.Tensor:
        """``KL(self || other)``, ``other`` defaulting to N(0, I); per sample (shape ``(B,)``) by default."""
        check_reduction(reduction, KL_REDUCTIONS)
        prior_mu, prior_logvar = (None, None) if other is None else (other.mean, other.logvar)
        return fvf.kl_normal(self.mean, self.logvar, prior_mu, prior_logvar, reduction=reduction)

    def nll(self, sample: torch.Tensor, *, reduction: str = "per_sample") -> torch.Tensor:
        """``-log q(sample)`` (with the ``log(2 pi)/2`` constant); per sample by default."""
        return fvf.gaussian_nll(sample, self.mean, 0.5 * self.logvar, reduction=reduction, full=True)

    def log_prob(self, sample: torch.Tensor) -> torch.Tensor:
        """Elementwise log-density, the shape of ``sample``."""
        return -fvf.gaussian_nll(sample, self.mean, 0.5 * self.logvar, reduction="none", full=True)

    def mode(self) -> torch.Tensor:
        return self.mean

    def entropy(self, *, reduction: str = "per_sample") -> torch.Tensor:
        """Differential entropy ``0.5 (log(2 pi e) + logvar)`` per element, reduced."""
        check_reduction(reduction)
        return apply_reduction(0.5 * (math.log(2.0 * math.pi * math.e) + self.logvar), reduction)


class BatchNormMean(nn.Module):
    """BN-VAE (Zhu et al. 2020): batch-normalise the posterior mean with its scale fixed at ``gamma``.

    ``mu_bn = gamma * (mu - E_batch[mu]) / sqrt(Var_batch[mu] + eps) + shift``, with a learnable
    ``shift`` per feature; a fixed ``gamma > 0`` keeps every dimension's expected KL above
    ``gamma^2 / 2`` and so prevents posterior collapse, as long as the pre-normalisation variance
    stays well above ``eps`` (the science suite's BN-VAE study shows an encoder escaping it at
    gamma >= 1.5 with eps = 1e-5; a smaller eps such as 1e-10 keeps the floor).

    Args:
        num_features: size of dim 1 of the mean ``(B, num_features, ...)``.
        gamma: the fixed scale.
        eps, momentum: as :class:`torch.nn.BatchNorm1d`.

    Example::

        >>> import torch, fusedvae as fv
        >>> bn = fv.nn.BatchNormMean(16, gamma=0.5)
        >>> bn(torch.randn(32, 16)).std(0).mean().item() > 0.4
        True
    """

    def __init__(self, num_features: int, gamma: float, *, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)
        self.eps = eps
        self.momentum = momentum
        self.shift = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("scale", torch.full((num_features,), float(gamma)))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, mu: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(
            mu, self.running_mean, self.running_var, self.scale, self.shift,
            training=self.training, momentum=self.momentum, eps=self.eps,
        )
