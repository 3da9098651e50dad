//! Verified lazy restore: guest RAM filled on first touch through `userfaultfd`.
//!
//! Each RAM region is registered with a userfaultfd in MISSING mode. A handler thread reads
//! every fault, finds the pack chunk that holds the address, reads it (decompressing a
//! compressed one), checks its SHA-256 against the pack's index and only then copies the
//! whole chunk into place with `UFFDIO_COPY`, which also wakes the faulting thread. Zero
//! chunks are mapped with `UFFDIO_ZEROPAGE`. A chunk that fails its check is never copied:
//! the VM is told to stop (the failure callback), and the faulting thread gets zero pages
//! only after the stop was requested, so it leaves `KVM_RUN` on the pending kick before the
//! guest runs another instruction.
//!
//! Prefetch workers (one per core, at most four), started once the vCPUs run, fill the
//! remaining non-zero chunks (first those the guest touched first on an earlier restore of
//! the same pack, in that order), so the VM soon no longer faults at all and a later save
//! finds every page.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use vmpack_formats::pack::{ChunkEntry, Codec, PackReader};
use vmpack_formats::vm::VmPack;

pub(crate) const PAGE: u64 = 4096;

// The userfaultfd ABI (linux/userfaultfd.h); the libc crate does not carry it.
const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    flags: u64,
    address: u64,
    _ptid: u64,
}

/// Brings a chunk's stored bytes into the local pack file before it is read, for a pack
/// whose memory payloads are not there yet (a restore straight from a registry: the local
/// file holds the skeleton, memory chunks are holes). Verification stays in one place:
/// after `fetch`, the chunk is read back through the pack reader and checked against the
/// index like any other, so what a fetch writes is never trusted.
pub trait ChunkFetch: Send + Sync {
    /// Writes the stored payload of `e` at its payload offset in the pack file.
    fn fetch(&self, e: &ChunkEntry) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// The same for a chunk of pack `pack` of a chain (`ChunkTable::packs`, base first);
    /// [`ChunkFetch::fetch`] is for the restored pack itself (its disks, a pack alone).
    fn fetch_from(
        &self,
        pack: usize,
        e: &ChunkEntry,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let _ = pack;
        self.fetch(e)
    }
}

/// Where the bytes of memory chunks come from: the pack file itself, or a fetcher that
/// fills the pack file's holes on demand.
#[derive(Clone, Default)]
pub enum ChunkSource {
    #[default]
    PackFile,
    Fetch(Arc<dyn ChunkFetch>),
}

/// One chunk of guest RAM: where it goes and which pack holds it.
#[derive(Clone, Debug)]
pub struct PackChunk {
    pub gpa: u64,
    /// Index into [`ChunkTable::packs`].
    pub pack: usize,
    pub entry: ChunkEntry,
}

/// Every chunk of guest RAM and the packs they are read from: one pack, or a chain of diff
/// packs where each chunk comes from the newest pack holding it. Read (and verified) on
/// first touch by a lazy restore, and again for the pages a reset puts back where memory is
/// not mapped from a file.
#[derive(Clone)]
pub struct ChunkTable {
    pub packs: Vec<Arc<VmPack>>,
    pub chunks: Vec<PackChunk>,
}

impl ChunkTable {
    /// The memory sections `(gpa, section id)` of one pack.
    pub fn of_pack(pack: Arc<VmPack>, sections: &[(u64, u32)]) -> ChunkTable {
        let reader = pack.reader();
        let chunks = sections
            .iter()
            .flat_map(|&(gpa, id)| {
                reader.chunks(id).iter().map(move |e| PackChunk {
                    gpa: gpa.saturating_add(e.offset),
                    pack: 0,
                    entry: e.clone(),
                })
            })
            .collect();
        ChunkTable {
            packs: vec![pack],
            chunks,
        }
    }

    /// Places every chunk in `regions` (`(gpa, host address, size)`), sorted by host
    /// address; a chunk that is not page-aligned inside one region is refused by name.
    fn place(&self, regions: &[(u64, u64, u64)]) -> super::Result<Vec<Chunk>> {
        let mut out = Vec::with_capacity(self.chunks.len());
        for c in &self.chunks {
            let e = &c.entry;
            let end = c.gpa.checked_add(u64::from(e.ulen));
            let region = regions
                .iter()
                .find(|&&(gpa, _, size)| c.gpa >= gpa && end.is_some_and(|end| end <= gpa + size));
            let Some(&(gpa, host, _)) = region.filter(|_| {
                c.gpa % PAGE == 0 && u64::from(e.ulen) % PAGE == 0 && c.pack < self.packs.len()
            }) else {
                return Err(super::Error::Layout(format!(
                    "{}: memory chunk {} at guest address {:#x} ({} bytes) does not fit page-aligned in a RAM region",
                    self.packs.get(c.pack).map_or_else(String::new, |p| p.path().display().to_string()),
                    e.seq,
                    c.gpa,
                    e.ulen
                )));
            };
            out.push(Chunk {
                host: host + (c.gpa - gpa),
                gpa: c.gpa,
                pack: c.pack,
                entry: e.clone(),
            });
        }
        out.sort_by_key(|c| c.host);
        if out
            .windows(2)
            .any(|w| w[0].host + u64::from(w[0].entry.ulen) > w[1].host)
        {
            return Err(super::Error::Layout("memory chunks overlap".into()));
        }
        Ok(out)
    }

