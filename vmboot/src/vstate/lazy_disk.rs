//! Lazily filled disks: a restored VM runs before its disks are copied out of the pack.
//!
//! A restore gives each disk a sparse private copy (the guest's writes never reach the pack)
//! and a [`LazyDisk`] over it: a per-chunk state (missing, loading, present) for the pack's
//! chunks of that disk. A guest read, write, discard or write-zeroes touching a missing chunk
//! first fills that chunk: its stored bytes are fetched (a restore from a registry), read
//! back through the pack reader and checked against the index, and only then written into
//! the copy; the guest's request runs after that, so a write merges with the chunk's data. A
//! background thread fills the rest in disk order (the chunks the guest touched are already
//! there), so the copy soon holds the whole disk. A save reads the disk through this backend
//! (its frozen view, `crate::disk_snapshot`), so a chunk still missing is filled as the save
//! reads it; `data_ranges` counts missing chunks as data without filling them.
//! [`LazyDisk::fill_all`] fills everything at once (before a reset copies the disk again).
//!
//! A chunk failing its check is never written: the request that needed it fails, and the
//! failure callback stops the VM (exit status 76, as for guest memory), naming the disk,
//! the section and the chunk.

use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};

use vmpack_formats::config::DiskFormat;
use vmpack_formats::disk::{DiskImage, RawDisk};
use vmpack_formats::pack::{ChunkEntry, Codec, PackReader};
use vmpack_formats::vm::VmPack;

use super::lazy::ChunkSource;

const MISSING: u8 = 0;
const LOADING: u8 = 1;
const PRESENT: u8 = 2;
const FAILED: u8 = 3;

type FailureFn = Box<dyn Fn(String) + Send + Sync>;
type CompleteFn = Box<dyn FnOnce() + Send>;

/// One disk of a restored VM, filled from its pack chunk by chunk.
pub struct LazyDisk {
    index: usize,
    copy: RawDisk,
    read_only: bool,
    /// The pack, or a diff pack's chain (base first).
    packs: Vec<Arc<VmPack>>,
    /// Per chunk, the pack of `packs` it is read from and the disk offset it belongs at
    /// (the entry's own offset is within its section, which for a disk diff is not the
    /// disk's).
    place: Vec<(usize, u64)>,
    source: ChunkSource,
    /// The disk's stored chunks, sorted by disk offset, disjoint, inside the disk (zero
    /// chunks left out: the sparse copy reads as zeros there already).
    chunks: Vec<ChunkEntry>,
    state: Vec<AtomicU8>,
    /// Chunks not present yet.
    left: AtomicU64,
    /// Wakes those waiting for a chunk another thread is loading.
    changed: (Mutex<()>, Condvar),
    stop: AtomicBool,
    /// The first failure and who to tell (set once the VM exists).
    failure: Mutex<(Option<String>, Option<FailureFn>)>,
    /// Called once, when the last chunk is in the copy (every chunk verified).
    on_complete: Mutex<Option<CompleteFn>>,
    fill_started: AtomicBool,
}

