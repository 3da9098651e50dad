//! The virtio-mmio transport (virtio 1.x, register layout version 2).
//!
//! The transport owns the registers, the virtqueues and the interrupt status; the device
//! behind it (see [`VirtioDevice`]) supplies its type, features and config space, serves
//! its queues, and hears of activation (DRIVER_OK) and reset (status 0). One mutex guards
//! the whole transport: the vCPU thread takes it for a register access and the worker for a
//! batch of requests, so a pause that takes it knows no request is half done.

use crate::devices::bus::{BusDevice, IoAction};
use crate::devices::{Error, Result};
use crate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use std::sync::atomic::AtomicBool;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// "virt" in little endian.
const MMIO_MAGIC: u32 = 0x7472_6976;
/// Register layout of virtio 1.x (version 1 is the legacy layout).
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to drivers ("VMBT"); drivers ignore it.
const VENDOR_ID: u32 = 0x5442_4d56;

/// What a device behind the transport provides.
pub trait VirtioDevice: Send {
    /// `VIRTIO_ID_*`.
    fn device_type(&self) -> u32;
    /// Every feature bit the device offers (including `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// The device-specific config space (read-only for the guest here).
    fn config(&self) -> &[u8];
    /// Largest size of each queue.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Serves up to `budget` requests available in queue `idx`, checking `hold` before each
    /// (a pause stops the work at the next request boundary). Returns how many completed
    /// and whether more may be waiting.
    fn process_queue(
        &mut self,
        idx: usize,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        hold: &AtomicBool,
        budget: usize,
    ) -> (usize, bool);
    /// The driver set DRIVER_OK with `acked_features`: requests may come.
    fn activate(&mut self, _acked_features: u64) {}
    /// The driver reset the device (status 0): forget anything tied to the old queues.
    fn reset(&mut self) {}
}