    /// The largest chunk's bytes and stored frame (the size of a reader's buffers).
    fn max_chunk(chunks: &[Chunk]) -> (usize, usize) {
        chunks
            .iter()
            .filter(|c| c.entry.codec != Codec::Zero)
            .fold((0, 0), |(d, f), c| {
                (
                    d.max(c.entry.ulen as usize),
                    f.max(PackReader::frame_len(&c.entry)),
                )
            })
    }
}

/// Where the chunks of guest RAM come from.
pub struct LazySource {
    pub table: ChunkTable,
    pub source: ChunkSource,
    /// The global chunk numbers (see [`LazyMemory::chunk_count`]) to prefetch first.
    pub first: Vec<usize>,
    /// Other sections of `table.packs[0]` the prefetch verifies after memory (the boot
    /// files, which only a later save reads): a failure stops the VM like a memory chunk's.
    pub verify_later: Vec<u32>,
    /// Called once, from the prefetch thread, when every chunk was checked and placed, with
    /// the chunk numbers in the order the guest first touched them.
    pub on_complete: Option<CompleteFn>,
}

/// One reader's buffers for the largest chunk of the pack, made before any fault: reading a
/// chunk then allocates nothing sized by it, so memory pressure (`ulimit -v`) cannot abort
/// the process in the middle of a fault with the guest half restored; it fails `start`
/// (or leaves a prefetch to the faults) instead.
struct Buffers {
    data: Vec<u8>,
    frame: Vec<u8>,
}

impl Buffers {
    fn new(data: usize, frame: usize) -> std::io::Result<Buffers> {
        let oom = |e: std::collections::TryReserveError| {
            std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!("cannot allocate the buffers of a {data}-byte chunk: {e}"),
            )
        };
        let mut b = Buffers {
            data: Vec::new(),
            frame: Vec::new(),
        };
        b.data.try_reserve_exact(data).map_err(oom)?;
        b.data.resize(data, 0);
        b.frame.try_reserve_exact(frame).map_err(oom)?;
        Ok(b)
    }
}

struct Chunk {
    host: u64,
    gpa: u64,
    pack: usize,
    entry: ChunkEntry,
}

const MISSING: u8 = 0;
const LOADING: u8 = 1;
const DONE: u8 = 2;

type FailureFn = Box<dyn Fn(String) + Send + Sync>;
type CompleteFn = Box<dyn FnOnce(Vec<usize>) + Send>;

struct Shared {
    uffd: OwnedFd,
    packs: Vec<Arc<VmPack>>,
    source: ChunkSource,
    verify_later: Vec<u32>,
    /// Sorted by host address.
    chunks: Vec<Chunk>,
    state: Vec<AtomicU8>,
    /// Whether the guest (or any reader but the prefetch) faulted on the chunk.
    faulted: Vec<AtomicBool>,
    stop: AtomicBool,
    /// Set when a reset dropped placed chunks: [`LazyMemory::wait_complete`] fills them again.
    dropped: AtomicBool,
    /// The largest chunk's bytes and stored frame: the size of every reader's [`Buffers`].
    max_chunk: (usize, usize),
    /// The first failure and who to tell (set once the VM exists).
    failure: Mutex<(Option<String>, Option<FailureFn>)>,
    touched: Mutex<Vec<usize>>,
    /// Set when the prefetch has placed every non-zero chunk.
    complete: (Mutex<bool>, Condvar),
}

/// Lazily filled guest RAM: the handler thread and, once started, the prefetch thread.
pub struct LazyMemory {
    shared: Arc<Shared>,
    wake: OwnedFd,
    handler: Option<std::thread::JoinHandle<()>>,
    prefetch: Mutex<Option<std::thread::JoinHandle<()>>>,
    first: Mutex<Option<(Vec<usize>, Option<CompleteFn>)>>,
}

/// Whether this process can use userfaultfd for guest RAM (KVM's faults come from the
/// kernel, so user-mode-only userfaultfd is not enough).
pub fn available() -> bool {
    open_uffd().is_ok()
}

fn open_uffd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API with a properly sized struct.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

