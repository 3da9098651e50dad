//! virtio devices on the virtio-mmio transport: virtio-blk for the config's `[[disk]]`s.
//!
//! Each device gets a 4 KiB window in the MMIO hole below 4 GiB and a GSI (IOAPIC pin of
//! the same number, KVM's default routing) from the device manager, in registration order:
//! disk i at 0xd0000000 + i * 4 KiB on GSI 5 + i. Linux finds the devices through the ACPI
//! DSDT (see `crate::acpi`) or `virtio_mmio.device=` on the command line (kernels built
//! with `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`), both generated from the registry.

pub mod blk;
pub mod mmio;

pub use blk::{Blk, BlkHandle, VirtioBlkState};

use crate::device_manager::DeviceManager;
use anyhow::{bail, Context, Result};
use vm_memory::GuestMemoryMmap;
use vmpack_formats::config::VmConfig;

/// Devices that fit on the dynamic GSIs (5..=23).
pub const MAX_DEVICES: usize = 19;

/// Opens every disk of `cfg`, registers a virtio-blk device for it with `dm` and starts its I/O
/// thread. `states` are the saved devices of a restore (empty for a fresh boot, or for a
/// pack saved before vmboot had disks, whose guest never saw them).
pub fn attach_disks(
    cfg: &VmConfig,
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMemoryMmap,
    dm: &mut DeviceManager,
    states: &[VirtioBlkState],
) -> Result<Vec<BlkHandle>> {
    if cfg.disks.len() > MAX_DEVICES {
        bail!(
            "{} disks configured; vmboot supports at most {MAX_DEVICES}",
            cfg.disks.len()
        );
    }
    if !states.is_empty() && states.len() != cfg.disks.len() {
        bail!(
            "the saved VM has {} virtio-blk devices but the config has {} disks",
            states.len(),
            cfg.disks.len()
        );
    }
    let mut out = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        let image = vmpack_formats::disk::open_disk(&d.path, d.format, d.read_only)
            .with_context(|| format!("disk {i} ({})", d.path.display()))?;
        let mut handle = None;
        dm.add_virtio_mmio(&format!("virtio-blk{i}"), |base, gsi| {
            let h = BlkHandle::start(
                vm,
                mem,
                Blk::new(i, image, d.read_only),
                base,
                gsi,
                states.get(i),
            )?;
            let dev = h.dev.clone();
            handle = Some(h);
            Ok(dev)
        })?;
        out.extend(handle);
    }
    Ok(out)
}
