"""``python -m bench report [DIR]``: ``DIR/REPORT.md`` (tables) and PNG plots from ``micro.csv`` and ``train.csv``.

Plots (matplotlib, Agg backend):

- ``micro_<op>_<dtype>.png``: achieved GB/s (``bytes_min`` / median time) against the number of
  elements, one panel per variant (rows) and mode (columns), a line per provider with its p20-p80
  band, the measured copy bandwidth dashed;
- ``micro_speedup.png``: fusedvae's speed-up over ``torch`` and ``torch+compile`` at the largest size of every case;
- ``train_speedup.png``: per training model, median step time per provider and speed-up over ``torch``.

Speed-ups are always against ``torch`` (what users write) and ``torch+compile``, never against ``reference``.
With ``accuracy.csv`` present the report adds each provider's float32 errors (:mod:`bench.accuracy`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

PROVIDER_ORDER = ("torch", "torch+compile", "fusedvae", "fusedvae+compile", "reference")
BASELINES = ("torch", "torch+compile")  # the denominators of every speed-up
COLORS = {"torch": "#7f7f7f", "torch+compile": "#1f77b4", "fusedvae": "#d62728", "fusedvae+compile": "#9467bd",
          "reference": "#2ca02c"}
MARKERS = {"torch": "o", "torch+compile": "s", "fusedvae": "^", "fusedvae+compile": "D", "reference": "v"}
MODE_ORDER = ("forward", "backward", "full")


# ---------------------------------------------------------------- formatting

def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if value == 0:
        return "0"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _speedup(base, other) -> str:
    if base is None or other is None or not (math.isfinite(base) and math.isfinite(other)) or other <= 0:
        return "–"
    return f"{base / other:.2f}×"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _providers(frame: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(frame["provider"]))
    return [p for p in PROVIDER_ORDER if p in present] + [p for p in present if p not in PROVIDER_ORDER]


def _shape_numel(shape: str) -> int:
    return int(np.prod([int(s) for s in str(shape).split("x")]))


def _read(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    return frame if not frame.empty else None


# ---------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_ticks(axis) -> None:
    """Log-scale ticks written 0.5, 2, 300 rather than 5x10^-1."""
    from matplotlib.ticker import FuncFormatter

    formatter = FuncFormatter(lambda value, _: f"{value:g}")
    axis.set_major_formatter(formatter)
    axis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else ""))


def _si(value: float) -> str:
    """2048 -> 2K, 33554432 -> 32M (binary prefixes, as the sizes are powers of two)."""
    for factor, suffix in ((2**30, "G"), (2**20, "M"), (2**10, "K")):
        if value >= factor:
            return f"{value / factor:g}{suffix}"
    return f"{value:g}"


def plot_micro_op(micro: pd.DataFrame, op: str, dtype: str, path: Path) -> None:
    plt = _plt()
    from matplotlib.ticker import FuncFormatter

    data = micro[(micro["op"] == op) & (micro["dtype"] == dtype)].dropna(subset=["time_ms_p50"])
    variants = list(dict.fromkeys(data["variant"]))
    modes = [m for m in MODE_ORDER if m in set(data["mode"])]
    fig, axes = plt.subplots(len(variants), len(modes), figsize=(4.2 * len(modes), 2.8 * len(variants) + 1.0),
                             squeeze=False, sharex=True, layout="constrained")
    copy = float(data["copy_gbps"].dropna().iloc[0]) if data["copy_gbps"].notna().any() else math.nan
    for i, variant in enumerate(variants):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            cell = data[(data["variant"] == variant) & (data["mode"] == mode)]
            for provider in _providers(cell):
                line = cell[cell["provider"] == provider].sort_values("numel")
                gbps = line["bytes_min"] / (line["time_ms_p50"] * 1e-3) / 1e9
                low = line["bytes_min"] / (line["time_ms_p80"] * 1e-3) / 1e9
                high = line["bytes_min"] / (line["time_ms_p20"] * 1e-3) / 1e9
                ax.plot(line["numel"], gbps, marker=MARKERS.get(provider, "o"), color=COLORS.get(provider),
                        label=provider, linewidth=1.6, markersize=5)
                ax.fill_between(line["numel"], low, high, color=COLORS.get(provider), alpha=0.15, linewidth=0)
            if math.isfinite(copy):
                ax.axhline(copy, color="black", linestyle="--", linewidth=1, label="copy bandwidth")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _si(v)))
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"{variant} · {mode}", fontsize=10)
            if j == 0:
                ax.set_ylabel("GB/s (bytes_min / median)")
            if i == len(variants) - 1:
                ax.set_xlabel("elements (numel)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    device = str(data["device"].iloc[0]) if len(data) else ""
    fig.suptitle(f"{op} ({dtype}) on {device}: achieved bandwidth (higher is better)", fontsize=11)
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _largest(micro: pd.DataFrame) -> pd.DataFrame:
    """The rows at the largest size of each (op, variant, mode, dtype)."""
    data = micro.dropna(subset=["time_ms_p50"]).copy()
    if data.empty:
        return data
    biggest = data.groupby(["op", "variant", "mode", "dtype"])["numel"].transform("max")
    return data[data["numel"] == biggest]


def plot_micro_speedup(micro: pd.DataFrame, path: Path) -> bool:
    plt = _plt()
    data = _largest(micro)
    pivot = data.pivot_table(index=["op", "variant", "mode", "dtype"], columns="provider", values="time_ms_p50")
    if "fusedvae" not in pivot.columns or "torch" not in pivot.columns:
        return False
    pivot = pivot.reset_index()
    labels = [f"{r.op}:{r.variant} · {r.mode} · {r.dtype}" for r in pivot.itertuples()]
    vs_eager = (pivot["torch"] / pivot["fusedvae"]).to_numpy()
    vs_compile = (pivot["torch+compile"] / pivot["fusedvae"]).to_numpy() if "torch+compile" in pivot.columns else None
    y = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(labels) + 1.4))
    height = 0.4 if vs_compile is not None else 0.7
    ax.barh(y - (height / 2 if vs_compile is not None else 0), vs_eager, height=height, color=COLORS["torch"],
            label="fusedvae vs torch")
    if vs_compile is not None:
        ax.barh(y + height / 2, vs_compile, height=height, color=COLORS["torch+compile"],
                label="fusedvae vs torch+compile (where compiled)")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up at the largest size (other provider's median / fusedvae's; > 1: fusedvae faster)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.set_title(f"fusedvae speed-up per op on {data['device'].iloc[0]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_train(train: pd.DataFrame, path: Path) -> bool:
    plt = _plt()
    data = train.dropna(subset=["step_ms_p50"])
    if data.empty:
        return False
    data = data.assign(case=data["model"] + "\n" + data["variant"] + " · " + data["dtype"])
    cases = list(dict.fromkeys(data["case"]))
    providers = _providers(data)
    width = 0.8 / len(providers)
    x = np.arange(len(cases))
    fig, (ax_time, ax_speed) = plt.subplots(2, 1, figsize=(max(8.0, 1.7 * len(cases) + 2), 8.5), layout="constrained")
    for k, provider in enumerate(providers):
        rows = data[data["provider"] == provider].set_index("case")
        p50 = np.array([rows["step_ms_p50"].get(c, np.nan) for c in cases], dtype=float)
        p20 = np.array([rows["step_ms_p20"].get(c, np.nan) for c in cases], dtype=float)
        p80 = np.array([rows["step_ms_p80"].get(c, np.nan) for c in cases], dtype=float)
        offset = (k - (len(providers) - 1) / 2) * width
        ax_time.bar(x + offset, p50, width, color=COLORS.get(provider), label=provider,
                    yerr=np.vstack([p50 - p20, p80 - p50]), capsize=2, error_kw={"linewidth": 0.8})
        eager = data[data["provider"] == "torch"].set_index("case")["step_ms_p50"]
        speed = np.array([eager.get(c, np.nan) / rows["step_ms_p50"].get(c, np.nan) for c in cases], dtype=float)
        bars = ax_speed.bar(x + offset, speed, width, color=COLORS.get(provider), label=provider)
        for bar, value in zip(bars, speed):
            if math.isfinite(value):
                ax_speed.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center",
                                  va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
    for ax in (ax_time, ax_speed):
        ax.set_xticks(x, cases, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    ax_time.set_yscale("log")
    _plain_log_ticks(ax_time.yaxis)
    ax_time.set_ylabel("median step time, ms (bars: p20–p80)")
    ax_time.set_title("step time (lower is better)", fontsize=10)
    ax_speed.axhline(1.0, color="black", linewidth=1)
    ax_speed.set_ylabel("speed-up over torch (torch ms / provider ms)")
    ax_speed.set_title("speed-up over torch, the public codebases' loss code (higher is better)", fontsize=10)
    handles, labels = ax_speed.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False)
    world = int(data["world_size"].max()) if "world_size" in data else 1
    fig.suptitle(f"training loops on {data['device'].iloc[0]}" + (f", {world} processes (DDP)" if world > 1 else ""),
                 fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- markdown

HOW_TO_READ = """\
## How to read this report

