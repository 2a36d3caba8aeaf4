"""Two short probes of the first GPU run's unexplained results (``scripts/gpu_run.sh`` runs both).

    python scripts/gpu_probes.py full [--small]     # where a `full` micro call's time goes
    python scripts/gpu_probes.py prior [--small]    # the standard-prior sample/KL kernels against the learned prior

``full``: on the H200 a ``full`` micro call (forward + ``torch.autograd.grad`` in one timed call) of
fusedvae took about twice forward plus backward timed apart (gaussian_nll, scalar σ, 512x3x256x256
float32: 1.07 ms against 0.20 + 0.33) while torch's matched to 1%; the mid size, where a call is
launch-bound, took as long (0.87 ms). For the micro suite's own closures (``bench.micro.mode_functions``)
of gaussian_nll and rsample_kl, torch and fusedvae alike, it prints per mode: the host time to enqueue
one call (device idle before it), the call's wall time to completion, ``do_bench``'s figure (what
``micro.csv`` reports: L2 flushed before every call) and the per-call time of ten calls back to back;
then torch.profiler's table of one ``full`` call's kernels and host ops. A host time above the kernels'
sum means the call is launch-bound: the ``full`` row then measures fusedvae's host path, not its kernels.

``prior``: rsample_kl and kl_normal forward (no autograd) at 131072x512 float32, standard prior,
learned prior and a per-dimension prior, each at the launcher's tiling and at a few others
(``fusedvae.kernels.sample_kl.TILING_OVERRIDE``, the tests' hook: the noise is keyed by the logical index,
so every tiling gives the same result); per compiled kernel its registers, spills, warps and the
resident programs and waves they allow. The H200 measured the standard prior at 0.26 (rsample_kl) and
0.43 (kl_normal) of the copy floor where the learned prior reached 0.83-0.95.

``--small``: tiny sizes (the dry run, on a CPU through Triton's interpreter). Prints as it goes, so a
run cut short keeps what it measured. Run from the repository root.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: The tilings ``prior`` tries beside the launcher's own, (BLOCK_B, BLOCK_N, row_steps): the launcher's tile with
#: 4x the programs (a partial last wave weighs less), a taller tile, and one row per tile (the KL's column sums
#: then need no reduction across warps). Each new tile shape is one more Triton compile (~1 s).
TILINGS = ((2, 512, 8), (4, 512, 16), (1, 512, 32))
SMALL_TILINGS = ((2, 16, 2), (1, 16, 4))
#: The cases timed at every tiling (the others at the launcher's only): the two slow ones and a control.
TILED_CASES = ("rsample_kl standard", "kl_normal standard", "rsample_kl learned")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _bench_ms(fn, device: torch.device, rep_ms: int = 20) -> float:
    """``do_bench``'s median on a GPU (as ``micro.csv``); on a CPU the median of a few calls."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=rep_ms, quantiles=[0.5])[0])
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return _median_ms(samples)


def _call_times(fn, device: torch.device, calls: int = 10) -> dict[str, float]:
    """Host enqueue time and wall time of single calls (device idle before each), and per call back to back."""
    host, wall = [], []
    for _ in range(calls):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        enqueued = time.perf_counter()
        _sync(device)
        done = time.perf_counter()
        del result
        host.append(enqueued - start)
        wall.append(done - start)
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    loop = (time.perf_counter() - start) / calls
    return {"host": _median_ms(host), "wall": _median_ms(wall), "loop": loop * 1e3}


