"""Fused reparameterized sampling + Gaussian KL: Triton kernels, launchers, custom ops with autograd.

The backend entry point :func:`rsample_kl` has the semantics of :func:`fusedvae.reference.sampling.rsample_kl`:
``z = mu + exp(lv / 2) * eps`` for ``n_samples`` draws, shape ``(n_samples, *mu.shape)``, with Philox
noise keyed by ``(seed, offset + k * mu.numel() + i)`` for sample ``k`` and row-major element ``i``
(see :mod:`.philox`), ``seed`` and ``offset`` loaded by each program from the int64 device tensor ``key``
(:func:`fusedvae.seeding.draw_key`: graph-safe, so a replayed CUDA graph draws new noise); and
``KL(N(mu, e^lv) || N(mu_p, e^lv_p)) = 0.5 (g(d) + (mu - mu_p)^2 e^{-lv_p})``,
``d = lv - lv_p``, ``g(d) = e^d - 1 - d`` from its Taylor series for ``|d| < 0.5`` (no cancellation,
no libdevice ``expm1``), reduced by ``"none"``, ``"sum"``, ``"per_sample"`` or ``"per_dim"``.

Layout. The kernels see ``mu``'s shape as rows (dim 0) by columns (the rest, merged to at most three
dims: :func:`._common.strided_view`). A program owns ``BLOCK_N`` columns and ``row_steps * BLOCK_B``
rows, walked ``BLOCK_B`` at a time. Inputs are read through their own strides (transposes and
broadcast priors are neither copied nor materialised); outputs follow :mod:`._common`'s layout policy.

Bytes moved (``E = mu.numel()``, ``K = n_samples``, ``s`` the element size, a broadcast prior ~0):
forward ``(2 + K) Es`` (read mu, lv; write z), ``+ Es`` for an elementwise KL, ``+ 2Es`` for
full-size priors, KL-only ``2Es``; backward ``(4 + K) Es`` (read lv, dz, mu; write dmu, dlv). The
noise is regenerated, never stored (eager PyTorch writes eps and reads it back: ``2KEs`` more).

Prior gradients: elementwise for a full-size prior; per-program partial sums (``_common.grad_mode``:
a few percent of E, against ``2 x 2Es`` for a full-size gradient summed by torch) for a prior
broadcast along rows, columns or everywhere; a full-size gradient torch sums for any other broadcast.
No float atomics: two runs are bitwise equal. Half inputs compute in float32, float64 in float64.

On CUDA (outside the interpreter) the kernels take their ``FAST`` path (:mod:`.fastmath`): the noise by
the hardware's ``lg2/sqrt/sin/cos.approx`` and every float32 ``exp`` by ``fastmath.exp_accurate_f32``
(never ``tl.exp``, whose error grows with the argument on a GPU). Many samples of a small posterior:
the forward draws them as rows (:func:`_samples_as_rows`), the backward in sample chunks across
programs whose sums torch adds (``_common.SPREAD_MIN_SAMPLES``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..precision import compute_dtype, result_dtype
from ..seeding import check_key, key_from_ints
from . import _common, _custom_op, fastmath, sample_kl_transposed
from ._common import ELEMENTWISE, OFF, column_offsets, emit_finish, emit_step
from ._common import exp_accurate as _exp
from .philox import philox_normal_rows

# --------------------------------------------------------------------------------------------- #
# Kernels                                                                                       #
# --------------------------------------------------------------------------------------------- #


@triton.jit
def _load(ptr, rows, col_off, strides, mask, DTYPE: tl.constexpr):
    return tl.load(ptr + rows[:, None] * strides[0] + col_off[None, :], mask=mask, other=0.0).to(DTYPE)


@triton.jit
def _program_tile(N, n_col_blocks, row_steps, INT64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's column block, row chunk, columns and first row; int64 index math only when ``INT64``."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    pid_n = pid % n_col_blocks
    pid_b = pid // n_col_blocks
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_n, pid_b, cols, cols < N, pid_b * row_steps * BLOCK_B


@triton.jit
def _sample_kl_forward_kernel(
    mu_ptr, lv_ptr, pmu_ptr, plv_ptr, z_ptr, kl_ptr,  # absent priors / outputs are None
    mu_st, lv_st, pmu_st, plv_st, out_st,  # (row, d1, d2, d3) strides; out_st: z's samples, an elementwise KL
    B, N, dims, numel, n_samples, key_ptr, n_col_blocks, row_steps,  # key_ptr: int64 [seed, offset]
    SAMPLE: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, KL_MODE: tl.constexpr, HAS_PMU: tl.constexpr,
    HAS_PLV: tl.constexpr,
    INNER_RANK: tl.constexpr, SAMPLE_DTYPE: tl.constexpr, KL_DTYPE: tl.constexpr, INT64: tl.constexpr,
    FAST: tl.constexpr, COARSE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n, pid_b, cols, col_mask, row0 = _program_tile(N, n_col_blocks, row_steps, INT64, BLOCK_B, BLOCK_N)
    mu_col = column_offsets(cols, dims, mu_st, INNER_RANK)
    lv_col = column_offsets(cols, dims, lv_st, INNER_RANK)
    out_col = column_offsets(cols, dims, out_st, INNER_RANK)
    if HAS_PMU:
        pmu_col = column_offsets(cols, dims, pmu_st, INNER_RANK)
    if HAS_PLV:
        plv_col = column_offsets(cols, dims, plv_st, INNER_RANK)
    if SAMPLE:
        seed = tl.load(key_ptr)
        offset = tl.load(key_ptr + 1)
    acc = tl.zeros([BLOCK_N], dtype=KL_DTYPE)
    for step in range(0, row_steps):
        rows = row0 + step * BLOCK_B + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        mask = row_mask[:, None] & col_mask[None, :]
        out_off = rows[:, None] * out_st[0] + out_col[None, :]
        mu = tl.load(mu_ptr + rows[:, None] * mu_st[0] + mu_col[None, :], mask=mask, other=0.0)
        lv = tl.load(lv_ptr + rows[:, None] * lv_st[0] + lv_col[None, :], mask=mask, other=0.0)
        if SAMPLE:
            mu_s = mu.to(SAMPLE_DTYPE)
            sd = _exp(lv.to(SAMPLE_DTYPE), SAMPLE_DTYPE == tl.float64, FAST, 0.5, COARSE)
            first = offset.to(tl.int64) + (rows * N + pid_n * BLOCK_N)  # each row's first logical index: keys the noise
            z_off = out_off
            for _ in range(0, n_samples):
                eps = philox_normal_rows(seed, first, BLOCK_N, WHOLE_BLOCKS, SAMPLE_DTYPE, FAST,
                                         z_ptr.dtype.element_ty.primitive_bitwidth == 16 and INNER_RANK == 1)
                tl.store(z_ptr + z_off, _common.to_element(mu_s + sd * eps, z_ptr), mask=mask)
                first += numel
                z_off += numel
        if KL_MODE != OFF:
            diff = mu.to(KL_DTYPE)
            d = lv.to(KL_DTYPE)
            if HAS_PMU:
                diff = diff - _load(pmu_ptr, rows, pmu_col, pmu_st, mask, KL_DTYPE)
            if HAS_PLV:
                plv = _load(plv_ptr, rows, plv_col, plv_st, mask, KL_DTYPE)
                d = d - plv
            # e^lv = sd^2 on every path (z drawn or not: the same KL): where z is drawn, a multiply, not an exp
            kl2 = _common.kl_twice(diff, d, plv if HAS_PLV else None, sd if SAMPLE and KL_DTYPE == SAMPLE_DTYPE else None,
                                   KL_DTYPE == tl.float64, FAST, COARSE)
            # the KL's 1/2 once per sum, not per element; masked lanes load zeros, and g(0) + 0 is 0: no select
            acc = emit_step(kl2, acc, kl_ptr, out_off, mask, rows, row_mask, pid_n, B, KL_MODE, 0.5, True)
    emit_finish(acc, kl_ptr, cols, col_mask, pid_n, pid_b, N, n_col_blocks, KL_MODE, 0.5)


@triton.jit
def _sample_kl_backward_kernel(
    mu_ptr, lv_ptr, pmu_ptr, plv_ptr, dz_ptr, gkl_ptr,  # dz: z's incoming gradient; gkl: the KL's, over mu's shape
    dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr,  # None when not needed; prior grads elementwise or partial buffers
    mu_st, lv_st, pmu_st, plv_st, dz_st, gkl_st, out_st, dz_sk, chunk_st,  # dz_sk: dz's stride between samples
    B, N, dims, numel, n_samples, chunk_samples, key_ptr, n_col_blocks, row_steps,  # key_ptr: int64 [seed, offset]
    HAS_DZ: tl.constexpr, SPREAD: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, HAS_GKL: tl.constexpr, HAS_PMU: tl.constexpr,
    HAS_PLV: tl.constexpr,
    WRITE_DMU: tl.constexpr, WRITE_DLV: tl.constexpr, PMU_MODE: tl.constexpr, PLV_MODE: tl.constexpr,
    INNER_RANK: tl.constexpr, SAMPLE_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, INT64: tl.constexpr,
    FAST: tl.constexpr, COARSE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n, pid_b, cols, col_mask, row0 = _program_tile(N, n_col_blocks, row_steps, INT64, BLOCK_B, BLOCK_N)
    k0 = 0
    k1 = n_samples
    if SPREAD:  # samples across programs (grid axis 1): chunk pid_s takes samples k0 .. k1 - 1 and writes its
        # sums to its own slice of dmu / dlv (chunk_st apart), which torch adds
        pid_s = tl.program_id(1)
        if INT64:
            pid_s = pid_s.to(tl.int64)
        k0 = pid_s * chunk_samples
        k1 = tl.minimum(k0 + chunk_samples, n_samples)
        if WRITE_DMU:
            dmu_ptr += pid_s * chunk_st
        if WRITE_DLV:
            dlv_ptr += pid_s * chunk_st
    lv_col = column_offsets(cols, dims, lv_st, INNER_RANK)
    out_col = column_offsets(cols, dims, out_st, INNER_RANK)
    if HAS_GKL:
        mu_col = column_offsets(cols, dims, mu_st, INNER_RANK)
        gkl_col = column_offsets(cols, dims, gkl_st, INNER_RANK)
        if HAS_PMU:
            pmu_col = column_offsets(cols, dims, pmu_st, INNER_RANK)
        if HAS_PLV:
            plv_col = column_offsets(cols, dims, plv_st, INNER_RANK)
    if HAS_DZ:
        dz_col = column_offsets(cols, dims, dz_st, INNER_RANK)
    if HAS_DZ:
        seed = tl.load(key_ptr)
        offset = tl.load(key_ptr + 1)
    acc_pmu = tl.zeros([BLOCK_N], dtype=GRAD_DTYPE)
    acc_plv = tl.zeros([BLOCK_N], dtype=GRAD_DTYPE)
    for step in range(0, row_steps):
        rows = row0 + step * BLOCK_B + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        mask = row_mask[:, None] & col_mask[None, :]
        out_off = rows[:, None] * out_st[0] + out_col[None, :]
        lv = tl.load(lv_ptr + rows[:, None] * lv_st[0] + lv_col[None, :], mask=mask, other=0.0)
        dmu = tl.zeros([BLOCK_B, BLOCK_N], dtype=GRAD_DTYPE)
        dlv = tl.zeros([BLOCK_B, BLOCK_N], dtype=GRAD_DTYPE)
        if HAS_DZ:
            # dz/dmu = 1, dz/dlv = exp(lv/2) eps / 2, summed over the samples; eps regenerated.
            sd = _exp(lv.to(SAMPLE_DTYPE), SAMPLE_DTYPE == tl.float64, FAST, 0.5, COARSE)
            dz_base = dz_ptr + rows[:, None] * dz_st[0] + dz_col[None, :]
            first = offset.to(tl.int64) + (rows * N + pid_n * BLOCK_N)
            if SPREAD:
                dz_base += k0 * dz_sk
                first += k0.to(tl.int64) * numel
            dz_eps = tl.zeros([BLOCK_B, BLOCK_N], dtype=GRAD_DTYPE)
            for _ in range(k0, k1):
                dz = tl.load(dz_base, mask=mask, other=0.0).to(GRAD_DTYPE)
                eps = philox_normal_rows(seed, first, BLOCK_N, WHOLE_BLOCKS, SAMPLE_DTYPE, FAST,
                                         dz_ptr.dtype.element_ty.primitive_bitwidth == 16 and INNER_RANK == 1)
                dmu += dz
                dz_eps += dz * eps.to(GRAD_DTYPE)
                first += numel
                dz_base += dz_sk
            dlv += (0.5 * sd).to(GRAD_DTYPE) * dz_eps
        if HAS_GKL:
            gkl = _load(gkl_ptr, rows, gkl_col, gkl_st, mask, GRAD_DTYPE)
            diff = _load(mu_ptr, rows, mu_col, mu_st, mask, GRAD_DTYPE)
            d = lv.to(GRAD_DTYPE)
            if HAS_PMU:
                diff = diff - _load(pmu_ptr, rows, pmu_col, pmu_st, mask, GRAD_DTYPE)
            if HAS_PLV:
                plv = _load(plv_ptr, rows, plv_col, plv_st, mask, GRAD_DTYPE)
                d = d - plv
            # e^lv = sd^2 without a prior log-variance, as in the forward
            weighted, em1 = _common.kl_gradient_terms(
                diff, d, plv if HAS_PLV else None, sd if HAS_DZ and GRAD_DTYPE == SAMPLE_DTYPE else None,
                GRAD_DTYPE == tl.float64, FAST, COARSE)
            dmu += gkl * weighted
            dlv += gkl * (0.5 * em1)
            if PMU_MODE != OFF:  # dkl/dmu_p = -dkl/dmu
                acc_pmu = emit_step(-gkl * weighted, acc_pmu, dpmu_ptr, out_off, mask, rows, row_mask,
                                     pid_n, B, PMU_MODE, 1.0, True)
            if PLV_MODE != OFF:  # dkl/dlv_p = (1 - e^d - (mu - mu_p)^2 e^{-lv_p}) / 2
                acc_plv = emit_step(gkl * (em1 + weighted * diff), acc_plv, dplv_ptr, out_off, mask,
                                     rows, row_mask, pid_n, B, PLV_MODE, -0.5, True)
        if WRITE_DMU:
            tl.store(dmu_ptr + out_off, _common.to_element(dmu, dmu_ptr), mask=mask)
        if WRITE_DLV:
            tl.store(dlv_ptr + out_off, _common.to_element(dlv, dlv_ptr), mask=mask)
    if HAS_GKL:
        emit_finish(acc_pmu, dpmu_ptr, cols, col_mask, pid_n, pid_b, N, n_col_blocks, PMU_MODE)
        emit_finish(acc_plv, dplv_ptr, cols, col_mask, pid_n, pid_b, N, n_col_blocks, PLV_MODE, -0.5)


# --------------------------------------------------------------------------------------------- #
# Launchers                                                                                     #
# --------------------------------------------------------------------------------------------- #

#: Tests set ``(BLOCK_B, BLOCK_N, row_steps)`` here to force many small programs (forward and
#: backward may be given different tilings: the noise is keyed by the logical index).
TILING_OVERRIDE: tuple[int, int, int] | None = None
def _whole_blocks(view: _common.StridedView, tiling: _common.RowTiling, aligned: bool) -> bool:
    """Whether every tile row starts a Philox block (an index ``4 k``): each block is then drawn once, not 4 times.

    ``aligned``: the key's offset is a multiple of 4 (always so for :func:`fusedvae.seeding.draw_key`).
    """
    return view.cols % 4 == 0 and tiling.block_n % 4 == 0 and aligned


def _samples_as_rows(mu, logvar, z, n_samples, key, aligned) -> bool:
    """Draw z over the view ``(n_samples, *mu.shape)`` (mu and lv broadcast along the samples), one sample loop step.

    When the posterior alone would leave the device idle (IWAE: a small posterior, thousands of samples),
    the samples become rows and spread across programs; the logical index ``k * mu.numel() + i`` is
    the row-major index of that view, so the noise is the same. False (nothing launched) when the
    layout does not merge to three column dims.
    """
    shape3 = (n_samples, *mu.shape)
    out = torch.empty_strided(shape3, z.stride(), device="meta")
    operands = [mu.unsqueeze(0).expand(shape3), logvar.unsqueeze(0).expand(shape3), out]
    view, passed = _common.strided_view(torch.Size(shape3), operands)
    if passed[-1] is not out:
        return False
    tiling = _common.row_tiling(view.rows, view.cols, mu.device, TILING_OVERRIDE)
    mu_st, lv_st, out_st = view.strides
    _sample_kl_forward_kernel[(tiling.n_col_blocks * tiling.n_row_chunks,)](
        passed[0], passed[1], None, None, z, None, mu_st, lv_st, (0, 0, 0, 0), (0, 0, 0, 0), out_st,
        view.rows, view.cols, view.dims, z.numel(), 1, key, tiling.n_col_blocks, tiling.row_steps,
        SAMPLE=True, WHOLE_BLOCKS=_whole_blocks(view, tiling, aligned), KL_MODE=OFF, HAS_PMU=False, HAS_PLV=False,
        INNER_RANK=view.inner_rank, SAMPLE_DTYPE=_common.tl_dtype(compute_dtype(mu, logvar)),
        KL_DTYPE=_common.tl_dtype(compute_dtype(mu, logvar)), INT64=_common.row_view_needs_int64(view, tiling),
        FAST=fastmath.is_fast(mu), COARSE=_common.coarse_exp(z.dtype), BLOCK_B=tiling.block_b, BLOCK_N=tiling.block_n,
        num_warps=tiling.num_warps,
    )
    return True


def sample_kl_forward(mu, logvar, prior_mu, prior_logvar, *, n_samples, key, aligned, sample, kl, reduction):
    """One pass over the inputs: z (when ``sample``) and the KL reduced by ``reduction`` (when ``kl``)."""
    if not kl:
        prior_mu = prior_logvar = None
    if not mu.is_contiguous():  # memory order not the logical one: tiles in memory order where that path applies
        done = sample_kl_transposed.forward(mu, logvar, prior_mu, prior_logvar, n_samples=n_samples, key=key,
                                            aligned=aligned, sample=sample, kl=kl, reduction=reduction)
        if done is not None:
            return done
    shape, device, numel = mu.shape, mu.device, mu.numel()
    kl_dtype = compute_dtype(mu, logvar, prior_mu, prior_logvar)
    kl_mode = _common.REDUCTION_MODE[reduction] if kl else OFF
    shape2, view, operands, out_strides = _common.row_plan(mu, [mu, logvar, prior_mu, prior_logvar])
    z = None
    if sample:
        z_strides = (numel, *out_strides) if numel else None
        z = _common.empty((n_samples, *shape), result_dtype(mu, logvar), device, z_strides)
    if numel == 0:
        if kl_mode == OFF:
            return z, None
        if kl_mode == ELEMENTWISE:
            return z, _common.empty(shape, result_dtype(mu, logvar, prior_mu, prior_logvar), device)
        reduced_shape = {"sum": (), "per_sample": shape[:1], "per_dim": shape[1:]}[reduction]
        return z, torch.zeros(reduced_shape, dtype=kl_dtype, device=device)

    tiling = _common.row_tiling(view.rows, view.cols, device, TILING_OVERRIDE)
    kl_buffer = None
    if kl_mode == ELEMENTWISE:
        kl_buffer = _common.empty(shape, result_dtype(mu, logvar, prior_mu, prior_logvar), device, out_strides)
    elif kl_mode != OFF:
        partials = _common.partial_shape(kl_mode, view, tiling)
        kl_buffer = _common.empty(partials, kl_dtype, device)
    programs = tiling.n_col_blocks * tiling.n_row_chunks
    if sample and n_samples > 1 and programs < _common.target_programs(device):
        sample = not _samples_as_rows(mu, logvar, z, n_samples, key, aligned)
        if not sample and kl_mode == OFF:
            return z, None
    _sample_kl_forward_kernel[(programs,)](
        *operands, z, kl_buffer, *view.strides, view.rows, view.cols, view.dims, numel, n_samples, key,
        tiling.n_col_blocks, tiling.row_steps,
        SAMPLE=bool(sample), WHOLE_BLOCKS=_whole_blocks(view, tiling, aligned), KL_MODE=kl_mode,
        HAS_PMU=operands[2] is not None, HAS_PLV=operands[3] is not None,
        INNER_RANK=view.inner_rank, SAMPLE_DTYPE=_common.tl_dtype(compute_dtype(mu, logvar)),
        KL_DTYPE=_common.tl_dtype(kl_dtype), INT64=_common.row_view_needs_int64(view, tiling, n_samples),
        FAST=fastmath.is_fast(mu), COARSE=_common.coarse_exp(result_dtype(mu, logvar, prior_mu, prior_logvar)),
        BLOCK_B=tiling.block_b, BLOCK_N=tiling.block_n, num_warps=tiling.num_warps,
    )
    if kl_mode in (OFF, ELEMENTWISE):
        return z, kl_buffer
    reduced_shape = {"sum": (), "per_dim": shape[1:], "per_sample": shape[:1]}[reduction]
    return z, _common.finish_partials(kl_buffer, kl_mode, reduced_shape)


def _kl_grad_view(grad_kl: torch.Tensor, reduction: str, shape2: torch.Size) -> torch.Tensor:
    """The KL's incoming gradient as a (stride-0 where reduced) view over ``mu``'s shape: no copy."""
    if reduction == "none":
        return grad_kl.reshape(shape2) if grad_kl.dim() == 0 else grad_kl
    if reduction == "per_sample":
        return grad_kl.reshape(shape2[0], *([1] * (len(shape2) - 1))).expand(shape2)
    return grad_kl.expand(shape2)  # "sum": a scalar; "per_dim": shape2[1:], repeated along the rows


def sample_kl_backward(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, *, n_samples, key, aligned, reduction,
                       needs):
    """One pass: dmu, dlogvar and the priors' gradients (those ``needs`` asks for), noise regenerated."""
    if not mu.is_contiguous():
        done = sample_kl_transposed.backward(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, n_samples=n_samples,
                                             key=key, aligned=aligned, reduction=reduction, needs=needs)
        if done is not None:
            return done
    shape, device = mu.shape, mu.device
    need_mu, need_lv, need_pmu, need_plv = needs
    need_pmu = need_pmu and prior_mu is not None and grad_kl is not None
    need_plv = need_plv and prior_logvar is not None and grad_kl is not None
    if (grad_z is None and grad_kl is None) or mu.numel() == 0:
        zeros = lambda t, need: torch.zeros_like(t) if need and t is not None else None  # noqa: E731
        return zeros(mu, need_mu), zeros(logvar, need_lv), zeros(prior_mu, need_pmu), zeros(prior_logvar, need_plv)

    shape2 = shape if len(shape) else torch.Size([1])
    sample_dtype = compute_dtype(mu, logvar)
    grad_dtype = compute_dtype(mu, logvar, prior_mu, prior_logvar) if grad_kl is not None else sample_dtype
    if grad_kl is None:
        prior_mu = prior_logvar = None
    dz_elem = None
    if grad_z is not None:
        grad_z = grad_z.reshape(n_samples, *shape2)
        dz_elem = grad_z.select(0, 0)
    gkl = None if grad_kl is None else _kl_grad_view(grad_kl, reduction, shape2)
    _, view, operands, out_strides = _common.row_plan(mu, [mu, logvar, prior_mu, prior_logvar, dz_elem, gkl])
    if grad_z is not None and operands[4] is not dz_elem:
        grad_z = grad_z.contiguous()  # the rare fallback layout: dz copied along with its first sample
    tiling = _common.row_tiling(view.rows, view.cols, device, TILING_OVERRIDE)

    def prior_buffer(prior, needed):  # (mode the kernel runs, buffer, mode None: a full-size grad torch sums)
        mode = _common.grad_mode(prior, shape2) if needed else OFF
        if mode == OFF:
            return OFF, None, mode
        if mode is None or mode == ELEMENTWISE:
            dtype = prior.dtype if mode is not None else grad_dtype
            return ELEMENTWISE, _common.empty(shape, dtype, device, out_strides), mode
        partials = _common.partial_shape(mode, view, tiling)
        return mode, _common.empty(partials, grad_dtype, device), mode

    pmu_mode, dpmu, pmu_kind = prior_buffer(prior_mu, need_pmu)
    plv_mode, dplv, plv_kind = prior_buffer(prior_logvar, need_plv)
    mu_e, lv_e, pmu_e, plv_e, _, gkl_e = operands
    dz_sk = grad_z.stride(0) if grad_z is not None else 0
    programs = tiling.n_col_blocks * tiling.n_row_chunks
    # every gradient is handed back in its input's dtype: 16-bit inputs only, 16-bit gradients only
    coarse = _common.coarse_exp(*(t.dtype for t in (mu, logvar, prior_mu, prior_logvar) if t is not None))

    def launch(dz, gkl_t, pmu_t, plv_t, dmu_t, dlv_t, dpmu_t, dplv_t, pmu_m, plv_m, chunks=1, chunk_samples=n_samples):
        _sample_kl_backward_kernel[(programs, chunks)](
            mu_e, lv_e, pmu_t, plv_t, dz, gkl_t, dmu_t, dlv_t, dpmu_t, dplv_t,
            *view.strides, dz_sk, mu.numel(),
            view.rows, view.cols, view.dims, mu.numel(), n_samples, chunk_samples, key, tiling.n_col_blocks,
            tiling.row_steps,
            HAS_DZ=dz is not None, SPREAD=chunks > 1, WHOLE_BLOCKS=_whole_blocks(view, tiling, aligned),
            HAS_GKL=gkl_t is not None,
            HAS_PMU=pmu_t is not None,
            HAS_PLV=plv_t is not None, WRITE_DMU=dmu_t is not None, WRITE_DLV=dlv_t is not None,
            PMU_MODE=pmu_m, PLV_MODE=plv_m,
            INNER_RANK=view.inner_rank, SAMPLE_DTYPE=_common.tl_dtype(sample_dtype),
            GRAD_DTYPE=_common.tl_dtype(grad_dtype),
            INT64=_common.row_view_needs_int64(view, tiling, n_samples, dz_sk),
            FAST=fastmath.is_fast(mu), COARSE=coarse, BLOCK_B=tiling.block_b, BLOCK_N=tiling.block_n,
            num_warps=tiling.num_warps,
        )

    chunks = 1
    if (grad_z is not None and n_samples >= _common.SPREAD_MIN_SAMPLES and (need_mu or need_lv)
            and programs < _common.target_programs(device)):
        chunk_samples = triton.cdiv(n_samples, min(n_samples, triton.cdiv(_common.target_programs(device), programs)))
        chunks = triton.cdiv(n_samples, chunk_samples)
    if chunks == 1:
        dmu = _common.empty(shape, mu.dtype, device, out_strides) if need_mu else None
        dlv = _common.empty(shape, logvar.dtype, device, out_strides) if need_lv else None
        launch(grad_z, gkl_e, pmu_e, plv_e, dmu, dlv, dpmu, dplv, pmu_mode, plv_mode)
    else:
        # Many samples, few elements (IWAE): the samples spread across programs, each chunk's sums in its own
        # slice of a (chunks, *shape) buffer added by torch in a fixed order; the KL's part in a second launch.
        part_strides = (mu.numel(), *out_strides)
        parts = [_common.empty((chunks, *shape), grad_dtype, device, part_strides) if need else None
                 for need in (need_mu, need_lv)]
        launch(grad_z, None, None, None, *parts, None, None, OFF, OFF, chunks, chunk_samples)
        sums = [None if p is None else p.sum(0) for p in parts]
        if gkl_e is not None:
            kl_parts = [_common.empty(shape, grad_dtype, device, out_strides) if need else None
                        for need in (need_mu, need_lv)]
            launch(None, gkl_e, pmu_e, plv_e, *kl_parts, dpmu, dplv, pmu_mode, plv_mode)
            sums = [None if s is None else s + k for s, k in zip(sums, kl_parts)]
        dmu, dlv = (None if s is None else s.to(t.dtype) for s, t in zip(sums, (mu, logvar)))

    def finish_prior(prior, kind, buffer):
        if buffer is None:
            return None
        if kind is None:
            return buffer.sum_to_size(prior.shape).to(prior.dtype)
        if kind == ELEMENTWISE:
            return buffer.reshape(prior.shape)
        return _common.finish_partials(buffer, kind, prior.shape).to(prior.dtype)

    return dmu, dlv, finish_prior(prior_mu, pmu_kind, dpmu), finish_prior(prior_logvar, plv_kind, dplv)


