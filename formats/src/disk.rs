//! Disk images: one trait for every backend, with raw and qcow2 implementations.
//!
//! [`DiskImage`] is the seam the pack writer, `vmpack export` and the VMM's block device all
//! use. A new backend implements the trait and adds a [`DiskFormat`] arm to [`open_disk`].
//! Every call takes `&self` so one image can serve several threads (vCPUs, pack workers).

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::RwLock;

use imago::qcow2::Qcow2;
use imago::{
    FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Mapping, PermissiveImplicitOpenGate,
    Storage, StorageCreateOptions,
};

use crate::config::DiskFormat;
use crate::pack::SectionSource;

/// The qcow2 magic, `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Cluster size of the qcow2 images we create (QEMU's default).
pub const QCOW2_CLUSTER_SIZE: u64 = 64 << 10;

/// Largest buffer the default `write_zeroes` and the copy helpers allocate.
const IO_BLOCK: usize = 1 << 20;

/// A guest-visible block device backed by a host file.
pub trait DiskImage: Send + Sync {
    /// Size the guest sees, in bytes.
    fn virtual_size(&self) -> u64;

    /// Fills `buf` from `off`; the whole range must lie inside the disk.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;

    /// Writes all of `buf` at `off`; the whole range must lie inside the disk.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;

    /// Makes completed writes durable in the image's own metadata and the host file.
    fn flush(&self) -> io::Result<()>;

    /// Sorted, disjoint ranges that may hold non-zero data; everything else reads as zeros.
    /// Backends that cannot tell return the whole disk.
    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>>;

    /// The unit the backend allocates in; writers skip zero blocks of this size.
    fn block_size(&self) -> u64 {
        4096
    }

    fn format(&self) -> DiskFormat;

    fn is_read_only(&self) -> bool;

    /// Deallocates the range; afterwards it reads as zeros.
    fn discard(&self, _off: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "discard is not supported by this disk backend",
        ))
    }

    /// Makes the range read as zeros.
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        check_range(self.virtual_size(), off, len)?;
        let zeros = vec![0u8; IO_BLOCK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], off + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

fn check_range(size: u64, off: u64, len: u64) -> io::Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {off}+{len} is outside the disk's {size} bytes"),
        )),
    }
}

fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "disk is opened read-only")
}

fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Opens an image in the given format.
pub fn open_disk(
    path: &Path,
    format: DiskFormat,
    read_only: bool,
) -> io::Result<Box<dyn DiskImage>> {
    Ok(match format {
        DiskFormat::Raw => Box::new(RawDisk::open(path, read_only)?),
        DiskFormat::Qcow2 => Box::new(Qcow2Disk::open(path, read_only)?),
    })
}

/// Creates (or truncates) an empty image of `size` bytes that reads as zeros.
pub fn create_disk(path: &Path, format: DiskFormat, size: u64) -> io::Result<Box<dyn DiskImage>> {
    Ok(match format {
        DiskFormat::Raw => Box::new(RawDisk::create(path, size)?),
        DiskFormat::Qcow2 => Box::new(Qcow2Disk::create(path, size)?),
    })
}

/// Tells qcow2 from raw by the magic; anything that is not qcow2 is raw.
pub fn detect_format(path: &Path) -> io::Result<DiskFormat> {
    let f = File::open(path).map_err(|e| with_path(path, e))?;
    let mut magic = [0u8; 4];
    match f.read_exact_at(&mut magic, 0) {
        Ok(()) if magic == QCOW2_MAGIC => Ok(DiskFormat::Qcow2),
        Ok(()) => Ok(DiskFormat::Raw),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(DiskFormat::Raw),
        Err(e) => Err(with_path(path, e)),
    }
}

/// A plain file whose bytes are the disk's bytes.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    size: u64,
    read_only: bool,
}

