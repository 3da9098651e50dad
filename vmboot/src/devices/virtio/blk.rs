//! virtio-blk on a [`DiskImage`] backend, served by the VM's virtio worker.
//!
//! The guest's queue notifications reach the worker through an ioeventfd (KVM signals it
//! without leaving the kernel), and completions reach the guest through an irqfd, so the
//! vCPU thread never waits for the disk (see [`super::device`]). Every guest address goes through vm-memory's
//! checked accessors: a request naming memory outside guest RAM, a malformed descriptor
//! chain or a range past the end of the disk completes with an error status and a counted
//! warning, never a crash.

use super::device::VirtioMmio;
use super::mmio::{MmioTransport, MmioTransportState, VirtioDevice};
use super::worker::Worker;
use crate::devices::bus::lock;
use crate::devices::{Error, Result};
use crate::memory::GuestMemoryMmap;
use crate::persist::{DeviceState, Persist, VmDevice};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmpack_formats::disk::DiskImage;

pub const SECTOR_SIZE: u64 = 512;
/// Ring size offered to drivers.
pub const QUEUE_SIZE: u16 = 256;
/// Largest data segment count per request (advertised as `seg_max`, enforced).
pub const SEG_MAX: u32 = 128;
/// Largest data segment a driver should send (advertised as `size_max`).
pub const SIZE_MAX: u32 = 64 << 10;
/// Largest data of one request: what `seg_max` × `size_max` lets a driver send. A larger
/// request fails with `VIRTIO_BLK_S_IOERR` before any I/O, so one request (and with it a
/// pause, which waits for the request in progress) touches at most 8 MiB of guest RAM.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
pub use super::device::BATCH;
/// Largest piece of a request the device buffers at once.
const IO_CHUNK: usize = 1 << 20;
/// Discard / write-zeroes limits advertised in the config space (and enforced): the same
/// 8 MiB as a read or write, since a backend may have to write the zeros.
const MAX_DISCARD_SECTORS: u32 = (MAX_REQUEST_BYTES / SECTOR_SIZE) as u32;
const MAX_DISCARD_SEG: u32 = 1;
/// Only the first few warnings are printed; all are counted.
const PRINTED_WARNINGS: u64 = 10;

/// A virtio-blk device as saved in a pack.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBlkState {
    pub transport: MmioTransportState,
    /// Capacity in bytes when saved; a restore with a different disk size is refused.
    pub disk_size: u64,
    pub read_only: bool,
}

/// Counters shown in the API status.
#[derive(Debug, Default)]
pub struct BlkCounters {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub warnings: AtomicU64,
    /// Set by every request that may change the disk (write, discard, write-zeroes).
    pub written: std::sync::atomic::AtomicBool,
}

pub struct Blk {
    index: usize,
    disk: Box<dyn DiskImage>,
    read_only: bool,
    config: Vec<u8>,
    features: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    counters: Arc<BlkCounters>,
}

/// The features offered for a read-only or writable disk.
pub fn offered_features(read_only: bool) -> u64 {
    let common = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_BLK_F_SIZE_MAX)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_FLUSH);
    if read_only {
        common | (1 << VIRTIO_BLK_F_RO)
    } else {
        common | (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
    }
}

impl VirtioBlkState {
    /// What can be checked before the disk is open: the transport against the features a
    /// disk of either kind is offered (the restore checks the exact set once the image is
    /// open and its size).
    pub fn validate(&self) -> Result<()> {
        self.transport.validate(
            offered_features(true) | offered_features(false),
            &[QUEUE_SIZE],
        )
    }
}

