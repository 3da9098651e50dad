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
# The virtio-net tests make network namespaces and taps (tests/tests/net.rs).
command -v ip >/dev/null || need+=(iproute2)
# The ACPI tables are checked with ACPICA's disassembler (vmboot/src/acpi.rs).
command -v iasl >/dev/null || need+=(acpica-tools)
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

# The export/import tests check each format with its own ecosystem's tool (tests/tests/
# interchange.rs): libvirt (virsh, virt-xml-validate, libvirtd, virtlogd, QEMU), Vagrant,
# virt-v2v. About 30 s to install here. A failed install fails the run: those tests must not
# pass without their oracle.
ic=()
command -v virsh >/dev/null || ic+=(libvirt-clients)
command -v libvirtd >/dev/null || ic+=(libvirt-daemon-system libvirt-daemon-driver-qemu)
command -v xmllint >/dev/null || ic+=(libxml2-utils)
command -v qemu-system-x86_64 >/dev/null || ic+=(qemu-system-x86)
command -v vagrant >/dev/null || ic+=(vagrant)
command -v virt-v2v >/dev/null || ic+=(virt-v2v)
if [ ${#ic[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing tools for the export/import tests (${ic[*]}): install them with apt-get, or run as root" >&2
    exit 1
  fi
  echo "== installing the export/import oracles: ${ic[*]}"
  start=$(date +%s)
  apt-get update -qq
  # Debian's QEMU system emulator conflicts with a newer qemu-utils from backports: take
  # bookworm's qemu-utils along (qemu-img 7.2 reads and writes every format the tests use).
  extra=()
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -s -qq --no-install-recommends "${ic[@]}" >/dev/null 2>&1; then
    extra=(--allow-downgrades "qemu-utils/$(. /etc/os-release && echo "$VERSION_CODENAME")")
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${extra[@]}" "${ic[@]}" >/dev/null
  echo "== installed in $(( $(date +%s) - start )) s"
fi

# The Rust test guest (samples/guests/rs, tests/tests/rs_guest.rs) is no_std on the
# x86_64-unknown-none target; built once here, so a build failure shows up on its own.
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx x86_64-unknown-none; then
  echo "== installing the Rust target x86_64-unknown-none"
  rustup target add x86_64-unknown-none
fi
bash samples/guests/rs/build.sh

if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
  echo "== /dev/kvm is available: KVM tests will run"
else
  echo "== /dev/kvm is NOT available: KVM tests will print SKIPPED"
fi

# The Linux test boots Debian's stock cloud kernel; fetch it once (apt-get download, no install).
if [ "${VMPACK_SKIP_LINUX:-0}" != 1 ]; then
  bash samples/linux/fetch-kernel.sh || echo "== could not fetch the Debian kernel: the Linux test will print SKIPPED"
fi

# Exactly the README's first command: same profile, same packages, same feature set, so a
# machine that ran it rebuilds nothing here (`cargo build -p X` could unify features
# differently and rebuild dependencies). The tests use these binaries (target/debug).
cargo build --workspace --all-targets

# Fuzz smoke run (under 60 s): each fuzz target, as the build above made it (libFuzzer
# without coverage instrumentation), runs random inputs for 6 s. The long instrumented runs
# are in docs/TESTING.md, "Fuzzing".
fuzz_tmp=$(mktemp -d)
trap 'rm -rf "$fuzz_tmp"' EXIT
for t in pack_reader vmdk_reader interchange_xml vm_pack_open unpack_sandbox stream_vs_random restore_check; do
  if ! TMPDIR="$fuzz_tmp" "${CARGO_TARGET_DIR:-target}/debug/$t" -max_total_time=6 -seed=1 \
      -artifact_prefix="$fuzz_tmp/" >"$fuzz_tmp/$t.log" 2>&1; then
    tail -30 "$fuzz_tmp/$t.log" >&2
    echo "== fuzz smoke run: $t FAILED" >&2
    exit 1
  fi
  echo "== fuzz smoke run: $t: $(grep -o 'Done [0-9]* runs' "$fuzz_tmp/$t.log")"
done

cargo test --workspace -- --test-threads=2
