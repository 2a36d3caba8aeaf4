"""The benchmark suite's command line.

    python -m bench run [--suite micro|train|science|all] [--device auto|cpu|cuda] [--dtype float32,bfloat16]
                        [--quick] [--out DIR] [--data synthetic|digits|PATH] [more: python -m bench run -h]
    python -m bench report [DIR]
    python -m bench compare OLD.csv NEW.csv [--threshold 0.05]
    python -m bench static [--arch sm_90] [--out DIR]

``run`` writes ``micro.csv``, ``accuracy.csv`` and ``train.csv`` into ``results/<device-slug>/`` (or
``--out``), then the report. Under ``torchrun --nproc-per-node N -m bench run --suite train`` the training loops run
with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
SUITES = ("micro", "train", "science")


class CsvSink:
    """Appends rows to a CSV as they are measured (a crash keeps what was done), header first.

    ``append``: add to the rows already in ``path`` (several runs, e.g. ``scripts/gpu_run.sh``'s steps, fill
    one CSV); the header is written only to a new or empty file.
    """

    def __init__(self, path: Path, columns, *, append: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        header = not (append and path.is_file() and path.stat().st_size > 0)
        self.handle = open(path, "a" if append else "w", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=list(columns))
        if header:
            self.writer.writeheader()
        self.count = 0

    def __call__(self, row: dict) -> None:
        self.writer.writerow(row)
        self.handle.flush()
        self.count += 1

    def close(self) -> None:
        self.handle.close()


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda **kwargs: tqdm(mininterval=0.5, dynamic_ncols=True, **kwargs)


def _parse_suites(text: str, quick: bool) -> list[str]:
    """``all``: micro, train and science; with --quick micro and train (science's quick mode is a smoke test)."""
    if text == "all":
        return ["micro", "train"] if quick else list(SUITES)
    suites = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise SystemExit(f"--suite: unknown {unknown}; choose from {', '.join(SUITES)} or all")
    return suites


def _parse_dtypes(text: str | None, device) -> list:
    import torch

    if text is None:
        text = "float32,bfloat16" if device.type == "cuda" else "float32"
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in DTYPES]
    if unknown:
        raise SystemExit(f"--dtype: unknown {unknown}; choose from {', '.join(DTYPES)}")
    return [getattr(torch, name) for name in names]


