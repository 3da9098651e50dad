//! VMDK hosted sparse extents: a reader for `monolithicSparse` and `streamOptimized` images
//! (what OVAs carry) and a `streamOptimized` writer.
//!
//! imago reads only descriptor-based VMDKs with FLAT/ZERO extents and refuses the sparse
//! (`KDMV`) extents OVAs use, and no Rust crate writes `streamOptimized`, so both live here.
//! Layout per VMware's "Virtual Disk Format 5.0": a 512-byte header, an embedded text
//! descriptor, grains (compressed ones each preceded by a 12-byte LBA/size header), grain
//! tables (GT: one u32 sector offset per grain) and a grain directory (GD: one u32 sector
//! offset per GT). A stream-optimized image written front to back puts GTs and GD at the
//! end, each after a one-sector marker, and repeats the header (the footer) with the GD's
//! offset just before the end-of-stream marker.
//!
//! Everything read from the file is untrusted: every offset is checked against the file's
//! length before it is followed, and what is allocated is bounded by the file's size.

use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::pack::SectionSource;

pub const SECTOR: u64 = 512;
/// `KDMV` read as a little-endian u32.
pub const MAGIC: u32 = 0x564d_444b;
const GD_AT_END: u64 = u64::MAX;
const FLAG_NL_TEST: u32 = 1;
const FLAG_ZEROED_GTE: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const COMPRESS_DEFLATE: u16 = 1;
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;

/// Grain size written: 64 KiB, as QEMU and VMware do.
const GRAIN_SECTORS: u64 = 128;
const GTES_PER_GT: u64 = 512;
/// Embedded descriptor area written, in sectors (QEMU's choice).
const DESCRIPTOR_SECTORS: u64 = 20;

/// Largest virtual size accepted (the pack format's disk limit, 64 TiB).
pub const MAX_CAPACITY: u64 = crate::vm::MAX_DISK_SIZE;
/// Largest grain accepted, 1 MiB (VMware writes 64 KiB).
pub const MAX_GRAIN_BYTES: u64 = 1 << 20;
/// Largest embedded descriptor read.
pub const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;

/// Bytes of a file (or of a member inside an archive) read with `pread`.
#[derive(Clone, Debug)]
pub struct FileSlice {
    file: Arc<std::fs::File>,
    base: u64,
    len: u64,
}

impl FileSlice {
    pub fn new(file: Arc<std::fs::File>, base: u64, len: u64) -> FileSlice {
        FileSlice { file, base, len }
    }

    pub fn whole(file: std::fs::File) -> io::Result<FileSlice> {
        let len = file.metadata()?.len();
        Ok(FileSlice::new(Arc::new(file), 0, len))
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn file(&self) -> &Arc<std::fs::File> {
        &self.file
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    /// Reads exactly `buf.len()` bytes at `off`; a read past the slice is an error.
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        match off.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => self.file.read_exact_at(buf, self.base + off),
            _ => Err(invalid(format!(
                "{} bytes at offset {off} run past the end of the file ({} bytes)",
                buf.len(),
                self.len
            ))),
        }
    }

    /// A sequential reader over the whole slice.
    pub fn reader(&self) -> SliceReader<'_> {
        SliceReader { s: self, pos: 0 }
    }
}

pub struct SliceReader<'a> {
    s: &'a FileSlice,
    pos: u64,
}

impl Read for SliceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.s.len - self.pos).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.s.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl SectionSource for FileSlice {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// The fields of a sparse extent header this reader uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    version: u32,
    flags: u32,
    capacity: u64,
    grain_size: u64,
    descriptor_offset: u64,
    descriptor_size: u64,
    gtes_per_gt: u32,
    gd_offset: u64,
    compress: u16,
}

