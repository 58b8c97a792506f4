#!/usr/bin/env bash
# hfreduce next to Open MPI at its best, on this machine: installs Open MPI from apt, builds
# mpi_allreduce.c, runs MPI_Allreduce (f32 sum) with the same rank count over TCP loopback
# (--mca btl self,tcp) and over shared memory (--mca btl self,vader), each stock and with
# glibc's malloc told not to mmap (which stops Open MPI re-faulting its scratch buffers on
# every call); takes the better of the two as the peer; then runs hfreduce-bench and prints
# hfreduce's busbw with the ratio to each peer at every size.
#
#   hfreduce/bench/compare-mpi.sh [NODES] [RANKS_PER_NODE] [MAX_BYTES]
set -euo pipefail
cd "$(dirname "$0")/../.."

NODES=${1:-2}
PER_NODE=${2:-2}
MAX=${3:-268435456}
RANKS=$((NODES * PER_NODE))
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if ! command -v mpicc >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev >/dev/null
fi
mpicc -O2 -o "$WORK/mpi_allreduce" hfreduce/bench/mpi_allreduce.c

MPIRUN=(mpirun --allow-run-as-root --oversubscribe -np "$RANKS")
TUNED="glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"
run_mpi() { # btl, tunables -> busbw per size on stdout ("size busbw")
  GLIBC_TUNABLES="$2" "${MPIRUN[@]}" -x GLIBC_TUNABLES --mca btl "$1" "$WORK/mpi_allreduce" 1048576 "$MAX" 5 \
    | awk 'NR > 1 { print $1, $5 }'
}
best_of() { # two "size busbw" files -> the better busbw per size
  join "$1" "$2" | awk '{ b = ($2 > $3) ? $2 : $3; print $1, b }'
}
run_mpi self,tcp "" > "$WORK/tcp-stock"
run_mpi self,tcp "$TUNED" > "$WORK/tcp-tuned"
run_mpi self,vader "" > "$WORK/shm-stock"
run_mpi self,vader "$TUNED" > "$WORK/shm-tuned"
best_of "$WORK/tcp-stock" "$WORK/tcp-tuned" > "$WORK/tcp"
best_of "$WORK/shm-stock" "$WORK/shm-tuned" > "$WORK/shm"

cargo build --release -q -p hfreduce
./target/release/hfreduce-bench --nodes "$NODES" --ranks-per-node "$PER_NODE" --max "$MAX" --ops allreduce --no-overlap \
  | awk '$1 ~ /^[0-9]+$/ { print $1, $6 }' > "$WORK/hfreduce"

echo "# allreduce f32 sum, $RANKS ranks ($NODES nodes x $PER_NODE); busbw GB/s; MPI = better of stock and no-mmap malloc"
printf "%12s %10s %10s %8s %10s %8s\n" size hfreduce mpi-tcp ratio mpi-shm ratio
join "$WORK/hfreduce" "$WORK/tcp" | join - "$WORK/shm" \
  | awk '{ printf "%12d %10.3f %10.3f %8.2f %10.3f %8.2f\n", $1, $2, $3, $2 / $3, $4, $2 / $4 }'
for f in tcp-stock tcp-tuned shm-stock shm-tuned; do
  echo "# MPI $f at the largest size: $(tail -1 "$WORK/$f" | awk '{ print $2 }') GB/s"
done