impl Blk {
    pub fn new(index: usize, disk: Box<dyn DiskImage>, read_only: bool) -> Blk {
        let read_only = read_only || disk.is_read_only();
        let size = disk.virtual_size();
        let features = offered_features(read_only);
        // struct virtio_blk_config, little endian, up to write_zeroes_may_unmap.
        let mut config = vec![0u8; 60];
        config[0..8].copy_from_slice(&(size / SECTOR_SIZE).to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes());
        config[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        config[56] = 1;
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let text = format!("vmboot-disk{index}");
        id[..text.len()].copy_from_slice(text.as_bytes());
        Blk {
            index,
            disk,
            read_only,
            config,
            features,
            id,
            counters: Arc::new(BlkCounters::default()),
        }
    }

    pub fn disk(&self) -> &dyn DiskImage {
        self.disk.as_ref()
    }

    pub fn counters(&self) -> &Arc<BlkCounters> {
        &self.counters
    }

    fn warn(&self, msg: &str) {
        let n = self.counters.warnings.fetch_add(1, Ordering::Relaxed);
        if n < PRINTED_WARNINGS {
            log::warn!("virtio-blk {}: {msg}", self.index);
        } else if n == PRINTED_WARNINGS {
            log::warn!(
                "virtio-blk {}: more warnings; counting them silently",
                self.index
            );
        }
    }

    /// Serves up to `budget` requests available in `q`, checking `hold` before each: a
    /// pause stops the work at the next request boundary. Returns how many completed and
    /// whether more may be waiting.
    pub fn process_queue(
        &self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        hold: &AtomicBool,
        budget: usize,
    ) -> (usize, bool) {
        let (table, size) = (q.desc_table(), q.size());
        for served in 0..budget {
            if hold.load(Ordering::Acquire) {
                return (served, false);
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                return (served, false);
            };
            let head = chain.head_index();
            let checked = check_chain(mem, table, size, head);
            // For a malformed chain this is only where its status byte would be.
            let descs: Vec<Descriptor> = chain.collect();
            let used_len = match checked {
                Ok(()) => self.handle(&descs, mem),
                Err(m) => self.refuse(&descs, mem, &m),
            };
            if let Err(e) = q.add_used(mem, head, used_len) {
                self.warn(&format!("cannot add to the used ring: {e}"));
            }
        }
        (budget, true)
    }

    /// Completes a malformed chain without serving it: `VIRTIO_BLK_S_IOERR` in its last
    /// descriptor if the device may write it, as for any failed request.
    fn refuse(&self, descs: &[Descriptor], mem: &GuestMemoryMmap, why: &str) -> u32 {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        self.warn(&format!("malformed descriptor chain: {why}"));
        match descs.last().filter(|d| d.is_write_only() && d.len() >= 1) {
            Some(d) if mem.write_obj(VIRTIO_BLK_S_IOERR as u8, d.addr()).is_ok() => 1,
            _ => 0,
        }
    }

    /// Runs one request; returns the number of bytes written into guest buffers.
    fn handle(&self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> u32 {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let Some(status) = descs.last().filter(|d| d.is_write_only() && d.len() >= 1) else {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            self.warn("request without a writable status descriptor; dropped");
            return 0;
        };
        let (code, written) = match self.execute(descs, mem) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(ReqError::Unsupported(m)) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.warn(&m);
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
            Err(ReqError::Io(m)) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.warn(&m);
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Err(ReqError::ReadOnly) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        if let Err(e) = mem.write_obj(code as u8, status.addr()) {
            self.warn(&format!(
                "status byte at {:#x} is outside guest RAM: {e}",
                status.addr().0
            ));
            return written;
        }
        written.saturating_add(1)
    }

    fn execute(&self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> Result<u32, ReqError> {
        let header = descs
            .first()
            .filter(|d| descs.len() >= 2 && !d.is_write_only() && d.len() >= 16)
            .ok_or_else(|| ReqError::Io("malformed request header".into()))?;
        let mut h = [0u8; 16];
        mem.read_slice(&mut h, header.addr())
            .map_err(|e| ReqError::Io(format!("request header at {:#x}: {e}", header.addr().0)))?;
        let kind = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let data = &descs[1..descs.len() - 1];
        if data.len() > SEG_MAX as usize {
            return Err(ReqError::Io(format!(
                "{} data segments (at most {SEG_MAX})",
                data.len()
            )));
        }
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        if total > MAX_REQUEST_BYTES {
            return Err(ReqError::Io(format!(
                "request of {total} bytes (at most {MAX_REQUEST_BYTES})"
            )));
        }
        match kind {
            VIRTIO_BLK_T_IN => self.read(sector, data, mem),
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(ReqError::ReadOnly);
                }
                self.counters.written.store(true, Ordering::Relaxed);
                self.write(sector, data, mem).map(|_| 0)
            }
            VIRTIO_BLK_T_FLUSH => self
                .disk
                .flush()
                .map(|_| 0)
                .map_err(|e| ReqError::Io(format!("flush: {e}"))),
            VIRTIO_BLK_T_GET_ID => {
                let d = data
                    .first()
                    .filter(|d| d.is_write_only())
                    .ok_or_else(|| ReqError::Io("GET_ID without a writable buffer".into()))?;
                let n = (d.len() as usize).min(self.id.len());
                mem.write_slice(&self.id[..n], d.addr())
                    .map_err(|e| ReqError::Io(format!("GET_ID buffer: {e}")))?;
                Ok(n as u32)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.read_only {
                    return Err(ReqError::ReadOnly);
                }
                self.counters.written.store(true, Ordering::Relaxed);
                self.discard_or_zero(kind == VIRTIO_BLK_T_DISCARD, data, mem)
                    .map(|_| 0)
            }
            other => Err(ReqError::Unsupported(format!(
                "request type {other} is not supported"
            ))),
        }
    }

    /// Checks `sector` + `len` bytes against the disk; returns the byte offset.
    fn range(&self, sector: u64, len: u64) -> Result<u64, ReqError> {
        let off = sector
            .checked_mul(SECTOR_SIZE)
            .filter(|off| {
                off.checked_add(len)
                    .is_some_and(|end| end <= self.disk.virtual_size())
            })
            .ok_or_else(|| {
                ReqError::Io(format!(
                    "sector {sector} + {len} bytes is past the end of the disk ({} bytes)",
                    self.disk.virtual_size()
                ))
            })?;
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(ReqError::Io(format!(
                "data length {len} is not a multiple of {SECTOR_SIZE}"
            )));
        }
        Ok(off)
    }

