"""The β-TC-VAE decomposition of the KL term (Chen et al. 2018, "Isolating sources of disentanglement").

With ``q(z) = (1/N) sum_n q(z | x_n)`` the aggregate posterior over a dataset of N points,

    ``E_x KL(q(z|x) || p(z)) = I_q(x; z) + KL(q(z) || prod_d q(z_d)) + sum_d KL(q(z_d) || p(z_d))``
    (index-code mutual information + total correlation + dimension-wise KL).

``q(z)`` and its marginals ``q(z_d)`` are estimated from one minibatch, by minibatch weighted
sampling (MWS) or minibatch stratified sampling (MSS). Whatever the estimate of ``q(z)``, the three
estimated terms telescope: their sum is exactly the batch mean of ``log q(z|x) - log p(z)``
(SGVB estimator A), whose expectation is the average KL term.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .estimators import log_normal

SAMPLINGS = ("mws", "mss")


class AggregatePosterior(NamedTuple):
    """Minibatch estimates at each sample: ``joint = log q(z_i)`` ``(B,)``, ``marginals = log q(z_id)`` ``(B, D)``."""

    joint: torch.Tensor
    marginals: torch.Tensor


class BetaTC(NamedTuple):
    """The three terms, batch means (0-d tensors), in nats; they sum to the KL term's estimate."""

    mutual_information: torch.Tensor
    total_correlation: torch.Tensor
    dimensionwise_kl: torch.Tensor


