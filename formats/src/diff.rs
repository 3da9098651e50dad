//! Diff packs: a saved VM that stores only the guest memory and disk chunks written since
//! its parent pack, which it names by root digest (docs/FORMAT.md §15).
//!
//! A diff pack is an ordinary VM pack whose manifest has a `parent` and whose memory
//! sections have kind [`kind::MEMORY_DIFF`]: the section holds the present chunks of its
//! RAM region one after the other, and its meta's `present` bitmap says which region chunk
//! each one is. A disk is a [`kind::DISK_DIFF`] section laid out the same way over the
//! disk's chunks, or a whole DISK section. The manifest, boot files (the base's) and vmstate
//! are not layered.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::pack::{kind, SectionInfo, SectionSource};
use crate::vm::{is_safe_name, VmPack, VmPackError};

/// Longest chain a restore follows (a diff of a diff of …): bounds the files opened and
/// stops a cycle of packs naming each other.
pub const MAX_CHAIN: usize = 64;

/// The pack a diff pack was saved against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent's root digest, 64 lowercase hex digits.
    pub root_digest: String,
    /// The parent's file name when the child was saved: looked for in the child's folder.
    pub file: String,
}

impl ParentRef {
    /// Checks the fields of a parent read from an untrusted manifest.
    pub fn check(&self) -> Result<(), String> {
        if self.root_digest.len() != 64
            || !self
                .root_digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err("parent root_digest is not 64 lowercase hex digits".into());
        }
        if !is_safe_name(&self.file) || self.file.chars().any(char::is_control) {
            return Err(format!(
                "parent file '{}' is not a single plain file name",
                crate::vm::printable(&self.file)
            ));
        }
        Ok(())
    }
}

/// Which chunks of a RAM region a diff section holds: bit `i % 8` of byte `i / 8` is region
/// chunk `i`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkMap {
    pub region_size: u64,
    pub chunk_size: u64,
    pub bits: Vec<u8>,
}

impl ChunkMap {
    pub fn new(region_size: u64, chunk_size: u64) -> ChunkMap {
        let n = region_size.div_ceil(chunk_size);
        ChunkMap {
            region_size,
            chunk_size,
            bits: vec![0; n.div_ceil(8) as usize],
        }
    }

    /// Number of chunks of the region.
    pub fn chunks(&self) -> u64 {
        self.region_size.div_ceil(self.chunk_size)
    }

    pub fn set(&mut self, chunk: u64) {
        self.bits[(chunk / 8) as usize] |= 1 << (chunk % 8);
    }

    pub fn get(&self, chunk: u64) -> bool {
        self.bits[(chunk / 8) as usize] & (1 << (chunk % 8)) != 0
    }

    /// Marks every chunk that overlaps `offset..offset + len` of the region.
    pub fn set_range(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let last = ((offset + len - 1) / self.chunk_size).min(self.chunks() - 1);
        for c in offset / self.chunk_size..=last {
            self.set(c);
        }
    }

    /// The region byte range of chunk `c`.
    pub fn chunk_range(&self, c: u64) -> Range<u64> {
        let start = c * self.chunk_size;
        start..(start + self.chunk_size).min(self.region_size)
    }

    /// The present chunks, ascending.
    pub fn present(&self) -> Vec<u64> {
        (0..self.chunks()).filter(|&c| self.get(c)).collect()
    }

    /// Bytes the diff section holds: the present chunks' lengths.
    pub fn section_size(&self) -> u64 {
        self.present()
            .iter()
            .map(|&c| {
                let r = self.chunk_range(c);
                r.end - r.start
            })
            .sum()
    }

    /// Region offset of section offset `off` (which must lie in a present chunk).
    pub fn region_offset(&self, present: &[u64], off: u64) -> Option<u64> {
        let j = off / self.chunk_size;
        let c = *present.get(j as usize)?;
        Some(c * self.chunk_size + off % self.chunk_size)
    }

    /// The meta of a diff section.
    pub fn meta(&self, gpa: u64) -> serde_json::Value {
        serde_json::json!({
            "gpa": gpa,
            "region_size": self.region_size,
            "present": hex::encode(&self.bits),
        })
    }

