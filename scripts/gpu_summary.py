"""The short table ``scripts/gpu_run.sh`` prints last: each step's outcome, then the headline figures.

    python scripts/gpu_summary.py RESULTS_DIR --steps STEPS.tsv [--out SUMMARY.md]

``STEPS.tsv`` has one line per step: name, status (ok, FAIL, TIMEOUT, skip), seconds, detail.
From ``RESULTS_DIR/micro.csv``: per op variant and dtype, at its largest size in ``full`` mode
(forward + backward), fusedvae's time, its fraction of the copy floor, its speed-up over the
unfused providers and its host time per call (``launch-bound`` where that is the time measured).
From ``train.csv``: per model, each provider's median step and fusedvae's speed-up. From ``ncu.csv``
(``scripts/ncu_probe.py``): each profiled kernel's DRAM throughput as a fraction of the copy bandwidth
(``env.json``) beside its instructions per element, measured and modeled (the static report's count and margin).
Reads only the standard library, so it runs wherever the run did.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

# the unfused providers under their current names and the names they had before
TORCH = ("torch", "eager")
TORCH_COMPILE = ("torch+compile", "compile")


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: float, spec: str = ".3g", suffix: str = "") -> str:
    return "–" if math.isnan(value) else f"{value:{spec}}{suffix}"


def _time(rows: list[dict], names: tuple[str, ...], column: str) -> float:
    for row in rows:
        if row.get("provider") in names and not row.get("note"):
            return _float(row.get(column))
    return math.nan


def _host(row: dict, ms: float) -> str:
    """fusedvae's host time per call, marked ``launch-bound`` when it exceeds the timed call (the row timed the host)."""
    host = _float(row.get("host_ms"))
    return _fmt(host) + (" launch-bound" if host >= ms else "")


def micro_table(rows: list[dict]) -> list[str]:
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        if row.get("mode") == "full":
            groups.setdefault((row["op"], row["variant"], row["dtype"]), []).append(row)
    lines = ["| op:variant | dtype | shape | MB moved | fusedvae ms | % of copy | × torch | × torch+compile "
             "| saved MB | host ms |", "| --- " * 10 + "|"]
    for (op, variant, dtype), group in groups.items():
        largest = max(_float(r.get("numel")) for r in group)
        at = [r for r in group if _float(r.get("numel")) == largest]
        fused = next((r for r in at if r.get("provider") == "fusedvae"), {})
        ms = _float(fused.get("time_ms_p50")) if not fused.get("note") else math.nan
        moved_mb = _float(fused.get("bytes_min")) / 1e6
        lines.append(
            f"| {op}:{variant} | {dtype} | {at[0].get('shape', '')} | {_fmt(moved_mb, '.0f')} "
            f"| {_fmt(ms)} | {_fmt(100 * _float(fused.get('roofline_fraction')), '.0f', '%')} "
            f"| {_fmt(_time(at, TORCH, 'time_ms_p50') / ms, '.2f', '×')} "
            f"| {_fmt(_time(at, TORCH_COMPILE, 'time_ms_p50') / ms, '.2f', '×')} "
            f"| {_fmt(_float(fused.get('saved_mb')), '.3g')} | {_host(fused, ms)} |")
    return lines if len(lines) > 2 else ["(no micro-benchmark rows)"]


def train_table(rows: list[dict]) -> list[str]:
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["variant"], row["dtype"]), []).append(row)
    providers = list(dict.fromkeys(row["provider"] for row in rows))
    lines = ["| model | dtype | " + " | ".join(f"{p} ms" for p in providers) + " | fusedvae × torch | "
             "fusedvae × torch+compile |", "| --- " * (len(providers) + 4) + "|"]
    for (model, variant, dtype), group in groups.items():
        step = {p: _time(group, (p,), "step_ms_p50") for p in providers}
        fused = step.get("fusedvae", math.nan)
        best_fused = min((v for p, v in step.items() if p.startswith("fusedvae") and not math.isnan(v)),
                         default=math.nan)
        lines.append(f"| {model}:{variant} | {dtype} | " + " | ".join(_fmt(step[p]) for p in providers)
                     + f" | {_fmt(_time(group, TORCH, 'step_ms_p50') / fused, '.2f', '×')}"
                     + f" | {_fmt(_time(group, TORCH_COMPILE, 'step_ms_p50') / best_fused, '.2f', '×')} |")
    return lines if len(lines) > 2 else ["(no training rows)"]


def ncu_table(rows: list[dict], copy_gbps: float) -> list[str]:
    """Measured (ncu) beside modeled (the static report): a margin below 1 predicts a kernel short of the copy rate."""
    lines = ["| kernel | µs | DRAM GB/s | % of copy | instr/elem | modeled instr/elem | modeled margin | occupancy % |",
             "| --- " * 8 + "|"]
    for row in rows:
        gbps = _float(row.get("dram_gbps"))
        lines.append(f"| {row.get('case') or row.get('kernel', '?')} | {_fmt(_float(row.get('time_us')), '.1f')} "
                     f"| {_fmt(gbps, '.0f')} | {_fmt(100 * gbps / copy_gbps, '.0f', '%')} "
                     f"| {_fmt(_float(row.get('inst_per_elem')), '.1f')} "
                     f"| {_fmt(_float(row.get('static_inst_per_elem')), '.1f')} "
                     f"| {_fmt(_float(row.get('static_margin')), '.2f')} | {_fmt(_float(row.get('occupancy_pct')), '.0f')} |")
    return lines if len(lines) > 2 else ["(no ncu rows)"]


def _copy_gbps(path: Path) -> float:
    import json

    try:
        return _float(json.loads(path.read_text()).get("copy_gbps"))
    except (OSError, ValueError, AttributeError):
        return math.nan


def steps_table(path: Path) -> list[str]:
    lines = ["| step | status | s | detail |", "| --- | --- | --- | --- |"]
    if path.is_file():
        for line in path.read_text().splitlines():
            name, status, seconds, detail = (line.split("\t") + ["", "", ""])[:4]
            lines.append(f"| {name} | {status} | {seconds} | {detail} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--steps", required=True)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    results = Path(args.results)
    text = "\n".join(
        ["## Steps", *steps_table(Path(args.steps)),
         "", "## Micro-benchmarks (full = forward + backward, largest size; × is the other's time / fusedvae's)",
         *micro_table(_rows(results / "micro.csv")),
         "", "## Training steps (median ms; fusedvae+compile counts as fused against torch+compile)",
         *train_table(_rows(results / "train.csv")),
         "", "## Kernels under ncu, beside the static model (python -m bench static, sm_90)",
         *ncu_table(_rows(results / "ncu.csv"), _copy_gbps(results / "env.json"))]) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
