"""The aggregate posterior of a minibatch in O(B·D) memory: streaming Triton kernels, launchers, custom ops.

Implements :func:`fusedvae.analysis.betatc.streaming_log_aggregate_posterior` (the specification) on
Triton. With ``l_ijd = log N(z_id; mu_jd, exp(lv_jd))`` and the structured importance weights ``w_ij``
of minibatch weighted (MWS) or stratified (MSS) sampling, it computes

- the joint term ``J_i = logsumexp_j (log w_ij + sum_d l_ijd)``, shape ``(B,)``;
- the marginal terms ``M_id = logsumexp_j (log w_ij + l_ijd)``, shape ``(B, D)``.

Every β-TC-VAE implementation builds the ``(B, B, D)`` tensor ``l``; these kernels never do. As
flash attention streams keys past a block of queries, a program owns ``BLOCK_I`` rows i and streams
every j in blocks of ``BLOCK_J``, keeping a running maximum and a running sum of exponentials
(online logsumexp) for its joint and marginal terms. The weights take three values (``W_ii``,
``W_{i,i+1 mod B}`` and the rest; one value for MWS), chosen per tile from the indices ``(i, j)``,
so the ``B x B`` weight matrix is never built either.

Backward, with ``c_ijd = gJ_i exp(log w_ij + sum_d l_ijd - J_i) + gM_id exp(log w_ij + l_ijd - M_id)``
(softmax weights recomputed from the saved ``J`` and ``M``, as flash attention's backward does):
``dz_id = -sum_j c_ijd (z_id - mu_jd) e^{-lv_jd}``, ``dmu_jd = sum_i c_ijd (z_id - mu_jd) e^{-lv_jd}``,
``dlv_jd = sum_i c_ijd ((z_id - mu_jd)^2 e^{-lv_jd} - 1) / 2``. One kernel owns rows i (dz, streaming
over j), another owns columns j (dmu, dlv, streaming over i): every output has one writer, so no float
atomics, and two runs are bitwise equal. Saved for backward: z, mu, logvar, J, M: ``O(B·D)``.

Work is ``O(B^2 D)`` (each pass recomputes ``l``): compute-bound, unlike the other fused ops. A whole
latent row (``BLOCK_D`` = next power of two of D) lives in one tile, so the tile ``BLOCK_I x BLOCK_J x
BLOCK_D`` is capped by :data:`TILE_ELEMENTS` (latents of a few hundred dimensions still fit, with
smaller I/J blocks; the sizes were chosen so that nothing spills when compiled for sm_90, not timed on a GPU).
Float32 compute for float32/float16/bfloat16 inputs, float64 for float64 inputs.
Runs under ``TRITON_INTERPRET=1`` (plain ``tl.exp``/``tl.log``: no libdevice).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..precision import compute_dtype
from . import _custom_op

SAMPLINGS = ("mws", "mss")
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
#: Elements of one ``BLOCK_I x BLOCK_J x BLOCK_D`` tile, per compute dtype, and the warps that hold it: compiled for
#: sm_90 (``bench.static``), 8192 float32 elements at 4 warps spill (255 registers and a stack); these do not.
TILE_ELEMENTS = {torch.float32: 4096, torch.float64: 2048}
NUM_WARPS = 8
#: Tests set ``(BLOCK_I, BLOCK_J)`` here to force many blocks at small B.
BLOCK_OVERRIDE: tuple[int, int] | None = None

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}
_HALF_LOG_2PI = tl.constexpr(HALF_LOG_2PI)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _log_q_tile(z, mu, lv, d_mask):
    """``(l_ijd, delta, delta e^-lv)``, rows ``z`` ``[BI, BD]`` by columns ``mu, lv`` ``[BJ, BD]``; l = 0 past D."""
    inv_var = tl.exp(-lv)
    delta = z[:, None, :] - mu[None, :, :]
    scaled = delta * inv_var[None, :, :]
    log_q = -0.5 * (delta * scaled + lv[None, :, :]) - _HALF_LOG_2PI
    log_q = tl.where(d_mask[None, None, :], log_q, 0.0)
    return log_q, delta, scaled


@triton.jit
def _log_weight_tile(i, j, B, lw_self, lw_next, lw_other):
    """``log w_ij`` ``[BI, BJ]`` from the indices: ``-inf`` for padded j, so they add nothing to a logsumexp."""
    jj = j[None, :]
    ii = i[:, None]
    lw = tl.where(jj == (ii + 1) % B, lw_next, lw_other)
    lw = tl.where(jj == ii, lw_self, lw)
    return tl.where(jj < B, lw, float("-inf"))


@triton.jit
def _betatc_forward_kernel(
    z_ptr, mu_ptr, lv_ptr, logw_ptr, joint_ptr, marg_ptr, B, D,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    d = tl.arange(0, BLOCK_D)
    i_mask = i < B
    d_mask = d < D
    row_mask = i_mask[:, None] & d_mask[None, :]
    z = tl.load(z_ptr + i[:, None] * D + d[None, :], mask=row_mask, other=0.0).to(DTYPE)
    lw_self = tl.load(logw_ptr)
    lw_next = tl.load(logw_ptr + 1)
    lw_other = tl.load(logw_ptr + 2)

    m_joint = tl.full((BLOCK_I,), float("-inf"), DTYPE)
    s_joint = tl.zeros((BLOCK_I,), DTYPE)
    m_marg = tl.full((BLOCK_I, BLOCK_D), float("-inf"), DTYPE)
    s_marg = tl.zeros((BLOCK_I, BLOCK_D), DTYPE)
    for j0 in range(0, B, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        col_mask = (j < B)[:, None] & d_mask[None, :]
        mu = tl.load(mu_ptr + j[:, None] * D + d[None, :], mask=col_mask, other=0.0).to(DTYPE)
        lv = tl.load(lv_ptr + j[:, None] * D + d[None, :], mask=col_mask, other=0.0).to(DTYPE)
        log_q, _delta, _scaled = _log_q_tile(z, mu, lv, d_mask)
        lw = _log_weight_tile(i, j, B, lw_self, lw_next, lw_other)
        # online logsumexp over j; every block holds a valid j, so the new maximum is finite
        a = lw + tl.sum(log_q, axis=2)
        new_m = tl.maximum(m_joint, tl.max(a, axis=1))
        s_joint = s_joint * tl.exp(m_joint - new_m) + tl.sum(tl.exp(a - new_m[:, None]), axis=1)
        m_joint = new_m
        b = lw[:, :, None] + log_q
        new_mm = tl.maximum(m_marg, tl.max(b, axis=1))
        s_marg = s_marg * tl.exp(m_marg - new_mm) + tl.sum(tl.exp(b - new_mm[:, None, :]), axis=1)
        m_marg = new_mm
    tl.store(joint_ptr + i, m_joint + tl.log(s_joint), mask=i_mask)
    tl.store(marg_ptr + i[:, None] * D + d[None, :], m_marg + tl.log(s_marg), mask=row_mask)


@triton.jit
def _coefficients(log_q, lw, joint, marg, g_joint, g_marg, mask):
    """``c_ijd = dL/dl_ijd``, 0 outside ``mask`` (``where``, not a product: a padded exp may be inf)."""
    p = tl.exp(lw + tl.sum(log_q, axis=2) - joint[:, None])
    r = tl.exp(lw[:, :, None] + log_q - marg[:, None, :])
    c = g_joint[:, None, None] * p[:, :, None] + g_marg[:, None, :] * r
    return tl.where(mask, c, 0.0)


@triton.jit
def _betatc_backward_rows_kernel(
    z_ptr, mu_ptr, lv_ptr, logw_ptr, joint_ptr, marg_ptr, gj_ptr, gm_ptr, dz_ptr, B, D,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr,
):
    """``dz`` for ``BLOCK_I`` rows, streaming over every j."""
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    d = tl.arange(0, BLOCK_D)
    i_mask = i < B
    d_mask = d < D
    row_mask = i_mask[:, None] & d_mask[None, :]
    row_off = i[:, None] * D + d[None, :]
    z = tl.load(z_ptr + row_off, mask=row_mask, other=0.0).to(DTYPE)
    joint = tl.load(joint_ptr + i, mask=i_mask, other=0.0)
    marg = tl.load(marg_ptr + row_off, mask=row_mask, other=0.0)
    g_joint = tl.load(gj_ptr + i, mask=i_mask, other=0.0).to(DTYPE)
    g_marg = tl.load(gm_ptr + row_off, mask=row_mask, other=0.0).to(DTYPE)
    lw_self = tl.load(logw_ptr)
    lw_next = tl.load(logw_ptr + 1)
    lw_other = tl.load(logw_ptr + 2)

    dz = tl.zeros((BLOCK_I, BLOCK_D), DTYPE)
    for j0 in range(0, B, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_mask = j < B
        col_mask = j_mask[:, None] & d_mask[None, :]
        mu = tl.load(mu_ptr + j[:, None] * D + d[None, :], mask=col_mask, other=0.0).to(DTYPE)
        lv = tl.load(lv_ptr + j[:, None] * D + d[None, :], mask=col_mask, other=0.0).to(DTYPE)
        log_q, _delta, scaled = _log_q_tile(z, mu, lv, d_mask)
        lw = _log_weight_tile(i, j, B, lw_self, lw_next, lw_other)
        mask = row_mask[:, None, :] & j_mask[None, :, None]
        c = _coefficients(log_q, lw, joint, marg, g_joint, g_marg, mask)
        dz -= tl.sum(c * scaled, axis=1)
    tl.store(dz_ptr + row_off, dz, mask=row_mask)


@triton.jit
def _betatc_backward_cols_kernel(
    z_ptr, mu_ptr, lv_ptr, logw_ptr, joint_ptr, marg_ptr, gj_ptr, gm_ptr, dmu_ptr, dlv_ptr, B, D,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr,
):
    """``dmu`` and ``dlogvar`` for ``BLOCK_J`` columns, streaming over every i."""
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    d = tl.arange(0, BLOCK_D)
    j_mask = j < B
    d_mask = d < D
    col_mask = j_mask[:, None] & d_mask[None, :]
    col_off = j[:, None] * D + d[None, :]
    mu = tl.load(mu_ptr + col_off, mask=col_mask, other=0.0).to(DTYPE)
    lv = tl.load(lv_ptr + col_off, mask=col_mask, other=0.0).to(DTYPE)
    lw_self = tl.load(logw_ptr)
    lw_next = tl.load(logw_ptr + 1)
    lw_other = tl.load(logw_ptr + 2)

    dmu = tl.zeros((BLOCK_J, BLOCK_D), DTYPE)
    dlv = tl.zeros((BLOCK_J, BLOCK_D), DTYPE)
    for i0 in range(0, B, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_mask = i < B
        row_mask = i_mask[:, None] & d_mask[None, :]
        row_off = i[:, None] * D + d[None, :]
        z = tl.load(z_ptr + row_off, mask=row_mask, other=0.0).to(DTYPE)
        joint = tl.load(joint_ptr + i, mask=i_mask, other=0.0)
        marg = tl.load(marg_ptr + row_off, mask=row_mask, other=0.0)
        g_joint = tl.load(gj_ptr + i, mask=i_mask, other=0.0).to(DTYPE)
        g_marg = tl.load(gm_ptr + row_off, mask=row_mask, other=0.0).to(DTYPE)
        log_q, delta, scaled = _log_q_tile(z, mu, lv, d_mask)
        lw = _log_weight_tile(i, j, B, lw_self, lw_next, lw_other)
        mask = row_mask[:, None, :] & j_mask[None, :, None]
        c = _coefficients(log_q, lw, joint, marg, g_joint, g_marg, mask)
        dmu += tl.sum(c * scaled, axis=0)
        dlv += tl.sum(c * (delta * scaled - 1.0), axis=0) * 0.5
    tl.store(dmu_ptr + col_off, dmu, mask=col_mask)
    tl.store(dlv_ptr + col_off, dlv, mask=col_mask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels write (tests fill it with NaN, so an unwritten element fails)."""
    return torch.empty(shape, dtype=dtype, device=device)


