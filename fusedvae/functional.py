"""The public ops: validate, pick a backend, and finish the reduction.

Every op here checks its arguments first (so a bad call fails before any kernel launches), then
runs the backend that :func:`fusedvae.backend_for` names on its first tensor. Backends compute
``"none"``, ``"sum"``, ``"per_sample"`` (and for the KL ``"per_dim"``); ``"mean"`` and
``"batchmean"`` are those sums divided here, so both backends share one definition. The ``native``
backend (CPU tensors) takes the divisor as a ``scale`` it multiplies in inside its op, and the
sample without a sample dimension: on a CPU step's small tensors each extra autograd node costs
more than the arithmetic.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType

import torch
import torch.nn.functional as F

from . import native, reference
from . import validation as check
from .backend import backend_for
from .precision import compute_dtype, result_dtype
from .reductions import BACKEND_REDUCTION as _BACKEND_REDUCTION
from .reductions import finish as _finish
from .reductions import scale_of as _scale_of
from .seeding import draw_key


def _implementation(tensor: torch.Tensor) -> ModuleType:
    backend = backend_for(tensor)
    if backend == "native":
        return native
    if backend == "triton":
        from . import kernels  # imported on first use: importing fusedvae never imports triton

        return kernels
    return reference


def _result_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """:func:`~fusedvae.precision.result_dtype`, without its promotion walk when all dtypes agree."""
    dtype = tensors[0].dtype
    for t in tensors:
        if t is not None and t.dtype != dtype:
            return result_dtype(*tensors)
    return dtype


def _noise_key(impl: ModuleType, generator: torch.Generator | None, device: torch.device) -> dict:
    """The native backend draws ``torch.randn`` from ``generator`` itself; the others a Philox key tensor.

    The key is drawn on ``device`` (the op's) by a graph-safe torch op and never read on the host, so a
    replayed CUDA graph draws new noise (:mod:`fusedvae.seeding`).
    """
    if getattr(impl, "DRAWS_FROM_GENERATOR", False):
        return {"generator": generator}
    return {"key": draw_key(device, generator)}


def _as_optional_tensor(name: str, value: object, like: torch.Tensor) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # A Python number is held at compute precision (not rounded to a half dtype); being
        # 0-dimensional it does not change the result dtype, as with torch's own scalars.
        return torch.tensor(float(value), dtype=compute_dtype(like), device=like.device)
    return check.check_tensor(name, value)


def _check_posterior(mu, logvar, prior_mu=None, prior_logvar=None):
    check.check_tensor("mu", mu)
    check.check_tensor("logvar", logvar)
    device = mu.device
    same_device = logvar.device == device
    if prior_mu is not None:
        prior_mu = _as_optional_tensor("prior_mu", prior_mu, mu)
        same_device = same_device and prior_mu.device == device
    if prior_logvar is not None:
        prior_logvar = _as_optional_tensor("prior_logvar", prior_logvar, mu)
        same_device = same_device and prior_logvar.device == device
    if not same_device:
        check.check_same_device({"mu": mu, "logvar": logvar, "prior_mu": prior_mu, "prior_logvar": prior_logvar})
    if logvar.shape != mu.shape:
        check.check_same_shape("logvar", logvar, "mu", mu)
    if prior_mu is not None:
        check.check_broadcasts_to("prior_mu", prior_mu, "mu", mu)
    if prior_logvar is not None:
        check.check_broadcasts_to("prior_logvar", prior_logvar, "mu", mu)
    return prior_mu, prior_logvar


def _kl_from_backend(impl, mu, logvar, prior_mu, prior_logvar, *, reduction, free_bits, **sampling):
    dtype = _result_dtype(mu, logvar, prior_mu, prior_logvar)
    batch_size = mu.shape[0] if mu.dim() else 1
    backend_reduction = "per_dim" if free_bits > 0.0 else _BACKEND_REDUCTION[reduction]
    if impl is native and backend_reduction == "sum":  # the division folded into the op
        scale = _scale_of(reduction, batch_size=batch_size, numel=mu.numel())
        z, kl = native.rsample_kl(mu, logvar, prior_mu, prior_logvar, kl=True, reduction="sum", scale=scale,
                                  **sampling)
        return z, (kl if kl.dtype == dtype else kl.to(dtype))
    z, kl = impl.rsample_kl(mu, logvar, prior_mu, prior_logvar, kl=True, reduction=backend_reduction, **sampling)
    if free_bits > 0.0:
        # Kingma et al. 2016: each latent element's batch-mean KL is held at >= free_bits; no gradient below it.
        per_dim_mean = kl / batch_size if batch_size else kl * math.nan
        return z, per_dim_mean.clamp(min=free_bits).sum().to(dtype)
    return z, _finish(kl, reduction, batch_size=batch_size, numel=mu.numel(), dtype=dtype)


def rsample(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reparameterized sample ``z = mu + exp(logvar / 2) * eps``, ``eps ~ N(0, I)``, differentiable in both.

    Args:
        mu: posterior mean, any shape, float32/bfloat16/float16/float64.
        logvar: posterior log-variance, the shape of ``mu``.
        n_samples: ``None`` for one sample shaped like ``mu``; ``K`` for ``K`` samples stacked in a
            new leading dimension, ``(K, *mu.shape)``.
        generator: the torch generator the noise's Philox key is drawn from; ``None`` uses torch's
            default, so ``torch.manual_seed`` makes the result reproducible.

    Returns:
        z in the promoted dtype of ``mu`` and ``logvar``. The noise is never stored: the backward
        pass regenerates it.

    Example::

        >>> import torch, fusedvae as fv
        >>> _ = torch.manual_seed(0)
        >>> mu, logvar = torch.zeros(4, 8, requires_grad=True), torch.zeros(4, 8, requires_grad=True)
        >>> z = fv.rsample(mu, logvar, n_samples=3)
        >>> z.shape
        torch.Size([3, 4, 8])
    """
    _check_posterior(mu, logvar)
    count = 1 if n_samples is None else check.check_n_samples(n_samples)
    if generator is not None:
        check.check_generator(generator, mu.device)
    impl = _implementation(mu)
    if impl is native:  # z without the sample dimension, drawn so (no indexing node)
        return native.rsample_kl(mu, logvar, None, None, n_samples=n_samples, sample=True, kl=False,
                                 reduction="none", generator=generator)[0]
    z, _ = impl.rsample_kl(
        mu, logvar, None, None, n_samples=count, sample=True, kl=False, reduction="none",
        **_noise_key(impl, generator, mu.device),
    )
    return z.squeeze(0) if n_samples is None else z  # a view: free backward (z[0]'s is zeros + a copy)


def kl_normal(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | float | None = None,
    prior_logvar: torch.Tensor | float | None = None,
    *,
    reduction: str = "batchmean",
    free_bits: float = 0.0,
) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) for diagonal Gaussians, exact near collapse.

    Per element ``0.5 * (g(d) + (mu - prior_mu)^2 * exp(-prior_logvar))`` with
    ``d = logvar - prior_logvar`` and ``g(d) = exp(d) - 1 - d`` computed without cancellation.

    Args:
        mu, logvar: posterior, same shape ``(B, ...)``.
        prior_mu, prior_logvar: tensors (or floats) broadcastable to ``mu``; ``None`` means the
            standard normal prior. All four receive gradients.
        reduction: ``"batchmean"`` (sum / B, default), ``"sum"``, ``"mean"`` (over elements),
            ``"none"``, ``"per_sample"`` (shape ``(B,)``) or ``"per_dim"`` (shape ``mu.shape[1:]``).
        free_bits: with ``"batchmean"``, each latent element's batch-mean KL is clamped below at
            this many nats before the sum; below it the gradient is zero.

    Returns:
        The KL in the promoted dtype of the inputs.

    Example::

        >>> import torch, fusedvae as fv
        >>> mu, logvar = torch.randn(16, 32), torch.randn(16, 32)
        >>> fv.kl_normal(mu, logvar).shape, fv.kl_normal(mu, logvar, reduction="per_dim").shape
        (torch.Size([]), torch.Size([32]))
    """
    prior_mu, prior_logvar = _check_posterior(mu, logvar, prior_mu, prior_logvar)
    check.check_reduction(reduction, check.KL_REDUCTIONS)
    check.check_batched("mu", mu, reduction)
    free_bits = check.check_free_bits(free_bits, reduction)
    impl = _implementation(mu)
    if impl is native and free_bits == 0.0 and _BACKEND_REDUCTION[reduction] == "sum":
        scale = _scale_of(reduction, batch_size=mu.shape[0] if mu.dim() else 1, numel=mu.numel())
        kl = native.kl_sum(mu, logvar, prior_mu, prior_logvar, scale=scale)
        dtype = _result_dtype(mu, logvar, prior_mu, prior_logvar)
        return kl if kl.dtype == dtype else kl.to(dtype)
    _, kl = _kl_from_backend(
        impl, mu, logvar, prior_mu, prior_logvar, reduction=reduction, free_bits=free_bits,
        n_samples=1, seed=0, offset=0, sample=False,
    )
    return kl


def rsample_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | float | None = None,
    prior_logvar: torch.Tensor | float | None = None,
    *,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "batchmean",
    free_bits: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample and the KL in one call: what a VAE runs after its encoder (one fused pass on the kernels).

    Arguments as :func:`rsample` and :func:`kl_normal`. With the same seed, ``z`` equals
    :func:`rsample`'s bit for bit.

    Returns:
        ``(z, kl)``.

    Example::

        >>> import torch, fusedvae as fv
        >>> mu, logvar = torch.randn(16, 32, requires_grad=True), torch.randn(16, 32, requires_grad=True)
        >>> z, kl = fv.rsample_kl(mu, logvar)
        >>> (z.sum() + kl).backward()
    """
    prior_mu, prior_logvar = _check_posterior(mu, logvar, prior_mu, prior_logvar)
    count = 1 if n_samples is None else check.check_n_samples(n_samples)
    if generator is not None:
        check.check_generator(generator, mu.device)
    check.check_reduction(reduction, check.KL_REDUCTIONS)
    check.check_batched("mu", mu, reduction)
    free_bits = check.check_free_bits(free_bits, reduction)
    impl = _implementation(mu)
    if impl is native:  # z without the sample dimension, drawn so (no indexing node); _kl_from_backend folds the division
        return _kl_from_backend(impl, mu, logvar, prior_mu, prior_logvar, reduction=reduction, free_bits=free_bits,
                                n_samples=n_samples, sample=True, generator=generator)
    z, kl = _kl_from_backend(
        impl, mu, logvar, prior_mu, prior_logvar, reduction=reduction, free_bits=free_bits,
        n_samples=count, sample=True, **_noise_key(impl, generator, mu.device),
    )
    return (z.squeeze(0) if n_samples is None else z), kl  # squeeze: see rsample


