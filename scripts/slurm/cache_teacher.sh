#!/usr/bin/env bash
#SBATCH --job-name=erpd-cache
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# Teacher cache: score the rollouts with the teacher(s), write the top-k cache shards (resumable).
#   CONFIG=configs/recipes/<recipe>.yaml sbatch [--nodes=N] scripts/slurm/cache_teacher.sh [a.b=c ...]
# One task per GPU; knobs and preemption handling in common.sh; docs/cluster.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "${ERPD_ROOT:-${SLURM_SUBMIT_DIR:-.}}/scripts/slurm/common.sh"
erpd_setup
REQUEUE_AFTER_USR1=${REQUEUE_AFTER_USR1:-1} # resumable: finished shards are kept
erpd_srun -m erpd_megatron.cli cache --config "${CONFIG:?set CONFIG=configs/recipes/<recipe>.yaml}" "$@"
