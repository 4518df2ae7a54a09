#!/usr/bin/env bash
# start-test-cluster.sh - install (if missing), configure and start the single-node SLURM
# cluster that hpcrollout's tests run against (Debian/Ubuntu, run as root). Idempotent: safe
# to re-run; running daemons are left alone unless the generated config changed.
# .ci/run calls it before the tests; run it yourself to run the SLURM tests on your machine:
#   sudo bash slurm/start-test-cluster.sh && python -m pytest
#   sudo bash slurm/stop-test-cluster.sh [--purge]
#
# What it sets up (and why):
#   munge, slurmctld, slurmd; slurmdbd + mariadb so `sacct` works (without it submitit cannot
#   see a job killed before it wrote a result, and hpcrollout status loses job states);
#   fake GPUs: gres gpu with File= symlinks to /dev/null (slurm needs character devices), so
#   --gres=gpu:N schedules and sets CUDA_VISIBLE_DEVICES; fast requeue (cred_expire=15 and a
#   2 s scheduler pass: a requeued task restarts in ~16 s instead of 120 s); CPUs advertised
#   beyond the real core count (config_overrides) so several test tasks run at once on 2 cores.
#
# Env knobs (defaults in brackets):
#   TEST_SLURM_ACCOUNTING [1]   1 = also run mariadb + slurmdbd so `sacct` works; 0 = no slurmdbd.
#   TEST_SLURM_CPUS     [max(16, nproc)] CPUs advertised (may exceed nproc: config_overrides)
#   TEST_SLURM_MEM_MB   [MemTotal-1024] RealMemory advertised
#   TEST_SLURM_GPUS     [4]     fake gres/gpu count (symlinks to /dev/null); 0 = none
#   TEST_SLURM_NODE     [hostname -s]  node name
#   TEST_SLURM_CLUSTER  [localcluster] ClusterName (don't change once state exists)
#   TEST_SLURM_PARTITION [debug]
#   TEST_SLURM_TIMEOUT  [90]    seconds to wait for each daemon / node idle
#   TEST_SLURM_MULTINODE [1]    1 = also start the namespaced 2-node cluster (start-multinode-cluster.sh,
#                               SLURM_CONF=/etc/slurm-multi/slurm.conf) for the multi-node tests; 0 = not
set -euo pipefail

ACCOUNTING=${TEST_SLURM_ACCOUNTING:-1}
CPUS=${TEST_SLURM_CPUS:-$(( $(nproc) > 16 ? $(nproc) : 16 ))}
MEM_MB=${TEST_SLURM_MEM_MB:-$(awk '/MemTotal/ {m=int($2/1024)-1024; if (m<1024) m=int($2/1024); print m}' /proc/meminfo)}
GPUS=${TEST_SLURM_GPUS:-4}
NODE=${TEST_SLURM_NODE:-$(hostname -s 2>/dev/null || true)}
NODE=${NODE:-localhost}
CLUSTER=${TEST_SLURM_CLUSTER:-localcluster}
PARTITION=${TEST_SLURM_PARTITION:-debug}
TIMEOUT=${TEST_SLURM_TIMEOUT:-90}
DB_PASS=${TEST_SLURM_DB_PASS:-slurmdbpass}

ETC=/etc/slurm
LIB=/var/lib/slurm
LOG=/var/log/slurm
RUNSTATE=/run/hpcrollout-test-slurm  # records which daemons *we* started (for the stop script)
FAKEGPU=$LIB/fakegpu
MARK="# managed by hpcrollout slurm/start-test-cluster.sh"

