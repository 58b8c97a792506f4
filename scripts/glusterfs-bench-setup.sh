#!/usr/bin/env bash
# Sets up GlusterFS as `fs3 bench fs --gluster` compares against: Debian's glusterfs-server,
# one replica-3 volume of three bricks on this host (on the same disk as fs3's targets), mounted
# with the GlusterFS FUSE client. Run as root. Idempotent; `--teardown` removes it all.
#
#   scripts/glusterfs-bench-setup.sh [BRICK_ROOT] [MOUNTPOINT]
#   fs3 bench fs --gluster /mnt/gluster-bench
set -euo pipefail

BRICKS=${1:-/var/lib/fs3-bench/gluster-bricks}
MOUNT=${2:-/mnt/gluster-bench}
VOLUME=fs3bench

if [ "${1:-}" = "--teardown" ]; then
  umount "$MOUNT" 2>/dev/null || umount -l "$MOUNT" 2>/dev/null || true
  gluster --mode=script volume stop "$VOLUME" force 2>/dev/null || true
  gluster --mode=script volume delete "$VOLUME" 2>/dev/null || true
  pkill glusterd || true
  rm -rf "$BRICKS"
  exit 0
fi

if ! command -v glusterd >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends glusterfs-server glusterfs-client >/dev/null
fi

# glusterd without systemd (containers and CI machines often have none).
if ! pgrep -x glusterd >/dev/null; then
  glusterd --log-level=WARNING
  for _ in $(seq 1 50); do gluster --mode=script peer status >/dev/null 2>&1 && break; sleep 0.2; done
fi

if ! gluster --mode=script volume info "$VOLUME" >/dev/null 2>&1; then
  host=$(hostname)
  mkdir -p "$BRICKS"/b1 "$BRICKS"/b2 "$BRICKS"/b3
  # Three bricks on one host: `force` acknowledges that replicas share a machine.
  gluster --mode=script volume create "$VOLUME" replica 3 \
    "$host:$BRICKS/b1" "$host:$BRICKS/b2" "$host:$BRICKS/b3" force
fi
gluster --mode=script volume start "$VOLUME" force >/dev/null 2>&1 || true

mkdir -p "$MOUNT"
if ! mountpoint -q "$MOUNT"; then
  mount -t glusterfs "localhost:/$VOLUME" "$MOUNT"
fi
echo "GlusterFS $(gluster --version | head -1 | awk '{print $2}') volume $VOLUME (replica 3) mounted at $MOUNT"
