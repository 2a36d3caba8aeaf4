"""The science suite's code paths run (quick mode: a handful of steps on tiny data) and write their outputs.

No outcome is asserted: a handful of steps proves nothing about the papers' claims; the committed
results in ``results/science/`` carry those.
"""

from __future__ import annotations

import importlib

import pandas as pd
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from bench.science import STUDIES, run_science  # noqa: E402
from bench.science.common import Context, torch_threads  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """As run_science does on a CPU: these tiny models are fastest on one thread, and several busy-waiting
    threads on a shared CPU slow them down many times over."""
    with torch_threads(1):
        yield


@pytest.mark.parametrize("name", STUDIES)
def test_study_quick_path_writes_its_outputs(name, tmp_path):
    ctx = Context(out_dir=tmp_path, quick=True, verbose=False)
    result = importlib.import_module(f"bench.science.{name}").run(ctx)
    assert result.csvs and result.figures
    for csv in result.csvs:
        frame = pd.read_csv(tmp_path / csv)
        assert len(frame) > 0, csv
    for png in result.figures:
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert result.verdict and result.claim and result.method
    assert result.outcome in ("bears out", "partly", "does not bear out")


def test_run_science_writes_the_report(tmp_path):
    results = run_science(tmp_path, quick=True, studies=("linear_ppca", "estimators"), verbose=False)
    report = (tmp_path / "REPORT.md").read_text()
    assert [r.number for r in results] == [1, 6]
    assert "QUICK" in report
    for r in results:
        assert f"## {r.number}. {r.title}" in report
        for name in [*r.csvs, *r.figures]:
            assert (tmp_path / name).exists() and f"({name})" in report


def test_unknown_study_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown studies"):
        run_science(tmp_path, quick=True, studies=("nope",), verbose=False)


def test_cli_quick(tmp_path):
    from bench.science.__main__ import main

    assert main(["--quick", "--out", str(tmp_path), "--only", "collapse"]) == 0
    assert (tmp_path / "REPORT.md").exists() and (tmp_path / "study4_collapse.csv").exists()
