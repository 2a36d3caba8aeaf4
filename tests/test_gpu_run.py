"""scripts/gpu_run.sh: its dry run does every step on the CPU, so a typo never costs GPU time.

The dry run (about two minutes; marked ``gpu_run``, deselect with ``-m "not gpu_run"``) runs the
whole script with tiny sizes through Triton's interpreter and checks what it leaves in ``$OUT``: the
files the device tool returns and, inside the results tarball, every step's output. The helpers'
parsers are checked on made-up input.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_run.sh"
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_summary  # noqa: E402
import ncu_probe  # noqa: E402

STEPS = ("env", "parity-float32", "parity-bfloat16", "parity-float16", "pytest", "capture", "warm", "micro",
         "probe-full", "probe-prior", "ncu", "train", "micro-bf16", "train-rest", "micro-mid", "report")


def _summary_steps(text: str) -> dict[str, str]:
    steps = {}
    for line in text.split("## Micro")[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("step", "---"):
            steps[cells[0]] = cells[1]
    return steps


@pytest.mark.gpu_run
def test_dry_run_does_every_step_and_returns_at_most_eight_small_files(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("GPU_RUN_BUDGET", None)
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

    files = sorted(p for p in out.iterdir())
    assert all(p.is_file() for p in files) and len(files) <= 8
    assert all(p.stat().st_size <= 16 * 2**20 for p in files)
    names = {p.name for p in files}
    assert {"gpu_run.log", "summary.md"} <= names
    tarballs = [p for p in files if p.name.endswith(".tar.gz")]
    assert len(tarballs) == 1

    summary = (out / "summary.md").read_text()
    assert done.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the table is printed last
    steps = _summary_steps(summary)
    assert set(STEPS) <= set(steps), steps
    assert all(steps[s] == "ok" for s in STEPS if s != "ncu"), steps
    assert steps["ncu"] == "skip"  # no ncu on a CPU; its target program ran as ncu-target
    assert steps["ncu-target"] == "ok"

    with tarfile.open(tarballs[0]) as tar:
        members = {Path(m.name).relative_to(Path(m.name).parts[0]).as_posix(): m for m in tar.getmembers()}

        def read(name: str) -> str:
            return tar.extractfile(members[name]).read().decode()

        facts = json.loads(read("env.json"))
        assert facts["copy_gbps"] > 0 and facts["fusedvae"]
        for dtype in ("float32", "bfloat16", "float16"):
            parity = json.loads(read(f"parity_{dtype}.json"))
            assert parity["rows"] and all(row["passed"] and row["dtype"] == dtype for row in parity["rows"])
        checks = [json.loads(line) for line in read("capture_checks.jsonl").splitlines()]
        assert {c["check"]: c["passed"] for c in checks} == {"compile": True, "cuda_graph": True}
        micro = list(csv.DictReader(io.StringIO(read("micro.csv"))))
        assert {r["op"] for r in micro} >= {"rsample_kl", "kl_normal", "gaussian_nll", "gaussian_nll_optimal",
                                            "gaussian_nll_loss"}
        assert {r["mode"] for r in micro} == {"forward", "backward", "full"}
        assert all(float(r["time_ms_p50"]) > 0 for r in micro if r["provider"] == "fusedvae")
        train = list(csv.DictReader(io.StringIO(read("train.csv"))))
        assert {r["model"] for r in train} == {"hierarchical-vae", "conv-sigma-vae", "mlp"}
        assert {r["dtype"] for r in train} == {"bfloat16"}
        assert "REPORT.md" in members and "logs/pytest.log" in members


def test_unknown_argument_is_refused_before_anything_runs(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--bogus"], cwd=ROOT, env=dict(os.environ, OUT=str(tmp_path)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_ncu_parse_gives_per_element_figures(tmp_path):
    raw = tmp_path / "raw.csv"
    raw.write_text(
        "==PROF== Connected to process 1\n"
        '"ID","Kernel Name","Grid Size","Block Size","dram__bytes_read.sum","dram__bytes_write.sum",'
        '"gpu__time_duration.sum","smsp__inst_executed.sum"\n'
        '"","","","","byte","byte","nsecond","inst"\n'
        '"0","_rsample_fwd","(528, 1, 1)","(128, 1, 1)","6,144","3,072","2,500","96"\n')
    rows = ncu_probe.parse(str(raw), numel=768)
    assert len(rows) == 1
    row = rows[0]
    assert row["kernel"] == "_rsample_fwd"
    assert row["dram_read_b_per_elem"] == 8.0 and row["dram_write_b_per_elem"] == 4.0
    assert row["inst_per_elem"] == 96 * 32 / 768 and row["time_us"] == 2.5
    assert row["dram_gbps"] == (6144 + 3072) / 2500  # bytes per ns


def test_summary_micro_table_compares_the_largest_full_case():
    def row(provider, numel, ms, note="", host=""):
        return {"op": "kl_normal", "variant": "standard-prior", "dtype": "float32", "mode": "full", "shape": str(numel),
                "numel": str(numel), "provider": provider, "time_ms_p50": str(ms), "bytes_min": "3e8",
                "roofline_fraction": "0.9", "saved_mb": "0", "note": note, "host_ms": host}

    rows = [row("torch", 10, 1.0), row("fusedvae", 10, 1.0),  # a smaller size: not the headline
            row("torch", 100, 8.0), row("torch+compile", 100, 2.5), row("fusedvae", 100, 2.0, host="2.1")]
    table = gpu_summary.micro_table(rows)
    assert len(table) == 3
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[:3] == ["kl_normal:standard-prior", "float32", "100"]
    assert cells[3:8] == ["300", "2", "90%", "4.00×", "1.25×"]
    assert cells[9] == "2.1 launch-bound"  # the host path took longer than the timed call: it was the time measured
    rows[-1]["host_ms"] = "0.4"
    assert gpu_summary.micro_table(rows)[2].rstrip(" |").endswith("| 0.4")


def test_summary_ncu_table_puts_the_measurement_beside_the_model():
    rows = [{"case": "rsample bf16", "time_us": "100", "dram_gbps": "3600", "inst_per_elem": "33.5",
             "static_inst_per_elem": "32", "static_margin": "1.85", "occupancy_pct": "60"}]
    cells = [c.strip() for c in gpu_summary.ncu_table(rows, 4000.0)[2].strip("|").split("|")]
    assert cells == ["rsample bf16", "100.0", "3600", "90%", "33.5", "32.0", "1.85", "60"]
    assert gpu_summary.ncu_table([], 4000.0) == ["(no ncu rows)"]


def test_probe_occupancy_counts_programs_per_sm_and_waves():
    import gpu_probes

    # the launcher's grid at 131072x512 (2115 programs of 4 warps) on an H200's 132 SMs
    assert gpu_probes.occupancy(56, 4, 16, 2115, 132) == (9, 2115 / (9 * 132))  # 56 regs: 9 programs of 4 warps
    assert gpu_probes.occupancy(64, 4, 0, 2115, 132)[0] == 8
    assert gpu_probes.occupancy(32, 4, 0, 2112, 132) == (16, 1.0)  # warps, not registers, limit: 64 / 4
    assert gpu_probes.occupancy(40, 8, 100 * 1024, 132, 132)[0] == 2  # shared memory limits


def test_ncu_static_figures_come_from_the_committed_report():
    """Every profiled case has its forward row in results/static-sm90 (so a renamed static case is caught here)."""
    static = ncu_probe.static_figures()
    assert set(static) == set(ncu_probe.CASES)
    assert all(0 < figures["instr"] < 200 and figures["margin"] > 0 for figures in static.values())


def test_ncu_parse_names_the_cases_and_reads_the_sections(tmp_path):
    raw = tmp_path / "raw.csv"
    header = ('"ID","Kernel Name","Grid Size","Block Size","dram__bytes_read.sum","dram__bytes_write.sum",'
              '"gpu__time_duration.sum","smsp__inst_executed.sum","launch__registers_per_thread",'
              '"launch__waves_per_multiprocessor","sm__warps_active.avg.pct_of_peak_sustained_active",'
              '"gpc__cycles_elapsed.avg.per_second"\n')
    units = '"","","","","byte","byte","nsecond","inst","register/thread","","%","cycle/second"\n'
    lines = [f'"{i}","_sample_kl_forward_kernel","(2115, 1, 1)","(128, 1, 1)","8,192","4,096","1,000","256",'
             f'"{56 + i}","1.78","40.5","1,755,000,000"\n' for i in range(len(ncu_probe.CASES))]
    raw.write_text(header + units + "".join(lines))
    static = tmp_path / "static.csv"
    static.write_text("kernel,case,dtype,instr_per_elem,margin\n"
                      "_k,rsample_kl sample+kl sum standard-prior K=1 contiguous backward,float32,99,9\n"
                      "_k,rsample_kl sample+kl sum standard-prior K=1 contiguous forward,bfloat16,44,1.34\n"
                      "_k,rsample_kl sample+kl sum standard-prior K=1 contiguous forward,float32,48.7,2.43\n")
    rows = ncu_probe.parse(str(raw), numel=1024, static_path=static)
    assert [r["case"] for r in rows] == list(ncu_probe.CASES)
    # each case's own dtype and the forward row; a case the report lacks reads NaN, never a stale figure
    assert rows[1]["static_inst_per_elem"] == 48.7 and rows[1]["static_margin"] == 2.43
    assert rows[ncu_probe.CASES.index("rsample_kl standard bf16")]["static_inst_per_elem"] == 44
    assert math.isnan(rows[0]["static_inst_per_elem"])
    assert rows[1]["registers"] == 57 and rows[0]["waves"] == 1.78 and rows[0]["occupancy_pct"] == 40.5
    assert rows[0]["sm_ghz"] == 1.755 and rows[0]["inst_per_elem"] == 8.0
    assert ncu_probe.parse(str(raw), numel=1024)[-1]["dram_read_b_per_elem"] == 8.0
    raw.write_text(header + units + lines[0])  # fewer launches than cases: no names guessed
    assert ncu_probe.parse(str(raw), numel=1024)[0]["case"] == ""