impl LazyMemory {
    /// Registers `regions` (`(gpa, host address, size)`) and starts the fault handler.
    /// Nothing is read from the pack until something touches guest RAM.
    pub fn start(regions: &[(u64, u64, u64)], src: LazySource) -> super::Result<LazyMemory> {
        use super::{Context, Error};
        let chunks = src.table.place(regions)?;
        let max_chunk = ChunkTable::max_chunk(&chunks);
        let buffers = Buffers::new(max_chunk.0, max_chunk.1)
            .context("preparing the guest memory fault handler")?;
        // Each chunk is recorded once at most: pushing never allocates.
        let mut touched = Vec::new();
        touched
            .try_reserve_exact(chunks.len())
            .map_err(|e| Error::Layout(format!("preparing the guest memory fault handler: {e}")))?;
        let uffd = open_uffd().context("userfaultfd")?;
        for &(_, host, size) in regions {
            let mut reg = UffdioRegister {
                range: UffdioRange {
                    start: host,
                    len: size,
                },
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            // SAFETY: registers a range of our own anonymous mapping.
            if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .context("registering guest RAM with userfaultfd");
            }
        }
        // SAFETY: plain syscall; the fd is owned below.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(std::io::Error::last_os_error()).context("eventfd");
        }
        // SAFETY: a fresh fd.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        let state = chunks.iter().map(|_| AtomicU8::new(MISSING)).collect();
        let faulted = chunks.iter().map(|_| AtomicBool::new(false)).collect();
        let shared = Arc::new(Shared {
            uffd,
            packs: src.table.packs,
            source: src.source,
            verify_later: src.verify_later,
            chunks,
            state,
            faulted,
            stop: AtomicBool::new(false),
            dropped: AtomicBool::new(false),
            max_chunk,
            failure: Mutex::new((None, None)),
            touched: Mutex::new(touched),
            complete: (Mutex::new(false), Condvar::new()),
        });
        let (s, w) = (shared.clone(), wake.as_raw_fd());
        let handler = std::thread::Builder::new()
            .name("uffd".into())
            .spawn(move || s.serve_faults(w, buffers))
            .context("starting the guest memory fault handler")?;
        Ok(LazyMemory {
            shared,
            wake,
            handler: Some(handler),
            prefetch: Mutex::new(None),
            first: Mutex::new(Some((src.first, src.on_complete))),
        })
    }

    /// Tells `f` about a chunk that failed verification (now, if one already did).
    pub fn on_failure(&self, f: FailureFn) {
        let mut g = lock(&self.shared.failure);
        if let Some(m) = &g.0 {
            f(m.clone());
        }
        g.1 = Some(f);
    }

    /// Starts filling the chunks the guest has not touched yet (once).
    pub fn start_prefetch(&self) {
        let Some((first, done)) = lock(&self.first).take() else {
            return;
        };
        let s = self.shared.clone();
        let t = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || s.prefetch(first, done));
        // Without the thread, faults still fill memory; wait_complete fills the rest.
        if let Ok(t) = t {
            *lock(&self.prefetch) = Some(t);
        }
    }

    /// Blocks until every non-zero chunk is in guest RAM (a save reads all of it), or a
    /// chunk failed verification.
    pub fn wait_complete(&self) {
        self.start_prefetch();
        if lock(&self.prefetch).is_none() {
            // No prefetch thread: fill here (or, short of memory for the buffers, leave it to
            // the faults the save's reads make).
            let (d, f) = self.shared.max_chunk;
            if let Ok(mut b) = Buffers::new(d, f) {
                self.shared.dropped.store(false, Ordering::SeqCst);
                for i in 0..self.shared.chunks.len() {
                    self.shared.load(i, &mut b);
                }
            }
            return;
        }
        let (m, cv) = &self.shared.complete;
        let mut done = lock(m);
        while !*done && !self.shared.stop.load(Ordering::SeqCst) {
            done = cv.wait(done).unwrap_or_else(|p| p.into_inner());
        }
        drop(done);
        self.refill_dropped();
    }

    /// For a reset: drops the pages of `ranges` (`(host address, len)`, page-aligned, sorted)
    /// and marks the chunks holding them missing again, so the next touch (or
    /// [`LazyMemory::wait_complete`]) reads and verifies them from the pack again, as on the
    /// first touch. No vCPU may run and no device may write guest memory meanwhile.
    pub fn revert(&self, ranges: &[(u64, u64)]) -> std::io::Result<()> {
        let s = &self.shared;
        for &(start, len) in ranges {
            let end = start + len;
            let first = s
                .chunks
                .partition_point(|c| c.host + u64::from(c.entry.ulen) <= start);
            let hit = first..first + s.chunks[first..].partition_point(|c| c.host < end);
            // Each holds a written page, so it was placed; one the prefetch is copying
            // again finishes first, or it would stay marked placed with pages missing.
            for i in hit.clone() {
                while s.state[i].load(Ordering::SeqCst) == LOADING {
                    std::thread::yield_now();
                }
            }
            // SAFETY: the range lies in guest RAM, registered with the handler: dropped
            // pages fault into it on their next touch.
            if unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    len as usize,
                    libc::MADV_DONTNEED,
                )
            } != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            for i in hit {
                if s.state[i]
                    .compare_exchange(DONE, MISSING, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    s.dropped.store(true, Ordering::SeqCst);
                }
            }
        }
        Ok(())
    }

    /// Places the chunks a reset dropped (see [`LazyMemory::revert`]) that nothing touched
    /// since, so every non-zero chunk is in guest RAM again.
    fn refill_dropped(&self) {
        if !self.shared.dropped.swap(false, Ordering::SeqCst) {
            return;
        }
        let (d, f) = self.shared.max_chunk;
        if let Ok(mut b) = Buffers::new(d, f) {
            for i in 0..self.shared.chunks.len() {
                if self.shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                self.shared.load(i, &mut b);
            }
        }
    }

    /// The verification failure that stopped the VM, if any.
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.failure).0.clone()
    }

    pub fn chunk_count(&self) -> usize {
        self.shared.chunks.len()
    }
}

