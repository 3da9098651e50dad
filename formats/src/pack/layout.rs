//! Byte-level encoding of the structures described in docs/FORMAT.md.

use super::error::PackErrorKind;
use super::{
    kind, ChunkEntry, Codec, FORMAT_MAJOR, FORMAT_MINOR, MAGIC, MAX_CHUNK_SIZE, MAX_META_LEN,
    MAX_NAME_LEN, MIN_CHUNK_SIZE, PAGE_SIZE,
};
use sha2::{Digest, Sha256};

pub(crate) const HEADER_LEN: usize = 32;
pub(crate) const FRAME_PREFIX: usize = 8;
pub(crate) const SECT_FIXED: usize = 24;
pub(crate) const CHNK_FIXED: usize = 72;
pub(crate) const CHNK_FRAME_HEADER: usize = FRAME_PREFIX + CHNK_FIXED;
pub(crate) const SEND_BODY: usize = 24;
pub(crate) const SEND_FRAME_LEN: usize = FRAME_PREFIX + SEND_BODY;
pub(crate) const TRAILER_LEN: usize = 64;
pub(crate) const INDEX_FIXED: usize = 48;
pub(crate) const INDEX_SECTION_FIXED: usize = 56;
pub(crate) const INDEX_CHUNK: usize = 80;
/// Largest PAD frame body; aligned mode needs at most 4095 + 8.
pub(crate) const MAX_PAD: u32 = 1 << 20;
/// Largest SIGN frame body (one armored SSH signature is well under 2 KiB; RSA-16384 under 8).
pub const MAX_SIGNATURE_LEN: usize = 64 << 10;
/// Most SIGN frames one pack may carry.
pub const MAX_SIGNATURES: usize = 64;

pub(crate) const TAG_SECT: [u8; 4] = *b"SECT";
pub(crate) const TAG_CHNK: [u8; 4] = *b"CHNK";
pub(crate) const TAG_PAD: [u8; 4] = *b"PAD ";
pub(crate) const TAG_SEND: [u8; 4] = *b"SEND";
pub(crate) const TAG_INDX: [u8; 4] = *b"INDX";
pub(crate) const TAG_SIGN: [u8; 4] = *b"SIGN";
pub(crate) const TAG_TRLR: [u8; 4] = *b"TRLR";
pub(crate) const END_MAGIC: [u8; 8] = *b"\x89VMPEND\n";

/// Header flag: uncompressed chunk payloads are 4 KiB-aligned.
pub(crate) const FLAG_ALIGNED: u32 = 1;
/// Header flag: the pack's guest memory has overlay sections (a live save, FORMAT.md §12
/// "Live saves"); a reader that predates them refuses the pack instead of restoring the base.
pub(crate) const FLAG_OVERLAYS: u32 = 2;
/// Flag bits a reader must understand; bits 16..31 may be ignored.
const REQUIRED_FLAGS_MASK: u32 = 0xffff;

pub(crate) fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
pub(crate) fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
pub(crate) fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
pub(crate) fn digest_at(b: &[u8], o: usize) -> [u8; 32] {
    b[o..o + 32].try_into().unwrap()
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn corrupt(m: impl Into<String>) -> PackErrorKind {
    PackErrorKind::Corrupt(m.into())
}

pub(crate) fn encode_header(aligned: bool, overlays: bool) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&FORMAT_MAJOR.to_le_bytes());
    h[10..12].copy_from_slice(&FORMAT_MINOR.to_le_bytes());
    let flags = if aligned { FLAG_ALIGNED } else { 0 } | if overlays { FLAG_OVERLAYS } else { 0 };
    h[12..16].copy_from_slice(&flags.to_le_bytes());
    h
}

pub(crate) struct Header {
    pub major: u16,
    pub minor: u16,
    pub aligned: bool,
    pub overlays: bool,
}

pub(crate) fn parse_header(h: &[u8]) -> Result<Header, PackErrorKind> {
    if h[0..8] != MAGIC {
        return Err(PackErrorKind::BadMagic);
    }
    let major = u16_at(h, 8);
    let minor = u16_at(h, 10);
    if major != FORMAT_MAJOR {
        return Err(PackErrorKind::UnsupportedVersion { major, minor });
    }
    let flags = u32_at(h, 12);
    if flags & REQUIRED_FLAGS_MASK & !(FLAG_ALIGNED | FLAG_OVERLAYS) != 0 {
        return Err(corrupt(format!("unknown required header flags {flags:#x}")));
    }
    if h[16..32].iter().any(|&b| b != 0) {
        return Err(corrupt("header reserved bytes are not zero"));
    }
    Ok(Header {
        major,
        minor,
        aligned: flags & FLAG_ALIGNED != 0,
        overlays: flags & FLAG_OVERLAYS != 0,
    })
}