impl std::fmt::Debug for LazyDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LazyDisk(disk {}, {} of {} chunks missing)",
            self.index,
            self.pending(),
            self.chunks.len()
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LazyDisk {
    /// A disk over `copy` (a sparse file of the disk's size, created by the restore) that
    /// fills itself from `section` of `pack`. Nothing is read from the pack until something
    /// touches the disk or [`LazyDisk::start_fill`] is called.
    pub fn new(
        index: usize,
        copy: &Path,
        read_only: bool,
        pack: Arc<VmPack>,
        source: ChunkSource,
        section: &str,
    ) -> super::Result<Arc<LazyDisk>> {
        use super::Error;
        let reader = pack.reader();
        let label = pack.path().display().to_string();
        let s = reader
            .section(section)
            .ok_or_else(|| Error::Layout(format!("{label}: section '{section}' is missing")))?;
        let chunks = reader
            .chunks(s.id)
            .iter()
            .filter(|e| e.codec != Codec::Zero)
            .map(|e| (0, e.offset, e.clone()))
            .collect();
        Self::build(index, copy, read_only, vec![pack], source, chunks)
    }

    /// A disk over `copy` that fills itself from several packs (a diff pack's chain): each
    /// of `chunks` is `(index into packs, the disk offset it belongs at, its index entry)`;
    /// zero chunks are left out (the sparse copy reads as zeros).
    pub fn layered(
        index: usize,
        copy: &Path,
        read_only: bool,
        packs: Vec<Arc<VmPack>>,
        chunks: Vec<(usize, u64, ChunkEntry)>,
    ) -> super::Result<Arc<LazyDisk>> {
        Self::build(index, copy, read_only, packs, ChunkSource::PackFile, chunks)
    }

    fn build(
        index: usize,
        copy: &Path,
        read_only: bool,
        packs: Vec<Arc<VmPack>>,
        source: ChunkSource,
        mut chunks: Vec<(usize, u64, ChunkEntry)>,
    ) -> super::Result<Arc<LazyDisk>> {
        use super::Error;
        // The copy is private: the restore writes the pack's chunks into it even when the
        // guest may not write.
        let copy = RawDisk::open(copy, false)?;
        let size = copy.virtual_size();
        chunks.sort_by_key(|(_, at, _)| *at);
        let mut end = 0u64;
        for (k, at, e) in &chunks {
            let last = at.checked_add(u64::from(e.ulen));
            if *at < end || last.is_none_or(|l| l > size) {
                let p = packs.get(*k).map(|p| p.path().display().to_string());
                let section = packs
                    .get(*k)
                    .and_then(|p| p.reader().sections().get(e.section as usize))
                    .map_or("?".to_string(), |s| s.name.clone());
                return Err(Error::Layout(format!(
                    "{}: section '{section}' chunk {} at {:#x} ({} bytes) overlaps another or lies outside the {size}-byte disk",
                    p.unwrap_or_default(),
                    e.seq,
                    at,
                    e.ulen
                )));
            }
            end = last.unwrap_or(end);
        }
        let (place, chunks): (Vec<(usize, u64)>, Vec<ChunkEntry>) =
            chunks.into_iter().map(|(k, at, e)| ((k, at), e)).unzip();
        let state = chunks.iter().map(|_| AtomicU8::new(MISSING)).collect();
        Ok(Arc::new(LazyDisk {
            index,
            copy,
            read_only,
            packs,
            place,
            source,
            left: AtomicU64::new(chunks.len() as u64),
            chunks,
            state,
            changed: (Mutex::new(()), Condvar::new()),
            stop: AtomicBool::new(false),
            failure: Mutex::new((None, None)),
            on_complete: Mutex::new(None),
            fill_started: AtomicBool::new(false),
        }))
    }

    /// The backend the VM's virtio-blk device serves the guest from.
    pub fn image(self: &Arc<Self>) -> Box<dyn DiskImage> {
        Box::new(Image(self.clone()))
    }

    /// The disk's number in the config.
    pub fn index(&self) -> usize {
        self.index
    }

    /// How many of the disk's stored chunks are not in the copy yet.
    pub fn pending(&self) -> u64 {
        self.left.load(Ordering::SeqCst)
    }

    /// Tells `f` about a chunk that failed verification (now, if one already did).
    pub fn on_failure(&self, f: FailureFn) {
        let mut g = lock(&self.failure);
        if let Some(m) = &g.0 {
            f(m.clone());
        }
        g.1 = Some(f);
    }

    /// Calls `f` once every stored chunk is in the copy, each verified (now, if they are).
    pub fn on_complete(&self, f: CompleteFn) {
        let mut g = lock(&self.on_complete);
        if self.pending() == 0 && self.failure().is_none() {
            drop(g);
            f();
        } else {
            *g = Some(f);
        }
    }

    /// The verification failure that stopped the VM, if any.
    pub fn failure(&self) -> Option<String> {
        lock(&self.failure).0.clone()
    }

    /// Starts the background thread that fills what the guest has not touched (once). The
    /// thread holds the disk only while it loads a chunk: it ends with the VM.
    pub fn start_fill(self: &Arc<Self>) {
        if self.fill_started.swap(true, Ordering::SeqCst) || self.chunks.is_empty() {
            return;
        }
        let weak: Weak<LazyDisk> = Arc::downgrade(self);
        let name = format!("disk{}-fill", self.index);
        // Without the thread, the guest's requests still fill what they touch and a save
        // fills the rest.
        let _ = std::thread::Builder::new().name(name).spawn(move || {
            let mut i = 0;
            loop {
                let Some(d) = weak.upgrade() else { return };
                if d.stop.load(Ordering::SeqCst) || d.failure().is_some() {
                    return;
                }
                if i >= d.chunks.len() {
                    return;
                }
                let _ = d.load(i);
                i += 1;
            }
        });
    }

    /// Stops the background fill (the VM ended).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.changed.1.notify_all();
    }

    /// Makes the copy hold the whole disk (a save reads it), filling what is missing here
    /// and waiting for chunks another thread is loading.
    pub fn fill_all(&self) -> io::Result<()> {
        for i in 0..self.chunks.len() {
            self.load(i)?;
        }
        Ok(())
    }

    /// Fills every chunk overlapping `off..off + len`.
    fn ensure(&self, off: u64, len: u64) -> io::Result<()> {
        if self.left.load(Ordering::SeqCst) == 0 || len == 0 {
            return Ok(());
        }
        let end = off.saturating_add(len);
        // The last chunk starting at or before `off` may cover it.
        let first = self
            .place
            .partition_point(|&(_, at)| at <= off)
            .saturating_sub(1);
        for i in first..self.chunks.len() {
            let at = self.place[i].1;
            if at >= end {
                break;
            }
            if at + u64::from(self.chunks[i].ulen) <= off {
                continue;
            }
            self.load(i)?;
        }
        Ok(())
    }

    /// Makes chunk `i` present (once): fetch, read, verify, write into the copy. Returns
    /// when it is present, also when another thread was loading it.
    fn load(&self, i: usize) -> io::Result<()> {
        loop {
            match self.state[i].compare_exchange(
                MISSING,
                LOADING,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => break,
                Err(PRESENT) => return Ok(()),
                Err(FAILED) => return Err(self.failed_error()),
                Err(_) => {
                    let (m, cv) = &self.changed;
                    let g = lock(m);
                    if self.state[i].load(Ordering::SeqCst) == LOADING {
                        // Bounded: a stop or a lost wake-up only costs a re-check.
                        let _ = cv.wait_timeout(g, std::time::Duration::from_millis(50));
                    }
                }
            }
        }
        let (k, at) = self.place[i];
        let r = self.fill(&self.chunks[i], &self.packs[k], at);
        let state = match &r {
            Ok(()) => {
                if self.left.fetch_sub(1, Ordering::SeqCst) == 1 {
                    if let Some(f) = lock(&self.on_complete).take() {
                        f();
                    }
                }
                PRESENT
            }
            Err(_) => FAILED,
        };
        {
            let _g = lock(&self.changed.0);
            self.state[i].store(state, Ordering::SeqCst);
        }
        self.changed.1.notify_all();
        r.map_err(|m| {
            self.fail(m.clone());
            io::Error::other(m)
        })
    }

    fn fill(&self, e: &ChunkEntry, pack: &VmPack, at: u64) -> Result<(), String> {
        if let Some(m) = self.failure() {
            return Err(m);
        }
        let range = format!(
            "disk {} at {:#x}..{:#x}",
            self.index,
            at,
            at + u64::from(e.ulen)
        );
        if let ChunkSource::Fetch(f) = &self.source {
            f.fetch(e).map_err(|x| {
                format!(
                    "{range} was not placed (the guest did not read it): {}",
                    crate::error::Chain(&*x)
                )
            })?;
        }
        let mut data = Vec::new();
        let mut frame = Vec::new();
        data.try_reserve_exact(e.ulen as usize)
            .and_then(|()| frame.try_reserve_exact(PackReader::frame_len(e)))
            .map_err(|x| format!("{range} could not be read (out of memory): {x}"))?;
        data.resize(e.ulen as usize, 0);
        let reader: &PackReader = pack.reader();
        reader
            .read_chunk_reusing(e, true, &mut data, &mut frame)
            .map_err(|x| format!("{range} failed verification before the guest read it: {x}"))?;
        vmpack_formats::disk::write_skipping_zeros(&self.copy, at, &data)
            .map_err(|x| format!("{range}: writing the private copy: {x}"))
    }

    fn fail(&self, msg: String) {
        let mut g = lock(&self.failure);
        if g.0.is_some() {
            return;
        }
        g.0 = Some(msg.clone());
        if let Some(f) = &g.1 {
            f(msg);
        }
    }

    fn failed_error(&self) -> io::Error {
        io::Error::other(
            self.failure()
                .unwrap_or_else(|| format!("disk {}: a chunk failed verification", self.index)),
        )
    }
}

