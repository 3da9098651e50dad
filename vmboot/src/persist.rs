//! Everything vmboot saves about a paused VM, as plain serde structs.
//!
//! KVM structures serialize as raw bytes (kvm-bindings' `serde` feature), so use a binary
//! codec (bitcode, postcard, ...) rather than TOML or JSON for these. Guest RAM is not part of
//! [`VmState`]: it is written separately through [`crate::VmHandle::with_memory`].

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use vmpack_formats::config::VmConfig;

/// Bumped whenever a field changes meaning or is added/removed.
pub const VM_STATE_VERSION: u32 = 1;

/// One vCPU, captured outside KVM_RUN with any pending port I/O completed.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The full XSAVE area (not KVM_GET_FPU, which loses SSE state on restore).
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// TSC frequency the guest saw, in kHz.
    pub tsc_khz: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
}

/// The 16550 at COM1: the same fields as `vm_superio::serial::SerialState`, made serializable.
/// `Default` is the power-on state (transmitter empty, divisor 12), not all zeros.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl Default for SerialDeviceState {
    fn default() -> Self {
        (&vm_superio::serial::SerialState::default()).into()
    }
}

impl From<&vm_superio::serial::SerialState> for SerialDeviceState {
    fn from(s: &vm_superio::serial::SerialState) -> Self {
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialDeviceState> for vm_superio::serial::SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// vm-superio's i8042 keeps no state (it only reacts to the reset command); the struct exists
/// so a later, stateful model can be added without changing `VmState`'s shape.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

/// Devices emulated in userspace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: SerialDeviceState,
    pub i8042: I8042State,
    /// One per `[[disk]]`, in config order (absent in packs from before virtio-blk).
    #[serde(default)]
    pub virtio_blk: Vec<crate::devices::virtio::VirtioBlkState>,
}

/// A whole paused VM except guest RAM.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    /// Written by vmboot before the manifest became the config's only authority (see
    /// docs/FORMAT.md §12.2); a restore checks it against the manifest's config and never
    /// uses it otherwise. New saves leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<VmConfig>,
    /// Guest RAM regions `(gpa, size)` the memory image must cover.
    pub memory_regions: Vec<(u64, u64)>,
    pub pit2: kvm_pit_state2,
    /// kvmclock at save time; restored with flags 0 so guest time resumes at this value
    /// (the guest does not see the time it spent saved).
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    /// Where the loader put the initrd, `(gpa, len)` (Linux guests booted with one).
    #[serde(default)]
    pub initrd: Option<(u64, u64)>,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStates,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("version", &self.version)
            .field("vcpus", &self.vcpus.len())
            .field("memory_regions", &self.memory_regions)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_default_is_power_on_state() {
        let s = SerialDeviceState::default();
        // Transmitter empty: polling drivers must see THRE|TEMT.
        assert_eq!(s.line_status, 0x60);
        let back: vm_superio::serial::SerialState = (&s).into();
        assert_eq!(back, vm_superio::serial::SerialState::default());
    }
}
