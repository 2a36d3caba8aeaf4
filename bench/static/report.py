"""``REPORT.md`` of ``python -m bench static``: the model in a few lines, the headline cases, what failed."""

from __future__ import annotations

from pathlib import Path

#: (op, variant, direction) shown in the headline table, contiguous inputs; every row is in static.csv.
HEADLINE = [
    ("rsample_kl", "sample K=1", "forward"),
    ("rsample_kl", "sample K=1", "backward"),
    ("rsample_kl", "sample K=4", "forward"),
    ("rsample_kl", "sample+kl sum standard-prior K=1", "forward"),
    ("rsample_kl", "sample+kl sum standard-prior K=1", "backward"),
    ("rsample_kl", "sample+kl sum learned-prior K=1", "backward"),
    ("rsample_kl", "kl sum standard-prior", "forward"),
    ("rsample_kl", "kl sum standard-prior", "backward"),
    ("gaussian_nll", "per-channel-sigma sum", "forward"),
    ("gaussian_nll", "per-channel-sigma sum", "backward"),
    ("gaussian_nll", "per-element-sigma none", "forward"),
    ("sum_squared_error", "global", "forward"),
    ("sum_squared_error", "global", "backward"),
    ("gaussian_nll_var", "per-element-var sum", "forward"),
    ("gaussian_nll_var", "per-element-var sum", "backward"),
    ("betatc", "mss B=512 D=32", "forward"),
    ("betatc", "mss B=512 D=32", "backward"),
]

_SHOW = ["kernel", "dtype", "registers", "spill_bytes", "instr_per_elem", "int_per_elem", "mufu_per_elem",
         "load_bits", "store_bits", "bytes_per_elem", "t_issue_ps", "t_mem_ps", "margin"]


def _table(rows, columns) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return lines


def _find(rows, case, dtype):
    for r in rows:
        if r["case"] == case and r["dtype"] == dtype and r.get("instr_per_elem") not in (None, ""):
            return r
    return None


def _against_issue(rows) -> list[str]:
    """The issue's independent count (Triton 3.6, earlier kernels) beside this run's, and why they differ."""
    fwd = "rsample_kl sample K=1 contiguous forward"
    f32, bf16 = _find(rows, fwd, "float32"), _find(rows, fwd, "bfloat16")
    if not (f32 and bf16):
        return []
    i32, i16 = float(f32["instr_per_elem"]), float(bf16["instr_per_elem"])
    return [
        "## Against the issue's independent count",
        "",
        "Issue 12 counted ~125 SASS instructions per element for the rsample forward kernel (Triton 3.6, the kernels",
        f"of then), margin ~1.06 in float32 and ~0.48 in bfloat16. Here: {f32['instr_per_elem']} (float32, margin",
        f"{f32['margin']}) and {bf16['instr_per_elem']} (bfloat16, margin {bf16['margin']}). The issue's two margins",
        "cannot both hold at ~125: float32 moves 12 bytes per element (read mu and logvar, write z), 4.0 ps at",
        "3.0 TB/s, and 125 instructions take 4.22 ps, a margin of 0.95; 1.06 would need ~112 instructions or ~13.4",
        "bytes per element, while bfloat16's 0.48 (6 bytes) is consistent with ~125. Here float32 and bfloat16",
        f"differ by {abs(i32 - i16):.0f} instructions per element, so the bfloat16 margin is about half the float32",
        "one, as the bytes say.",
        "",
    ]


def write_report(rows, info, path: Path) -> Path:
    """Write ``path`` from the rows of :func:`bench.static.collect` and its ``info``; returns ``path``."""
    from . import problems

    arch = info["arch"]
    lines = [
        f"# Static cost model: every kernel compiled for sm_{arch}, no GPU",
        "",
        f"Triton {info['triton']}, commit {info.get('commit', '?')}, {info.get('date', '')}: {info['cases']} cases, "
        f"{info['kernels']} distinct kernels, {info['seconds']:.0f} s on this machine. Regenerate: "
        f"`python -m bench static --arch sm_{arch}`.",
        "",
        "**This is a model, not a measurement.** Each kernel is compiled by Triton's real compiler through the",
        "launchers' own arguments (16-byte alignment and `== 1` specialization as on an H100), and its SASS is read:",
        "",
        "- `instr_per_elem`: SASS instructions a thread issues per element of work (its program's instructions",
        "  outside the tile loop, plus the tile loop's body times the iterations, the n_samples loop's body times",
        "  n_samples, over the elements per thread), predicated instructions included, cold paths left out",
        "  (libdevice's Payne-Hanek reduction for |x| > ~1e5, out-of-line slow paths after the final `EXIT`).",
        "  `int_per_elem`, `mufu_per_elem`: the integer-ALU and MUFU (exp2, log2, rsqrt, ...) part of it.",
        "- `t_issue_ps = max(instr / 29.6e12, mufu / 3.70e12)` per element (H100 SXM: 132 SMs × 4 schedulers × 32",
        "  lanes × 1.75 GHz; MUFU 16 per SM per clock); `t_mem_ps = bytes_per_elem / 3.0e12` (copy bandwidth",
        "  measured on an H100), `bytes_per_elem` the fewest bytes the case must move (`bench/bytes.py`: inputs read",
        "  once, outputs written once; backward: inputs, output gradients, input gradients), per element of work.",
        "- `margin = t_mem / t_issue`: above 1 the kernel is memory-bound on the model, below 1 instruction issue",
        "  caps it below the memory floor. The model ignores latency and occupancy (registers limit the warps",
        "  that hide it), dual issue, instruction-cache misses, L2 hits and launch overhead: a margin near 1 means",
        "  'cannot reach the floor', not 'will reach it'.",
        "- `registers`, `spill_bytes` (bytes stored by `STL` outside cold paths: ptxas's 'spill stores'),",
        "  `shared_bytes`;",
        "  `load_bits`/`store_bits`: widths of the tile loop's global loads and stores (128 = vectorized).",
        "",
        "## Headline cases (contiguous inputs)",
        "",
    ]
    pick = []
    for op, variant, direction in HEADLINE:
        case = f"{op} {variant} contiguous {direction}"
        pick += [r for r in rows if r["case"] == case and r.get("instr_per_elem") not in (None, "")]
    shown = [{**r, "case": r["case"].replace(" contiguous", "")} for r in pick]
    lines += _table(shown, ["case", *_SHOW])
    lines += ["", *_against_issue(rows)]
    worst = sorted((r for r in rows if r.get("margin") not in (None, "")), key=lambda r: float(r["margin"]))[:12]
    lines += ["", "## Lowest margins (every case)", ""]
    lines += _table(worst, ["case", *_SHOW])
    spills = [r for r in rows if int(r.get("spill_bytes") or 0) > 0]
    lines += ["", "## Spills", ""]
    if spills:
        lines += _table(spills, ["case", "kernel", "dtype", "registers", "spill_bytes"])
    else:
        lines.append("None.")
    found = [p for p in problems(rows) if "spilled" not in p]
    lines += ["", "## Compile or launcher errors", ""]
    lines += [f"- {p}" for p in found] or ["None."]
    lines += ["", "## Not covered", ""]
    if info.get("uncovered"):
        lines.append("Backend entry points with no case builder (add one in `bench/static/cases.py`): "
                     + ", ".join(f"`{u}`" for u in info["uncovered"]) + ".")
    else:
        lines.append("Every backend entry point of `fusedvae.kernels` has cases.")
    lines += ["", "Every row (kernel × case × dtype): [static.csv](static.csv).", ""]
    path.write_text("\n".join(lines))
    return path