/// [`LazyDisk`] as the block device's backend.
struct Image(Arc<LazyDisk>);

impl DiskImage for Image {
    fn virtual_size(&self) -> u64 {
        self.0.copy.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.0.ensure(off, buf.len() as u64)?;
        self.0.copy.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if self.0.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "disk is opened read-only",
            ));
        }
        self.0.ensure(off, buf.len() as u64)?;
        self.0.copy.write_at(buf, off)
    }

    /// The guest's FLUSH: what it wrote is in the copy. Filling the rest is not the guest's
    /// business (a save forces it).
    fn flush(&self) -> io::Result<()> {
        self.0.copy.flush()
    }

    /// The copy's data plus every chunk not filled yet (a read of it fills it).
    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        let d = &self.0;
        let mut ranges: Vec<Range<u64>> = d
            .chunks
            .iter()
            .zip(&d.place)
            .zip(&d.state)
            .filter(|(_, s)| s.load(Ordering::SeqCst) != PRESENT)
            .map(|((e, (_, at)), _)| *at..at + u64::from(e.ulen))
            .collect();
        // After the list: a chunk filled meanwhile is then in the copy's ranges.
        ranges.extend(d.copy.data_ranges()?);
        ranges.sort_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match out.last_mut() {
                Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
                _ => out.push(r),
            }
        }
        Ok(out)
    }

    fn format(&self) -> DiskFormat {
        DiskFormat::Raw
    }

    fn is_read_only(&self) -> bool {
        self.0.read_only
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        if self.0.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "disk is opened read-only",
            ));
        }
        // Filled first: a later fill must not bring the discarded bytes back.
        self.0.ensure(off, len)?;
        self.0.copy.discard(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        if self.0.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "disk is opened read-only",
            ));
        }
        self.0.ensure(off, len)?;
        self.0.copy.write_zeroes(off, len)
    }
}

