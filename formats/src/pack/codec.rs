//! Per-chunk compression and bounded decompression.

use super::error::PackErrorKind;
use super::{Codec, Compression};
use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

/// A reusable per-thread compressor.
pub(crate) enum Compressor {
    None,
    Deflate(Box<Compress>),
    Zstd(Box<zstd::zstd_safe::CCtx<'static>>),
}

/// zstd's own constructors panic when the context cannot be allocated; these say so.
fn zstd_context_error(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::OutOfMemory,
        format!("cannot create a zstd {what} context (out of memory)"),
    )
}

impl Compressor {
    pub fn new(c: Compression, level: Option<i32>) -> std::io::Result<Self> {
        Ok(match c {
            Compression::None => Compressor::None,
            Compression::Deflate => {
                let lvl = level.unwrap_or(1).clamp(0, 9) as u32;
                Compressor::Deflate(Box::new(Compress::new(
                    flate2::Compression::new(lvl),
                    false,
                )))
            }
            Compression::Zstd => {
                let lvl = level.unwrap_or(1);
                let mut c = zstd::zstd_safe::CCtx::try_create()
                    .ok_or_else(|| zstd_context_error("compression"))?;
                c.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(lvl))
                    .map_err(|code| {
                        std::io::Error::other(format!(
                            "zstd level {lvl}: {}",
                            zstd::zstd_safe::get_error_name(code)
                        ))
                    })?;
                Compressor::Zstd(Box::new(c))
            }
        })
    }

    /// Compresses `data` into `out` (cleared first). Returns the codec used: when
    /// compression does not make the chunk smaller it is stored as `None` and `out` is unused.
    pub fn compress(&mut self, data: &[u8], out: &mut Vec<u8>) -> std::io::Result<Codec> {
        out.clear();
        // Only a strictly smaller result is worth storing compressed.
        let cap = data.len().saturating_sub(1);
        if cap == 0 {
            return Ok(Codec::None);
        }
        out.reserve(cap);
        match self {
            Compressor::None => Ok(Codec::None),
            Compressor::Deflate(c) => {
                c.reset();
                let st = c
                    .compress_vec(data, out, FlushCompress::Finish)
                    .map_err(std::io::Error::other)?;
                // compress_vec never grows `out` past its capacity, so a full buffer
                // without StreamEnd means the data did not shrink.
                if st == Status::StreamEnd
                    && (c.total_in() as usize) == data.len()
                    && out.len() < data.len()
                {
                    Ok(Codec::Deflate)
                } else {
                    Ok(Codec::None)
                }
            }
            Compressor::Zstd(c) => {
                out.resize(cap, 0);
                match c.compress2(&mut out[..], data) {
                    Ok(n) => {
                        out.truncate(n);
                        Ok(Codec::Zstd)
                    }
                    // Destination too small: incompressible data.
                    Err(_) => Ok(Codec::None),
                }
            }
        }
    }
}

/// Resizes a chunk buffer to `n` bytes; short of memory, an error instead of the abort a
/// plain `resize` would be.
pub(crate) fn sized(buf: &mut Vec<u8>, n: usize) -> Result<(), PackErrorKind> {
    buf.try_reserve_exact(n.saturating_sub(buf.len()))
        .map_err(|e| {
            PackErrorKind::Io(std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!("cannot allocate a {n}-byte chunk buffer: {e}"),
            ))
        })?;
    buf.resize(n, 0);
    Ok(())
}

/// Decodes `payload` into exactly `out.len()` bytes; anything producing more or fewer
/// bytes, or leaving input unused, is an error. Never allocates based on the payload.
pub(crate) fn decompress(
    codec: Codec,
    payload: &[u8],
    out: &mut [u8],
) -> Result<(), PackErrorKind> {
    let bad = |m: String| PackErrorKind::Decompress(m);
    match codec {
        Codec::None => {
            if payload.len() != out.len() {
                return Err(bad("stored length differs from declared length".into()));
            }
            out.copy_from_slice(payload);
            Ok(())
        }
        Codec::Zero => {
            out.fill(0);
            Ok(())
        }
        Codec::Deflate => {
            let mut d = Decompress::new(false);
            let st = d
                .decompress(payload, out, FlushDecompress::Finish)
                .map_err(|e| bad(format!("deflate: {e}")))?;
            if st != Status::StreamEnd {
                return Err(bad(format!(
                    "deflate stream does not end within the declared {} bytes",
                    out.len()
                )));
            }
            if d.total_out() as usize != out.len() || d.total_in() as usize != payload.len() {
                return Err(bad(format!(
                    "deflate stream decodes to {} bytes from {} of {} input bytes (declared {})",
                    d.total_out(),
                    d.total_in(),
                    payload.len(),
                    out.len()
                )));
            }
            Ok(())
        }
        Codec::Zstd => {
            let mut d = zstd::zstd_safe::DCtx::try_create()
                .ok_or_else(|| PackErrorKind::Io(zstd_context_error("decompression")))?;
            let n = d.decompress(out, payload).map_err(|code| {
                bad(format!(
                    "zstd (declared {} bytes): {}",
                    out.len(),
                    zstd::zstd_safe::get_error_name(code)
                ))
            })?;
            if n != out.len() {
                return Err(bad(format!(
                    "zstd frame decodes to {n} bytes, declared {}",
                    out.len()
                )));
            }
            Ok(())
        }
    }
}