/// A section as recorded in the index, with everything needed to re-encode its frames.
#[derive(Clone, Debug)]
pub(crate) struct SectDesc {
    pub id: u32,
    pub kind: u16,
    pub chunk_size: u32,
    pub size: u64,
    pub name: String,
    pub meta_raw: Vec<u8>,
    pub meta: serde_json::Value,
    pub sect_offset: u64,
    pub send_offset: u64,
    pub chunk_count: u64,
    pub stored_bytes: u64,
    pub zero_chunks: u64,
}

impl SectDesc {
    pub fn info(&self) -> super::SectionInfo {
        super::SectionInfo {
            id: self.id,
            kind: self.kind,
            name: self.name.clone(),
            meta: self.meta.clone(),
            size: self.size,
            chunk_size: self.chunk_size,
            stored_bytes: self.stored_bytes,
            chunks: self.chunk_count,
            zero_chunks: self.zero_chunks,
        }
    }
    pub fn expected_chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size as u64)
    }
    pub fn ulen_of(&self, seq: u64) -> u32 {
        let off = seq * self.chunk_size as u64;
        (self.size - off).min(self.chunk_size as u64) as u32
    }
    fn encode_fixed(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.kind.to_le_bytes());
        out.push(self.name.len() as u8);
        out.push(0);
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&(self.meta_raw.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
    }
    pub fn encode_sect_frame(&self) -> Vec<u8> {
        let body = SECT_FIXED + self.name.len() + self.meta_raw.len();
        let mut out = Vec::with_capacity(FRAME_PREFIX + body);
        out.extend_from_slice(&TAG_SECT);
        out.extend_from_slice(&(body as u32).to_le_bytes());
        self.encode_fixed(&mut out);
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&self.meta_raw);
        out
    }
    pub fn encode_send_frame(&self) -> [u8; SEND_FRAME_LEN] {
        encode_send(self.id, self.chunk_count, self.size)
    }
}

pub(crate) fn encode_send(id: u32, chunks: u64, size: u64) -> [u8; SEND_FRAME_LEN] {
    let mut f = [0u8; SEND_FRAME_LEN];
    f[0..4].copy_from_slice(&TAG_SEND);
    f[4..8].copy_from_slice(&(SEND_BODY as u32).to_le_bytes());
    f[8..12].copy_from_slice(&id.to_le_bytes());
    f[16..24].copy_from_slice(&chunks.to_le_bytes());
    f[24..32].copy_from_slice(&size.to_le_bytes());
    f
}

/// Checks the rules every section must follow, whether read from a SECT frame or the index.
pub(crate) fn check_section_rules(
    kind_v: u16,
    chunk_size: u32,
    aligned: bool,
) -> Result<(), PackErrorKind> {
    if !kind::is_known(kind_v) && !kind::is_optional(kind_v) {
        return Err(PackErrorKind::UnknownRequiredKind(kind_v));
    }
    check_chunk_size(chunk_size, aligned)
}

pub(crate) fn check_chunk_size(chunk_size: u32, aligned: bool) -> Result<(), PackErrorKind> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(PackErrorKind::Limit(format!(
            "chunk size {chunk_size} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
        )));
    }
    if aligned && !(chunk_size as u64).is_multiple_of(PAGE_SIZE) {
        return Err(corrupt(format!(
            "chunk size {chunk_size} is not a multiple of {PAGE_SIZE} in an aligned pack"
        )));
    }
    Ok(())
}

pub(crate) fn check_name(name: &str) -> Result<(), PackErrorKind> {
    if name.len() > MAX_NAME_LEN {
        return Err(PackErrorKind::Limit(format!(
            "section name is {} bytes (max {MAX_NAME_LEN})",
            name.len()
        )));
    }
    // Names are printed by inspect and in messages: no terminal escapes.
    if name.chars().any(char::is_control) {
        return Err(PackErrorKind::Corrupt(format!(
            "section name '{}' contains control characters",
            name.escape_default()
        )));
    }
    Ok(())
}

