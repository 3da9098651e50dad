//! Identity of the host CPU, read with CPUID (no KVM needed). Recorded in packs so a
//! restore can tell the user where a VM was saved.

use serde::{Deserialize, Serialize};

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
