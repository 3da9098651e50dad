//! Tar archives (OVA, Vagrant box) through the `tar` crate, with our own member checks:
//! only regular files with one plain name component are accepted; links, devices, folders
//! and names that climb out (`../x`, `/etc/x`, `a/b`) are refused, never extracted.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use super::vmdk::FileSlice;
use super::{err, io_err, Result};

/// Largest number of members read from one archive.
pub const MAX_MEMBERS: usize = 10_000;

/// A regular file inside an archive.
#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    /// Offset of its data in the archive file.
    pub offset: u64,
    pub size: u64,
}

/// The name in a raw 512-byte ustar header (prefix ignored), for format detection.
pub fn first_member_name(head: &[u8]) -> String {
    let raw = &head[..100.min(head.len())];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let n = String::from_utf8_lossy(&raw[..end]).into_owned();
    n.trim_start_matches("./").to_string()
}

/// Checks a member and returns its plain name, or `None` for entries that are skipped
/// (the archive's own `./` folder and global PAX headers).
fn check_entry<R: Read>(
    e: &tar::Entry<'_, R>,
    label: &str,
    nested_ok: bool,
) -> Result<Option<String>> {
    let raw = String::from_utf8_lossy(&e.path_bytes()).into_owned();
    let kind = e.header().entry_type();
    if kind.is_pax_global_extensions() {
        return Ok(None);
    }
    let name = raw.strip_prefix("./").unwrap_or(&raw);
    if kind.is_dir() && (name.is_empty() || name == ".") {
        return Ok(None);
    }
    if kind.is_dir() && nested_ok && !raw.contains("..") && !raw.starts_with('/') {
        return Ok(None);
    }
    let what = if kind.is_symlink() {
        Some("a symbolic link")
    } else if kind.is_hard_link() {
        Some("a hard link")
    } else if kind.is_dir() {
        Some("a folder")
    } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
        Some("a device or FIFO")
    } else if !(kind.is_file() || kind.is_contiguous()) {
        Some("not a regular file")
    } else {
        None
    };
    if let Some(w) = what {
        return Err(err(
            label,
            format!("member '{raw}' is {w}: refused (archives may hold only regular files)"),
        ));
    }
    if nested_ok
        && name.contains('/')
        && !name.starts_with('/')
        && name.split('/').all(|c| c != ".." && c != ".")
    {
        // A file in a subfolder (a Vagrant box's include/): never extracted, not refused.
        return Ok(Some(name.to_string()));
    }
    if !crate::vm::is_safe_name(name) || name.starts_with('-') {
        return Err(err(
            label,
            format!("member '{raw}': not a plain file name (a path that could leave the output folder): refused"),
        ));
    }
    Ok(Some(name.to_string()))
}

/// Lists an uncompressed tar whose members are read in place. Every member is checked;
/// duplicates and members that run past the end of the file are refused.
pub fn list(path: &Path) -> Result<(Arc<File>, Vec<Member>)> {
    let label = path.display().to_string();
    let file = File::open(path).map_err(io_err(&label))?;
    let len = file.metadata().map_err(io_err(&label))?.len();
    let mut members: Vec<Member> = Vec::new();
    {
        let mut ar = tar::Archive::new(&file);
        let entries = ar
            .entries_with_seek()
            .map_err(|e| err(&label, format!("not a tar archive: {e}")))?;
        for e in entries {
            let e = e.map_err(|e| err(&label, format!("damaged tar archive: {e}")))?;
            let Some(name) = check_entry(&e, &label, false)? else {
                continue;
            };
            if members.len() >= MAX_MEMBERS {
                return Err(err(&label, format!("more than {MAX_MEMBERS} members")));
            }
            if members.iter().any(|m| m.name == name) {
                return Err(err(
                    &label,
                    format!("member '{name}' appears twice: refused"),
                ));
            }
            let offset = e.raw_file_position();
            let size = e.size();
            if offset.checked_add(size).is_none_or(|end| end > len) {
                return Err(err(
                    &label,
                    format!("member '{name}' ({size} bytes at offset {offset}) runs past the end of the archive ({len} bytes): truncated?"),
                ));
            }
            members.push(Member { name, offset, size });
        }
    }
    Ok((Arc::new(file), members))
}

