//! virtio devices on the virtio-mmio transport: virtio-blk for the config's `[[disk]]`s.
//!
//! Device i sits at `MMIO_BASE + i * MMIO_SIZE` in the MMIO hole below 4 GiB and raises
//! GSI `FIRST_GSI + i` (IOAPIC pin of the same number, KVM's default routing). Linux finds
//! the devices through the ACPI DSDT (see `crate::acpi`) or `virtio_mmio.device=` on the
//! command line (kernels built with `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).

pub mod blk;
pub mod mmio;

pub use blk::{Blk, BlkHandle, VirtioBlkState};

use crate::devices::Bus;
use anyhow::{bail, Context, Result};
use vm_memory::GuestMemoryMmap;
use vmpack_formats::config::VmConfig;

/// First virtio-mmio window.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of one device's window.
pub const MMIO_SIZE: u64 = 0x1000;
/// GSI of device 0 (4 is COM1; IOAPIC pins go up to 23).
pub const FIRST_GSI: u32 = 5;
/// Devices that fit on IOAPIC pins 5..=23.
pub const MAX_DEVICES: usize = 19;

/// Where device `i` lives: `(mmio base, gsi)`.
pub fn placement(i: usize) -> (u64, u32) {
    (MMIO_BASE + i as u64 * MMIO_SIZE, FIRST_GSI + i as u32)
}

/// `virtio_mmio.device=` arguments for `n` devices (appended to a Linux command line).
pub fn cmdline_args(n: usize) -> String {
    (0..n)
        .map(|i| {
            let (base, gsi) = placement(i);
            format!(" virtio_mmio.device=4K@{base:#x}:{gsi}")
        })
        .collect()
}

/// Opens every disk of `cfg`, puts a virtio-blk device for it on `mmio` and starts its I/O
/// thread. `states` are the saved devices of a restore (empty for a fresh boot, or for a
/// pack saved before vmboot had disks, whose guest never saw them).
pub fn attach_disks(
    cfg: &VmConfig,
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
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
        let (base, gsi) = placement(i);
        let h = BlkHandle::start(
            vm,
            mem,
            Blk::new(i, image, d.read_only),
            base,
            gsi,
            states.get(i),
        )?;
        mmio.insert(base, MMIO_SIZE, h.dev.clone())?;
        out.push(h);
    }
    Ok(out)
}
