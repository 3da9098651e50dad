use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::codec;
use super::error::{PackError, PackErrorKind};
use super::layout::{
    self, u32_at, u64_at, SectDesc, CHNK_FIXED, CHNK_FRAME_HEADER, FRAME_PREFIX, HEADER_LEN,
    INDEX_CHUNK, INDEX_FIXED, INDEX_SECTION_FIXED, MAX_PAD, SECT_FIXED, SEND_FRAME_LEN, TAG_INDX,
    TAG_PAD, TRAILER_LEN,
};
use super::{ChunkEntry, Codec, Progress, SectionInfo, Skeleton, MAX_SECTIONS};

/// Bytes of chunks (uncompressed) that make one more worker thread worth starting when a
/// read picks its own thread count: starting and joining a thread costs about what hashing
/// 64 KiB does.
pub const BYTES_PER_WORKER: u64 = 256 << 10;

/// Result of [`PackReader::verify`].
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub sections: u32,
    pub chunks: u64,
    pub zero_chunks: u64,
    /// Uncompressed bytes covered.
    pub bytes: u64,
    /// Payload bytes read and checked.
    pub stored_bytes: u64,
}

/// Random-access reader over a pack file.
///
/// [`open`](Self::open) reads the header, trailer and index, checks the index digest
/// and every structural rule of the index; it does not read chunk payloads.
#[derive(Debug)]
pub struct PackReader {
    path: PathBuf,
    name: String,
    file: File,
    file_size: u64,
    major: u16,
    minor: u16,
    aligned: bool,
    overlays: bool,
    root: [u8; 32],
    index_offset: u64,
    descs: Vec<SectDesc>,
    infos: Vec<SectionInfo>,
    chunks: Vec<ChunkEntry>,
    ranges: Vec<Range<usize>>,
}

fn corrupt(m: impl Into<String>) -> PackErrorKind {
    PackErrorKind::Corrupt(m.into())
}

