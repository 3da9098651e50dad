//! The `.vmpack` container: one file holding named, chunked, checksummed sections.
//!
//! The byte layout is specified normatively in `docs/FORMAT.md`; this module is one
//! implementation of it. Writing is a single forward pass (works on pipes), reading is
//! either random access through the index at the end ([`PackReader`]) or a forward pass
//! ([`StreamReader`]).

mod codec;
mod error;
mod layout;
mod range;
mod reader;
mod skeleton;
mod source;
mod stream;
mod writer;

use std::fmt;
use std::str::FromStr;

pub use error::{PackError, PackErrorKind};
pub use layout::{MAX_SIGNATURES, MAX_SIGNATURE_LEN};
pub use range::SectionRange;
pub use reader::{ChunkFn, PackReader, VerifyReport};
pub use skeleton::Skeleton;
pub use source::{FileSource, SectionSource};
pub use stream::{StreamEvent, StreamReader};
pub use writer::PackWriter;

/// Major format version written by this implementation. Readers refuse other majors.
pub const FORMAT_MAJOR: u16 = 1;
/// Minor format version written by this implementation. Readers accept newer minors.
pub const FORMAT_MINOR: u16 = 0;

/// The first 8 bytes of every pack. The 0x89 byte and the `\n` catch 7-bit and
/// text-mode transfer damage, as in PNG.
pub const MAGIC: [u8; 8] = *b"\x89VMPACK\n";

/// Smallest chunk size accepted.
pub const MIN_CHUNK_SIZE: u32 = 512;
/// Largest chunk size accepted; bounds the memory any reader needs for one chunk.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Default chunk size.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Page size used by aligned mode.
pub const PAGE_SIZE: u64 = 4096;
/// Largest section name, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 255;
/// Largest serialized meta JSON object.
pub const MAX_META_LEN: usize = 64 << 10;
/// Largest number of sections in one pack.
pub const MAX_SECTIONS: u32 = 65536;

/// Section kinds. Kinds below 0x8000 are required: a reader that does not know one
/// refuses the pack. Kinds from 0x8000 up are optional: unknown ones are skipped.
pub mod kind {
    /// JSON manifest: pack metadata and the VM config.
    pub const MANIFEST: u16 = 1;
    /// A boot file (kernel, initrd, flat image).
    pub const FILE: u16 = 2;
    /// A disk image's guest-visible contents.
    pub const DISK: u16 = 3;
    /// Guest memory.
    pub const MEMORY: u16 = 4;
    /// Serialized VM/device/vCPU state.
    pub const VMSTATE: u16 = 5;
    /// Guest memory of a diff pack: only the chunks written since the parent pack, packed
    /// densely, with a bitmap in the meta saying where each goes (`vm::diff`).
    pub const MEMORY_DIFF: u16 = 6;
    /// A disk of a diff pack: only the chunks written since the parent pack, packed
    /// densely, with a bitmap in the meta saying where each goes (`vm::diff`).
    pub const DISK_DIFF: u16 = 7;

    /// First optional kind.
    pub const OPTIONAL_BASE: u16 = 0x8000;

    /// Kinds defined by the format version this crate implements.
    pub fn is_known(kind: u16) -> bool {
        matches!(
            kind,
            MANIFEST | FILE | DISK | MEMORY | VMSTATE | MEMORY_DIFF | DISK_DIFF
        )
    }

    /// Whether a reader may skip this kind when it does not know it.
    pub fn is_optional(kind: u16) -> bool {
        kind >= OPTIONAL_BASE
    }
}

/// Compression requested for a section's chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Deflate,
    Zstd,
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Compression::None),
            "deflate" => Ok(Compression::Deflate),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(format!(
                "unknown compression '{s}' (expected none, deflate or zstd)"
            )),
        }
    }
}

