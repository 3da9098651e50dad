use std::io::{ErrorKind, Read};

use super::codec;
use super::error::{PackError, PackErrorKind};
use super::layout::{
    self, u32_at, SectDesc, CHNK_FIXED, FRAME_PREFIX, HEADER_LEN, MAX_PAD, MAX_SIGNATURES,
    MAX_SIGNATURE_LEN, SECT_FIXED, SEND_BODY, TAG_CHNK, TAG_INDX, TAG_PAD, TAG_SECT, TAG_SEND,
    TAG_SIGN, TRAILER_LEN,
};
use super::{
    kind, ChunkEntry, Codec, PackSummary, SectionInfo, MAX_META_LEN, MAX_NAME_LEN, MAX_SECTIONS,
};

/// One step of a forward read.
#[derive(Debug)]
pub enum StreamEvent<'a> {
    /// A section starts. `stored_bytes`, `chunks` and `zero_chunks` are 0 here.
    Section(&'a SectionInfo),
    /// The next chunk of the current section, decompressed and verified. Zero chunks
    /// come as a slice of zeros with `zero` set, so a reader can skip them without looking
    /// at the bytes (the slice is filled once, not per chunk).
    Chunk {
        section: u32,
        offset: u64,
        data: &'a [u8],
        zero: bool,
    },
    /// The section with this id is complete.
    SectionEnd(u32),
    /// The index and trailer matched everything read; nothing follows.
    End(PackSummary),
}

/// Reads a pack front to back from any `Read` (a pipe), verifying each chunk as it
/// arrives and, at the end, that the index and trailer describe exactly what was read.
///
/// Holds at most one chunk in memory. Sections of unknown optional kinds are verified
/// but produce no events.
pub struct StreamReader<R: Read> {
    r: R,
    name: String,
    pos: u64,
    header: [u8; HEADER_LEN],
    version: (u16, u16),
    aligned: bool,
    overlays: bool,
    descs: Vec<SectDesc>,
    info: Option<SectionInfo>,
    chunks: Vec<ChunkEntry>,
    cur: Option<usize>,
    skip: bool,
    next_seq: u64,
    payload: Vec<u8>,
    data: Vec<u8>,
    /// `data[..zero_len]` is known to be all zero (kept across zero chunks so a run of them
    /// costs one fill, not one per chunk).
    zero_len: usize,
    /// The last chunk was a zero chunk.
    last_zero: bool,
    done: Option<PackSummary>,
    failed: bool,
    /// SIGN frames seen (they come after the last section).
    signatures: usize,
}

