//! Round trips through the pack container: every codec, aligned or not, file and pipe
//! output, random-access and streaming reads.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use serde_json::json;
use vmpack_formats::pack::*;

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Mixed content: incompressible, compressible text, zero runs, odd length.
fn sample(n: usize, seed: u64) -> Vec<u8> {
    let mut v = noise(n, seed);
    let text = b"the quick brown fox jumps over the lazy dog. ";
    for i in (n / 4)..(n / 2) {
        v[i] = text[i % text.len()];
    }
    for b in &mut v[n / 2..n - 100] {
        *b = 0;
    }
    v
}

/// A writer that can only write: no Seek, like a pipe.
struct PipeLike(Vec<u8>);
impl Write for PipeLike {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        // Short writes exercise write_all.
        let n = b.len().min(7000);
        self.0.extend_from_slice(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Sections {
    manifest: Vec<u8>,
    disk: Vec<u8>,
    mem: Vec<u8>,
    empty: Vec<u8>,
}

fn sections() -> Sections {
    Sections {
        manifest: serde_json::to_vec(&json!({"name": "t", "vcpus": 1})).unwrap(),
        disk: sample(3 * 65536 + 1234, 7),
        mem: sample(8 * 16384, 9),
        empty: Vec::new(),
    }
}

fn write_pack(opts: WriteOptions, s: &Sections) -> (Vec<u8>, PackSummary) {
    let mut w = PackWriter::new(PipeLike(Vec::new()), opts.clone()).unwrap();
    w.add_section(kind::MANIFEST, "manifest", json!({}), &s.manifest, &())
        .unwrap();
    w.add_section(kind::DISK, "disk0", json!({"format": "raw"}), &s.disk, &())
        .unwrap();
    w.add_section_with(
        kind::MEMORY,
        "memory",
        json!({"gpa": 0}),
        &s.mem,
        16384,
        Compression::None,
        &(),
    )
    .unwrap();
    w.add_section(kind::FILE, "empty", json!({}), &s.empty, &())
        .unwrap();
    let (summary, out) = w.finish_into_inner().unwrap();
    assert_eq!(summary.bytes_written, out.0.len() as u64);
    (out.0, summary)
}

fn check_all(bytes: &[u8], summary: &PackSummary, s: &Sections, opts: &WriteOptions) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.vmpack");
    std::fs::write(&path, bytes).unwrap();
    let r = PackReader::open(&path).unwrap();
    assert_eq!(r.version(), (FORMAT_MAJOR, FORMAT_MINOR));
    assert_eq!(r.aligned(), opts.aligned);
    assert_eq!(r.root_digest(), summary.root_digest);
    assert_eq!(r.sections(), &summary.sections[..]);
    assert_eq!(r.file_size(), bytes.len() as u64);
    let expect: [(&str, &Vec<u8>); 4] = [
        ("manifest", &s.manifest),
        ("disk0", &s.disk),
        ("memory", &s.mem),
        ("empty", &s.empty),
    ];
    for (name, data) in expect {
        let info = r.section(name).unwrap().clone();
        assert_eq!(info.size, data.len() as u64);
        assert_eq!(&r.read_section(info.id, 1 << 30).unwrap(), data, "{name}");
        let mut copy = Vec::new();
        r.copy_section(info.id, &mut copy, &()).unwrap();
        assert_eq!(&copy, data);
        let par = Mutex::new(vec![0u8; data.len()]);
        r.for_each_chunk_parallel(info.id, true, 3, &|off, d| {
            let o = off as usize;
            par.lock().unwrap()[o..o + d.len()].copy_from_slice(d);
            Ok(())
        })
        .unwrap();
        assert_eq!(&par.into_inner().unwrap(), data);
        let chunks = r.chunks(info.id);
        assert_eq!(chunks.len() as u64, info.chunks);
        let zeros = chunks.iter().filter(|c| c.codec == Codec::Zero).count() as u64;
        assert_eq!(zeros, info.zero_chunks);
        for c in chunks {
            if c.codec == Codec::None {
                // The payload offset is where the raw bytes are: mmap/pread can use it.
                let mut b = vec![0u8; c.ulen as usize];
                r.file().read_exact_at(&mut b, c.payload_offset).unwrap();
                let o = c.offset as usize;
                assert_eq!(&b[..], &data[o..o + b.len()]);
                if opts.aligned {
                    assert_eq!(c.payload_offset % 4096, 0);
                }
            }
        }
    }
    let rep = r.verify(&()).unwrap();
    assert_eq!(rep.sections, 4);

    // Streaming read equals random read.
    let mut sr = StreamReader::new(bytes, "mem").unwrap();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut ended = Vec::new();
    loop {
        match sr.next_event().unwrap() {
            StreamEvent::Section(i) => {
                assert_eq!(i.id as usize, got.len());
                got.push(Vec::new());
            }
            StreamEvent::Chunk {
                section,
                offset,
                data,
                ..
            } => {
                let v = &mut got[section as usize];
                assert_eq!(v.len() as u64, offset);
                v.extend_from_slice(data);
            }
            StreamEvent::SectionEnd(id) => ended.push(id),
            StreamEvent::End(sum) => {
                assert_eq!(sum.root_digest, summary.root_digest);
                assert_eq!(sum.sections, summary.sections);
                assert_eq!(sum.bytes_written, bytes.len() as u64);
                break;
            }
        }
    }
    assert_eq!(ended, vec![0, 1, 2, 3]);
    for (i, (_, data)) in expect.iter().enumerate() {
        assert_eq!(&&got[i], data);
    }
}

#[test]
fn round_trip_every_codec_and_alignment() {
    let s = sections();
    for compression in [Compression::None, Compression::Deflate, Compression::Zstd] {
        for aligned in [false, true] {
            for threads in [1, 4] {
                let opts = WriteOptions {
                    compression,
                    level: None,
                    aligned,
                    chunk_size: 65536,
                    threads,
                };
                let (bytes, summary) = write_pack(opts.clone(), &s);
                let disk = &summary.sections[1];
                match compression {
                    Compression::None => {
                        assert_eq!(disk.stored_bytes, disk.size - disk.zero_chunks * 65536)
                    }
                    _ => assert!(disk.stored_bytes < disk.size / 2, "{compression}"),
                }
                // The zero run covers at least one whole chunk.
                assert!(disk.zero_chunks >= 1);
                check_all(&bytes, &summary, &s, &opts);
                // Output is deterministic whatever the thread count.
                let (again, _) = write_pack(
                    WriteOptions {
                        threads: 2,
                        ..opts.clone()
                    },
                    &s,
                );
                assert_eq!(again, bytes);
            }
        }
    }
}

#[test]
fn compression_levels_and_parse() {
    assert_eq!("zstd".parse::<Compression>().unwrap(), Compression::Zstd);
    assert_eq!(
        "deflate".parse::<Compression>().unwrap(),
        Compression::Deflate
    );
    assert_eq!("none".parse::<Compression>().unwrap(), Compression::None);
    assert!("gzip".parse::<Compression>().is_err());
    assert_eq!(Compression::Deflate.to_string(), "deflate");
    let s = sections();
    for level in [Some(-5), Some(19), Some(9)] {
        let opts = WriteOptions {
            level,
            chunk_size: 65536,
            ..Default::default()
        };
        let (bytes, summary) = write_pack(opts.clone(), &s);
        check_all(&bytes, &summary, &s, &opts);
    }
}

#[test]
fn write_to_real_pipe_and_stream_read() {
    let s = sections();
    let (reader, writer) = std::io::pipe().unwrap();
    let opts = WriteOptions {
        chunk_size: 65536,
        aligned: true,
        ..Default::default()
    };
    let (total, sum) = std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            let mut w = PackWriter::new(writer, opts).unwrap();
            w.add_section(kind::DISK, "disk0", json!({}), &s.disk, &())
                .unwrap();
            w.finish().unwrap()
        });
        let mut sr = StreamReader::new(reader, "-").unwrap();
        let mut total = Vec::new();
        let sum = loop {
            match sr.next_event().unwrap() {
                StreamEvent::Chunk { data, .. } => total.extend_from_slice(data),
                StreamEvent::End(sum) => break sum,
                _ => {}
            }
        };
        assert_eq!(h.join().unwrap().root_digest, sum.root_digest);
        (total, sum)
    });
    assert_eq!(total, s.disk);
    assert_eq!(sum.sections.len(), 1);
}

