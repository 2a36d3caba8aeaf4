"""The GPU's hardware approximations (PTX ``*.approx.ftz.f32``) as Triton functions, for the kernels' FAST path.

Each wrapper is one PTX instruction, one ``MUFU`` op in SASS (``rcp``/``rsqrt``/``lg2``/``ex2``/``sin``/``cos``;
``sqrt.approx`` is ``MUFU.RSQ`` and a multiply), against libdevice's general routines of ~20-30
instructions. Errors (PTX ISA, "Floating Point Instructions"; ``ftz``: subnormal inputs and results
are flushed to sign-preserving zero):

- ``log2_approx``: absolute error <= 2^-22 for ``x`` in [0.5, 2], relative 2^-22 elsewhere.
- ``ex2_approx``: relative error <= 2^-22 (~2 ulp) for every input, but the input is ``x log2 e``
  rounded: ``ex2_approx(x * log2e)`` (what Triton makes of a float32 ``tl.exp``) is off by
  ``|x| x 6e-8`` relative (5e-6 at ``x = 80``). :func:`exp_accurate_f32` avoids that.
- ``rcp_approx``, ``sqrt_approx``, ``rsqrt_approx``: relative error ~2^-23 (1 ulp) or better.
- ``sin_approx``, ``cos_approx``: absolute error <= 2^-20.9 in [-pi, pi] only (the hardware reduces
  the argument coarsely): centre the argument first.

Why a ``FAST: tl.constexpr`` in every caller. Inline PTX cannot run under ``TRITON_INTERPRET=1`` (the
interpreter has no assembler), and the interpreter is where the CPU tests check the kernels. So
the kernels keep their exact float32 path (bounded-range polynomials, :mod:`._common`'s exp/log)
and take these wrappers only when their ``FAST`` constexpr is True, which the launchers set to
``tensor.is_cuda``: True on every real (and stub-compiled, :mod:`bench.static`) CUDA launch, False
under the interpreter. The FAST path's numbers are therefore checked on a GPU only (parity
tolerances widened there), its code by compiling for sm_90 on CPU (``tests/test_noise.py``).

Example (in a kernel)::

    if FAST:
        r = fastmath.sqrt_approx(-2.0 * fastmath.log2_approx(u) * LN2)
    else:
        r = tl.sqrt(-2.0 * tl.log(u))
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
#: ln 2 in two parts for Cody-Waite: LN2_HI has 16 significant bits, so ``n * LN2_HI`` is exact for |n| < 2^8.
LN2_HI = tl.constexpr(0.693145751953125)
LN2_LO = tl.constexpr(1.4286068203094173e-06)
#: 1.5 x 2^23: adding it rounds a float32 of magnitude < 2^22 to an integer held in the low mantissa bits.
ROUNDER = tl.constexpr(12582912.0)
ROUNDER_BITS = tl.constexpr(0x4B400000)


def is_fast(t) -> bool:
    """The launchers' choice of the ``FAST`` constexpr: the hardware approximations exactly on CUDA tensors."""
    return t.device.type == "cuda"


@triton.jit
def _unary(x, op: tl.constexpr):
    return tl.inline_asm_elementwise(op + " $0, $1;", "=f,f", [x.to(tl.float32)], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def log2_approx(x):
    """``log2(x)`` (``lg2.approx.ftz.f32``): float32 in and out; abs err <= 2^-22 near 1, rel 2^-22 elsewhere."""
    return _unary(x, "lg2.approx.ftz.f32")


@triton.jit
def ex2_approx(x):
    """``2^x`` (``ex2.approx.ftz.f32``): float32 in and out, relative error <= 2^-22 (inputs exact)."""
    return _unary(x, "ex2.approx.ftz.f32")


@triton.jit
def rcp_approx(x):
    """``1 / x`` (``rcp.approx.ftz.f32``): float32 in and out, ~1 ulp."""
    return _unary(x, "rcp.approx.ftz.f32")


@triton.jit
def sqrt_approx(x):
    """``sqrt(x)`` (``sqrt.approx.ftz.f32``: ``MUFU.RSQ`` and a multiply), ~1 ulp; ``sqrt(0) = 0``."""
    return _unary(x, "sqrt.approx.ftz.f32")


@triton.jit
def rsqrt_approx(x):
    """``1 / sqrt(x)`` (``rsqrt.approx.ftz.f32``): float32 in and out, ~1 ulp."""
    return _unary(x, "rsqrt.approx.ftz.f32")


@triton.jit
def sin_approx(x):
    """``sin(x)`` (``sin.approx.ftz.f32``): absolute error <= 2^-20.9 for ``x`` in [-pi, pi] only."""
    return _unary(x, "sin.approx.ftz.f32")


@triton.jit
def cos_approx(x):
    """``cos(x)`` (``cos.approx.ftz.f32``): absolute error <= 2^-20.9 for ``x`` in [-pi, pi] only."""
    return _unary(x, "cos.approx.ftz.f32")


@triton.jit
def exp_accurate_f32(x):
    """``exp(x)`` in float32 within ~2 ulp for every ``x`` (11 SASS instructions, one ``MUFU.EX2``).

    Cody-Waite: ``n = round(x log2 e)`` (the 1.5 x 2^23 trick: one FFMA, no FRND, no F2I), ``f = x - n
    ln2_hi - n ln2_lo`` (exact, ``|f| <= ln2 / 2``); then ``2^(f log2 e + 1)`` by ``ex2.approx`` (its
    input in [0.5, 1.5], so rounding it costs < 2^-24 relative, unlike ``ex2.approx(x log2 e)``) times
    ``2^(n - 1)``, whose bits are ``n``'s shifted into the exponent field (one LEA). The shift by one
    lets ``n`` reach 128: ``exp`` overflows to inf (``x`` is clamped to 89 first, NaN-propagating);
    below ``x = -86.9`` (``exp(x)`` < 1.8e-38, where ``2^(n - 1)`` would leave the normal range) the
    result is 0, a flush to zero as ``.ftz`` does. NaN stays NaN.
    """
    x = tl.where(x > 89.0, 89.0, x.to(tl.float32))  # a comparison, not min(): a NaN falls through
    t = x * LOG2E + ROUNDER  # one FFMA: round(x log2 e) lands in t's low mantissa bits (|n| < 2^22)
    n = t - ROUNDER
    f = x - n * LN2_HI
    f = f - n * LN2_LO
    p = ex2_approx(f * LOG2E + 1.0)
    # t's bits are ROUNDER_BITS + n, and ROUNDER_BITS << 23 wraps to 0 in 32 bits: (bits << 23) is n << 23.
    scale = ((t.to(tl.int32, bitcast=True) << 23) + (126 << 23)).to(tl.float32, bitcast=True)
    return tl.where(x < -86.9, 0.0, p * scale)
