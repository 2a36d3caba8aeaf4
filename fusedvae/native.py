"""The ``native`` backend: each op as a few ATen calls and one ``autograd.Function``, for CPU tensors.

This is what ``auto`` runs on a CPU. It implements the backend interface of
:mod:`fusedvae.reference` (``rsample_kl``, ``gaussian_nll``, ``sum_squared_error``,
``gaussian_nll_var``) with the same values and gradients, in fewer passes over memory than the
code users write (``torch.exp(0.5 * logvar)``, ``torch.randn_like``, the textbook KL), and it
saves less for backward than that code does. Where it differs from the reference:

- **Noise.** ``torch.randn`` from torch's generator (``generator=`` or the default one, so
  ``torch.manual_seed`` reproduces it): the stream ``torch.randn_like`` draws, not the Philox
  stream that the Triton kernels and the reference share. On a CPU an int64 Philox costs ten
  times the rest of the op; the scaled noise ``eps * exp(lv/2)`` is kept for backward instead
  (one tensor the size of ``z``; the idiom keeps ``eps`` and ``std``).
- **KL.** A ``"sum"`` of ``g(d) = exp(d) - 1 - d`` (plus the mean term) is first summed in float32
  from the cheapest values at hand, and kept only when the rounding of those values is provably
  below 4e-6 of the result (the contract is 1e-5): ``(e^d - 1) - d`` from torch's ``exp`` (the cost
  of the textbook formula's ``exp``; its bound grows with the element count, so it holds while the
  mean KL per element is above ~0.05), else ``expm1(d) - d`` (holds down to a mean ~0.002), else,
  near a collapsed posterior, ``expm1(d) - d`` in float64 (cancellation ~2^-52 * 2 / |d| relative,
  2e-10 at |d| = 1e-6). With a standard prior and a sample the float32 values come from the
  ``expm1(lv/2)`` of the sample. Elementwise reductions always take the float64 path; float64 inputs
  the reference's series. The gradient ``(e^d - 1) / 2`` is ``expm1(d) / 2`` on the ``expm1`` paths;
  on the ``exp`` path it is ``exp(d) - 1`` (absolute error ~1e-7, as torch's own formula).
- **Sums.** A ``"sum"`` reduction of a square is ``torch.dot`` (one pass, no temporary), and a
  broadcast ``log_sigma``'s sum is ``log_sigma.sum()`` times its repeat count. ``scale`` (the
  ``"mean"``/``"batchmean"`` divisor, folded in by :mod:`fusedvae.functional`) multiplies a
  ``"sum"`` inside the op, in a scalar multiply it does anyway.
- **Overhead.** Each op is one ``autograd.Function`` whose Python work is a few attribute reads: at
  the small sizes of a CPU training step that work, not the arithmetic, sets the time.

Example::

    >>> import torch, fusedvae as fv
    >>> with fv.use_backend("native"):
    ...     z, kl = fv.rsample_kl(torch.zeros(4, 8), torch.zeros(4, 8))
    >>> float(kl)
    0.0
"""

from __future__ import annotations

import math

import torch

from .precision import compute_dtype, result_dtype
from .reductions import reduce as _reduce
from .reference.gaussian_nll import HALF_LOG_2PI
from .reference.kl import exp_minus_one_minus_x

#: This backend draws its noise with ``torch.randn`` from a generator, not from a (seed, offset) key.
DRAWS_FROM_GENERATOR = True

_F64 = torch.float64


def _grad_like(grad: torch.Tensor, reduction: str, ndim: int) -> torch.Tensor:
    """The gradient of a reduced result, shaped to broadcast against the elementwise values (``ndim`` dims)."""
    if reduction == "per_sample" and ndim > 1:
        return grad.reshape(grad.shape + (1,) * (ndim - 1))
    return grad  # "sum": 0-dim; "per_dim": mu.shape[1:]; "none": mu.shape


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


_F32_ULP = 2.0**-23  # torch's float32 exp/expm1 (SLEEF, 1.0 ulp): the relative error of each value
_FAST_SUM_RTOL = 4e-6  # a fast sum of g is kept when its error bound is below this (the contract is 1e-5)


def _all_float32(*tensors: torch.Tensor | None) -> bool:
    """Whether every tensor given is float32: the compute dtype then, with no promotion walk and nothing to cast."""
    for t in tensors:
        if t is not None and t.dtype != torch.float32:
            return False
    return True


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """:func:`~fusedvae.precision.compute_dtype`, without its promotion walk when every tensor is float32."""
    return torch.float32 if _all_float32(*tensors) else compute_dtype(*tensors)


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