def _check_data(x, mean, x_name="x", mean_name="mean"):
    check.check_tensor(x_name, x)
    check.check_tensor(mean_name, mean)
    if x.device != mean.device:
        check.check_same_device({x_name: x, mean_name: mean})
    check.check_same_shape(mean_name, mean, x_name, x)


def gaussian_nll(
    x: torch.Tensor,
    mean: torch.Tensor,
    log_sigma: torch.Tensor | float,
    *,
    reduction: str = "batchmean",
    full: bool = True,
) -> torch.Tensor:
    """Negative log-likelihood of ``x`` under ``N(mean, exp(log_sigma)^2)``, per element summed by ``reduction``.

    Per element ``r^2 / 2 + log_sigma [+ log(2 pi) / 2]`` with ``r = (x - mean) * exp(-log_sigma)``.

    Args:
        x: data, any shape ``(B, ...)``.
        mean: decoder mean, the shape of ``x``.
        log_sigma: log of the decoder scale, a float or a tensor broadcastable to ``x``: a scalar,
            per channel ``(C, 1, 1)``, per sample ``(B, 1, 1, 1)``, per element; its gradient is
            summed over the broadcast positions.
        reduction: ``"batchmean"`` (default), ``"sum"``, ``"mean"``, ``"none"``, ``"per_sample"``.
        full: add ``log(2 pi) / 2`` per element (a true log-density).

    Example::

        >>> import torch, fusedvae as fv
        >>> x, mean = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16, requires_grad=True)
        >>> log_sigma = torch.zeros(3, 1, 1, requires_grad=True)   # per channel
        >>> fv.gaussian_nll(x, mean, log_sigma).backward()
        >>> log_sigma.grad.shape
        torch.Size([3, 1, 1])
    """
    _check_data(x, mean)
    check.check_reduction(reduction)
    check.check_batched("x", x, reduction)
    log_sigma = _as_optional_tensor("log_sigma", log_sigma, x)
    if log_sigma is None:
        raise TypeError("log_sigma must be a tensor or a float, got None")
    if log_sigma.device != x.device:
        check.check_same_device({"x": x, "log_sigma": log_sigma})
    check.check_broadcasts_to("log_sigma", log_sigma, "x", x)
    impl = _implementation(x)
    backend_reduction = _BACKEND_REDUCTION[reduction]
    batch_size = x.shape[0] if x.dim() else 1
    dtype = _result_dtype(x, mean, log_sigma)
    if impl is native and backend_reduction == "sum":  # the division folded into the op
        scale = _scale_of(reduction, batch_size=batch_size, numel=x.numel())
        nll = native.gaussian_nll(x, mean, log_sigma, full=bool(full), reduction="sum", scale=scale)
        return nll if nll.dtype == dtype else nll.to(dtype)
    nll = impl.gaussian_nll(x, mean, log_sigma, full=bool(full), reduction=backend_reduction)
    return _finish(nll, reduction, batch_size=batch_size, numel=x.numel(), dtype=dtype)