# --------------------------------------------------------------------------------------------- #
# Custom ops with autograd, and the backend entry point                                        #
# --------------------------------------------------------------------------------------------- #
# The launchers are ``torch.library`` custom ops tied together by ``register_autograd`` rather than an
# autograd.Function: with an autograd.Function Dynamo would speculate its forward and backward (ctx
# attributes, needs_input_grad, set_materialize_grads), whose support varies between torch releases;
# this way the op is one opaque node and AOTAutograd puts the backward op in the backward graph (in eager
# mode an autograd.Function of the same implementations skips the op dispatch: _custom_op.call). The
# context saves the inputs and the forward's noise key tensor (16 bytes): the backward regenerates the
# same noise from it, also when a CUDA graph replays both with a fresh key.


def _sample_kl_forward_impl(mu, logvar, prior_mu, prior_logvar, n_samples, key, aligned, sample, kl, reduction):
    z, kl_out = sample_kl_forward(mu, logvar, prior_mu, prior_logvar, n_samples=n_samples, key=key,
                                  aligned=aligned, sample=sample, kl=kl, reduction=reduction)
    return tuple(_custom_op.absent(mu) if t is None else _common.in_policy_layout(t, mu) for t in (z, kl_out))


_sample_kl_forward_op = torch.library.custom_op(
    _custom_op.op_name("sample_kl_forward"), _sample_kl_forward_impl, mutates_args=(),
    schema="(Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, SymInt n_samples, Tensor key, "
    "bool aligned, bool sample, bool kl, str reduction) -> (Tensor, Tensor)",
)


