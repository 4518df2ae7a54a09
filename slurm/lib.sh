# lib.sh - shell helpers the test-cluster scripts share; sourced, after the sourcing script defines
# log, die and TIMEOUT (seconds).

# pid_alive PIDFILE COMM -> 0 if the pidfile names a live process with that comm
pid_alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(tr -dc '0-9' 2>/dev/null < "$1")  # the daemon may remove it right now, as it exits
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  # "(comm) state": must match the name and not be a zombie (some PID 1s never reap)
  [ "$(sed -E 's/^[0-9]+ \((.*)\) (.).*/\1 \2/' "/proc/$pid/stat" 2>/dev/null)" != "$2 Z" ] &&
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# wait_for DESCRIPTION CMD... -> polls CMD every 0.25 s until it succeeds, dies after TIMEOUT seconds
wait_for() {
  local desc=$1; shift; local t=0
  until "$@" >/dev/null 2>&1; do
    t=$((t + 1)); [ $t -ge $((TIMEOUT * 4)) ] && die "timeout waiting for $desc"
    sleep 0.25
  done
}

# stop_pidfile PIDFILE COMM -> stops that daemon if it runs: SIGTERM, then SIGKILL after TIMEOUT seconds; returns
# only once it is gone, so the caller never mistakes a daemon still exiting for one already running
stop_pidfile() {
  local pid t=0
  pid_alive "$1" "$2" || return 0
  pid=$(tr -dc '0-9' 2>/dev/null < "$1"); kill "$pid" 2>/dev/null || true
  while pid_alive "$1" "$2"; do
    t=$((t + 1))
    [ $t = $((TIMEOUT * 4)) ] && { log "$2 ($pid) ignored SIGTERM for ${TIMEOUT} s: SIGKILL"; kill -9 "$pid" 2>/dev/null || true; }
    [ $t -ge $((TIMEOUT * 8)) ] && die "$2 ($pid) does not exit"
    sleep 0.25
  done
}
