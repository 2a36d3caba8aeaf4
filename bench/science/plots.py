"""Figures without pyplot: no global backend is touched, so the suite runs headless inside any caller."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def figure(ncols: int = 1, nrows: int = 1, *, size: tuple[float, float] = (11, 4)):
    """A new figure and its axes (a flat list)."""
    fig = Figure(figsize=size)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path.name
