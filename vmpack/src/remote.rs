//! `vmpack restore REF`: a VM straight from a registry, its memory and disks fetched on first touch.
//!
//! The pack's skeleton (manifests, config, index) is resolved first and written to a
//! sparse local pack file in a temporary folder under the cache folder, with every
//! section but guest memory and disks (manifest, vmstate, boot files) fetched whole and
//! put in place. Memory and disk payloads stay holes: the lazy restore engine (memory:
//! `vstate::lazy`, disks: `vstate::lazy_disk`) asks [`RegistryFetch`] for a chunk on the
//! guest's first touch (or from the background prefetch and fill), which takes
//! the blob from the local chunk cache or the registry, stores a fetched blob in the
//! cache, and writes it into the hole. The engine then reads the chunk back through the
//! pack reader and checks it against the index before the guest sees it, so neither the
//! registry nor the cache is trusted for any byte.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use vmpack_formats::pack::{kind, ChunkEntry, Codec};
use vmpack_registry::client::sha256_digest;
use vmpack_registry::{ChunkCache, Client, RemotePack};

/// What came from where, for the summary line.
pub struct Counters {
    pub fetched_blobs: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub cached_blobs: AtomicU64,
    pub cached_bytes: AtomicU64,
    /// Memory chunks still to place, and when the last one was (ms after `started`).
    memory_left: AtomicU64,
    pub resident_ms: std::sync::OnceLock<f64>,
    /// The same for disk chunks.
    disk_left: AtomicU64,
    pub disks_ms: std::sync::OnceLock<f64>,
    pub started: std::time::Instant,
}

impl Counters {
    pub fn summary(&self) -> String {
        format!(
            "fetched {} blobs ({} bytes) from the registry, {} blobs ({} bytes) from the local chunk cache",
            self.fetched_blobs.load(Ordering::Relaxed),
            self.fetched_bytes.load(Ordering::Relaxed),
            self.cached_blobs.load(Ordering::Relaxed),
            self.cached_bytes.load(Ordering::Relaxed),
        )
    }
}

/// Fills the local pack file's holes from the cache or the registry.
pub struct RegistryFetch {
    client: Arc<Client>,
    remote: RemotePack,
    cache: ChunkCache,
    file: std::fs::File,
    /// Per section id: whether it is guest memory served on demand.
    memory: Vec<bool>,
    /// Per section id: whether it is a disk filled on demand.
    disk: Vec<bool>,
    pub counters: Arc<Counters>,
    quiet: bool,
    /// The frames in front of each memory or disk chunk fetched on demand, by payload offset order.
    deferred: Vec<Deferred>,
}

impl RegistryFetch {
    /// The stored payload of `c`: from the cache, else from the registry (then cached).
    /// Not trusted either way: the caller's check against the index decides.
    fn payload(&self, c: &ChunkEntry) -> Result<Vec<u8>> {
        let (digest, size) = self
            .remote
            .blob_of(c)
            .ok_or_else(|| anyhow!("{}: no blob", self.remote.chunk_name(c)))?;
        if self.cache.contains(digest, *size) {
            if let Some(mut f) = self.cache.open(digest) {
                let mut v = Vec::with_capacity(*size as usize);
                if f.read_to_end(&mut v).is_ok() && v.len() as u64 == *size {
                    self.counters.cached_blobs.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .cached_bytes
                        .fetch_add(*size, Ordering::Relaxed);
                    return Ok(v);
                }
            }
        }
        let data = self
            .client
            .get_blob_range(digest, 0..*size, *size)
            .with_context(|| {
                format!(
                    "{}: {}: fetching {digest}",
                    self.client.reference(),
                    self.remote.chunk_name(c)
                )
            })?;
        self.counters.fetched_blobs.fetch_add(1, Ordering::Relaxed);
        self.counters
            .fetched_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if sha256_digest(&data) != *digest {
            bail!(
                "{}: {}: failed verification: the registry's blob {digest} does not match its digest; refused",
                self.client.reference(),
                self.remote.chunk_name(c)
            );
        }
        // Best effort: a full cache folder does not stop the VM.
        let _ = self
            .cache
            .insert_with(digest, &mut |w| Ok(w.write_all(&data)?));
        Ok(data)
    }
}

impl vmboot::vstate::lazy::ChunkFetch for RegistryFetch {
    fn fetch(&self, e: &ChunkEntry) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.fetch_chunk(e).map_err(Into::into)
    }
}

