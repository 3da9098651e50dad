#!/bin/sh
# Fetch Debian's cloud kernel and build a tiny initramfs for samples/linux/linux.toml.
#
#   samples/linux/fetch-kernel.sh        # idempotent; FORCE=1 to redo
#
# Outputs (gitignored): out/vmlinuz (bzImage from the versioned
# linux-image-*-cloud-amd64 package) and out/initrd.img (newc cpio holding
# /dev/console and a static /init assembled from init.S that prints
# "vmpack-init: hello from the initramfs" and reboots).
# Needs: apt-get/apt-cache and dpkg-deb (Debian/Ubuntu), binutils (as, ld), python3.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out="$here/out"
mkdir -p "$out"

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "error: '$1' not found; $2" >&2; exit 1; }
}

if [ -s "$out/vmlinuz" ] && [ "${FORCE:-0}" != 1 ]; then
    echo "kernel: $out/vmlinuz (already present)"
else
    need apt-cache "this script needs a Debian-based system"
    need apt-get "this script needs a Debian-based system"
    need dpkg-deb "this script needs a Debian-based system"
    # The meta package only depends on the versioned image package, which
    # holds the kernel; resolve it rather than hard-coding a version.
    resolve() {
        apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ { print $2; exit }'
    }
    pkg=$(resolve || true)
    if [ -z "$pkg" ]; then
        echo "linux-image-cloud-amd64 not in the apt cache; running apt-get update" >&2
        apt-get update >&2 || { echo "error: apt-get update failed (run as root?)" >&2; exit 1; }
        pkg=$(resolve || true)
    fi
    [ -n "$pkg" ] || { echo "error: cannot resolve linux-image-cloud-amd64 to a versioned package" >&2; exit 1; }
    work=$(mktemp -d)
    # (As root, apt warns that the download runs unsandboxed: harmless.)
    trap 'rm -rf "$work"' EXIT
    echo "downloading $pkg" >&2
    (cd "$work" && apt-get download "$pkg" >&2)
    deb=$(ls "$work"/*.deb)
    dpkg-deb -x "$deb" "$work/root"
    kernel=$(ls "$work"/root/boot/vmlinuz-* 2>/dev/null | head -n 1)
    [ -n "$kernel" ] || { echo "error: $deb contains no boot/vmlinuz-*" >&2; exit 1; }
    cp "$kernel" "$out/vmlinuz.tmp"
    mv "$out/vmlinuz.tmp" "$out/vmlinuz"
    echo "$pkg" > "$out/kernel-package.txt"
    echo "kernel: $out/vmlinuz (from $pkg, $(basename "$kernel"))"
fi

if [ -s "$out/initrd.img" ] && [ "${FORCE:-0}" != 1 ] && [ "$out/initrd.img" -nt "$here/init.S" ]; then
    echo "initrd: $out/initrd.img (already present)"
else
    need as "install binutils"
    need ld "install binutils"
    need python3 "it writes the cpio archive"
    tmp=$(mktemp -d)
    as --64 -o "$tmp/init.o" "$here/init.S"
    ld -m elf_x86_64 -static -z noexecstack -e _start -o "$tmp/init" "$tmp/init.o"
    # python rather than cpio(1): the archive needs a /dev/console device
    # node, which cpio can only copy from a real node (mknod needs root).
    python3 - "$tmp/init" "$out/initrd.img.tmp" <<'PY'
import sys

def entry(ino, name, mode, data=b"", rdev=(0, 0)):
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08x" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)

init = open(sys.argv[1], "rb").read()
archive = (
    entry(1, "dev", 0o040755)
    + entry(2, "dev/console", 0o020600, rdev=(5, 1))
    + entry(3, "init", 0o100755, init)
    + entry(0, "TRAILER!!!", 0)
)
archive += b"\0" * (-len(archive) % 512)
open(sys.argv[2], "wb").write(archive)
PY
    mv "$out/initrd.img.tmp" "$out/initrd.img"
    rm -rf "$tmp"
    echo "initrd: $out/initrd.img"
fi
# The same kernel as an ELF vmlinux: Debian ships only the bzImage, whose payload is the
# LZ4-compressed vmlinux (what the kernel's scripts/extract-vmlinux does). It tests vmboot's
# ELF loader against a kernel nobody here wrote, and skips the minute of decompression.
if [ -s "$out/vmlinux" ] && [ "${FORCE:-0}" != 1 ] && [ "$out/vmlinux" -nt "$out/vmlinuz" ]; then
    echo "vmlinux: $out/vmlinux (already present)"
elif command -v lz4 >/dev/null && command -v python3 >/dev/null; then
    python3 - "$out/vmlinuz" "$out/vmlinux.lz4.tmp" <<'PY'
import sys
d = open(sys.argv[1], "rb").read()
i = d.find(b"\x02!L\x18")
if i < 0:
    sys.exit("no LZ4 payload in " + sys.argv[1])
open(sys.argv[2], "wb").write(d[i:])
PY
    # lz4 stops at the end of the frame and warns about the trailing bzImage bytes.
    lz4 -dc "$out/vmlinux.lz4.tmp" > "$out/vmlinux.tmp" 2>/dev/null || true
    rm -f "$out/vmlinux.lz4.tmp"
    if head -c 4 "$out/vmlinux.tmp" | grep -q "ELF"; then
        mv "$out/vmlinux.tmp" "$out/vmlinux"
        echo "vmlinux: $out/vmlinux"
    else
        rm -f "$out/vmlinux.tmp"
        echo "vmlinux: could not extract the ELF kernel (the ELF test will be SKIPPED)"
    fi
else
    echo "vmlinux: lz4 is missing (apt-get install lz4); the ELF test will be SKIPPED"
fi
echo "config: $here/linux.toml, $here/linux-elf.toml"
