use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::sync::{mpsc, Mutex};

use super::codec::Compressor;
use super::error::{PackError, PackErrorKind};
use super::layout::{self, SectDesc, CHNK_FRAME_HEADER, FRAME_PREFIX, TAG_PAD};
use super::source::SectionSource;
use super::{
    ChunkEntry, Codec, Compression, PackSummary, Progress, WriteOptions, MAX_META_LEN,
    MAX_SECTIONS, PAGE_SIZE,
};

/// Bytes of chunk buffers the writer keeps in flight per section, at most.
const MAX_IN_FLIGHT_BYTES: u64 = 512 << 20;

/// Writes a pack in one forward pass; `out` never needs to seek (pipes work).
pub struct PackWriter<W: Write> {
    out: BufWriter<W>,
    pos: u64,
    opts: WriteOptions,
    threads: usize,
    header: [u8; layout::HEADER_LEN],
    sections: Vec<SectDesc>,
    chunks: Vec<ChunkEntry>,
    name: String,
    /// Set once a write failed mid-structure: the output is unusable from then on.
    failed: bool,
}

struct Job {
    seq: u64,
    off: u64,
    ulen: u32,
    buf: Vec<u8>,
    cbuf: Vec<u8>,
}

struct Done {
    seq: u64,
    ulen: u32,
    codec: Codec,
    sha256: [u8; 32],
    crc: u32,
    buf: Vec<u8>,
    cbuf: Vec<u8>,
}

