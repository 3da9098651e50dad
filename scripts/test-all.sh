#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what the tests need, then
# `cargo test`. KVM tests run where /dev/kvm opens and say SKIPPED loudly where it does not.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v as >/dev/null || need+=(binutils)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v zstd >/dev/null || need+=(zstd)
command -v cpio >/dev/null || need+=(cpio)
command -v lz4 >/dev/null || need+=(lz4)
command -v curl >/dev/null || need+=(curl)
command -v strace >/dev/null || need+=(strace)
command -v sha256sum >/dev/null || need+=(coreutils)
# The registry tests: a local OCI registry, an independent reader, auth files, SSH signatures.
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v skopeo >/dev/null || need+=(skopeo)
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing tools (${need[*]}): install them with apt-get, or run as root" >&2
    exit 1
  fi
fi

if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
  echo "== /dev/kvm is available: KVM tests will run"
else
  echo "== /dev/kvm is NOT available: KVM tests will print SKIPPED"
fi

# The Linux test boots Debian's stock cloud kernel; fetch it once (apt-get download, no install).
if [ "${VMPACK_SKIP_LINUX:-0}" != 1 ]; then
  bash samples/linux/fetch-kernel.sh || echo "== could not fetch the Debian kernel: the Linux test will print SKIPPED"
fi

cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=2
