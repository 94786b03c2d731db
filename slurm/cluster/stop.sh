#!/usr/bin/env bash
# Stops what start.sh started (by the pids in the run dir); keeps state and logs for inspection.
set -uo pipefail
RUN="${FDF_SLURM_DIR:-/tmp/fdf-slurm}"
running() {  # pid exists and is not a zombie
  [ -e "/proc/$1" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null
}
stop() {  # pidfiles...: TERM all, wait up to 15 s, then KILL the rest
  local pids=() f pid
  for f in "$@"; do
    [ -s "$f" ] && pid="$(cat "$f")" && running "$pid" && kill "$pid" && pids+=("$pid")
    rm -f "$f"
  done
  for _ in $(seq 150); do
    local left=()
    for pid in "${pids[@]}"; do running "$pid" && left+=("$pid"); done
    ((${#left[@]})) || return 0
    sleep 0.1
  done
  kill -9 "${left[@]}" 2>/dev/null
}
stop "$RUN/slurmd-n1.pid" "$RUN/slurmd-n2.pid" "$RUN/slurmctld.pid"
if [ -e "$RUN/munged.ours" ]; then
  stop /run/munge/munged.pid
  rm -f "$RUN/munged.ours"
fi
echo "stop.sh: stopped cluster in $RUN" >&2
