#!/usr/bin/env bash
#SBATCH --job-name=erpd-rollout-finalize
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=8G
#SBATCH --time=01:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# Write the rollout set's manifest.json once every shard exists: one process, no GPU. Submit
# it after the fleet, so that no fleet task has to see the others' shards (NFS caching):
#   sbatch --dependency=afterok:ARRAY_JOB scripts/slurm/rollout_finalize.sh RECIPE.yaml [a.b=c ...]
# with the rollout job's recipe and overrides. It fails, naming the missing shards, when a
# slot did not finish: rerun those slots (sbatch --array=I,J rollout.sh ...), then this.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "${ERPD_ROOT:-${SLURM_SUBMIT_DIR:-.}}/scripts/slurm/common.sh"
erpd_setup
ERPD_TASKS_PER_NODE=1
erpd_srun_cli rollout "$@" --finalize
