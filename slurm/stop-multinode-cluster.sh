#!/usr/bin/env bash
# stop-multinode-cluster.sh - stop the namespaced multi-node test cluster (start-multinode-cluster.sh) and remove
# its namespaces, veth pairs and bridge. stop-test-cluster.sh calls it. Jobs are cancelled first; daemons are
# stopped by pidfile PID, checked against the process name. Safe to run when nothing is running.
#   --purge  also wipe its state, spool and logs
set -uo pipefail
NODES_MAX=16
ETC=/etc/slurm-multi
LIB=/var/lib/slurm-multi
LOG=/var/log/slurm-multi
RUN=/run/slurm-multi
BRIDGE=hrmbr0
PURGE=0
for a in "$@"; do case "$a" in --purge) PURGE=1 ;; --all) ;; *) echo "unknown arg $a" >&2; exit 2 ;; esac; done
log() { echo "[test-slurm-multi $(date +%T)] $*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
export SLURM_CONF=$ETC/slurm.conf

alive() {  # alive PID COMM
  local st
  st=$(sed -E 's/^[0-9]+ \((.*)\) (.).*/\1 \2/' "/proc/$1/stat" 2>/dev/null) || return 1
  [ "${st##* }" != Z ] && [ "${st% *}" = "$2" ]
}
stop_pidfile() {  # stop_pidfile PIDFILE COMM
  local pid
  [ -s "$1" ] || return 0
  pid=$(tr -dc '0-9' < "$1")
  if [ -n "$pid" ] && alive "$pid" "$2"; then
    log "stopping $2 (pid $pid, $1)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 80); do alive "$pid" "$2" || break; sleep 0.25; done
    alive "$pid" "$2" && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$1"
}

if [ -f "$SLURM_CONF" ] && scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 80); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.25; done
  fi
fi
for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f" slurmd; done
stop_pidfile "$RUN/slurmctld.pid" slurmctld

# job processes left in a namespace (slurmd dead before its steps ended): by PID, found by their netns
for i in $(seq 1 "$NODES_MAX"); do
  ns=hrns$i
  ip netns list 2>/dev/null | grep -qw "^$ns" || continue
  pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
  if [ -n "${pids// /}" ]; then
    log "killing processes left in $ns: $pids"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null
  fi
  ip link del "hrmv$i" 2>/dev/null || true  # removes its peer in the namespace too
  ip netns del "$ns" && log "removed network namespace $ns"
  sed -i -E "/^10\.231\.0\.[0-9]+[[:space:]]+hrn$i\$/d" /etc/hosts
done
if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE" && log "removed bridge $BRIDGE"; fi
sed -i -E '/^10\.231\.0\.1[[:space:]]+hrmctl$/d' /etc/hosts
if [ "$PURGE" = 1 ]; then
  log "purging multi-node state, spool and logs"
  rm -rf "${LIB:?}"/slurmctld/* "$LIB"/slurmd-* "${LOG:?}"/*
fi
log "multi-node cluster stopped"