def probe_full(small: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    from bench import micro
    from bench.providers import configure_dynamo, provider_context

    configure_dynamo(retain_graph=True)
    device = _device()
    variants = {(v.op, v.variant): v for v in micro.VARIANTS}
    cases = [(("gaussian_nll", "scalar-sigma"), (2, 3, 8, 8) if small else (512, 3, 256, 256)),
             (("rsample_kl", "standard-prior"), (8, 16) if small else (131072, 512))]
    print(f"full probe on {device}: ms per call; host = time to enqueue one call, wall = to its completion, "
          "do_bench = micro.csv's figure (L2 flushed), loop = per call over 10 back to back")
    verdicts: list[tuple] = []  # (case, host ms of a full call, its kernels' ms)
    for key, shape in cases:
        variant = variants[key]
        for provider in ("torch", "fusedvae"):
            with provider_context(provider):
                gen = torch.Generator(device=device).manual_seed(0)
                tensors = variant.make(shape, torch.float32, device, gen)
                grad_inputs = [t for t in tensors if t.requires_grad]
                fn = variant.function(provider)
                functions, _ = micro.mode_functions(lambda fn=fn, tensors=tensors: fn(*tensors), grad_inputs, gen)
                for _ in range(3):
                    functions["full"]()
                for mode, call in functions.items():
                    t = _call_times(call, device)
                    print(f"{key[0]}:{key[1]} {'x'.join(map(str, shape))} {provider:<8} {mode:<8} "
                          f"host {t['host']:7.3f}  wall {t['wall']:7.3f}  do_bench {_bench_ms(call, device):7.3f}  "
                          f"loop {t['loop']:7.3f}", flush=True)
                graph = _graph_ms(functions["full"], device)
                print(f"{key[0]}:{key[1]} {provider:<8} full in a CUDA graph (the kernels alone, no host path): "
                      f"{graph}", flush=True)
                verdicts.append((f"{key[0]} {provider}", t["host"]))
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                _sync(device)
                with profile(activities=activities) as prof:
                    functions["full"]()
                    _sync(device)
                sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                print(f"-- one full call, {provider}: torch.profiler, sorted by {sort}")
                print(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=48), flush=True)
                verdicts[-1] += (_kernel_ms(prof),)
            del tensors, grad_inputs, functions
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # last line (the step's detail in the summary): a full call whose host time exceeds its kernels' is launch-bound
    print("full call, host ms / kernel ms: " + "; ".join(
        f"{case} {host:.2f}/{kernels:.2f}{' launch-bound' if host > kernels else ''}" for case, host, kernels in verdicts))


def _graph_ms(fn, device: torch.device) -> str:
    """``do_bench`` of ``fn`` captured in a CUDA graph and replayed (what a graph-captured training step pays)."""
    if device.type != "cuda":
        return "n/a (no GPU)"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up on a side stream, as torch.cuda.graph's documentation asks
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return f"{_bench_ms(graph.replay, device):.3f} ms"
    except Exception as exc:  # noqa: BLE001 - a probe: report and go on
        return f"n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"


def _kernel_ms(prof) -> float:
    """The device time of the profiled kernels, in ms (0 on a CPU)."""
    total = 0.0
    for event in prof.key_averages():
        if str(getattr(event, "device_type", "")).endswith("CUDA"):
            total += getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0))
    return total / 1e3


def _compiled_kernels(jit_fn) -> dict:
    """The compiled specializations of a Triton kernel by cache key (Triton >= 3.2 and older), {} in the interpreter."""
    found = {}
    caches = getattr(jit_fn, "device_caches", None)
    if caches:
        for entry in caches.values():
            table = entry[0] if isinstance(entry, tuple) else entry
            if isinstance(table, dict):
                found.update(table)
    for table in (getattr(jit_fn, "cache", None) or {}).values():
        if isinstance(table, dict):
            found.update(table)
    return found


