//! The CPUID feature table and the plain functions over CPUID lists that the CPU model
//! shares (`cpuid`, `cpu_custom`, `cpu_fit`, `compat`, `host_info`). A leaf module: it uses
//! nothing else of vmboot, so the modules above it form no cycle.

use kvm_bindings::kvm_cpuid_entry2;
use vmpack_formats::host::{CpuidEntry, HostFingerprint};

/// (leaf, subleaf, register, bit, name) of the feature flags we check.
/// Register: 0 = EAX, 1 = EBX, 2 = ECX, 3 = EDX.
const FEATURES: &[(u32, u32, u8, u8, &str)] = &[
    // Leaf 1 EDX
    (1, 0, 3, 0, "fpu"),
    (1, 0, 3, 1, "vme"),
    (1, 0, 3, 2, "de"),
    (1, 0, 3, 3, "pse"),
    (1, 0, 3, 4, "tsc"),
    (1, 0, 3, 5, "msr"),
    (1, 0, 3, 6, "pae"),
    (1, 0, 3, 7, "mce"),
    (1, 0, 3, 8, "cx8"),
    (1, 0, 3, 9, "apic"),
    (1, 0, 3, 11, "sep"),
    (1, 0, 3, 12, "mtrr"),
    (1, 0, 3, 13, "pge"),
    (1, 0, 3, 14, "mca"),
    (1, 0, 3, 15, "cmov"),
    (1, 0, 3, 16, "pat"),
    (1, 0, 3, 17, "pse36"),
    (1, 0, 3, 19, "clflush"),
    (1, 0, 3, 23, "mmx"),
    (1, 0, 3, 24, "fxsr"),
    (1, 0, 3, 25, "sse"),
    (1, 0, 3, 26, "sse2"),
    // Leaf 1 ECX
    (1, 0, 2, 0, "sse3"),
    (1, 0, 2, 1, "pclmulqdq"),
    (1, 0, 2, 9, "ssse3"),
    (1, 0, 2, 12, "fma"),
    (1, 0, 2, 13, "cx16"),
    (1, 0, 2, 19, "sse4_1"),
    (1, 0, 2, 20, "sse4_2"),
    (1, 0, 2, 21, "x2apic"),
    (1, 0, 2, 22, "movbe"),
    (1, 0, 2, 23, "popcnt"),
    (1, 0, 2, 24, "tsc_deadline_timer"),
    (1, 0, 2, 25, "aes"),
    (1, 0, 2, 26, "xsave"),
    (1, 0, 2, 27, "osxsave"),
    (1, 0, 2, 28, "avx"),
    (1, 0, 2, 29, "f16c"),
    (1, 0, 2, 30, "rdrand"),
    (1, 0, 2, 31, "hypervisor"),
    // Leaf 7.0 EBX
    (7, 0, 1, 0, "fsgsbase"),
    (7, 0, 1, 3, "bmi1"),
    (7, 0, 1, 5, "avx2"),
    (7, 0, 1, 7, "smep"),
    (7, 0, 1, 8, "bmi2"),
    (7, 0, 1, 9, "erms"),
    (7, 0, 1, 10, "invpcid"),
    (7, 0, 1, 16, "avx512f"),
    (7, 0, 1, 17, "avx512dq"),
    (7, 0, 1, 18, "rdseed"),
    (7, 0, 1, 19, "adx"),
    (7, 0, 1, 20, "smap"),
    (7, 0, 1, 23, "clflushopt"),
    (7, 0, 1, 24, "clwb"),
    (7, 0, 1, 28, "avx512cd"),
    (7, 0, 1, 29, "sha_ni"),
    (7, 0, 1, 30, "avx512bw"),
    (7, 0, 1, 31, "avx512vl"),
    // Leaf 7.0 ECX
    (7, 0, 2, 1, "avx512vbmi"),
    (7, 0, 2, 2, "umip"),
    (7, 0, 2, 4, "ospke"),
    (7, 0, 2, 8, "gfni"),
    (7, 0, 2, 9, "vaes"),
    (7, 0, 2, 10, "vpclmulqdq"),
    (7, 0, 2, 22, "rdpid"),
    // Leaf 7.0 EDX
    (7, 0, 3, 4, "fsrm"),
    (7, 0, 3, 10, "md_clear"),
    (7, 0, 3, 26, "ibrs"),
    (7, 0, 3, 29, "arch_capabilities"),
    // Extended leaf 0x80000001 ECX / EDX
    (0x8000_0001, 0, 2, 0, "lahf_lm"),
    (0x8000_0001, 0, 2, 5, "abm"),
    (0x8000_0001, 0, 2, 6, "sse4a"),
    (0x8000_0001, 0, 2, 8, "3dnowprefetch"),
    (0x8000_0001, 0, 3, 11, "syscall"),
    (0x8000_0001, 0, 3, 20, "nx"),
    (0x8000_0001, 0, 3, 26, "pdpe1gb"),
    (0x8000_0001, 0, 3, 27, "rdtscp"),
    (0x8000_0001, 0, 3, 29, "lm"),
    // XSAVE sub-features, leaf 0xd.1 EAX
    (0xd, 1, 0, 0, "xsaveopt"),
    (0xd, 1, 0, 1, "xsavec"),
    (0xd, 1, 0, 3, "xsaves"),
];

