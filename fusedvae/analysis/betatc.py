"""The β-TC-VAE decomposition of the KL term (Chen et al. 2018, "Isolating sources of disentanglement").

With ``q(z) = (1/N) sum_n q(z | x_n)`` the aggregate posterior over a dataset of N points,

    ``E_x KL(q(z|x) || p(z)) = I_q(x; z) + KL(q(z) || prod_d q(z_d)) + sum_d KL(q(z_d) || p(z_d))``
    (index-code mutual information + total correlation + dimension-wise KL).

``q(z)`` and its marginals ``q(z_d)`` are estimated from one minibatch, by minibatch weighted
sampling (MWS) or minibatch stratified sampling (MSS). Whatever the estimate of ``q(z)``, the three
estimated terms telescope: their sum is exactly the batch mean of ``log q(z|x) - log p(z)``
(SGVB estimator A), whose expectation is the average KL term.

Two forms of the estimate: the dense one (:func:`log_aggregate_posterior`) builds the ``(B, B, D)``
tensor of ``log q(z_id | x_j)`` as every β-TC-VAE implementation does (4.3 GB at B = 4096, D = 64 in
float32); the streaming one (:func:`streaming_log_aggregate_posterior`, the specification of the
Triton kernel :mod:`fusedvae.kernels.betatc`) walks ``(i, j)`` tiles with an online logsumexp and a
streaming backward, in ``O(B·D)`` memory, with the importance weights computed per tile from the indices.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..precision import compute_dtype
from ..reference.gaussian_nll import HALF_LOG_2PI
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


def check_inputs(z, mu, logvar, dataset_size, sampling) -> None:
    """``sampling`` known, ``z``, ``mu``, ``logvar`` floating ``(B, D)`` alike, ``dataset_size`` an int >= B."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    for name, t in (("z", z), ("mu", mu), ("logvar", logvar)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
    for name, t in (("z", z), ("mu", mu), ("logvar", logvar)):
        if t.dim() != 2 or t.shape != mu.shape:
            raise ValueError(f"{name} must have shape (B, D) like mu, {tuple(mu.shape)}, got {tuple(t.shape)}")
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int):
        raise TypeError(f"dataset_size must be an int, got {type(dataset_size).__name__}")
    batch_size = mu.shape[0]
    if batch_size < (2 if sampling == "mss" else 1) or dataset_size < batch_size:
        raise ValueError(
            f"need {2 if sampling == 'mss' else 1} <= batch_size <= dataset_size for {sampling.upper()}, "
            f"got batch_size={batch_size}, dataset_size={dataset_size}"
        )


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
    check_inputs(z, mu, logvar, dataset_size, sampling)
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
    return decomposition_from_aggregate(log_qz, z, mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar)


def decomposition_from_aggregate(
    log_qz: AggregatePosterior,
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
) -> BetaTC:
    """The three terms from an estimate of ``log q(z_i)`` and ``log q(z_id)`` (dense or streaming), batch means.

    ``log q(z_i | x_i)`` and ``log p(z_i)`` are elementwise (``O(B·D)``); the aggregate terms are whatever
    estimator produced ``log_qz``, so mutual information, total correlation and the aggregate-posterior
    diagnostics all share one ``log q(z)``.

    Example::

        >>> import torch
        >>> from fusedvae.analysis.betatc import decomposition_from_aggregate, streaming_log_aggregate_posterior
        >>> mu, logvar = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)
        >>> z = mu + torch.exp(0.5 * logvar) * torch.randn(32, 4, dtype=torch.float64)
        >>> log_qz = streaming_log_aggregate_posterior(z, mu, logvar, 1000)
        >>> decomposition_from_aggregate(log_qz, z, mu, logvar).mutual_information.shape
        torch.Size([])
    """
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


# ---------------------------------------------------------------- the streaming form, O(B·D) memory


