//! Guest RAM: layout, allocation and the four ways of filling it (the lazy one lives in
//! `vstate::lazy`).
//!
//! vmboot maps every RAM region itself (anonymous `MAP_PRIVATE | MAP_NORESERVE`, so a 32 GiB
//! guest costs nothing until touched) and hands vm-memory non-owning views of those mappings.
//! That lets a restore map pack file pieces copy-on-write on top of the reservation
//! (`MAP_FIXED`) without vm-memory needing to know.

use super::{Context, Error, OptionContext, Result};
use std::os::fd::AsRawFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, MmapRegion};

/// Guest memory as the VMM sees it: every write through it (virtio used rings, disk reads
/// into guest buffers, entropy fills, the loaders) sets the page's bit in the region's
/// [`AtomicBitmap`], which [`crate::vstate::dirty`] merges with KVM's dirty log.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Start of the PCI/MMIO hole: RAM below 4 GiB ends here.
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// RAM beyond the first 3 GiB continues here.
pub const HIGH_RAM_START: u64 = 4 << 30;
const PAGE: u64 = 4096;

/// The guest-physical RAM regions `(gpa, size)` for a guest of `bytes` bytes: one region below
/// the MMIO hole and, for guests larger than 3 GiB, a second one from 4 GiB.
pub fn ram_layout(bytes: u64) -> Vec<(u64, u64)> {
    if bytes <= MMIO_HOLE_START {
        vec![(0, bytes)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (HIGH_RAM_START, bytes - MMIO_HOLE_START),
        ]
    }
}

/// One file of [`GuestMemoryInit::MapLayers`] and its pieces `(gpa, file offset, len)`.
pub type MapLayer = (std::fs::File, Vec<(u64, u64, u64)>);

/// Why [`GuestRam::reset_to_start`] refuses RAM that was neither mapped from nor can be
/// read again from a pack.
pub const NOT_REVERTIBLE: &str = "guest memory was filled from a pack it cannot read again (standard input), so it cannot be put back in place; restore from a pack file";

/// How a new VM's RAM gets its contents.
pub enum GuestMemoryInit {
    /// All zero (a fresh boot; the loader writes the payload afterwards).
    Zeroed,
    /// The closure receives every region as `(gpa, bytes)` and fills it (e.g. decompresses a
    /// pack's memory section). The regions start zeroed.
    Fill(FillFn),
    /// Map the given file ranges privately (copy-on-write) at these GPAs; the guest's writes
    /// never reach the file. Untouched ranges are zero.
    MapPrivate {
        file: std::fs::File,
        /// `(gpa, file offset, len)`, all multiples of 4 KiB.
        pieces: Vec<(u64, u64, u64)>,
    },
    /// Filled on first touch from a pack, each chunk verified first (see `vstate::lazy`).
    Lazy(crate::vstate::lazy::LazySource),
    /// [`GuestMemoryInit::MapPrivate`] from several files (a chain of diff packs): pieces
    /// of different files never overlap.
    MapLayers(Vec<MapLayer>),
    /// [`GuestMemoryInit::Fill`] with the chunks of a pack that cannot be mapped (a
    /// compressed one): a reset reads the chunks of the written pages again.
    Unpack {
        fill: FillFn,
        table: crate::vstate::lazy::ChunkTable,
    },
    /// Memory filled before the VM existed (a pack read from a pipe whose memory may come
    /// before its vmstate): its pages are moved into place, not copied.
    Staged(StagedRam),
}

impl std::fmt::Debug for GuestMemoryInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestMemoryInit::Zeroed => f.write_str("Zeroed"),
            GuestMemoryInit::Fill(_) => f.write_str("Fill(..)"),
            GuestMemoryInit::MapPrivate { pieces, .. } => {
                write!(f, "MapPrivate({} pieces)", pieces.len())
            }
            GuestMemoryInit::Lazy(_) => f.write_str("Lazy"),
            GuestMemoryInit::MapLayers(l) => write!(f, "MapLayers({} files)", l.len()),
            GuestMemoryInit::Unpack { table, .. } => {
                write!(f, "Unpack({} chunks)", table.chunks.len())
            }
            GuestMemoryInit::Staged(s) => write!(f, "Staged({} regions)", s.regions.len()),
        }
    }
}

