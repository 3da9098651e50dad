//! Saving a running VM into a `.vmpack` and building a VM back from one.
//!
//! The pack holds, after the manifest and boot files, the vCPU/device state (JSON, see
//! `docs/FORMAT.md`), the disks as of the pause, and one section per guest RAM region.
//! The state comes before memory so a restore reading from a pipe refuses a host that cannot
//! run the guest before the bulk of the bytes arrives (it takes memory first too).

use crate::compat;
use crate::memory::GuestMemoryInit;
use crate::packs::{Context, Error, Result};
use crate::persist::VmState;
use crate::vmm::ValidState;
use crate::vmm::{BootFiles, BootPayload, ExitReason, RunOptions, Vm, VmHandle};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmpack_formats::config::{CpuTemplate, DiskFormat, VmConfig};
use vmpack_formats::diff::ChunkMap;
use vmpack_formats::pack::{
    Codec, Compression, PackError, SectionSource, StreamEvent, StreamReader, WriteOptions,
};
use vmpack_formats::vm::{Manifest, VmPack, VmPackPlan};

use crate::packs::{DISK_CHUNK_SIZE, MEMORY_CHUNK_SIZE};
use crate::persist::MAX_VMSTATE_LEN;
use crate::verified_cache;

pub use crate::api::SaveStats;

/// Saves the VM behind `handle` as a pack to `out`.
///
/// The VM is paused while its state is captured and its disks are frozen (writes from then
/// on keep the old content of a block first, `crate::disk_snapshot`). With `resume_after`,
/// and when a copy fits in memory, the guest's resident RAM is copied while paused and the
/// guest resumes at once: hashing, compressing and writing then run from the copy and the
/// frozen disks, so the pause is the capture plus one memcpy instead of the whole write,
/// writable disks or not. Otherwise the VM stays paused until the pack is written, and
/// resumes after it only if `resume_after`.
pub fn save(
    handle: &VmHandle,
    compression: Compression,
    level: Option<i32>,
    resume_after: bool,
    out: &mut dyn Write,
) -> Result<SaveStats> {
    save_with(handle, compression, level, resume_after, None, out)
}

/// [`save`], or with `diff_from` a diff pack holding only the memory chunks written since
/// guest memory equalled that parent pack (see `crate::diff`).
pub fn save_with(
    handle: &VmHandle,
    compression: Compression,
    level: Option<i32>,
    resume_after: bool,
    diff_from: Option<&vmpack_formats::diff::ParentRef>,
    out: &mut dyn Write,
) -> Result<SaveStats> {
    // Refused before the pause: the VM must know the parent.
    let parent_mark = match diff_from {
        Some(p) => Some(
            handle
                .pack_mark(&p.root_digest)
                .ok_or_else(|| crate::diff::unknown_parent(&p.root_digest))?,
        ),
        None => None,
    };
    let t = Instant::now();
    handle.pause()?;
    // A lazily restored VM is complete (and its pack's boot files checked) only once its
    // loader has placed every chunk; one whose pack failed verification is never saved.
    let captured = (|| -> Result<_> {
        let state = handle
            .save_state()
            .context("capturing vCPU and device state")?;
        if let Some(e) = handle.memory_failure() {
            return Err(Error::Refused(e));
        }
        let state_bytes = serde_json::to_vec(&state).map_err(|source| Error::Encode {
            what: "serializing the vm state".into(),
            source,
        })?;
        let (maps, disk_maps) = match parent_mark {
            Some(m) => (
                Some(crate::diff::changed_chunks(handle, m, MEMORY_CHUNK_SIZE)?),
                crate::diff::changed_disk_chunks(handle, m, DISK_CHUNK_SIZE),
            ),
            None => (None, Vec::new()),
        };
        // Guest memory now equals the pack being written: later diffs start here.
        let mark = handle.dirty_mark().ok();
        let to_copy = maps
            .as_ref()
            .map(|m| m.iter().map(|m| m.section_size()).sum());
        // The pack reads each disk as of this instant, whatever the guest writes once it
        // runs again (see `crate::disk_snapshot`).
        let disks = handle.freeze_disks()?;
        let early = resume_after && copy_fits(handle, to_copy);
        let copy = if early {
            Some(copy_ram(handle, maps.as_deref())?)
        } else {
            // Paused until the pack is written: the image files get what the guest wrote
            // (qcow2 metadata included) at no cost to the guest, as before a stop.
            handle.flush_disks()?;
            None
        };
        Ok((state_bytes, copy, maps, mark, disks, disk_maps))
    })();
    let (state_bytes, copy, maps, mark, disks, disk_maps) = match captured {
        Ok(c) => c,
        Err(e) => {
            if resume_after {
                let _ = handle.resume();
            }
            return Err(e);
        }
    };
    let diff = match (diff_from, maps) {
        (Some(p), Some(m)) => Some((p.clone(), m, disk_maps)),
        _ => None,
    };
    let diff_bytes = diff
        .as_ref()
        .map(|(_, m, _)| m.iter().map(|m| m.section_size()).sum());
    let mut pause = None;
    if copy.is_some() {
        handle.resume()?;
        pause = Some(t.elapsed());
    }
    let disk_sources: Vec<&dyn SectionSource> =
        disks.iter().map(|d| d as &dyn SectionSource).collect();
    let written = match &copy {
        Some(regions) => {
            let memory: Vec<(u64, &dyn SectionSource)> = regions
                .iter()
                .map(|r| (r.gpa, r as &dyn SectionSource))
                .collect();
            write_pack(
                handle,
                &state_bytes,
                (memory, disk_sources),
                diff,
                compression,
                level,
                out,
            )
        }
        None => handle.with_memory(|regions| {
            let sources: Vec<RamSource> = regions
                .iter()
                .zip(handle.memory_data_ranges())
                .map(|((_, bytes), ranges)| RamSource { bytes, ranges })
                .collect();
            let memory: Vec<(u64, &dyn SectionSource)> = regions
                .iter()
                .zip(&sources)
                .map(|((gpa, _), src)| (*gpa, src as &dyn SectionSource))
                .collect();
            write_pack(
                handle,
                &state_bytes,
                (memory, disk_sources),
                diff,
                compression,
                level,
                out,
            )
        }),
    };
    let disk_kept_bytes = disks.iter().map(|d| d.kept_bytes()).sum();
    // The freeze ends with the pack (written or not): kept old content is dropped.
    drop(disks);
    let pause = pause.unwrap_or_else(|| t.elapsed());
    if copy.is_none() && resume_after {
        handle.resume()?;
    }
    let summary = written?;
    Ok(SaveStats {
        pause_ms: pause.as_secs_f64() * 1000.0,
        bytes: summary.bytes_written,
        root_digest: hex::encode(summary.root_digest),
        compress: compression,
        parent: diff_from.map(|p| p.root_digest.clone()),
        diff_bytes,
        live: None,
        disk_kept_bytes,
        mark,
    })
}

/// What a diff pack stores: its parent, per RAM region the memory chunks, per disk the disk
/// chunks (None: that disk whole).
pub(crate) type DiffPlan = (
    vmpack_formats::diff::ParentRef,
    Vec<vmpack_formats::diff::ChunkMap>,
    Vec<Option<vmpack_formats::diff::ChunkMap>>,
);

/// Guest RAM regions as `(gpa, contents)`.
pub(crate) type MemorySources<'a> = Vec<(u64, &'a dyn SectionSource)>;

