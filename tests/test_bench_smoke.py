"""The benchmark CLI runs end to end on tiny sizes and writes the documented columns (no timing asserted)."""

import pandas as pd

from bench.__main__ import main

COLUMNS = {"op", "variant", "provider", "mode", "dtype", "shape", "numel", "bytes_min", "time_ms_p50",
           "time_ms_p20", "time_ms_p80", "gbps", "roofline_fraction", "peak_mem_mb", "device", "torch",
           "triton", "fusedvae", "commit", "timestamp"}


def test_micro_suite_writes_every_column(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDVAE_BENCH_TINY", "1")
    assert main(["run", "--suite", "micro", "--quick", "--device", "cpu", "--dtype", "float32",
                 "--out", str(tmp_path)]) == 0
    rows = pd.read_csv(tmp_path / "micro.csv")
    assert COLUMNS <= set(rows.columns)
    assert set(rows["provider"]) == {"eager", "fusedvae"}
    assert set(rows["mode"]) == {"forward", "backward", "full"}
    assert (rows["time_ms_p50"] > 0).all() and (rows["bytes_min"] > 0).all()
    assert len(rows) == 10 * 2 * 3  # every variant × provider × mode at the one tiny size
