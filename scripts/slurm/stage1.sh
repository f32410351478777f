#!/usr/bin/env bash
#SBATCH --job-name=erpd-stage1
#SBATCH --nodes=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# Stage 1: train the teacher(s) on the fixed rollouts (checkpoints, resumes, requeues).
#   sbatch --gpus-per-node=8 [--nodes=N] scripts/slurm/stage1.sh configs/recipes/<recipe>.yaml [a.b=c ...]
# (or --gres=gpu:8; or CONFIG=... in the environment). One task per GPU; graceful stop:
# scancel --signal=USR1 --batch JOB (checkpoint, requeue); knobs in common.sh; docs/cluster.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "${ERPD_ROOT:-${SLURM_SUBMIT_DIR:-.}}/scripts/slurm/common.sh"
erpd_setup
erpd_srun_cli stage1 "$@"
