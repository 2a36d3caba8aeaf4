#!/usr/bin/env bash
# The whole GPU run in one command of at most six minutes (a lent GPU comes in slots of ~15 minutes:
# this leaves room for a rerun after a fix). Run from anywhere in a checkout, on a CUDA machine whose
# python3 has torch and triton (nothing is installed):
#
#   OUT=/some/dir bash scripts/gpu_run.sh             # the run; results in results/<gpu-slug>/
#   OUT=/some/dir bash scripts/gpu_run.sh --dry-run   # every step, tiny, on the CPU through Triton's interpreter
#
# Steps, each under its own time cap and all under one deadline (GPU_RUN_BUDGET seconds, default 345;
# 480 for the dry run, whose caps are tripled; a step that would start after it is recorded as skipped),
# the most valuable first. "est" is the expected H200 time, from the first run (results/nvidia-h200: env
# 5 s, parity 24 s per dtype, pytest 23 s for 78 tests, micro float32 150 s for 174 rows of which ~50 s
# were torch.compile, ~50 s Triton's first compiles of fusedvae's kernels and ~30 s drawing the inputs on
# the CPU; the training loops > 43 s, nearly all torch.compile):
#   step          cap  est  what                                                               -> output
#   env            20    5  GPU, driver, clocks, torch, triton, copy bandwidth (gpu_env.py)     -> env.json
#   parity-*      100   25  python -m fusedvae.parity --device cuda, one process per dtype      -> parity_<dtype>.json
#   pytest        100   70  the kernel and compile tests on CUDA (237), -x, xdist -n 6 where present -> pytest.xml
#   capture       100   25  torch.compile (inductor, fullgraph), a replayed CUDA graph          -> capture_checks.jsonl
#   warm           80   80  beside the three above, untimed: one process per later timed step fills the
#                           inductor and Triton caches on disk (compiles only: --modes full, 1 ms of
#                           timing); the timed steps then load kernels instead of compiling them.
#                           Cut at its cap without failing the run (logs/warm-*.log)
#   micro          90   40  float32, the size >= 256 MB of every op variant; torch, torch+compile
#                           (one variant per op), fusedvae; forward/backward/full; 40 ms do_bench
#                           repetitions (>= 7 calls of the slowest, torch eager at 6 ms)        -> micro.csv
#   probe-full     25   15  where a fused `full` call's time goes: host vs kernels, torch.profiler
#                           table (scripts/gpu_probes.py full)                                  -> logs/probe-full.log
#   probe-prior    30   20  standard vs learned prior sample/KL kernels: registers, waves, other
#                           tilings (scripts/gpu_probes.py prior)                               -> logs/probe-prior.log
#   ncu            55   38  forward kernels under ncu (9: float32, bfloat16, channels-last bfloat16): instructions
#                           and DRAM bytes per element beside the static report's, registers,
#                           waves, occupancy, SM clock (scripts/ncu_probe.py)                   -> ncu.csv
#   train          75   30  hierarchical VAE, bfloat16 autocast, 4 providers, 3 + 10 steps      -> train.csv
#   micro-bf16     60   30  as micro, bfloat16                                                  -> micro.csv
#   train-rest     50   25  conv σ-VAE (optimal σ) and the MLP VAE, as train                    -> train.csv
#   micro-mid      40   25  float32 at the mid size (launch-bound on a GPU: the host path's cost) -> micro.csv
#   report         25   10  python -m bench report, then the summary table printed last         -> REPORT.md, SUMMARY.md
# Estimates sum to ~318 s of the 345, the correctness phase (~80 s) included (the caps, which only bound a step
# that misbehaves, sum to more); should the estimates be short, the last steps are the ones skipped.
# The correctness steps and warm run side by side: none of them is timed.
# Results are written as they are measured (CSV rows as they come) and after every phase the results
# folder is packed again, so an interrupted run keeps what it did. $OUT receives three files:
# gpu_run.log (this output), summary.md, results-<slug>.tar.gz (the results folder with every log).
# Exit status: 0 when every step passed or was skipped, 1 otherwise, 2 when it cannot start.
#
# Environment: PYTHON (default python3), OUT (default a new temporary folder), GPU_RUN_BUDGET,
# MICRO_FLAGS (default "--compile some --rep-ms 40 --warmup-ms 10": torch+compile for one variant per op),
# TRAIN_FLAGS (default "--steps 10 --warmup 3").
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
RESERVE=$(( 25 * SCALE ))  # seconds kept for the report and the summary
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# torch.compile's on-disk caches (the defaults, stated: the warm step relies on them), shared by every step's process
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
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
[[ $SLUG =~ ^[a-z0-9][a-z0-9._-]*$ ]] || { echo "gpu_run: unusable device slug '$SLUG'"; exit 2; }  # rm -rf below
WORK=$(mktemp -d)  # scratch: the warm step's throwaway CSVs; the dry run's results (never the committed ones)
if (( DRY )); then
  RESULTS="$WORK/results/dry-run-$SLUG"
