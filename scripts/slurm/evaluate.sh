#!/usr/bin/env bash
#SBATCH --job-name=erpd-evaluate
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=06:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# Evaluation: accuracy / KL / entropy table of the round's checkpoints, in ONE process on one
# node that drives all its GPUs (vLLM tensor parallel: rollout.vllm_tensor_parallel_size=8).
# Evaluation does not split its work over tasks or nodes, so this script starts exactly one
# task and refuses --nodes > 1. No --signal/--requeue: it does not checkpoint, a requeue
# would start it over.
#   sbatch --gpus-per-node=8 scripts/slurm/evaluate.sh RECIPE.yaml [a.b=c ...]
# Sharded scoring of models too large for one GPU: with eval.scoring_backend=megatron on the
# command line (or EVAL_TASKS_PER_NODE=N) it starts one task per GPU instead; rank 0 generates
# as above, then every task scores at the recipe's parallel.* TP/PP from eval.models[].checkpoint
# (erpd_megatron/eval/mcore_scoring.py).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "${ERPD_ROOT:-${SLURM_SUBMIT_DIR:-.}}/scripts/slurm/common.sh"
erpd_setup
erpd_one_node evaluate.sh
eval_tasks=${EVAL_TASKS_PER_NODE-1} # "" (or a megatron scoring backend): one task per GPU
for arg in "$@"; do [[ $arg == *.scoring_backend=megatron ]] && eval_tasks=${EVAL_TASKS_PER_NODE:-}; done
ERPD_TASKS_PER_NODE=$eval_tasks TASK_EXIT_WAIT=${TASK_EXIT_WAIT:-0}
erpd_srun_cli evaluate "$@"
