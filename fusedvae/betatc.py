"""The β-TC-VAE loss term and the KL decomposition, on the aggregate posterior streamed in O(B·D) memory.

Chen et al. 2018 ("Isolating sources of disentanglement in VAEs") split the KL term of the ELBO into

    ``E_x KL(q(z|x) || p(z)) = I_q(x; z) + KL(q(z) || prod_d q(z_d)) + sum_d KL(q(z_d) || p(z_d))``

(index-code mutual information, total correlation, dimension-wise KL) and weight them ``alpha``,
``beta``, ``gamma``. The aggregate posterior ``q(z)`` and its marginals are estimated on the minibatch
by minibatch stratified (MSS) or weighted (MWS) sampling. Every published implementation builds the
``(B, B, D)`` tensor of ``log q(z_id | x_j)`` for that; here the estimate streams over j with an online
logsumexp (:mod:`fusedvae.kernels.betatc` on the ``"triton"`` backend, the streaming reference
:func:`fusedvae.analysis.betatc.streaming_log_aggregate_posterior` on every other), so memory is
``O(B·D)`` in forward and backward and large batches, where the estimators are least biased, fit.
"""

from __future__ import annotations

import torch

from . import validation as check
from .analysis import betatc as _reference
from .analysis.betatc import AggregatePosterior, BetaTC
from .backend import backend_for
from .precision import compute_dtype, result_dtype

__all__ = ["AggregatePosterior", "BetaTC", "betatc_decomposition", "betatc_loss", "log_aggregate_posterior"]


def _check(z, mu, logvar, dataset_size, sampling, prior_mu=None, prior_logvar=None) -> None:
    named = (("z", z), ("mu", mu), ("logvar", logvar), ("prior_mu", prior_mu), ("prior_logvar", prior_logvar))
    for name, value in named:
        if value is not None or name in ("z", "mu", "logvar"):
            check.check_tensor(name, value)
    check.check_same_device({"z": z, "mu": mu, "logvar": logvar, "prior_mu": prior_mu, "prior_logvar": prior_logvar})
    _reference.check_inputs(z, mu, logvar, dataset_size, sampling)  # sampling, shapes (B, D), dataset_size
    for name, prior in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if prior is not None:
            check.check_broadcasts_to(name, prior, "mu", mu)


def log_aggregate_posterior(
    z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, dataset_size: int, *, sampling: str = "mss"
) -> AggregatePosterior:
    """Minibatch estimates of ``log q(z_i)`` ``(B,)`` and ``log q(z_id)`` ``(B, D)`` at the batch's samples, streamed.

    ``q(z_i) ~= sum_j w_ij q(z_i | x_j)`` and ``q(z_id) ~= sum_j w_ij q(z_id | x_j)`` with the MSS or MWS
    weights of :func:`fusedvae.analysis.betatc.log_aggregate_posterior` (the dense form, same values), in
    ``O(B·D)`` memory. Differentiable in z, mu and logvar. The same estimate serves the mutual
    information (``log q(z_i|x_i) - log q(z_i)``) and aggregate-posterior diagnostics.

    Args:
        z: one sample per datapoint, ``z_i ~ q(z | x_i)``, ``(B, D)``; mu, logvar: the batch's posteriors ``(B, D)``.
            float32, float16, bfloat16 (computed in float32) or float64.
        dataset_size: N, the number of datapoints the batch is drawn from (``B <= N``).
        sampling: ``"mss"`` (stratified, default; needs ``B >= 2``) or ``"mws"`` (weighted).

    Returns:
        ``AggregatePosterior(joint, marginals)`` in the promoted dtype of the inputs.

    Example::

        >>> import torch
        >>> from fusedvae.betatc import log_aggregate_posterior
        >>> mu, logvar = torch.randn(64, 3), torch.randn(64, 3)
        >>> z = mu + torch.exp(0.5 * logvar) * torch.randn(64, 3)
        >>> [tuple(t.shape) for t in log_aggregate_posterior(z, mu, logvar, dataset_size=60_000)]
        [(64,), (64, 3)]
    """
    _check(z, mu, logvar, dataset_size, sampling)
    dtype = result_dtype(z, mu, logvar)
    joint, marginals = _log_aggregate_posterior(z, mu, logvar, dataset_size, sampling)
    return AggregatePosterior(joint.to(dtype), marginals.to(dtype))