    fn read(
        &self,
        sector: u64,
        data: &[Descriptor],
        mem: &GuestMemoryMmap,
    ) -> Result<u32, ReqError> {
        if data.iter().any(|d| !d.is_write_only()) {
            return Err(ReqError::Io(
                "read request with a read-only data buffer".into(),
            ));
        }
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let mut off = self.range(sector, total)?;
        let mut buf = vec![0u8; IO_CHUNK.min(total as usize)];
        for d in data {
            let mut done = 0u64;
            while done < u64::from(d.len()) {
                let n = (u64::from(d.len()) - done).min(buf.len() as u64) as usize;
                self.disk
                    .read_at(&mut buf[..n], off)
                    .map_err(|e| ReqError::Io(format!("reading the disk at {off}: {e}")))?;
                let gpa = guest_offset(d.addr(), done)?;
                mem.write_slice(&buf[..n], gpa)
                    .map_err(|e| ReqError::Io(format!("read buffer at {:#x}: {e}", gpa.0)))?;
                done += n as u64;
                off += n as u64;
            }
        }
        u32::try_from(total).map_err(|_| ReqError::Io("request larger than 4 GiB".into()))
    }

    fn write(
        &self,
        sector: u64,
        data: &[Descriptor],
        mem: &GuestMemoryMmap,
    ) -> Result<(), ReqError> {
        if data.iter().any(|d| d.is_write_only()) {
            return Err(ReqError::Io(
                "write request with a write-only data buffer".into(),
            ));
        }
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let mut off = self.range(sector, total)?;
        let mut buf = vec![0u8; IO_CHUNK.min(total as usize)];
        for d in data {
            let mut done = 0u64;
            while done < u64::from(d.len()) {
                let n = (u64::from(d.len()) - done).min(buf.len() as u64) as usize;
                let gpa = guest_offset(d.addr(), done)?;
                mem.read_slice(&mut buf[..n], gpa)
                    .map_err(|e| ReqError::Io(format!("write buffer at {:#x}: {e}", gpa.0)))?;
                self.disk
                    .write_at(&buf[..n], off)
                    .map_err(|e| ReqError::Io(format!("writing the disk at {off}: {e}")))?;
                done += n as u64;
                off += n as u64;
            }
        }
        Ok(())
    }

