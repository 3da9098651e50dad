//! The virtio-mmio transport (virtio 1.x, register layout version 2).
//!
//! The transport owns the registers, the virtqueues and the interrupt status; the device
//! behind it (see [`VirtioDevice`]) supplies its type, features and config space. One mutex
//! guards the whole transport: the vCPU thread takes it for a register access and the
//! device's I/O thread for a batch of requests, so a pause that takes it knows no request
//! is half done.

use crate::devices::bus::{BusDevice, IoAction};
use serde::{Deserialize, Serialize};
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
    pub fn validate(&self, offered: u64, max_sizes: &[u16]) -> anyhow::Result<()> {
        if self.queues.len() != max_sizes.len() {
            anyhow::bail!(
                "saved virtio device has {} queues, the device has {}",
                self.queues.len(),
                max_sizes.len()
            );
        }
        if self.acked_features & !offered != 0 {
            anyhow::bail!(
                "saved driver features {:#x} include features the device never offered ({:#x})",
                self.acked_features,
                self.acked_features & !offered
            );
        }
        let event_idx =
            self.acked_features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
        // virtio-queue trusts the saved maximum; the device's own is the limit.
        for (i, (q, &max)) in self.queues.iter().zip(max_sizes).enumerate() {
            if q.max_size != max {
                anyhow::bail!(
                    "saved virtqueue {i}: maximum size {} where the device's is {max}",
                    q.max_size
                );
            }
            if q.size > max || (q.size != 0 && !q.size.is_power_of_two()) {
                anyhow::bail!(
                    "saved virtqueue {i}: size {} (the device allows powers of two up to {max})",
                    q.size
                );
            }
            if q.event_idx_enabled && !event_idx {
                anyhow::bail!(
                    "saved virtqueue {i}: event index enabled but VIRTIO_RING_F_EVENT_IDX was not negotiated"
                );
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
    /// The queue-notify eventfd (also registered as an ioeventfd); written here to make the
    /// I/O thread look at the queues again (after DRIVER_OK, a resume or a restore).
    kick: EventFd,
    /// Set while the VM is paused: the I/O thread leaves the queues alone.
    pub paused: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D, irq: EventFd, kick: EventFd) -> anyhow::Result<Self> {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(|max| Queue::new(max).map_err(|e| anyhow::anyhow!("virtqueue of {max}: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
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
        kick: EventFd,
        s: &MmioTransportState,
    ) -> anyhow::Result<Self> {
        let mut t = Self::new(device, irq, kick)?;
        s.validate(t.device.features(), &t.device.queue_max_sizes())?;
        for (i, q) in s.queues.iter().enumerate() {
            t.queues[i] = Queue::try_from(QueueState::from(q))
                .map_err(|e| anyhow::anyhow!("saved virtqueue {i}: {e}"))?;
        }
        t.device_features_sel = s.device_features_sel;
        t.driver_features_sel = s.driver_features_sel;
        t.acked_features = s.acked_features;
        t.queue_sel = s.queue_sel;
        t.status = s.status;
        t.interrupt_status = s.interrupt_status;
        t.config_generation = s.config_generation;
        Ok(t)
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

    /// Makes the I/O thread look at the queues.
    pub fn kick(&self) {
        let _ = self.kick.write(1);
    }

    fn reset(&mut self) {
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
            VIRTIO_MMIO_QUEUE_NOTIFY => self.kick(),
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
