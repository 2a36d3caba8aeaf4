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

from ..backend import triton_interpreter_enabled

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
#: log2(e) in two parts: LOG2E_HI the float32 nearest, LOG2E_LO the rest (|x| LOG2E_LO < 2e-6 where it matters).
LOG2E_HI = tl.constexpr(1.4426950216293335)
LOG2E_LO = tl.constexpr(1.9259629891e-08)
#: 1.5 x 2^23: adding it rounds a float32 of magnitude < 2^22 to an integer held in the low mantissa bits.
ROUNDER = tl.constexpr(12582912.0)
ROUNDER_BITS = tl.constexpr(0x4B400000)


def is_fast(t) -> bool:
    """The launchers' choice of the ``FAST`` constexpr: True on CUDA tensors compiled (not interpreted)."""
    return t.device.type == "cuda" and not triton_interpreter_enabled()


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
def exp_accurate_f32(x, SCALE: tl.constexpr = 1.0):
    """``exp(SCALE x)`` in float32 within ~4 ulp for every ``x`` (10 SASS instructions, one ``MUFU.EX2``).

    ``SCALE`` is a power of two (``0.5``: a standard deviation from a log-variance), folded into the
    constants. Cody-Waite in base 2: ``n = round(y)``, ``y = SCALE x log2 e``, by the 1.5 x 2^23 trick (one
    FFMA, no FRND, no F2I); then ``g = y - (n - 1)`` from ``log2 e`` in two parts (two FFMAs: the first
    product is exact inside the FFMA and the difference rounds once, in [0.5, 1.5]), so ``ex2.approx(g)``
    sees an input rounded by < 2^-24 absolute, unlike ``ex2.approx(x log2 e)``, whose input rounds by
    ``|x| x 6e-8``; times ``2^(n - 1)``, whose bits are ``n``'s shifted into the exponent field (one LEA).
    The offset by one lets ``n`` reach 128, so ``exp`` overflows to inf (``SCALE x`` is clamped to 89
    first, NaN-propagating); below ``SCALE x = -86.9`` (``exp`` < 1.8e-38, where ``2^(n - 1)`` would leave
    the normal range) the result is 0, a flush to zero as ``.ftz`` does. NaN stays NaN. Error: <= 2.4 ulp
    from the reduction and the roundings (simulated in float64 over [-87, 89] with an exact ``ex2``), plus
    ``ex2.approx``'s own (2^-22 relative, 2 ulp), whatever ``|x|``.
    """
    x = x.to(tl.float32)
    x = tl.where(x > 89.0 / SCALE, 89.0 / SCALE, x)  # a comparison, not min(): a NaN falls through
    # tl.fma, not x * c + d: the product must stay exact inside each FMA (a shared rounded x * c would not be)
    t = tl.fma(x, SCALE * LOG2E_HI, ROUNDER)  # round(y) lands in t's low mantissa bits (|y| < 2^22)
    g = tl.fma(x, SCALE * LOG2E_HI, (ROUNDER + 1.0) - t)  # y - (n - 1)
    g = tl.fma(x, SCALE * LOG2E_LO, g)
    # t's bits are ROUNDER_BITS + n, and ROUNDER_BITS << 23 wraps to 0 in 32 bits: (bits << 23) is n << 23.
    scale = ((t.to(tl.int32, bitcast=True) << 23) + (126 << 23)).to(tl.float32, bitcast=True)
    return tl.where(x < -86.9 / SCALE, 0.0, ex2_approx(g) * scale)
