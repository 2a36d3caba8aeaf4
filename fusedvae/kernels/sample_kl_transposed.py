"""Sampling + KL over layouts whose memory order transposes the logical order (channels-last, H/W swapped).

The launchers of :mod:`.sample_kl` ask :func:`forward` / :func:`backward` first for a non-contiguous ``mu``;
``None`` means "not this layout" (or a case left to them), and their row-view kernels run.

The layout: in memory ``mu`` is a contiguous ``(R, P, Q)``, in logical (row-major) order it is ``(R, Q, P)``::

    logical index = r P Q + q P + p        memory offset = r P Q + p Q + q

Channels-last ``(N, C, H, W)`` is ``R = N, P = H W, Q = C``; H and W swapped in memory ("permuted") is
``R = N C, P = W, Q = H``. The row-view kernels tile the logical order, so consecutive columns of a tile are
``Q`` (or ``P``) elements apart in memory: gathered 16-bit loads, and a division per element to find them.
The kernels here tile the memory order instead: ``[BLOCK_P, BLOCK_Q]`` tiles with ``Q`` the fast axis, every
operand (mu, logvar, full-size priors, z, an elementwise KL, dz, the gradients) read and written as contiguous
runs with one scalar base per tile. The noise stays keyed by the logical index (the contract of
:mod:`.philox`): a tile's ``BLOCK_Q`` runs of ``BLOCK_P`` logical indices are drawn as ``[BLOCK_Q, BLOCK_P]``
(whole Philox blocks when ``P``, the run start and the key's offset are multiples of 4) and transposed in
registers (through shared memory on a GPU), so z equals the contiguous path's z bit for bit on the exact path.

``R = N M``: dim 0 (the rows of the reductions) is the outer factor of ``R``; ``"per_sample"`` sums over
``M P Q`` memory-contiguous elements, ``"per_dim"`` per memory position within a row, transposed back to the
logical order by torch after the fixed-order sum (no float atomics: two runs are bitwise equal).

Declined (the row-view kernels run them): other layouts, operands (logvar, priors, dz, an elementwise KL
gradient) not in mu's layout (broadcast priors included), many samples of a small posterior (their
samples-as-rows / spread paths), empty tensors, ``"per_sample"`` / ``"per_dim"`` when dim 0 is not the outer
factor of ``R`` (a 2-D transpose).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..precision import compute_dtype, result_dtype
from . import _common, fastmath
from ._common import ELEMENTWISE, OFF, PER_DIM, PER_SAMPLE, SUM
from ._common import exp_accurate as _exp
from .philox import _block_normals, philox_normal_at, philox_normal_rows

#: Tests set ``(BLOCK_P, BLOCK_Q, row_steps)`` here to force many small programs.
TILING_OVERRIDE: tuple[int, int, int] | None = None
#: Widest tile along Q (the memory-contiguous axis); a wider Q takes several tiles.
MAX_BLOCK_Q = 128
#: CUDA's limit on the grid's second axis (the row chunks); a longer one is left to the row-view kernels.
MAX_GRID_Y = 65535


# --------------------------------------------------------------------------------------------- #
# Kernels                                                                                       #
# --------------------------------------------------------------------------------------------- #


@triton.jit
def _tile(M, P, PQ, n_qb, Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
          MASKED: tl.constexpr):
    """This program's tile: column tile and row chunk ids, in-tile offsets, mask, memory and logical bases.

    The bases are int64 scalars (once per program); per-element offsets stay 32-bit within the tile.
    """
    # A 2-D grid (column tiles, row chunks), decoded inner to outer, so that the usual M == 1 (channels-last) and
    # n_qb == 1 (Q <= MAX_BLOCK_Q), specialised to constants by Triton, leave no integer division at all.
    col = tl.program_id(0)
    chunk = tl.program_id(1)
    m = col % M
    qb = (col // M) % n_qb
    pb = (col // M) // n_qb
    p_loc = tl.arange(0, BLOCK_P)
    q_loc = tl.arange(0, BLOCK_Q)
    tile_off = p_loc[:, None] * Q + q_loc[None, :]
    if MASKED:
        mask = ((pb * BLOCK_P + p_loc) < P)[:, None] & ((qb * BLOCK_Q + q_loc) < Q)[None, :]
    else:  # never read (loads and stores take no mask): a constant
        mask = tl.full([BLOCK_P, BLOCK_Q], 1, tl.int1)
    mem_base = m.to(tl.int64) * PQ + pb.to(tl.int64) * (BLOCK_P * Q) + qb * BLOCK_Q  # within a row n, at (m, p0, q0)
    log_base = m.to(tl.int64) * PQ + (qb * BLOCK_Q).to(tl.int64) * P + pb * BLOCK_P  # logical index of (m, q0, p0)
    return col, chunk, p_loc, q_loc, tile_off, mask, mem_base, log_base


@triton.jit
def _load(ptr, mask, MASKED: tl.constexpr):
    """A tile's load; masked lanes (``MASKED``: P or Q not a multiple of the tile) read 0."""
    if MASKED:
        x = tl.load(ptr, mask=mask, other=0.0)
    else:
        x = tl.load(ptr)
    return x


