//! Damage and hostile input: every flipped bit and every truncation is detected, sizes
//! from the file are never trusted, version and kind rules hold.

use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};
use vmpack_formats::pack::*;

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn text(n: usize) -> Vec<u8> {
    b"all work and no play makes jack a dull boy\n"
        .iter()
        .cycle()
        .take(n)
        .copied()
        .collect()
}

/// A small pack (~15-30 KiB) with every codec, a zero chunk and several sections.
fn small_pack(aligned: bool) -> Vec<u8> {
    let opts = WriteOptions {
        compression: Compression::Zstd,
        level: None,
        aligned,
        chunk_size: 4096,
        threads: 2,
    };
    let mut w = PackWriter::new(Vec::new(), opts).unwrap();
    let manifest = serde_json::to_vec(&json!({"name": "vm", "memory_mib": 16})).unwrap();
    w.add_section(kind::MANIFEST, "manifest", json!({"v": 1}), &manifest, &())
        .unwrap();
    let mut disk = text(4096);
    disk.extend(vec![0u8; 4096]);
    disk.extend(noise(4096, 5));
    disk.extend(text(100));
    w.add_section_with(
        kind::DISK,
        "disk0",
        json!({"format": "raw"}),
        &disk,
        4096,
        Compression::Deflate,
        &(),
    )
    .unwrap();
    w.add_section(kind::FILE, "kernel", json!({}), &text(3000), &())
        .unwrap();
    let mut mem = noise(8192, 11);
    mem.extend(vec![0u8; 4096]);
    w.add_section_with(
        kind::MEMORY,
        "mem",
        json!({"gpa": 0}),
        &mem,
        4096,
        Compression::None,
        &(),
    )
    .unwrap();
    w.finish_into_inner().unwrap().1
}

fn stream_all(bytes: &[u8]) -> Result<PackSummary, PackError> {
    let mut s = StreamReader::new(bytes, "stream")?;
    loop {
        if let StreamEvent::End(sum) = s.next_event()? {
            return Ok(sum);
        }
    }
}

/// Recomputes the trailer's root digest after a deliberate index edit, so the edit
/// reaches the index checks instead of failing the digest.
fn reseal(b: &mut [u8]) {
    let t = b.len() - 64;
    let off = u64::from_le_bytes(b[t + 8..t + 16].try_into().unwrap()) as usize;
    let len = u64::from_le_bytes(b[t + 16..t + 24].try_into().unwrap()) as usize;
    let d: [u8; 32] = Sha256::digest(&b[off..off + len]).into();
    b[t + 24..t + 56].copy_from_slice(&d);
}

fn index_offset(b: &[u8]) -> usize {
    let t = b.len() - 64;
    u64::from_le_bytes(b[t + 8..t + 16].try_into().unwrap()) as usize
}

fn open_bytes(dir: &Path, b: &[u8]) -> Result<PackReader, PackError> {
    let p = dir.join("x.vmpack");
    std::fs::write(&p, b).unwrap();
    PackReader::open(&p)
}

#[test]
fn every_bit_flip_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    for aligned in [false, true] {
        let orig = small_pack(aligned);
        assert!(orig.len() > 12_000, "{}", orig.len());
        let r = open_bytes(dir.path(), &orig).unwrap();
        r.verify(&()).unwrap();
        stream_all(&orig).unwrap();
        // (frame start, frame end, section name, seq) of every chunk.
        let mut chunk_frames = Vec::new();
        for s in r.sections() {
            for c in r.chunks(s.id) {
                chunk_frames.push((
                    c.frame_offset(),
                    c.payload_offset + c.clen as u64,
                    s.name.clone(),
                    c.seq,
                ));
            }
        }
        drop(r);
        let path = dir.path().join("flip.vmpack");
        let mut b = orig.clone();
        for i in 0..orig.len() {
            let bit = 1u8 << (i % 8);
            b[i] ^= bit;
            std::fs::write(&path, &b).unwrap();
            let in_chunk = chunk_frames
                .iter()
                .find(|(s, e, _, _)| (*s..*e).contains(&(i as u64)));
            match PackReader::open(&path) {
                Err(e) => {
                    assert!(
                        in_chunk.is_none(),
                        "open failed for a flip in a chunk at {i}: {e}"
                    );
                    assert!(e.is_corruption(), "{e}");
                }
                Ok(r) => {
                    let e = r
                        .verify(&())
                        .expect_err(&format!("flip at {i} (aligned={aligned}) not detected"));
                    if let Some((_, _, name, seq)) = in_chunk {
                        assert_eq!(e.section.as_deref(), Some(name.as_str()), "at {i}: {e}");
                        assert_eq!(e.chunk, Some(*seq), "at {i}: {e}");
                        assert!(e
                            .to_string()
                            .contains(&format!("section '{name}' chunk {seq}")));
                    }
                }
            }
            assert!(stream_all(&b).is_err(), "stream missed flip at {i}");
            b[i] ^= bit;
        }
    }
}