log() { echo "[test-slurm $(date +%T)] $*" >&2; }
die() {  # with the tail of the cluster's logs, so a failed start in CI can be read afterwards
  log "ERROR: $*"
  for f in "$LOG"/*.log /var/log/mysql/test-slurm.log; do [ -f "$f" ] && { echo "--- last lines of $f" >&2; tail -n 20 "$f" >&2; }; done
  exit 1
}
[ "$(id -u)" = 0 ] || die "must run as root"

# ---------------------------------------------------------------- install
PKGS=(munge slurm-client slurmctld slurmd)
[ "$ACCOUNTING" = 1 ] && PKGS+=(slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  # keep maintainer scripts from starting daemons (we start them ourselves)
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; own_policy=1
  fi
  trap '[ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  trap - EXIT
fi

# ---------------------------------------------------------------- helpers
# pid_alive PIDFILE COMM, wait_for DESCRIPTION CMD...
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
mark_started() { mkdir -p "$RUNSTATE"; touch "$RUNSTATE/$1"; }

# write_if_changed DEST MODE OWNER < content ; returns 0 if the file changed
write_if_changed() {
  local dest=$1 mode=$2 owner=$3 tmp
  tmp=$(mktemp)
  cat > "$tmp"
  if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then rm -f "$tmp"; return 1; fi
  if [ -f "$dest" ] && ! grep -qF "$MARK" "$dest"; then
    cp -p "$dest" "$dest.bak.$(date +%s)"; log "backed up foreign $dest"
  fi
  install -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$tmp" "$dest"; rm -f "$tmp"
  return 0
}

# ---------------------------------------------------------------- host prep
getent hosts "$NODE" >/dev/null 2>&1 || { echo "127.0.0.1 $NODE" >> /etc/hosts; log "added $NODE to /etc/hosts"; }
install -d -o slurm -g slurm -m 0755 "$LIB" "$LIB/slurmctld" "$LOG"
install -d -o root -g root -m 0755 "$LIB/slurmd"
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key

GRES_NODE="" ; GRES_TYPES="" ; ACCT_TRES=""
if [ "$GPUS" -gt 0 ]; then
  install -d -m 0755 "$FAKEGPU"
  for i in $(seq 0 $((GPUS - 1))); do ln -sfn /dev/null "$FAKEGPU/nvidia$i"; done  # slurm needs a char device
  GRES_NODE=" Gres=gpu:$GPUS"; GRES_TYPES="GresTypes=gpu"; ACCT_TRES="AccountingStorageTRES=gres/gpu"
fi

# ---------------------------------------------------------------- config
if [ "$ACCOUNTING" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
$ACCT_TRES"
else
  ACCT="AccountingStorageType=accounting_storage/none"
fi

changed=0
write_if_changed "$ETC/slurm.conf" 0644 root:root <<EOF && changed=1 || true
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs wait cred_expire seconds before restarting (default 120; min 5). slurmd refuses a launch whose
# credential is older than this, and a refused batch launch can drain the node: 15 s leaves room for a loaded
# 2-core machine where 5 s did not.
AuthInfo=cred_expire=15
# client commands (sbatch, squeue, sacct) wait this long for a busy slurmctld before "Socket timed out"
MessageTimeout=30
StateSaveLocation=$LIB/slurmctld
SlurmdSpoolDir=$LIB/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups needed
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
$ACCT
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# low latency: no batch delay, full sched/backfill pass every 2s (for requeued jobs)
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
MaxArraySize=100001
MaxJobCount=200000
MinJobAge=300
KillWait=5
ReturnToService=2
# allow advertising more CPUs/memory than detected
SlurmdParameters=config_overrides
$GRES_TYPES
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB$GRES_NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1024
EOF

if [ "$GPUS" -gt 0 ]; then
  write_if_changed "$ETC/gres.conf" 0644 root:root <<EOF && changed=1 || true
$MARK
AutoDetect=off
NodeName=$NODE Name=gpu File=$FAKEGPU/nvidia$( [ "$GPUS" -gt 1 ] && echo "[0-$((GPUS - 1))]" || echo 0)
EOF
else
  rm -f "$ETC/gres.conf"
fi

# only matters on pure cgroup v2 hosts without reachable systemd/dbus (containers)
write_if_changed "$ETC/cgroup.conf" 0644 root:root <<EOF && changed=1 || true
$MARK
IgnoreSystemdOnFailure=yes
EOF

# ---------------------------------------------------------------- munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "munged already running"
else
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
  mark_started munged
  wait_for "munged" sh -c 'munge -n | unmunge'
fi

# ---------------------------------------------------------------- accounting
if [ "$ACCOUNTING" = 1 ]; then
  if mariadb-admin ping >/dev/null 2>&1; then
    log "mariadb already running"
  else
    log "starting mariadb"
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    install -d -o mysql -g adm -m 2750 /var/log/mysql
    if [ ! -d /var/lib/mysql/mysql ]; then
      mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    fi
    setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql \
      --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
      --skip-networking --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 \
      --log-error=/var/log/mysql/test-slurm.log < /dev/null > /dev/null 2>&1 &
    mark_started mariadbd
    wait_for "mariadb" mariadb-admin ping
  fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

  dbd_changed=0
  write_if_changed "$ETC/slurmdbd.conf" 0600 slurm:slurm <<EOF && dbd_changed=1 || true
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
PidFile=/run/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  if pid_alive /run/slurmdbd.pid slurmdbd && [ "$dbd_changed" = 1 ]; then
    log "slurmdbd.conf changed: restarting slurmdbd"
    stop_pidfile /run/slurmdbd.pid slurmdbd
  fi
  if pid_alive /run/slurmdbd.pid slurmdbd; then
    log "slurmdbd already running"
  else
    log "starting slurmdbd"
    /usr/sbin/slurmdbd
    mark_started slurmdbd
  fi
  wait_for "slurmdbd" sacctmgr -n -P list cluster
else
  rm -f "$ETC/slurmdbd.conf"
fi

# ---------------------------------------------------------------- slurmctld / slurmd
if [ "$changed" = 1 ]; then
  for d in slurmd slurmctld; do
    if pid_alive /run/$d.pid $d; then
      log "config changed: stopping $d"; stop_pidfile /run/$d.pid $d
    fi
  done
fi
if pid_alive /run/slurmctld.pid slurmctld; then
  log "slurmctld already running"
else
  log "starting slurmctld"
  /usr/sbin/slurmctld
  mark_started slurmctld
fi
wait_for "slurmctld" sh -c 'scontrol ping | grep -q UP'
if pid_alive /run/slurmd.pid slurmd; then
  log "slurmd already running"
else
  log "starting slurmd"
  /usr/sbin/slurmd -N "$NODE"
  mark_started slurmd
fi

node_ok() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing|planned)$'; }
t=0
until node_ok; do
  st=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null || true)
  case "$st" in drain*|down*|inval*) [ $((t % 8)) = 0 ] && scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;; esac
  t=$((t + 1)); [ $t -ge $((TIMEOUT * 4)) ] && { sinfo -N -l >&2; die "node $NODE not idle (state: $st); see $LOG/slurmd.log"; }
  sleep 0.25
done
log "cluster up: $(sinfo -h -N -o '%N %T cpus=%c mem=%m gres=%G')"

if [ "${TEST_SLURM_MULTINODE:-1}" = 1 ]; then
  bash "$(dirname "${BASH_SOURCE[0]}")/start-multinode-cluster.sh"
fi