/// The lazily filled disks of a restore, by disk index, handed to the VM through
/// `RunOptions::disks`: the device of disk `i` serves the guest from `disks[i]` instead of
/// opening the config's file.
#[derive(Clone, Debug, Default)]
pub struct LazyDisks(pub Vec<Arc<LazyDisk>>);

impl LazyDisks {
    pub fn get(&self, i: usize) -> Option<&Arc<LazyDisk>> {
        self.0.iter().find(|d| d.index == i)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Stored disk chunks not in the private copies yet, over every disk.
    pub fn pending(&self) -> u64 {
        self.0.iter().map(|d| d.pending()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmpack_formats::config::VmConfig;
    use vmpack_formats::pack::{Compression, WriteOptions};
    use vmpack_formats::vm::{write_vm_pack, VmPackPlan};

    const MIB: usize = 1 << 20;

    /// A 4 MiB disk: MiB 0 all 1, MiB 1 zero, MiB 2 a counting pattern, MiB 3 all 3.
    fn disk() -> Vec<u8> {
        let mut d = vec![0u8; 4 * MIB];
        d[..MIB].fill(1);
        for (i, b) in d[2 * MIB..3 * MIB].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        d[3 * MIB..].fill(3);
        d
    }

    fn pack(dir: &Path, compression: Compression) -> Arc<VmPack> {
        std::fs::write(dir.join("g.bin"), b"\xf4").unwrap();
        std::fs::write(dir.join("d.img"), disk()).unwrap();
        let text = "name = \"t\"\nmemory_mib = 1\n[flat]\nimage = \"g.bin\"\n\
                    load_address = 0x1000\nentry = 0x1000\nmode = \"real\"\n\
                    [[disk]]\npath = \"d.img\"\nformat = \"raw\"\n";
        let cfg = VmConfig::parse(text, &dir.join("vm.toml")).unwrap();
        let path = dir.join(format!("{compression}.vmpack"));
        let opts = WriteOptions {
            compression,
            ..WriteOptions::default()
        };
        write_vm_pack(
            std::fs::File::create(&path).unwrap(),
            &cfg,
            VmPackPlan::default(),
            &opts,
            &(),
        )
        .unwrap();
        Arc::new(VmPack::open(&path).unwrap())
    }

    fn lazy(dir: &Path, p: &Arc<VmPack>, name: &str) -> Arc<LazyDisk> {
        let copy = dir.join(name);
        let f = std::fs::File::create(&copy).unwrap();
        f.set_len(4 * MIB as u64).unwrap();
        let section = p.manifest().disks[0].section.clone();
        LazyDisk::new(0, &copy, false, p.clone(), ChunkSource::PackFile, &section).unwrap()
    }

    #[test]
    fn reads_fill_what_they_touch_and_writes_merge() {
        let d = tempfile::tempdir().unwrap();
        for c in [Compression::None, Compression::Zstd] {
            let p = pack(d.path(), c);
            let l = lazy(d.path(), &p, &format!("{c}.img"));
            let all = l.pending();
            assert_eq!(all, 3, "the zero MiB is not stored");
            let img = l.image();
            let mut b = [0u8; 3];
            img.read_at(&mut b, 2 * MIB as u64 + 5).unwrap();
            assert_eq!(b, [5, 6, 7], "{c}");
            assert_eq!(l.pending(), all - 1);
            // Missing chunks count as data, and asking fills nothing.
            let m = MIB as u64;
            assert_eq!(img.data_ranges().unwrap(), vec![0..m, 2 * m..4 * m], "{c}");
            assert_eq!(l.pending(), all - 1);
            // A write into a missing chunk keeps the rest of that chunk.
            img.write_at(&[9, 9], 3 * MIB as u64 + 10).unwrap();
            let mut b = [0u8; 4];
            img.read_at(&mut b, 3 * MIB as u64 + 9).unwrap();
            assert_eq!(b, [3, 9, 9, 3], "{c}");
            l.fill_all().unwrap();
            assert_eq!(l.pending(), 0);
            let mut want = disk();
            want[3 * MIB + 10..3 * MIB + 12].fill(9);
            let mut got = vec![0u8; 4 * MIB];
            img.read_at(&mut got, 0).unwrap();
            assert!(got == want, "{c}");
        }
    }

    #[test]
    fn the_background_fill_completes() {
        let d = tempfile::tempdir().unwrap();
        let p = pack(d.path(), Compression::Zstd);
        let l = lazy(d.path(), &p, "bg.img");
        l.start_fill();
        let t = std::time::Instant::now();
        while l.pending() > 0 {
            assert!(t.elapsed().as_secs() < 30, "{l:?}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(std::fs::read(d.path().join("bg.img")).unwrap() == disk());
    }

    #[test]
    fn a_corrupt_chunk_is_never_written_and_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = pack(d.path(), Compression::None);
        let section = p.manifest().disks[0].section.clone();
        let id = p.reader().section(&section).unwrap().id;
        let e = p
            .reader()
            .chunks(id)
            .iter()
            .find(|e| e.offset == 3 * MIB as u64)
            .unwrap()
            .clone();
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(p.path())
                .unwrap();
            f.write_all_at(&[0x55], e.payload_offset + 100).unwrap();
        }
        let l = lazy(d.path(), &p, "bad.img");
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        l.on_failure(Box::new(move |m| {
            let _ = lock(&tx).send(m);
        }));
        let img = l.image();
        let mut b = [0u8; 2];
        img.read_at(&mut b, 5).unwrap();
        assert_eq!(b, [1, 1]);
        let err = img.read_at(&mut b, 3 * MIB as u64).unwrap_err().to_string();
        let msg = rx.try_recv().unwrap();
        assert_eq!(err, msg);
        assert!(msg.contains(&p.path().display().to_string()), "{msg}");
        assert!(msg.contains(&format!("section '{section}'")), "{msg}");
        assert!(msg.contains(&format!("chunk {}", e.seq)), "{msg}");
        assert!(msg.contains("disk 0 at 0x300000..0x400000"), "{msg}");
        // Never written into the copy; and everything after fails the same way.
        let copy = std::fs::read(d.path().join("bad.img")).unwrap();
        assert!(copy[3 * MIB..].iter().all(|&b| b == 0));
        assert!(l.fill_all().is_err());
        assert!(img.write_at(&[1], 3 * MIB as u64).is_err());
    }
}
