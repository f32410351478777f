# shellcheck shell=bash
# Sourced by the sbatch scripts of this folder: the environment knobs and the one `srun`,
# with signal forwarding and requeue. See docs/cluster.md.
#
# Launch model: ONE TASK PER GPU. srun starts the job's tasks, one per GPU (the job's
# --ntasks-per-node); each task's rank, world size and local rank come from SLURM_PROCID /
# SLURM_NTASKS / SLURM_LOCALID, the rendezvous is MASTER_ADDR:MASTER_PORT on the first host
# of the allocation (erpd_megatron.runtime.distributed reads all of it). NCCL on GPUs, gloo
# without them: the same code path on a CPU test cluster.
#
# Knobs (environment; all optional except CONFIG):
#   CONFIG            recipe, e.g. configs/recipes/qwen3-8b-2node.yaml
#   ERPD_ROOT         the repository (default: the sbatch submit directory)
#   GPUS_PER_NODE     read by erpd_round.sh and rollout.sh; srun's tasks are the job's own
#                     (sbatch --nodes/--ntasks-per-node/--gpus-per-node choose them)
#   CONTAINER_IMAGE   run inside this image with pyxis/enroot (srun --container-image)
#   CONTAINER_MOUNTS  extra pyxis mounts, "src:dst[,src:dst]" (the repository is always mounted)
#   MODULES           environment modules to load first, e.g. "cuda/12.4 nccl"
#   VENV              virtualenv to activate (default ERPD_ROOT/.venv when it exists, no container)
#   PYTHON            interpreter (default: the venv's python, else python3; `python` in a container)
#   CPUS_PER_TASK     CPUs of each task (default: the node's CPUs / its tasks); also the
#                     default OMP_NUM_THREADS
#   SRUN_ARGS         extra srun arguments, e.g. "--cpu-bind=none"
#   TASK_EXIT_WAIT    seconds the other tasks may run on after the first one ended, then srun
#                     kills them (default 300: a crashed rank does not leave the rest hanging in
#                     a collective; 0 = no limit, for fleets of independent engines). Not
#                     --kill-on-bad-exit: that would kill ranks still exiting with code 17
#   REQUEUE_EXIT_CODE the trainer's checkpoint.exit_code_on_signal (default 17)
#   REQUEUE_ON_TERM   1: also requeue after SIGTERM (default 0: scancel means stop)
#   REQUEUE_AFTER_USR1 1: requeue after USR1 whatever the exit code, for steps that resume by
#                     skipping finished shards instead of checkpointing (rollout, cache)

erpd_log() { echo "[erpd-slurm $(date +%H:%M:%S)] $*"; }

