//! virtio devices on the virtio-mmio transport: virtio-blk for the config's `[[disk]]`s.
//!
//! Each device gets a 4 KiB window in the MMIO hole below 4 GiB and a GSI (IOAPIC pin of
//! the same number, KVM's default routing) from the device manager, in registration order:
//! disk i at 0xd0000000 + i * 4 KiB on GSI 5 + i. Linux finds the devices through the ACPI
//! DSDT (see `crate::acpi`) or `virtio_mmio.device=` on the command line (kernels built
//! with `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`), both generated from the registry.

pub mod blk;
pub mod device;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;
pub mod worker;

pub use blk::{Blk, BlkArgs, BlkHandle, VirtioBlkState};
pub use device::VirtioMmio;
pub use worker::Worker;

use crate::device_manager::DeviceManager;
use crate::memory::GuestMemoryMmap;
use crate::persist::{DeviceState, Persist, VmDevice};
use anyhow::{bail, Context, Result};
use std::sync::Arc;
use vmpack_formats::config::VmConfig;

/// Devices that fit on the dynamic GSIs (5..=23).
pub const MAX_DEVICES: usize = 19;

/// The registry id of the virtio-blk device of `[[disk]]` `i`.
pub fn blk_id(i: usize) -> String {
    format!("virtio-blk{i}")
}

/// Opens every disk of `cfg` and registers a virtio-blk device for it with `dm`, served by
/// `worker`. `saved` finds a device's saved state by id on a restore (none on a fresh
/// boot, or for a pack saved before vmboot had disks, whose guest never saw them). Returns
/// each disk's [`DiskTrack`](crate::disk_snapshot::DiskTrack), through which a save
/// freezes it.
pub fn attach_disks<'s>(
    cfg: &VmConfig,
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMemoryMmap,
    worker: &Worker,
    dm: &mut DeviceManager,
    saved: impl Fn(&str) -> Option<&'s DeviceState>,
    lazy: &crate::vstate::lazy_disk::LazyDisks,
) -> Result<Vec<Arc<crate::disk_snapshot::DiskTrack>>> {
    if cfg.disks.len() > MAX_DEVICES {
        bail!(
            "{} disks configured; vmboot supports at most {MAX_DEVICES}",
            cfg.disks.len()
        );
    }
    let mut tracks = Vec::with_capacity(cfg.disks.len());
    for (i, d) in cfg.disks.iter().enumerate() {
        let image = match lazy.get(i) {
            Some(l) => l.image(),
            None => vmpack_formats::disk::open_disk(&d.path, d.format, d.read_only)
                .with_context(|| format!("disk {i} ({})", d.path.display()))?,
        };
        let (image, track) = crate::disk_snapshot::track(image);
        tracks.push(track);
        let id = blk_id(i);
        let state = saved(&id)
            .map(|s| s.decode::<Arc<BlkHandle>>())
            .transpose()?;
        dm.add_virtio_mmio(&id, |base, gsi| {
            let args = BlkArgs {
                vm,
                mem,
                worker,
                blk: Blk::new(i, Box::new(image), d.read_only),
                base,
                gsi,
            };
            let h = match &state {
                Some(s) => Arc::<BlkHandle>::restore(args, s)?,
                None => args.start()?,
            };
            let dev = h.dev.clone();
            Ok((dev, h as Arc<dyn VmDevice>))
        })?;
    }
    Ok(tracks)
}