pub(crate) fn parse_meta(raw: &[u8]) -> Result<serde_json::Value, PackErrorKind> {
    if raw.len() > MAX_META_LEN {
        return Err(PackErrorKind::Limit(format!(
            "meta is {} bytes (max {MAX_META_LEN})",
            raw.len()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|e| corrupt(format!("section meta is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(corrupt("section meta is not a JSON object"));
    }
    Ok(v)
}

/// Parses the fixed part (24 bytes) plus name and meta of a SECT body / index descriptor.
/// `rest` starts right after the fixed part; returns the descriptor and bytes consumed from `rest`.
pub(crate) fn parse_sect_fields(
    fixed: &[u8],
    rest: &[u8],
    aligned: bool,
) -> Result<(SectDesc, usize), PackErrorKind> {
    let id = u32_at(fixed, 0);
    let kind_v = u16_at(fixed, 4);
    let name_len = fixed[6] as usize;
    if fixed[7] != 0 {
        return Err(corrupt("section reserved byte is not zero"));
    }
    let chunk_size = u32_at(fixed, 8);
    let meta_len = u32_at(fixed, 12) as usize;
    let size = u64_at(fixed, 16);
    if meta_len > MAX_META_LEN {
        return Err(PackErrorKind::Limit(format!(
            "meta is {meta_len} bytes (max {MAX_META_LEN})"
        )));
    }
    if rest.len() < name_len + meta_len {
        return Err(corrupt(
            "section name/meta run past the end of the structure",
        ));
    }
    let name = std::str::from_utf8(&rest[..name_len])
        .map_err(|_| corrupt("section name is not UTF-8"))?
        .to_string();
    check_name(&name)?;
    let meta_raw = rest[name_len..name_len + meta_len].to_vec();
    let meta = parse_meta(&meta_raw)?;
    check_section_rules(kind_v, chunk_size, aligned)?;
    Ok((
        SectDesc {
            id,
            kind: kind_v,
            chunk_size,
            size,
            name,
            meta_raw,
            meta,
            sect_offset: 0,
            send_offset: 0,
            chunk_count: 0,
            stored_bytes: 0,
            zero_chunks: 0,
        },
        name_len + meta_len,
    ))
}

pub(crate) fn encode_chunk_fixed(e: &ChunkEntry, out: &mut [u8]) {
    out[0..4].copy_from_slice(&e.section.to_le_bytes());
    out[4] = e.codec.to_u8();
    out[5..8].fill(0);
    out[8..12].copy_from_slice(&e.ulen.to_le_bytes());
    out[12..16].copy_from_slice(&e.clen.to_le_bytes());
    out[16..24].copy_from_slice(&e.seq.to_le_bytes());
    out[24..32].copy_from_slice(&e.offset.to_le_bytes());
    out[32..64].copy_from_slice(&e.sha256);
    out[64..68].copy_from_slice(&e.payload_crc32.to_le_bytes());
    out[68..72].fill(0);
}

pub(crate) fn encode_chunk_header(e: &ChunkEntry) -> [u8; CHNK_FRAME_HEADER] {
    let mut h = [0u8; CHNK_FRAME_HEADER];
    h[0..4].copy_from_slice(&TAG_CHNK);
    h[4..8].copy_from_slice(&((CHNK_FIXED as u32) + e.clen).to_le_bytes());
    encode_chunk_fixed(e, &mut h[8..]);
    h
}

/// CRC-32 (IEEE 802.3, as in gzip) of a compressed payload. The SHA-256 covers the
/// decoded bytes only; this catches flips in bits a decoder ignores (deflate padding).
pub(crate) fn crc32(data: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(data);
    c.sum()
}

/// Parses the 72-byte fixed part of a CHNK frame (or index entry). `payload_offset` is
/// supplied by the caller. Checks codec-local rules only (codec value, clen vs ulen, zero hash).
pub(crate) fn parse_chunk_fixed(
    b: &[u8],
    payload_offset: u64,
) -> Result<ChunkEntry, PackErrorKind> {
    let codec = Codec::from_u8(b[4]).ok_or_else(|| corrupt(format!("unknown codec {}", b[4])))?;
    if b[5..8].iter().any(|&x| x != 0) || b[68..72].iter().any(|&x| x != 0) {
        return Err(corrupt("chunk reserved bytes are not zero"));
    }
    let e = ChunkEntry {
        section: u32_at(b, 0),
        codec,
        ulen: u32_at(b, 8),
        clen: u32_at(b, 12),
        seq: u64_at(b, 16),
        offset: u64_at(b, 24),
        sha256: digest_at(b, 32),
        payload_crc32: u32_at(b, 64),
        payload_offset,
    };
    match codec {
        Codec::None if e.clen != e.ulen || e.payload_crc32 != 0 => {
            return Err(corrupt(
                "uncompressed chunk with clen != ulen or a payload CRC",
            ))
        }
        Codec::Zero if e.clen != 0 || e.sha256 != [0; 32] || e.payload_crc32 != 0 => {
            return Err(corrupt("zero chunk with a payload or a digest"))
        }
        Codec::Deflate | Codec::Zstd if e.clen == 0 || e.clen >= e.ulen => {
            return Err(corrupt("compressed chunk not smaller than its data"))
        }
        _ => {}
    }
    Ok(e)
}

/// Checks a chunk's position fields against its section.
pub(crate) fn check_chunk_in_section(
    e: &ChunkEntry,
    s: &SectDesc,
    seq: u64,
    aligned: bool,
) -> Result<(), PackErrorKind> {
    if e.section != s.id || e.seq != seq {
        return Err(corrupt(format!(
            "chunk out of order (expected section {} chunk {seq}, found section {} chunk {})",
            s.id, e.section, e.seq
        )));
    }
    if seq >= s.expected_chunks() {
        return Err(corrupt("more chunks than the section size needs"));
    }
    if e.offset != seq * s.chunk_size as u64 || e.ulen != s.ulen_of(seq) {
        return Err(corrupt(format!(
            "chunk offset/length {}+{} do not match the section layout",
            e.offset, e.ulen
        )));
    }
    if aligned && e.codec == Codec::None && !e.payload_offset.is_multiple_of(PAGE_SIZE) {
        return Err(corrupt(format!(
            "uncompressed payload at {} is not 4 KiB-aligned in an aligned pack",
            e.payload_offset
        )));
    }
    Ok(())
}

/// The full INDX frame for the given pack contents.
pub(crate) fn encode_index(header: &[u8], sections: &[SectDesc], chunks: &[ChunkEntry]) -> Vec<u8> {
    let mut body_len = INDEX_FIXED + chunks.len() * INDEX_CHUNK;
    for s in sections {
        body_len += INDEX_SECTION_FIXED + s.name.len() + s.meta_raw.len();
    }
    let mut out = Vec::with_capacity(FRAME_PREFIX + body_len);
    out.extend_from_slice(&TAG_INDX);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&sha256(header));
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(chunks.len() as u64).to_le_bytes());
    for s in sections {
        s.encode_fixed(&mut out);
        out.extend_from_slice(&s.sect_offset.to_le_bytes());
        out.extend_from_slice(&s.send_offset.to_le_bytes());
        out.extend_from_slice(&s.chunk_count.to_le_bytes());
        out.extend_from_slice(&s.stored_bytes.to_le_bytes());
        out.extend_from_slice(s.name.as_bytes());
        out.extend_from_slice(&s.meta_raw);
    }
    let mut buf = [0u8; INDEX_CHUNK];
    for e in chunks {
        encode_chunk_fixed(e, &mut buf[..CHNK_FIXED]);
        buf[72..80].copy_from_slice(&e.frame_offset().to_le_bytes());
        out.extend_from_slice(&buf);
    }
    debug_assert_eq!(out.len(), FRAME_PREFIX + body_len);
    out
}

/// Largest index body the u32 frame length can express.
pub(crate) fn index_fits(sections: &[SectDesc], chunks: usize) -> bool {
    let mut body = INDEX_FIXED as u64 + chunks as u64 * INDEX_CHUNK as u64;
    for s in sections {
        body += (INDEX_SECTION_FIXED + s.name.len() + s.meta_raw.len()) as u64;
    }
    body <= u32::MAX as u64
}

pub(crate) fn encode_trailer(
    index_offset: u64,
    index_len: u64,
    root: &[u8; 32],
) -> [u8; TRAILER_LEN] {
    let mut t = [0u8; TRAILER_LEN];
    t[0..4].copy_from_slice(&TAG_TRLR);
    t[8..16].copy_from_slice(&index_offset.to_le_bytes());
    t[16..24].copy_from_slice(&index_len.to_le_bytes());
    t[24..56].copy_from_slice(root);
    t[56..64].copy_from_slice(&END_MAGIC);
    t
}

pub(crate) struct Trailer {
    pub index_offset: u64,
    pub index_len: u64,
    pub root: [u8; 32],
}

pub(crate) fn parse_trailer(t: &[u8]) -> Result<Trailer, PackErrorKind> {
    if t[0..4] != TAG_TRLR || t[56..64] != END_MAGIC {
        return Err(corrupt(
            "no trailer at the end of the file (truncated or not a pack)",
        ));
    }
    if t[4..8].iter().any(|&b| b != 0) {
        return Err(corrupt("trailer reserved bytes are not zero"));
    }
    Ok(Trailer {
        index_offset: u64_at(t, 8),
        index_len: u64_at(t, 16),
        root: digest_at(t, 24),
    })
}

/// Fast all-zero test: ORs 16-byte words, checking a block at a time so non-zero data
/// (the common case) exits early.
pub(crate) fn is_zero(data: &[u8]) -> bool {
    let (pre, mid, post) = unsafe { data.align_to::<u128>() };
    if pre.iter().any(|&b| b != 0) || post.iter().any(|&b| b != 0) {
        return false;
    }
    for block in mid.chunks(32) {
        if block.iter().fold(0u128, |a, &w| a | w) != 0 {
            return false;
        }
    }
    true
}