# Resolve the repository, load modules, activate the venv and set the rendezvous address.
erpd_setup() {
  ERPD_ROOT=${ERPD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
  [[ -f $ERPD_ROOT/erpd_megatron/cli.py ]] ||
    { erpd_log "ERPD_ROOT=$ERPD_ROOT is not the repository: submit from its root or set ERPD_ROOT"; exit 2; }
  cd "$ERPD_ROOT" || exit 2
  if [[ -n ${MODULES:-} ]]; then
    type module >/dev/null 2>&1 ||
      { erpd_log "MODULES is set but this shell has no 'module' command"; exit 2; }
    # shellcheck disable=SC2086 # a list of module names
    module load $MODULES
  fi
  if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    PYTHON=${PYTHON:-python}
  else
    if [[ -z ${VENV:-} && -x $ERPD_ROOT/.venv/bin/python ]]; then
      VENV=$ERPD_ROOT/.venv
    fi
    if [[ -n ${VENV:-} ]]; then
      # shellcheck disable=SC1091 # the venv's own activate script
      source "$VENV/bin/activate"
      PYTHON=${PYTHON:-$VENV/bin/python}
    fi
    PYTHON=${PYTHON:-python3}
  fi
  if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    # A new port per requeue: the last run's sockets may linger in TIME_WAIT.
    MASTER_PORT=${MASTER_PORT:-$((10000 + (SLURM_JOB_ID + 7919 * ${SLURM_RESTART_COUNT:-0}) % 20000))}
    export MASTER_ADDR MASTER_PORT
  fi
  # Defaults only; docs/cluster.md explains them. A value set by the user wins.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export PYTHONUNBUFFERED=1
}

# Forwarded signal handler: remember the signal and pass it to the srun step, which passes it
# on to every task (the trainers checkpoint at the next step boundary).
_erpd_on_signal() {
  ERPD_SIGNAL=$1
  ERPD_INTERRUPTED=1
  erpd_log "SIG$1 received: forwarding to srun (pid ${ERPD_SRUN_PID:-none})"
  if [[ -n ${ERPD_SRUN_PID:-} ]]; then
    kill -s "$1" "$ERPD_SRUN_PID" 2>/dev/null || true
  fi
}

# erpd_srun ARGS...: one srun of "$PYTHON ARGS..." over the allocation, in the background so
# that the traps run; then requeue when the trainer checkpointed on a signal. Exits the script.
erpd_srun() {
  local rc=0 container=() tasks=() per_node=${ERPD_TASKS_PER_NODE:-}
  if [[ -n $per_node ]]; then
    tasks=(--ntasks-per-node="$per_node" --ntasks="$((per_node * ${SLURM_JOB_NUM_NODES:-1}))")
  fi
  # The node's CPUs shared out over its tasks (a step's task gets 1 CPU unless told).
  local tpn=${per_node:-${SLURM_NTASKS_PER_NODE:-}}
  if [[ -z $tpn && -n ${SLURM_TASKS_PER_NODE:-} ]]; then
    tpn=${SLURM_TASKS_PER_NODE%%[(,]*} # "8(x2)" or "8,4": the first node's
  fi
  local cpus=${CPUS_PER_TASK:-}
  if [[ -z $cpus && ${SLURM_CPUS_ON_NODE:-0} -gt 0 && ${tpn:-0} -gt 0 ]]; then
    cpus=$((SLURM_CPUS_ON_NODE / tpn > 0 ? SLURM_CPUS_ON_NODE / tpn : 1))
  fi
  [[ -n $cpus ]] && tasks+=(--cpus-per-task="$cpus")
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${cpus:-1}}
  if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    container=(--container-image="$CONTAINER_IMAGE"
      --container-mounts="$ERPD_ROOT:$ERPD_ROOT${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
      --container-workdir="$ERPD_ROOT")
  fi
  erpd_log "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
    "${tpn:-?} tasks/node x ${cpus:-?} CPUs, GPUs ${SLURM_GPUS_ON_NODE:-0}/node," \
    "master ${MASTER_ADDR:-?}:${MASTER_PORT:-?}"
  erpd_log "$PYTHON $*"
  ERPD_SIGNAL=
  trap '_erpd_on_signal USR1' USR1
  trap '_erpd_on_signal TERM' TERM
  # shellcheck disable=SC2086 # SRUN_ARGS is a list of words
  srun --kill-on-bad-exit=0 --wait="${TASK_EXIT_WAIT:-300}" "${tasks[@]}" ${SRUN_ARGS:-} "${container[@]}" "$PYTHON" "$@" &
  ERPD_SRUN_PID=$!
  local status first=1
  while :; do # a trap ends `wait` early while srun still runs: wait again
    ERPD_INTERRUPTED=0
    status=0
    wait "$ERPD_SRUN_PID" || status=$?
    # 127 on a second wait: the signal came just after srun's status was collected.
    ((first || status != 127)) && rc=$status
    first=0
    ((ERPD_INTERRUPTED)) || break
  done
  erpd_log "srun exited with $rc${ERPD_SIGNAL:+ after SIG$ERPD_SIGNAL}"
  local requeue=0
  if ((rc == ${REQUEUE_EXIT_CODE:-17})) && [[ $ERPD_SIGNAL != TERM || ${REQUEUE_ON_TERM:-0} == 1 ]]; then
    requeue=1
    erpd_log "checkpointed on a signal: requeueing job ${SLURM_JOB_ID}; it resumes from the checkpoint"
  elif ((rc != 0)) && [[ $ERPD_SIGNAL == USR1 && ${REQUEUE_AFTER_USR1:-0} == 1 ]]; then
    requeue=1
    erpd_log "stopped on USR1: requeueing job ${SLURM_JOB_ID}; it skips the finished shards"
  fi
  if ((requeue)); then
    # Slurm stops this run with SIGTERM as part of the requeue: ignore it from here on
    # (scontrol inherits the ignore and is not cut short either).
    trap '' TERM
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    erpd_log "scontrol requeue failed (submitted without --requeue, or requeue disabled?)"
  fi
  exit "$rc"
}
