//! Diff packs on the VMM side: which memory and disk chunks a diff save stores, and guest
//! memory and disks layered from a chain of packs on restore and flatten (docs/FORMAT.md §15).
//!
//! A diff pack stores the chunks written since the VM equalled its parent: the dirty-page
//! log (`vstate::dirty`) gives the pages written since a mark, each disk's `DiskTrack` the
//! blocks written since the same mark, and the VM keeps the mark of the pack it was restored
//! from (mark 0) and of each pack it saved (`VmHandle::note_pack`).

use crate::memory::GuestMemoryInit;
use crate::packs::{Context, Error, Result};
use crate::vmm::VmHandle;
use crate::vstate::lazy::{ChunkTable, PackChunk};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use vmpack_formats::diff::{Chain, ChunkMap, ParentRef};
use vmpack_formats::pack::{ChunkEntry, Codec, PackError, PackErrorKind};
use vmpack_formats::vm::{Manifest, VmPack};

/// The refusal of a diff save against a pack this VM does not descend from.
pub fn unknown_parent(root: &str) -> Error {
    Error::Unsupported(format!(
        "the VM was neither restored from nor saved to the pack with root digest {root} (or that was too many saves ago); save a full pack instead"
    ))
}

/// Per RAM region, the chunks holding a page written since `mark`.
pub fn changed_chunks(handle: &VmHandle, mark: u64, chunk_size: u32) -> Result<Vec<ChunkMap>> {
    let dirty = handle.dirty_since(mark).map_err(|e| {
        Error::Unsupported(format!(
            "{}; save a full pack instead",
            crate::error::Chain(&e)
        ))
    })?;
    let cs = u64::from(chunk_size);
    let page = crate::vstate::dirty::PAGE;
    let mut maps = Vec::with_capacity(dirty.layout.len());
    for (&(_, size), bits) in dirty.layout.iter().zip(&dirty.bits) {
        let mut m = ChunkMap::new(size, cs);
        for (w, &word) in bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let b = u64::from(word.trailing_zeros());
                word &= word - 1;
                let at = (w as u64 * 64 + b) * page;
                if at < size {
                    m.set(at / cs);
                }
            }
        }
        maps.push(m);
    }
    Ok(maps)
}

/// Per disk, the chunks (of `chunk_size` bytes) holding a block written since `mark`: what
/// a diff pack stores of it. None stores the disk whole: its mark is not kept, or the disk
/// has too many chunks for a diff section's bitmap.
pub fn changed_disk_chunks(handle: &VmHandle, mark: u64, chunk_size: u32) -> Vec<Option<ChunkMap>> {
    let cs = u64::from(chunk_size);
    handle
        .disk_written_since(mark)
        .into_iter()
        .map(|(size, bits)| {
            let bits = bits?;
            if !ChunkMap::fits_meta(size, cs) {
                return None;
            }
            let mut m = ChunkMap::new(size, cs);
            let block = crate::disk_snapshot::BLOCK_SIZE;
            for (w, &word) in bits.iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    let b = u64::from(word.trailing_zeros());
                    word &= word - 1;
                    let at = (w as u64 * 64 + b) * block;
                    if at < size {
                        m.set_range(at, block.min(size - at));
                    }
                }
            }
            Some(m)
        })
        .collect()
}

/// `ranges` (sorted) cut down to the chunks `map` holds.
pub fn intersect(ranges: &[Range<u64>], map: &ChunkMap) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for c in map.present() {
        let r = map.chunk_range(c);
        for d in ranges {
            let (s, e) = (d.start.max(r.start), d.end.min(r.end));
            if s < e {
                match out.last_mut() {
                    Some(l) if l.end == s => l.end = e,
                    _ => out.push(s..e),
                }
            }
        }
    }
    out
}

/// One section over a RAM region: the pack of the chain (index, base first) it is in, its
/// id there and, for a MEMORY_DIFF section (a diff pack's memory or a live save's overlay),
/// the chunks it holds (none: every chunk). A live save's pack gives two layers.
struct Layer {
    pack: usize,
    section: u32,
    map: Option<ChunkMap>,
}

