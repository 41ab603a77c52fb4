#!/usr/bin/env bash
# Start a one-node Grid Engine cluster on this machine (Debian/Ubuntu, as root), for the Grid Engine
# tests of sweep.py's claims (several sweep processes sharing one grid). Son of Grid Engine 8.1.9, from
# Debian's gridengine-* packages: the family of TSUBAME 4.0's scheduler. Idempotent: packages already
# installed and daemons already running are kept; the configuration is written only where it differs.
#
#   sudo tests/gridengine/start-cluster.sh    # then: . /var/lib/gridengine/default/common/settings.sh;
#                                              #       qhost, qstat -f, and pytest tests/test_gridengine.py
#
# The node is this machine, known to Grid Engine as "localhost" (127.0.0.1 resolves back to that name,
# not to the host name), with one queue all.q of GRIDENGINE_SLOTS slots (default: the cores). Jobs may
# run as root (min_uid 0): the tests run as whoever calls pytest. Nothing listens beyond this machine's
# own names.
set -euo pipefail

export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
slots="${GRIDENGINE_SLOTS:-$(nproc)}"
host="$(hostname)"
common="$SGE_ROOT/$SGE_CELL/common"
fail() { echo "start-cluster.sh: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (it installs packages and starts system daemons)"

# 1. Packages, from the distribution. The master's post-install script creates the cell from debconf's
#    answers, so they are given before the install: this host as master, cell "default", configured.
if ! [ -x /usr/sbin/sge_qmaster ] || ! [ -x /usr/sbin/sge_execd ] || ! command -v qsub >/dev/null; then
  command -v apt-get >/dev/null || fail "gridengine-master, -exec and -client are not installed and there is no apt-get to install them"
  export DEBIAN_FRONTEND=noninteractive
  debconf-set-selections <<SEL || fail "debconf-set-selections failed"
gridengine-common gridengine-common/sgemaster string $host
gridengine-client gridengine-client/sgemaster string $host
gridengine-master gridengine-master/sgemaster string $host
gridengine-common gridengine-common/sgecell string default
gridengine-common gridengine-common/sgeconfig boolean true
SEL
  apt-get update -qq || fail "apt-get update failed"
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq gridengine-master gridengine-exec gridengine-client >/dev/null \
    || fail "apt-get install gridengine-master gridengine-exec gridengine-client failed"
fi
[ -s "$common/bootstrap" ] || fail "$common/bootstrap is missing: the cell was not created (reinstall gridengine-master after the debconf answers above)"

# write_if_changed FILE CONTENT: 0 if it wrote, 1 if FILE already held CONTENT.
write_if_changed() {
  if [ "$(cat "$1" 2>/dev/null)" != "$2" ]; then printf '%s\n' "$2" > "$1"; return 0; fi
  return 1
}

# 2. The master's name: 127.0.0.1 resolves back to "localhost", so that is the name every daemon and
#    client must use; the host name is an alias of it.
restart=0
write_if_changed "$common/host_aliases" "localhost $host" && restart=1
write_if_changed "$common/act_qmaster" "localhost" && restart=1

# 3. qmaster (restarted if its names changed), and this host as a submit host.
if [ "$restart" = 1 ] && pgrep -x sge_qmaster >/dev/null; then
  qconf -ke all >/dev/null 2>&1 || true  # Grid Engine's own shutdown of its daemons
  qconf -km >/dev/null 2>&1 || true
  for _ in $(seq 30); do pgrep -x sge_qmaster >/dev/null || break; sleep 1; done
fi
if ! pgrep -x sge_qmaster >/dev/null; then
  /usr/sbin/sge_qmaster || fail "sge_qmaster did not start (see /var/spool/gridengine/qmaster/messages)"
fi
for _ in $(seq 30); do qconf -sh >/dev/null 2>&1 && break; sleep 1; done
qconf -sh >/dev/null 2>&1 || fail "qmaster does not answer after 30 s (see /var/spool/gridengine/qmaster/messages)"
qconf -ss 2>/dev/null | grep -qx localhost || qconf -as localhost >/dev/null 2>&1

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 4. The global configuration, which qconf -Mconf loads from a file named after it ("global"): root
#    (and any system user) may run jobs (min_uid and min_gid 0), and killing a job (qdel, h_rt) kills
#    every process it started, found by the extra group id that all of them carry, also a child in a
#    process group of its own.
qconf -sconf global > "$work/current"
sed -E -e 's/^(min_uid|min_gid)([[:space:]]+).*/\1\20/' \
  -e 's/^(execd_params)([[:space:]]+).*/\1\2ENABLE_ADDGRP_KILL=TRUE/' "$work/current" > "$work/global"
if ! cmp -s "$work/current" "$work/global"; then
  (cd "$work" && qconf -Mconf global >/dev/null 2>&1) || fail "qconf -Mconf global failed"
fi

# 5. The scheduler: a run every 2 s, and one at once on each submission and job end (the default waits
#    up to 15 s), so that a short test job starts and leaves without delay.
qconf -ssconf > "$work/current"
sed -E -e 's/^(schedule_interval)([[:space:]]+).*/\1\20:0:2/' -e 's/^(flush_submit_sec|flush_finish_sec)([[:space:]]+).*/\1\21/' \
  "$work/current" > "$work/scheduler"
if ! cmp -s "$work/current" "$work/scheduler"; then
  qconf -Msconf "$work/scheduler" >/dev/null 2>&1 || fail "qconf -Msconf failed"
fi

# 6. The execution daemon (it registers this host as an execution host).
if ! pgrep -x sge_execd >/dev/null; then
  /usr/sbin/sge_execd || fail "sge_execd did not start (see /var/spool/gridengine/execd/localhost/messages)"
fi

# 7. The queue all.q: every slot of this host, no load threshold (a busy machine must not close it).
cat > "$work/all.q" <<QUEUE
qname                 all.q
hostlist              localhost
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               NONE
rerun                 FALSE
slots                 $slots
tmpdir                /tmp
shell                 /bin/bash
prolog                NONE
epilog                NONE
shell_start_mode      posix_compliant
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                00:00:60
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
QUEUE
if ! qconf -sql 2>/dev/null | grep -qx all.q; then
  qconf -Aq "$work/all.q" >/dev/null 2>&1 || fail "qconf -Aq all.q failed: $(qconf -Aq "$work/all.q" 2>&1 | tail -n1)"
elif [ "$(qconf -sq all.q | tr -s ' ' | sort)" != "$(tr -s ' ' < "$work/all.q" | sort)" ]; then
  qconf -Mq "$work/all.q" >/dev/null 2>&1 || fail "qconf -Mq all.q failed"
fi

# 8. Wait until the queue instance takes jobs (no state flags: not unknown, disabled or in error).
for _ in $(seq 60); do
  state="$(qstat -f -q all.q@localhost 2>/dev/null | awk '$1 == "all.q@localhost" { print ($6 == "" ? "ok" : $6) }')"
  if [ "$state" = ok ]; then
    echo "start-cluster.sh: Grid Engine queue all.q@localhost takes jobs ($slots slots; SGE_ROOT=$SGE_ROOT SGE_CELL=$SGE_CELL)"
    exit 0
  fi
  case "$state" in *E*) qmod -cq all.q@localhost >/dev/null 2>&1 || true ;; esac
  sleep 1
done
fail "the queue all.q@localhost does not take jobs after 60 s (qstat -f: ${state:-no answer}); see /var/spool/gridengine/execd/localhost/messages"
