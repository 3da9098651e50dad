//! virtio-rng (entropy device): fills the buffers the guest offers on its one queue with
//! bytes from the host's `getrandom`. Enabled by `rng = true` in the config.

use super::device::VirtioMmio;
use super::mmio::{MmioTransportState, VirtioDevice};
use super::worker::Worker;
use crate::devices::bus::lock;
use crate::devices::{Error, Result};
use crate::memory::GuestMemoryMmap;
use crate::persist::{DeviceState, Persist, VmDevice};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

/// Ring size offered to drivers.
pub const QUEUE_SIZE: u16 = 256;
/// Largest number of bytes given for one request (a larger buffer gets this much): bounds
/// the time one request holds the device, as virtio-blk's 8 MiB does.
pub const MAX_REQUEST_BYTES: u32 = 64 << 10;

/// The registry id of the entropy device.
pub const ID: &str = "virtio-rng0";

/// A virtio-rng device as saved in a pack.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioRngState {
    pub transport: MmioTransportState,
    /// Bytes given to the guest so far.
    pub bytes: u64,
}

impl VirtioRngState {
    pub fn validate(&self) -> Result<()> {
        self.transport
            .validate(1 << VIRTIO_F_VERSION_1, &[QUEUE_SIZE])
    }
}

#[derive(Default)]
pub struct Rng {
    bytes: u64,
}

/// Fills `buf` from the host's entropy pool.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most `buf.len() - done` bytes into the rest of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn config(&self) -> &[u8] {
        &[]
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
        for served in 0..budget {
            if hold.load(Ordering::Acquire) {
                return (served, false);
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                return (served, false);
            };
            let head = chain.head_index();
            let mut written = 0u32;
            // Device-writable buffers only, up to the per-request limit; a buffer outside
            // guest RAM ends the request with what was written so far.
            for d in chain.filter(|d| d.is_write_only()) {
                let n = d.len().min(MAX_REQUEST_BYTES - written);
                let mut buf = vec![0u8; n as usize];
                if getrandom(&mut buf).is_err() || mem.write_slice(&buf, d.addr()).is_err() {
                    break;
                }
                written += n;
                if written == MAX_REQUEST_BYTES {
                    break;
                }
            }
            self.bytes += u64::from(written);
            let _ = q.add_used(mem, head, written);
        }
        (budget, true)
    }
}

/// An attached virtio-rng device.
pub type RngHandle = VirtioMmio<Rng>;

/// What a virtio-rng device is built from besides its state.
pub struct RngArgs<'a> {
    pub vm: &'a kvm_ioctls::VmFd,
    pub mem: &'a GuestMemoryMmap,
    pub worker: &'a Worker,
    pub base: u64,
    pub gsi: u32,
}

impl<'a> Persist<'a> for Arc<RngHandle> {
    type State = VirtioRngState;
    type ConstructorArgs = RngArgs<'a>;
    const VERSION: u32 = 1;
    type Error = Error;

    fn save(&self) -> Result<VirtioRngState> {
        let t = lock(&self.dev);
        Ok(VirtioRngState {
            transport: t.state(),
            bytes: t.device.bytes,
        })
    }

    fn restore(a: RngArgs<'a>, state: &VirtioRngState) -> Result<Arc<RngHandle>> {
        VirtioMmio::start(
            a.vm,
            a.mem,
            a.worker,
            Rng { bytes: state.bytes },
            (a.base, a.gsi),
            Some(&state.transport),
            "virtio-rng",
        )
    }
}

impl VmDevice for RngHandle {
    fn save(&self, id: &str) -> Result<DeviceState> {
        let t = lock(&self.dev);
        let s = VirtioRngState {
            transport: t.state(),
            bytes: t.device.bytes,
        };
        Ok(DeviceState {
            id: id.to_string(),
            version: <Arc<RngHandle> as Persist>::VERSION,
            state: serde_json::to_value(s)?,
        })
    }

    fn reset_to(&self, state: &DeviceState) -> Result<()> {
        let s = state.decode::<Arc<RngHandle>>()?;
        VirtioMmio::reset_to(self, &s.transport, |d| {
            d.bytes = s.bytes;
            Ok(())
        })
    }

    fn resettable(&self) -> bool {
        true
    }

    fn status(&self) -> Option<crate::api::DeviceStatus> {
        let t = lock(&self.dev);
        Some(crate::api::DeviceStatus::Entropy(
            crate::api::EntropyStatus {
                mmio_base: self.base,
                gsi: self.gsi,
                bytes: t.device.bytes,
            },
        ))
    }
}

/// Registers the entropy device with `dm` (fresh, or from `saved`).
pub fn attach(
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMemoryMmap,
    worker: &Worker,
    dm: &mut crate::device_manager::DeviceManager,
    saved: Option<&DeviceState>,
) -> Result<()> {
    let state = saved.map(|s| s.decode::<Arc<RngHandle>>()).transpose()?;
    dm.add_virtio_mmio(ID, |base, gsi| {
        let h = match &state {
            Some(s) => Arc::<RngHandle>::restore(
                RngArgs {
                    vm,
                    mem,
                    worker,
                    base,
                    gsi,
                },
                s,
            )?,
            None => VirtioMmio::start(
                vm,
                mem,
                worker,
                Rng::default(),
                (base, gsi),
                None,
                "virtio-rng",
            )?,
        };
        let dev = h.dev.clone();
        Ok((dev, h as Arc<dyn VmDevice>))
    })?;
    Ok(())
}