    /// Reads and checks a diff section's meta against its manifest entry.
    pub fn from_section(s: &SectionInfo, region_size: u64) -> Result<ChunkMap, String> {
        Self::parse(s, kind::MEMORY_DIFF, "region_size", region_size)
    }

    /// The meta of a disk diff section (kind [`kind::DISK_DIFF`]): the DISK section's meta
    /// plus the `present` bitmap over the disk's chunks.
    pub fn disk_meta(
        &self,
        name: &str,
        format: serde_json::Value,
        read_only: bool,
    ) -> serde_json::Value {
        serde_json::json!({
            "name": name,
            "format": format,
            "virtual_size": self.region_size,
            "read_only": read_only,
            "present": hex::encode(&self.bits),
        })
    }

    /// Reads and checks a disk diff section's meta against the manifest's disk size.
    pub fn from_disk_section(s: &SectionInfo, virtual_size: u64) -> Result<ChunkMap, String> {
        Self::parse(s, kind::DISK_DIFF, "virtual_size", virtual_size)
    }

    /// Whether the meta of a diff section over `size` bytes in chunks of `chunk_size` fits
    /// the meta limit; a writer stores a larger disk whole.
    pub fn fits_meta(size: u64, chunk_size: u64) -> bool {
        chunk_size > 0 && size.div_ceil(chunk_size) <= MAX_DIFF_CHUNKS
    }

    fn parse(s: &SectionInfo, want: u16, size_key: &str, size: u64) -> Result<ChunkMap, String> {
        let what = if want == kind::DISK_DIFF {
            "a diff pack's changed disk"
        } else {
            "a diff pack's memory"
        };
        if s.kind != want {
            return Err(format!(
                "kind {} where {want} ({what}) was expected",
                s.kind
            ));
        }
        if s.meta.get(size_key).and_then(|v| v.as_u64()) != Some(size) {
            return Err(format!(
                "meta {size_key} does not match the manifest's {size}"
            ));
        }
        let region_size = size;
        let hex_bits = s
            .meta
            .get("present")
            .and_then(|v| v.as_str())
            .ok_or("meta has no 'present' chunk bitmap")?;
        if s.chunk_size == 0 {
            return Err("chunk size 0".into());
        }
        let mut map = ChunkMap::new(region_size, u64::from(s.chunk_size));
        if hex_bits.len() != map.bits.len() * 2 {
            return Err(format!(
                "meta 'present' has {} hex digits where {region_size} bytes in {} byte chunks need {}",
                hex_bits.len(),
                s.chunk_size,
                map.bits.len() * 2
            ));
        }
        map.bits = hex::decode(hex_bits).map_err(|e| format!("meta 'present': {e}"))?;
        let n = map.chunks();
        if (n..map.bits.len() as u64 * 8).any(|c| map.get(c)) {
            return Err("meta 'present' marks chunks past the end of the region".into());
        }
        if map.section_size() != s.size {
            return Err(format!(
                "holds {} bytes, its 'present' bitmap says {}",
                s.size,
                map.section_size()
            ));
        }
        Ok(map)
    }
}

/// Most chunks a diff section's bitmap covers: its hex fits the 64 KiB meta limit with
/// room for the other keys.
pub const MAX_DIFF_CHUNKS: u64 = 253_952;

/// A region's present chunks one after the other: what a diff section stores.
pub struct DiffSource<'a> {
    pub region: &'a dyn SectionSource,
    pub map: ChunkMap,
    present: Vec<u64>,
}