struct RawRegion {
    gpa: u64,
    host: *mut u8,
    size: usize,
}

impl RawRegion {
    /// A fresh private anonymous mapping of `size` bytes for guest RAM at `gpa`; untouched
    /// pages take no memory (`MAP_NORESERVE`).
    fn reserve(gpa: u64, size: u64) -> Result<RawRegion> {
        let len = usize::try_from(size)
            .map_err(|_| Error::Layout("guest RAM region too large".into()))?;
        let host = map_anonymous(len)
            .with_context(|| format!("cannot reserve {} MiB of guest RAM", size >> 20))?;
        Ok(RawRegion {
            gpa,
            host,
            size: len,
        })
    }
}

/// A fresh private anonymous read-write mapping of `len` bytes that takes no memory until
/// touched (`MAP_NORESERVE`): guest RAM, staged RAM, a save's copy of RAM. The caller owns
/// it and unmaps it.
pub(crate) fn map_anonymous(len: usize) -> std::io::Result<*mut u8> {
    // SAFETY: a fresh anonymous mapping; no existing memory is affected.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(host.cast())
}

/// Guest RAM owned by vmboot. The mappings live until this is dropped.
pub struct GuestRam {
    // Declared before `regions` so vm-memory's (non-owning) views are dropped first.
    mem: GuestMemoryMmap,
    regions: Vec<RawRegion>,
    /// `(gpa, len)` of ranges mapped from a file: their content is the file's even where the
    /// guest never touched them.
    file_backed: Vec<(u64, u64)>,
    /// Set for a lazy restore: serves faults until dropped.
    lazy: Option<crate::vstate::lazy::LazyMemory>,
    /// The marks of "pages written since" (see [`crate::vstate::dirty`]).
    dirty: crate::vstate::dirty::DirtyLog,
    /// Mapped from pack files (`MapPrivate`, `MapLayers`): a written page reverts to mark
    /// 0's content when its private copy is dropped, which is what
    /// [`GuestRam::reset_to_start`] needs.
    revertible: bool,
    /// Filled from a pack that is not mapped (`Unpack`): how a reset puts pages back.
    refill: Option<crate::vstate::lazy::Refill>,
}

// SAFETY: the raw pointers are private mmap'ed memory that lives as long as `GuestRam`; all
// shared access goes through vm-memory's volatile accessors or through `slices`, whose
// callers guarantee the guest is not running.
unsafe impl Send for GuestRam {}
// SAFETY: see `Send`.
unsafe impl Sync for GuestRam {}

