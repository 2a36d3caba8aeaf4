"""python -m bench run [--suite micro|science|all] [--device auto|cpu|cuda] [--dtype ...] [--quick] [--out DIR]"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _run(args) -> int:
    import pandas as pd

    from .device import copy_bandwidth_gbps, device_slug, environment, resolve_device

    device = resolve_device(args.device)
    suites = {"all": ["micro", "science"]}.get(args.suite, args.suite.split(","))
    out = pathlib.Path(args.out or f"results/{device_slug(device)}")
    out.mkdir(parents=True, exist_ok=True)
    if "micro" in suites:
        from tqdm import tqdm

        from .micro import run_micro

        dtypes = [DTYPES[name] for name in args.dtype.split(",")]
        bandwidth = copy_bandwidth_gbps(device)
        print(f"{device}: copy bandwidth {bandwidth:.1f} GB/s (read + write)")
        rows = run_micro(device, dtypes, args.quick, environment(device), bandwidth,
                         progress=lambda cases: tqdm(cases, desc="micro"))
        pd.DataFrame(rows).to_csv(out / "micro.csv", index=False)
        print(f"wrote {out / 'micro.csv'} ({len(rows)} rows)")
    if "science" in suites:
        from .science import run_science

        run_science(pathlib.Path("results/science"), quick=args.quick, data=args.data, device=device)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run benchmark suites")
    run.add_argument("--suite", default="all", help="micro, science, or all")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    run.add_argument("--dtype", default="float32,bfloat16")
    run.add_argument("--quick", action="store_true")
    run.add_argument("--out")
    run.add_argument("--data", help="MNIST IDX files or a folder of images (science suite)")
    args = parser.parse_args(argv)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
