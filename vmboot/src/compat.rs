//! Judging whether a host can run a saved guest: the verdict of `vmpack compat`, and the
//! check `vmpack restore` makes, in the same words (rules in docs/CPU-TEMPLATES.md).
//!
//! A guest that saw a CPUID feature at boot may use it at any moment after restore, so every
//! feature bit of the saved CPUID must be one the host's KVM supports. Bits are compared by
//! name where we know one, so the refusal tells the user what is missing.

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry};
use serde::Serialize;
use vmpack_formats::config::CpuTemplate;
use vmpack_formats::host::HostFingerprint;

use crate::cpu_features::{kvm_cpuid, missing_features, vendor};
pub use crate::vcpu::tsc_differs;

/// `vmpack compat`'s answer, worst first in the order of severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Verdict {
    #[serde(rename = "ok")]
    Ok,
    #[serde(rename = "ok with warnings")]
    OkWithWarnings,
    #[serde(rename = "refused")]
    Refused,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Ok => "ok",
            Verdict::OkWithWarnings => "ok with warnings",
            Verdict::Refused => "refused",
        })
    }
}

/// One reason for a verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reason {
    /// `warning` or `refused`.
    pub severity: Verdict,
    /// What was compared: `vmstate_version`, `cpu_features`, `cpu_vendor`, `msrs`,
    /// `kvm_caps`, `tsc`.
    pub check: &'static str,
    pub message: String,
    /// The missing features, MSRs or capabilities by name, where the check has them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Judgement {
    pub verdict: Verdict,
    pub reasons: Vec<Reason>,
}