fn corrupt(m: impl Into<String>) -> PackErrorKind {
    PackErrorKind::Corrupt(m.into())
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header. `name` is used in error messages (a path or `-`).
    pub fn new(r: R, name: &str) -> Result<Self, PackError> {
        let mut s = StreamReader {
            r,
            name: name.to_string(),
            pos: 0,
            header: [0; HEADER_LEN],
            version: (0, 0),
            aligned: false,
            overlays: false,
            descs: Vec::new(),
            info: None,
            chunks: Vec::new(),
            cur: None,
            skip: false,
            next_seq: 0,
            payload: Vec::new(),
            data: Vec::new(),
            zero_len: 0,
            last_zero: false,
            done: None,
            failed: false,
            signatures: 0,
        };
        let mut h = [0u8; HEADER_LEN];
        s.read(&mut h)?;
        let hd = layout::parse_header(&h).map_err(|k| s.err(k).at(0))?;
        s.header = h;
        s.version = (hd.major, hd.minor);
        s.aligned = hd.aligned;
        s.overlays = hd.overlays;
        Ok(s)
    }

    pub fn version(&self) -> (u16, u16) {
        self.version
    }
    pub fn aligned(&self) -> bool {
        self.aligned
    }
    /// Header flag bit 1: guest memory has overlay sections (FORMAT.md §12, "Live saves").
    pub fn overlays(&self) -> bool {
        self.overlays
    }
    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn err(&self, k: PackErrorKind) -> PackError {
        PackError::new(&self.name, k)
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), PackError> {
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                Err(self.err(PackErrorKind::Truncated).at(self.pos))
            }
            Err(e) => Err(self.err(PackErrorKind::Io(e)).at(self.pos)),
        }
    }

    fn read_vec(&mut self, n: usize) -> Result<Vec<u8>, PackError> {
        let mut v = vec![0u8; n];
        self.read(&mut v)?;
        Ok(v)
    }

    /// Returns the next event. After `End`, returns `End` again.
    pub fn next_event(&mut self) -> Result<StreamEvent<'_>, PackError> {
        if let Some(s) = &self.done {
            return Ok(StreamEvent::End(s.clone()));
        }
        if self.failed {
            return Err(self.err(PackErrorKind::InvalidArgument(
                "stream read already failed".into(),
            )));
        }
        match self.step() {
            Ok(Step::Section) => Ok(StreamEvent::Section(self.info.as_ref().unwrap())),
            Ok(Step::Chunk(section, offset, len)) => Ok(StreamEvent::Chunk {
                section,
                offset,
                data: &self.data[..len],
                zero: self.zero_len >= len && self.last_zero,
            }),
            Ok(Step::SectionEnd(id)) => Ok(StreamEvent::SectionEnd(id)),
            Ok(Step::End) => Ok(StreamEvent::End(self.done.clone().unwrap())),
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    fn step(&mut self) -> Result<Step, PackError> {
        loop {
            let off = self.pos;
            let mut p = [0u8; FRAME_PREFIX];
            self.read(&mut p)?;
            let len = u32_at(&p, 4) as usize;
            let tag: [u8; 4] = p[0..4].try_into().unwrap();
            if self.signatures > 0 && tag != TAG_SIGN && tag != TAG_INDX {
                return Err(self
                    .err(corrupt(
                        "only SIGN frames and the index may follow a SIGN frame",
                    ))
                    .at(off));
            }
            match tag {
                TAG_PAD => {
                    if len > MAX_PAD as usize {
                        return Err(self.in_section(corrupt("PAD frame too long"), off));
                    }
                    let v = self.read_vec(len)?;
                    if !layout::is_zero(&v) {
                        return Err(
                            self.in_section(corrupt("PAD frame contains non-zero bytes"), off)
                        );
                    }
                }
                TAG_SIGN => {
                    // Signatures (docs/FORMAT.md §3.6) follow the last section; they are
                    // checked from a file, not while streaming.
                    if self.cur.is_some() {
                        return Err(self.in_section(corrupt("SIGN frame inside a section"), off));
                    }
                    self.signatures += 1;
                    if len > MAX_SIGNATURE_LEN || self.signatures > MAX_SIGNATURES {
                        return Err(self
                            .err(PackErrorKind::Limit(format!(
                                "SIGN frame of {len} bytes or more than {MAX_SIGNATURES} of them"
                            )))
                            .at(off));
                    }
                    self.read_vec(len)?;
                }
                TAG_SECT => return self.sect(off, len),
                TAG_CHNK => {
                    if let Some(s) = self.chunk(off, len)? {
                        return Ok(s);
                    }
                }
                TAG_SEND => {
                    if let Some(s) = self.send(off, len)? {
                        return Ok(s);
                    }
                }
                TAG_INDX => return self.index(off, len),
                _ => {
                    return Err(
                        self.in_section(corrupt(format!("unknown frame tag {:02x?}", tag)), off)
                    )
                }
            }
        }
    }

    fn in_section(&self, k: PackErrorKind, off: u64) -> PackError {
        let e = self.err(k).at(off);
        match self.cur {
            Some(i) => e.section(&self.descs[i].name),
            None => e,
        }
    }

    fn sect(&mut self, off: u64, len: usize) -> Result<Step, PackError> {
        if self.cur.is_some() {
            return Err(
                self.in_section(corrupt("section starts before the previous one ended"), off)
            );
        }
        if !(SECT_FIXED..=SECT_FIXED + MAX_NAME_LEN + MAX_META_LEN).contains(&len) {
            return Err(self
                .err(PackErrorKind::Limit(format!("SECT frame of {len} bytes")))
                .at(off));
        }
        if self.descs.len() >= MAX_SECTIONS as usize {
            return Err(self
                .err(PackErrorKind::Limit("too many sections".into()))
                .at(off));
        }
        let body = self.read_vec(len)?;
        let (mut d, used) =
            layout::parse_sect_fields(&body[..SECT_FIXED], &body[SECT_FIXED..], self.aligned)
                .map_err(|k| {
                    let n = (body[6] as usize).min(body.len() - SECT_FIXED);
                    let nm =
                        String::from_utf8_lossy(&body[SECT_FIXED..SECT_FIXED + n]).into_owned();
                    self.err(k).section(&nm).at(off)
                })?;
        let se = |s: &Self, m: &str| s.err(corrupt(m)).section(&d.name).at(off);
        if used != len - SECT_FIXED {
            return Err(se(
                self,
                "SECT frame length does not match its name and meta",
            ));
        }
        if d.id as usize != self.descs.len() {
            return Err(se(self, "section id out of sequence"));
        }
        if self.descs.iter().any(|o| o.name == d.name) {
            return Err(se(self, "duplicate section name"));
        }
        d.sect_offset = off;
        self.skip = !kind::is_known(d.kind);
        self.info = Some(d.info());
        self.descs.push(d);
        self.cur = Some(self.descs.len() - 1);
        self.next_seq = 0;
        if self.skip {
            // Unknown optional kind: keep verifying, emit nothing.
            return self.step();
        }
        Ok(Step::Section)
    }

    fn chunk(&mut self, off: u64, len: usize) -> Result<Option<Step>, PackError> {
        let Some(ci) = self.cur else {
            return Err(self.err(corrupt("chunk outside a section")).at(off));
        };
        let seq = self.next_seq;
        let cerr =
            |s: &Self, k: PackErrorKind| s.err(k).section(&s.descs[ci].name).chunk(seq).at(off);
        if len < CHNK_FIXED {
            return Err(cerr(self, corrupt("CHNK frame too short")));
        }
        let mut fixed = [0u8; CHNK_FIXED];
        self.read(&mut fixed).map_err(|e| cerr(self, e.kind))?;
        let e = layout::parse_chunk_fixed(&fixed, self.pos).map_err(|k| cerr(self, k))?;
        if len != CHNK_FIXED + e.clen as usize {
            return Err(cerr(
                self,
                corrupt("CHNK frame length does not match its payload length"),
            ));
        }
        layout::check_chunk_in_section(&e, &self.descs[ci], seq, self.aligned)
            .map_err(|k| cerr(self, k))?;
        // Bounded: clen <= ulen <= chunk size <= MAX_CHUNK_SIZE, all checked above.
        let mut payload = std::mem::take(&mut self.payload);
        let r = codec::sized(&mut payload, e.clen as usize)
            .map_err(|k| self.err(k))
            .and_then(|()| self.read(&mut payload));
        self.payload = payload;
        r.map_err(|x| cerr(self, x.kind))?;
        if matches!(e.codec, Codec::Deflate | Codec::Zstd)
            && layout::crc32(&self.payload) != e.payload_crc32
        {
            return Err(cerr(
                self,
                PackErrorKind::ChecksumMismatch("payload does not match its CRC-32".into()),
            ));
        }
        if e.codec == Codec::Zero && self.zero_len >= e.ulen as usize {
            // Already zero: nothing to produce.
        } else {
            codec::sized(&mut self.data, e.ulen as usize).map_err(|k| cerr(self, k))?;
            codec::decompress(e.codec, &self.payload, &mut self.data).map_err(|k| cerr(self, k))?;
            self.zero_len = if e.codec == Codec::Zero {
                e.ulen as usize
            } else {
                0
            };
        }
        self.last_zero = e.codec == Codec::Zero;
        if e.codec != Codec::Zero && layout::sha256(&self.data) != e.sha256 {
            return Err(cerr(
                self,
                PackErrorKind::ChecksumMismatch("chunk data does not match its SHA-256".into()),
            ));
        }
        let d = &mut self.descs[ci];
        d.stored_bytes += e.clen as u64;
        d.zero_chunks += (e.codec == Codec::Zero) as u64;
        d.chunk_count += 1;
        self.next_seq += 1;
        let (section, offset, ulen) = (e.section, e.offset, e.ulen as usize);
        self.chunks.push(e);
        if self.skip {
            return Ok(None);
        }
        Ok(Some(Step::Chunk(section, offset, ulen)))
    }

    fn send(&mut self, off: u64, len: usize) -> Result<Option<Step>, PackError> {
        let Some(ci) = self.cur else {
            return Err(self.err(corrupt("section end outside a section")).at(off));
        };
        if len != SEND_BODY {
            return Err(self.in_section(corrupt("SEND frame has the wrong length"), off));
        }
        let mut frame = [0u8; FRAME_PREFIX + SEND_BODY];
        frame[0..4].copy_from_slice(&TAG_SEND);
        frame[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        self.read(&mut frame[FRAME_PREFIX..])?;
        let d = &self.descs[ci];
        if self.next_seq != d.expected_chunks()
            || frame != layout::encode_send(d.id, d.chunk_count, d.size)
        {
            return Err(self.in_section(
                corrupt("SEND frame does not match the section's chunks"),
                off,
            ));
        }
        let d = &mut self.descs[ci];
        d.send_offset = off;
        let id = d.id;
        self.cur = None;
        if self.skip {
            return Ok(None);
        }
        Ok(Some(Step::SectionEnd(id)))
    }

    fn index(&mut self, off: u64, len: usize) -> Result<Step, PackError> {
        if self.cur.is_some() {
            return Err(self.in_section(corrupt("index inside a section"), off));
        }
        let expect = layout::encode_index(&self.header, &self.descs, &self.chunks);
        let ierr = |s: &Self| {
            s.err(PackErrorKind::ChecksumMismatch(
                "index does not describe the data that precedes it".into(),
            ))
            .at(off)
        };
        if len + FRAME_PREFIX != expect.len() || expect[4..8] != (len as u32).to_le_bytes() {
            return Err(ierr(self));
        }
        let mut block = vec![0u8; 64 << 10];
        let mut at = FRAME_PREFIX;
        while at < expect.len() {
            let n = block.len().min(expect.len() - at);
            self.read(&mut block[..n])?;
            if block[..n] != expect[at..at + n] {
                return Err(ierr(self));
            }
            at += n;
        }
        let root = layout::sha256(&expect);
        let toff = self.pos;
        let mut t = [0u8; TRAILER_LEN];
        self.read(&mut t)?;
        if t != layout::encode_trailer(off, expect.len() as u64, &root) {
            return Err(self
                .err(corrupt("trailer does not match the index"))
                .at(toff));
        }
        let mut extra = [0u8; 1];
        loop {
            match self.r.read(&mut extra) {
                Ok(0) => break,
                Ok(_) => return Err(self.err(corrupt("data after the trailer")).at(self.pos)),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.err(PackErrorKind::Io(e)).at(self.pos)),
            }
        }
        self.done = Some(PackSummary {
            root_digest: root,
            bytes_written: self.pos,
            sections: self.descs.iter().map(SectDesc::info).collect(),
        });
        Ok(Step::End)
    }
}

enum Step {
    Section,
    Chunk(u32, u64, usize),
    SectionEnd(u32),
    End,
}
