"""Hardware counters of two kernels, per element, to set beside the static cost model (``python -m bench static``).

    ncu --profile-from-start off --clock-control none --metrics <METRICS> -o REPORT \\
        python scripts/ncu_probe.py target [--numel N]        # rsample forward, then gaussian_nll forward
    ncu --import REPORT.ncu-rep --csv --page raw --print-units base > raw.csv
    python scripts/ncu_probe.py parse raw.csv --numel N [--csv out.csv]

``target`` warms both ops up (Triton compiles them) outside the profiled range, then runs each once
between ``cudaProfilerStart``/``Stop``, so ncu sees only their kernels. ``parse`` prints, per kernel,
the instructions executed per element (warp instructions × 32 / numel: lane instructions, the static
report's unit) and the DRAM bytes read and written per element. ``--clock-control none``: the card's
clocks are left as they are. Without a GPU, ``target`` runs the ops on the CPU (the dry run).
"""

from __future__ import annotations

import argparse
import csv
import sys

METRICS = ("smsp__inst_executed.sum", "dram__bytes_read.sum", "dram__bytes_write.sum", "gpu__time_duration.sum")


def target(numel: int) -> None:
    import torch

    import fusedvae as fv

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(numel, generator=gen).to(device).view(-1, 256)
    logvar = (0.5 * torch.randn(numel, generator=gen)).to(device).view(-1, 256)
    x = torch.rand(numel, generator=gen).to(device).view(-1, 3, 16, 16)
    mean = torch.rand(numel, generator=gen).to(device).view(-1, 3, 16, 16)
    log_sigma = torch.tensor(0.1, device=device)
    for _ in range(2):  # compile and warm up, unprofiled
        fv.rsample(mu, logvar)
        fv.gaussian_nll(x, mean, log_sigma)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    fv.rsample(mu, logvar)
    fv.gaussian_nll(x, mean, log_sigma)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"ran rsample and gaussian_nll forward on {numel} float32 elements ({device})")


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return float("nan")


def parse(path: str, numel: int) -> list[dict]:
    """One row per profiled kernel launch of ncu's raw CSV page (its second line, the units, is skipped)."""
    rows = []
    with open(path, newline="") as handle:
        lines = [line for line in handle if not line.startswith("==")]  # ncu's own messages
    for record in csv.DictReader(lines):
        if not record.get("ID", "").strip().isdigit():
            continue
        inst = _number(record.get("smsp__inst_executed.sum", "nan"))
        read = _number(record.get("dram__bytes_read.sum", "nan"))
        write = _number(record.get("dram__bytes_write.sum", "nan"))
        rows.append({
            "kernel": record.get("Kernel Name", "?")[:60],
            "grid": record.get("Grid Size", ""),
            "block": record.get("Block Size", ""),
            "time_us": _number(record.get("gpu__time_duration.sum", "nan")) / 1e3,
            "inst_per_elem": inst * 32 / numel,
            "dram_read_b_per_elem": read / numel,
            "dram_write_b_per_elem": write / numel,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("target", help="the profiled program")
    run.add_argument("--numel", type=int, default=3 << 22)
    read = commands.add_parser("parse", help="per-element figures from ncu's raw CSV page")
    read.add_argument("raw")
    read.add_argument("--numel", type=int, default=3 << 22)
    read.add_argument("--csv", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.numel % 768:
        parser.error("--numel must be a multiple of 768 (rows of 256 latents and 3x16x16 images)")
    if args.command == "target":
        target(args.numel)
        return 0
    rows = parse(args.raw, args.numel)
    if not rows:
        print(f"no kernel rows in {args.raw}", file=sys.stderr)
        return 1
    print(f"{'kernel':<60} {'us':>8} {'inst/elem':>10} {'DRAM rd B/elem':>15} {'DRAM wr B/elem':>15}")
    for row in rows:
        print(f"{row['kernel']:<60} {row['time_us']:8.1f} {row['inst_per_elem']:10.1f} "
              f"{row['dram_read_b_per_elem']:15.2f} {row['dram_write_b_per_elem']:15.2f}")
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
