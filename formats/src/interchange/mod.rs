//! Other ecosystems' VM formats: libvirt domain XML, Vagrant boxes (libvirt provider),
//! OVA/OVF and Firecracker config files. Export turns a pack's cold definition (config, boot
//! files, disks) into one of them; import reads one into the same pieces, from which the CLI
//! writes a pack.
//!
//! Every input here is untrusted: archive members are checked (regular files with one plain
//! name component, no links), files a definition names must lie inside its own folder,
//! sizes are checked against documented limits before anything is allocated, and disk images
//! are read through their allocation maps so an empty 1 TB disk costs nothing.

pub mod archive;
pub mod firecracker;
pub mod kernel;
pub mod libvirt;
pub mod ovf;
pub mod vagrant;
pub mod vmdk;
pub mod xml;

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::{CpuTemplate, DiskFormat};
use crate::disk::{self, DiskImage};
use crate::pack::{Progress, SectionSource};

/// Largest definition file read whole (domain XML, OVF descriptor, Firecracker JSON,
/// Vagrantfile, metadata.json, OVA manifest).
pub const MAX_TEXT_LEN: u64 = 4 << 20;
/// Largest number of disks one imported VM may have.
pub const MAX_DISKS: usize = 64;

/// An error with the file it is about: `FILE: what is wrong`.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct Error {
    pub file: String,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

pub fn err(file: impl fmt::Display, message: impl Into<String>) -> Error {
    Error {
        file: file.to_string(),
        message: message.into(),
    }
}

/// Wraps an I/O error with the file it happened on.
pub fn io_err(file: impl fmt::Display) -> impl FnOnce(io::Error) -> Error {
    move |e| err(file, e.to_string())
}

/// The ecosystems `vmpack export --format` and `vmpack import` know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ecosystem {
    Libvirt,
    Vagrant,
    Ova,
    Firecracker,
}

impl fmt::Display for Ecosystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ecosystem::Libvirt => "libvirt",
            Ecosystem::Vagrant => "vagrant",
            Ecosystem::Ova => "ova",
            Ecosystem::Firecracker => "firecracker",
        })
    }
}

/// What a file is, judged by its content (never by its name alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Libvirt,
    Ovf,
    Ova,
    Vagrant,
    Firecracker,
    /// Anything else: a raw or qcow2 disk image.
    DiskImage,
}

/// Looks at the first bytes of `path`: XML root element, tar members, JSON keys.
pub fn detect(path: &Path) -> Result<Detected> {
    let label = path.display().to_string();
    let f = File::open(path).map_err(io_err(&label))?;
    let meta = f.metadata().map_err(io_err(&label))?;
    if meta.is_dir() {
        return Err(err(&label, "is a directory"));
    }
    let mut head = vec![0u8; 4096.min(meta.len() as usize)];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0).map_err(io_err(&label))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        // Compressed tarballs: only Vagrant boxes are distributed that way.
        return Ok(Detected::Vagrant);
    }
    if head.len() >= 512 && &head[257..262] == b"ustar" {
        let first = archive::first_member_name(&head);
        return Ok(if first.ends_with(".ovf") {
            Detected::Ova
        } else {
            Detected::Vagrant
        });
    }
    let text = String::from_utf8_lossy(&head);
    let t = text.trim_start_matches('\u{feff}').trim_start();
    if t.starts_with('<') {
        if let Some(root) = xml::first_element_name(t) {
            match root.rsplit(':').next().unwrap_or(&root) {
                "domain" => return Ok(Detected::Libvirt),
                "Envelope" => return Ok(Detected::Ovf),
                _ => {}
            }
        }
    }
    if t.starts_with('{') && (t.contains("\"boot-source\"") || t.contains("\"drives\"")) {
        return Ok(Detected::Firecracker);
    }
    Ok(Detected::DiskImage)
}

/// A boot file or disk that an import found, readable by offset.
pub struct ImportedFile {
    /// File name in the pack (one plain component).
    pub name: String,
    pub source: Box<dyn SectionSource + Send>,
}

pub struct ImportedDisk {
    /// File name in the pack (one plain component); its extension follows `format`.
    pub name: String,
    /// Format `vmpack unpack` recreates.
    pub format: DiskFormat,
    pub read_only: bool,
    pub source: Box<dyn SectionSource + Send>,
}

/// A VM read from another ecosystem's files, not yet a pack.
pub struct ImportedVm {
    pub name: String,
    pub vcpus: u32,
    /// `None` when the source does not say (a Vagrant box without a Vagrantfile setting).
    pub memory_mib: Option<u64>,
    pub cpu_template: CpuTemplate,
    pub kernel: Option<ImportedFile>,
    pub initrd: Option<ImportedFile>,
    pub cmdline: String,
    pub disks: Vec<ImportedDisk>,
    /// What the source has that the pack does not carry, one line each, for the user.
    pub dropped: Vec<String>,
    /// Scratch space holding members that had to be extracted (a compressed box); the
    /// sources above may read from it, so it lives as long as they do.
    pub scratch: Option<tempfile::TempDir>,
}