impl<'a> DiffSource<'a> {
    pub fn new(region: &'a dyn SectionSource, map: ChunkMap) -> DiffSource<'a> {
        let present = map.present();
        DiffSource {
            region,
            map,
            present,
        }
    }
}

impl SectionSource for DiffSource<'_> {
    fn len(&self) -> u64 {
        self.map.section_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let cs = self.map.chunk_size;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let at = self
                .map
                .region_offset(&self.present, off)
                .ok_or_else(|| std::io::Error::other("read past the end of a diff section"))?;
            let n = ((cs - off % cs) as usize).min(buf.len() - done);
            self.region.read_at(&mut buf[done..done + n], at)?;
            done += n;
        }
        Ok(())
    }
    fn data_ranges(&self) -> std::io::Result<Vec<Range<u64>>> {
        // Chunks whose region bytes are known zero are stored as zero chunks, unread.
        let data = self.region.data_ranges()?;
        let mut out: Vec<Range<u64>> = Vec::new();
        for (j, &c) in self.present.iter().enumerate() {
            let r = self.map.chunk_range(c);
            let base = j as u64 * self.map.chunk_size;
            for d in &data {
                let (s, e) = (d.start.max(r.start), d.end.min(r.end));
                if s < e {
                    let (s, e) = (base + s - r.start, base + e - r.start);
                    match out.last_mut() {
                        Some(l) if l.end == s => l.end = e,
                        _ => out.push(s..e),
                    }
                }
            }
        }
        Ok(out)
    }
}

/// One layer of a disk across a chain: the pack (index into [`Chain::packs`]), its section
/// for the disk and, for a disk diff section, the chunks it holds.
#[derive(Clone, Debug)]
pub struct DiskLayer {
    pub pack: usize,
    pub section: u32,
    pub map: Option<ChunkMap>,
}

impl Chain {
    /// Disk `index` of the chain's child as layers, oldest first: the newest pack that
    /// stores the disk whole (kind DISK), then each newer pack's disk diff section. A disk
    /// diff whose parent has no such disk, or one of another size or read-only flag, is
    /// refused by name.
    pub fn disk_layers(&self, index: usize) -> Result<Vec<DiskLayer>, VmPackError> {
        let mut out = Vec::new();
        let mut k = self.packs.len() - 1;
        loop {
            let p = &self.packs[k];
            let file = p.path().display().to_string();
            let d = p.manifest().disks.get(index).ok_or_else(|| VmPackError::Invalid {
                file: file.clone(),
                section: "manifest".into(),
                message: format!("has no disk {index}, which its diff pack's disk diff section is layered on"),
            })?;
            let invalid = |message: String| VmPackError::Invalid {
                file: file.clone(),
                section: d.section.clone(),
                message,
            };
            let s = p
                .reader()
                .section(&d.section)
                .ok_or_else(|| invalid("named by the manifest but missing from the pack".into()))?;
            if let Some(newer) = out.last().map(|l: &DiskLayer| &self.packs[l.pack]) {
                let nd = &newer.manifest().disks[index];
                if nd.virtual_size != d.virtual_size || nd.read_only != d.read_only {
                    return Err(invalid(format!(
                        "disk {index} holds {} bytes (read_only {}), but the disk diff of {} is layered on one of {} bytes (read_only {})",
                        d.virtual_size,
                        d.read_only,
                        newer.path().display(),
                        nd.virtual_size,
                        nd.read_only
                    )));
                }
            }
            if s.kind == kind::DISK_DIFF {
                let map = ChunkMap::from_disk_section(s, d.virtual_size).map_err(invalid)?;
                out.push(DiskLayer {
                    pack: k,
                    section: s.id,
                    map: Some(map),
                });
                if k == 0 {
                    return Err(invalid(
                        "a disk diff section in a pack without a parent".into(),
                    ));
                }
                k -= 1;
                continue;
            }
            out.push(DiskLayer {
                pack: k,
                section: s.id,
                map: None,
            });
            break;
        }
        out.reverse();
        Ok(out)
    }
}

/// A pack chain, base first: the full pack, then each diff pack in order, the last being the
/// one asked for.
pub struct Chain {
    pub packs: Vec<VmPack>,
}

