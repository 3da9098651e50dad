//! The streaming reader and the random-access reader agree: a pack one accepts in full, the
//! other accepts too, with the same sections and the same bytes in every chunk.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use vmpack_formats::pack::{kind, Codec, PackReader, StreamEvent, StreamReader};

/// (section, offset, length, SHA-256 of the bytes or None for a zero chunk)
type Chunk = (u32, u64, usize, Option<[u8; 32]>);
/// (name, size) of every section, and every chunk.
type Content = (Vec<(String, u64)>, Vec<Chunk>);

fn stream(bytes: &[u8]) -> Option<Content> {
    let mut sr = StreamReader::new(bytes, "fuzz").ok()?;
    let mut chunks = Vec::new();
    loop {
        match sr.next_event().ok()? {
            StreamEvent::Section(_) | StreamEvent::SectionEnd(_) => {}
            StreamEvent::Chunk {
                section,
                offset,
                data,
                zero,
            } => {
                let h = if zero || data.iter().all(|&b| b == 0) {
                    None
                } else {
                    Some(Sha256::digest(data).into())
                };
                chunks.push((section, offset, data.len(), h));
            }
            StreamEvent::End(sum) => {
                let s = sum
                    .sections
                    .iter()
                    .map(|s| (s.name.clone(), s.size))
                    .collect();
                return Some((s, chunks));
            }
        }
    }
}

fn random(path: &std::path::Path) -> Option<Content> {
    let r = PackReader::open(path).ok()?;
    r.verify(&()).ok()?;
    let mut chunks = Vec::new();
    // The stream reader verifies sections of unknown optional kinds but emits nothing.
    for s in r.sections().iter().filter(|s| kind::is_known(s.kind)) {
        for e in r.chunks(s.id) {
            let h = if e.codec == Codec::Zero {
                None
            } else {
                let mut buf = vec![0u8; e.ulen as usize];
                r.read_chunk(e, true, &mut buf).ok()?;
                if buf.iter().all(|&b| b == 0) {
                    None
                } else {
                    Some(Sha256::digest(&buf).into())
                }
            };
            chunks.push((s.id, e.offset, e.ulen as usize, h));
        }
    }
    let s = r
        .sections()
        .iter()
        .map(|s| (s.name.clone(), s.size))
        .collect();
    Some((s, chunks))
}

fuzz_target!(|data: &[u8]| {
    let bytes = common::build(data);
    let Some(path) = common::to_file("stream", &bytes) else {
        return;
    };
    let (a, b) = (stream(&bytes), random(&path));
    match (&a, &b) {
        (Some(x), Some(y)) => assert!(x == y, "the readers disagree on the content"),
        (None, None) => {}
        _ => panic!(
            "one reader accepts what the other refuses: stream {}, random access {}",
            a.is_some(),
            b.is_some()
        ),
    }
});
