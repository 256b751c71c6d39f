#!/usr/bin/env bash
# Two-node SLURM on this one machine (Debian 12 packages, slurm 22.05), a cluster of its own beside the
# one-node cluster of slurm-local-up.sh (run that first: it installs the packages and starts munge):
# one slurmctld on port 17000 and two `slurmd -N n1|n2` daemons on 127.0.0.1:17001/17002, partition
# `two` = n1,n2. The node names are deliberately not resolvable (not in /etc/hosts), as on clusters
# where only NodeAddr reaches a node: a job that used the name as its rendezvous host would fail.
#   (as root)  BASE=/tmp/slurm-2node bash tools/ci/slurm-2node-up.sh
#   export SLURM_CONF=/tmp/slurm-2node/slurm.conf     # tests/launch/test_slurm_multinode.py does this
# No accounting (no slurmdbd): job states come from scontrol, kept MinJobAge=300 s after the end.
# Idempotent; every wait is bounded and the log says which step failed.
set -euo pipefail
BASE=${BASE:-/tmp/slurm-2node}
source "$(dirname "$0")/slurm-common.sh"  # ts, wait_for, node_cpus, node_mem_mb, slurm_conf_common
export SLURM_CONF="$BASE/slurm.conf"
if [ -f "$SLURM_CONF" ] && [ "$(timeout 10 sinfo -h -N -p two -o %T 2>/dev/null | grep -cE 'idle|mix|alloc')" = 2 ]; then
  ts "cluster at $SLURM_CONF already up: $(sinfo -h -o '%P %D %T %N')"; exit 0
fi
for tool in /usr/sbin/slurmctld /usr/sbin/slurmd; do
  [ -x "$tool" ] || { echo "$tool missing: run tools/ci/slurm-local-up.sh first (it installs slurm)" >&2; exit 1; }
done
for n in n1 n2; do
  if getent hosts "$n" >/dev/null; then echo "node name $n resolves here ($(getent hosts $n)); the test needs it not to" >&2; exit 1; fi
done
wait_for 40 "munged (started by slurm-local-up.sh)" sh -c 'munge -n | unmunge'
mkdir -p "$BASE"/{state,log} "$BASE"/spool/{n1,n2}
NCPU=$(node_cpus); MEM=$(node_mem_mb 2)  # per node: the tests run up to 2 tasks on each
cat > "$SLURM_CONF" <<EOC
ClusterName=ci2node
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=17000
$(slurm_conf_common "$BASE")
SlurmdSpoolDir=$BASE/spool/%n
SlurmdPidFile=$BASE/slurmd-%n.pid
SlurmdLogFile=$BASE/log/slurmd-%n.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=n1 NodeAddr=127.0.0.1 Port=17001 CPUs=$NCPU RealMemory=$MEM State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=17002 CPUs=$NCPU RealMemory=$MEM State=UNKNOWN
PartitionName=two Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOC
# stale daemons of this cluster (pid files under $BASE only: the one-node cluster is never touched)
for f in "$BASE"/slurmctld.pid "$BASE"/slurmd-n1.pid "$BASE"/slurmd-n2.pid; do
  if [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then kill "$(cat "$f")"; sleep 1; fi
done
/usr/sbin/slurmctld -i || { echo "slurmctld failed to start; see $BASE/log/slurmctld.log" >&2; exit 1; }
for n in n1 n2; do
  /usr/sbin/slurmd -N "$n" || { echo "slurmd -N $n failed; see $BASE/log/slurmd-$n.log" >&2; exit 1; }
done
if ! wait_for 120 "n1 and n2 idle" sh -c "[ \$(sinfo -h -p two -o '%T %N' -N | grep -c '^idle') = 2 ]"; then
  sinfo -N -o '%N %T %E' >&2 || true; tail -5 "$BASE"/log/*.log >&2 || true; exit 1
fi
ts "slurmctld + slurmd n1, n2 up: $(sinfo -h -o '%P %D %T %N')"
JID=$(timeout 20 sbatch --parsable -o "$BASE/log/smoke-%j.out" -N 2 -n 2 --wrap 'srun printenv SLURMD_NODENAME')
wait_for 120 "smoke job $JID" sh -c "! squeue -h -j $JID | grep -q ."
OUT=$(sort "$BASE/log/smoke-$JID.out" | tr '\n' ' ')
ts "smoke job $JID: $(scontrol show job "$JID" | grep -o 'JobState=[A-Z]*') on: $OUT"
[ "$OUT" = "n1 n2 " ] || { echo "smoke job did not run one task on each of n1, n2" >&2; exit 1; }
