//! A virtio device on the virtio-mmio transport, wired to KVM and served by the VM's worker:
//! what every virtio device has in common, so a device only implements
//! [`VirtioDevice`] (its type, features, config space and how to serve a queue).
//!
//! Each queue has its own eventfd, registered with KVM as an ioeventfd on `QueueNotify` with
//! the queue's index as datamatch, and with the [`Worker`]; completions reach the guest
//! through one irqfd on the device's GSI. The transport's mutex is held while a batch of a
//! queue is served, so a pause that takes it knows no request is half done.

use super::mmio::{MmioTransport, MmioTransportState, VirtioDevice};
use super::worker::{QueueServer, Worker};
use crate::devices::bus::lock;
use crate::devices::{Context, Result};
use crate::memory::GuestMemoryMmap;
use crate::persist::Pausable;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

/// Requests served per hold of the device lock; between requests the worker stops at once
/// when a pause is requested.
pub const BATCH: usize = 16;

/// A virtio device of type `D` at an MMIO window, with its interrupt line.
pub struct VirtioMmio<D: VirtioDevice> {
    pub dev: Arc<Mutex<MmioTransport<D>>>,
    pub base: u64,
    pub gsi: u32,
    /// Set while a pause is requested or in force: the worker stops between requests, so
    /// taking the device lock waits for one request at most.
    hold: AtomicBool,
    pub(crate) mem: GuestMemoryMmap,
}

impl<D: VirtioDevice + 'static> VirtioMmio<D> {
    /// Wraps `device` in a transport (fresh, or from `state`), registers one ioeventfd per
    /// queue and the irqfd on `gsi` with KVM, and its queues with `worker`. `mem` must
    /// outlive the device (the VMM drops devices before guest RAM).
    pub fn start(
        vm: &kvm_ioctls::VmFd,
        mem: &GuestMemoryMmap,
        worker: &Worker,
        device: D,
        (base, gsi): (u64, u32),
        state: Option<&MmioTransportState>,
        name: &str,
    ) -> Result<Arc<Self>> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).context("virtio irq eventfd")?;
        let queues = device.queue_max_sizes().len();
        let mut notify = Vec::with_capacity(queues);
        for i in 0..queues {
            let fd = EventFd::new(libc::EFD_NONBLOCK).context("virtio queue eventfd")?;
            vm.register_ioevent(
                &fd,
                &kvm_ioctls::IoEventAddress::Mmio(
                    base + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY),
                ),
                i as u32,
            )
            .with_context(|| format!("KVM_IOEVENTFD for {name} queue {i}"))?;
            notify.push(fd);
        }
        vm.register_irqfd(&irq, gsi)
            .with_context(|| format!("KVM_IRQFD for {name} (GSI {gsi})"))?;
        let kicks = notify
            .iter()
            .map(|f| f.try_clone().context("cloning a queue eventfd"))
            .collect::<Result<Vec<_>>>()?;
        let t = match state {
            Some(s) => MmioTransport::restore(device, irq, kicks, s)
                .with_context(|| format!("restoring {name}"))?,
            None => MmioTransport::new(device, irq, kicks)?,
        };
        let h = Arc::new(VirtioMmio {
            dev: Arc::new(Mutex::new(t)),
            base,
            gsi,
            hold: AtomicBool::new(false),
            mem: mem.clone(),
        });
        for (i, fd) in notify.iter().enumerate() {
            worker.add(fd, h.clone(), i)?;
        }
        let t = lock(&h.dev);
        // Requests a restored guest had queued before the save.
        t.kick();
        // An interrupt pending at the save: the guest has not seen it yet (its
        // acknowledgement would have cleared the status), so raise it again.
        t.reraise();
        drop(t);
        Ok(h)
    }
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// Back to a saved transport state in place (same ioeventfds and irqfd), with
    /// `device` putting the device's own part back; an interrupt pending in that state is
    /// raised again, as on a restore. Only while paused: the resume looks at the queues.
    pub fn reset_to(
        &self,
        s: &MmioTransportState,
        device: impl FnOnce(&mut D) -> Result<()>,
    ) -> Result<()> {
        let mut t = lock(&self.dev);
        t.set_state(s)?;
        device(&mut t.device)?;
        t.reraise();
        Ok(())
    }
}

impl<D: VirtioDevice> QueueServer for VirtioMmio<D> {
    /// Serves queue `idx` in batches of at most [`BATCH`] requests, taking the device lock
    /// per batch (so vCPU register accesses get in between) and stopping when a pause is
    /// requested.
    fn serve(&self, idx: usize) {
        loop {
            let mut t = lock(&self.dev);
            if t.paused || !t.is_active() {
                return;
            }
            let t = &mut *t;
            let Some(q) = t.queues.get_mut(idx) else {
                return;
            };
            let (served, more) = t.device.process_queue(idx, q, &self.mem, &self.hold, BATCH);
            // Without EVENT_IDX this honours the driver's VRING_AVAIL_F_NO_INTERRUPT.
            if served > 0 && q.needs_notification(&self.mem).unwrap_or(true) {
                t.signal_used();
            }
            if !more {
                return;
            }
        }
    }
}

impl<D: VirtioDevice> Pausable for VirtioMmio<D> {
    /// Waits for the request in progress (at most one, whatever the guest queued) and keeps
    /// the worker off the queues.
    fn pause(&self) {
        self.hold.store(true, Ordering::Release);
        lock(&self.dev).paused = true;
    }

    fn resume(&self) {
        let mut t = lock(&self.dev);
        t.paused = false;
        self.hold.store(false, Ordering::Release);
        // Notifications that arrived while paused were consumed without serving them.
        t.kick();
    }
}