def log_weight_block(
    rows: torch.Tensor, cols: torch.Tensor, batch_size: int, dataset_size: int, *, sampling: str, dtype: torch.dtype
) -> torch.Tensor:
    """``log w_ij`` for the rows ``i`` and columns ``j`` of one tile, ``(len(rows), len(cols))``, from the indices.

    The same weights as the dense form (MWS: ``1/(N B)``; MSS: :func:`mss_log_weights`), without a
    ``B x B`` matrix: MSS takes three values, picked by ``j == i`` and ``j == i + 1 mod B``.

    Example::

        >>> import torch
        >>> from fusedvae.analysis.betatc import log_weight_block, mss_log_weights
        >>> i, j = torch.arange(3), torch.arange(3)
        >>> torch.allclose(log_weight_block(i, j, 3, 10, sampling="mss", dtype=torch.float64), mss_log_weights(3, 10))
        True
    """
    shape = (rows.numel(), cols.numel())
    if sampling == "mws":
        return torch.full(shape, -math.log(dataset_size * batch_size), dtype=dtype, device=rows.device)
    n, m = dataset_size, batch_size - 1
    r, c = rows[:, None], cols[None, :]
    weights = torch.full(shape, -math.log(m), dtype=dtype, device=rows.device)
    weights = weights.masked_fill(c == (r + 1) % batch_size, math.log((n - m) / (n * m)))
    return weights.masked_fill(c == r, -math.log(n))


def _tile(z_i, mu_j, lv_j, rows, cols, batch_size, dataset_size, sampling):
    """``log q(z_id | x_j)`` ``(bi, bj, D)``, ``log w_ij`` ``(bi, bj)``; for gradients ``delta``, ``delta e^-lv``."""
    delta = z_i[:, None, :] - mu_j[None, :, :]
    scaled = delta * torch.exp(-lv_j)[None, :, :]
    log_q = -0.5 * (delta * scaled + lv_j[None, :, :]) - HALF_LOG_2PI
    log_w = log_weight_block(rows, cols, batch_size, dataset_size, sampling=sampling, dtype=z_i.dtype)
    return log_q, log_w, delta, scaled


def _blocks(batch_size: int, block_size: int):
    index = torch.arange(batch_size)
    return [index[start : start + block_size] for start in range(0, batch_size, block_size)]


class _StreamingAggregatePosterior(torch.autograd.Function):
    """Forward: online logsumexp over column tiles. Backward: recompute each tile's softmax weights from the outputs."""

    @staticmethod
    def forward(ctx, z, mu, logvar, dataset_size, sampling, block_size):
        batch_size, dim = mu.shape
        joint = z.new_full((batch_size,), -math.inf)
        marginals = z.new_full((batch_size, dim), -math.inf)
        for rows in _blocks(batch_size, block_size):
            for cols in _blocks(batch_size, block_size):
                log_q, log_w, _, _ = _tile(
                    z[rows], mu[cols], logvar[cols], rows, cols, batch_size, dataset_size, sampling
                )
                # running logsumexp over j: log(e^old + sum_j e^new_j)
                joint[rows] = torch.logaddexp(joint[rows], torch.logsumexp(log_w + log_q.sum(-1), dim=1))
                marginals[rows] = torch.logaddexp(marginals[rows], torch.logsumexp(log_w[:, :, None] + log_q, dim=1))
        ctx.save_for_backward(z, mu, logvar, joint, marginals)
        ctx.config = (dataset_size, sampling, block_size)
        return joint, marginals

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_joint, grad_marginals):
        z, mu, logvar, joint, marginals = ctx.saved_tensors
        dataset_size, sampling, block_size = ctx.config
        batch_size = mu.shape[0]
        dz, dmu, dlv = torch.zeros_like(z), torch.zeros_like(mu), torch.zeros_like(logvar)
        for rows in _blocks(batch_size, block_size):
            for cols in _blocks(batch_size, block_size):
                log_q, log_w, delta, scaled = _tile(
                    z[rows], mu[cols], logvar[cols], rows, cols, batch_size, dataset_size, sampling
                )
                # dL/dlog q(z_id|x_j): the softmax over j of the joint and of each marginal, times their gradients
                p_joint = torch.exp(log_w + log_q.sum(-1) - joint[rows, None])
                p_marginal = torch.exp(log_w[:, :, None] + log_q - marginals[rows, None, :])
                c = grad_joint[rows, None, None] * p_joint[:, :, None] + grad_marginals[rows, None, :] * p_marginal
                dz[rows] -= (c * scaled).sum(1)
                dmu[cols] += (c * scaled).sum(0)
                dlv[cols] += 0.5 * (c * (delta * scaled - 1.0)).sum(0)
        return dz, dmu, dlv, None, None, None


