"""Every specialization the launchers can produce on a CUDA device: the cases the static model compiles.

A case calls one backend entry point of :mod:`fusedvae.kernels` forward, then backward through
autograd, on inputs sized as on a GPU (tensors are allocated, never filled: no kernel runs). Which
kernels it launches is whatever the launchers decide; nothing here names a kernel.

Axes (the issue's): op × reduction × prior (or σ / variance shape) present or absent × n_samples 1
and 4 × layout (contiguous, channels-last, permuted: H and W swapped in memory) × dtype (float32,
bfloat16, float16, float64). Sizes fill an H100 (the launchers' grids then loop several tiles per
program, as in training): latent maps ``(256, 16, 64, 64)``, images ``(64, 3, 256, 256)``.

Adding an op: write a builder ``def _my_op(layout, dtype) -> list[Case]`` and list it in
:data:`BUILDERS` under the entry point's name; :func:`uncovered` names every entry point of
``fusedvae.kernels`` that has none (the report lists them, the CI test fails on them).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

DTYPES = ("float32", "bfloat16", "float16", "float64")
LAYOUTS = ("contiguous", "channels_last", "permuted")
LATENT = (256, 16, 64, 64)
IMAGE = (64, 3, 256, 256)


@dataclass(frozen=True)
class Case:
    """One call of a backend entry point: ``run(leaf)`` calls it and returns (inputs, outputs, grad inputs)."""

    op: str
    variant: str
    layout: str
    dtype: str
    run: Callable = None  # () -> (inputs, outputs, requires-grad inputs, work elements)
    trips: int = 1  # iterations of a data loop nested in the tile loop (the n_samples loop)

    @property
    def name(self) -> str:
        return f"{self.op} {self.variant} {self.layout}"


def _strides(shape, layout):
    b, c, h, w = shape
    if layout == "channels_last":
        return (h * w * c, 1, w * c, c)
    if layout == "permuted":
        return (c * h * w, h * w, 1, h)
    return (c * h * w, h * w, w, 1)


def make(shape, dtype: str, layout: str = "contiguous", grad: bool = False) -> torch.Tensor:
    """An uninitialised leaf tensor of ``shape`` with ``layout``'s strides (4-D shapes; others contiguous)."""
    strides = _strides(shape, layout) if len(shape) == 4 else None
    dt = getattr(torch, dtype)
    t = torch.empty_strided(shape, strides, dtype=dt) if strides else torch.empty(shape, dtype=dt)
    return t.requires_grad_(grad)


def _rsample_kl(layout, dtype):
    from fusedvae.kernels import rsample_kl

    def case(variant, *, sample, kl, reduction="sum", prior=False, k=1):
        def run():
            mu, lv = (make(LATENT, dtype, layout, True) for _ in range(2))
            pmu, plv = (make(LATENT, dtype, layout, True) for _ in range(2)) if prior else (None, None)
            key = torch.tensor([0x5EED5EED, 4096], dtype=torch.int64, device=mu.device)  # [seed, offset], as drawn
            z, out = rsample_kl(mu, lv, pmu, plv, n_samples=k, key=key, sample=sample, kl=kl, reduction=reduction)
            inputs = [t for t in (mu, lv, pmu, plv) if t is not None]
            return inputs, [t for t in (z, out) if t is not None], inputs, mu.numel()

        return Case("rsample_kl", variant, layout, dtype, run, k)

    cases = [case(f"sample K={k}", sample=True, kl=False, k=k) for k in (1, 4)]
    for reduction in ("none", "sum", "per_sample", "per_dim"):
        for prior in (False, True):
            p = "learned-prior" if prior else "standard-prior"
            cases.append(case(f"kl {reduction} {p}", sample=False, kl=True, reduction=reduction, prior=prior))
            for k in (1, 4):
                cases.append(case(f"sample+kl {reduction} {p} K={k}", sample=True, kl=True, reduction=reduction,
                                  prior=prior, k=k))
    return cases


_SIGMA_SHAPES = {"scalar": (), "per-channel": (3, 1, 1), "per-sample": (IMAGE[0], 1, 1, 1), "per-element": IMAGE}