def _check_min_log_sigma(min_log_sigma: object) -> float | None:
    if min_log_sigma is None:
        return None
    if isinstance(min_log_sigma, bool) or not isinstance(min_log_sigma, (int, float)):
        raise TypeError(f"min_log_sigma must be a float or None, got {type(min_log_sigma).__name__}")
    return float(min_log_sigma)


def _const(value: float, like: torch.Tensor) -> torch.Tensor | float:
    """A scalar operand: a cached 0-dim tensor for CPU tensors (a Python float costs torch ~1.7 us per op there)."""
    return native._scalar(value, like.dtype) if like.is_cpu else value


def _optimal_log_sigma(impl, x, mean, per_sample, min_log_sigma):
    """Differentiable ``s = a + softplus(log(SSE/n)/2 - a)`` (or unclipped), shape ``()`` or ``(B,)``, compute dtype."""
    sse = impl.sum_squared_error(x, mean, per_sample=per_sample)
    count = x[0].numel() if per_sample else x.numel()
    log_sigma = torch.log(sse).sub_(_const(math.log(count), sse)).mul_(_const(0.5, sse))  # log(SSE/n)/2
    if min_log_sigma is not None:
        log_sigma = F.softplus(log_sigma - _const(min_log_sigma, sse)).add_(_const(min_log_sigma, sse))
    return sse, log_sigma


