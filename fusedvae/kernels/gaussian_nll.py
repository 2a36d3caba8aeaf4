"""Gaussian NLL: the kernels of the Gaussian-NLL family, their launchers, and the ``gaussian_nll`` custom ops.

One Triton forward kernel and one backward kernel serve three backend entry points (``OP`` is a
compile-time switch); each entry point's custom ops live in its own file:

- :func:`gaussian_nll` (here): ``r^2/2 + s [+ log(2π)/2]``, ``r = (x - m) e^{-s}``, ``s`` broadcast to x;
- :func:`.sum_squared_error.sum_squared_error`: ``Σ (x - m)^2``, global or per sample (the optimal σ);
- :func:`.gaussian_nll_var.gaussian_nll_var`: ``0.5 (log v + (input - target)^2 / v)``, ``v = max(var, eps)``.

The broadcast operand (``log_sigma`` or ``var``) is read by strides, never materialised, through the
kept x reduced view of :mod:`._common` (a per-channel σ on ``(B, C, H, W)`` is kept ``(C,)`` x
reduced ``(B, H*W)``; a scalar σ reduced ``(N,)``; a per-element σ kept ``(N,)``): σ and ``exp(-σ)``
are computed once per kept index, and σ's gradient is a per-program partial sum finished in fixed
order. ``"sum"`` / ``"per_sample"`` write one partial per program. Two exceptions: the forward reads a
per-element σ / variance in the tile loop like x (``V_FULL``: as kept indices each program would own
one tile, its setup and final sum paid per 8 elements), and every kernel sees the dims in x's memory
order (channels-last and transposed tensors merge to one contiguous run, so their loads vectorize).
Where σ's kept dim is itself the innermost one in memory (channels-last with a per-channel σ, C = 3)
both directions run the ``_interleaved`` kernels instead: flat tiles along memory whose step is a
multiple of C, so each lane keeps one channel (no (C -> 4) padding, vector loads); a ``"per_sample"``
backward pins the sample index so that its grad_output is one value per program.

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
float32 ``exp`` / ``log`` are :mod:`._common`'s libdevice-free <= 1 ulp forms (identical on a GPU
and in the interpreter); a variance clamped to a normal ``eps`` takes :func:`_log_clamped_f32`
(<= 1.06 ulp measured, no special cases). Divisions use IEEE ``div_rn``, except on the ``FAST`` path
(float32 CUDA tensors and, for the variance, ``eps >= 2^-126``; :mod:`.fastmath`): there ``x / v`` is
``x * rcp.approx(v)``, within 1.5 ulp (rcp.approx: 1 ulp, PTX ISA; ``v >= 2^126`` flushes 1/v to 0, an
absolute error below 2^-126 |x|), and a per-element σ's ``exp(-s)`` (formed per element, in the tile
loop) is :func:`._common.exp_accurate`'s FAST form, ~3 ulp in 7 instructions instead of ~24 (the 16-bit
forward was near issue-bound on it; once-per-index exponentials keep the <= 1 ulp form). The
interpreter has no inline PTX and runs the IEEE path (or :mod:`.fastmath`'s emulation), so the FAST
path's numbers are checked on a GPU (``python -m fusedvae.parity --device cuda``) and its code by
compiling for sm_90 on CPU (tests). ``dnll/dm`` is formed as ``-r e^{-s}``, never through
``e^{-2s}`` (which overflows for s < -44 in float32).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..precision import compute_dtype, result_dtype
from . import _common, _custom_op, fastmath
from ._common import ELEMENTWISE, SUM, div, exp, exp_accurate, kept_coords, kept_offset, log, reduced_offset, upcast

__all__ = ["gaussian_nll"]

OP_NLL = tl.constexpr(0)  # r^2/2 + s, r = (a - b) exp(-s)
OP_VAR = tl.constexpr(1)  # 0.5 (log v + (a - b)^2 / v), v = max(var, eps)
OP_SSE = tl.constexpr(2)  # (a - b)^2

_NUM_WARPS = 4
#: The smallest normal float32: a variance clamped to at least this has a normal reciprocal and exponent field.
_FLT_MIN = 1.1754943508222875e-38
_INF = tl.constexpr(float("inf"))


# --------------------------------------------------------------------------------------------- #
# float32 helpers of the FAST path (hardware approximations: CUDA only, see :mod:`.fastmath`)   #
# --------------------------------------------------------------------------------------------- #


@triton.jit
def _log_clamped_f32(v, FAST: tl.constexpr):
    """``log(v)`` for float32 ``v >= 2^-126`` (a variance clamped by ``eps``), ``+inf`` included; <= 1 ulp.

    fdlibm's form without its special cases: ``v = 2^k m``, ``m`` in [sqrt(1/2), sqrt(2)) found by one
    integer subtraction (no compare, no select), ``f = m - 1`` exact, ``log(1 + f) = f + (s (h + R) - h)``
    with ``h = f^2/2``, ``s = f/(2 + f)``, ``R`` :func:`._common.log_positive_f32`'s series. ``s`` only feeds
    the correction, so ``FAST``'s ``rcp.approx`` (1 ulp) costs < 0.15 ulp of the result; ``k ln 2`` is one
    FFMA (float32 ln 2 is off by 0.03 ulp). A NaN ``v`` gives a finite value here: the callers' ``d^2 / v``
    carries the NaN. The interpreter runs the same code with a plain division (tests check it there).
    """
    ix = v.to(tl.int32, bitcast=True) - 0x3F3504F3
    k = ix >> 23
    f = ((ix & 0x007FFFFF) + 0x3F3504F3).to(tl.float32, bitcast=True) - 1.0
    if FAST:
        s = f * fastmath.rcp_approx(2.0 + f)
    else:
        s = f / (2.0 + f)
    z = s * s
    p = z * 0.2222222222222222 + 0.2857142857142857
    p = p * z + 0.4
    p = p * z + 0.6666666666666666
    h = (0.5 * f) * f
    u = s * (p * z + h) - h
    y = k.to(tl.float32) * fastmath.LN2 + (f + u)
    return tl.where(v == _INF, _INF, y)


@triton.jit
def _log_var(v, EPS: tl.constexpr, F64: tl.constexpr, FAST: tl.constexpr):
    """``log`` of a variance clamped to ``EPS``: without special cases when the clamp keeps it normal."""
    if F64:
        y = tl.log(v)
    elif EPS >= 1.1754943508222875e-38:  # FAST implies it (the launcher's condition)
        y = _log_clamped_f32(v, FAST)
    else:
        y = log(v, F64)
    return y


@triton.jit
def _reduced_coords(rb, R1, R2, FLAT: tl.constexpr, BLOCK_R: tl.constexpr):
    """:func:`._common.reduced_coords`, without its integer division when one reduced dim is all (``FLAT``)."""
    if FLAT:
        r2 = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        r0 = 0
        r1 = 0
    else:
        n_rblk2 = (R2 + BLOCK_R - 1) // BLOCK_R
        rout = rb // n_rblk2
        r2 = (rb % n_rblk2) * BLOCK_R + tl.arange(0, BLOCK_R)
        r0 = rout // R1
        r1 = rout % R1
    return r0, r1, r2


# --------------------------------------------------------------------------------------------- #
# Kernels                                                                                        #
# --------------------------------------------------------------------------------------------- #


@triton.jit
def _gaussian_nll_fwd_kernel(
    a_ptr, b_ptr, s_ptr, out_ptr, partial_ptr,
    K1, K2, R1, R2, n_kblk, n_rblk, n_rchunks, chunk_iters,
    a_st, b_st, s_st, o_st,  # each operand's (kept k0..k2, reduced r0..r2) strides
    OP: tl.constexpr, MODE: tl.constexpr, FULL: tl.constexpr, EPS: tl.constexpr,
    F64: tl.constexpr, INT64: tl.constexpr, FAST: tl.constexpr, V_FULL: tl.constexpr, FLAT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Elementwise loss of ``a`` (x / input), ``b`` (mean / target) and the small operand ``s``.

    ELEMENTWISE stores every element at ``out``; SUM stores this program's sum at ``partial[pid]``.
    ``V_FULL``: ``s`` is a per-element variance, read in the tile loop like ``a`` (nothing is kept).
    ``OP_VAR`` forms twice the loss, ``log v + d^2 / v``, and halves it once at the store or the sum.
    """
    pid, pid_r, k0, k1, k2 = kept_coords(K1, n_kblk, n_rchunks, INT64, BLOCK_K)
    kmask = k2 < K2
    a_k = kept_offset(k0, k1, k2, a_st)
    b_k = kept_offset(k0, k1, k2, b_st)
    o_k = kept_offset(k0, k1, k2, o_st)
    s_k = kept_offset(k0, k1, k2, s_st)
    # Per kept index: sigma and exp(-sigma), or the clamped variance, its log (and, FAST, its reciprocal).
    # Once, not per element.
    if OP == OP_NLL:
        if not V_FULL:
            s = upcast(tl.load(s_ptr + s_k, mask=kmask, other=0.0), F64)
            inv_sigma = exp(-s, F64)[:, None]
            shift = s[:, None]
    elif OP == OP_VAR:
        if not V_FULL:
            v = upcast(tl.load(s_ptr + s_k, mask=kmask, other=1.0), F64)
            v = tl.where(v < EPS, EPS, v)  # max(var, eps); a NaN variance stays NaN, as with torch.clamp
            var = v[:, None]
            log_var = _log_var(v, EPS, F64, FAST)[:, None]
            if FAST:
                inv_var = fastmath.rcp_approx(v)[:, None]
    acc = upcast(tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32), F64)
    rb_start = pid_r * chunk_iters
    rb_end = tl.minimum(rb_start + chunk_iters, n_rblk)
    for rb in range(rb_start, rb_end):
        r0, r1, r2 = _reduced_coords(rb, R1, R2, FLAT, BLOCK_R)
        mask = kmask[:, None] & (r2 < R2)[None, :]
        a = tl.load(a_ptr + (a_k[:, None] + reduced_offset(r0, r1, r2, a_st)[None, :]), mask=mask, other=0.0)
        b = tl.load(b_ptr + (b_k[:, None] + reduced_offset(r0, r1, r2, b_st)[None, :]), mask=mask, other=0.0)
        d = upcast(a, F64) - upcast(b, F64)
        s_off = s_k[:, None] + reduced_offset(r0, r1, r2, s_st)[None, :]  # dead code unless V_FULL
        if OP == OP_NLL:
            if V_FULL:
                s = upcast(tl.load(s_ptr + s_off, mask=mask, other=0.0), F64)
                r = d * exp_accurate(-s, F64, FAST)
                val = 0.5 * r * r + s
            else:
                r = d * inv_sigma  # r before squaring: finite for |s| <= 80 unless the true value is not
                val = 0.5 * r * r + shift
        elif OP == OP_VAR:
            if V_FULL:
                v = upcast(tl.load(s_ptr + s_off, mask=mask, other=1.0), F64)
                v = tl.where(v < EPS, EPS, v)
                if FAST:  # d^2 / v within 1.5 ulp (rcp.approx 1 ulp, one rounding); v = inf gives 0
                    val = _log_var(v, EPS, F64, FAST) + (d * d) * fastmath.rcp_approx(v)
                else:
                    val = _log_var(v, EPS, F64, FAST) + div(d * d, v, F64)
            elif FAST:
                val = log_var + (d * d) * inv_var
            else:
                val = log_var + div(d * d, var, F64)
        else:
            val = d * d
        if FULL:
            if OP == OP_VAR:
                val = val + 1.8378770664093453  # log(2 pi), halved with the rest
            else:
                val = val + 0.9189385332046727  # log(2 pi) / 2
        if MODE == ELEMENTWISE:
            if OP == OP_VAR:
                val = 0.5 * val
            o_off = o_k[:, None] + reduced_offset(r0, r1, r2, o_st)[None, :]
            tl.store(out_ptr + o_off, _common.to_element(val, out_ptr), mask=mask)
        elif OP == OP_SSE or (OP == OP_VAR and V_FULL and not FULL and EPS <= 1.0):
            acc += val  # a masked lane loads a = b = 0 and v = 1: its term is exactly 0, no select needed
        else:
            acc += tl.where(mask, val, 0.0)
    if MODE == SUM:
        total = tl.sum(tl.sum(acc, axis=1), axis=0)
        if OP == OP_VAR:
            total = 0.5 * total
        tl.store(partial_ptr + pid, total)


