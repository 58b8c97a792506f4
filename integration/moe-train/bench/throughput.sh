#!/usr/bin/env bash
# moe-train throughput on this machine: the default model trained by 1 rank, then by 2 ranks on
# 2 virtual nodes (hfreduce between them, one compute thread each), printing tokens/s and the
# per-step time in compute (forward + backward) and in the gradient allreduce.
#
#   integration/moe-train/bench/throughput.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/../../.."
STEPS=${1:-300}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cargo build --release -q -p moe-train
BIN=target/release/moe-train
$BIN prepare --out "$WORK/data" >/dev/null

summary() { # log -> "tokens/s compute allreduce", averaged over the progress lines after warm-up
  awk '/^step / && ++n > 2 { t += $6; c += $14; a += $16; k++ }
       END { printf "%.0f %.1f %.1f\n", t / k, c / k, a / k }' "$1"
}

$BIN train --data "$WORK/data" --checkpoint-dir "$WORK/c1" --steps "$STEPS" --checkpoint-every 0 \
  > "$WORK/one.log"
RAYON_NUM_THREADS=1 $BIN train --data "$WORK/data" --checkpoint-dir "$WORK/c3" --steps "$STEPS" \
  --checkpoint-every 0 > "$WORK/one-thread.log"
PORT=$((20000 + RANDOM % 20000))
for r in 0 1; do
  RANK=$r WORLD_SIZE=2 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT \
  HFREDUCE_NODE_ID=node$r RAYON_NUM_THREADS=1 \
  $BIN train --data "$WORK/data" --checkpoint-dir "$WORK/c2" --steps "$STEPS" --checkpoint-every 0 \
    > "$WORK/two-$r.log" &
done
wait
read -r T1 C1 A1 < <(sed 's/ms//g' "$WORK/one.log" > "$WORK/one.txt"; summary "$WORK/one.txt")
read -r T3 C3 A3 < <(sed 's/ms//g' "$WORK/one-thread.log" > "$WORK/one1.txt"; summary "$WORK/one1.txt")
read -r T2 C2 A2 < <(sed 's/ms//g' "$WORK/two-0.log" > "$WORK/two.txt"; summary "$WORK/two.txt")
printf '# moe-train, default model (dim 64, 2 layers, 8 experts top-2 + shared), batch 16 x 32 tokens per rank\n'
printf '%-32s %12s %14s %16s\n' setup tokens/s "compute ms" "allreduce ms"
printf '%-32s %12s %14s %16s\n' "1 rank (2 threads)" "$T1" "$C1" "$A1"
printf '%-32s %12s %14s %16s\n' "1 rank (1 thread)" "$T3" "$C3" "$A3"
printf '%-32s %12s %14s %16s\n' "2 ranks on 2 nodes (1 thread)" "$T2" "$C2" "$A2"
awk -v two="$T2" -v a="$T1" -v b="$T3" \
  'BEGIN { best = a > b ? a : b; printf "scaling, 2 ranks over the better single rank: %.2fx\n", two / best }'
