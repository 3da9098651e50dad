//! Structure-aware inputs: the fuzzer's bytes edit one part of a valid saved-VM pack (the
//! manifest, its config, the vmstate, a boot file or disk), and the pack is rebuilt with
//! fresh digests, so the edit reaches the VM layer's checks instead of dying at a checksum.
//! The first byte picks the edit (a replacement, a splice, or leaf edits of the manifest's or
//! the vmstate's JSON that keep it JSON); one choice passes the bytes through as a whole file.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use vmpack_formats::pack::{Compression, PackReader, PackWriter, SectionSource, WriteOptions};

/// The saved counter VM the end-to-end tests use (a disk with a virtio-blk device state, a
/// boot file, memory; cut to 1 MiB of memory by `seed`).
const SEED: &[u8] = include_bytes!("../../../../tests/fixtures/counter-v0.1-main.vmpack");

/// The chunk size of the rebuilt packs' sections (see `seed`).
const CHUNK: u32 = 32768;

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

/// Guest RAM of the rebuilt packs. The seed's guest has 16 MiB, of which two pages (0x1000,
/// 0x6000) are not zero; nothing before KVM reads the rest, so the seed is cut to 1 MiB
/// (config, vmstate and manifest say so, and agree): 32 chunks to index and verify instead
/// of 256, the same checks met.
const MEMORY: u64 = 1 << 20;

/// The seed's sections as the rebuilt packs hold them, and the manifest and the vmstate as
/// JSON text with the place of every node (the targets of the leaf edits, see `edit_json`).
struct Seed {
    aligned: bool,
    sections: Vec<Section>,
    manifest: Json,
    vmstate: Json,
    /// The nodes of the saved devices' states (serial, virtio-blk transport and queues):
    /// where the device checks are, a small share of the vmstate's nodes.
    devices: Vec<Node>,
}

/// A JSON document in compact form and its nodes (all but the root), in document order.
struct Json {
    text: Vec<u8>,
    nodes: Vec<Node>,
}

/// Where a node is in its document's text: its value, and the span that removing it
/// (with its key and one comma) takes out.
#[derive(Clone)]
struct Node {
    pointer: String,
    value: std::ops::Range<usize>,
    member: std::ops::Range<usize>,
}

impl Json {
    fn new(v: &serde_json::Value) -> Json {
        fn walk(v: &serde_json::Value, at: &str, out: &mut Vec<u8>, nodes: &mut Vec<Node>) {
            let (open, close, members): (u8, u8, Vec<(Option<&String>, &serde_json::Value)>) =
                match v {
                    serde_json::Value::Object(m) => {
                        (b'{', b'}', m.iter().map(|(k, c)| (Some(k), c)).collect())
                    }
                    serde_json::Value::Array(a) => {
                        (b'[', b']', a.iter().map(|c| (None, c)).collect())
                    }
                    _ => {
                        out.extend(serde_json::to_vec(v).unwrap());
                        return;
                    }
                };
            out.push(open);
            let n = members.len();
            for (i, (k, c)) in members.into_iter().enumerate() {
                let comma = out.len();
                if i > 0 {
                    out.push(b',');
                }
                let key_start = out.len();
                let name = match k {
                    Some(k) => {
                        out.extend(serde_json::to_vec(k).unwrap());
                        out.push(b':');
                        k.replace('~', "~0").replace('/', "~1")
                    }
                    None => i.to_string(),
                };
                let pointer = format!("{at}/{name}");
                let start = out.len();
                let me = nodes.len();
                nodes.push(Node {
                    pointer: pointer.clone(),
                    value: start..start,
                    member: 0..0,
                });
                walk(c, &pointer, out, nodes);
                let end = out.len();
                // The first of several members takes the comma after it; the others, the
                // one before.
                let member = if i > 0 {
                    comma..end
                } else if n > 1 {
                    key_start..end + 1
                } else {
                    key_start..end
                };
                nodes[me].value = start..end;
                nodes[me].member = member;
            }
            out.push(close);
        }
        let (mut text, mut nodes) = (Vec::new(), Vec::new());
        walk(v, "", &mut text, &mut nodes);
        debug_assert_eq!(
            &serde_json::from_slice::<serde_json::Value>(&text).unwrap(),
            v
        );
        Json { text, nodes }
    }
}

fn seed() -> &'static Seed {
    static S: OnceLock<Seed> = OnceLock::new();
    S.get_or_init(|| {
        let p = scratch("seed");
        std::fs::write(&p, SEED).expect("writing the seed pack");
        let r = PackReader::open(&p).expect("the seed pack opens");
        let mut manifest = serde_json::Value::Null;
        let mut vmstate = serde_json::Value::Null;
        let sections = r
            .sections()
            .iter()
            .map(|s| {
                let mut bytes = r.read_section(s.id, 64 << 20).expect("seed section");
                let mut len = s.size;
                match s.name.as_str() {
                    "manifest" => {
                        let mut m: serde_json::Value =
                            serde_json::from_slice(&bytes).expect("seed manifest");
                        let cfg = m["config"].as_str().expect("seed config");
                        assert!(cfg.contains("\nmemory_mib = 16\n"), "seed config: {cfg}");
                        m["config"] = cfg
                            .replace("\nmemory_mib = 16\n", "\nmemory_mib = 1\n")
                            .into();
                        m["memory"][0]["size"] = MEMORY.into();
                        manifest = m;
                        bytes = Json::new(&manifest).text;
                        len = bytes.len() as u64;
                    }
                    "vmstate" => {
                        let mut v: serde_json::Value =
                            serde_json::from_slice(&bytes).expect("seed vmstate");
                        v["memory_regions"] = serde_json::json!([[0, MEMORY]]);
                        v["config"]["memory_mib"] = 1.into();
                        vmstate = v;
                        bytes = Json::new(&vmstate).text;
                        len = bytes.len() as u64;
                    }
                    "memory/0" => {
                        bytes.truncate(MEMORY as usize);
                        len = MEMORY;
                    }
                    _ => {}
                }
                // Small chunks: a chunk's bytes are hashed when the pack is built and
                // again when it is verified, and only the non-zero ones are.
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
                    len,
                    data,
                }
            })
            .collect();
        let _ = std::fs::remove_file(&p);
        let (manifest, vmstate) = (Json::new(&manifest), Json::new(&vmstate));
        let devices = vmstate
            .nodes
            .iter()
            .filter(|n| n.pointer.starts_with("/devices/"))
            .cloned()
            .collect();
        Seed {
            aligned: r.aligned(),
            sections,
            manifest,
            vmstate,
            devices,
        }
    })
}

