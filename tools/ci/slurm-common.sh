# Sourced by slurm-local-up.sh (one node) and slurm-2node-up.sh (two nodes): bounded waits, the
# slurm.conf lines every test cluster shares, and the CPUs/memory a test node may claim.
SECONDS=0; ts() { echo "[${SECONDS}s] $*"; }
wait_for() { # wait_for <tries of 0.25 s> <what> <command...>
  local n=$1 what=$2; shift 2
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "timed out waiting for $what (logs: ${BASE:-?}/log)" >&2; return 1
}
# CPUs from getconf, not nproc: nproc obeys OMP_NUM_THREADS (.ci/run sets it to 1), which once gave a
# 1-CPU node on which every 2-task test job was refused. At least 2, since the tests run 2 tasks.
node_cpus() { local n; n=$(getconf _NPROCESSORS_ONLN); [ "$n" -ge 2 ] || n=2; echo "$n"; }
# node_mem_mb <nodes>: the machine's memory less 1 GB, shared by <nodes> nodes
node_mem_mb() { echo $(( ($(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024) / $1 )); }
slurm_conf_common() { # slurm_conf_common <BASE>: auth, controller files, scheduling and timing
  cat <<EOC
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs may restart only after cred_expire s (default 120)
AuthInfo=cred_expire=10
StateSaveLocation=$1/state
SlurmctldPidFile=$1/slurmctld.pid
SlurmctldLogFile=$1/log/slurmctld.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
# trust CPUs= below even where the machine has fewer (the tests need 2 tasks on 1-core machines too)
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=300
EOC
}
