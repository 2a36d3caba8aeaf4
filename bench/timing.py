"""Timing and memory of one benchmark case.

- GPU: CUDA events through ``triton.testing.do_bench`` (it flushes the L2 cache before every call,
  warms up for ``warmup`` ms and repeats for ``rep`` ms), quantiles 0.5 / 0.2 / 0.8.
- CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (blocks of calls, each block's mean a
  sample) after warm-up calls, topped up to at least :data:`MIN_BLOCKS` samples; the same quantiles.
  With one torch thread (the ``--quick`` default) the clock is the process's CPU time
  (:func:`cpu_clock`): on a shared machine, wall time counts whatever other processes hold the core.
- Peak memory: on a GPU the caching allocator's peak during one call above what was allocated
  before it; on a CPU the same figure from the profiler's allocation records (``profile_memory``).
- Saved for backward: the bytes of every tensor autograd saves while a forward runs
  (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once, inputs included.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

QUANTILES = (0.5, 0.2, 0.8)
MIN_BLOCKS = 5


def tiny() -> bool:
    """``FUSEDVAE_BENCH_TINY=1`` (or ``run --tiny``): the smallest sizes and fewest repeats, for smoke tests."""
    return os.environ.get("FUSEDVAE_BENCH_TINY", "0") not in ("", "0")


def cpu_clock() -> Callable[[], float]:
    """The clock of CPU timings: the process's CPU time with one torch thread, else wall time.

    With one thread the CPU time of the process is the time the call computes: on an idle machine
    the same as wall time, on a shared one without the slices other processes take (a loaded 2-core
    machine made wall-clock medians of one case vary 5x between runs). With several threads it
    would add the threads' times up, so wall time is used.
    """
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def clock_name(device) -> str:
    """What the time columns measure on ``device``: ``cuda-events``, ``process-cpu`` or ``wall``."""
    if _is_cuda(device):
        return "cuda-events"
    return "process-cpu" if cpu_clock() is time.process_time else "wall"


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def time_ms(
    fn: Callable[[], object], device, *, min_run_time: float = 0.2, warmup: int = 2, rep_ms: int = 100,
    warmup_ms: int = 25,
) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile time of one call of ``fn``, in milliseconds, after warm-up.

    ``fn`` must be self-contained (no gradient left to accumulate: the suite calls
    ``torch.autograd.grad``, which returns fresh gradients). On a GPU ``warmup_ms`` and ``rep_ms`` are
    ``do_bench``'s warm-up and repetition budgets (a call that moves >= 256 MB takes >= 0.06 ms on any
    current GPU, so 40 ms of repetitions still give hundreds of samples for the fused ops).
    """
    if _is_cuda(device):
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
        return float(p50), float(p20), float(p80)
    import torch.utils.benchmark as benchmark

    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), timer=cpu_clock())
    if tiny():
        min_run_time = min(min_run_time, 0.005)
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(measurement.times)
    deadline = time.perf_counter() + max(2 * min_run_time, 0.05)
    while len(times) < MIN_BLOCKS and time.perf_counter() < deadline:  # slow calls: one sample per block
        times.extend(timer.timeit(measurement.number_per_run).times)
    samples = np.asarray(times) * 1e3
    return tuple(float(np.quantile(samples, q)) for q in QUANTILES)  # type: ignore[return-value]


