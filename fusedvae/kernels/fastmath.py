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
    """``exp(x)`` in float32 within ~2 ulp for every ``x`` (a dozen instructions, one ``MUFU.EX2``).

    Cody-Waite: ``n = round(x log2 e)`` (by the 1.5 x 2^23 trick: no FRND, no F2I),
    ``f = x - n ln2_hi - n ln2_lo`` (exact, ``|f| <= ln2 / 2``), so ``ex2.approx(f log2 e)`` sees an
    input within [-0.5, 0.5] whose rounding costs < 2^-25; ``2^n`` is built from exponent bits in two
    halves (``n1 + n2 = n``), so every factor is a normal float and the product overflows to inf and
    underflows to a subnormal or 0 as exp does. ``x`` is clamped to
    [-128, 128] first (beyond, the result is already 0 or inf); NaN stays NaN.
    """
    x = x.to(tl.float32)
    x = tl.where(x > 128.0, 128.0, x)  # comparisons, not min/max: a NaN falls through both
    x = tl.where(x < -128.0, -128.0, x)
    t = x * LOG2E + ROUNDER  # one FFMA: round(x log2 e) lands in t's low mantissa bits (|n| < 2^22)
    n = t - ROUNDER
    f = x - n * LN2_HI
    f = f - n * LN2_LO
    p = ex2_approx(f * LOG2E)
    ni = t.to(tl.int32, bitcast=True) - ROUNDER_BITS
    n1 = ni >> 1
    n2 = ni - n1
    scale1 = ((n1 + 127) << 23).to(tl.float32, bitcast=True)
    scale2 = ((n2 + 127) << 23).to(tl.float32, bitcast=True)
    return p * scale1 * scale2