def streaming_log_aggregate_posterior(
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    dataset_size: int,
    *,
    sampling: str = "mss",
    block_size: int = 64,
) -> AggregatePosterior:
    """:func:`log_aggregate_posterior` in ``O(B·D)`` memory: ``block_size x block_size x D`` tiles, never ``B x B x D``.

    For each row block i it walks the column blocks j with a running logsumexp, ``J_i <- logaddexp(J_i,
    logsumexp_j (log w_ij + sum_d l_ijd))`` and the same per d for the marginals, where ``l_ijd = log
    q(z_id | x_j)`` and ``log w_ij`` comes from :func:`log_weight_block`. The backward pass walks the
    tiles again, with ``c_ijd = gJ_i e^{log w_ij + sum_d l_ijd - J_i} + gM_id e^{log w_ij + l_ijd - M_id}``:
    ``dz_id = -sum_j c_ijd (z_id - mu_jd) e^{-lv_jd}``, ``dmu_jd = sum_i c_ijd (z_id - mu_jd) e^{-lv_jd}``,
    ``dlv_jd = sum_i c_ijd ((z_id - mu_jd)^2 e^{-lv_jd} - 1) / 2``. Saved for backward: the inputs and
    the outputs. Computes in float32 (float64 for float64 inputs) and returns that dtype.

    Args:
        z, mu, logvar: ``(B, D)``, as for :func:`log_aggregate_posterior`.
        dataset_size: N; sampling: ``"mss"`` (default) or ``"mws"``.
        block_size: rows and columns per tile (memory ``~ 4 block_size^2 D`` elements beyond the ``O(B·D)``).

    Example::

        >>> import torch
        >>> from fusedvae.analysis.betatc import log_aggregate_posterior, streaming_log_aggregate_posterior
        >>> mu, logvar = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64)
        >>> z = mu + torch.exp(0.5 * logvar) * torch.randn(50, 3, dtype=torch.float64)
        >>> dense = log_aggregate_posterior(z, mu, logvar, 1000)
        >>> streamed = streaming_log_aggregate_posterior(z, mu, logvar, 1000, block_size=16)
        >>> torch.allclose(dense.joint, streamed.joint) and torch.allclose(dense.marginals, streamed.marginals)
        True
    """
    check_inputs(z, mu, logvar, dataset_size, sampling)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    dtype = compute_dtype(z, mu, logvar)
    joint, marginals = _StreamingAggregatePosterior.apply(
        z.to(dtype), mu.to(dtype), logvar.to(dtype), dataset_size, sampling, block_size
    )
    return AggregatePosterior(joint, marginals)


def streaming_betatc_decomposition(
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    dataset_size: int,
    *,
    sampling: str = "mss",
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    block_size: int = 64,
) -> BetaTC:
    """:func:`betatc_decomposition` on :func:`streaming_log_aggregate_posterior`: any batch size that fits ``O(B·D)``.

    Same terms, same arguments (plus ``block_size``); what the science suite uses for its large-batch row
    (B = 4096), where the dense form would need ``B^2 D`` elements per temporary.

    Example::

        >>> import torch
        >>> from fusedvae.analysis.betatc import betatc_decomposition, streaming_betatc_decomposition
        >>> mu, logvar = torch.randn(40, 4, dtype=torch.float64), torch.randn(40, 4, dtype=torch.float64)
        >>> z = mu + torch.exp(0.5 * logvar) * torch.randn(40, 4, dtype=torch.float64)
        >>> dense = betatc_decomposition(z, mu, logvar, 500)
        >>> streamed = streaming_betatc_decomposition(z, mu, logvar, 500)
        >>> all(torch.allclose(a, b) for a, b in zip(dense, streamed))
        True
    """
    log_qz = streaming_log_aggregate_posterior(z, mu, logvar, dataset_size, sampling=sampling, block_size=block_size)
    return decomposition_from_aggregate(log_qz, z, mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar)
