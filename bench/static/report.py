"""``REPORT.md`` of ``python -m bench static``: issue 13's targets, the model in a few lines, the headline cases, what
failed.

The report is a function of the rows alone (plus the run's ``info``), so it can be rebuilt from a committed
``static.csv`` without compiling: ``python -m bench static --from-csv results/static-sm90/static.csv``.
"""

from __future__ import annotations

import csv
import datetime
import re
import shutil
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


#: Issue 13's targets, "from ``python -m bench static`` on sm_90".
TARGET_MARGIN = 1.5  # every float32/bfloat16 kernel with one sample memory-bound with this margin
TARGET_RSAMPLE_INSTR = 40.0  # rsample forward, instructions per element
TARGET_FURTHER_SAMPLE_INSTR = 25.0  # each further sample, instructions per normal
TARGET_NLL_VAR_INSTR = 40.0  # gaussian_nll_loss with a per-element variance, forward, per element
#: The dtypes the issue names (counted), and the one shown beside them without being counted.
TARGET_DTYPES = ("float32", "bfloat16")
SHOWN_DTYPES = ("float16",)
_RSAMPLE = "rsample_kl sample K={k} contiguous forward"
_NLL_VAR = "gaussian_nll_var per-element-var "
_BELOW = ["case", "kernel", "dtype", "layout", "instr_per_elem", "bytes_per_elem", "margin"]


def _has_figures(row) -> bool:
    return row.get("margin") not in (None, "") and row.get("instr_per_elem") not in (None, "")


def layout_of(case: str) -> str:
    """The layout word of a row's case: the word before ``forward``/``backward`` (``Case.name`` ends in it)."""
    words = case.split()
    if words and words[-1] in ("forward", "backward"):
        words = words[:-1]
    return words[-1] if words else ""


def _without_layout(case: str) -> str:
    layout = layout_of(case)
    return " ".join(w for w in case.split() if w != layout)


def _is_betatc(case: str) -> bool:
    return case.split()[:1] == ["betatc"]


def _one_sample(case: str) -> bool:
    """Target 1's rows: one sample (every case but ``K=4``), the β-TC estimator excluded (compute-bound by design)."""
    return "K=4" not in case.split() and not _is_betatc(case)


def _verdict(values: dict, limit: float) -> bool | None:
    """True if every counted dtype has a figure within ``limit``; False if one exceeds it; None if any is missing."""
    if any(v is not None and v > limit for v in values.values()):
        return False
    return None if any(v is None for v in values.values()) else True


def _word(met) -> str:
    return {True: "**met**", False: "**not met**", None: "**not checked**"}[met]


def _figure(row):
    return float(row["instr_per_elem"]) if row and _has_figures(row) else None


