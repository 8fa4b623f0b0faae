#!/usr/bin/env bash
# The GPU checks in one run, most important first: the environment, the CUDA tests,
# the GPT benchmark (eager; compiled; fp8; CUDA graphs), compiled fp16 loss scaling
# (sync-free, syncing, hand-written GradScaler: 10 rounds of 20 steps), the MLP overhead ratios.
# Each stage writes its log (and JSON) to $OUT and stops starting work when the time
# budget ($BUDGET seconds, default 480) is spent; $ROUNDS (default 3) sets the GPT
# benchmark's rounds, $MLP_ROUNDS (default 30) the MLP one's. From the repository root:
#   OUT=/tmp/gpu BUDGET=480 bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-/tmp/ampfn-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
start=$SECONDS
left() { echo $(( ${BUDGET:-480} - (SECONDS - start) )); }
STAGES=${STAGES:-tests gpt_eager gpt_compiled gpt_cudagraphs compiled_scaling bench_mlp}
COMPILED=${COMPILED:-bf16,fp16 sync-free,fp8 tensorwise,fp8 rowwise}
ROUNDS=${ROUNDS:-3}
stage() {  # stage NAME SECONDS CMD...: run CMD for at most SECONDS (or what is left)
  local name=$1 limit=$2; shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  local t; t=$(left); (( t > limit )) && t=$limit
  if (( t < 20 )); then echo "== $name: skipped, budget spent"; return; fi
  echo "== $name (limit ${t}s, at $((SECONDS - start))s)"
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - start))s"; tail -n 25 "$OUT/$name.log" | grep -v '^W[0-9]'
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1; } | tee "$OUT/env.txt"

stage tests 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests
stage gpt_eager 75 python3 benchmarks/gpt.py --config 100m --rounds "$ROUNDS" --modes eager --json "$OUT/gpt_eager.json"
stage gpt_compiled ${COMPILED_LIMIT:-150} python3 benchmarks/gpt.py --config 100m --rounds "$ROUNDS" --modes compiled \
  --precisions "$COMPILED" --budget $(( ${COMPILED_LIMIT:-150} - 60 )) --json "$OUT/gpt_compiled.json"
stage gpt_cudagraphs ${CUDAGRAPHS_LIMIT:-60} python3 benchmarks/gpt.py --config 100m --rounds "$ROUNDS" --modes cudagraphs \
  --precisions "fp16 sync-free" --json "$OUT/gpt_cudagraphs.json"
stage compiled_scaling ${SCALING_LIMIT:-120} python3 benchmarks/compiled_scaling.py --rounds 10 --steps 20 \
  --layers 6 --width 384 --seq 256 --batch 8 --optimizer "${SCALING_OPTIMIZER:-foreach}" --json "$OUT/compiled_scaling.json"
stage bench_mlp 40 python3 benchmarks/bench.py --device cuda --rounds "${MLP_ROUNDS:-30}" --json "$OUT/bench_mlp.json"
echo "== done after $((SECONDS - start))s"
