//! VM Generation ID (Microsoft's "Virtual Machine Generation ID" spec, as Linux ≥ 5.18's
//! `vmgenid` driver reads it): a 16-byte ID in guest memory that changes whenever the VM
//! may have been duplicated, so the guest reseeds its RNG (and anything else that must not
//! be shared by two copies). Enabled by `vmgenid = true` in the config.
//!
//! - The ID lives at [`ADDR`], in the legacy BIOS area below the MP table: never RAM in the
//!   e820 map (0x9fc00..1 MiB is reserved), the same place for every VM, so a flat guest
//!   finds it without ACPI.
//! - The DSDT describes it as `\_SB.VGEN` (`_HID "VMGENCTR"`, `_CID`/`_DDN`
//!   `"VM_Gen_Counter"`, method `ADDR` returning the address as `Package { low, high }`) and
//!   adds an ACPI Generic Event Device `\_SB.GED0` (`ACPI0013`) on the device's GSI whose
//!   `_EVT` does `Notify (\_SB.VGEN, 0x80)`.
//! - A boot writes a fresh random ID; every restore (and so every clone) writes another one
//!   and pulses the GSI, so the guest is notified. A reset in place (`PUT /vm/reset`) is a
//!   restore of the same pack: the pack's generation + 1, another fresh ID, the same pulse.

use super::{Context, Error, Result};
use crate::device_manager::{AcpiId, DeviceInfo, DeviceManager};
use crate::memory::GuestMemoryMmap;
use crate::persist::{DeviceState, Pausable, Persist, VmDevice};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Guest-physical address of the 16-byte generation ID.
pub const ADDR: u64 = 0xef000;
/// The registry id.
pub const ID: &str = "vmgenid";

/// What a pack keeps of the device: how many times the VM was restored (the ID itself is
/// never reused, so it is not needed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmGenIdState {
    pub generation: u64,
}

pub struct VmGenId {
    gsi: u32,
    state: Mutex<(VmGenIdState, [u8; 16])>,
    irq: EventFd,
    mem: GuestMemoryMmap,
}

/// Writes `id` where the guest reads it.
fn write_id(mem: &GuestMemoryMmap, id: &[u8; 16]) -> Result<()> {
    mem.write_slice(id, GuestAddress(ADDR))
        .map_err(|source| Error::GuestMemory {
            what: "writing the VM generation ID into guest memory".into(),
            source,
        })
}

/// Tells the guest the ID changed. Edge-triggered: the GED's `_EVT` runs once and notifies
/// `\_SB.VGEN`.
fn notify(irq: &EventFd) -> Result<()> {
    irq.write(1)
        .context("raising the VM generation ID notification")
}

fn fresh_id() -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    // SAFETY: writes at most 16 bytes into `id`.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != 16 {
        return Err(std::io::Error::last_os_error()).context("getrandom for the VM generation ID");
    }
    Ok(id)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Pausable for VmGenId {}

impl<'a> Persist<'a> for VmGenId {
    type State = VmGenIdState;
    type ConstructorArgs = ();
    const VERSION: u32 = 1;
    type Error = Error;

    fn save(&self) -> Result<VmGenIdState> {
        Ok(crate::devices::bus::lock(&self.state).0.clone())
    }

    fn restore(_: (), _: &VmGenIdState) -> Result<VmGenId> {
        Err(Error::InvalidState(
            "the generation ID device is rebuilt by vmgenid::attach".into(),
        ))
    }
}

impl VmDevice for VmGenId {
    fn save(&self, id: &str) -> Result<DeviceState> {
        DeviceState::new(id, self)
    }

    /// As a restore of the pack: its generation + 1, a fresh ID (written after the reset put
    /// the pack's memory back, so the guest never reads an ID of an earlier run), and the
    /// notification. Its vmstate holds no ID, so clones and resets never share one.
    fn reset_to(&self, state: &DeviceState) -> Result<()> {
        let saved = state.decode::<VmGenId>()?;
        let id = fresh_id()?;
        write_id(&self.mem, &id)?;
        *crate::devices::bus::lock(&self.state) = (
            VmGenIdState {
                generation: saved.generation + 1,
            },
            id,
        );
        notify(&self.irq)
    }

    fn resettable(&self) -> bool {
        true
    }

    fn status(&self) -> Option<crate::api::DeviceStatus> {
        let s = crate::devices::bus::lock(&self.state);
        Some(crate::api::DeviceStatus::VmGenId(
            crate::api::VmGenIdStatus {
                id: hex(&s.1),
                address: ADDR,
                gsi: self.gsi,
                generation: s.0.generation,
            },
        ))
    }
}

/// Writes a fresh ID into guest memory and registers the device with `dm`; on a restore
/// (`saved`), also pulses its interrupt so the guest's ACPI notify handler reads it.
pub fn attach(
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMemoryMmap,
    dm: &mut DeviceManager,
    saved: Option<&DeviceState>,
) -> Result<()> {
    let mut state = saved
        .map(|s| s.decode::<VmGenId>())
        .transpose()?
        .unwrap_or_default();
    let restored = saved.is_some();
    if restored {
        state.generation += 1;
    }
    let id = fresh_id()?;
    write_id(mem, &id)?;
    let irq = EventFd::new(libc::EFD_NONBLOCK).context("vmgenid eventfd")?;
    let gsi = dm.add_platform(
        DeviceInfo {
            acpi: Some(AcpiId::VmGenId { addr: ADDR }),
            ..DeviceInfo::new(ID)
        },
        |gsi| {
            vm.register_irqfd(&irq, gsi)
                .with_context(|| format!("KVM_IRQFD for the VM generation ID (GSI {gsi})"))?;
            Ok(Arc::new(VmGenId {
                gsi,
                state: Mutex::new((state, id)),
                irq: irq.try_clone().context("vmgenid eventfd")?,
                mem: mem.clone(),
            }) as Arc<dyn VmDevice>)
        },
    )?;
    if restored {
        notify(&irq)?;
    }
    let _ = gsi;
    Ok(())
}