/// A member as a readable slice of the archive.
pub fn slice(file: &Arc<File>, m: &Member) -> FileSlice {
    FileSlice::new(file.clone(), m.offset, m.size)
}

/// Reads a whole small member, refusing more than `limit` bytes.
pub fn read_small(file: &Arc<File>, m: &Member, limit: u64, label: &str) -> Result<Vec<u8>> {
    if m.size > limit {
        return Err(err(
            label,
            format!(
                "member '{}' is {} bytes, above the {limit}-byte limit",
                m.name, m.size
            ),
        ));
    }
    let mut b = vec![0u8; m.size as usize];
    slice(file, m)
        .read_exact_at(&mut b, 0)
        .map_err(|e| err(label, format!("member '{}': {e}", m.name)))?;
    Ok(b)
}

/// Extracts the members `want` accepts from a tar stream (e.g. gunzipped) into `dir`,
/// every other member being checked and skipped. Zero blocks are not written, so an
/// empty disk image stays sparse. Returns the members written. With `nested_ok`, members
/// in subfolders (no `..`, not absolute) are skipped instead of refused; `want` never
/// sees them.
pub fn extract<R: Read>(
    input: R,
    label: &str,
    dir: &Path,
    nested_ok: bool,
    want: &dyn Fn(&str) -> bool,
) -> Result<Vec<Member>> {
    let mut ar = tar::Archive::new(input);
    let mut out: Vec<Member> = Vec::new();
    let mut seen = 0usize;
    let entries = ar
        .entries()
        .map_err(|e| err(label, format!("not a tar archive: {e}")))?;
    for e in entries {
        let mut e = e.map_err(|e| err(label, format!("damaged archive: {e}")))?;
        let Some(name) = check_entry(&e, label, nested_ok)? else {
            continue;
        };
        if name.contains('/') {
            continue;
        }
        seen += 1;
        if seen > MAX_MEMBERS {
            return Err(err(label, format!("more than {MAX_MEMBERS} members")));
        }
        if out.iter().any(|m| m.name == name) {
            return Err(err(
                label,
                format!("member '{name}' appears twice: refused"),
            ));
        }
        if !want(&name) {
            continue;
        }
        let size = e.size();
        if size > crate::vm::MAX_DISK_SIZE {
            return Err(err(
                label,
                format!("member '{name}' declares {size} bytes: too large"),
            ));
        }
        let path = dir.join(&name);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(path.display()))?;
        f.set_len(size).map_err(io_err(path.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        loop {
            let n = e
                .read(&mut buf)
                .map_err(|x| err(label, format!("member '{name}': {x}")))?;
            if n == 0 {
                break;
            }
            if !crate::disk::is_zero(&buf[..n]) {
                std::os::unix::fs::FileExt::write_all_at(&f, &buf[..n], off)
                    .map_err(io_err(path.display()))?;
            }
            off += n as u64;
        }
        if off != size {
            return Err(err(
                label,
                format!("member '{name}': truncated ({off} of {size} bytes)"),
            ));
        }
        out.push(Member {
            name,
            offset: 0,
            size,
        });
    }
    Ok(out)
}

/// Writes a ustar archive member by member; large members are streamed and their header
/// patched afterwards, so nothing is staged in a temporary file.
pub struct TarWriter<W: Write + Seek> {
    w: W,
    mtime: u64,
}

fn header(name: &str, size: u64, mtime: u64) -> io::Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(h)
}

impl<W: Write + Seek> TarWriter<W> {
    pub fn new(w: W, mtime: u64) -> TarWriter<W> {
        TarWriter { w, mtime }
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let pad = (512 - size % 512) % 512;
        self.w.write_all(&vec![0u8; pad as usize])
    }

