//! `vmpack bench`: packing speed and ratio against the standard tools on the same bytes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use vmpack_formats::pack::{kind, Compression, FileSource, PackReader, PackWriter, WriteOptions};

use crate::output::AtomicDir;

#[derive(Args)]
pub struct BenchArgs {
    /// Size of the mixed input in MiB (half random, a quarter zeros, a quarter text).
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    pub size_mib: u64,
    /// Folder for the scratch files (removed afterwards).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Skip the 20 GiB sparse-file run.
    #[arg(long)]
    pub no_sparse: bool,
    /// Print only the results (no progress notes).
    #[arg(long, short)]
    pub quiet: bool,
}

/// wyrand: fast and good enough to defeat compressors.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xe703_7ed1_a0b4_28db) as u128);
        ((t >> 64) ^ t) as u64
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "the", "kernel", "memory", "page", "disk", "virtual", "machine", "device", "queue", "error",
    "boot", "init", "mount", "process", "signal", "buffer", "network", "packet", "config", "value",
    "user", "system", "file", "read", "write", "open", "close", "time", "state",
];

fn fill_text(rng: &mut Rng, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let r = rng.next();
        let w = WORDS[(r % WORDS.len() as u64) as usize].as_bytes();
        let sep: &[u8] = if (r >> 32) & 15 == 0 { b".\n" } else { b" " };
        for &b in w.iter().chain(sep) {
            if i < buf.len() {
                buf[i] = b;
                i += 1;
            }
        }
    }
}

const STRIPE: usize = 4 << 20;

