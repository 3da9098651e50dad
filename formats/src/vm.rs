//! The VM layer over the pack container: a manifest describing the VM, then its boot files,
//! disks and (for saved VMs) memory and device state, one section each.
//!
//! Section layout, in file order (the manifest comes first so a streaming reader knows what
//! follows before it arrives):
//!
//! | kind | name | contents |
//! |---|---|---|
//! | MANIFEST | `manifest` | [`Manifest`] as JSON |
//! | FILE | `boot/<role>` | kernel, initrd or flat image bytes |
//! | DISK | `disk/<index>` | the disk's guest-visible bytes (format-independent) |
//! | MEMORY | `memory/<index>` | one guest RAM region |
//! | VMSTATE | `vmstate` | serialized vCPU/device state (opaque here) |

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{DiskFormat, VmConfig};
use crate::disk::{self, DiskImage, DiskSource};
use crate::host::HostCpu;
use crate::pack::{
    kind, Codec, FileSource, PackError, PackErrorKind, PackReader, PackSummary, PackWriter,
    Progress, SectionInfo, SectionRange, SectionSource, StreamEvent, StreamReader, WriteOptions,
};

/// Value of [`Manifest::format`].
pub const MANIFEST_FORMAT: &str = "vmpack";
/// Name of the manifest section.
pub const MANIFEST_SECTION: &str = "manifest";
/// Name of the vmstate section.
pub const VMSTATE_SECTION: &str = "vmstate";
/// The manifest is read whole; refuse anything bigger before allocating.
pub const MAX_MANIFEST_LEN: u64 = 16 << 20;
/// Boot files are read whole by [`VmPack::boot_file`].
pub const MAX_BOOT_FILE_LEN: u64 = 1 << 30;
/// Largest disk a pack may describe (64 TiB).
pub const MAX_DISK_SIZE: u64 = 64 << 40;
/// File name of the config written by [`VmPack::extract_to_dir`].
pub const CONFIG_FILE_NAME: &str = "vm.toml";

/// Pack metadata: first section of every VM pack. Fields added by later versions must have
/// serde defaults so older packs still parse; unknown fields are ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `"vmpack"`.
    pub format: String,
    /// Program that wrote the pack.
    pub tool: String,
    pub tool_version: String,
    /// Creation time, RFC 3339 UTC (`2026-11-26T01:07:00Z`).
    pub created: String,
    /// Creation time, seconds since the Unix epoch.
    #[serde(default)]
    pub created_unix: u64,
    /// The CPU of the host the pack was written on.
    #[serde(default)]
    pub host: HostCpu,
    /// The VM config as TOML; its file paths are the `name`s below, relative to wherever the
    /// pack is unpacked.
    pub config: String,
    #[serde(default)]
    pub files: Vec<FileEntry>,
    #[serde(default)]
    pub disks: Vec<DiskEntry>,
    /// Guest RAM regions of a saved VM; empty for a VM that was not running.
    #[serde(default)]
    pub memory: Vec<MemoryEntry>,
    /// Section holding the saved device/vCPU state, if any.
    #[serde(default)]
    pub vmstate: Option<String>,
    /// For a diff pack: the pack whose memory and disks this one's are layered on
    /// (docs/FORMAT.md §15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<crate::diff::ParentRef>,
}

/// A boot file (kernel, initrd or flat image).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// `kernel`, `initrd` or `image`.
    pub role: String,
    pub section: String,
    /// File name when unpacked (one path component).
    pub name: String,
    pub size: u64,
    /// For a saved VM whose guest RAM still holds this file byte for byte (an initrd where
    /// the loader put it): its guest physical address. `section` then names the MEMORY
    /// section holding it, and the pack has no FILE section for it, so it is stored once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_memory: Option<u64>,
    /// Diff packs only: the file is not stored here but in the chain's base pack (a diff
    /// pack's VM always has its parent's boot files); no section holds it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_parent: bool,
}

/// A disk, in config order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    pub index: u32,
    pub section: String,
    /// File name when unpacked (one path component).
    pub name: String,
    /// Format of the original image; unpack recreates it.
    pub format: DiskFormat,
    pub virtual_size: u64,
    #[serde(default)]
    pub read_only: bool,
}

/// A guest RAM region of a saved VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEntry {
    pub section: String,
    /// Guest physical address of the region's first byte.
    pub gpa: u64,
    pub size: u64,
}

/// Errors of the VM layer. Messages name the pack file and, where relevant, the section.
#[derive(Debug, thiserror::Error)]
pub enum VmPackError {
    #[error("{0}")]
    Pack(#[from] PackError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    /// The pack is a valid container but not a valid VM pack.
    #[error("{file}: section '{section}': {message}")]
    Invalid {
        file: String,
        section: String,
        message: String,
    },
    #[error("{0}")]
    Usage(String),
}

fn io_err(path: &Path, source: io::Error) -> VmPackError {
    VmPackError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Everything a caller wants in a pack beyond what the config names.
///
/// A saved VM passes its RAM regions and state blob here so the manifest (written first)
/// can list them.
#[derive(Default)]
pub struct VmPackPlan<'a> {
    /// Guest RAM regions: (guest physical address, contents).
    pub memory: Vec<(u64, &'a dyn SectionSource)>,
    /// Serialized vCPU/device state.
    pub vmstate: Option<&'a [u8]>,
    /// Replaces the disk images the config names, one per `[[disk]]` in order (e.g. a
    /// running VM's open disks). The manifest still records the config's names and formats.
    pub disks: Option<Vec<&'a dyn SectionSource>>,
    /// Replaces the boot files the config names, as `(role, contents)` (a running VM holds
    /// them in memory; a restored one may have no files on this host at all).
    pub files: Option<Vec<(&'static str, &'a dyn SectionSource)>>,
    /// Chunk size for memory sections (finer than files: zero pages are elided per chunk).
    pub memory_chunk_size: Option<u32>,
    /// Boot files that guest memory holds byte for byte, as `(role, guest physical
    /// address)`: recorded `in_memory` instead of being stored a second time.
    pub files_in_memory: Vec<(&'static str, u64)>,
    /// Makes a diff pack: the parent, and per memory region which chunks to store (chunk
    /// size = `memory_chunk_size`).
    pub diff: Option<(crate::diff::ParentRef, Vec<crate::diff::ChunkMap>)>,
}

/// A VM pack ready to be written: inputs opened, manifest built.
pub struct PreparedPack<'a> {
    manifest: Manifest,
    files: Vec<(FileEntry, BootInput<'a>)>,
    disks: Vec<(DiskEntry, DiskInput<'a>)>,
    memory: Vec<(MemoryEntry, &'a dyn SectionSource)>,
    vmstate: Option<&'a [u8]>,
    memory_chunk_size: Option<u32>,
    diff: Option<Vec<crate::diff::ChunkMap>>,
    /// Per disk of a diff pack, the chunks to store (None: the disk whole).
    disk_diff: Vec<Option<crate::diff::ChunkMap>>,
}

enum BootInput<'a> {
    Opened(FileSource),
    Given(&'a dyn SectionSource),
}

impl BootInput<'_> {
    fn source(&self) -> &dyn SectionSource {
        match self {
            BootInput::Opened(f) => f,
            BootInput::Given(s) => *s,
        }
    }
}

enum DiskInput<'a> {
    Opened(DiskSource),
    Given(&'a dyn SectionSource),
}

impl DiskInput<'_> {
    fn source(&self) -> &dyn SectionSource {
        match self {
            DiskInput::Opened(d) => d,
            DiskInput::Given(s) => *s,
        }
    }
}

/// Picks a unique, safe single-component file name based on `path`'s file name.
fn unique_name(path: &Path, fallback: &str, taken: &mut HashSet<String>) -> String {
    let base = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| is_safe_name(n))
        .unwrap_or(fallback)
        .to_string();
    let mut name = base.clone();
    let mut i = 1;
    while taken.contains(&name) {
        name = match base.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() => format!("{stem}-{i}.{ext}"),
            _ => format!("{base}-{i}"),
        };
        i += 1;
    }
    taken.insert(name.clone());
    name
}

/// A name that is one normal path component, so unpacking cannot escape its folder, holds
/// no control character (a terminal escape in a listing), and is none of the names unpack
/// writes itself ([`is_reserved_name`]).
pub fn is_safe_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 255
        && n != "."
        && n != ".."
        && !n.contains('/')
        && !n.contains('\\')
        && !n.chars().any(char::is_control)
        && !is_reserved_name(n)
}