/// One RAM region across a chain: its layers, oldest first; each region chunk comes from
/// the newest layer holding it (`vmpack_formats::diff::newest_owners`).
struct RegionLayers {
    gpa: u64,
    size: u64,
    layers: Vec<Layer>,
}

impl RegionLayers {
    /// The newest `(layer, seq)` holding each region chunk of `chunk_size` bytes.
    fn owners(&self, chunk_size: u64) -> Vec<Option<(usize, u64)>> {
        let maps: Vec<Option<&ChunkMap>> = self.layers.iter().map(|l| l.map.as_ref()).collect();
        vmpack_formats::diff::newest_owners(self.size.div_ceil(chunk_size), &maps)
    }
}

/// Checks that every pack of the chain describes the same RAM regions as the child, and
/// gathers each region's sections.
fn region_layers(chain: &Chain) -> Result<Vec<RegionLayers>> {
    let child = chain.packs.last().expect("a chain holds the child");
    let mut out = Vec::new();
    for m in &child.manifest().memory {
        let mut layers = Vec::new();
        for (k, p) in chain.packs.iter().enumerate() {
            let label = p.path().display();
            let e = p
                .manifest()
                .memory
                .iter()
                .find(|e| e.gpa == m.gpa && e.size == m.size)
                .ok_or_else(|| {
                    Error::Refused(format!(
                        "{label}: has no memory region {:#x}+{:#x} as its diff pack {} has",
                        m.gpa,
                        m.size,
                        child.path().display()
                    ))
                })?;
            let s = p.reader().section(&e.section).ok_or_else(|| {
                Error::Refused(format!("{label}: section '{}' is missing", e.section))
            })?;
            let map = if k == 0 {
                None
            } else {
                Some(ChunkMap::from_section(s, m.size).map_err(|msg| {
                    Error::Refused(format!("{label}: section '{}': {msg}", e.section))
                })?)
            };
            layers.push(Layer {
                pack: k,
                section: s.id,
                map,
            });
            // A live save's overlay: its chunks win over the pack's own memory section.
            if let Some(o) = &e.overlay {
                let s = p
                    .reader()
                    .section(o)
                    .ok_or_else(|| Error::Refused(format!("{label}: section '{o}' is missing")))?;
                let map = ChunkMap::from_section(s, m.size)
                    .map_err(|msg| Error::Refused(format!("{label}: section '{o}': {msg}")))?;
                layers.push(Layer {
                    pack: k,
                    section: s.id,
                    map: Some(map),
                });
            }
        }
        if chain.packs[0].manifest().memory.len() != child.manifest().memory.len() {
            return Err(Error::Refused(format!(
                "{}: its memory regions differ from those of its diff pack {}",
                chain.packs[0].path().display(),
                child.path().display()
            )));
        }
        out.push(RegionLayers {
            gpa: m.gpa,
            size: m.size,
            layers,
        });
    }
    Ok(out)
}

/// Whether every pack's memory can be mapped (aligned, uncompressed) with one chunk size.
fn mappable(chain: &Chain, regions: &[RegionLayers]) -> bool {
    let mut sizes = Vec::new();
    for (k, p) in chain.packs.iter().enumerate() {
        if p.manifest().memory_restore_path(p.reader()) != Some("mmap") {
            return false;
        }
        for l in regions
            .iter()
            .flat_map(|r| &r.layers)
            .filter(|l| l.pack == k)
        {
            sizes.push(p.reader().sections()[l.section as usize].chunk_size);
        }
    }
    sizes.windows(2).all(|w| w[0] == w[1])
}