/// Puts back pages of guest RAM filled from a pack that is not mapped (a compressed pack),
/// for a reset: each chunk holding a dropped page is read and verified again and the
/// dropped pages get its bytes.
pub struct Refill {
    packs: Vec<Arc<VmPack>>,
    chunks: Vec<Chunk>,
    max_chunk: (usize, usize),
    /// Made on the first reset and kept.
    buffers: Mutex<Option<Buffers>>,
}

impl Refill {
    /// `regions` as for [`LazyMemory::start`].
    pub fn new(regions: &[(u64, u64, u64)], table: ChunkTable) -> super::Result<Refill> {
        let chunks = table.place(regions)?;
        let max_chunk = ChunkTable::max_chunk(&chunks);
        Ok(Refill {
            packs: table.packs,
            chunks,
            max_chunk,
            buffers: Mutex::new(None),
        })
    }

    /// Writes the pack's bytes over `ranges` (`(host address, len)`, page-aligned, sorted),
    /// whose pages were just dropped (they read zero). No vCPU may run and no device may
    /// write guest memory meanwhile.
    pub fn rewrite(&self, ranges: &[(u64, u64)]) -> super::Result<()> {
        let mut g = lock(&self.buffers);
        if g.is_none() {
            *g = Some(Buffers::new(self.max_chunk.0, self.max_chunk.1)?);
        }
        let b = g.as_mut().expect("made above");
        let mut read: Option<usize> = None;
        for &(start, len) in ranges {
            let end = start + len;
            let first = self
                .chunks
                .partition_point(|c| c.host + u64::from(c.entry.ulen) <= start);
            for (i, c) in self.chunks.iter().enumerate().skip(first) {
                if c.host >= end {
                    break;
                }
                if c.entry.codec == Codec::Zero {
                    continue;
                }
                let ulen = c.entry.ulen as usize;
                if read != Some(i) {
                    self.packs[c.pack]
                        .reader()
                        .read_chunk_reusing(&c.entry, true, &mut b.data[..ulen], &mut b.frame)
                        .map_err(|e| {
                            super::Error::Layout(format!(
                                "putting back guest memory at {:#x}: {e}",
                                c.gpa
                            ))
                        })?;
                    read = Some(i);
                }
                let (s, e) = (start.max(c.host), end.min(c.host + ulen as u64));
                let from = &b.data[(s - c.host) as usize..(e - c.host) as usize];
                // SAFETY: `s..e` lies inside chunk `i`'s place in guest RAM (placed inside a
                // region by `ChunkTable::place`), which lives as long as the VM; the caller
                // keeps vCPUs and devices off it.
                unsafe { std::ptr::copy_nonoverlapping(from.as_ptr(), s as *mut u8, from.len()) };
            }
        }
        Ok(())
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.complete.1.notify_all();
        let one: u64 = 1;
        // SAFETY: writes 8 bytes to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), std::ptr::addr_of!(one).cast(), 8) };
        if let Some(t) = self.handler.take() {
            let _ = t.join();
        }
        if let Some(t) = lock(&self.prefetch).take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn serve_faults(&self, wake: i32, mut buffers: Buffers) {
        let mut msgs = [UffdMsg {
            event: 0,
            _reserved1: 0,
            _reserved2: 0,
            _reserved3: 0,
            flags: 0,
            address: 0,
            _ptid: 0,
        }; 16];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: wake,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            // SAFETY: reads whole messages into a buffer of that many messages.
            let got = unsafe {
                libc::read(
                    self.uffd.as_raw_fd(),
                    msgs.as_mut_ptr().cast(),
                    std::mem::size_of_val(&msgs),
                )
            };
            if got <= 0 {
                continue;
            }
            let count = got as usize / std::mem::size_of::<UffdMsg>();
            for m in &msgs[..count] {
                if m.event != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let _ = m.flags;
                match self.find(m.address) {
                    Some(i) => {
                        if self.chunks[i].entry.codec != Codec::Zero
                            && !self.faulted[i].swap(true, Ordering::SeqCst)
                        {
                            lock(&self.touched).push(i);
                        }
                        self.load(i, &mut buffers);
                        let c = &self.chunks[i];
                        self.wake(c.host, u64::from(c.entry.ulen));
                    }
                    // Not in any chunk (cannot happen for a valid pack): give it a zero page
                    // rather than leave the thread hanging.
                    None => self.zero(m.address & !(PAGE - 1), PAGE),
                }
            }
        }
    }