/// Opens `child` and every parent it needs, checking each parent's root digest against what
/// its child names. The parent of `child` is `parent` when given, else the file its manifest
/// names in `child`'s folder; each further parent is looked for next to its child.
pub fn open_chain(child: &Path, parent: Option<&Path>) -> Result<Chain, VmPackError> {
    let mut packs = vec![VmPack::open(child)?];
    let mut given = parent.map(Path::to_path_buf);
    loop {
        let last = packs.last().expect("at least the child");
        let Some(p) = last.manifest().parent.clone() else {
            break;
        };
        if packs.len() > MAX_CHAIN {
            return Err(VmPackError::Usage(format!(
                "{}: the chain of parent packs is longer than {MAX_CHAIN}",
                child.display()
            )));
        }
        let path: PathBuf = match given.take() {
            Some(g) => g,
            None => last.path().parent().unwrap_or(Path::new(".")).join(&p.file),
        };
        let label = last.path().display();
        if !path.exists() {
            return Err(VmPackError::Usage(format!(
                "{label}: its parent pack {} is missing (root digest {}); put it next to the diff pack or name it with --parent FILE",
                path.display(),
                p.root_digest
            )));
        }
        let pack = VmPack::open(&path)?;
        let actual = hex::encode(pack.reader().root_digest());
        if actual != p.root_digest {
            return Err(VmPackError::Usage(format!(
                "{label}: parent pack {} is not the one it was saved against: root digest {actual}, expected {}",
                path.display(),
                p.root_digest
            )));
        }
        packs.push(pack);
    }
    packs.reverse();
    Ok(Chain { packs })
}