def _log_aggregate_posterior(z, mu, logvar, dataset_size, sampling) -> AggregatePosterior:
    """The backend's estimate, in the compute dtype (float32, or float64 for float64 inputs)."""
    if backend_for(mu) == "triton":
        from .kernels import betatc as kernel  # imported on first use: importing fusedvae never imports triton

        return AggregatePosterior(*kernel.log_aggregate_posterior(z, mu, logvar, dataset_size, sampling))
    # every other backend (the reference, a CPU fast path) runs the streaming reference
    return _reference.streaming_log_aggregate_posterior(z, mu, logvar, dataset_size, sampling=sampling)


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
    """Index-code mutual information, total correlation and dimension-wise KL of one batch, batch means, streamed.

    With ``log q(z_i)``, ``log q(z_id)`` from :func:`log_aggregate_posterior`, batch means of
    ``log q(z_i|x_i) - log q(z_i)`` (MI), ``log q(z_i) - sum_d log q(z_id)`` (TC) and ``sum_d (log q(z_id) -
    log p(z_id))`` (dimension-wise KL). Their sum is exactly the batch mean of ``log q(z_i|x_i) - log p(z_i)``
    whatever the estimate of ``q(z)``. Same values as :func:`fusedvae.analysis.betatc.betatc_decomposition`
    (the dense form) in ``O(B·D)`` memory.

    Args:
        z, mu, logvar: ``(B, D)``; dataset_size: N; sampling: ``"mss"`` or ``"mws"``.
        prior_mu, prior_logvar: a factorised Gaussian prior broadcastable to ``(B, D)``; ``None``: N(0, I).

    Returns:
        ``BetaTC(mutual_information, total_correlation, dimensionwise_kl)``: 0-d tensors, differentiable.

    Example::

        >>> import torch, fusedvae as fv
        >>> mu, logvar = torch.randn(128, 4), torch.randn(128, 4)
        >>> z = mu + torch.exp(0.5 * logvar) * torch.randn(128, 4)
        >>> mi, tc, dwkl = fv.betatc_decomposition(z, mu, logvar, dataset_size=50_000)
        >>> tc.shape
        torch.Size([])
    """
    _check(z, mu, logvar, dataset_size, sampling, prior_mu, prior_logvar)
    # the elementwise terms too in the compute dtype: half precision would round log-densities of ~10 nats to 0.01
    dtype, compute = result_dtype(z, mu, logvar, prior_mu, prior_logvar), compute_dtype(z, mu, logvar)
    log_qz = _log_aggregate_posterior(z, mu, logvar, dataset_size, sampling)
    terms = _reference.decomposition_from_aggregate(
        log_qz, z.to(compute), mu.to(compute), logvar.to(compute),
        prior_mu=None if prior_mu is None else prior_mu.to(compute),
        prior_logvar=None if prior_logvar is None else prior_logvar.to(compute),
    )
    return BetaTC(*(t.to(dtype) for t in terms))


def betatc_loss(
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    dataset_size: int,
    *,
    alpha: float = 1.0,
    beta: float = 6.0,
    gamma: float = 1.0,
    sampling: str = "mss",
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
) -> torch.Tensor:
    """The β-TC-VAE regulariser (Chen et al. 2018): ``alpha * MI + beta * TC + gamma * dimension-wise KL``.

    It replaces the KL term of the ELBO: the loss to minimise is ``nll + betatc_loss(...)``, both per
    datapoint (the terms are batch means, like ``reduction="batchmean"``). ``alpha = beta = gamma = 1`` gives
    estimator A of the plain KL term (``log q(z|x) - log p(z)`` at the sample), exactly. The default
    ``beta = 6`` follows the authors' experiments and disentangling-vae's default.

    Args:
        z: the reparameterized sample the decoder saw, ``(B, D)`` (from :func:`fusedvae.rsample`, say);
            mu, logvar: the posteriors ``(B, D)``. Gradients flow to all three.
        dataset_size: N, the size of the training set (MSS/MWS weights need it).
        alpha, beta, gamma: weights of mutual information, total correlation, dimension-wise KL.
        sampling: ``"mss"`` (default) or ``"mws"``; prior_mu, prior_logvar: as in :func:`betatc_decomposition`.

    Returns:
        A 0-d tensor in the promoted dtype of the inputs.

    Example::

        >>> import torch, fusedvae as fv
        >>> mu = torch.randn(256, 10, requires_grad=True)
        >>> logvar = torch.randn(256, 10, requires_grad=True)
        >>> z = fv.rsample(mu, logvar)
        >>> loss = fv.betatc_loss(z, mu, logvar, dataset_size=60_000, beta=6.0)
        >>> loss.backward()
        >>> mu.grad.shape
        torch.Size([256, 10])
    """
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    terms = betatc_decomposition(
        z, mu, logvar, dataset_size, sampling=sampling, prior_mu=prior_mu, prior_logvar=prior_logvar
    )
    return alpha * terms.mutual_information + beta * terms.total_correlation + gamma * terms.dimensionwise_kl
