//! Identity of the host CPU, read with CPUID (no KVM needed), and the host fingerprint
//! (`vmpack host-info`): everything about a host that decides whether a saved VM resumes
//! there. vmboot collects the fingerprint (it needs /dev/kvm); this is its file format,
//! documented in docs/CPU-TEMPLATES.md.

use serde::{Deserialize, Serialize};

/// Version of the fingerprint format this code writes and reads.
pub const FINGERPRINT_VERSION: u32 = 1;
/// A fingerprint file is read whole; refuse anything bigger before reading.
pub const MAX_FINGERPRINT_LEN: u64 = 1 << 20;
/// More CPUID entries than any KVM reports (KVM's own limit is 256).
pub const MAX_CPUID_ENTRIES: usize = 256;
/// More MSR indices than any KVM reports.
pub const MAX_MSRS: usize = 4096;

/// One CPUID entry as KVM reports it (`kvm_cpuid_entry2` without padding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub leaf: u32,
    pub subleaf: u32,
    /// KVM's flags: bit 0 = the subleaf is significant.
    #[serde(default)]
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// What decides whether a saved VM resumes on a host (docs/CPU-TEMPLATES.md, "Host
/// fingerprints").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFingerprint {
    /// [`FINGERPRINT_VERSION`].
    pub fingerprint_version: u32,
    /// Free text naming the host (its hostname by default); only shown.
    #[serde(default)]
    pub name: String,
    pub cpu: HostCpu,
    /// KVM_GET_SUPPORTED_CPUID: every CPU feature KVM can give a guest here.
    pub kvm_cpuid: Vec<CpuidEntry>,
    /// Names of the known features in `kvm_cpuid` (informational: verdicts read `kvm_cpuid`).
    #[serde(default)]
    pub features: Vec<String>,
    /// The highest x86-64 level `kvm_cpuid` provides in full (informational).
    #[serde(default)]
    pub highest_level: Option<String>,
    /// MSRs a vCPU here can save and restore (KVM's index list plus the ones vmboot adds,
    /// filtered to what a vCPU can read).
    pub msrs: Vec<u32>,
    /// The KVM capabilities vmboot uses that this host has (names as `KVM_CAP_...`).
    pub kvm_caps: Vec<String>,
    /// TSC frequency KVM gives a new vCPU, in kHz.
    pub tsc_khz: u32,
    /// KVM can run a guest at another TSC rate (KVM_CAP_TSC_CONTROL).
    pub tsc_scaling: bool,
    /// Host kernel release (`uname -r`).
    pub kernel: String,
    /// vmboot's version.
    pub vmboot_version: String,
    /// The vm state version that host's vmboot restores (docs/FORMAT.md §12.2).
    pub vmstate_version: u32,
}

impl HostFingerprint {
    /// Parses a fingerprint file's bytes, checking declared sizes; `label` names the file.
    pub fn parse(bytes: &[u8], label: &str) -> Result<HostFingerprint, String> {
        if bytes.len() as u64 > MAX_FINGERPRINT_LEN {
            return Err(format!(
                "{label}: {} bytes, more than a fingerprint may have ({MAX_FINGERPRINT_LEN})",
                bytes.len()
            ));
        }
        let f: HostFingerprint = serde_json::from_slice(bytes)
            .map_err(|e| format!("{label}: not a host fingerprint: {e}"))?;
        if f.fingerprint_version != FINGERPRINT_VERSION {
            return Err(format!(
                "{label}: fingerprint version {} (this vmpack reads version {FINGERPRINT_VERSION})",
                f.fingerprint_version
            ));
        }
        if f.kvm_cpuid.len() > MAX_CPUID_ENTRIES || f.msrs.len() > MAX_MSRS {
            return Err(format!(
                "{label}: {} CPUID entries and {} MSRs (at most {MAX_CPUID_ENTRIES} and {MAX_MSRS})",
                f.kvm_cpuid.len(),
                f.msrs.len()
            ));
        }
        Ok(f)
    }
}

/// The host CPU as CPUID describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    /// Vendor string, e.g. `GenuineIntel` or `AuthenticAMD`.
    pub vendor: String,
    /// Display family (base family plus extended family when base is 0xf).
    pub family: u32,
    /// Display model (extended model folded in for families 6 and 0xf).
    pub model: u32,
    pub stepping: u32,
    /// Brand string from leaves 0x80000002..4, trimmed; empty when not provided.
    pub model_name: String,
}

impl HostCpu {
    /// Reads the running CPU's identity.
    #[cfg(target_arch = "x86_64")]
    // `__cpuid` became a safe function in newer Rust; the blocks keep older toolchains
    // (rust-version) compiling.
    #[allow(unused_unsafe)]
    pub fn detect() -> HostCpu {
        use std::arch::x86_64::__cpuid;
        // SAFETY: CPUID exists on every x86-64 CPU; leaves above the reported maximum are
        // not queried.
        let leaf0 = unsafe { __cpuid(0) };
        let mut vendor = Vec::with_capacity(12);
        for r in [leaf0.ebx, leaf0.edx, leaf0.ecx] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        let vendor = String::from_utf8_lossy(&vendor)
            .trim_matches(char::from(0))
            .to_string();
        let (mut family, mut model, mut stepping) = (0, 0, 0);
        if leaf0.eax >= 1 {
            // SAFETY: leaf 1 is within the maximum basic leaf.
            let eax = unsafe { __cpuid(1) }.eax;
            stepping = eax & 0xf;
            let base_model = (eax >> 4) & 0xf;
            let base_family = (eax >> 8) & 0xf;
            let ext_model = (eax >> 16) & 0xf;
            let ext_family = (eax >> 20) & 0xff;
            family = if base_family == 0xf {
                base_family + ext_family
            } else {
                base_family
            };
            model = if base_family == 0x6 || base_family == 0xf {
                (ext_model << 4) | base_model
            } else {
                base_model
            };
        }
        // SAFETY: the extended range's maximum leaf is always queryable.
        let max_ext = unsafe { __cpuid(0x8000_0000) }.eax;
        let mut model_name = String::new();
        if max_ext >= 0x8000_0004 {
            let mut bytes = Vec::with_capacity(48);
            for leaf in 0x8000_0002u32..=0x8000_0004 {
                // SAFETY: leaf is within the reported extended maximum.
                let r = unsafe { __cpuid(leaf) };
                for v in [r.eax, r.ebx, r.ecx, r.edx] {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            model_name = String::from_utf8_lossy(&bytes[..end]).trim().to_string();
        }
        HostCpu {
            vendor,
            family,
            model,
            stepping,
            model_name,
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub fn detect() -> HostCpu {
        HostCpu::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_something_plausible() {
        let h = HostCpu::detect();
        assert_eq!(h.vendor.len(), 12, "{h:?}");
        assert!(h.family >= 6, "{h:?}");
    }
}
