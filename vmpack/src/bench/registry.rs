//! `vmpack bench-registry`: how chunking decides what a second push of a changed guest
//! sends to a registry. A synthetic guest (RAM and a disk, each holding `--data-mib` of
//! incompressible data) is saved, then changed by `--write-mib` of writes, and each
//! chunking scheme is pushed to the registry twice as blobs (the real client, 4 transfers):
//! the table shows the bytes and blobs the second push uploads, the blob count, and the
//! times of the second push and of a pull of everything (cold) and of the changes (warm).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use sha2::{Digest, Sha256};
use vmpack_registry::oci::parallel_for;
use vmpack_registry::{Client, ClientOptions, Reference};

#[derive(Args)]
pub struct BenchRegistryArgs {
    /// The registry to push to (HOST:PORT; plain HTTP on loopback). Repositories
    /// `bench/<scheme>-<run>` are created in it.
    #[arg(long, value_name = "HOST:PORT")]
    registry: String,
    /// Size of the guest's RAM and of its disk, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    size_mib: usize,
    /// Data in each (the rest is zero), in MiB.
    #[arg(long, default_value_t = 128, value_name = "MIB")]
    data_mib: usize,
    /// What the guest writes between the two saves, in MiB.
    #[arg(long, default_value_t = 10, value_name = "MIB")]
    write_mib: usize,
    /// Blob transfers at once.
    #[arg(long, default_value_t = 4)]
    transfers: usize,
    /// Print only the results (no progress notes).
    #[arg(long, short)]
    pub quiet: bool,
}

/// wyrand.
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

#[derive(Clone, Copy)]
enum Scheme {
    Fixed(usize),
    /// FastCDC 2020 with (min, avg, max).
    Cdc(usize, usize, usize),
}

impl Scheme {
    fn name(&self) -> String {
        let k = |n: usize| {
            if n >= 1 << 20 {
                format!("{} MiB", n >> 20)
            } else {
                format!("{} KiB", n >> 10)
            }
        };
        match self {
            Scheme::Fixed(n) => format!("fixed {}", k(*n)),
            Scheme::Cdc(_, a, _) => format!("CDC avg {}", k(*a)),
        }
    }

    /// Non-zero chunks as (offset, len).
    fn cut(&self, data: &[u8]) -> Vec<(usize, usize)> {
        let all: Vec<(usize, usize)> = match *self {
            Scheme::Fixed(n) => (0..data.len())
                .step_by(n)
                .map(|o| (o, n.min(data.len() - o)))
                .collect(),
            Scheme::Cdc(min, avg, max) => fastcdc::v2020::FastCDC::new(data, min, avg, max)
                .map(|c| (c.offset, c.length))
                .collect(),
        };
        all.into_iter()
            .filter(|&(o, l)| data[o..o + l].iter().any(|&b| b != 0))
            .collect()
    }
}

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

struct Row {
    scheme: String,
    what: &'static str,
    pattern: &'static str,
    blobs: usize,
    up_blobs: usize,
    up_bytes: u64,
    push_s: f64,
    cold_pull_s: f64,
    warm_pull_s: f64,
}

fn measure(
    a: &BenchRegistryArgs,
    run: u64,
    scheme: Scheme,
    what: &'static str,
    pattern: &'static str,
    before: &[u8],
    after: &[u8],
) -> Result<Row> {
    let slug: String = scheme
        .name()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let reference = Reference::parse(&format!(
        "{}/bench/{what}-{pattern}-{slug}-{run}:t",
        a.registry
    ))?;
    let client = Client::new(
        &reference,
        ClientOptions {
            parallel: a.transfers,
            ca_file: crate::environment::default_ca_file(),
            ..Default::default()
        },
    )?;
    let c1 = scheme.cut(before);
    let c2 = scheme.cut(after);
    let d1: Vec<String> = c1.iter().map(|&(o, l)| digest(&before[o..o + l])).collect();
    let d2: Vec<String> = c2.iter().map(|&(o, l)| digest(&after[o..o + l])).collect();
    let push = |chunks: &[(usize, usize)],
                ds: &[String],
                data: &[u8],
                known: &HashSet<String>|
     -> Result<(usize, u64)> {
        let mut seen = HashSet::new();
        let list: Vec<usize> = (0..chunks.len())
            .filter(|&i| seen.insert(ds[i].clone()))
            .collect();
        let (n, bytes) = (AtomicU64::new(0), AtomicU64::new(0));
        parallel_for(list.len(), a.transfers, &|j| {
            let i = list[j];
            if known.contains(&ds[i]) || client.blob_exists(&ds[i])? {
                return Ok(());
            }
            let (o, l) = chunks[i];
            client.upload_blob(&ds[i], &data[o..o + l])?;
            n.fetch_add(1, Ordering::Relaxed);
            bytes.fetch_add(l as u64, Ordering::Relaxed);
            Ok(())
        })?;
        Ok((n.into_inner() as usize, bytes.into_inner()))
    };
    push(&c1, &d1, before, &HashSet::new())?;
    // The second push knows the first one's blobs, as `vmpack push` does from the tag's
    // current manifest, and asks the registry (HEAD) about the rest.
    let known: HashSet<String> = d1.iter().cloned().collect();
    let t = Instant::now();
    let (up_blobs, up_bytes) = push(&c2, &d2, after, &known)?;
    let push_s = t.elapsed().as_secs_f64();
    let pull = |list: Vec<(String, u64)>| -> Result<f64> {
        let t = Instant::now();
        parallel_for(list.len(), a.transfers, &|i| {
            let (d, s) = &list[i];
            client.get_blob(d, *s, &mut std::io::sink(), &|_| {})
        })?;
        Ok(t.elapsed().as_secs_f64())
    };
    let mut seen = HashSet::new();
    let all: Vec<(String, u64)> = c2
        .iter()
        .zip(&d2)
        .filter(|(_, d)| seen.insert((*d).clone()))
        .map(|(c, d)| (d.clone(), c.1 as u64))
        .collect();
    let blobs = all.len();
    let changed: Vec<(String, u64)> = all
        .iter()
        .filter(|(d, _)| !known.contains(d))
        .cloned()
        .collect();
    let cold_pull_s = pull(all)?;
    let warm_pull_s = pull(changed)?;
    Ok(Row {
        scheme: scheme.name(),
        what,
        pattern,
        blobs,
        up_blobs,
        up_bytes,
        push_s,
        cold_pull_s,
        warm_pull_s,
    })
}

