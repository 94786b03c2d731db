#!/usr/bin/env bash
# Starts a real two-node SLURM cluster on loopback (n1, n2 = two slurmd on 127.0.0.1) and prints
# the environment to use it. Idempotent: a running cluster is left as is.
#   bash slurm/cluster/start.sh [--install]      --install: apt-get slurmctld slurmd slurm-client munge
#   eval "$(bash slurm/cluster/start.sh | grep ^export)"
# Run dir (config, state, logs, pids): $FDF_SLURM_DIR, default /tmp/fdf-slurm. Needs root.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
RUN="${FDF_SLURM_DIR:-/tmp/fdf-slurm}"
CTLD_PORT="${FDF_SLURM_CTLD_PORT:-16817}" N1_PORT="${FDF_SLURM_N1_PORT:-17001}" N2_PORT="${FDF_SLURM_N2_PORT:-17002}"
install=0
for a in "$@"; do
  case "$a" in
    --install) install=1 ;;
    *) echo "start.sh: unknown option $a (only --install)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "start.sh: must run as root (slurmd needs it)" >&2; exit 1; }

pkgs=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  if ((install)); then
    echo "start.sh: apt-get install ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "start.sh: missing packages ${missing[*]}; rerun with --install" >&2; exit 1
  fi
fi

# n1/n2 must resolve to loopback (srun and slurmctld look node names up).
for h in n1 n2; do
  getent hosts "$h" | grep -q '^127\.' || echo "127.0.0.1 $h" >> /etc/hosts
done

# munge: a key owned by munge, and one munged answering on the default socket.
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key && chmod 0755 /run/munge
mkdir -p "$RUN"/{state,spool,log}
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- munged
  touch "$RUN/munged.ours"  # stop.sh stops munged only when this script started it
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

sed -e "s#@RUN@#$RUN#g" -e "s#@CTLD_PORT@#$CTLD_PORT#g" \
    -e "s#@N1_PORT@#$N1_PORT#g" -e "s#@N2_PORT@#$N2_PORT#g" "$here/slurm.conf.in" > "$RUN/slurm.conf.new"
mv "$RUN/slurm.conf.new" "$RUN/slurm.conf"
export SLURM_CONF="$RUN/slurm.conf"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
alive "$RUN/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
since=""  # when we started a slurmd: its node counts only once it registered after that
for n in n1 n2; do
  mkdir -p "$RUN/spool/$n"
  if ! alive "$RUN/slurmd-$n.pid"; then
    since="${since:-$(date +%Y-%m-%dT%H:%M:%S)}"
    slurmd -f "$SLURM_CONF" -N "$n"
  fi
done

# Saved state can show a node idle before its new slurmd registered: check SlurmdStartTime too.
ready() {
  local info t
  info="$(scontrol show node "$1" -o 2>/dev/null)" || return 1
  [[ "$info" =~ State=(IDLE|MIXED|ALLOCATED)(\+COMPLETING)?\  ]] || return 1
  t="$(sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p' <<<"$info")"
  [[ -z "$since" || "$t" > "$since" || "$t" == "$since" ]]
}
for i in $(seq 120); do
  if ready n1 && ready n2; then
    echo "start.sh: cluster up after $((i / 4)) s: $(sinfo -h -N -o '%N %t' | sort -u | tr '\n' ' ')" >&2
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  # A node left down by an earlier run comes back once its slurmd answers.
  if ((i % 20 == 19)); then scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true; fi
  sleep 0.25
done
echo "start.sh: nodes not ready after 30 s: $(sinfo -h -N -o '%N %t' 2>&1 | tr '\n' ' ')" >&2
echo "start.sh: logs in $RUN/log:" >&2
tail -n 5 "$RUN"/log/*.log >&2 || true
exit 1
