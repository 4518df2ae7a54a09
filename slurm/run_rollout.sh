#!/usr/bin/env bash
# run_rollout.sh - the seed's environment-variable launcher, now resumable: one `hpcrollout run` (shard,
# generate, merge) on the GPUs of this allocation. Use it inside sbatch/srun, or on any GPU machine:
#
#   MODEL_PATH=/models/Qwen3-4B INPUT_PATH=prompts.parquet OUTPUT_PATH=out.parquet N_SAMPLES=8 \
#     sbatch --gres=gpu:4 --cpus-per-task=16 --time=08:00:00 slurm/run_rollout.sh
#
# Rerunning the same command after a crash, timeout or preemption continues from the last checkpoint in
# RUN_DIR (default: OUTPUT_PATH without .parquet, plus .run). For many nodes use `hpcrollout submit` instead
# (a SLURM array with requeue on timeout), or slurm/sbatch_template.sh for a raw sbatch array.
#
# Required: MODEL_PATH INPUT_PATH OUTPUT_PATH
# Optional (default: hpcrollout's): N_SAMPLES MAX_TOKENS TEMPERATURE TOP_P TOP_K MIN_P SEED BACKEND
#   (vllm|transformers) TP_SIZE (default: the GPUs of the allocation) GPU_MEMORY_UTILIZATION MAX_MODEL_LEN
#   MAX_NUM_SEQS RUN_DIR CONFIG (a YAML file for any other key) NUM_TASKS (engines on this node, e.g. 4 with
#   TP_SIZE=1 on 4 GPUs) EXTRA_ARGS (more flags, e.g. "--set sampling.stop=['###']")
#   HPCROLLOUT (the command; default: hpcrollout, or python -m hpcrollout when not installed)
#SBATCH --job-name=hpcrollout
#SBATCH --output=hpcrollout-%j.out
#SBATCH --signal=B:TERM@120
set -euo pipefail

: "${MODEL_PATH:?set MODEL_PATH (model directory or name)}"
: "${INPUT_PATH:?set INPUT_PATH (Parquet file with a prompt column)}"
: "${OUTPUT_PATH:?set OUTPUT_PATH (merged output Parquet file)}"

if [ -z "${HPCROLLOUT:-}" ]; then
  if command -v hpcrollout >/dev/null 2>&1; then HPCROLLOUT=hpcrollout; else HPCROLLOUT="${PYTHON:-python} -m hpcrollout"; fi
fi

args=(run --model_path "$MODEL_PATH" --input "$INPUT_PATH" --output "$OUTPUT_PATH")
add() { if [ -n "${2:-}" ]; then args+=("$1" "$2"); fi; }
add --n_samples "${N_SAMPLES:-}"
add --max_tokens "${MAX_TOKENS:-}"
add --temperature "${TEMPERATURE:-}"
add --top_p "${TOP_P:-}"
add --top_k "${TOP_K:-}"
add --min_p "${MIN_P:-}"
add --seed "${SEED:-}"
add --backend "${BACKEND:-}"
add --tensor_parallel_size "${TP_SIZE:-}"
add --gpu_memory_utilization "${GPU_MEMORY_UTILIZATION:-}"
add --max_model_len "${MAX_MODEL_LEN:-}"
add --max_num_seqs "${MAX_NUM_SEQS:-}"
add --run_dir "${RUN_DIR:-}"
add --config "${CONFIG:-}"
add --num_tasks "${NUM_TASKS:-}"
add --parallelism "${NUM_TASKS:-}"
# shellcheck disable=SC2206  # EXTRA_ARGS is split on purpose
[ -n "${EXTRA_ARGS:-}" ] && args+=($EXTRA_ARGS)

echo "[run_rollout] $(date -u +%FT%TZ) on $(hostname) job ${SLURM_JOB_ID:-none} gpus ${CUDA_VISIBLE_DEVICES:-none}" >&2
echo "[run_rollout] $HPCROLLOUT ${args[*]}" >&2
# exec: SLURM's TERM (sent 120 s before the time limit by --signal above) reaches hpcrollout directly; what it
# committed stays, and the same command continues it.
# shellcheck disable=SC2086  # HPCROLLOUT may be "python -m hpcrollout"
exec $HPCROLLOUT "${args[@]}"