@_sample_kl_forward_op.register_fake
def _(mu, logvar, prior_mu, prior_logvar, n_samples, key, aligned, sample, kl, reduction):
    if not kl:
        prior_mu = prior_logvar = None
    shape = mu.shape
    z = _custom_op.absent(mu)
    if sample:
        z_shape = (n_samples, *shape)
        z = mu.new_empty_strided(z_shape, _common.policy_strides(z_shape, mu), dtype=result_dtype(mu, logvar))
    if not kl:
        return z, _custom_op.absent(mu)
    if reduction == "none":
        return z, mu.new_empty_strided(shape, _common.policy_strides(shape, mu),
                                       dtype=result_dtype(mu, logvar, prior_mu, prior_logvar))
    reduced_shape = {"sum": (), "per_sample": shape[:1], "per_dim": shape[1:]}[reduction]
    return z, mu.new_empty(reduced_shape, dtype=compute_dtype(mu, logvar, prior_mu, prior_logvar))


def _returned_grads(grad_kl, prior_mu, prior_logvar, needs):
    """Which of (dmu, dlogvar, dprior_mu, dprior_logvar) :func:`sample_kl_backward` returns (the others are None)."""
    need_mu, need_lv, need_pmu, need_plv = needs
    with_kl = grad_kl is not None
    return need_mu, need_lv, need_pmu and with_kl and prior_mu is not None, need_plv and with_kl and (
        prior_logvar is not None)


