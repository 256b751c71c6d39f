#!/usr/bin/env bash
# Single-node SLURM on localhost (Debian 12 packages, slurm 22.05) for CI and local testing:
# munge + slurmctld + slurmd, plus slurmdbd/MariaDB with WITH_DBD=1 so that sacct (and therefore real
# job states) works. Idempotent: exits at once when the cluster at $BASE already answers.
#   (as root, after 'apt-get update' once)  WITH_DBD=1 BASE=/tmp/slurm-local bash tools/ci/slurm-local-up.sh
#   export SLURM_CONF=/tmp/slurm-local/slurm.conf      # the tests do this themselves when the file exists
# Every wait is bounded: a broken install fails in well under a minute instead of hanging CI.
# Facts (this container): daemons up and a 2-task job done ~6 s after install (11 s with slurmdbd);
# requeued jobs wait cred_expire before restarting, hence AuthInfo=cred_expire=10 below.
set -euo pipefail
BASE=${BASE:-/tmp/slurm-local}
WITH_DBD=${WITH_DBD:-0}
source "$(dirname "$0")/slurm-common.sh"  # ts, wait_for, node_cpus, node_mem_mb, slurm_conf_common
export SLURM_CONF="$BASE/slurm.conf"
if [ -f "$SLURM_CONF" ] && timeout 10 sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; then
  ts "cluster at $SLURM_CONF already up: $(sinfo -h -o '%P %D %T %C')"; exit 0
fi
PKGS="slurmctld slurmd slurm-client munge"
[ "$WITH_DBD" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
if ! dpkg -s $PKGS >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends $PKGS >/dev/null
  ts "apt-get install done ($PKGS)"
fi
mkdir -p "$BASE"/{state,spool,log}
# munge: Debian's postinst already creates /etc/munge/munge.key; create it if missing
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then runuser -u munge -- /usr/sbin/munged; fi
wait_for 40 munged sh -c 'munge -n | unmunge'
ts "munged up"
ACCT="AccountingStorageType=accounting_storage/none"
if [ "$WITH_DBD" = 1 ]; then
  SOCK="$BASE/mariadb/mysqld.sock"
  if ! mariadb -S "$SOCK" -uroot -e 'select 1' >/dev/null 2>&1; then
    mkdir -p "$BASE/mariadb" && chown mysql:mysql "$BASE/mariadb"
    [ -d "$BASE/mariadb/data/mysql" ] || mariadb-install-db --user=mysql --datadir="$BASE/mariadb/data" \
      --auth-root-authentication-method=normal >/dev/null
    mariadbd --user=mysql --datadir="$BASE/mariadb/data" --socket="$SOCK" \
      --pid-file="$BASE/mariadb/mariadbd.pid" --bind-address=127.0.0.1 --port=3306 \
      --log-error="$BASE/mariadb/err.log" >/dev/null 2>&1 &
    wait_for 120 mariadb mariadb -S "$SOCK" -uroot -e 'select 1'
  fi
  mariadb -S "$SOCK" -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  ts "mariadb up"
  cat > "$BASE/slurmdbd.conf" <<EOC
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOC
  chmod 600 "$BASE/slurmdbd.conf"
  ACCT=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\nAccountingStoragePort=6819'
fi
cat > "$SLURM_CONF" <<EOC
ClusterName=ci
SlurmctldHost=localhost(127.0.0.1)
$(slurm_conf_common "$BASE")
SlurmdSpoolDir=$BASE/spool
SlurmdPidFile=$BASE/slurmd.pid
SlurmdLogFile=$BASE/log/slurmd.log
JobAcctGatherType=jobacct_gather/linux
$ACCT
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(node_cpus) RealMemory=$(node_mem_mb 1) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOC
if [ "$WITH_DBD" = 1 ]; then
  [ -f "$BASE/slurmdbd.pid" ] && kill -0 "$(cat "$BASE/slurmdbd.pid")" 2>/dev/null || /usr/sbin/slurmdbd
  wait_for 80 slurmdbd sh -c "ss -ltn | grep -q ':6819 '"
  ts "slurmdbd up (pid $(cat "$BASE/slurmdbd.pid"))"
fi
# stale daemons from an earlier attempt (pid files under $BASE only: never touch anything else)
for d in slurmctld slurmd; do
  if [ -f "$BASE/$d.pid" ] && kill -0 "$(cat "$BASE/$d.pid")" 2>/dev/null; then kill "$(cat "$BASE/$d.pid")"; sleep 1; fi
done
/usr/sbin/slurmctld -i
/usr/sbin/slurmd -N localhost
wait_for 80 "an idle node" sh -c "sinfo -h -o %T | grep -qx idle"
ts "slurmctld (pid $(cat "$BASE/slurmctld.pid")) + slurmd (pid $(cat "$BASE/slurmd.pid")) up: $(sinfo -h -o '%P %D %T %C')"
JID=$(timeout 20 sbatch --parsable -o "$BASE/log/smoke-%j.out" -n 2 --wrap 'srun hostname')
wait_for 120 "smoke job $JID" sh -c "! squeue -h -j $JID | grep -q ."
ts "smoke job $JID: $(scontrol show job "$JID" | grep -o 'JobState=[A-Z]*') output: $(tr '\n' ' ' < "$BASE/log/smoke-$JID.out")"
if [ "$WITH_DBD" = 1 ]; then
  wait_for 40 "sacct to record job $JID" sh -c "sacct -n -X -j $JID -o State | grep -q COMPLETED"
  ts "sacct: $(sacct -n -X -j "$JID" -o JobID,State,ExitCode | tr -s ' ')"
fi
