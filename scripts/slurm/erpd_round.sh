#!/usr/bin/env bash
# Submit one ERPD round as a chain of Slurm jobs, each starting when the previous one
# succeeded (--dependency=afterok; a failure cancels the rest):
#   rollout (job array) -> finalize (manifest) -> stage1 -> cache -> stage2 -> evaluate
# and print "<step> <job id>" per line. Every job gets the same recipe (as its first
# argument, so SBATCH_EXPORT=NONE works) and overrides, so the steps find each other's
# outputs through the recipe (output_dir, ...). A broken chain is resumed with STEPS (the
# steps still to run) and AFTER (docs/cluster.md, "Dependencies").
#
#   CONFIG=configs/recipes/qwen3-8b-2node.yaml scripts/slurm/erpd_round.sh [a.b=c ...]
#
# Knobs (environment):
#   NODES            nodes of the training jobs (default: the recipe's parallel.num_nodes)
#   GPUS_PER_NODE    GPUs per node (default 8); one task per GPU; 0: CPU-only nodes
#   GRES             request GPUs as --gres=$GRES (e.g. gpu:8 or gpu:h100:8) instead of
#                    --gpus-per-node=$GPUS_PER_NODE, for sites that only know gres
#   TASKS_PER_NODE   tasks per node of stage1/cache/stage2 (default GPUS_PER_NODE, or 1 without GPUs)
#   ROLLOUT_ARRAY    array of the rollout fleet, one node each (default 0-3)
#   FLEET_SIZE       rollout fleet slots (default: the highest id of ROLLOUT_ARRAY + 1); keep it
#                    when rerunning some slots (ROLLOUT_ARRAY=1,3 FLEET_SIZE=4)
#   STEPS            the steps to submit, in order
#                    (default "rollout finalize stage1 cache stage2 evaluate"); with a one-slot
#                    fleet (FLEET_SIZE 1) submitted in the same call there is no finalize job:
#                    that slot finds every shard done and writes the manifest itself
#   AFTER            job id the first step waits for (e.g. the conversion job)
#   SBATCH_ARGS      extra sbatch arguments for every job (--account=..., --partition=..., --time=...)
#   LOG_DIR          job logs, <LOG_DIR>/<job name>-<job id>.out (default logs)
# plus those of common.sh (CONTAINER_IMAGE, MODULES, VENV, PYTHON, ...), passed on to the jobs.
set -euo pipefail
ERPD_ROOT=${ERPD_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
export ERPD_ROOT
cd "$ERPD_ROOT"
: "${CONFIG:?set CONFIG=configs/recipes/<recipe>.yaml}"
export CONFIG
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TASKS_PER_NODE=${TASKS_PER_NODE:-$((GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1))}
LOG_DIR=${LOG_DIR:-logs}
STEPS=${STEPS:-rollout finalize stage1 cache stage2 evaluate}
ROLLOUT_ARRAY=${ROLLOUT_ARRAY:-0-3}
if [[ -z ${FLEET_SIZE:-} ]]; then # the highest task id of "0-15", "1,3", "0-15:4%2" + 1
  FLEET_SIZE=0
  IFS=, read -ra parts <<<"${ROLLOUT_ARRAY%%%*}"
  for part in "${parts[@]}"; do
    [[ $part =~ ^([0-9]+)(-([0-9]+)(:([0-9]+))?)?$ ]] ||
      { echo "erpd_round: cannot read ROLLOUT_ARRAY=$ROLLOUT_ARRAY (e.g. 0-7 or 1,3); set FLEET_SIZE" >&2; exit 2; }
    a=${BASH_REMATCH[1]} b=${BASH_REMATCH[3]:-${BASH_REMATCH[1]}} st=${BASH_REMATCH[5]:-1}
    hi=$((a + (b - a) / st * st))
    ((hi + 1 > FLEET_SIZE)) && FLEET_SIZE=$((hi + 1))
  done
fi
export GPUS_PER_NODE FLEET_SIZE
mkdir -p "$LOG_DIR"

if [[ -z ${NODES:-} ]]; then
  py=${PYTHON:-python3}
  [[ -z ${PYTHON:-} && -x .venv/bin/python ]] && py=.venv/bin/python
  NODES=$("$py" -m erpd_megatron.cli config --config "$CONFIG" "$@" |
    awk '/^parallel:/ {p = 1; next} /^[^ ]/ {p = 0} p && $1 == "num_nodes:" {print $2}') ||
    NODES=
  [[ $NODES =~ ^[0-9]+$ ]] || { echo "erpd_round: cannot read parallel.num_nodes of $CONFIG; set NODES" >&2; exit 2; }
fi

# shellcheck disable=SC2206 # SBATCH_ARGS is a list of words
common=(--parsable --kill-on-invalid-dep=yes ${SBATCH_ARGS:-})
gpu=()
if [[ -n ${GRES:-} ]]; then
  gpu=(--gres="$GRES")
elif ((GPUS_PER_NODE > 0)); then
  gpu=(--gpus-per-node="$GPUS_PER_NODE")
fi
train=(--nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" "${gpu[@]}")
prev=${AFTER:-}
for step in $STEPS; do
  case $step in
    rollout) args=(--array="$ROLLOUT_ARRAY" "${gpu[@]}" --output="$LOG_DIR/%x-%A_%a.out" scripts/slurm/rollout.sh) ;;
    finalize)
      if ((FLEET_SIZE == 1)) && [[ " $STEPS " == *" rollout "* ]]; then
        echo "erpd_round: no finalize job: the one-slot rollout fleet writes the manifest" >&2
        continue
      fi
      args=(--output="$LOG_DIR/%x-%j.out" scripts/slurm/rollout_finalize.sh)
      ;;
    stage1 | stage2) args=("${train[@]}" --output="$LOG_DIR/%x-%j.out" "scripts/slurm/$step.sh") ;;
    cache) args=("${train[@]}" --output="$LOG_DIR/%x-%j.out" scripts/slurm/cache_teacher.sh) ;;
    evaluate) args=(--nodes=1 "${gpu[@]}" --output="$LOG_DIR/%x-%j.out" scripts/slurm/evaluate.sh) ;;
    *) echo "erpd_round: unknown step '$step' (rollout finalize stage1 cache stage2 evaluate)" >&2; exit 2 ;;
  esac
  id=$(sbatch "${common[@]}" ${prev:+--dependency=afterok:$prev} "${args[@]}" "$CONFIG" "$@")
  id=${id%%;*}
  echo "$step $id"
  prev=$id
done
echo "erpd_round: submitted; watch with: squeue -u ${USER:-$(id -un)}; logs in $LOG_DIR/" >&2