pub(crate) fn write_pack(
    handle: &VmHandle,
    state_bytes: &[u8],
    (memory, disks): (MemorySources<'_>, Vec<&dyn SectionSource>),
    diff: Option<DiffPlan>,
    compression: Compression,
    level: Option<i32>,
    out: &mut dyn Write,
) -> Result<vmpack_formats::pack::PackSummary> {
    let boot_sources = payload_sources(handle.boot_payload());
    let boot: Vec<(&str, &dyn SectionSource)> =
        boot_sources.iter().map(|(r, s)| (*r, &**s)).collect();
    let opts = WriteOptions {
        compression,
        level,
        // Uncompressed memory stays page-aligned so restore can map it instead of copying.
        aligned: compression == Compression::None,
        ..WriteOptions::default()
    };
    let files_in_memory = match handle.initrd_at() {
        Some((gpa, len)) if diff.is_none() && held_in_memory(&boot, &memory, gpa, len)? => {
            vec![("initrd", gpa)]
        }
        _ => Vec::new(),
    };
    let (diff, disk_diff) = match diff {
        Some((p, maps, disk_maps)) => (Some((p, maps)), disk_maps),
        None => (None, Vec::new()),
    };
    let plan = VmPackPlan {
        memory,
        vmstate: Some(state_bytes),
        disks: Some(disks),
        files: Some(boot),
        memory_chunk_size: Some(MEMORY_CHUNK_SIZE),
        files_in_memory,
        diff,
        live: false,
    };
    let mut prepared = vmpack_formats::vm::PreparedPack::new(handle.config(), plan)?;
    // A diff pack stores each disk as the chunks written since the parent.
    if !disk_diff.is_empty() {
        prepared.set_disk_diffs(disk_diff)?;
    }
    let counted = CountingWriter { inner: out, n: 0 };
    Ok(prepared.write(counted, &opts, "<output>", &())?)
}

/// Writes the head of a live save's pack (FORMAT.md §12, "Live saves"): manifest, boot
/// files and each region's base memory section from `memory` (the running guest's RAM);
/// the returned tail writes the rest once the VM was paused. `disk_sizes` are the sizes of
/// the disks the tail will be given. Also returns where the pack records the initrd in
/// guest memory, if it does (call after the dirty mark: the record holds if none of those
/// bytes is written before the pause, which the caller checks).
#[allow(clippy::type_complexity)]
pub(crate) fn write_live_head<'o>(
    handle: &VmHandle,
    memory: MemorySources<'_>,
    disk_sizes: &[u64],
    compression: Compression,
    level: Option<i32>,
    out: &'o mut dyn Write,
) -> Result<(
    vmpack_formats::vm::LiveTail<&'o mut dyn Write>,
    Option<(u64, u64)>,
)> {
    let boot_sources = payload_sources(handle.boot_payload());
    let boot: Vec<(&str, &dyn SectionSource)> =
        boot_sources.iter().map(|(r, s)| (*r, &**s)).collect();
    let sized: Vec<SizeOnly> = disk_sizes.iter().map(|&n| SizeOnly(n)).collect();
    let opts = WriteOptions {
        compression,
        level,
        aligned: compression == Compression::None,
        ..WriteOptions::default()
    };
    let initrd = match handle.initrd_at() {
        Some((gpa, len)) if held_in_memory(&boot, &memory, gpa, len)? => Some((gpa, len)),
        _ => None,
    };
    let plan = VmPackPlan {
        memory,
        vmstate: Some(b"{}"),
        disks: Some(sized.iter().map(|d| d as &dyn SectionSource).collect()),
        files: Some(boot),
        memory_chunk_size: Some(MEMORY_CHUNK_SIZE),
        files_in_memory: initrd.map(|(gpa, _)| ("initrd", gpa)).into_iter().collect(),
        diff: None,
        live: true,
    };
    let prepared = vmpack_formats::vm::PreparedPack::new(handle.config(), plan)?;
    let recorded = prepared
        .manifest()
        .file("initrd")
        .and_then(|f| Some((f.in_memory?, f.size)));
    Ok((prepared.write_head(out, &opts, &())?, recorded))
}

/// A disk's size for a live pack's manifest, written before the disk is frozen; never read.
struct SizeOnly(u64);

impl SectionSource for SizeOnly {
    fn len(&self) -> u64 {
        self.0
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other(
            "a live pack's disk is read only after the pause",
        ))
    }
}

/// Whether guest RAM (`memory`, as `(gpa, contents)`) still holds the boot initrd byte for
/// byte at `gpa`, so the pack can record it there instead of storing it a second time.
fn held_in_memory(
    boot: &[(&str, &dyn SectionSource)],
    memory: &[(u64, &dyn SectionSource)],
    gpa: u64,
    len: u64,
) -> Result<bool> {
    let Some((_, file)) = boot.iter().find(|(role, _)| *role == "initrd") else {
        return Ok(false);
    };
    let Some((base, ram)) = memory
        .iter()
        .find(|(base, ram)| gpa >= *base && gpa + len <= *base + ram.len())
    else {
        return Ok(false);
    };
    if file.len() != len {
        return Ok(false);
    }
    const STEP: u64 = 1 << 20;
    let (mut a, mut b) = (vec![0u8; STEP as usize], vec![0u8; STEP as usize]);
    let mut off = 0;
    while off < len {
        let n = STEP.min(len - off) as usize;
        file.read_at(&mut a[..n], off)
            .context("reading the initrd to compare it with guest RAM")?;
        ram.read_at(&mut b[..n], gpa - base + off)
            .context("reading guest RAM")?;
        if a[..n] != b[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// Whether copying the guest's resident RAM leaves this host comfortable: at most half of
/// what the kernel reports as available.
pub(crate) fn copy_fits(handle: &VmHandle, bytes: Option<u64>) -> bool {
    let resident: u64 = bytes.unwrap_or_else(|| {
        handle
            .memory_data_ranges()
            .iter()
            .flatten()
            .map(|r| r.end - r.start)
            .sum()
    });
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024);
    resident <= available / 2
}

/// A private copy of one guest RAM region's resident pages, taken while the VM is paused.
/// Pages that were not resident stay untouched (zero, costing nothing) in the copy.
pub(crate) struct RamCopy {
    pub(crate) gpa: u64,
    pub(crate) ptr: *mut u8,
    pub(crate) len: usize,
    pub(crate) ranges: Vec<std::ops::Range<u64>>,
}

// SAFETY: the mapping is owned by the struct and only read after the copy is made.
unsafe impl Send for RamCopy {}
// SAFETY: see Send; shared access is read-only.
unsafe impl Sync for RamCopy {}

impl Drop for RamCopy {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is the mapping made in `copy_ram`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl RamCopy {
    /// An empty (all zero, nothing resident) private copy of a region of `len` bytes at
    /// `gpa`, holding data nowhere yet.
    pub(crate) fn new(gpa: u64, len: usize) -> Result<RamCopy> {
        let ptr = crate::vstate::memory::map_anonymous(len)
            .context("mapping a copy of guest RAM for the save")?;
        Ok(RamCopy {
            gpa,
            ptr,
            len,
            ranges: Vec::new(),
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: a live private mapping of `len` bytes, no longer written.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl SectionSource for RamCopy {
    fn len(&self) -> u64 {
        self.len as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.bytes().read_at(buf, offset)
    }
    fn data_ranges(&self) -> std::io::Result<Vec<std::ops::Range<u64>>> {
        Ok(self.ranges.clone())
    }
}

/// Copies `copy.ranges` of `src` into `copy` on every core: the copy runs while the guest is
/// paused, and its cost is mostly first-touch page faults, which spread across cores.
fn parallel_copy(src: &[u8], copy: &RamCopy) {
    const PIECE: u64 = 8 << 20;
    let pieces: Vec<std::ops::Range<u64>> = copy
        .ranges
        .iter()
        .flat_map(|r| {
            (r.start..r.end)
                .step_by(PIECE as usize)
                .map(move |a| a..(a + PIECE).min(r.end))
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dst = copy.ptr as usize;
    let worker = || loop {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(r) = pieces.get(i) else { break };
        let (a, b) = (r.start as usize, r.end as usize);
        // SAFETY: `a..b` lies inside both the region and its same-sized copy, and no two
        // pieces overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(src[a..b].as_ptr(), (dst as *mut u8).add(a), b - a)
        };
    };
    std::thread::scope(|s| {
        // Helpers only speed the copy up: with none, this thread copies everything.
        let mut handles = Vec::new();
        for _ in 1..threads.min(pieces.len()) {
            match std::thread::Builder::new().spawn_scoped(s, worker) {
                Ok(h) => handles.push(h),
                Err(_) => break,
            }
        }
        worker();
        // Joined, not just left to the scope: a join also waits for the threads' exit.
        for h in handles {
            let _ = h.join();
        }
    });
}

/// Copies the resident RAM of every region, or with `only` just the chunks marked there.
fn copy_ram(
    handle: &VmHandle,
    only: Option<&[vmpack_formats::diff::ChunkMap]>,
) -> Result<Vec<RamCopy>> {
    // The chunks of a diff were written since the parent: resident, no need to look.
    let ranges = match only {
        Some(maps) => maps
            .iter()
            .map(|m| crate::diff::intersect(std::slice::from_ref(&(0..m.region_size)), m))
            .collect(),
        None => handle.memory_data_ranges(),
    };
    handle.with_memory(|regions| {
        let mut copies = Vec::with_capacity(regions.len());
        for ((gpa, src), ranges) in regions.iter().zip(ranges) {
            let src: &[u8] = src;
            let mut copy = RamCopy::new(*gpa, src.len())?;
            copy.ranges = ranges;
            parallel_copy(src, &copy);
            copies.push(copy);
        }
        Ok(copies)
    })
}

/// A guest RAM region whose untouched pages are known to be zero.
struct RamSource<'a> {
    bytes: &'a [u8],
    ranges: Vec<std::ops::Range<u64>>,
}

impl SectionSource for RamSource<'_> {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.bytes.read_at(buf, offset)
    }
    fn data_ranges(&self) -> std::io::Result<Vec<std::ops::Range<u64>>> {
        Ok(self.ranges.clone())
    }
}

fn payload_sources(p: &BootFiles) -> Vec<(&'static str, Box<dyn SectionSource + '_>)> {
    let mut v: Vec<(&'static str, Box<dyn SectionSource + '_>)> = Vec::new();
    match p {
        BootFiles::Bytes(p) => {
            for (role, bytes) in [
                ("kernel", &p.kernel),
                ("initrd", &p.initrd),
                ("image", &p.image),
            ] {
                if let Some(b) = bytes {
                    v.push((role, Box::new(b.as_slice())));
                }
            }
        }
        BootFiles::Pack(pack) => {
            for f in &pack.manifest().files {
                let role = match f.role.as_str() {
                    "kernel" => "kernel",
                    "initrd" => "initrd",
                    "image" => "image",
                    _ => continue,
                };
                if let Ok(src) = pack.boot_file_range(f) {
                    v.push((role, Box::new(src)));
                }
            }
        }
        BootFiles::Stream { payload, initrd } => {
            for (role, bytes) in [
                ("kernel", &payload.kernel),
                ("initrd", &payload.initrd),
                ("image", &payload.image),
            ] {
                if let Some(b) = bytes {
                    v.push((role, Box::new(b.as_slice())));
                }
            }
            if let Some(b) = initrd.get() {
                v.push(("initrd", Box::new(b.as_slice())));
            }
        }
    }
    v
}

struct CountingWriter<'a> {
    inner: &'a mut dyn Write,
    n: u64,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// When restore checks chunk hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VerifyPolicy {
    /// Verify every chunk the first time a pack file is restored on this host, then remember
    /// it (keyed by root digest and the file's identity); later restores check only the
    /// index digest. A pack read from a pipe is always verified.
    Auto,
    /// Verify every chunk on every restore.
    Always,
}

/// How restore fills guest RAM from a pack file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MemoryPolicy {
    /// Lazy when the pack file has not been verified on this host yet or its memory is
    /// compressed, eager otherwise (an already verified uncompressed pack is mapped, which is
    /// as fast and faults nothing through vmboot). Eager with `--verify always`.
    #[default]
    Auto,
    /// Serve guest memory on first touch, each chunk verified before the guest sees it; a
    /// background thread fills the rest (docs/FORMAT.md §12.4).
    Lazy,
    /// Verify (per `--verify`) and map or decompress all memory before the vCPUs run.
    Eager,
}

/// Where restore reads the pack from.
pub enum PackInput {
    File(PathBuf),
    /// Standard input (a pipe): read once, front to back.
    Stdin,
}

/// What a restore reports while it prepares and runs the VM; the caller (a binary) prints it.
#[derive(Clone, Debug, PartialEq)]
pub enum RestoreEvent {
    /// Something the user should know that does not stop the restore.
    Warning(String),
    /// The VM is built and about to run.
    Restored {
        elapsed: Duration,
        /// How memory was filled, and whether the pack was verified (see [`RestoreInfo`]).
        memory_path: &'static str,
        verified: &'static str,
    },
    /// With [`RestoreOptions::bench_timestamps`]: `CLOCK_MONOTONIC` in ns at a milestone:
    /// `restored` (vCPUs starting), `first-exit` (vCPU 0's first exit), `resident` (a lazy
    /// restore's last chunk in place).
    Stamp { what: &'static str, ns: u128 },
}

/// Receives a restore's [`RestoreEvent`]s, from any thread.
#[derive(Clone, Default)]
pub struct Reporter(Option<Arc<dyn Fn(RestoreEvent) + Send + Sync>>);

impl Reporter {
    pub fn new(f: impl Fn(RestoreEvent) + Send + Sync + 'static) -> Self {
        Reporter(Some(Arc::new(f)))
    }
    fn report(&self, e: RestoreEvent) {
        if let Some(f) = &self.0 {
            f(e);
        }
    }
}

impl RestoreEvent {
    /// The line a binary called `prog` prints for this event.
    pub fn message(&self, prog: &str) -> String {
        match self {
            RestoreEvent::Warning(w) => format!("{prog}: warning: {w}"),
            RestoreEvent::Restored {
                elapsed,
                memory_path,
                verified,
            } => format!(
                "{prog}: restored in {:.1} ms (memory: {memory_path}; {verified})",
                elapsed.as_secs_f64() * 1000.0
            ),
            RestoreEvent::Stamp { what, ns } => format!("vmboot-bench: {what}-monotonic-ns {ns}"),
        }
    }
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Reporter(..)"
        } else {
            "Reporter(none)"
        })
    }
}

pub struct RestoreOptions {
    /// Where [`RestoreEvent`]s go (default: nowhere).
    pub report: Reporter,
    /// Report [`RestoreEvent::Stamp`]s (for `vmpack bench-snapshot`).
    pub bench_timestamps: bool,
    pub verify: VerifyPolicy,
    /// How guest RAM is filled (file input only: a pipe is always read whole first).
    pub memory: MemoryPolicy,
    pub run: RunOptions,
    /// Folder in which a fresh per-restore folder holds the private copies of the pack's
    /// disks (removed when the VM ends). The library reads no environment variable: the
    /// binaries pass `std::env::temp_dir()` (which honours `TMPDIR`) or a folder of their own.
    pub work_dir: PathBuf,
    /// Where memory chunks come from. With [`ChunkSource::Fetch`] the pack file holds
    /// everything but memory payloads (a restore from a registry): memory is then always
    /// served lazily, each chunk fetched and verified on first touch.
    pub source: crate::vstate::lazy::ChunkSource,
    /// For a diff pack: its parent pack file, instead of the one its manifest names in its
    /// folder.
    pub parent: Option<PathBuf>,
}

/// What restore did before handing over the VM, for messages and `inspect`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RestoreInfo {
    pub memory_path: &'static str,
    pub verified: &'static str,
    pub prepare_ms: f64,
    pub warnings: Vec<String>,
}