/// Guest memory of the chain's child: the base pack's memory with each diff pack's chunks
/// over it, in order. Mapped copy-on-write from the files where all of them allow it (each
/// chunk from the newest pack holding it), else copied.
pub fn chain_memory(chain: &Chain) -> Result<GuestMemoryInit> {
    let regions = region_layers(chain)?;
    if mappable(chain, &regions) {
        let mut layers: Vec<crate::memory::MapLayer> = Vec::new();
        for p in &chain.packs {
            let f =
                File::open(p.path()).with_context(|| format!("opening {}", p.path().display()))?;
            layers.push((f, Vec::new()));
        }
        for r in &regions {
            let base = chain.packs[0].reader();
            let cs = u64::from(base.sections()[r.layers[0].section as usize].chunk_size);
            for (c, owner) in r.owners(cs).into_iter().enumerate() {
                let Some((i, seq)) = owner else { continue };
                let l = &r.layers[i];
                let reader = chain.packs[l.pack].reader();
                let e = reader.chunks(l.section).get(seq as usize).ok_or_else(|| {
                    Error::Refused(format!(
                        "{}: section {} has no chunk {seq}",
                        chain.packs[l.pack].path().display(),
                        l.section
                    ))
                })?;
                if e.codec == Codec::None {
                    let len = (e.ulen as u64).div_ceil(4096) * 4096;
                    layers[l.pack]
                        .1
                        .push((r.gpa + c as u64 * cs, e.payload_offset, len));
                }
            }
        }
        return Ok(GuestMemoryInit::MapLayers(layers));
    }
    let paths: Vec<_> = chain.packs.iter().map(|p| p.path().to_path_buf()).collect();
    // With one chunk size across the chain, a reset can read the written pages' chunks again.
    let table = chain_table(chain).ok();
    let fill = crate::memory::boxed_fill::<Error, _>(move |ram| {
        let chain = Chain {
            packs: paths
                .iter()
                .map(|p| VmPack::open(p))
                .collect::<Result<_, _>>()?,
        };
        let regions = region_layers(&chain)?;
        for r in &regions {
            let region = ram
                .iter_mut()
                .find(|(g, _)| *g == r.gpa)
                .ok_or_else(|| Error::Refused(format!("no RAM region at {:#x}", r.gpa)))?;
            let dst: &mut [u8] = region.1;
            let out = RegionWriter::Slice(dst.as_mut_ptr() as usize, dst.len());
            write_layers(&chain, r, &out)?;
        }
        Ok(())
    });
    Ok(match table {
        Some(table) => GuestMemoryInit::Unpack { fill, table },
        None => GuestMemoryInit::Fill(fill),
    })
}

/// The chain's packs opened again as shared handles (what lazy memory and disks keep for
/// their fetches), each checked to be the file the chain checked: the same root digest.
pub fn shared_packs(chain: &Chain) -> Result<Vec<Arc<VmPack>>> {
    let mut packs = Vec::with_capacity(chain.packs.len());
    for p in &chain.packs {
        let again = VmPack::open(p.path())?;
        if again.reader().root_digest() != p.reader().root_digest() {
            return Err(Error::Refused(format!(
                "{}: the file changed while it was being restored",
                p.path().display()
            )));
        }
        packs.push(Arc::new(again));
    }
    Ok(packs)
}

/// Every chunk of the child's memory, each from the newest pack of the chain that holds it:
/// what a lazy restore of a diff pack serves (and verifies) on first touch. The packs must
/// share one memory chunk size, so the chunks of different packs never partly overlap.
pub fn chain_table(chain: &Chain) -> Result<ChunkTable> {
    let regions = region_layers(chain)?;
    let packs = shared_packs(chain)?;
    let mut chunks = Vec::new();
    for r in &regions {
        let base = chain.packs[0].reader();
        let cs = u64::from(base.sections()[r.layers[0].section as usize].chunk_size);
        if cs == 0 || cs % 4096 != 0 {
            return Err(Error::Refused(format!(
                "{}: memory chunks of {cs} bytes cannot be served on first touch",
                chain.packs[0].path().display()
            )));
        }
        let mut owner: Vec<Option<PackChunk>> = vec![None; r.size.div_ceil(cs) as usize];
        for Layer {
            pack: k,
            section: id,
            map,
        } in &r.layers
        {
            let (k, id) = (*k, *id);
            let pack = &chain.packs[k];
            let reader = pack.reader();
            let label = pack.path().display();
            let own = u64::from(reader.sections()[id as usize].chunk_size);
            if own != cs || map.as_ref().is_some_and(|m| m.chunk_size != cs) {
                return Err(Error::Refused(format!(
                    "{label}: its memory chunks ({own} bytes) differ in size from its base pack's ({cs} bytes), so it cannot be served on first touch; restore it with --memory eager or `vmpack flatten` it"
                )));
            }
            let present = map.as_ref().map(|m| m.present());
            for e in reader.chunks(id) {
                let off = match (map, &present) {
                    (Some(m), Some(p)) => m.region_offset(p, e.offset),
                    _ => Some(e.offset),
                };
                let Some(off) = off.filter(|&o| o % cs == 0 && o < r.size) else {
                    return Err(Error::Refused(format!(
                        "{label}: memory chunk {} at {:#x} lies outside its region's chunk map",
                        e.seq, e.offset
                    )));
                };
                owner[(off / cs) as usize] = Some(PackChunk {
                    gpa: r.gpa + off,
                    pack: k,
                    entry: e.clone(),
                });
            }
        }
        chunks.extend(owner.into_iter().flatten());
    }
    Ok(ChunkTable { packs, chunks })
}

