"""The micro-benchmarks through pytest-benchmark: ``pytest bench/ --benchmark-only``.

One size per variant (the largest of the quick sweep on a GPU, a small one on a CPU), every op
variant × provider × mode (``torch``: what users write, ``bench/baselines.py``; ``fusedvae``), timed by
pytest-benchmark with the GPU synchronised inside the timed function. ``bytes_min`` and ``gbps`` go into
each benchmark's ``extra_info`` (shown with ``--benchmark-json``). The ``torch+compile`` provider runs on a GPU, or on a CPU with
``FUSEDVAE_BENCH_COMPILE=1`` (inductor builds C++ there: tens of seconds per case). The CLI
(``python -m bench run``) is the full suite; this is the same cases in pytest's harness, for people
who track benchmarks with pytest-benchmark's ``--benchmark-autosave`` / ``--benchmark-compare``.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.bytes import MODES, bytes_min
from bench.micro import VARIANTS, mode_functions
from bench.providers import configure_dynamo, is_compiled, provider_context

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = {"latent": (65536, 512), "image": (256, 3, 128, 128)} if DEVICE.type == "cuda" else \
    {"latent": (1024, 64), "image": (16, 3, 32, 32)}
PROVIDERS = ["torch", "fusedvae"]
if DEVICE.type == "cuda" or os.environ.get("FUSEDVAE_BENCH_COMPILE", "0") not in ("", "0"):
    PROVIDERS.insert(1, "torch+compile")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v.op}:{v.variant}")
def test_micro(benchmark, variant, provider, mode):
    configure_dynamo(retain_graph=True)
    shape = SIZES[variant.kind]
    gen = torch.Generator().manual_seed(0)
    with provider_context(provider):
        fn = variant.function(provider)
        if is_compiled(provider):
            torch._dynamo.reset()
            fn = torch.compile(fn)
        tensors = variant.make(shape, torch.float32, DEVICE, gen)
        grad_inputs = [t for t in tensors if t.requires_grad]
        functions, outputs = mode_functions(lambda: fn(*tensors), grad_inputs, gen)
        functions["full"]()  # compile and warm up outside the timing
        timed = functions[mode]

        def run():
            result = timed()
            _sync()
            return result

        moved = bytes_min(mode, tensors, outputs, grad_inputs)
        benchmark.group = f"{variant.op}:{variant.variant}:{mode}"
        benchmark.extra_info.update(op=variant.op, variant=variant.variant, provider=provider, mode=mode,
                                    shape="x".join(map(str, shape)), bytes_min=moved, device=str(DEVICE))
        benchmark.pedantic(run, warmup_rounds=2, rounds=20 if DEVICE.type == "cpu" else 100, iterations=1)
        median = benchmark.stats.stats.median
        benchmark.extra_info["gbps"] = moved / median / 1e9 if median else float("nan")
