#!/usr/bin/env bash
# Stop what start.sh started, by recorded PID only.
set -u
D=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
export SLURM_CONF=$D/etc/slurm.conf
# 1. no job may outlive slurmd (slurmstepd processes are not slurmd's children)
scancel --full -u root 2>/dev/null   # --full: also signal the batch shell
for i in $(seq 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
# 2. daemons, in reverse start order
for p in slurmd slurmctld slurmdbd mariadbd munged; do
  f=$D/run/$p.bgpid; [ -f "$f" ] || continue
  pid=$(cat "$f")
  kill -TERM "$pid" 2>/dev/null || { rm -f "$f"; continue; }
  for i in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then echo "$p ($pid) ignored TERM, sending KILL"; kill -KILL "$pid"; sleep 1; fi
  wait "$pid" 2>/dev/null; rm -f "$f"
done
# 3. check
left=$(ps -eo pid=,comm= | awk '$2 ~ /^(slurmctld|slurmd|slurmstepd|slurmdbd|munged|mariadbd)$/')
if [ -n "$left" ]; then echo "LEFT OVER:"; echo "$left"; exit 1; fi
echo "all stopped"
