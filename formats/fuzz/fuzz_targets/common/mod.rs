//! Structure-aware inputs: the fuzzer's bytes edit one part of a valid saved-VM pack (the
//! manifest, its config, the vmstate, a boot file or disk), and the pack is rebuilt with
//! fresh digests, so the edit reaches the VM layer's checks instead of dying at a checksum.
//! The first byte picks the edit; one choice passes the bytes through as a whole file.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use vmpack_formats::pack::{Compression, PackReader, PackWriter, SectionSource, WriteOptions};

/// The saved counter VM the end-to-end tests use (16 MiB of memory, a disk, a boot file).
const SEED: &[u8] = include_bytes!("../../../../tests/fixtures/counter-v0.1-main.vmpack");

/// The chunk size of the rebuilt packs' sections (see `seed`).
const CHUNK: u32 = 65536;

struct Section {
    kind: u16,
    name: String,
    meta: serde_json::Value,
    chunk_size: u32,
    len: u64,
    /// The chunks holding non-zero bytes, as (offset, bytes).
    data: Vec<(u64, Vec<u8>)>,
}

/// A section's bytes given as its non-zero chunks: the writer never reads the rest.
struct Sparse<'a>(u64, &'a [(u64, Vec<u8>)]);

impl SectionSource for Sparse<'_> {
    fn len(&self) -> u64 {
        self.0
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        for (o, d) in self.1 {
            let (s, e) = ((*o).max(offset), (o + d.len() as u64).min(end));
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&d[(s - o) as usize..(e - o) as usize]);
            }
        }
        Ok(())
    }
    fn data_ranges(&self) -> std::io::Result<Vec<std::ops::Range<u64>>> {
        Ok(self.1.iter().map(|(o, d)| *o..o + d.len() as u64).collect())
    }
}

fn seed() -> &'static (bool, Vec<Section>) {
    static S: OnceLock<(bool, Vec<Section>)> = OnceLock::new();
    S.get_or_init(|| {
        let p = scratch("seed");
        std::fs::write(&p, SEED).expect("writing the seed pack");
        let r = PackReader::open(&p).expect("the seed pack opens");
        let sections = r
            .sections()
            .iter()
            .map(|s| {
                let bytes = r.read_section(s.id, 64 << 20).expect("seed section");
                // Same bytes in the smallest chunks an aligned pack allows: the seed's
                // 1 MiB memory chunks, re-hashed on every build and verify, were most
                // of each run; a few 4 KiB ones hold the same non-zero pages.
                let chunk_size = s.chunk_size.min(CHUNK);
                let data = bytes
                    .chunks(chunk_size as usize)
                    .enumerate()
                    .filter(|(_, c)| c.iter().any(|&b| b != 0))
                    .map(|(i, c)| (i as u64 * chunk_size as u64, c.to_vec()))
                    .collect();
                Section {
                    kind: s.kind,
                    name: s.name.clone(),
                    meta: s.meta.clone(),
                    chunk_size,
                    len: s.size,
                    data,
                }
            })
            .collect();
        let _ = std::fs::remove_file(&p);
        (r.aligned(), sections)
    })
}

/// A per-process scratch path for `what`, removed when the process ends.
pub fn scratch(what: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vmpack-fuzz-{}-{what}", std::process::id()));
    remove_at_exit(&p);
    p
}

/// A per-process scratch folder for `what`, created once and removed when the process ends.
pub fn scratch_dir(what: &str) -> PathBuf {
    let p = scratch(what);
    if !p.is_dir() {
        std::fs::create_dir(&p).expect("creating a scratch folder");
    }
    p
}

static AT_EXIT: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

extern "C" {
    fn atexit(f: extern "C" fn()) -> std::os::raw::c_int;
}

extern "C" fn remove_scratch() {
    if let Ok(paths) = AT_EXIT.lock() {
        for p in paths.iter() {
            let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
        }
    }
}

