"""The science suite's code paths run (quick mode: a handful of steps on tiny data) and write their outputs.

No outcome is asserted: a handful of steps proves nothing about the papers' claims; the committed
results in ``results/science/`` carry those. What is asserted: the outputs exist, every seed's rows are
written, seed 0 is the single-seed run, worker processes do not change a number, and the verdict logic.
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
    assert result.claims and all(len(claim.holds) == 1 for claim in result.claims)
    for csv in result.csvs:
        assert set(pd.read_csv(tmp_path / csv).seed) == {0}, csv


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
    assert sorted(pd.read_csv(tmp_path / "study4_collapse.csv").seed.unique()) == [0]  # --quick: one seed


def test_cli_two_seeds_every_study(tmp_path):
    """``--seeds 2`` on tiny data: every study writes both seeds' rows, and the report says how many seeds each
    claim held for."""
    from bench.science.__main__ import main

    assert main(["--quick", "--seeds", "2", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "Seeds: 2 per training" in report and "load average" in report
    csvs = sorted(tmp_path.glob("study*.csv"))
    assert len(csvs) == 11
    for csv in csvs:
        assert sorted(pd.read_csv(csv).seed.unique()) == [0, 1], csv.name
    assert report.count("**Claims, seed by seed** (2 seeds):") == len(STUDIES)
    tallies = [line for line in report.splitlines() if line.startswith("- ") and "/2 seeds (" in line]
    assert len(tallies) >= 2 * len(STUDIES)
    for line in tallies:  # "k/2 seeds (yes, no)": k counts the yeses
        count = int(line.split("/2 seeds (")[0].rsplit(" ", 1)[1])
        assert count == line.rsplit("(", 1)[1].count("yes"), line
    # a seed's run differs from the other's: the second seed really reseeds the training
    frame = pd.read_csv(tmp_path / "study4_collapse.csv")
    by_seed = [frame[frame.seed == s].total_kl.reset_index(drop=True) for s in (0, 1)]
    assert not by_seed[0].equals(by_seed[1])


def test_seed_zero_of_several_is_the_single_seed_run(tmp_path):
    """Seed index 0 keeps each training's old seed, so adding seeds never changes the first run's numbers."""
    one = run_science(tmp_path / "one", quick=True, studies=("estimators",), verbose=False, seeds=1)
    two = run_science(tmp_path / "two", quick=True, studies=("estimators",), verbose=False, seeds=2)
    assert one[0].claims and all(len(c.holds) == 1 for c in one[0].claims)
    assert all(len(c.holds) == 2 for c in two[0].claims)
    a = pd.read_csv(tmp_path / "one" / "study6_iwae.csv")
    b = pd.read_csv(tmp_path / "two" / "study6_iwae.csv")
    pd.testing.assert_frame_equal(a, b[b.seed == 0].reset_index(drop=True))


def test_worker_processes_give_the_same_numbers(tmp_path):
    """Each task seeds itself, so the trainings give the same CSV in one process and in two workers."""
    run_science(tmp_path / "serial", quick=True, studies=("collapse",), verbose=False, seeds=2, jobs=1)
    run_science(tmp_path / "workers", quick=True, studies=("collapse",), verbose=False, seeds=2, jobs=2)
    serial = (tmp_path / "serial" / "study4_collapse.csv").read_text()
    assert serial == (tmp_path / "workers" / "study4_collapse.csv").read_text()
    assert "2 worker processes" in (tmp_path / "workers" / "REPORT.md").read_text()


@pytest.mark.parametrize("kwargs, match", [({"seeds": 0}, "seeds"), ({"jobs": 0}, "jobs")])
def test_bad_seeds_or_jobs_are_rejected(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_science(tmp_path, quick=True, studies=("collapse",), verbose=False, **kwargs)


def test_outcome_needs_every_claim_in_every_seed():
    from bench.science.common import Claim, outcome_of

    assert outcome_of([Claim("a", [True, True, True]), Claim("b", [True, True, True])]) == "bears out"
    assert outcome_of([Claim("a", [True, True, True]), Claim("b", [True, False, True])]) == "partly"
    assert outcome_of([Claim("a", [False, False]), Claim("b", [False, False])]) == "does not bear out"
    assert Claim("b", [True, False, True]).tally() == "2/3 seeds"


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