/// A virtqueue's registers and ring positions, serializable (mirrors `virtio_queue::QueueState`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqState {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for VirtqState {
    fn from(s: QueueState) -> Self {
        VirtqState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<&VirtqState> for QueueState {
    fn from(s: &VirtqState) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// The transport's registers as saved in a pack.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<VirtqState>,
}

impl MmioTransportState {
    /// Checks a saved transport against a device offering `offered` features and queues of
    /// `max_sizes`: what virtio-queue itself would trust.
    pub fn validate(&self, offered: u64, max_sizes: &[u16]) -> Result<()> {
        if self.queues.len() != max_sizes.len() {
            return Err(Error::InvalidState(format!(
                "saved virtio device has {} queues, the device has {}",
                self.queues.len(),
                max_sizes.len()
            )));
        }
        if self.acked_features & !offered != 0 {
            return Err(Error::InvalidState(format!(
                "saved driver features {:#x} include features the device never offered ({:#x})",
                self.acked_features,
                self.acked_features & !offered
            )));
        }
        let event_idx =
            self.acked_features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
        // virtio-queue trusts the saved maximum; the device's own is the limit.
        for (i, (q, &max)) in self.queues.iter().zip(max_sizes).enumerate() {
            if q.max_size != max {
                return Err(Error::InvalidState(format!(
                    "saved virtqueue {i}: maximum size {} where the device's is {max}",
                    q.max_size
                )));
            }
            if q.size > max || (q.size != 0 && !q.size.is_power_of_two()) {
                return Err(Error::InvalidState(format!(
                    "saved virtqueue {i}: size {} (the device allows powers of two up to {max})",
                    q.size
                )));
            }
            if q.event_idx_enabled && !event_idx {
                return Err(Error::InvalidState(format!(
                    "saved virtqueue {i}: event index enabled but VIRTIO_RING_F_EVENT_IDX was not negotiated"
                )));
            }
        }
        Ok(())
    }
}

pub struct MmioTransport<D: VirtioDevice> {
    pub device: D,
    pub queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// Raised (through an irqfd) when the interrupt status gains a bit.
    irq: EventFd,
    /// One notify eventfd per queue (also registered as ioeventfds); written here to make
    /// the worker look at a queue again (after DRIVER_OK, a resume or a restore).
    kick: Vec<EventFd>,
    /// Set while the VM is paused: the I/O thread leaves the queues alone.
    pub paused: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D, irq: EventFd, kick: Vec<EventFd>) -> Result<Self> {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(|max| {
                Queue::new(max).map_err(|e| Error::InvalidState(format!("virtqueue of {max}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MmioTransport {
            device,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            irq,
            kick,
            paused: false,
        })
    }

    /// Rebuilds the transport from a saved state; queue states are validated by virtio-queue.
    pub fn restore(
        device: D,
        irq: EventFd,
        kick: Vec<EventFd>,
        s: &MmioTransportState,
    ) -> Result<Self> {
        let mut t = Self::new(device, irq, kick)?;
        t.set_state(s)?;
        Ok(t)
    }

    /// Loads a saved state into this transport (a restore, or a reset in place).
    pub fn set_state(&mut self, s: &MmioTransportState) -> Result<()> {
        s.validate(self.device.features(), &self.device.queue_max_sizes())?;
        let queues = s
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                Queue::try_from(QueueState::from(q))
                    .map_err(|e| Error::InvalidState(format!("saved virtqueue {i}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        self.queues = queues;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        Ok(())
    }

    pub fn state(&self) -> MmioTransportState {
        MmioTransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
        }
    }

    /// DRIVER_OK set (and not FAILED) with every queue ready: requests may be served.
    pub fn is_active(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_FAILED == 0
            && self.queues.iter().all(|q| q.ready())
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Tells the guest that used buffers were added.
    pub fn signal_used(&mut self) {
        self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
        // A full eventfd counter only means an interrupt is pending already.
        let _ = self.irq.write(1);
    }

    /// Tells the guest the device's config space changed (a new config generation).
    pub fn signal_config(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
        let _ = self.irq.write(1);
    }

    /// Makes the worker look at every queue.
    pub fn kick(&self) {
        for k in &self.kick {
            let _ = k.write(1);
        }
    }

    /// Raises the interrupt again if its status still shows an unacknowledged cause.
    pub fn reraise(&self) {
        if self.interrupt_status != 0 {
            let _ = self.irq.write(1);
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u32) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: length all ones means "none" (spec 4.2.2).
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u32, v: u32) {
        // Queue layout may change only while the queue is not live (spec 4.2.2.2).
        let queue_writable = self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            // Features are fixed once FEATURES_OK is set.
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if queue_writable => {
                // A value that does not fit 16 bits must not wrap into a valid size.
                let size = u16::try_from(v).unwrap_or(0);
                if let Some(q) = self.selected_queue() {
                    q.set_size(size);
                }
            }
            VIRTIO_MMIO_QUEUE_READY if queue_writable => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW if queue_writable => {
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(Some(v), None);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if queue_writable => {
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(None, Some(v));
                }
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if queue_writable => {
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(Some(v), None);
                }
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if queue_writable => {
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(None, Some(v));
                }
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if queue_writable => {
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(Some(v), None);
                }
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if queue_writable => {
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(None, Some(v));
                }
            }
            // Normally caught by the ioeventfd in KVM; this is the fallback.
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                if let Some(k) = self.kick.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        let newly = v & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let ok = self.acked_features & !offered == 0
                && self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                // The driver sees FEATURES_OK did not stick and gives up (spec 3.1.1).
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            } else {
                let event_idx = self.acked_features
                    & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
                    != 0;
                for q in &mut self.queues {
                    q.set_event_idx(event_idx);
                }
            }
        }
        self.status = v;
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.device.activate(self.acked_features);
            self.kick();
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            let cfg = self.device.config();
            let start = (offset - u64::from(VIRTIO_MMIO_CONFIG)) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = cfg.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            // Registers are 32-bit only (spec 4.2.2); other accesses read as zero.
            return;
        }
        data.copy_from_slice(&self.read_reg(offset as u32).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        if offset < u64::from(VIRTIO_MMIO_CONFIG) && data.len() == 4 && offset.is_multiple_of(4) {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_reg(offset as u32, v);
        }
        // Config space writes are ignored: nothing in virtio-blk's config is writable here.
        IoAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// Records what the transport tells it.
    #[derive(Default)]
    struct Probe {
        activated: Option<u64>,
        resets: usize,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            4
        }
        fn features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | 1
        }
        fn config(&self) -> &[u8] {
            &[1, 2, 3, 4]
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 8]
        }
        fn process_queue(
            &mut self,
            _: usize,
            _: &mut Queue,
            _: &GuestMemoryMmap,
            hold: &AtomicBool,
            _: usize,
        ) -> (usize, bool) {
            assert!(!hold.load(Ordering::Relaxed));
            (0, false)
        }
        fn activate(&mut self, acked: u64) {
            self.activated = Some(acked);
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn efd() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    /// A transport over a `Probe`, with the other ends of its irq and queue eventfds.
    fn transport() -> (MmioTransport<Probe>, EventFd, Vec<EventFd>) {
        let (irq, kicks) = (efd(), vec![efd(), efd()]);
        let t = MmioTransport::new(
            Probe::default(),
            irq.try_clone().unwrap(),
            kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
        )
        .unwrap();
        (t, irq, kicks)
    }

    fn w(t: &mut MmioTransport<Probe>, reg: u32, v: u32) {
        assert_eq!(
            t.write(u64::from(reg), &v.to_le_bytes()),
            IoAction::Continue
        );
    }

    fn r(t: &mut MmioTransport<Probe>, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }

    fn signalled(e: &EventFd) -> bool {
        e.read().is_ok()
    }

    /// Negotiates VERSION_1 and sets up both queues, up to FEATURES_OK.
    fn negotiate(t: &mut MmioTransport<Probe>) {
        w(t, VIRTIO_MMIO_STATUS, 1);
        w(t, VIRTIO_MMIO_STATUS, 3);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w(t, VIRTIO_MMIO_STATUS, 0xb);
        assert_eq!(r(t, VIRTIO_MMIO_STATUS), 0xb);
        for (q, size) in [(0, 16), (1, 8)] {
            w(t, VIRTIO_MMIO_QUEUE_SEL, q);
            w(t, VIRTIO_MMIO_QUEUE_NUM, size);
            w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000 * (q + 1));
            w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1000 * (q + 1) + 0x400);
            w(t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x1000 * (q + 1) + 0x800);
            w(t, VIRTIO_MMIO_QUEUE_READY, 1);
        }
    }

    #[test]
    fn registers_activation_notify_interrupts_and_reset() {
        let (mut t, irq, kicks) = transport();
        assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 4);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
        let mut cfg = [0u8; 2];
        t.read(u64::from(VIRTIO_MMIO_CONFIG) + 1, &mut cfg);
        assert_eq!(cfg, [2, 3]);

        negotiate(&mut t);
        assert!(t.device.activated.is_none() && !t.is_active());
        assert!(!signalled(&kicks[0]));
        w(&mut t, VIRTIO_MMIO_STATUS, 0xf);
        // Activation reaches the device with what was negotiated, and every queue is looked at.
        assert_eq!(t.device.activated, Some(1 << VIRTIO_F_VERSION_1));
        assert!(t.is_active());
        assert!(signalled(&kicks[0]) && signalled(&kicks[1]));
        // A live queue's layout is fixed.
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 4);
        assert_eq!(t.queues[0].size(), 16);
        // The notify fallback kicks exactly the queue written.
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert!(!signalled(&kicks[0]) && signalled(&kicks[1]));
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
        // Completions: status bit, irqfd; ack clears; nothing pending, nothing re-raised.
        t.signal_used();
        assert!(signalled(&irq));
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        t.reraise();
        assert!(signalled(&irq), "a pending interrupt is raised again");
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        t.reraise();
        assert!(!signalled(&irq));

        // The saved transport restores to the same registers.
        let saved = t.state();
        let (irq2, kicks2) = (efd(), vec![efd(), efd()]);
        let back = MmioTransport::restore(Probe::default(), irq2, kicks2, &saved).unwrap();
        assert_eq!(back.state(), saved);
        let mut bad = saved.clone();
        bad.queues[1].size = 16;
        let err = MmioTransport::restore(Probe::default(), efd(), vec![efd(), efd()], &bad)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("saved virtqueue 1: size 16"),
            "{err}"
        );

        // Reset reaches the device and clears the transport.
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.device.resets, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert!(!t.queues[0].ready() && !t.is_active());
    }

    #[test]
    fn features_ok_needs_version_1_and_offered_bits() {
        let (mut t, _, _) = transport();
        w(&mut t, VIRTIO_MMIO_STATUS, 3);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w(&mut t, VIRTIO_MMIO_STATUS, 0xb);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 3, "no VERSION_1");
        let (mut t, _, _) = transport();
        w(&mut t, VIRTIO_MMIO_STATUS, 3);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 2);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w(&mut t, VIRTIO_MMIO_STATUS, 0xb);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 3, "a bit never offered");
    }
}