- **Providers.** `torch`: what users write instead of fusedvae, eager: the loss code of the public
  VAE codebases (`bench/baselines.py`: the textbook KL and `randn_like` sampling of the PyTorch
  examples, the σ-VAE authors' NLL, VDVAE's KL, `F.gaussian_nll_loss`, diffusers' posterior).
  `torch+compile`: `torch.compile` of exactly that code (compiled before timing). `fusedvae`: the
  public ops on the default backend; the `backend` column says which ran (`triton` on a GPU,
  `native` on a CPU). Training adds `fusedvae+compile`: the step compiled around fusedvae's ops.
  `reference` (only with `--providers reference`) is fusedvae's readable specification, never a
  denominator.
- **Speed-up** `a×` = the `torch` (or `torch+compile`) median time / fusedvae's: above 1 fusedvae is faster.
- **bytes_min** is the fewest bytes an op must move (every input read once, every output written
  once, gradients in the backward pass; `bench/bytes.py`). **GB/s** = bytes_min / median time, and
  **% of copy** = that over the device's copy bandwidth measured in the same run: 100% would be as
  fast as memory allows, so it is how much room a kernel leaves. Small sizes are dominated by launch
  and Python overhead, not bandwidth: read the largest sizes for the kernels' quality.
- **saved MB** is what autograd keeps for backward after the forward pass (each storage once, inputs
  included); **peak MB** the most memory allocated during the call above what was allocated before it.
- **Modes.** `forward`: the op's forward as in training (autograd recording); `backward`: the
  gradient from a graph built beforehand; `full`: both, one call.
- **Training.** Median step time (zero_grad, forward, loss, backward, Adam) after warm-up, device
  synchronised; every provider from the same seed and data, so `final loss` should agree closely
  across providers (it is a check, not a benchmark).
- Times are medians with p20–p80 spread; a ratio within that spread is noise.
"""


def _header(frames: list[pd.DataFrame]) -> list[str]:
    rows = pd.concat([f for f in frames if f is not None], ignore_index=True)
    first = rows.iloc[0]
    lines = [f"# fusedvae benchmark report: {first['device']}", ""]
    facts = [
        ("device", first["device"]), ("torch", first["torch"]), ("triton", first["triton"]),
        ("fusedvae", first["fusedvae"]), ("commit", first["commit"]),
        ("run", f"{rows['timestamp'].min()} – {rows['timestamp'].max()}"),
        ("preset", ", ".join(sorted(set(map(str, rows["preset"].dropna()))))),
    ]
    threads = rows["threads"].dropna() if "threads" in rows else pd.Series(dtype=float)
    if len(threads):
        facts.append(("CPU threads", ", ".join(sorted({str(int(t)) for t in threads}))))
    if "copy_gbps" in rows and rows["copy_gbps"].notna().any():
        facts.append(("copy bandwidth", f"{rows['copy_gbps'].dropna().iloc[0]:.1f} GB/s (read + write, same run)"))
    lines.append(" · ".join(f"**{k}** {v}" for k, v in facts))
    lines.append("")
    fused = rows[rows["provider"].isin(["fusedvae", "fusedvae+compile"])]
    if len(fused) and "backend" in fused and set(fused["backend"].dropna()) == {"native"}:
        lines += ["> On this device `fusedvae` ran the **native** backend (a few ATen calls per op, torch's noise "
                  "stream; the Triton kernels run on CUDA tensors): these results compare it with the code users "
                  "write on a CPU, not what the kernels buy. Run the suite on a GPU for that.", ""]
    return lines


def _micro_section(micro: pd.DataFrame, plots: list[str], speedup_plot: bool) -> list[str]:
    lines = ["## Micro-benchmarks", ""]
    largest = _largest(micro)
    providers = [p for p in _providers(micro) if p in set(largest["provider"])]
    values = ["time_ms_p50", "roofline_fraction"] + (["saved_mb"] if "saved_mb" in largest else [])
    pivot = largest.pivot_table(index=["op", "variant", "dtype", "mode", "shape"], columns="provider",
                                values=values, aggfunc="first")
    header = ["op", "variant", "dtype", "mode", "shape"] + [f"{p} ms" for p in providers]
    versus = [p for p in BASELINES if p in providers]
    if "fusedvae" in providers:
        header += [f"fusedvae vs {p}" for p in versus] + ["fusedvae % of copy"]
        if "saved_mb" in values and "torch" in providers:
            header.append("saved MB (torch / fusedvae)")
    body = []
    for key, row in pivot.iterrows():
        cells = list(key)
        times = {p: row.get(("time_ms_p50", p), math.nan) for p in providers}
        cells += [_fmt(times[p]) for p in providers]
        if "fusedvae" in providers:
            fused = times["fusedvae"]
            cells += [_speedup(times.get(p), fused) for p in versus]
            cells.append(_fmt(100 * row.get(("roofline_fraction", "fusedvae"), math.nan), 2) + "%")
            if "saved_mb" in values and "torch" in providers:
                cells.append(f"{_fmt(row.get(('saved_mb', 'torch'), math.nan))} / "
                             f"{_fmt(row.get(('saved_mb', 'fusedvae'), math.nan))}")
        body.append(cells)
    order = {m: i for i, m in enumerate(MODE_ORDER)}
    body.sort(key=lambda c: (c[0], c[1], c[2], order.get(c[3], 9)))
    lines += ["Median time at the largest size of each case (all sizes at the end of this report).", "",
              _table(header, body), ""] + _every_size(micro)
    if speedup_plot:
        lines += ["![fusedvae speed-up at the largest size](micro_speedup.png)", ""]
    if plots:
        lines += ["### Bandwidth against size, per op", "",
                  "Achieved GB/s (bytes_min / median time) per provider, p20–p80 shaded; dashed: the copy bandwidth.", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return lines


def _every_size(micro: pd.DataFrame) -> list[str]:
    """fusedvae against torch at every size and mode: the lowest ratios, and every case below 0.9x."""
    data = micro.dropna(subset=["time_ms_p50"])
    pivot = data.pivot_table(index=["op", "variant", "dtype", "mode", "shape"], columns="provider",
                             values="time_ms_p50", aggfunc="first")
    if "fusedvae" not in pivot or "torch" not in pivot:
        return []
    ratio = (pivot["torch"] / pivot["fusedvae"]).dropna().sort_values()
    if ratio.empty:
        return []
    slow = ratio[ratio < 0.9]
    lines = [f"fusedvae vs torch over all {len(ratio)} micro cases (every size and mode): lowest "
             f"{ratio.iloc[0]:.2f}× ({' '.join(map(str, ratio.index[0]))}), median {ratio.median():.2f}×; "
             f"{len(slow)} below 0.9×" + (":" if len(slow) else "."), ""]
    if len(slow):
        lines += [_table(["op", "variant", "dtype", "mode", "shape", "fusedvae vs torch"],
                         [list(map(str, key)) + [f"{value:.2f}×"] for key, value in slow.items()]), ""]
    return lines


def _accuracy_section(accuracy: pd.DataFrame) -> list[str]:
    data = accuracy.dropna(subset=["rel_error"])
    if data.empty:
        return []
    providers = _providers(data)
    pivot = data.pivot_table(index=["case", "variant", "value", "what"], columns="provider", values="rel_error",
                             aggfunc="first", sort=False)
    body = []
    for (case, variant, value, what), row in pivot.iterrows():
        where = f"lv − lv_p = {value:g}" if case == "kl_normal" else f"log σ = {value:g}"  # no "|": a table
        body.append([case, variant, where, what] + [f"{row.get(p, math.nan):.1e}" for p in providers])
    return ["## Accuracy", "",
            "float32 error against float64 (max |error| / max |float64 value|; `bench/accuracy.py`): the KL near "
            "a collapsed dimension, where the textbook formula cancels, and the NLL and its gradients at "
            "|log σ| = 80. 1.0e+00 is 100% wrong (the textbook KL returns 0 there).", "",
            _table(["op", "variant", "where", "what"] + providers, body), ""]


def _train_section(train: pd.DataFrame, plotted: bool) -> list[str]:
    lines = ["## Training loops", ""]
    data = train.dropna(subset=["step_ms_p50"])
    if data.empty:
        return lines + ["No training run finished (see failures below).", ""]
    providers = _providers(data)
    saved = "saved_mb" in data
    header = ["model", "variant", "dtype", "batch × ranks"] + [f"{p} ms" for p in providers] + \
        [f"{p} vs torch" for p in providers if p != "torch"] + ["best samples/s", "peak MB (torch / fusedvae)"] + \
        (["saved MB (torch / fusedvae)"] if saved else []) + ["final loss (torch / fusedvae)"]
    body = []
    for (model, variant, dtype), group in data.groupby(["model", "variant", "dtype"], sort=False):
        by = group.set_index("provider")
        times = {p: by["step_ms_p50"].get(p, math.nan) for p in providers}
        world = int(group["world_size"].max()) if "world_size" in group else 1
        cells = [model, variant, dtype, f"{int(group['batch'].iloc[0])} × {world}"]
        cells += [_fmt(times[p]) for p in providers]
        cells += [_speedup(times.get("torch"), times[p]) for p in providers if p != "torch"]
        cells.append(_fmt(group["samples_per_s"].max(), 4))
        for column, digits in (("peak_mem_mb", 3),) + ((("saved_mb", 3),) if saved else ()) + (("final_loss", 5),):
            cells.append(f"{_fmt(by[column].get('torch', math.nan), digits)} / "
                         f"{_fmt(by[column].get('fusedvae', math.nan), digits)}")
        body.append(cells)
    steps = data["steps"].iloc[0]
    warm = data["warmup_steps"].iloc[0]
    lines += [f"Median step time over {steps} steps after {warm} warm-up steps; data: {data['data'].iloc[0]}. "
              "`first_step_ms` in train.csv holds the first step (compilation included).", "",
              _table(header, body), ""]
    if plotted:
        lines += ["![training step time and speed-up](train_speedup.png)", ""]
    return lines


def _failures(frames: dict[str, pd.DataFrame | None]) -> list[str]:
    lines = []
    for name, frame in frames.items():
        if frame is None or "note" not in frame:
            continue
        bad = frame[frame["note"].notna() & (frame["note"].astype(str) != "")]
        if bad.empty:
            continue
        keys = ["op", "variant", "provider", "mode", "dtype", "shape"] if name == "micro" else \
            ["model", "variant", "provider", "dtype"]
        rows = [[str(r[k]) for k in keys] + [str(r["note"])] for _, r in bad.iterrows()]
        lines += [f"### {name}.csv", "", _table(keys + ["note"], rows), ""]
    return (["## Failures", "", "Cases that raised instead of finishing (their times are empty):", ""] + lines) if lines else []


def _all_micro(micro: pd.DataFrame) -> list[str]:
    providers = _providers(micro)
    data = micro.copy()
    pivot = data.pivot_table(index=["op", "variant", "dtype", "mode", "numel", "shape"], columns="provider",
                             values=["time_ms_p50", "time_ms_p20", "time_ms_p80", "gbps", "roofline_fraction"],
                             aggfunc="first")
    header = ["op", "variant", "dtype", "mode", "shape", "bytes_min"] + \
        [f"{p} ms (p20–p80)" for p in providers] + [f"{p} GB/s (% copy)" for p in providers]
    bytes_by = data.groupby(["op", "variant", "dtype", "mode", "shape"])["bytes_min"].first()
    order = {m: i for i, m in enumerate(MODE_ORDER)}
    keys = sorted(pivot.index, key=lambda k: (k[0], k[1], k[2], order.get(k[3], 9), k[4]))
    body = []
    for key in keys:
        row = pivot.loc[key]
        op, variant, dtype, mode, _, shape = key
        cells = [op, variant, dtype, mode, shape, _fmt(bytes_by.get((op, variant, dtype, mode, shape), math.nan))]
        for p in providers:
            median = row.get(("time_ms_p50", p), math.nan)
            cells.append("–" if not math.isfinite(median) else
                         f"{_fmt(median)} ({_fmt(row.get(('time_ms_p20', p)))}–{_fmt(row.get(('time_ms_p80', p)))})")
        for p in providers:
            gbps = row.get(("gbps", p), math.nan)
            cells.append("–" if not math.isfinite(gbps) else
                         f"{_fmt(gbps)} ({_fmt(100 * row.get(('roofline_fraction', p), math.nan), 2)}%)")
        body.append(cells)
    return ["## All micro-benchmark rows", "", "<details><summary>every op × variant × dtype × mode × size</summary>", "",
            _table(header, body), "", "</details>", ""]


def write_report(directory: Path) -> Path:
    """Write ``REPORT.md`` and the PNGs into ``directory`` from the CSVs there; returns the report's path."""
    directory = Path(directory)
    micro, train = _read(directory / "micro.csv"), _read(directory / "train.csv")
    accuracy = _read(directory / "accuracy.csv")
    if micro is None and train is None:
        raise SystemExit(f"report: neither micro.csv nor train.csv (with rows) in {directory}")
    for stale in directory.glob("micro_*.png"):
        stale.unlink()
    lines = _header([micro, train])
    lines.append(HOW_TO_READ)
    if micro is not None:
        plots = []
        measured = micro.dropna(subset=["time_ms_p50"])
        for op in dict.fromkeys(measured["op"]):
            for dtype in dict.fromkeys(measured[measured["op"] == op]["dtype"]):
                name = f"micro_{op}_{dtype}.png"
                plot_micro_op(micro, op, dtype, directory / name)
                plots.append(name)
        speedup = plot_micro_speedup(micro, directory / "micro_speedup.png") if len(measured) else False
        lines += _micro_section(micro, plots, speedup)
    if accuracy is not None:
        lines += _accuracy_section(accuracy)
    if train is not None:
        plotted = plot_train(train, directory / "train_speedup.png")
        lines += _train_section(train, plotted)
    lines += _failures({"micro": micro, "train": train})
    if micro is not None:
        lines += _all_micro(micro)
    path = directory / "REPORT.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
