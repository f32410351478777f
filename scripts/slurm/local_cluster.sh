#!/usr/bin/env bash
# A one-node Slurm cluster on this (Debian, root) machine, for the Slurm tests and for trying
# the launchers without a real cluster.
#
#   scripts/slurm/local_cluster.sh up       # install if missing, configure, start, wait for idle
#   eval "$(scripts/slurm/local_cluster.sh env)"   # export SLURM_CONF for sbatch/squeue/...
#   scripts/slurm/local_cluster.sh status   # daemons and sinfo; exit 0 only when usable
#   scripts/slurm/local_cluster.sh down     # cancel jobs, stop exactly the daemons `up` started
#
# Everything lives under ERPD_SLURM_DIR (default /tmp/erpd-slurm): slurm.conf, the munge key
# and socket, state, spool, logs and the recorded pids; /etc/slurm and the system munged are
# not touched. munged, slurmctld and slurmd run as root daemons; `down` kills the recorded
# pids (after checking each pid still runs that daemon), never by name. No cgroups (works in
# containers): proctrack/linuxproc, task/none, select/cons_tres over CPUs and memory.
# Requeued jobs may start again after cred_expire=10 s (Slurm's default is 120 s).
#
# Knobs: ERPD_SLURM_DIR, ERPD_SLURM_PORT (slurmctld; slurmd uses PORT+1; default 6817),
# ERPD_SLURM_PARTITION (default "local"), ERPD_SLURM_KEEP_LOGS=1 (down keeps DIR/log).
set -euo pipefail

DIR=${ERPD_SLURM_DIR:-/tmp/erpd-slurm}
PORT=${ERPD_SLURM_PORT:-6817}
PARTITION=${ERPD_SLURM_PARTITION:-local}
CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket
DAEMONS=(munged slurmctld slurmd)

say() { echo "local_cluster: $*" >&2; }
die() { say "$*"; exit 1; }

pid_of() { [[ -f $DIR/pids/$1 ]] && cat "$DIR/pids/$1"; }

# A recorded pid counts only while it still runs the daemon it was recorded for.
alive() {
  local pid
  pid=$(pid_of "$1") || return 1
  [[ -n $pid && -r /proc/$pid/comm ]] && [[ $(cat "/proc/$pid/comm") == "$1" ]]
}

install_packages() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || die "missing ${missing[*]} and not root: cannot apt-get install"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get (not Debian?)"
  say "installing ${missing[*]}"
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
}

write_config() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  [[ -n $mem ]] || mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024))
  : >"$DIR/plugstack.conf"
  cat >"$CONF" <<EOF
# Written by scripts/slurm/local_cluster.sh: a one-node cluster for tests.
ClusterName=erpd-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$((mem / cpus))
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
JobRequeue=1
MinJobAge=3600
KillWait=30
InactiveLimit=0
SlurmdTimeout=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

# Start a self-daemonising program and record the pid from its pid file.
start_daemon() {
  local name=$1 pidfile=$2
  shift 2
  rm -f "$pidfile"
  "$@" </dev/null >>"$DIR/log/$name.start" 2>&1 || {
    cat "$DIR/log/$name.start" >&2
    die "$name did not start (see $DIR/log/)"
  }
  for _ in $(seq 100); do
    [[ -s $pidfile ]] && break
    sleep 0.1
  done
  [[ -s $pidfile ]] || die "$name wrote no pid file $pidfile (see $DIR/log/)"
  tr -d ' \n' <"$pidfile" >"$DIR/pids/$name"
  alive "$name" || die "$name (pid $(pid_of "$name")) exited right after start (see $DIR/log/)"
  say "$name started, pid $(pid_of "$name")"
}

node_idle() { sinfo -h -N -o '%t' 2>/dev/null | grep -qx 'idle'; }

up() {
  if status >/dev/null 2>&1; then
    say "already up ($CONF)"
    return 0
  fi
  [[ $(id -u) == 0 ]] || die "must run as root (the daemons run as root)"
  local d
  for d in "${DAEMONS[@]}"; do
    alive "$d" && die "$d (pid $(pid_of "$d")) from an earlier 'up' still runs but the cluster is unusable; run 'down' first"
  done
  install_packages
  rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/pids"
  mkdir -p "$DIR"/{munge,state,spool,run,pids,log}
  chmod 0755 "$DIR"
  chmod 0700 "$DIR/munge"
  if [[ ! -s $DIR/munge/munge.key ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 0600 "$DIR/munge/munge.key"
  write_config
  export SLURM_CONF=$CONF

  start_daemon munged "$DIR/run/munged.pid" munged --force --socket="$SOCKET" \
    --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
  munge -n --socket="$SOCKET" | unmunge --socket="$SOCKET" >/dev/null ||
    die "munge round trip through $SOCKET failed (see $DIR/log/munged.log)"
  start_daemon slurmctld "$DIR/run/slurmctld.pid" slurmctld -f "$CONF"
  for _ in $(seq 60); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 0.5
  done
  scontrol ping | grep -q 'is UP' || die "slurmctld does not answer (see $DIR/log/slurmctld.log)"
  start_daemon slurmd "$DIR/run/slurmd.pid" slurmd -f "$CONF"
  for _ in $(seq 120); do
    node_idle && break
    sleep 0.5
  done
  node_idle || { sinfo -N >&2 || true; die "the node is not idle after 60 s (see $DIR/log/slurmd.log)"; }
  sinfo >&2
  say "up; use it with: export SLURM_CONF=$CONF"
}

status() {
  local d ok=0
  for d in "${DAEMONS[@]}"; do
    if alive "$d"; then echo "$d: running, pid $(pid_of "$d")"; else echo "$d: not running"; ok=1; fi
  done
  [[ -f $CONF ]] || { echo "no $CONF"; return 1; }
  ((ok == 0)) || return 1
  SLURM_CONF=$CONF sinfo -N -o '%N %P %t %c %m'
  SLURM_CONF=$CONF node_idle_or_busy
}

node_idle_or_busy() { sinfo -h -N -o '%t' 2>/dev/null | grep -Eqx 'idle|mix|alloc|comp'; }

stop_pid() {
  local name=$1 pid
  alive "$name" || { rm -f "$DIR/pids/$name"; return 0; }
  pid=$(pid_of "$name")
  kill -TERM "$pid"
  for _ in $(seq 100); do
    alive "$name" || break
    sleep 0.2
  done
  if alive "$name"; then
    say "$name (pid $pid) ignored SIGTERM for 20 s: SIGKILL"
    kill -KILL "$pid"
    sleep 0.5
  fi
  rm -f "$DIR/pids/$name"
  say "$name (pid $pid) stopped"
}

down() {
  export SLURM_CONF=$CONF
  if alive slurmctld; then
    local jobs
    jobs=$(squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086 # a list of job ids
      scancel $jobs || true
      for _ in $(seq 120); do
        [[ -z $(squeue -h -o '%A' 2>/dev/null) ]] && break
        sleep 0.5
      done
    fi
  fi
  stop_pid slurmd
  stop_pid slurmctld
  stop_pid munged
  if [[ ${ERPD_SLURM_KEEP_LOGS:-0} == 1 ]]; then
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/pids" "$DIR/munge" "$CONF" "$DIR/plugstack.conf"
  else
    rm -rf "$DIR"
  fi
  say "down"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