pub fn run(a: BenchRegistryArgs) -> Result<()> {
    let size = a.size_mib << 20;
    let data = (a.data_mib << 20).min(size);
    let write = a.write_mib << 20;
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut rng = Rng(0x5eed);
    let mut image = vec![0u8; size];
    rng.fill(&mut image[..data]);
    // Scattered: the writes land on random 4 KiB pages of the data (page tables, heaps,
    // a journal). Clustered: the same amount as one run (a file written in one go).
    let mut scattered = image.clone();
    let pages = data / 4096;
    let mut page = vec![0u8; 4096];
    for _ in 0..write / 4096 {
        let p = (rng.next() % pages as u64) as usize;
        rng.fill(&mut page);
        scattered[p * 4096..(p + 1) * 4096].copy_from_slice(&page);
    }
    let mut clustered = image.clone();
    let start = ((rng.next() % (data.saturating_sub(write) / 4096).max(1) as u64) as usize) * 4096;
    let end = (start + write).min(size);
    rng.fill(&mut clustered[start..end]);

    let memory = [
        Scheme::Fixed(16 << 10),
        Scheme::Fixed(64 << 10),
        Scheme::Fixed(256 << 10),
        Scheme::Fixed(1 << 20),
    ];
    let disk = [
        Scheme::Fixed(64 << 10),
        Scheme::Fixed(256 << 10),
        Scheme::Fixed(1 << 20),
        Scheme::Cdc(16 << 10, 64 << 10, 256 << 10),
        Scheme::Cdc(64 << 10, 256 << 10, 1 << 20),
        Scheme::Cdc(256 << 10, 1 << 20, 4 << 20),
    ];
    let mut rows = Vec::new();
    for (what, schemes) in [("memory", &memory[..]), ("disk", &disk[..])] {
        for &s in schemes {
            for (pattern, after) in [("scattered", &scattered), ("clustered", &clustered)] {
                let r = measure(&a, run_id, s, what, pattern, &image, after)?;
                crate::note!(
                    "vmpack: {what} {} {pattern}: {} blobs, uploaded {} in {}",
                    r.scheme,
                    r.blobs,
                    r.up_bytes,
                    r.up_blobs
                );
                rows.push(r);
            }
        }
    }
    crate::outln!(
        "{} MiB RAM and {} MiB disk, each with {} MiB of data; the guest then writes {} MiB \
         (scattered: random 4 KiB pages; clustered: one run). Second push: blobs and MB uploaded.\n",
        a.size_mib, a.size_mib, a.data_mib, a.write_mib
    );
    crate::outln!("| | chunking | blobs | scattered: uploaded | clustered: uploaded | second push | pull all (cold) | pull changes (warm) |");
    crate::outln!("|---|---|---|---|---|---|---|---|");
    for pair in rows.chunks(2) {
        let (s, c) = (&pair[0], &pair[1]);
        crate::outln!(
            "| {} | {} | {} | {:.1} MB in {} blobs | {:.1} MB in {} blobs | {:.2} s | {:.2} s | {:.2} s |",
            s.what,
            s.scheme,
            s.blobs,
            s.up_bytes as f64 / 1e6,
            s.up_blobs,
            c.up_bytes as f64 / 1e6,
            c.up_blobs,
            s.push_s,
            s.cold_pull_s,
            s.warm_pull_s
        );
        let _ = s.pattern;
    }
    Ok(())
}