impl Compression {
    /// Checks a compression level: deflate 0–9, zstd −7..=22 except 0, and none takes no
    /// level. A level outside is an error, never clamped.
    pub fn check_level(self, level: Option<i32>) -> Result<(), String> {
        let Some(l) = level else { return Ok(()) };
        let ok = match self {
            Compression::None => false,
            Compression::Deflate => (0..=9).contains(&l),
            Compression::Zstd => (-7..=22).contains(&l) && l != 0,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "level {l} is not valid for {self} (deflate: 0-9, zstd: -7..=22 except 0, none: no level)"
            ))
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Deflate => "deflate",
            Compression::Zstd => "zstd",
        })
    }
}

/// How one chunk is stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Payload is the chunk's bytes.
    None,
    /// Payload is a raw deflate stream (RFC 1951, no zlib/gzip wrapper).
    Deflate,
    /// Payload is one zstd frame.
    Zstd,
    /// The chunk is all zero bytes; no payload.
    Zero,
}

impl Codec {
    pub fn to_u8(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Deflate => 1,
            Codec::Zstd => 2,
            Codec::Zero => 3,
        }
    }
    pub fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::None),
            1 => Some(Codec::Deflate),
            2 => Some(Codec::Zstd),
            3 => Some(Codec::Zero),
            _ => None,
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Codec::None => "none",
            Codec::Deflate => "deflate",
            Codec::Zstd => "zstd",
            Codec::Zero => "zero",
        })
    }
}

/// Options for [`PackWriter`].
#[derive(Clone, Debug)]
pub struct WriteOptions {
    pub compression: Compression,
    /// Compression level; `None` picks a fast default (deflate 1, zstd 1).
    pub level: Option<i32>,
    /// Keep every uncompressed chunk payload 4 KiB-aligned in the file (mmap-able).
    pub aligned: bool,
    /// Default chunk size for [`PackWriter::add_section`].
    pub chunk_size: u32,
    /// Worker threads for hashing/compression; 0 = available parallelism.
    pub threads: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            compression: Compression::Zstd,
            level: None,
            aligned: false,
            chunk_size: DEFAULT_CHUNK_SIZE,
            threads: 0,
        }
    }
}

/// Receives progress in uncompressed bytes.
pub trait Progress: Sync {
    fn advance(&self, bytes: u64);
}

impl Progress for () {
    fn advance(&self, _bytes: u64) {}
}

impl Progress for std::sync::atomic::AtomicU64 {
    fn advance(&self, bytes: u64) {
        self.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Description of one section, as stored in the index.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SectionInfo {
    pub id: u32,
    pub kind: u16,
    pub name: String,
    pub meta: serde_json::Value,
    /// Uncompressed size in bytes.
    pub size: u64,
    pub chunk_size: u32,
    /// Sum of the chunks' payload lengths in the file.
    pub stored_bytes: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
}

/// One chunk's index entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkEntry {
    pub section: u32,
    pub seq: u64,
    /// Offset of the chunk's first byte within the section.
    pub offset: u64,
    /// Uncompressed length.
    pub ulen: u32,
    pub codec: Codec,
    /// Payload length in the file (0 for [`Codec::Zero`]).
    pub clen: u32,
    /// File offset of the chunk's payload. For [`Codec::None`] chunks in an aligned pack
    /// this is a multiple of 4096, so the payload can be mmapped directly.
    pub payload_offset: u64,
    /// SHA-256 of the uncompressed bytes (all zero for [`Codec::Zero`]).
    pub sha256: [u8; 32],
    /// CRC-32 of the stored payload for compressed codecs; 0 for `None` and `Zero`.
    pub payload_crc32: u32,
}

impl ChunkEntry {
    /// File offset of the chunk's frame (its `CHNK` tag).
    pub fn frame_offset(&self) -> u64 {
        self.payload_offset - layout::CHNK_FRAME_HEADER as u64
    }
}

/// What [`PackWriter::finish`] (and a stream read's end) reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PackSummary {
    #[serde(with = "hex_digest")]
    pub root_digest: [u8; 32],
    pub bytes_written: u64,
    pub sections: Vec<SectionInfo>,
}

mod hex_digest {
    pub fn serialize<S: serde::Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(d))
    }
}

#[cfg(test)]
mod tests;