/// Builds a VM from a pack, checked before any vCPU runs: integrity (per `verify`), format
/// version, host CPU compatibility. The pack file is only read.
pub fn restore(input: PackInput, opts: RestoreOptions) -> Result<(Vm, RestoreInfo)> {
    match input {
        PackInput::File(p) => restore_file(&p, opts),
        PackInput::Stdin => restore_stream(std::io::stdin().lock(), "-", opts),
    }
}

fn restore_file(path: &Path, opts: RestoreOptions) -> Result<(Vm, RestoreInfo)> {
    let started = Instant::now();
    let pack = Arc::new(VmPack::open(path)?);
    let label = path.display().to_string();
    let manifest = pack.manifest();
    let state_section = manifest.vmstate.as_deref().ok_or_else(|| {
        Error::Refused(format!("{label}: the pack holds a VM at rest, not a saved one (no vmstate section); boot it with `vmpack run`"))
    })?;
    let reader = pack.reader();
    let known = verified_cache::is_verified(path, reader.root_digest());
    // With a fetcher (from a registry), every pack of the chain is a local skeleton its
    // `ChunkFetch::fetch_from` fills, so the chain is served lazily.
    let chain = match manifest.parent {
        Some(_) => Some(Arc::new(vmpack_formats::diff::open_chain(
            path,
            opts.parent.as_deref(),
        )?)),
        // A live save's pack: a chain of one, whose memory is two layers (base, overlay).
        None if manifest.has_overlays() => {
            if matches!(opts.source, crate::vstate::lazy::ChunkSource::Fetch(_)) {
                return Err(Error::Unsupported(format!("{label}: a live save's pack (memory with overlays) cannot be run from a registry; push a pack made by `vmpack flatten`")));
            }
            Some(Arc::new(vmpack_formats::diff::open_chain(path, None)?))
        }
        None => None,
    };
    let eager_path = manifest.memory_restore_path(reader).unwrap_or("none");
    let remote = matches!(opts.source, crate::vstate::lazy::ChunkSource::Fetch(_));
    if remote && !crate::vstate::lazy::available() {
        return Err(Error::Unsupported(format!("{label}: memory on demand needs userfaultfd, which this process cannot use (vm.unprivileged_userfaultfd=1 or CAP_SYS_PTRACE)")));
    }
    if chain.is_some() && opts.memory == MemoryPolicy::Lazy && !crate::vstate::lazy::available() {
        return Err(Error::Unsupported(format!("{label}: --memory lazy needs userfaultfd, which this process cannot use (vm.unprivileged_userfaultfd=1 or CAP_SYS_PTRACE); use --memory eager")));
    }
    let lazy = match opts.memory {
        _ if remote => true,
        // A chain of diff packs is served lazily only when asked: `auto` maps it (or unpacks
        // it); a live save's pack follows the rule of any single pack.
        _ if manifest.parent.is_some() => opts.memory == MemoryPolicy::Lazy,
        MemoryPolicy::Eager => false,
        MemoryPolicy::Lazy => true,
        MemoryPolicy::Auto => {
            opts.verify == VerifyPolicy::Auto
                && !manifest.memory.is_empty()
                && (!known || eager_path != "mmap")
                && crate::vstate::lazy::available()
        }
    };

    let verified = if lazy {
        // Memory and disks are verified chunk by chunk as they are placed; the rest now.
        verify_except_memory(reader)?;
        "index and state verified; each memory and disk chunk verified on first touch, boot files in the background"
    } else {
        match opts.verify {
            VerifyPolicy::Always => {
                reader.verify(&())?;
                "verified every chunk"
            }
            VerifyPolicy::Auto => {
                if known {
                    "index digest checked; chunks verified on an earlier restore"
                } else {
                    reader.verify(&())?;
                    verified_cache::record(path, reader.root_digest());
                    "verified every chunk (first restore of this file)"
                }
            }
        }
    };

    // The parents, verified as the pack itself (each recorded under its own file); served
    // lazily, each chunk they give the child is verified on first touch instead.
    if let (Some(chain), false) = (&chain, lazy) {
        for p in &chain.packs[..chain.packs.len() - 1] {
            let r = p.reader();
            let always = opts.verify == VerifyPolicy::Always;
            if always || !verified_cache::is_verified(p.path(), r.root_digest()) {
                r.verify(&())?;
                if !always {
                    verified_cache::record(p.path(), r.root_digest());
                }
            }
        }
    }
    let work = WorkDir::new(&opts.work_dir)?;
    let (cfg, state) = checked_state(&pack, state_section, &label, &work.path)?;
    let warnings = check_host(&state, &cfg, &label)?;
    let mut run = opts.run;
    match (lazy, &chain) {
        // The vCPUs start before the disks are copied: each is filled on first touch and in
        // the background (`vstate::lazy_disk`).
        (true, None) => run.disks = lazy_disks(&pack, &work.path, &opts.source)?,
        // A diff pack's disks: each chunk from the newest pack of the chain holding it.
        (true, Some(chain)) => run.disks = lazy_chain_disks(chain, &work.path)?,
        (false, None) => extract_disks(&pack, &work.path)?,
        (false, Some(chain)) => {
            for i in 0..manifest.disks.len() {
                extract_chain_disk(chain, i, &disk_copy_path(&work.path, i), false)?;
            }
        }
    }

    let (memory_path, init) = if let (Some(chain), true) = (&chain, lazy) {
        let init = lazy_init(
            &pack,
            crate::diff::chain_table(chain)?,
            path,
            opts.verify,
            opts.source,
            opts.bench_timestamps.then(|| opts.report.clone()),
            &run.disks,
        )?;
        (
            if manifest.parent.is_some() {
                "lazy, layered over the parent packs"
            } else {
                "lazy, base and overlay layered"
            },
            init,
        )
    } else if let Some(chain) = &chain {
        let init = crate::diff::chain_memory(chain)?;
        let how = match (&init, manifest.parent.is_some()) {
            (GuestMemoryInit::MapLayers(_), true) => "mmap, layered over the parent packs",
            (GuestMemoryInit::MapLayers(_), false) => "mmap, base and overlay layered",
            (_, true) => "decompress, layered over the parent packs",
            (_, false) => "decompress, base and overlay layered",
        };
        (how, init)
    } else if lazy {
        let stamps = opts.bench_timestamps.then(|| opts.report.clone());
        let sections = memory_sections(&pack, manifest, &state, &label)?;
        let init = lazy_init(
            &pack,
            crate::vstate::lazy::ChunkTable::of_pack(pack.clone(), &sections),
            path,
            opts.verify,
            opts.source,
            stamps,
            &run.disks,
        )?;
        ("lazy", init)
    } else {
        let init = memory_init(&pack, manifest, &state, eager_path == "mmap", &label)?;
        (eager_path, init)
    };
    let prepare_ms = started.elapsed().as_secs_f64() * 1000.0;
    let files = match &chain {
        // A diff pack's boot files are its base's (the same VM's).
        Some(chain) => BootFiles::Pack(Arc::new(crate::diff::base_with_files(chain)?)),
        None => BootFiles::Pack(pack.clone()),
    };
    let work_path = work.path.clone();
    let filled = run.disks.clone();
    let vm = work.hand_over(run, |run| Vm::restore(&cfg, state, init, files, run))?;
    // Guest memory equals this pack at mark 0: a save can be a diff against it.
    vm.controller()
        .note_pack(&hex::encode(pack.reader().root_digest()), 0);
    if !manifest.disks.is_empty() {
        let pack = pack.clone();
        vm.controller().set_disk_reset(Box::new(move |i| {
            // A lazily filled copy is complete first, so no fill lands after the copy.
            if let Some(d) = filled.get(i) {
                d.fill_all()?;
            }
            let copy = disk_copy_path(&work_path, i);
            match &chain {
                Some(chain) => extract_chain_disk(chain, i, &copy, true),
                None => extract_disk(&pack, i, &copy, true),
            }
            .map_err(Into::into)
        }));
    }
    Ok((
        vm,
        RestoreInfo {
            memory_path,
            verified,
            prepare_ms,
            warnings,
        },
    ))
}

