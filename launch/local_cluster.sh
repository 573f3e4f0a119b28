#!/usr/bin/env bash
# A two-node SLURM cluster on this machine, to try launch/slurm.sbatch before a real cluster (and for the tests).
#
#   launch/local_cluster.sh up   [DIR]   start munged, slurmctld and two slurmd (nodes n1, n2) with state in DIR
#   launch/local_cluster.sh down [DIR]   stop them (by the pids in DIR) and leave no process behind
#   launch/local_cluster.sh env  [DIR]   print the `export SLURM_CONF=...` line for sbatch, squeue, scontrol
#
# DIR defaults to $LOCAL_CLUSTER_DIR, else /tmp/proxygml-slurm. Both nodes are this machine (NodeAddr 127.0.0.1,
# one CPU each, their own ports, spool and log files); munge runs with its own key and socket in DIR, so nothing
# under /etc or /run is touched. `up` when the cluster already answers does nothing; `down` when nothing runs
# does nothing. Needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge) and root (SlurmdUser=root).
#
#   launch/local_cluster.sh up && eval "$(launch/local_cluster.sh env)"
#   sbatch --nodes 2 -o job.log launch/slurm.sbatch --config demo     # then: squeue, cat job.log
#   launch/local_cluster.sh down
set -euo pipefail

cmd="${1:-}"
DIR="${2:-${LOCAL_CLUSTER_DIR:-/tmp/proxygml-slurm}}"
CONF="$DIR/slurm.conf"
NODES=(n1 n2)

die() { echo "local_cluster.sh: $*" >&2; exit 2; }
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit "${1:-0}"; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pid_alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

answers() {  # the controller answers and both nodes are up (idle, allocated or mixed)
  [[ -f "$CONF" ]] || return 1
  local states
  states="$(SLURM_CONF="$CONF" timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null)" || return 1
  for n in "${NODES[@]}"; do
    grep -Eq "^$n (idle|alloc|mix|comp)" <<<"$states" || return 1
  done
}

write_conf() {
  local host ctl_port
  host="$(hostname)"
  ctl_port="$(free_port)"
  mkdir -p "$DIR/state" "$DIR/log"
  {
    echo "ClusterName=proxygml-local"
    echo "SlurmctldHost=$host"
    echo "AuthType=auth/munge"
    echo "AuthInfo=socket=$DIR/munge.socket,cred_expire=10"  # a requeued job may start again after 10 s (default 120)
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "StateSaveLocation=$DIR/state"
    echo "SlurmdSpoolDir=$DIR/spool-%n"
    echo "SlurmctldPidFile=$DIR/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/slurmd-%n.pid"
    echo "SlurmctldPort=$ctl_port"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SchedulerType=sched/backfill"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "ReturnToService=2"
    echo "JobRequeue=1"
    echo "MpiDefault=none"
    echo "KillWait=30"
    echo "MinJobAge=300"
    for n in "${NODES[@]}"; do
      echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$(free_port) CPUs=1 RealMemory=8000 State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF"
}

up() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null \
    || die "slurmctld or munged not found: apt-get install slurm-wlm munge"
  if pid_alive "$DIR/slurmctld.pid" && answers; then
    echo "local_cluster.sh: already up ($CONF)"
    return 0
  fi
  down >/dev/null 2>&1 || true  # a half-started cluster: start over
  mkdir -p "$DIR"
  chmod 700 "$DIR"
  if [[ ! -s "$DIR/munge.key" ]]; then
    dd if=/dev/urandom bs=1 count=1024 of="$DIR/munge.key" status=none
    chmod 400 "$DIR/munge.key"
  fi
  write_conf
  munged --force --key-file "$DIR/munge.key" --socket "$DIR/munge.socket" --pid-file "$DIR/munged.pid" \
    --log-file "$DIR/log/munged.log" --seed-file "$DIR/munge.seed"
  export SLURM_CONF="$CONF"
  slurmctld -c
  for n in "${NODES[@]}"; do
    slurmd -N "$n"
  done
  for _ in $(seq 1 60); do
    if answers; then
      echo "local_cluster.sh: up: nodes ${NODES[*]} idle; export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "local_cluster.sh: the cluster did not come up within 30 s; the logs:" >&2
  tail -n 5 "$DIR"/log/*.log >&2 || true
  down >/dev/null 2>&1 || true
  exit 1
}

ancestors() {  # this shell and its parents: never stopped by `down`
  local p=$$
  while [[ "$p" -gt 1 ]]; do
    echo "$p"
    p="$(awk '/^PPid:/ { print $2 }' "/proc/$p/status" 2>/dev/null || echo 1)"
  done
}

cluster_pids() {  # the daemons (pid files) and every process started with this cluster's SLURM_CONF: job steps,
  local f p skip  # their tasks and the tasks' children
  skip=" $(ancestors | tr '\n' ' ') "
  for f in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do
    pid_alive "$f" && echo "$(cat "$f")"
  done
  for f in /proc/[0-9]*; do
    p="${f#/proc/}"
    [[ "$skip" == *" $p "* ]] && continue
    if { tr '\0' '\n' <"$f/environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"; then echo "$p"; fi
  done
}

down() {
  [[ -d "$DIR" ]] || { echo "local_cluster.sh: nothing to stop ($DIR does not exist)"; return 0; }
  if pid_alive "$DIR/slurmctld.pid"; then  # cancel what still runs, so that no job step outlives the cluster
    SLURM_CONF="$CONF" timeout 10 scancel --full --quiet --signal=KILL --user="$(id -un)" 2>/dev/null || true
  fi
  local pids=() alive p
  mapfile -t pids < <(cluster_pids | sort -un)
  if ((${#pids[@]})); then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 40); do
      alive=0
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
      ((alive)) || break
      sleep 0.25
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    mapfile -t pids < <(cluster_pids)  # started meanwhile (a step that was launching)
    ((${#pids[@]})) && kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
  if pid_alive "$DIR/munged.pid"; then
    p="$(cat "$DIR/munged.pid")"
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$p" 2>/dev/null || true
  fi
  rm -f "$DIR"/*.pid
  echo "local_cluster.sh: down ($DIR)"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  -h|--help) usage 0 ;;
  *) usage 2 >&2 ;;
esac
