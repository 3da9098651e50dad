//! The VM as KVM holds it, cut the way KVM cuts it: VM-level state (the VM fd, in-kernel
//! irqchip, PIT and clock: [`vm`]), the vCPUs (their fds, kicking, register state, and the
//! vCPU manager: threads, run loop, pause:
//! [`vcpu`]) and guest memory ([`memory`]). Devices live in `crate::devices` and the
//! registry that places them in `crate::device_manager`.

pub mod dirty;
pub mod lazy;
pub mod lazy_disk;
pub mod memory;
pub mod vcpu;
pub mod vm;
