//! A pack's skeleton: everything except the chunk payloads (the header, the index, the
//! signatures and where they sit). The skeleton plus the payloads rebuild the file byte for
//! byte (docs/FORMAT.md §13), which is how a pack travels through an OCI registry as
//! separate blobs and comes back identical. Also the `SIGN` frames: signatures kept in a
//! pack without changing its root digest (§3.6).

use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;

use super::error::{PackError, PackErrorKind};
use super::layout::{
    self, encode_chunk_header, u32_at, SectDesc, FRAME_PREFIX, HEADER_LEN, MAX_PAD, MAX_SIGNATURES,
    MAX_SIGNATURE_LEN, SEND_FRAME_LEN, TAG_INDX, TAG_PAD, TAG_SIGN, TRAILER_LEN,
};
use super::reader::parse_index;
use super::{ChunkEntry, Codec, SectionInfo};

fn corrupt(m: impl Into<String>) -> PackErrorKind {
    PackErrorKind::Corrupt(m.into())
}

/// What lies between the end of the last section and the index: zero-filled `PAD` frames,
/// then `SIGN` frames ending exactly at the index.
pub(crate) struct Tail {
    /// File offset of the first `SIGN` frame (= the index offset when there is none).
    pub sign_start: u64,
    pub signatures: Vec<Vec<u8>>,
}

/// Reads and checks the frames in `[from, to)` of `file` (see [`Tail`]).
pub(crate) fn scan_tail(file: &File, name: &str, from: u64, to: u64) -> Result<Tail, PackError> {
    let err = |k: PackErrorKind, off: u64| PackError::new(name, k).at(off);
    let mut pos = from;
    let mut sign_start = None;
    let mut signatures = Vec::new();
    while pos < to {
        if to - pos < FRAME_PREFIX as u64 {
            return Err(err(corrupt("unaccounted bytes before the index"), pos));
        }
        let mut p = [0u8; FRAME_PREFIX];
        file.read_exact_at(&mut p, pos)
            .map_err(|x| err(PackErrorKind::Io(x), pos))?;
        let n = u32_at(&p, 4) as u64;
        let body = pos + FRAME_PREFIX as u64;
        if body + n > to {
            return Err(err(corrupt("frame runs into the index"), pos));
        }
        match p[0..4].try_into().unwrap() {
            TAG_PAD if sign_start.is_none() => {
                if n > MAX_PAD as u64 {
                    return Err(err(corrupt("PAD frame too long"), pos));
                }
                let mut buf = vec![0u8; n as usize];
                file.read_exact_at(&mut buf, body)
                    .map_err(|x| err(PackErrorKind::Io(x), pos))?;
                if !layout::is_zero(&buf) {
                    return Err(err(corrupt("PAD frame contains non-zero bytes"), pos));
                }
            }
            TAG_SIGN => {
                if n as usize > MAX_SIGNATURE_LEN || signatures.len() >= MAX_SIGNATURES {
                    return Err(err(
                        PackErrorKind::Limit(format!(
                            "SIGN frame of {n} bytes or more than {MAX_SIGNATURES} of them \
                             (max {MAX_SIGNATURE_LEN} bytes each)"
                        )),
                        pos,
                    ));
                }
                let mut buf = vec![0u8; n as usize];
                file.read_exact_at(&mut buf, body)
                    .map_err(|x| err(PackErrorKind::Io(x), pos))?;
                sign_start.get_or_insert(pos);
                signatures.push(buf);
            }
            _ => {
                return Err(err(
                    corrupt("unexpected bytes before the index (expected PAD or SIGN frames)"),
                    pos,
                ))
            }
        }
        pos = body + n;
    }
    Ok(Tail {
        sign_start: sign_start.unwrap_or(to),
        signatures,
    })
}

/// Length of the `PAD` frame that fills `gap` bytes in a canonical layout, if one can.
fn canonical_pad(gap: u64) -> Option<u32> {
    match gap {
        0 => Some(0),
        g if g >= FRAME_PREFIX as u64 && g - FRAME_PREFIX as u64 <= MAX_PAD as u64 => {
            Some((g - FRAME_PREFIX as u64) as u32)
        }
        _ => None,
    }
}

/// Everything of a pack but its chunk payloads; see the module doc.
#[derive(Clone, Debug)]
pub struct Skeleton {
    header: [u8; HEADER_LEN],
    index_frame: Vec<u8>,
    index_offset: u64,
    signatures: Vec<Vec<u8>>,
    root: [u8; 32],
    descs: Vec<SectDesc>,
    infos: Vec<SectionInfo>,
    chunks: Vec<ChunkEntry>,
    ranges: Vec<Range<usize>>,
}