def mss_log_weights(batch_size: int, dataset_size: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """Log importance weights of minibatch stratified sampling, shape ``(B, B)``: row i estimates ``q(z_i)``.

    ``q(z_i) ~= sum_j W_ij q(z_i | x_j)`` with, for ``M = B - 1`` (Chen et al. 2018, appendix):
    ``W_ii = 1/N`` (the datapoint z_i was drawn from), ``W_{i, i+1 mod B} = (N - M) / (N M)`` and
    ``1/M`` for the other ``M - 1`` entries. Each row sums to 1, and the other members carry weight
    ``(N - 1)/N`` together, so the estimate of ``q(z_i)`` is unbiased when they are a uniform draw
    (without replacement) from the rest of the data. (The widely copied ``log_importance_weight_matrix``
    of the reference code fills the wrong entries: its strided fills land in columns 0 and 1, not
    on the diagonals.)

    Example::

        >>> from fusedvae.analysis.betatc import mss_log_weights
        >>> mss_log_weights(3, 10).exp()
        tensor([[0.1000, 0.4000, 0.5000],
                [0.5000, 0.1000, 0.4000],
                [0.4000, 0.5000, 0.1000]], dtype=torch.float64)
    """
    if batch_size < 2 or dataset_size < batch_size:
        raise ValueError(
            f"need 2 <= batch_size <= dataset_size, got batch_size={batch_size}, dataset_size={dataset_size}"
        )
    n, m = dataset_size, batch_size - 1
    weights = torch.full((batch_size, batch_size), 1.0 / m, dtype=dtype, device=device)
    rows = torch.arange(batch_size, device=device)
    weights[rows, (rows + 1) % batch_size] = (n - m) / (n * m)
    weights[rows, rows] = 1.0 / n
    return weights.log()


def log_aggregate_posterior(
    z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, dataset_size: int, *, sampling: str = "mss"
) -> AggregatePosterior:
    """Estimate ``log q(z_i)`` and each ``log q(z_id)`` at the batch's samples from the batch alone.

    MWS: ``q(z_i) ~= (1 / (N B)) sum_j q(z_i | x_j)`` (biased: a lower bound in expectation).
    MSS: ``q(z_i) ~= sum_j W_ij q(z_i | x_j)`` with :func:`mss_log_weights` (unbiased inside the log).
    The marginals use the same weights on each dimension's density.

    Args:
        z: one sample per datapoint, ``z_i ~ q(z | x_i)``, shape ``(B, D)``.
        mu, logvar: the posteriors of the batch, shape ``(B, D)``.
        dataset_size: N, the number of datapoints the batch is drawn from.
        sampling: ``"mss"`` (default) or ``"mws"``.

    Example::

        >>> import torch
        >>> from fusedvae.analysis.betatc import log_aggregate_posterior
        >>> mu, logvar = torch.randn(64, 3), torch.randn(64, 3)
        >>> z = mu + torch.exp(0.5 * logvar) * torch.randn(64, 3)
        >>> [t.shape for t in log_aggregate_posterior(z, mu, logvar, dataset_size=60_000)]
        [torch.Size([64]), torch.Size([64, 3])]
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    for name, t in (("z", z), ("mu", mu), ("logvar", logvar)):
        if t.dim() != 2 or t.shape != mu.shape:
            raise ValueError(f"{name} must have shape (B, D) like mu, {tuple(mu.shape)}, got {tuple(t.shape)}")
    batch_size = z.shape[0]
    log_q = log_normal(z[:, None, :], mu[None, :, :], logvar[None, :, :])  # (B_i, B_j, D): log q(z_id | x_j)
    if sampling == "mws":
        log_weights = torch.full((batch_size, batch_size), -math.log(dataset_size * batch_size), dtype=log_q.dtype)
    else:
        log_weights = mss_log_weights(batch_size, dataset_size, dtype=log_q.dtype)
    log_weights = log_weights.to(z.device)
    joint = torch.logsumexp(log_weights + log_q.sum(-1), dim=1)
    marginals = torch.logsumexp(log_weights[:, :, None] + log_q, dim=1)
    return AggregatePosterior(joint, marginals)


def betatc_decomposition(
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    dataset_size: int,
    *,
    sampling: str = "mss",
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
) -> BetaTC:
    """Index-code mutual information, total correlation and dimension-wise KL, estimated on one batch.

    With ``log q(z_i)`` and ``log q(z_id)`` from :func:`log_aggregate_posterior`, batch means of

    - mutual information: ``log q(z_i | x_i) - log q(z_i)``
    - total correlation: ``log q(z_i) - sum_d log q(z_id)``
    - dimension-wise KL: ``sum_d (log q(z_id) - log p(z_id))``

    The sum is exactly the batch mean of ``log q(z_i|x_i) - log p(z_i)`` (SGVB estimator A), whose
    expectation is the average KL term ``E_x KL(q(z|x) || p(z))``.

    Args:
        z: one sample per datapoint, shape ``(B, D)``; mu, logvar: the batch's posteriors ``(B, D)``.
        dataset_size: N, the size of the dataset the batch is drawn from.
        sampling: ``"mss"`` (minibatch stratified, default) or ``"mws"`` (minibatch weighted).
        prior_mu, prior_logvar: the factorised Gaussian prior, broadcastable to ``(B, D)``; ``None`` = N(0, I).

    Returns:
        ``BetaTC(mutual_information, total_correlation, dimensionwise_kl)``, differentiable.

    Example::

        >>> import torch
        >>> from fusedvae.analysis.betatc import betatc_decomposition
        >>> from fusedvae.analysis.estimators import kl_estimator_a
        >>> mu, logvar = torch.randn(128, 4, dtype=torch.float64), torch.randn(128, 4, dtype=torch.float64)
        >>> z = mu + torch.exp(0.5 * logvar) * torch.randn(128, 4, dtype=torch.float64)
        >>> terms = betatc_decomposition(z, mu, logvar, dataset_size=50_000)
        >>> torch.allclose(sum(terms), kl_estimator_a(z, mu, logvar).sum(-1).mean())
        True
    """
    log_qz = log_aggregate_posterior(z, mu, logvar, dataset_size, sampling=sampling)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    log_qz_given_x = log_normal(z, mu, logvar).sum(-1)
    log_pz = log_normal(
        z, zero if prior_mu is None else prior_mu, zero if prior_logvar is None else prior_logvar
    )  # (B, D)
    return BetaTC(
        mutual_information=(log_qz_given_x - log_qz.joint).mean(),
        total_correlation=(log_qz.joint - log_qz.marginals.sum(-1)).mean(),
        dimensionwise_kl=(log_qz.marginals - log_pz).sum(-1).mean(),
    )