#[test]
fn bad_arguments_refused() {
    let mut w = PackWriter::new(Vec::new(), WriteOptions::default()).unwrap();
    let d = vec![1u8; 10];
    let long = "x".repeat(256);
    assert!(w
        .add_section(kind::FILE, &long, json!({}), &d, &())
        .is_err());
    let e = w
        .add_section(kind::FILE, "a", json!([1]), &d, &())
        .unwrap_err();
    assert!(e.to_string().contains("JSON object"), "{e}");
    let big = json!({"x": "y".repeat(70000)});
    assert!(w.add_section(kind::FILE, "a", big, &d, &()).is_err());
    assert!(w
        .add_section_with(kind::FILE, "a", json!({}), &d, 100, Compression::None, &())
        .is_err());
    w.add_section(kind::FILE, "a", json!({}), &d, &()).unwrap();
    assert!(w.add_section(kind::FILE, "a", json!({}), &d, &()).is_err());
    let aligned = WriteOptions {
        aligned: true,
        chunk_size: 6000,
        ..Default::default()
    };
    assert!(PackWriter::new(Vec::new(), aligned).is_err());
    w.finish().unwrap();
}

#[test]
fn source_errors_name_the_section() {
    struct Failing;
    impl SectionSource for Failing {
        fn len(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, _: &mut [u8], off: u64) -> std::io::Result<()> {
            if off >= 512 << 10 {
                Err(std::io::Error::other("disk on fire"))
            } else {
                Ok(())
            }
        }
    }
    let opts = WriteOptions {
        chunk_size: 65536,
        ..Default::default()
    };
    let mut w = PackWriter::new(Vec::new(), opts).unwrap();
    w.set_name("out.vmpack");
    let e = w
        .add_section(kind::DISK, "disk0", json!({}), &Failing, &())
        .unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("out.vmpack") && m.contains("disk0") && m.contains("disk on fire"),
        "{m}"
    );
    assert!(w.finish().is_err());
}

