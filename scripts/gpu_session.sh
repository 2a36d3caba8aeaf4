#!/usr/bin/env bash
# Everything the GPU issue needs, in one device call (device time is scarce):
#   correctness (tests, parity in three dtypes, torch.compile), then the benchmark suite and its report.
# Run from the repository root on a CUDA machine whose python3 already has torch and triton:
#   OUT=/some/dir bash scripts/gpu_session.sh
# Writes under $OUT: env.txt, pytest.log, parity.json, parity.log, bench.log, results.tar.gz (the
# results/<gpu>/ folder: micro.csv, train.csv, REPORT.md, plots). At most 8 files, as the device tool returns.
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the outputs}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET FUSEDVAE_BACKEND
status=0

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton, fusedvae; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'fusedvae', fusedvae.__version__, torch.cuda.get_device_name())"
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1

# 1. Correctness first: the whole suite (kernels compiled, torch.compile checks on CUDA) and parity in three dtypes.
timeout 900 python3 -m pytest -q -x -p no:cacheprovider tests > "$OUT/pytest.log" 2>&1 || status=1
timeout 600 python3 -m fusedvae.parity --device cuda --dtypes float32,bfloat16,float16 --json "$OUT/parity.json" \
  > "$OUT/parity.log" 2>&1 || status=1

# 2. The benchmark suite: copy bandwidth, micro-benchmarks and training loops, measured side by side.
slug=$(python3 -c "from bench.device import device_slug; print(device_slug('cuda'))" 2>/dev/null || echo gpu)
timeout 2400 python3 -m bench run --suite all --device cuda --out "results/$slug" > "$OUT/bench.log" 2>&1 || status=1
python3 -m bench report "results/$slug" >> "$OUT/bench.log" 2>&1 || status=1
tar czf "$OUT/results.tar.gz" "results/$slug" 2>/dev/null || true
exit $status