def time_interleaved_ms(
    functions: dict[str, Callable[[], object]],
    device,
    *,
    context: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext(),
    min_run_time: float = 0.2,
    warmup: int = 2,
    rep_ms: int = 100,
    warmup_ms: int = 25,
) -> dict[str, tuple[float, float, float]]:
    """:func:`time_ms` of several functions (the providers of one case), each run inside ``context(name)``.

    On a CPU the providers are timed in rounds, one ``torch.utils.benchmark`` block of each in turn,
    until every provider has at least :data:`MIN_BLOCKS` blocks and ``min_run_time`` seconds of
    samples: a busy or throttling machine then slows all providers alike instead of whichever ran
    during the disturbance. A block is as many calls as fill ~10 ms (at least one). On a GPU, where
    CUDA-event timings are stable, each provider is timed by ``do_bench`` in turn.
    """
    if _is_cuda(device):
        out = {}
        for name, fn in functions.items():
            with context(name):
                out[name] = time_ms(fn, device, min_run_time=min_run_time, warmup=warmup, rep_ms=rep_ms,
                                    warmup_ms=warmup_ms)
        return out
    import torch.utils.benchmark as benchmark

    if tiny():
        min_run_time = min(min_run_time, 0.005)
    timers, numbers, samples = {}, {}, {}
    for name, fn in functions.items():
        with context(name):
            for _ in range(warmup):
                fn()
            start = time.perf_counter()
            fn()
            once = time.perf_counter() - start
        timers[name] = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(),
                                       timer=cpu_clock())
        numbers[name] = max(1, int(0.01 / max(once, 1e-7)))
        samples[name] = []
    deadline = time.perf_counter() + 20 * max(min_run_time, 0.05) * len(functions)  # a hard cap for slow calls
    while True:
        for name in functions:
            with context(name):
                samples[name].extend(timers[name].timeit(numbers[name]).times)
        enough = all(len(v) >= MIN_BLOCKS and len(v) * numbers[n] * np.mean(v) >= min_run_time
                     for n, v in samples.items())
        if enough or time.perf_counter() > deadline:
            break
    return {name: tuple(float(np.quantile(np.asarray(v) * 1e3, q)) for q in QUANTILES)  # type: ignore[misc]
            for name, v in samples.items()}


@contextlib.contextmanager
def _quiet_native_output():
    """Silence what native code prints on fds 1 and 2 (the profiler logs every start and stop there)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _cpu_peak_bytes(fn: Callable[[], object]) -> float:
    """Peak of the running sum of CPU allocations minus frees while ``fn`` runs (the profiler's records)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_output(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return float(peak)


def peak_memory_mb(fn: Callable[[], object], device) -> float:
    """Peak memory allocated during one call of ``fn`` above what was allocated before it, in MiB.

    What ``fn`` returns counts (it is allocated during the call); inputs and anything made before
    the call do not. NaN when it cannot be measured.
    """
    try:
        if _is_cuda(device):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            result = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            del result
            return peak / 2**20
        return _cpu_peak_bytes(fn) / 2**20
    except Exception:  # noqa: BLE001 - memory is a nice-to-have column, never a reason to lose a row
        return math.nan


def host_ms(fn: Callable[[], object], device, *, calls: int = 5) -> float:
    """Median host time to enqueue one call of ``fn`` with the device idle before it, in ms; NaN on a CPU.

    On a GPU a call whose host time exceeds its kernels' time is launch-bound: ``do_bench`` (a flushed L2
    and an idle device before every call) then times the host path, not the kernels. Any wait the call
    itself makes for the device counts. On a CPU the call's time is all host time: not measured again.
    """
    if not _is_cuda(device):
        return math.nan
    samples = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - start)
        del result
    torch.cuda.synchronize()
    return float(np.median(samples) * 1e3)


def saved_mb(fn: Callable[[], object]) -> float:
    """MiB that autograd saves for backward while ``fn`` (a forward pass) runs, each storage counted once.

    A tensor saved twice, or two views of one storage, count once; an input saved for backward
    counts (it is kept alive by the graph). NaN when it cannot be measured.

    Example::

        >>> x = torch.ones(1024, 256, requires_grad=True)     # 1 MiB
        >>> saved_mb(lambda: (x.exp() * x).sum())             # exp's result and x: 2 MiB
        2.0
    """
    storages: dict[tuple[str, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            result = fn()
        del result
    except Exception:  # noqa: BLE001 - a nice-to-have column, never a reason to lose a row
        return math.nan
    return sum(storages.values()) / 2**20