def log_weight_values(batch_size: int, dataset_size: int, sampling: str) -> tuple[float, float, float]:
    """``(log W_ii, log W_{i,i+1 mod B}, log W_ij elsewhere)`` in float64 arithmetic (one value thrice for MWS).

    MSS (Chen et al. 2018), ``M = B - 1``: ``1/N``, ``(N - M)/(N M)``, ``1/M``; MWS: ``1/(N B)`` everywhere
    (as :func:`fusedvae.analysis.betatc.mss_log_weights` and the dense reference).
    """
    if sampling == "mws":
        value = -math.log(dataset_size * batch_size)
        return value, value, value
    n, m = dataset_size, batch_size - 1
    return -math.log(n), math.log((n - m) / (n * m)), -math.log(m)


def _blocks(block_d: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(BLOCK_I, BLOCK_J)``, powers of two, with ``BLOCK_I x BLOCK_J x BLOCK_D <= TILE_ELEMENTS`` where D allows."""
    if BLOCK_OVERRIDE is not None:
        return BLOCK_OVERRIDE
    tile = TILE_ELEMENTS[dtype]
    block_i = min(16, max(1, tile // block_d))
    block_j = min(64, max(1, tile // (block_i * block_d)))
    return block_i, block_j


def _prepare(z, mu, logvar, dataset_size, sampling):
    dtype = compute_dtype(z, mu, logvar)
    batch_size, dim = mu.shape
    log_w = torch.tensor(log_weight_values(batch_size, dataset_size, sampling), dtype=dtype, device=mu.device)
    block_d = triton.next_power_of_2(max(dim, 1))
    block_i, block_j = _blocks(block_d, dtype)
    meta = dict(BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_D=block_d, DTYPE=_TL_DTYPE[dtype], num_warps=NUM_WARPS)
    return (z.contiguous(), mu.contiguous(), logvar.contiguous()), log_w, dtype, meta


def aggregate_posterior_forward(
    z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, dataset_size: int, sampling: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J, M)``: the joint ``(B,)`` and marginal ``(B, D)`` log aggregate posteriors, in the compute dtype."""
    (z, mu, logvar), log_w, dtype, meta = _prepare(z, mu, logvar, dataset_size, sampling)
    batch_size, dim = mu.shape
    joint = _empty((batch_size,), dtype, mu.device)
    marginals = _empty((batch_size, dim), dtype, mu.device)
    if batch_size:
        grid = (triton.cdiv(batch_size, meta["BLOCK_I"]),)
        _betatc_forward_kernel[grid](z, mu, logvar, log_w, joint, marginals, batch_size, dim, **meta)
    return joint, marginals


def aggregate_posterior_backward(
    grad_joint, grad_marginals, z, mu, logvar, joint, marginals, dataset_size: int, sampling: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dz, dmu, dlogvar)`` in the compute dtype, from the saved ``J``, ``M`` and their incoming gradients."""
    (z, mu, logvar), log_w, dtype, meta = _prepare(z, mu, logvar, dataset_size, sampling)
    batch_size, dim = mu.shape
    grad_joint = grad_joint.contiguous()
    grad_marginals = grad_marginals.contiguous()
    dz, dmu, dlv = (_empty((batch_size, dim), dtype, mu.device) for _ in range(3))
    if batch_size:
        args = (z, mu, logvar, log_w, joint.contiguous(), marginals.contiguous(), grad_joint, grad_marginals)
        _betatc_backward_rows_kernel[(triton.cdiv(batch_size, meta["BLOCK_I"]),)](*args, dz, batch_size, dim, **meta)
        _betatc_backward_cols_kernel[(triton.cdiv(batch_size, meta["BLOCK_J"]),)](
            *args, dmu, dlv, batch_size, dim, **meta
        )
    return dz, dmu, dlv


# ---------------------------------------------------------------------------------------------
# custom ops and autograd (one opaque node under torch.compile; see fusedvae.kernels._custom_op)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(
    _custom_op.op_name("betatc_aggregate_posterior"),
    mutates_args=(),
    schema="(Tensor z, Tensor mu, Tensor logvar, SymInt dataset_size, str sampling) -> (Tensor, Tensor)",
)
def _forward_op(z, mu, logvar, dataset_size, sampling):
    return aggregate_posterior_forward(z, mu, logvar, dataset_size, sampling)


@_forward_op.register_fake
def _(z, mu, logvar, dataset_size, sampling):
    dtype = compute_dtype(z, mu, logvar)
    return mu.new_empty(mu.shape[:1], dtype=dtype), mu.new_empty(mu.shape, dtype=dtype)


@torch.library.custom_op(
    _custom_op.op_name("betatc_aggregate_posterior_backward"),
    mutates_args=(),
    schema="(Tensor grad_joint, Tensor grad_marginals, Tensor z, Tensor mu, Tensor logvar, Tensor joint, "
    "Tensor marginals, SymInt dataset_size, str sampling) -> (Tensor, Tensor, Tensor)",
)
def _backward_op(grad_joint, grad_marginals, z, mu, logvar, joint, marginals, dataset_size, sampling):
    return aggregate_posterior_backward(
        grad_joint, grad_marginals, z, mu, logvar, joint, marginals, dataset_size, sampling
    )


@_backward_op.register_fake
def _(grad_joint, grad_marginals, z, mu, logvar, joint, marginals, dataset_size, sampling):
    return tuple(t.new_empty(t.shape, dtype=joint.dtype) for t in (z, mu, logvar))


def _setup_context(ctx, inputs, output):
    z, mu, logvar, dataset_size, sampling = inputs
    joint, marginals = output
    ctx.save_for_backward(z, mu, logvar, joint, marginals)
    ctx.config = (dataset_size, sampling)


def _backward(ctx, grad_joint, grad_marginals):
    z, mu, logvar, joint, marginals = ctx.saved_tensors
    dataset_size, sampling = ctx.config
    # one of the two outputs may be unused (the mutual information needs only the joint term)
    grad_joint = torch.zeros_like(joint) if grad_joint is None else grad_joint
    grad_marginals = torch.zeros_like(marginals) if grad_marginals is None else grad_marginals
    dz, dmu, dlv = torch.ops.fusedvae.betatc_aggregate_posterior_backward(
        grad_joint, grad_marginals, z, mu, logvar, joint, marginals, dataset_size, sampling
    )
    return dz.to(z.dtype), dmu.to(mu.dtype), dlv.to(logvar.dtype), None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def log_aggregate_posterior(
    z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, dataset_size: int, sampling: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend entry point: ``(log q(z_i), log q(z_id))``, shapes ``(B,)`` and ``(B, D)``, compute dtype.

    Inputs are validated by the caller (:mod:`fusedvae.betatc`): 2-D, same shape and device, ``sampling``
    in :data:`SAMPLINGS`, ``2 <= B <= dataset_size`` for MSS. Differentiable in z, mu and logvar;
    runs the ``fusedvae::betatc_aggregate_posterior`` custom op.

    Example (CPU tensors need ``TRITON_INTERPRET=1``)::

        joint, marginals = log_aggregate_posterior(z, mu, logvar, 60_000, "mss")
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    return torch.ops.fusedvae.betatc_aggregate_posterior(z, mu, logvar, dataset_size, sampling)