def _check_optimal(x, mean, per_sample, min_log_sigma):
    _check_data(x, mean)
    if per_sample and x.dim() == 0:
        raise ValueError("per_sample=True needs a batch dimension, but x is 0-dimensional")
    return _check_min_log_sigma(min_log_sigma)


def optimal_log_sigma(
    x: torch.Tensor, mean: torch.Tensor, *, per_sample: bool = False, min_log_sigma: float | None = -6.0
) -> torch.Tensor:
    """The σ-VAE's optimal decoder log-scale ``log(SSE / n) / 2``, soft-clipped below, detached (for logging).

    Args:
        x, mean: data and decoder mean, same shape ``(B, ...)``.
        per_sample: one σ per sample (shape ``(B,)``) instead of one for the batch (shape ``()``).
        min_log_sigma: soft lower bound ``a`` in ``a + softplus(s - a)``; ``None`` disables it.

    Returns:
        A float32 tensor (float64 for float64 inputs).

    Example::

        >>> import torch, fusedvae as fv
        >>> x = torch.randn(64, 10)
        >>> float(fv.optimal_log_sigma(x, x + 0.1, min_log_sigma=None))  # log(0.1)
        -2.302...
    """
    min_log_sigma = _check_optimal(x, mean, per_sample, min_log_sigma)
    with torch.no_grad():
        return _optimal_log_sigma(_implementation(x), x, mean, bool(per_sample), min_log_sigma)[1]