def issue13(rows) -> list[dict]:
    """Issue 13's four targets checked on ``rows`` (dicts of :data:`bench.static.COLUMNS`, strings or numbers).

    Returns one dict per target: ``target`` (1-4), ``met`` (True, False, or None when a row it needs is missing),
    ``figures`` (dtype -> the figure compared with the limit, None if absent) and ``line`` (markdown); target 1
    also has ``checked`` and ``below`` (dtype -> count; float16 included, not counted in ``met``), ``below_rows``
    (the float32/bfloat16 rows under the margin or without figures, lowest first) and ``betatc`` (its rows).

    Example::

        >>> [t["met"] for t in issue13(rows)]  # rows = list(csv.DictReader(open("static.csv")))
        [False, True, True, True]
    """
    shown = TARGET_DTYPES + SHOWN_DTYPES
    scope = [r for r in rows if r["dtype"] in shown and _one_sample(r["case"])]
    checked = {d: sum(r["dtype"] == d for r in scope) for d in shown}
    under = [r for r in scope if not _has_figures(r) or float(r["margin"]) < TARGET_MARGIN]
    below = {d: sum(r["dtype"] == d for r in under) for d in shown}
    below_rows = sorted((r for r in under if r["dtype"] in TARGET_DTYPES),
                        key=lambda r: (float(r["margin"]) if _has_figures(r) else -1.0, r["case"], r["dtype"]))
    lowest = {d: min((r for r in scope if r["dtype"] == d and _has_figures(r)), key=lambda r: float(r["margin"]),
                     default=None) for d in shown}
    counted = sum(checked[d] for d in TARGET_DTYPES)
    met1 = None if counted == 0 else not any(below[d] for d in TARGET_DTYPES)

    def count(d):
        if not checked[d]:
            return f"{d} no rows"
        low = lowest[d]
        tail = f", lowest {low['margin']} ({_without_layout(low['case'])}, {layout_of(low['case'])})" if low else ""
        return f"{d} {below[d]} of {checked[d]} below{tail}"

    line1 = (f"1. Every float32 and bfloat16 kernel with one sample memory-bound, margin >= {TARGET_MARGIN:g}: "
             f"{_word(met1)}. {'; '.join(count(d) for d in TARGET_DTYPES)}. "
             f"Shown, not counted: {'; '.join(count(d) for d in SHOWN_DTYPES)}.")

    rs = {k: {d: _figure(_find(rows, _RSAMPLE.format(k=k), d)) for d in TARGET_DTYPES} for k in (1, 4)}
    met2 = _verdict(rs[1], TARGET_RSAMPLE_INSTR)
    line2 = (f"2. rsample forward <= {TARGET_RSAMPLE_INSTR:g} instructions per element "
             f"(`{_RSAMPLE.format(k=1)}`): {_word(met2)}. "
             + ", ".join(f"{d} {_g(v)}" for d, v in rs[1].items()) + "." + _other_layouts(rows, lambda k: k[1]))

    further = {d: (rs[4][d] - rs[1][d]) / 3 if rs[1][d] is not None and rs[4][d] is not None else None
               for d in TARGET_DTYPES}
    met3 = _verdict(further, TARGET_FURTHER_SAMPLE_INSTR)
    parts = [f"{d} ({_g(rs[4][d])} - {_g(rs[1][d])}) / 3 = {_g(v)} (mean over the four: {_g(rs[4][d] / 4)})"
             if v is not None else f"{d} n/a" for d, v in further.items()]
    line3 = (f"3. Each further sample <= {TARGET_FURTHER_SAMPLE_INSTR:g} instructions per normal "
             f"((instr(K=4) - instr(K=1)) / 3 from `{_RSAMPLE.format(k='1|4')}`): {_word(met3)}. "
             + ", ".join(parts) + "." + _other_layouts(rows, lambda k: (k[4] - k[1]) / 3))

    var_rows = {d: [r for r in rows if r["dtype"] == d and r["case"].startswith(_NLL_VAR)
                    and r["case"].endswith(" forward") and _has_figures(r)] for d in TARGET_DTYPES}
    worst = {d: max(rs_, key=_figure, default=None) for d, rs_ in var_rows.items()}
    var = {d: _figure(w) for d, w in worst.items()}
    met4 = _verdict(var, TARGET_NLL_VAR_INSTR)
    parts = [f"{d} at most {_g(v)} over {len(var_rows[d])} rows (highest: {_without_layout(worst[d]['case'])}, "
             f"{layout_of(worst[d]['case'])})" if v is not None else f"{d} n/a" for d, v in var.items()]
    line4 = (f"4. `gaussian_nll_loss` with a per-element variance, forward, <= {TARGET_NLL_VAR_INSTR:g} instructions "
             f"per element (`{_NLL_VAR}... forward`, every reduction and layout): {_word(met4)}. "
             + ", ".join(parts) + ".")

    betatc = [r for r in rows if _is_betatc(r["case"]) and r["dtype"] in TARGET_DTYPES]
    return [
        {"target": 1, "met": met1, "figures": {d: below[d] for d in TARGET_DTYPES}, "line": line1,
         "checked": checked, "below": below, "below_rows": below_rows, "betatc": betatc},
        {"target": 2, "met": met2, "figures": rs[1], "line": line2},
        {"target": 3, "met": met3, "figures": further, "line": line3},
        {"target": 4, "met": met4, "figures": var, "line": line4},
    ]


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _other_layouts(rows, figure) -> str:
    """Targets 2 and 3's figure (``figure({1: instr(K=1), 4: instr(K=4)})``) in the layouts the issue leaves out."""
    parts = []
    for layout in ("channels_last", "permuted"):
        each = []
        for d in TARGET_DTYPES:
            k = {n: _figure(_find(rows, _RSAMPLE.format(k=n).replace("contiguous", layout), d)) for n in (1, 4)}
            if None not in k.values():
                each.append(_g(figure(k)))
        if len(each) == len(TARGET_DTYPES):
            parts.append(f"{layout} {' / '.join(each)}")
    return f" Not in the target (contiguous only), float32 / bfloat16: {'; '.join(parts)}." if parts else ""