/// The config and saved state of a pack, with every check that needs no KVM: the config
/// built only from the pack's own sections, the vmstate's parse (every KVM structure of
/// exactly its size), its agreement with the config, and each memory section matching a
/// saved RAM region. Nothing is written; `work` only names where disk copies would go.
fn checked_state(
    pack: &VmPack,
    state_section: &str,
    label: &str,
    work: &Path,
) -> Result<(VmConfig, ValidState)> {
    let manifest = pack.manifest();
    let reader = pack.reader();
    let cfg = pack_config(manifest, label, work)?;
    let s = reader
        .section(state_section)
        .ok_or_else(|| Error::Refused(format!("{label}: section '{state_section}' is missing")))?;
    let state_bytes = reader.read_section(s.id, MAX_VMSTATE_LEN)?;
    let state = parse_state(&state_bytes, label, state_section, &cfg)?;
    check_memory_regions(manifest, &state, label)?;
    Ok((cfg, state))
}

/// Every check [`restore`] makes on a pack file before KVM is touched (for fuzzing and for
/// tools that vet a pack): [`VmPack::open`]'s, then the config and vmstate checks
/// ([`VmState::validate`], which includes each device's state: virtqueue sizes and
/// features). Only what needs an opened backend (a disk's size) is checked later, when the
/// devices are rebuilt.
pub fn check_pack_before_kvm(path: &Path) -> Result<()> {
    let pack = VmPack::open(path)?;
    let label = path.display().to_string();
    let Some(state_section) = pack.manifest().vmstate.clone() else {
        let _ = pack.config()?;
        return Ok(());
    };
    checked_state(&pack, &state_section, &label, Path::new("/nonexistent"))?;
    Ok(())
}

fn check_memory_regions(manifest: &Manifest, state: &VmState, label: &str) -> Result<()> {
    for m in &manifest.memory {
        if !state
            .memory_regions
            .iter()
            .any(|&(gpa, size)| gpa == m.gpa && size == m.size)
        {
            return Err(Error::Refused(format!(
                "{label}: section '{}': memory region {:#x}+{:#x} does not match the saved machine",
                m.section, m.gpa, m.size
            )));
        }
    }
    Ok(())
}

/// Verifies every chunk of every section the VM uses before it runs (a lazy restore checks
/// memory chunks as they are placed, and boot files, which only a later save reads, in the
/// background).
fn verify_except_memory(reader: &vmpack_formats::pack::PackReader) -> Result<()> {
    use vmpack_formats::pack::kind;
    for s in reader.sections() {
        // Memory (a diff pack's too) and disks are served, and checked, on first touch.
        if s.kind != kind::MEMORY
            && s.kind != kind::MEMORY_DIFF
            && s.kind != kind::FILE
            && s.kind != kind::DISK
            && s.kind != kind::DISK_DIFF
        {
            reader.for_each_chunk_parallel(s.id, true, 0, &|_, _| Ok(()))?;
        }
    }
    Ok(())
}

/// Guest memory served on first touch (`vstate::lazy`), with the touch order of an earlier
/// restore of this pack prefetched first. Once every memory chunk was checked, this
/// restore's touch order is kept; once the `disks` are complete too, the pack is recorded as
/// verified (under `--verify auto`).
#[allow(clippy::too_many_arguments)]
fn lazy_init(
    pack: &Arc<VmPack>,
    table: crate::vstate::lazy::ChunkTable,
    path: &Path,
    verify: VerifyPolicy,
    source: crate::vstate::lazy::ChunkSource,
    stamps: Option<Reporter>,
    disks: &crate::vstate::lazy_disk::LazyDisks,
) -> Result<GuestMemoryInit> {
    // A file filled on demand is temporary: it is never recorded as verified.
    let record = matches!(source, crate::vstate::lazy::ChunkSource::PackFile);
    // Recorded when memory and every disk are complete, whichever comes last: a record
    // lets a later restore trust the pack's disks without checking them.
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(1 + disks.0.len()));
    let done = {
        let (path, left) = (path.to_path_buf(), left.clone());
        let root = pack.reader().root_digest();
        Arc::new(move || {
            if left.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1
                && verify == VerifyPolicy::Auto
                && record
            {
                verified_cache::record(&path, root);
            }
        })
    };
    for d in &disks.0 {
        let done = done.clone();
        d.on_complete(Box::new(move || done()));
    }
    let root = pack.reader().root_digest();
    let chunks = table.chunks.len();
    let touch = crate::vstate::lazy::touch_dir(verified_cache::base_dir());
    let first = touch
        .as_deref()
        .map(|d| crate::vstate::lazy::touch_order::load(d, root, chunks))
        .unwrap_or_default();
    // The boot files: the pack's own, or a diff pack's base's (the table's first pack).
    let verify_later = table.packs[0]
        .reader()
        .sections()
        .iter()
        .filter(|s| s.kind == vmpack_formats::pack::kind::FILE)
        .map(|s| s.id)
        .collect();
    let had_order = !first.is_empty();
    let on_complete = move |order: Vec<usize>| {
        if let Some(r) = &stamps {
            r.report(RestoreEvent::Stamp {
                what: "resident",
                ns: monotonic_ns(),
            });
        }
        done();
        // The first restore's order is the one kept: later ones are skewed by the prefetch.
        if let (Some(d), false) = (touch, had_order) {
            crate::vstate::lazy::touch_order::store(&d, root, &order);
        }
    };
    Ok(GuestMemoryInit::Lazy(crate::vstate::lazy::LazySource {
        table,
        source,
        first,
        verify_later,
        on_complete: Some(Box::new(on_complete)),
    }))
}

