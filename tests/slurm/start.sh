#!/usr/bin/env bash
# Start a single-node SLURM 22.05 cluster on localhost (munge, optional MariaDB+slurmdbd accounting).
# Needs: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge [slurmdbd mariadb-server]
# Usage: SLURM_LOCAL_DIR=/tmp/slurm-local bash start.sh ; then export SLURM_CONF=$SLURM_LOCAL_DIR/etc/slurm.conf
set -euo pipefail
D=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
WITH_DBD=${WITH_DBD:-1}      # 1: MariaDB + slurmdbd, so that sacct (submitit's job-state source) works
AUTH=${AUTH:-munge}          # munge | none
FAKE_GPUS=${FAKE_GPUS:-0}    # N>0: gres gpu:N backed by fake char devices -> CUDA_VISIBLE_DEVICES is set
export SLURM_CONF=$D/etc/slurm.conf
for f in "$D"/run/*.bgpid; do
  if [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then echo "already running: $f"; exit 1; fi
done
rm -rf "$D"/{etc,state,spool,log,run,munge,db,dev}
mkdir -p "$D"/{etc,state,spool,log,run,munge,db}
t0=$(date +%s.%N)
el() { python3 -c "import time;print(f'{time.time()-$t0:.2f}s')"; }

# node geometry of the real machine: "CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
NODE_HW=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //')

if [ "$AUTH" = none ]; then
  AUTH_LINES="AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10"
else
  AUTH_LINES="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.socket.2,cred_expire=10"
fi
GRES_LINES=""; NODE_GRES=""
if [ "$FAKE_GPUS" -gt 0 ]; then
  GRES_LINES="GresTypes=gpu"; NODE_GRES="Gres=gpu:$FAKE_GPUS"
  mkdir -p "$D/dev"; for i in $(seq 0 $((FAKE_GPUS-1))); do mknod "$D/dev/nvidia$i" c 195 "$i"; done
  echo "NodeName=localhost Name=gpu File=$D/dev/nvidia[0-$((FAKE_GPUS-1))]" > "$D/etc/gres.conf"
fi
if [ "$WITH_DBD" = 1 ]; then
  DBD_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStoragePass=$D/munge/munge.socket.2
JobAcctGatherType=jobacct_gather/linux"
else
  DBD_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

cat > "$SLURM_CONF" <<EOF
ClusterName=localci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
$AUTH_LINES
$GRES_LINES
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
$DBD_LINES
JobCompType=jobcomp/none
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=30
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 $NODE_HW $NODE_GRES State=UNKNOWN
PartitionName=gpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=localhost Default=NO MaxTime=INFINITE State=UP
EOF

if [ "$AUTH" = munge ]; then
  # own key + socket; munged runs as root in the foreground, backgrounded so that $! is its PID
  mungekey --create --keyfile="$D/munge/munge.key" --force
  munged -F --socket="$D/munge/munge.socket.2" --key-file="$D/munge/munge.key" \
    --pid-file="$D/run/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed" \
    </dev/null >"$D/log/munged.out" 2>&1 &
  echo $! > "$D/run/munged.bgpid"
  for i in $(seq 50); do munge -n --socket="$D/munge/munge.socket.2" >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n --socket="$D/munge/munge.socket.2" | unmunge --socket="$D/munge/munge.socket.2" >/dev/null
  echo "munged up ($(el))"
fi

if [ "$WITH_DBD" = 1 ]; then
  # MariaDB with its data dir under $D, TCP on 127.0.0.1:${DB_PORT:-13306}
  mariadb-install-db --no-defaults --user=root --datadir="$D/db/data" --auth-root-authentication-method=socket \
    --skip-test-db >"$D/log/mariadb-install.log" 2>&1
  mariadbd --no-defaults --user=root --datadir="$D/db/data" --socket="$D/db/mysqld.sock" \
    --pid-file="$D/run/mariadbd.pid" --bind-address=127.0.0.1 --port=${DB_PORT:-13306} --log-error="$D/log/mariadbd.err" \
    --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 </dev/null >"$D/log/mariadbd.out" 2>&1 &
  echo $! > "$D/run/mariadbd.bgpid"
  for i in $(seq 100); do mariadb-admin --no-defaults --socket="$D/db/mysqld.sock" -uroot ping >/dev/null 2>&1 && break; sleep 0.2; done
  mariadb --no-defaults --socket="$D/db/mysqld.sock" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  echo "mariadb up ($(el))"
  # slurmdbd has no -f option: it reads dirname($SLURM_CONF)/slurmdbd.conf, which must be mode 600 and owned by SlurmUser
  if [ "$AUTH" = none ]; then DBD_AUTH="AuthType=auth/none"; else DBD_AUTH="AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.socket.2"; fi
  cat > "$D/etc/slurmdbd.conf" <<EOF
$DBD_AUTH
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=${DB_PORT:-13306}
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$D/etc/slurmdbd.conf"
  slurmdbd -D </dev/null >"$D/log/slurmdbd.out" 2>&1 &
  echo $! > "$D/run/slurmdbd.bgpid"
  for i in $(seq 100); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.2; done
  sacctmgr -i add cluster localci >/dev/null
  echo "slurmdbd up ($(el))"
fi

# slurmctld -i: ignore missing state files; slurmd -N: node name independent of the machine's hostname
slurmctld -D -i </dev/null >"$D/log/slurmctld.out" 2>&1 &
echo $! > "$D/run/slurmctld.bgpid"
slurmd -D -N localhost </dev/null >"$D/log/slurmd.out" 2>&1 &
echo $! > "$D/run/slurmd.bgpid"
for i in $(seq 300); do
  [ "$(sinfo -h -n localhost -o %T 2>/dev/null | head -1)" = idle ] && break; sleep 0.2
done
if [ "$(sinfo -h -n localhost -o %T | head -1)" != idle ]; then
  echo "node not idle:"; sinfo -N -l; tail -n 20 "$D"/log/*.log; exit 1
fi
echo "node idle ($(el))"
