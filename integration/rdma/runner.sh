#!/bin/bash
# Cargo runner: runs a test binary (and its arguments) inside a fresh qemu guest with Soft-RoCE,
# in the current directory, with the current environment; exits with the binary's exit code.
# Needs RDMA_QEMU_KERNEL and RDMA_QEMU_INITRD (made by qemu-test.sh).
set -u
OUT=$(mktemp -d)
# The guest's TMPDIR: a directory on the host's disk (O_DIRECT works there, not on tmpfs).
SCRATCH=$(mktemp -d -p /var/tmp ff-rdma-XXXXXX)
trap 'rm -rf "$OUT" "$SCRATCH"' EXIT
{
    echo '#!/bin/bash'
    export -p | grep -vE '^declare -x (PWD|OLDPWD|SHLVL|TMPDIR|HOME|TERM)='
    printf 'cd %q || exit 126\nexec' "$PWD"
    printf ' %q' "$@"
    echo
} > "$OUT/run.sh"
chmod +x "$OUT/run.sh"
# TCG only: this machine's /dev/kvm runs PVM guests alone (../shared/rdma-in-qemu.md).
timeout "${RDMA_QEMU_TIMEOUT:-900}" qemu-system-x86_64 -accel tcg -cpu max -m 2048 -smp 2 \
    -kernel "$RDMA_QEMU_KERNEL" -initrd "$RDMA_QEMU_INITRD" \
    -append "console=ttyS0 quiet panic=-1 rdma_run=$OUT/run.sh rdma_out=$OUT rdma_scratch=1" \
    -nic user,model=virtio-net-pci -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$OUT,mount_tag=out,security_model=none" \
    -virtfs "local,path=$SCRATCH,mount_tag=scratch,security_model=none" \
    -display none -vga none -serial stdio -monitor none -no-reboot </dev/null | stdbuf -oL tr -d '\r'
rc=${PIPESTATUS[0]}
if (( rc & 1 )); then exit $((rc >> 1)); fi
echo "the guest gave no status (qemu rc=$rc)" >&2
exit 125