impl PackReader {
    pub fn open(path: &Path) -> Result<Self, PackError> {
        let name = path.display().to_string();
        let e = |k: PackErrorKind| PackError::new(&name, k);
        let file = File::open(path).map_err(|x| e(PackErrorKind::Io(x)))?;
        let file_size = file.metadata().map_err(|x| e(PackErrorKind::Io(x)))?.len();
        let read = |buf: &mut [u8], off: u64| {
            file.read_exact_at(buf, off)
                .map_err(|x| e(PackErrorKind::Io(x)).at(off))
        };

        let min = (HEADER_LEN + FRAME_PREFIX + INDEX_FIXED + TRAILER_LEN) as u64;
        if file_size < min {
            // A short file that does not even start like a pack is "not a pack", not a
            // truncated one: only a prefix of the magic can be a pack cut short.
            let n = file_size.min(8) as usize;
            let mut m = [0u8; 8];
            read(&mut m[..n], 0)?;
            if n == 0 || m[..n] != super::MAGIC[..n] {
                return Err(e(PackErrorKind::BadMagic).at(0));
            }
            return Err(e(PackErrorKind::Truncated));
        }
        let mut header = [0u8; HEADER_LEN];
        read(&mut header, 0)?;
        let h = layout::parse_header(&header).map_err(|k| e(k).at(0))?;

        let toff = file_size - TRAILER_LEN as u64;
        let mut tb = [0u8; TRAILER_LEN];
        read(&mut tb, toff)?;
        let t = layout::parse_trailer(&tb).map_err(|k| e(k).at(toff))?;
        let min_index = (FRAME_PREFIX + INDEX_FIXED) as u64;
        if t.index_offset < HEADER_LEN as u64
            || t.index_len < min_index
            || t.index_len > u32::MAX as u64 + FRAME_PREFIX as u64
            || t.index_offset.checked_add(t.index_len) != Some(toff)
        {
            return Err(e(corrupt(format!(
                "trailer's index location {}+{} does not fit the file",
                t.index_offset, t.index_len
            )))
            .at(toff));
        }
        // Bounded by the file size, checked above.
        let mut index = vec![0u8; t.index_len as usize];
        read(&mut index, t.index_offset)?;
        if layout::sha256(&index) != t.root {
            return Err(e(PackErrorKind::ChecksumMismatch(
                "index does not match the root digest in the trailer".into(),
            ))
            .at(t.index_offset));
        }
        let (descs, chunks, ranges) =
            parse_index(&name, &index, &header, h.aligned, t.index_offset)?;
        let infos = descs.iter().map(SectDesc::info).collect();
        Ok(PackReader {
            path: path.to_path_buf(),
            name,
            file,
            file_size,
            major: h.major,
            minor: h.minor,
            aligned: h.aligned,
            overlays: h.overlays,
            root: t.root,
            index_offset: t.index_offset,
            descs,
            infos,
            chunks,
            ranges,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file(&self) -> &File {
        &self.file
    }
    pub fn version(&self) -> (u16, u16) {
        (self.major, self.minor)
    }
    pub fn aligned(&self) -> bool {
        self.aligned
    }
    /// Header flag bit 1: guest memory has overlay sections (FORMAT.md §12, "Live saves").
    pub fn overlays(&self) -> bool {
        self.overlays
    }
    pub fn root_digest(&self) -> [u8; 32] {
        self.root
    }
    pub fn file_size(&self) -> u64 {
        self.file_size
    }
    /// File offset of the INDX frame.
    pub fn index_offset(&self) -> u64 {
        self.index_offset
    }
    /// All sections in id order (index = id), including unknown optional kinds, which
    /// callers should ignore.
    pub fn sections(&self) -> &[SectionInfo] {
        &self.infos
    }
    pub fn section(&self, name: &str) -> Option<&SectionInfo> {
        self.infos.iter().find(|s| s.name == name)
    }
    /// File offset of a section's `SECT` frame, for messages.
    pub fn section_offset(&self, section: u32) -> Option<u64> {
        self.descs.get(section as usize).map(|d| d.sect_offset)
    }
    /// The chunks of a section in order; empty for an unknown id.
    pub fn chunks(&self, section: u32) -> &[ChunkEntry] {
        match self.ranges.get(section as usize) {
            Some(r) => &self.chunks[r.clone()],
            None => &[],
        }
    }

    fn err(&self, kind: PackErrorKind) -> PackError {
        PackError::new(&self.name, kind)
    }

    fn chunk_err(&self, e: &ChunkEntry, kind: PackErrorKind) -> PackError {
        let name = self
            .descs
            .get(e.section as usize)
            .map_or("?", |d| d.name.as_str());
        self.err(kind)
            .section(name)
            .chunk(e.seq)
            .at(e.frame_offset())
    }

    fn desc(&self, section: u32) -> Result<&SectDesc, PackError> {
        self.descs.get(section as usize).ok_or_else(|| {
            self.err(PackErrorKind::InvalidArgument(format!(
                "no section with id {section}"
            )))
        })
    }

    /// Reads one chunk into `out` (whose length must be the chunk's `ulen`), decompressing
    /// with the declared length as a hard bound; checks the SHA-256 when `verify`.
    /// The chunk's frame header is always compared with the index.
    pub fn read_chunk(
        &self,
        e: &ChunkEntry,
        verify: bool,
        out: &mut [u8],
    ) -> Result<(), PackError> {
        let mut scratch = Vec::new();
        self.read_chunk_with(e, verify, out, &mut scratch)
    }

    /// [`read_chunk`](Self::read_chunk) with the caller's buffer for the stored frame: when
    /// its capacity is at least [`PackReader::frame_len`] of the chunk, reading allocates no
    /// buffer (for a fault path that must not fail for memory once it is set up).
    pub fn read_chunk_reusing(
        &self,
        e: &ChunkEntry,
        verify: bool,
        out: &mut [u8],
        frame: &mut Vec<u8>,
    ) -> Result<(), PackError> {
        self.read_chunk_with(e, verify, out, frame)
    }

    /// Bytes of the frame buffer that reading chunk `e` uses (its header and stored payload).
    pub fn frame_len(e: &ChunkEntry) -> usize {
        CHNK_FRAME_HEADER + e.clen as usize
    }

    /// Checks a zero chunk's frame header against the index without producing its bytes.
    fn check_zero_chunk(&self, e: &ChunkEntry) -> Result<(), PackError> {
        let mut hdr = [0u8; CHNK_FRAME_HEADER];
        self.file
            .read_exact_at(&mut hdr, e.frame_offset())
            .map_err(|x| self.chunk_err(e, PackErrorKind::Io(x)))?;
        if hdr != layout::encode_chunk_header(e) {
            return Err(self.chunk_err(
                e,
                PackErrorKind::ChecksumMismatch("chunk frame header differs from the index".into()),
            ));
        }
        Ok(())
    }

    fn read_chunk_with(
        &self,
        e: &ChunkEntry,
        verify: bool,
        out: &mut [u8],
        scratch: &mut Vec<u8>,
    ) -> Result<(), PackError> {
        if out.len() != e.ulen as usize {
            return Err(self.chunk_err(
                e,
                PackErrorKind::InvalidArgument(format!(
                    "output buffer is {} bytes, chunk is {}",
                    out.len(),
                    e.ulen
                )),
            ));
        }
        if e.codec == Codec::Zero {
            out.fill(0);
            if !verify {
                return Ok(());
            }
        }
        let io = |x: std::io::Error| self.chunk_err(e, PackErrorKind::Io(x));
        let expect = layout::encode_chunk_header(e);
        let mut hdr = [0u8; CHNK_FRAME_HEADER];
        match e.codec {
            Codec::None => {
                self.file
                    .read_exact_at(&mut hdr, e.frame_offset())
                    .map_err(io)?;
                self.file.read_exact_at(out, e.payload_offset).map_err(io)?;
            }
            _ => {
                codec::sized(scratch, CHNK_FRAME_HEADER + e.clen as usize)
                    .map_err(|k| self.chunk_err(e, k))?;
                self.file
                    .read_exact_at(scratch, e.frame_offset())
                    .map_err(io)?;
                hdr.copy_from_slice(&scratch[..CHNK_FRAME_HEADER]);
            }
        }
        if hdr != expect {
            return Err(self.chunk_err(
                e,
                PackErrorKind::ChecksumMismatch("chunk frame header differs from the index".into()),
            ));
        }
        if matches!(e.codec, Codec::Deflate | Codec::Zstd) {
            if layout::crc32(&scratch[CHNK_FRAME_HEADER..]) != e.payload_crc32 {
                return Err(self.chunk_err(
                    e,
                    PackErrorKind::ChecksumMismatch("payload does not match its CRC-32".into()),
                ));
            }
            codec::decompress(e.codec, &scratch[CHNK_FRAME_HEADER..], out)
                .map_err(|k| self.chunk_err(e, k))?;
        }
        if verify && e.codec != Codec::Zero && layout::sha256(out) != e.sha256 {
            return Err(self.chunk_err(
                e,
                PackErrorKind::ChecksumMismatch("chunk data does not match its SHA-256".into()),
            ));
        }
        Ok(())
    }

    /// Reads a whole section into memory, verifying it; refuses sections larger than `limit`.
    pub fn read_section(&self, section: u32, limit: u64) -> Result<Vec<u8>, PackError> {
        let d = self.desc(section)?;
        if d.size > limit || usize::try_from(d.size).is_err() {
            return Err(self
                .err(PackErrorKind::Limit(format!(
                    "section is {} bytes, more than the {limit} allowed here",
                    d.size
                )))
                .section(&d.name));
        }
        let mut out = vec![0u8; d.size as usize];
        let mut scratch = Vec::new();
        for e in self.chunks(section) {
            let s = e.offset as usize;
            self.read_chunk_with(e, true, &mut out[s..s + e.ulen as usize], &mut scratch)?;
        }
        Ok(out)
    }

    /// Streams a section's bytes in order to `out`, verifying every chunk.
    pub fn copy_section(
        &self,
        section: u32,
        out: &mut dyn Write,
        progress: &dyn Progress,
    ) -> Result<(), PackError> {
        let d = self.desc(section)?;
        let mut buf = vec![0u8; (d.chunk_size as u64).min(d.size) as usize];
        let mut scratch = Vec::new();
        for e in self.chunks(section) {
            let b = &mut buf[..e.ulen as usize];
            self.read_chunk_with(e, true, b, &mut scratch)?;
            out.write_all(b)
                .map_err(|x| self.err(PackErrorKind::Io(x)).section(&d.name).chunk(e.seq))?;
            progress.advance(e.ulen as u64);
        }
        Ok(())
    }

    /// Calls `f(offset_in_section, data)` for every non-zero chunk of a section, reading
    /// and decompressing on `threads` workers (0 = available parallelism). Order is
    /// unspecified. Stops at the first error, which is returned.
    pub fn for_each_chunk_parallel(
        &self,
        section: u32,
        verify: bool,
        threads: usize,
        f: &ChunkFn<'_>,
    ) -> Result<(), PackError> {
        self.desc(section)?;
        let list: Vec<&ChunkEntry> = self
            .chunks(section)
            .iter()
            .filter(|e| e.codec != Codec::Zero)
            .collect();
        self.run_parallel(&list, threads, &|e, buf, scratch| {
            self.read_chunk_with(e, verify, buf, scratch)?;
            f(e.offset, buf)
        })
    }

    /// Reads `list` on `threads` workers (0: as many as there are CPUs and
    /// [`BYTES_PER_WORKER`]-sized shares of the work).
    fn run_parallel(
        &self,
        list: &[&ChunkEntry],
        threads: usize,
        work: &WorkFn<'_>,
    ) -> Result<(), PackError> {
        let threads = if threads == 0 {
            // Each worker gets enough bytes to be worth its start: a pack of a few small
            // sections is read on this thread, without even asking for the CPU count.
            let bytes: u64 = list.iter().map(|e| u64::from(e.ulen)).sum();
            match usize::try_from(bytes.div_ceil(BYTES_PER_WORKER)).unwrap_or(usize::MAX) {
                0 | 1 => 1,
                n => std::thread::available_parallelism().map_or(1, |p| p.get().min(n)),
            }
        } else {
            threads
        }
        .min(list.len())
        .max(1);
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let first_err: Mutex<Option<PackError>> = Mutex::new(None);
        let fail = |err: PackError| {
            stop.store(true, Ordering::Relaxed);
            let mut g = first_err.lock().unwrap_or_else(|p| p.into_inner());
            // Keep the error at the lowest file offset for stable messages.
            let replace = match &*g {
                None => true,
                Some(old) => err.offset < old.offset,
            };
            if replace {
                *g = Some(err);
            }
        };
        let worker = || {
            let mut buf = Vec::new();
            let mut scratch = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(e) = list.get(i) else { break };
                if let Err(k) = codec::sized(&mut buf, e.ulen as usize) {
                    fail(self.chunk_err(e, k));
                    break;
                }
                if let Err(err) = work(e, &mut buf, &mut scratch) {
                    fail(err);
                    break;
                }
            }
        };
        if threads == 1 {
            // One chunk (small sections) or one thread asked for: a thread of its own
            // would cost more than the work.
            worker();
        } else {
            std::thread::scope(|s| {
                let mut handles = Vec::new();
                for _ in 0..threads {
                    // Workers are a speed-up: short of threads (memory, limits), fewer do the
                    // work, and with none this thread does it.
                    match std::thread::Builder::new().spawn_scoped(s, worker) {
                        Ok(h) => handles.push(h),
                        Err(_) => break,
                    }
                }
                if handles.is_empty() {
                    worker();
                }
                // Joined, not just left to the scope: a scope waits for the closures, a join also
                // for the threads' exit (their thread-local destructors), which leak checkers
                // (libFuzzer's) would otherwise report as leaks.
                for h in handles {
                    let _ = h.join();
                }
            });
        }
        match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Checks every byte of the file: frame structure, padding, every chunk's header,
    /// decompression and SHA-256 (chunks in parallel). Ok only if all is intact.
    pub fn verify(&self, progress: &dyn Progress) -> Result<VerifyReport, PackError> {
        self.verify_structure()?;
        // A zero chunk is checked by its frame header alone (its digest field is all zero by
        // definition, §4): never materialised, so a small pack claiming terabytes of zero
        // chunks costs one 80-byte read per chunk.
        for e in self.chunks.iter().filter(|e| e.codec == Codec::Zero) {
            self.check_zero_chunk(e)?;
            progress.advance(e.ulen as u64);
        }
        let list: Vec<&ChunkEntry> = self
            .chunks
            .iter()
            .filter(|e| e.codec != Codec::Zero)
            .collect();
        self.run_parallel(&list, 0, &|e, buf, scratch| {
            self.read_chunk_with(e, true, buf, scratch)?;
            progress.advance(e.ulen as u64);
            Ok(())
        })?;
        let mut r = VerifyReport {
            sections: self.descs.len() as u32,
            ..Default::default()
        };
        for d in &self.descs {
            r.chunks += d.chunk_count;
            r.zero_chunks += d.zero_chunks;
            r.bytes += d.size;
            r.stored_bytes += d.stored_bytes;
        }
        Ok(r)
    }

    /// Sequential walk over everything between the header and the index except chunk
    /// frames: SECT and SEND frames must equal what the index says, gaps must be PAD frames
    /// of zeros.
    fn verify_structure(&self) -> Result<(), PackError> {
        let mut cursor = HEADER_LEN as u64;
        for (i, d) in self.descs.iter().enumerate() {
            let serr = |k: PackErrorKind, off: u64| self.err(k).section(&d.name).at(off);
            self.skip_pads(cursor, d.sect_offset, Some(&d.name))?;
            let expect = d.encode_sect_frame();
            let mut got = vec![0u8; expect.len()];
            self.file
                .read_exact_at(&mut got, d.sect_offset)
                .map_err(|x| serr(PackErrorKind::Io(x), d.sect_offset))?;
            if got != expect {
                return Err(serr(
                    PackErrorKind::ChecksumMismatch("SECT frame differs from the index".into()),
                    d.sect_offset,
                ));
            }
            cursor = d.sect_offset + expect.len() as u64;
            for e in &self.chunks[self.ranges[i].clone()] {
                self.skip_pads(cursor, e.frame_offset(), Some(&d.name))?;
                cursor = e.payload_offset + e.clen as u64;
            }
            self.skip_pads(cursor, d.send_offset, Some(&d.name))?;
            let expect = d.encode_send_frame();
            let mut got = [0u8; SEND_FRAME_LEN];
            self.file
                .read_exact_at(&mut got, d.send_offset)
                .map_err(|x| serr(PackErrorKind::Io(x), d.send_offset))?;
            if got != expect {
                return Err(serr(
                    PackErrorKind::ChecksumMismatch("SEND frame differs from the index".into()),
                    d.send_offset,
                ));
            }
            cursor = d.send_offset + SEND_FRAME_LEN as u64;
        }
        super::skeleton::scan_tail(&self.file, &self.name, cursor, self.index_offset)?;
        Ok(())
    }

    /// End of the last `SEND` frame (or of the header): where signatures may follow.
    fn data_end(&self) -> u64 {
        self.descs
            .last()
            .map_or(HEADER_LEN as u64, |d| d.send_offset + SEND_FRAME_LEN as u64)
    }

    fn tail(&self) -> Result<super::skeleton::Tail, PackError> {
        super::skeleton::scan_tail(&self.file, &self.name, self.data_end(), self.index_offset)
    }

    /// The bodies of the pack's `SIGN` frames (docs/FORMAT.md §3.6), in file order. The
    /// signatures are not checked here.
    pub fn signatures(&self) -> Result<Vec<Vec<u8>>, PackError> {
        Ok(self.tail()?.signatures)
    }

    /// Everything but the chunk payloads. Fails for a pack whose padding is not canonical
    /// (every gap between frames one `PAD` frame, as every vmpack writer makes it).
    pub fn skeleton(&self) -> Result<Skeleton, PackError> {
        let tail = self.tail()?;
        let mut header = [0u8; HEADER_LEN];
        let mut index =
            vec![0u8; (self.file_size - TRAILER_LEN as u64 - self.index_offset) as usize];
        let io = |x: std::io::Error| self.err(PackErrorKind::Io(x));
        self.file.read_exact_at(&mut header, 0).map_err(io)?;
        self.file
            .read_exact_at(&mut index, self.index_offset)
            .map_err(io)?;
        let s = Skeleton::from_parts(
            header,
            index,
            self.index_offset,
            tail.signatures,
            self.descs.clone(),
            self.chunks.clone(),
            self.ranges.clone(),
        );
        s.check_canonical(&self.name)?;
        Ok(s)
    }

    /// Reads a chunk's stored payload (`clen` bytes, compressed or not) into `out`, after
    /// checking its frame header against the index and, for compressed codecs, its CRC-32.
    /// With `verify`, also checks the SHA-256 of the decoded bytes.
    pub fn read_payload(
        &self,
        e: &ChunkEntry,
        verify: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), PackError> {
        out.clear();
        if e.codec == Codec::Zero {
            return Ok(());
        }
        let mut scratch = std::mem::take(out);
        let mut plain = if verify && e.codec != Codec::None {
            vec![0u8; e.ulen as usize]
        } else {
            Vec::new()
        };
        match e.codec {
            Codec::None => {
                scratch.resize(e.ulen as usize, 0);
                let r = self.read_chunk_with(e, verify, &mut scratch, &mut Vec::new());
                *out = scratch;
                r
            }
            _ if verify => {
                let r = self.read_chunk_with(e, true, &mut plain, &mut scratch);
                scratch.drain(..CHNK_FRAME_HEADER);
                *out = scratch;
                r
            }
            _ => {
                scratch.resize(CHNK_FRAME_HEADER + e.clen as usize, 0);
                let io = |x: std::io::Error| self.chunk_err(e, PackErrorKind::Io(x));
                self.file
                    .read_exact_at(&mut scratch, e.frame_offset())
                    .map_err(io)?;
                if scratch[..CHNK_FRAME_HEADER] != layout::encode_chunk_header(e) {
                    return Err(self.chunk_err(
                        e,
                        PackErrorKind::ChecksumMismatch(
                            "chunk frame header differs from the index".into(),
                        ),
                    ));
                }
                if layout::crc32(&scratch[CHNK_FRAME_HEADER..]) != e.payload_crc32 {
                    return Err(self.chunk_err(
                        e,
                        PackErrorKind::ChecksumMismatch("payload does not match its CRC-32".into()),
                    ));
                }
                scratch.drain(..CHNK_FRAME_HEADER);
                *out = scratch;
                Ok(())
            }
        }
    }

    /// Writes this pack to `out` with `signatures` as its `SIGN` frames (replacing any it
    /// has): the bytes before them are copied, the index moves after them, the root digest
    /// stays the same.
    pub fn write_with_signatures(
        &self,
        signatures: Vec<Vec<u8>>,
        out: &mut File,
    ) -> Result<u64, PackError> {
        let tail = self.tail()?;
        let mut header = [0u8; HEADER_LEN];
        let mut index =
            vec![0u8; (self.file_size - TRAILER_LEN as u64 - self.index_offset) as usize];
        let io = |x: std::io::Error| self.err(PackErrorKind::Io(x));
        self.file.read_exact_at(&mut header, 0).map_err(io)?;
        self.file
            .read_exact_at(&mut index, self.index_offset)
            .map_err(io)?;
        let new_len: u64 = signatures
            .iter()
            .map(|s| (FRAME_PREFIX + s.len()) as u64)
            .sum();
        let index_offset = tail.sign_start + new_len;
        if signatures.len() > layout::MAX_SIGNATURES
            || signatures
                .iter()
                .any(|s| s.len() > layout::MAX_SIGNATURE_LEN)
        {
            return Err(self.err(PackErrorKind::Limit(format!(
                "more than {} signatures or one over {} bytes",
                layout::MAX_SIGNATURES,
                layout::MAX_SIGNATURE_LEN
            ))));
        }
        let mut src = &self.file;
        use std::io::{Read, Seek, Write};
        let wio = |x: std::io::Error| PackError::new("<output>", PackErrorKind::Io(x));
        src.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        let copied = std::io::copy(&mut Read::take(&mut src, tail.sign_start), out).map_err(wio)?;
        if copied != tail.sign_start {
            return Err(self.err(PackErrorKind::Truncated));
        }
        for s in &signatures {
            out.write_all(&layout::TAG_SIGN).map_err(wio)?;
            out.write_all(&(s.len() as u32).to_le_bytes())
                .map_err(wio)?;
            out.write_all(s).map_err(wio)?;
        }
        out.write_all(&index).map_err(wio)?;
        out.write_all(&layout::encode_trailer(
            index_offset,
            index.len() as u64,
            &self.root,
        ))
        .map_err(wio)?;
        Ok(index_offset + index.len() as u64 + TRAILER_LEN as u64)
    }

    fn skip_pads(&self, mut from: u64, to: u64, section: Option<&str>) -> Result<(), PackError> {
        let perr = |k: PackErrorKind, off: u64| {
            let e = self.err(k).at(off);
            match section {
                Some(s) => e.section(s),
                None => e,
            }
        };
        let mut buf = Vec::new();
        while from < to {
            let mut p = [0u8; FRAME_PREFIX];
            if to - from < FRAME_PREFIX as u64 {
                return Err(perr(corrupt("unaccounted bytes between frames"), from));
            }
            self.file
                .read_exact_at(&mut p, from)
                .map_err(|x| perr(PackErrorKind::Io(x), from))?;
            let n = u32_at(&p, 4);
            if p[0..4] != TAG_PAD || n > MAX_PAD || from + FRAME_PREFIX as u64 + n as u64 > to {
                return Err(perr(
                    corrupt("unexpected bytes between frames (expected a PAD frame)"),
                    from,
                ));
            }
            buf.resize(n as usize, 0);
            self.file
                .read_exact_at(&mut buf, from + FRAME_PREFIX as u64)
                .map_err(|x| perr(PackErrorKind::Io(x), from))?;
            if !layout::is_zero(&buf) {
                return Err(perr(corrupt("PAD frame contains non-zero bytes"), from));
            }
            from += FRAME_PREFIX as u64 + n as u64;
        }
        Ok(())
    }
}

/// Callback of [`PackReader::for_each_chunk_parallel`]: `(offset_in_section, data)`.
pub type ChunkFn<'a> = dyn Fn(u64, &[u8]) -> Result<(), PackError> + Sync + 'a;
type WorkFn<'a> = dyn Fn(&ChunkEntry, &mut [u8], &mut Vec<u8>) -> Result<(), PackError> + Sync + 'a;

type ParsedIndex = (Vec<SectDesc>, Vec<ChunkEntry>, Vec<Range<usize>>);

/// Parses and checks an INDX frame (already digest-verified) against every rule that
/// can be checked without reading the rest of the file.
pub(crate) fn parse_index(
    name: &str,
    idx: &[u8],
    header: &[u8],
    aligned: bool,
    index_offset: u64,
) -> Result<ParsedIndex, PackError> {
    let e = |k: PackErrorKind| PackError::new(name, k).at(index_offset);
    if idx.len() < FRAME_PREFIX + INDEX_FIXED || idx[0..4] != TAG_INDX {
        return Err(e(corrupt("no INDX frame where the trailer points")));
    }
    let body = &idx[FRAME_PREFIX..];
    if u32_at(idx, 4) as usize != body.len() {
        return Err(e(corrupt("INDX frame length differs from the trailer")));
    }
    if layout::digest_at(body, 0) != layout::sha256(header) {
        return Err(PackError::new(
            name,
            PackErrorKind::ChecksumMismatch("header does not match its digest in the index".into()),
        )
        .at(0));
    }
    let nsec = u32_at(body, 32);
    let nchunks = u64_at(body, 40);
    if u32_at(body, 36) != 0 {
        return Err(e(corrupt("index reserved field is not zero")));
    }
    let rest_len = (body.len() - INDEX_FIXED) as u64;
    if nsec > MAX_SECTIONS || nsec as u64 * INDEX_SECTION_FIXED as u64 > rest_len {
        return Err(e(PackErrorKind::Limit(format!(
            "index declares {nsec} sections, more than fit"
        ))));
    }
    if nchunks > rest_len / INDEX_CHUNK as u64 {
        return Err(e(PackErrorKind::Limit(format!(
            "index declares {nchunks} chunks, more than fit"
        ))));
    }
    let mut descs: Vec<SectDesc> = Vec::with_capacity(nsec as usize);
    let mut pos = INDEX_FIXED;
    let mut total_chunks: u64 = 0;
    for i in 0..nsec {
        if body.len() - pos < INDEX_SECTION_FIXED {
            return Err(e(corrupt("index ends inside a section descriptor")));
        }
        let fixed = &body[pos..pos + INDEX_SECTION_FIXED];
        let (mut d, used) = layout::parse_sect_fields(
            &fixed[..SECT_FIXED],
            &body[pos + INDEX_SECTION_FIXED..],
            aligned,
        )
        .map_err(|k| {
            let n = fixed[6] as usize;
            let nm = body
                .get(pos + INDEX_SECTION_FIXED..pos + INDEX_SECTION_FIXED + n)
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned();
            e(k).section(&nm)
        })?;
        let se = |m: String| e(corrupt(m)).section(&d.name);
        d.sect_offset = u64_at(fixed, 24);
        d.send_offset = u64_at(fixed, 32);
        d.chunk_count = u64_at(fixed, 40);
        d.stored_bytes = u64_at(fixed, 48);
        if d.id != i {
            return Err(se(format!("section id {} at position {i}", d.id)));
        }
        if descs.iter().any(|o| o.name == d.name) {
            return Err(se("duplicate section name".into()));
        }
        if d.chunk_count != d.expected_chunks() {
            return Err(se(format!(
                "{} chunks recorded for {} bytes in chunks of {}",
                d.chunk_count, d.size, d.chunk_size
            )));
        }
        total_chunks = total_chunks.saturating_add(d.chunk_count);
        pos += INDEX_SECTION_FIXED + used;
        descs.push(d);
    }
    if total_chunks != nchunks || (body.len() - pos) as u64 != nchunks * INDEX_CHUNK as u64 {
        return Err(e(corrupt(
            "chunk count does not match the index length or the sections",
        )));
    }
    let mut chunks = Vec::with_capacity(nchunks as usize);
    let mut ranges = Vec::with_capacity(descs.len());
    let mut cursor = HEADER_LEN as u64;
    for d in descs.iter_mut() {
        let se = |m: String| e(corrupt(m)).section(&d.name);
        let sect_len = (FRAME_PREFIX + SECT_FIXED + d.name.len() + d.meta_raw.len()) as u64;
        if d.sect_offset < cursor {
            return Err(se(format!(
                "SECT frame offset {} overlaps earlier data",
                d.sect_offset
            )));
        }
        cursor = d
            .sect_offset
            .checked_add(sect_len)
            .ok_or_else(|| se("SECT frame offset overflows".into()))?;
        let start = chunks.len();
        let (mut stored, mut zeros) = (0u64, 0u64);
        for seq in 0..d.chunk_count {
            let b = &body[pos..pos + INDEX_CHUNK];
            pos += INDEX_CHUNK;
            let frame = u64_at(b, CHNK_FIXED);
            let ce = |k: PackErrorKind| e(k).section(&d.name).chunk(seq).at(frame);
            if frame < cursor || frame > index_offset {
                return Err(ce(corrupt("chunk frame offset out of place")));
            }
            let c = layout::parse_chunk_fixed(&b[..CHNK_FIXED], frame + CHNK_FRAME_HEADER as u64)
                .map_err(ce)?;
            layout::check_chunk_in_section(&c, d, seq, aligned).map_err(ce)?;
            cursor = c.payload_offset + c.clen as u64;
            stored += c.clen as u64;
            zeros += (c.codec == Codec::Zero) as u64;
            chunks.push(c);
        }
        if stored != d.stored_bytes {
            return Err(se("stored byte count does not match the chunks".into()));
        }
        d.zero_chunks = zeros;
        if d.send_offset < cursor {
            return Err(se(format!(
                "SEND frame offset {} overlaps earlier data",
                d.send_offset
            )));
        }
        cursor = d
            .send_offset
            .checked_add(SEND_FRAME_LEN as u64)
            .ok_or_else(|| se("SEND frame offset overflows".into()))?;
        if cursor > index_offset {
            return Err(se("section runs into the index".into()));
        }
        ranges.push(start..chunks.len());
    }
    Ok((descs, chunks, ranges))
}