    fn discard_or_zero(
        &self,
        discard: bool,
        data: &[Descriptor],
        mem: &GuestMemoryMmap,
    ) -> Result<(), ReqError> {
        let what = if discard { "discard" } else { "write-zeroes" };
        let [d] = data else {
            return Err(ReqError::Io(format!(
                "{what} needs exactly one segment buffer"
            )));
        };
        if d.is_write_only() || d.len() == 0 || !d.len().is_multiple_of(16) {
            return Err(ReqError::Io(format!("{what}: malformed segment buffer")));
        }
        for i in 0..u64::from(d.len() / 16) {
            let mut seg = [0u8; 16];
            let gpa = guest_offset(d.addr(), i * 16)?;
            mem.read_slice(&mut seg, gpa)
                .map_err(|e| ReqError::Io(format!("{what} segment at {:#x}: {e}", gpa.0)))?;
            let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
            let count = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
            if count > MAX_DISCARD_SECTORS {
                return Err(ReqError::Io(format!(
                    "{what} of {count} sectors (at most {MAX_DISCARD_SECTORS})"
                )));
            }
            let len = u64::from(count) * SECTOR_SIZE;
            let off = self.range(sector, len)?;
            let r = if discard {
                self.disk.discard(off, len)
            } else {
                self.disk.write_zeroes(off, len)
            };
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                    return Err(ReqError::Unsupported(format!("{what}: {e}")))
                }
                Err(e) => return Err(ReqError::Io(format!("{what} at {off}: {e}"))),
            }
        }
        Ok(())
    }
}

/// Walks the chain from `head` in the descriptor table itself, where virtio-queue's
/// iterator would hide what makes it invalid here: a `next` past the queue, a loop (the
/// iterator just stops after `size` descriptors, so a looping chain reads as a long valid
/// one) and an indirect descriptor (the iterator follows it, though
/// `VIRTIO_RING_F_INDIRECT_DESC` is never offered).
pub(crate) fn check_chain(
    mem: &GuestMemoryMmap,
    table: u64,
    size: u16,
    head: u16,
) -> Result<(), String> {
    let mut seen = vec![false; usize::from(size)];
    let mut i = head;
    loop {
        let slot = seen
            .get_mut(usize::from(i))
            .ok_or_else(|| format!("descriptor {i} is past the queue size {size}"))?;
        if *slot {
            return Err(format!(
                "the chain from {head} loops back to descriptor {i}"
            ));
        }
        *slot = true;
        let at = GuestAddress(table + 16 * u64::from(i));
        let d: Descriptor = mem
            .read_obj(at)
            .map_err(|e| format!("descriptor {i} at {:#x}: {e}", at.0))?;
        if d.refers_to_indirect_table() {
            return Err(format!(
                "descriptor {i} is indirect, but VIRTIO_RING_F_INDIRECT_DESC was never offered"
            ));
        }
        if !d.has_next() {
            return Ok(());
        }
        i = d.next();
    }
}

fn guest_offset(base: GuestAddress, off: u64) -> Result<GuestAddress, ReqError> {
    base.0
        .checked_add(off)
        .map(GuestAddress)
        .ok_or_else(|| ReqError::Io("buffer address overflows".into()))
}

enum ReqError {
    Io(String),
    Unsupported(String),
    /// A write to a read-only disk: an error status, but not worth a warning.
    ReadOnly,
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn process_queue(
        &mut self,
        _idx: usize,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        hold: &AtomicBool,
        budget: usize,
    ) -> (usize, bool) {
        Blk::process_queue(self, q, mem, hold, budget)
    }
}

