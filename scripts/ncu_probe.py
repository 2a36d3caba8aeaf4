"""Hardware counters of the forward kernels, per element, to set beside the static cost model (``python -m bench static``).

    ncu --profile-from-start off --clock-control none -k regex:"KERNELS" \\
        --section LaunchStats --section Occupancy --section SpeedOfLight --metrics <METRICS> -o REPORT \\
        python scripts/ncu_probe.py target [--numel N]
    ncu --import REPORT.ncu-rep --csv --page raw --print-units base > raw.csv
    python scripts/ncu_probe.py parse raw.csv --numel N [--csv out.csv]

``target`` warms the ops of :data:`CASES` up (Triton compiles them) outside the profiled range, then runs
each once between ``cudaProfilerStart``/``Stop``, so ncu sees only their kernels (``KERNELS`` keeps the
fused ones, in :data:`CASES`' order): rsample, rsample_kl and kl_normal with the standard and a learned
prior (the first GPU run timed the standard prior at 0.26 and 0.43 of the copy floor, the learned one at
0.83-0.95: registers, waves, achieved occupancy, issue activity and the SM clock say why), and
gaussian_nll with a scalar σ, in float32; then rsample and rsample_kl in bfloat16 (the lowest modeled margins)
and rsample of channels-last bfloat16 latent maps (memory-order tiles). Latents are ``(numel / 512, 512)``
(131072 x 512 by default, the micro suite's large size). ``parse`` prints, per kernel, the instructions executed
per element (warp instructions × 32 / numel: lane instructions, the static report's unit, beside the committed
report's count and margin, :func:`static_figures`), the DRAM bytes read and written per element, and the
launch and occupancy figures. ``--clock-control none``: the
card's clocks are left as they are. Without a GPU, ``target`` runs the ops on the CPU (the dry run).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

METRICS = ("smsp__inst_executed.sum", "dram__bytes_read.sum", "dram__bytes_write.sum", "gpu__time_duration.sum")
#: ncu's sections beside METRICS: registers, grid, waves, theoretical and achieved occupancy, the SM clock.
SECTIONS = ("LaunchStats", "Occupancy", "SpeedOfLight")
#: The profiled kernels (ncu's ``-k regex:``): the fused forward kernels only, not torch's small reductions.
KERNELS = "_forward_kernel|_fwd_kernel"
#: The profiled calls, in launch order (each launches one kernel that KERNELS keeps): their inputs' dtype and layout,
#: and the static report's case (``python -m bench static``, its forward row) that models the same kernel.
CASE_SPECS = {
    "rsample": ("float32", "contiguous", "rsample_kl sample K=1 contiguous"),
    "rsample_kl standard": ("float32", "contiguous", "rsample_kl sample+kl sum standard-prior K=1 contiguous"),
    "rsample_kl learned": ("float32", "contiguous", "rsample_kl sample+kl sum learned-prior K=1 contiguous"),
    "kl_normal standard": ("float32", "contiguous", "rsample_kl kl sum standard-prior contiguous"),
    "kl_normal learned": ("float32", "contiguous", "rsample_kl kl sum learned-prior contiguous"),
    "gaussian_nll scalar-sigma": ("float32", "contiguous", "gaussian_nll scalar-sigma sum contiguous"),
    "rsample bf16": ("bfloat16", "contiguous", "rsample_kl sample K=1 contiguous"),
    "rsample_kl standard bf16": ("bfloat16", "contiguous", "rsample_kl sample+kl sum standard-prior K=1 contiguous"),
    "rsample channels-last bf16": ("bfloat16", "channels_last", "rsample_kl sample K=1 channels_last"),
}
CASES = tuple(CASE_SPECS)
#: The committed static report the measured counts are set beside (its Triton, 3.9, may compile differently from
#: the GPU image's 3.6: a gap of a few instructions is the compilers', not the model's).
STATIC_CSV = Path(__file__).resolve().parents[1] / "results" / "static-sm90" / "static.csv"


def static_figures(path: Path = STATIC_CSV) -> dict[str, dict[str, float]]:
    """``{case: {"instr": instr_per_elem, "margin": margin}}`` of each case's forward kernel in the static report.

    Cases the report lacks (or a missing report) are left out: their rows then show NaN, never a stale number.
    """
    if not Path(path).exists():
        return {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    found = {}
    for case, (dtype, _, static_case) in CASE_SPECS.items():
        for row in rows:
            if row["case"] == static_case + " forward" and row["dtype"] == dtype and row.get("instr_per_elem"):
                found[case] = {"instr": float(row["instr_per_elem"]), "margin": float(row["margin"])}
                break
    return found


#: Launch and occupancy figures taken from the sections' raw columns: (our key, ncu's candidate names).
EXTRA = (
    ("registers", ("launch__registers_per_thread",)),
    ("waves", ("launch__waves_per_multiprocessor",)),
    ("occupancy_theory_pct", ("sm__maximum_warps_per_active_cycle_pct",)),
    ("occupancy_pct", ("sm__warps_active.avg.pct_of_peak_sustained_active",)),
    ("sm_ghz", ("sm__cycles_elapsed.avg.per_second", "gpc__cycles_elapsed.avg.per_second",
                "smsp__cycles_elapsed.avg.per_second")),
    ("sm_busy_pct", ("sm__throughput.avg.pct_of_peak_sustained_elapsed",)),
    ("memory_pct", ("gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",)),
)


def target(numel: int) -> None:
    import torch

    import fusedvae as fv

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)

    def make(scale=1.0, uniform=False):
        draw = torch.rand if uniform else torch.randn
        return (scale * draw(numel, generator=gen, device=device)).view(-1, 512)

    mu, logvar, prior_mu, prior_logvar = make(), make(0.5), make(0.5), make(0.3)
    x, mean = make(uniform=True), make(uniform=True)
    log_sigma = torch.tensor(0.1, device=device)
    mu16, logvar16 = mu.bfloat16(), logvar.bfloat16()
    # latent maps (B, 16, 64, 64) as the static report's, channels-last (smaller maps for a dry run's small numel)
    maps = (numel // 65536, 16, 64, 64) if numel % 65536 == 0 else (numel // 1024, 16, 8, 8)
    mu_cl, logvar_cl = (t.reshape(maps).contiguous(memory_format=torch.channels_last) for t in (mu16, logvar16))
    calls = {
        "rsample": lambda: fv.rsample(mu, logvar),
        "rsample_kl standard": lambda: fv.rsample_kl(mu, logvar),
        "rsample_kl learned": lambda: fv.rsample_kl(mu, logvar, prior_mu, prior_logvar),
        "kl_normal standard": lambda: fv.kl_normal(mu, logvar),
        "kl_normal learned": lambda: fv.kl_normal(mu, logvar, prior_mu, prior_logvar),
        "gaussian_nll scalar-sigma": lambda: fv.gaussian_nll(x, mean, log_sigma),
        "rsample bf16": lambda: fv.rsample(mu16, logvar16),
        "rsample_kl standard bf16": lambda: fv.rsample_kl(mu16, logvar16),
        "rsample channels-last bf16": lambda: fv.rsample(mu_cl, logvar_cl),
    }
    assert tuple(calls) == CASES
    for _ in range(2):  # compile and warm up, unprofiled
        for call in calls.values():
            call()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for call in calls.values():
        call()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"ran {', '.join(CASES)} forward on {numel} elements ({device})")


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return float("nan")


def _first(record: dict, names: tuple[str, ...]) -> float:
    for name in names:
        if name in record:
            return _number(record[name])
    return float("nan")


def parse(path: str, numel: int, static_path: Path = STATIC_CSV) -> list[dict]:
    """One row per profiled kernel launch of ncu's raw CSV page (its second line, the units, is skipped).

    ``case`` names the launch by :data:`CASES`' order when ncu kept as many launches as there are cases.
    """
    rows = []
    with open(path, newline="") as handle:
        lines = [line for line in handle if not line.startswith("==")]  # ncu's own messages
    for record in csv.DictReader(lines):
        if not record.get("ID", "").strip().isdigit():
            continue
        inst = _number(record.get("smsp__inst_executed.sum", "nan"))
        read = _number(record.get("dram__bytes_read.sum", "nan"))
        write = _number(record.get("dram__bytes_write.sum", "nan"))
        row = {
            "case": "",
            "kernel": record.get("Kernel Name", "?")[:60],
            "grid": record.get("Grid Size", ""),
            "block": record.get("Block Size", ""),
            "time_us": _number(record.get("gpu__time_duration.sum", "nan")) / 1e3,
            "inst_per_elem": inst * 32 / numel,
            "dram_read_b_per_elem": read / numel,
            "dram_write_b_per_elem": write / numel,
            "dram_gbps": (read + write) / _number(record.get("gpu__time_duration.sum", "nan")),  # bytes/ns = GB/s
        }
        row.update({key: _first(record, names) for key, names in EXTRA})
        row["sm_ghz"] /= 1e9
        rows.append(row)
    if len(rows) == len(CASES):
        static = static_figures(static_path)
        for row, case in zip(rows, CASES):
            row["case"] = case
            row["static_inst_per_elem"] = static.get(case, {}).get("instr", float("nan"))
            row["static_margin"] = static.get(case, {}).get("margin", float("nan"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("target", help="the profiled program")
    run.add_argument("--numel", type=int, default=131072 * 512)
    read = commands.add_parser("parse", help="per-element figures from ncu's raw CSV page")
    read.add_argument("raw")
    read.add_argument("--numel", type=int, default=131072 * 512)
    read.add_argument("--csv", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.numel % 512:
        parser.error("--numel must be a multiple of 512 (rows of 512 elements)")
    if args.command == "target":
        target(args.numel)
        return 0
    rows = parse(args.raw, args.numel)
    if not rows:
        print(f"no kernel rows in {args.raw}", file=sys.stderr)
        return 1
    print(f"{'case':<27} {'us':>8} {'inst/elem':>9} {'static':>6} {'margin':>6} {'rd B/el':>7} {'wr B/el':>7} "
          f"{'regs':>4} {'waves':>5} {'occ%':>5} {'GHz':>5} {'grid':>14}")
    for row in rows:
        print(f"{row['case'] or row['kernel'][:27]:<27} {row['time_us']:8.1f} {row['inst_per_elem']:9.1f} "
              f"{row.get('static_inst_per_elem', float('nan')):6.1f} {row.get('static_margin', float('nan')):6.2f} "
              f"{row['dram_read_b_per_elem']:7.2f} "
              f"{row['dram_write_b_per_elem']:7.2f} {row['registers']:4.0f} {row['waves']:5.2f} "
              f"{row['occupancy_pct']:5.1f} {row['sm_ghz']:5.2f} {row['grid']:>14}")
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
