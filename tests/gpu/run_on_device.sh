#!/usr/bin/env bash
# Everything one GPU-machine call does, after vLLM is installed in /tmp/site (../shared/gpu/README.md):
# environment facts, then the steps named on the command line, each with a share of the time limit,
# logs and figures under $OUT (at most 8 files come back, so few files are written there).
#
#   bash tests/gpu/run_on_device.sh tests variable          # pytest -m gpu, then the variable-length benchmark
#   bash tests/gpu/run_on_device.sh headline-a              # headline workload: raw vs hpcrollout
#   bash tests/gpu/run_on_device.sh headline-b              # headline workload: raw vs chunk-with-barrier
#   DEADLINE=570 bash tests/gpu/run_on_device.sh ...        # seconds the whole call may take (default 570)
#   DEADLINE=590 bash tests/gpu/run_on_device.sh multi-gpu  # on nvidia-h200-x2: multi-GPU tests, then benchmark
#
# Steps: tests | variable | variable-budget | variable-order | variable-400[-order|-wide] | headline-order | eos | eos-budget | headline-a | headline-b | headline-all |
#        headline-pace[3] (raw, paced hpcrollout[, unpaced]) | headline-fp8 | headline-aba | eos-aba | e2e (end_to_end.py: the seed-style script vs hpcrollout run) | check
#        multi-gpu (needs 2 GPUs, nvidia-h200-x2: tests/gpu/test_multi_gpu.py, then benchmarks/multi_gpu.py: 2x1 vs 1x2
#        vs raw TP=2, engine start TP=2 vs TP=1, compile cache of two engines at once) | multi-gpu-tests | multi-gpu-bench
set -uo pipefail
OUT=${OUT:-/tmp/hpcr-out}
DEADLINE=${DEADLINE:-570}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
CACHE=/tmp/hpcr-vllm-cache   # the compile cache every benchmark call on this machine shares
BENCH=(python3 -m hpcrollout.benchmarks.vllm_throughput --work_dir /tmp/hpcr-bench --cache_root "$CACHE")

[ -d /tmp/site/vllm ] || { echo "vLLM is not in /tmp/site: run .gpu/part3/install-on-device.sh first" >&2; exit 3; }
if ! python3 -c "import submitit" 2>/dev/null && ls .gpu/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, vllm, torch, transformers, pyarrow, pydantic; print('python', sys.version.split()[0], 'vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__, 'pydantic', pydantic.VERSION)"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

left() { echo $(( DEADLINE - SECONDS )); }
rc=0

run_tests() {
  local t=$(( $(left) - ${RESERVE:-0} ))
  local extra=()
  python3 -c "import pytest_timeout" 2>/dev/null && extra=(--timeout 240)
  echo "== pytest -m gpu (limit ${t}s)"
  HPCR_GPU_RESULTS="$OUT" timeout --signal=INT "$t" python3 -m pytest -m gpu tests/gpu -v -ra "${extra[@]}" 2>&1 \
    | tee "$OUT/pytest.log" | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|error" | tail -40
  local prc=${PIPESTATUS[0]}
  echo "pytest exit code: $prc" | tee -a "$OUT/pytest.log"
  if [ "$prc" -ne 0 ] && [ "$(left)" -gt $(( ${RESERVE:-0} + 120 )) ]; then
    # Tell a batch-invariance problem from a real failure: the failed tests again in vLLM's default mode.
    echo "== failed tests again with VLLM_BATCH_INVARIANT=0"
    VLLM_BATCH_INVARIANT=0 HPCR_GPU_RESULTS="$OUT" timeout --signal=INT $(( $(left) - ${RESERVE:-0} )) \
      python3 -m pytest -m gpu tests/gpu --lf -ra "${extra[@]}" > "$OUT/pytest-lf.log" 2>&1
    tail -5 "$OUT/pytest-lf.log"
  fi
  [ "$prc" -eq 0 ] || rc=1
}

run_multi_tests() {  # the multi-GPU tests only (the one-GPU suite is the tests step), leaving RESERVE for the benchmark
  local t=$(( $(left) - ${RESERVE:-0} ))
  local extra=()
  python3 -c "import pytest_timeout" 2>/dev/null && extra=(--timeout 240)
  echo "== pytest -m gpu tests/gpu/test_multi_gpu.py (limit ${t}s)"
  HPCR_GPU_RESULTS="$OUT" timeout --signal=INT "$t" python3 -m pytest -m gpu tests/gpu/test_multi_gpu.py -v -ra "${extra[@]}" \
    > "$OUT/pytest-multi-gpu.log" 2>&1
  local prc=$?
  grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|error" "$OUT/pytest-multi-gpu.log" | tail -20
  echo "pytest exit code: $prc" | tee -a "$OUT/pytest-multi-gpu.log"
  if [ "$prc" -ne 0 ] && [ "$(left)" -gt $(( ${RESERVE:-0} + 120 )) ]; then  # batch invariance under TP=2, or a real failure?
    echo "== failed multi-GPU tests again with VLLM_BATCH_INVARIANT=0"
    VLLM_BATCH_INVARIANT=0 timeout --signal=INT $(( $(left) - ${RESERVE:-0} )) python3 -m pytest -m gpu \
      tests/gpu/test_multi_gpu.py --lf -ra "${extra[@]}" >> "$OUT/pytest-multi-gpu.log" 2>&1
    tail -5 "$OUT/pytest-multi-gpu.log"
  fi
  [ "$prc" -eq 0 ] || rc=1
}

run_multi_bench() {  # three fresh processes on one empty compile cache, each given what is left of the call
  local t; t=$(left)
  echo "== benchmark multi-gpu (limit ${t}s)"
  timeout --signal=INT "$t" python3 -m hpcrollout.benchmarks.multi_gpu --work_dir /tmp/hpcr-multi-gpu \
    --deadline_s $(( t - 15 )) --out "$OUT/multi-gpu.json" > "$OUT/multi-gpu.log" 2>&1 || rc=1
  grep -vE "^\s*$" "$OUT/multi-gpu.log" | grep -E "^multi-gpu|^way|^2x1|^1x2|^raw-tp2|^engine start|^compile cache|Error|error" | tail -20
}

run_bench() {  # NAME ARGS...
  local name=$1; shift
  local t; t=$(left)
  echo "== benchmark $name (limit ${t}s): $*"
  timeout --signal=INT "$t" "${BENCH[@]}" "$@" --out "$OUT/bench-$name.json" > "$OUT/bench-$name.log" 2>&1
  local brc=$?
  grep -vE "^\s*$" "$OUT/bench-$name.log" | grep -E "workload|engine start|^way|^raw|^hpcrollout|^chunk|Error|error" | tail -20
  [ "$brc" -eq 0 ] || { echo "benchmark $name exit code $brc; log tail:"; tail -30 "$OUT/bench-$name.log"; rc=1; }
}

# Tests followed by a benchmark leave it enough time (an engine start plus three ways of the variable workload).
after_tests=0
for step in "$@"; do
  [ "$step" = tests ] && after_tests=1 && continue
  [ "$after_tests" = 1 ] && case "$step" in variable*|headline*|eos*) RESERVE=${RESERVE:-330} ;; esac