pub type BlkTransport = MmioTransport<Blk>;

/// An attached virtio-blk device.
pub type BlkHandle = VirtioMmio<Blk>;

/// What a virtio-blk device is built from besides its state.
pub struct BlkArgs<'a> {
    pub vm: &'a kvm_ioctls::VmFd,
    pub mem: &'a GuestMemoryMmap,
    pub worker: &'a Worker,
    pub blk: Blk,
    pub base: u64,
    pub gsi: u32,
}

impl BlkArgs<'_> {
    /// A device for a fresh boot.
    pub fn start(self) -> Result<Arc<BlkHandle>> {
        let name = format!("virtio-blk {}", self.blk.index);
        VirtioMmio::start(
            self.vm,
            self.mem,
            self.worker,
            self.blk,
            (self.base, self.gsi),
            None,
            &name,
        )
    }
}

impl<'a> Persist<'a> for Arc<BlkHandle> {
    type State = VirtioBlkState;
    type ConstructorArgs = BlkArgs<'a>;
    const VERSION: u32 = 1;
    type Error = Error;

    fn save(&self) -> Result<VirtioBlkState> {
        let t = lock(&self.dev);
        Ok(VirtioBlkState {
            transport: t.state(),
            disk_size: t.device.disk.virtual_size(),
            read_only: t.device.read_only,
        })
    }

    fn restore(a: BlkArgs<'a>, state: &VirtioBlkState) -> Result<Arc<BlkHandle>> {
        let index = a.blk.index;
        if state.disk_size != a.blk.disk.virtual_size() {
            return Err(Error::InvalidState(format!(
                "disk {index}: the saved VM saw {} bytes, the disk has {}",
                state.disk_size,
                a.blk.disk.virtual_size()
            )));
        }
        VirtioMmio::start(
            a.vm,
            a.mem,
            a.worker,
            a.blk,
            (a.base, a.gsi),
            Some(&state.transport),
            &format!("virtio-blk {index}"),
        )
    }
}

impl VmDevice for BlkHandle {
    fn save(&self, id: &str) -> Result<DeviceState> {
        let t = lock(&self.dev);
        let s = VirtioBlkState {
            transport: t.state(),
            disk_size: t.device.disk.virtual_size(),
            read_only: t.device.read_only,
        };
        Ok(DeviceState {
            id: id.to_string(),
            version: <Arc<BlkHandle> as Persist>::VERSION,
            state: serde_json::to_value(s)?,
        })
    }

    fn reset_to(&self, state: &DeviceState) -> Result<()> {
        let s = state.decode::<Arc<BlkHandle>>()?;
        VirtioMmio::reset_to(self, &s.transport, |d| {
            if s.disk_size != d.disk.virtual_size() {
                return Err(Error::InvalidState(format!(
                    "disk {}: the saved VM saw {} bytes, the disk has {}",
                    d.index,
                    s.disk_size,
                    d.disk.virtual_size()
                )));
            }
            Ok(())
        })
    }

    fn resettable(&self) -> bool {
        true
    }

    fn take_backend_written(&self) -> bool {
        let t = lock(&self.dev);
        t.device.counters.written.swap(false, Ordering::Relaxed)
    }

    fn status(&self) -> Option<crate::api::DeviceStatus> {
        let t = lock(&self.dev);
        let c = t.device.counters.clone();
        let q = &t.queues[0];
        let queued = if t.is_active() {
            q.avail_idx(&self.mem, Ordering::Acquire)
                .map_or(0, |a| (a - std::num::Wrapping(q.next_avail())).0)
        } else {
            0
        };
        Some(crate::api::DeviceStatus::Disk(crate::api::DiskStatus {
            mmio_base: self.base,
            gsi: self.gsi,
            requests: c.requests.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            warnings: c.warnings.load(Ordering::Relaxed),
            queued,
        }))
    }