/// One named CPUID feature bit. `reg`: 0 = EAX, 1 = EBX, 2 = ECX, 3 = EDX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureBit {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: u8,
    pub bit: u8,
    pub name: &'static str,
}

/// The bit a feature name (as in /proc/cpuinfo) stands for, if we know it.
pub fn feature_bit(name: &str) -> Option<FeatureBit> {
    FEATURES
        .iter()
        .find(|f| f.4 == name)
        .map(|&(leaf, subleaf, reg, bit, name)| FeatureBit {
            leaf,
            subleaf,
            reg,
            bit,
            name,
        })
}

/// Every feature name we know, in table order.
pub fn feature_names() -> impl Iterator<Item = &'static str> {
    FEATURES.iter().map(|f| f.4)
}

/// Whether `entries` has the feature bit set.
pub fn has_bit(entries: &[kvm_cpuid_entry2], b: &FeatureBit) -> bool {
    find(entries, b.leaf, b.subleaf).is_some_and(|e| reg(e, b.reg) & (1 << b.bit) != 0)
}

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    // Subleaf-less leaves report index 0 in KVM's list; a template may leave garbage there.
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
        .or_else(|| {
            if index == 0 {
                entries.iter().find(|e| e.function == function)
            } else {
                None
            }
        })
}

fn reg(e: &kvm_cpuid_entry2, r: u8) -> u32 {
    match r {
        0 => e.eax,
        1 => e.ebx,
        2 => e.ecx,
        _ => e.edx,
    }
}

/// Names of the features the guest was given that `host` (KVM's supported CPUID) lacks.
pub fn missing_features(guest: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Vec<String> {
    let mut missing = Vec::new();
    for &(leaf, sub, r, bit, name) in FEATURES {
        // Set by vmboot (hypervisor) or mirrored from the guest's CR4 by KVM (osxsave) on
        // any host.
        if matches!(name, "hypervisor" | "osxsave") {
            continue;
        }
        let Some(g) = find(guest, leaf, sub) else {
            continue;
        };
        if reg(g, r) & (1 << bit) == 0 {
            continue;
        }
        let has = find(host, leaf, sub).is_some_and(|h| reg(h, r) & (1 << bit) != 0);
        if !has {
            missing.push(name.to_string());
        }
    }
    missing
}

/// The vendor string of a CPUID list (leaf 0), e.g. "GenuineIntel".
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Option<String> {
    let e = find(entries, 0, 0)?;
    let mut b = Vec::with_capacity(12);
    for r in [e.ebx, e.edx, e.ecx] {
        b.extend_from_slice(&r.to_le_bytes());
    }
    Some(String::from_utf8_lossy(&b).into_owned())
}

/// Size of the legacy XSAVE area (x87 + SSE) plus the XSAVE header.
pub const XSAVE_LEGACY_SIZE: u32 = 512 + 64;

/// The standard-format XSAVE area size for the components in `xcr0`, from the host's layout
/// (leaf 0xD subleaves: size in EAX, offset in EBX).
pub fn xsave_size(entries: &[kvm_cpuid_entry2], xcr0: u64) -> u32 {
    entries
        .iter()
        .filter(|e| e.function == 0xd && e.index >= 2 && e.index < 64)
        .filter(|e| xcr0 & (1u64 << e.index) != 0)
        .map(|e| e.ebx.saturating_add(e.eax))
        .fold(XSAVE_LEGACY_SIZE, u32::max)
}

/// A KVM CPUID entry as a fingerprint records it.
pub fn to_entry(e: &kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry {
        leaf: e.function,
        subleaf: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

/// A fingerprint's CPUID entry as KVM's own type.
pub fn to_kvm(e: &CpuidEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.leaf,
        index: e.subleaf,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

/// KVM's CPUID of a fingerprint, as KVM's own type.
pub fn kvm_cpuid(f: &HostFingerprint) -> Vec<kvm_cpuid_entry2> {
    f.kvm_cpuid.iter().map(to_kvm).collect()
}
