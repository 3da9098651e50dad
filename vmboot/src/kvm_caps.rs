//! The KVM capabilities vmboot relies on, checked when it opens /dev/kvm so a host that
//! lacks one is refused up front with its name, not with a failed ioctl halfway through a
//! restore. Also what `vmpack host-info` records and `vmpack compat` compares.

use kvm_ioctls::{Cap, Kvm};

/// Whether vmboot cannot run without a capability or only loses something without it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Required,
    /// Optional; the text says what is lost without it.
    Optional(&'static str),
}

/// (capability, name as in the kernel's KVM API documentation, need).
pub const CAPS: &[(Cap, &str, Need)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP", Need::Required),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY", Need::Required),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR", Need::Required),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID", Need::Required),
    (Cap::MpState, "KVM_CAP_MP_STATE", Need::Required),
    (Cap::Pit2, "KVM_CAP_PIT2", Need::Required),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2", Need::Required),
    (Cap::Irqfd, "KVM_CAP_IRQFD", Need::Required),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD", Need::Required),
    (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK", Need::Required),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS", Need::Required),
    (Cap::Debugregs, "KVM_CAP_DEBUGREGS", Need::Required),
    (Cap::Xsave, "KVM_CAP_XSAVE", Need::Required),
    (Cap::Xcrs, "KVM_CAP_XCRS", Need::Required),
    (Cap::GetTscKhz, "KVM_CAP_GET_TSC_KHZ", Need::Required),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT", Need::Required),
    (
        Cap::TscControl,
        "KVM_CAP_TSC_CONTROL",
        Need::Optional("a restored guest keeps its saved TSC rate only with TSC scaling"),
    ),
    (
        Cap::KvmclockCtrl,
        "KVM_CAP_KVMCLOCK_CTRL",
        Need::Optional("a long pause may look like a soft lockup to a Linux guest"),
    ),
];

/// Names of the capabilities `kvm` has, of those in [`CAPS`].
pub fn present(kvm: &Kvm) -> Vec<&'static str> {
    CAPS.iter()
        .filter(|(c, _, _)| kvm.check_extension_int(*c) > 0)
        .map(|(_, n, _)| *n)
        .collect()
}

/// The required capabilities missing from a list of present ones.
pub fn missing_required<'a>(
    present: impl IntoIterator<Item = &'a str> + Clone,
) -> Vec<&'static str> {
    CAPS.iter()
        .filter(|(_, _, need)| *need == Need::Required)
        .map(|(_, n, _)| *n)
        .filter(|n| !present.clone().into_iter().any(|p| p == *n))
        .collect()
}

/// The KVM capabilities vmboot needs that this host's KVM lacks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "/dev/kvm: this host's KVM lacks {} that vmboot needs: {}",
    if .0.len() == 1 { "a capability" } else { "capabilities" },
    .0.join(", ")
)]
pub struct MissingCapabilities(pub Vec<&'static str>);

/// Refuses a KVM without one of the required capabilities, naming every missing one.
pub fn check(kvm: &Kvm) -> Result<(), MissingCapabilities> {
    let have = present(kvm);
    let missing = missing_required(have.iter().copied());
    if !missing.is_empty() {
        return Err(MissingCapabilities(missing));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_every_missing_required_capability() {
        let all: Vec<&str> = CAPS.iter().map(|c| c.1).collect();
        assert!(missing_required(all.iter().copied()).is_empty());
        let without: Vec<&str> = all
            .iter()
            .copied()
            .filter(|n| *n != "KVM_CAP_XSAVE" && *n != "KVM_CAP_TSC_CONTROL")
            .collect();
        assert_eq!(
            missing_required(without.iter().copied()),
            vec!["KVM_CAP_XSAVE"]
        );
    }
}