/// Where [`write_layers`] puts a region's bytes.
enum RegionWriter<'a> {
    /// Guest RAM being filled before the VM exists: `(address, len)`.
    Slice(usize, usize),
    File(&'a File),
}

impl RegionWriter<'_> {
    fn write(&self, off: u64, data: &[u8]) -> std::io::Result<()> {
        match self {
            RegionWriter::Slice(ptr, len) => {
                if off + data.len() as u64 > *len as u64 {
                    return Err(std::io::Error::other("chunk runs past its RAM region"));
                }
                // SAFETY: inside the region (checked); chunks of one layer never overlap and
                // layers are written one after the other.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr(),
                        (*ptr as *mut u8).add(off as usize),
                        data.len(),
                    )
                };
                Ok(())
            }
            RegionWriter::File(f) => f.write_all_at(data, off),
        }
    }
}

/// Writes one region of the chain, base first, each diff pack's chunks (zero ones too)
/// over the ones before.
fn write_layers(chain: &Chain, r: &RegionLayers, out: &RegionWriter) -> Result<()> {
    for Layer {
        pack: k,
        section: id,
        map,
    } in &r.layers
    {
        let pack = &chain.packs[*k];
        let reader = pack.reader();
        let label = pack.path().display().to_string();
        let io = |e: std::io::Error| PackError::new(&label, PackErrorKind::Io(e));
        match map {
            None => reader.for_each_chunk_parallel(*id, false, 0, &|off, data| {
                out.write(off, data).map_err(io)
            })?,
            Some(map) => {
                let present = map.present();
                let at = |off: u64| {
                    map.region_offset(&present, off)
                        .ok_or_else(|| io(std::io::Error::other("diff chunk outside its map")))
                };
                reader.for_each_chunk_parallel(*id, false, 0, &|off, data| {
                    out.write(at(off)?, data).map_err(io)
                })?;
                let zeros = vec![0u8; reader.sections()[*id as usize].chunk_size as usize];
                for e in reader.chunks(*id).iter().filter(|e| e.codec == Codec::Zero) {
                    out.write(at(e.offset)?, &zeros[..e.ulen as usize])
                        .map_err(io)?;
                }
            }
        }
    }
    Ok(())
}

/// A region of the chain's child written out whole into `file` (sized by the caller);
/// returns the ranges that may hold data.
pub fn spill_region(chain: &Chain, index: usize, file: &File) -> Result<Vec<Range<u64>>> {
    let regions = region_layers(chain)?;
    let r = regions
        .get(index)
        .ok_or_else(|| Error::Refused(format!("no memory region {index}")))?;
    file.set_len(r.size)?;
    write_layers(chain, r, &RegionWriter::File(file))?;
    // Zero chunks of the base stay holes; everything else may hold data.
    let base = chain.packs[0].reader();
    let mut ranges: Vec<Range<u64>> = Vec::new();
    let mut add = |s: u64, e: u64| match ranges.last_mut() {
        Some(l) if l.end >= s => l.end = l.end.max(e),
        _ => ranges.push(s..e),
    };
    let mut marks: Vec<Range<u64>> = base
        .chunks(r.layers[0].section)
        .iter()
        .filter(|e| e.codec != Codec::Zero)
        .map(|e| e.offset..e.offset + e.ulen as u64)
        .collect();
    for map in r.layers.iter().skip(1).filter_map(|l| l.map.as_ref()) {
        marks.extend(map.present().into_iter().map(|c| map.chunk_range(c)));
    }
    marks.sort_by_key(|m| m.start);
    for m in marks {
        add(m.start, m.end);
    }
    Ok(ranges)
}