/// Every disk of the pack as an empty sparse private copy in `dir` (where [`pack_config`]
/// points the config) that fills itself from the pack: on first touch, and in the
/// background once the VM runs.
fn lazy_disks(
    pack: &Arc<VmPack>,
    dir: &Path,
    source: &crate::vstate::lazy::ChunkSource,
) -> Result<crate::vstate::lazy_disk::LazyDisks> {
    let mut v = Vec::new();
    for (i, d) in pack.manifest().disks.iter().enumerate() {
        let copy = disk_copy_path(dir, i);
        drop(sparse_file(&copy, d.virtual_size)?);
        v.push(crate::vstate::lazy_disk::LazyDisk::new(
            i,
            &copy,
            d.read_only,
            pack.clone(),
            source.clone(),
            &d.section,
        )?);
    }
    Ok(crate::vstate::lazy_disk::LazyDisks(v))
}

/// A diff pack's disks as empty sparse private copies in `dir` that fill themselves from
/// the chain, each chunk from the newest pack holding it.
fn lazy_chain_disks(
    chain: &Arc<vmpack_formats::diff::Chain>,
    dir: &Path,
) -> Result<crate::vstate::lazy_disk::LazyDisks> {
    let child = chain.packs.last().expect("a chain holds the child");
    let packs = crate::diff::shared_packs(chain)?;
    let mut v = Vec::new();
    for (i, d) in child.manifest().disks.iter().enumerate() {
        let chunks = crate::diff::disk_chunks(chain, i)?;
        let copy = disk_copy_path(dir, i);
        drop(sparse_file(&copy, d.virtual_size)?);
        v.push(crate::vstate::lazy_disk::LazyDisk::layered(
            i,
            &copy,
            d.read_only,
            packs.clone(),
            chunks,
        )?);
    }
    Ok(crate::vstate::lazy_disk::LazyDisks(v))
}

/// Writes disk `i` of a diff pack, layered over its chain, to `copy` (see
/// [`extract_disk`] for `replace`).
fn extract_chain_disk(
    chain: &vmpack_formats::diff::Chain,
    i: usize,
    copy: &Path,
    replace: bool,
) -> Result<()> {
    let d = &chain
        .packs
        .last()
        .expect("a chain holds the child")
        .manifest()
        .disks[i];
    let f = open_disk_copy(copy, d.virtual_size, replace)?;
    crate::diff::write_disk_layers(chain, i, &f)
}

/// The private copy of a disk of `size` bytes: a new sparse file, or with `replace` the
/// existing `copy` emptied (the same inode, so a VM that has it open sees the new content).
fn open_disk_copy(copy: &Path, size: u64, replace: bool) -> Result<File> {
    if !replace {
        return sparse_file(copy, size);
    }
    use std::os::unix::fs::OpenOptionsExt;
    let f = File::options()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(copy)
        .with_context(|| format!("opening {}", copy.display()))?;
    f.set_len(0)
        .and_then(|()| f.set_len(size))
        .with_context(|| format!("emptying {}", copy.display()))?;
    Ok(f)
}

/// Writes every disk of the pack to its private raw copy in `dir` (where [`pack_config`]
/// points the config), so the guest's writes never reach the pack.
fn extract_disks(pack: &VmPack, dir: &Path) -> Result<()> {
    for i in 0..pack.manifest().disks.len() {
        extract_disk(pack, i, &disk_copy_path(dir, i), false)?;
    }
    Ok(())
}

/// Writes disk `i` of `pack` to a new file `copy`, or with `replace` over the existing
/// `copy` (emptied first, the same inode, so a VM that has it open sees the pack's disk
/// again: how a reset puts a written disk back).
fn extract_disk(pack: &VmPack, i: usize, copy: &Path, replace: bool) -> Result<()> {
    let reader = pack.reader();
    let label = pack.path().display().to_string();
    let d = &pack.manifest().disks[i];
    let s = reader
        .section(&d.section)
        .ok_or_else(|| Error::Refused(format!("{label}: section '{}' is missing", d.section)))?;
    let f = open_disk_copy(copy, d.virtual_size, replace)?;
    reader.for_each_chunk_parallel(s.id, false, 0, &|off, data| {
        use std::os::unix::fs::FileExt;
        f.write_all_at(data, off)
            .map_err(|e| io_pack_error(copy, e))
    })?;
    Ok(())
}

/// The private copy of disk `i` in a restore's work folder.
fn disk_copy_path(work: &Path, i: usize) -> PathBuf {
    work.join(format!("disk{i}.img"))
}

/// The config to build a pack's VM from, made so that nothing in the pack can name a host
/// path: the manifest's config is the only authority (docs/FORMAT.md §12), each of its
/// `[[disk]]`s must be one of the pack's disk sections and becomes the private raw copy in
/// `work`, each boot file must be one of the pack's files (the VM gets the bytes, never a
/// path), and a `[serial]` path is reduced to a name in `work` (output goes where the
/// command line says, never where the pack says).
pub fn pack_config(manifest: &Manifest, label: &str, work: &Path) -> Result<VmConfig> {
    let mut cfg = manifest.config_at(work, label)?;
    let refuse = |what: String| -> Error {
        Error::Refused(format!("{label}: section 'manifest': {what}; a pack's disks and boot files come only from its own sections"))
    };
    let mut boot = Vec::new();
    for (role, path) in cfg.boot_files() {
        let f = manifest.file(role).ok_or_else(|| {
            refuse(format!(
                "the config names {role} '{}', which the pack does not hold",
                path.display()
            ))
        })?;
        boot.push((role, work.join(&f.name)));
    }
    for (role, p) in boot {
        match role {
            "kernel" => cfg.kernel.as_mut().expect("has a kernel").path = p,
            "initrd" => cfg.kernel.as_mut().expect("has a kernel").initrd = Some(p),
            _ => cfg.flat.as_mut().expect("has an image").image = p,
        }
    }
    if let Some(d) = cfg.disks.get(manifest.disks.len()) {
        return Err(refuse(format!(
            "config [[disk]] {} ('{}') has no disk section in the pack",
            manifest.disks.len(),
            d.path.display()
        )));
    }
    if let Some(d) = manifest.disks.get(cfg.disks.len()) {
        return Err(refuse(format!(
            "disk section '{}' has no [[disk]] in the config",
            d.section
        )));
    }
    for (i, (c, m)) in cfg.disks.iter_mut().zip(&manifest.disks).enumerate() {
        if c.read_only != m.read_only {
            return Err(refuse(format!(
                "config [[disk]] {i} says read_only = {}, disk section '{}' says {}",
                c.read_only, m.section, m.read_only
            )));
        }
        c.path = disk_copy_path(work, i);
        c.format = DiskFormat::Raw;
    }
    // A saved VM's CPUID is in its vm state, so a template file is never needed to resume
    // it; the name is kept for display only and never opened (`boot_at_rest` refuses it).
    if let CpuTemplate::Custom(p) = &mut cfg.cpu_template {
        *p = p
            .file_name()
            .map_or_else(|| "template.json".into(), PathBuf::from);
    }
    if let Some(p) = &mut cfg.serial.path {
        let name = p
            .file_name()
            .filter(|n| vmpack_formats::vm::is_safe_name(&n.to_string_lossy()))
            .map_or_else(|| "serial.log".into(), |n| n.to_owned());
        *p = work.join(name);
    }
    // The pack's socket path is the saving host's and untrusted: never bound. The restore
    // listens in its work folder unless `--vsock-sock` says where.
    if let Some(v) = &mut cfg.vsock {
        v.uds_path = Some(work.join("vsock.sock"));
    }
    Ok(cfg)
}

/// The fields in which two configs differ, file paths aside (a vmstate's copy of the
/// config names the saving host's files, the manifest's names the pack's).
fn config_differences(a: &VmConfig, b: &VmConfig) -> Vec<&'static str> {
    fn strip(c: &VmConfig) -> VmConfig {
        let mut c = c.clone();
        if let Some(k) = &mut c.kernel {
            k.path = PathBuf::new();
            k.initrd = k.initrd.as_ref().map(|_| PathBuf::new());
        }
        if let Some(f) = &mut c.flat {
            f.image = PathBuf::new();
        }
        for d in &mut c.disks {
            d.path = PathBuf::new();
        }
        c.serial.path = c.serial.path.as_ref().map(|_| PathBuf::new());
        if let Some(v) = &mut c.vsock {
            v.uds_path = None;
        }
        c
    }
    let (a, b) = (strip(a), strip(b));
    let mut v = Vec::new();
    let mut check = |name, same: bool| {
        if !same {
            v.push(name);
        }
    };
    check("name", a.name == b.name);
    check("vcpus", a.vcpus == b.vcpus);
    check("memory_mib", a.memory_mib == b.memory_mib);
    check("cpu_template", a.cpu_template == b.cpu_template);
    check("flat", a.flat == b.flat);
    check("kernel", a.kernel == b.kernel);
    check("disk", a.disks == b.disks);
    check("serial", a.serial == b.serial);
    v
}

