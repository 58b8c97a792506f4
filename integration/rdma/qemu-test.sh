#!/bin/bash
# Runs fireflyer's RDMA tests on real verbs. This machine's kernel has no InfiniBand, but a stock
# Debian kernel under qemu has Soft-RoCE (rdma_rxe): this script installs what it needs, makes
# the guest (the Debian kernel, unpacked, and a busybox initramfs with the RDMA modules; cached
# in target/rdma-qemu), and runs every RDMA test binary inside its own guest through a cargo
# runner (runner.sh). Arguments go to the test binaries (e.g. a test name filter).
#
#   integration/rdma/qemu-test.sh            # every RDMA test
#   integration/rdma/qemu-test.sh --prepare  # only install and make the guest
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/integration/rdma
CACHE=${RDMA_QEMU_DIR:-$ROOT/target/rdma-qemu}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

PACKAGES=(qemu-system-x86 busybox-static cpio kmod rdma-core ibverbs-utils ibverbs-providers
    perftest rdmacm-utils libibverbs-dev librdmacm-dev libclang-dev iproute2)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -s "$CACHE/initrd.cpio.gz" ] || [ ! -s "$CACHE/kernel" ] || ! cmp -s "$HERE/init" "$CACHE/init"; then
    echo "making the guest in $CACHE"
    rm -rf "$CACHE" && mkdir -p "$CACHE" && cd "$CACHE"
    KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    K=${KPKG#linux-image-}
    apt-get download "$KPKG" >/dev/null
    dpkg-deb -x "${KPKG}"_*.deb kroot
    rm -f "${KPKG}"_*.deb
    depmod -b kroot "$K"
    R=$(mktemp -d)
    mkdir -p "$R"/{bin,etc,proc,sys,dev,newroot}
    cp /bin/busybox "$R/bin/"
    for a in $(busybox --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
    for m in crc32_generic virtio_pci virtio_net rdma_rxe rdma_ucm 9pnet_virtio 9p; do
        modprobe -d kroot -S "$K" --show-depends "$m" | awk '$1=="insmod"{print $2}'
    done | awk '!seen[$0]++' | while read -r ko; do
        rel=${ko#kroot}
        mkdir -p "$R$(dirname "$rel")"
        cp "$ko" "$R$rel"
        echo "$rel" >> "$R/etc/modules.order"
    done
    install -m755 "$HERE/init" "$R/init"
    (cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > initrd.cpio.gz
    rm -rf "$R"
    cp "kroot/boot/vmlinuz-$K" kernel
    cp "$HERE/init" init
    rm -rf kroot
    cd "$ROOT"
fi
[ "${1:-}" = "--prepare" ] && exit 0

export RDMA_QEMU_KERNEL=$CACHE/kernel RDMA_QEMU_INITRD=$CACHE/initrd.cpio.gz
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$HERE/runner.sh
cd "$ROOT"
# Each binary boots its own guest (~7 s); only the RDMA test binaries run there. ff-net's
# behaviour suite (tests/transport.rs) runs unchanged, over RDMA, and proves it did.
export FF_NET_EXPECT_RDMA=1
cargo test --release -p ff-net --features rdma --test rdma --test transport -- "$@"
# fs3: a 3-daemon chain and a client moving chunks over RDMA.
cargo test --release -p fs3 --features rdma --test rdma -- "$@"
# hfreduce: 2 nodes x 1 rank, RDMA against TCP, bit for bit.
cargo test --release -p hfreduce --features rdma --test ranks -- --exact allreduce_over_rdma_is_bit_identical_to_tcp