else
  RESULTS="results/$SLUG"
fi
LOGS="$RESULTS/logs"
STEPS="$RESULTS/steps.tsv"
if (( ! DRY )); then rm -rf "$RESULTS"; fi  # the steps append to its CSVs; the last run's copy is in git
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

note_rows() {  # append "(N rows)" to the last step's detail: the rows that step added to CSV $1 (had $2 before)
  sed -i "\$s/\$/ ($(( $(rows "$1") - $2 )) rows)/" "$STEPS"
}

snapshot() {  # pack the results folder into $OUT (atomically: a cut-off run keeps the last complete pack)
  tar czf "$TARBALL.part" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" && mv -f "$TARBALL.part" "$TARBALL"
}

# 1. Environment
ENV_CMD="$PY scripts/gpu_env.py --device $DEVICE --json $RESULTS/env.json"
if (( DRY )); then
  step env 20 "$ENV_CMD --quick"
else
  step env 20 "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit --format=csv; $ENV_CMD"
fi
snapshot

# The timed steps' command lines (the warm step below runs the same ones, compiling only)
BENCH="$PY -m bench run --device $DEVICE --no-progress --no-report --no-accuracy"
if (( DRY )); then
  MICRO_FLAGS=${MICRO_FLAGS:---tiny --compile none}
  TRAIN_FLAGS=${TRAIN_FLAGS:---tiny --compile none --steps 2 --warmup 1}
  LARGE="" MID=""  # --tiny's one size
else
  MICRO_FLAGS=${MICRO_FLAGS:---compile some --rep-ms 40 --warmup-ms 10}
  TRAIN_FLAGS=${TRAIN_FLAGS:---steps 10 --warmup 3}
  LARGE="--sizes gpu-large" MID="--sizes gpu-mid"
fi
MICRO="$BENCH --suite micro --providers $MICRO_PROVIDERS $MICRO_FLAGS"
TRAIN="$BENCH --suite train --dtype bfloat16 --providers $TRAIN_PROVIDERS $TRAIN_FLAGS"
MODELS_FIRST="hier" MODELS_REST="conv:optimal,mlp"

# 2. Correctness on the compiled kernels, side by side, and the caches warmed beside them
if (( DRY )); then
  PARITY_OPS="--ops gaussian_nll_loss"
  PYTEST_ARGS="--collect-only"
  CAPTURE_ARGS="--backend triton"
else
  PARITY_OPS=""
  PYTEST_ARGS="-x --junitxml=$RESULTS/pytest.xml"
  if "$PY" -c "import xdist" 2>/dev/null; then PYTEST_ARGS="$PYTEST_ARGS -n 6"; fi  # Triton compiles in parallel
  CAPTURE_ARGS=""
fi
# One process per timed step, in parallel (16 cores), each under its own timeout; rows go to $WORK, never to
# the results. torch.compile's FX-graph and AOTAutograd caches and Triton's kernel cache live on disk, so the
# timed steps load what these compiled (dynamic shapes: one graph per op variant and dtype serves every size).
WARM_CAP=$(cap 80)
WARM_EACH=$(( WARM_CAP > 10 ? WARM_CAP - 5 : 5 ))
WARM_RUNS=(
  "micro-f32|$MICRO --dtype float32 $LARGE --modes full --rep-ms 1 --warmup-ms 1"
  "micro-bf16|$MICRO --dtype bfloat16 $LARGE --modes full --rep-ms 1 --warmup-ms 1"
  "micro-mid|$MICRO --dtype float32 $MID --modes full --rep-ms 1 --warmup-ms 1"
  "train|$TRAIN --models $MODELS_FIRST,$MODELS_REST --steps 0 --warmup 2"
)
WARM=""
for run in "${WARM_RUNS[@]}"; do
  name=${run%%|*}
  # 4 compile workers each (inductor's default is one per core, in every process); not part of the cache key
  WARM+="TORCHINDUCTOR_COMPILE_THREADS=4 timeout -k 2 $WARM_EACH ${run#*|} --out $WORK/warm-$name > $LOGS/warm-$name.log 2>&1 & "