def _sample_kl_backward_impl(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, n_samples, key, aligned, reduction,
                             need_mu, need_logvar, need_prior_mu, need_prior_logvar):
    grads = sample_kl_backward(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, n_samples=n_samples, key=key,
                               aligned=aligned, reduction=reduction,
                               needs=(need_mu, need_logvar, need_prior_mu, need_prior_logvar))
    return tuple(_custom_op.absent(t if t is not None else mu) if g is None else _common.in_policy_layout(g, mu)
                 for g, t in zip(grads, (mu, logvar, prior_mu, prior_logvar)))


_sample_kl_backward_op = torch.library.custom_op(
    _custom_op.op_name("sample_kl_backward"), _sample_kl_backward_impl, mutates_args=(),
    schema="(Tensor? grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, "
    "SymInt n_samples, Tensor key, bool aligned, str reduction, bool need_mu, bool need_logvar, "
    "bool need_prior_mu, bool need_prior_logvar) -> (Tensor, Tensor, Tensor, Tensor)",
)


@_sample_kl_backward_op.register_fake
def _(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, n_samples, key, aligned, reduction,
      need_mu, need_logvar, need_prior_mu, need_prior_logvar):
    needs = (need_mu, need_logvar, need_prior_mu, need_prior_logvar)
    return tuple(
        t.new_empty_strided(t.shape, _common.policy_strides(t.shape, mu)) if r else _custom_op.absent(
            t if t is not None else mu)
        for r, t in zip(_returned_grads(grad_kl, prior_mu, prior_logvar, needs), (mu, logvar, prior_mu, prior_logvar))
    )


