#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine (Debian/Ubuntu, as root), for the Slurm tests
# of sweep.py --launcher slurm. Idempotent: packages already installed, a key already made and
# daemons already running are kept; the configuration is rewritten only when it changed.
#
#   sudo tests/slurm/start-cluster.sh        # then: sinfo, squeue, and pytest tests/test_slurm.py
#
# The node is this machine (hostname -s) with SLURM_CPUS CPUs (default 2), in one default
# partition named "debug". Nothing is reachable from outside: the daemons talk over localhost.
set -euo pipefail

cpus="${SLURM_CPUS:-2}"
node="$(hostname -s)"
conf_dir=/etc/slurm
fail() { echo "start-cluster.sh: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (it installs packages and starts system daemons)"

# 1. Packages, from the distribution.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || fail "slurm-wlm and munge are not installed and there is no apt-get to install them"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || fail "apt-get update failed"
  apt-get install -y -qq slurm-wlm munge >/dev/null || fail "apt-get install slurm-wlm munge failed"
fi

# 2. Munge (Slurm's authentication): a key readable by user munge only, and the daemon.
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  su -s /bin/sh munge -c "munged --force" || fail "munged did not start (see /var/log/munge/munged.log)"
  sleep 1
  munge -n | unmunge >/dev/null || fail "munge does not work (see /var/log/munge/munged.log)"
fi

# 3. slurm.conf: one node, one partition, processes tracked without cgroups (containers have none).
install -d -m 0755 "$conf_dir" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
conf="$(cat <<CONF
ClusterName=local
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
MaxArraySize=10001
NodeName=$node CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
)"
changed=0
if [ "$(cat "$conf_dir/slurm.conf" 2>/dev/null)" != "$conf" ]; then
  printf '%s\n' "$conf" > "$conf_dir/slurm.conf"
  changed=1
fi

# 4. The daemons: started if not running, reconfigured if the configuration changed.
if ! pgrep -x slurmctld >/dev/null; then
  slurmctld || fail "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
elif [ "$changed" = 1 ]; then
  scontrol reconfigure || true
fi
if ! pgrep -x slurmd >/dev/null; then
  slurmd || fail "slurmd did not start (see /var/log/slurm/slurmd.log)"
fi

# 5. Wait until the node takes jobs.
for _ in $(seq 60); do
  state="$(sinfo -h -n "$node" -o %t 2>/dev/null | head -n1 || true)"
  case "$state" in
    idle|mix|alloc) echo "start-cluster.sh: Slurm node $node is $state ($cpus CPUs, partition debug)"; exit 0 ;;
    down*|drain*|fail*) scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
fail "the Slurm node $node is not idle after 60 s (sinfo: ${state:-no answer}); see /var/log/slurm/slurmctld.log and slurmd.log"