impl Judgement {
    /// The reasons of one severity, joined for a one-line message.
    pub fn summary(&self, severity: Verdict) -> String {
        self.reasons
            .iter()
            .filter(|r| r.severity == severity)
            .map(|r| r.message.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// What of a saved guest the verdict reads (from its vmstate and manifest config).
pub struct SavedGuest<'a> {
    pub vmstate_version: u32,
    pub template: CpuTemplate,
    /// vCPU 0's CPUID (every vCPU has the same features).
    pub cpuid: &'a [kvm_cpuid_entry2],
    /// vCPU 0's MSRs.
    pub msrs: &'a [kvm_msr_entry],
    pub tsc_khz: u32,
}

/// MSRs a restored guest cannot do without: the long-mode system-call and segment-base
/// state, the APIC base, PAT, MTRR default type, the TSC, MISC_ENABLE and TSC_AUX. A host
/// that cannot restore one refuses the pack. Every other saved MSR may be dropped: one
/// still at 0 silently (KVM's reset value), one with another value with a warning.
pub const MUST_EXIST_MSRS: &[(u32, &str)] = &[
    (0x10, "IA32_TSC"),
    (0x1b, "IA32_APIC_BASE"),
    (0x174, "IA32_SYSENTER_CS"),
    (0x175, "IA32_SYSENTER_ESP"),
    (0x176, "IA32_SYSENTER_EIP"),
    (0x1a0, "IA32_MISC_ENABLE"),
    (0x277, "IA32_PAT"),
    (0x2ff, "IA32_MTRR_DEF_TYPE"),
    (0xc000_0080, "IA32_EFER"),
    (0xc000_0081, "STAR"),
    (0xc000_0082, "LSTAR"),
    (0xc000_0083, "CSTAR"),
    (0xc000_0084, "SFMASK"),
    (0xc000_0100, "FS_BASE"),
    (0xc000_0101, "GS_BASE"),
    (0xc000_0102, "KERNEL_GS_BASE"),
    (0xc000_0103, "TSC_AUX"),
];

/// KVM's paravirtual MSRs that point KVM at guest memory it keeps up to date (kvmclock, async
/// page faults, steal time, PV EOI): must exist when the guest enabled them (non-zero).
pub const KVM_PV_MSRS: &[(u32, &str)] = &[
    (0x11, "KVM_WALL_CLOCK"),
    (0x12, "KVM_SYSTEM_TIME"),
    (0x4b56_4d00, "KVM_WALL_CLOCK_NEW"),
    (0x4b56_4d01, "KVM_SYSTEM_TIME_NEW"),
    (0x4b56_4d02, "KVM_ASYNC_PF_EN"),
    (0x4b56_4d03, "KVM_STEAL_TIME"),
    (0x4b56_4d04, "KVM_PV_EOI_EN"),
];

fn msr_name(index: u32) -> String {
    MUST_EXIST_MSRS
        .iter()
        .chain(KVM_PV_MSRS)
        .find(|(i, _)| *i == index)
        .map_or_else(
            || format!("{index:#x}"),
            |(_, n)| format!("{n} ({index:#x})"),
        )
}

/// The verdict for running `saved` on the host `target` describes.
fn push(
    reasons: &mut Vec<Reason>,
    severity: Verdict,
    check: &'static str,
    message: String,
    names: Vec<String>,
) {
    reasons.push(Reason {
        severity,
        check,
        message,
        names,
    });
}

pub fn judge(saved: &SavedGuest, target: &HostFingerprint) -> Judgement {
    let mut reasons = Vec::new();
    // A vmboot reads every vm state version from 1 up to its own (docs/FORMAT.md §12.2).
    if saved.vmstate_version == 0 || saved.vmstate_version > target.vmstate_version {
        push(
            &mut reasons,
            Verdict::Refused,
            "vmstate_version",
            format!(
                "vm state version {} cannot be restored by vmboot {} (it reads versions 1 to {})",
                saved.vmstate_version, target.vmboot_version, target.vmstate_version
            ),
            vec![],
        );
    }
    let host_cpuid = kvm_cpuid(target);
    let missing = missing_features(saved.cpuid, &host_cpuid);
    if !missing.is_empty() {
        push(
            &mut reasons,
            Verdict::Refused,
            "cpu_features",
            format!(
                "the saved guest uses CPU features this host does not offer: {}",
                missing.join(", ")
            ),
            missing,
        );
    }
    let missing_caps =
        crate::kvm_caps::missing_required(target.kvm_caps.iter().map(String::as_str));
    if !missing_caps.is_empty() {
        push(
            &mut reasons,
            Verdict::Refused,
            "kvm_caps",
            format!(
                "this host's KVM lacks capabilities vmboot needs: {}",
                missing_caps.join(", ")
            ),
            missing_caps.iter().map(|s| s.to_string()).collect(),
        );
    }
    let (must, may): (Vec<&kvm_msr_entry>, Vec<&kvm_msr_entry>) = saved
        .msrs
        .iter()
        .filter(|m| !target.msrs.contains(&m.index))
        .filter(|m| m.data != 0 || MUST_EXIST_MSRS.iter().any(|(i, _)| *i == m.index))
        .partition(|m| {
            MUST_EXIST_MSRS
                .iter()
                .chain(KVM_PV_MSRS)
                .any(|(i, _)| *i == m.index)
        });
    if !must.is_empty() {
        let names: Vec<String> = must.iter().map(|m| msr_name(m.index)).collect();
        push(
            &mut reasons,
            Verdict::Refused,
            "msrs",
            format!(
                "this host cannot restore MSRs the guest depends on: {}",
                names.join(", ")
            ),
            names,
        );
    }
    if !may.is_empty() {
        let names: Vec<String> = may.iter().map(|m| msr_name(m.index)).collect();
        push(
            &mut reasons,
            Verdict::OkWithWarnings,
            "msrs",
            format!(
                "MSRs this host does not have are dropped (the guest sees them reset): {}",
                names.join(", ")
            ),
            names,
        );
    }
    if !target.kvm_caps.iter().any(|c| c == "KVM_CAP_KVMCLOCK_CTRL") {
        push(&mut reasons, Verdict::OkWithWarnings,
            "kvm_caps",
            "this host's KVM lacks KVM_CAP_KVMCLOCK_CTRL: a long pause may look like a soft lockup to a Linux guest".into(),
            vec!["KVM_CAP_KVMCLOCK_CTRL".into()],
        );
    }
    let (gv, hv) = (
        vendor(saved.cpuid).unwrap_or_default(),
        target.cpu.vendor.clone(),
    );
    let gv = gv.trim_matches(char::from(0)).to_string();
    if !hv.is_empty() && !gv.is_empty() && gv != hv {
        let message = format!("the guest was saved on a {gv} CPU and this host has a {hv} CPU");
        if saved.template == CpuTemplate::Host {
            push(&mut reasons, Verdict::Refused,
                "cpu_vendor",
                format!("{message}; a guest booted with cpu_template = \"host\" has taken the saving vendor's code paths (save it with an x86-64-v* template to move it across vendors)"),
                vec![],
            );
        } else {
            push(&mut reasons, Verdict::OkWithWarnings,
                "cpu_vendor",
                format!("{message}; the {} template's features exist on both, but the guest still sees the saving CPU's vendor string and may run vendor-specific code", saved.template),
                vec![],
            );
        }
    }
    if saved.tsc_khz != 0 && target.tsc_khz != 0 && tsc_differs(saved.tsc_khz, target.tsc_khz) {
        let factor = target.tsc_khz as f64 / saved.tsc_khz as f64;
        push(
            &mut reasons,
            Verdict::OkWithWarnings,
            "tsc",
            if target.tsc_scaling {
                format!(
                    "the guest's TSC ran at {} kHz and this host's at {} kHz; KVM scales it to the saved rate",
                    saved.tsc_khz, target.tsc_khz
                )
            } else {
                format!(
                    "the guest's TSC ran at {} kHz and this host's at {} kHz, and this host cannot scale it: the guest's TSC-based clock runs {factor:.4}x as fast (drifts {:+.2}%)",
                    saved.tsc_khz,
                    target.tsc_khz,
                    (factor - 1.0) * 100.0
                )
            },
            vec![],
        );
    }
    let verdict = reasons
        .iter()
        .map(|r| r.severity)
        .max()
        .unwrap_or(Verdict::Ok);
    Judgement { verdict, reasons }
}

/// A saved pack as `vmpack compat` reads it, without KVM.
pub struct SavedPack {
    /// `None` when the vm state's version is not the one this vmboot reads (the verdict is
    /// then the version refusal alone).
    pub state: Option<crate::persist::VmState>,
    pub version: u32,
    pub template: CpuTemplate,
}

impl SavedPack {
    /// Reads the manifest's config and the vm state of the pack at `path`.
    pub fn open(path: &std::path::Path) -> crate::packs::Result<SavedPack> {
        use crate::packs::Error;
        let label = path.display().to_string();
        let pack = vmpack_formats::vm::VmPack::open(path)?;
        let section = pack.manifest().vmstate.clone().ok_or_else(|| {
            Error::Refused(format!("{label}: the pack holds a VM at rest, not a saved one (no vmstate section); only saved VMs get a verdict"))
        })?;
        let template = pack.config()?.cpu_template;
        let reader = pack.reader();
        let s = reader
            .section(&section)
            .ok_or_else(|| Error::Refused(format!("{label}: section '{section}' is missing")))?;
        let bytes = reader.read_section(s.id, crate::persist::MAX_VMSTATE_LEN)?;
        #[derive(serde::Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Refused(format!(
                "{label}: section '{section}': not a valid vm state: {e}"
            ))
        })?;
        let state = if (1..=crate::persist::VM_STATE_VERSION).contains(&v.version) {
            Some(crate::persist::VmState::parse(&bytes).map_err(|e| {
                Error::Refused(format!(
                    "{label}: section '{section}': {}",
                    crate::error::Chain(&e)
                ))
            })?)
        } else {
            None
        };
        Ok(SavedPack {
            state,
            version: v.version,
            template,
        })
    }

    /// The verdict for `target`.
    pub fn judge(&self, target: &HostFingerprint) -> Judgement {
        match &self.state {
            Some(state) if !state.vcpus.is_empty() => {
                let v = &state.vcpus[0];
                judge(
                    &SavedGuest {
                        vmstate_version: state.version,
                        template: self.template.clone(),
                        cpuid: &v.cpuid,
                        msrs: &v.msrs,
                        tsc_khz: v.tsc_khz,
                    },
                    target,
                )
            }
            _ => judge(
                &SavedGuest {
                    vmstate_version: self.version,
                    template: self.template.clone(),
                    cpuid: &[],
                    msrs: &[],
                    tsc_khz: 0,
                },
                target,
            ),
        }
    }

    /// The fingerprint of the host that saved the pack, if recorded.
    pub fn saved_on(&self) -> Option<&HostFingerprint> {
        self.state.as_ref().and_then(|s| s.saved_on.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn reports_missing_features_by_name() {
        let guest = [entry(1, 0, (1 << 28) | (1 << 0), 1 << 26)];
        let host = [entry(1, 0, 1 << 0, 1 << 26)];
        assert_eq!(missing_features(&guest, &host), vec!["avx".to_string()]);
        assert!(missing_features(&host, &host).is_empty());
        assert_eq!(missing_features(&guest, &[]).len(), 3);
    }

    #[test]
    fn tsc_threshold() {
        assert!(!tsc_differs(2_596_120, 2_596_120));
        assert!(!tsc_differs(2_596_200, 2_596_120));
        assert!(tsc_differs(3_000_000, 2_596_120));
    }
}
