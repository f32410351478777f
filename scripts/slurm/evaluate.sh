#!/usr/bin/env bash
#SBATCH --job-name=erpd-evaluate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=06:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# Evaluation: accuracy / KL / entropy table of the round's checkpoints.
#   CONFIG=configs/recipes/<recipe>.yaml sbatch [--nodes=N] scripts/slurm/evaluate.sh [a.b=c ...]
# One process per node on all its GPUs (GPUS_PER_NODE=8 with --ntasks-per-node=8: one per GPU).
# Knobs and preemption handling in common.sh; docs/cluster.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "${ERPD_ROOT:-${SLURM_SUBMIT_DIR:-.}}/scripts/slurm/common.sh"
erpd_setup
TASK_EXIT_WAIT=${TASK_EXIT_WAIT:-0} # independent engines finish at different times
erpd_srun -m erpd_megatron.cli evaluate --config "${CONFIG:?set CONFIG=configs/recipes/<recipe>.yaml}" "$@"
