#!/usr/bin/env bash
#SBATCH --job-name=erpd-stage2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# Stage 2: distil the teacher cache into the student under the trust region.
#   CONFIG=configs/recipes/<recipe>.yaml sbatch [--nodes=N] scripts/slurm/stage2.sh [a.b=c ...]
# One task per GPU; knobs and preemption handling in common.sh; docs/cluster.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "${ERPD_ROOT:-${SLURM_SUBMIT_DIR:-.}}/scripts/slurm/common.sh"
erpd_setup
erpd_srun -m erpd_megatron.cli stage2 --config "${CONFIG:?set CONFIG=configs/recipes/<recipe>.yaml}" "$@"