def issue13_section(rows, arch: int = 90) -> list[str]:
    """The ``## Issue 13 targets`` section of REPORT.md (markdown lines) from the rows of :func:`issue13`."""
    targets = issue13(rows)
    met = sum(t["met"] is True for t in targets)
    t1 = targets[0]
    other = "" if arch == 90 else f" (the issue states its targets for sm_90; this is sm_{arch})"
    lines = ["## Issue 13 targets", "",
             f"On this run's model{other}: **{met} of {len(targets)} met**. Figures are static.csv's (3 significant "
             "digits), compared as written there.", ""]
    lines += [t["line"] for t in targets]
    k4 = [r for r in rows if r["dtype"] in TARGET_DTYPES and "K=4" in r["case"].split() and _has_figures(r)]
    k4_below = sum(float(r["margin"]) < TARGET_MARGIN for r in k4)
    lines += [
        "",
        "Rows target 1 covers: every case with one sample, that is every case but the `K=4` ones (kl-only, NLL, SSE",
        "and variance cases included), in every layout, forward and backward, float32 and bfloat16; a row without",
        "figures (a launcher or compile error) counts as below. float16 is shown but not counted (the issue names",
        "float32 and bfloat16); float64 is not checked. The `K=4` rows are target 3's, not target 1's",
        f"({k4_below} of their {len(k4)} float32/bfloat16 rows have a margin below {TARGET_MARGIN:g}). The β-TC "
        "estimator (`betatc ...`:",
        "O(B² D) pairwise work on O(B D) bytes, compute-bound by design) is excluded and listed below.",
        "",
        "Target 3's accounting: a case's work is `mu.numel()` whatever n_samples is, and `instr_per_elem` counts the",
        "n_samples loop's body K times per tile (`_rows`: outside + iterations × (loop + K × inner), per element of",
        "`mu`), so the K=4 row holds four normals per element of `mu` and the K=1 row one. Each further sample costs",
        "(instr(K=4) - instr(K=1)) / 3 per normal; instr(K=4) / 4, the mean over all four with the loads and stores",
        "of `mu` and `logvar` shared, is shown beside it. K=1 is its own specialization (`n_samples == 1`), so the",
        "difference is the marginal cost as compiled, not one loop body read off the SASS.",
        "",
        f"### Target 1: float32 and bfloat16 kernels with one sample below margin {TARGET_MARGIN:g} "
        f"({len(t1['below_rows'])} of {sum(t1['checked'][d] for d in TARGET_DTYPES)})",
        "",
    ]
    if t1["below_rows"]:
        shown = [{**r, "case": _without_layout(r["case"]), "layout": layout_of(r["case"]),
                  "margin": r["margin"] if _has_figures(r) else "no figures: " + r.get("note", "")}
                 for r in t1["below_rows"]]
        lines += _table(shown, _BELOW)
    else:
        lines.append("None.")
    lines += ["", "### Excluded from target 1: the β-TC estimator (float32, bfloat16)", ""]
    if t1["betatc"]:
        lines += _table([{**r, "case": _without_layout(r["case"]), "layout": layout_of(r["case"])}
                         for r in t1["betatc"]], _BELOW)
    else:
        lines.append("No β-TC rows in this run.")
    return lines + [""]


def _seconds(info) -> str:
    return "? s" if info.get("seconds") is None else f"{info['seconds']:.0f} s"


def _rebuilt(info) -> str:
    if not info.get("rebuilt"):
        return ""
    return (f"; this report was rebuilt from `static.csv` without compiling ({info['rebuilt']}): "
            "`python -m bench static --from-csv static.csv`")