/// The file of the memory region `i` that unpack writes.
pub fn memory_file_name(i: usize) -> String {
    format!("memory-{i}.raw")
}

/// The vmstate file that unpack writes.
pub const VMSTATE_FILE_NAME: &str = "vmstate.bin";

/// Names unpack generates: `vm.toml`, `vmstate.bin`, `memory-N.raw`. A file of the pack
/// may not take one, so nothing unpacked can overwrite another.
pub fn is_reserved_name(n: &str) -> bool {
    n == CONFIG_FILE_NAME
        || n == VMSTATE_FILE_NAME
        || n.strip_prefix("memory-")
            .and_then(|r| r.strip_suffix(".raw"))
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// `s` with every control character escaped (`\u{1b}`, `\n`...), for messages and listings:
/// a name from a pack never reaches a terminal raw.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// [`printable`] for a multi-line message: line breaks and tabs are kept.
pub fn printable_lines(s: &str) -> String {
    s.split('\n')
        .map(|l| {
            l.chars()
                .map(|c| {
                    if c.is_control() && c != '\t' {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Refuses a file name (of a config's boot file or disk) that a pack would carry with a
/// control character in it.
fn check_packable_name(path: &Path) -> Result<(), VmPackError> {
    let name = path.file_name().map(|n| n.to_string_lossy());
    if name.is_some_and(|n| n.chars().any(char::is_control)) {
        return Err(VmPackError::Usage(format!(
            "{}: the file name contains control characters, which a pack never carries; rename the file",
            printable(&path.display().to_string())
        )));
    }
    Ok(())
}

impl<'a> PreparedPack<'a> {
    /// Opens every input the config names and builds the manifest. Fails (naming the file)
    /// when an input is missing.
    pub fn new(cfg: &VmConfig, plan: VmPackPlan<'a>) -> Result<PreparedPack<'a>, VmPackError> {
        let mut taken = HashSet::new();
        let mut out_cfg = cfg.clone();
        // A template file stays on the host; the pack names it (its effect, the CPUID, is
        // in a saved VM's vm state).
        if let crate::config::CpuTemplate::Custom(p) = &mut out_cfg.cpu_template {
            *p = p
                .file_name()
                .map_or_else(|| "template.json".into(), PathBuf::from);
        }

        let mut files = Vec::new();
        for (role, path) in cfg.boot_files() {
            let given = plan
                .files
                .as_ref()
                .and_then(|g| g.iter().find(|(r, _)| *r == role).map(|(_, s)| *s));
            let src = match (given, &plan.files) {
                (Some(s), _) => BootInput::Given(s),
                // A caller that supplies the files (a running or restored VM) never has a
                // path opened in their place: the config may come from a pack.
                (None, Some(_)) => {
                    return Err(VmPackError::Usage(format!(
                        "the config's {role} '{}' was not supplied with the VM's boot files",
                        path.display()
                    )))
                }
                (None, None) => {
                    BootInput::Opened(FileSource::open(path).map_err(|e| io_err(path, e))?)
                }
            };
            check_packable_name(path)?;
            let name = unique_name(path, role, &mut taken);
            files.push((
                FileEntry {
                    role: role.to_string(),
                    section: format!("boot/{role}"),
                    name,
                    size: src.source().len(),
                    in_memory: None,
                    in_parent: plan.diff.is_some(),
                },
                src,
            ));
        }
        for (e, _) in &files {
            let p = PathBuf::from(&e.name);
            match e.role.as_str() {
                "kernel" => out_cfg.kernel.as_mut().unwrap().path = p,
                "initrd" => out_cfg.kernel.as_mut().unwrap().initrd = Some(p),
                _ => out_cfg.flat.as_mut().unwrap().image = p,
            }
        }

        if let Some(given) = &plan.disks {
            if given.len() != cfg.disks.len() {
                return Err(VmPackError::Usage(format!(
                    "{} disk sources given for {} configured disks",
                    given.len(),
                    cfg.disks.len()
                )));
            }
        }
        let mut disks = Vec::new();
        for (i, d) in cfg.disks.iter().enumerate() {
            let input = match &plan.disks {
                Some(given) => DiskInput::Given(given[i]),
                None => DiskInput::Opened(DiskSource(
                    disk::open_disk(&d.path, d.format, true).map_err(|e| io_err(&d.path, e))?,
                )),
            };
            check_packable_name(&d.path)?;
            let name = unique_name(&d.path, &format!("disk{i}.{}", ext(d.format)), &mut taken);
            out_cfg.disks[i].path = PathBuf::from(&name);
            disks.push((
                DiskEntry {
                    index: i as u32,
                    section: format!("disk/{i}"),
                    name,
                    format: d.format,
                    virtual_size: input.source().len(),
                    read_only: d.read_only,
                },
                input,
            ));
        }
        if let Some(p) = &mut out_cfg.serial.path {
            // Serial output is not packed; point it into the unpack folder.
            *p = PathBuf::from(unique_name(p, "serial.log", &mut taken));
        }

        let memory: Vec<_> = plan
            .memory
            .iter()
            .enumerate()
            .map(|(i, (gpa, src))| {
                (
                    MemoryEntry {
                        section: format!("memory/{i}"),
                        gpa: *gpa,
                        size: src.len(),
                    },
                    *src,
                )
            })
            .collect();
        if let Some((_, maps)) = &plan.diff {
            let cs = u64::from(
                plan.memory_chunk_size
                    .unwrap_or(crate::pack::DEFAULT_CHUNK_SIZE),
            );
            let fits = maps.len() == memory.len()
                && maps
                    .iter()
                    .zip(&memory)
                    .all(|(m, (e, _))| m.region_size == e.size && m.chunk_size == cs);
            if !fits {
                return Err(VmPackError::Usage(
                    "diff chunk maps do not match the memory regions".into(),
                ));
            }
        }
        // A diff pack's memory sections are partial: a boot file is never recorded in them.
        let files_in_memory = if plan.diff.is_some() {
            &[][..]
        } else {
            &plan.files_in_memory[..]
        };
        for (role, gpa) in files_in_memory {
            let Some((e, _)) = files.iter_mut().find(|(e, _)| e.role == *role) else {
                continue;
            };
            let holder = memory.iter().find(|(m, _)| {
                gpa.checked_sub(m.gpa)
                    .and_then(|off| off.checked_add(e.size))
                    .is_some_and(|end| end <= m.size)
            });
            if let Some((m, _)) = holder {
                e.section = m.section.clone();
                e.in_memory = Some(*gpa);
            }
        }

        let (created, created_unix) = now_rfc3339();
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            tool: "vmpack".into(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            created,
            created_unix,
            host: HostCpu::detect(),
            config: out_cfg.to_toml_string(),
            files: files.iter().map(|(e, _)| e.clone()).collect(),
            disks: disks.iter().map(|(e, _)| e.clone()).collect(),
            memory: memory.iter().map(|(e, _)| e.clone()).collect(),
            vmstate: plan.vmstate.map(|_| VMSTATE_SECTION.to_string()),
            parent: plan.diff.as_ref().map(|(p, _)| p.clone()),
        };
        Ok(PreparedPack {
            manifest,
            files,
            disks,
            memory,
            vmstate: plan.vmstate,
            memory_chunk_size: plan.memory_chunk_size,
            diff: plan.diff.map(|(_, maps)| maps),
            disk_diff: Vec::new(),
        })
    }

    /// Stores the disks of a diff pack as the chunks `maps` marks (one entry per disk; None
    /// stores that disk whole), each section in chunks of its map's chunk size.
    pub fn set_disk_diffs(
        &mut self,
        maps: Vec<Option<crate::diff::ChunkMap>>,
    ) -> Result<(), VmPackError> {
        let usage = |m: &str| Err(VmPackError::Usage(m.into()));
        if self.manifest.parent.is_none() {
            return usage("disk diffs in a pack without a parent");
        }
        if maps.len() != self.disks.len() {
            return usage("disk diff maps do not match the disks");
        }
        for (m, (e, _)) in maps.iter().zip(&self.disks) {
            let Some(m) = m else { continue };
            let cs = m.chunk_size;
            if m.region_size != e.virtual_size
                || cs < u64::from(crate::pack::MIN_CHUNK_SIZE)
                || cs > u64::from(crate::pack::MAX_CHUNK_SIZE)
                || !crate::diff::ChunkMap::fits_meta(m.region_size, cs)
            {
                return usage("a disk diff map does not fit its disk");
            }
        }
        self.disk_diff = maps;
        Ok(())
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Uncompressed bytes [`PreparedPack::write`] reports through its progress.
    pub fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .filter(|(e, _)| e.in_memory.is_none() && !e.in_parent)
            .map(|(e, _)| e.size)
            .sum::<u64>()
            + self
                .disks
                .iter()
                .enumerate()
                .map(|(i, (e, _))| match self.disk_diff.get(i) {
                    Some(Some(m)) => m.section_size(),
                    _ => e.virtual_size,
                })
                .sum::<u64>()
            + self.memory.iter().map(|(e, _)| e.size).sum::<u64>()
            + self.vmstate.map_or(0, |v| v.len() as u64)
    }

    /// Writes the whole pack to `out` (which need not seek).
    pub fn write<W: Write>(
        &self,
        out: W,
        opts: &WriteOptions,
        out_name: &str,
        progress: &dyn Progress,
    ) -> Result<PackSummary, VmPackError> {
        let mut w = PackWriter::new(out, opts.clone())?;
        w.set_name(out_name);
        let manifest = serde_json::to_vec_pretty(&self.manifest)
            .map_err(|e| VmPackError::Usage(format!("manifest: {e}")))?;
        w.add_section(
            kind::MANIFEST,
            MANIFEST_SECTION,
            serde_json::json!({"format": MANIFEST_FORMAT}),
            &manifest,
            &(),
        )?;
        for (e, src) in self
            .files
            .iter()
            .filter(|(e, _)| e.in_memory.is_none() && !e.in_parent)
        {
            w.add_section(
                kind::FILE,
                &e.section,
                serde_json::json!({"role": e.role, "name": e.name}),
                src.source(),
                progress,
            )?;
        }
        // The state precedes disks and memory so that a restore reading a pipe can refuse
        // a host that cannot run the guest before the bulk of the bytes arrives.
        if let Some(state) = self.vmstate {
            w.add_section(
                kind::VMSTATE,
                VMSTATE_SECTION,
                serde_json::json!({}),
                &state,
                progress,
            )?;
        }
        for (i, (e, src)) in self.disks.iter().enumerate() {
            if let Some(Some(map)) = self.disk_diff.get(i) {
                let d = crate::diff::DiffSource::new(src.source(), map.clone());
                w.add_section_with(
                    kind::DISK_DIFF,
                    &e.section,
                    map.disk_meta(&e.name, serde_json::json!(e.format), e.read_only),
                    &d,
                    map.chunk_size as u32,
                    opts.compression,
                    progress,
                )?;
                continue;
            }
            w.add_section(
                kind::DISK,
                &e.section,
                serde_json::json!({
                    "name": e.name,
                    "format": e.format,
                    "virtual_size": e.virtual_size,
                    "read_only": e.read_only,
                }),
                src.source(),
                progress,
            )?;
        }
        let memory_chunk = self.memory_chunk_size.unwrap_or(opts.chunk_size);
        for (i, (e, src)) in self.memory.iter().enumerate() {
            if let Some(maps) = &self.diff {
                let d = crate::diff::DiffSource::new(*src, maps[i].clone());
                w.add_section_with(
                    kind::MEMORY_DIFF,
                    &e.section,
                    maps[i].meta(e.gpa),
                    &d,
                    memory_chunk,
                    opts.compression,
                    progress,
                )?;
                continue;
            }
            w.add_section_with(
                kind::MEMORY,
                &e.section,
                serde_json::json!({"gpa": e.gpa}),
                *src,
                memory_chunk,
                opts.compression,
                progress,
            )?;
        }
        Ok(w.finish()?)
    }
}

/// Packs the VM `cfg` describes (plus whatever `plan` adds) into `out`.
pub fn write_vm_pack<W: Write>(
    out: W,
    cfg: &VmConfig,
    plan: VmPackPlan<'_>,
    opts: &WriteOptions,
    progress: &dyn Progress,
) -> Result<PackSummary, VmPackError> {
    PreparedPack::new(cfg, plan)?.write(out, opts, "<output>", progress)
}

fn ext(f: DiskFormat) -> &'static str {
    match f {
        DiskFormat::Raw => "img",
        DiskFormat::Qcow2 => "qcow2",
    }
}

/// The current time as RFC 3339 UTC and as Unix seconds.
pub fn now_rfc3339() -> (String, u64) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (rfc3339(secs), secs)
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

impl Manifest {
    /// Parses and checks a manifest read from `file`'s manifest section.
    pub fn parse(bytes: &[u8], file: &str) -> Result<Manifest, VmPackError> {
        let invalid = |message: String| VmPackError::Invalid {
            file: file.to_string(),
            section: MANIFEST_SECTION.to_string(),
            message,
        };
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| invalid(format!("not a valid manifest: {e}")))?;
        if m.format != MANIFEST_FORMAT {
            return Err(invalid(format!(
                "format is '{}', expected '{MANIFEST_FORMAT}'",
                m.format
            )));
        }
        let mut names = HashSet::new();
        let all_names = m
            .files
            .iter()
            .map(|f| &f.name)
            .chain(m.disks.iter().map(|d| &d.name));
        for n in all_names {
            let shown = printable(n);
            if n.chars().any(char::is_control) {
                return Err(invalid(format!(
                    "file name '{shown}' contains control characters"
                )));
            }
            if is_reserved_name(n) {
                return Err(invalid(format!(
                    "file name '{shown}' is reserved for a file unpack writes itself ({CONFIG_FILE_NAME}, {VMSTATE_FILE_NAME}, memory-N.raw)"
                )));
            }
            if !is_safe_name(n) {
                return Err(invalid(format!(
                    "file name '{shown}' is not a single plain file name"
                )));
            }
            if !names.insert(n.clone()) {
                return Err(invalid(format!("file name '{shown}' is used twice")));
            }
        }
        for (i, d) in m.disks.iter().enumerate() {
            if d.index as usize != i {
                return Err(invalid(format!("disk {i} has index {}", d.index)));
            }
            // Checked before any image is created: a qcow2's tables grow with its size.
            if d.virtual_size > MAX_DISK_SIZE {
                return Err(invalid(format!(
                    "disk {i} claims {} bytes (max {MAX_DISK_SIZE})",
                    d.virtual_size
                )));
            }
        }
        if let Some(p) = &m.parent {
            p.check().map_err(invalid)?;
            if m.files.iter().any(|f| f.in_memory.is_some()) {
                return Err(invalid(
                    "a diff pack records a boot file in its (partial) memory".into(),
                ));
            }
        }
        if m.parent.is_none() && m.files.iter().any(|f| f.in_parent) {
            return Err(invalid(
                "a boot file is 'in_parent' but the pack has no parent".into(),
            ));
        }
        for f in &m.files {
            if f.size > MAX_BOOT_FILE_LEN {
                return Err(invalid(format!(
                    "{} file claims {} bytes (max {MAX_BOOT_FILE_LEN})",
                    f.role, f.size
                )));
            }
        }
        Ok(m)
    }

    /// Checks that every section the manifest names exists with the right kind and size.
    pub fn check_sections(&self, sections: &[SectionInfo], file: &str) -> Result<(), VmPackError> {
        let find = |name: &str, k: u16, size: Option<u64>| -> Result<(), VmPackError> {
            let invalid = |message: String| VmPackError::Invalid {
                file: file.to_string(),
                section: name.to_string(),
                message,
            };
            let s = sections
                .iter()
                .find(|s| s.name == name)
                .ok_or_else(|| invalid("named by the manifest but missing from the pack".into()))?;
            if s.kind != k {
                return Err(invalid(format!("kind {} where {k} was expected", s.kind)));
            }
            if let Some(size) = size {
                if s.size != size {
                    return Err(invalid(format!(
                        "holds {} bytes, the manifest says {size}",
                        s.size
                    )));
                }
            }
            Ok(())
        };
        for f in self.files.iter().filter(|f| !f.in_parent) {
            match f.in_memory {
                None => find(&f.section, kind::FILE, Some(f.size))?,
                Some(gpa) => {
                    find(&f.section, kind::MEMORY, None)?;
                    self.memory_offset(&f.section, gpa, f.size).ok_or_else(|| {
                        VmPackError::Invalid {
                            file: file.to_string(),
                            section: f.section.clone(),
                            message: format!(
                                "{} {gpa:#x}+{:#x} is not inside this memory region",
                                f.role, f.size
                            ),
                        }
                    })?;
                }
            }
        }
        for d in &self.disks {
            let diff = sections
                .iter()
                .find(|s| s.name == d.section && s.kind == kind::DISK_DIFF);
            match diff {
                // Only a diff pack may store a disk as the chunks written since its parent.
                Some(s) if self.parent.is_some() => {
                    crate::diff::ChunkMap::from_disk_section(s, d.virtual_size).map_err(
                        |message| VmPackError::Invalid {
                            file: file.to_string(),
                            section: d.section.clone(),
                            message,
                        },
                    )?;
                }
                _ => find(&d.section, kind::DISK, Some(d.virtual_size))?,
            }
        }
        for m in &self.memory {
            if self.parent.is_none() {
                find(&m.section, kind::MEMORY, Some(m.size))?;
                continue;
            }
            let s = sections.iter().find(|s| s.name == m.section);
            let s = s.ok_or_else(|| VmPackError::Invalid {
                file: file.to_string(),
                section: m.section.clone(),
                message: "named by the manifest but missing from the pack".into(),
            })?;
            crate::diff::ChunkMap::from_section(s, m.size).map_err(|message| {
                VmPackError::Invalid {
                    file: file.to_string(),
                    section: m.section.clone(),
                    message,
                }
            })?;
        }
        if let Some(v) = &self.vmstate {
            find(v, kind::VMSTATE, None)?;
        }
        Ok(())
    }

    /// Checks the memory sections against the VM's memory before any of them is read: each
    /// region and their total must fit in `memory_mib` of the packed config (itself at most
    /// [`crate::config::MAX_MEMORY_MIB`]). `offset` gives a section's file offset for the
    /// message, where known.
    pub fn check_memory(
        &self,
        file: &str,
        offset: &dyn Fn(&str) -> Option<u64>,
    ) -> Result<(), VmPackError> {
        if self.memory.is_empty() {
            return Ok(());
        }
        // Only memory_mib is used: the base folder is never touched.
        let cfg = self.config_at(Path::new("/nonexistent"), file)?;
        let limit = cfg.memory_mib << 20;
        let mut total = 0u64;
        for m in &self.memory {
            total = total.saturating_add(m.size);
            if m.size > limit || total > limit || m.gpa.checked_add(m.size).is_none() {
                let at = offset(&m.section)
                    .map(|o| format!("file offset {o}: "))
                    .unwrap_or_default();
                return Err(VmPackError::Invalid {
                    file: file.to_string(),
                    section: m.section.clone(),
                    message: format!(
                        "{at}memory region {:#x}+{:#x} ({} bytes) does not fit in the VM's memory (memory_mib = {}, {limit} bytes in all); refused before reading it",
                        m.gpa, m.size, m.size, cfg.memory_mib
                    ),
                });
            }
        }
        Ok(())
    }

    /// The packed config, with file paths resolved against `base` (where the files are or
    /// will be unpacked). `file` names the pack in error messages.
    pub fn config_at(&self, base: &Path, file: &str) -> Result<VmConfig, VmPackError> {
        // The origin only serves messages and the base folder; the text's paths are plain
        // names, so they land in `base`.
        let origin = base.join("manifest.config");
        let origin_label = PathBuf::from(format!("{file}: section 'manifest': config"));
        let cfg = VmConfig::parse(&self.config, &origin).map_err(|e| match e {
            crate::config::ConfigError::Invalid {
                line,
                column,
                message,
                ..
            } => VmPackError::Config(crate::config::ConfigError::Invalid {
                path: origin_label.display().to_string(),
                line,
                column,
                message,
            }),
            other => VmPackError::Config(other),
        })?;
        Ok(cfg)
    }

    /// Offset within memory section `section` of `len` bytes at guest address `gpa`, if
    /// they lie inside it.
    pub fn memory_offset(&self, section: &str, gpa: u64, len: u64) -> Option<u64> {
        let m = self.memory.iter().find(|m| m.section == section)?;
        let off = gpa.checked_sub(m.gpa)?;
        (off.checked_add(len)? <= m.size).then_some(off)
    }

    /// The file entry for a boot role.
    pub fn file(&self, role: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.role == role)
    }

    /// Whether restoring this pack's memory could map the file directly instead of copying.
    pub fn memory_restore_path(&self, reader: &PackReader) -> Option<&'static str> {
        if self.memory.is_empty() {
            return None;
        }
        if !reader.aligned() {
            return Some("decompress");
        }
        for m in &self.memory {
            let Some(s) = reader.section(&m.section) else {
                return Some("decompress");
            };
            if reader
                .chunks(s.id)
                .iter()
                .any(|c| !matches!(c.codec, Codec::None | Codec::Zero))
            {
                return Some("decompress");
            }
        }
        Some("mmap")
    }
}

/// An opened VM pack.
pub struct VmPack {
    reader: PackReader,
    manifest: Manifest,
    path: PathBuf,
}

impl VmPack {
    /// Opens a pack and checks its manifest against its sections.
    pub fn open(path: &Path) -> Result<VmPack, VmPackError> {
        let reader = PackReader::open(path)?;
        let file = path.display().to_string();
        let manifest = read_manifest(&reader, &file)?;
        manifest.check_sections(reader.sections(), &file)?;
        manifest.check_memory(&file, &|name| {
            reader
                .section(name)
                .and_then(|s| reader.section_offset(s.id))
        })?;
        Ok(VmPack {
            reader,
            manifest,
            path: path.to_path_buf(),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn reader(&self) -> &PackReader {
        &self.reader
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file_label(&self) -> String {
        self.path.display().to_string()
    }

    /// The packed config; its file paths point next to the pack file, where nothing is yet.
    pub fn config(&self) -> Result<VmConfig, VmPackError> {
        let base = self.path.parent().unwrap_or(Path::new("."));
        self.manifest.config_at(base, &self.file_label())
    }

    pub fn host(&self) -> &HostCpu {
        &self.manifest.host
    }

    /// Reads a whole boot file (`kernel`, `initrd` or `image`), verifying its chunks.
    pub fn boot_file(&self, role: &str) -> Result<Vec<u8>, VmPackError> {
        let entry = self
            .manifest
            .file(role)
            .ok_or_else(|| VmPackError::Invalid {
                file: self.file_label(),
                section: MANIFEST_SECTION.into(),
                message: format!("the pack has no {role} file"),
            })?;
        self.not_in_parent(entry)?;
        let s = self.section(&entry.section)?;
        let Some(gpa) = entry.in_memory else {
            return Ok(self.reader.read_section(s.id, MAX_BOOT_FILE_LEN)?);
        };
        if entry.size > MAX_BOOT_FILE_LEN {
            return Err(VmPackError::Invalid {
                file: self.file_label(),
                section: entry.section.clone(),
                message: format!("{role} of {} bytes is too large", entry.size),
            });
        }
        let src = self.boot_file_source(entry, s.id, gpa)?;
        let mut buf = vec![0u8; entry.size as usize];
        src.read_at(&mut buf, 0)
            .map_err(|e| io_err(&self.path, e))?;
        Ok(buf)
    }

    /// A boot file's bytes as a section source (from its FILE section, or from guest
    /// memory for files stored `in_memory`).
    pub fn boot_file_range(&self, entry: &FileEntry) -> Result<SectionRange<'_>, VmPackError> {
        self.not_in_parent(entry)?;
        let s = self.section(&entry.section)?;
        match entry.in_memory {
            None => Ok(SectionRange::whole(&self.reader, s.id)),
            Some(gpa) => self.boot_file_source(entry, s.id, gpa),
        }
    }

    fn not_in_parent(&self, entry: &FileEntry) -> Result<(), VmPackError> {
        if entry.in_parent {
            return Err(VmPackError::Invalid {
                file: self.file_label(),
                section: MANIFEST_SECTION.into(),
                message: format!(
                    "the {} file is stored in the base pack of this diff pack's chain",
                    entry.role
                ),
            });
        }
        Ok(())
    }

    fn boot_file_source(
        &self,
        entry: &FileEntry,
        id: u32,
        gpa: u64,
    ) -> Result<SectionRange<'_>, VmPackError> {
        let off = self
            .manifest
            .memory_offset(&entry.section, gpa, entry.size)
            .ok_or_else(|| VmPackError::Invalid {
                file: self.file_label(),
                section: entry.section.clone(),
                message: format!("{} is not inside this memory region", entry.role),
            })?;
        SectionRange::part(&self.reader, id, off, entry.size).map_err(|e| io_err(&self.path, e))
    }

    fn section(&self, name: &str) -> Result<&SectionInfo, VmPackError> {
        self.reader
            .section(name)
            .ok_or_else(|| VmPackError::Invalid {
                file: self.file_label(),
                section: name.to_string(),
                message: "missing from the pack".into(),
            })
    }

    /// Unpacks into `dir` (which must exist): the config as `vm.toml` with paths relative to
    /// `dir`, boot files, and disks in their original format (or `disk_format` when given).
    /// Memory regions and vmstate of saved VMs are written as `memory-N.raw` and
    /// `vmstate.bin`. Returns the config with absolute paths into `dir`.
    pub fn extract_to_dir(
        &self,
        dir: &Path,
        disk_format: Option<DiskFormat>,
        progress: &dyn Progress,
    ) -> Result<VmConfig, VmPackError> {
        let mut ex = Extractor::new(dir, self.manifest.clone(), disk_format, &self.file_label())?;
        for s in self.reader.sections() {
            if s.name == MANIFEST_SECTION {
                continue;
            }
            let Some(sink) = ex.begin_section(s)? else {
                continue;
            };
            let label = self.file_label();
            self.reader
                .for_each_chunk_parallel(s.id, true, 0, &|offset, data| {
                    sink.write(offset, data).map_err(|e| {
                        PackError::new(
                            &label,
                            PackErrorKind::Io(io::Error::new(
                                e.kind(),
                                format!("writing {}: {e}", sink.path.display()),
                            )),
                        )
                    })?;
                    progress.advance(data.len() as u64);
                    Ok(())
                })?;
            // Zero chunks are never handed out; count them so progress reaches the total.
            let zero: u64 = self
                .reader
                .chunks(s.id)
                .iter()
                .filter(|c| c.codec == Codec::Zero)
                .map(|c| c.ulen as u64)
                .sum();
            progress.advance(zero);
            ex.end_section(sink)?;
        }
        ex.finish()
    }
}

/// Unpacks a pack read front to back (e.g. from a pipe) into `dir`, verifying every chunk
/// and, at the end, the index. Same output as [`VmPack::extract_to_dir`]. `name` labels the
/// input in messages.
pub fn extract_stream<R: io::Read>(
    input: R,
    name: &str,
    dir: &Path,
    disk_format: Option<DiskFormat>,
    progress: &dyn Progress,
) -> Result<(VmConfig, PackSummary), VmPackError> {
    let mut sr = StreamReader::new(input, name)?;
    let invalid = |section: &str, message: String| VmPackError::Invalid {
        file: name.to_string(),
        section: section.to_string(),
        message,
    };
    let mut manifest_bytes: Vec<u8> = Vec::new();
    let mut manifest_id: Option<u32> = None;
    let mut extractor: Option<Extractor> = None;
    let mut manifest: Option<Manifest> = None;
    let mut sink: Option<(u32, SectionSink)> = None;
    let mut first = true;
    loop {
        match sr.next_event()? {
            StreamEvent::Section(s) => {
                if first {
                    first = false;
                    if s.name != MANIFEST_SECTION || s.kind != kind::MANIFEST {
                        return Err(invalid(
                            MANIFEST_SECTION,
                            format!(
                                "missing: the first section is '{}', not the manifest (not a VM pack?)",
                                s.name
                            ),
                        ));
                    }
                    if s.size > MAX_MANIFEST_LEN {
                        return Err(invalid(
                            MANIFEST_SECTION,
                            format!("is {} bytes (max {MAX_MANIFEST_LEN})", s.size),
                        ));
                    }
                    manifest_id = Some(s.id);
                    continue;
                }
                if let Some(ex) = extractor.as_mut() {
                    if let Some(k) = ex.begin_section(s)? {
                        sink = Some((s.id, k));
                    }
                }
            }
            StreamEvent::Chunk {
                section,
                offset,
                data,
                zero,
            } => {
                if Some(section) == manifest_id && extractor.is_none() {
                    if manifest_bytes.len() as u64 + data.len() as u64 > MAX_MANIFEST_LEN {
                        return Err(invalid(MANIFEST_SECTION, "too large".into()));
                    }
                    manifest_bytes.extend_from_slice(data);
                } else if let Some((id, k)) = &sink {
                    if *id == section && !zero {
                        k.write(offset, data).map_err(|e| io_err(&k.path, e))?;
                    }
                }
                progress.advance(data.len() as u64);
            }
            StreamEvent::SectionEnd(id) => {
                if Some(id) == manifest_id && extractor.is_none() {
                    let m = Manifest::parse(&manifest_bytes, name)?;
                    extractor = Some(Extractor::new(dir, m.clone(), disk_format, name)?);
                    manifest = Some(m);
                } else if let Some((sid, k)) = sink.take() {
                    if sid == id {
                        extractor
                            .as_mut()
                            .expect("sinks exist only after the manifest")
                            .end_section(k)?;
                    } else {
                        sink = Some((sid, k));
                    }
                }
            }
            StreamEvent::End(summary) => {
                let (Some(ex), Some(m)) = (extractor, manifest) else {
                    return Err(invalid(MANIFEST_SECTION, "missing".into()));
                };
                m.check_sections(&summary.sections, name)?;
                return Ok((ex.finish()?, summary));
            }
        }
    }
}

fn read_manifest(reader: &PackReader, file: &str) -> Result<Manifest, VmPackError> {
    let invalid = |message: &str| VmPackError::Invalid {
        file: file.to_string(),
        section: MANIFEST_SECTION.to_string(),
        message: message.to_string(),
    };
    let s = reader
        .sections()
        .first()
        .filter(|s| s.name == MANIFEST_SECTION)
        .ok_or_else(|| {
            invalid("missing: the first section must be the manifest (not a VM pack?)")
        })?;
    if s.kind != kind::MANIFEST {
        return Err(invalid(&format!(
            "has kind {}, expected {}",
            s.kind,
            kind::MANIFEST
        )));
    }
    if s.size > MAX_MANIFEST_LEN {
        return Err(invalid(&format!(
            "is {} bytes (max {MAX_MANIFEST_LEN})",
            s.size
        )));
    }
    let bytes = reader.read_section(s.id, MAX_MANIFEST_LEN)?;
    Manifest::parse(&bytes, file)
}

/// Where one section's bytes go while unpacking.
pub struct SectionSink {
    pub path: PathBuf,
    target: SinkTarget,
}

enum SinkTarget {
    File(File),
    Disk(Box<dyn DiskImage>),
}

impl SectionSink {
    /// Writes `data` at `offset`; zero blocks are skipped so outputs stay sparse.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        match &self.target {
            SinkTarget::File(f) => {
                use std::os::unix::fs::FileExt;
                if disk::is_zero(data) {
                    return Ok(());
                }
                f.write_all_at(data, offset)
            }
            SinkTarget::Disk(d) => disk::write_skipping_zeros(d.as_ref(), offset, data),
        }
    }
}

/// Unpacks sections into a folder as they arrive, from a random-access or streaming read.
pub struct Extractor {
    dir: PathBuf,
    manifest: Manifest,
    disk_format: Option<DiskFormat>,
    file: String,
    /// Final names of disks (the extension follows the output format).
    disk_names: Vec<String>,
}

impl Extractor {
    pub fn new(
        dir: &Path,
        manifest: Manifest,
        disk_format: Option<DiskFormat>,
        file: &str,
    ) -> Result<Extractor, VmPackError> {
        if let Some(p) = &manifest.parent {
            return Err(VmPackError::Invalid {
                file: file.to_string(),
                section: MANIFEST_SECTION.into(),
                message: format!(
                    "a diff pack (memory layered on parent {}, root digest {}) cannot be unpacked alone; make a full pack with `vmpack flatten` first",
                    printable(&p.file),
                    p.root_digest
                ),
            });
        }
        let mut disk_names = Vec::new();
        let mut taken: HashSet<String> = manifest.files.iter().map(|f| f.name.clone()).collect();
        // A converted disk's new name never takes a name unpack writes itself.
        taken.insert(CONFIG_FILE_NAME.to_string());
        taken.insert(VMSTATE_FILE_NAME.to_string());
        taken.extend((0..manifest.memory.len()).map(memory_file_name));
        for d in &manifest.disks {
            let name = match disk_format {
                Some(f) if f != d.format => {
                    let stem = d.name.rsplit_once('.').map_or(d.name.as_str(), |(s, _)| {
                        if s.is_empty() {
                            &d.name
                        } else {
                            s
                        }
                    });
                    let wanted = format!("{stem}.{}", ext(f));
                    unique_name(Path::new(&wanted), &wanted, &mut taken)
                }
                _ => {
                    taken.insert(d.name.clone());
                    d.name.clone()
                }
            };
            disk_names.push(name);
        }
        Ok(Extractor {
            dir: dir.to_path_buf(),
            manifest,
            disk_format,
            file: file.to_string(),
            disk_names,
        })
    }

    /// Prepares the output for a section; `None` for sections that are not unpacked.
    pub fn begin_section(&mut self, s: &SectionInfo) -> Result<Option<SectionSink>, VmPackError> {
        let create_file = |path: PathBuf, size: u64| -> Result<SectionSink, VmPackError> {
            let f = File::create(&path).map_err(|e| io_err(&path, e))?;
            f.set_len(size).map_err(|e| io_err(&path, e))?;
            Ok(SectionSink {
                path,
                target: SinkTarget::File(f),
            })
        };
        // A streamed pack's index is only checked at its end; sizes are checked here,
        // before anything is allocated.
        let expected = self
            .manifest
            .files
            .iter()
            .filter(|f| f.section == s.name && f.in_memory.is_none())
            .map(|f| f.size)
            .chain(
                self.manifest
                    .disks
                    .iter()
                    .filter(|d| d.section == s.name)
                    .map(|d| d.virtual_size),
            )
            .chain(
                self.manifest
                    .memory
                    .iter()
                    .filter(|m| m.section == s.name)
                    .map(|m| m.size),
            )
            .next();
        if let Some(size) = expected {
            if size != s.size {
                return Err(VmPackError::Invalid {
                    file: self.file.clone(),
                    section: s.name.clone(),
                    message: format!("holds {} bytes, the manifest says {size}", s.size),
                });
            }
        }
        if let Some(f) = self
            .manifest
            .files
            .iter()
            .find(|f| f.section == s.name && f.in_memory.is_none())
        {
            return create_file(self.dir.join(&f.name), s.size).map(Some);
        }
        if let Some(d) = self.manifest.disks.iter().find(|d| d.section == s.name) {
            let path = self.dir.join(&self.disk_names[d.index as usize]);
            let format = self.disk_format.unwrap_or(d.format);
            let img = disk::create_disk(&path, format, s.size).map_err(|e| io_err(&path, e))?;
            return Ok(Some(SectionSink {
                path,
                target: SinkTarget::Disk(img),
            }));
        }
        if let Some(i) = self
            .manifest
            .memory
            .iter()
            .position(|m| m.section == s.name)
        {
            return create_file(self.dir.join(memory_file_name(i)), s.size).map(Some);
        }
        if self.manifest.vmstate.as_deref() == Some(s.name.as_str()) {
            return create_file(self.dir.join(VMSTATE_FILE_NAME), s.size).map(Some);
        }
        Ok(None)
    }

    /// Flushes a finished section's output.
    pub fn end_section(&mut self, sink: SectionSink) -> Result<(), VmPackError> {
        match &sink.target {
            SinkTarget::File(f) => f.sync_data(),
            SinkTarget::Disk(d) => d.flush(),
        }
        .map_err(|e| io_err(&sink.path, e))
    }

    /// Writes the config and returns it with absolute paths into the folder.
    pub fn finish(self) -> Result<VmConfig, VmPackError> {
        // Boot files stored in guest memory are cut out of the unpacked memory images.
        for f in &self.manifest.files {
            let Some(gpa) = f.in_memory else { continue };
            let invalid = |message: String| VmPackError::Invalid {
                file: self.file.clone(),
                section: f.section.clone(),
                message,
            };
            let i = self
                .manifest
                .memory
                .iter()
                .position(|m| m.section == f.section)
                .ok_or_else(|| invalid("not a memory section of this pack".into()))?;
            let off = self
                .manifest
                .memory_offset(&f.section, gpa, f.size)
                .ok_or_else(|| invalid(format!("{} is not inside this region", f.role)))?;
            let from = self.dir.join(memory_file_name(i));
            let to = self.dir.join(&f.name);
            let mut src = File::open(&from).map_err(|e| io_err(&from, e))?;
            io::Seek::seek(&mut src, io::SeekFrom::Start(off)).map_err(|e| io_err(&from, e))?;
            let mut dst = File::create(&to).map_err(|e| io_err(&to, e))?;
            let n =
                io::copy(&mut io::Read::take(src, f.size), &mut dst).map_err(|e| io_err(&to, e))?;
            if n != f.size {
                return Err(invalid(format!(
                    "{} ends early in {}",
                    f.role,
                    from.display()
                )));
            }
            dst.sync_data().map_err(|e| io_err(&to, e))?;
        }
        let mut cfg = self.manifest.config_at(&self.dir, &self.file)?;
        for (i, d) in cfg.disks.iter_mut().enumerate() {
            if let Some(name) = self.disk_names.get(i) {
                d.path = self.dir.join(name);
            }
            if let Some(f) = self.disk_format {
                d.format = f;
            }
        }
        // Written with paths relative to the folder, so the folder can be moved.
        let mut rel = cfg.clone();
        let strip = |p: &mut PathBuf| {
            if let Some(n) = p.file_name() {
                *p = PathBuf::from(n);
            }
        };
        if let Some(k) = &mut rel.kernel {
            strip(&mut k.path);
            if let Some(i) = &mut k.initrd {
                strip(i);
            }
        }
        if let Some(f) = &mut rel.flat {
            strip(&mut f.image);
        }
        for d in &mut rel.disks {
            strip(&mut d.path);
        }
        if let Some(p) = &mut rel.serial.path {
            strip(p);
        }
        let text = rel.to_toml_string();
        let cfg_path = self.dir.join(CONFIG_FILE_NAME);
        std::fs::write(&cfg_path, &text).map_err(|e| io_err(&cfg_path, e))?;
        Ok(VmConfig::parse(&text, &cfg_path)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_764_119_220), "2025-11-26T01:07:00Z");
    }

    fn flat_cfg(dir: &Path) -> VmConfig {
        std::fs::write(dir.join("g.bin"), b"\xf4").unwrap();
        let raw = dir.join("d.img");
        let f = File::create(&raw).unwrap();
        f.set_len(8 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"hello", 5 << 20).unwrap();
        let text = "name = \"t\"\nmemory_mib = 16\n[flat]\nimage = \"g.bin\"\n\
                    load_address = 0x1000\nentry = 0x1000\nmode = \"real\"\n\
                    [[disk]]\npath = \"d.img\"\n";
        VmConfig::parse(text, &dir.join("vm.toml")).unwrap()
    }

    #[test]
    fn saved_vm_sections_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = flat_cfg(dir.path());
        let mem = vec![7u8; 3 << 20];
        let state = b"vcpu state".to_vec();
        let plan = VmPackPlan {
            memory: vec![(0x10_0000, &mem as &dyn SectionSource)],
            vmstate: Some(&state),
            ..VmPackPlan::default()
        };
        let path = dir.path().join("p.vmpack");
        let opts = WriteOptions {
            compression: crate::pack::Compression::None,
            aligned: true,
            ..WriteOptions::default()
        };
        write_vm_pack(File::create(&path).unwrap(), &cfg, plan, &opts, &()).unwrap();
        let p = VmPack::open(&path).unwrap();
        let m = p.manifest();
        assert_eq!(
            m.memory,
            vec![MemoryEntry {
                section: "memory/0".into(),
                gpa: 0x10_0000,
                size: 3 << 20
            }]
        );
        assert_eq!(m.vmstate.as_deref(), Some(VMSTATE_SECTION));
        assert_eq!(m.memory_restore_path(p.reader()), Some("mmap"));
        assert_eq!(p.boot_file("image").unwrap(), b"\xf4");
        assert!(p.boot_file("kernel").is_err());
        let c = p.config().unwrap();
        assert_eq!(c.disks[0].path, dir.path().join("d.img"));
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let c = p.extract_to_dir(&out, None, &()).unwrap();
        assert_eq!(c.flat.unwrap().image, out.join("g.bin"));
        assert_eq!(std::fs::read(out.join("memory-0.raw")).unwrap(), mem);
        assert_eq!(std::fs::read(out.join("vmstate.bin")).unwrap(), state);
        assert_eq!(
            std::fs::read(out.join("d.img")).unwrap(),
            std::fs::read(dir.path().join("d.img")).unwrap()
        );
    }

    #[test]
    fn bad_manifests_name_file_and_section() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, sections: &[(u16, &str, &[u8])]| {
            let path = dir.path().join(name);
            let mut w =
                PackWriter::new(File::create(&path).unwrap(), WriteOptions::default()).unwrap();
            for (k, n, data) in sections {
                w.add_section(*k, n, serde_json::json!({}), data, &())
                    .unwrap();
            }
            w.finish().unwrap();
            path
        };
        let err = |p: &Path| VmPack::open(p).err().expect("refused").to_string();
        let p = write("none.vmpack", &[(kind::DISK, "disk/0", b"x")]);
        let e = err(&p);
        assert!(
            e.contains("none.vmpack: section 'manifest': missing"),
            "{e}"
        );
        let p = write("json.vmpack", &[(kind::MANIFEST, "manifest", b"{not json")]);
        let e = err(&p);
        assert!(
            e.contains("json.vmpack: section 'manifest': not a valid manifest"),
            "{e}"
        );
        let evil = br#"{"format":"vmpack","tool":"x","tool_version":"1","created":"c","config":"",
            "files":[{"role":"image","section":"boot/image","name":"../escape","size":1}]}"#;
        let p = write("evil.vmpack", &[(kind::MANIFEST, "manifest", evil)]);
        let e = err(&p);
        assert!(
            e.contains("'../escape' is not a single plain file name"),
            "{e}"
        );
        let missing = br#"{"format":"vmpack","tool":"x","tool_version":"1","created":"c","config":"",
            "disks":[{"index":0,"section":"disk/0","name":"d.img","format":"raw","virtual_size":5}]}"#;
        let p = write("missing.vmpack", &[(kind::MANIFEST, "manifest", missing)]);
        let e = err(&p);
        assert!(
            e.contains("missing.vmpack: section 'disk/0': named by the manifest but missing"),
            "{e}"
        );
        // A manifest from a newer writer with fields this one does not know still parses.
        let newer = br#"{"format":"vmpack","tool":"x","tool_version":"9","created":"c",
            "config":"name = \"n\"\nmemory_mib = 1\n[flat]\nimage = \"i\"\nload_address = 0\nentry = 0\nmode = \"long\"\n",
            "future_field":{"a":1}}"#;
        let p = write("newer.vmpack", &[(kind::MANIFEST, "manifest", newer)]);
        let v = VmPack::open(&p).unwrap();
        assert_eq!(v.config().unwrap().name, "n");
    }

    #[test]
    fn unsafe_names_are_refused() {
        for n in ["", ".", "..", "a/b", "../x", "vm.toml"] {
            assert!(!is_safe_name(n), "{n}");
        }
        assert!(is_safe_name("root.qcow2"));
    }

    #[test]
    fn in_memory_boot_files_must_lie_inside_their_memory_region() {
        let mut m: Manifest = serde_json::from_str(
            r#"{"format":"vmpack","tool":"t","tool_version":"0","created":"x",
            "host":{"vendor":"","family":0,"model":0,"stepping":0,"model_name":""},
            "config":"","files":[{"role":"initrd","section":"memory/0","name":"i","size":4096,"in_memory":8192}],
            "disks":[],"memory":[{"section":"memory/0","gpa":0,"size":16384}],"vmstate":"vmstate"}"#,
        )
        .unwrap();
        let mem = SectionInfo {
            id: 0,
            kind: kind::MEMORY,
            name: "memory/0".into(),
            meta: serde_json::json!({}),
            size: 16384,
            chunk_size: 4096,
            stored_bytes: 0,
            chunks: 4,
            zero_chunks: 4,
        };
        let vmstate = SectionInfo {
            id: 1,
            kind: kind::VMSTATE,
            name: "vmstate".into(),
            ..mem.clone()
        };
        let all = [mem, vmstate];
        m.check_sections(&all, "p.vmpack").unwrap();
        assert_eq!(m.memory_offset("memory/0", 8192, 4096), Some(8192));
        m.files[0].in_memory = Some(16384 - 100);
        let e = m.check_sections(&all, "p.vmpack").unwrap_err().to_string();
        assert!(e.contains("not inside this memory region"), "{e}");
        m.files[0].in_memory = Some(u64::MAX - 10);
        assert!(m.check_sections(&all, "p.vmpack").is_err());
    }
}
