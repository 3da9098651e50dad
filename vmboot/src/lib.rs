//! vmboot: a small KVM launcher built on the rust-vmm crates.
//!
//! [`Vm::create`] boots a guest from a config (Linux bzImage/ELF or a flat binary),
//! [`Vm::restore`] builds a fresh VM from a saved [`VmState`] plus guest memory, and
//! [`VmHandle`] pauses, resumes and captures a running VM from other threads.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod clone;
pub mod compat;
pub mod console;
pub mod cpu_custom;
pub mod cpu_features;
pub mod cpu_fit;
pub mod cpuid;
pub mod device_manager;
pub mod devices;
pub mod diff;
pub mod disk_snapshot;
pub mod error;
pub mod flat;
pub mod host_info;
pub mod kvm_caps;
pub mod linux;
pub mod live;
pub mod mptable;
pub mod msr;
pub mod packs;
pub mod persist;
pub mod restore_plan;
pub mod samples;
pub mod snapshot;
pub mod verified_cache;
pub mod vmm;
pub mod vstate;

pub use vstate::{memory, vcpu};

pub use memory::GuestMemoryInit;
pub use persist::{VcpuState, VmState};
pub use vmm::{
    block_exit_signals, terminate_all_on_signals, terminate_on_signals, BootFiles, BootPayload,
    Error, ExitReason, PauseError, RunOptions, SerialSink, ValidState, Vm, VmHandle,
};
