"""Per-op micro-benchmarks: each op × variant × provider × mode × dtype × size → rows of micro.csv."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

import fusedvae as fv

from .bytes import bytes_min
from .timing import peak_memory_mb, time_ms, tiny

LATENTS = [(256, 32), (4096, 128), (65536, 512)]
IMAGES = [(64, 3, 32, 32), (128, 3, 64, 64), (256, 3, 256, 256)]
QUICK_LATENTS, QUICK_IMAGES = [(256, 32), (2048, 64)], [(8, 3, 32, 32), (32, 3, 64, 64)]
TINY_LATENTS, TINY_IMAGES = [(64, 16)], [(2, 3, 8, 8)]
PROVIDERS = {"eager": "reference", "fusedvae": "auto"}


def _variants(device, dtype):
    """(op, variant, shapes, make) where make(shape) -> (inputs needing grad, call, small_numel)."""
    def t(shape, grad=True, scale=1.0, low=None):
        x = torch.rand(shape, device=device, dtype=dtype) + low if low is not None else \
            torch.randn(shape, device=device, dtype=dtype) * scale
        return x.requires_grad_(grad)

    def latent(prior):
        def make(shape):
            mu, lv = t(shape), t(shape, scale=0.5)
            if not prior:
                return [mu, lv], lambda: fv.rsample_kl(mu, lv), 0
            pmu, plv = t(shape[1:]), t(shape[1:], scale=0.3)
            return [mu, lv, pmu, plv], lambda: fv.rsample_kl(mu, lv, pmu, plv), 2 * math.prod(shape[1:])
        return make

    def kl(shape):
        mu, lv = t(shape), t(shape, scale=0.5)
        return [mu, lv], lambda: (fv.kl_normal(mu, lv),), 0

    def nll(sigma_shape):
        def make(shape):
            x, m = t(shape, grad=False, low=0.0), t(shape, low=0.0)
            s = t(sigma_shape(shape), scale=0.3)
            return [m, s], lambda: (fv.gaussian_nll(x, m, s),), s.numel()
        return make

    def optimal(per_sample):
        def make(shape):
            x, m = t(shape, grad=False, low=0.0), t(shape, low=0.0)
            return [m], lambda: (fv.gaussian_nll_optimal(x, m, per_sample=per_sample),), 0
        return make

    def nll_loss(shape):
        x, m, var = t(shape, grad=False), t(shape), t(shape, low=0.1)
        return [m, var], lambda: (fv.gaussian_nll_loss(m, x, var, check_var=False),), 0

    latents = TINY_LATENTS if tiny() else None
    images = TINY_IMAGES if tiny() else None
    return latents, images, [
        ("rsample_kl", "standard prior", "latent", latent(False)),
        ("rsample_kl", "learned prior", "latent", latent(True)),
        ("kl_normal", "standard prior", "latent", kl),
        ("gaussian_nll", "scalar sigma", "image", nll(lambda s: ())),
        ("gaussian_nll", "per-channel sigma", "image", nll(lambda s: (s[1], 1, 1))),
        ("gaussian_nll", "per-sample sigma", "image", nll(lambda s: (s[0], 1, 1, 1))),
        ("gaussian_nll", "per-element sigma", "image", nll(lambda s: s)),
        ("gaussian_nll_optimal", "global", "image", optimal(False)),
        ("gaussian_nll_optimal", "per sample", "image", optimal(True)),
        ("gaussian_nll_loss", "per-element var", "image", nll_loss),
    ]


def _modes(inputs, call) -> dict[str, Callable[[], object]]:
    def loss_of(outputs):
        return sum(o.float().sum() if o.dim() == 0 else (o.float() * 1e-3).sum() for o in outputs)

    def forward():
        with torch.no_grad():
            return call()

    def full():
        torch.autograd.grad(loss_of(call()), inputs)

    graph = loss_of(call())

    def backward():
        torch.autograd.grad(graph, inputs, retain_graph=True)

    return {"forward": forward, "backward": backward, "full": full}


def run_micro(device: str, dtypes: list[torch.dtype], quick: bool, env: dict, bandwidth_gbps: float,
              progress=lambda it: it) -> list[dict]:
    """Time every case; returns the rows of micro.csv."""
    rows, cases = [], []
    for dtype in dtypes:
        latents, images, variants = _variants(device, dtype)
        latents = latents or (QUICK_LATENTS if quick else LATENTS)
        images = images or (QUICK_IMAGES if quick else IMAGES)
        for op, variant, kind, make in variants:
            for shape in latents if kind == "latent" else images:
                cases.append((dtype, op, variant, shape, make))
    for dtype, op, variant, shape, make in progress(cases):
        for provider, backend in PROVIDERS.items():
            torch.manual_seed(0)
            with fv.use_backend(backend):
                inputs, call, small = make(shape)
                for mode, fn in _modes(inputs, call).items():
                    p50, p20, p80 = time_ms(fn, device)
                    moved = bytes_min(op, mode, math.prod(shape), small, inputs[0].element_size())
                    gbps = moved / (p50 * 1e-3) / 1e9
                    rows.append({
                        "op": op, "variant": variant, "provider": provider, "mode": mode,
                        "dtype": str(dtype).removeprefix("torch."), "shape": "x".join(map(str, shape)),
                        "numel": math.prod(shape), "bytes_min": moved, "time_ms_p50": p50, "time_ms_p20": p20,
                        "time_ms_p80": p80, "gbps": gbps, "roofline_fraction": gbps / bandwidth_gbps,
                        "peak_mem_mb": peak_memory_mb(fn, device), **env,
                    })
    return rows