/// What fills guest RAM from outside (`GuestMemoryInit::Fill`, `Unpack`): every region as
/// `(gpa, bytes)`; its error is the caller's own.
pub type FillFn = Box<
    dyn FnOnce(
        &mut [(u64, &mut [u8])],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>,
>;

/// A [`FillFn`] from a closure with any error type.
pub fn boxed_fill<E, F>(f: F) -> FillFn
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: FnOnce(&mut [(u64, &mut [u8])]) -> std::result::Result<(), E> + 'static,
{
    Box::new(move |r| f(r).map_err(Into::into))
}

impl GuestMemoryInit {
    /// [`GuestMemoryInit::Fill`] from a closure with any error type.
    pub fn fill<E, F>(f: F) -> GuestMemoryInit
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        F: FnOnce(&mut [(u64, &mut [u8])]) -> std::result::Result<(), E> + 'static,
    {
        GuestMemoryInit::Fill(boxed_fill(f))
    }
}

impl GuestRam {
    /// Maps `layout` (`(gpa, size)` pairs, sorted, page-aligned) and fills it per `init`.
    pub fn new(layout: &[(u64, u64)], init: GuestMemoryInit) -> Result<GuestRam> {
        // Regions are recorded as soon as they are mapped, so Drop unmaps them on any error.
        let mut ram = GuestRam {
            mem: GuestMemoryMmap::default(),
            regions: Vec::with_capacity(layout.len()),
            file_backed: Vec::new(),
            lazy: None,
            dirty: crate::vstate::dirty::DirtyLog::new(layout),
            revertible: false,
            refill: None,
        };
        if layout.is_empty() {
            return Err(Error::Layout("guest has no RAM".into()));
        }
        for &(gpa, size) in layout {
            if size == 0 || size % PAGE != 0 || gpa % PAGE != 0 {
                return Err(Error::Layout(format!(
                    "guest RAM region {gpa:#x}+{size:#x} is not page-aligned"
                )));
            }
            ram.regions.push(RawRegion::reserve(gpa, size)?);
        }
        let mut views = Vec::with_capacity(ram.regions.len());
        for r in &ram.regions {
            // SAFETY: `host..host+size` is the private anonymous mapping made above, with
            // exactly these protection bits and flags.
            let mmap = unsafe {
                MmapRegion::<AtomicBitmap>::build_raw(
                    r.host,
                    r.size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                )
            }
            .map_err(|e| Error::Layout(format!("guest RAM view: {e}")))?;
            views.push(
                GuestRegionMmap::new(mmap, GuestAddress(r.gpa))
                    .with_context(|| format!("guest RAM region {:#x} overflows", r.gpa))?,
            );
        }
        ram.mem = GuestMemoryMmap::from_regions(views)
            .map_err(|e| Error::Layout(format!("guest RAM layout: {e}")))?;
        let host_regions: Vec<(u64, u64, u64)> = ram
            .regions
            .iter()
            .map(|r| (r.gpa, r.host as u64, r.size as u64))
            .collect();
        let (init, table) = match init {
            GuestMemoryInit::Unpack { fill, table } => (GuestMemoryInit::Fill(fill), Some(table)),
            init => (init, None),
        };
        // A layout the refill cannot place (chunks not page-aligned) still restores; such a
        // VM is just not resettable.
        ram.refill = table.and_then(|t| crate::vstate::lazy::Refill::new(&host_regions, t).ok());
        match init {
            GuestMemoryInit::Zeroed | GuestMemoryInit::Unpack { .. } => {}
            GuestMemoryInit::Fill(f) => {
                // SAFETY: the VM does not exist yet, so nobody else touches this memory.
                let mut slices: Vec<(u64, &mut [u8])> = ram
                    .regions
                    .iter()
                    .map(|r| {
                        (r.gpa, unsafe {
                            std::slice::from_raw_parts_mut(r.host, r.size)
                        })
                    })
                    .collect();
                f(&mut slices).map_err(Error::Fill)?;
            }
            GuestMemoryInit::MapPrivate { file, pieces } => {
                ram.map_pieces(&file, &pieces)?;
                ram.file_backed = pieces.iter().map(|&(gpa, _, len)| (gpa, len)).collect();
                ram.revertible = true;
            }
            GuestMemoryInit::MapLayers(layers) => {
                for (file, pieces) in &layers {
                    ram.map_pieces(file, pieces)?;
                    ram.file_backed
                        .extend(pieces.iter().map(|&(gpa, _, len)| (gpa, len)));
                }
                ram.revertible = true;
            }
            GuestMemoryInit::Lazy(src) => {
                ram.lazy = Some(crate::vstate::lazy::LazyMemory::start(&host_regions, src)?);
            }
            GuestMemoryInit::Staged(mut staged) => {
                for r in &ram.regions {
                    staged.move_into(r)?;
                }
            }
        }
        Ok(ram)
    }

    fn map_pieces(&self, file: &std::fs::File, pieces: &[(u64, u64, u64)]) -> Result<()> {
        let file_len = file.metadata().context("guest memory file")?.len();
        for &(gpa, off, len) in pieces {
            if len == 0 {
                continue;
            }
            if gpa % PAGE != 0 || off % PAGE != 0 || len % PAGE != 0 {
                return Err(Error::Layout(format!(
                    "memory piece gpa {gpa:#x} offset {off:#x} len {len:#x} is not 4 KiB aligned"
                )));
            }
            let end = off
                .checked_add(len)
                .filter(|&e| e <= file_len)
                .with_context(|| {
                    format!(
                        "memory piece at file offset {off:#x} len {len:#x} runs past the end of \
                         the file ({file_len:#x} bytes)"
                    )
                })?;
            let _ = end;
            let r = self
                .regions
                .iter()
                .find(|r| gpa >= r.gpa && gpa + len <= r.gpa + r.size as u64)
                .with_context(|| {
                    format!("memory piece gpa {gpa:#x} len {len:#x} is not inside guest RAM")
                })?;
            // SAFETY: the target range lies inside our own reservation (checked above), so
            // MAP_FIXED replaces only pages vmboot owns; the file range exists (checked above),
            // so guest accesses cannot hit SIGBUS.
            let p = unsafe {
                libc::mmap(
                    r.host.add((gpa - r.gpa) as usize).cast(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    off as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error()).with_context(|| {
                    format!("mapping memory piece gpa {gpa:#x} (file offset {off:#x})")
                });
            }
        }
        Ok(())
    }

    /// The lazy loader, when this RAM is filled on first touch.
    pub fn lazy(&self) -> Option<&crate::vstate::lazy::LazyMemory> {
        self.lazy.as_ref()
    }

    /// Takes (and clears) the VMM's own write bitmaps, per region.
    fn take_vmm_dirty(&self) -> Vec<Vec<u64>> {
        self.mem
            .iter()
            .map(|r| std::ops::Deref::deref(r).bitmap().get_and_reset())
            .collect()
    }

    fn kvm_dirty(vm: &kvm_ioctls::VmFd) -> impl FnMut(u32, u64) -> Result<Vec<u64>> + '_ {
        move |slot, size| {
            vm.get_dirty_log(slot, size as usize)
                .with_context(|| format!("KVM_GET_DIRTY_LOG slot {slot}"))
        }
    }

    /// Starts a new mark of the dirty log (see [`crate::vstate::dirty`]); `vm` is the VM
    /// this memory is mapped into.
    pub fn dirty_mark(&self, vm: &kvm_ioctls::VmFd) -> Result<u64> {
        self.dirty
            .mark_with(&mut Self::kvm_dirty(vm), &mut || self.take_vmm_dirty())
    }

    /// Drops a dirty mark (see [`crate::vstate::dirty::DirtyLog::forget`]).
    pub fn dirty_forget(&self, mark: u64) {
        self.dirty.forget(mark);
    }

    /// `(gpa, host address, size)` of every region, for copies made while the guest runs
    /// (a live save), where [`GuestRam::slices`] cannot be used.
    pub fn raw_regions(&self) -> Vec<(u64, *const u8, usize)> {
        self.regions
            .iter()
            .map(|r| (r.gpa, r.host as *const u8, r.size))
            .collect()
    }

    /// The pages written since `mark` (0: since this memory was created or last reset).
    pub fn dirty_since(
        &self,
        vm: &kvm_ioctls::VmFd,
        mark: u64,
    ) -> Result<crate::vstate::dirty::DirtyPages> {
        self.dirty
            .since_with(mark, &mut Self::kvm_dirty(vm), &mut || {
                self.take_vmm_dirty()
            })
    }

    /// Puts every page written since mark 0 back to its content at mark 0 and starts the
    /// dirty log over. Where RAM is mapped from pack files (`MapPrivate`, `MapLayers`), mark
    /// 0's content is what a page falls back to when `MADV_DONTNEED` drops its private copy
    /// (the file's bytes where the pack has them, zero elsewhere), so a reset costs one
    /// `madvise` per run of written pages, not a copy. Lazily filled RAM drops the pages
    /// too and serves them from the pack again on their next touch (verified, as the first
    /// time); RAM unpacked from a compressed pack drops them and copies them from the pack's
    /// chunks again (verified). No vCPU may run and no device may write guest memory
    /// meanwhile. Returns the number of pages put back.
    pub fn reset_to_start(&self, vm: &kvm_ioctls::VmFd) -> Result<u64> {
        if !self.revertible() {
            return Err(Error::NotRevertible);
        }
        let dirty = self.dirty_since(vm, 0)?;
        let mut host = Vec::new();
        for (gpa, len) in dirty.ranges() {
            let r = self
                .regions
                .iter()
                .find(|r| gpa >= r.gpa && gpa + len <= r.gpa + r.size as u64)
                .with_context(|| format!("dirty range {gpa:#x}+{len:#x} is not in guest RAM"))?;
            host.push((r.host as u64 + (gpa - r.gpa), len));
        }
        if let Some(l) = &self.lazy {
            l.revert(&host)
                .context("madvise(MADV_DONTNEED) of lazily filled guest memory")?;
        } else {
            for &(at, len) in &host {
                // SAFETY: the range lies inside a mapping this struct owns (checked above);
                // dropping private pages of a MAP_PRIVATE mapping only makes them read back
                // as the file's (or zero) on the next touch, which is the point.
                let rc = unsafe {
                    libc::madvise(at as *mut libc::c_void, len as usize, libc::MADV_DONTNEED)
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("madvise(MADV_DONTNEED) at {at:#x}"));
                }
            }
            if let Some(r) = &self.refill {
                r.rewrite(&host)?;
            }
        }
        self.dirty
            .reset_with(&mut Self::kvm_dirty(vm), &mut || self.take_vmm_dirty())?;
        Ok(dirty.count())
    }

    /// Whether [`GuestRam::reset_to_start`] can work: RAM mapped from pack files, filled
    /// lazily, or unpacked from a pack it can read again.
    pub fn revertible(&self) -> bool {
        self.revertible || self.lazy.is_some() || self.refill.is_some()
    }

    /// vm-memory view, for the loaders and `Bytes` accesses.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// `(slot, gpa, host address, size)` for KVM memory slots.
    pub fn slots(&self) -> impl Iterator<Item = (u32, u64, u64, u64)> + '_ {
        self.regions
            .iter()
            .enumerate()
            .map(|(i, r)| (i as u32, r.gpa, r.host as u64, r.size as u64))
    }

    /// `(gpa, size)` of every region.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.gpa, r.size as u64))
            .collect()
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size as u64).sum()
    }

    /// End of the region starting at GPA 0.
    pub fn low_end(&self) -> u64 {
        self.regions
            .iter()
            .find(|r| r.gpa == 0)
            .map_or(0, |r| r.size as u64)
    }

    /// Every region as a byte slice.
    ///
    /// # Safety
    /// No vCPU may run (and no device may write guest memory) while the slices live.
    pub unsafe fn slices(&self) -> Vec<(u64, &[u8])> {
        self.regions
            .iter()
            .map(|r| (r.gpa, unsafe { std::slice::from_raw_parts(r.host, r.size) }))
            .collect()
    }

    /// Per region (in [`GuestRam::layout`] order), the byte ranges that may hold non-zero
    /// data, relative to the region start. A page the guest never touched is neither present
    /// nor swapped in the page table (`/proc/self/pagemap`) and, unless it is mapped from a
    /// file, reads as zero: a save skips it without reading it, so saving a large, mostly
    /// empty guest costs what it holds, not its size.
    pub fn data_ranges(&self) -> Vec<Vec<std::ops::Range<u64>>> {
        // A lazily restored guest's untouched pages are not zero: fetch them first.
        if let Some(l) = &self.lazy {
            l.wait_complete();
        }
        self.regions
            .iter()
            .map(|r| {
                let Ok(mut ranges) = resident_ranges(r.host as u64, r.size as u64) else {
                    // Without pagemap, every page may hold data.
                    return std::iter::once(0..r.size as u64).collect();
                };
                for &(gpa, len) in &self.file_backed {
                    let (start, end) = (gpa.max(r.gpa), (gpa + len).min(r.gpa + r.size as u64));
                    if start < end {
                        ranges.push(start - r.gpa..end - r.gpa);
                    }
                }
                merge_ranges(ranges)
            })
            .collect()
    }

    /// Copies `len` bytes at `gpa`; fails if any byte lies outside RAM.
    pub fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(gpa))
            .map_err(|source| Error::GuestMemory {
                what: format!("reading {len} bytes of guest memory at {gpa:#x}"),
                source,
            })?;
        Ok(buf)
    }

    pub fn read_u64(&self, gpa: u64) -> Result<u64> {
        let b = self.read(gpa, 8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// Writes `data` at `gpa`; fails if any byte lies outside RAM.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|source| Error::GuestMemory {
                what: format!("writing {} bytes of guest memory at {gpa:#x}", data.len()),
                source,
            })
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // vm-memory's views are non-owning; replace them so nothing refers to the mappings.
        self.mem = GuestMemoryMmap::default();
        // The fault handler and prefetch write into the mappings: stop them first.
        self.lazy = None;
        for r in &self.regions {
            // SAFETY: each region is a mapping this struct made and nothing else refers to it.
            unsafe { libc::munmap(r.host.cast(), r.size) };
        }
    }
}