impl RawDisk {
    pub fn open(path: &Path, read_only: bool) -> io::Result<RawDisk> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| with_path(path, e))?;
        let meta = file.metadata().map_err(|e| with_path(path, e))?;
        if meta.is_dir() {
            return Err(with_path(
                path,
                io::Error::new(io::ErrorKind::InvalidInput, "is a directory"),
            ));
        }
        let size = meta.len();
        Ok(RawDisk {
            file,
            size,
            read_only,
        })
    }

    /// Creates a sparse file of `size` bytes.
    pub fn create(path: &Path, size: u64) -> io::Result<RawDisk> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| with_path(path, e))?;
        file.set_len(size).map_err(|e| with_path(path, e))?;
        Ok(RawDisk {
            file,
            size,
            read_only: false,
        })
    }

    fn fallocate(&self, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on a file descriptor we own.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl DiskImage for RawDisk {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        check_range(self.size, off, buf.len() as u64)?;
        self.file.read_exact_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        check_range(self.size, off, buf.len() as u64)?;
        self.file.write_all_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        seek_data_ranges(&self.file, self.size)
    }

    fn format(&self) -> DiskFormat {
        DiskFormat::Raw
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        check_range(self.size, off, len)?;
        if len == 0 {
            return Ok(());
        }
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        check_range(self.size, off, len)?;
        if len == 0 {
            return Ok(());
        }
        // Punching keeps the file sparse; file systems without it get explicit zeros.
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                    || e.raw_os_error() == Some(libc::ENOSYS) =>
            {
                let zeros = vec![0u8; IO_BLOCK.min(len as usize)];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    self.file.write_all_at(&zeros[..n], off + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Data extents of `file` within `[0, size)` found with SEEK_DATA/SEEK_HOLE; the whole
/// range when the file system cannot tell.
#[allow(clippy::single_range_in_vec_init)]
pub fn seek_data_ranges(file: &File, size: u64) -> io::Result<Vec<Range<u64>>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on an fd we own; it only moves a file offset nobody else relies on
        // (all our I/O is positional).
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(out),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(vec![0..size]),
                _ => Err(e),
            };
        }
        let data = data as u64;
        if data >= size {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = (hole as u64).min(size);
        out.push(data..end);
        pos = end;
    }
    Ok(out)
}

type ImagoAccess = FormatAccess<imago::file::File>;

/// A qcow2 image through imago. Backing files named in the header are opened read-only, so
/// reads see the whole chain.
pub struct Qcow2Disk {
    /// Read/write take the shared lock; discard takes it exclusively because it may
    /// invalidate mappings that concurrent requests hold inside imago.
    access: RwLock<ImagoAccess>,
    size: u64,
    read_only: bool,
}

impl std::fmt::Debug for Qcow2Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl Qcow2Disk {
    pub fn open(path: &Path, read_only: bool) -> io::Result<Qcow2Disk> {
        let q = Qcow2::<imago::file::File>::builder_path(path)
            .write(!read_only)
            .open(PermissiveImplicitOpenGate::default())
            .map_err(|e| with_path(path, e))?;
        Ok(Qcow2Disk::from_access(FormatAccess::new(q), read_only))
    }

    /// Opens an image from an untrusted source read-only: a backing file or external data
    /// file named in its header is refused, never opened.
    pub fn open_untrusted(path: &Path) -> io::Result<Qcow2Disk> {
        let file = <imago::file::File as Storage>::open(
            imago::StorageOpenOptions::new().filename(path).write(false),
        )
        .map_err(|e| with_path(path, e))?;
        let q = Qcow2::<imago::file::File>::builder(file)
            .write(false)
            .open(imago::DenyImplicitOpenGate::default())
            .map_err(|e| {
                with_path(
                    path,
                    io::Error::new(
                        e.kind(),
                        format!("{e} (images with a backing or external data file are not imported; flatten it with `qemu-img convert` first)"),
                    ),
                )
            })?;
        Ok(Qcow2Disk::from_access(FormatAccess::new(q), true))
    }

    /// Formats a new qcow2 image (64 KiB clusters, no backing file) that reads as zeros.
    pub fn create(path: &Path, size: u64) -> io::Result<Qcow2Disk> {
        let file = imago::file::File::create_open(
            StorageCreateOptions::new()
                .filename(path)
                .size(0)
                .overwrite(true),
        )
        .map_err(|e| with_path(path, e))?;
        let q = Qcow2::<imago::file::File>::create_builder(file)
            .size(size)
            .cluster_size(QCOW2_CLUSTER_SIZE as usize)
            .create_open(imago::DenyImplicitOpenGate::default(), |image| {
                Ok(Qcow2::<imago::file::File>::builder(image).write(true))
            })
            .map_err(|e| with_path(path, e))?;
        Ok(Qcow2Disk::from_access(FormatAccess::new(q), false))
    }

    fn from_access(access: ImagoAccess, read_only: bool) -> Qcow2Disk {
        let size = access.size();
        Qcow2Disk {
            access: RwLock::new(access),
            size,
            read_only,
        }
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, ImagoAccess> {
        // A panic while holding the lock leaves imago's state as consistent as its own
        // locking makes it; keep serving rather than poisoning every later request.
        self.access.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl DiskImage for Qcow2Disk {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        check_range(self.size, off, buf.len() as u64)?;
        self.shared().read(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        check_range(self.size, off, buf.len() as u64)?;
        self.shared().write(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        let a = self.shared();
        a.flush()?;
        a.sync()
    }

    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        let a = self.shared();
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut off = 0u64;
        while off < self.size {
            let (mapping, len) = a.get_mapping(off, self.size - off)?;
            let is_data = match mapping {
                Mapping::Eof { .. } => break,
                Mapping::Zero { .. } => false,
                // Raw data and compressed (special) clusters both hold bytes.
                _ => true,
            };
            if len == 0 {
                break;
            }
            let end = (off + len).min(self.size);
            if is_data {
                match out.last_mut() {
                    Some(last) if last.end == off => last.end = end,
                    _ => out.push(off..end),
                }
            }
            off = end;
        }
        Ok(out)
    }

    fn block_size(&self) -> u64 {
        QCOW2_CLUSTER_SIZE
    }

    fn format(&self) -> DiskFormat {
        DiskFormat::Qcow2
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        check_range(self.size, off, len)?;
        let mut a = self.access.write().unwrap_or_else(|p| p.into_inner());
        a.discard_to_zero(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        check_range(self.size, off, len)?;
        self.shared().write_zeroes(off, len)
    }
}

/// Presents a disk's guest-visible bytes as a pack section; only allocated ranges are read.
pub struct DiskSource(pub Box<dyn DiskImage>);

impl SectionSource for DiskSource {
    fn len(&self) -> u64 {
        self.0.virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        self.0.data_ranges()
    }
}

/// Writes `data` at `off`, skipping blocks (of the disk's [`DiskImage::block_size`],
/// aligned to the disk) that are all zeros, so a fresh image stays sparse. The skipped
/// ranges must already read as zeros (true for images from [`create_disk`]).
pub fn write_skipping_zeros(disk: &dyn DiskImage, off: u64, data: &[u8]) -> io::Result<()> {
    let bs = disk.block_size().max(512);
    let mut pos = 0usize;
    // Start of the current run of non-zero blocks, as an index into `data`.
    let mut run: Option<usize> = None;
    while pos < data.len() {
        let abs = off + pos as u64;
        let next_boundary = (abs / bs + 1) * bs;
        let end = ((next_boundary - off) as usize).min(data.len());
        let zero = is_zero(&data[pos..end]);
        match (zero, run) {
            (false, None) => run = Some(pos),
            (true, Some(start)) => {
                disk.write_at(&data[start..pos], off + start as u64)?;
                run = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(start) = run {
        disk.write_at(&data[start..], off + start as u64)?;
    }
    Ok(())
}

/// True when every byte is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = unsafe {
        // SAFETY: any byte pattern is a valid u64.
        buf.align_to::<u64>()
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Copies every allocated range of `src` into `dst` (same virtual size), skipping zero
/// blocks. `progress` is called with the bytes of each step.
pub fn copy_disk(
    src: &dyn DiskImage,
    dst: &dyn DiskImage,
    progress: &dyn crate::pack::Progress,
) -> io::Result<()> {
    if src.virtual_size() != dst.virtual_size() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "disk sizes differ: source {} bytes, destination {} bytes",
                src.virtual_size(),
                dst.virtual_size()
            ),
        ));
    }
    let mut buf = vec![0u8; IO_BLOCK];
    for r in src.data_ranges()? {
        let mut off = r.start;
        while off < r.end {
            let n = (r.end - off).min(IO_BLOCK as u64) as usize;
            src.read_at(&mut buf[..n], off)?;
            write_skipping_zeros(dst, off, &buf[..n])?;
            progress.advance(n as u64);
            off += n as u64;
        }
    }
    dst.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    fn exercise(disk: &dyn DiskImage) {
        let size = disk.virtual_size();
        assert_eq!(size, 8 << 20);
        assert!(
            disk.data_ranges().unwrap().is_empty(),
            "fresh image has no data"
        );
        let a = pattern(5000, 3);
        disk.write_at(&a, 3 << 20).unwrap();
        let mut back = vec![0u8; 5000];
        disk.read_at(&mut back, 3 << 20).unwrap();
        assert_eq!(back, a);
        let ranges = disk.data_ranges().unwrap();
        assert_eq!(ranges.len(), 1, "{ranges:?}");
        assert!(ranges[0].start <= 3 << 20 && ranges[0].end >= (3 << 20) + 5000);
        assert!(ranges[0].end - ranges[0].start <= 256 << 10, "{ranges:?}");
        // Out of bounds is an error, not a short read.
        assert!(disk.read_at(&mut back, size - 10).is_err());
        assert!(disk.write_at(&a, size - 10).is_err());
        disk.write_zeroes(3 << 20, 4096).unwrap();
        disk.read_at(&mut back, 3 << 20).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert_eq!(back[4096..], a[4096..]);
        disk.flush().unwrap();
    }

    #[test]
    fn raw_roundtrip_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let d = RawDisk::create(&p, 8 << 20).unwrap();
        exercise(&d);
        d.discard(0, 8 << 20).unwrap();
        assert!(d.data_ranges().unwrap().is_empty());
        assert_eq!(detect_format(&p).unwrap(), DiskFormat::Raw);
        let ro = open_disk(&p, DiskFormat::Raw, true).unwrap();
        assert!(ro.write_at(&[1], 0).is_err());
    }

    #[test]
    fn qcow2_roundtrip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.qcow2");
        {
            let d = Qcow2Disk::create(&p, 8 << 20).unwrap();
            exercise(&d);
            d.discard(0, 1 << 20).unwrap();
        }
        assert_eq!(detect_format(&p).unwrap(), DiskFormat::Qcow2);
        let d = open_disk(&p, DiskFormat::Qcow2, true).unwrap();
        let mut back = vec![0u8; 5000];
        d.read_at(&mut back, 3 << 20).unwrap();
        assert_eq!(back[4096..], pattern(5000, 3)[4096..]);
        assert!(d.write_at(&[1], 0).is_err());
    }

    #[test]
    fn copy_skips_zero_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let src = RawDisk::create(&dir.path().join("s.img"), 8 << 20).unwrap();
        let mut data = vec![0u8; 2 << 20];
        data[100] = 7;
        data[(1 << 20) + 5] = 9;
        src.write_at(&data, 1 << 20).unwrap();
        let dst = Qcow2Disk::create(&dir.path().join("d.qcow2"), 8 << 20).unwrap();
        copy_disk(&src, &dst, &()).unwrap();
        let ranges = dst.data_ranges().unwrap();
        let allocated: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        assert_eq!(allocated, 2 * QCOW2_CLUSTER_SIZE, "{ranges:?}");
        let mut back = vec![0u8; 2 << 20];
        dst.read_at(&mut back, 1 << 20).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn missing_file_names_path() {
        let e = open_disk(Path::new("/nonexistent/x.img"), DiskFormat::Raw, true)
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/x.img"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("junk.qcow2");
        std::fs::write(&p, b"QFI\xfbgarbage").unwrap();
        let e = open_disk(&p, DiskFormat::Qcow2, true).err().unwrap();
        assert!(e.to_string().contains("junk.qcow2"), "{e}");
    }
}
