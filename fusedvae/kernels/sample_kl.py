"""Fused reparameterized sampling + Gaussian KL: Triton kernels, launchers, and their custom ops with autograd.

Implements the backend entry point :func:`rsample_kl` with the semantics of
:func:`fusedvae.reference.sampling.rsample_kl`:

- ``z = mu + exp(lv / 2) * eps`` for ``n_samples`` draws, shape ``(n_samples, *mu.shape)``, in the
  promoted dtype of ``mu`` and ``logvar``; ``eps`` is Philox noise keyed by ``(seed, offset + k *
  mu.numel() + i)`` for sample ``k`` and row-major element ``i`` (see :mod:`.philox`);
- ``KL(N(mu, e^lv) || N(mu_p, e^lv_p))`` per element, ``0.5 * (g(d) + (mu - mu_p)^2 e^{-lv_p})`` with
  ``d = lv - lv_p`` and ``g(d) = e^d - 1 - d`` from its Taylor series for ``|d| < 0.5`` (no
  cancellation, no libdevice ``expm1``: the interpreter has none), reduced by ``"none"`` (result
  dtype of all four inputs), ``"sum"``, ``"per_sample"`` or ``"per_dim"`` (compute dtype).

Layout. The kernels see ``mu``'s shape as ``(B, N)``: rows are dim 0, columns the row-major flattening
of the other dims. A program owns one block of ``BLOCK_N`` columns and a chunk of ``row_steps *
BLOCK_B`` rows, walked ``BLOCK_B`` rows at a time. Every input is read through its own strides over
``mu``'s shape (after merging the dims that are contiguous for every input, at most three column
dims), so transposed inputs and broadcast priors (stride 0) are neither copied nor materialised; only
a layout needing more than three column dims after merging falls back to contiguous copies.
Outputs (z, the elementwise KL, gradients) are written contiguous.

Bytes moved, with ``E = mu.numel()``, ``K = n_samples``, ``s`` the element size, a broadcast prior
counted as ~0 (it stays in cache), float32 and the standard prior unless said:

- forward: read mu, lv (``2Es``), write z (``KEs``): ``(2 + K) Es``; full-size priors add ``2Es``;
  the KL adds ``Es`` for ``"none"``, otherwise only its partial sums (``E / (row_steps * BLOCK_B)``
  elements at most). KL-only: ``2Es``. Every input read once, every output written once: the floor.
- backward: read lv, dz (``KEs``), mu (only when the KL gets a gradient), write dmu, dlv:
  ``(4 + K) Es`` (sample only: ``(3 + K) Es``); full-size priors add ``4Es`` (read, and their
  gradients written); ``"none"`` adds ``Es`` for the KL's incoming gradient (for the reductions it is
  a stride-0 view, ~0 bytes). The noise is regenerated (Philox is ~100 integer ops per element, free
  next to the memory traffic), never stored: eager PyTorch writes eps and reads it back (``2KEs`` more).

Prior gradients are reduced to the prior's shape without float atomics (deterministic). A full-size
prior gets its gradient written elementwise. A prior broadcast along rows (``(D,)``, ``(1, D)``),
along columns (``(B, 1)``) or everywhere (a scalar) gets per-program partial sums in the same
``"per_dim"``/``"per_sample"``/``"sum"`` partial buffers the KL uses: at most ``E / (row_steps *
BLOCK_B)`` elements, a few percent of E. Writing a full-size gradient and summing it in torch instead
would cost ``2 x 2Es`` (written, then read) per prior: for K = 1 that is 80% on top of the ``5Es``
backward floor, so the partials win. Any other broadcast (``(C, 1, 1)`` over ``(B, C, H, W)``, say)
does write a full-size gradient (in the compute dtype) that torch sums to the prior's shape: rare
priors, one kernel.

Determinism: partial sums land in fixed slots, and their final sum is a torch reduction over a fixed
buffer; two runs are bitwise equal. Index math is int64 wherever it can exceed 2^31.

float16/bfloat16 inputs compute in float32; float64 inputs compute in float64 (Triton does float64
loads and math natively). The sample's compute dtype follows ``(mu, lv)`` and the KL's all four
inputs, exactly as the reference.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..precision import compute_dtype, result_dtype
from . import _custom_op
from .philox import philox_normal_block

# What a kernel does with a per-element quantity (the KL, a prior's gradient): nothing, store it
# elementwise, or accumulate per-program partial sums over everything / over rows / over columns.
_OFF = tl.constexpr(0)
_ELEMENTWISE = tl.constexpr(1)
_SUM = tl.constexpr(2)
_PER_DIM = tl.constexpr(3)
_PER_SAMPLE = tl.constexpr(4)
# A prior broadcast in a pattern the partial sums do not cover: full-size gradient, summed by torch.
_BROADCAST = 5

_REDUCTION_MODE = {"none": 1, "sum": 2, "per_dim": 3, "per_sample": 4}

#: Below this |d| the Taylor series replaces exp(d) - 1 - d (as fusedvae.reference.kl).
SERIES_CUTOFF = tl.constexpr(0.5)

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


# ---------------------------------------------------------------------------------------------
# Triton helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _column_offsets(cols, D2, D3, s1, s2, s3, INNER_RANK: tl.constexpr):
    """Element offsets of columns ``cols`` (flat row-major index over dims ``(D1, D2, D3)``) for strides ``s1..s3``."""
    if INNER_RANK == 1:
        off = cols * s3
    elif INNER_RANK == 2:
        off = (cols // D3) * s2 + (cols % D3) * s3
    else:
        outer = cols // D3
        off = (outer // D2) * s1 + (outer % D2) * s2 + (cols % D3) * s3
    return off


@triton.jit
def _exp_minus_one_minus_x(d):
    """``(g, em1)`` with ``g = e^d - 1 - d`` and ``em1 = e^d - 1``, accurate for every ``d``.

    For ``|d| < 0.5`` Horner's rule on ``d^2 (1/2! + d/3! + ... + d^15/17!)`` (truncation < 1e-20
    relative: float64 too is exact to a few ulps; the reference uses the same terms) and
    ``em1 = d + g``; elsewhere ``e^d - 1`` cancels by at most ~5x, a few ulps.
    """
    small = tl.abs(d) < SERIES_CUTOFF
    ds = tl.where(small, d, 0.0)
    series = ds * 2.8114572543455206e-15 + 4.779477332387385e-14  # 1/17!, 1/16!
    series = series * ds + 7.647163731819816e-13  # 1/15!
    series = series * ds + 1.1470745597729725e-11  # 1/14!
    series = series * ds + 1.6059043836821613e-10  # 1/13!
    series = series * ds + 2.08767569878681e-09  # 1/12!
    series = series * ds + 2.505210838544172e-08  # 1/11!
    series = series * ds + 2.755731922398589e-07  # 1/10!
    series = series * ds + 2.7557319223985893e-06  # 1/9!
    series = series * ds + 2.48015873015873e-05  # 1/8!
    series = series * ds + 0.0001984126984126984  # 1/7!
    series = series * ds + 0.001388888888888889  # 1/6!
    series = series * ds + 0.008333333333333333  # 1/5!
    series = series * ds + 0.041666666666666664  # 1/4!
    series = series * ds + 0.16666666666666666  # 1/3!
    series = series * ds + 0.5  # 1/2!
    series = series * ds * ds
    em1_big = tl.exp(d) - 1.0
    g = tl.where(small, series, em1_big - d)
    em1 = tl.where(small, ds + series, em1_big)
    return g, em1


@triton.jit
def _load_tile(ptr, rows, col_off, s0, mask, DTYPE: tl.constexpr):
    return tl.load(ptr + rows[:, None] * s0 + col_off[None, :], mask=mask, other=0.0).to(DTYPE)


@triton.jit
def _emit_step(value, acc, ptr, flat, mask, rows, row_mask, pid_n, B, MODE: tl.constexpr):
    """Per row step: store ``value`` elementwise, store its row sums, or add its column sums to ``acc``."""
    if MODE == _ELEMENTWISE:
        tl.store(ptr + flat, value.to(ptr.dtype.element_ty), mask=mask)
    elif MODE == _PER_SAMPLE:
        tl.store(ptr + pid_n * B + rows, tl.sum(tl.where(mask, value, 0.0), axis=1), mask=row_mask)
    elif MODE != _OFF:
        acc += tl.sum(tl.where(mask, value, 0.0), axis=0)
    return acc


@triton.jit
def _emit_finish(acc, ptr, cols, col_mask, pid_n, pid_b, N, n_col_blocks, MODE: tl.constexpr):
    """After the row loop: the program's per-column (``"per_dim"``) or total (``"sum"``) partial sum."""
    if MODE == _PER_DIM:
        tl.store(ptr + pid_b * N + cols, acc, mask=col_mask)
    elif MODE == _SUM:
        tl.store(ptr + pid_b * n_col_blocks + pid_n, tl.sum(acc, axis=0))


