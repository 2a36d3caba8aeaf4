"""Philox4x32-10 and its four Box-Muller normals in Triton, bit for bit as :mod:`fusedvae.reference.philox`.

The noise of logical element ``j`` under ``seed`` is normal ``j mod 4`` of Philox block ``j div 4``:
the block's counter ``c`` goes in as the words ``(c lo, c hi, 0, 0)``, the key is ``(seed lo, seed
hi)``, and the four output words make two Box-Muller pairs, cosine and sine halves both used::

    u1 = ((r0 >> 8) + 1) * 2^-24      in (0, 1], so log(u1) is finite
    u2 = (r1 >> 8) * 2^-24            in [0, 1)
    normals 0, 1 = sqrt(-2 log u1) * (cos(2 pi u2), sin(2 pi u2));   normals 2, 3: the same of (r2, r3)

Two ways to draw it, the same numbers: :func:`philox_normal_tile` draws each block once for a tile
of whole blocks (a quarter of the Philox work and half the transcendental work per normal: the
kernels' path whenever the row length and the offset are multiples of 4), and
:func:`philox_normal_at` draws the block of each element on its own (any tiling, any offset).
Keyed by the logical index, never by the program or the block, so a kernel regenerates any
element's noise under any tiling (the backward pass tiles differently from the forward pass). The
integer part matches the reference exactly; only ``log``, ``sqrt``, ``cos``, ``sin`` round: a few ulps
on the exact path (the interpreter, float64), at most ``1e-6 (1 + radius)`` absolute on the ``FAST``
path a launcher takes for float32 on a GPU (:func:`_box_muller_fast`, :mod:`.fastmath`: ~9 instructions
per normal beside Philox's ~11, against ~28). Triton ships ``tl.philox`` with the same rounds, but the
helper here owns the counter layout and the constants so the bit-for-bit contract does not depend on a
Triton release.

The launchers at the bottom (:func:`philox_words`, :func:`philox_normal`) exist for the parity tests
and the parity tool; the fused kernels call the ``@triton.jit`` helpers directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fastmath

# Philox4x32 multipliers and Weyl key increments (Salmon et al. 2011), as in the reference.
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
PHILOX_ROUNDS = tl.constexpr(10)
TWO_PI = tl.constexpr(6.283185307179586)
TWO_POW_MINUS_24 = tl.constexpr(5.9604644775390625e-08)  # 2^-24, exact in every float dtype
TWO_PI_POW_MINUS_24 = tl.constexpr(3.745070282923285e-07)  # 2 pi 2^-24: one turn over the 24-bit u2
MINUS_TWO_LN2 = tl.constexpr(-1.3862943611198906)
#: Below this ``w = 1 - u1`` the FAST path's -2 log u1 is a series: lg2.approx's error is absolute near 1.
SERIES_BELOW = tl.constexpr(0.015625)


@triton.jit
def _mulhilo32(a, multiplier: tl.constexpr):
    """High and low uint32 words of ``multiplier * a``: one widening 32x32->64 multiply."""
    product = a.to(tl.uint64) * multiplier
    return (product >> 32).to(tl.uint32), product.to(tl.uint32)


@triton.jit
def _mulhilo32_ptx(a, multiplier: tl.constexpr):
    """:func:`_mulhilo32` as PTX ``mul.hi``/``mul.lo`` (one ``IMAD.WIDE.U32``), opaque to LLVM.

    Written in Triton, LLVM folds the round's uint32 XORs into 64-bit ones; the multiply's operand is
    then no longer a zero-extended 32-bit word, and ptxas emits a 64-bit multiply: an ``IADD3`` of a zero
    high word per round (~1 instruction per normal). The PTX keeps the operand 32-bit. GPU only.
    """
    if multiplier == PHILOX_M0:
        hi, lo = tl.inline_asm_elementwise("mul.hi.u32 $0, $2, 0xD2511F53; mul.lo.u32 $1, $2, 0xD2511F53;",
                                           "=r,=r,r", [a], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
    else:
        tl.static_assert(multiplier == PHILOX_M1)
        hi, lo = tl.inline_asm_elementwise("mul.hi.u32 $0, $2, 0xCD9E8D57; mul.lo.u32 $1, $2, 0xCD9E8D57;",
                                           "=r,=r,r", [a], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
    return hi, lo


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1, FAST: tl.constexpr):
    """Ten Philox4x32 rounds on uint32 blocks ``c0..c3`` with the key ``(k0, k1)`` (int64 scalars < 2^32).

    Every wrapping sum and product is taken in 64 bits and truncated, so nothing overflows a 32-bit
    integer (Triton's overflow sanitizer, on under ``TRITON_DEBUG``, would flag a wrapping uint32 op).
    The round keys are scalars (uniform registers, once per program). ``FAST`` (a GPU): the products
    by :func:`_mulhilo32_ptx`, the same words.
    """
    for round_index in tl.static_range(PHILOX_ROUNDS):
        round_k0 = ((k0 + round_index * PHILOX_W0) & 0xFFFFFFFF).to(tl.uint32)
        round_k1 = ((k1 + round_index * PHILOX_W1) & 0xFFFFFFFF).to(tl.uint32)
        if FAST:
            hi0, lo0 = _mulhilo32_ptx(c0, PHILOX_M0)
            hi1, lo1 = _mulhilo32_ptx(c2, PHILOX_M1)
        else:
            hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
            hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ round_k0, lo1, hi0 ^ c3 ^ round_k1, lo0
    return c0, c1, c2, c3


@triton.jit
def philox_counter_words(seed, counter, FAST: tl.constexpr):
    """The four uint32 output words for int64 ``counter`` (a block) under the int64 scalar ``seed``."""
    seed = seed.to(tl.int64)
    counter = counter.to(tl.int64)  # a no-op on the kernels' int64 counters; small interpreter scalars are int32
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = c0 ^ c0
    return philox4x32_10(c0, c1, zero, zero, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, FAST)


@triton.jit
def _cos_sin_turns(u):
    """``(cos, sin)(2 pi u)`` in float32 for ``u`` in [0, 1): bounded range, one reduction for both, no libdevice.

    ``u = q/4 + r`` with ``q = round(4u)`` and ``|r| <= 1/8`` (exact: ``u`` is a multiple of 2^-24), so
    ``x = 2 pi r`` is within ``pi/4``, where Taylor polynomials to ``x^9`` (sin) and ``x^10`` (cos) are
    within 3e-8 of the truth; the quadrant ``q`` swaps and negates them. ~20 instructions for both,
    against ~25 for each of libdevice's ``cosf``/``sinf`` (with a Payne-Hanek path for huge arguments).
    """
    q = tl.floor(u * 4.0 + 0.5)
    x = (u - q * 0.25) * TWO_PI
    x2 = x * x
    s = x2 * 2.7557319223985893e-06 - 1.984126984126984e-04
    s = s * x2 + 8.333333333333333e-03
    s = s * x2 - 0.16666666666666666
    s = x + x * x2 * s
    c = x2 * -2.755731922398589e-07 + 2.48015873015873e-05
    c = c * x2 - 1.388888888888889e-03
    c = c * x2 + 4.1666666666666664e-02
    c = c * x2 - 0.5
    c = c * x2 + 1.0
    quadrant = q.to(tl.int32) & 3  # cos(x + q pi/2), sin(x + q pi/2): (c, s), (-s, c), (-c, -s), (s, -c)
    swap = (quadrant & 1) == 1
    cos_part = tl.where(swap, s, c)
    sin_part = tl.where(swap, c, s)
    cos_sign = tl.where((quadrant == 1) | (quadrant == 2), -1.0, 1.0)
    sin_sign = tl.where(quadrant >= 2, -1.0, 1.0)
    return cos_part * cos_sign, sin_part * sin_sign


@triton.jit
def _box_muller_fast(ra, rb):
    """:func:`_box_muller` in float32 by the GPU's approximations (:mod:`.fastmath`): ~20 instructions a pair.

    ``-2 log u1`` by ``lg2.approx`` (absolute error 2^-22 near 1, relative elsewhere), except for
    ``w = 1 - u1 < 1/64`` (exact: u1 is a multiple of 2^-24), where that absolute error would be large
    against the small radius: there the series ``2w + w^2 + 2/3 w^3`` (truncation < 1e-6 relative).
    The angle: the word's top 24 bits read as a signed integer ``k`` (one arithmetic shift) give
    ``2 pi k 2^-24``, in [-pi, pi) where ``sin/cos.approx`` are accurate (2^-20.9 absolute), and equal
    to ``2 pi u2`` modulo ``2 pi``. Error against the exact pair: ``|d eps| <= 1e-6 (1 + radius)``
    (radius <= 5.77: <= 7e-6; ~2e-6 at the typical radius 1.25), from lg2 (<= 9.3e-7 through the
    square root at ``w = 1/64``), sin/cos (5.2e-7 x radius) and the angle's rounding (2.1e-7 x radius).
    """
    u1 = ((ra >> 8) + 1).to(tl.float32) * TWO_POW_MINUS_24
    w = 1.0 - u1
    series = ((w * 0.6666666666666666 + 1.0) * w + 2.0) * w
    radius = fastmath.sqrt_approx(tl.where(w < SERIES_BELOW, series, fastmath.log2_approx(u1) * MINUS_TWO_LN2))
    angle = (rb.to(tl.int32, bitcast=True) >> 8).to(tl.float32) * TWO_PI_POW_MINUS_24
    return radius * fastmath.cos_approx(angle), radius * fastmath.sin_approx(angle)


@triton.jit
def _box_muller(ra, rb, DTYPE: tl.constexpr, FAST: tl.constexpr):
    """The pair ``sqrt(-2 log u1) * (cos, sin)(2 pi u2)`` of the words ``ra``, ``rb``.

    ``FAST`` (a GPU, float32): :func:`_box_muller_fast`; otherwise a few ulps of the reference.
    """
    if FAST and DTYPE == tl.float32:
        n0, n1 = _box_muller_fast(ra, rb)
    else:
        u1 = ((ra >> 8) + 1).to(DTYPE) * TWO_POW_MINUS_24
        u2 = (rb >> 8).to(DTYPE) * TWO_POW_MINUS_24
        # tl.log stays: on sm_90 libdevice's logf measured 3.5 instructions per element cheaper here than
        # _common.log_positive_f32 (bench static, see bench/NOTES.md).
        radius = tl.sqrt(-2.0 * tl.log(u1))
        if DTYPE == tl.float64:  # float64 keeps the general routines (its polynomials would need twice the terms)
            angle = u2 * TWO_PI
            cos_u, sin_u = tl.cos(angle), tl.sin(angle)
        else:
            cos_u, sin_u = _cos_sin_turns(u2)
        n0, n1 = radius * cos_u, radius * sin_u
    return n0, n1


@triton.jit
def philox_normal_at(seed, index, DTYPE: tl.constexpr, FAST: tl.constexpr):
    """The standard normal of each int64 logical ``index`` (any shape), in ``DTYPE``: one Philox call per element."""
    r0, r1, r2, r3 = philox_counter_words(seed, index >> 2, FAST)
    lane = index & 3
    high = lane >= 2
    cos_half, sin_half = _box_muller(tl.where(high, r2, r0), tl.where(high, r3, r1), DTYPE, FAST)
    return tl.where((lane & 1) == 1, sin_half, cos_half)


@triton.jit
def philox_normal_tile(seed, blocks, DTYPE: tl.constexpr, FAST: tl.constexpr):
    """The normals of the 2-D int64 Philox ``blocks`` ``(R, G)``, interleaved to ``(R, 4 G)``: one call per four.

    Column ``4 g + l`` holds normal ``l`` of block ``blocks[:, g]``, so for blocks ``(j0 + 4 g) / 4``
    the result is the noise of logical indices ``j0 .. j0 + 4 G - 1`` in order.
    """
    n0, n1, n2, n3 = _block_normals(seed, blocks, DTYPE, FAST)
    # join(join(n0, n2), join(n1, n3))[..., p, q] is normal 2 p + q: row-major (G, 2, 2) -> 4 G in order.
    normals = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(normals, [blocks.shape[0], blocks.shape[1] * 4])


@triton.jit
def philox_normal_tile_pairs(seed, blocks, DTYPE: tl.constexpr, FAST: tl.constexpr):
    """:func:`philox_normal_tile` of the blocks ``blocks[:, g]`` and ``blocks[:, g] + 1``, to ``(R, 8 G)``.

    The same numbers, laid out eight consecutive normals to a thread: the layout of a 128-bit load of
    16-bit elements, so the noise meets ``mu`` without a trip through shared memory (four to a thread,
    :func:`philox_normal_tile`'s, cost ~3 instructions per element to convert in bfloat16).
    """
    a0, a1, a2, a3 = _block_normals(seed, blocks, DTYPE, FAST)
    b0, b1, b2, b3 = _block_normals(seed, blocks + 1, DTYPE, FAST)
    # [..., p, q, s] is normal 4 p + 2 q + s of the pair (a: p = 0, b: p = 1): row-major (G, 2, 2, 2) -> 8 G.
    normals = tl.join(tl.join(tl.join(a0, b0), tl.join(a2, b2)), tl.join(tl.join(a1, b1), tl.join(a3, b3)))
    return tl.reshape(normals, [blocks.shape[0], blocks.shape[1] * 8])


@triton.jit
def _block_normals(seed, blocks, DTYPE: tl.constexpr, FAST: tl.constexpr):
    r0, r1, r2, r3 = philox_counter_words(seed, blocks, FAST)
    n0, n1 = _box_muller(r0, r1, DTYPE, FAST)
    n2, n3 = _box_muller(r2, r3, DTYPE, FAST)
    return n0, n1, n2, n3


@triton.jit
def philox_normal_rows(seed, first, BLOCK_N: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, DTYPE: tl.constexpr,
                       FAST: tl.constexpr, PAIRS: tl.constexpr = False):
    """``(R, BLOCK_N)`` normals: row ``r`` holds logical indices ``first[r] ..`` ``first[r] + BLOCK_N - 1`` (int64).

    ``WHOLE_BLOCKS`` (every ``first`` a multiple of 4, ``BLOCK_N`` too) draws each Philox block once.
    ``FAST``: the GPU's approximations (:func:`_box_muller_fast`); launchers pass :func:`.fastmath.is_fast`.
    ``PAIRS``: eight normals to a thread (:func:`philox_normal_tile_pairs`: 16-bit tensors whose columns are one
    contiguous dim, loaded 128 bits at a time), the same numbers.
    """
    if WHOLE_BLOCKS and PAIRS and BLOCK_N % 8 == 0:
        eps = philox_normal_tile_pairs(seed, (first >> 2)[:, None] + 2 * tl.arange(0, BLOCK_N // 8)[None, :], DTYPE,
                                       FAST)
    elif WHOLE_BLOCKS:
        eps = philox_normal_tile(seed, (first >> 2)[:, None] + tl.arange(0, BLOCK_N // 4)[None, :], DTYPE, FAST)
    else:
        eps = philox_normal_at(seed, first[:, None] + tl.arange(0, BLOCK_N)[None, :], DTYPE, FAST)
    return eps


@triton.jit
def _philox_words_kernel(out_ptr, seed: tl.int64, offset: tl.int64, numel, FAST: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < numel
    r0, r1, r2, r3 = philox_counter_words(seed, offset + index, FAST)
    tl.store(out_ptr + index, r0.to(tl.int64), mask=mask)
    tl.store(out_ptr + numel + index, r1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 2 * numel + index, r2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 3 * numel + index, r3.to(tl.int64), mask=mask)


@triton.jit
def _philox_normal_kernel(out_ptr, seed: tl.int64, offset: tl.int64, numel, TILE: tl.constexpr, FAST: tl.constexpr,
                          BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if TILE:  # offset % 4 == 0: whole blocks, one Philox call per four normals
        blocks = ((offset >> 2) + tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4))[None, :]
        eps = tl.reshape(philox_normal_tile(seed, blocks, out_ptr.dtype.element_ty, FAST), [BLOCK])
    else:
        eps = philox_normal_at(seed, offset + index, out_ptr.dtype.element_ty, FAST)
    tl.store(out_ptr + index, eps, mask=index < numel)


_BLOCK = 1024


def philox_words(seed: int, offset: int, numel: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """The raw Philox words ``(r0, r1, r2, r3)`` of counters ``offset .. offset + numel - 1``: int64 ``(4, numel)``.

    Compare with :func:`fusedvae.reference.philox4x32`. Runs on CUDA tensors, or on CPU under
    ``TRITON_INTERPRET=1``. Example::

        >>> philox_words(1234, 0, 3).shape  # doctest: +SKIP
        torch.Size([4, 3])
    """
    out = torch.empty(4, numel, dtype=torch.int64, device=device)
    if numel:
        _philox_words_kernel[(triton.cdiv(numel, _BLOCK),)](out, seed, offset, numel, FAST=fastmath.is_fast(out),
                                                            BLOCK=_BLOCK)
    return out


def philox_normal(
    seed: int, offset: int, numel: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``numel`` normals of logical indices ``offset .. offset + numel - 1``, as the reference's ``philox_normal``.

    A multiple-of-4 ``offset`` takes the kernels' whole-block path (:func:`philox_normal_tile`), any
    other the per-element one (:func:`philox_normal_at`). Example::

        >>> philox_normal(1234, 0, 3).shape  # doctest: +SKIP
        torch.Size([3])
    """
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    out = torch.empty(numel, dtype=dtype, device=device)
    if numel:
        _philox_normal_kernel[(triton.cdiv(numel, _BLOCK),)](out, seed, offset, numel, TILE=offset % 4 == 0,
                                                            FAST=fastmath.is_fast(out), BLOCK=_BLOCK)
    return out


if fastmath.EMULATED:  # the interpreter has no PTX (see fastmath.EMULATED): mul.hi/mul.lo by the 64-bit product

    @triton.jit
    def _mulhilo32_ptx(a, multiplier: tl.constexpr):  # noqa: F811
        tl.static_assert((multiplier == PHILOX_M0) or (multiplier == PHILOX_M1))
        product = a.to(tl.uint64) * multiplier
        return (product >> 32).to(tl.uint32), (product & 0xFFFFFFFF).to(tl.uint32)
