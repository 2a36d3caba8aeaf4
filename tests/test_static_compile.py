"""Every kernel compiles for Hopper (and Ampere) with Triton's real compiler, on a machine without a GPU.

The compile runs in a subprocess with ``TRITON_INTERPRET=0``: this suite sets ``TRITON_INTERPRET=1``
(conftest, Makefile) before :mod:`fusedvae.kernels` is imported, and under the interpreter
``triton.jit`` builds no compiler at all.

What is compiled, and why. Every kernel compile takes 1-7 s on this machine (LLVM and ptxas; the
Philox kernels are the slow ones) and the full product of cases is ~1000 distinct kernels, so:

- by default (``make test``, ~2-3 minutes on 2 cores with a cold Triton cache, seconds with a warm one):
  sm_90, float32, contiguous, every op × reduction × prior × n_samples variant: every constexpr path of
  every launcher once, in the dtype with the widest registers; sm_80, float32, the sample+KL
  variants with a learned prior (the most code in one kernel) and the per-element σ / variance
  forms: the A100 backend's compile errors;
- with ``FUSEDVAE_STATIC_FULL=1`` (opt-in, e.g. ``FUSEDVAE_STATIC_FULL=1 .ci/run``, ~25-30 minutes cold): sm_90 in
  float32, bfloat16 and float16 × contiguous, channels-last and permuted (layouts change the index
  math and the vector widths, so registers and spills), and sm_80 in float32 and bfloat16, contiguous.

float64 (slow to compile, and its spills are allowed) is in ``python -m bench static``'s committed report.

Fails on: a launcher or compile error; a spill (``STL``) in float32/bfloat16/float16 beyond
:data:`bench.static.KNOWN_SPILLS`; a contiguous float32 load not vectorized to 128 bits (the alignment
specialization missing: what a ``triton.compile`` without the JIT's ``attrs`` gets wrong).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.static import KNOWN_SPILLS
from bench.static.sass import regions

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("FUSEDVAE_STATIC_FULL"):
    JOBS = [
        ("sm_90", "float32,bfloat16,float16", "contiguous,channels_last,permuted", None),
        ("sm_80", "float32,bfloat16", "contiguous", None),
    ]
else:
    JOBS = [
        ("sm_90", "float32", "contiguous", None),
        ("sm_80", "float32", "contiguous", "learned-prior K=,per-element"),
    ]


def _static(tmp_path, arch, dtypes, layouts, match):
    out = tmp_path / arch
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "static", "--arch", arch, "--out", str(out), "--dtype", dtypes,
         "--layouts", layouts, *(["--match", match] if match else [])],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "static.csv") as f:
        return list(csv.DictReader(f)), (out / "REPORT.md").read_text()


@pytest.mark.parametrize("arch,dtypes,layouts,match", JOBS, ids=[j[0] for j in JOBS])
def test_every_kernel_compiles_without_spills(tmp_path, arch, dtypes, layouts, match):
    rows, report = _static(tmp_path, arch, dtypes, layouts, match)
    assert rows, "no case ran"
    errors = [f"{r['case']} {r['dtype']}: {r['note']}" for r in rows
              if r["note"].startswith(("launcher raised", "compile failed"))]
    assert not errors, "\n".join(errors)
    spills = [f"{r['kernel']} {r['case']} {r['dtype']}: {r['spill_bytes']} bytes" for r in rows
              if int(r["spill_bytes"]) > KNOWN_SPILLS.get(r["kernel"], 0)]
    assert not spills, "register spills:\n" + "\n".join(spills)
    for r in rows:  # the model's columns hold numbers that mean something
        assert int(r["registers"]) > 0 and float(r["instr_per_elem"]) > 0, r
        assert float(r["margin"]) == pytest.approx(float(r["t_mem_ps"]) / float(r["t_issue_ps"]), rel=0.01), r
    if match is None:  # alignment specialized as on a GPU: contiguous float32 moves in 128-bit accesses
        case = "rsample_kl sample K=1 contiguous forward"
        sample = [r for r in rows if r["case"] == case and r["dtype"] == "float32"]
        assert sample and sample[0]["load_bits"] == "128" and sample[0]["store_bits"] == "128", sample
    backward = {r["kernel"] for r in rows if r["case"].endswith("backward")}
    assert len(backward) >= 2, f"backward kernels not reached through autograd: {backward}"
    assert "Not covered" in report and "Every backend entry point" in report, "an entry point has no case builder"


SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   IMAD R5, R4, R4, RZ ;
        /*0040*/              @!P1 BRA `(.L_x_2) ;
        /*0050*/                   FADD R6, R5, R5 ;
.L_x_3:
        /*0060*/                   LDG.E.CONSTANT R7, desc[UR4][R8.64] ;
        /*0068*/                   STL [R1+0x4], R7 ;
        /*0070*/                   IADD3 R8, R8, 0x4, RZ ;
        /*0080*/               @P2 BRA `(.L_x_3) ;
.L_x_2:
        /*0090*/                   MUFU.EX2 R9, R5 ;
        /*00a0*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*00b0*/                   STL [R1], R9 ;
        /*00c0*/               @P0 BRA `(.L_x_1) ;
.L_x_0:
        /*00d0*/                   EXIT ;
.L_x_4:
        /*00e0*/                   BRA `(.L_x_4);
        /*00f0*/                   FFMA R1, R2, R3, R4 ;
"""


def test_sass_regions_count_the_hot_loop_and_skip_cold_paths():
    r = regions(SASS)
    assert r["has_loop"]
    # tile loop: LDG.128, IMAD, guard BRA, MUFU, STG.128, STL, back BRA; the constant-table loop and its guarded
    # region (FADD and the 4-instruction loop, its STL a local array) are cold, as is the code after the trap loop.
    assert r["loop"] == {"total": 7, "int": 1, "mufu": 1}
    assert r["outside"]["total"] == 3  # S2R, the loop guard, EXIT
    assert r["cold"]["total"] == 5 + 2
    assert r["bits"]["loop"] == {"load": [128], "store": [128]}
    assert r["spill_stores"] == 4  # the hot STL; the cold path's STL is a local array
