//! Cheap clones: many VMs restored from one pack share its memory pages.
//!
//! A restore maps an uncompressed, aligned pack's memory sections `MAP_PRIVATE`, so every
//! clone reads the same page-cache pages and only the pages a clone writes are its own.
//! A compressed pack cannot be mapped; [`mappable_pack`] expands it once into a cache file
//! (an uncompressed aligned pack with the same contents, keyed by the source's root digest)
//! that all later clones map instead.

use crate::packs::{Context, Error, Result};
use crate::verified_cache;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vmpack_formats::pack::{Codec, Compression, PackError, SectionSource, WriteOptions};
use vmpack_formats::vm::{VmPack, VmPackPlan};

/// Where expanded packs are kept: `expanded` in the cache folder the binary set
/// ([`verified_cache::set_base_dir`]).
pub fn cache_dir() -> Option<PathBuf> {
    Some(verified_cache::base_dir()?.join("expanded"))
}

/// What [`mappable_pack`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The pack's memory maps as it is.
    Direct,
    /// An expanded copy from the cache was reused.
    Cached,
    /// The pack was expanded into the cache now.
    Expanded,
}

/// A pack whose memory restores by mapping: `path` itself if it already is one, otherwise
/// its expanded copy in the cache (made now if missing). Verifies the source's chunks before
/// expanding; the pack at `path` is only read.
pub fn mappable_pack(path: &Path) -> Result<(PathBuf, Source)> {
    let pack = VmPack::open(path)?;
    let manifest = pack.manifest();
    if manifest.vmstate.is_none() {
        return Err(Error::Refused(format!(
            "{}: the pack holds a VM at rest, not a saved one; clones need a pack made by `vmpack save`",
            path.display()
        )));
    }
    // A diff pack is layered over its parents by the restore itself.
    if manifest.parent.is_some() || manifest.memory_restore_path(pack.reader()) == Some("mmap") {
        return Ok((path.to_path_buf(), Source::Direct));
    }
    let dir = cache_dir().ok_or_else(|| {
        Error::Unsupported(
            "no cache folder for the expanded pack: set VMPACK_CACHE_DIR, XDG_CACHE_HOME or HOME"
                .into(),
        )
    })?;
    let root = hex::encode(pack.reader().root_digest());
    let target = dir.join(format!("{root}.vmpack"));
    if let Ok(p) = VmPack::open(&target) {
        if p.manifest().memory_restore_path(p.reader()) == Some("mmap") {
            return Ok((target, Source::Cached));
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    pack.reader().verify(&())?;
    let tmp = dir.join(format!(".{root}.{}.tmp", std::process::id()));
    let result = expand(&pack, &tmp);
    match result {
        Ok(()) => {
            std::fs::rename(&tmp, &target)
                .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
            // Written from chunks verified just above.
            let written = VmPack::open(&target)?;
            verified_cache::record(&target, written.reader().root_digest());
            Ok((target, Source::Expanded))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e).with_context(|| format!("expanding {} into {}", path.display(), dir.display()))
        }
    }
}

/// A section's bytes unpacked into an unlinked sparse temporary file, read back as a
/// [`SectionSource`] whose data ranges are the source's non-zero chunks.
pub(crate) struct Spilled {
    pub(crate) file: File,
    pub(crate) len: u64,
    pub(crate) ranges: Vec<Range<u64>>,
}

impl SectionSource for Spilled {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn data_ranges(&self) -> std::io::Result<Vec<Range<u64>>> {
        Ok(self.ranges.clone())
    }
}

pub(crate) fn spill(pack: &VmPack, section: &str, dir: &Path) -> Result<Spilled> {
    let reader = pack.reader();
    let s = reader.section(section).ok_or_else(|| {
        Error::Refused(format!(
            "{}: section '{section}' is missing",
            pack.path().display()
        ))
    })?;
    let file = tempfile_in(dir)?;
    file.set_len(s.size)?;
    reader.for_each_chunk_parallel(s.id, false, 0, &|off, data| {
        file.write_all_at(data, off).map_err(|e| {
            PackError::new(
                &dir.display().to_string(),
                vmpack_formats::pack::PackErrorKind::Io(e),
            )
        })
    })?;
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for c in reader.chunks(s.id) {
        if c.codec == Codec::Zero {
            continue;
        }
        let r = c.offset..c.offset + c.ulen as u64;
        match ranges.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => ranges.push(r),
        }
    }
    Ok(Spilled {
        file,
        len: s.size,
        ranges,
    })
}

/// An unlinked file in `dir` (gone as soon as it is closed, also on a crash).
pub(crate) fn tempfile_in(dir: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))
}

fn expand(pack: &VmPack, out_path: &Path) -> Result<()> {
    let dir = out_path.parent().unwrap_or(Path::new("."));
    if pack.manifest().has_overlays() {
        // A live save's pack: its memory is the base with the overlay over it.
        let chain = vmpack_formats::diff::Chain {
            packs: vec![VmPack::open(pack.path())?],
        };
        let out =
            File::create(out_path).with_context(|| format!("creating {}", out_path.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
        crate::diff::flatten(&chain, dir, Compression::None, &mut w)?;
        let out = w.into_inner().map_err(|e| e.into_error())?;
        out.sync_all()?;
        return Ok(());
    }
    let manifest = pack.manifest();
    let reader = pack.reader();
    let cfg = pack.config()?;
    let state_section = manifest.vmstate.as_deref().unwrap_or_default();
    let s = reader
        .section(state_section)
        .ok_or_else(|| Error::Refused(format!("section '{state_section}' is missing")))?;
    let state = reader.read_section(s.id, 64 << 20)?;
    let mut files: Vec<(&'static str, Vec<u8>)> = Vec::new();
    for role in ["kernel", "initrd", "image"] {
        if manifest.file(role).is_some() {
            files.push((role, pack.boot_file(role)?));
        }
    }
    let disks = manifest
        .disks
        .iter()
        .map(|d| spill(pack, &d.section, dir))
        .collect::<Result<Vec<_>>>()?;
    let memory = manifest
        .memory
        .iter()
        .map(|m| Ok((m.gpa, spill(pack, &m.section, dir)?)))
        .collect::<Result<Vec<_>>>()?;
    let plan = VmPackPlan {
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
        files_in_memory: ["kernel", "initrd", "image"]
            .into_iter()
            .filter_map(|role| Some((role, manifest.file(role)?.in_memory?)))
            .collect(),
        diff: None,
        live: false,
    };
    let opts = WriteOptions {
        compression: Compression::None,
        aligned: true,
        ..WriteOptions::default()
    };
    let out = File::create(out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
    vmpack_formats::vm::write_vm_pack(&mut w, &cfg, plan, &opts, &())?;
    let out = w.into_inner().map_err(|e| e.into_error())?;
    out.sync_all()?;
    Ok(())
}