impl Header {
    fn parse(b: &[u8]) -> io::Result<Header> {
        if u32_at(b, 0) != MAGIC {
            return Err(invalid(
                "not a VMDK sparse extent (no KDMV magic); descriptor-only VMDKs with separate extent files are not supported",
            ));
        }
        Ok(Header {
            version: u32_at(b, 4),
            flags: u32_at(b, 8),
            capacity: u64_at(b, 12),
            grain_size: u64_at(b, 20),
            descriptor_offset: u64_at(b, 28),
            descriptor_size: u64_at(b, 36),
            gtes_per_gt: u32_at(b, 44),
            gd_offset: u64_at(b, 56),
            compress: u16::from_le_bytes([b[77], b[78]]),
        })
    }

    fn encode(&self, overhead: u64) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_size.to_le_bytes());
        b[28..36].copy_from_slice(&self.descriptor_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.descriptor_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        // rgdOffset (48..56) stays 0: no redundant tables.
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&overhead.to_le_bytes());
        b[73] = b'\n';
        b[74] = b' ';
        b[75] = b'\r';
        b[76] = b'\n';
        b[77..79].copy_from_slice(&self.compress.to_le_bytes());
        b
    }
}

/// A VMDK sparse extent opened for reading. Only the allocation map is held in memory
/// (8 bytes per allocated grain, bounded by the file's size); grains are read on demand.
pub struct VmdkReader {
    src: FileSlice,
    capacity: u64,
    grain_bytes: u64,
    compressed: bool,
    /// (grain index, sector of its data); sorted by grain index. A sector of 1 marks a grain
    /// the image says is zero.
    grains: Vec<(u32, u32)>,
    create_type: String,
}

impl std::fmt::Debug for VmdkReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmdkReader")
            .field("capacity", &self.capacity)
            .field("grain_bytes", &self.grain_bytes)
            .field("compressed", &self.compressed)
            .field("grains", &self.grains.len())
            .finish()
    }
}

/// Whether `head` (the first bytes of a file) starts a VMDK sparse extent.
pub fn is_vmdk(head: &[u8]) -> bool {
    head.len() >= 4 && u32_at(head, 0) == MAGIC
}

