//! VM-level KVM state: the VM fd with its in-kernel irqchip (PIC pair + IOAPIC), PIT and
//! kvmclock, and the guest RAM slots.

use super::{Context, Error, Result};
use crate::memory::GuestRam;
use crate::persist::{Persist, VmLevelState, VM_LEVEL_STATE_VERSION};
use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};

/// Where the TSS lives for KVM's real-mode emulation (3 pages below the BIOS area at 4 GiB).
const TSS_ADDR: usize = 0xfffb_d000;

/// A KVM VM with its irqchip and PIT.
pub struct KvmVm {
    pub fd: VmFd,
    pub kvm: Kvm,
}

impl KvmVm {
    /// Opens /dev/kvm and creates the VM, its TSS, irqchip and PIT, in the order that
    /// restores reliably on this host.
    pub fn new() -> Result<KvmVm> {
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        crate::kvm_caps::check(&kvm)?;
        let fd = kvm.create_vm().context("KVM_CREATE_VM")?;
        fd.set_tss_address(TSS_ADDR).context("KVM_SET_TSS_ADDR")?;
        fd.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .context("KVM_CREATE_PIT2")?;
        Ok(KvmVm { fd, kvm })
    }

    /// Gives every RAM region of `mem` to KVM as a memory slot, with dirty logging on (what
    /// `vstate::dirty` reads; its cost is in docs/ARCHITECTURE.md). `mem` must outlive the
    /// VM fd.
    pub fn map_memory(&self, mem: &GuestRam) -> Result<()> {
        for (slot, gpa, host, size) in mem.slots() {
            let region = kvm_userspace_memory_region {
                slot,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: the host range is guest RAM owned by `mem`, which outlives the VM fd
            // (VmHandle drops `vm` before `mem`).
            unsafe { self.fd.set_user_memory_region(region) }.with_context(|| {
                format!(
                    "KVM_SET_USER_MEMORY_REGION slot {slot} ({} MiB)",
                    size >> 20
                )
            })?;
        }
        Ok(())
    }

    /// Captures the in-kernel devices; only while no vCPU runs.
    fn save_state(&self) -> Result<VmLevelState> {
        let chip = |id| -> Result<kvm_irqchip> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .with_context(|| format!("KVM_GET_IRQCHIP {id}"))?;
            Ok(c)
        };
        Ok(VmLevelState {
            version: VM_LEVEL_STATE_VERSION,
            pit2: self.fd.get_pit2().context("KVM_GET_PIT2")?,
            clock: self.fd.get_clock().context("KVM_GET_CLOCK")?,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Loads the in-kernel devices' state. Guest time resumes at the saved clock (flags 0):
    /// the guest does not see the time it spent saved.
    pub(crate) fn restore_state(&self, s: &VmLevelState) -> Result<()> {
        self.fd.set_pit2(&s.pit2).context("KVM_SET_PIT2")?;
        let mut clock = s.clock;
        clock.flags = 0;
        self.fd.set_clock(&clock).context("KVM_SET_CLOCK")?;
        for (name, chip) in [
            ("PIC master", &s.pic_master),
            ("PIC slave", &s.pic_slave),
            ("IOAPIC", &s.ioapic),
        ] {
            self.fd
                .set_irqchip(chip)
                .with_context(|| format!("KVM_SET_IRQCHIP ({name})"))?;
        }
        Ok(())
    }
}

/// The VM-level state (in-kernel PIC pair, IOAPIC, PIT, kvmclock). A restore loads it into a
/// fresh VM (its `ConstructorArgs`) after the vCPUs, so the LAPICs exist in their saved
/// state before anything is routed to them.
impl Persist<'_> for KvmVm {
    type State = VmLevelState;
    type ConstructorArgs = KvmVm;
    const VERSION: u32 = VM_LEVEL_STATE_VERSION;
    type Error = Error;

    fn save(&self) -> Result<VmLevelState> {
        self.save_state()
    }

    fn restore(vm: KvmVm, s: &VmLevelState) -> Result<KvmVm> {
        vm.restore_state(s)?;
        Ok(vm)
    }
}
