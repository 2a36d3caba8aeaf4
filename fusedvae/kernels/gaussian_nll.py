"""Gaussian NLL kernels: the log-σ form, the SSE behind the optimal σ, and torch's variance form.

Three backend entry points (the interface of :mod:`fusedvae.reference`), each a custom op with
autograd (``torch.library``, see the last section) over one Triton forward kernel and one Triton
backward kernel shared by the three ops (``OP`` is a compile-time switch):

- :func:`gaussian_nll`: ``r^2/2 + s [+ log(2π)/2]``, ``r = (x - m) e^{-s}``, ``s`` broadcast to x;
- :func:`sum_squared_error`: ``Σ (x - m)^2``, global or per sample (all the optimal σ needs);
- :func:`gaussian_nll_var`: ``0.5 (log v + (input - target)^2 / v)``, ``v = max(var, eps)``.

How a broadcast is handled, by strides and never by materialising it
--------------------------------------------------------------------
The "small" operand (``log_sigma`` or ``var``) is expanded to the full shape (stride 0 on its
broadcast dimensions). Every dimension is then *kept* (the small operand varies along it) or
*reduced* (it does not); adjacent dimensions of one kind whose strides agree in every operand are
merged, so each kind ends with at most three dimensions (a per-channel σ on ``(B, C, H, W)`` is
kept ``(C,)`` x reduced ``(B, H*W)``; a scalar σ is reduced ``(N,)``; a per-element σ is kept
``(N,)``). A program owns a block of the innermost kept dimension (plus one index of each outer
kept dimension) and loops over a chunk of the reduced positions in 2-D tiles ``BLOCK_K x BLOCK_R``.
So σ (and ``exp(-σ)``) is loaded and computed once per kept index, never per element; index
division happens per program and per loop iteration, never per element; and the gradient of the
small operand is a per-program sum over the tile's reduced axis, written to a partial buffer
``(n_chunks, K)`` that a fixed-order ``sum(0)`` finishes: deterministic, no atomics, and only as
large as the data itself for a per-element σ (where it *is* the gradient, with one chunk).
``"sum"`` / ``"per_sample"`` write one partial per program (for ``"per_sample"`` dim 0 is pinned
as the outermost kept dimension, so a program never straddles two samples), summed in fixed order.

Bytes moved (N elements of b bytes each; σ small unless per element; P = programs, a few per SM)
------------------------------------------------------------------------------------------------
gaussian_nll       fwd "sum"/"per_sample": read x, m: 2Nb (+ σ); write P partial sums.
                   fwd "none": read 2Nb (+ σ); write N b_out.
                   bwd: read x, m: 2Nb (+ σ; + grad_output N b for "none", one value otherwise);
                   write dm and dx only where each is needed (N b each); dσ as (chunks x σ.numel())
                   partial sums: a few values per σ entry, or N, once, for a per-element σ.
                   Typical VAE step (x data; m and a scalar / per-channel σ learned):
                   2N b forward + 3N b backward = 5N b; with dx too, 6N b.
sum_squared_error  fwd: read 2Nb; write P partials. bwd: read 2Nb, write N b per gradient needed.
gaussian_nll_var   as gaussian_nll with var in σ's place (a target that broadcasts to input gets its
                   gradient through a full-size float buffer summed down: + 2N, only in that case).

Gradient in the forward pass (as fused cross-entropy kernels do) was considered and rejected:
writing dm during the forward costs N b there, then backward must scale it by grad_output (read N,
write N) unless grad_output is exactly 1, so a step moves 2N + N + 2N = 5N b, the same as
recomputing (2N forward, 2N read + N write backward). It saves only when grad_output == 1, and
here it never is on the default path: ``"batchmean"`` / ``"mean"`` divide the backend's sum
(grad_output = 1/B), β-weighting scales it, and checking for 1 costs a host synchronisation. It
would also hold N extra elements from forward to backward, compute gradients the caller may not
want (forward under no_grad), and with ``"none"`` the elementwise grad_output gives 7N b either
way. So the backward recomputes ``r`` from x, m and σ in one pass.

Numerics: compute in float32 (float64 for float64 inputs); half inputs are loaded then upcast.
``exp`` and ``log`` in float32 are computed here (Cody-Waite range reduction and short
polynomials: <= 1 ulp, measured) rather than with ``tl.exp`` / ``tl.log``: on NVIDIA GPUs Triton
lowers float32 ``tl.exp`` to ``ex2.approx`` of ``x * log2(e)``, whose rounded product costs
~|s| x 6e-8 relative (3e-6 at |s| = 50), and these run identically in the interpreter, so the CPU
tests check the GPU's arithmetic. No libdevice (the interpreter has none). Divisions use IEEE
``div_rn``. ``dnll/dm`` is formed as ``-r e^{-s}``, never through ``e^{-2s}`` (which overflows for
s < -44 in float32).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..precision import compute_dtype, result_dtype
from ..reference.gaussian_nll import HALF_LOG_2PI
from . import _custom_op

__all__ = ["gaussian_nll", "gaussian_nll_var", "sum_squared_error"]

OP_NLL = 0  # r^2/2 + s, r = (a - b) exp(-s)
OP_VAR = 1  # 0.5 (log v + (a - b)^2 / v), v = max(var, eps)
OP_SSE = 2  # (a - b)^2

MODE_NONE = 0  # forward writes every element
MODE_PARTIAL = 1  # forward writes one partial sum per program

_INT32_LIMIT = 2**31 - 1  # index math switches to 64 bits when an offset may reach this
_SLOTS = 3  # dimensions of each kind (kept / reduced) a kernel handles after merging
_TILE = 1024  # elements per 2-D tile (BLOCK_K * BLOCK_R)
_NUM_WARPS = 4


# --------------------------------------------------------------------------------------------- #
# Math helpers (float32 exp / log without libdevice, upcast)                                    #
# --------------------------------------------------------------------------------------------- #


@triton.jit
def _upcast(x, F64: tl.constexpr):
    if F64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _exp_f32(x):
    # exp(x) = 2^n exp(f), n = round(x / ln 2), f = x - n ln 2 (two-constant Cody-Waite: n * LN2_HI is
    # exact), |f| <= ln(2)/2, exp(f) = 1 + (f + f^2 q(f)), q the degree-5 rest of the Taylor series (truncation 5e-9 relative).
    # 2^n is built from its bits in two halves so that every factor is a normal float. NaN stays NaN.
    x = tl.where(x > 128.0, 128.0, x)
    x = tl.where(x < -128.0, -128.0, x)
    n = tl.floor(x * 1.4426950408889634 + 0.5)
    f = x - n * 0.693145751953125
    f = f - n * 1.4286068203094173e-06
    q = f * 1.984126984126984e-04 + 1.388888888888889e-03
    q = q * f + 8.333333333333333e-03
    q = q * f + 4.1666666666666664e-02
    q = q * f + 0.16666666666666666
    q = q * f + 0.5
    p = 1.0 + (f + (f * f) * q)  # the correction rounds inside the final add: ~0.6 ulp in all
    ni = n.to(tl.int32)
    n1 = ni >> 1
    n2 = ni - n1
    scale1 = ((n1 + 127) << 23).to(tl.float32, bitcast=True)
    scale2 = ((n2 + 127) << 23).to(tl.float32, bitcast=True)
    return p * scale1 * scale2


@triton.jit
def _log_f32(v):
    # v = 2^e (1 + f), 1 + f in [sqrt(1/2), sqrt(2)), f exact. As in fdlibm: log(1 + f) = f - (h - s (h + R)),
    # h = f^2/2, s = f/(2 + f), R = s^2 (2/3 + 2/5 s^2 + 2/7 s^4 + 2/9 s^6) (truncation 1e-9 relative);
    # the exact f carries the result, the rounded terms are corrections. Zero, negative, subnormal,
    # infinite and NaN inputs take tl.log's answer.
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > 1.4142135623730951
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    f = m - 1.0
    s = tl.math.div_rn(f, 2.0 + f)
    z = s * s
    R = z * 0.2222222222222222 + 0.2857142857142857
    R = R * z + 0.4
    R = R * z + 0.6666666666666666
    R = R * z
    h = 0.5 * f * f
    ef = e.to(tl.float32)
    result = ef * 0.693145751953125 - ((h - (s * (h + R) + ef * 1.4286068203094173e-06)) - f)
    normal = (v >= 1.1754943508222875e-38) & (v <= 3.4028234663852886e38)
    return tl.where(normal, result, tl.log(v))


@triton.jit
def _exp(x, F64: tl.constexpr):
    if F64:
        y = tl.exp(x)
    else:
        y = _exp_f32(x)
    return y


@triton.jit
def _log(x, F64: tl.constexpr):
    if F64:
        y = tl.log(x)
    else:
        y = _log_f32(x)
    return y


@triton.jit
def _div(x, y, F64: tl.constexpr):
    if F64:
        z = x / y
    else:
        z = tl.math.div_rn(x, y)
    return z


# --------------------------------------------------------------------------------------------- #
# Index helpers: a program's kept coordinates, an iteration's reduced coordinates, an offset    #
# --------------------------------------------------------------------------------------------- #


@triton.jit
def _kept_coords(K1, n_kblk, n_rchunks, INT64: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    pid_r = pid % n_rchunks
    pid_k = pid // n_rchunks
    kout = pid_k // n_kblk
    k2 = (pid_k % n_kblk) * BLOCK_K + tl.arange(0, BLOCK_K)
    return pid, pid_r, kout // K1, kout % K1, k2


@triton.jit
def _reduced_coords(rb, R1, R2, BLOCK_R: tl.constexpr):
    n_rblk2 = (R2 + BLOCK_R - 1) // BLOCK_R
    rout = rb // n_rblk2
    r2 = (rb % n_rblk2) * BLOCK_R + tl.arange(0, BLOCK_R)
    return rout // R1, rout % R1, r2


@triton.jit
def _offset(i0, i1, i2, stride0, stride1, stride2):
    return i0 * stride0 + i1 * stride1 + i2 * stride2


# --------------------------------------------------------------------------------------------- #
# Kernels                                                                                        #
# --------------------------------------------------------------------------------------------- #


@triton.jit
def _gaussian_nll_fwd_kernel(
    a_ptr, b_ptr, s_ptr, out_ptr, partial_ptr,
    K1, K2, R1, R2, n_kblk, n_rblk, n_rchunks, chunk_iters,
    a_k0, a_k1, a_k2, a_r0, a_r1, a_r2,
    b_k0, b_k1, b_k2, b_r0, b_r1, b_r2,
    s_k0, s_k1, s_k2,
    o_k0, o_k1, o_k2, o_r0, o_r1, o_r2,
    OP: tl.constexpr, MODE: tl.constexpr, FULL: tl.constexpr, EPS: tl.constexpr,
    F64: tl.constexpr, INT64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Elementwise loss of ``a`` (x / input), ``b`` (mean / target) and the small operand ``s``.

    MODE_NONE stores every element at ``out``; MODE_PARTIAL stores this program's sum at ``partial[pid]``.
    """
    pid, pid_r, k0, k1, k2 = _kept_coords(K1, n_kblk, n_rchunks, INT64, BLOCK_K)
    kmask = k2 < K2
    a_k = _offset(k0, k1, k2, a_k0, a_k1, a_k2)
    b_k = _offset(k0, k1, k2, b_k0, b_k1, b_k2)
    o_k = _offset(k0, k1, k2, o_k0, o_k1, o_k2)
    # Per kept index: sigma and exp(-sigma), or the clamped variance and its log. Once, not per element.
    if OP == 0:
        s = _upcast(tl.load(s_ptr + _offset(k0, k1, k2, s_k0, s_k1, s_k2), mask=kmask, other=0.0), F64)
        inv_sigma = _exp(-s, F64)[:, None]
        shift = s[:, None]
    elif OP == 1:
        v = _upcast(tl.load(s_ptr + _offset(k0, k1, k2, s_k0, s_k1, s_k2), mask=kmask, other=1.0), F64)
        v = tl.where(v < EPS, EPS, v)  # max(var, eps); a NaN variance stays NaN, as with torch.clamp
        var = v[:, None]
        log_var = _log(v, F64)[:, None]
    acc = _upcast(tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32), F64)
    rb_start = pid_r * chunk_iters
    rb_end = tl.minimum(rb_start + chunk_iters, n_rblk)
    for rb in range(rb_start, rb_end):
        r0, r1, r2 = _reduced_coords(rb, R1, R2, BLOCK_R)
        mask = kmask[:, None] & (r2 < R2)[None, :]
        a = tl.load(a_ptr + (a_k[:, None] + _offset(r0, r1, r2, a_r0, a_r1, a_r2)[None, :]), mask=mask, other=0.0)
        b = tl.load(b_ptr + (b_k[:, None] + _offset(r0, r1, r2, b_r0, b_r1, b_r2)[None, :]), mask=mask, other=0.0)
        d = _upcast(a, F64) - _upcast(b, F64)
        if OP == 0:
            r = d * inv_sigma  # r before squaring: finite for |s| <= 80 unless the true value is not
            val = 0.5 * r * r + shift
        elif OP == 1:
            val = 0.5 * (log_var + _div(d * d, var, F64))
        else:
            val = d * d
        if FULL:
            val = val + 0.9189385332046727  # log(2 pi) / 2
        if MODE == 0:
            o_off = o_k[:, None] + _offset(r0, r1, r2, o_r0, o_r1, o_r2)[None, :]
            tl.store(out_ptr + o_off, val.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            acc += tl.where(mask, val, 0.0)
    if MODE == 1:
        tl.store(partial_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _gaussian_nll_bwd_kernel(
    a_ptr, b_ptr, s_ptr, g_ptr, da_ptr, db_ptr, ds_ptr,
    K, K1, K2, R1, R2, n_kblk, n_rblk, n_rchunks, chunk_iters,
    a_k0, a_k1, a_k2, a_r0, a_r1, a_r2,
    b_k0, b_k1, b_k2, b_r0, b_r1, b_r2,
    s_k0, s_k1, s_k2,
    g_k0, g_k1, g_k2, g_r0, g_r1, g_r2,
    o_k0, o_k1, o_k2, o_r0, o_r1, o_r2,
    OP: tl.constexpr, EPS: tl.constexpr, G_SCALAR: tl.constexpr,
    STORE_DA: tl.constexpr, STORE_DB: tl.constexpr, STORE_DS: tl.constexpr,
    F64: tl.constexpr, INT64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Gradients from grad_output ``g``: ``da``, ``db`` elementwise (layout ``o``), ``ds`` as per-chunk partials.

    ``ds_ptr`` is a ``(n_rchunks, K)`` buffer: this program writes row ``pid_r`` at its kept indices.
    """
    pid, pid_r, k0, k1, k2 = _kept_coords(K1, n_kblk, n_rchunks, INT64, BLOCK_K)
    kmask = k2 < K2
    a_k = _offset(k0, k1, k2, a_k0, a_k1, a_k2)
    b_k = _offset(k0, k1, k2, b_k0, b_k1, b_k2)
    g_k = _offset(k0, k1, k2, g_k0, g_k1, g_k2)
    o_k = _offset(k0, k1, k2, o_k0, o_k1, o_k2)
    if OP == 0:
        s = _upcast(tl.load(s_ptr + _offset(k0, k1, k2, s_k0, s_k1, s_k2), mask=kmask, other=0.0), F64)
        inv_sigma = _exp(-s, F64)[:, None]
    elif OP == 1:
        v = _upcast(tl.load(s_ptr + _offset(k0, k1, k2, s_k0, s_k1, s_k2), mask=kmask, other=1.0), F64)
        v = tl.where(v < EPS, EPS, v)  # the clamp is invisible to autograd: d/dvar is taken at max(var, eps)
        var = v[:, None]
        inv_var = _div(1.0, v, F64)[:, None]
    if G_SCALAR:
        g_all = _upcast(tl.load(g_ptr), F64)
    acc = _upcast(tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32), F64)
    rb_start = pid_r * chunk_iters
    rb_end = tl.minimum(rb_start + chunk_iters, n_rblk)
    for rb in range(rb_start, rb_end):
        r0, r1, r2 = _reduced_coords(rb, R1, R2, BLOCK_R)
        mask = kmask[:, None] & (r2 < R2)[None, :]
        a = tl.load(a_ptr + (a_k[:, None] + _offset(r0, r1, r2, a_r0, a_r1, a_r2)[None, :]), mask=mask, other=0.0)
        b = tl.load(b_ptr + (b_k[:, None] + _offset(r0, r1, r2, b_r0, b_r1, b_r2)[None, :]), mask=mask, other=0.0)
        d = _upcast(a, F64) - _upcast(b, F64)
        if G_SCALAR:
            g = g_all
        else:
            g_off = g_k[:, None] + _offset(r0, r1, r2, g_r0, g_r1, g_r2)[None, :]
            g = _upcast(tl.load(g_ptr + g_off, mask=mask, other=0.0), F64)
        if OP == 0:
            r = d * inv_sigma
            db = -(g * r) * inv_sigma  # dnll/dm = (m - x) exp(-2s), as -r exp(-s): no exp(-2s) overflow
            ds = g * (1.0 - r * r)
        elif OP == 1:
            q = _div(d, var, F64)
            db = -(g * q)  # d/dtarget = -(input - target) / v
            ds = (0.5 * g) * (inv_var - q * q)  # d/dvar = (1/v - (input - target)^2 / v^2) / 2
        else:
            db = -2.0 * (g * d)  # d/dm = 2 (m - x) g
        o_off = o_k[:, None] + _offset(r0, r1, r2, o_r0, o_r1, o_r2)[None, :]  # dead code unless stored
        if STORE_DA:
            tl.store(da_ptr + o_off, (-db).to(da_ptr.dtype.element_ty), mask=mask)
        if STORE_DB:
            tl.store(db_ptr + o_off, db.to(db_ptr.dtype.element_ty), mask=mask)
        if STORE_DS:
            acc += tl.where(mask, ds, 0.0)
    if STORE_DS:
        kidx = (k0 * K1 + k1) * K2 + k2
        tl.store(ds_ptr + pid_r * K + kidx, tl.sum(acc, axis=1).to(ds_ptr.dtype.element_ty), mask=kmask)


# --------------------------------------------------------------------------------------------- #
# Layout: classify, merge and slot the dimensions; choose the tiles and the grid                #
# --------------------------------------------------------------------------------------------- #


class _Dim(NamedTuple):
    size: int
    strides: dict[str, int]
    pinned: bool  # dim 0 kept on its own for "per_sample" (never merged)


class _Layout(NamedTuple):
    ksize: tuple[int, int, int]  # kept sizes, outer to inner, padded with 1 in front
    rsize: tuple[int, int, int]  # reduced sizes, likewise
    kstride: dict[str, tuple[int, int, int]]
    rstride: dict[str, tuple[int, int, int]]


def _merge(dims: list[_Dim], names: list[str]) -> list[_Dim]:
    """Merge neighbours (in logical order) whose strides agree in every operand: row-major order is kept."""
    merged: list[_Dim] = []
    for dim in dims:
        prev = merged[-1] if merged else None
        if prev is not None and not prev.pinned and not dim.pinned and all(
            prev.strides[n] == dim.strides[n] * dim.size for n in names
        ):
            merged[-1] = _Dim(prev.size * dim.size, dim.strides, False)
        else:
            merged.append(dim)
    return merged


def _make_layout(
    shape: tuple[int, ...], strides: dict[str, tuple[int, ...]], key: str | None, pin_batch: bool
) -> _Layout | None:
    """Kept dims: where ``strides[key]`` is non-zero (plus dim 0 when ``pin_batch``). None if a kind needs > 3 dims."""
    names = list(strides)
    kept: list[_Dim] = []
    reduced: list[_Dim] = []
    for d, size in enumerate(shape):
        if size == 1:
            continue
        dim = _Dim(size, {n: strides[n][d] for n in names}, pin_batch and d == 0)
        if dim.pinned or (key is not None and dim.strides[key] != 0):
            kept.append(dim)
        else:
            reduced.append(dim)
    kept, reduced = _merge(kept, names), _merge(reduced, names)
    if len(kept) > _SLOTS or len(reduced) > _SLOTS:
        return None
    pad = _Dim(1, {n: 0 for n in names}, False)
    if kept and kept[0].pinned:  # the sample index is the outermost slot, so a program never straddles two
        kept = kept[:1] + [pad] * (_SLOTS - len(kept)) + kept[1:]
    else:
        kept = [pad] * (_SLOTS - len(kept)) + kept
    reduced = [pad] * (_SLOTS - len(reduced)) + reduced
    return _Layout(
        tuple(d.size for d in kept),
        tuple(d.size for d in reduced),
        {n: tuple(d.strides[n] for d in kept) for n in names},
        {n: tuple(d.strides[n] for d in reduced) for n in names},
    )


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _dense_strides(t: torch.Tensor) -> tuple[int, ...] | None:
    """``t``'s strides when it is non-overlapping and dense (any dim order), else None."""
    step = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda p: p[1]):
        if stride != step:
            return None
        step *= size
    return tuple(t.stride())


def _empty(shape, strides, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes (outputs, gradients, partial sums); tests fill it with NaN to catch gaps."""
    return torch.empty_strided(tuple(shape), tuple(strides), dtype=dtype, device=device)


def _has_internal_broadcast(t: torch.Tensor) -> bool:
    return any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride()))


_SM_COUNT: dict[int, int] = {}


def _target_programs(device: torch.device) -> int:
    """Programs to aim for: 16 per SM on a GPU; 4 in the interpreter, which runs them one after another."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 16 * _SM_COUNT[index]


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _Grid(NamedTuple):
    block_k: int
    block_r: int
    n_kblk: int
    n_rblk: int
    n_rchunks: int
    chunk_iters: int
    programs: int
    int64: bool


def _grid(layout: _Layout, device: torch.device, *, lead: str, per_k_partials: bool) -> _Grid:
    (k0, k1, k2), (r0, r1, r2) = layout.ksize, layout.rsize
    # The tile's long side follows the operand's most contiguous inner dimension.
    ks, rs = layout.kstride[lead][2], layout.rstride[lead][2]
    kept_first = r2 == 1 or (k2 > 1 and ks != 0 and (rs == 0 or ks < rs))
    if kept_first:
        block_k = min(_next_pow2(k2), _TILE)
        block_r = min(_next_pow2(r2), max(_TILE // block_k, 1))
    else:
        block_r = min(_next_pow2(r2), _TILE)
        block_k = min(_next_pow2(k2), max(_TILE // block_r, 1))
    n_kblk = triton.cdiv(k2, block_k)
    n_kprog = k0 * k1 * n_kblk
    n_rblk = r0 * r1 * triton.cdiv(r2, block_r)
    target = _target_programs(device)
    n_rchunks = 1 if n_kprog >= target else min(n_rblk, triton.cdiv(target, n_kprog))
    if per_k_partials and k0 * k1 * k2 > 1:
        n_rchunks = min(n_rchunks, max(1, n_rblk // 4))  # partial buffer (n_rchunks, K) stays <= N / 4
    chunk_iters = triton.cdiv(n_rblk, n_rchunks)
    n_rchunks = triton.cdiv(n_rblk, chunk_iters)
    programs = n_kprog * n_rchunks
    # 64-bit index math when any offset a program can form (masked lanes included) may pass 2^31.
    reach = max(
        sum((size + pad) * abs(stride) for size, pad, stride in zip(layout.ksize + layout.rsize,
                                                                   (1, 1, block_k, 1, 1, block_r),
                                                                   layout.kstride[n] + layout.rstride[n]))
        for n in layout.kstride
    )
    reach = max(reach, (n_rchunks + 1) * k0 * k1 * (k2 + block_k), programs * (chunk_iters + 1) * block_r)
    return _Grid(block_k, block_r, n_kblk, n_rblk, n_rchunks, chunk_iters, programs, reach >= _INT32_LIMIT)


def _stride_args(layout: _Layout, name: str | None, prefix: str, reduced: bool = True) -> dict[str, int]:
    """The kernel's ``{prefix}_k0..2`` (and ``_r0..2``) stride arguments; zeros for an absent operand."""
    kstride = layout.kstride[name] if name is not None else (0,) * _SLOTS
    rstride = layout.rstride[name] if name is not None else (0,) * _SLOTS
    args = {f"{prefix}_k{i}": kstride[i] for i in range(_SLOTS)}
    if reduced:
        args.update({f"{prefix}_r{i}": rstride[i] for i in range(_SLOTS)})
    return args


class _Plan(NamedTuple):
    layout: _Layout
    full: dict[str, torch.Tensor]  # operands as the kernel reads them (a contiguous copy in the fallback)
    small: torch.Tensor | None  # the small operand as the kernel reads it
    out_strides: tuple[int, ...] | None
    small_materialised: bool


def _expanded_strides(t: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(t.expand(shape).stride())


def _plan(
    shape: tuple[int, ...],
    full: dict[str, torch.Tensor],
    small: torch.Tensor | None,
    *,
    out_like: torch.Tensor | None,
    want_out: bool,
    pin_batch: bool,
) -> _Plan:
    """Describe the iteration; fall back to contiguous copies, then to a materialised small operand.

    The fallbacks only trigger when a kind still needs more than three dimensions after merging:
    strides that merge nothing (rare), or a rank >= 7 tensor whose σ alternates broadcast and
    non-broadcast dimensions four times (then σ is expanded to the full shape, the one case where
    the broadcast is materialised).
    """
    if small is not None and _has_internal_broadcast(small):
        small = small.contiguous()  # one value shared by several σ entries: give each entry its own gradient
    out_strides = None
    if want_out:
        dense = _dense_strides(out_like) if out_like is not None and tuple(out_like.shape) == shape else None
        out_strides = dense or _contiguous_strides(shape)
    materialised = False
    for attempt in range(3):
        strides = {n: _expanded_strides(t, shape) for n, t in full.items()}
        if small is not None:
            strides["s"] = _expanded_strides(small, shape)
        if out_strides is not None:
            strides["o"] = out_strides
        layout = _make_layout(shape, strides, "s" if small is not None else None, pin_batch)
        if layout is not None:
            return _Plan(layout, full, small, out_strides, materialised)
        if attempt == 0:
            full = {n: t.contiguous() for n, t in full.items()}
            out_strides = _contiguous_strides(shape) if out_strides is not None else None
        else:
            small = small.expand(shape).contiguous()
            materialised = True
    raise AssertionError("unreachable: a materialised σ merges into at most two kept dimensions")


# --------------------------------------------------------------------------------------------- #
# Launchers                                                                                      #
# --------------------------------------------------------------------------------------------- #


def _zero_reduction(shape: tuple[int, ...], reduction: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if reduction == "per_sample":
        return torch.zeros(shape[:1], dtype=dtype, device=device)
    return torch.zeros((), dtype=dtype, device=device)


def _forward(
    op: int,
    a: torch.Tensor,
    b: torch.Tensor,
    small: torch.Tensor | None,
    shape: tuple[int, ...],
    *,
    reduction: str,
    full: bool = False,
    eps: float = 0.0,
) -> torch.Tensor:
    """``reduction``: ``"none"`` (result dtype, shape ``shape``), ``"sum"`` (``()``), ``"per_sample"`` (``(B,)``)."""
    if reduction not in ("none", "sum", "per_sample"):
        raise ValueError(f"unknown backend reduction {reduction!r}")
    device = a.device
    cdtype = compute_dtype(a, b, small)
    if reduction == "none":
        out_dtype = result_dtype(a, b, small)
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=out_dtype, device=device)
    elif math.prod(shape) == 0:
        return _zero_reduction(shape, reduction, cdtype, device)
    if reduction == "per_sample" and len(shape) == 0:
        raise ValueError("reduction 'per_sample' needs a batch dimension")
    plan = _plan(shape, {"a": a, "b": b}, small, out_like=a, want_out=reduction == "none",
                 pin_batch=reduction == "per_sample")
    layout = plan.layout
    grid = _grid(layout, device, lead="a", per_k_partials=False)
    if reduction == "none":
        out = _empty(shape, plan.out_strides, out_dtype, device)
        partial = out  # unused
    else:
        partial = _empty((grid.programs,), (1,), cdtype, device)
        out = partial  # unused
    s_ptr = plan.small if plan.small is not None else plan.full["a"]  # unused for the SSE
    o_args = _stride_args(layout, "o" if reduction == "none" else None, "o")
    s_args = _stride_args(layout, "s" if plan.small is not None else None, "s", reduced=False)
    _gaussian_nll_fwd_kernel[(grid.programs,)](
        plan.full["a"], plan.full["b"], s_ptr, out, partial,
        layout.ksize[1], layout.ksize[2], layout.rsize[1], layout.rsize[2],
        grid.n_kblk, grid.n_rblk, grid.n_rchunks, grid.chunk_iters,
        **_stride_args(layout, "a", "a"), **_stride_args(layout, "b", "b"), **s_args, **o_args,
        OP=op, MODE=MODE_NONE if reduction == "none" else MODE_PARTIAL, FULL=bool(full), EPS=float(eps),
        F64=cdtype == torch.float64, INT64=grid.int64, BLOCK_K=grid.block_k, BLOCK_R=grid.block_r,
        num_warps=_NUM_WARPS,
    )
    if reduction == "none":
        return out
    if reduction == "sum":
        return partial.sum()
    return partial.view(shape[0], -1).sum(dim=1)  # the sample index is the outermost program coordinate


def _backward(
    op: int,
    a: torch.Tensor,
    b: torch.Tensor,
    small: torch.Tensor | None,
    shape: tuple[int, ...],
    grad: torch.Tensor,
    *,
    reduction: str,
    needs: tuple[bool, bool, bool],
    eps: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(da, db, dsmall)`` in the dtype and shape of each operand (None where not needed)."""
    device = a.device
    cdtype = compute_dtype(a, b, small)
    need_a, need_b, need_s = needs[0], needs[1], needs[2] and small is not None
    if reduction == "per_sample":  # grad (B,) against the sample index, broadcast over the rest
        grad = grad.reshape(grad.shape + (1,) * (len(shape) - 1))
    if math.prod(shape) == 0:
        return (
            torch.zeros_like(a) if need_a else None,
            torch.zeros_like(b) if need_b else None,
            torch.zeros_like(small) if need_s else None,
        )
    plan = _plan(shape, {"a": a, "b": b, "g": grad}, small, out_like=a, want_out=need_a or need_b, pin_batch=False)
    layout = plan.layout
    grid = _grid(layout, device, lead="a", per_k_partials=need_s)
    # da / db go straight to the caller where the operand has the full shape; a broadcast operand (only
    # possible for torch's input / target) gets a full-size float buffer summed down afterwards.
    da = db = None
    if need_a:
        direct = tuple(a.shape) == shape
        da = _empty(shape, plan.out_strides, a.dtype if direct else cdtype, device)
    if need_b:
        direct = tuple(b.shape) == shape
        db = _empty(shape, plan.out_strides, b.dtype if direct else cdtype, device)
    K = math.prod(layout.ksize)
    # One chunk: the buffer is the gradient itself, so it takes σ's dtype (the kernel rounds once, at the
    # store). Several: float partial sums, added in a fixed order below.
    ds_partial = None
    if need_s:
        ds_dtype = small.dtype if grid.n_rchunks == 1 and not plan.small_materialised else cdtype
        ds_partial = _empty((grid.n_rchunks, K), (K, 1), ds_dtype, device)
    dummy = plan.full["a"]
    g_scalar = all(st == 0 for st in layout.kstride["g"] + layout.rstride["g"])
    o_args = _stride_args(layout, "o" if plan.out_strides is not None else None, "o")
    s_args = _stride_args(layout, "s" if plan.small is not None else None, "s", reduced=False)
    _gaussian_nll_bwd_kernel[(grid.programs,)](
        plan.full["a"], plan.full["b"], plan.small if plan.small is not None else dummy, plan.full["g"],
        da if da is not None else dummy, db if db is not None else dummy,
        ds_partial if ds_partial is not None else dummy,
        K, layout.ksize[1], layout.ksize[2], layout.rsize[1], layout.rsize[2],
        grid.n_kblk, grid.n_rblk, grid.n_rchunks, grid.chunk_iters,
        **_stride_args(layout, "a", "a"), **_stride_args(layout, "b", "b"), **s_args,
        **_stride_args(layout, "g", "g"), **o_args,
        OP=op, EPS=float(eps), G_SCALAR=g_scalar, STORE_DA=da is not None, STORE_DB=db is not None,
        STORE_DS=need_s, F64=cdtype == torch.float64, INT64=grid.int64,
        BLOCK_K=grid.block_k, BLOCK_R=grid.block_r, num_warps=_NUM_WARPS,
    )
    if da is not None and tuple(a.shape) != shape:
        da = da.sum_to_size(a.shape).to(a.dtype)
    if db is not None and tuple(b.shape) != shape:
        db = db.sum_to_size(b.shape).to(b.dtype)
    ds = None
    if need_s:
        ds = ds_partial[0] if grid.n_rchunks == 1 else ds_partial.sum(dim=0)  # fixed order: deterministic
        if plan.small_materialised:
            ds = ds.view(shape).sum_to_size(small.shape)
        ds = ds.reshape(small.shape).to(small.dtype)
    return da, db, ds


# --------------------------------------------------------------------------------------------- #
# Custom ops with autograd, and the backend entry points                                        #
# --------------------------------------------------------------------------------------------- #
#
# Each op's forward and backward launchers are ``torch.library`` custom ops tied together by
# ``register_autograd``, as in :mod:`.sample_kl` (where the choice is explained): one opaque node
# for ``torch.compile``. The fake implementations mirror the launchers' outputs exactly (shape,
# dtype and strides: inductor asserts the strides of a custom op's outputs). A ``"none"`` output and
# the gradients of full-size operands follow ``_plan``'s ``out_strides`` (the layout of ``x`` /
# ``input`` when it is dense), so the fakes run the same ``_plan``; every other output is contiguous.


def _var_shape(input: torch.Tensor, target: torch.Tensor, var: torch.Tensor) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(input.shape, target.shape, var.shape))


def _fake_forward(a, b, small, shape, reduction):
    """The launcher's output (:func:`_forward`) without launching: shape, dtype and strides only."""
    if reduction not in ("none", "sum", "per_sample"):
        raise ValueError(f"unknown backend reduction {reduction!r}")
    if reduction == "sum":
        return a.new_empty((), dtype=compute_dtype(a, b, small))
    if reduction == "per_sample":
        if len(shape) == 0:
            raise ValueError("reduction 'per_sample' needs a batch dimension")
        return a.new_empty(shape[:1], dtype=compute_dtype(a, b, small))
    out_dtype = result_dtype(a, b, small)
    if math.prod(shape) == 0:
        return a.new_empty(shape, dtype=out_dtype)
    plan = _plan(shape, {"a": a, "b": b}, small, out_like=a, want_out=True, pin_batch=False)
    return a.new_empty_strided(shape, plan.out_strides, dtype=out_dtype)


def _backward_outputs(a, b, small, shape, grads):
    """Gradients of ``_backward`` as op outputs: placeholders for None, contiguous where the fake says so."""
    outputs = []
    for i, (operand, g) in enumerate(zip((a, b, small), grads)):
        if g is None:
            outputs.append(_custom_op.absent(a))
        elif i == 2 or tuple(operand.shape) != shape or math.prod(shape) == 0:
            outputs.append(_custom_op.dense(g))
        else:
            outputs.append(g)  # allocated with _plan's out_strides
    return tuple(outputs)


def _fake_backward(a, b, small, shape, grad, reduction, needs):
    """The outputs of :func:`_backward_outputs` without launching."""
    need_a, need_b, need_s = needs[0], needs[1], needs[2] and small is not None
    out_strides = None
    if (need_a or need_b) and math.prod(shape) != 0:
        if reduction == "per_sample":
            grad = grad.reshape(grad.shape + (1,) * (len(shape) - 1))
        plan = _plan(shape, {"a": a, "b": b, "g": grad}, small, out_like=a, want_out=True, pin_batch=False)
        out_strides = plan.out_strides
    outputs = []
    for i, (operand, needed) in enumerate(((a, need_a), (b, need_b), (small, need_s))):
        if not needed:
            outputs.append(_custom_op.absent(a))
        elif i == 2 or tuple(operand.shape) != shape or out_strides is None:
            outputs.append(operand.new_empty(operand.shape))
        else:
            outputs.append(operand.new_empty_strided(shape, out_strides))
    return tuple(outputs)


def _needs(ctx, count: int) -> tuple[bool, ...]:
    return tuple(bool(n) for n in ctx.needs_input_grad[:count])


# gaussian_nll ------------------------------------------------------------------------------------


@torch.library.custom_op(
    _custom_op.op_name("gaussian_nll_forward"),
    mutates_args=(),
    schema="(Tensor x, Tensor mean, Tensor log_sigma, bool full, str reduction) -> Tensor",
)
def _gaussian_nll_forward_op(x, mean, log_sigma, full, reduction):
    return _forward(OP_NLL, x, mean, log_sigma, tuple(x.shape), reduction=reduction, full=full)


@_gaussian_nll_forward_op.register_fake
def _(x, mean, log_sigma, full, reduction):
    return _fake_forward(x, mean, log_sigma, tuple(x.shape), reduction)


@torch.library.custom_op(
    _custom_op.op_name("gaussian_nll_backward"),
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor mean, Tensor log_sigma, str reduction, bool need_x, bool need_mean, "
    "bool need_log_sigma) -> (Tensor, Tensor, Tensor)",
)
def _gaussian_nll_backward_op(grad, x, mean, log_sigma, reduction, need_x, need_mean, need_log_sigma):
    shape = tuple(x.shape)
    grads = _backward(OP_NLL, x, mean, log_sigma, shape, grad, reduction=reduction,
                      needs=(need_x, need_mean, need_log_sigma))
    return _backward_outputs(x, mean, log_sigma, shape, grads)


@_gaussian_nll_backward_op.register_fake
def _(grad, x, mean, log_sigma, reduction, need_x, need_mean, need_log_sigma):
    return _fake_backward(x, mean, log_sigma, tuple(x.shape), grad, reduction, (need_x, need_mean, need_log_sigma))


def _gaussian_nll_setup_context(ctx, inputs, output):
    x, mean, log_sigma, _full, reduction = inputs
    ctx.save_for_backward(x, mean, log_sigma)
    ctx.reduction = reduction


def _gaussian_nll_backward(ctx, grad):
    x, mean, log_sigma = ctx.saved_tensors
    needs = _needs(ctx, 3)
    if not any(needs):
        return None, None, None, None, None
    dx, dm, ds = torch.ops.fusedvae.gaussian_nll_backward(grad, x, mean, log_sigma, ctx.reduction, *needs)
    return dx if needs[0] else None, dm if needs[1] else None, ds if needs[2] else None, None, None


_gaussian_nll_forward_op.register_autograd(_gaussian_nll_backward, setup_context=_gaussian_nll_setup_context)


# sum_squared_error -------------------------------------------------------------------------------


@torch.library.custom_op(
    _custom_op.op_name("sum_squared_error_forward"),
    mutates_args=(),
    schema="(Tensor x, Tensor mean, bool per_sample) -> Tensor",
)
def _sum_squared_error_forward_op(x, mean, per_sample):
    return _forward(OP_SSE, x, mean, None, tuple(x.shape), reduction="per_sample" if per_sample else "sum")


@_sum_squared_error_forward_op.register_fake
def _(x, mean, per_sample):
    return _fake_forward(x, mean, None, tuple(x.shape), "per_sample" if per_sample else "sum")


@torch.library.custom_op(
    _custom_op.op_name("sum_squared_error_backward"),
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor mean, bool per_sample, bool need_x, bool need_mean) -> (Tensor, Tensor)",
)
def _sum_squared_error_backward_op(grad, x, mean, per_sample, need_x, need_mean):
    shape = tuple(x.shape)
    grads = _backward(OP_SSE, x, mean, None, shape, grad, reduction="per_sample" if per_sample else "sum",
                      needs=(need_x, need_mean, False))
    return _backward_outputs(x, mean, None, shape, grads)[:2]


@_sum_squared_error_backward_op.register_fake
def _(grad, x, mean, per_sample, need_x, need_mean):
    reduction = "per_sample" if per_sample else "sum"
    return _fake_backward(x, mean, None, tuple(x.shape), grad, reduction, (need_x, need_mean, False))[:2]


def _sum_squared_error_setup_context(ctx, inputs, output):
    x, mean, per_sample = inputs
    ctx.save_for_backward(x, mean)
    ctx.per_sample = per_sample


def _sum_squared_error_backward(ctx, grad):
    x, mean = ctx.saved_tensors
    needs = _needs(ctx, 2)
    if not any(needs):
        return None, None, None
    dx, dm = torch.ops.fusedvae.sum_squared_error_backward(grad, x, mean, ctx.per_sample, *needs)
    return dx if needs[0] else None, dm if needs[1] else None, None


_sum_squared_error_forward_op.register_autograd(
    _sum_squared_error_backward, setup_context=_sum_squared_error_setup_context
)


# gaussian_nll_var --------------------------------------------------------------------------------


@torch.library.custom_op(
    _custom_op.op_name("gaussian_nll_var_forward"),
    mutates_args=(),
    schema="(Tensor input, Tensor target, Tensor var, bool full, float eps, str reduction) -> Tensor",
)
def _gaussian_nll_var_forward_op(input, target, var, full, eps, reduction):
    shape = _var_shape(input, target, var)
    return _forward(OP_VAR, input, target, var, shape, reduction=reduction, full=full, eps=eps)


@_gaussian_nll_var_forward_op.register_fake
def _(input, target, var, full, eps, reduction):
    return _fake_forward(input, target, var, _var_shape(input, target, var), reduction)


@torch.library.custom_op(
    _custom_op.op_name("gaussian_nll_var_backward"),
    mutates_args=(),
    schema="(Tensor grad, Tensor input, Tensor target, Tensor var, float eps, str reduction, bool need_input, "
    "bool need_target, bool need_var) -> (Tensor, Tensor, Tensor)",
)
def _gaussian_nll_var_backward_op(grad, input, target, var, eps, reduction, need_input, need_target, need_var):
    shape = _var_shape(input, target, var)
    grads = _backward(OP_VAR, input, target, var, shape, grad, reduction=reduction,
                      needs=(need_input, need_target, need_var), eps=eps)
    return _backward_outputs(input, target, var, shape, grads)


@_gaussian_nll_var_backward_op.register_fake
def _(grad, input, target, var, eps, reduction, need_input, need_target, need_var):
    shape = _var_shape(input, target, var)
    return _fake_backward(input, target, var, shape, grad, reduction, (need_input, need_target, need_var))


def _gaussian_nll_var_setup_context(ctx, inputs, output):
    input, target, var, _full, eps, reduction = inputs
    ctx.save_for_backward(input, target, var)
    ctx.eps, ctx.reduction = eps, reduction


def _gaussian_nll_var_backward(ctx, grad):
    input, target, var = ctx.saved_tensors
    needs = _needs(ctx, 3)
    if not any(needs):
        return (None,) * 6
    di, dt, dv = torch.ops.fusedvae.gaussian_nll_var_backward(grad, input, target, var, ctx.eps, ctx.reduction, *needs)
    return di if needs[0] else None, dt if needs[1] else None, dv if needs[2] else None, None, None, None


_gaussian_nll_var_forward_op.register_autograd(
    _gaussian_nll_var_backward, setup_context=_gaussian_nll_var_setup_context
)


# backend entry points ----------------------------------------------------------------------------


def gaussian_nll(
    x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor, *, full: bool, reduction: str
) -> torch.Tensor:
    """``r^2/2 + s [+ log(2 pi)/2]``, ``r = (x - mean) exp(-s)``; ``"none"`` (result dtype), ``"sum"``, ``"per_sample"``.

    ``log_sigma`` broadcasts to ``x`` by strides; its gradient is summed over the broadcast positions.
    Runs the ``fusedvae::gaussian_nll_forward`` custom op (``..._backward`` in backward).
    """
    return torch.ops.fusedvae.gaussian_nll_forward(x, mean, log_sigma, bool(full), reduction)


def sum_squared_error(x: torch.Tensor, mean: torch.Tensor, *, per_sample: bool) -> torch.Tensor:
    """``sum((x - mean)^2)``, shape ``()`` or ``(B,)`` (``per_sample``), compute dtype, differentiable in both."""
    return torch.ops.fusedvae.sum_squared_error_forward(x, mean, bool(per_sample))


def gaussian_nll_var(
    input: torch.Tensor, target: torch.Tensor, var: torch.Tensor, *, full: bool, eps: float, reduction: str
) -> torch.Tensor:
    """torch's ``gaussian_nll_loss`` formula ``0.5 (log v + (input - target)^2 / v)``, ``v = max(var, eps)``.

    The clamp is invisible to autograd: every entry of ``var`` gets ``(1/v - (input - target)^2/v^2)/2``
    at the clamped ``v``, summed over its broadcast positions.
    """
    return torch.ops.fusedvae.gaussian_nll_var_forward(input, target, var, bool(full), float(eps), reduction)
