"""The GPU's hardware approximations (PTX ``*.approx.ftz.f32``) as Triton functions, for the kernels' FAST path.

Each wrapper is one PTX instruction, one ``MUFU`` op in SASS (``rcp``/``rsqrt``/``lg2``/``ex2``/``sin``/``cos``;
``sqrt.approx`` is ``MUFU.SQRT`` on sm_90; ``sin``/``cos`` add one ``FMUL.RZ`` by 1/(2 pi)), against
libdevice's general routines of ~20-30 instructions. Errors (PTX ISA, "Floating Point Instructions";
``ftz``: subnormal inputs and results are flushed to sign-preserving zero):

- ``log2_approx``: absolute error <= 2^-22 for ``x`` in [0.5, 2], relative 2^-22 elsewhere.
- ``ex2_approx``: relative error <= 2^-22 (~2 ulp) for every input, but the input is ``x log2 e``
  rounded: ``ex2_approx(x * log2e)`` (what Triton makes of a float32 ``tl.exp``) is off by
  ``|x| x 6e-8`` relative (5e-6 at ``x = 80``). :func:`exp_accurate_f32` corrects that rounding.
- ``rcp_approx``, ``sqrt_approx``, ``rsqrt_approx``: relative error ~2^-23 (1 ulp) or better.
- ``sin_approx``, ``cos_approx``: absolute error <= 2^-20.9 in [-pi, pi] only (the hardware reduces
  the argument coarsely): centre the argument first.

Why a ``FAST: tl.constexpr`` in every caller. Inline PTX cannot run under ``TRITON_INTERPRET=1`` (the
interpreter has no assembler), and the interpreter is where the CPU tests check the kernels. So
the kernels keep their exact float32 path (bounded-range polynomials, :mod:`._common`'s exp/log)
and take these wrappers only when their ``FAST`` constexpr is True, which the launchers set to
``tensor.is_cuda`` outside the interpreter (:func:`is_fast`): True on every real (and stub-compiled,
:mod:`bench.static`) CUDA launch, False under the interpreter. Its numbers are checked on a GPU, and on CPU through
:data:`EMULATED` (``tests/test_fast_path_emulated.py``); its code by compiling for sm_90 (``tests/test_noise.py``).

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
    """``sqrt(x)`` (``sqrt.approx.ftz.f32``: ``MUFU.SQRT`` on sm_90), ~1 ulp; ``sqrt(0) = 0``."""
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
    """``exp(SCALE x)`` in float32 within ~3 ulp for every ``x`` (7 SASS instructions, one ``MUFU.EX2``).

    ``ex2.approx`` is accurate to 2^-22 relative over its whole range; what makes ``ex2.approx(x log2 e)``
    (Triton's float32 ``tl.exp``) lose ``|x| x 6e-8`` is the rounding of its input ``y = x log2 e``. Here
    that rounding is recovered: ``e = fma(x, log2e_hi, -y)`` is exact (the error of a product), ``c = e + x
    log2e_lo`` the rest of the exponent (``|c| < 1e-5`` while ``|x| < 128``), and ``2^c = 1 + c ln2`` to
    2e-11, so ``exp = ex2.approx(y) (1 + c ln2)``. ``SCALE`` is a power of two (``0.5``: a standard deviation
    from a log-variance), folded into the constants. Error: <= 2.9 x 2^-24 relative from the roundings
    (simulated in float64 over [-90, 89] with an exact ``ex2``) plus ``ex2.approx``'s 2^-22. Where
    ``ex2.approx(y)`` is already inf or 0 (``|SCALE x| > 88.7``, ``.ftz`` flushing subnormal results) the
    factor may be anything (NaN for infinite ``x``: inf - inf): ``min(|1 + c ln2|, 2)`` (one FMNMX, which
    returns 2 for a NaN) keeps it finite and positive, so the result is inf or 0. NaN ``x`` gives NaN.
    """
    x = x.to(tl.float32)
    y = x * (SCALE * LOG2E_HI)
    # tl.fma, not x * c - y: the product must stay exact inside the FMA (LLVM may reuse the rounded one)
    c = tl.fma(x, SCALE * LOG2E_LO, tl.fma(x, SCALE * LOG2E_HI, -y))
    return ex2_approx(y) * tl.minimum(tl.abs(tl.fma(c, LN2, 1.0)), 2.0)


@triton.jit
def exp_coarse_f32(x, SCALE: tl.constexpr = 1.0):
    """``exp(SCALE x)`` as ``ex2.approx(x SCALE log2 e)``: 2 SASS instructions, relative error <= ``|SCALE x| 7.5e-8 +
    2^-22`` (6e-6 at ``|SCALE x| = 80``): the product's rounding (``|x| 6e-8``), float32 ``log2 e``'s (``|x| 1.3e-8``).

    For results rounded to 16 bits only: a bfloat16 (float16) half-ulp is 2^-9 (2^-12) relative, 300 (40) times
    that error at 80, so the rounded result differs from :func:`exp_accurate_f32`'s at most where the exact value
    lies within 6e-6 relative of a rounding boundary. Subnormal results flush to 0 (``.ftz``).
    """
    return ex2_approx(x.to(tl.float32) * (SCALE * LOG2E))


# Under Triton's interpreter (decided at import, as Triton decides interpretation when a kernel is decorated) the
# wrappers above cannot run: it has no PTX assembler. EMULATED swaps in each instruction's function by plain Triton
# math, off by its documented worst-case error in the direction that enlarges the result's magnitude, and NaN for
# sin/cos outside [-pi, pi] (where the hardware's answer is wrong): the FAST path's logic (signs, lanes, series, the
# centred angle) then runs in the CPU tests and must meet its bounds against a pessimistic model of the hardware.
# Placed last in the file, so the compiled kernels (their PTX line info included) are unchanged.
EMULATED = triton_interpreter_enabled()
_LG2_ERR = tl.constexpr(2.384185791015625e-07)  # 2^-22
_MUFU_ERR = tl.constexpr(1.1920928955078125e-07)  # 2^-23
_SINCOS_ERR = tl.constexpr(5.107026e-07)  # 2^-20.9
_PI_F32 = tl.constexpr(3.1415927410125732)  # float32(pi), a hair above pi: the centred angle's end

if EMULATED:

    @triton.jit
    def _unary(x, op: tl.constexpr):  # noqa: F811
        x = x.to(tl.float32)
        if op == "lg2.approx.ftz.f32":
            y = tl.log2(x)
            err = tl.where((x >= 0.5) & (x <= 2.0), _LG2_ERR, tl.abs(y) * _LG2_ERR)
            y = tl.where(y < 0.0, y - err, y + err)
        elif op == "ex2.approx.ftz.f32":
            y = tl.exp2(x) * (1.0 + 2.0 * _MUFU_ERR)
        elif op == "rcp.approx.ftz.f32":
            y = (1.0 / x) * (1.0 + _MUFU_ERR)
        elif op == "sqrt.approx.ftz.f32":
            y = tl.sqrt(x) * (1.0 + _MUFU_ERR)
        elif op == "rsqrt.approx.ftz.f32":
            y = (1.0 / tl.sqrt(x)) * (1.0 + _MUFU_ERR)
        else:
            tl.static_assert(op == "sin.approx.ftz.f32" or op == "cos.approx.ftz.f32")
            y = tl.sin(x) if op == "sin.approx.ftz.f32" else tl.cos(x)
            y = tl.where(y < 0.0, y - _SINCOS_ERR, y + _SINCOS_ERR)
            y = tl.where(tl.abs(x) <= _PI_F32, y, float("nan"))
        return y
