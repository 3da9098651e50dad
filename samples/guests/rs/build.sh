#!/usr/bin/env bash
# Builds the Rust guest into flat images: samples/guests/bin/rsblk.bin, rsblkbench.bin, rsnet.bin, rsvsock.bin and rsclone.bin
# (load and entry address 0x100000, long mode). Needs the x86_64-unknown-none target
# (`rustup target add x86_64-unknown-none`; scripts/test-all.sh installs it) and objcopy.
# The ELF files stay in target/rs-guest/x86_64-unknown-none/release/ at the top of the
# repository (RSGUEST_TARGET_DIR overrides). The e2e tests (tests/tests/rs_guest.rs) run this.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
out="$root/samples/guests/bin"
export CARGO_TARGET_DIR="${RSGUEST_TARGET_DIR:-$root/target/rs-guest}"
# The guest's own .cargo/config.toml sets the target and its flags; flags from a calling
# cargo (e.g. `cargo test` running this) would replace them.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET CARGO_BUILD_RUSTFLAGS
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx x86_64-unknown-none; then
  echo "rsguest: the Rust target x86_64-unknown-none is not installed; run: rustup target add x86_64-unknown-none" >&2
  exit 1
fi
cd "$here"
cargo build --release --locked --quiet
mkdir -p "$out"
# vmboot's build script watches samples/guests: a file there is replaced only when its bytes
# change, so a rebuild that changed nothing does not make cargo rebuild vmboot.
for b in rsblk rsblkbench rsnet rsvsock rsclone; do
  flat="$CARGO_TARGET_DIR/$b.bin"
  objcopy -O binary "$CARGO_TARGET_DIR/x86_64-unknown-none/release/$b" "$flat"
  if ! cmp -s "$flat" "$out/$b.bin"; then
    tmp="$(mktemp "$out/.$b.XXXXXX")"
    cat "$flat" > "$tmp"
    chmod 644 "$tmp"
    mv -f "$tmp" "$out/$b.bin"
  fi
done
