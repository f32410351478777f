#!/usr/bin/env bash
#SBATCH --job-name=erpd-cache
#SBATCH --nodes=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# Teacher cache: score the rollouts with the teacher(s), write the top-k cache shards (resumable).
#   sbatch --gpus-per-node=8 [--nodes=N] scripts/slurm/cache_teacher.sh configs/recipes/<recipe>.yaml [a.b=c ...]
# (or --gres=gpu:8; or CONFIG=... in the environment). One task per GPU; graceful stop:
# scancel --signal=USR1 --batch JOB (checkpoint, requeue); knobs in common.sh; docs/cluster.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "${ERPD_ROOT:-${SLURM_SUBMIT_DIR:-.}}/scripts/slurm/common.sh"
erpd_setup
REQUEUE_AFTER_USR1=${REQUEUE_AFTER_USR1:-1} # resumable: finished shards are kept
erpd_srun_cli cache "$@"