/// Numbers at the edges of the checks: queue sizes and their maximum (256), powers of two,
/// versions, the integer types' limits.
const NUMBERS: &[i128] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    15,
    16,
    63,
    64,
    127,
    128,
    255,
    256,
    257,
    511,
    512,
    1024,
    4095,
    4096,
    32767,
    32768,
    65535,
    65536,
    1 << 20,
    i32::MAX as i128,
    u32::MAX as i128,
    1 << 32,
    i64::MAX as i128,
    u64::MAX as i128,
    -1,
    i32::MIN as i128,
    i64::MIN as i128,
];

/// Applies the leaf edits `data` describes to `doc`, at its nodes `at`: records of 11
/// bytes, `[node (2, LE), kind, value (8)]`, each replacing one node with a number, a
/// string, a bool, null or a copy of another node, or removing it. The result stays valid
/// JSON, so an edit reaches the typed parse and the checks after it instead of dying at the
/// JSON syntax. Edits are splices into the seed's text (re-serialising the vmstate cost
/// more than all the rest of a run); of edits that overlap, the first is kept.
fn edit_json(doc: &Json, at: &[Node], data: &[u8]) -> Vec<u8> {
    if at.is_empty() {
        return doc.text.clone();
    }
    let mut edits: Vec<(std::ops::Range<usize>, Vec<u8>)> = Vec::new();
    for r in data.chunks(11) {
        let mut rec = [0u8; 11];
        rec[..r.len()].copy_from_slice(r);
        let node = &at[u16::from_le_bytes([rec[0], rec[1]]) as usize % at.len()];
        let v: [u8; 8] = rec[3..].try_into().unwrap();
        let (span, new) = match rec[2] % 8 {
            0 => (
                node.value.clone(),
                NUMBERS[v[0] as usize % NUMBERS.len()]
                    .to_string()
                    .into_bytes(),
            ),
            1 => (
                node.value.clone(),
                u64::from_le_bytes(v).to_string().into_bytes(),
            ),
            2 => (
                node.value.clone(),
                i64::from_le_bytes(v).to_string().into_bytes(),
            ),
            3 => {
                let end = v.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                let s = String::from_utf8_lossy(&v[..end]);
                (node.value.clone(), serde_json::to_vec(&s).unwrap())
            }
            4 => (
                node.value.clone(),
                (if v[0] & 1 == 1 { "true" } else { "false" }).into(),
            ),
            5 => (node.value.clone(), b"null".to_vec()),
            6 => (node.member.clone(), Vec::new()),
            _ => {
                let from = &doc.nodes[u16::from_le_bytes([v[0], v[1]]) as usize % doc.nodes.len()];
                (node.value.clone(), doc.text[from.value.clone()].to_vec())
            }
        };
        if edits
            .iter()
            .all(|(s, _)| span.end <= s.start || s.end <= span.start)
        {
            edits.push((span, new));
        }
    }
    edits.sort_by_key(|(s, _)| s.start);
    let mut out = Vec::with_capacity(doc.text.len() + 64);
    let mut at = 0;
    for (span, new) in edits {
        out.extend_from_slice(&doc.text[at..span.start]);
        out.extend_from_slice(&new);
        at = span.end;
    }
    out.extend_from_slice(&doc.text[at..]);
    out
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

/// The pack file the fuzzer's `data` describes; for no data, the seed itself.
pub fn build(data: &[u8]) -> Vec<u8> {
    let seed = seed();
    let (op, rest) = match data.split_first() {
        Some((op, rest)) => (*op % 13, rest),
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
            aligned: seed.aligned,
            compression: Compression::None,
            threads: 1,
            ..Default::default()
        },
    )
    .expect("writer");
    for s in &seed.sections {
        let replaced: Option<Vec<u8>> = match (op, s.name.as_str()) {
            (0, "manifest") => Some(rest.to_vec()),
            (1, "manifest") => Some(splice(whole(s), at, with)),
            (2, "manifest") | (3, "manifest") => {
                let mut m: serde_json::Value =
                    serde_json::from_slice(&seed.manifest.text).expect("seed manifest");
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
            (10, "vmstate") => Some(edit_json(&seed.vmstate, &seed.devices, rest)),
            (11, "vmstate") => Some(edit_json(&seed.vmstate, &seed.vmstate.nodes, rest)),
            (12, "manifest") => Some(edit_json(&seed.manifest, &seed.manifest.nodes, rest)),
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