impl ImportedVm {
    pub fn new(name: &str) -> ImportedVm {
        ImportedVm {
            name: sanitize_name(name),
            vcpus: 1,
            memory_mib: None,
            cpu_template: CpuTemplate::Host,
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            disks: Vec::new(),
            dropped: Vec::new(),
            scratch: None,
        }
    }
}

/// A VM name usable as a file stem: what other ecosystems allow (spaces, slashes) mapped
/// to `-`.
pub fn sanitize_name(n: &str) -> String {
    let s: String = n
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let s = s.trim_matches('.').to_string();
    if s.is_empty() {
        "imported".into()
    } else {
        s
    }
}

/// One disk of a pack being exported.
pub struct ExportDisk<'a> {
    /// File stem for the exported image (`root` → `root.qcow2`).
    pub stem: String,
    pub source: &'a dyn SectionSource,
    pub read_only: bool,
}

/// A pack's cold definition, as every exporter sees it.
pub struct ExportVm<'a> {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub cpu_template: CpuTemplate,
    /// Kernel, initrd and command line when the pack boots a Linux kernel directly.
    pub kernel: Option<&'a dyn SectionSource>,
    pub initrd: Option<&'a dyn SectionSource>,
    /// File names the kernel and initrd get (see [`boot_file_name`]).
    pub kernel_name: String,
    pub initrd_name: String,
    pub cmdline: String,
    pub disks: Vec<ExportDisk<'a>>,
}

/// The name a boot file keeps in an export: its name in the pack when that is a plain name
/// no export uses for anything else, `fallback` otherwise.
pub fn boot_file_name(name: Option<&str>, fallback: &str) -> String {
    let reserved_ext = [
        ".img", ".qcow2", ".vmdk", ".ovf", ".mf", ".xml", ".json", ".log",
    ];
    match name {
        Some(n)
            if crate::vm::is_safe_name(n)
                && n.len() <= 64
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                && !n.starts_with(['.', '-'])
                && n != "Vagrantfile"
                && !reserved_ext.iter().any(|e| n.ends_with(e) && n != fallback) =>
        {
            n.to_string()
        }
        _ => fallback.to_string(),
    }
}

/// `dir/name`, refusing names that are not one plain component.
pub fn member_path(dir: &Path, name: &str) -> Result<PathBuf> {
    if !crate::vm::is_safe_name(name) {
        return Err(err(name, "not a plain file name"));
    }
    Ok(dir.join(name))
}

/// Resolves a path that a definition in folder `base` names: relative paths against
/// `base`, and the result (symlinks resolved) must be a regular file inside `base`.
/// `what` says what names it, for messages.
pub fn resolve_inside(base: &Path, named: &str, what: &str) -> Result<PathBuf> {
    let canon_base = base
        .canonicalize()
        .map_err(io_err(base.display().to_string()))?;
    let p = Path::new(named);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        canon_base.join(p)
    };
    let outside = || {
        err(
            what,
            format!(
                "names '{named}', outside the folder {} it was read from; refused (copy the file next to it and name it relative to it)",
                canon_base.display()
            ),
        )
    };
    // Refused before touching it: a device or a file elsewhere is never opened.
    if !lexically_inside(&canon_base, &joined) {
        return Err(outside());
    }
    let canon = joined
        .canonicalize()
        .map_err(|e| err(what, format!("'{named}': {e}")))?;
    if !canon.starts_with(&canon_base) {
        return Err(outside());
    }
    let meta = std::fs::metadata(&canon).map_err(|e| err(what, format!("'{named}': {e}")))?;
    if !meta.is_file() {
        return Err(err(
            what,
            format!("'{named}' is not a regular file; refused"),
        ));
    }
    Ok(canon)
}

fn lexically_inside(base: &Path, p: &Path) -> bool {
    use std::path::Component;
    let mut depth: Vec<std::ffi::OsString> = Vec::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => depth.clear(),
            Component::CurDir => {}
            Component::ParentDir => {
                depth.pop();
            }
            Component::Normal(n) => depth.push(n.to_os_string()),
        }
    }
    let norm: PathBuf = std::iter::once(std::ffi::OsString::from("/"))
        .chain(depth)
        .collect();
    norm.starts_with(base) && norm != base
}

/// Opens a host disk image that a definition named (already resolved inside its folder),
/// checking that its content matches `format`. Backing files are refused.
pub fn open_named_disk(path: &Path, format: DiskFormat) -> Result<Box<dyn SectionSource + Send>> {
    let label = path.display().to_string();
    let actual = disk::detect_format(path).map_err(io_err(&label))?;
    let mut head = [0u8; 4];
    let f = File::open(path).map_err(io_err(&label))?;
    let _ = std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0);
    if format == DiskFormat::Raw && vmdk::is_vmdk(&head) {
        return Err(err(&label, "is a VMDK image, but is declared raw"));
    }
    match (format, actual) {
        (DiskFormat::Qcow2, DiskFormat::Raw) => {
            Err(err(&label, "is declared qcow2 but has no qcow2 header"))
        }
        (DiskFormat::Qcow2, _) => Ok(Box::new(disk::DiskSource(Box::new(
            disk::Qcow2Disk::open_untrusted(path).map_err(io_err(&label))?,
        )))),
        // A raw disk whose content starts like qcow2 is still raw: the definition decides.
        (DiskFormat::Raw, _) => Ok(Box::new(disk::DiskSource(Box::new(
            disk::RawDisk::open(path, true).map_err(io_err(&label))?,
        )))),
    }
}