impl VmdkReader {
    /// Opens and checks the whole allocation map. Errors say which structure is wrong and
    /// where (sector numbers are the image's own).
    pub fn open(src: FileSlice) -> io::Result<VmdkReader> {
        let len = src.len();
        if len < SECTOR {
            return Err(invalid(format!("{len} bytes: too short for a VMDK header")));
        }
        let mut hb = [0u8; 512];
        src.read_exact_at(&mut hb, 0)?;
        let mut h = Header::parse(&hb)?;
        if !(1..=3).contains(&h.version) {
            return Err(invalid(format!(
                "header: unsupported version {}",
                h.version
            )));
        }
        if h.gd_offset == GD_AT_END {
            // Stream-optimized, written front to back: the footer holds the real offset.
            if len < 3 * SECTOR {
                return Err(invalid(
                    "header: the grain directory is at the end but the file has no footer",
                ));
            }
            let mut fb = [0u8; 512];
            src.read_exact_at(&mut fb, len - 2 * SECTOR)?;
            let footer = Header::parse(&fb).map_err(|_| {
                invalid(format!(
                    "footer at offset {}: missing (the grain directory is at the end)",
                    len - 2 * SECTOR
                ))
            })?;
            if footer.gd_offset == GD_AT_END {
                return Err(invalid("footer: no grain directory offset"));
            }
            h = Header {
                gd_offset: footer.gd_offset,
                ..h
            };
        }
        let grain_bytes = h
            .grain_size
            .checked_mul(SECTOR)
            .filter(|g| g.is_power_of_two() && (4096..=MAX_GRAIN_BYTES).contains(g))
            .ok_or_else(|| {
                invalid(format!(
                    "header: grain size of {} sectors (expected a power of two, 8 to {})",
                    h.grain_size,
                    MAX_GRAIN_BYTES / SECTOR
                ))
            })?;
        let capacity = h
            .capacity
            .checked_mul(SECTOR)
            .filter(|c| *c <= MAX_CAPACITY)
            .ok_or_else(|| {
                invalid(format!(
                    "header: capacity of {} sectors exceeds the {} TiB limit",
                    h.capacity,
                    MAX_CAPACITY >> 40
                ))
            })?;
        if h.gtes_per_gt == 0 || h.gtes_per_gt > 4096 {
            return Err(invalid(format!(
                "header: {} entries per grain table (expected 1 to 4096)",
                h.gtes_per_gt
            )));
        }
        let compressed = h.flags & FLAG_COMPRESSED != 0;
        if compressed && h.compress != COMPRESS_DEFLATE {
            return Err(invalid(format!(
                "header: compression algorithm {} (only deflate, 1, is defined)",
                h.compress
            )));
        }
        let create_type = read_descriptor(&src, &h).unwrap_or_default();

        let gt_span = grain_bytes * h.gtes_per_gt as u64;
        let gd_entries = capacity.div_ceil(gt_span);
        let gd_bytes = gd_entries * 4;
        let gd_start = h
            .gd_offset
            .checked_mul(SECTOR)
            .filter(|s| s.checked_add(gd_bytes).is_some_and(|e| e <= len))
            .ok_or_else(|| {
                invalid(format!(
                    "grain directory at sector {} ({gd_bytes} bytes) lies outside the file ({len} bytes)",
                    h.gd_offset
                ))
            })?;
        // Bounded by the check above: the directory is inside the file.
        let mut gd = vec![0u8; gd_bytes as usize];
        src.read_exact_at(&mut gd, gd_start)?;

        let total_grains = capacity.div_ceil(grain_bytes);
        if total_grains > u32::MAX as u64 {
            return Err(invalid(format!(
                "header: {total_grains} grains of {grain_bytes} bytes: too many to address"
            )));
        }
        // Every allocated grain takes at least one sector of its own in a valid image.
        let max_grains = len / SECTOR;
        let gt_bytes = h.gtes_per_gt as u64 * 4;
        let mut gt = vec![0u8; gt_bytes as usize];
        let mut grains: Vec<(u32, u32)> = Vec::new();
        let min_grain_len = if compressed { 12 } else { grain_bytes };
        for (i, e) in gd.chunks_exact(4).enumerate() {
            let gt_sector = u32_at(e, 0) as u64;
            if gt_sector == 0 {
                continue;
            }
            let gt_start = gt_sector * SECTOR;
            if gt_start.checked_add(gt_bytes).is_none_or(|e| e > len) {
                return Err(invalid(format!(
                    "grain table {i} at sector {gt_sector} lies outside the file ({len} bytes)"
                )));
            }
            src.read_exact_at(&mut gt, gt_start)?;
            for (j, g) in gt.chunks_exact(4).enumerate() {
                let sector = u32_at(g, 0);
                if sector == 0 {
                    continue;
                }
                let index = i as u64 * h.gtes_per_gt as u64 + j as u64;
                if index >= total_grains {
                    return Err(invalid(format!(
                        "grain table {i}, entry {j}: grain {index} is beyond the disk's {capacity} bytes"
                    )));
                }
                if sector == 1 && (h.flags & FLAG_ZEROED_GTE != 0 || compressed) {
                    grains.push((index as u32, 1));
                    continue;
                }
                let start = sector as u64 * SECTOR;
                if start.checked_add(min_grain_len).is_none_or(|e| e > len) || sector < 1 {
                    return Err(invalid(format!(
                        "grain table {i}, entry {j}: grain {index} at sector {sector} lies outside the file ({len} bytes)"
                    )));
                }
                if grains.len() as u64 >= max_grains {
                    return Err(invalid(format!(
                        "the grain tables claim more than {max_grains} grains, more than a {len}-byte file can hold"
                    )));
                }
                grains.push((index as u32, sector));
            }
        }
        Ok(VmdkReader {
            src,
            capacity,
            grain_bytes,
            compressed,
            grains,
            create_type,
        })
    }

    /// Virtual size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// `createType` from the embedded descriptor (e.g. `streamOptimized`), if any.
    pub fn create_type(&self) -> &str {
        &self.create_type
    }

    fn lookup(&self, index: u64) -> Option<u32> {
        let i = self
            .grains
            .binary_search_by_key(&(index as u32), |g| g.0)
            .ok()?;
        Some(self.grains[i].1)
    }