def gaussian_nll_optimal(
    x: torch.Tensor,
    mean: torch.Tensor,
    *,
    per_sample: bool = False,
    min_log_sigma: float | None = -6.0,
    reduction: str = "batchmean",
    full: bool = True,
) -> torch.Tensor:
    """σ-VAE reconstruction term (Rybkin et al. 2021): the Gaussian NLL at the analytically optimal σ.

    ``σ² = SSE / n`` over the batch (or over each sample), soft-clipped below at ``min_log_sigma``;
    the gradient flows through σ as in the σ-VAE reference. Only the SSE is needed, so the
    forward pass reads ``x`` and ``mean`` once.

    Args:
        x, mean: data and decoder mean, same shape ``(B, ...)``.
        per_sample, min_log_sigma: as :func:`optimal_log_sigma`.
        reduction, full: as :func:`gaussian_nll`.

    Example::

        >>> import torch, fusedvae as fv
        >>> x, mean = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16, requires_grad=True)
        >>> fv.gaussian_nll_optimal(x, mean).backward()
    """
    min_log_sigma = _check_optimal(x, mean, per_sample, min_log_sigma)
    check.check_reduction(reduction)
    check.check_batched("x", x, reduction)
    impl = _implementation(x)
    batch_size = x.shape[0] if x.dim() else 1
    dtype = result_dtype(x, mean)
    if x.numel() == 0:
        empty = torch.zeros((), dtype=compute_dtype(x, mean), device=x.device)
        return gaussian_nll(x, mean, empty, reduction=reduction, full=full)
    sse, log_sigma = _optimal_log_sigma(impl, x, mean, bool(per_sample), min_log_sigma)
    if reduction == "none" or (reduction == "per_sample" and not per_sample):
        broadcast = log_sigma.reshape(-1, *([1] * (x.dim() - 1))) if per_sample else log_sigma
        return gaussian_nll(x, mean, broadcast, reduction=reduction, full=full).to(dtype)
    count = x[0].numel() if per_sample else x.numel()
    # Summed over a group sharing one σ: SSE e^{-2s} / 2 + n s (+ n log(2π)/2); no second pass over x.
    group_nll = torch.mul(log_sigma, _const(float(count), log_sigma))
    if full:
        group_nll.add_(_const(count * (0.5 * math.log(2.0 * math.pi)), log_sigma))
    group_nll = group_nll.addcmul_(sse, torch.mul(log_sigma, _const(-2.0, log_sigma)).exp_(), value=0.5)
    if reduction == "per_sample":
        return group_nll.to(dtype)
    return _finish(group_nll.sum(), reduction, batch_size=batch_size, numel=x.numel(), dtype=dtype)