def _setup_context(ctx, inputs, output):
    mu, logvar, prior_mu, prior_logvar, n_samples, key, aligned, sample, kl, reduction = inputs
    if not kl:
        prior_mu = prior_logvar = None
    ctx.save_for_backward(mu, logvar, prior_mu, prior_logvar, key)
    ctx.config = (n_samples, aligned, sample, kl, reduction)
    z, kl_out = output
    if not sample:
        ctx.mark_non_differentiable(z)
    if not kl:
        ctx.mark_non_differentiable(kl_out)
    ctx.set_materialize_grads(False)


def _backward(run_backward, ctx, grad_z, grad_kl):
    mu, logvar, prior_mu, prior_logvar, key = ctx.saved_tensors
    n_samples, aligned, sample, kl, reduction = ctx.config
    grad_z = grad_z if sample else None
    grad_kl = grad_kl if kl else None
    needs = tuple(ctx.needs_input_grad[:4])
    none = (None,) * 6  # n_samples, key, aligned, sample, kl, reduction
    if (grad_z is None and grad_kl is None) or not any(needs):
        return (None,) * 4 + none
    grads = run_backward(
        grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, n_samples, key, aligned, reduction, *needs
    )
    returned = _returned_grads(grad_kl, prior_mu, prior_logvar, needs)
    return (*(g if r else None for g, r in zip(grads, returned)), *none)


