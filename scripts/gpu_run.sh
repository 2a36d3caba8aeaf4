#!/usr/bin/env bash
# The whole GPU run in one command of at most six minutes (a lent GPU comes in slots of ~15 minutes:
# this leaves room for a rerun after a fix). Run from anywhere in a checkout, on a CUDA machine whose
# python3 has torch and triton (nothing is installed):
#
#   OUT=/some/dir bash scripts/gpu_run.sh             # the run; results in results/<gpu-slug>/
#   OUT=/some/dir bash scripts/gpu_run.sh --dry-run   # every step, tiny, on the CPU through Triton's interpreter
#
# Steps, each under its own time cap and all under one deadline (GPU_RUN_BUDGET seconds, default 345;
# 480 for the dry run, whose caps are tripled; a step that would start after it is recorded as skipped):
#   env          GPU, driver, torch, triton, the measured copy bandwidth          -> env.json (scripts/gpu_env.py)
#   parity-*     python -m fusedvae.parity --device cuda, one process per dtype  -> parity_<dtype>.json
#   pytest       the kernel and compile tests on CUDA, -x                         -> pytest.xml, logs/pytest.log
#   capture      torch.compile (inductor, fullgraph), a replayed CUDA graph      -> capture_checks.jsonl
#                (scripts/capture_checks.py)
#   micro        python -m bench run --suite micro (torch, torch+compile, fusedvae; float32, bfloat16)
#   train        python -m bench run --suite train (hier, conv σ-VAE, MLP; bfloat16 autocast; 4 providers)
#   ncu          rsample and gaussian_nll forward under ncu: instructions and DRAM bytes per element
#                (scripts/ncu_probe.py) -> ncu.csv
#   report       python -m bench report (REPORT.md, plots), then the summary table, printed last
#                (scripts/gpu_summary.py) -> SUMMARY.md
# The correctness steps (parity, pytest, capture) run side by side: none of them is timed.
# Results are written as they are measured (CSV rows as they come) and after every phase the results
# folder is packed again, so an interrupted run keeps what it did. $OUT receives three files:
# gpu_run.log (this output), summary.md, results-<slug>.tar.gz (the results folder with every log).
# Exit status: 0 when every step passed or was skipped, 1 otherwise, 2 when it cannot start.
#
# Environment: PYTHON (default python3), OUT (default a new temporary folder), GPU_RUN_BUDGET,
# MICRO_FLAGS (default "--sizes gpu-run --compile some": per op one mid size and one that moves >= 256 MB
# in bfloat16, torch+compile for one variant per op), TRAIN_FLAGS.
set -uo pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: scripts/gpu_run.sh [--dry-run]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT" || exit 2
START=$(date +%s)
BUDGET=${GPU_RUN_BUDGET:-$(( DRY ? 480 : 345 ))}
SCALE=$(( DRY ? 3 : 1 ))  # the dry run checks the script, not speed: a busy shared CPU gets looser caps
RESERVE=$(( 30 * SCALE ))  # seconds kept for the report and the summary
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_run.log") 2>&1
TEE_PID=$!

if (( DRY )); then
  DEVICE=cpu
  export TRITON_INTERPRET=1
  unset FUSEDVAE_BACKEND
else
  DEVICE=cuda
  unset TRITON_INTERPRET FUSEDVAE_BACKEND
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_run: $PY sees no CUDA device (use --dry-run on a CPU)"; exit 2
  fi
fi
SLUG=$("$PY" -c "from bench.device import device_slug; print(device_slug('$DEVICE'))") || exit 2
if (( DRY )); then
  WORK=$(mktemp -d)  # never over the committed results/<cpu-slug>/
  RESULTS="$WORK/results/dry-run-$SLUG"
else
  RESULTS="results/$SLUG"
fi
LOGS="$RESULTS/logs"
STEPS="$RESULTS/steps.tsv"
mkdir -p "$LOGS" || exit 2
: > "$STEPS"
TARBALL="$OUT/results-$(basename "$RESULTS").tar.gz"

# Provider names: the current ones (torch, torch+compile), or the older ones (eager, compile) if bench has them.
read -r MICRO_PROVIDERS TRAIN_PROVIDERS < <("$PY" - <<'EOF'
from bench.providers import MICRO_PROVIDERS, TRAIN_PROVIDERS
old = {"torch": "eager", "torch+compile": "compile"}
def pick(wanted, known):
    return ",".join(p if p in known else old.get(p, p) for p in wanted if p in known or old.get(p) in known)
print(pick(("torch", "torch+compile", "fusedvae"), MICRO_PROVIDERS),
      pick(("torch", "torch+compile", "fusedvae", "fusedvae+compile"), TRAIN_PROVIDERS))
EOF
)

echo "gpu_run: $( ((DRY)) && echo 'dry run, ' )device $DEVICE ($SLUG), budget ${BUDGET}s, results in $RESULTS, outputs in $OUT"

cap() {  # the time a step may take: what it asks for, within the deadline
  local want=$(( $1 * SCALE )) left=$(( BUDGET - RESERVE - ($(date +%s) - START) ))
  (( left < want )) && want=$left
  echo "$want"
}

record() {  # name status seconds detail
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS"
  printf 'gpu_run: %-16s %-8s %4ss  %s\n' "$1" "$2" "$3" "$4"
}

