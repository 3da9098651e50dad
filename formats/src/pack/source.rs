use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Anything a section can be read from, by offset, from several threads.
pub trait SectionSource: Sync {
    fn len(&self) -> u64;
    /// Fills `buf` completely with the bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Byte ranges that may hold non-zero data, sorted and non-overlapping; everything
    /// else is known to be zero and is never read.
    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        Ok(std::iter::once(0..self.len()).collect())
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn read_slice(data: &[u8], buf: &mut [u8], offset: u64) -> io::Result<()> {
    let start = usize::try_from(offset).ok().filter(|&s| s <= data.len());
    match start.and_then(|s| data.get(s..s + buf.len())) {
        Some(src) => {
            buf.copy_from_slice(src);
            Ok(())
        }
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "read past the end of the source",
        )),
    }
}

impl SectionSource for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_slice(self, buf, offset)
    }
}

impl SectionSource for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_slice(self, buf, offset)
    }
}

impl<T: SectionSource + ?Sized> SectionSource for &T {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        (**self).data_ranges()
    }
}

/// A regular file (or block device) read with `pread`. For regular files the data
/// ranges come from `SEEK_DATA`/`SEEK_HOLE`, so holes of sparse files are never read.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Self::from_file(file)
    }

    pub fn from_file(mut file: File) -> io::Result<Self> {
        let md = file.metadata()?;
        let len = if md.is_file() {
            md.len()
        } else {
            // Block devices report 0 in metadata; their size is the end offset.
            io::Seek::seek(&mut file, io::SeekFrom::End(0))?
        };
        Ok(FileSource { file, len })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    fn seek(&self, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let off = libc::off_t::try_from(off).map_err(io::Error::other)?;
        // SAFETY: lseek on a valid fd has no memory effects; we only use pread for data.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }
}

impl SectionSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < self.len {
            let start = match self.seek(pos, libc::SEEK_DATA) {
                Ok(Some(s)) => s,
                Ok(None) => break,
                // Filesystems or devices without hole support: treat it all as data.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    return Ok(std::iter::once(0..self.len).collect());
                }
                Err(e) => return Err(e),
            };
            if start >= self.len {
                break;
            }
            let end = self
                .seek(start, libc::SEEK_HOLE)?
                .unwrap_or(self.len)
                .min(self.len);
            if end <= start {
                return Ok(std::iter::once(0..self.len).collect());
            }
            out.push(start..end);
            pos = end;
        }
        Ok(out)
    }
}
