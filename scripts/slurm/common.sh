# shellcheck shell=bash
# Sourced by the sbatch scripts of this folder: the environment knobs, the rendezvous and the
# one `srun`, with the graceful-stop signal (USR1) and requeue. See docs/cluster.md.
#
# Launch model: ONE TASK PER GPU. srun starts the job's tasks, one per GPU; each task's rank,
# world size and local rank come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the
# rendezvous is MASTER_ADDR:MASTER_PORT on the first host of the allocation
# (erpd_megatron.runtime.distributed.parse_launch_env reads all of it). NCCL on GPUs, gloo
# without them: the same code path on a CPU test cluster.
#
# Signals. USR1 is the graceful stop: `scancel --signal=USR1 --batch JOB`, or Slurm itself
# before the time limit (`#SBATCH --signal=B:USR1@300`), signals this batch shell, which
# forwards USR1 to srun; srun passes USR1 on to every task (src/srun/libsrun/srun_job.c,
# _srun_signal_mgr: any signal but INT/QUIT/TERM/HUP/CONT/PIPE/ALRM goes to the tasks); the
# trainer checkpoints at the next step boundary and exits 17; this script requeues.
# TERM is never forwarded: srun answers SIGTERM with "forcing job termination" and SIGKILL
# to every task (same function: case SIGTERM -> launch_g_fwd_signal(SIGKILL)). A plain
# `scancel` or a preemption without a user signal sends TERM to the whole job at once, srun
# included, so it is a hard kill whatever we do here: the periodic checkpoints
# (checkpoint.save_interval) bound what it loses.
#
# Knobs (environment; all optional):
#   CONFIG            recipe, e.g. configs/recipes/qwen3-8b-2node.yaml; or the script's first
#                     argument (`sbatch stage1.sh RECIPE.yaml a.b=c`, works with --export=NONE)
#   ERPD_ROOT         the repository (default: the sbatch submit directory)
#   GPUS_PER_NODE     GPUs per node when Slurm does not say (no gres): sets the tasks per node
#                     of the training scripts (default: SLURM_GPUS_ON_NODE); 0 = CPU-only (the
#                     job's --ntasks-per-node tasks); a training job without either is refused
#   TASKS_PER_NODE    tasks per node of the training scripts (default: one per GPU, else the
#                     job's --ntasks-per-node)
#   CONTAINER_IMAGE   run inside this image with pyxis/enroot (srun --container-image), e.g.
#                     nvcr.io#nvidia/pytorch:25.01-py3 or a squashfs file /images/erpd.sqsh
#   CONTAINER_MOUNTS  extra pyxis mounts, "src:dst[,src:dst]" (the repository is always mounted)
#   MODULES           environment modules to load first, e.g. "cuda/12.4 nccl"
#   VENV              virtualenv to activate (default ERPD_ROOT/.venv when it exists, no container)
#   PYTHON            interpreter (default: the venv's python, else python3; `python` in a container)
#   CPUS_PER_TASK     CPUs of each task (default: the node's CPUs / its tasks); also the
#                     default OMP_NUM_THREADS
#   SRUN_ARGS         extra srun arguments, e.g. "--cpu-bind=none"
#   ERPD_MASTER_ADDR, ERPD_MASTER_PORT  explicit rendezvous (default: computed, see below)
#   TASK_EXIT_WAIT    seconds the other tasks may run on after the first one ended, then srun
#                     kills them (default 300: a crashed rank does not leave the rest hanging in
#                     a collective; 0 = no limit, for fleets of independent engines). Not
#                     --kill-on-bad-exit: that would kill ranks still exiting with code 17
#   REQUEUE_EXIT_CODE the trainer's checkpoint.exit_code_on_signal (default 17)
#   REQUEUE_AFTER_USR1 1: requeue after USR1 whatever the exit code, for steps that resume by
#                     skipping finished shards instead of checkpointing (rollout, cache)

erpd_log() { echo "[erpd-slurm $(date +%H:%M:%S)] $*"; }

# A rendezvous port for this job (and restart: the last run's sockets may linger in
# TIME_WAIT) outside the node's ephemeral port range, from which the kernel hands out the
# source ports of outgoing connections (Linux default 32768-60999): a port in that range
# can already be taken by any connection of any process on the master node. torchtitan's
# multinode_trainer.slurm uses a fixed 29500, which collides when two jobs share a node.
erpd_master_port() {
  local lo=32768 hi=60999 base span
  if [[ -r /proc/sys/net/ipv4/ip_local_port_range ]]; then
    read -r lo hi </proc/sys/net/ipv4/ip_local_port_range || true
  fi
  if ((lo > 30000)); then
    base=20000 span=10000 # 20000-29999, below the range
  elif ((lo - 1024 >= 65535 - hi)); then
    base=1024 span=$((lo - 1024))
  else
    base=$((hi + 1)) span=$((65535 - hi))
  fi
  ((span > 0)) || span=1
  echo $((base + (${SLURM_JOB_ID:-0} + 7919 * ${SLURM_RESTART_COUNT:-0}) % span))
}

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
    # Computed values win over MASTER_ADDR/MASTER_PORT inherited from the submit shell (sbatch
    # exports the whole environment by default); ERPD_MASTER_* are the explicit overrides.
    # ERPD_MASTER_JOB tells parse_launch_env that these were set for this job.
    MASTER_ADDR=${ERPD_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    MASTER_PORT=${ERPD_MASTER_PORT:-$(erpd_master_port)}
    ERPD_MASTER_JOB=${SLURM_JOB_ID:-}
    export MASTER_ADDR MASTER_PORT ERPD_MASTER_JOB
  fi
  # Defaults only; docs/cluster.md explains them. A value set by the user wins.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export PYTHONUNBUFFERED=1
}

