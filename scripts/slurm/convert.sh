#!/usr/bin/env bash
#SBATCH --job-name=erpd-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# Checkpoint conversion (HF <-> megatron-core) in one process; no GPU needed. Arguments go
# to tools/convert_checkpoint.py unchanged:
#   sbatch scripts/slurm/convert.sh hf-to-mcore --hf-dir HF_DIR --out CKPT_DIR --tp 2 --pp 1
#   sbatch scripts/slurm/convert.sh mcore-to-hf --ckpt CKPT_DIR --out HF_DIR
# Knobs in common.sh (CONFIG is not used); docs/cluster.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "${ERPD_ROOT:-${SLURM_SUBMIT_DIR:-.}}/scripts/slurm/common.sh"
erpd_setup
ERPD_TASKS_PER_NODE=1
erpd_srun tools/convert_checkpoint.py "$@"