step() {  # name seconds command-string: run it under timeout, log to logs/<name>.log, record the outcome
  local name=$1 seconds
  seconds=$(cap "$2")
  if (( seconds < 5 )); then record "$name" skip 0 "no time left before the deadline"; return 0; fi
  local log="$LOGS/$name.log" t0 rc status detail
  t0=$(date +%s)
  timeout -k 5 "$seconds" bash -c "$3" > "$log" 2>&1
  rc=$?
  detail=$(grep -v '^\s*$' "$log" | tail -n 1 | tr '|\t' '/ ' | cut -c1-110)  # one markdown table cell
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT; detail="stopped after ${seconds}s: $detail" ;;
    *) status=FAIL; detail="exit $rc: $detail" ;;
  esac
  record "$name" "$status" "$(( $(date +%s) - t0 ))" "$detail"
  if [[ $status != ok ]]; then sed 's/^/    | /' "$log" | tail -n 15; fi
}

rows() {  # data rows of a CSV (0 if absent)
  if [[ -f $1 ]]; then echo $(( $(wc -l < "$1") - 1 )); else echo 0; fi
}

snapshot() {  # pack the results folder into $OUT (atomically: a cut-off run keeps the last complete pack)
  tar czf "$TARBALL.part" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" && mv -f "$TARBALL.part" "$TARBALL"
}

# 1. Environment
ENV_CMD="$PY scripts/gpu_env.py --device $DEVICE --json $RESULTS/env.json"
if (( DRY )); then
  step env 30 "$ENV_CMD --quick"
else
  step env 30 "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv; $ENV_CMD"
fi
snapshot

# 2. Correctness on the compiled kernels, side by side
if (( DRY )); then
  PARITY_OPS="--ops gaussian_nll_loss"
  PYTEST_ARGS="--collect-only"
  CAPTURE_ARGS="--backend triton"
else
  PARITY_OPS=""
  PYTEST_ARGS="-x --junitxml=$RESULTS/pytest.xml"
  if "$PY" -c "import xdist" 2>/dev/null; then PYTEST_ARGS="$PYTEST_ARGS -n 4"; fi  # Triton compiles in parallel
  CAPTURE_ARGS=""
fi
PIDS=()
for dtype in float32 bfloat16 float16; do
  step "parity-$dtype" 100 "$PY -m fusedvae.parity --device $DEVICE --dtypes $dtype $PARITY_OPS --json $RESULTS/parity_$dtype.json" &
  PIDS+=($!)
done
step pytest 100 "$PY -m pytest -q -p no:cacheprovider $PYTEST_ARGS tests/test_kernels_*.py tests/test_betatc.py tests/test_compile.py" &
PIDS+=($!)
step capture 100 "$PY scripts/capture_checks.py --device $DEVICE $CAPTURE_ARGS --json $RESULTS/capture_checks.jsonl" &
PIDS+=($!)
wait "${PIDS[@]}"  # these only: a bare wait would also wait for the tee that copies this output
snapshot

# 3. Micro-benchmarks (rows are appended to micro.csv as they are measured)
if (( DRY )); then
  MICRO_FLAGS=${MICRO_FLAGS:---tiny --compile none}
  MICRO_DTYPES=float32
else
  MICRO_FLAGS=${MICRO_FLAGS:---sizes gpu-run --compile some}
  MICRO_DTYPES=float32,bfloat16
fi
step micro 150 "$PY -m bench run --suite micro --device $DEVICE --dtype $MICRO_DTYPES --providers $MICRO_PROVIDERS --modes forward,backward,full $MICRO_FLAGS --no-progress --no-report --out $RESULTS"
sed -i "\$s/\$/ ($(rows "$RESULTS/micro.csv") rows)/" "$STEPS"
snapshot

# 4. Training loops, bfloat16 autocast, the hierarchical VAE first (its targets matter most)
if (( DRY )); then
  TRAIN_FLAGS=${TRAIN_FLAGS:---tiny --compile none --steps 2 --warmup 1}
else
  TRAIN_FLAGS=${TRAIN_FLAGS:---steps 10 --warmup 3}
fi
step train 80 "$PY -m bench run --suite train --device $DEVICE --dtype bfloat16 --models hier,conv:optimal,mlp --providers $TRAIN_PROVIDERS $TRAIN_FLAGS --no-progress --no-report --out $RESULTS"
sed -i "\$s/\$/ ($(rows "$RESULTS/train.csv") rows)/" "$STEPS"
snapshot

# 5. Hardware counters beside the static model
if command -v ncu > /dev/null && (( ! DRY )); then
  METRICS=$("$PY" -c "import sys; sys.path.insert(0, 'scripts'); from ncu_probe import METRICS; print(','.join(METRICS))")
  step ncu 30 "ncu -f -o $RESULTS/ncu --profile-from-start off --clock-control none --metrics $METRICS $PY scripts/ncu_probe.py target && ncu --import $RESULTS/ncu.ncu-rep --csv --page raw --print-units base > $RESULTS/ncu_raw.csv && $PY scripts/ncu_probe.py parse $RESULTS/ncu_raw.csv --csv $RESULTS/ncu.csv"
else
  # no ncu (or the dry run): the profiled program still runs, so a typo in it never costs GPU time
  step ncu-target 30 "FUSEDVAE_BACKEND=$( ((DRY)) && echo triton || echo auto ) $PY scripts/ncu_probe.py target --numel 3072"
  record ncu skip 0 "no ncu here"
fi
snapshot

# 6. Report and summary (within the reserve)
RESERVE=0
step report 25 "$PY -m bench report $RESULTS"
"$PY" scripts/gpu_summary.py "$RESULTS" --steps "$STEPS" --out "$RESULTS/SUMMARY.md" > /dev/null
cp "$RESULTS/SUMMARY.md" "$OUT/summary.md"
snapshot
echo
echo "gpu_run: done in $(( $(date +%s) - START ))s; $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
cat "$RESULTS/SUMMARY.md"
status=0
if cut -f2 "$STEPS" | grep -qE '^(FAIL|TIMEOUT)$'; then status=1; fi
exec 1>&- 2>&-
wait "$TEE_PID"  # the log is complete before the device tool collects $OUT
exit $status