@triton.jit
def _segment_of_program(n_rchunks, K1, INT64: tl.constexpr):
    """The interleaved kernels' program id, its row chunk, its segment (``kout``) and that one's kept ``(k0, k1)``."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    kout = pid // n_rchunks
    return pid, pid % n_rchunks, kout, kout // K1, kout % K1


@triton.jit
def _mean_and_scale_gradients(d, g, scale, var, OP: tl.constexpr, FAST: tl.constexpr, F64: tl.constexpr):
    """``(db, ds)`` of one element, ``d = a - b``, ``g`` its incoming gradient: d/dmean and d/dσ-term.

    ``OP_NLL``: ``scale = exp(-s)``; ``OP_VAR``: ``scale = 1 / v`` and ``var = v`` (the exact division off FAST).
    """
    if OP == OP_NLL:
        r = d * scale
        db = -(g * r) * scale  # dnll/dm = (m - x) exp(-2s), as -r exp(-s): no exp(-2s) overflow
        ds = g * (1.0 - r * r)
    else:
        if FAST:
            q = d * scale  # d / v within 1.5 ulp
        else:
            q = div(d, var, F64)
        db = -(g * q)  # d/dtarget = -(input - target) / v
        ds = (0.5 * g) * (scale - q * q)  # d/dvar = (1/v - (input - target)^2 / v^2) / 2
    return db, ds


@triton.jit
def _interleaved_difference(a_seg, b_seg, t, lane, SEG, STEP: tl.constexpr, F64: tl.constexpr):
    """Tile ``t`` of an interleaved segment: its offsets, its mask (the ``STEP`` lanes within ``SEG``) and ``a - b``."""
    first = t * STEP
    e = first + lane
    mask = e < tl.minimum(first + STEP, SEG)
    a = tl.load(a_seg + e, mask=mask, other=0.0)
    b = tl.load(b_seg + e, mask=mask, other=0.0)
    return e, mask, upcast(a, F64) - upcast(b, F64)


@triton.jit
def _gaussian_nll_fwd_interleaved_kernel(
    a_ptr, b_ptr, s_ptr, out_ptr, partial_ptr,
    K1, SEG, n_tiles, n_rchunks, chunk_iters,
    a_st, b_st, s_st, o_st,  # each operand's (kept k0..k2, reduced r0..r2) strides, as in the tiled kernel
    OP: tl.constexpr, MODE: tl.constexpr, FULL: tl.constexpr, EPS: tl.constexpr,
    F64: tl.constexpr, INT64: tl.constexpr, FAST: tl.constexpr,
    C: tl.constexpr, STEP: tl.constexpr, BLOCK: tl.constexpr,
):
    """:func:`_gaussian_nll_fwd_kernel` where σ's kept dim (``C`` entries) is the innermost one in memory.

    Channels-last with a per-channel σ: each ``(k0, k1)`` owns a contiguous segment of ``SEG`` elements
    whose channel is ``element % C``. A (C, rows) tile would pad ``C`` to a power of two (3 -> 4: a
    quarter of the lanes idle) and load one element at a time along rows. Here a tile is ``BLOCK``
    contiguous lanes that advance by ``STEP``, a multiple of ``C`` (and of 8 elements, so the loads stay
    aligned vectors) just below ``BLOCK``: every lane keeps its channel in every tile, so σ's terms are
    formed once per lane, and only the ``BLOCK - STEP`` lanes past ``STEP`` idle (8 of 1024 for C = 3).
    """
    pid, pid_r, kout, k0, k1 = _segment_of_program(n_rchunks, K1, INT64)
    a_seg = a_ptr + (k0 * a_st[0] + k1 * a_st[1])
    b_seg = b_ptr + (k0 * b_st[0] + k1 * b_st[1])
    o_seg = out_ptr + (k0 * o_st[0] + k1 * o_st[1])
    lane = tl.arange(0, BLOCK)
    # Per lane, once: the loss's scale and shift for the lane's channel (FULL's constant folded into the shift).
    s = upcast(tl.load(s_ptr + (k0 * s_st[0] + k1 * s_st[1] + (lane % C) * s_st[2])), F64)
    if OP == OP_NLL:
        scale = exp(-s, F64)
        shift = s
        if FULL:
            shift = s + 0.9189385332046727  # log(2 pi) / 2
    else:  # OP_VAR: twice the loss, log v + d^2 / v, halved at the store or the sum
        v = tl.where(s < EPS, EPS, s)  # max(var, eps); a NaN variance stays NaN, as with torch.clamp
        scale = fastmath.rcp_approx(v) if FAST else v
        shift = _log_var(v, EPS, F64, FAST)
        if FULL:
            shift = shift + 1.8378770664093453  # log(2 pi)
    acc = upcast(tl.zeros((BLOCK,), dtype=tl.float32), F64)
    t_start = pid_r * chunk_iters
    t_end = tl.minimum(t_start + chunk_iters, n_tiles)
    for t in range(t_start, t_end):
        e, mask, d = _interleaved_difference(a_seg, b_seg, t, lane, SEG, STEP, F64)
        if OP == OP_NLL:
            r = d * scale  # r before squaring: finite for |s| <= 80 unless the true value is not
            val = 0.5 * r * r + shift
        elif FAST:  # d^2 / v within 1.5 ulp (rcp.approx 1 ulp, one rounding); v = inf gives 0
            val = shift + (d * d) * scale
        else:
            val = shift + div(d * d, scale, F64)
        if MODE == ELEMENTWISE:
            if OP == OP_VAR:
                val = 0.5 * val
            tl.store(o_seg + e, _common.to_element(val, out_ptr), mask=mask)
        else:
            acc += tl.where(mask, val, 0.0)
    if MODE == SUM:
        total = tl.sum(acc, axis=0)
        if OP == OP_VAR:
            total = 0.5 * total
        tl.store(partial_ptr + pid, total)


@triton.jit
def _gaussian_nll_bwd_kernel(
    a_ptr, b_ptr, s_ptr, g_ptr, da_ptr, db_ptr, ds_ptr,
    K, K1, K2, R1, R2, n_kblk, n_rblk, n_rchunks, chunk_iters,
    a_st, b_st, s_st, g_st, o_st,  # each operand's (kept k0..k2, reduced r0..r2) strides
    OP: tl.constexpr, EPS: tl.constexpr, G_SCALAR: tl.constexpr,
    STORE_DA: tl.constexpr, STORE_DB: tl.constexpr, STORE_DS: tl.constexpr,
    F64: tl.constexpr, INT64: tl.constexpr, FAST: tl.constexpr, V_FULL: tl.constexpr, FLAT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Gradients from grad_output ``g``: ``da``, ``db`` elementwise (layout ``o``), ``ds`` as per-chunk partials.

    ``ds_ptr`` is a ``(n_rchunks, K)`` buffer: this program writes row ``pid_r`` at its kept indices.
    ``V_FULL``: ``s`` is per element, read in the tile loop, and ``ds`` is stored elementwise (layout ``o``).
    """
    pid, pid_r, k0, k1, k2 = kept_coords(K1, n_kblk, n_rchunks, INT64, BLOCK_K)
    kmask = k2 < K2
    a_k = kept_offset(k0, k1, k2, a_st)
    b_k = kept_offset(k0, k1, k2, b_st)
    g_k = kept_offset(k0, k1, k2, g_st)
    o_k = kept_offset(k0, k1, k2, o_st)
    s_k = kept_offset(k0, k1, k2, s_st)
    if V_FULL:
        pass  # sigma / the variance per element, in the loop
    elif OP == OP_NLL:
        s = upcast(tl.load(s_ptr + s_k, mask=kmask, other=0.0), F64)
        inv_sigma = exp(-s, F64)[:, None]
    elif OP == OP_VAR:
        v = upcast(tl.load(s_ptr + s_k, mask=kmask, other=1.0), F64)
        v = tl.where(v < EPS, EPS, v)  # the clamp is invisible to autograd: d/dvar is taken at max(var, eps)
        var = v[:, None]
        if FAST:  # 1 ulp; the launcher guarantees v >= 2^-126, so no flush to zero
            inv_var = fastmath.rcp_approx(v)[:, None]
        else:
            inv_var = div(1.0, v, F64)[:, None]
    if G_SCALAR:
        g_all = upcast(tl.load(g_ptr), F64)
    acc = upcast(tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32), F64)
    rb_start = pid_r * chunk_iters
    rb_end = tl.minimum(rb_start + chunk_iters, n_rblk)
    for rb in range(rb_start, rb_end):
        r0, r1, r2 = _reduced_coords(rb, R1, R2, FLAT, BLOCK_R)
        mask = kmask[:, None] & (r2 < R2)[None, :]
        a = tl.load(a_ptr + (a_k[:, None] + reduced_offset(r0, r1, r2, a_st)[None, :]), mask=mask, other=0.0)
        b = tl.load(b_ptr + (b_k[:, None] + reduced_offset(r0, r1, r2, b_st)[None, :]), mask=mask, other=0.0)
        d = upcast(a, F64) - upcast(b, F64)
        if G_SCALAR:
            g = g_all
        else:
            g_off = g_k[:, None] + reduced_offset(r0, r1, r2, g_st)[None, :]
            g = upcast(tl.load(g_ptr + g_off, mask=mask, other=0.0), F64)
        if V_FULL:
            s_off = s_k[:, None] + reduced_offset(r0, r1, r2, s_st)[None, :]
            if OP == OP_NLL:
                inv_sigma = exp_accurate(-upcast(tl.load(s_ptr + s_off, mask=mask, other=0.0), F64), F64, FAST)
            elif OP == OP_VAR:
                var = upcast(tl.load(s_ptr + s_off, mask=mask, other=1.0), F64)
                var = tl.where(var < EPS, EPS, var)
                if FAST:
                    inv_var = fastmath.rcp_approx(var)
                else:
                    inv_var = div(1.0, var, F64)
        if OP == OP_SSE:
            db = -2.0 * (g * d)  # d/dm = 2 (m - x) g
        else:
            db, ds = _mean_and_scale_gradients(d, g, inv_sigma if OP == OP_NLL else inv_var,
                                               var if OP == OP_VAR else None, OP, FAST, F64)
        o_off = o_k[:, None] + reduced_offset(r0, r1, r2, o_st)[None, :]  # dead code unless stored
        if STORE_DA:
            tl.store(da_ptr + o_off, _common.to_element(-db, da_ptr), mask=mask)
        if STORE_DB:
            tl.store(db_ptr + o_off, _common.to_element(db, db_ptr), mask=mask)
        if STORE_DS:
            if V_FULL:
                tl.store(ds_ptr + o_off, _common.to_element(ds, ds_ptr), mask=mask)
            else:
                acc += tl.where(mask, ds, 0.0)
    if STORE_DS and not V_FULL:
        kidx = (k0 * K1 + k1) * K2 + k2
        tl.store(ds_ptr + pid_r * K + kidx, _common.to_element(tl.sum(acc, axis=1), ds_ptr), mask=kmask)


