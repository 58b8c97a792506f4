#!/usr/bin/env bash
# hai next to Slurm on this machine: installs slurm-wlm and munge from apt, runs a single-node
# Slurm (slurmctld with its state saved to disk, as a production controller does), measures
# sbatch's acknowledged submissions per second with 1 client and with 64 concurrent clients
# (held jobs, so that only submission is measured — hai's rate passes queue jobs that cannot
# start either), then runs `hai bench` and prints both with the ratio.
#
#   scheduler/bench/compare-slurm.sh [SUBMISSIONS]
set -euo pipefail
cd "$(dirname "$0")/../.."

N=${1:-2000}
SINGLE=$((N / 4))
WORK=$(mktemp -d)
cleanup() {
  if [ -f "$WORK/slurmctld.pid" ]; then
    PID=$(cat "$WORK/slurmctld.pid")
    kill "$PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
  fi
  if [ -n "${MUNGE_PID:-}" ]; then
    kill "$MUNGE_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$MUNGE_PID" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge: a key and a daemon of our own.
mkdir -p "$WORK/munge" && chmod 700 "$WORK/munge"
dd if=/dev/urandom bs=1 count=1024 of="$WORK/munge/munge.key" 2>/dev/null
chmod 400 "$WORK/munge/munge.key"
munged --key-file="$WORK/munge/munge.key" --socket="$WORK/munge/socket" \
  --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/munge/munged.log" \
  --seed-file="$WORK/munge/seed" --force
MUNGE_PID=$(cat "$WORK/munge/munged.pid")

HOST=$(hostname)
CPUS=$(nproc)
cat > "$WORK/slurm.conf" <<CONF
ClusterName=bench
SlurmctldHost=$HOST
SlurmUser=root
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
AuthInfo=socket=$WORK/munge/socket
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmctldLogFile=$WORK/slurmctld.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
ReturnToService=2
MaxJobCount=100000
NodeName=$HOST CPUs=$CPUS State=UNKNOWN
PartitionName=bench Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
mkdir -p "$WORK/state" "$WORK/spool"
export SLURM_CONF="$WORK/slurm.conf"
slurmctld -f "$SLURM_CONF"
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
scontrol ping >/dev/null || { echo "slurmctld did not start:"; cat "$WORK/slurmctld.log"; exit 1; }

echo '#!/bin/sh' > "$WORK/job.sh"; echo 'true' >> "$WORK/job.sh"
submit() { sbatch --hold --quiet -o /dev/null "$WORK/job.sh" >/dev/null; }
export -f submit; export WORK
rate() { # clients, submissions -> submissions per second
  local start end
  start=$(date +%s.%N)
  seq "$2" | xargs -P "$1" -I{} bash -c submit
  end=$(date +%s.%N)
  echo "$2 / ($end - $start)" | bc -l
}
rate 4 40 >/dev/null # warm-up
SLURM_ONE=$(rate 1 "$SINGLE")
SLURM_MANY=$(rate 64 "$N")

cargo build --release -q -p hai
HAI_OUT=$(target/release/hai bench --dir "$WORK/hai" --submissions "$N")
echo "$HAI_OUT"
row() { # label, hai figure, slurm figure
  printf '%-34s %10.0f %10.0f %8.1f\n' "$1" "$2" "$3" "$(echo "$2 / $3" | bc -l)"
}
value() { echo "$HAI_OUT" | awk -v key="$1" 'index($0, key) { print $NF }'; }
printf '\n# acknowledged submissions/s (Slurm: sbatch --hold to a slurmctld saving state to disk)\n'
printf '%-34s %10s %10s %8s\n' "" hai slurm ratio
row "CLI process per job, 1 client" "$(value 'hai submit processes/s, 1 client')" "$SLURM_ONE"
row "CLI process per job, 64 clients" "$(value 'hai submit processes/s, 64 clients')" "$SLURM_MANY"
row "API (hai gRPC) vs sbatch, 1" "$(value 'submissions/s, 1 client')" "$SLURM_ONE"
row "API (hai gRPC) vs sbatch, 64" "$(value 'submissions/s, 64 clients')" "$SLURM_MANY"
