"""Linear models with exact answers: probabilistic PCA and the linear VAE's analytic ELBO.

The model (Tipping & Bishop 1999): ``z ~ N(0, I_q)``, ``x | z ~ N(W z + mean, sigma2 I_D)``, so
``x ~ N(mean, C)`` with ``C = W W^T + sigma2 I``. Its maximum-likelihood fit is closed form, and a
linear VAE (Lucas et al. 2019, "Don't blame the ELBO") trained on the same data can reach, but never
exceed, that log-likelihood: at the pPCA optimum with the optimal encoder its ELBO equals it.

Log-likelihoods and ELBOs are per datapoint, reduced like every op here: ``"batchmean"`` (the
average over the N datapoints; the default), ``"sum"`` (Tipping & Bishop's total ``L``), ``"mean"``
or ``"none"`` (shape ``(N,)``). Use float64 to compare them tightly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..reductions import apply_reduction
from ..reference.gaussian_nll import HALF_LOG_2PI, gaussian_nll
from ..reference.kl import kl_normal_elementwise
from ..validation import check_reduction

_REDUCTIONS = ("none", "sum", "mean", "batchmean")


class PPCA(NamedTuple):
    """The pPCA maximum-likelihood fit: ``mean (D,)``, ``W (D, q)``, ``sigma2 ()``, ``log_likelihood ()``.

    ``log_likelihood`` is the average per datapoint; times N it is Tipping & Bishop's total ``L``.
    """

    mean: torch.Tensor
    W: torch.Tensor
    sigma2: torch.Tensor
    log_likelihood: torch.Tensor


def _check_data(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, D), got {tuple(x.shape)}")


def ppca_fit(x: torch.Tensor, q: int) -> PPCA:
    """Probabilistic PCA in closed form (Tipping & Bishop 1999).

    With ``S`` the data covariance (divided by N) and ``lambda_1 >= ... >= lambda_D`` its
    eigenvalues with eigenvectors ``U``:
    ``sigma2 = mean(lambda_{q+1}, ..., lambda_D)`` (the discarded variance),
    ``W = U_q (Lambda_q - sigma2 I)^{1/2}`` (the rotation R = I), and the maximal log-likelihood per
    datapoint ``-(D log(2 pi) + sum_{i<=q} log lambda_i + (D - q) log sigma2 + D) / 2``.

    Args:
        x: data, shape ``(N, D)``, float32 or float64; the fit needs ``1 <= q < D`` and a
            nonzero discarded variance.
        q: latent dimension.

    Returns:
        ``PPCA(mean, W, sigma2, log_likelihood)``.

    Example::

        >>> import torch
        >>> from fusedvae.analysis.linear import ppca_fit, ppca_log_likelihood
        >>> x = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
        >>> fit = ppca_fit(x, q=2)
        >>> fit.W.shape
        torch.Size([6, 2])
        >>> torch.allclose(fit.log_likelihood, ppca_log_likelihood(x, fit.mean, fit.W, fit.sigma2))
        True
    """
    _check_data(x)
    n, d = x.shape
    if not isinstance(q, int) or not 1 <= q < d:
        raise ValueError(f"q must be an int with 1 <= q < D = {d}, got {q!r}")
    mean = x.mean(dim=0)
    centred = x - mean
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / n)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # descending
    sigma2 = eigenvalues[q:].mean()
    W = eigenvectors[:, :q] * (eigenvalues[:q] - sigma2).clamp(min=0.0).sqrt()
    log_det_c = torch.log(eigenvalues[:q]).sum() + (d - q) * torch.log(sigma2)
    log_likelihood = -0.5 * (d * math.log(2.0 * math.pi) + log_det_c + d)  # tr(C^-1 S) = D at the optimum
    return PPCA(mean, W, sigma2, log_likelihood)


def ppca_log_likelihood(
    x: torch.Tensor,
    mean: torch.Tensor,
    W: torch.Tensor,
    sigma2: torch.Tensor | float,
    *,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Exact ``log N(x; mean, W W^T + sigma2 I)`` for any pPCA parameters, reduced over the N datapoints.

    Uses the Woodbury identity with ``M = W^T W + sigma2 I_q`` (a q x q matrix):
    ``log|C| = (D - q) log sigma2 + log|M|`` and
    ``r^T C^{-1} r = (|r|^2 - r^T W M^{-1} W^T r) / sigma2``, ``r = x - mean``.

    Args:
        x: data ``(N, D)``; mean: ``(D,)``; W: ``(D, q)``; sigma2: the noise variance, > 0.
        reduction: ``"batchmean"`` (default), ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(N,)``).

    Example::

        >>> import torch
        >>> from fusedvae.analysis.linear import ppca_log_likelihood
        >>> x = torch.randn(100, 5, dtype=torch.float64)
        >>> ppca_log_likelihood(x, x.mean(0), torch.randn(5, 2, dtype=torch.float64), 0.5, reduction="none").shape
        torch.Size([100])
    """
    _check_data(x)
    d, q = W.shape
    sigma2 = torch.as_tensor(sigma2, dtype=x.dtype, device=x.device)
    M = W.T @ W + sigma2 * torch.eye(q, dtype=x.dtype, device=x.device)
    chol = torch.linalg.cholesky(M)
    r = x - mean
    u = r @ W  # (N, q)
    quadratic = (r * r).sum(-1) - (u * torch.cholesky_solve(u.T, chol).T).sum(-1)
    log_det_c = (d - q) * torch.log(sigma2) + 2.0 * torch.log(torch.diagonal(chol)).sum()
    log_p = -(d * HALF_LOG_2PI + 0.5 * log_det_c + 0.5 * quadratic / sigma2)
    return apply_reduction(log_p, check_reduction(reduction, _REDUCTIONS))


