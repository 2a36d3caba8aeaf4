#!/usr/bin/env bash
# The GPU work in two device calls, each under the device tool's 600-second limit:
#   check: correctness (the tests with compiled kernels and torch.compile on CUDA, parity in three dtypes)
#   bench: the micro-benchmarks and training loops (not the science suite, which needs no GPU) and their report
# Run from the repository root on a CUDA machine whose python3 already has torch and triton:
#   OUT=/some/dir bash scripts/gpu_session.sh check
#   OUT=/some/dir bash scripts/gpu_session.sh bench
# Writes under $OUT (at most 8 files, as the device tool returns): env.txt, then pytest.log, parity.json,
# parity.log (check) or bench.log, results.tar.gz (bench: results/<gpu>/ with micro.csv, train.csv,
# REPORT.md and plots; rows are written as measured, so a run cut short still returns what it did).
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the outputs}
PHASE=${1:?usage: gpu_session.sh check|bench}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET FUSEDVAE_BACKEND
status=0

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton, fusedvae; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'fusedvae', fusedvae.__version__, torch.cuda.get_device_name())"
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1

case "$PHASE" in
  check)
    # the kernel, compile, API and diffusers tests (the CPU-only science and bench smoke tests are CI's)
    timeout 360 python3 -m pytest -q -x -p no:cacheprovider tests --ignore=tests/test_science_smoke.py \
      --ignore=tests/test_bench_smoke.py > "$OUT/pytest.log" 2>&1 || status=1
    timeout 180 python3 -m fusedvae.parity --device cuda --dtypes float32,bfloat16,float16 --json "$OUT/parity.json" \
      > "$OUT/parity.log" 2>&1 || status=1
    ;;
  bench)
    slug=$(python3 -c "from bench.device import device_slug; print(device_slug('cuda'))" 2>/dev/null || echo gpu)
    timeout 500 python3 -m bench run --suite micro,train --device cuda --no-progress --out "results/$slug" \
      > "$OUT/bench.log" 2>&1 || status=1
    timeout 60 python3 -m bench report "results/$slug" >> "$OUT/bench.log" 2>&1 || status=1
    tar czf "$OUT/results.tar.gz" "results/$slug" 2>/dev/null || true
    ;;
  *)
    echo "unknown phase $PHASE: check or bench" >&2
    exit 2
    ;;
esac
exit $status
