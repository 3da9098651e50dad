#!/bin/sh
# Save/restore benchmark: vmpack (vmboot) against QEMU on Linux guests of 256 MiB, 1 GiB and
# 4 GiB, nearly empty and holding ~600 MB of data (150 MB in the 256 MiB guest).
#
#   scripts/bench-snapshot.sh [--quick] [--sizes 256,1024] [--compress none,zstd] [--no-qemu]
#
# Needs /dev/kvm, the Debian kernel (fetched here) and, for the QEMU columns,
# qemu-system-x86_64 (apt-get install qemu-system-x86); without it they read SKIPPED.
# Runs for a few minutes and needs ~3 GB free in the temp folder (or --dir DIR).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash samples/linux/fetch-kernel.sh >&2
cargo build --release -p vmpack -p vmboot >&2
exec target/release/vmpack bench-snapshot --kernel samples/linux/out/vmlinuz "$@"