impl Skeleton {
    /// Checks a skeleton received from elsewhere (e.g. a registry) against every rule a
    /// random-access reader applies, and that the layout it implies is canonical (§13).
    /// `name` labels errors.
    pub fn new(
        name: &str,
        header: [u8; HEADER_LEN],
        index_frame: Vec<u8>,
        index_offset: u64,
        signatures: Vec<Vec<u8>>,
    ) -> Result<Skeleton, PackError> {
        let e = |k: PackErrorKind| PackError::new(name, k);
        let h = layout::parse_header(&header).map_err(|k| e(k).at(0))?;
        if index_frame.len() < FRAME_PREFIX || index_frame[0..4] != TAG_INDX {
            return Err(e(corrupt("the index is not an INDX frame")).at(index_offset));
        }
        if index_frame.len() as u64 > u32::MAX as u64 + FRAME_PREFIX as u64 {
            return Err(e(PackErrorKind::Limit("index over 4 GiB".into())));
        }
        if signatures.len() > MAX_SIGNATURES
            || signatures.iter().any(|s| s.len() > MAX_SIGNATURE_LEN)
        {
            return Err(e(PackErrorKind::Limit(format!(
                "more than {MAX_SIGNATURES} signatures or one over {MAX_SIGNATURE_LEN} bytes"
            ))));
        }
        let (descs, chunks, ranges) =
            parse_index(name, &index_frame, &header, h.aligned, index_offset)?;
        let root = layout::sha256(&index_frame);
        let infos = descs.iter().map(SectDesc::info).collect();
        let s = Skeleton {
            header,
            index_frame,
            index_offset,
            signatures,
            root,
            descs,
            infos,
            chunks,
            ranges,
        };
        let sig_len: u64 = s.signatures_len();
        let data_end = s.data_end();
        let gap = index_offset
            .checked_sub(sig_len)
            .and_then(|start| start.checked_sub(data_end))
            .ok_or_else(|| e(corrupt("signatures overlap the last section")).at(data_end))?;
        if canonical_pad(gap).is_none() {
            return Err(e(corrupt(format!(
                "{gap} bytes between the last section and the signatures cannot be one PAD frame"
            )))
            .at(data_end));
        }
        s.check_canonical(name)?;
        Ok(s)
    }

    pub(crate) fn from_parts(
        header: [u8; HEADER_LEN],
        index_frame: Vec<u8>,
        index_offset: u64,
        signatures: Vec<Vec<u8>>,
        descs: Vec<SectDesc>,
        chunks: Vec<ChunkEntry>,
        ranges: Vec<Range<usize>>,
    ) -> Skeleton {
        Skeleton {
            root: layout::sha256(&index_frame),
            infos: descs.iter().map(SectDesc::info).collect(),
            header,
            index_frame,
            index_offset,
            signatures,
            descs,
            chunks,
            ranges,
        }
    }

    /// End of the last `SEND` frame (or of the header).
    fn data_end(&self) -> u64 {
        self.descs
            .last()
            .map_or(HEADER_LEN as u64, |d| d.send_offset + SEND_FRAME_LEN as u64)
    }

    fn signatures_len(&self) -> u64 {
        self.signatures
            .iter()
            .map(|s| (FRAME_PREFIX + s.len()) as u64)
            .sum()
    }

    /// Every gap between consecutive frames must be fillable by one PAD frame.
    pub(crate) fn check_canonical(&self, name: &str) -> Result<(), PackError> {
        let mut bad = None;
        self.walk(&mut |from, to| {
            if bad.is_none() && canonical_pad(to - from).is_none() {
                bad = Some(from);
            }
        })
        .map_err(|k| PackError::new(name, k))?;
        match bad {
            Some(off) => Err(PackError::new(
                name,
                corrupt("padding between frames is not one PAD frame (not a canonical layout)"),
            )
            .at(off)),
            None => Ok(()),
        }
    }

    /// Calls `gap(from, to)` for every space between frames, in file order.
    fn walk(&self, gap: &mut dyn FnMut(u64, u64)) -> Result<(), PackErrorKind> {
        let mut cursor = HEADER_LEN as u64;
        let mut step = |cursor: &mut u64, at: u64, len: u64| -> Result<(), PackErrorKind> {
            if at < *cursor {
                return Err(corrupt("frames overlap"));
            }
            gap(*cursor, at);
            *cursor = at + len;
            Ok(())
        };
        for (i, d) in self.descs.iter().enumerate() {
            let sect_len =
                (FRAME_PREFIX + layout::SECT_FIXED + d.name.len() + d.meta_raw.len()) as u64;
            step(&mut cursor, d.sect_offset, sect_len)?;
            for c in &self.chunks[self.ranges[i].clone()] {
                step(
                    &mut cursor,
                    c.frame_offset(),
                    layout::CHNK_FRAME_HEADER as u64 + c.clen as u64,
                )?;
            }
            step(&mut cursor, d.send_offset, SEND_FRAME_LEN as u64)?;
        }
        let sig_start = self.index_offset - self.signatures_len();
        step(&mut cursor, sig_start, self.signatures_len())?;
        Ok(())
    }