_SampleKL = _custom_op.register(_sample_kl_forward_op, _sample_kl_forward_impl, _setup_context, _backward,
                                torch.ops.fusedvae.sample_kl_backward, _sample_kl_backward_impl)


def rsample_kl(
    mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | None, prior_logvar: torch.Tensor | None, *,
    n_samples: int, key: torch.Tensor | None = None, seed: int | None = None, offset: int | None = None,
    sample: bool, kl: bool, reduction: str,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backend entry point: z when ``sample``, the KL reduced by ``reduction`` when ``kl``.

    Same contract as :func:`fusedvae.reference.sampling.rsample_kl`: z has shape ``(n_samples,
    *mu.shape)`` in the promoted dtype of ``mu`` and ``logvar``; the KL is elementwise in the promoted
    dtype of all four inputs for ``"none"``, or ``"sum"`` (0-dim), ``"per_sample"`` (``(B,)``),
    ``"per_dim"`` (``mu.shape[1:]``) in the compute dtype. Differentiable in all four tensors; the
    backward pass regenerates the noise from the forward's key.

    The noise key: ``key``, the ``(2,)`` int64 tensor ``[seed, offset]`` of :func:`fusedvae.seeding.draw_key`
    on ``mu``'s device (its offset a multiple of 4), read by the kernels on the device (never on the host, so
    CUDA graphs replay it); or the ints ``seed`` and ``offset`` (tests, benchmarks: copied to the device, any
    offset). Neither is needed without ``sample``. Example::

        >>> key = fusedvae.seeding.draw_key(mu.device)
        >>> z, kl = rsample_kl(mu, lv, None, None, n_samples=1, key=key, sample=True, kl=True,
        ...                    reduction="sum")  # doctest: +SKIP
    """
    if not sample and not kl:
        return None, None
    if reduction not in _common.REDUCTION_MODE:
        raise ValueError(f"reduction must be one of {tuple(_common.REDUCTION_MODE)}, got {reduction!r}")
    if not kl:
        prior_mu = prior_logvar = None
    if key is not None:
        key, aligned = check_key(key, mu.device), True
    elif not sample:
        key, aligned = torch.zeros(2, dtype=torch.int64, device=mu.device), True  # never read
    elif seed is None or offset is None:
        raise ValueError("pass key (a (2,) int64 tensor [seed, offset]) or both seed and offset")
    else:
        key, aligned = key_from_ints(seed, offset, mu.device), offset % 4 == 0
    z, kl_out = _custom_op.call(torch.ops.fusedvae.sample_kl_forward, _SampleKL, mu, logvar, prior_mu, prior_logvar,
                                int(n_samples), key, aligned, bool(sample), bool(kl), reduction)
    return (z if sample else None), (kl_out if kl else None)