def _parse_list(text: str | None, known: tuple[str, ...], flag: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in items if s not in known]
    if unknown:
        raise SystemExit(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")
    return items


def _run(args) -> int:
    if args.tiny:
        os.environ["FUSEDVAE_BENCH_TINY"] = "1"
    import torch

    from .bytes import MODES
    from .device import copy_bandwidth_gbps, default_out_dir, device_name, distributed_env, resolve_device
    from .providers import ALL_PROVIDERS, MICRO_PROVIDERS, TRAIN_PROVIDERS
    from .timing import tiny

    started = time.perf_counter()
    suites = _parse_suites(args.suite, args.quick or args.tiny)
    rank, local_rank, world = distributed_env()
    device = resolve_device(args.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    preset = "tiny" if tiny() else ("quick" if args.quick else "full")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and preset != "full" and world == 1:
        torch.set_num_threads(1)  # see --threads: the reproducible choice on shared machines
    dtypes = _parse_dtypes(args.dtype, device)
    providers = _parse_list(args.providers, ALL_PROVIDERS, "--providers")
    modes = _parse_list(args.modes, MODES, "--modes") or MODES
    compile_scope = args.compile or ("some" if preset == "tiny" or (preset == "quick" and device.type == "cpu") else "all")
    out = Path(args.out) if args.out else default_out_dir(device)
    progress = _progress(not args.no_progress and rank == 0)
    if rank == 0:
        print(f"fusedvae bench: {device_name(device)} ({device}), preset {preset}, suites {','.join(suites)}, "
              f"dtypes {','.join(str(d).removeprefix('torch.') for d in dtypes)}, torch threads "
              f"{torch.get_num_threads()}, world size {world}, compile {compile_scope} -> {out}", flush=True)

    if "micro" in suites and rank == 0:
        from .micro import COLUMNS, run_micro, select_variants

        copy_gbps = copy_bandwidth_gbps(device, min_run_time=0.05 if preset == "tiny" else 0.3)
        print(f"copy bandwidth (read + write): {copy_gbps:.1f} GB/s", flush=True)
        sink = CsvSink(out / "micro.csv", COLUMNS, append=args.append)
        micro_providers = [p for p in (providers or MICRO_PROVIDERS) if p != "fusedvae+compile"]
        try:
            run_micro(device, dtypes, preset=preset, copy_gbps=copy_gbps, variants=select_variants(args.ops),
                      providers=micro_providers, modes=modes, compile_scope=compile_scope,
                      min_run_time=args.min_run_time or (0.1 if preset == "quick" and device.type == "cpu" else 0.2),
                      seed=args.seed, sizes=args.sizes, rep_ms=args.rep_ms, warmup_ms=args.warmup_ms, on_row=sink,
                      progress=progress)
        finally:
            sink.close()
        print(f"wrote {sink.path} ({sink.count} rows)", flush=True)

    if "micro" in suites and rank == 0 and not args.no_accuracy:
        from .accuracy import COLUMNS as ACCURACY_COLUMNS
        from .accuracy import run_accuracy

        sink = CsvSink(out / "accuracy.csv", ACCURACY_COLUMNS, append=args.append)
        try:  # the compiled providers' accuracy only where the suite compiles (not the tiny smoke runs)
            run_accuracy([p for p in micro_providers if preset != "tiny" and compile_scope != "none"
                          or not p.endswith("compile")], on_row=sink)
        finally:
            sink.close()
        print(f"wrote {sink.path} ({sink.count} rows)", flush=True)

    if "train" in suites:
        from .models import model_specs, select_models
        from .train import COLUMNS, run_train

        if world > 1:
            torch.distributed.barrier()
        specs = select_models(model_specs(preset, device.type), args.models)
        sink = CsvSink(out / "train.csv", COLUMNS, append=args.append) if rank == 0 else None
        try:
            run_train(device, dtypes, specs, preset=preset, providers=providers or TRAIN_PROVIDERS, data=args.data,
                      steps=args.steps, warmup=args.warmup, compile_scope=compile_scope, seed=args.seed,
                      dump_params=Path(args.dump_params) if args.dump_params else None,
                      on_row=sink or (lambda row: None), progress=progress)
        finally:
            if sink is not None:
                sink.close()
        if sink is not None:
            print(f"wrote {sink.path} ({sink.count} rows)", flush=True)

    if "science" in suites and rank == 0:
        from .science import run_science

        # Only a full run writes the committed results/science; a quick one (numbers that mean nothing,
        # the science suite's own smoke test) goes under --out.
        science_out = Path("results/science") if preset == "full" else out / "science"
        run_science(science_out, quick=preset != "full",
                    data=None if args.data in ("synthetic", "digits") else args.data, device=str(device))

    if rank == 0 and not args.no_report and ({"micro", "train"} & set(suites)):
        from .report import write_report

        report = write_report(out)
        print(f"wrote {report}", flush=True)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def _report(args) -> int:
    from .report import write_report

    if args.dir:
        directory = Path(args.dir)
    else:
        from .device import default_out_dir, resolve_device

        directory = default_out_dir(resolve_device("auto"))
    if not directory.is_dir():
        raise SystemExit(f"report: {directory} is not a folder (run `python -m bench run` first)")
    print(f"wrote {write_report(directory)}")
    return 0


def _compare(args) -> int:
    from .compare import compare_files

    return compare_files(Path(args.old), Path(args.new), threshold=args.threshold, show=args.show)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description="fusedvae's benchmark suite")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run benchmark suites, write CSVs and the report")
    run.add_argument("--suite", default="all", help="micro, train, science (comma-separated), or all (the default; "
                     "with --quick: micro and train)")
    run.add_argument("--device", default="auto", help="auto (default: cuda when present), cpu or cuda")
    run.add_argument("--dtype", default=None, help="comma-separated; default float32,bfloat16 on a GPU, float32 on a CPU")
    run.add_argument("--quick", action="store_true", help="fewer and smaller sizes, fewer steps (CPU: under 5 minutes)")
    run.add_argument("--out", default=None, help="output folder (default results/<device-slug>/)")
    run.add_argument("--data", default="synthetic", help="training data: synthetic (default), digits (scikit-learn's), "
                     "or a path: an MNIST IDX file or a folder holding one, or a folder of images")
    run.add_argument("--providers", default=None, help="subset of torch,torch+compile,fusedvae,fusedvae+compile "
                     "(the default; micro has no fusedvae+compile), and reference (fusedvae's specification)")
    run.add_argument("--ops", default=None, help="micro: op or op:variant, comma-separated (default all)")
    run.add_argument("--modes", default=None, help="micro: subset of forward,backward,full")
    run.add_argument("--models", default=None, help="train: subset of mlp,conv,hier,akl (or model:variant)")
    run.add_argument("--steps", type=int, default=None, help="train: timed steps (default by preset and device)")
    run.add_argument("--warmup", type=int, default=None, help="train: warm-up steps before timing")
    run.add_argument("--compile", choices=("all", "some", "none"), default=None,
                     help="which cases run the compiled providers (default all; some with --quick on a CPU)")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch (default: torch's for a full run, 1 with --quick: on a shared or "
                     "busy machine oversubscribed OpenMP threads slow torch on a CPU by 10-100x)")
    run.add_argument("--sizes", default=None, help="micro: a size table of bench/micro.py's SIZES instead of the "
                     "preset's (gpu-run: one mid size and one >= 256 MB per op, as scripts/gpu_run.sh uses)")
    run.add_argument("--min-run-time", type=float, default=None, help="micro on CPU: seconds of timing per case")
    run.add_argument("--rep-ms", type=int, default=100, help="micro on GPU: do_bench's repetition budget per timing")
    run.add_argument("--warmup-ms", type=int, default=25, help="micro on GPU: do_bench's warm-up budget per timing")
    run.add_argument("--no-accuracy", action="store_true", help="micro: skip accuracy.csv (its compiled providers "
                     "compile eight more graphs)")
    run.add_argument("--append", action="store_true", help="add rows to the CSVs already in the output folder "
                     "instead of starting them afresh")
    run.add_argument("--seed", type=int, default=0, help="seed of inputs, weights, data order and noise (default 0)")
    run.add_argument("--no-report", action="store_true", help="do not write REPORT.md and plots after the run")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke tests: the smallest everything
    run.add_argument("--dump-params", default=None, help=argparse.SUPPRESS)  # tests: each rank's final weights
    run.set_defaults(handler=_run)

    report = commands.add_parser("report", help="write DIR/REPORT.md and PNG plots from DIR's CSVs")
    report.add_argument("dir", nargs="?", default=None, help="results folder (default results/<this device>/)")
    report.set_defaults(handler=_report)

    compare = commands.add_parser("compare", help="ratio of medians per matching row; non-zero exit on a fused regression")
    compare.add_argument("old")
    compare.add_argument("new")
    compare.add_argument("--threshold", type=float, default=0.05,
                         help="a fused row more than this fraction slower is a regression")
    compare.add_argument("--show", type=int, default=20, help="rows to print, slowest ratios first (0: all)")
    compare.set_defaults(handler=_compare)

    from .static import add_parser as add_static  # python -m bench static: compile for sm_90, model the cost

    add_static(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