    /// Fills `out` (one grain, or the disk's tail) with grain `index`.
    fn read_grain(&self, index: u64, out: &mut [u8]) -> io::Result<()> {
        if self.compressed && (out.len() as u64) < self.grain_bytes {
            // The last grain may be stored whole even where the disk ends inside it.
            let mut whole = vec![0u8; self.grain_bytes as usize];
            self.read_full_grain(index, &mut whole)?;
            out.copy_from_slice(&whole[..out.len()]);
            return Ok(());
        }
        self.read_full_grain(index, out)
    }

    fn read_full_grain(&self, index: u64, out: &mut [u8]) -> io::Result<()> {
        let Some(sector) = self.lookup(index).filter(|&s| s > 1) else {
            out.fill(0);
            return Ok(());
        };
        let start = sector as u64 * SECTOR;
        if !self.compressed {
            return self.src.read_exact_at(out, start);
        }
        let mut mh = [0u8; 12];
        self.src.read_exact_at(&mut mh, start)?;
        let lba = u64_at(&mh, 0);
        let size = u32_at(&mh, 8) as u64;
        let want = index * (self.grain_bytes / SECTOR);
        if lba != want {
            return Err(invalid(format!(
                "grain at sector {sector}: its marker says LBA {lba}, the grain table says {want}"
            )));
        }
        // Deflate never expands by more than a few bytes per 16 KiB block.
        if size == 0 || size > self.grain_bytes + self.grain_bytes / 8 + 1024 {
            return Err(invalid(format!(
                "grain at sector {sector}: compressed size {size} is not plausible for a {}-byte grain",
                self.grain_bytes
            )));
        }
        if (start + 12)
            .checked_add(size)
            .is_none_or(|e| e > self.src.len())
        {
            return Err(invalid(format!(
                "grain at sector {sector}: {size} compressed bytes run past the end of the file"
            )));
        }
        let mut comp = vec![0u8; size as usize];
        self.src.read_exact_at(&mut comp, start + 12)?;
        let mut dec = flate2::read::ZlibDecoder::new(&comp[..]);
        let mut n = 0;
        // Reads at most one grain; anything beyond is an error, not an allocation.
        while n < out.len() {
            let r = dec
                .read(&mut out[n..])
                .map_err(|e| invalid(format!("grain at sector {sector}: bad deflate data: {e}")))?;
            if r == 0 {
                break;
            }
            n += r;
        }
        out[n..].fill(0);
        let mut extra = [0u8; 1];
        if dec.read(&mut extra).unwrap_or(0) != 0 {
            return Err(invalid(format!(
                "grain at sector {sector}: decompresses to more than {} bytes",
                self.grain_bytes
            )));
        }
        Ok(())
    }
}

fn read_descriptor(src: &FileSlice, h: &Header) -> Option<String> {
    let off = h.descriptor_offset.checked_mul(SECTOR)?;
    let len = h
        .descriptor_size
        .checked_mul(SECTOR)?
        .min(MAX_DESCRIPTOR_BYTES);
    if off == 0 || len == 0 || off.checked_add(len)? > src.len() {
        return None;
    }
    let mut b = vec![0u8; len as usize];
    src.read_exact_at(&mut b, off).ok()?;
    let text = String::from_utf8_lossy(&b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())])
        .into_owned();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("createType"))
        .map(|v| {
            v.trim_start_matches([' ', '='])
                .trim()
                .trim_matches('"')
                .to_string()
        })
}

impl SectionSource for VmdkReader {
    fn len(&self) -> u64 {
        self.capacity
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.capacity)
        {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let g = self.grain_bytes;
        let mut grain = vec![0u8; g as usize];
        let mut pos = 0usize;
        while pos < buf.len() {
            let abs = offset + pos as u64;
            let index = abs / g;
            let within = (abs % g) as usize;
            let n = (g as usize - within).min(buf.len() - pos);
            if within == 0 && n == g as usize {
                self.read_grain(index, &mut buf[pos..pos + n])?;
            } else {
                let glen = (self.capacity - index * g).min(g) as usize;
                self.read_grain(index, &mut grain[..glen])?;
                buf[pos..pos + n].copy_from_slice(&grain[within..within + n]);
            }
            pos += n;
        }
        Ok(())
    }

    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for &(index, sector) in &self.grains {
            if sector <= 1 {
                continue;
            }
            let start = index as u64 * self.grain_bytes;
            let end = (start + self.grain_bytes).min(self.capacity);
            match out.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => out.push(start..end),
            }
        }
        Ok(out)
    }
}