done
# multi-gpu: its tests leave the benchmark about 390 s (three fresh processes, two of them compiling)
case " $* " in *" multi-gpu "*) RESERVE=$(( ${RESERVE:-0} + 390 )) ;; esac
for step in "$@"; do
  case "$step" in
    check) python3 -c "from hpcrollout.engines.vllm_engine import VllmEngine; print('import ok')" ;;
    tests) run_tests ;;
    variable) run_bench variable --workload variable --ways raw,hpcrollout,chunk ;;
    variable-budget) run_bench variable-budget --workload variable --ways raw,hpcrollout,hpcrollout:none,raw,hpcrollout ;;
    variable-order) run_bench variable-order --workload variable --ways raw,hpcrollout,hpcrollout:fifo,raw,hpcrollout,hpcrollout:fifo ;;
    variable-400) run_bench variable-400 --workload variable --prompts 400 --ways raw,hpcrollout ;;
    variable-400-wide) run_bench variable-400-wide --workload variable --prompts 400 --max_num_seqs 2048 --ways raw,hpcrollout ;;
    variable-400-order) run_bench variable-400-order --workload variable --prompts 400 --ways raw,hpcrollout:fifo,hpcrollout:none+fifo ;;
    headline-order) run_bench headline-order --workload headline --ways raw,hpcrollout:fifo,hpcrollout:none+fifo ;;
    eos) run_bench eos --workload eos --ways raw,hpcrollout ;;
    eos-budget) run_bench eos-budget --workload eos --ways raw,hpcrollout,hpcrollout:none ;;
    variable-x2) run_bench variable-x2 --workload variable --ways hpcrollout,raw,hpcrollout,raw,chunk ;;
    headline-a) run_bench headline-a --workload headline --ways raw,hpcrollout ;;
    headline-b) run_bench headline-b --workload headline --ways raw,chunk ;;
    headline-all) run_bench headline-all --workload headline --ways raw,hpcrollout,chunk ;;
    headline-fp8) run_bench headline-fp8 --workload headline --ways raw,hpcrollout --kv_cache_dtype fp8 ;;
    headline-pace) run_bench headline-pace --workload headline --ways raw,hpcrollout ;;
    headline-pace3) run_bench headline-pace3 --workload headline --ways raw,hpcrollout,hpcrollout:nopace ;;
    headline-aba) run_bench headline-aba --workload headline --ways raw,hpcrollout,raw ;;
    eos-aba) run_bench eos-aba --workload eos --ways raw,hpcrollout,raw ;;
    multi-gpu) run_multi_tests; run_multi_bench ;;
    multi-gpu-tests) run_multi_tests ;;
    multi-gpu-bench) run_multi_bench ;;
    e2e) echo "== end to end (limit $(left)s)"
         timeout --signal=INT "$(left)" python3 -m hpcrollout.benchmarks.end_to_end --work_dir /tmp/hpcr-e2e \
           --cache_root "$CACHE" --out "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1 || rc=1
         grep -vE "^\s*$" "$OUT/e2e.log" | grep -E "^end to end|^way|^script|^hpcrollout|says|Error|error" | tail -20 ;;
    *) echo "unknown step $step" >&2; rc=2 ;;
  esac
done
echo "done in ${SECONDS}s, exit $rc"
exit $rc
