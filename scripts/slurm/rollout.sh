#!/usr/bin/env bash
#SBATCH --job-name=erpd-rollout
#SBATCH --array=0-3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
# Rollouts with a vLLM fleet: each array task is one node and one fleet slot (its array task
# id); srun starts one engine per node (or per GPUS_PER_ENGINE GPUs); every engine writes its
# own Parquet shards; rerunning a slot (or a requeue) skips its finished shards. The fleet
# size is FLEET_SIZE, else the array's highest task id + 1, so `--array=1,3` reruns slots 1
# and 3 of 4. The manifest is written by rollout_finalize.sh (afterok on the array).
#   sbatch --gpus-per-node=8 [--array=0-15] scripts/slurm/rollout.sh RECIPE.yaml [a.b=c ...]
# GPUS_PER_ENGINE=2 (with GPUS_PER_NODE, default 8): 4 engines per node; set
# rollout.vllm_tensor_parallel_size to the same. Knobs in common.sh; docs/cluster.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "${ERPD_ROOT:-${SLURM_SUBMIT_DIR:-.}}/scripts/slurm/common.sh"
erpd_setup
ERPD_TASKS_PER_NODE=1 # one engine per node, on all its GPUs
if [[ -n ${GPUS_PER_ENGINE:-} ]]; then
  ERPD_TASKS_PER_NODE=$((${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}} / GPUS_PER_ENGINE))
  SRUN_ARGS="--gpus-per-task=$GPUS_PER_ENGINE ${SRUN_ARGS:-}"
fi
[[ -z ${FLEET_SIZE:-} ]] || export ERPD_FLEET_SIZE=$FLEET_SIZE # read by erpd rollout
REQUEUE_AFTER_USR1=${REQUEUE_AFTER_USR1:-1} TASK_EXIT_WAIT=${TASK_EXIT_WAIT:-0} # resumable; independent engines
erpd_srun_cli rollout "$@"