#[test]
fn every_truncation_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let orig = small_pack(false);
    for n in 0..orig.len() {
        let b = &orig[..n];
        assert!(
            open_bytes(dir.path(), b).is_err(),
            "open accepted {n} bytes"
        );
        let e = stream_all(b).expect_err("stream accepted a truncated pack");
        assert!(
            matches!(e.kind, PackErrorKind::Truncated) || n >= orig.len() - 64,
            "{n}: {e}"
        );
    }
    // And trailing garbage.
    let mut long = orig.clone();
    long.push(0);
    assert!(open_bytes(dir.path(), &long).is_err());
    assert!(stream_all(&long).is_err());
}

#[test]
fn error_message_names_file_section_chunk_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = small_pack(false);
    let r = open_bytes(dir.path(), &b).unwrap();
    let disk = r.section("disk0").unwrap().id;
    let c = r.chunks(disk)[2].clone();
    assert_eq!(c.codec, Codec::None); // the noise chunk
    drop(r);
    b[c.payload_offset as usize + 10] ^= 0x40;
    let r = open_bytes(dir.path(), &b).unwrap();
    let e = r.verify(&()).unwrap_err();
    let want = format!(
        "x.vmpack: section 'disk0' chunk 2 (file offset {}): checksum mismatch",
        c.frame_offset()
    );
    assert!(e.to_string().contains(&want), "{e}");
    let mut out = vec![0u8; c.ulen as usize];
    assert!(r.read_chunk(&c, true, &mut out).is_err());
    // Without verification the damaged bytes are returned (no hash cost), by design.
    r.read_chunk(&c, false, &mut out).unwrap();
}

#[test]
fn hostile_index_sizes_refused() {
    let dir = tempfile::tempdir().unwrap();
    let orig = small_pack(false);
    let io = index_offset(&orig);
    let body = io + 8;
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let edits: Vec<(&str, Edit)> = vec![
        (
            "section count",
            Box::new(move |b: &mut Vec<u8>| {
                b[body + 32..body + 36].copy_from_slice(&u32::MAX.to_le_bytes())
            }),
        ),
        (
            "chunk count",
            Box::new(move |b: &mut Vec<u8>| {
                b[body + 40..body + 48].copy_from_slice(&u64::MAX.to_le_bytes())
            }),
        ),
        (
            "section size",
            Box::new(move |b: &mut Vec<u8>| {
                // First descriptor starts at body + 48; size at +16.
                b[body + 48 + 16..body + 48 + 24].copy_from_slice(&(1u64 << 60).to_le_bytes())
            }),
        ),
        (
            "meta length",
            Box::new(move |b: &mut Vec<u8>| {
                b[body + 48 + 12..body + 48 + 16].copy_from_slice(&u32::MAX.to_le_bytes())
            }),
        ),
        (
            "chunk size",
            Box::new(move |b: &mut Vec<u8>| {
                b[body + 48 + 8..body + 48 + 12].copy_from_slice(&u32::MAX.to_le_bytes())
            }),
        ),
        (
            "frame offset",
            Box::new(move |b: &mut Vec<u8>| {
                b[body + 48 + 24..body + 48 + 32].copy_from_slice(&u64::MAX.to_le_bytes())
            }),
        ),
        (
            "index length",
            Box::new(move |b: &mut Vec<u8>| {
                let t = b.len() - 64;
                b[t + 16..t + 24].copy_from_slice(&(u64::MAX / 2).to_le_bytes())
            }),
        ),
        (
            "index frame length",
            Box::new(move |b: &mut Vec<u8>| {
                b[io + 4..io + 8].copy_from_slice(&u32::MAX.to_le_bytes())
            }),
        ),
    ];
    for (what, edit) in &edits {
        let mut b = orig.clone();
        edit(&mut b);
        if *what != "index length" {
            reseal(&mut b);
        }
        let e = open_bytes(dir.path(), &b).expect_err(what);
        assert!(e.is_corruption(), "{what}: {e}");
    }
    // Chunk entry: clen huge (first chunk entry follows the section descriptors).
    let r = open_bytes(dir.path(), &orig).unwrap();
    let mut desc_len = 0;
    for s in r.sections() {
        desc_len += 56 + s.name.len() + serde_json::to_vec(&s.meta).unwrap().len();
    }
    let first_chunk = body + 48 + desc_len;
    let mut b = orig.clone();
    b[first_chunk + 12..first_chunk + 16].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
    reseal(&mut b);
    assert!(open_bytes(dir.path(), &b).is_err());
}