    fn find(&self, addr: u64) -> Option<usize> {
        let i = self
            .chunks
            .partition_point(|c| c.host <= addr)
            .checked_sub(1)?;
        let c = &self.chunks[i];
        (addr < c.host + u64::from(c.entry.ulen)).then_some(i)
    }

    /// Makes chunk `i` present (once): read, verify, copy. Returns when it is present, also
    /// when another thread was loading it.
    fn load(&self, i: usize, buffers: &mut Buffers) {
        match self.state[i].compare_exchange(MISSING, LOADING, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => {}
            Err(_) => {
                while self.state[i].load(Ordering::SeqCst) == LOADING {
                    std::thread::yield_now();
                }
                return;
            }
        }
        let c = &self.chunks[i];
        let len = u64::from(c.entry.ulen);
        if c.entry.codec == Codec::Zero || lock(&self.failure).0.is_some() {
            self.zero(c.host, len);
        } else {
            let b = &mut buffers.data[..c.entry.ulen as usize];
            let reader: &PackReader = self.packs[c.pack].reader();
            let fetched = match &self.source {
                ChunkSource::PackFile => Ok(()),
                ChunkSource::Fetch(f) => f.fetch_from(c.pack, &c.entry),
            };
            let read = match fetched {
                Ok(()) => reader
                    .read_chunk_reusing(&c.entry, true, b, &mut buffers.frame)
                    .map_err(|e| match &e.kind {
                        // A decompression context the codec could not get.
                        vmpack_formats::pack::PackErrorKind::Io(x)
                            if x.kind() == std::io::ErrorKind::OutOfMemory =>
                        {
                            format!("could not be read (out of memory): {e}")
                        }
                        _ => format!("failed verification before the guest read it: {e}"),
                    }),
                Err(e) => Err(format!(
                    "was not placed (the guest did not read it): {}",
                    crate::error::Chain(&*e)
                )),
            };
            match read {
                Ok(()) => self.copy(c.host, b),
                Err(e) => {
                    self.fail(format!(
                        "guest memory at {:#x}..{:#x} {e}",
                        c.gpa,
                        c.gpa + len
                    ));
                    // The VM is stopping (kicked above); the faulting thread needs some
                    // page to return to KVM, and it must not be the pack's bytes.
                    self.zero(c.host, len);
                }
            }
        }
        self.state[i].store(DONE, Ordering::SeqCst);
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

    fn copy(&self, dst: u64, data: &[u8]) {
        let mut done = 0u64;
        let len = data.len() as u64;
        while done < len {
            let mut c = UffdioCopy {
                dst: dst + done,
                src: data.as_ptr() as u64 + done,
                len: len - done,
                mode: 0,
                copy: 0,
            };
            // SAFETY: `src` is our buffer of `len` bytes, `dst` lies in a registered range.
            let r = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_COPY, &mut c) };
            if r == 0 {
                return;
            }
            let err = std::io::Error::last_os_error().raw_os_error();
            if c.copy > 0 {
                done += c.copy as u64;
                continue;
            }
            match err {
                Some(libc::EAGAIN) => continue,
                // A page already there: skip it (keep what it holds).
                Some(libc::EEXIST) => done += PAGE,
                // The mapping is gone (VM torn down) or something else: give up on it.
                _ => return,
            }
        }
    }

    fn zero(&self, start: u64, len: u64) {
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: the range lies in a registered range.
        let r = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) };
        if r != 0 {
            // Partly present already (EEXIST): zero page by page.
            for p in (start..start + len).step_by(PAGE as usize) {
                let mut z = UffdioZeropage {
                    range: UffdioRange {
                        start: p,
                        len: PAGE,
                    },
                    mode: 0,
                    zeropage: 0,
                };
                // SAFETY: as above.
                unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) };
            }
        }
    }

    /// Wakes threads waiting on `start..start+len` (their page may have been placed by the
    /// other thread, whose copy woke only the waiters it knew of).
    fn wake(&self, start: u64, len: u64) {
        let mut r = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE on a registered range.
        unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_WAKE, &mut r) };
    }

    fn prefetch(&self, first: Vec<usize>, done: Option<CompleteFn>) {
        let n = self.chunks.len();
        let order: Vec<usize> = first
            .into_iter()
            .filter(|&i| i < n)
            .chain(0..n)
            .filter(|&i| self.chunks[i].entry.codec != Codec::Zero)
            .collect();
        let threads = prefetch_threads(&self.source);
        let next = std::sync::atomic::AtomicUsize::new(0);
        // Short of memory for a worker's buffers, the faults still fill what the guest (or
        // a save) reads; the pack is then not recorded as checked in full.
        let short = AtomicBool::new(false);
        let work = || {
            let (d, f) = self.max_chunk;
            let Ok(mut b) = Buffers::new(d, f) else {
                short.store(true, Ordering::SeqCst);
                return;
            };
            loop {
                if self.stop.load(Ordering::SeqCst) || lock(&self.failure).0.is_some() {
                    break;
                }
                let k = next.fetch_add(1, Ordering::SeqCst);
                let Some(&i) = order.get(k) else { break };
                self.load(i, &mut b);
            }
        };
        std::thread::scope(|s| {
            // Extra workers that cannot be started leave their share to this thread.
            for _ in 1..threads {
                if std::thread::Builder::new().spawn_scoped(s, work).is_err() {
                    break;
                }
            }
            work();
        });
        for &id in &self.verify_later {
            if self.stop.load(Ordering::SeqCst) || lock(&self.failure).0.is_some() {
                break;
            }
            let r = self.packs[0].reader();
            if let Err(e) = r.for_each_chunk_parallel(id, true, 1, &|_, _| Ok(())) {
                self.fail(format!(
                    "a boot file kept for later saves failed verification: {e}"
                ));
            }
        }
        let ok = !self.stop.load(Ordering::SeqCst)
            && lock(&self.failure).0.is_none()
            && !short.load(Ordering::SeqCst);
        let (m, cv) = &self.complete;
        *lock(m) = true;
        cv.notify_all();
        if ok {
            if let Some(f) = done {
                f(lock(&self.touched).clone());
            }
        }
    }
}

