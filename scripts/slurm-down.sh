#!/usr/bin/env bash
# Stop exactly the daemons scripts/slurm-up.sh started (by the pids it recorded), newest first,
# and remove the /etc/slurm/slurm.conf it wrote.
set -uo pipefail
DIR="${GROKPIPE_SLURM_DIR:-/tmp/grokpipe-slurm}"
[[ -f "$DIR/started.pids" ]] || exit 0
tac "$DIR/started.pids" | while read -r name pid; do
    [[ -n "$pid" ]] || continue
    # Only a process that still is that daemon: a reused pid is left alone.
    if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
done
: > "$DIR/started.pids"
if grep -qF "# written by grokpipe scripts/slurm-up.sh" /etc/slurm/slurm.conf 2>/dev/null; then
    rm -f /etc/slurm/slurm.conf
fi