@triton.jit
def _gaussian_nll_bwd_interleaved_kernel(
    a_ptr, b_ptr, s_ptr, g_ptr, da_ptr, db_ptr, ds_ptr,
    K, K1, SEG, n_tiles, n_rchunks, chunk_iters,
    a_st, b_st, s_st, g_st, o_st,  # each operand's (kept k0..k2, reduced r0..r2) strides, as in the tiled kernel
    OP: tl.constexpr, EPS: tl.constexpr, G_FULL: tl.constexpr,
    STORE_DA: tl.constexpr, STORE_DB: tl.constexpr, STORE_DS: tl.constexpr,
    F64: tl.constexpr, INT64: tl.constexpr, FAST: tl.constexpr,
    C: tl.constexpr, STEP: tl.constexpr, BLOCK: tl.constexpr,
):
    """:func:`_gaussian_nll_bwd_kernel` over the tiles of :func:`_gaussian_nll_fwd_interleaved_kernel`.

    ``G_FULL``: grad_output is read per element like ``a``; otherwise it is one value per segment (``"sum"``,
    or ``"per_sample"`` with the sample pinned as ``k0``). ``ds`` is summed per lane, then per channel at the
    end, into row ``pid_r`` of the ``(n_rchunks, K)`` buffer.
    """
    pid, pid_r, kout, k0, k1 = _segment_of_program(n_rchunks, K1, INT64)
    a_seg = a_ptr + (k0 * a_st[0] + k1 * a_st[1])
    b_seg = b_ptr + (k0 * b_st[0] + k1 * b_st[1])
    g_seg = g_ptr + (k0 * g_st[0] + k1 * g_st[1])
    o_k = k0 * o_st[0] + k1 * o_st[1]
    lane = tl.arange(0, BLOCK)
    ch = lane % C
    s = upcast(tl.load(s_ptr + (k0 * s_st[0] + k1 * s_st[1] + ch * s_st[2])), F64)
    if OP == OP_NLL:
        inv_sigma = exp(-s, F64)
    else:
        var = tl.where(s < EPS, EPS, s)  # the clamp is invisible to autograd: d/dvar is taken at max(var, eps)
        if FAST:  # 1 ulp; the launcher guarantees v >= 2^-126, so no flush to zero
            inv_var = fastmath.rcp_approx(var)
        else:
            inv_var = div(1.0, var, F64)
    if not G_FULL:
        g = upcast(tl.load(g_seg), F64)
    acc = upcast(tl.zeros((BLOCK,), dtype=tl.float32), F64)
    t_start = pid_r * chunk_iters
    t_end = tl.minimum(t_start + chunk_iters, n_tiles)
    for t in range(t_start, t_end):
        e, mask, d = _interleaved_difference(a_seg, b_seg, t, lane, SEG, STEP, F64)
        if G_FULL:
            g = upcast(tl.load(g_seg + e, mask=mask, other=0.0), F64)
        db, ds = _mean_and_scale_gradients(d, g, inv_sigma if OP == OP_NLL else inv_var,
                                           var if OP == OP_VAR else None, OP, FAST, F64)
        if STORE_DA:
            tl.store(da_ptr + (o_k + e), _common.to_element(-db, da_ptr), mask=mask)
        if STORE_DB:
            tl.store(db_ptr + (o_k + e), _common.to_element(db, db_ptr), mask=mask)
        if STORE_DS:
            acc += tl.where(mask, ds, 0.0)
    if STORE_DS:
        row = ds_ptr + pid_r * K + kout * C
        for c in tl.static_range(C):
            tl.store(row + c, _common.to_element(tl.sum(tl.where(ch == c, acc, 0.0), axis=0), ds_ptr))