/// Most prefetch workers for a pack file, whatever the host has.
const MAX_PREFETCH_THREADS: usize = 4;

/// Prefetch workers for a pack file as set by [`set_prefetch_threads`]; 0 = the default.
static PREFETCH_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sets how many workers prefetch a pack file (1 to 64; anything else means the default):
/// the binaries pass `VMBOOT_PREFETCH_THREADS`, as the library reads no environment.
pub fn set_prefetch_threads(n: usize) {
    let n = if (1..=64).contains(&n) { n } else { 0 };
    PREFETCH_THREADS.store(n, std::sync::atomic::Ordering::Relaxed);
}

/// How many threads fill memory in the background. A fetch waits on the network: a few in
/// flight keep the link busy. For a pack file the work is hashing (and decompressing) each
/// chunk, which one core does at a fraction of the page cache's speed: one worker per core,
/// at most [`MAX_PREFETCH_THREADS`], or what [`set_prefetch_threads`] set.
fn prefetch_threads(source: &ChunkSource) -> usize {
    if let ChunkSource::Fetch(_) = source {
        return 4;
    }
    match PREFETCH_THREADS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_PREFETCH_THREADS),
        n => n,
    }
}

/// The order in which the guest first touched a pack's chunks, kept next to the verification
/// records (`touch/<root digest>` in the cache folder), one chunk number per line: a later
/// restore of the same pack prefetches those first.
pub mod touch_order {
    use std::path::Path;

    /// Larger records are ignored (a cache file is not trusted to be small).
    const MAX_LEN: u64 = 16 << 20;

    pub fn load(dir: &Path, root: [u8; 32], chunks: usize) -> Vec<usize> {
        let p = dir.join(hex::encode(root));
        match std::fs::metadata(&p) {
            Ok(m) if m.len() <= MAX_LEN => {}
            _ => return Vec::new(),
        }
        let Ok(text) = std::fs::read_to_string(&p) else {
            return Vec::new();
        };
        let mut seen = vec![false; chunks];
        text.lines()
            .filter_map(|l| l.trim().parse::<usize>().ok())
            .filter(|&i| i < chunks && !std::mem::replace(&mut seen[i], true))
            .collect()
    }

    /// Best effort, like the verification records.
    pub fn store(dir: &Path, root: [u8; 32], order: &[usize]) {
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        let mut text = String::with_capacity(order.len() * 6);
        for i in order {
            text.push_str(&i.to_string());
            text.push('\n');
        }
        let name = hex::encode(root);
        let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join(name));
        }
    }
}

