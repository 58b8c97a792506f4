#!/bin/bash
# ff-net over RDMA and over TCP inside the Soft-RoCE guest, beside perftest on the same guest
# (ib_write_bw and ib_read_bw for bandwidth, ib_send_lat for latency: the limits of this
# device). ff-net's write calls move their payload by RDMA READ (the server pulls), its read
# calls by RDMA WRITE (the server pushes). Both ends run
# in the guest over rxe0 (GID 1, ::ffff:10.0.2.15). Prints one line per measurement.
#
#   integration/rdma/bench.sh [--size BYTES] [--depth N] [--seconds S]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/integration/rdma
"$HERE/qemu-test.sh" --prepare
CACHE=${RDMA_QEMU_DIR:-$ROOT/target/rdma-qemu}
export RDMA_QEMU_KERNEL=$CACHE/kernel RDMA_QEMU_INITRD=$CACHE/initrd.cpio.gz
cd "$ROOT"
cargo build --release -q -p ff-net --features rdma --example netbench
BENCH=$ROOT/target/release/examples/netbench
SIZE=1048576
ARGS=("$@")
for ((i = 0; i < ${#ARGS[@]}; i++)); do
    [ "${ARGS[$i]}" = "--size" ] && SIZE=${ARGS[$((i + 1))]}
done
"$HERE/runner.sh" /bin/bash -c "
    set -e
    echo \"guest: \$(nproc) vCPUs (TCG), device \$(ls /sys/class/infiniband)\"
    perf() { # perftest server and client on the same device; the client's summary line
        timeout 60 \$1 -d rxe0 -x 1 \${@:2} >/dev/null 2>&1 &
        sleep 1
        timeout 60 \$1 -d rxe0 -x 1 \${@:2} 127.0.0.1 | grep -E '^ *[0-9]+ +[0-9]+' | tail -1
        wait
    }
    echo \"perftest ib_write_bw $SIZE B (bytes, iters, BW peak MB/s, BW avg MB/s, MPPS):\"
    perf ib_write_bw -s $SIZE -n 500
    echo \"perftest ib_read_bw $SIZE B (bytes, iters, BW peak MB/s, BW avg MB/s, MPPS):\"
    perf ib_read_bw -s $SIZE -n 500
    echo \"perftest ib_send_lat 8 B (bytes, iters, t_min, t_max, t_typical, t_avg, t_stdev, 99%, 99.9% us):\"
    perf ib_send_lat -s 8 -n 2000
    $BENCH --transport rdma ${*:-}
    $BENCH --transport tcp ${*:-}
"
