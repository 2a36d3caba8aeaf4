"""Accuracy beside speed: each provider's float32 error against float64 -> rows of ``accuracy.csv``.

Two cases where the formulas users write and fusedvae's differ in exactness:

- **KL near a collapsed dimension**: ``|logvar - prior_logvar| = d`` for d in 1e-2, 1e-4, 1e-6 (the
  micro-benchmarks' ``kl_normal`` functions, standard prior with ``logvar = d`` and learned prior with
  ``prior_logvar = 0.3``; ``mu = prior_mu``): the textbook ``1 + lv - exp(lv)`` cancels in float32.
- **NLL at |log σ| = 80** (``gaussian_nll`` with a scalar log σ, ``x - mean = δ e^{log σ}``, δ in [0.5, 1.5]):
  the error of the value and of the gradients (mean and log σ), each relative to its float64 size.

The float64 truth is fusedvae's reference in float64. Error = max |float32 - float64| / max |float64|.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

import fusedvae as fv

from .micro import VARIANTS
from .providers import is_compiled, provider_context

COLUMNS = ("case", "variant", "value", "provider", "what", "rel_error", "note")
KL_DISTANCES = (1e-2, 1e-4, 1e-6)
LOG_SIGMAS = (80.0, -80.0)


def _variant(op: str, variant: str):
    return next(v for v in VARIANTS if v.op == op and v.variant == variant)


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max().item()
    if not torch.isfinite(got).all():
        return math.inf
    return (got - want).abs().max().item() / scale if scale else (got - want).abs().max().item()


def _truth(fn: Callable, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    with fv.use_backend("reference"):
        out = fn(*leaves)[0]
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad])
    return out, list(grads)


def _run(fn: Callable, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().float().requires_grad_(t.requires_grad) for t in tensors]
    out = fn(*leaves)[0]
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad])
    return out, list(grads)


def _kl_inputs(variant: str, d: float) -> list[torch.Tensor]:
    shape = (64, 16)
    mu = torch.zeros(shape, requires_grad=True)
    if variant == "standard-prior":
        return [mu, torch.full(shape, d, requires_grad=True)]
    prior_lv = torch.full(shape, 0.3, dtype=torch.float64)
    return [mu, (prior_lv + d).float().requires_grad_(), torch.zeros(shape, requires_grad=True),
            prior_lv.float().requires_grad_()]


def _nll_inputs(log_sigma: float) -> list[torch.Tensor]:
    delta = torch.linspace(0.5, 1.5, 8 * 3 * 4 * 4, dtype=torch.float64).reshape(8, 3, 4, 4)
    x = (delta * math.exp(log_sigma)).float()
    return [x, torch.zeros(x.shape, requires_grad=True), torch.tensor(log_sigma, requires_grad=True)]


def run_accuracy(providers: Sequence[str], *, on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Every provider's errors on the cases of the module docstring (compiled providers: inductor, compiled here)."""
    rows = []
    cases = [("kl_normal", v, d, _kl_inputs(v, d)) for v in ("standard-prior", "learned-prior") for d in KL_DISTANCES]
    cases += [("gaussian_nll", "scalar-sigma", s, _nll_inputs(s)) for s in LOG_SIGMAS]
    for provider in providers:
        if provider == "fusedvae+compile":
            continue  # the micro-benchmarks' providers only
        with provider_context(provider):
            for op, name, value, tensors in cases:
                variant = _variant(op, name)
                reference_fn = variant.fn
                fn = variant.function(provider)
                if is_compiled(provider):
                    torch._dynamo.reset()
                    fn = torch.compile(fn)
                row = {"case": op, "variant": name, "value": value, "provider": provider}
                try:
                    want, want_grads = _truth(reference_fn, tensors)
                    got, got_grads = _run(fn, tensors)
                    errors = {"value": _rel_error(got, want)}
                    if op == "gaussian_nll":
                        errors["grad mean"] = _rel_error(got_grads[0], want_grads[0])
                        errors["grad log_sigma"] = _rel_error(got_grads[1], want_grads[1])
                except Exception as exc:  # noqa: BLE001 - a failing provider is reported, not fatal
                    errors = {"value": math.nan}
                    row["note"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                for what, error in errors.items():
                    out = dict(row, what=what, rel_error=error)
                    rows.append(out)
                    on_row(out)
    return rows