# erpd_one_node WHAT: refuse an allocation of more than one node (for steps that do not split
# their work over nodes).
erpd_one_node() {
  if ((${SLURM_JOB_NUM_NODES:-1} > 1)); then
    erpd_log "$1 runs one process on one node (it does not split its work over nodes);" \
      "this job has ${SLURM_JOB_NUM_NODES} nodes: submit it with --nodes=1"
    exit 2
  fi
}

# USR1 handler: remember it and pass it to the srun step, which passes it on to every task.
_erpd_on_usr1() {
  ERPD_SIGNAL=USR1
  ERPD_INTERRUPTED=1
  erpd_log "SIGUSR1 received: forwarding to srun (pid ${ERPD_SRUN_PID:-none}); the tasks stop gracefully"
  if [[ -n ${ERPD_SRUN_PID:-} ]]; then
    kill -s USR1 "$ERPD_SRUN_PID" 2>/dev/null || true
  fi
}

# TERM handler: not forwarded (srun would SIGKILL the tasks at once); the job is being
# cancelled or preempted and Slurm signals every process of it itself.
_erpd_on_term() {
  ERPD_SIGNAL=TERM
  ERPD_INTERRUPTED=1
  erpd_log "SIGTERM received: the job is cancelled or preempted (a hard stop; not requeued)." \
    "It resumes from the last periodic checkpoint when resubmitted; for a graceful stop use" \
    "scancel --signal=USR1 --batch ${SLURM_JOB_ID:-JOBID}"
}

# erpd_srun ARGS...: one srun of "$PYTHON ARGS..." over the allocation, in the background so
# that the traps run; then requeue when the trainer checkpointed on a signal. Exits the script.
erpd_srun() {
  local rc=0 container=() tasks=() per_node=${ERPD_TASKS_PER_NODE:-${TASKS_PER_NODE:-}}
  local gpus=${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE:-}}
  if [[ -z $gpus && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    local devs=${CUDA_VISIBLE_DEVICES//[^,]/}
    gpus=$((${#devs} + 1))
  fi
  # One task per GPU unless the script or TASKS_PER_NODE says otherwise: `--gres=gpu:4` and
  # `--gpus-per-node=4` sites alike get 4 tasks per node without editing the scripts.
  if [[ -z $per_node ]]; then
    if ((${gpus:-0} > 0)); then
      per_node=$gpus
    elif [[ -z $gpus ]]; then
      erpd_log "no GPUs in this allocation (SLURM_GPUS_ON_NODE is unset): pass --gpus-per-node=N" \
        "or --gres=gpu:N to sbatch, or set GPUS_PER_NODE=N where Slurm does not manage the" \
        "GPUs; GPUS_PER_NODE=0 runs on CPUs with the job's --ntasks-per-node tasks"
      exit 2
    fi
  fi
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
    # pyxis: a registry image is written "nvcr.io#nvidia/pytorch:TAG" (registry#image), a
    # squashfs file (enroot import) by its path. --no-container-mount-home: a ~/.local
    # site-packages from the host must not shadow the image's torch (NeMo-RL's ray.sub does
    # the same).
    container=(--container-image="$CONTAINER_IMAGE" --no-container-mount-home
      --container-mounts="$ERPD_ROOT:$ERPD_ROOT${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
      --container-workdir="$ERPD_ROOT")
  fi
  erpd_log "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
    "${tpn:-?} tasks/node x ${cpus:-?} CPUs, GPUs ${gpus:-0}/node," \
    "master ${MASTER_ADDR:-?}:${MASTER_PORT:-?}"
  erpd_log "$PYTHON $*"
  ERPD_SIGNAL=
  trap _erpd_on_usr1 USR1
  trap _erpd_on_term TERM
  # --export=ALL: a job submitted with --export=NONE sets SLURM_EXPORT_ENV=NONE, which srun
  # would inherit and then start the tasks without MASTER_ADDR, PYTHONPATH, ... (sbatch(1),
  # --export=NONE).
  # shellcheck disable=SC2086 # SRUN_ARGS is a list of words
  srun --export=ALL --kill-on-bad-exit=0 --wait="${TASK_EXIT_WAIT:-300}" "${tasks[@]}" ${SRUN_ARGS:-} \
    "${container[@]}" "$PYTHON" "$@" &
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
  if [[ $ERPD_SIGNAL == TERM ]]; then
    requeue=0 # cancelled or preempted: Slurm decides (a preempted job is requeued by Slurm)
  elif ((rc == ${REQUEUE_EXIT_CODE:-17})); then
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

# erpd_srun_cli COMMAND [RECIPE.yaml | --config RECIPE] [a.b=c ...]: `erpd COMMAND` through
# erpd_srun. The recipe comes from the first argument when it is one, else from CONFIG.
erpd_srun_cli() {
  local cmd=$1
  shift
  case ${1:-} in
    --config) CONFIG=${2:-}; shift 2 || shift ;;
    --config=*) CONFIG=${1#--config=}; shift ;;
    *=*) ;; # an override (a.b=c.yaml), not a recipe
    *.yaml | *.yml) CONFIG=$1; shift ;;
  esac
  if [[ -z ${CONFIG:-} ]]; then
    erpd_log "no recipe: sbatch ${SLURM_JOB_NAME:-<script>} configs/recipes/<recipe>.yaml [a.b=c ...]" \
      "(or CONFIG=configs/recipes/<recipe>.yaml in the environment)"
    exit 2
  fi
  erpd_srun -m erpd_megatron.cli "$cmd" --config "$CONFIG" "$@"
}