_SCALARS: dict[tuple[float, torch.dtype], torch.Tensor] = {}


def _scalar(value: float, dtype: torch.dtype) -> torch.Tensor | float:
    """``value`` as a cached 0-dim CPU tensor of ``dtype``, for an operand of an ATen op.

    torch (2.13, CPU) wraps a Python float operand into a tensor and casts it on every call: ~1.7 us, more than
    the op itself on a training step's latents. A 0-dim operand never changes a result's dtype.
    """
    if torch.compiler.is_compiling():
        return value
    key = (value, dtype)
    tensor = _SCALARS.get(key)
    if tensor is None:
        if len(_SCALARS) >= 256:  # one entry per batch size and constant: clear rather than grow without bound
            _SCALARS.clear()
        tensor = _SCALARS[key] = torch.tensor(value, dtype=dtype)
    return tensor


def _g_exact(d: torch.Tensor, reduction: str) -> torch.Tensor:
    """``g(d)`` in float64, summed (0-dim) or elementwise: ``expm1(d) - d`` (float32 d), the series (float64 d)."""
    if d.dtype == _F64:
        g = exp_minus_one_minus_x(d)
        return g.sum() if reduction == "sum" else g
    d64 = d.to(_F64)
    # expm1 and the subtraction in float64: the cancellation costs ~2^-52 * 2 / |d| relative, 2e-10 at |d| = 1e-6
    g = torch.expm1(d64).sub_(d64)
    return g.sum() if reduction == "sum" else g


def _fast_sum_is_exact(total: torch.Tensor, numel: int, ulps: float, *, scale: float = 1.0,
                       from_exp: bool = False) -> bool:
    """Whether ``scale * total`` = sum(g + m) (m >= 0), from float32 values within ``ulps`` ulps each, is within
    :data:`_FAST_SUM_RTOL`.

    From ``expm1(d)``: its rounding costs at most ``ulps * 2^-23 * sum|expm1(d)|``, and ``|expm1(d)| <= g + |d|``
    with ``|d| <= sqrt(3 g) + 3 g`` (``g(d) >= min(d^2, |d|) / 3``), so at most ``ulps * 2^-23 * (5 G + sqrt(3 n G))``
    for ``G = sum(g) <= total``. It fails near a collapsed posterior (mean g below ~0.003).

    From ``exp(d) - 1`` (``from_exp``): exp's rounding is relative to ``e^d = 1 + d + g``, so it costs up to
    ``2^-23 (n + sum|d| + G)``, an error that grows with the element count ``n``, not with the result; with the
    half-ulp roundings of ``- 1``, ``- d``, ``+ m`` and of the sum (relative to ``g + |d| + m``) the whole is below
    ``2^-23 (n + 14 T + 3 sqrt(3 n T))``, ``T`` the result: kept while the mean KL per element exceeds ~0.08.
    """
    if torch.compiler.is_compiling():
        return False
    value = scale * total.item()  # item(): no detach needed, and no warning for a tensor that requires grad
    if not value > 0.0:
        return False
    if from_exp:
        bound = _F32_ULP * (numel + 14.0 * value + 3.0 * math.sqrt(3.0 * numel * value))
    else:
        bound = ulps * _F32_ULP * (5.0 * value + math.sqrt(3.0 * numel * value))
    return bound <= _FAST_SUM_RTOL * value