def write_report(rows, info, path: Path) -> Path:
    """Write ``path`` from the rows of :func:`bench.static.collect` (or of a ``static.csv``) and ``info``.

    ``info``: ``arch`` (int), ``triton``, ``cases``, ``kernels``, ``seconds`` (None if unknown), and optionally
    ``commit``, ``date``, ``uncovered`` and ``rebuilt`` (a rebuilt report's commit and date). Returns ``path``.
    Example: ``write_report(rows, {"arch": 90, "triton": "3.9.0", "cases": 2, "kernels": 2, "seconds": 5.0},
    Path("/tmp/REPORT.md"))``.
    """
    from . import problems

    arch = info["arch"]
    lines = [
        f"# Static cost model: every kernel compiled for sm_{arch}, no GPU",
        "",
        f"Triton {info['triton']}, commit {info.get('commit', '?')}, {info.get('date', '')}: {info['cases']} cases, "
        f"{info['kernels']} distinct kernels, {_seconds(info)} on this machine. Regenerate: "
        f"`python -m bench static --arch sm_{arch}`{_rebuilt(info)}.",
        "",
        *issue13_section(rows, arch),
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


_HEADER = re.compile(r"Triton (\S+), commit (\S+), (.*?): \d+ cases, \d+ distinct kernels, (\?|\d+) s on this machine")
_NEEDED = ("kernel", "case", "dtype", "triton", "arch", "instr_per_elem", "bytes_per_elem", "margin", "compile_s",
           "note")


def _compile_run(report: Path, triton: str) -> dict:
    """Commit, date and seconds of the compile run, from the header of the REPORT.md it wrote (same Triton)."""
    if not report.is_file():
        return {}
    found = _HEADER.search(report.read_text().split("\n## ", 1)[0])
    if not found or found.group(1) != triton:
        return {}
    seconds = None if found.group(4) == "?" else float(found.group(4))
    return {"commit": found.group(2), "date": found.group(3), "seconds": seconds}


def rebuild(csv_path: Path, out: Path | None = None) -> tuple[Path, list[dict]]:
    """Rebuild ``REPORT.md`` from an existing ``static.csv`` without compiling; returns ``(report path, rows)``.

    ``out``: the folder to write into (default: the CSV's own); the CSV is copied there when it is elsewhere, so
    the report's link to it holds. The compile run's commit, date and seconds are read from the REPORT.md beside
    the CSV when its header matches; the cases and distinct kernels are counted from the rows (a kernel's first
    case carries its ``compile_s``); "Not covered" is of the code checked out now.

    Example::

        rebuild(Path("results/static-sm90/static.csv"), Path("/tmp/static"))  # /tmp/static/REPORT.md
    """
    from . import _commit, _uncovered, parse_arch

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ValueError(f"from_csv: no such file {str(csv_path)!r}")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _NEEDED if c not in (reader.fieldnames or ())]
        rows = list(reader)
    if missing:
        raise ValueError(f"from_csv: {csv_path} is not a bench static CSV (no column {', '.join(missing)})")
    if not rows:
        raise ValueError(f"from_csv: {csv_path} has no rows")
    arches = sorted({r["arch"] for r in rows})
    if len(arches) != 1:
        raise ValueError(f"from_csv: {csv_path} mixes architectures {arches}; one report is of one")
    triton = rows[0]["triton"]
    strip = lambda case: case.removesuffix(" forward").removesuffix(" backward")  # noqa: E731
    info = {"arch": parse_arch(arches[0]), "triton": triton, "seconds": None,
            "cases": len({(strip(r["case"]), r["dtype"]) for r in rows}),
            "kernels": sum(1 for r in rows if r["compile_s"] not in (None, "")),
            **_compile_run(csv_path.parent / "REPORT.md", triton),
            "uncovered": _uncovered(),
            "rebuilt": f"commit {_commit()}, "
                       f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"}
    out = Path(out) if out is not None else csv_path.parent
    out.mkdir(parents=True, exist_ok=True)
    if (out / "static.csv").resolve() != csv_path.resolve():
        shutil.copyfile(csv_path, out / "static.csv")
    return write_report(rows, info, out / "REPORT.md"), rows