impl RegistryFetch {
    fn fetch_chunk(&self, e: &ChunkEntry) -> Result<()> {
        let data = self.payload(e)?;
        let i = self
            .deferred
            .partition_point(|d| d.payload_offset < e.payload_offset);
        if let Some(d) = self
            .deferred
            .get(i)
            .filter(|d| d.payload_offset == e.payload_offset)
        {
            let mut frames = vec![0u8; (d.payload_offset - d.start) as usize];
            for (at, b) in d.pieces.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                frames[*at..*at + b.len()].copy_from_slice(b);
            }
            self.file
                .write_all_at(&frames, d.start)
                .context("writing a fetched chunk's frame into the local pack file")?;
        }
        self.file
            .write_all_at(&data, e.payload_offset)
            .context("writing a fetched chunk into the local pack file")?;
        if self.memory[e.section as usize] {
            let c = &self.counters;
            // The engine fetches each chunk once; the last one makes memory resident.
            if c.memory_left.fetch_sub(1, Ordering::SeqCst) == 1 {
                let at = c.started.elapsed().as_secs_f64() * 1000.0;
                if c.resident_ms.set(at).is_ok() && !self.quiet {
                    eprintln!(
                        "vmpack: {}: memory fully resident {at:.1} ms after the command",
                        self.client.reference()
                    );
                }
            }
        }
        if self.disk[e.section as usize] {
            let c = &self.counters;
            if c.disk_left.fetch_sub(1, Ordering::SeqCst) == 1 {
                let at = c.started.elapsed().as_secs_f64() * 1000.0;
                if c.disks_ms.set(at).is_ok() && !self.quiet {
                    eprintln!(
                        "vmpack: {}: disks fully fetched {at:.1} ms after the command",
                        self.client.reference()
                    );
                }
            }
        }
        Ok(())
    }
}

/// A local pack file being filled from a registry; the folder goes with it.
pub struct RemotePackFile {
    pub path: PathBuf,
    pub fetch: Arc<RegistryFetch>,
    /// When each step ended, in ms after the command started.
    pub phases: Vec<(&'static str, f64)>,
    /// The digest the tag was taken to point to (the cached one) and the registry's answer,
    /// to be checked by [`RemotePackFile::confirmed`].
    confirm: Option<(String, std::thread::JoinHandle<Result<Option<String>>>)>,
    _dir: Option<tempfile::TempDir>,
}

/// A `Write` over the local pack file for the skeleton's frames. Bytes written while `skip`
/// is non-zero (payloads), and runs of zeros, are left as holes; contiguous frames go out in
/// one write; the frames in front of a memory or disk chunk fetched on demand (its padding and
/// header, in `deferred`) are kept for [`RegistryFetch`] to write with the payload. A pack
/// has a frame per chunk: thousands of small writes would cost more than the rest of the
/// restore.
struct Sparse<'a> {
    file: &'a std::fs::File,
    pos: u64,
    skip: &'a std::cell::Cell<u64>,
    /// Bytes not yet written, which belong at `pending_at`.
    pending: Vec<u8>,
    pending_at: u64,
    deferred: &'a [Deferred],
    /// The first of `deferred` that does not end before `pos`.
    next: usize,
}

/// The frame bytes before a memory chunk's payload, from the end of the previous chunk in
/// its section: written with the payload, once fetched.
struct Deferred {
    start: u64,
    payload_offset: u64,
    /// (offset from `start`, bytes) of what is not zeros.
    pieces: std::sync::Mutex<Vec<(usize, Vec<u8>)>>,
}

impl Sparse<'_> {
    fn flush_pending(&mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            self.file.write_all_at(&self.pending, self.pending_at)?;
            self.pending.clear();
        }
        Ok(())
    }
}

impl Write for Sparse<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let s = self.skip.get();
        if s > 0 {
            let n = (b.len() as u64).min(s);
            self.skip.set(s - n);
            self.flush_pending()?;
            self.pos += n;
            return Ok(n as usize);
        }
        let len = b.len() as u64;
        while self
            .deferred
            .get(self.next)
            .is_some_and(|d| d.payload_offset <= self.pos)
        {
            self.next += 1;
        }
        // The file was extended with holes, which read as zeros: padding needs no write.
        if is_zero(b) {
            self.flush_pending()?;
        } else if let Some(d) = self
            .deferred
            .get(self.next)
            .filter(|d| d.start <= self.pos && self.pos + len <= d.payload_offset)
        {
            let at = (self.pos - d.start) as usize;
            d.pieces
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((at, b.to_vec()));
        } else {
            if self.pending_at + self.pending.len() as u64 != self.pos
                || self.pending.len() > 1 << 20
            {
                self.flush_pending()?;
                self.pending_at = self.pos;
            }
            self.pending.extend_from_slice(b);
        }
        self.pos += len;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.flush_pending()
    }
}

