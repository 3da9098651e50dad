//! The uncompressed ELF `vmlinux` inside a bzImage, for VMMs that load only ELF kernels
//! (Firecracker on x86-64). The boot protocol (2.08+) gives the payload's offset and
//! length in the setup header; the payload is the compressed vmlinux followed by its
//! uncompressed size (4 bytes, little-endian).

use std::io::Read;

/// Largest vmlinux produced (the pack's boot file limit).
pub const MAX_VMLINUX: u64 = crate::vm::MAX_BOOT_FILE_LEN;

const ELF_MAGIC: &[u8] = b"\x7fELF";

/// What kind of kernel image `k` is.
#[derive(Debug, PartialEq, Eq)]
pub enum KernelKind {
    Elf,
    BzImage,
    Unknown,
}

pub fn kind(k: &[u8]) -> KernelKind {
    if k.starts_with(ELF_MAGIC) {
        KernelKind::Elf
    } else if k.len() > 0x210 && &k[0x202..0x206] == b"HdrS" {
        KernelKind::BzImage
    } else {
        KernelKind::Unknown
    }
}

/// The ELF vmlinux of a kernel image: an ELF image as is, a bzImage's decompressed
/// payload. Errors say what was found and what to do.
pub fn vmlinux(k: &[u8]) -> Result<Vec<u8>, String> {
    match kind(k) {
        KernelKind::Elf => {
            check_elf(k)?;
            Ok(k.to_vec())
        }
        KernelKind::Unknown => Err("neither an ELF vmlinux nor a bzImage".into()),
        KernelKind::BzImage => {
            let version = u16::from_le_bytes([k[0x206], k[0x207]]);
            if version < 0x0208 {
                return Err(format!(
                    "bzImage boot protocol {}.{:02} has no payload fields (2.08 or later needed)",
                    version >> 8,
                    version & 0xff
                ));
            }
            let setup_sects = match k[0x1f1] {
                0 => 4,
                n => n as usize,
            };
            let pm_start = (setup_sects + 1) * 512;
            let off = u32::from_le_bytes(k[0x248..0x24c].try_into().expect("4")) as usize;
            let len = u32::from_le_bytes(k[0x24c..0x250].try_into().expect("4")) as usize;
            let payload = pm_start
                .checked_add(off)
                .and_then(|s| Some(s..s.checked_add(len)?))
                .and_then(|r| k.get(r))
                .ok_or("bzImage payload lies outside the file")?;
            if payload.len() < 8 {
                return Err("bzImage payload is empty".into());
            }
            let (data, size) = payload.split_at(payload.len() - 4);
            let size = u32::from_le_bytes(size.try_into().expect("4")) as u64;
            if size > MAX_VMLINUX {
                return Err(format!(
                    "vmlinux of {size} bytes exceeds the {MAX_VMLINUX}-byte limit"
                ));
            }
            let out = decompress(data, size)?;
            check_elf(&out)?;
            Ok(out)
        }
    }
}

fn check_elf(e: &[u8]) -> Result<(), String> {
    if e.len() < 64 || !e.starts_with(ELF_MAGIC) {
        return Err("the decompressed payload is not an ELF image".into());
    }
    if e[4] != 2 || u16::from_le_bytes([e[18], e[19]]) != 62 {
        return Err("not a 64-bit x86-64 ELF kernel".into());
    }
    Ok(())
}

fn decompress(data: &[u8], size: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(size as usize);
    let bounded = |r: &mut dyn Read, out: &mut Vec<u8>| -> Result<(), String> {
        r.take(size + 1)
            .read_to_end(out)
            .map_err(|e| format!("decompressing the bzImage payload: {e}"))?;
        Ok(())
    };
    match data {
        [0x1f, 0x8b, ..] => bounded(&mut flate2::read::GzDecoder::new(data), &mut out)?,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => bounded(
            &mut zstd::stream::read::Decoder::new(data).map_err(|e| e.to_string())?,
            &mut out,
        )?,
        [0x02, 0x21, 0x4c, 0x18, ..] => lz4_legacy(&data[4..], size, &mut out)?,
        _ => {
            let name = match data {
                [0xfd, b'7', b'z', b'X', b'Z', ..] => "xz",
                [b'B', b'Z', b'h', ..] => "bzip2",
                [0x5d, 0x00, 0x00, ..] => "lzma",
                [0x89, b'L', b'Z', b'O', ..] => "lzo",
                _ => "an unknown method",
            };
            return Err(format!(
                "the bzImage payload is compressed with {name}; extract the vmlinux with the kernel's scripts/extract-vmlinux and pack that instead"
            ));
        }
    }
    if out.len() as u64 != size {
        return Err(format!(
            "the payload decompressed to {} bytes, its trailer says {size}",
            out.len()
        ));
    }
    Ok(out)
}

/// LZ4 legacy frames (`lz4 -l`, what the kernel build uses): blocks of a 32-bit
/// compressed size and data, each decompressing to at most 8 MiB.
fn lz4_legacy(mut d: &[u8], size: u64, out: &mut Vec<u8>) -> Result<(), String> {
    const BLOCK: usize = 8 << 20;
    while d.len() >= 4 {
        let n = u32::from_le_bytes(d[..4].try_into().expect("4")) as usize;
        if n == 0x184c_2102 {
            d = &d[4..];
            continue;
        }
        if n == 0 || n > d.len() - 4 {
            break;
        }
        let start = out.len();
        if start as u64 >= size {
            return Err("the LZ4 payload holds more data than its trailer says".into());
        }
        out.resize(start + BLOCK.min((size as usize - start).max(1)), 0);
        let got = lz4_flex::block::decompress_into(&d[4..4 + n], &mut out[start..])
            .map_err(|e| format!("LZ4 block: {e}"))?;
        out.truncate(start + got);
        d = &d[4 + n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut k = vec![0u8; 5 * 512];
        k[0x1f1] = 4;
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        k[0x248..0x24c].copy_from_slice(&100u32.to_le_bytes());
        k[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        k.resize(5 * 512 + 100, 0xcc);
        k.extend_from_slice(payload);
        k.extend_from_slice(&[0xcc; 300]);
        k
    }

    fn elf() -> Vec<u8> {
        let mut e = vec![0u8; 200_000];
        e[..4].copy_from_slice(ELF_MAGIC);
        e[4] = 2;
        e[18] = 62;
        for (i, b) in e[64..].iter_mut().enumerate() {
            *b = (i % 97) as u8;
        }
        e
    }

    #[test]
    fn gzip_and_lz4_payloads() {
        let e = elf();
        let mut gz = Vec::new();
        {
            let mut w = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::fast());
            std::io::Write::write_all(&mut w, &e).unwrap();
            w.finish().unwrap();
        }
        gz.extend_from_slice(&(e.len() as u32).to_le_bytes());
        assert_eq!(vmlinux(&fake_bzimage(&gz)).unwrap(), e);

        let mut lz = vec![0x02, 0x21, 0x4c, 0x18];
        for part in e.chunks(150_000) {
            let c = lz4_flex::block::compress(part);
            lz.extend_from_slice(&(c.len() as u32).to_le_bytes());
            lz.extend_from_slice(&c);
        }
        lz.extend_from_slice(&(e.len() as u32).to_le_bytes());
        assert_eq!(vmlinux(&fake_bzimage(&lz)).unwrap(), e);
        assert_eq!(vmlinux(&e).unwrap(), e);
        let e2 = vmlinux(&fake_bzimage(b"\xfd7zXZ\0aaaa\x10\0\0\0")).unwrap_err();
        assert!(e2.contains("xz"), "{e2}");
    }
}