/// Writes stripes random, random, zero, text until `size` bytes.
fn make_input(path: &Path, size: u64) -> Result<()> {
    let mut out = BufWriter::with_capacity(STRIPE, File::create(path)?);
    let mut rng = Rng(0x5eed);
    let mut buf = vec![0u8; STRIPE];
    let mut written = 0u64;
    let mut i = 0u64;
    while written < size {
        let n = (size - written).min(STRIPE as u64) as usize;
        match i % 4 {
            0 | 1 => rng.fill(&mut buf[..n]),
            2 => buf[..n].fill(0),
            _ => fill_text(&mut rng, &mut buf[..n]),
        }
        out.write_all(&buf[..n])?;
        written += n as u64;
        i += 1;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

fn pack_file(input: &Path, out: &Path, compression: Compression) -> Result<(f64, u64)> {
    let src = FileSource::open(input)?;
    let t = Instant::now();
    let f = File::create(out)?;
    let opts = WriteOptions {
        compression,
        ..WriteOptions::default()
    };
    let mut w = PackWriter::new(f, opts)?;
    w.add_section(kind::DISK, "disk/0", serde_json::json!({}), &src, &())?;
    let s = w.finish()?;
    Ok((t.elapsed().as_secs_f64(), s.bytes_written))
}

/// Runs `sh -c cmd` and returns its wall time.
fn time_shell(cmd: &str) -> Result<f64> {
    let t = Instant::now();
    let st = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {cmd}"))?;
    let el = t.elapsed().as_secs_f64();
    if !st.success() {
        bail!("`{cmd}` failed ({st})");
    }
    Ok(el)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

fn size_of(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

struct Row {
    what: &'static str,
    ours: (f64, u64),
    theirs: Option<(&'static str, f64, u64)>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.size_mib == 0 {
        bail!("--size-mib must be at least 1");
    }
    let base = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = AtomicDir::create(&base.join(format!("vmpack-bench-{}", std::process::id())))?;
    let d = scratch.path().to_path_buf();
    let size = a.size_mib << 20;
    let mib = size as f64 / (1 << 20) as f64;
    let input = d.join("input.bin");
    crate::note!("building {} MiB input in {} ...", a.size_mib, d.display());
    make_input(&input, size)?;

    let mut rows = Vec::new();
    let (t, n) = pack_file(&input, &d.join("none.vmpack"), Compression::None)?;
    let sha = have("sha256sum")
        .then(|| time_shell(&format!("sha256sum {}", quote(&input))))
        .transpose()?
        .map(|t| ("sha256sum", t, 0));
    rows.push(Row {
        what: "pack none",
        ours: (t, n),
        theirs: sha,
    });

    let (t, n) = pack_file(&input, &d.join("deflate.vmpack"), Compression::Deflate)?;
    let gz = d.join("input.gz");
    let theirs = if have("gzip") {
        let tt = time_shell(&format!("gzip -1 -c {} > {}", quote(&input), quote(&gz)))?;
        Some(("gzip -1", tt, size_of(&gz)))
    } else {
        None
    };
    rows.push(Row {
        what: "pack deflate",
        ours: (t, n),
        theirs,
    });

    let zpack = d.join("zstd.vmpack");
    let (t, n) = pack_file(&input, &zpack, Compression::Zstd)?;
    let zst = d.join("input.zst");
    let theirs = if have("zstd") {
        let tt = time_shell(&format!(
            "zstd -q -1 -T0 -c {} > {}",
            quote(&input),
            quote(&zst)
        ))?;
        Some(("zstd -1 -T0", tt, size_of(&zst)))
    } else {
        None
    };
    rows.push(Row {
        what: "pack zstd",
        ours: (t, n),
        theirs,
    });

    let t0 = Instant::now();
    PackReader::open(&zpack)?.verify(&())?;
    let tv = t0.elapsed().as_secs_f64();
    let theirs = if have("zstd") {
        let tt = time_shell(&format!("zstd -q -t {}", quote(&zst)))?;
        Some(("zstd -t", tt, 0))
    } else {
        None
    };
    rows.push(Row {
        what: "verify zstd pack",
        ours: (tv, 0),
        theirs,
    });

    crate::outln!(
        "input: {} MiB in 4 MiB stripes (random, random, zeros, text), warm page cache, {} threads",
        a.size_mib,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    crate::outln!(
        "{:<18} {:>9} {:>9} {:>8} | {:<12} {:>9} {:>9} {:>8}",
        "vmpack",
        "time s",
        "MiB/s",
        "ratio",
        "reference",
        "time s",
        "MiB/s",
        "ratio"
    );
    let ratio = |out: u64| {
        if out == 0 {
            "-".to_string()
        } else {
            format!("{:.3}", size as f64 / out as f64)
        }
    };
    for r in &rows {
        let (ref_name, ref_t, ref_r) = match r.theirs {
            Some((nm, t, out)) => (nm.to_string(), format!("{t:.2}"), (t, ratio(out))),
            None => ("(missing)".to_string(), "-".into(), (0.0, "-".into())),
        };
        crate::outln!(
            "{:<18} {:>9.2} {:>9.0} {:>8} | {:<12} {:>9} {:>9} {:>8}",
            r.what,
            r.ours.0,
            mib / r.ours.0,
            ratio(r.ours.1),
            ref_name,
            ref_t,
            if ref_r.0 > 0.0 {
                format!("{:.0}", mib / ref_r.0)
            } else {
                "-".into()
            },
            ref_r.1
        );
    }
    for f in [
        "none.vmpack",
        "deflate.vmpack",
        "zstd.vmpack",
        "input.gz",
        "input.zst",
        "input.bin",
    ] {
        let _ = std::fs::remove_file(d.join(f));
    }

    if !a.no_sparse {
        let sparse = d.join("sparse.img");
        let f = File::create(&sparse)?;
        let total: u64 = 20 << 30;
        f.set_len(total)?;
        let mut rng = Rng(7);
        let mut buf = vec![0u8; 1 << 20];
        // 100 MiB of data: 1 MiB blocks every ~204 MiB, alternately random and text.
        for i in 0..100u64 {
            if i % 2 == 0 {
                rng.fill(&mut buf);
            } else {
                fill_text(&mut rng, &mut buf);
            }
            f.write_all_at(&buf, i * (total / 100))?;
        }
        f.sync_all()?;
        drop(f);
        let out = d.join("sparse.vmpack");
        let (t, n) = pack_file(&sparse, &out, Compression::Zstd)?;
        let t0 = Instant::now();
        PackReader::open(&out)?.verify(&())?;
        let tv = t0.elapsed().as_secs_f64();
        crate::outln!(
            "sparse: 20 GiB file with 100 MiB of data -> zstd pack in {t:.2} s ({} bytes, verify {tv:.2} s)",
            n
        );
    }
    drop(scratch);
    Ok(())
}