/// Writes disk `index` of the chain's child into `file` (sized and empty): its layers
/// oldest first (`Chain::disk_layers`), each disk diff's chunks (zero ones too) over the
/// ones before. The chunks are not checked here: the packs were verified before.
pub fn write_disk_layers(chain: &Chain, index: usize, file: &File) -> Result<()> {
    for layer in chain.disk_layers(index)? {
        let pack = &chain.packs[layer.pack];
        let reader = pack.reader();
        let label = pack.path().display().to_string();
        let io = |e: std::io::Error| PackError::new(&label, PackErrorKind::Io(e));
        let id = layer.section;
        match &layer.map {
            None => reader.for_each_chunk_parallel(id, false, 0, &|off, data| {
                file.write_all_at(data, off).map_err(io)
            })?,
            Some(map) => {
                let present = map.present();
                let at = |off: u64| {
                    map.region_offset(&present, off)
                        .ok_or_else(|| io(std::io::Error::other("disk diff chunk outside its map")))
                };
                reader.for_each_chunk_parallel(id, false, 0, &|off, data| {
                    file.write_all_at(data, at(off)?).map_err(io)
                })?;
                let zeros = vec![0u8; reader.sections()[id as usize].chunk_size as usize];
                for e in reader.chunks(id).iter().filter(|e| e.codec == Codec::Zero) {
                    file.write_all_at(&zeros[..e.ulen as usize], at(e.offset)?)
                        .map_err(io)?;
                }
            }
        }
    }
    Ok(())
}

/// Disk `index` of the chain's child as `(pack, disk offset, index entry)` per stored chunk,
/// each from the newest pack of the chain holding it (what a lazy restore fills on first
/// touch, checked against that pack's index; the entry's own offset is within its section). Zero chunks are
/// left out. The layers must share one chunk size, so chunks never partly overlap.
pub fn disk_chunks(chain: &Chain, index: usize) -> Result<Vec<(usize, u64, ChunkEntry)>> {
    let layers = chain.disk_layers(index)?;
    let first = &layers[0];
    let cs =
        u64::from(chain.packs[first.pack].reader().sections()[first.section as usize].chunk_size);
    let size = chain.packs[first.pack].manifest().disks[index].virtual_size;
    let mut owner: Vec<Option<(usize, u64, ChunkEntry)>> =
        vec![None; size.div_ceil(cs.max(1)) as usize];
    for l in &layers {
        let pack = &chain.packs[l.pack];
        let reader = pack.reader();
        let label = pack.path().display();
        let own = u64::from(reader.sections()[l.section as usize].chunk_size);
        if own != cs {
            return Err(Error::Refused(format!(
                "{label}: the chunks of disk {index} ({own} bytes) differ in size from those of the pack it is layered on ({cs} bytes), so it cannot be filled on first touch; restore it with --memory eager or `vmpack flatten` it"
            )));
        }
        let present = l.map.as_ref().map(|m| m.present());
        for e in reader.chunks(l.section) {
            let off = match (&l.map, &present) {
                (Some(m), Some(p)) => m.region_offset(p, e.offset),
                _ => Some(e.offset),
            };
            let Some(off) = off.filter(|&o| o % cs == 0 && o < size) else {
                return Err(Error::Refused(format!(
                    "{label}: disk {index} chunk {} at {:#x} lies outside its disk's chunk map",
                    e.seq, e.offset
                )));
            };
            owner[(off / cs) as usize] = Some((l.pack, off, e.clone()));
        }
    }
    Ok(owner
        .into_iter()
        .flatten()
        .filter(|(_, _, e)| e.codec != Codec::Zero)
        .collect())
}