/// libFuzzer ends the process with `exit`, which runs no Rust destructors: scratch paths
/// are removed by an `atexit` handler instead, so runs leave nothing in TMPDIR.
fn remove_at_exit(p: &std::path::Path) {
    static REGISTERED: OnceLock<()> = OnceLock::new();
    REGISTERED.get_or_init(|| {
        // SAFETY: registers a plain function taking no arguments, as atexit expects.
        unsafe { atexit(remove_scratch) };
    });
    if let Ok(mut paths) = AT_EXIT.lock() {
        if !paths.iter().any(|q| q == p) {
            paths.push(p.to_path_buf());
        }
    }
}

/// Overwrites `at` (taken modulo the length) with `with`, growing the buffer if needed.
fn splice(mut base: Vec<u8>, at: &[u8], with: &[u8]) -> Vec<u8> {
    let at = match at {
        [a, b, ..] => u16::from_le_bytes([*a, *b]) as usize,
        _ => 0,
    } % (base.len() + 1);
    let end = at + with.len();
    if end > base.len() {
        base.resize(end, 0);
    }
    base[at..end].copy_from_slice(with);
    base
}

fn whole(s: &Section) -> Vec<u8> {
    let mut v = vec![0u8; s.len as usize];
    Sparse(s.len, &s.data).read_at(&mut v, 0).unwrap();
    v
}

/// The pack file the fuzzer's `data` describes.
pub fn build(data: &[u8]) -> Vec<u8> {
    let (aligned, sections) = seed();
    let (op, rest) = match data.split_first() {
        Some((op, rest)) => (*op % 10, rest),
        None => (255, data),
    };
    if op == 9 {
        return rest.to_vec();
    }
    let (at, with) = rest.split_at(rest.len().min(2));
    let mut out = Vec::new();
    let mut w = PackWriter::new(
        &mut out,
        WriteOptions {
            aligned: *aligned,
            compression: Compression::None,
            threads: 1,
            ..Default::default()
        },
    )
    .expect("writer");
    for s in sections {
        let replaced: Option<Vec<u8>> = match (op, s.name.as_str()) {
            (0, "manifest") => Some(rest.to_vec()),
            (1, "manifest") => Some(splice(whole(s), at, with)),
            (2, "manifest") | (3, "manifest") => {
                let mut m: serde_json::Value =
                    serde_json::from_slice(&whole(s)).expect("seed manifest");
                let cfg = m["config"].as_str().unwrap_or("").as_bytes().to_vec();
                let cfg = if op == 2 {
                    rest.to_vec()
                } else {
                    splice(cfg, at, with)
                };
                m["config"] = String::from_utf8_lossy(&cfg).into_owned().into();
                Some(serde_json::to_vec(&m).unwrap())
            }
            (4, "vmstate") => Some(rest.to_vec()),
            (5, "vmstate") => Some(splice(whole(s), at, with)),
            (6, "boot/image") | (7, "disk/0") => Some(splice(whole(s), at, with)),
            _ => None,
        };
        // Memory: only its non-zero chunks are edited (16 MiB per run would be slow).
        let edited: Vec<(u64, Vec<u8>)>;
        let chunks: &[(u64, Vec<u8>)] = if op == 8 && s.name == "memory/0" {
            edited = s
                .data
                .iter()
                .map(|(o, d)| {
                    let mut d = splice(d.clone(), at, with);
                    d.truncate(s.chunk_size as usize);
                    (*o, d)
                })
                .collect();
            &edited
        } else {
            &s.data
        };
        let r = match &replaced {
            Some(bytes) => w.add_section_with(
                s.kind,
                &s.name,
                s.meta.clone(),
                bytes,
                s.chunk_size,
                Compression::None,
                &(),
            ),
            None => w.add_section_with(
                s.kind,
                &s.name,
                s.meta.clone(),
                &Sparse(s.len, chunks),
                s.chunk_size,
                Compression::None,
                &(),
            ),
        };
        if r.is_err() {
            break;
        }
    }
    let _ = w.finish();
    out
}

/// Writes `bytes` to this process's scratch file for `what` and returns its path.
pub fn to_file(what: &str, bytes: &[u8]) -> Option<PathBuf> {
    let p = scratch(what);
    let mut f = std::fs::File::create(&p).ok()?;
    f.write_all(bytes).ok()?;
    Some(p)
}