/// The folder of touch-order records, beside the verification records.
pub fn touch_dir(cache: Option<PathBuf>) -> Option<PathBuf> {
    cache.map(|c| c.join("touch"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestMemoryInit, GuestRam};
    use vmpack_formats::config::VmConfig;
    use vmpack_formats::pack::{Compression, SectionSource, WriteOptions};
    use vmpack_formats::vm::{write_vm_pack, VmPackPlan};

    const CHUNK: usize = 256 << 10;

    /// A 1 MiB guest: chunk 0 all 1, chunk 1 zero, chunk 2 all 2, chunk 3 a counting pattern.
    fn guest() -> Vec<u8> {
        let mut m = vec![0u8; 4 * CHUNK];
        m[..CHUNK].fill(1);
        m[2 * CHUNK..3 * CHUNK].fill(2);
        for (i, b) in m[3 * CHUNK..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        m
    }

    fn pack(dir: &std::path::Path, compression: Compression) -> Arc<VmPack> {
        std::fs::write(dir.join("g.bin"), b"\xf4").unwrap();
        let text = "name = \"t\"\nmemory_mib = 1\n[flat]\nimage = \"g.bin\"\n\
                    load_address = 0x1000\nentry = 0x1000\nmode = \"real\"\n";
        let cfg = VmConfig::parse(text, &dir.join("vm.toml")).unwrap();
        let mem = guest();
        let plan = VmPackPlan {
            memory: vec![(0, &mem as &dyn SectionSource)],
            vmstate: Some(b"{}"),
            memory_chunk_size: Some(CHUNK as u32),
            ..VmPackPlan::default()
        };
        let path = dir.join(format!("{compression}.vmpack"));
        let opts = WriteOptions {
            compression,
            aligned: compression == Compression::None,
            ..WriteOptions::default()
        };
        write_vm_pack(
            std::fs::File::create(&path).unwrap(),
            &cfg,
            plan,
            &opts,
            &(),
        )
        .unwrap();
        Arc::new(VmPack::open(&path).unwrap())
    }

    fn lazy_ram(pack: &Arc<VmPack>) -> GuestRam {
        let id = pack.reader().section("memory/0").unwrap().id;
        GuestRam::new(
            &[(0, 4 * CHUNK as u64)],
            GuestMemoryInit::Lazy(LazySource {
                table: ChunkTable::of_pack(pack.clone(), &[(0, id)]),
                source: ChunkSource::PackFile,
                first: Vec::new(),
                verify_later: Vec::new(),
                on_complete: None,
            }),
        )
        .unwrap()
    }

    #[test]
    fn faults_are_served_from_the_pack() {
        if !available() {
            eprintln!("*** SKIPPED: userfaultfd is not available here ***");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        for c in [Compression::None, Compression::Zstd, Compression::Deflate] {
            let p = pack(d.path(), c);
            let ram = lazy_ram(&p);
            // Out of order, and each read a fault served by the handler thread.
            assert_eq!(
                ram.read(3 * CHUNK as u64 + 5, 3).unwrap(),
                vec![5, 6, 7],
                "{c}"
            );
            assert_eq!(ram.read(CHUNK as u64 + 9, 2).unwrap(), vec![0, 0], "{c}");
            assert_eq!(ram.read(0, 4 * CHUNK).unwrap(), guest(), "{c}");
        }
    }

    #[test]
    fn prefetch_fills_everything_and_reports_the_touch_order() {
        if !available() {
            eprintln!("*** SKIPPED: userfaultfd is not available here ***");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = pack(d.path(), Compression::Zstd);
        let id = p.reader().section("memory/0").unwrap().id;
        let (tx, rx) = std::sync::mpsc::channel();
        let ram = GuestRam::new(
            &[(0, 4 * CHUNK as u64)],
            GuestMemoryInit::Lazy(LazySource {
                table: ChunkTable::of_pack(p.clone(), &[(0, id)]),
                source: ChunkSource::PackFile,
                first: vec![2],
                verify_later: Vec::new(),
                on_complete: Some(Box::new(move |order| tx.send(order).unwrap())),
            }),
        )
        .unwrap();
        assert_eq!(ram.read(3 * CHUNK as u64, 1).unwrap(), vec![0]);
        // What a save does first: every non-zero chunk is resident afterwards.
        let ranges = ram.data_ranges();
        let order = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(order, vec![3]);
        let resident: u64 = ranges[0].iter().map(|r| r.end - r.start).sum();
        assert!(resident >= 3 * CHUNK as u64, "{ranges:?}");
        assert_eq!(ram.read(0, 4 * CHUNK).unwrap(), guest());
    }

    #[test]
    fn a_corrupt_chunk_is_never_placed_and_is_reported_by_name() {
        if !available() {
            eprintln!("*** SKIPPED: userfaultfd is not available here ***");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        for c in [Compression::None, Compression::Zstd] {
            let p = pack(d.path(), c);
            let e = p
                .reader()
                .chunks(p.reader().section("memory/0").unwrap().id)[3]
                .clone();
            {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(p.path())
                    .unwrap();
                let mut b = [0u8; 1];
                f.read_exact_at(&mut b, e.payload_offset + 100)
                    .unwrap_or(());
                f.write_all_at(&[b[0] ^ 0x55], e.payload_offset + 100)
                    .unwrap();
            }
            let ram = lazy_ram(&p);
            let (tx, rx) = std::sync::mpsc::channel();
            let tx = Mutex::new(tx);
            ram.lazy().unwrap().on_failure(Box::new(move |m| {
                let _ = lock(&tx).send(m);
            }));
            assert_eq!(ram.read(5, 2).unwrap(), vec![1, 1], "{c}");
            // The corrupt chunk reads as zeros: its bytes never reach guest memory.
            assert_eq!(
                ram.read(3 * CHUNK as u64, 4 * 4096).unwrap(),
                vec![0; 4 * 4096]
            );
            let msg = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
            let file = p.path().display().to_string();
            assert!(msg.contains(&file), "{msg}");
            assert!(msg.contains("memory/0"), "{msg}");
            assert!(msg.contains("chunk 3"), "{msg}");
            assert!(
                msg.contains(&format!("{:#x}", e.frame_offset()))
                    || msg.contains(&e.frame_offset().to_string()),
                "{msg}"
            );
        }
    }

    /// What a reset of lazily filled RAM does: written pages dropped, their chunks served
    /// from the pack again on the next touch or by the fill a save waits for.
    #[test]
    fn reverted_pages_are_served_from_the_pack_again() {
        if !available() {
            eprintln!("*** SKIPPED: userfaultfd is not available here ***");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        for c in [Compression::None, Compression::Zstd] {
            let p = pack(d.path(), c);
            let ram = lazy_ram(&p);
            let host = ram.slots().next().unwrap().2;
            ram.write(3 * CHUNK as u64 + 4096, &[0xee; 8192]).unwrap();
            ram.write(CHUNK as u64, &[0xdd; 16]).unwrap();
            let l = ram.lazy().unwrap();
            l.revert(&[
                (host + CHUNK as u64, 4096),
                (host + 3 * CHUNK as u64 + 4096, 8192),
            ])
            .unwrap();
            assert_eq!(ram.read(CHUNK as u64, 16).unwrap(), vec![0; 16], "{c}");
            assert_eq!(ram.read(0, 4 * CHUNK).unwrap(), guest(), "{c}");
            // Dropped and never touched again: a save's wait fills it.
            ram.write(3 * CHUNK as u64, &[0xee; 4096]).unwrap();
            l.revert(&[(host + 3 * CHUNK as u64, 4096)]).unwrap();
            let ranges = ram.data_ranges();
            assert!(
                ranges[0].iter().any(|r| r.contains(&(3 * CHUNK as u64))),
                "{c}: {ranges:?}"
            );
            assert_eq!(ram.read(0, 4 * CHUNK).unwrap(), guest(), "{c}");
        }
    }

    /// What a reset of RAM unpacked from a compressed pack does after dropping the pages.
    #[test]
    fn refill_puts_the_packs_bytes_back() {
        let d = tempfile::tempdir().unwrap();
        let p = pack(d.path(), Compression::Zstd);
        let id = p.reader().section("memory/0").unwrap().id;
        let ram = GuestRam::new(&[(0, 4 * CHUNK as u64)], GuestMemoryInit::Zeroed).unwrap();
        let host = ram.slots().next().unwrap().2;
        let regions = [(0, host, 4 * CHUNK as u64)];
        let r = Refill::new(&regions, ChunkTable::of_pack(p.clone(), &[(0, id)])).unwrap();
        r.rewrite(&[(host, 4 * CHUNK as u64)]).unwrap();
        assert_eq!(ram.read(0, 4 * CHUNK).unwrap(), guest());
        ram.write(3 * CHUNK as u64 + 8192, &[9; 100]).unwrap();
        r.rewrite(&[(host + 3 * CHUNK as u64 + 8192, 4096)])
            .unwrap();
        assert_eq!(ram.read(0, 4 * CHUNK).unwrap(), guest());
        // A chunk that no longer matches its digest is refused by name, nothing written.
        let e = p.reader().chunks(id)[0].clone();
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(p.path())
                .unwrap();
            f.write_all_at(&[0x55; 4], e.payload_offset + 8).unwrap();
        }
        let p2 = Arc::new(VmPack::open(p.path()).unwrap());
        let r = Refill::new(&regions, ChunkTable::of_pack(p2, &[(0, id)])).unwrap();
        ram.write(0, &[7; 4]).unwrap();
        let err = r.rewrite(&[(host, 4096)]).unwrap_err().to_string();
        assert!(err.contains("chunk 0") && err.contains("memory/0"), "{err}");
        assert_eq!(ram.read(0, 4).unwrap(), vec![7; 4]);
    }

    #[test]
    fn touch_order_round_trip_ignores_garbage() {
        let d = tempfile::tempdir().unwrap();
        touch_order::store(d.path(), [1; 32], &[5, 2, 9]);
        assert_eq!(touch_order::load(d.path(), [1; 32], 10), vec![5, 2, 9]);
        // Out of range and repeated numbers are dropped.
        assert_eq!(touch_order::load(d.path(), [1; 32], 6), vec![5, 2]);
        std::fs::write(d.path().join(hex::encode([2u8; 32])), "x\n3\n3\n-1\n").unwrap();
        assert_eq!(touch_order::load(d.path(), [2; 32], 10), vec![3]);
        assert!(touch_order::load(d.path(), [3; 32], 10).is_empty());
    }
}