/// Guest RAM filled before its VM exists, in the layout the VM will have: private
/// anonymous mappings like [`GuestRam`]'s, whose pages [`GuestMemoryInit::Staged`] moves
/// into the guest's regions (`mremap`), so staging costs no second copy of memory.
pub struct StagedRam {
    regions: Vec<RawRegion>,
}

impl StagedRam {
    /// Reserves `layout` (`(gpa, size)`, page-aligned, as [`GuestRam::new`] takes); untouched
    /// pages take no memory.
    pub fn new(layout: &[(u64, u64)]) -> Result<StagedRam> {
        let mut staged = StagedRam {
            regions: Vec::with_capacity(layout.len()),
        };
        for &(gpa, size) in layout {
            staged.regions.push(RawRegion::reserve(gpa, size)?);
        }
        Ok(staged)
    }

    /// The region that starts at `gpa`.
    pub fn region_mut(&mut self, gpa: u64) -> Option<&mut [u8]> {
        let r = self
            .regions
            .iter()
            .find(|r| r.gpa == gpa && !r.host.is_null())?;
        // SAFETY: the mapping is this struct's own and `&mut self` makes the borrow unique.
        Some(unsafe { std::slice::from_raw_parts_mut(r.host, r.size) })
    }

    /// `len` bytes at `gpa`, if one region holds them all.
    pub fn read(&self, gpa: u64, len: u64) -> Option<&[u8]> {
        self.regions.iter().find_map(|r| {
            let off = usize::try_from(gpa.checked_sub(r.gpa)?).ok()?;
            let end = off.checked_add(usize::try_from(len).ok()?)?;
            if r.host.is_null() || end > r.size {
                return None;
            }
            // SAFETY: `off..end` lies inside the mapping, which lives as long as `self`.
            Some(unsafe { std::slice::from_raw_parts(r.host.add(off), end - off) })
        })
    }

