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


def test_data_path_goes_through_the_bench_idx_loader(tmp_path):
    """``--data`` with an MNIST-format IDX file: read by bench.data.load_idx, dequantised, used by the image studies."""
    import struct

    import numpy as np

    from bench.science.common import load_image_data

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(40, 12, 12), dtype=np.uint8)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", *pixels.shape) + pixels.tobytes())
    ctx = Context(out_dir=tmp_path, quick=True, data=str(path), verbose=False)
    data = load_image_data(ctx)
    assert data.image_shape == (1, 12, 12) and data.train.shape[0] + data.test.shape[0] == 40
    assert 0.0 < float(data.train.min()) and float(data.train.max()) < 1.0  # (level + u) / 256
    result = importlib.import_module("bench.science.sigma_beta").run(ctx)
    assert (tmp_path / result.csvs[0]).exists()