    fn flush(&self) -> std::io::Result<()> {
        lock(&self.dev).device.disk.flush()
    }
}

/// virtio-blk against virtio-queue's mock rings: no KVM, no transport, just the device
/// serving what a driver put in guest memory.
#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x10_1000;
    const STATUS: u64 = 0x10_3000;

    fn disk(read_only: bool) -> (tempfile::TempDir, Blk) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let bytes: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 + i / 512) as u8).collect();
        std::fs::write(&p, bytes).unwrap();
        let img =
            vmpack_formats::disk::open_disk(&p, vmpack_formats::config::DiskFormat::Raw, read_only)
                .unwrap();
        (dir, Blk::new(0, img, read_only))
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    /// One request at descriptor `at`: header (`kind`, `sector`), a data buffer of `len`
    /// bytes, status byte.
    fn request(
        mem: &GuestMemoryMmap,
        at: u16,
        kind: u32,
        sector: u64,
        len: u32,
    ) -> Vec<RawDescriptor> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let data_flags = if kind == VIRTIO_BLK_T_IN {
            VRING_DESC_F_WRITE
        } else {
            0
        };
        vec![
            desc(HDR, 16, VRING_DESC_F_NEXT, at + 1),
            desc(DATA, len, data_flags | VRING_DESC_F_NEXT, at + 2),
            desc(STATUS, 1, VRING_DESC_F_WRITE, 0),
        ]
    }

    fn serve(blk: &mut Blk, q: &mut Queue, mem: &GuestMemoryMmap, hold: bool) -> (usize, bool) {
        VirtioDevice::process_queue(blk, 0, q, mem, &AtomicBool::new(hold), BATCH)
    }

    fn status(mem: &GuestMemoryMmap) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn reads_writes_and_errors_through_mock_rings() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let (_dir, mut blk) = disk(false);
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();

        // A read of sectors 1..3 lands in the buffer; the used length counts data + status.
        vq.add_desc_chains(&request(&mem, 0, VIRTIO_BLK_T_IN, 1, 1024), 0)
            .unwrap();
        // A pause in force: nothing is taken off the ring.
        assert_eq!(serve(&mut blk, &mut q, &mem, true), (0, false));
        assert_eq!(vq.used().idx().load(), 0);
        assert_eq!(serve(&mut blk, &mut q, &mem, false), (1, false));
        assert_eq!(vq.used().idx().load(), 1);
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!((used.id(), used.len()), (0, 1025));
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        let mut want = vec![0u8; 1024];
        blk.disk().read_at(&mut want, 512).unwrap();
        assert_eq!(got, want);

        // A write goes to the disk.
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        vq.add_desc_chains(&request(&mem, 3, VIRTIO_BLK_T_OUT, 4, 512), 3)
            .unwrap();
        assert_eq!(serve(&mut blk, &mut q, &mem, false), (1, false));
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        let mut back = [0u8; 512];
        blk.disk().read_at(&mut back, 4 * 512).unwrap();
        assert_eq!(back, [0xab; 512]);

        // Past the end of the disk: an error status, counted, nothing read.
        vq.add_desc_chains(&request(&mem, 6, VIRTIO_BLK_T_IN, 128, 512), 6)
            .unwrap();
        assert_eq!(serve(&mut blk, &mut q, &mem, false), (1, false));
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(vq.used().idx().load(), 3);
        let c = blk.counters();
        assert_eq!(c.requests.load(Ordering::Relaxed), 3);
        assert_eq!(c.errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_read_only_disk_refuses_writes() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let (_dir, mut blk) = disk(true);
        assert_ne!(VirtioDevice::features(&blk) & (1 << VIRTIO_BLK_F_RO), 0);
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        vq.add_desc_chains(&request(&mem, 0, VIRTIO_BLK_T_OUT, 0, 512), 0)
            .unwrap();
        assert_eq!(serve(&mut blk, &mut q, &mem, false), (1, false));
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
    }
}