/// Boots a pack that holds a VM at rest (made by `vmpack pack` or `import`) without
/// unpacking it by hand: boot files are read from the pack, disks get private copies.
/// `work_dir` is the folder for the disks' private copies, as [`RestoreOptions::work_dir`].
pub fn boot_at_rest(
    path: &Path,
    verify: VerifyPolicy,
    run: RunOptions,
    work_dir: &Path,
) -> Result<Vm> {
    let pack = VmPack::open(path)?;
    let label = path.display().to_string();
    if pack.manifest().vmstate.is_some() {
        return Err(Error::Refused(format!(
            "{label}: the pack holds a saved VM; resume it with `vmpack restore`"
        )));
    }
    if verify == VerifyPolicy::Always
        || !verified_cache::is_verified(path, pack.reader().root_digest())
    {
        pack.reader().verify(&())?;
        verified_cache::record(path, pack.reader().root_digest());
    }
    let work = WorkDir::new(work_dir)?;
    let cfg = pack_config(pack.manifest(), &label, &work.path)?;
    if let CpuTemplate::Custom(p) = &cfg.cpu_template {
        return Err(Error::Refused(format!(
            "{label}: section 'manifest': the config names the CPU template file '{}', which packs do not carry; boot the VM from its config, or pack it with a named template",
            p.display()
        )));
    }
    let payload = BootPayload {
        kernel: optional_file(&pack, "kernel")?,
        initrd: optional_file(&pack, "initrd")?,
        image: optional_file(&pack, "image")?,
    };
    extract_disks(&pack, &work.path)?;
    work.hand_over(run, |run| Vm::create(&cfg, payload, run))
}

fn optional_file(pack: &VmPack, role: &str) -> Result<Option<Vec<u8>>> {
    if pack.manifest().file(role).is_none() {
        return Ok(None);
    }
    Ok(Some(pack.boot_file(role)?))
}

/// Parses the vmstate and checks it against `cfg`, the manifest's config (the one
/// validation of a restore, before any KVM call).
fn parse_state(bytes: &[u8], label: &str, section: &str, cfg: &VmConfig) -> Result<ValidState> {
    let state = VmState::parse(bytes).map_err(|e| {
        Error::Refused(format!(
            "{label}: section '{section}': {}",
            crate::error::Chain(&e)
        ))
    })?;
    // Packs from older vmboots hold a second copy of the config; one that disagrees with
    // the manifest's is refused rather than guessed at.
    if let Some(old) = &state.config {
        let diff = config_differences(old, cfg);
        if !diff.is_empty() {
            return Err(Error::Refused(format!(
                "{label}: section '{section}': its config differs from the manifest's in {}",
                diff.join(", ")
            )));
        }
    }
    state.validate(cfg).map_err(|e| {
        Error::Refused(format!(
            "{label}: section '{section}': {}",
            crate::error::Chain(&e)
        ))
    })
}

/// The saved guest as [`compat::judge`] reads it.
pub fn saved_guest<'a>(state: &'a VmState, template: CpuTemplate) -> compat::SavedGuest<'a> {
    let v = &state.vcpus[0];
    compat::SavedGuest {
        vmstate_version: state.version,
        template,
        cpuid: &v.cpuid,
        msrs: &v.msrs,
        tsc_khz: v.tsc_khz,
    }
}

/// Refuses a pack this host cannot resume, with the reasons `vmpack compat` gives (the
/// same check, against this host's fingerprint); returns the warnings.
fn check_host(state: &VmState, cfg: &VmConfig, label: &str) -> Result<Vec<String>> {
    let host = crate::host_info::fingerprint()?;
    let j = compat::judge(&saved_guest(state, cfg.cpu_template.clone()), host);
    if j.verdict == compat::Verdict::Refused {
        return Err(Error::Refused(format!(
            "{label}: refused on this host: {}; `vmpack compat {label}` explains",
            j.summary(compat::Verdict::Refused)
        )));
    }
    Ok(j.reasons.into_iter().map(|r| r.message).collect())
}

/// `(gpa, section id)` of each memory section, each checked against the saved machine.
fn memory_sections(
    pack: &VmPack,
    manifest: &Manifest,
    state: &VmState,
    label: &str,
) -> Result<Vec<(u64, u32)>> {
    let reader = pack.reader();
    let mut sections = Vec::new();
    for m in &manifest.memory {
        let s = reader.section(&m.section).ok_or_else(|| {
            Error::Refused(format!("{label}: section '{}' is missing", m.section))
        })?;
        if !state
            .memory_regions
            .iter()
            .any(|&(gpa, size)| gpa == m.gpa && size == m.size)
        {
            return Err(Error::Refused(format!(
                "{label}: section '{}': memory region {:#x}+{:#x} does not match the saved machine",
                m.section, m.gpa, m.size
            )));
        }
        sections.push((m.gpa, s.id));
    }
    Ok(sections)
}

fn memory_init(
    pack: &Arc<VmPack>,
    manifest: &Manifest,
    state: &VmState,
    map: bool,
    label: &str,
) -> Result<GuestMemoryInit> {
    let reader = pack.reader();
    let sections = memory_sections(pack, manifest, state, label)?;
    if map {
        let mut pieces = Vec::new();
        for &(gpa, id) in &sections {
            for c in reader.chunks(id) {
                if c.codec == Codec::None {
                    pieces.push((gpa + c.offset, c.payload_offset, c.ulen as u64));
                }
            }
        }
        let file = File::open(pack.path()).with_context(|| format!("opening {label}"))?;
        return Ok(GuestMemoryInit::MapPrivate { file, pieces });
    }
    let path = pack.path().to_path_buf();
    // A reset reads the chunks of written pages again, from this (checked) pack.
    let table = crate::vstate::lazy::ChunkTable::of_pack(pack.clone(), &sections);
    Ok(GuestMemoryInit::Unpack {
        table,
        fill: Box::new(move |regions| {
            let pack = VmPack::open(&path)?;
            let reader = pack.reader();
            for &(gpa, id) in &sections {
                let region = regions
                    .iter_mut()
                    .find(|(g, _)| *g == gpa)
                    .ok_or_else(|| Error::Refused(format!("no RAM region at {gpa:#x}")))?;
                let dst = SharedSlice::new(region.1);
                reader.for_each_chunk_parallel(id, false, 0, &|off, data| {
                    dst.write(off, data).map_err(|e| io_pack_error(&path, e))
                })?;
            }
            Ok(())
        }),
    })
}