/// Counts bytes written so sector offsets are known without seeking.
struct Counted<W> {
    w: W,
    pos: u64,
}

impl<W: Write> Counted<W> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn pad_to_sector(&mut self) -> io::Result<()> {
        let pad = (SECTOR - self.pos % SECTOR) % SECTOR;
        self.put(&vec![0u8; pad as usize])
    }

    fn sector(&self) -> u64 {
        self.pos / SECTOR
    }

    fn marker(&mut self, sectors: u64, kind: u32) -> io::Result<()> {
        let mut m = [0u8; 512];
        m[0..8].copy_from_slice(&sectors.to_le_bytes());
        m[12..16].copy_from_slice(&kind.to_le_bytes());
        self.put(&m)
    }
}

/// The embedded descriptor of a stream-optimized image named `name`.
fn descriptor(name: &str, sectors: u64) -> String {
    // CHS geometry as VMware computes it for IDE (16 heads, 63 sectors per track).
    let cylinders = (sectors / (16 * 63)).clamp(1, 16383);
    let cid: u32 = sectors as u32 ^ 0x5f85_2464;
    format!(
        "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\n\
         # Extent description\nRW {sectors} SPARSE \"{name}\"\n\n\
         # The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"lsilogic\"\n"
    )
}

/// Writes `src` as a stream-optimized VMDK (front to back, no seeking) named `name` in its
/// descriptor. Only `src`'s data ranges are read; all-zero grains are left out. The virtual
/// size is `src.len()` rounded up to a sector. Returns the bytes written.
pub fn write_stream_optimized<W: Write>(
    out: W,
    name: &str,
    src: &dyn SectionSource,
    progress: &dyn crate::pack::Progress,
) -> io::Result<u64> {
    let size = src.len();
    let sectors = size.div_ceil(SECTOR);
    if sectors * SECTOR > MAX_CAPACITY {
        return Err(invalid(format!(
            "a {size}-byte disk exceeds VMDK export's {} TiB limit",
            MAX_CAPACITY >> 40
        )));
    }
    let grain_bytes = GRAIN_SECTORS * SECTOR;
    let header = Header {
        version: 3,
        flags: FLAG_NL_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
        capacity: sectors,
        grain_size: GRAIN_SECTORS,
        descriptor_offset: 1,
        descriptor_size: DESCRIPTOR_SECTORS,
        gtes_per_gt: GTES_PER_GT as u32,
        gd_offset: GD_AT_END,
        compress: COMPRESS_DEFLATE,
    };
    let overhead = 1 + DESCRIPTOR_SECTORS;
    let mut w = Counted { w: out, pos: 0 };
    w.put(&header.encode(overhead))?;
    let desc = descriptor(name, sectors);
    let mut area = vec![0u8; (DESCRIPTOR_SECTORS * SECTOR) as usize];
    if desc.len() > area.len() {
        return Err(invalid("VMDK descriptor too long"));
    }
    area[..desc.len()].copy_from_slice(desc.as_bytes());
    w.put(&area)?;

    let total_grains = size.div_ceil(grain_bytes);
    let n_gts = total_grains.div_ceil(GTES_PER_GT);
    // Sparse map of the grains written: (grain index, sector).
    let mut written: Vec<(u64, u32)> = Vec::new();
    // Grains are read in order, compressed in batches on every core, and written in order.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let batch_len = 64 * threads;
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::with_capacity(batch_len);
    let flush = |batch: &mut Vec<(u64, Vec<u8>)>,
                 w: &mut Counted<W>,
                 written: &mut Vec<(u64, u32)>|
     -> io::Result<()> {
        let per = batch.len().div_ceil(threads).max(1);
        let compress = |part: &[(u64, Vec<u8>)]| -> Vec<io::Result<Vec<u8>>> {
            part.iter()
                .map(|(_, data)| {
                    let mut comp = Vec::with_capacity(data.len() / 2);
                    let mut enc =
                        flate2::write::ZlibEncoder::new(&mut comp, flate2::Compression::fast());
                    enc.write_all(data)?;
                    enc.finish()?;
                    Ok(comp)
                })
                .collect()
        };
        let compressed: Vec<io::Result<Vec<u8>>> = std::thread::scope(|sc| {
            // Workers are a speed-up: a part whose thread cannot start (short of memory or
            // of threads) is compressed here instead, never a panic.
            let handles: Vec<_> = batch
                .chunks(per)
                .map(|part| {
                    std::thread::Builder::new()
                        .spawn_scoped(sc, move || compress(part))
                        .map_err(|_| part)
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| match h {
                    Ok(h) => h.join().unwrap_or_else(|_| {
                        vec![Err(io::Error::other("a compression worker failed"))]
                    }),
                    Err(part) => compress(part),
                })
                .collect()
        });
        for ((g, _), comp) in batch.iter().zip(compressed) {
            let comp = comp?;
            let sector = u32::try_from(w.sector())
                .map_err(|_| invalid("VMDK export: the image would exceed 2 TiB of data"))?;
            let mut mh = [0u8; 12];
            mh[0..8].copy_from_slice(&(g * GRAIN_SECTORS).to_le_bytes());
            mh[8..12].copy_from_slice(&(comp.len() as u32).to_le_bytes());
            w.put(&mh)?;
            w.put(&comp)?;
            w.pad_to_sector()?;
            written.push((*g, sector));
        }
        batch.clear();
        Ok(())
    };
    // Sources are read a window (1 MiB, aligned) at a time: a pack section decompresses
    // whole chunks, so grain-sized reads would decompress each chunk many times.
    const WINDOW: u64 = 1 << 20;
    let mut window = vec![0u8; WINDOW as usize];
    let mut next_grain = 0u64;
    for r in src.data_ranges()? {
        let mut pos = (r.start / grain_bytes * grain_bytes).max(next_grain * grain_bytes);
        let r_end = (r.end.div_ceil(grain_bytes) * grain_bytes)
            .min(size.div_ceil(grain_bytes) * grain_bytes);
        while pos < r_end {
            let wend = ((pos / WINDOW + 1) * WINDOW).min(r_end);
            let readable = wend.min(size) - pos;
            let wl = (wend - pos) as usize;
            src.read_at(&mut window[..readable as usize], pos)?;
            window[readable as usize..wl].fill(0);
            progress.advance(readable);
            for (k, grain) in window[..wl].chunks(grain_bytes as usize).enumerate() {
                if crate::disk::is_zero(grain) {
                    continue;
                }
                let mut buf = grain.to_vec();
                buf.resize(grain_bytes as usize, 0);
                batch.push((pos / grain_bytes + k as u64, buf));
                if batch.len() == batch_len {
                    flush(&mut batch, &mut w, &mut written)?;
                }
            }
            pos = wend;
        }
        next_grain = next_grain.max(r_end / grain_bytes);
    }
    flush(&mut batch, &mut w, &mut written)?;

    // Grain tables that hold at least one grain, each after its marker; empty ones are left
    // out (their directory entry stays 0), as VirtualBox does.
    let gt_sectors = (GTES_PER_GT * 4).div_ceil(SECTOR);
    let mut gd = vec![0u32; n_gts as usize];
    let mut i = 0;
    while i < written.len() {
        let t = written[i].0 / GTES_PER_GT;
        let mut table = vec![0u8; (gt_sectors * SECTOR) as usize];
        while i < written.len() && written[i].0 / GTES_PER_GT == t {
            let e = (written[i].0 % GTES_PER_GT) as usize * 4;
            table[e..e + 4].copy_from_slice(&written[i].1.to_le_bytes());
            i += 1;
        }
        w.marker(gt_sectors, MARKER_GT)?;
        gd[t as usize] = u32::try_from(w.sector())
            .map_err(|_| invalid("VMDK export: the image would exceed 2 TiB of data"))?;
        w.put(&table)?;
    }
    let gd_sectors = (n_gts * 4).div_ceil(SECTOR).max(1);
    w.marker(gd_sectors, MARKER_GD)?;
    let gd_offset = w.sector();
    let mut gd_bytes = vec![0u8; (gd_sectors * SECTOR) as usize];
    for (k, s) in gd.iter().enumerate() {
        gd_bytes[k * 4..k * 4 + 4].copy_from_slice(&s.to_le_bytes());
    }
    w.put(&gd_bytes)?;
    w.marker(1, MARKER_FOOTER)?;
    let footer = Header {
        gd_offset,
        ..header
    };
    w.put(&footer.encode(overhead))?;
    w.marker(0, MARKER_EOS)?;
    w.w.flush()?;
    Ok(w.pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice_of(bytes: &[u8]) -> FileSlice {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        FileSlice::whole(f).unwrap()
    }

    #[test]
    fn stream_optimized_roundtrip() {
        let mut disk = vec![0u8; 3 << 20];
        for (i, b) in disk[100_000..300_000].iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8 + 1;
        }
        disk[(3 << 20) - 1] = 9;
        let mut out = Vec::new();
        write_stream_optimized(&mut out, "d.vmdk", &disk, &()).unwrap();
        let r = VmdkReader::open(slice_of(&out)).unwrap();
        assert_eq!(r.capacity(), disk.len() as u64);
        assert_eq!(r.create_type(), "streamOptimized");
        let mut back = vec![0u8; disk.len()];
        r.read_at(&mut back, 0).unwrap();
        assert!(back == disk);
        let ranges = r.data_ranges().unwrap();
        assert_eq!(ranges.len(), 2, "{ranges:?}");
        let mut part = vec![0u8; 1000];
        r.read_at(&mut part, 99_500).unwrap();
        assert_eq!(part, disk[99_500..100_500]);
    }

    #[test]
    fn odd_sizes_round_up_to_a_sector() {
        let mut disk = vec![0u8; (3 << 20) + 700];
        disk[(3 << 20) + 10..].fill(0x33);
        disk[5] = 1;
        let mut out = Vec::new();
        write_stream_optimized(&mut out, "d.vmdk", &disk, &()).unwrap();
        let r = VmdkReader::open(slice_of(&out)).unwrap();
        assert_eq!(r.capacity(), (3 << 20) + 1024);
        let mut back = vec![0u8; r.capacity() as usize];
        r.read_at(&mut back, 0).unwrap();
        assert!(back[..disk.len()] == disk[..] && back[disk.len()..].iter().all(|&b| b == 0));
    }

    #[test]
    fn grain_table_outside_file_is_refused() {
        let disk = vec![7u8; 1 << 20];
        let mut out = Vec::new();
        write_stream_optimized(&mut out, "d.vmdk", &disk, &()).unwrap();
        // The footer's GD points at the GD; make its first entry point far away.
        let len = out.len();
        let gd = u64_at(&out[len - 1024..], 56) as usize * 512;
        out[gd..gd + 4].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
        let e = VmdkReader::open(slice_of(&out)).unwrap_err().to_string();
        assert!(
            e.contains("grain table 0") && e.contains("outside the file"),
            "{e}"
        );
    }

    #[test]
    fn huge_capacity_without_data_reads_as_zeros() {
        struct Empty;
        impl SectionSource for Empty {
            fn len(&self) -> u64 {
                1 << 40
            }
            fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
                unreachable!("no data ranges")
            }
            fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
                Ok(vec![])
            }
        }
        let mut out = Vec::new();
        write_stream_optimized(&mut out, "big.vmdk", &Empty, &()).unwrap();
        assert!(out.len() < 1 << 20, "{}", out.len());
        let r = VmdkReader::open(slice_of(&out)).unwrap();
        assert_eq!(r.capacity(), 1 << 40);
        assert!(r.data_ranges().unwrap().is_empty());
    }
}
