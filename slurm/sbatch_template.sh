#!/usr/bin/env bash
# sbatch_template.sh - a plain sbatch job array over a prepared run directory, for those who prefer raw sbatch
# to `hpcrollout submit` (which builds the same array through submitit and adds requeue on timeout/preemption,
# automatic retries and job tracking for `hpcrollout status`).
#
#   hpcrollout shard --config big.yaml                    # once: validates the input, writes RUN_DIR/shards
#   sbatch --array=0-7 slurm/sbatch_template.sh RUN_DIR   # one array task per executor.num_tasks (here 8)
#   hpcrollout status RUN_DIR                             # progress, throughput, failed shards
#   sbatch --array=3,5 slurm/sbatch_template.sh RUN_DIR   # rerun unfinished tasks: each skips committed work
#   hpcrollout merge RUN_DIR --output out.parquet
#
# Task i runs shards i, i+N, i+2N, ... (N = executor.num_tasks in RUN_DIR/config.yaml); the array size must be N.
# Edit the resources below for your cluster (or pass them on the sbatch command line, which wins).
#SBATCH --job-name=hpcrollout
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=hpcrollout-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
##SBATCH --partition=gpu
##SBATCH --account=myproject
##SBATCH --qos=normal
##SBATCH --mem=64G
##SBATCH --constraint=a100
##SBATCH --exclusive
set -euo pipefail

RUN_DIR=${1:?usage: sbatch --array=0-N-1 slurm/sbatch_template.sh RUN_DIR}
TASK=${SLURM_ARRAY_TASK_ID:?submit this script as an array: sbatch --array=0-N-1 ...}

# setup: module loads, environment activation
# module load cuda/12.4
# source /path/to/venv/bin/activate

if [ -z "${HPCROLLOUT:-}" ]; then
  if command -v hpcrollout >/dev/null 2>&1; then HPCROLLOUT=hpcrollout; else HPCROLLOUT="${PYTHON:-python} -m hpcrollout"; fi
fi
export TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false  # log lines, not progress bars, in the job log
echo "[sbatch_template] $(date -u +%FT%TZ) task $TASK of job ${SLURM_ARRAY_JOB_ID:-?} on $(hostname), gpus ${CUDA_VISIBLE_DEVICES:-none}" >&2
# shellcheck disable=SC2086  # HPCROLLOUT may be "python -m hpcrollout"
exec $HPCROLLOUT worker "$RUN_DIR" --task "$TASK"