def _torch_var_shape_rule(input: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    # torch's homoscedastic rule comes first: var one dimension short of input gets a trailing 1.
    if var.shape != input.shape and input.shape[:-1] == var.shape:
        return var.unsqueeze(-1)
    return var


def _integer_data_as_float(input: object, target: object, var: object) -> tuple[object, object]:
    """Integer ``input``/``target`` (counts, labels) in the float dtype torch's arithmetic would give them."""
    tensors = [t for t in (input, target, var) if isinstance(t, torch.Tensor)]
    floats = [t.dtype for t in tensors if t.dtype.is_floating_point]
    dtype = functools.reduce(torch.promote_types, floats) if floats else torch.get_default_dtype()

    def convert(t: object) -> object:
        # bool data stays rejected, as torch rejects it (no `-` on bool tensors)
        integer = isinstance(t, torch.Tensor) and not (t.dtype.is_floating_point or t.dtype.is_complex
                                                       or t.dtype == torch.bool)
        return t.to(dtype) if integer else t

    return convert(input), convert(target)


def gaussian_nll_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    var: torch.Tensor | float,
    full: bool = False,
    eps: float = 1e-6,
    reduction: str = "mean",
    *,
    check_var: bool = True,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.gaussian_nll_loss``: ``0.5 (log v + (input - target)^2 / v)``.

    Same values, gradients (the ``eps`` clamp is invisible to autograd, as in torch), shape rules
    and errors for every input torch accepts; beyond torch, ``var`` may be anything broadcastable
    to ``input`` (a per-channel ``(1, C, 1, 1)`` for images, a 0-dim tensor, a Python int: torch
    rejects these, pytorch/pytorch#149131), and ``check_var=False`` skips the negative-variance
    check. Every error torch raises on a bad input is raised here as an instance of torch's class
    with a message naming the argument (a target that does not broadcast: :class:`~fusedvae.validation.ShapeError`,
    both the ``ValueError`` fusedvae raises and the ``RuntimeError`` torch raises).

    Args:
        input: predicted mean, float tensor.
        target: observations, broadcastable with ``input``.
        var: variance, a tensor broadcastable to ``input`` (after torch's rule: a ``var`` one
            dimension short of ``input`` gets a trailing 1) or a non-negative number.
        full: add ``log(2 pi) / 2`` per element.
        eps: lower clamp of ``var``.
        reduction: ``"mean"`` (default, as torch), ``"sum"``, ``"none"``, and fusedvae's
            ``"batchmean"`` and ``"per_sample"``.
        check_var: raise ``ValueError`` on a negative variance, as torch does. Eagerly the check
            reads one value from the device (a host synchronisation, as torch's). Under
            ``torch.compile`` it is an asynchronous assertion in the graph instead (no graph
            break, also with ``fullgraph=True``): a negative variance then raises
            ``RuntimeError`` with the same message when the graph runs on a CPU, and is a
            device-side assertion on a GPU, which leaves the CUDA context unusable. Pass
            ``False`` to skip it.

    Example::

        >>> import torch, fusedvae as fv, torch.nn.functional as F
        >>> input, target, var = torch.randn(5, 2), torch.randn(5, 2), torch.rand(5, 1)
        >>> torch.allclose(fv.gaussian_nll_loss(input, target, var), F.gaussian_nll_loss(input, target, var))
        True
    """
    input, target = _integer_data_as_float(input, target, var)
    check.check_tensor("input", input, torch_classes=True)
    check.check_tensor("target", target, torch_classes=True)
    if isinstance(var, (int, float)) and not isinstance(var, bool):
        if var < 0:
            raise ValueError("var has negative entry/entries")
        var = torch.tensor(float(var), dtype=input.dtype, device=input.device)
    check.check_tensor("var", var, torch_classes=True)
    check.check_same_device({"input": input, "target": target, "var": var})
    if isinstance(eps, (bool, str)) or not isinstance(eps, (int, float, torch.Tensor)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")  # torch: clamp_'s TypeError
    if check_var:
        if torch.compiler.is_compiling():
            # A host read of var would break the graph; an assertion the graph carries does not.
            torch._assert_async(torch.logical_not(torch.any(var < 0)), "var has negative entry/entries")
        elif bool(torch.any(var < 0)):
            raise ValueError("var has negative entry/entries")
    var = _torch_var_shape_rule(input, var)
    if check.broadcast_shape(input.shape, var.shape) != input.shape:
        raise ValueError(
            f"var is of incorrect size: var of shape {tuple(var.shape)} does not broadcast to input's shape "
            f"{tuple(input.shape)}"
        )
    shape = check.broadcast_shape(input.shape, target.shape)
    if shape is None:  # torch fails in its arithmetic, with a RuntimeError
        raise check.ShapeError(
            f"target of shape {tuple(target.shape)} does not broadcast with input of shape {tuple(input.shape)}"
        )
    if not isinstance(reduction, str):  # torch: TypeError from `reduction + " is not valid"`
        raise check.ReductionTypeError(
            f"reduction must be a str, one of {check.REDUCTIONS}, got {type(reduction).__name__}"
        )
    if reduction not in check.REDUCTIONS:
        raise ValueError(f"{reduction} is not valid: reduction must be one of {check.REDUCTIONS}")
    check.check_batched("input", torch.empty(shape, device="meta"), reduction)
    loss = _implementation(input).gaussian_nll_var(
        input, target, var, full=bool(full), eps=float(eps), reduction=_BACKEND_REDUCTION[reduction]
    )
    numel = math.prod(shape)
    batch_size = shape[0] if len(shape) else 1
    return _finish(loss, reduction, batch_size=batch_size, numel=numel, dtype=result_dtype(input, target, var))