def linear_vae_optimal_encoder(W: torch.Tensor, sigma2: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """The best linear encoder with a diagonal posterior for the decoder ``(W, sigma2)``: ``(V, logvar)``.

    With ``M = W^T W + sigma2 I``: ``V = M^{-1} W^T`` (the exact posterior mean) and
    ``logvar = log(sigma2 / diag(M))``, which maximises the ELBO among diagonal variances. When the
    columns of ``W`` are orthogonal (as in :func:`ppca_fit`), ``M`` is diagonal, ``q(z|x)`` is the exact
    posterior and the ELBO equals the log-likelihood.

    Args:
        W: decoder weight ``(D, q)``; sigma2: decoder noise variance.

    Returns:
        ``V`` of shape ``(q, D)`` and ``logvar`` of shape ``(q,)``.

    Example::

        >>> import torch
        >>> from fusedvae.analysis.linear import linear_vae_optimal_encoder
        >>> V, logvar = linear_vae_optimal_encoder(torch.randn(6, 2), 0.1)
        >>> V.shape, logvar.shape
        (torch.Size([2, 6]), torch.Size([2]))
    """
    q = W.shape[1]
    sigma2 = torch.as_tensor(sigma2, dtype=W.dtype, device=W.device)
    M = W.T @ W + sigma2 * torch.eye(q, dtype=W.dtype, device=W.device)
    V = torch.linalg.solve(M, W.T)
    return V, torch.log(sigma2) - torch.log(torch.diagonal(M))


def linear_vae_elbo(
    x: torch.Tensor,
    mean: torch.Tensor,
    W: torch.Tensor,
    sigma2: torch.Tensor | float,
    V: torch.Tensor,
    logvar: torch.Tensor,
    *,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """The linear VAE's ELBO in closed form (Lucas et al. 2019).

    Encoder ``q(z|x) = N(V (x - mean), diag(exp(logvar)))``; decoder ``p(x|z) = N(W z + mean, sigma2 I)``;
    prior N(0, I). With ``m = V (x - mean)`` and ``s = exp(logvar)``, per datapoint

        ``ELBO = log N(x; W m + mean, sigma2 I) - sum_i s_i |W_i|^2 / (2 sigma2) - KL(N(m, s) || N(0, I))``,

    where ``W_i`` is column i of W: the expected reconstruction term is exact, no sampling.
    It is at most :func:`ppca_log_likelihood` of the same ``(mean, W, sigma2)``.

    Args:
        x: data ``(N, D)``; mean: ``(D,)``; W: ``(D, q)``; sigma2: noise variance, > 0;
        V: encoder weight ``(q, D)``; logvar: posterior log-variance ``(q,)`` (shared) or ``(N, q)``.
        reduction: ``"batchmean"`` (default), ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(N,)``).

    Example::

        >>> import torch
        >>> from fusedvae.analysis.linear import ppca_fit, linear_vae_optimal_encoder, linear_vae_elbo
        >>> x = torch.randn(400, 5, dtype=torch.float64) @ torch.randn(5, 5, dtype=torch.float64)
        >>> fit = ppca_fit(x, q=2)
        >>> V, logvar = linear_vae_optimal_encoder(fit.W, fit.sigma2)
        >>> torch.allclose(linear_vae_elbo(x, fit.mean, fit.W, fit.sigma2, V, logvar), fit.log_likelihood)
        True
    """
    _check_data(x)
    sigma2 = torch.as_tensor(sigma2, dtype=x.dtype, device=x.device)
    m = (x - mean) @ V.T  # posterior means, (N, q)
    reconstruction = -gaussian_nll(x, m @ W.T + mean, 0.5 * torch.log(sigma2), full=True, reduction="per_sample")
    spread = (torch.exp(logvar) * (W * W).sum(0)).sum(-1) / (2.0 * sigma2)  # E_q |W (z - m)|^2 / (2 sigma2)
    kl = kl_normal_elementwise(m, logvar.expand_as(m)).sum(-1)
    return apply_reduction(reconstruction - spread - kl, check_reduction(reduction, _REDUCTIONS))