def _gaussian_nll(layout, dtype):
    from fusedvae.kernels import gaussian_nll

    def case(sigma, reduction):
        def run():
            x, mean = make(IMAGE, dtype, layout), make(IMAGE, dtype, layout, True)
            shape = _SIGMA_SHAPES[sigma]
            log_sigma = make(shape, dtype, layout if len(shape) == 4 else "contiguous", True)
            out = gaussian_nll(x, mean, log_sigma, full=True, reduction=reduction)
            return [x, mean, log_sigma], [out], [mean, log_sigma], x.numel()

        return Case("gaussian_nll", f"{sigma}-sigma {reduction}", layout, dtype, run)

    return [case(s, r) for s in _SIGMA_SHAPES for r in ("none", "sum", "per_sample")]


def _sum_squared_error(layout, dtype):
    from fusedvae.kernels import sum_squared_error

    def case(per_sample):
        def run():
            x, mean = make(IMAGE, dtype, layout), make(IMAGE, dtype, layout, True)
            out = sum_squared_error(x, mean, per_sample=per_sample)
            return [x, mean], [out], [mean], x.numel()

        return Case("sum_squared_error", "per-sample" if per_sample else "global", layout, dtype, run)

    return [case(p) for p in (False, True)]


def _gaussian_nll_var(layout, dtype):
    from fusedvae.kernels import gaussian_nll_var

    def case(var_shape, reduction):
        def run():
            inp, target = make(IMAGE, dtype, layout, True), make(IMAGE, dtype, layout)
            var = make(IMAGE, dtype, layout, True) if var_shape == "per-element" else make((1, 3, 1, 1), dtype,
                                                                                          grad=True)
            out = gaussian_nll_var(inp, target, var, full=False, eps=1e-6, reduction=reduction)
            return [inp, target, var], [out], [inp, var], inp.numel()

        return Case("gaussian_nll_var", f"{var_shape}-var {reduction}", layout, dtype, run)

    return [case(v, r) for v in ("per-element", "per-channel") for r in ("none", "sum")]


def _betatc(layout, dtype):
    """β-TC aggregate posterior (``fusedvae.kernels.betatc``): 2-D latents only, so one layout."""
    if layout != "contiguous":
        return []
    from fusedvae.kernels.betatc import log_aggregate_posterior

    def case(sampling):
        def run():
            z, mu, lv = (make((512, 32), dtype, grad=True) for _ in range(3))
            joint, marginals = log_aggregate_posterior(z, mu, lv, 60_000, sampling)
            # O(B^2 D) work: a work element is one (i, j, d) triple, not one stored element.
            return [z, mu, lv], [joint, marginals], [z, mu, lv], 512 * 512 * 32

        return Case("betatc", f"{sampling} B=512 D=32", layout, dtype, run)

    return [case(s) for s in ("mws", "mss")]


#: Backend entry point -> case builder. ``log_aggregate_posterior`` is used only when its module imports.
BUILDERS: dict[str, Callable] = {
    "rsample_kl": _rsample_kl,
    "gaussian_nll": _gaussian_nll,
    "sum_squared_error": _sum_squared_error,
    "gaussian_nll_var": _gaussian_nll_var,
    "log_aggregate_posterior": _betatc,
}


def _reachable(entry: str) -> bool:
    if entry != "log_aggregate_posterior":
        return True
    try:
        return hasattr(importlib.import_module("fusedvae.kernels.betatc"), entry)
    except ImportError:
        return False


def uncovered() -> list[str]:
    """Entry points exported by ``fusedvae.kernels`` that no builder covers (add one to :data:`BUILDERS`)."""
    import fusedvae.kernels as kernels

    return sorted(name for name in getattr(kernels, "__all__", ()) if name not in BUILDERS)


def all_cases(dtypes=DTYPES, layouts=LAYOUTS, ops=None) -> list[Case]:
    """Every case, in a fixed order; ``ops`` restricts to those op names (``rsample_kl``, ``betatc``...)."""
    cases = []
    for entry, builder in BUILDERS.items():
        if not _reachable(entry):
            continue
        for dtype in dtypes:
            for layout in layouts:
                cases += [c for c in builder(layout, dtype) if ops is None or c.op in ops]
    return cases
