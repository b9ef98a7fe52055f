#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine (Debian, as root), for the test suite.
# Installs slurm-wlm and munge if missing, keeps state and logs under $GROKPIPE_SLURM_DIR
# (default /tmp/grokpipe-slurm), records the pid of each daemon it starts in started.pids, and waits
# until sinfo reports the node idle. The config goes where a real cluster has it,
# /etc/slurm/slurm.conf (jobs run srun, which does not see SLURM_CONF once the executor plugin
# cleans the job environment); an existing config that is not ours is never overwritten.
# scripts/slurm-down.sh stops exactly the daemons started here and removes our config.
set -euo pipefail

DIR="${GROKPIPE_SLURM_DIR:-/tmp/grokpipe-slurm}"
if [[ $(id -u) -ne 0 ]]; then
    echo "slurm-up: must run as root (installs packages, starts munged and slurmd)" >&2
    exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

MARKER="# written by grokpipe scripts/slurm-up.sh"
CONF=/etc/slurm/slurm.conf
if [[ -e "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
    echo "slurm-up: $CONF exists and was not written by grokpipe; refusing to replace it" >&2
    exit 1
fi
mkdir -p "$DIR"/{spool,state,log} /etc/slurm
: > "$DIR/started.pids"

# munge: the key once, /run/munge created first, the daemon as user munge (it refuses root).
if ! pgrep -x munged >/dev/null; then
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    echo "munged $(cat /run/munge/munged.pid)" >> "$DIR/started.pids"
fi

host="$(hostname -s)"
node="$(slurmd -C | head -1)"  # NodeName=<host> CPUs=... RealMemory=...
cat > "$CONF" <<CONF
$MARKER
ClusterName=grokpipe
SlurmctldHost=$host
SlurmUser=root
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmdSpoolDir=$DIR/spool
StateSaveLocation=$DIR/state
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
# squeue answers for finished jobs only while they are kept: Snakemake polls with squeue here.
MinJobAge=300
DefMemPerCPU=1000
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

/usr/sbin/slurmctld
for _ in $(seq 100); do [[ -s "$DIR/slurmctld.pid" ]] && break; sleep 0.1; done
echo "slurmctld $(cat "$DIR/slurmctld.pid")" >> "$DIR/started.pids"
/usr/sbin/slurmd
for _ in $(seq 100); do [[ -s "$DIR/slurmd.pid" ]] && break; sleep 0.1; done
echo "slurmd $(cat "$DIR/slurmd.pid")" >> "$DIR/started.pids"

for _ in $(seq 300); do
    state="$(sinfo -h -o %t 2>/dev/null | head -1 || true)"
    [[ "$state" == "idle" ]] && break
    sleep 0.1
done
if [[ "$state" != "idle" ]]; then
    echo "slurm-up: node did not become idle (state '$state'); see $DIR/log/" >&2
    exit 1
fi
echo "slurm-up: node $host idle; config $CONF, logs $DIR/log"