/// Where each chunk of a RAM region of `chunks` chunks comes from, given the region's
/// layers oldest first: `None` holds every chunk (a MEMORY section), `Some(map)` the chunks
/// its map marks (a MEMORY_DIFF section, whose j-th chunk is its j-th marked one). Each
/// region chunk is `(layer, chunk number within that layer's section)` of the newest layer
/// holding it, or `None` where no layer does (zeros). This is the layering of §15: later
/// layers win.
pub fn newest_owners(chunks: u64, layers: &[Option<&ChunkMap>]) -> Vec<Option<(usize, u64)>> {
    let mut owner = vec![None; chunks as usize];
    for (k, layer) in layers.iter().enumerate() {
        match layer {
            None => {
                for (c, o) in owner.iter_mut().enumerate() {
                    *o = Some((k, c as u64));
                }
            }
            Some(map) => {
                for (j, c) in map.present().into_iter().enumerate() {
                    if let Some(o) = owner.get_mut(c as usize) {
                        *o = Some((k, j as u64));
                    }
                }
            }
        }
    }
    owner
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_layer_holding_a_chunk_wins() {
        let map = |set: &[u64]| {
            let mut m = ChunkMap::new(6 * 4096, 4096);
            for &c in set {
                m.set(c);
            }
            m
        };
        let (a, b) = (map(&[1, 4]), map(&[0, 4, 5]));
        // A whole base, then two diffs: chunk 4 from the newest, 1 from the first diff.
        assert_eq!(
            newest_owners(6, &[None, Some(&a), Some(&b)]),
            vec![
                Some((2, 0)),
                Some((1, 0)),
                Some((0, 2)),
                Some((0, 3)),
                Some((2, 1)),
                Some((2, 2))
            ]
        );
        // Without a whole base, a chunk no layer holds has no owner (it reads as zeros).
        assert_eq!(
            newest_owners(6, &[Some(&a), Some(&b)]),
            vec![
                Some((1, 0)),
                Some((0, 0)),
                None,
                None,
                Some((1, 1)),
                Some((1, 2))
            ]
        );
        // A whole layer over diffs replaces them all.
        assert_eq!(
            newest_owners(2, &[Some(&map(&[0])), None]),
            vec![Some((1, 0)), Some((1, 1))]
        );
        assert_eq!(newest_owners(0, &[None]), Vec::new());
    }

    #[test]
    fn chunk_map_roundtrip_and_gather() {
        let mut m = ChunkMap::new(10 * 4096 + 100, 4096);
        m.set_range(4096 + 5, 10);
        m.set_range(10 * 4096, 1);
        assert_eq!(m.present(), vec![1, 10]);
        assert_eq!(m.section_size(), 4096 + 100);
        let region: Vec<u8> = (0..m.region_size).map(|i| (i / 4096) as u8).collect();
        let slice = region.as_slice();
        let d = DiffSource::new(&slice, m.clone());
        let mut buf = vec![0u8; 4096 + 100];
        d.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 1));
        assert!(buf[4096..].iter().all(|&b| b == 10));
        assert_eq!(d.data_ranges().unwrap(), vec![0..4196]);
    }

    #[test]
    fn hostile_diff_meta_is_refused() {
        let mut m = ChunkMap::new(8 * 4096, 4096);
        m.set(3);
        let info = |meta: serde_json::Value, size: u64| SectionInfo {
            id: 1,
            kind: kind::MEMORY_DIFF,
            name: "memory/0".into(),
            meta,
            size,
            chunk_size: 4096,
            stored_bytes: 0,
            chunks: 1,
            zero_chunks: 0,
        };
        assert!(ChunkMap::from_section(&info(m.meta(0), 4096), 8 * 4096).is_ok());
        // Size disagreeing with the bitmap, wrong region size, bad length, bits past the end.
        let e = ChunkMap::from_section(&info(m.meta(0), 8192), 8 * 4096).unwrap_err();
        assert!(e.contains("holds 8192 bytes"), "{e}");
        assert!(ChunkMap::from_section(&info(m.meta(0), 4096), 4 * 4096).is_err());
        let long = serde_json::json!({"gpa": 0, "region_size": 8 * 4096, "present": "0800"});
        assert!(ChunkMap::from_section(&info(long, 4096), 8 * 4096)
            .unwrap_err()
            .contains("hex digits"));
        let mut past = ChunkMap::new(6 * 4096, 4096);
        past.bits[0] = 0x80;
        let e = ChunkMap::from_section(&info(past.meta(0), 4096), 6 * 4096).unwrap_err();
        assert!(e.contains("past the end"), "{e}");
        let mut wrong_kind = info(m.meta(0), 4096);
        wrong_kind.kind = kind::MEMORY;
        assert!(ChunkMap::from_section(&wrong_kind, 8 * 4096).is_err());
    }

    #[test]
    fn disk_diff_meta_roundtrips_and_hostile_ones_are_refused() {
        let mut m = ChunkMap::new(3 * 4096 + 512, 4096);
        m.set_range(3 * 4096, 1);
        let meta = m.disk_meta("d.img", serde_json::json!("raw"), false);
        let info = |meta: serde_json::Value, kind: u16, size: u64| SectionInfo {
            id: 1,
            kind,
            name: "disk/0".into(),
            meta,
            size,
            chunk_size: 4096,
            stored_bytes: 0,
            chunks: 1,
            zero_chunks: 0,
        };
        let back =
            ChunkMap::from_disk_section(&info(meta.clone(), kind::DISK_DIFF, 512), m.region_size)
                .unwrap();
        assert_eq!(back, m);
        assert_eq!(meta["virtual_size"], 3 * 4096 + 512);
        // Another disk size, another kind, a size the bitmap does not give.
        assert!(
            ChunkMap::from_disk_section(&info(meta.clone(), kind::DISK_DIFF, 512), 4 * 4096)
                .unwrap_err()
                .contains("virtual_size")
        );
        assert!(ChunkMap::from_disk_section(
            &info(meta.clone(), kind::MEMORY_DIFF, 512),
            m.region_size
        )
        .is_err());
        assert!(
            ChunkMap::from_disk_section(&info(meta, kind::DISK_DIFF, 4096), m.region_size)
                .unwrap_err()
                .contains("holds 4096 bytes")
        );
        assert!(ChunkMap::fits_meta(MAX_DIFF_CHUNKS << 20, 1 << 20));
        assert!(!ChunkMap::fits_meta((MAX_DIFF_CHUNKS + 1) << 20, 1 << 20));
        // The bitmap's hex and the other keys fit the meta limit.
        let big = ChunkMap::new(MAX_DIFF_CHUNKS << 20, 1 << 20);
        let name = "n".repeat(255);
        let len = serde_json::to_vec(&big.disk_meta(&name, serde_json::json!("qcow2"), true))
            .unwrap()
            .len();
        assert!(len <= crate::pack::MAX_META_LEN, "{len}");
    }

    #[test]
    fn parent_ref_checks() {
        let good = ParentRef {
            root_digest: "ab".repeat(32),
            file: "base.vmpack".into(),
        };
        assert!(good.check().is_ok());
        let bad = ParentRef {
            file: "../x".into(),
            ..good.clone()
        };
        assert!(bad.check().is_err());
        let bad = ParentRef {
            root_digest: "AB".repeat(32),
            ..good
        };
        assert!(bad.check().is_err());
    }
}