/// A byte slice that worker threads write disjoint ranges of.
struct SharedSlice {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: writers write disjoint, bounds-checked ranges (one per chunk) while the owner of
// the slice waits for them in a thread scope.
unsafe impl Sync for SharedSlice {}

impl SharedSlice {
    fn new(s: &mut [u8]) -> Self {
        SharedSlice {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    fn write(&self, off: u64, data: &[u8]) -> std::io::Result<()> {
        off.checked_add(data.len() as u64)
            .filter(|&e| e <= self.len as u64)
            .ok_or_else(|| {
                std::io::Error::other(format!("chunk at {off:#x} runs past its RAM region"))
            })?;
        // SAFETY: `off..end` is inside the slice; chunks of one section never overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off as usize), data.len());
        }
        Ok(())
    }
}

/// Restore from a pipe: everything is verified as it streams past (there is no second
/// reading), and the index at the end is checked before the VM runs. After the manifest,
/// sections may come in any order (docs/FORMAT.md §12): guest memory is staged in
/// mappings of the VM's layout as its chunks arrive, whether the vmstate came before it
/// or comes after, and moved into the VM once the stream ended.
fn restore_stream<R: Read + 'static>(
    input: R,
    label: &str,
    opts: RestoreOptions,
) -> Result<(Vm, RestoreInfo)> {
    use vmpack_formats::pack::kind;
    let started = Instant::now();
    let mut sr = StreamReader::new(input, label)?;
    let work = WorkDir::new(&opts.work_dir)?;
    let mut manifest: Option<Manifest> = None;
    let mut cfg: Option<VmConfig> = None;
    // The open section: name, kind, and for memory its region's gpa.
    let mut current: Option<(String, u16, u64)> = None;
    let mut buf: Vec<u8> = Vec::new();
    let mut payload = BootPayload::default();
    let mut state: Option<ValidState> = None;
    let mut warnings = Vec::new();
    let mut disk_files: Vec<(usize, File, PathBuf)> = Vec::new();
    let mut staged: Option<crate::memory::StagedRam> = None;
    let mut memory_seen: Vec<String> = Vec::new();
    // A diff pack's parents (files): the chain and its base (the boot files), what was said
    // about their verification, and the open MEMORY_DIFF section's chunk map.
    let mut parents: Option<(vmpack_formats::diff::Chain, VmPack)> = None;
    let mut parents_verified = "";
    let mut diff_map: Option<(ChunkMap, Vec<u64>)> = None;
    // Header flag bit 1: the manifest names memory overlays (FORMAT.md §12, "Live saves").
    let overlay_flag = sr.overlays();
    loop {
        match sr.next_event()? {
            StreamEvent::Section(info) => {
                let m = match info.kind {
                    kind::MANIFEST if manifest.is_some() => {
                        return Err(Error::Refused(format!(
                            "{label}: section '{}': a second manifest",
                            info.name
                        )))
                    }
                    kind::MANIFEST => None,
                    _ => Some(manifest.as_ref().ok_or_else(|| {
                        Error::Refused(format!(
                            "{label}: section '{}' before the manifest",
                            info.name
                        ))
                    })?),
                };
                let mut gpa = 0;
                buf.clear();
                diff_map = None;
                // A live save's overlay (FORMAT.md §12, "Live saves"): its chunks go over its
                // base, already staged.
                let overlay_of = m.and_then(|m| {
                    m.memory.iter().find(|r| {
                        info.kind == kind::MEMORY_DIFF && r.overlay.as_ref() == Some(&info.name)
                    })
                });
                if let Some(r) = overlay_of {
                    let refuse = |why: &str| {
                        Error::Refused(format!("{label}: section '{}': {why}", info.name))
                    };
                    // The base is written whole (zero chunks as zeros): the overlay goes
                    // over it, so it must come after it.
                    if !memory_seen.contains(&r.section) {
                        return Err(refuse(&format!(
                            "comes before its base memory section '{}'",
                            r.section
                        )));
                    }
                    if memory_seen.contains(&info.name) {
                        return Err(refuse("appears twice"));
                    }
                    let map = ChunkMap::from_section(info, r.size).map_err(|why| refuse(&why))?;
                    gpa = r.gpa;
                    memory_seen.push(info.name.clone());
                    let fits = staged
                        .as_mut()
                        .and_then(|s| s.region_mut(gpa))
                        .is_some_and(|reg| reg.len() as u64 >= r.size);
                    if !fits {
                        return Err(refuse(&format!(
                            "no RAM region of {} bytes at {gpa:#x}",
                            r.size
                        )));
                    }
                    let present = map.present();
                    diff_map = Some((map, present));
                } else if let (kind::MEMORY | kind::MEMORY_DIFF, Some(m), Some(c)) =
                    (info.kind, m, cfg.as_ref())
                {
                    diff_map = check_stream_memory(m, info, label)?.map(|map| {
                        let present = map.present();
                        (map, present)
                    });
                    gpa = m
                        .memory
                        .iter()
                        .find(|r| r.section == info.name)
                        .map_or(0, |r| r.gpa);
                    memory_seen.push(info.name.clone());
                    if staged.is_none() {
                        let mut ram = crate::memory::StagedRam::new(&crate::memory::ram_layout(
                            c.memory_bytes(),
                        ))?;
                        // A diff pack's memory starts as its parents' (verified at the
                        // manifest); the chunks it stores replace theirs as they stream past.
                        if let Some((chain, _)) = &parents {
                            crate::diff::fill_from_chain(chain, &mut ram)?;
                        }
                        staged = Some(ram);
                    }
                    // A diff section holds the present chunks of the whole region.
                    let needs = diff_map
                        .as_ref()
                        .map_or(info.size, |(map, _)| map.region_size);
                    let fits = staged
                        .as_mut()
                        .and_then(|s| s.region_mut(gpa))
                        .is_some_and(|r| r.len() as u64 >= needs);
                    if !fits {
                        return Err(Error::Refused(format!(
                            "{label}: section '{}': no RAM region of {} bytes at {gpa:#x}",
                            info.name, info.size
                        )));
                    }
                }
                if let (kind::DISK | kind::DISK_DIFF, Some(m)) = (info.kind, m) {
                    let i = m
                        .disks
                        .iter()
                        .position(|d| d.section == info.name)
                        .ok_or_else(|| {
                            Error::Refused(format!(
                                "{label}: section '{}' is not in the manifest",
                                info.name
                            ))
                        })?;
                    if info.kind == kind::DISK && info.size != m.disks[i].virtual_size {
                        return Err(Error::Refused(format!(
                            "{label}: section '{}' holds {} bytes, the manifest says {}",
                            info.name, info.size, m.disks[i].virtual_size
                        )));
                    }
                    if disk_files.iter().any(|(j, _, _)| *j == i) {
                        return Err(Error::Refused(format!(
                            "{label}: section '{}' appears twice",
                            info.name
                        )));
                    }
                    let p = disk_copy_path(&work.path, i);
                    let f = sparse_file(&p, m.disks[i].virtual_size)?;
                    if info.kind == kind::DISK_DIFF {
                        // The parents' disk (verified at the manifest) first; the chunks
                        // this pack stores replace theirs as they stream past.
                        let Some((chain, _)) = &parents else {
                            return Err(Error::Refused(format!(
                                "{label}: section '{}': kind {} in a pack without a parent",
                                info.name,
                                kind::DISK_DIFF
                            )));
                        };
                        let map = ChunkMap::from_disk_section(info, m.disks[i].virtual_size)
                            .map_err(|msg| {
                                Error::Refused(format!(
                                    "{label}: section '{}': {msg}; refused before reading it",
                                    info.name
                                ))
                            })?;
                        crate::diff::write_disk_layers(chain, i, &f)?;
                        let present = map.present();
                        diff_map = Some((map, present));
                    }
                    disk_files.push((i, f, p));
                }
                current = Some((info.name.clone(), info.kind, gpa));
            }
            StreamEvent::Chunk {
                offset, data, zero, ..
            } => {
                let (name, k, gpa) = current
                    .as_ref()
                    .ok_or_else(|| Error::Refused(format!("{label}: chunk outside a section")))?;
                if zero || data.iter().all(|&b| b == 0) {
                    // Disk copies are sparse and RAM starts zeroed; small sections still
                    // need their bytes.
                    if matches!(*k, kind::DISK | kind::MEMORY) {
                        continue;
                    }
                }
                match *k {
                    kind::DISK => {
                        use std::os::unix::fs::FileExt;
                        let (_, f, p) = disk_files
                            .last()
                            .expect("disk file opened at section start");
                        f.write_all_at(data, offset)
                            .with_context(|| format!("writing {}", p.display()))?;
                    }
                    kind::DISK_DIFF => {
                        use std::os::unix::fs::FileExt;
                        // As for memory: chunk j is the j-th present disk chunk, and a zero
                        // one replaces the parents' bytes with zeros.
                        let (map, present) = diff_map.as_ref().expect("map read at section start");
                        let at = map.region_offset(present, offset).ok_or_else(|| {
                            Error::Refused(format!("{label}: section '{name}': chunk at {offset:#x} lies outside its chunk map"))
                        })?;
                        let (_, f, p) = disk_files
                            .last()
                            .expect("disk file opened at section start");
                        f.write_all_at(data, at)
                            .with_context(|| format!("writing {}", p.display()))?;
                    }
                    kind::MEMORY_DIFF => {
                        // Chunk j is the j-th present region chunk; a zero one replaces the
                        // parents' bytes with zeros.
                        let (map, present) = diff_map.as_ref().ok_or_else(|| {
                            Error::Refused(format!(
                                "{label}: section '{name}' of kind {} outside a diff pack's memory",
                                kind::MEMORY_DIFF
                            ))
                        })?;
                        let at = map.region_offset(present, offset).ok_or_else(|| {
                            Error::Refused(format!("{label}: section '{name}': chunk at {offset:#x} lies outside its chunk map"))
                        })?;
                        let region = staged
                            .as_mut()
                            .and_then(|s| s.region_mut(*gpa))
                            .expect("region checked at section start");
                        let end = at as usize + data.len();
                        let dst = region.get_mut(at as usize..end).ok_or_else(|| {
                            Error::Refused(format!("{label}: section '{name}': chunk at {offset:#x} runs past its RAM region"))
                        })?;
                        dst.copy_from_slice(data);
                    }
                    kind::MEMORY => {
                        // Checked at the section start: the region exists and holds the
                        // section, whose chunks the stream reader keeps inside its size.
                        let region = staged
                            .as_mut()
                            .and_then(|s| s.region_mut(*gpa))
                            .expect("region checked at section start");
                        let end = offset as usize + data.len();
                        let dst = region.get_mut(offset as usize..end).ok_or_else(|| {
                            Error::Refused(format!("{label}: section '{name}': chunk at {offset:#x} runs past its RAM region"))
                        })?;
                        dst.copy_from_slice(data);
                    }
                    _ => {
                        let limit = if *k == kind::FILE {
                            vmpack_formats::vm::MAX_BOOT_FILE_LEN
                        } else {
                            MAX_VMSTATE_LEN
                        };
                        if buf.len() as u64 + data.len() as u64 > limit {
                            return Err(Error::Refused(format!(
                                "{label}: section '{name}' is larger than {limit} bytes"
                            )));
                        }
                        buf.extend_from_slice(data);
                    }
                }
            }
            StreamEvent::SectionEnd(_) => {
                let (name, k, _) = current.take().ok_or_else(|| {
                    Error::Refused(format!("{label}: section end outside a section"))
                })?;
                match k {
                    kind::MANIFEST => {
                        let m = Manifest::parse(&buf, label)?;
                        m.check_memory(label, &|_| None)?;
                        m.check_overlay_flag(overlay_flag, label)?;
                        if let Some(p) = &m.parent {
                            // A pipe has no folder to find the parent in: the user names it.
                            let Some(given) = opts.parent.as_deref() else {
                                return Err(Error::Refused(format!(
                                    "{label}: a diff pack (memory layered on {}, root digest {}) read from a pipe needs its parent: name it with --parent FILE",
                                    vmpack_formats::vm::printable(&p.file),
                                    p.root_digest
                                )));
                            };
                            let (chain, base) = crate::diff::pipe_parents(label, &m, p, given)?;
                            parents_verified = verify_parents(&chain, opts.verify)?;
                            parents = Some((chain, base));
                        }
                        cfg = Some(pack_config(&m, label, &work.path)?);
                        manifest = Some(m);
                    }
                    kind::FILE => {
                        let m = manifest.as_ref().expect("checked at section start");
                        let role = m
                            .files
                            .iter()
                            .find(|f| f.section == name)
                            .map(|f| f.role.as_str())
                            .unwrap_or("");
                        let data = Some(std::mem::take(&mut buf));
                        match role {
                            "kernel" => payload.kernel = data,
                            "initrd" => payload.initrd = data,
                            "image" => payload.image = data,
                            _ => {}
                        }
                    }
                    kind::VMSTATE => {
                        let c = cfg.as_ref().expect("checked at section start");
                        let s = parse_state(&buf, label, &name, c)?;
                        // Refused as soon as it is known, not after the rest of the stream.
                        warnings = check_host(&s, c, label)?;
                        state = Some(s);
                    }
                    _ => {}
                }
            }
            StreamEvent::End(_) => break,
        }
    }
    let manifest = manifest.ok_or_else(|| Error::Refused(format!("{label}: no manifest")))?;
    let state = state.ok_or_else(|| {
        Error::Refused(format!(
            "{label}: the pack holds a VM at rest, not a saved one (no vmstate)"
        ))
    })?;
    let cfg = cfg.ok_or_else(|| Error::Refused(format!("{label}: no manifest")))?;
    // Every disk, boot file and memory region comes from the stream: one that never
    // arrived is missing, whatever the config says.
    for (i, d) in manifest.disks.iter().enumerate() {
        if !disk_files.iter().any(|(j, _, _)| *j == i) {
            return Err(Error::Refused(format!(
                "{label}: section '{}' is missing",
                d.section
            )));
        }
    }
    for f in manifest
        .files
        .iter()
        .filter(|f| f.in_memory.is_none() && !f.in_parent)
    {
        let got = match f.role.as_str() {
            "kernel" => payload.kernel.is_some(),
            "initrd" => payload.initrd.is_some(),
            "image" => payload.image.is_some(),
            _ => true,
        };
        if !got {
            return Err(Error::Refused(format!(
                "{label}: section '{}' is missing",
                f.section
            )));
        }
    }
    if let Some(name) = manifest
        .memory
        .iter()
        .flat_map(|m| std::iter::once(&m.section).chain(m.overlay.as_ref()))
        .find(|n| !memory_seen.contains(n))
    {
        return Err(Error::Refused(format!(
            "{label}: section '{name}' is missing"
        )));
    }
    let staged = staged.ok_or_else(|| {
        Error::Refused(format!(
            "{label}: the pack holds a VM at rest, not a saved one (no memory)"
        ))
    })?;
    // An initrd the pack kept only in guest memory is copied out now, so a later save of
    // this VM still has it even if the guest overwrites that memory.
    let initrd = Arc::new(std::sync::OnceLock::new());
    if let Some((gpa, len)) = manifest
        .file("initrd")
        .and_then(|f| Some((f.in_memory?, f.size)))
    {
        let bytes = staged.read(gpa, len).ok_or_else(|| {
            Error::Refused(format!(
                "{label}: the initrd at {gpa:#x} is not in guest RAM"
            ))
        })?;
        let _ = initrd.set(bytes.to_vec());
    }
    let prepare_ms = started.elapsed().as_secs_f64() * 1000.0;
    let layered = parents.is_some();
    let files = match parents {
        // A diff pack's boot files are its base's (the same VM's).
        Some((_, base)) => BootFiles::Pack(Arc::new(base)),
        None => BootFiles::Stream { payload, initrd },
    };
    let init = GuestMemoryInit::Staged(staged);
    let vm = work.hand_over(opts.run, |run| Vm::restore(&cfg, state, init, files, run))?;
    Ok((
        vm,
        RestoreInfo {
            memory_path: if layered {
                "stream, layered over the parent packs"
            } else {
                "stream"
            },
            verified: if layered {
                parents_verified
            } else {
                "verified every chunk while streaming"
            },
            prepare_ms,
            warnings,
        },
    ))
}

/// Verifies a diff pack's parents per `verify`, each recorded under its own file, as a file
/// restore of the chain does; returns what restore says about verification.
fn verify_parents(
    chain: &vmpack_formats::diff::Chain,
    verify: VerifyPolicy,
) -> Result<&'static str> {
    let mut all = true;
    for p in &chain.packs {
        let r = p.reader();
        let always = verify == VerifyPolicy::Always;
        if always || !verified_cache::is_verified(p.path(), r.root_digest()) {
            r.verify(&())?;
            if !always {
                verified_cache::record(p.path(), r.root_digest());
            }
        } else {
            all = false;
        }
    }
    Ok(if all {
        "verified every chunk while streaming and every chunk of the parent packs"
    } else {
        "verified every chunk while streaming; the parent packs verified on an earlier restore"
    })
}