# --------------------------------------------------------------------------------------------- #
# Launchers                                                                                      #
# --------------------------------------------------------------------------------------------- #


def _zero_reduction(shape: tuple[int, ...], reduction: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if reduction == "per_sample":
        return torch.zeros(shape[:1], dtype=dtype, device=device)
    return torch.zeros((), dtype=dtype, device=device)


def _memory_order(a: torch.Tensor, shape: tuple[int, ...], pin_batch: bool) -> tuple[int, ...] | None:
    """The dims of ``shape`` in ``a``'s memory order (outermost first; dim 0 stays first when pinned), or None.

    None when ``a`` is not dense of the full shape, or its dims are already in that order. Every operand
    (and the output) is then seen through the same permutation: nothing in the loss depends on the dim
    order, and channels-last or transposed tensors merge to the contiguous run they are in memory
    (:func:`._common.merge_dims` merges in logical order only), so their loads vectorize.
    """
    n = len(shape)
    if n < 2 or tuple(a.shape) != tuple(shape) or _common.dense_strides(a) is None:
        return None
    real = [d for d in range(n) if shape[d] != 1]
    if all(a.stride(i) >= a.stride(j) for i, j in zip(real, real[1:])):
        return None
    first = [0] if pin_batch else []
    rest = sorted((d for d in range(n) if d not in first), key=lambda d: (shape[d] != 1, -a.stride(d)))
    return tuple(first + rest)


def _permuted(t: torch.Tensor | None, perm: tuple[int, ...] | None, n: int) -> torch.Tensor | None:
    """``t`` (broadcastable to rank ``n``) as a rank-``n`` view with its dims in ``perm`` order (a view, no copy)."""
    if t is None or perm is None:
        return t
    return t[(None,) * (n - t.dim())].permute(perm)


def _unpermute(strides, perm):
    if perm is None or strides is None:
        return strides
    out = [0] * len(perm)
    for i, d in enumerate(perm):
        out[d] = strides[i]
    return tuple(out)


def _forward_plan(a, b, small, shape, reduction, want_out):
    """``(plan, v_full, perm)``: the forward's view of the operands; the fake forward calls it too.

    ``v_full``: a σ / variance of the full shape is read as a third full operand. As a kept operand
    every element would be its own kept index: one tile per program, the program's setup and final
    sum paid per 8 elements; read in the tile loop like ``a``, a program walks many tiles. ``perm``:
    :func:`_memory_order` (the plan is over the permuted shape; outputs are permuted back).
    """
    shape = tuple(shape)
    pin_batch = reduction == "per_sample"
    v_full = small is not None and tuple(small.shape) == shape
    perm = _memory_order(a, shape, pin_batch)
    n = len(shape)
    a, b, small = (_permuted(t, perm, n) for t in (a, b, small))
    if perm is not None:
        shape = tuple(shape[d] for d in perm)
    full = {"a": a, "b": b, "s": small} if v_full else {"a": a, "b": b}
    plan = _common.broadcast_plan(shape, full, None if v_full else small, out_like=a, want_out=want_out,
                                  pin_batch=pin_batch)
    return plan, v_full, perm


def _backward_plan(a, b, small, shape, grad, need_da_db, pin_batch=False):
    """``(plan, v_full, perm)`` of the backward, over the dims in :func:`_memory_order`; the fake calls it too.

    ``v_full``: as in :func:`_forward_plan`; the per-element σ's gradient is then stored like ``da``
    (layout ``o``, x's layout when x is dense: no copy, and the fake backward promises the same).
    ``pin_batch``: dim 0 kept outermost (a per-sample grad_output is then one value per program).
    """
    shape = tuple(shape)
    v_full = small is not None and tuple(small.shape) == shape
    perm = _memory_order(a, shape, pin_batch)
    n = len(shape)
    a, b, small, grad = (_permuted(t, perm, n) for t in (a, b, small, grad))
    if perm is not None:
        shape = tuple(shape[d] for d in perm)
    full = {"a": a, "b": b, "g": grad, "s": small} if v_full else {"a": a, "b": b, "g": grad}
    plan = _common.broadcast_plan(shape, full, None if v_full else small, out_like=a,
                                  want_out=need_da_db or v_full, pin_batch=pin_batch)
    return plan, v_full, perm


def _backward_interleaved(a, b, small, shape, grad, need_da_db, reduction, plan, perm):
    """``(grid, plan, perm)`` for the interleaved backward, or ``(None, plan, perm)`` as given (the tiled one).

    grad_output must be read like x, or be one value per segment: ``"per_sample"`` pins the sample index
    as the outermost kept dim for that (σ's gradient then also holds it, summed by the caller).
    """
    if reduction == "per_sample":
        pinned, _, pinned_perm = _backward_plan(a, b, small, shape, grad, need_da_db, pin_batch=True)
    else:
        pinned, pinned_perm = plan, perm
    names = ("a", "b", "o") if need_da_db else ("a", "b")
    device, f64 = a.device, compute_dtype(a, b, small) == torch.float64
    for names_g, per_segment in ((names + ("g",), ()), (names, ("g",))):
        grid = _interleaved(pinned.layout, names_g, device, f64, per_segment)
        if grid is not None:
            return grid, pinned, pinned_perm
    return None, plan, perm


def _fast(op: int, a: torch.Tensor, cdtype: torch.dtype, eps: float) -> bool:
    """The FAST constexpr: float32 on a CUDA tensor, and (``OP_VAR``) a clamp that keeps ``v`` normal."""
    return fastmath.is_fast(a) and cdtype == torch.float32 and (op != OP_VAR or eps >= _FLT_MIN)


def _flat(layout) -> bool:
    return layout.rsize[0] == 1 and layout.rsize[1] == 1


#: Interleaved path (:func:`_gaussian_nll_fwd_interleaved_kernel`): σ's kept dim innermost in memory with at most
#: this many entries (beyond, the tiled kernel's kept-first tile pads little and loads along it)...
_INTERLEAVED_MAX_C = 16
#: ...and a tile step (a multiple of C and of 8 elements) that idles at most 1/16 of the tile's lanes.
_INTERLEAVED_MAX_IDLE = 1 / 16


class _Interleaved(NamedTuple):
    c: int  # σ's entries along the interleaved dim
    step: int  # elements per tile: a multiple of c and of 8, at most block
    block: int  # lanes per tile
    n_tiles: int
    n_rchunks: int
    chunk_iters: int
    programs: int
    int64: bool


def _interleaved(layout, names, device, f64: bool, per_segment=()) -> _Interleaved | None:
    """The interleaved kernels' grid when every operand in ``names`` is ``(k0, k1)`` segments of ``(rows, C)``
    row-major (channels-last with a per-channel σ) and those in ``per_segment`` are one value per segment,
    else None (the tiled kernels). ``f64``: half the lanes (each holds σ's terms in registers)."""
    c, rows = layout.ksize[2], layout.rsize[2]
    if not (2 <= c <= _INTERLEAVED_MAX_C and _flat(layout)):
        return None
    if any(layout.kstride[n][2] != 1 or layout.rstride[n][2] != c for n in names):
        return None
    if any(layout.kstride[n][2] != 0 or layout.rstride[n][2] != 0 for n in per_segment):
        return None
    seg = rows * c
    unit = c * 8 // math.gcd(c, 8)  # a step of whole channel groups and whole 8-element (16-byte) vectors
    tile = _common.BROADCAST_TILE // 2 if f64 else _common.BROADCAST_TILE
    block = max(min(tile, triton.next_power_of_2(seg)), triton.next_power_of_2(unit))
    step = block - block % unit
    if block - step > block * _INTERLEAVED_MAX_IDLE:
        return None
    n_seg = layout.ksize[0] * layout.ksize[1]
    n_tiles = -(-seg // step)
    target = _common.target_programs(device)
    n_rchunks = 1 if n_seg >= target else min(n_tiles, -(-target // n_seg))
    chunk_iters = -(-n_tiles // n_rchunks)
    n_rchunks = -(-n_tiles // chunk_iters)
    programs = n_seg * n_rchunks
    # 64-bit index math when an offset a program forms (masked lanes included) may pass 2^31.
    reach = max(sum((size - 1) * abs(st) for size, st in zip(layout.ksize[:2], layout.kstride[n][:2]))
                for n in names) + n_tiles * step + block
    return _Interleaved(c, step, block, n_tiles, n_rchunks, chunk_iters, programs, reach >= _common.INT32_LIMIT)


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
    plan, v_full, perm = _forward_plan(a, b, small, shape, reduction, want_out=reduction == "none")
    layout = plan.layout
    names = ("a", "b", "o") if reduction == "none" else ("a", "b")
    inter = None if v_full or plan.small is None else _interleaved(layout, names, device, cdtype == torch.float64)
    grid = inter or _common.broadcast_grid(layout, device, lead="a", per_k_partials=False)
    if reduction == "none":
        out = _common.empty(shape, out_dtype, device, _unpermute(plan.out_strides, perm))
        partial = out  # unused
    else:
        partial = _common.empty((grid.programs,), cdtype, device)
        out = partial  # unused
    if inter is not None:
        _gaussian_nll_fwd_interleaved_kernel[(inter.programs,)](
            plan.full["a"], plan.full["b"], plan.small, out, partial,
            layout.ksize[1], layout.rsize[2] * inter.c, inter.n_tiles, inter.n_rchunks, inter.chunk_iters,
            *(_common.layout_strides(layout, n) for n in ("a", "b", "s")),
            _common.layout_strides(layout, "o" if reduction == "none" else None),
            OP=op, MODE=ELEMENTWISE if reduction == "none" else SUM, FULL=bool(full), EPS=float(eps),
            F64=cdtype == torch.float64, INT64=inter.int64, FAST=_fast(op, a, cdtype, eps),
            C=inter.c, STEP=inter.step, BLOCK=inter.block, num_warps=_NUM_WARPS,
        )
        return _finish_forward(out, partial, reduction, shape)
    if v_full:
        s_ptr = plan.full["s"]
    else:
        s_ptr = plan.small if plan.small is not None else plan.full["a"]  # unused for the SSE
    has_s = v_full or plan.small is not None
    _gaussian_nll_fwd_kernel[(grid.programs,)](
        plan.full["a"], plan.full["b"], s_ptr, out, partial,  # out: the plan's "o" strides address it as is
        layout.ksize[1], layout.ksize[2], layout.rsize[1], layout.rsize[2],
        grid.n_kblk, grid.n_rblk, grid.n_rchunks, grid.chunk_iters,
        *(_common.layout_strides(layout, n) for n in ("a", "b", "s" if has_s else None)),
        _common.layout_strides(layout, "o" if reduction == "none" else None),
        OP=op, MODE=ELEMENTWISE if reduction == "none" else SUM, FULL=bool(full), EPS=float(eps),
        F64=cdtype == torch.float64, INT64=grid.int64, FAST=_fast(op, a, cdtype, eps), V_FULL=v_full,
        FLAT=_flat(layout), BLOCK_K=grid.block_k, BLOCK_R=grid.block_r, num_warps=_NUM_WARPS,
    )
    return _finish_forward(out, partial, reduction, shape)


def _finish_forward(out, partial, reduction, shape):
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
    plan, v_full, perm = _backward_plan(a, b, small, shape, grad, need_a or need_b)
    inter = None
    if small is not None and not v_full:
        inter, plan, perm = _backward_interleaved(a, b, small, shape, grad, need_a or need_b, reduction, plan, perm)
    out_strides = _unpermute(plan.out_strides, perm)
    layout = plan.layout
    grid = inter or _common.broadcast_grid(layout, device, lead="a", per_k_partials=need_s and not v_full)
    # A pinned sample index that σ does not have: ds's kept dims hold it too, summed below with the chunks.
    batch_rows = layout.ksize[0] if inter is not None and layout.kstride["s"][0] == 0 else 1
    # da / db go straight to the caller where the operand has the full shape; a broadcast operand (only
    # possible for torch's input / target) gets a full-size float buffer summed down afterwards.
    da = db = None
    if need_a:
        direct = tuple(a.shape) == shape
        da = _common.empty(shape, a.dtype if direct else cdtype, device, out_strides)
    if need_b:
        direct = tuple(b.shape) == shape
        db = _common.empty(shape, b.dtype if direct else cdtype, device, out_strides)
    K = math.prod(layout.ksize)
    # One chunk: the buffer is the gradient itself, so it takes σ's dtype (the kernel rounds once, at the
    # store). Several: float partial sums, added in a fixed order below.
    ds_partial = None
    per_element = need_s and v_full
    if per_element:  # stored elementwise, like da (layout "o")
        ds_partial = _common.empty(shape, small.dtype, device, out_strides)
    elif need_s:
        ds_dtype = small.dtype if grid.n_rchunks * batch_rows == 1 and not plan.small_materialised else cdtype
        ds_partial = _common.empty((grid.n_rchunks, K), ds_dtype, device)
    dummy = plan.full["a"]
    g_scalar = all(st == 0 for st in layout.kstride["g"] + layout.rstride["g"])
    if inter is not None:
        _gaussian_nll_bwd_interleaved_kernel[(inter.programs,)](
            plan.full["a"], plan.full["b"], plan.small, plan.full["g"], da if da is not None else dummy,
            db if db is not None else dummy, ds_partial if ds_partial is not None else dummy,
            K, layout.ksize[1], layout.rsize[2] * inter.c, inter.n_tiles, inter.n_rchunks, inter.chunk_iters,
            *(_common.layout_strides(layout, n) for n in ("a", "b", "s", "g")),
            _common.layout_strides(layout, "o" if plan.out_strides is not None else None),
            OP=op, EPS=float(eps), G_FULL=layout.rstride["g"][2] != 0, STORE_DA=da is not None,
            STORE_DB=db is not None, STORE_DS=need_s, F64=cdtype == torch.float64, INT64=inter.int64,
            FAST=_fast(op, a, cdtype, eps), C=inter.c, STEP=inter.step, BLOCK=inter.block, num_warps=_NUM_WARPS,
        )
    else:
        _gaussian_nll_bwd_kernel[(grid.programs,)](
            plan.full["a"], plan.full["b"], plan.full["s"] if v_full else plan.small if plan.small is not None else dummy,
            plan.full["g"], da if da is not None else dummy, db if db is not None else dummy,
            ds_partial if ds_partial is not None else dummy,
            K, layout.ksize[1], layout.ksize[2], layout.rsize[1], layout.rsize[2],
            grid.n_kblk, grid.n_rblk, grid.n_rchunks, grid.chunk_iters,
            *(_common.layout_strides(layout, n) for n in ("a", "b", "s" if v_full or plan.small is not None else None,
                                                          "g")),
            _common.layout_strides(layout, "o" if plan.out_strides is not None else None),
            OP=op, EPS=float(eps), G_SCALAR=g_scalar, STORE_DA=da is not None, STORE_DB=db is not None,
            STORE_DS=need_s, F64=cdtype == torch.float64, INT64=grid.int64, FAST=_fast(op, a, cdtype, eps),
            V_FULL=v_full, FLAT=_flat(layout), BLOCK_K=grid.block_k, BLOCK_R=grid.block_r, num_warps=_NUM_WARPS,
        )
    if da is not None and tuple(a.shape) != shape:
        da = da.sum_to_size(a.shape).to(a.dtype)
    if db is not None and tuple(b.shape) != shape:
        db = db.sum_to_size(b.shape).to(b.dtype)
    ds = None
    if per_element:
        ds = ds_partial
    elif need_s:
        if batch_rows > 1:
            ds = ds_partial.view(grid.n_rchunks * batch_rows, K // batch_rows).sum(dim=0)
        else:
            ds = ds_partial[0] if grid.n_rchunks == 1 else ds_partial.sum(dim=0)  # fixed order: deterministic
        # ds is in the kept order of the (permuted) plan: σ's dims, row-major in the permuted order.
        inverse = None if perm is None else tuple(sorted(range(len(perm)), key=perm.__getitem__))
        if plan.small_materialised:
            ds = ds.view(tuple(shape[d] for d in perm) if perm else shape)
            ds = (ds.permute(inverse) if perm else ds).sum_to_size(small.shape)
        elif perm is not None:
            ds = ds.reshape(_permuted(small, perm, len(shape)).shape).permute(inverse)
        ds = ds.reshape(small.shape).to(small.dtype)
    return da, db, ds


# --------------------------------------------------------------------------------------------- #
# Custom ops with autograd, and the backend entry points                                        #
# --------------------------------------------------------------------------------------------- #
#
# Each op's forward and backward launchers are ``torch.library`` custom ops tied together by
# ``register_autograd``, as in :mod:`.sample_kl` (where the choice is explained): one opaque node
# for ``torch.compile`` (in eager mode, an autograd.Function of the same implementations:
# ``_custom_op.call``). The fake implementations mirror the launchers' outputs exactly (shape,
# dtype and strides: inductor asserts the strides of a custom op's outputs). A ``"none"`` output and
# the gradients of full-size operands follow ``_plan``'s ``out_strides`` (the layout of ``x`` /
# ``input`` when it is dense), so the fakes run the same ``_plan``; every other output is contiguous.


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
    plan, _, perm = _forward_plan(a, b, small, shape, reduction, want_out=True)
    return a.new_empty_strided(shape, _unpermute(plan.out_strides, perm), dtype=out_dtype)


def _backward_outputs(a, b, small, shape, grads):
    """Gradients of ``_backward`` as op outputs: placeholders for None, contiguous where the fake says so."""
    outputs = []
    for operand, g in zip((a, b, small), grads):
        if g is None:
            outputs.append(_custom_op.absent(a))
        elif tuple(operand.shape) != shape or math.prod(shape) == 0:
            outputs.append(_custom_op.dense(g))
        else:
            outputs.append(g)  # allocated with the plan's out_strides
    return tuple(outputs)


def _fake_backward(a, b, small, shape, grad, reduction, needs):
    """The outputs of :func:`_backward_outputs` without launching."""
    need_a, need_b, need_s = needs[0], needs[1], needs[2] and small is not None
    out_strides = None
    if (need_a or need_b or need_s) and math.prod(shape) != 0:
        if reduction == "per_sample":
            grad = grad.reshape(grad.shape + (1,) * (len(shape) - 1))
        plan, _, perm = _backward_plan(a, b, small, shape, grad, need_a or need_b)
        out_strides = _unpermute(plan.out_strides, perm)
    outputs = []
    for i, (operand, needed) in enumerate(((a, need_a), (b, need_b), (small, need_s))):
        if not needed:
            outputs.append(_custom_op.absent(a))
        elif i == 2 and tuple(operand.shape) == shape and out_strides is not None:
            outputs.append(operand.new_empty_strided(shape, out_strides))  # a per-element σ: stored like da
        elif i == 2 or tuple(operand.shape) != shape or out_strides is None:
            outputs.append(operand.new_empty(operand.shape))
        else:
            outputs.append(operand.new_empty_strided(shape, out_strides))
    return tuple(outputs)


def _needs(ctx, count: int) -> tuple[bool, ...]:
    return tuple(bool(n) for n in ctx.needs_input_grad[:count])


# gaussian_nll ------------------------------------------------------------------------------------


def _gaussian_nll_forward_impl(x, mean, log_sigma, full, reduction):
    return _forward(OP_NLL, x, mean, log_sigma, tuple(x.shape), reduction=reduction, full=full)


_gaussian_nll_forward_op = torch.library.custom_op(
    _custom_op.op_name("gaussian_nll_forward"), _gaussian_nll_forward_impl,
    mutates_args=(),
    schema="(Tensor x, Tensor mean, Tensor log_sigma, bool full, str reduction) -> Tensor",
)


@_gaussian_nll_forward_op.register_fake
def _(x, mean, log_sigma, full, reduction):
    return _fake_forward(x, mean, log_sigma, tuple(x.shape), reduction)


def _gaussian_nll_backward_impl(grad, x, mean, log_sigma, reduction, need_x, need_mean, need_log_sigma):
    shape = tuple(x.shape)
    grads = _backward(OP_NLL, x, mean, log_sigma, shape, grad, reduction=reduction,
                      needs=(need_x, need_mean, need_log_sigma))
    return _backward_outputs(x, mean, log_sigma, shape, grads)


_gaussian_nll_backward_op = torch.library.custom_op(
    _custom_op.op_name("gaussian_nll_backward"), _gaussian_nll_backward_impl,
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor mean, Tensor log_sigma, str reduction, bool need_x, bool need_mean, "
    "bool need_log_sigma) -> (Tensor, Tensor, Tensor)",
)


@_gaussian_nll_backward_op.register_fake
def _(grad, x, mean, log_sigma, reduction, need_x, need_mean, need_log_sigma):
    return _fake_backward(x, mean, log_sigma, tuple(x.shape), grad, reduction, (need_x, need_mean, need_log_sigma))


def _gaussian_nll_setup_context(ctx, inputs, output):
    x, mean, log_sigma, _full, reduction = inputs
    ctx.save_for_backward(x, mean, log_sigma)
    ctx.reduction = reduction


def _gaussian_nll_backward(run_backward, ctx, grad):
    x, mean, log_sigma = ctx.saved_tensors
    needs = _needs(ctx, 3)
    if not any(needs):
        return None, None, None, None, None
    dx, dm, ds = run_backward(grad, x, mean, log_sigma, ctx.reduction, *needs)
    return dx if needs[0] else None, dm if needs[1] else None, ds if needs[2] else None, None, None


_GaussianNLL = _custom_op.register(_gaussian_nll_forward_op, _gaussian_nll_forward_impl, _gaussian_nll_setup_context,
                                   _gaussian_nll_backward, torch.ops.fusedvae.gaussian_nll_backward,
                                   _gaussian_nll_backward_impl)


# backend entry points ----------------------------------------------------------------------------


def gaussian_nll(
    x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor, *, full: bool, reduction: str
) -> torch.Tensor:
    """``r^2/2 + s [+ log(2 pi)/2]``, ``r = (x - mean) exp(-s)``; ``"none"`` (result dtype), ``"sum"``, ``"per_sample"``

    ``log_sigma`` broadcasts to ``x`` by strides; its gradient is summed over the broadcast positions.
    Runs the ``fusedvae::gaussian_nll_forward`` custom op (``..._backward`` in backward) under torch.compile,
    the same implementations through an autograd.Function in eager mode.
    """
    return _custom_op.call(torch.ops.fusedvae.gaussian_nll_forward, _GaussianNLL, x, mean, log_sigma, bool(full),
                           reduction)