#[test]
fn hostile_stream_frames_refused() {
    let orig = small_pack(false);
    // The first SECT frame starts right after the 32-byte header.
    let mut b = orig.clone();
    b[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = stream_all(&b).unwrap_err();
    assert!(matches!(e.kind, PackErrorKind::Limit(_)), "{e}");
    // A PAD frame claiming 4 GiB.
    let mut b = orig[..32].to_vec();
    b.extend_from_slice(b"PAD ");
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    b.extend_from_slice(&orig[32..]);
    assert!(stream_all(&b).is_err());
    // Garbage frame tag.
    let mut b = orig.clone();
    b[32..36].copy_from_slice(b"EVIL");
    let e = stream_all(&b).unwrap_err();
    assert!(e.to_string().contains("unknown frame tag"), "{e}");
}

fn pack_with_kind(k: u16) -> Vec<u8> {
    let mut w = PackWriter::new(Vec::new(), WriteOptions::default()).unwrap();
    w.add_section(kind::DISK, "disk0", json!({}), &text(5000), &())
        .unwrap();
    w.add_section(k, "future", json!({"x": 1}), &text(700), &())
        .unwrap();
    w.add_section(kind::VMSTATE, "state", json!({}), &noise(300, 1), &())
        .unwrap();
    w.finish_into_inner().unwrap().1
}

#[test]
fn unknown_optional_kind_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let b = pack_with_kind(0x8123);
    let r = open_bytes(dir.path(), &b).unwrap();
    assert_eq!(r.sections().len(), 3);
    assert!(kind::is_optional(r.sections()[1].kind));
    r.verify(&()).unwrap();
    let mut s = StreamReader::new(&b[..], "s").unwrap();
    let mut seen = Vec::new();
    loop {
        match s.next_event().unwrap() {
            StreamEvent::Section(i) => seen.push(i.name.clone()),
            StreamEvent::Chunk { section, .. } => assert_ne!(section, 1),
            StreamEvent::SectionEnd(id) => assert_ne!(id, 1),
            StreamEvent::End(sum) => {
                assert_eq!(sum.sections.len(), 3);
                break;
            }
        }
    }
    assert_eq!(seen, vec!["disk0", "state"]);
}

#[test]
fn unknown_required_kind_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = pack_with_kind(0x7001);
    let e = open_bytes(dir.path(), &b).unwrap_err();
    assert!(
        matches!(e.kind, PackErrorKind::UnknownRequiredKind(0x7001)),
        "{e}"
    );
    assert!(
        e.to_string().contains("future") && e.to_string().contains("0x7001"),
        "{e}"
    );
    let e = stream_all(&b).unwrap_err();
    assert!(
        matches!(e.kind, PackErrorKind::UnknownRequiredKind(0x7001)),
        "{e}"
    );
}

/// Rewrites the header version and re-seals header digest and root digest.
fn with_version(orig: &[u8], major: u16, minor: u16) -> Vec<u8> {
    let mut b = orig.to_vec();
    b[8..10].copy_from_slice(&major.to_le_bytes());
    b[10..12].copy_from_slice(&minor.to_le_bytes());
    let hd: [u8; 32] = Sha256::digest(&b[..32]).into();
    let io = index_offset(&b);
    b[io + 8..io + 40].copy_from_slice(&hd);
    reseal(&mut b);
    b
}

#[test]
fn version_rules() {
    let dir = tempfile::tempdir().unwrap();
    let orig = small_pack(false);
    let newer = with_version(&orig, FORMAT_MAJOR, FORMAT_MINOR + 3);
    let r = open_bytes(dir.path(), &newer).unwrap();
    assert_eq!(r.version(), (FORMAT_MAJOR, FORMAT_MINOR + 3));
    r.verify(&()).unwrap();
    stream_all(&newer).unwrap();
    for major in [0, FORMAT_MAJOR + 1] {
        let other = with_version(&orig, major, 0);
        let e = open_bytes(dir.path(), &other).unwrap_err();
        assert!(
            matches!(e.kind, PackErrorKind::UnsupportedVersion { .. }),
            "{e}"
        );
        let e = stream_all(&other).unwrap_err();
        assert!(
            matches!(e.kind, PackErrorKind::UnsupportedVersion { .. }),
            "{e}"
        );
    }
    // Text-mode damage (LF -> CRLF) breaks the magic.
    let mut crlf = orig[..7].to_vec();
    crlf.extend_from_slice(b"\r\n");
    crlf.extend_from_slice(&orig[8..]);
    let e = open_bytes(dir.path(), &crlf).unwrap_err();
    assert!(matches!(e.kind, PackErrorKind::BadMagic), "{e}");
    let e = open_bytes(dir.path(), b"hello world, this is not a pack at all......").unwrap_err();
    assert!(matches!(e.kind, PackErrorKind::BadMagic), "{e}");
}