/// Copies a source's data ranges into a fresh disk image, skipping zero blocks.
pub fn copy_to_disk(
    src: &dyn SectionSource,
    dst: &dyn DiskImage,
    progress: &dyn Progress,
) -> io::Result<()> {
    const BLOCK: u64 = 1 << 20;
    let mut buf = vec![0u8; BLOCK as usize];
    for r in src.data_ranges()? {
        let mut off = r.start;
        while off < r.end {
            let n = (r.end - off).min(BLOCK) as usize;
            src.read_at(&mut buf[..n], off)?;
            disk::write_skipping_zeros(dst, off, &buf[..n])?;
            progress.advance(n as u64);
            off += n as u64;
        }
    }
    dst.flush()
}

/// Writes a source to a new file at `path` (sparse where the source has no data).
pub fn copy_to_file(src: &dyn SectionSource, path: &Path, progress: &dyn Progress) -> Result<()> {
    let label = path.display().to_string();
    let d = disk::RawDisk::create(path, src.len()).map_err(io_err(&label))?;
    copy_to_disk(src, &d, progress).map_err(io_err(&label))
}

/// Writes a disk of an export into `dir` as `stem.EXT` in `format`; returns the file name.
pub fn write_disk(
    dir: &Path,
    d: &ExportDisk<'_>,
    format: DiskFormat,
    progress: &dyn Progress,
) -> Result<String> {
    let name = format!("{}.{}", d.stem, ext(format));
    let path = member_path(dir, &name)?;
    let img = disk::create_disk(&path, format, d.source.len()).map_err(io_err(&name))?;
    copy_to_disk(d.source, img.as_ref(), progress).map_err(io_err(&name))?;
    Ok(name)
}

/// File extension of a disk format.
pub fn ext(f: DiskFormat) -> &'static str {
    match f {
        DiskFormat::Raw => "img",
        DiskFormat::Qcow2 => "qcow2",
    }
}

/// Unique file stems for disks (`root`, `data`, `data-1`, …).
pub fn unique_stems<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut taken = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, n) in names.enumerate() {
        let base = sanitize_name(n);
        let base = if base == "imported" {
            format!("disk{i}")
        } else {
            base
        };
        let mut s = base.clone();
        let mut k = 1;
        while !taken.insert(s.clone()) {
            s = format!("{base}-{k}");
            k += 1;
        }
        out.push(s);
    }
    out
}

/// Reads a small text file whole, refusing anything above [`MAX_TEXT_LEN`].
pub fn read_text(path: &Path) -> Result<String> {
    let label = path.display().to_string();
    let f = File::open(path).map_err(io_err(&label))?;
    let len = f.metadata().map_err(io_err(&label))?.len();
    if len > MAX_TEXT_LEN {
        return Err(err(
            &label,
            format!("{len} bytes: larger than the {MAX_TEXT_LEN}-byte limit for a definition file"),
        ));
    }
    let mut s = String::new();
    io::Read::read_to_string(&mut io::Read::take(f, MAX_TEXT_LEN), &mut s)
        .map_err(|e| err(&label, format!("not UTF-8 text: {e}")))?;
    Ok(s)
}

/// Mebibytes from an amount in `unit` (libvirt's and OVF's unit names), rounded up.
pub fn to_mib(value: u64, unit_bytes: u64) -> Option<u64> {
    value
        .checked_mul(unit_bytes)
        .map(|b| b.div_ceil(1 << 20))
        .or_else(|| {
            // Huge units: divide first.
            (unit_bytes >= 1 << 20).then(|| value.saturating_mul(unit_bytes >> 20))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_inside_refuses_escapes() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a.img"), b"x").unwrap();
        std::fs::create_dir(t.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("link")).unwrap();
        assert!(resolve_inside(t.path(), "a.img", "x").is_ok());
        let abs = t.path().join("a.img");
        assert!(resolve_inside(t.path(), abs.to_str().unwrap(), "x").is_ok());
        for bad in [
            "../a.img",
            "/etc/passwd",
            "/dev/sda",
            "link",
            "sub/../../x",
            "sub",
        ] {
            let e = resolve_inside(t.path(), bad, "x").unwrap_err().to_string();
            assert!(e.contains("refused") || e.contains("No such"), "{bad}: {e}");
        }
    }

    #[test]
    fn names_are_sanitized() {
        assert_eq!(sanitize_name("my vm/1"), "my-vm-1");
        assert_eq!(sanitize_name(".."), "imported");
        assert_eq!(
            unique_stems(["a", "a", ""].into_iter()),
            ["a", "a-1", "disk2"]
        );
    }
}