#[test]
fn sparse_file_reads_only_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    let f = std::fs::File::create(&path).unwrap();
    let size: u64 = 256 << 20;
    f.set_len(size).unwrap();
    f.write_all_at(&noise(100_000, 3), 10 << 20).unwrap();
    f.write_all_at(b"end", size - 3).unwrap();
    drop(f);
    let src = FileSource::open(&path).unwrap();
    let ranges = src.data_ranges().unwrap();
    let data_bytes: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    let holes_supported = data_bytes < size;

    /// Panics if asked for bytes outside the data ranges.
    struct Guard<'a> {
        inner: &'a FileSource,
        ranges: Vec<std::ops::Range<u64>>,
        read: std::sync::atomic::AtomicU64,
    }
    impl SectionSource for Guard<'_> {
        fn len(&self) -> u64 {
            self.inner.len()
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
            let end = off + buf.len() as u64;
            assert!(
                self.ranges.iter().any(|r| r.start < end && off < r.end),
                "read {off}..{end} entirely inside a hole"
            );
            self.read
                .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.inner.read_at(buf, off)
        }
        fn data_ranges(&self) -> std::io::Result<Vec<std::ops::Range<u64>>> {
            Ok(self.ranges.clone())
        }
    }
    let g = Guard {
        inner: &src,
        ranges,
        read: 0.into(),
    };
    let mut out = Vec::new();
    let progress = std::sync::atomic::AtomicU64::new(0);
    let mut w = PackWriter::new(&mut out, WriteOptions::default()).unwrap();
    w.add_section(kind::DISK, "disk0", json!({}), &g, &progress)
        .unwrap();
    let sum = w.finish().unwrap();
    assert_eq!(progress.load(std::sync::atomic::Ordering::Relaxed), size);
    let info = &sum.sections[0];
    assert_eq!(info.chunks, 256);
    // Chunks 10 and 255 hold data; everything else is zero.
    assert_eq!(info.zero_chunks, 254);
    if holes_supported {
        assert!(g.read.load(std::sync::atomic::Ordering::Relaxed) <= 2 << 20);
    }
    assert!(out.len() < 1 << 20);
    let pack = dir.path().join("p.vmpack");
    std::fs::write(&pack, &out).unwrap();
    let r = PackReader::open(&pack).unwrap();
    r.verify(&()).unwrap();
    let mut back = Vec::new();
    r.copy_section(0, &mut back, &()).unwrap();
    let mut orig = Vec::new();
    std::fs::File::open(&path)
        .unwrap()
        .read_to_end(&mut orig)
        .unwrap();
    assert!(back == orig);
}