impl<W: Write> PackWriter<W> {
    pub fn new(out: W, opts: WriteOptions) -> Result<Self, PackError> {
        let name = "<output>".to_string();
        layout::check_chunk_size(opts.chunk_size, opts.aligned)
            .map_err(|k| PackError::new(&name, invalid(k)))?;
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            opts.threads
        };
        let header = layout::encode_header(opts.aligned);
        let mut w = PackWriter {
            out: BufWriter::with_capacity(256 << 10, out),
            pos: 0,
            opts,
            threads,
            header,
            sections: Vec::new(),
            chunks: Vec::new(),
            name,
            failed: false,
        };
        w.put(&header)?;
        Ok(w)
    }

    /// Names the output in error messages (default `<output>`).
    pub fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }

    pub fn bytes_written(&self) -> u64 {
        self.pos
    }

    pub fn options(&self) -> &WriteOptions {
        &self.opts
    }

    fn err(&self, kind: PackErrorKind) -> PackError {
        PackError::new(&self.name, kind)
    }

    fn put(&mut self, b: &[u8]) -> Result<(), PackError> {
        if let Err(e) = self.out.write_all(b) {
            self.failed = true;
            return Err(self.err(PackErrorKind::Io(e)).at(self.pos));
        }
        self.pos += b.len() as u64;
        Ok(())
    }

    /// Adds a section with the writer's default chunk size and compression.
    pub fn add_section(
        &mut self,
        kind: u16,
        name: &str,
        meta: serde_json::Value,
        src: &dyn SectionSource,
        progress: &dyn Progress,
    ) -> Result<u32, PackError> {
        let (cs, c) = (self.opts.chunk_size, self.opts.compression);
        self.add_section_with(kind, name, meta, src, cs, c, progress)
    }

    /// Adds a section with its own chunk size and compression. Returns the section id.
    #[allow(clippy::too_many_arguments)]
    pub fn add_section_with(
        &mut self,
        kind: u16,
        name: &str,
        meta: serde_json::Value,
        src: &dyn SectionSource,
        chunk_size: u32,
        compression: Compression,
        progress: &dyn Progress,
    ) -> Result<u32, PackError> {
        if self.failed {
            return Err(self.err(PackErrorKind::InvalidArgument(
                "an earlier write failed; the pack is incomplete".into(),
            )));
        }
        let bad =
            |m: String| PackError::new(&self.name, PackErrorKind::InvalidArgument(m)).section(name);
        layout::check_name(name).map_err(|k| bad(k.to_string()))?;
        layout::check_chunk_size(chunk_size, self.opts.aligned).map_err(|k| bad(k.to_string()))?;
        if self.sections.len() as u64 >= MAX_SECTIONS as u64 {
            return Err(bad(format!("too many sections (max {MAX_SECTIONS})")));
        }
        if self.sections.iter().any(|s| s.name == name) {
            return Err(bad("duplicate section name".into()));
        }
        if !meta.is_object() {
            return Err(bad("section meta must be a JSON object".into()));
        }
        let meta_raw = serde_json::to_vec(&meta).map_err(|e| bad(e.to_string()))?;
        if meta_raw.len() > MAX_META_LEN {
            return Err(bad(format!(
                "section meta is {} bytes (max {MAX_META_LEN})",
                meta_raw.len()
            )));
        }
        let size = src.len();
        let ranges = src
            .data_ranges()
            .map_err(|e| self.err(PackErrorKind::Io(e)).section(name))?;
        let id = self.sections.len() as u32;
        let mut desc = SectDesc {
            id,
            kind,
            chunk_size,
            size,
            name: name.to_string(),
            meta_raw,
            meta,
            sect_offset: self.pos,
            send_offset: 0,
            chunk_count: 0,
            stored_bytes: 0,
            zero_chunks: 0,
        };
        let frame = desc.encode_sect_frame();
        self.put(&frame)?;
        let first_chunk = self.chunks.len();
        if let Err(e) = self.write_chunks(&mut desc, src, &ranges, compression, progress) {
            self.failed = true;
            self.chunks.truncate(first_chunk);
            return Err(e);
        }
        desc.send_offset = self.pos;
        let send = desc.encode_send_frame();
        self.put(&send)?;
        self.sections.push(desc);
        Ok(id)
    }

    fn write_chunks(
        &mut self,
        desc: &mut SectDesc,
        src: &dyn SectionSource,
        ranges: &[Range<u64>],
        compression: Compression,
        progress: &dyn Progress,
    ) -> Result<(), PackError> {
        let n = desc.expected_chunks();
        if n == 0 {
            return Ok(());
        }
        let cs = desc.chunk_size as u64;
        let window = (self.threads as u64 * 2 + 2)
            .min(MAX_IN_FLIGHT_BYTES / (2 * cs))
            .max(2);
        let level = self.opts.level;
        let threads = self.threads.min(n as usize).max(1);
        let sec_name = desc.name.clone();
        let file_name = self.name.clone();
        let mut range_idx = 0usize;
        // Whether [off, off+len) intersects a data range; chunks are visited in order,
        // so the range cursor only moves forward.
        let mut has_data = |off: u64, len: u64| -> bool {
            while range_idx < ranges.len() && ranges[range_idx].end <= off {
                range_idx += 1;
            }
            range_idx < ranges.len() && ranges[range_idx].start < off + len
        };

        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let job_rx = Mutex::new(job_rx);
        let (res_tx, res_rx) = mpsc::channel::<Result<Done, PackError>>();
        std::thread::scope(|s| -> Result<(), PackError> {
            let mut handles = Vec::new();
            for started in 0..threads {
                let res_tx = res_tx.clone();
                let job_rx = &job_rx;
                let (sec_name, file_name) = (&sec_name, &file_name);
                let spawned = std::thread::Builder::new().spawn_scoped(s, move || {
                    let mut comp = match Compressor::new(compression, level) {
                        Ok(c) => c,
                        Err(e) => {
                            let _ =
                                res_tx.send(Err(PackError::new(file_name, PackErrorKind::Io(e))));
                            return;
                        }
                    };
                    loop {
                        let job = match job_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let r = process(job, src, &mut comp).map_err(|(seq, off, e)| {
                            PackError::new(
                                file_name,
                                PackErrorKind::Io(std::io::Error::new(
                                    e.kind(),
                                    format!("reading source at offset {off}: {e}"),
                                )),
                            )
                            .section(sec_name)
                            .chunk(seq)
                        });
                        if res_tx.send(r).is_err() {
                            return;
                        }
                    }
                });
                // Fewer workers only cost speed; none at all is an error.
                let e = match spawned {
                    Ok(h) => {
                        handles.push(h);
                        continue;
                    }
                    Err(e) => e,
                };
                if started == 0 {
                    return Err(PackError::new(
                        file_name,
                        PackErrorKind::Io(std::io::Error::new(
                            e.kind(),
                            format!("cannot start a compression thread: {e}"),
                        )),
                    )
                    .section(sec_name));
                }
                break;
            }
            drop(res_tx);

            let mut pool: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
            let (mut next_dispatch, mut next_write, mut in_flight) = (0u64, 0u64, 0u64);
            let result = loop {
                while next_dispatch < n && in_flight < window {
                    let seq = next_dispatch;
                    let off = seq * cs;
                    let ulen = desc.ulen_of(seq);
                    if has_data(off, ulen as u64) {
                        let (buf, cbuf) = pool.pop().unwrap_or_default();
                        let job = Job {
                            seq,
                            off,
                            ulen,
                            buf,
                            cbuf,
                        };
                        if job_tx.send(job).is_err() {
                            break;
                        }
                    } else {
                        // A hole: known zero, never read.
                        pending.insert(
                            seq,
                            Done {
                                seq,
                                ulen,
                                codec: Codec::Zero,
                                sha256: [0; 32],
                                crc: 0,
                                buf: Vec::new(),
                                cbuf: Vec::new(),
                            },
                        );
                    }
                    next_dispatch += 1;
                    in_flight += 1;
                }
                let mut err = None;
                while let Some(d) = pending.remove(&next_write) {
                    let ulen = d.ulen as u64;
                    match self.write_chunk(desc, d) {
                        Ok(bufs) => {
                            if bufs.0.capacity() > 0 {
                                pool.push(bufs);
                            }
                        }
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                    progress.advance(ulen);
                    next_write += 1;
                    in_flight -= 1;
                }
                if let Some(e) = err {
                    break Err(e);
                }
                if next_write == n {
                    break Ok(());
                }
                if next_dispatch < n && in_flight < window {
                    // Holes completed without a worker; keep dispatching.
                    continue;
                }
                // Only holes were in flight and all are written: dispatch more instead of
                // waiting for a worker result that will never come.
                if in_flight as usize == pending.len() {
                    continue;
                }
                match res_rx.recv() {
                    Ok(Ok(d)) => {
                        pending.insert(d.seq, d);
                    }
                    Ok(Err(e)) => break Err(e),
                    Err(_) => {
                        break Err(PackError::new(
                            &file_name,
                            PackErrorKind::Io(std::io::Error::other("worker threads stopped")),
                        ))
                    }
                }
            };
            drop(job_tx);
            // Joined, not just left to the scope: a scope waits for the closures, a join also
            // for the threads' exit (their thread-local destructors), which leak checkers
            // (libFuzzer's) would otherwise report as leaks.
            for h in handles {
                let _ = h.join();
            }
            result
        })
    }

    /// Writes one chunk frame (plus padding in aligned mode); returns its buffers for reuse.
    fn write_chunk(
        &mut self,
        desc: &mut SectDesc,
        d: Done,
    ) -> Result<(Vec<u8>, Vec<u8>), PackError> {
        if self.opts.aligned && d.codec == Codec::None {
            let misalign = (self.pos + CHNK_FRAME_HEADER as u64) % PAGE_SIZE;
            if misalign != 0 {
                let mut gap = PAGE_SIZE - misalign;
                if gap < FRAME_PREFIX as u64 {
                    gap += PAGE_SIZE;
                }
                let body = gap - FRAME_PREFIX as u64;
                let mut pad = vec![0u8; gap as usize];
                pad[0..4].copy_from_slice(&TAG_PAD);
                pad[4..8].copy_from_slice(&(body as u32).to_le_bytes());
                self.put(&pad)?;
            }
        }
        let payload: &[u8] = match d.codec {
            Codec::None => &d.buf[..d.ulen as usize],
            Codec::Zero => &[],
            Codec::Deflate | Codec::Zstd => &d.cbuf,
        };
        let e = ChunkEntry {
            section: desc.id,
            seq: d.seq,
            offset: d.seq * desc.chunk_size as u64,
            ulen: d.ulen,
            codec: d.codec,
            clen: payload.len() as u32,
            payload_offset: self.pos + CHNK_FRAME_HEADER as u64,
            sha256: d.sha256,
            payload_crc32: d.crc,
        };
        let hdr = layout::encode_chunk_header(&e);
        self.put(&hdr)?;
        self.put(payload)?;
        desc.chunk_count += 1;
        desc.stored_bytes += e.clen as u64;
        if e.codec == Codec::Zero {
            desc.zero_chunks += 1;
        }
        self.chunks.push(e);
        Ok((d.buf, d.cbuf))
    }

    /// Writes the index and trailer and flushes. Returns the summary.
    pub fn finish(self) -> Result<PackSummary, PackError> {
        self.finish_into_inner().map(|(s, _)| s)
    }

    /// Like [`finish`](Self::finish), also returning the underlying writer.
    pub fn finish_into_inner(mut self) -> Result<(PackSummary, W), PackError> {
        if self.failed {
            return Err(self.err(PackErrorKind::InvalidArgument(
                "an earlier write failed; the pack is incomplete".into(),
            )));
        }
        if !layout::index_fits(&self.sections, self.chunks.len()) {
            return Err(self.err(PackErrorKind::Limit("index larger than 4 GiB".into())));
        }
        let index_offset = self.pos;
        let index = layout::encode_index(&self.header, &self.sections, &self.chunks);
        let root = layout::sha256(&index);
        self.put(&index)?;
        let trailer = layout::encode_trailer(index_offset, index.len() as u64, &root);
        self.put(&trailer)?;
        let pos = self.pos;
        let name = self.name.clone();
        let out = self
            .out
            .into_inner()
            .map_err(|e| PackError::new(&name, PackErrorKind::Io(e.into_error())).at(pos))?;
        let summary = PackSummary {
            root_digest: root,
            bytes_written: pos,
            sections: self.sections.iter().map(SectDesc::info).collect(),
        };
        Ok((summary, out))
    }
}

fn invalid(k: PackErrorKind) -> PackErrorKind {
    PackErrorKind::InvalidArgument(k.to_string())
}

fn process(
    mut job: Job,
    src: &dyn SectionSource,
    comp: &mut Compressor,
) -> Result<Done, (u64, u64, std::io::Error)> {
    let ulen = job.ulen as usize;
    job.buf.resize(ulen, 0);
    src.read_at(&mut job.buf[..ulen], job.off)
        .map_err(|e| (job.seq, job.off, e))?;
    let data = &job.buf[..ulen];
    let (codec, sha256, crc) = if layout::is_zero(data) {
        (Codec::Zero, [0; 32], 0)
    } else {
        let sha = layout::sha256(data);
        let c = comp
            .compress(data, &mut job.cbuf)
            .map_err(|e| (job.seq, job.off, e))?;
        let crc = if c == Codec::None {
            0
        } else {
            layout::crc32(&job.cbuf)
        };
        (c, sha, crc)
    };
    Ok(Done {
        seq: job.seq,
        ulen: job.ulen,
        codec,
        sha256,
        crc,
        buf: job.buf,
        cbuf: job.cbuf,
    })
}
