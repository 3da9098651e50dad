//! Reading part of a section by offset, chunk by chunk: a [`SectionSource`] over a pack.

use super::{Codec, PackReader, SectionSource};
use std::io;
use std::ops::Range;

/// `len` bytes of section `id` starting at `base`, read (and verified) chunk by chunk on
/// demand. Copies a section, or a boot file held inside guest memory, into another pack or
/// a file without holding it in memory.
pub struct SectionRange<'a> {
    reader: &'a PackReader,
    id: u32,
    base: u64,
    len: u64,
}

impl<'a> SectionRange<'a> {
    /// The whole section.
    pub fn whole(reader: &'a PackReader, id: u32) -> Self {
        let len = reader.sections().get(id as usize).map_or(0, |s| s.size);
        SectionRange {
            reader,
            id,
            base: 0,
            len,
        }
    }

    /// `len` bytes from `base`; fails if that runs past the end of the section.
    pub fn part(reader: &'a PackReader, id: u32, base: u64, len: u64) -> io::Result<Self> {
        let size = reader.sections().get(id as usize).map_or(0, |s| s.size);
        if base.checked_add(len).is_none_or(|end| end > size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("range {base:#x}+{len:#x} runs past the end of a {size}-byte section"),
            ));
        }
        Ok(SectionRange {
            reader,
            id,
            base,
            len,
        })
    }
}

impl SectionSource for SectionRange<'_> {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset + buf.len() as u64 > self.len {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let start = self.base + offset;
        let end = start + buf.len() as u64;
        let chunks = self.reader.chunks(self.id);
        let first = chunks.partition_point(|c| c.offset + c.ulen as u64 <= start);
        let mut tmp = Vec::new();
        for c in chunks[first..].iter().take_while(|c| c.offset < end) {
            let (from, to) = (start.max(c.offset), end.min(c.offset + c.ulen as u64));
            let dst = &mut buf[(from - start) as usize..(to - start) as usize];
            if c.codec == Codec::Zero {
                dst.fill(0);
                continue;
            }
            tmp.resize(c.ulen as usize, 0);
            self.reader
                .read_chunk(c, true, &mut tmp)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            dst.copy_from_slice(&tmp[(from - c.offset) as usize..(to - c.offset) as usize]);
        }
        Ok(())
    }

    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        let (start, end) = (self.base, self.base + self.len);
        let mut out: Vec<Range<u64>> = Vec::new();
        for c in self.reader.chunks(self.id) {
            let (a, b) = (c.offset.max(start), (c.offset + c.ulen as u64).min(end));
            if c.codec == Codec::Zero || a >= b {
                continue;
            }
            let r = a - start..b - start;
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        }
        Ok(out)
    }
}