/// The chain's base, opened again, after checking it holds every boot file the child
/// lists (diff packs store none: they are the base's).
pub fn base_with_files(chain: &Chain) -> Result<VmPack> {
    let child = chain.packs.last().expect("a chain holds the child");
    base_holding(chain, child.manifest(), &child.path().display().to_string())
}

/// The base of `chain` opened again, checked to hold every boot file `child` (labelled
/// `label`) lists.
fn base_holding(chain: &Chain, child: &Manifest, label: &str) -> Result<VmPack> {
    let base = VmPack::open(chain.packs[0].path())?;
    for f in &child.files {
        let b = base.manifest().file(&f.role);
        if b.is_none_or(|b| b.size != f.size || b.in_parent) {
            return Err(Error::Refused(format!(
                "{label}: its {} file ({} bytes) is not in its base pack {}",
                f.role,
                f.size,
                base.path().display()
            )));
        }
    }
    Ok(base)
}

/// The parents of a diff pack read from a pipe (so not a file to look next to): `parent`,
/// named by the user, and its own parents next to it, each checked against the root digest
/// its child names; then the child's RAM regions against theirs and its boot files against
/// the base's. Returns the chain (`parent` last) and its base. Nothing of the child's memory
/// has been read yet.
pub fn pipe_parents(
    label: &str,
    child: &Manifest,
    named: &ParentRef,
    parent: &std::path::Path,
) -> Result<(Chain, VmPack)> {
    if !parent.exists() {
        return Err(Error::Refused(format!(
            "{label}: its parent pack {} is missing (root digest {})",
            parent.display(),
            named.root_digest
        )));
    }
    let chain = vmpack_formats::diff::open_chain(parent, None)?;
    let last = chain.packs.last().expect("a chain holds its child");
    let actual = hex::encode(last.reader().root_digest());
    if actual != named.root_digest {
        return Err(Error::Refused(format!(
            "{label}: parent pack {} is not the one it was saved against: root digest {actual}, expected {}",
            parent.display(),
            named.root_digest
        )));
    }
    let mut ours: Vec<(u64, u64)> = child.memory.iter().map(|m| (m.gpa, m.size)).collect();
    let mut theirs: Vec<(u64, u64)> = last
        .manifest()
        .memory
        .iter()
        .map(|m| (m.gpa, m.size))
        .collect();
    ours.sort_unstable();
    theirs.sort_unstable();
    if ours != theirs {
        return Err(Error::Refused(format!(
            "{label}: its memory regions differ from those of its parent pack {}",
            parent.display()
        )));
    }
    // Checks the chain's own regions agree, before any RAM exists.
    region_layers(&chain)?;
    let base = base_holding(&chain, child, label)?;
    Ok((chain, base))
}

/// Fills `ram` (every region of the chain's newest pack, zeroed) with that pack's memory:
/// the base's, each diff's chunks over it, in order (not verified here: the caller verifies
/// the packs first).
pub fn fill_from_chain(chain: &Chain, ram: &mut crate::memory::StagedRam) -> Result<()> {
    for r in &region_layers(chain)? {
        let dst = ram
            .region_mut(r.gpa)
            .filter(|d| d.len() as u64 >= r.size)
            .ok_or_else(|| {
                Error::Refused(format!("no RAM region of {} bytes at {:#x}", r.size, r.gpa))
            })?;
        let out = RegionWriter::Slice(dst.as_mut_ptr() as usize, dst.len());
        write_layers(chain, r, &out)?;
    }
    Ok(())
}