@triton.jit
def _program_tile(N, n_col_blocks, row_steps, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pid_n = pid % n_col_blocks
    pid_b = pid // n_col_blocks
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row0 = pid_b * row_steps * BLOCK_B
    return pid_n, pid_b, cols, cols < N, row0


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed", "offset"])
def _sample_kl_forward_kernel(
    mu_ptr, lv_ptr, pmu_ptr, plv_ptr,  # inputs; the prior pointers are None when absent
    z_ptr,  # (n_samples, B, N) contiguous, or None
    kl_ptr,  # (B, N) contiguous for "none", else the partial-sum buffer; or None
    mu_s0, mu_s1, mu_s2, mu_s3,
    lv_s0, lv_s1, lv_s2, lv_s3,
    pmu_s0, pmu_s1, pmu_s2, pmu_s3,
    plv_s0, plv_s1, plv_s2, plv_s3,
    B, N, D2, D3, numel, n_samples,
    seed: tl.int64, offset: tl.int64,
    n_col_blocks, row_steps,
    SAMPLE: tl.constexpr, KL_MODE: tl.constexpr, HAS_PMU: tl.constexpr, HAS_PLV: tl.constexpr,
    INNER_RANK: tl.constexpr, SAMPLE_DTYPE: tl.constexpr, KL_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n, pid_b, cols, col_mask, row0 = _program_tile(N, n_col_blocks, row_steps, BLOCK_B, BLOCK_N)
    mu_col = _column_offsets(cols, D2, D3, mu_s1, mu_s2, mu_s3, INNER_RANK)
    lv_col = _column_offsets(cols, D2, D3, lv_s1, lv_s2, lv_s3, INNER_RANK)
    if HAS_PMU:
        pmu_col = _column_offsets(cols, D2, D3, pmu_s1, pmu_s2, pmu_s3, INNER_RANK)
    if HAS_PLV:
        plv_col = _column_offsets(cols, D2, D3, plv_s1, plv_s2, plv_s3, INNER_RANK)
    acc = tl.zeros([BLOCK_N], dtype=KL_DTYPE)
    for step in range(0, row_steps):
        rows = row0 + step * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
        row_mask = rows < B
        mask = row_mask[:, None] & col_mask[None, :]
        flat = rows[:, None] * N + cols[None, :]  # the logical (row-major) element index
        mu = tl.load(mu_ptr + rows[:, None] * mu_s0 + mu_col[None, :], mask=mask, other=0.0)
        lv = tl.load(lv_ptr + rows[:, None] * lv_s0 + lv_col[None, :], mask=mask, other=0.0)
        if SAMPLE:
            mu_s = mu.to(SAMPLE_DTYPE)
            sd = tl.exp(0.5 * lv.to(SAMPLE_DTYPE))
            index = flat
            for _ in range(0, n_samples):
                eps = philox_normal_block(seed, offset + index, SAMPLE_DTYPE)
                z = mu_s + sd * eps
                tl.store(z_ptr + index, z.to(z_ptr.dtype.element_ty), mask=mask)
                index += numel
        if KL_MODE != _OFF:
            diff = mu.to(KL_DTYPE)
            d = lv.to(KL_DTYPE)
            if HAS_PMU:
                diff = diff - _load_tile(pmu_ptr, rows, pmu_col, pmu_s0, mask, KL_DTYPE)
            maha = diff * diff
            if HAS_PLV:
                plv = _load_tile(plv_ptr, rows, plv_col, plv_s0, mask, KL_DTYPE)
                d = d - plv
                maha = maha * tl.exp(-plv)
            g, _ = _exp_minus_one_minus_x(d)
            kl = 0.5 * (g + maha)
            acc = _emit_step(kl, acc, kl_ptr, flat, mask, rows, row_mask, pid_n, B, KL_MODE)
    _emit_finish(acc, kl_ptr, cols, col_mask, pid_n, pid_b, N, n_col_blocks, KL_MODE)


@triton.jit(do_not_specialize=["seed", "offset"])
def _sample_kl_backward_kernel(
    mu_ptr, lv_ptr, pmu_ptr, plv_ptr,  # saved inputs (prior pointers None when absent)
    dz_ptr,  # incoming gradient of z, strided over (n_samples, *mu.shape); None when z got none
    gkl_ptr,  # incoming gradient of the KL viewed (stride 0 where reduced) over mu's shape; or None
    dmu_ptr, dlv_ptr,  # (B, N) contiguous, or None when not needed
    dpmu_ptr, dplv_ptr,  # elementwise (B, N) or partial buffers, or None
    mu_s0, mu_s1, mu_s2, mu_s3,
    lv_s0, lv_s1, lv_s2, lv_s3,
    pmu_s0, pmu_s1, pmu_s2, pmu_s3,
    plv_s0, plv_s1, plv_s2, plv_s3,
    dz_sk, dz_s0, dz_s1, dz_s2, dz_s3,
    gkl_s0, gkl_s1, gkl_s2, gkl_s3,
    B, N, D2, D3, numel, n_samples,
    seed: tl.int64, offset: tl.int64,
    n_col_blocks, row_steps,
    HAS_DZ: tl.constexpr, HAS_GKL: tl.constexpr, HAS_PMU: tl.constexpr, HAS_PLV: tl.constexpr,
    WRITE_DMU: tl.constexpr, WRITE_DLV: tl.constexpr, PMU_MODE: tl.constexpr, PLV_MODE: tl.constexpr,
    INNER_RANK: tl.constexpr, SAMPLE_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n, pid_b, cols, col_mask, row0 = _program_tile(N, n_col_blocks, row_steps, BLOCK_B, BLOCK_N)
    lv_col = _column_offsets(cols, D2, D3, lv_s1, lv_s2, lv_s3, INNER_RANK)
    if HAS_GKL:
        mu_col = _column_offsets(cols, D2, D3, mu_s1, mu_s2, mu_s3, INNER_RANK)
        gkl_col = _column_offsets(cols, D2, D3, gkl_s1, gkl_s2, gkl_s3, INNER_RANK)
        if HAS_PMU:
            pmu_col = _column_offsets(cols, D2, D3, pmu_s1, pmu_s2, pmu_s3, INNER_RANK)
        if HAS_PLV:
            plv_col = _column_offsets(cols, D2, D3, plv_s1, plv_s2, plv_s3, INNER_RANK)
    if HAS_DZ:
        dz_col = _column_offsets(cols, D2, D3, dz_s1, dz_s2, dz_s3, INNER_RANK)
    acc_pmu = tl.zeros([BLOCK_N], dtype=GRAD_DTYPE)
    acc_plv = tl.zeros([BLOCK_N], dtype=GRAD_DTYPE)
    for step in range(0, row_steps):
        rows = row0 + step * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
        row_mask = rows < B
        mask = row_mask[:, None] & col_mask[None, :]
        flat = rows[:, None] * N + cols[None, :]
        lv = tl.load(lv_ptr + rows[:, None] * lv_s0 + lv_col[None, :], mask=mask, other=0.0)
        dmu = tl.zeros([BLOCK_B, BLOCK_N], dtype=GRAD_DTYPE)
        dlv = tl.zeros([BLOCK_B, BLOCK_N], dtype=GRAD_DTYPE)
        if HAS_DZ:
            # dz/dmu = 1, dz/dlv = exp(lv/2) eps / 2, summed over the samples; eps regenerated.
            sd = tl.exp(0.5 * lv.to(SAMPLE_DTYPE))
            dz_base = dz_ptr + rows[:, None] * dz_s0 + dz_col[None, :]
            dz_eps = tl.zeros([BLOCK_B, BLOCK_N], dtype=GRAD_DTYPE)
            index = flat
            for k in range(0, n_samples):
                dz = tl.load(dz_base, mask=mask, other=0.0).to(GRAD_DTYPE)
                eps = philox_normal_block(seed, offset + index, SAMPLE_DTYPE)
                dmu += dz
                dz_eps += dz * eps.to(GRAD_DTYPE)
                index += numel
                dz_base += dz_sk
            dlv += (0.5 * sd).to(GRAD_DTYPE) * dz_eps
        if HAS_GKL:
            gkl = _load_tile(gkl_ptr, rows, gkl_col, gkl_s0, mask, GRAD_DTYPE)
            diff = _load_tile(mu_ptr, rows, mu_col, mu_s0, mask, GRAD_DTYPE)
            d = lv.to(GRAD_DTYPE)
            if HAS_PMU:
                diff = diff - _load_tile(pmu_ptr, rows, pmu_col, pmu_s0, mask, GRAD_DTYPE)
            if HAS_PLV:
                plv = _load_tile(plv_ptr, rows, plv_col, plv_s0, mask, GRAD_DTYPE)
                d = d - plv
                weighted = diff * tl.exp(-plv)  # dkl/dmu = (mu - mu_p) exp(-lv_p)
            else:
                weighted = diff
            _, em1 = _exp_minus_one_minus_x(d)  # dkl/dlv = (e^d - 1) / 2
            dmu += gkl * weighted
            dlv += gkl * (0.5 * em1)
            if PMU_MODE != _OFF:  # dkl/dmu_p = -dkl/dmu
                acc_pmu = _emit_step(-gkl * weighted, acc_pmu, dpmu_ptr, flat, mask, rows, row_mask,
                                     pid_n, B, PMU_MODE)
            if PLV_MODE != _OFF:  # dkl/dlv_p = (1 - e^d - (mu - mu_p)^2 e^{-lv_p}) / 2
                acc_plv = _emit_step(-0.5 * gkl * (em1 + weighted * diff), acc_plv, dplv_ptr, flat, mask,
                                     rows, row_mask, pid_n, B, PLV_MODE)
        if WRITE_DMU:
            tl.store(dmu_ptr + flat, dmu.to(dmu_ptr.dtype.element_ty), mask=mask)
        if WRITE_DLV:
            tl.store(dlv_ptr + flat, dlv.to(dlv_ptr.dtype.element_ty), mask=mask)
    if HAS_GKL:
        _emit_finish(acc_pmu, dpmu_ptr, cols, col_mask, pid_n, pid_b, N, n_col_blocks, PMU_MODE)
        _emit_finish(acc_plv, dplv_ptr, cols, col_mask, pid_n, pid_b, N, n_col_blocks, PLV_MODE)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

#: Tests set ``(BLOCK_B, BLOCK_N, row_steps)`` here to force many small programs (forward and
#: backward may be given different tilings: the noise is keyed by the logical index).
TILING_OVERRIDE: tuple[int, int, int] | None = None


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and partial buffer the kernels write (tests replace it with a NaN fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class _Tiling:
    block_b: int
    block_n: int
    row_steps: int
    n_col_blocks: int
    n_row_chunks: int
    num_warps: int

    @property
    def grid(self) -> tuple[int]:
        return (self.n_col_blocks * self.n_row_chunks,)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tiling(rows: int, cols: int, device: torch.device) -> _Tiling:
    if TILING_OVERRIDE is not None:
        block_b, block_n, row_steps = TILING_OVERRIDE
    else:
        # The interpreter pays per program and per op, not per element: big tiles, one program per
        # column block. On a GPU, 1024-element tiles and enough programs to fill every SM 4 times over.
        tile = 1024 if device.type == "cuda" else 4096
        block_n = min(triton.next_power_of_2(cols), tile)
        block_b = min(max(1, tile // block_n), triton.next_power_of_2(rows))
        row_blocks = triton.cdiv(rows, block_b)
        if device.type == "cuda":
            target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            row_steps = max(1, min(row_blocks, 32, row_blocks * triton.cdiv(cols, block_n) // target))
        else:
            row_steps = row_blocks
    n_col_blocks = triton.cdiv(cols, block_n)
    n_row_chunks = triton.cdiv(triton.cdiv(rows, block_b), row_steps)
    num_warps = 8 if block_b * block_n >= 4096 else 4
    return _Tiling(block_b, block_n, row_steps, n_col_blocks, n_row_chunks, num_warps)


@dataclass(frozen=True)
class _Layout:
    """``mu``'s shape as rows ``B`` by columns ``N = D1 * D2 * D3`` and every operand's strides over it."""

    rows: int
    cols: int
    d2: int
    d3: int
    inner_rank: int
    strides: tuple[tuple[int, int, int, int], ...]


def _layout(shape: torch.Size, operands: list[torch.Tensor | None]) -> _Layout | None:
    """Merge the column dims that are contiguous for every operand (each already expanded to ``shape``).

    ``None`` when more than three column dims remain: the caller then makes the operands contiguous.
    """
    present = [t.stride() for t in operands if t is not None]
    dims = []  # (size, strides of the present operands), outermost first
    for j in range(1, len(shape)):
        if shape[j] == 1:
            continue
        here = [s[j] for s in present]
        if dims and all(outer == inner * shape[j] for outer, inner in zip(dims[-1][1], here)):
            dims[-1] = (dims[-1][0] * shape[j], here)
        else:
            dims.append((shape[j], here))
    if len(dims) > 3:
        return None
    dims = [(1, [0] * len(present))] * (3 - len(dims)) + dims
    inner_rank = max(1, sum(1 for size, _ in dims if size != 1))
    row_strides = [s[0] if shape[0] != 1 else 0 for s in present]
    per_operand = iter(zip(row_strides, dims[0][1], dims[1][1], dims[2][1]))
    strides = tuple(next(per_operand) if t is not None else (0, 0, 0, 0) for t in operands)
    cols = dims[0][0] * dims[1][0] * dims[2][0]
    return _Layout(shape[0], cols, dims[1][0], dims[2][0], inner_rank, strides)


def _strided_layout(shape: torch.Size, operands: list[torch.Tensor | None]):
    """The layout and the operands to pass; contiguous copies only where strides cannot express it."""
    layout = _layout(shape, operands)
    if layout is None:
        operands = [None if t is None else t.contiguous() for t in operands]
        layout = _layout(shape, operands)
    return layout, operands


def _partial_shape(mode: int, layout: _Layout, tiling: _Tiling) -> tuple[int, int]:
    if mode == 2:  # sum
        return (tiling.n_row_chunks, tiling.n_col_blocks)
    if mode == 3:  # per_dim
        return (tiling.n_row_chunks, layout.cols)
    return (tiling.n_col_blocks, layout.rows)  # per_sample


def _tl_dtype(dtype: torch.dtype):
    return _TL_DTYPE[dtype]


# ---------------------------------------------------------------------------------------------
# Forward and backward launchers
# ---------------------------------------------------------------------------------------------


def sample_kl_forward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None,
    prior_logvar: torch.Tensor | None,
    *,
    n_samples: int,
    seed: int,
    offset: int,
    sample: bool,
    kl: bool,
    reduction: str,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One pass over the inputs: z (when ``sample``) and the KL reduced by ``reduction`` (when ``kl``)."""
    if reduction not in _REDUCTION_MODE:
        raise ValueError(f"reduction must be one of {tuple(_REDUCTION_MODE)}, got {reduction!r}")
    if not kl:
        prior_mu = prior_logvar = None
    shape, device = mu.shape, mu.device
    sample_dtype = compute_dtype(mu, logvar)
    kl_dtype = compute_dtype(mu, logvar, prior_mu, prior_logvar)
    z = _alloc((n_samples, *shape), result_dtype(mu, logvar), device) if sample else None
    kl_mode = _REDUCTION_MODE[reduction] if kl else 0
    numel = mu.numel()

    if numel == 0:
        if not kl:
            return z, None
        if reduction == "none":
            return z, _alloc(shape, result_dtype(mu, logvar, prior_mu, prior_logvar), device)
        reduced_shape = {"sum": (), "per_sample": shape[:1], "per_dim": shape[1:]}[reduction]
        return z, torch.zeros(reduced_shape, dtype=kl_dtype, device=device)

    shape2 = shape if len(shape) else torch.Size([1])
    operands = [None if t is None else t.expand(shape2) for t in (mu, logvar, prior_mu, prior_logvar)]
    layout, operands = _strided_layout(shape2, operands)
    tiling = _tiling(layout.rows, layout.cols, device)

    kl_buffer = None
    if kl_mode == 1:
        kl_buffer = _alloc(shape, result_dtype(mu, logvar, prior_mu, prior_logvar), device)
    elif kl_mode:
        kl_buffer = _alloc(_partial_shape(kl_mode, layout, tiling), kl_dtype, device)

    mu_e, lv_e, pmu_e, plv_e = operands
    _sample_kl_forward_kernel[tiling.grid](
        mu_e, lv_e, pmu_e, plv_e, z, kl_buffer,
        *layout.strides[0], *layout.strides[1], *layout.strides[2], *layout.strides[3],
        layout.rows, layout.cols, layout.d2, layout.d3, numel, n_samples,
        seed, offset,
        tiling.n_col_blocks, tiling.row_steps,
        SAMPLE=bool(sample), KL_MODE=kl_mode, HAS_PMU=pmu_e is not None, HAS_PLV=plv_e is not None,
        INNER_RANK=layout.inner_rank, SAMPLE_DTYPE=_tl_dtype(sample_dtype), KL_DTYPE=_tl_dtype(kl_dtype),
        BLOCK_B=tiling.block_b, BLOCK_N=tiling.block_n, num_warps=tiling.num_warps,
    )
    if kl_mode in (0, 1):
        return z, kl_buffer
    if kl_mode == 2:
        return z, kl_buffer.sum()
    if kl_mode == 3:
        return z, kl_buffer.sum(dim=0).reshape(shape[1:])
    return z, kl_buffer.sum(dim=0).reshape(shape[:1])


def _prior_grad_mode(prior: torch.Tensor, shape2: torch.Size) -> int:
    """How the kernel hands back a prior's gradient (see the module docstring)."""
    rows, numel = shape2[0], math.prod(shape2)
    if prior.numel() == numel:
        return 1  # elementwise, straight into the prior's shape
    if prior.numel() == 1:
        return 2
    strides = prior.expand(shape2).stride()
    if (strides[0] == 0 or rows == 1) and prior.numel() == numel // rows:
        return 3  # varies along the columns only: per_dim partials
    if all(s == 0 or n == 1 for s, n in zip(strides[1:], shape2[1:])) and prior.numel() == rows:
        return 4  # varies along the rows only: per_sample partials
    return _BROADCAST


def _kl_grad_view(grad_kl: torch.Tensor, reduction: str, shape2: torch.Size) -> torch.Tensor:
    """The KL's incoming gradient as a (stride-0 where reduced) view over ``mu``'s shape: no copy."""
    if reduction == "none":
        return grad_kl.reshape(shape2) if grad_kl.dim() == 0 else grad_kl
    if reduction == "per_sample":
        return grad_kl.reshape(shape2[0], *([1] * (len(shape2) - 1))).expand(shape2)
    return grad_kl.expand(shape2)  # "sum": a scalar; "per_dim": shape2[1:], repeated along the rows


def sample_kl_backward(
    grad_z: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None,
    prior_logvar: torch.Tensor | None,
    *,
    n_samples: int,
    seed: int,
    offset: int,
    reduction: str,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """One pass: dmu, dlogvar and the priors' gradients (those ``needs`` asks for), noise regenerated."""
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

    inputs = [None if t is None else t.expand(shape2) for t in (mu, logvar, prior_mu, prior_logvar)]
    dz_sk = 0
    dz_elem = None
    if grad_z is not None:
        grad_z = grad_z.reshape(n_samples, *shape2)
        dz_elem = grad_z.select(0, 0)
    gkl = None if grad_kl is None else _kl_grad_view(grad_kl, reduction, shape2)
    layout, operands = _strided_layout(shape2, [*inputs, dz_elem, gkl])
    if grad_z is not None:
        if operands[4].data_ptr() != dz_elem.data_ptr() or operands[4].stride() != dz_elem.stride():
            grad_z = grad_z.contiguous()  # the rare fallback layout: dz copied along with its first sample
        dz_sk = grad_z.stride(0)
    tiling = _tiling(layout.rows, layout.cols, device)

    dmu = _alloc(shape, mu.dtype, device) if need_mu else None
    dlv = _alloc(shape, logvar.dtype, device) if need_lv else None

    def prior_buffer(prior, needed):
        if not needed:
            return 0, None
        mode = _prior_grad_mode(prior, shape2)
        if mode == 1:
            return mode, _alloc(shape2, prior.dtype, device)
        if mode == _BROADCAST:
            return mode, _alloc(shape2, grad_dtype, device)
        return mode, _alloc(_partial_shape(mode, layout, tiling), grad_dtype, device)

    pmu_mode, dpmu = prior_buffer(prior_mu, need_pmu)
    plv_mode, dplv = prior_buffer(prior_logvar, need_plv)

    mu_e, lv_e, pmu_e, plv_e, _, gkl_e = operands
    _sample_kl_backward_kernel[tiling.grid](
        mu_e, lv_e, pmu_e, plv_e, grad_z, gkl_e,
        dmu, dlv, dpmu, dplv,
        *layout.strides[0], *layout.strides[1], *layout.strides[2], *layout.strides[3],
        dz_sk, *layout.strides[4],
        *layout.strides[5],
        layout.rows, layout.cols, layout.d2, layout.d3, mu.numel(), n_samples,
        seed, offset,
        tiling.n_col_blocks, tiling.row_steps,
        HAS_DZ=grad_z is not None, HAS_GKL=gkl_e is not None, HAS_PMU=pmu_e is not None,
        HAS_PLV=plv_e is not None, WRITE_DMU=need_mu, WRITE_DLV=need_lv,
        PMU_MODE=1 if pmu_mode == _BROADCAST else pmu_mode, PLV_MODE=1 if plv_mode == _BROADCAST else plv_mode,
        INNER_RANK=layout.inner_rank, SAMPLE_DTYPE=_tl_dtype(sample_dtype), GRAD_DTYPE=_tl_dtype(grad_dtype),
        BLOCK_B=tiling.block_b, BLOCK_N=tiling.block_n, num_warps=tiling.num_warps,
    )

    def finish_prior(prior, mode, buffer):
        if prior is None or buffer is None:
            return None
        if mode == 1:
            return buffer.reshape(prior.shape)
        if mode == _BROADCAST:
            return buffer.sum_to_size(prior.shape).to(prior.dtype)
        total = buffer.sum() if mode == 2 else buffer.sum(dim=0)
        return total.reshape(prior.shape).to(prior.dtype)

    return dmu, dlv, finish_prior(prior_mu, pmu_mode, dpmu), finish_prior(prior_logvar, plv_mode, dplv)


# ---------------------------------------------------------------------------------------------
# custom ops and autograd
# ---------------------------------------------------------------------------------------------
#
# Design: the forward and backward launchers are ``torch.library`` custom ops, and
# ``register_autograd`` (setup_context + a backward that calls the backward op) replaces the former
# autograd.Function. The alternative, an autograd.Function around custom-op launchers, also needs
# the two ops, and on top makes Dynamo speculate the Function's forward and backward (ctx
# attributes holding unbacked SymInt seeds, needs_input_grad, set_materialize_grads), whose support
# varies between torch 2.4 and today; with register_autograd the whole thing is one opaque node for
# Dynamo, and AOTAutograd puts the backward op in the backward graph. The context still saves only
# the inputs and the integers (n_samples, seed, offset): nothing of z's size.

_FORWARD_OP = _custom_op.op_name("sample_kl_forward")
_BACKWARD_OP = _custom_op.op_name("sample_kl_backward")


@torch.library.custom_op(
    _FORWARD_OP,
    mutates_args=(),
    schema="(Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, SymInt n_samples, SymInt seed, "
    "SymInt offset, bool sample, bool kl, str reduction) -> (Tensor, Tensor)",
)
def _sample_kl_forward_op(mu, logvar, prior_mu, prior_logvar, n_samples, seed, offset, sample, kl, reduction):
    z, kl_out = sample_kl_forward(
        mu, logvar, prior_mu, prior_logvar,
        n_samples=n_samples, seed=seed, offset=offset, sample=sample, kl=kl, reduction=reduction,
    )
    return (
        _custom_op.absent(mu) if z is None else z,
        _custom_op.absent(mu) if kl_out is None else kl_out,
    )


@_sample_kl_forward_op.register_fake
def _(mu, logvar, prior_mu, prior_logvar, n_samples, seed, offset, sample, kl, reduction):
    if not kl:
        prior_mu = prior_logvar = None
    shape = mu.shape
    z = mu.new_empty((n_samples, *shape), dtype=result_dtype(mu, logvar)) if sample else _custom_op.absent(mu)
    if not kl:
        return z, _custom_op.absent(mu)
    if reduction == "none":
        return z, mu.new_empty(shape, dtype=result_dtype(mu, logvar, prior_mu, prior_logvar))
    reduced_shape = {"sum": (), "per_sample": shape[:1], "per_dim": shape[1:]}[reduction]
    return z, mu.new_empty(reduced_shape, dtype=compute_dtype(mu, logvar, prior_mu, prior_logvar))


def _returned_grads(grad_kl, prior_mu, prior_logvar, needs):
    """Which of (dmu, dlogvar, dprior_mu, dprior_logvar) :func:`sample_kl_backward` returns (the others are None)."""
    need_mu, need_lv, need_pmu, need_plv = needs
    with_kl = grad_kl is not None
    return (
        need_mu, need_lv, need_pmu and with_kl and prior_mu is not None, need_plv and with_kl and prior_logvar is not None
    )


@torch.library.custom_op(
    _BACKWARD_OP,
    mutates_args=(),
    schema="(Tensor? grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, "
    "SymInt n_samples, SymInt seed, SymInt offset, str reduction, bool need_mu, bool need_logvar, "
    "bool need_prior_mu, bool need_prior_logvar) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _sample_kl_backward_op(
    grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, n_samples, seed, offset, reduction,
    need_mu, need_logvar, need_prior_mu, need_prior_logvar,
):
    grads = sample_kl_backward(
        grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar,
        n_samples=n_samples, seed=seed, offset=offset, reduction=reduction,
        needs=(need_mu, need_logvar, need_prior_mu, need_prior_logvar),
    )
    return tuple(
        _custom_op.dense(g) if g is not None else _custom_op.absent(t if t is not None else mu)
        for g, t in zip(grads, (mu, logvar, prior_mu, prior_logvar))
    )


@_sample_kl_backward_op.register_fake
def _(
    grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, n_samples, seed, offset, reduction,
    need_mu, need_logvar, need_prior_mu, need_prior_logvar,
):
    returned = _returned_grads(grad_kl, prior_mu, prior_logvar, (need_mu, need_logvar, need_prior_mu, need_prior_logvar))
    return tuple(
        t.new_empty(t.shape) if r else _custom_op.absent(t if t is not None else mu)
        for r, t in zip(returned, (mu, logvar, prior_mu, prior_logvar))
    )


def _setup_context(ctx, inputs, output):
    mu, logvar, prior_mu, prior_logvar, n_samples, seed, offset, sample, kl, reduction = inputs
    if not kl:
        prior_mu = prior_logvar = None
    ctx.save_for_backward(mu, logvar, prior_mu, prior_logvar)
    ctx.config = (n_samples, seed, offset, sample, kl, reduction)
    z, kl_out = output
    if not sample:
        ctx.mark_non_differentiable(z)
    if not kl:
        ctx.mark_non_differentiable(kl_out)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_z, grad_kl):
    mu, logvar, prior_mu, prior_logvar = ctx.saved_tensors
    n_samples, seed, offset, sample, kl, reduction = ctx.config
    grad_z = grad_z if sample else None
    grad_kl = grad_kl if kl else None
    needs = tuple(ctx.needs_input_grad[:4])
    none = (None,) * 6  # n_samples, seed, offset, sample, kl, reduction
    if (grad_z is None and grad_kl is None) or not any(needs):
        return (None,) * 4 + none
    grads = torch.ops.fusedvae.sample_kl_backward(
        grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, n_samples, seed, offset, reduction, *needs
    )
    returned = _returned_grads(grad_kl, prior_mu, prior_logvar, needs)
    return (*(g if r else None for g, r in zip(grads, returned)), *none)


_sample_kl_forward_op.register_autograd(_backward, setup_context=_setup_context)


def rsample_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None,
    prior_logvar: torch.Tensor | None,
    *,
    n_samples: int,
    seed: int,
    offset: int,
    sample: bool,
    kl: bool,
    reduction: str,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backend entry point: z when ``sample``, the KL reduced by ``reduction`` when ``kl``.

    Same contract as :func:`fusedvae.reference.sampling.rsample_kl`: z has shape ``(n_samples,
    *mu.shape)`` in the promoted dtype of ``mu`` and ``logvar``; the KL is elementwise in the promoted
    dtype of all four inputs for ``"none"``, or ``"sum"`` (0-dim), ``"per_sample"`` (``(B,)``),
    ``"per_dim"`` (``mu.shape[1:]``) in the compute dtype (float32, or float64 for float64 inputs).
    Differentiable in all four tensors; the backward pass regenerates the noise.

    Runs the ``fusedvae::sample_kl_forward`` custom op (``fusedvae::sample_kl_backward`` in
    backward), so ``torch.compile(fullgraph=True)`` sees one opaque node. ``seed`` and ``offset``
    may be Python ints or, under Dynamo, the SymInts of ``draw_seed_offset``: they are passed
    through untouched (``int()`` on an unbacked SymInt would fail to trace).
    """
    if not sample and not kl:
        return None, None
    if reduction not in _REDUCTION_MODE:
        raise ValueError(f"reduction must be one of {tuple(_REDUCTION_MODE)}, got {reduction!r}")
    if not kl:
        prior_mu = prior_logvar = None
    z, kl_out = torch.ops.fusedvae.sample_kl_forward(
        mu, logvar, prior_mu, prior_logvar, int(n_samples), seed, offset, bool(sample), bool(kl), reduction
    )
    return (z if sample else None), (kl_out if kl else None)