static NOTHING: [u8; 64 << 10] = [0; 64 << 10];

/// Whether `b` is all zeros, by slice comparison (memcmp: a byte loop costs more than the
/// whole restore in a debug build, on the padding of a pack with thousands of chunks).
fn is_zero(b: &[u8]) -> bool {
    b.chunks(NOTHING.len()).all(|c| c == &NOTHING[..c.len()])
}

/// Resolves the reference, then writes the local pack file: everything but the memory
/// payloads, which [`RegistryFetch`] fills on demand. `all` fetches memory too (eager).
///
/// `beside`: for a diff pack's parent, the folder of its child's local file and the file
/// name the child records for it (the folder then goes with the child's file).
pub fn prepare(
    client: Arc<Client>,
    cache: ChunkCache,
    guess: bool,
    all: bool,
    started: std::time::Instant,
    quiet: bool,
    beside: Option<(&std::path::Path, &str)>,
) -> Result<RemotePackFile> {
    let ms = || started.elapsed().as_secs_f64() * 1000.0;
    let mut phases = vec![("client", ms())];
    let before = ms();
    let remote = vmpack_registry::resolve_cached(&client, Some(&cache), guess)?;
    phases.extend(remote.timings.iter().map(|&(n, t)| (n, before + t)));
    // A tag resolved from the cache: the registry is asked what it points to now while the
    // local file is made, and the caller waits for the answer before the VM is built.
    let confirm = (!remote.confirmed).then(|| {
        let (client, digest) = (client.clone(), remote.digest.clone());
        let handle = std::thread::spawn(move || {
            client.manifest_digest(client.reference().manifest_reference())
        });
        (digest, handle)
    });
    let (dir, path) = match beside {
        Some((folder, name)) => (None, folder.join(name)),
        None => {
            let root = crate::environment::cache_root()
                .context("no cache folder: set VMPACK_CACHE_DIR, XDG_CACHE_HOME or HOME")?;
            std::fs::create_dir_all(&root)
                .with_context(|| format!("creating {}", root.display()))?;
            let dir = tempfile::Builder::new()
                .prefix(".remote-")
                .tempdir_in(&root)
                .with_context(|| format!("creating a temporary folder in {}", root.display()))?;
            let path = dir.path().join("pack.vmpack");
            (Some(dir), path)
        }
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.set_len(remote.skeleton.file_size())?;
    phases.push(("local file", ms()));
    let of_kind = |k| -> Vec<bool> {
        remote
            .skeleton
            .sections()
            .iter()
            .map(|s| s.kind == k && !all)
            .collect()
    };
    let memory: Vec<bool> = of_kind(kind::MEMORY)
        .iter()
        .zip(of_kind(kind::MEMORY_DIFF))
        .map(|(a, b)| *a || b)
        .collect();
    let disk = of_kind(kind::DISK);
    let on_demand: Vec<bool> = memory.iter().zip(&disk).map(|(m, d)| m | d).collect();
    let count = |of: &[bool]| {
        remote
            .skeleton
            .chunks()
            .iter()
            .filter(|c| c.codec != Codec::Zero && of[c.section as usize])
            .count() as u64
    };
    let (memory_chunks, disk_chunks) = (count(&memory), count(&disk));
    // Each on-demand chunk's frames, from the end of the previous chunk of its section (a
    // bounded gap: padding to the next page at most, in the packs vmpack writes).
    let mut deferred = Vec::new();
    let mut prev: Option<(u32, u64)> = None;
    for c in remote.skeleton.chunks() {
        let start = match prev {
            Some((sec, end)) if sec == c.section => end,
            _ => c.frame_offset(),
        };
        if on_demand[c.section as usize]
            && c.codec != Codec::Zero
            && start <= c.frame_offset()
            && c.payload_offset - start <= 1 << 20
        {
            deferred.push(Deferred {
                start,
                payload_offset: c.payload_offset,
                pieces: Default::default(),
            });
        }
        prev = Some((c.section, c.payload_offset + c.clen as u64));
    }
    deferred.sort_by_key(|d| d.payload_offset);
    let fetch = Arc::new(RegistryFetch {
        deferred,
        client,
        remote,
        cache,
        file: file.try_clone()?,
        memory,
        disk,
        counters: Arc::new(Counters {
            fetched_blobs: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            cached_blobs: AtomicU64::new(0),
            cached_bytes: AtomicU64::new(0),
            memory_left: AtomicU64::new(memory_chunks),
            resident_ms: std::sync::OnceLock::new(),
            disk_left: AtomicU64::new(disk_chunks),
            disks_ms: std::sync::OnceLock::new(),
            started,
        }),
        quiet,
    });
    let skel = &fetch.remote.skeleton;
    // Everything the restore reads before the vCPUs run, fetched in parallel.
    let eager: Vec<&ChunkEntry> = skel
        .chunks()
        .iter()
        .filter(|c| c.codec != Codec::Zero && !on_demand[c.section as usize])
        .collect();
    // Frames, padding, index and trailer around the payloads (holes, or put in place by the
    // fetches running meanwhile: they write disjoint bytes).
    let write_skeleton = || -> Result<f64> {
        let skip = std::cell::Cell::new(0u64);
        let mut w = Sparse {
            file: &file,
            pos: 0,
            skip: &skip,
            pending: Vec::new(),
            pending_at: 0,
            deferred: &fetch.deferred,
            next: 0,
        };
        skel.write_pack(&mut w, &mut |c, w| {
            skip.set(c.clen as u64);
            let mut left = c.clen as usize;
            while left > 0 {
                let n = left.min(NOTHING.len());
                w.write_all(&NOTHING[..n])?;
                left -= n;
            }
            Ok(())
        })?;
        w.flush()?;
        Ok(ms())
    };
    let (written, fetched) = std::thread::scope(|s| {
        let writer = s.spawn(write_skeleton);
        let fetched = vmpack_registry::oci::parallel_for(
            eager.len(),
            fetch.client.options().parallel.max(1),
            &|i| fetch.fetch_chunk(eager[i]),
        )
        .map(|()| ms());
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(anyhow!("writing the local pack file failed")));
        (written, fetched)
    });
    phases.push((
        if all {
            "state, boot files, disks, memory"
        } else {
            "state, boot files"
        },
        fetched?,
    ));
    phases.push(("skeleton written", written?));
    phases.sort_by(|a, b| a.1.total_cmp(&b.1));
    Ok(RemotePackFile {
        path,
        fetch,
        phases,
        confirm,
        _dir: dir,
    })
}