/// Writes the chain's child as one full pack to `out`: its manifest's config, boot files,
/// vmstate and disks, and its memory layered over its parents; uncompressed and aligned
/// (as `vmpack save` writes), so it restores by mapping. `scratch` holds the temporary
/// (unlinked) copies of memory and disks.
pub fn flatten(
    chain: &Chain,
    scratch: &std::path::Path,
    compression: vmpack_formats::pack::Compression,
    out: &mut dyn std::io::Write,
) -> Result<vmpack_formats::pack::PackSummary> {
    use crate::clone::{tempfile_in, Spilled};
    use vmpack_formats::pack::{SectionSource, WriteOptions};
    let child = chain.packs.last().expect("a chain holds the child");
    let manifest = child.manifest();
    let reader = child.reader();
    let cfg = child.config()?;
    let state_section = manifest
        .vmstate
        .as_deref()
        .ok_or_else(|| Error::Refused(format!("{}: no vmstate section", child.path().display())))?;
    let s = reader
        .section(state_section)
        .ok_or_else(|| Error::Refused(format!("section '{state_section}' is missing")))?;
    let state = reader.read_section(s.id, crate::persist::MAX_VMSTATE_LEN)?;
    let base = base_with_files(chain)?;
    let mut files: Vec<(&'static str, Vec<u8>)> = Vec::new();
    for role in ["kernel", "initrd", "image"] {
        if manifest.file(role).is_some() {
            files.push((role, base.boot_file(role)?));
        }
    }
    // Each disk whole: its layers written into a scratch file.
    let disks = manifest
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let file = tempfile_in(scratch)?;
            file.set_len(d.virtual_size)?;
            write_disk_layers(chain, i, &file)?;
            let ranges = vmpack_formats::disk::seek_data_ranges(&file, d.virtual_size)?;
            Ok(Spilled {
                file,
                len: d.virtual_size,
                ranges,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut memory = Vec::new();
    for (i, m) in manifest.memory.iter().enumerate() {
        let file = tempfile_in(scratch)?;
        let ranges = spill_region(chain, i, &file)?;
        memory.push((
            m.gpa,
            Spilled {
                file,
                len: m.size,
                ranges,
            },
        ));
    }
    let plan = vmpack_formats::vm::VmPackPlan {
        memory: memory
            .iter()
            .map(|(g, s)| (*g, s as &dyn SectionSource))
            .collect(),
        vmstate: Some(&state),
        disks: Some(disks.iter().map(|d| d as &dyn SectionSource).collect()),
        files: Some(
            files
                .iter()
                .map(|(r, b)| (*r, b as &dyn SectionSource))
                .collect(),
        ),
        memory_chunk_size: Some(crate::packs::MEMORY_CHUNK_SIZE),
        files_in_memory: Vec::new(),
        diff: None,
        live: false,
    };
    let opts = WriteOptions {
        compression,
        aligned: compression == vmpack_formats::pack::Compression::None,
        ..WriteOptions::default()
    };
    Ok(vmpack_formats::vm::write_vm_pack(
        out,
        &cfg,
        plan,
        &opts,
        &(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use vmpack_formats::config::VmConfig;
    use vmpack_formats::diff::{open_chain, ParentRef};
    use vmpack_formats::pack::{SectionSource, WriteOptions};
    use vmpack_formats::vm::{PreparedPack, VmPackPlan};

    const MIB: usize = 1 << 20;

    /// A flat VM with one raw disk of `size` bytes, in its own folder under `dir`.
    fn cfg(dir: &Path, size: usize) -> VmConfig {
        std::fs::write(dir.join("g.bin"), b"\xf4").unwrap();
        File::create(dir.join("d.img"))
            .unwrap()
            .set_len(size as u64)
            .unwrap();
        let text = "name = \"t\"\nmemory_mib = 1\n[flat]\nimage = \"g.bin\"\n\
                    load_address = 0x1000\nentry = 0x1000\nmode = \"real\"\n\
                    [[disk]]\npath = \"d.img\"\nformat = \"raw\"\n";
        VmConfig::parse(text, &dir.join("vm.toml")).unwrap()
    }

    /// Writes pack `name` in `dir` with `disk` as its disk: whole, or with `parent` the
    /// chunks `map` marks as a disk diff.
    fn write(
        dir: &Path,
        name: &str,
        disk: &[u8],
        parent: Option<&Path>,
        map: Option<ChunkMap>,
    ) -> PathBuf {
        let cfg = cfg(dir, disk.len());
        let disk = disk.to_vec();
        let src: &dyn SectionSource = &disk;
        let diff = parent.map(|p| {
            let root = VmPack::open(p).unwrap().reader().root_digest();
            let file = p.file_name().unwrap().to_str().unwrap().to_string();
            (
                ParentRef {
                    root_digest: hex::encode(root),
                    file,
                },
                Vec::new(),
            )
        });
        let plan = VmPackPlan {
            disks: Some(vec![src]),
            diff,
            ..VmPackPlan::default()
        };
        let mut prepared = PreparedPack::new(&cfg, plan).unwrap();
        if let Some(m) = map {
            prepared.set_disk_diffs(vec![Some(m)]).unwrap();
        }
        let path = dir.join(name);
        let opts = WriteOptions {
            chunk_size: MIB as u32,
            ..WriteOptions::default()
        };
        prepared
            .write(File::create(&path).unwrap(), &opts, name, &())
            .unwrap();
        path
    }

    fn map(chunks: &[u64]) -> ChunkMap {
        let mut m = ChunkMap::new(4 * MIB as u64, MIB as u64);
        for &c in chunks {
            m.set(c);
        }
        m
    }

    #[test]
    fn disks_layer_over_the_chain_and_each_chunk_comes_from_the_newest_pack() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let base: Vec<u8> = (0..4 * MIB).map(|i| (i / 4096) as u8 | 1).collect();
        let mut one = base.clone();
        one[MIB..2 * MIB].fill(0x11);
        one[3 * MIB..].fill(0);
        let mut two = one.clone();
        two[MIB + 5..MIB + 9].fill(0x22);
        let b = write(dir, "base.vmpack", &base, None, None);
        let d1 = write(dir, "d1.vmpack", &one, Some(&b), Some(map(&[1, 3])));
        let d2 = write(dir, "d2.vmpack", &two, Some(&d1), Some(map(&[1])));
        // The child stores one 1 MiB chunk of its 4 MiB disk.
        let child = VmPack::open(&d2).unwrap();
        let s = child.reader().section("disk/0").unwrap();
        assert_eq!(
            (s.kind, s.size),
            (vmpack_formats::pack::kind::DISK_DIFF, MIB as u64)
        );

        let chain = open_chain(&d2, None).unwrap();
        let layers = chain.disk_layers(0).unwrap();
        assert_eq!(
            layers.iter().map(|l| l.pack).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 * MIB as u64).unwrap();
        write_disk_layers(&chain, 0, &f).unwrap();
        let mut got = vec![0u8; 4 * MIB];
        f.read_exact_at(&mut got, 0).unwrap();
        assert!(got == two, "the layered disk is the child's");

        // Lazily: chunk 1 from d2, chunks 0 and 2 from the base, chunk 3 is d1's zero chunk.
        let chunks = disk_chunks(&chain, 0).unwrap();
        let owners: Vec<(usize, u64)> = chunks.iter().map(|(k, at, _)| (*k, *at)).collect();
        assert_eq!(owners, vec![(0, 0), (2, MIB as u64), (0, 2 * MIB as u64)]);
        for (k, at, e) in &chunks {
            let mut data = vec![0u8; e.ulen as usize];
            chain.packs[*k]
                .reader()
                .read_chunk_reusing(e, true, &mut data, &mut Vec::new())
                .unwrap();
            let at = *at as usize;
            assert!(data == two[at..at + data.len()], "chunk at {at}");
        }

        // A disk diff over a parent disk of another size is refused, naming both packs.
        let other = tmp.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::copy(&b, other.join("base.vmpack")).unwrap();
        let mut big = base.clone();
        big.resize(5 * MIB, 7);
        let mut m = ChunkMap::new(5 * MIB as u64, MIB as u64);
        m.set(4);
        let bad = write(
            &other,
            "bad.vmpack",
            &big,
            Some(&other.join("base.vmpack")),
            Some(m),
        );
        let chain = open_chain(&bad, None).unwrap();
        let e = chain.disk_layers(0).unwrap_err().to_string();
        assert!(
            e.contains("base.vmpack")
                && e.contains("disk 0 holds 4194304 bytes")
                && e.contains("bad.vmpack"),
            "{e}"
        );
    }
}