def _kl_sum(d: torch.Tensor, diff: torch.Tensor, weighted: torch.Tensor, half_expm1: torch.Tensor | None,
            scale: float, try_exp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale * sum(0.5 (g(d) + weighted * diff))`` (0-dim, d's dtype) and the tensor backward takes ``e^d - 1`` from.

    The cheapest float32 sum whose error bound holds (module docstring); ``half_expm1`` (``expm1(d/2)``, standard
    prior with a sample) replaces ``exp(d)``, and is what backward gets then; ``try_exp=False`` skips the ``exp``
    path (its bound already failed in :func:`kl_sum`).
    """
    numel = d.numel()
    if d.dtype != _F64:
        if half_expm1 is not None:  # g/2 = (t - d/2) + t^2/2, t = expm1(d/2)
            half = torch.sub(half_expm1, d, alpha=0.5).addcmul_(half_expm1, half_expm1, value=0.5)
            total = half.addcmul_(weighted, diff, value=0.5).sum()
            if _fast_sum_is_exact(total, numel, 2.0, scale=2.0):
                return total.mul_(_scalar(scale, d.dtype)), half_expm1
            saved = half_expm1
        else:
            if try_exp:  # the textbook formula's exp; the "- 1" is exact for |d| < log 2
                saved = torch.exp(d).sub_(_scalar(1.0, d.dtype))
                total = torch.sub(saved, d).addcmul_(weighted, diff).sum()
                if _fast_sum_is_exact(total, numel, 1.0, from_exp=True):
                    return total.mul_(_scalar(0.5 * scale, d.dtype)), saved
            saved = torch.expm1(d)
            total = (saved - d).addcmul_(weighted, diff).sum()
            if _fast_sum_is_exact(total, numel, 1.0):
                return total.mul_(_scalar(0.5 * scale, d.dtype)), saved
    else:
        saved = half_expm1 if half_expm1 is not None else torch.expm1(d)
    kl = (0.5 * scale) * (_g_exact(d, "sum") + _flat_dot(weighted, diff))
    return kl.to(d.dtype), saved


class _SampleKL(torch.autograd.Function):
    """``z = mu + eps * exp(lv/2)`` and/or the KL to a (standard or learned) diagonal Gaussian prior.

    Inputs are in the compute dtype; ``prior_mu``/``prior_logvar`` may be ``None`` or broadcast to
    ``mu``; ``eps`` is the noise (``(K, *mu.shape)`` or ``mu.shape``) or ``None`` for the KL alone; a ``"sum"``
    is multiplied by ``scale``.
    Saved for backward: the scaled noise (z's only); for the KL ``e^d - 1`` (or, with a standard prior and
    a sample, ``expm1(lv/2)``, from which ``expm1(lv) = t (t + 2)``), ``mu - mu_p`` and ``exp(-lv_p)``.
    """

    @staticmethod
    def forward(ctx, mu, logvar, prior_mu, prior_logvar, eps, want_kl: bool, reduction: str, scale: float,
                try_exp: bool):
        z = noise = kl = expm1_half = saved = diff = weight = None
        from_half = False
        if eps is not None:
            # std = expm1(lv/2) + 1 (the same in every call, so z is rsample's bit for bit): with a standard prior
            # the backward pass gets an accurate expm1(lv) = t (t + 2) from t = expm1(lv/2), no second exp
            expm1_half = torch.mul(logvar, _scalar(0.5, logvar.dtype)).expm1_()
            noise = eps.addcmul_(eps, expm1_half)  # eps * std = eps + eps * t, in place (eps is ours, fresh)
            z = noise + mu
        if want_kl:
            diff = mu if prior_mu is None else mu - prior_mu
            d = logvar if prior_logvar is None else logvar - prior_logvar
            weight = None if prior_logvar is None else torch.exp(-prior_logvar)
            weighted = diff if weight is None else diff * weight
            if reduction == "sum":
                from_half = expm1_half is not None and prior_mu is None and prior_logvar is None
                kl, saved = _kl_sum(d, diff, weighted, expm1_half if from_half else None, scale, try_exp)
            else:
                saved = torch.expm1(d)
                kl = _reduce(0.5 * (_g_exact(d, "none") + weighted * diff), reduction).to(mu.dtype)
        ctx.save_for_backward(noise, saved, diff, weight)
        ctx.info = (want_kl, reduction, scale, from_half, eps is not None and eps.dim() > mu.dim(),
                    None if prior_mu is None else prior_mu.shape, None if prior_logvar is None else prior_logvar.shape)
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        noise, expm1_saved, diff, weight = ctx.saved_tensors
        want_kl, reduction, scale, from_half, stacked, prior_mu_shape, prior_logvar_shape = ctx.info
        need_mu, need_lv, need_pmu, need_plv = ctx.needs_input_grad[:4]
        d_mu = d_lv = d_pmu = d_plv = None
        # z = mu + noise: dz/dmu = 1 (summed over the K samples), dz/dlv = noise / 2
        if noise is not None and grad_z is not None:
            if stacked:
                several = grad_z.shape[0] > 1
                if need_mu:
                    d_mu = grad_z.sum(0) if several else grad_z[0]
                if need_lv:
                    d_lv = (grad_z * noise).sum(0) if several else grad_z[0] * noise[0]
            else:
                d_mu = grad_z if need_mu else None
                d_lv = grad_z * noise if need_lv else None
            if d_lv is not None:
                d_lv.mul_(_scalar(0.5, d_lv.dtype))
        if want_kl and grad_kl is not None:
            g = _grad_like(grad_kl, reduction, diff.dim())
            if scale != 1.0:
                g = g * _scalar(scale, g.dtype)
            # dkl/dmu = (mu - mu_p) e^{-lv_p} = -dkl/dmu_p; dkl/dlv = (e^d - 1) / 2
            weighted_g = diff * g if weight is None else diff * (weight * g)
            if need_mu:
                d_mu = weighted_g if d_mu is None else d_mu + weighted_g
            if need_pmu:
                d_pmu = (-weighted_g).sum_to_size(prior_mu_shape)
            if need_lv or need_plv:
                half_g = g * _scalar(0.5, g.dtype)
                if from_half:  # expm1(lv) = t (t + 2), t = expm1(lv / 2)
                    half_expm1 = torch.add(expm1_saved, _scalar(2.0, g.dtype)).mul_(expm1_saved).mul_(half_g)
                else:
                    half_expm1 = expm1_saved * half_g
                if need_lv:
                    d_lv = half_expm1 if d_lv is None else d_lv.add_(half_expm1)
                if need_plv:
                    # dkl/dlv_p = (1 - e^d - (mu - mu_p)^2 e^{-lv_p}) / 2
                    d_plv = torch.addcmul(half_expm1, weighted_g, diff, value=0.5).neg_()
                    d_plv = d_plv.sum_to_size(prior_logvar_shape)
        return d_mu, d_lv, d_pmu, d_plv, None, None, None, None, None


def _noise(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
           generator: torch.Generator | None) -> torch.Tensor:
    if generator is not None and generator.device.type != device.type:
        return torch.randn(shape, dtype=dtype, generator=generator, device=generator.device).to(device)
    return torch.randn(shape, dtype=dtype, generator=generator, device=device)


def rsample_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None,
    prior_logvar: torch.Tensor | None,
    *,
    n_samples: int | None,
    sample: bool,
    kl: bool,
    reduction: str,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    offset: int | None = None,
    scale: float = 1.0,
    try_exp: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backend entry point (as :func:`fusedvae.reference.rsample_kl`), noise from ``generator``.

    ``seed`` and ``offset`` (the Philox key of the other backends) are accepted and ignored.
    Returns ``z`` of shape ``(n_samples, *mu.shape)`` in the result dtype when ``sample`` (``mu.shape`` for
    ``n_samples=None``, which the other backends do not take), and the KL (``"none"``: result dtype;
    ``"sum"`` times ``scale``, ``"per_sample"``, ``"per_dim"``: compute dtype) when ``kl``.
    """
    if not kl:
        prior_mu = prior_logvar = None
    inputs = (mu, logvar, prior_mu, prior_logvar)
    dtype = torch.float32
    if not _all_float32(*inputs):
        dtype = compute_dtype(*inputs)
        inputs = tuple(_to(t, dtype) for t in inputs)
    eps = None
    if sample:
        shape = mu.shape if n_samples is None else (n_samples, *mu.shape)
        eps = _noise(shape, dtype, mu.device, generator)
    z, value = _SampleKL.apply(*inputs, eps, kl, reduction, scale, try_exp)
    if z is not None and z.dtype != mu.dtype:
        z = z.to(result_dtype(mu, logvar))
    if value is not None and reduction == "none" and value.dtype != mu.dtype:
        value = value.to(result_dtype(mu, logvar, prior_mu, prior_logvar))
    return z, value


#: Up to this many elements :func:`kl_sum` runs as plain autograd ops; above it the Function's two-op backward
#: (autograd's graph of the same sum takes ~7 passes) outweighs its fixed cost (measured: 8192 elements, forward
#: 25 vs 31 us, forward + backward equal; 262144 elements, backward 0.42 vs 0.14 ms).
_COMPOSED_MAX_NUMEL = 1 << 15


def _kl_sum_composed(mu, logvar, prior_mu, prior_logvar, scale: float) -> torch.Tensor | None:
    """``scale`` times the KL summed, as differentiable float32 torch ops from ``exp(d) - 1``; ``None`` when that
    sum's error bound fails (:func:`_fast_sum_is_exact`).

    Autograd saves ``exp(d)``, ``mu - mu_p`` (and with a learned prior ``exp(-lv_p)`` and their product): what the
    textbook formula's graph saves. The gradient of ``lv`` is ``e^d - 1`` from float32 ``exp``, as on the Function's
    ``exp`` path.
    """
    diff = mu if prior_mu is None else mu - prior_mu
    d = logvar if prior_logvar is None else logvar - prior_logvar
    values = torch.sub(torch.exp(d), _scalar(1.0, d.dtype)).sub_(d)
    weighted = diff if prior_logvar is None else diff * torch.exp(-prior_logvar)
    total = values.addcmul_(weighted, diff).sum()
    if not _fast_sum_is_exact(total, d.numel(), 1.0, from_exp=True):
        return None
    return total * (0.5 * scale)  # a Python float: autograd keeps no tensor for it (torch's formula keeps none)


def kl_sum(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | None, prior_logvar: torch.Tensor | None,
           *, scale: float) -> torch.Tensor:
    """``scale`` times the KL summed over every element, 0-dim, in the compute dtype (this backend only).

    Small float32 inputs (eager): a few differentiable torch ops, no ``autograd.Function``, whose fixed cost
    (~6 us) is a fifth of the op on a training step's latents; above :data:`_COMPOSED_MAX_NUMEL` elements, where
    their error bound fails (mean KL per element below ~0.08) or for float64, the Function's paths. The value is
    :func:`rsample_kl`'s.
    """
    if (mu.numel() <= _COMPOSED_MAX_NUMEL and _all_float32(mu, logvar, prior_mu, prior_logvar)
            and not torch.compiler.is_compiling()):
        kl = _kl_sum_composed(mu, logvar, prior_mu, prior_logvar, scale)
        if kl is not None:
            return kl
        try_exp = False
    else:
        try_exp = True
    return rsample_kl(mu, logvar, prior_mu, prior_logvar, n_samples=None, sample=False, kl=True, reduction="sum",
                      scale=scale, try_exp=try_exp)[1]


class _GaussianNLL(torch.autograd.Function):
    """``r^2/2 + s [+ log(2π)/2]``, ``r = (x - m) e^{-s}``, reduced (a ``"sum"`` times ``scale``); saves ``r`` and
    ``e^{-s}`` (shape of s)."""

    @staticmethod
    def forward(ctx, x, mean, log_sigma, full: bool, reduction: str, scale: float):
        weight = torch.neg(log_sigma).exp_()
        r = (x - mean).mul_(weight)
        numel, repeats = r.numel(), r.numel() // max(log_sigma.numel(), 1)
        squares = None
        if reduction == "sum":
            squares = _flat_dot(r, r)
            # (sum r^2 + 2 repeats sum(s) [+ n log 2π]) * scale / 2: three scalar ops
            nll = torch.add(squares, log_sigma if log_sigma.dim() == 0 else log_sigma.sum(), alpha=2.0 * repeats)
            if full:
                nll.add_(_scalar(2.0 * numel * HALF_LOG_2PI, nll.dtype))
            nll.mul_(_scalar(0.5 * scale, nll.dtype))
        else:
            nll = torch.addcmul(log_sigma + HALF_LOG_2PI if full else log_sigma, r, r, value=0.5)
            nll = _reduce(nll, reduction)
        ctx.reduction, ctx.shapes, ctx.numel, ctx.scale = reduction, (x.shape, log_sigma.shape), numel, scale
        ctx.save_for_backward(r, weight, squares)
        return nll

    @staticmethod
    def backward(ctx, grad):
        r, weight, squares = ctx.saved_tensors
        need_x, need_m, need_s = ctx.needs_input_grad[:3]
        x_shape, s_shape = ctx.shapes
        g = _grad_like(grad, ctx.reduction, r.dim())
        if ctx.scale != 1.0:
            g = g * _scalar(ctx.scale, g.dtype)
        d_x = d_m = d_s = None
        if need_m:  # dnll/dm = -r e^{-s}; dnll/dx = -that
            d_m = r * (weight * g).neg_()
            d_x = -d_m if need_x else None
        elif need_x:
            d_x = r * (weight * g)
        if need_s:
            if squares is not None and math.prod(s_shape) == 1:
                d_s = (g * (ctx.numel - squares)).reshape(s_shape)  # scalar σ: dnll/ds = n - sum(r^2), no pass
            else:
                d_s = torch.addcmul(_scalar(1.0, r.dtype) if r.is_cpu else torch.ones((), dtype=r.dtype, device=r.device),
                                    r, r, value=-1).mul_(g)
                d_s = d_s.sum_to_size(s_shape)
        return d_x, d_m, d_s, None, None, None


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor, *, full: bool,
                 reduction: str, scale: float = 1.0) -> torch.Tensor:
    """As :func:`fusedvae.reference.gaussian_nll` (a ``"sum"`` times ``scale``): three passes forward (difference,
    scale, dot), one or two back."""
    dtype = _compute_dtype(x, mean, log_sigma)
    nll = _GaussianNLL.apply(_to(x, dtype), _to(mean, dtype), _to(log_sigma, dtype), bool(full), reduction, scale)
    return nll.to(result_dtype(x, mean, log_sigma)) if reduction == "none" and nll.dtype != x.dtype else nll


class _SumSquaredError(torch.autograd.Function):
    """``sum((x - m)^2)`` over everything or per sample; saves ``x - m``."""

    @staticmethod
    def forward(ctx, x, mean, per_sample: bool):
        diff = x - mean
        ctx.per_sample = per_sample
        ctx.save_for_backward(diff)
        if per_sample:
            rows = diff.reshape(diff.shape[0], -1) if diff.dim() else diff.reshape(1, -1)
            return torch.linalg.vecdot(rows, rows)
        return _flat_dot(diff, diff)

    @staticmethod
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        g = _grad_like(grad, "per_sample" if ctx.per_sample else "sum", diff.dim())
        d_x = diff * (2 * g)
        need_x, need_m = ctx.needs_input_grad[:2]
        return (d_x if need_x else None), (-d_x if need_m else None), None


def sum_squared_error(x: torch.Tensor, mean: torch.Tensor, *, per_sample: bool) -> torch.Tensor:
    """As :func:`fusedvae.reference.sum_squared_error`: shape ``()`` or ``(B,)``, compute dtype."""
    dtype = compute_dtype(x, mean)
    return _SumSquaredError.apply(x.to(dtype), mean.to(dtype), bool(per_sample))


class _GaussianNLLVar(torch.autograd.Function):
    """torch's ``0.5 (log v + (input - target)^2 / v)``, ``v = max(var, eps)``, reduced; saves ``diff / v`` and ``v``.

    The clamp is invisible to autograd, as in torch: the gradient reaches every entry of ``var``.
    """

    @staticmethod
    def forward(ctx, input, target, var, full: bool, eps: float, reduction: str):
        clamped = var.clamp(min=eps)
        diff = input - target
        q = diff / clamped
        repeats = diff.numel() // max(clamped.numel(), 1)
        if reduction == "sum":
            loss = _flat_dot(q, diff.expand_as(q)).add_(torch.log(clamped).sum(), alpha=repeats).mul_(0.5)
            if full:
                loss.add_(q.numel() * HALF_LOG_2PI)
        else:
            loss = torch.addcmul(torch.log(clamped), q, diff, value=1.0).mul_(0.5)
            if full:
                loss.add_(HALF_LOG_2PI)
            loss = _reduce(loss.expand(q.shape), reduction)
        ctx.reduction, ctx.shapes = reduction, (input.shape, target.shape, var.shape)
        ctx.save_for_backward(q, clamped)
        return loss

    @staticmethod
    def backward(ctx, grad):
        q, clamped = ctx.saved_tensors
        need_input, need_target, need_var = ctx.needs_input_grad[:3]
        input_shape, target_shape, var_shape = ctx.shapes
        g = _grad_like(grad, ctx.reduction, q.dim())
        d_input = d_target = d_var = None
        if need_input or need_target:
            d_input = q * g  # dloss/dinput = (input - target) / v = -dloss/dtarget
            d_target = (-d_input).sum_to_size(target_shape) if need_target else None
            d_input = d_input.sum_to_size(input_shape) if need_input else None
        if need_var:  # dloss/dv = (1/v - q^2) / 2
            d_var = torch.addcmul(clamped.reciprocal(), q, q, value=-1.0).mul_(0.5 * g).sum_to_size(var_shape)
        return d_input, d_target, d_var, None, None, None


def gaussian_nll_var(input: torch.Tensor, target: torch.Tensor, var: torch.Tensor, *, full: bool, eps: float,
                     reduction: str) -> torch.Tensor:
    """As :func:`fusedvae.reference.gaussian_nll_var` (torch's ``gaussian_nll_loss`` formula): four passes forward."""
    dtype = compute_dtype(input, target, var)
    upcast = lambda t: t if t.dtype == dtype else t.to(dtype)  # noqa: E731
    loss = _GaussianNLLVar.apply(upcast(input), upcast(target), upcast(var), bool(full), float(eps), reduction)
    return loss.to(result_dtype(input, target, var)) if reduction == "none" else loss
