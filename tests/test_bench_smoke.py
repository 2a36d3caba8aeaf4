"""The benchmark suite cannot rot: ``python -m bench run --quick`` end to end on tiny sizes, its CSV columns,
the report and its plots, the regression gate, the data loaders, and DistributedDataParallel on 2 CPU
processes. No timing is asserted (benchmarks are not tests)."""

from __future__ import annotations

import gzip
import math
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

MICRO_COLUMNS = ["op", "variant", "provider", "mode", "dtype", "shape", "numel", "bytes_min", "time_ms_p50",
                 "time_ms_p20", "time_ms_p80", "gbps", "roofline_fraction", "peak_mem_mb", "saved_mb", "device",
                 "torch",
                 "triton", "fusedvae", "commit", "timestamp"]
TRAIN_COLUMNS = ["model", "variant", "provider", "dtype", "batch", "steps", "step_ms_p50", "step_ms_p20",
                 "step_ms_p80", "samples_per_s", "peak_mem_mb", "saved_mb", "final_loss", "device", "torch", "triton",
                 "fusedvae", "commit", "timestamp"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("TRITON_INTERPRET", "FUSEDVAE_BACKEND", "FUSEDVAE_BENCH_TINY"):
        env.pop(name, None)
    return env


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    done = _bench("run", "--quick", "--tiny", "--suite", "micro,train", "--device", "cpu", "--out", str(out),
                  "--no-progress", "--no-report")  # the report is test_report_writes_markdown_and_plots's
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_micro_csv_has_every_column_and_case(quick_run):
    rows = pd.read_csv(quick_run / "micro.csv")
    assert list(rows.columns[: len(MICRO_COLUMNS)]) != [] and set(MICRO_COLUMNS) <= set(rows.columns)
    assert (rows["note"].isna()).all(), rows[rows["note"].notna()][["op", "variant", "provider", "note"]]
    assert set(rows["mode"]) == {"forward", "backward", "full"}
    assert set(rows["provider"]) == {"torch", "torch+compile", "fusedvae"}  # reference only when asked for
    assert set(rows["op"]) == {"rsample_kl", "kl_normal", "gaussian_nll", "gaussian_nll_optimal", "gaussian_nll_loss",
                               "betatc"}
    assert (rows["bytes_min"] > 0).all() and (rows["time_ms_p50"] > 0).all()
    assert ((rows["time_ms_p20"] <= rows["time_ms_p50"]) & (rows["time_ms_p50"] <= rows["time_ms_p80"])).all()
    assert np.allclose(rows["gbps"], rows["bytes_min"] / (rows["time_ms_p50"] * 1e-3) / 1e9)
    assert np.allclose(rows["roofline_fraction"], rows["gbps"] / rows["copy_gbps"])
    assert set(rows["backend"]) == {"torch", "native"}  # a CPU: fusedvae's default backend is native
    assert (rows["saved_mb"] > 0).all()
    saved = rows[rows["mode"] == "forward"].pivot_table(index=["op", "variant", "shape"], columns="provider",
                                                       values="saved_mb")
    assert (saved["fusedvae"] <= saved["torch"]).all(), saved
    for column in ("device", "torch", "triton", "fusedvae", "commit", "timestamp"):
        assert rows[column].notna().all() and (rows[column].astype(str) != "").all()
    # the byte counts: rsample_kl with a standard prior moves 3E forward and 5E backward (+ the scalar KL)
    rsample = rows[(rows["op"] == "rsample_kl") & (rows["variant"] == "standard-prior")].set_index("mode")
    elements = int(rsample["numel"].iloc[0])
    assert rsample.loc["forward", "bytes_min"].iloc[0] == 4 * (3 * elements + 1)
    assert rsample.loc["backward", "bytes_min"].iloc[0] == 4 * (5 * elements + 1)
    assert rsample.loc["full", "bytes_min"].iloc[0] == 4 * (8 * elements + 2)


def test_train_csv_has_every_column_and_model(quick_run):
    rows = pd.read_csv(quick_run / "train.csv")
    assert set(TRAIN_COLUMNS) <= set(rows.columns)
    assert rows["note"].isna().all(), rows[rows["note"].notna()][["model", "variant", "provider", "note"]]
    assert set(rows["model"]) == {"mlp", "conv-sigma-vae", "hierarchical-vae", "autoencoderkl"}
    assert set(rows[rows["model"] == "conv-sigma-vae"]["variant"]) == {"learned-sigma", "optimal-sigma", "per-pixel-sigma"}
    assert set(rows["provider"]) == {"torch", "torch+compile", "fusedvae", "fusedvae+compile"}
    assert set(rows[rows["model"] == "autoencoderkl"]["provider"]) == {"torch", "fusedvae"}
    assert (rows["saved_mb"] > 0).all()
    assert (rows["step_ms_p50"] > 0).all() and rows["final_loss"].map(math.isfinite).all()
    # same seed and data, and on a CPU the same torch.randn noise: the public codebases' loss code and
    # fusedvae's train the same model to the same loss, up to float rounding
    by = rows.set_index(["model", "variant", "provider"])["final_loss"]
    for model, variant in {(m, v) for m, v, _ in by.index}:
        assert by[(model, variant, "torch")] == pytest.approx(by[(model, variant, "fusedvae")], rel=1e-3)


def test_autoencoderkl_row_times_diffusers_against_the_patched_posterior():
    pytest.importorskip("diffusers")
    from bench.autoencoderkl import ldm_nll_eager, ldm_nll_fused
    from bench.models import model_specs
    from bench.providers import provider_context
    from fusedvae.compat import diffusers as fvd

    spec = next(s for s in model_specs("tiny", "cpu") if s.model == "autoencoderkl")
    torch.manual_seed(0)
    model = spec.build()
    x = torch.rand(spec.batch, spec.channels, spec.size, spec.size)
    for provider, fused in (("torch", False), ("torch+compile", False), ("fusedvae", True), ("fusedvae+compile", True),
                            ("reference", True)):
        with provider_context(provider), spec.context(provider):
            posterior = model.vae.encode(2 * x - 1).latent_dist
            assert isinstance(posterior, fvd.DiagonalGaussianDistribution) is fused, provider
            assert fvd.is_patched() is fused
    assert not fvd.is_patched()  # the context restored diffusers' class
    # the loss the row trains: latent diffusion's, at the mean (no noise) equal between the two paths
    with fvd.patch():
        posterior = model.vae.encode(2 * x - 1).latent_dist
        fused_kl = posterior.kl().sum() / spec.batch
    posterior = model.vae.encode(2 * x - 1).latent_dist
    assert fused_kl.item() == pytest.approx((posterior.kl().sum() / spec.batch).item(), rel=1e-4)
    reconstruction = model.vae.decode(posterior.mode()).sample
    assert ldm_nll_fused(2 * x - 1, reconstruction, model.logvar).item() == pytest.approx(
        ldm_nll_eager(2 * x - 1, reconstruction, model.logvar).item(), rel=1e-5)


def test_report_writes_markdown_and_plots(quick_run):
    for stale in list(quick_run.glob("*.png")) + [quick_run / "REPORT.md"]:
        stale.unlink(missing_ok=True)
    done = _bench("report", str(quick_run), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = (quick_run / "REPORT.md").read_text()
    assert "## Micro-benchmarks" in report and "## Training loops" in report
    pngs = sorted(p.name for p in quick_run.glob("*.png"))
    assert "train_speedup.png" in pngs and "micro_speedup.png" in pngs and "micro_rsample_kl_float32.png" in pngs
    for name in pngs:
        assert (quick_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in report


def test_compare_gates_fused_regressions(quick_run, tmp_path):
    micro = quick_run / "micro.csv"
    same = _bench("compare", str(micro), str(micro), timeout=60)
    assert same.returncode == 0, same.stdout + same.stderr
    rows = pd.read_csv(micro)
    slower = rows.copy()
    fused = slower["provider"] == "fusedvae"
    slower.loc[fused & (slower["mode"] == "full"), "time_ms_p50"] *= 1.5
    slower.to_csv(tmp_path / "slower.csv", index=False)
    regressed = _bench("compare", str(micro), str(tmp_path / "slower.csv"), "--threshold", "0.05", timeout=60)
    assert regressed.returncode == 1, regressed.stdout + regressed.stderr
    assert "REGRESSION" in regressed.stdout
    assert _bench("compare", str(micro), str(tmp_path / "slower.csv"), "--threshold", "0.6",
                  timeout=60).returncode == 0
    eager_only = rows.copy()
    eager_only.loc[eager_only["provider"] == "torch", "time_ms_p50"] *= 3  # not fusedvae's regression
    eager_only.to_csv(tmp_path / "eager.csv", index=False)
    from bench.compare import compare_files

    assert compare_files(micro, tmp_path / "eager.csv") == 0
    train = quick_run / "train.csv"
    assert compare_files(train, train) == 0
    assert compare_files(micro, train) == 2  # different kinds of file


def test_data_loaders(tmp_path):
    from bench.data import load_dataset, load_idx

    images = (np.arange(5 * 28 * 28) % 256).astype(np.uint8).reshape(5, 28, 28)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 28, 28) + images.tobytes())
    assert torch.equal(load_idx(tmp_path), torch.from_numpy(images))
    mnist = load_dataset(str(tmp_path), n=4, channels=3, size=64)
    assert mnist.shape == (4, 3, 64, 64) and 0 <= mnist.min() and mnist.max() <= 1
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 12, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    assert load_dataset(str(folder), n=8, channels=1, size=28).shape == (3, 1, 28, 28)
    assert load_dataset("digits", n=10, channels=1, size=28).shape == (10, 1, 28, 28)
    a, b = load_dataset("synthetic", n=6, channels=3, size=32), load_dataset("synthetic", n=6, channels=3, size=32)
    assert torch.equal(a, b) and a.std() > 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_end_with_identical_parameters(tmp_path):
    params = tmp_path / "params"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "bench", "run", "--tiny", "--suite", "train", "--models",
               "mlp,hier", "--providers", "torch,fusedvae", "--device", "cpu", "--out", str(tmp_path),
               "--dump-params", str(params), "--no-progress", "--no-report"]
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = pd.read_csv(tmp_path / "train.csv")
    assert len(rows) == 4 and (rows["world_size"] == 2).all() and rows["note"].isna().all()
    rank0 = sorted(params.glob("*_rank0.pt"))
    assert len(rank0) == 4
    for path in rank0:
        first = torch.load(path)
        second = torch.load(path.with_name(path.name.replace("_rank0", "_rank1")))
        assert first.keys() == second.keys()
        for name in first:
            assert torch.equal(first[name], second[name]), f"{path.name}: {name} differs between ranks"
    # the ranks saw different data (each its own slice of the global batch), yet DDP kept them equal;
    # and training moved the weights away from the seed's initialisation
    from bench.models import MLPVAE

    torch.manual_seed(0)
    initial = MLPVAE().state_dict()
    trained = torch.load(params / "mlp_784-400-20_torch_float32_rank0.pt")
    assert not torch.equal(initial["encoder.0.weight"], trained["encoder.0.weight"])


def test_csv_sink_appends_rows_under_one_header(tmp_path):
    from bench.__main__ import CsvSink

    path = tmp_path / "micro.csv"
    for append, value in ((False, "a"), (True, "b"), (True, "c")):  # scripts/gpu_run.sh: one CSV from several runs
        sink = CsvSink(path, ("op", "time"), append=append)
        sink({"op": value, "time": 1.0})
        sink.close()
    assert pd.read_csv(path)["op"].tolist() == ["a", "b", "c"]
    sink = CsvSink(path, ("op", "time"))  # without append a run starts the file afresh
    sink.close()
    assert path.read_text().splitlines() == ["op,time"]


def test_gpu_run_size_tables_split_the_gpu_run_sizes():
    from bench.micro import SIZES

    large, mid, both = SIZES["gpu-large"], SIZES["gpu-mid"], SIZES["gpu-run"]
    for kind in ("latent", "image"):
        assert sorted(large[kind] + mid[kind]) == sorted(both[kind])
        assert all(math.prod(s) > math.prod(m) for s in large[kind] for m in mid[kind])
    assert large["betatc"] == both["betatc"] and mid["betatc"] == []  # β-TC's one GPU size runs with the large ones