    /// Appends a member held in memory.
    pub fn add(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let h = header(name, data.len() as u64, self.mtime)?;
        self.w.write_all(h.as_bytes())?;
        self.w.write_all(data)?;
        self.pad(data.len() as u64)
    }

    /// Appends a member written by `f` (which gets the writer, positioned at the data, and
    /// returns how many bytes it wrote).
    pub fn add_streamed(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut W) -> io::Result<u64>,
    ) -> io::Result<u64> {
        let start = self.w.stream_position()?;
        self.w.write_all(&[0u8; 512])?;
        let size = f(&mut self.w)?;
        let end = self.w.stream_position()?;
        if end != start + 512 + size {
            return Err(io::Error::other("streamed tar member: size mismatch"));
        }
        self.pad(size)?;
        let after = self.w.stream_position()?;
        self.w.seek(SeekFrom::Start(start))?;
        self.w
            .write_all(header(name, size, self.mtime)?.as_bytes())?;
        self.w.seek(SeekFrom::Start(after))?;
        Ok(size)
    }

    /// Writes the end-of-archive blocks and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.w.write_all(&[0u8; 1024])?;
        self.w.flush()?;
        Ok(self.w)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A raw ustar header with any name and type (the `tar` crate refuses to write hostile
    /// names, so tests assemble them by hand).
    pub fn raw_header(name: &str, size: u64, kind: u8, link: &str) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    pub fn raw_tar(members: &[(&str, &[u8], u8, &str)]) -> Vec<u8> {
        let mut v = Vec::new();
        for (name, data, kind, link) in members {
            v.extend_from_slice(&raw_header(name, data.len() as u64, *kind, link));
            v.extend_from_slice(data);
            v.resize(v.len().div_ceil(512) * 512, 0);
        }
        v.resize(v.len() + 1024, 0);
        v
    }

    #[test]
    fn hostile_members_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.tar");
        for (members, want) in [
            (
                vec![("../evil", &b"x"[..], b'0', "")],
                "not a plain file name",
            ),
            (
                vec![("/etc/evil", &b"x"[..], b'0', "")],
                "not a plain file name",
            ),
            (vec![("a/b", &b"x"[..], b'0', "")], "not a plain file name"),
            (
                vec![("box.img", &b""[..], b'2', "/etc/shadow")],
                "symbolic link",
            ),
            (vec![("box.img", &b""[..], b'1', "x")], "hard link"),
            (
                vec![("x", &b"1"[..], b'0', ""), ("x", &b"2"[..], b'0', "")],
                "twice",
            ),
        ] {
            std::fs::write(&p, raw_tar(&members)).unwrap();
            let e = list(&p).expect_err("refused").to_string();
            assert!(e.contains(want), "{e}");
            let out = t.path().join("x");
            std::fs::create_dir_all(&out).unwrap();
            let e = extract(
                std::fs::File::open(&p).unwrap(),
                "a.tar",
                &out,
                false,
                &|_| true,
            )
            .expect_err("refused")
            .to_string();
            assert!(e.contains(want), "{e}");
            std::fs::remove_dir_all(&out).unwrap();
        }
        assert!(!t.path().join("evil").exists());
    }

    #[test]
    fn writer_output_lists_back() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.tar");
        let f = File::create(&p).unwrap();
        let mut w = TarWriter::new(f, 0);
        w.add("a.ovf", b"<x/>").unwrap();
        w.add_streamed("d.vmdk", |w| {
            w.write_all(&[7u8; 1000])?;
            Ok(1000)
        })
        .unwrap();
        w.finish().unwrap();
        let (file, m) = list(&p).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].name, "d.vmdk");
        assert_eq!(
            read_small(&file, &m[1], 2000, "a").unwrap(),
            vec![7u8; 1000]
        );
    }
}