impl RemotePackFile {
    /// Whether the reference still points to the pack this file is (always, unless the
    /// manifest came from the cache and the tag moved since: then prepare again without it).
    pub fn confirmed(&mut self) -> Result<bool> {
        let Some((digest, handle)) = self.confirm.take() else {
            return Ok(true);
        };
        let now = handle
            .join()
            .map_err(|_| anyhow!("asking the registry for the tag's digest failed"))??;
        Ok(now.as_deref() == Some(digest.as_str()))
    }

    /// The digest of the manifest (or image index) restored.
    pub fn digest(&self) -> &str {
        &self.fetch.remote.digest
    }

    pub fn root_digest(&self) -> [u8; 32] {
        self.fetch.remote.skeleton.root_digest()
    }
}

impl RemotePackFile {
    /// For a diff pack: its parent as the registry's config names it (untrusted: checked
    /// against the pack's own manifest by the caller).
    pub fn parent_link(&self) -> Option<&vmpack_registry::ParentLink> {
        self.fetch.remote.parent.as_ref()
    }
}

/// The fetchers of a chain restored from a registry, base first (the order of the lazy
/// restore's `ChunkTable::packs`): a chunk of pack k comes through fetcher k; the restored
/// pack, the last, serves its own disks.
pub struct ChainFetch(pub Vec<Arc<RegistryFetch>>);

impl vmboot::vstate::lazy::ChunkFetch for ChainFetch {
    fn fetch(&self, e: &ChunkEntry) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let f = self.0.last().expect("a chain has its child");
        f.fetch_chunk(e).map_err(Into::into)
    }
    fn fetch_from(
        &self,
        pack: usize,
        e: &ChunkEntry,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let f = self
            .0
            .get(pack)
            .ok_or_else(|| anyhow!("no pack {pack} in the chain"))?;
        f.fetch_chunk(e).map_err(Into::into)
    }
}
