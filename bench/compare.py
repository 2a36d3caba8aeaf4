"""``python -m bench compare OLD.csv NEW.csv [--threshold 0.05]``: a regression gate.

Rows are matched on their identity columns (micro: op, variant, provider, mode, dtype, shape;
train: model, variant, provider, dtype, batch, world_size, as far as both files have them). For
every match the ratio of medians ``new / old`` is printed (above 1: slower). The exit status is 1
when any fused row (provider ``fusedvae`` or ``fusedvae+compile``) got slower by more than the
threshold (ratio > 1 + threshold), 2 when the files cannot be compared (no common rows, unknown
format), and 0 otherwise. Rows of the other providers are shown for context but never fail the gate:
they measure PyTorch, not fusedvae. For context it also prints the new file's speed-ups of the fused
providers over ``torch`` and ``torch+compile`` (what users write instead).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

FUSED = ("fusedvae", "fusedvae+compile")  # as bench.providers.FUSED; not imported, so compare needs no torch
BASELINES = ("torch", "torch+compile")  # what users write: the denominators of the speed-ups printed

KEYS = {
    "micro": ["op", "variant", "provider", "mode", "dtype", "shape"],
    "train": ["model", "variant", "provider", "dtype", "batch", "world_size"],
}
TIME = {"micro": "time_ms_p50", "train": "step_ms_p50"}


def kind_of(frame: pd.DataFrame) -> str | None:
    if {"op", "mode", "time_ms_p50"} <= set(frame.columns):
        return "micro"
    if {"model", "step_ms_p50"} <= set(frame.columns):
        return "train"
    return None


def compare_frames(old: pd.DataFrame, new: pd.DataFrame, threshold: float) -> tuple[pd.DataFrame, str]:
    """The matched rows with ``old_ms``, ``new_ms``, ``ratio`` and ``regression``; and the kind."""
    kind_old, kind_new = kind_of(old), kind_of(new)
    if kind_old is None or kind_old != kind_new:
        raise ValueError(f"cannot compare a {kind_old or 'unknown'} file with a {kind_new or 'unknown'} file")
    kind = kind_old
    keys = [k for k in KEYS[kind] if k in old.columns and k in new.columns]
    column = TIME[kind]
    left = old[keys + [column]].dropna(subset=[column]).drop_duplicates(keys, keep="last")
    right = new[keys + [column]].dropna(subset=[column]).drop_duplicates(keys, keep="last")
    for frame in (left, right):
        for key in keys:
            frame[key] = frame[key].astype(str)
    merged = left.merge(right, on=keys, suffixes=("_old", "_new"))
    merged = merged.rename(columns={f"{column}_old": "old_ms", f"{column}_new": "new_ms"})
    merged["ratio"] = merged["new_ms"] / merged["old_ms"]
    merged["regression"] = merged["provider"].isin(FUSED) & (merged["ratio"] > 1.0 + threshold)
    return merged.sort_values("ratio", ascending=False).reset_index(drop=True), kind


def _print_speedups(frame: pd.DataFrame, kind: str) -> None:
    """fusedvae's speed-up over what users write (``torch``, ``torch+compile``) in the new file, for context."""
    keys = [k for k in KEYS[kind] if k in frame.columns and k != "provider"]
    pivot = frame.dropna(subset=[TIME[kind]]).pivot_table(index=keys, columns="provider", values=TIME[kind],
                                                          aggfunc="first")
    for fused in FUSED:
        for base in BASELINES:
            if fused in pivot and base in pivot:
                ratio = (pivot[base] / pivot[fused]).dropna()
                if len(ratio):
                    geomean = math.exp(float(ratio.apply(math.log).mean()))
                    print(f"  new file: {fused} vs {base}: geometric mean speed-up {geomean:.2f}x, lowest "
                          f"{ratio.min():.2f}x over {len(ratio)} rows")


def compare_files(old_path: Path, new_path: Path, *, threshold: float = 0.05, show: int = 20) -> int:
    for path in (old_path, new_path):
        if not path.is_file():
            print(f"compare: {path} does not exist")
            return 2
    try:
        merged, kind = compare_frames(pd.read_csv(old_path), pd.read_csv(new_path), threshold)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        print(f"compare: {exc}")
        return 2
    if merged.empty:
        print(f"compare: no rows of {old_path} match rows of {new_path}")
        return 2
    keys = [k for k in KEYS[kind] if k in merged.columns]
    print(f"{kind}: {len(merged)} matching rows; ratio = new / old median time (> 1 is slower); "
          f"threshold {threshold:.1%} on fused providers ({', '.join(FUSED)})")
    for provider, group in merged.groupby("provider"):
        geomean = math.exp(float(pd.Series(group["ratio"]).apply(math.log).mean()))
        print(f"  {provider:18s} geometric mean ratio {geomean:.3f} over {len(group)} rows")
    shown = merged if show == 0 else merged.head(show)
    table = shown[keys + ["old_ms", "new_ms", "ratio"]].copy()
    table["flag"] = ["REGRESSION" if r else "" for r in shown["regression"]]
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_columns", None):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    _print_speedups(pd.read_csv(new_path), kind)
    regressions = int(merged["regression"].sum())
    if regressions:
        print(f"FAIL: {regressions} fused row(s) slower than {1 + threshold:.2f}x the old time")
        return 1
    print("OK: no fused row got slower than the threshold")
    return 0