/// A memory section read from a stream must be one the manifest lists, with its size (the
/// manifest's sizes were checked against the VM's memory), before any of its chunks is read.
/// Returns a diff pack's chunk map of the section.
fn check_stream_memory(
    m: &Manifest,
    info: &vmpack_formats::pack::SectionInfo,
    label: &str,
) -> Result<Option<ChunkMap>> {
    let diff = m.parent.is_some();
    if diff != (info.kind == vmpack_formats::pack::kind::MEMORY_DIFF) {
        return Err(Error::Refused(format!(
            "{label}: section '{}': kind {} in a {}",
            info.name,
            info.kind,
            if diff {
                "diff pack"
            } else {
                "pack without a parent"
            }
        )));
    }
    match m.memory.iter().find(|r| r.section == info.name) {
        Some(r) if diff => ChunkMap::from_section(info, r.size)
            .map(Some)
            .map_err(|msg| {
                Error::Refused(format!(
                    "{label}: section '{}': {msg}; refused before reading it",
                    info.name
                ))
            }),
        Some(r) if r.size == info.size => Ok(None),
        Some(r) => Err(Error::Refused(format!(
            "{label}: section '{}': holds {} bytes, the manifest says {}; refused before reading it",
            info.name,
            info.size,
            r.size
        ))),
        None => Err(Error::Refused(format!(
            "{label}: section '{}' is not in the manifest",
            info.name
        ))),
    }
}

fn io_pack_error(path: &Path, e: std::io::Error) -> PackError {
    PackError::new(
        &path.display().to_string(),
        vmpack_formats::pack::PackErrorKind::Io(e),
    )
}

fn sparse_file(path: &Path, size: u64) -> Result<File> {
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)
        .with_context(|| format!("sizing {}", path.display()))?;
    Ok(f)
}

/// A per-restore folder for the private disk copies (the pack is never written).
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn new(base: &Path) -> Result<WorkDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .subsec_nanos();
        let path = base.join(format!("vmpack-restore-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(WorkDir { path })
    }

    /// Hands the folder to the VM `build` makes, which removes it when it ends; if `build`
    /// fails, the folder is removed here.
    fn hand_over(
        self,
        mut run: RunOptions,
        build: impl FnOnce(&RunOptions) -> crate::vmm::Result<Vm>,
    ) -> Result<Vm> {
        run.work_dir = Some(self.path.clone());
        let vm = build(&run)?;
        std::mem::forget(self);
        Ok(vm)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Restores a pack and runs it until the guest ends; returns the guest's exit status (the
/// caller reports a non-zero one). Progress and warnings go to `opts.report`.
pub fn restore_and_run(input: PackInput, opts: RestoreOptions) -> Result<ExitReason> {
    let t = Instant::now();
    let report = opts.report.clone();
    let stamps = opts.bench_timestamps;
    let (vm, info) = restore(input, opts)?;
    for w in &info.warnings {
        report.report(RestoreEvent::Warning(w.clone()));
    }
    report.report(RestoreEvent::Restored {
        elapsed: t.elapsed(),
        memory_path: info.memory_path,
        verified: info.verified,
    });
    if stamps {
        bench_stamps(&vm, &report);
    }
    crate::vmm::terminate_on_signals(vm.controller())?;
    Ok(vm.run()?)
}

/// `CLOCK_MONOTONIC` now, in ns: what `vmpack bench-snapshot` compares with its own clock.
fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// Instants cannot be turned into CLOCK_MONOTONIC readings directly, so one pair taken
/// together anchors the conversion.
fn bench_stamps(vm: &Vm, report: &Reporter) {
    let (anchor, anchor_ns) = (Instant::now(), monotonic_ns());
    report.report(RestoreEvent::Stamp {
        what: "restored",
        ns: anchor_ns,
    });
    let h = vm.controller();
    let r = report.clone();
    let watcher = std::thread::Builder::new().spawn(move || loop {
        if let Some(t) = h.first_exit_instant() {
            let ns = anchor_ns + t.duration_since(anchor).as_nanos();
            r.report(RestoreEvent::Stamp {
                what: "first-exit",
                ns,
            });
            return;
        }
        std::thread::sleep(Duration::from_micros(100));
    });
    if let Err(e) = watcher {
        report.report(RestoreEvent::Warning(format!(
            "no first-exit stamp: cannot start a thread: {e}"
        )));
    }
}
