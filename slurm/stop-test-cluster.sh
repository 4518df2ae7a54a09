#!/usr/bin/env bash
# stop-test-cluster.sh - stop the single-node test cluster started by start-test-cluster.sh.
# 1. cancels all jobs (scancel; if slurmctld is already dead, kills the job processes
#    listed by `scontrol listpids` and the slurmstepd owning each step socket in the
#    slurmd spool dir - all by exact PID);
# 2. stops slurmd, slurmctld, slurmdbd, mariadbd, munged - only those that
#    start-test-cluster.sh started (recorded in /run/hpcrollout-test-slurm), by pidfile PID,
#    verified against the expected process name. Never kills by name pattern.
#   --all    also stop those daemons when this script's marker is missing (by pidfile)
#   --purge  also wipe slurm state/spool/logs and the slurm_acct_db database
#            (next start begins again at job id 1); packages stay installed
# Safe to run when nothing is running.
set -uo pipefail
RUNSTATE=/run/hpcrollout-test-slurm
SPOOL=/var/lib/slurm/slurmd
ALL=0; PURGE=0
for a in "$@"; do case "$a" in --all) ALL=1 ;; --purge) PURGE=1 ;; *) echo "unknown arg $a" >&2; exit 2 ;; esac; done
log() { echo "[test-slurm $(date +%T)] $*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

# alive PID [COMM]: running (zombies count as dead: some PID 1s never reap) and named COMM
alive() {
  local st
  st=$(sed -E 's/^[0-9]+ \((.*)\) (.).*/\1 \2/' "/proc/$1/stat" 2>/dev/null) || return 1
  [ "${st##* }" != Z ] && { [ -z "${2:-}" ] || [ "${st% *}" = "$2" ]; }
}
pid_of() {  # pid_of PIDFILE COMM -> prints pid if alive and named COMM
  local pid
  [ -s "$1" ] || return 1
  pid=$(tr -dc '0-9' < "$1")
  [ -n "$pid" ] && alive "$pid" "$2" && echo "$pid"
}
stop_one() {  # stop_one NAME PIDFILE COMM
  local name=$1 pidfile=$2 comm=$3 pid
  if [ "$ALL" != 1 ] && [ ! -e "$RUNSTATE/$name" ]; then return 0; fi
  if pid=$(pid_of "$pidfile" "$comm"); then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 80); do alive "$pid" || break; sleep 0.25; done
    if alive "$pid"; then log "$name did not exit, SIGKILL"; kill -KILL "$pid" 2>/dev/null; sleep 0.5; fi
  fi
  rm -f "$RUNSTATE/$name"
  # slurm daemons (running as SlurmUser) leave stale pidfiles; a stale
  # /run/slurmctld.pid makes Debian's slurmctld prerm fail on package removal
  case "$pidfile" in /run/slurm*.pid) rm -f "$pidfile" ;; esac
}
stepd_pids() {  # slurmstepd processes owning a step socket in the slurmd spool dir
  local inodes
  inodes=$(awk -v d="$SPOOL/" 'index($8, d) == 1 {printf "socket:[%s]\n", $7}' /proc/net/unix 2>/dev/null | sort -u)
  [ -n "$inodes" ] || return 0
  find /proc/[0-9]*/fd -maxdepth 1 -type l -lname 'socket:*' -printf '%h %l\n' 2>/dev/null |
    awk 'NR == FNR {want[$0] = 1; next} ($2 in want) {split($1, a, "/"); print a[3]}' <(echo "$inodes") - |
    sort -u | while read -r p; do alive "$p" slurmstepd && echo "$p"; done
}

# ---- 1. get rid of jobs
if command -v scontrol >/dev/null 2>&1; then
  if scontrol ping 2>/dev/null | grep -q UP; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 1 80); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.25; done
      for _ in $(seq 1 20); do [ -z "$(stepd_pids)" ] && break; sleep 0.25; done  # steps tearing down
    fi
  fi
  # leftovers (e.g. slurmctld already dead, so nothing could be cancelled)
  jp=$(scontrol listpids 2>/dev/null | awk 'NR > 1 {print $1}' | tr '\n' ' ')
  sp=$(stepd_pids | tr '\n' ' ')
  if [ -n "${jp// /}${sp// /}" ]; then
    log "killing leftover job processes: ${jp:-none}; slurmstepd: ${sp:-none}"
    # shellcheck disable=SC2086
    [ -n "${jp// /}" ] && kill -KILL $jp 2>/dev/null
    # shellcheck disable=SC2086
    [ -n "${sp// /}" ] && kill -KILL $sp 2>/dev/null
  fi
fi

# ---- 2. the namespaced multi-node cluster first (its slurmctld uses munged and slurmdbd), then the daemons
# (slurmctld before slurmdbd so it can flush accounting)
multi_args=(); [ "$PURGE" = 1 ] && multi_args+=(--purge)
bash "$(dirname "${BASH_SOURCE[0]}")/stop-multinode-cluster.sh" "${multi_args[@]}"
stop_one slurmd    /run/slurmd.pid          slurmd
stop_one slurmctld /run/slurmctld.pid       slurmctld
stop_one slurmdbd  /run/slurmdbd.pid        slurmdbd
if [ "$PURGE" = 1 ] && command -v mariadb >/dev/null 2>&1 && mariadb-admin ping >/dev/null 2>&1; then
  log "dropping accounting database slurm_acct_db"
  mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db" || true
fi
stop_one mariadbd  /run/mysqld/mysqld.pid   mariadbd
stop_one munged    /run/munge/munged.pid    munged

if [ "$PURGE" = 1 ]; then
  log "purging slurm state, spool and logs"
  rm -rf /var/lib/slurm/slurmctld/* "${SPOOL:?}"/* /var/log/slurm/*
fi
log "stopped"