@triton.jit
def _store(ptr, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, value, mask=mask)
    else:
        tl.store(ptr, value)


@triton.jit
def _noise(seed, first, p_loc, q_loc, P, BLOCK_P: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, DTYPE: tl.constexpr,
           FAST: tl.constexpr):
    """``[BLOCK_P, BLOCK_Q]`` normals: element ``(p, q)`` is logical index ``first + q P + p`` (int64 scalar)."""
    runs = first + q_loc.to(tl.int64) * P  # each q's run of BLOCK_P consecutive logical indices
    if WHOLE_BLOCKS and BLOCK_P >= q_loc.shape[0]:  # each Philox block drawn once along the runs, then transposed
        eps = tl.trans(philox_normal_rows(seed, runs, BLOCK_P, True, DTYPE, FAST))
    elif WHOLE_BLOCKS:  # short runs, wide Q: blocks laid out [BLOCK_P / 4, BLOCK_Q], Q fast (sm_90: ~1 instr/elem less)
        blocks = (runs >> 2)[None, :] + tl.arange(0, BLOCK_P // 4)[:, None]
        n0, n1, n2, n3 = _block_normals(seed, blocks, DTYPE, FAST)
        # [g, q, i, j] is normal 2 i + j of block g: to [g, i, j, q], merged to [p = 4 g + 2 i + j, q]
        eps = tl.reshape(tl.permute(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (0, 2, 3, 1)), [BLOCK_P, q_loc.shape[0]])
    else:
        eps = philox_normal_at(seed, runs[None, :] + p_loc[:, None], DTYPE, FAST)
    return eps


@triton.jit
def _sample_kl_t_forward_kernel(
    mu_ptr, lv_ptr, pmu_ptr, plv_ptr, z_ptr, kl_ptr,  # absent priors / outputs are None; all in mu's layout
    N, M, P, PQ, row_len, numel, n_samples, key_ptr, n_qb, row_steps,  # row_len = M P Q: dim 0's stride
    Q: tl.constexpr, SAMPLE: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, KL_MODE: tl.constexpr,
    HAS_PMU: tl.constexpr, HAS_PLV: tl.constexpr, SAMPLE_DTYPE: tl.constexpr, KL_DTYPE: tl.constexpr,
    FAST: tl.constexpr, COARSE: tl.constexpr, MASKED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    col, chunk, p_loc, q_loc, tile_off, mask, mem_base, log_base = _tile(M, P, PQ, n_qb, Q, BLOCK_P, BLOCK_Q,
                                                                         MASKED)
    if SAMPLE:
        seed = tl.load(key_ptr)
        log_base += tl.load(key_ptr + 1)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=KL_DTYPE)
    n0 = chunk * row_steps
    for step in range(0, tl.minimum(row_steps, N - n0)):
        n = n0 + step
        row = n.to(tl.int64) * row_len
        off = row + mem_base + tile_off
        mu = _load(mu_ptr + off, mask, MASKED)
        lv = _load(lv_ptr + off, mask, MASKED)
        if SAMPLE:
            mu_s = mu.to(SAMPLE_DTYPE)
            sd = _exp(lv.to(SAMPLE_DTYPE), SAMPLE_DTYPE == tl.float64, FAST, 0.5, COARSE)
            first = row + log_base
            z_off = off
            for _ in range(0, n_samples):
                eps = _noise(seed, first, p_loc, q_loc, P, BLOCK_P, WHOLE_BLOCKS, SAMPLE_DTYPE, FAST)
                _store(z_ptr + z_off, _common.to_element(mu_s + sd * eps, z_ptr), mask, MASKED)
                first += numel
                z_off += numel
        if KL_MODE != OFF:
            diff = mu.to(KL_DTYPE)
            d = lv.to(KL_DTYPE)
            if HAS_PMU:
                diff = diff - _load(pmu_ptr + off, mask, MASKED).to(KL_DTYPE)
            if HAS_PLV:
                plv = _load(plv_ptr + off, mask, MASKED).to(KL_DTYPE)
                d = d - plv
            # e^lv = sd^2: where z is drawn, a multiply, not an exp (as the row-view kernel)
            kl2 = _common.kl_twice(diff, d, plv if HAS_PLV else None, sd if SAMPLE and KL_DTYPE == SAMPLE_DTYPE else None,
                                   KL_DTYPE == tl.float64, FAST, COARSE)
            # twice the KL; the 1/2 once per sum (exact: a power of two). Masked lanes load 0: g(0) + 0 is 0.
            if KL_MODE == ELEMENTWISE:
                _store(kl_ptr + off, _common.to_element(kl2 * 0.5, kl_ptr), mask, MASKED)
            elif KL_MODE == PER_SAMPLE:  # partials (n_col_tiles, N)
                tl.store(kl_ptr + col.to(tl.int64) * N + n, tl.sum(tl.sum(kl2, axis=1), axis=0) * 0.5)
            else:
                acc += kl2
    if KL_MODE == SUM:  # partials (programs,)
        tl.store(kl_ptr + chunk.to(tl.int64) * tl.num_programs(0) + col, tl.sum(tl.sum(acc, axis=1), axis=0) * 0.5)
    elif KL_MODE == PER_DIM:  # partials (n_row_chunks, M P Q) in memory order
        _store(kl_ptr + chunk.to(tl.int64) * row_len + mem_base + tile_off, acc * 0.5, mask, MASKED)


@triton.jit
def _sample_kl_t_backward_kernel(
    mu_ptr, lv_ptr, pmu_ptr, plv_ptr, dz_ptr, gkl_ptr,  # None when absent; gkl as GKL_MODE says
    dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr,  # None when not needed; all in mu's layout
    N, M, P, PQ, row_len, numel, n_samples, dz_sk, gkl_sn, key_ptr, n_qb, row_steps,
    Q: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, HAS_DZ: tl.constexpr, GKL_MODE: tl.constexpr,
    HAS_PMU: tl.constexpr, HAS_PLV: tl.constexpr, WRITE_DMU: tl.constexpr, WRITE_DLV: tl.constexpr,
    WRITE_DPMU: tl.constexpr, WRITE_DPLV: tl.constexpr, SAMPLE_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
    FAST: tl.constexpr, COARSE: tl.constexpr, MASKED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # GKL_MODE: ELEMENTWISE in mu's layout; SUM one scalar; PER_SAMPLE one per row n (gkl_sn apart); PER_DIM
    # a (M, P, Q) memory-order copy of the per-column gradient, loaded once per program.
    col, chunk, p_loc, q_loc, tile_off, mask, mem_base, log_base = _tile(M, P, PQ, n_qb, Q, BLOCK_P, BLOCK_Q,
                                                                         MASKED)
    if HAS_DZ:
        seed = tl.load(key_ptr)
        log_base += tl.load(key_ptr + 1)
    if GKL_MODE == SUM:
        gkl = tl.load(gkl_ptr).to(GRAD_DTYPE)
    elif GKL_MODE == PER_DIM:
        gkl = _load(gkl_ptr + mem_base + tile_off, mask, MASKED).to(GRAD_DTYPE)
    n0 = chunk * row_steps
    for step in range(0, tl.minimum(row_steps, N - n0)):
        n = n0 + step
        row = n.to(tl.int64) * row_len
        off = row + mem_base + tile_off
        lv = _load(lv_ptr + off, mask, MASKED)
        dmu = tl.zeros([BLOCK_P, BLOCK_Q], dtype=GRAD_DTYPE)
        dlv = tl.zeros([BLOCK_P, BLOCK_Q], dtype=GRAD_DTYPE)
        if HAS_DZ:
            # dz/dmu = 1, dz/dlv = exp(lv/2) eps / 2, summed over the samples; eps regenerated.
            sd = _exp(lv.to(SAMPLE_DTYPE), SAMPLE_DTYPE == tl.float64, FAST, 0.5, COARSE)
            first = row + log_base
            dz_off = off
            dz_eps = tl.zeros([BLOCK_P, BLOCK_Q], dtype=GRAD_DTYPE)
            for _ in range(0, n_samples):
                dz = _load(dz_ptr + dz_off, mask, MASKED).to(GRAD_DTYPE)
                eps = _noise(seed, first, p_loc, q_loc, P, BLOCK_P, WHOLE_BLOCKS, SAMPLE_DTYPE, FAST)
                dmu += dz
                dz_eps += dz * eps.to(GRAD_DTYPE)
                first += numel
                dz_off += dz_sk
            dlv += (0.5 * sd).to(GRAD_DTYPE) * dz_eps
        if GKL_MODE != OFF:
            if GKL_MODE == ELEMENTWISE:
                gkl = _load(gkl_ptr + off, mask, MASKED).to(GRAD_DTYPE)
            elif GKL_MODE == PER_SAMPLE:
                gkl = tl.load(gkl_ptr + n * gkl_sn).to(GRAD_DTYPE)
            diff = _load(mu_ptr + off, mask, MASKED).to(GRAD_DTYPE)
            d = lv.to(GRAD_DTYPE)
            if HAS_PMU:
                diff = diff - _load(pmu_ptr + off, mask, MASKED).to(GRAD_DTYPE)
            if HAS_PLV:
                plv = _load(plv_ptr + off, mask, MASKED).to(GRAD_DTYPE)
                d = d - plv
            # e^lv = sd^2 where the noise path has sd
            weighted, em1 = _common.kl_gradient_terms(
                diff, d, plv if HAS_PLV else None, sd if HAS_DZ and GRAD_DTYPE == SAMPLE_DTYPE else None,
                GRAD_DTYPE == tl.float64, FAST, COARSE)
            dmu += gkl * weighted
            dlv += gkl * (0.5 * em1)
            if WRITE_DPMU:  # dkl/dmu_p = -dkl/dmu
                _store(dpmu_ptr + off, _common.to_element(-gkl * weighted, dpmu_ptr), mask, MASKED)
            if WRITE_DPLV:  # dkl/dlv_p = (1 - e^d - (mu - mu_p)^2 e^{-lv_p}) / 2
                _store(dplv_ptr + off, _common.to_element(-0.5 * gkl * (em1 + weighted * diff), dplv_ptr), mask,
                       MASKED)
        if WRITE_DMU:
            _store(dmu_ptr + off, _common.to_element(dmu, dmu_ptr), mask, MASKED)
        if WRITE_DLV:
            _store(dlv_ptr + off, _common.to_element(dlv, dlv_ptr), mask, MASKED)


# --------------------------------------------------------------------------------------------- #
# The host side: is this a batched transpose, the tiling                                       #
# --------------------------------------------------------------------------------------------- #


class Layout(NamedTuple):
    """``mu`` as ``N`` rows (dim 0) of ``M`` contiguous ``(P, Q)`` blocks whose logical order is ``(Q, P)``.

    ``rows_are_dim0``: False when dim 0 is not the outer factor of ``R = N M`` (a 2-D transpose): then
    ``N == M == 1`` and only ``"none"`` / ``"sum"`` are taken.
    """

    N: int
    M: int
    P: int
    Q: int
    rows_are_dim0: bool


@functools.lru_cache(maxsize=1024)
def batched_transpose(shape: tuple[int, ...], strides: tuple[int, ...]) -> Layout | None:
    """The :class:`Layout` of a tensor of ``shape`` and ``strides``, or None when it is not a batched transpose.

    Example: ``batched_transpose((2, 16, 8, 8), (1024, 1, 128, 16))`` (channels-last) gives
    ``Layout(N=2, M=1, P=64, Q=16, rows_are_dim0=True)``.
    """
    if not shape or math.prod(shape) == 0:
        return None
    merged = _common.merge_dims([(size, (stride,)) for size, stride in zip(shape, strides)])
    dims = [(size, stride) for size, (stride,) in merged]
    if len(dims) == 2:
        dims = [(1, 0), *dims]
    if len(dims) != 3:
        return None
    (R, r_st), (Q, q_st), (P, p_st) = dims
    if q_st != 1 or p_st != Q or (R > 1 and r_st != P * Q):
        return None
    if shape[0] == 1:
        return Layout(1, R, P, Q, True)
    if R % shape[0] == 0 and R > 1:  # dim 0 (size > 1) is the first merged dim, so it is R's outer factor
        return Layout(shape[0], R // shape[0], P, Q, True)
    return Layout(1, 1, P, Q, False)


class Tiling(NamedTuple):
    block_p: int
    block_q: int
    row_steps: int
    n_pb: int
    n_qb: int
    n_row_chunks: int
    grid: tuple[int, int]  # (column tiles, row chunks)
    num_warps: int

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1]


def tiling(layout: Layout, device: torch.device) -> Tiling:
    """``[BLOCK_P, BLOCK_Q]`` tiles of ~1024 elements (4096 under the interpreter), ``row_steps`` rows a program."""
    if TILING_OVERRIDE is not None:
        return _tiling(layout, False, 0, tuple(TILING_OVERRIDE))
    return _tiling(layout, device.type == "cuda", _common.target_programs(device), None)


@functools.lru_cache(maxsize=1024)
def _tiling(layout: Layout, cuda: bool, target: int, override: tuple[int, int, int] | None) -> Tiling:
    N, M, P, Q, _ = layout
    if override is not None:
        block_p, block_q, row_steps = override
    else:
        tile = 1024 if cuda else 4096
        block_q = min(triton.next_power_of_2(Q), MAX_BLOCK_Q)
        block_p = min(max(tile // block_q, 4), triton.next_power_of_2(P))
        col_tiles = M * triton.cdiv(P, block_p) * triton.cdiv(Q, block_q)
        row_steps = max(1, min(N, 32, N * col_tiles // max(target, 1)))
    n_pb, n_qb = triton.cdiv(P, block_p), triton.cdiv(Q, block_q)
    n_row_chunks = triton.cdiv(N, row_steps)
    return Tiling(block_p, block_q, row_steps, n_pb, n_qb, n_row_chunks, (M * n_pb * n_qb, n_row_chunks),
                  8 if block_p * block_q >= 4096 else 4)


def _same_layout(t: torch.Tensor | None, mu: torch.Tensor) -> bool:
    return t is None or (t.shape == mu.shape and t.stride() == mu.stride())


def _plan(mu, operands, reduction):
    """``(layout, tiling)`` when every operand is in mu's batched-transpose layout, else None."""
    if mu.numel() == 0 or not all(_same_layout(t, mu) for t in operands):
        return None
    layout = batched_transpose(tuple(mu.shape), mu.stride())
    if layout is None or (not layout.rows_are_dim0 and reduction in ("per_sample", "per_dim")):
        return None
    tile = tiling(layout, mu.device)
    if tile.grid[1] > MAX_GRID_Y:
        return None
    return layout, tile


def _common_args(layout: Layout, numel: int, n_samples: int):
    N, M, P, Q, _ = layout
    return (N, M, P, P * Q, M * P * Q, numel, n_samples)


def _whole_blocks(layout: Layout, tile: Tiling, aligned: bool) -> bool:
    """Whether every q-run of a tile starts a Philox block (``P``, ``BLOCK_P`` and the key's offset multiples of 4)."""
    return layout.P % 4 == 0 and tile.block_p % 4 == 0 and aligned


def _row_view_draws_better(mu: torch.Tensor, layout: Layout, tile: Tiling, aligned: bool) -> bool:
    """Whether to leave the noise to the row-view kernels: this path would draw it element by element (4 Philox
    calls for 4 normals: ``P`` not a multiple of 4) where they draw whole blocks (rows of a multiple of 4).

    sm_90, bfloat16 (256, 16, 63, 63) channels-last, sample K=1 forward: 77.7 SASS instructions per element here
    against 52.5 there (the gathered loads cost less than three more Philox calls per element).
    """
    return not _whole_blocks(layout, tile, aligned) and aligned and (mu.numel() // mu.shape[0]) % 4 == 0


def _masked(layout: Layout, tile: Tiling) -> bool:
    return layout.P % tile.block_p != 0 or layout.Q % tile.block_q != 0


def _per_dim_result(partials: torch.Tensor, layout: Layout, shape: torch.Size) -> torch.Tensor:
    """The fixed-order sum of memory-order per-column partials, back in the logical order of ``shape[1:]``."""
    _, M, P, Q, _ = layout
    return partials.sum(dim=0).reshape(M, P, Q).transpose(1, 2).contiguous().reshape(shape[1:])


# --------------------------------------------------------------------------------------------- #
# Launchers                                                                                     #
# --------------------------------------------------------------------------------------------- #


def forward(mu, logvar, prior_mu, prior_logvar, *, n_samples, key, aligned, sample, kl, reduction):
    """``(z, kl)`` as :func:`.sample_kl.sample_kl_forward`, or None when the layout is not one this path tiles.

    ``mu``, ``logvar`` (and full-size priors) of shape ``S`` share one batched-transpose layout (any float dtype);
    z: ``(n_samples, *S)``, each sample in mu's layout; the KL elementwise in mu's layout or reduced. Example::

        >>> mu = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)  # doctest: +SKIP
        >>> z, kl = forward(mu, mu.clone(), None, None, n_samples=1, key=key, aligned=True, sample=True,
        ...                 kl=True, reduction="sum")  # doctest: +SKIP
    """
    if not sample and not kl:
        return None
    if not kl:
        prior_mu = prior_logvar = None
    plan = _plan(mu, (logvar, prior_mu, prior_logvar), reduction if kl else "none")
    if plan is None:
        return None
    layout, tile = plan
    device, shape, numel = mu.device, mu.shape, mu.numel()
    if sample and n_samples > 1 and tile.programs < _common.target_programs(device):
        return None  # the row-view launcher draws such samples as rows across programs
    if sample and _row_view_draws_better(mu, layout, tile, aligned):
        return None
    kl_mode = _common.REDUCTION_MODE[reduction] if kl else OFF
    kl_dtype = compute_dtype(mu, logvar, prior_mu, prior_logvar)
    strides = mu.stride()
    z = None
    if sample:
        z = _common.empty((n_samples, *shape), result_dtype(mu, logvar), device, (numel, *strides))
    buffer = None
    if kl_mode == ELEMENTWISE:
        buffer = _common.empty(shape, result_dtype(mu, logvar, prior_mu, prior_logvar), device, strides)
    elif kl_mode == SUM:
        buffer = _common.empty((tile.programs,), kl_dtype, device)
    elif kl_mode == PER_SAMPLE:
        buffer = _common.empty((tile.grid[0], layout.N), kl_dtype, device)
    elif kl_mode == PER_DIM:
        buffer = _common.empty((tile.n_row_chunks, layout.M * layout.P * layout.Q), kl_dtype, device)
    _sample_kl_t_forward_kernel[tile.grid](
        mu, logvar, prior_mu, prior_logvar, z, buffer, *_common_args(layout, numel, n_samples), key,
        tile.n_qb, tile.row_steps,
        Q=layout.Q, SAMPLE=bool(sample), WHOLE_BLOCKS=_whole_blocks(layout, tile, aligned), KL_MODE=kl_mode,
        HAS_PMU=prior_mu is not None, HAS_PLV=prior_logvar is not None,
        SAMPLE_DTYPE=_common.tl_dtype(compute_dtype(mu, logvar)), KL_DTYPE=_common.tl_dtype(kl_dtype),
        FAST=fastmath.is_fast(mu), COARSE=_common.coarse_exp(result_dtype(mu, logvar, prior_mu, prior_logvar)),
        MASKED=_masked(layout, tile), BLOCK_P=tile.block_p, BLOCK_Q=tile.block_q,
        num_warps=tile.num_warps,
    )
    if kl_mode in (OFF, ELEMENTWISE):
        return z, buffer
    if kl_mode == SUM:
        return z, buffer.sum()
    if kl_mode == PER_SAMPLE:
        return z, buffer.sum(dim=0).reshape(shape[:1])
    return z, _per_dim_result(buffer, layout, shape)


def _kl_grad(grad_kl: torch.Tensor, reduction: str, mu: torch.Tensor, layout: Layout):
    """``(GKL_MODE, tensor, row stride)`` for the KL's incoming gradient, or None where this path declines."""
    if reduction == "sum" or (reduction == "none" and grad_kl.dim() and all(s == 0 for s in grad_kl.stride())):
        return SUM, grad_kl.reshape(()) if grad_kl.dim() == 0 else grad_kl, 0  # one value (kl.sum()'s expand too)
    if reduction == "none":
        return (ELEMENTWISE, grad_kl, 0) if _same_layout(grad_kl, mu) else None
    if reduction == "per_sample":
        return PER_SAMPLE, grad_kl, grad_kl.stride(0)
    _, M, P, Q, _ = layout  # per_dim: (M, Q, P) in logical order, to memory order once (1/N of the data)
    return PER_DIM, grad_kl.reshape(M, Q, P).transpose(1, 2).contiguous(), 0


def backward(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, *, n_samples, key, aligned, reduction, needs):
    """The four gradients as :func:`.sample_kl.sample_kl_backward`, or None when the layout is not one this path tiles.

    ``grad_z``: ``(n_samples, *S)`` (or None), each sample in mu's layout; ``grad_kl`` as the forward's KL (or None).
    Returns ``(dmu, dlogvar, dprior_mu, dprior_logvar)`` in mu's layout, None where not needed. Example::

        >>> dmu, dlv, _, _ = backward(gz, None, mu, lv, None, None, n_samples=1, key=key, aligned=True,
        ...                           reduction="sum", needs=(True, True, False, False))  # doctest: +SKIP
    """
    need_mu, need_lv, need_pmu, need_plv = needs
    if grad_kl is None:
        prior_mu = prior_logvar = None
    need_pmu = need_pmu and prior_mu is not None
    need_plv = need_plv and prior_logvar is not None
    if (grad_z is None and grad_kl is None) or not (need_mu or need_lv or need_pmu or need_plv):
        return None
    dz_elem = None
    if grad_z is not None:
        if grad_z.numel() != n_samples * mu.numel():
            return None
        grad_z = grad_z.reshape(n_samples, *mu.shape)
        dz_elem = grad_z.select(0, 0)
    plan = _plan(mu, (logvar, prior_mu, prior_logvar, dz_elem), reduction)
    if plan is None:
        return None
    layout, tile = plan
    device, shape, numel = mu.device, mu.shape, mu.numel()
    if grad_z is not None and n_samples >= _common.SPREAD_MIN_SAMPLES and tile.programs < _common.target_programs(device):
        return None  # the row-view launcher spreads the samples across programs
    if grad_z is not None and _row_view_draws_better(mu, layout, tile, aligned):
        return None
    gkl_mode, gkl, gkl_sn = OFF, None, 0
    if grad_kl is not None:
        got = _kl_grad(grad_kl, reduction, mu, layout)
        if got is None:
            return None
        gkl_mode, gkl, gkl_sn = got
    sample_dtype = compute_dtype(mu, logvar)
    grad_dtype = compute_dtype(mu, logvar, prior_mu, prior_logvar) if grad_kl is not None else sample_dtype
    # as the row-view launcher: every gradient is in its input's dtype, so 16-bit inputs only give 16-bit gradients
    coarse = _common.coarse_exp(*(t.dtype for t in (mu, logvar, prior_mu, prior_logvar) if t is not None))
    strides = mu.stride()
    dmu = _common.empty(shape, mu.dtype, device, strides) if need_mu else None
    dlv = _common.empty(shape, logvar.dtype, device, strides) if need_lv else None
    dpmu = _common.empty(shape, prior_mu.dtype, device, strides) if need_pmu else None
    dplv = _common.empty(shape, prior_logvar.dtype, device, strides) if need_plv else None
    _sample_kl_t_backward_kernel[tile.grid](
        mu, logvar, prior_mu, prior_logvar, grad_z, gkl, dmu, dlv, dpmu, dplv,
        *_common_args(layout, numel, n_samples), grad_z.stride(0) if grad_z is not None else 0, gkl_sn, key,
        tile.n_qb, tile.row_steps,
        Q=layout.Q, WHOLE_BLOCKS=_whole_blocks(layout, tile, aligned), HAS_DZ=grad_z is not None,
        GKL_MODE=gkl_mode, HAS_PMU=prior_mu is not None, HAS_PLV=prior_logvar is not None,
        WRITE_DMU=need_mu, WRITE_DLV=need_lv, WRITE_DPMU=need_pmu, WRITE_DPLV=need_plv,
        SAMPLE_DTYPE=_common.tl_dtype(sample_dtype), GRAD_DTYPE=_common.tl_dtype(grad_dtype),
        FAST=fastmath.is_fast(mu), COARSE=coarse, MASKED=_masked(layout, tile), BLOCK_P=tile.block_p,
        BLOCK_Q=tile.block_q, num_warps=tile.num_warps,
    )
    return dmu, dlv, dpmu, dplv