def occupancy(regs: int, warps: int, shared: int, programs: int, sm_count: int) -> tuple[int, float]:
    """Programs an SM holds (registers in units of 256 per warp, 64 warps and 32 programs per SM, 228 KiB of
    shared memory with 1 KiB reserved per program: sm_90's limits) and the waves ``programs`` make on ``sm_count``."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    per_sm = min(32, 65536 // max(regs_per_warp * warps, 1), 64 // warps)
    if shared:
        per_sm = min(per_sm, (228 * 1024) // (shared + 1024))
    return per_sm, programs / (max(per_sm, 1) * sm_count)


def _occupancy(kernel, programs: int, device: torch.device) -> str:
    """Registers, spills, warps, and the programs an SM holds and the waves, of a compiled Triton kernel."""
    regs = getattr(kernel, "n_regs", None)
    meta = getattr(kernel, "metadata", None)
    warps = getattr(meta, "num_warps", None)
    if regs is None or warps is None or device.type != "cuda":
        return "kernel info n/a"
    shared = getattr(meta, "shared", 0) or 0
    per_sm, waves = occupancy(regs, warps, shared, programs, torch.cuda.get_device_properties(device).multi_processor_count)
    return (f"{regs} regs, {getattr(kernel, 'n_spills', 0)} spills, {warps} warps, {shared} B shared: "
            f"{per_sm} programs/SM, {programs} programs = {waves:.2f} waves")


def probe_prior(small: bool) -> None:
    import importlib

    import fusedvae as fv
    from fusedvae.kernels import _common

    sample_kl = importlib.import_module("fusedvae.kernels.sample_kl")  # the module (the package exports the function)
    device = _device()
    rows, cols = (8, 16) if small else (131072, 512)
    gen = torch.Generator(device=device).manual_seed(0)
    mu = torch.randn(rows, cols, generator=gen, device=device)
    lv = 0.5 * torch.randn(rows, cols, generator=gen, device=device)
    pmu = 0.5 * torch.randn(rows, cols, generator=gen, device=device)
    plv = 0.3 * torch.randn(rows, cols, generator=gen, device=device)
    element = mu.element_size() * mu.numel()
    cases = {  # name: (call, bytes the fewest: inputs read once, z written once)
        "rsample_kl standard": (lambda: fv.rsample_kl(mu, lv), 3 * element),
        "rsample_kl learned": (lambda: fv.rsample_kl(mu, lv, pmu, plv), 5 * element),
        "rsample_kl per-dim": (lambda: fv.rsample_kl(mu, lv, pmu[0], plv[0]), 3 * element),
        "kl_normal standard": (lambda: fv.kl_normal(mu, lv), 2 * element),
        "kl_normal learned": (lambda: fv.kl_normal(mu, lv, pmu, plv), 4 * element),
    }
    copy_gbps = float("nan")
    if device.type == "cuda":
        from bench.device import copy_bandwidth_gbps

        copy_gbps = copy_bandwidth_gbps(device, min_run_time=0.05)
    tiling = _common.row_tiling(rows, cols, device)
    print(f"prior probe on {device}, {rows}x{cols} float32, copy {copy_gbps:.0f} GB/s; launcher tiling {tiling}, "
          f"target programs {_common.target_programs(device)}", flush=True)
    kernel = sample_kl._sample_kl_forward_kernel
    compiled = {}  # (case, BLOCK_B, BLOCK_N): the kernel it compiled (row_steps is not a compile-time constant)
    for override in (None, *(SMALL_TILINGS if small else TILINGS)):
        sample_kl.TILING_OVERRIDE = override
        try:
            grid = _common.row_tiling(rows, cols, device, override)
            programs = grid.n_col_blocks * grid.n_row_chunks
            for name, (call, moved) in cases.items():
                if override is not None and name not in TILED_CASES:
                    continue
                before = set(_compiled_kernels(kernel))
                with torch.no_grad():
                    call()
                    new = [k for key, k in _compiled_kernels(kernel).items() if key not in before]
                    ms = _bench_ms(call, device)
                fraction = moved / (ms * 1e-3) / 1e9 / copy_gbps
                if new:
                    compiled[(name, grid.block_b, grid.block_n)] = new[0]
                known = compiled.get((name, grid.block_b, grid.block_n))
                info = _occupancy(known, programs, device) if known is not None else "kernel info n/a"
                print(f"tiling {override or 'launcher'}: {name:<20} {ms:7.3f} ms  {fraction:5.2f} of copy  {info}",
                      flush=True)
        finally:
            sample_kl.TILING_OVERRIDE = None
    # the micro suite's forward mode: inputs that require grad (autograd records the op), launcher tiling
    for tensor in (mu, lv, pmu, plv):
        tensor.requires_grad_(True)
    for name in ("rsample_kl standard", "rsample_kl learned"):
        call, moved = cases[name]
        ms = _bench_ms(call, device)
        print(f"with autograd: {name:<20} {ms:7.3f} ms  {moved / (ms * 1e-3) / 1e9 / copy_gbps:5.2f} of copy",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=("full", "prior"))
    parser.add_argument("--small", action="store_true", help="tiny sizes (the dry run)")
    args = parser.parse_args(argv)
    (probe_full if args.probe == "full" else probe_prior)(args.small)
    return 0


if __name__ == "__main__":
    sys.exit(main())