    /// The 32 header bytes.
    pub fn header(&self) -> &[u8; HEADER_LEN] {
        &self.header
    }
    /// The whole `INDX` frame; its SHA-256 is the root digest.
    pub fn index_frame(&self) -> &[u8] {
        &self.index_frame
    }
    /// File offset of the `INDX` frame.
    pub fn index_offset(&self) -> u64 {
        self.index_offset
    }
    /// Bodies of the `SIGN` frames, in file order.
    pub fn signatures(&self) -> &[Vec<u8>] {
        &self.signatures
    }
    pub fn root_digest(&self) -> [u8; 32] {
        self.root
    }
    /// Size of the file [`Skeleton::write_pack`] writes.
    pub fn file_size(&self) -> u64 {
        self.index_offset + self.index_frame.len() as u64 + TRAILER_LEN as u64
    }
    pub fn sections(&self) -> &[SectionInfo] {
        &self.infos
    }
    /// Every chunk, in file order.
    pub fn chunks(&self) -> &[ChunkEntry] {
        &self.chunks
    }
    /// The name of section `id` (for messages).
    pub fn section_name(&self, id: u32) -> &str {
        self.descs.get(id as usize).map_or("?", |d| d.name.as_str())
    }

    /// The same pack with other signatures: the `SIGN` frames move, the index follows them,
    /// the root digest stays.
    pub fn with_signatures(&self, signatures: Vec<Vec<u8>>) -> Result<Skeleton, PackError> {
        let old_start = self.index_offset - self.signatures_len();
        let new_len: u64 = signatures
            .iter()
            .map(|s| (FRAME_PREFIX + s.len()) as u64)
            .sum();
        Skeleton::new(
            "<signed pack>",
            self.header,
            self.index_frame.clone(),
            old_start + new_len,
            signatures,
        )
    }

    /// Writes the whole pack: `payload(chunk, out)` must write exactly the chunk's stored
    /// payload (`clen` bytes; it is not called for zero chunks). Returns the bytes written.
    pub fn write_pack(
        &self,
        out: &mut dyn Write,
        payload: &mut dyn FnMut(&ChunkEntry, &mut dyn Write) -> io::Result<()>,
    ) -> Result<u64, PackError> {
        let name = "<output>";
        let mut w = Counting { inner: out, n: 0 };
        let io_err = |x: io::Error, at: u64| PackError::new(name, PackErrorKind::Io(x)).at(at);
        let pad = |w: &mut Counting, to: u64| -> Result<(), PackError> {
            let at = w.n;
            let body = to
                .checked_sub(at)
                .and_then(canonical_pad)
                .ok_or_else(|| PackError::new(name, corrupt("non-canonical gap")).at(at))?;
            if to > at {
                w.write_all(&TAG_PAD)
                    .and_then(|_| w.write_all(&body.to_le_bytes()))
                    .and_then(|_| {
                        io::copy(&mut io::Read::take(io::repeat(0), body as u64), w).map(|_| ())
                    })
                    .map_err(|x| io_err(x, at))?;
            }
            Ok(())
        };
        w.write_all(&self.header).map_err(|x| io_err(x, 0))?;
        for (i, d) in self.descs.iter().enumerate() {
            pad(&mut w, d.sect_offset)?;
            w.write_all(&d.encode_sect_frame())
                .map_err(|x| io_err(x, d.sect_offset))?;
            for c in &self.chunks[self.ranges[i].clone()] {
                pad(&mut w, c.frame_offset())?;
                w.write_all(&encode_chunk_header(c))
                    .map_err(|x| io_err(x, c.frame_offset()))?;
                if c.codec != Codec::Zero {
                    let before = w.n;
                    payload(c, &mut w)
                        .map_err(|x| io_err(x, c.payload_offset).section(&d.name).chunk(c.seq))?;
                    if w.n - before != c.clen as u64 {
                        return Err(PackError::new(
                            name,
                            PackErrorKind::InvalidArgument(format!(
                                "payload source gave {} bytes for a {}-byte payload",
                                w.n - before,
                                c.clen
                            )),
                        )
                        .section(&d.name)
                        .chunk(c.seq));
                    }
                }
            }
            pad(&mut w, d.send_offset)?;
            w.write_all(&d.encode_send_frame())
                .map_err(|x| io_err(x, d.send_offset))?;
        }
        pad(&mut w, self.index_offset - self.signatures_len())?;
        for s in &self.signatures {
            let at = w.n;
            w.write_all(&TAG_SIGN)
                .and_then(|_| w.write_all(&(s.len() as u32).to_le_bytes()))
                .and_then(|_| w.write_all(s))
                .map_err(|x| io_err(x, at))?;
        }
        debug_assert_eq!(w.n, self.index_offset);
        w.write_all(&self.index_frame)
            .map_err(|x| io_err(x, self.index_offset))?;
        let t =
            layout::encode_trailer(self.index_offset, self.index_frame.len() as u64, &self.root);
        w.write_all(&t).map_err(|x| io_err(x, w.n))?;
        w.flush().map_err(|x| io_err(x, w.n))?;
        Ok(w.n)
    }
}

struct Counting<'a> {
    inner: &'a mut dyn Write,
    n: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(b)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