done
WARM+="wait; for f in $LOGS/warm-*.log; do n=\$(basename \$f .log); grep -q '^done in' \$f && echo -n \"\${n#warm-} done, \" || echo -n \"\${n#warm-} cut, \"; done; echo"
PIDS=()
for dtype in float32 bfloat16 float16; do
  step "parity-$dtype" 100 "$PY -m fusedvae.parity --device $DEVICE --dtypes $dtype $PARITY_OPS --json $RESULTS/parity_$dtype.json" &
  PIDS+=($!)
done
step pytest 100 "$PY -m pytest -q -p no:cacheprovider $PYTEST_ARGS tests/test_kernels_*.py tests/test_betatc.py tests/test_compile.py" &
PIDS+=($!)
step capture 100 "$PY scripts/capture_checks.py --device $DEVICE $CAPTURE_ARGS --json $RESULTS/capture_checks.jsonl" &
PIDS+=($!)
step warm 80 "$WARM" &
PIDS+=($!)
wait "${PIDS[@]}"  # these only: a bare wait would also wait for the tee that copies this output
snapshot

# 3. Micro-benchmarks, float32 at the large size (rows are appended to micro.csv as they are measured)
BEFORE=$(rows "$RESULTS/micro.csv")
step micro 90 "$MICRO --dtype float32 $LARGE --out $RESULTS --append"
note_rows "$RESULTS/micro.csv" "$BEFORE"
snapshot

# 4. Probes of the first run's two unexplained results: the `full` mode, the standard-prior kernels
SMALL=$( ((DRY)) && echo --small )
step probe-full 25 "$PY scripts/gpu_probes.py full $SMALL"
step probe-prior 30 "FUSEDVAE_BACKEND=$( ((DRY)) && echo triton || echo auto ) $PY scripts/gpu_probes.py prior $SMALL"
snapshot

# 5. Hardware counters beside the static model
if command -v ncu > /dev/null && (( ! DRY )); then
  read -r METRICS SECTIONS KERNELS < <("$PY" -c "import sys; sys.path.insert(0, 'scripts'); import ncu_probe as n; \
print(','.join(n.METRICS), ' '.join('--section ' + s for s in n.SECTIONS).replace(' ', '@'), n.KERNELS)")
  SECTIONS=${SECTIONS//@/ }
  NCU="ncu -f -o $RESULTS/ncu --profile-from-start off --clock-control none -k 'regex:$KERNELS'"
  # the sections add registers, waves and occupancy; should this ncu not know one, the bare metrics still run
  step ncu 55 "{ $NCU $SECTIONS --metrics $METRICS $PY scripts/ncu_probe.py target || $NCU --metrics $METRICS $PY scripts/ncu_probe.py target; } && ncu --import $RESULTS/ncu.ncu-rep --csv --page raw --print-units base > $RESULTS/ncu_raw.csv && $PY scripts/ncu_probe.py parse $RESULTS/ncu_raw.csv --csv $RESULTS/ncu.csv"
else
  # no ncu (or the dry run): the profiled program still runs, so a typo in it never costs GPU time
  step ncu-target 30 "FUSEDVAE_BACKEND=$( ((DRY)) && echo triton || echo auto ) $PY scripts/ncu_probe.py target --numel 3072"
  record ncu skip 0 "no ncu here"
fi
snapshot

# 6. Training loops, bfloat16 autocast: the hierarchical VAE first (its targets matter most)
BEFORE=$(rows "$RESULTS/train.csv")
step train 75 "$TRAIN --models $MODELS_FIRST --out $RESULTS --append"
note_rows "$RESULTS/train.csv" "$BEFORE"
snapshot

# 7. The rest, most valuable first: bfloat16 micro at the large size, the other two loops, the mid size
BEFORE=$(rows "$RESULTS/micro.csv")
step micro-bf16 60 "$MICRO --dtype bfloat16 $LARGE --out $RESULTS --append"
note_rows "$RESULTS/micro.csv" "$BEFORE"
snapshot
BEFORE=$(rows "$RESULTS/train.csv")
step train-rest 50 "$TRAIN --models $MODELS_REST --out $RESULTS --append"
note_rows "$RESULTS/train.csv" "$BEFORE"
snapshot
BEFORE=$(rows "$RESULTS/micro.csv")
step micro-mid 40 "$MICRO --dtype float32 $MID --out $RESULTS --append"
note_rows "$RESULTS/micro.csv" "$BEFORE"
snapshot

# 8. Report and summary (within the reserve)
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