    /// Puts the staged region at `to`'s gpa into `to`: its pages are moved over `to`'s
    /// mapping (same size and flags), or copied where the kernel refuses the move.
    fn move_into(&mut self, to: &RawRegion) -> Result<()> {
        let Some(from) = self
            .regions
            .iter_mut()
            .find(|r| r.gpa == to.gpa && !r.host.is_null())
        else {
            return Ok(());
        };
        if from.size == to.size {
            // SAFETY: both are whole private anonymous mappings of `size` bytes made by
            // this module; `to` is replaced by `from`'s pages, and `from` no longer exists
            // afterwards (its pointer is cleared so Drop leaves it).
            let moved = unsafe {
                libc::mremap(
                    from.host.cast(),
                    from.size,
                    to.size,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    to.host.cast::<libc::c_void>(),
                )
            };
            if moved != libc::MAP_FAILED {
                from.host = std::ptr::null_mut();
                return Ok(());
            }
        }
        let n = from.size.min(to.size);
        // SAFETY: both mappings hold at least `n` bytes and are distinct.
        unsafe { std::ptr::copy_nonoverlapping(from.host, to.host, n) };
        Ok(())
    }
}

impl Drop for StagedRam {
    fn drop(&mut self) {
        for r in self.regions.iter().filter(|r| !r.host.is_null()) {
            // SAFETY: a mapping this struct made that was not moved away.
            unsafe { libc::munmap(r.host.cast(), r.size) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn layout_splits_at_the_hole() {
        assert_eq!(ram_layout(16 << 20), vec![(0, 16 << 20)]);
        assert_eq!(ram_layout(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(
            ram_layout(32 << 30),
            vec![(0, 3 << 30), (4 << 30, 29 << 30)]
        );
    }

    #[test]
    fn fill_and_map_private() {
        let ram = GuestRam::new(
            &[(0, 1 << 20)],
            GuestMemoryInit::Fill(Box::new(|r| {
                r[0].1[0x1000] = 7;
                Ok(())
            })),
        )
        .unwrap();
        assert_eq!(ram.read(0x1000, 2).unwrap(), vec![7, 0]);
        assert!(ram.read((1 << 20) - 1, 2).is_err());

        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![0xaa; 8192]).unwrap();
        let ram = GuestRam::new(
            &[(0, 1 << 20)],
            GuestMemoryInit::MapPrivate {
                file: f.try_clone().unwrap(),
                pieces: vec![(0x3000, 4096, 4096)],
            },
        )
        .unwrap();
        assert_eq!(ram.read(0x2fff, 3).unwrap(), vec![0, 0xaa, 0xaa]);
        ram.write(0x3000, &[1]).unwrap();
        // Copy-on-write: the file keeps its bytes.
        let mut back = vec![0u8; 1];
        std::os::unix::fs::FileExt::read_at(&f, &mut back, 4096).unwrap();
        assert_eq!(back, vec![0xaa]);
        // Past the end of the file: refused instead of a later SIGBUS.
        let err = GuestRam::new(
            &[(0, 1 << 20)],
            GuestMemoryInit::MapPrivate {
                file: f,
                pieces: vec![(0, 4096, 8192)],
            },
        )
        .err()
        .unwrap();
        assert!(format!("{err:#}").contains("past the end"), "{err:#}");
    }

    #[test]
    fn staged_memory_is_moved_into_the_guest() {
        let layout = [(0, 1 << 20), (1 << 32, 64 << 10)];
        let mut staged = StagedRam::new(&layout).unwrap();
        staged.region_mut(0).unwrap()[0x1000] = 7;
        staged.region_mut(1 << 32).unwrap()[(64 << 10) - 1] = 9;
        assert!(
            staged.region_mut(0x1000).is_none(),
            "regions are found by their start"
        );
        assert_eq!(staged.read(0x1000, 2), Some(&[7u8, 0][..]));
        assert_eq!(staged.read((1 << 20) - 1, 2), None);
        let ram = GuestRam::new(&layout, GuestMemoryInit::Staged(staged)).unwrap();
        assert_eq!(ram.read(0x1000, 2).unwrap(), vec![7, 0]);
        assert_eq!(ram.read((1 << 32) + (64 << 10) - 1, 1).unwrap(), vec![9]);
        ram.write(0x2000, &[3]).unwrap();
        assert_eq!(ram.read(0x2000, 1).unwrap(), vec![3]);
    }
}

/// Ranges (relative to `addr`) of pages of this process that are present or swapped.
fn resident_ranges(addr: u64, len: u64) -> std::io::Result<Vec<std::ops::Range<u64>>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const BATCH: u64 = 64 * 1024;
    let f = std::fs::File::open("/proc/self/pagemap")?;
    let pages = len / PAGE;
    let first = addr / PAGE;
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    let mut buf = vec![0u8; (BATCH * 8) as usize];
    let mut page = 0;
    while page < pages {
        let n = BATCH.min(pages - page);
        let bytes = &mut buf[..(n * 8) as usize];
        f.read_exact_at(bytes, (first + page) * 8)?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().expect("8-byte chunk"));
            if e & (PRESENT | SWAPPED) == 0 {
                continue;
            }
            let off = (page + i as u64) * PAGE;
            match out.last_mut() {
                Some(last) if last.end == off => last.end = off + PAGE,
                _ => out.push(off..off + PAGE),
            }
        }
        page += n;
    }
    Ok(out)
}

fn merge_ranges(mut v: Vec<std::ops::Range<u64>>) -> Vec<std::ops::Range<u64>> {
    v.sort_by_key(|r| r.start);
    let mut out: Vec<std::ops::Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod data_range_tests {
    use super::*;

    #[test]
    fn untouched_pages_are_not_data() {
        let ram = GuestRam::new(&[(0, 64 << 20)], GuestMemoryInit::Zeroed).unwrap();
        assert!(ram.data_ranges()[0].is_empty(), "{:?}", ram.data_ranges());
        ram.write(0x10_0000, b"x").unwrap();
        ram.write(0x20_3000, &[1u8; 8192]).unwrap();
        assert_eq!(
            ram.data_ranges()[0],
            vec![0x10_0000..0x10_1000, 0x20_3000..0x20_5000]
        );
    }

    #[test]
    fn file_backed_pieces_are_data_even_untouched() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &[7u8; 0x4000]).unwrap();
        let ram = GuestRam::new(
            &[(0, 16 << 20)],
            GuestMemoryInit::MapPrivate {
                file: f,
                pieces: vec![(0x8000, 0, 0x4000)],
            },
        )
        .unwrap();
        assert_eq!(ram.data_ranges()[0], vec![0x8000..0xc000]);
    }
}
