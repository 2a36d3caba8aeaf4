"""Timing: CUDA events through ``triton.testing.do_bench`` (L2 flushed) on a GPU, ``torch.utils.benchmark`` on CPU."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch

QUANTILES = (0.5, 0.2, 0.8)


def tiny() -> bool:
    """``FUSEDVAE_BENCH_TINY=1``: the smallest sizes and fewest repeats, for smoke tests."""
    return os.environ.get("FUSEDVAE_BENCH_TINY", "0") not in ("", "0")


def time_ms(fn: Callable[[], object], device: str) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile time of ``fn`` in milliseconds, after warm-up."""
    if device == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=list(QUANTILES))
        return p50, p20, p80
    import torch.utils.benchmark as benchmark

    fn()  # warm-up
    measurement = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) \
        .blocked_autorange(min_run_time=0.02 if tiny() else 0.2)
    times = np.asarray(measurement.times) * 1e3
    return tuple(float(np.quantile(times, q)) for q in QUANTILES)


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory allocated while ``fn`` runs, above what was allocated before it (CUDA only; NaN on CPU)."""
    if device != "cuda":
        return math.nan
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
