//! CPUID the guest sees: KVM's supported set, normalised, filtered by a template, fixed up
//! per vCPU. Every template is defined bit by bit in docs/CPU-TEMPLATES.md; the tables
//! here are that definition.
//!
//! - `host`: everything KVM reports as supported, normalised (below).
//! - `x86-64-v1` .. `x86-64-v4`: the x86-64 psABI microarchitecture levels. A level's
//!   *required* features must all be in KVM's supported set (or the VM is refused, naming
//!   what is missing); besides them only a few *allowed* bits that KVM emulates on every
//!   host (x2APIC, TSC-deadline timer, hypervisor, OSXSAVE) pass. Everything else is hidden.
//!
//! On every template: the PMU leaf 0xA and the host-specific leaf-1 bits (debug store,
//! thermal monitor, PDCM) are hidden, the hypervisor bit is set, KVM's signature leaves
//! (0x4000_0000..) are kept, and topology describes `vcpus` single-threaded cores in one
//! package (leaves 1, 4, 0xB and 0x1F with subleaves 0 to 2, AMD's 0x8000_0008/0x8000_001E).

use crate::cpu_features::{
    feature_bit, has_bit, vendor, xsave_size, FeatureBit, XSAVE_LEGACY_SIZE,
};
use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use vmpack_formats::config::CpuTemplate;

/// Features every x86-64 CPU has (psABI x86-64 baseline, plus what the first 64-bit CPUs
/// of both vendors had).
const V1_REQUIRED: &[&str] = &[
    "fpu", "tsc", "msr", "pae", "cx8", "apic", "sep", "mtrr", "pge", "cmov", "pat", "clflush",
    "mmx", "fxsr", "sse", "sse2", "syscall", "nx", "lm",
];
/// Also passed through when the host has them (every x86-64 CPU does, but a level does not
/// name them).
const V1_ALLOWED: &[&str] = &[
    "vme",
    "de",
    "pse",
    "mce",
    "mca",
    "pse36",
    "x2apic",
    "tsc_deadline_timer",
    "hypervisor",
];
const V2_REQUIRED: &[&str] = &[
    "cx16", "lahf_lm", "popcnt", "sse3", "sse4_1", "sse4_2", "ssse3",
];
const V3_REQUIRED: &[&str] = &[
    "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
];
/// OSXSAVE mirrors the guest's CR4.OSXSAVE (KVM keeps it current); it must pass with XSAVE.
const V3_ALLOWED: &[&str] = &["osxsave"];
const V4_REQUIRED: &[&str] = &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"];

/// XSAVE components (XCR0 bits) each level's guest may enable: x87 and SSE; AVX (v3);
/// opmask, ZMM_Hi256, Hi16_ZMM (v4).
const XCR0_V1: u64 = 0x3;
const XCR0_V3: u64 = 0x7;
const XCR0_V4: u64 = 0xe7;

/// Leaves no named template passes: SGX (0x12), processor trace (0x14), key locker (0x19),
/// AMX tiles (0x1D, 0x1E), AVX10 (0x24).
const HIDDEN_LEAVES: &[u32] = &[0x12, 0x14, 0x19, 0x1d, 0x1e, 0x24];

/// Leaf 1 ECX bits hidden on every template: DTES64, MONITOR, DS-CPL, TM2, PDCM (they
/// describe host debug/thermal/perf hardware vmboot does not virtualise or save).
const LEAF1_ECX_HOST_ONLY: u32 = (1 << 2) | (1 << 3) | (1 << 4) | (1 << 8) | (1 << 15);
/// Leaf 1 EDX bits hidden on every template: DS, ACPI (thermal), TM, PBE.
const LEAF1_EDX_HOST_ONLY: u32 = (1 << 21) | (1 << 22) | (1 << 29) | (1 << 31);

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// The features a named level requires (empty for `host`).
pub fn required(t: &CpuTemplate) -> Vec<&'static str> {
    let lists: &[&[&str]] = match t {
        CpuTemplate::Host | CpuTemplate::Custom(_) => &[],
        CpuTemplate::Baseline => &[V1_REQUIRED],
        CpuTemplate::V2 => &[V1_REQUIRED, V2_REQUIRED],
        CpuTemplate::V3 => &[V1_REQUIRED, V2_REQUIRED, V3_REQUIRED],
        CpuTemplate::V4 => &[V1_REQUIRED, V2_REQUIRED, V3_REQUIRED, V4_REQUIRED],
    };
    lists.iter().flat_map(|l| l.iter().copied()).collect()
}

/// Every feature bit a named level passes to the guest when the host has it.
fn allowed(t: &CpuTemplate) -> Vec<FeatureBit> {
    let mut names = required(t);
    names.extend(V1_ALLOWED);
    if matches!(t, CpuTemplate::V3 | CpuTemplate::V4) {
        names.extend(V3_ALLOWED);
    }
    names
        .into_iter()
        .map(|n| feature_bit(n).expect("template features are in the table"))
        .collect()
}

fn xcr0(t: &CpuTemplate) -> u64 {
    match t {
        CpuTemplate::V3 => XCR0_V3,
        CpuTemplate::V4 => XCR0_V4,
        _ => XCR0_V1,
    }
}

/// The named template's required features that `supported` (KVM's CPUID) lacks.
pub fn missing_for(t: &CpuTemplate, supported: &[kvm_cpuid_entry2]) -> Vec<&'static str> {
    required(t)
        .into_iter()
        .filter(|n| {
            let b = feature_bit(n).expect("template features are in the table");
            !has_bit(supported, &b)
        })
        .collect()
}

/// The highest named level `supported` provides in full, if any.
pub fn highest_level(supported: &[kvm_cpuid_entry2]) -> Option<CpuTemplate> {
    CpuTemplate::ALL
        .into_iter()
        .filter(|t| *t != CpuTemplate::Host)
        .take_while(|t| missing_for(t, supported).is_empty())
        .last()
}

/// Hides what no template passes (PMU, host debug/thermal bits). Done on every template,
/// `host` included: a guest must not depend on hardware vmboot neither virtualises nor
/// saves.
pub fn normalize(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ecx &= !LEAF1_ECX_HOST_ONLY;
                e.edx &= !LEAF1_EDX_HOST_ONLY;
            }
            // Architectural performance monitoring: vmboot neither saves the counters'
            // MSRs nor can promise the same PMU version on another host.
            0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

/// Applies `template` to KVM's supported entries (once per VM). Refuses a template whose
/// required features the host's KVM lacks, naming them. A custom template is read from its
/// file (a host config's own file; packs never name one, see `snapshot::pack_config`).
pub fn apply_template(
    entries: &mut Vec<kvm_cpuid_entry2>,
    template: &CpuTemplate,
) -> Result<(), String> {
    normalize(entries);
    match template {
        CpuTemplate::Host => return Ok(()),
        CpuTemplate::Custom(path) => {
            let custom = crate::cpu_custom::load(path)?;
            custom.apply(entries, &path.display().to_string())?;
            normalize(entries);
            return Ok(());
        }
        _ => {}
    }
    let missing = missing_for(template, entries);
    if !missing.is_empty() {
        return Err(format!(
            "cpu_template \"{template}\" needs CPU features this host's KVM does not offer: {}; use a lower level (`vmpack host-info` shows the highest this host runs)",
            missing.join(", ")
        ));
    }
    let allowed = allowed(template);
    let xcr0 = xcr0(template);
    // Sizes of the enabled XSAVE components, from the host's own layout (standard format:
    // each component at its fixed offset).
    let xsave_max = xsave_size(entries, xcr0);
    entries.retain(|e| {
        !(HIDDEN_LEAVES.contains(&e.function)
            || (e.function == 7 && e.index >= 1)
            || (e.function == 0xd
                && e.index >= 2
                && (e.index >= 64 || xcr0 & (1u64 << e.index) == 0)))
    });
    let mask = |e: &kvm_cpuid_entry2, reg: u8| -> u32 {
        allowed
            .iter()
            .filter(|b| b.leaf == e.function && b.subleaf == e.index && b.reg == reg)
            .fold(0, |m, b| m | (1 << b.bit))
    };
    for e in entries.iter_mut() {
        match e.function {
            1 | 0x8000_0001 => {
                e.ecx &= mask(e, 2);
                e.edx &= mask(e, 3);
            }
            7 => {
                // Only subleaf 0 remains.
                e.eax = 0;
                e.ebx &= mask(e, 1);
                e.ecx &= mask(e, 2);
                e.edx &= mask(e, 3);
            }
            0xd if e.index == 0 => {
                e.eax &= xcr0 as u32;
                e.edx &= (xcr0 >> 32) as u32;
                // EBX follows the guest's XCR0 at run time (KVM updates it); x87/SSE at reset.
                e.ebx = XSAVE_LEGACY_SIZE;
                e.ecx = xsave_max;
            }
            0xd if e.index == 1 => {
                // No XSAVEOPT/XSAVEC/XSAVES/XFD: not part of any level.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The entries for vCPU `id` of `count`: topology and hypervisor bit.
pub fn for_vcpu(
    template_entries: &[kvm_cpuid_entry2],
    id: u32,
    count: u32,
) -> crate::boot::Result<CpuId> {
    let mut entries: Vec<kvm_cpuid_entry2> = template_entries.to_vec();
    let count = count.max(1);
    let amd = vendor(&entries).as_deref() == Some("AuthenticAMD");
    // KVM reports only subleaf 0 of the extended topology leaves; a multi-vCPU Linux then
    // sees one-CPU packages. Describe both levels (SMT, core) and the terminating subleaf.
    for leaf in [0xb, 0x1f] {
        if entries.iter().any(|e| e.function == leaf) {
            entries.retain(|e| e.function != leaf);
            for index in 0..3 {
                entries.push(kvm_cpuid_entry2 {
                    function: leaf,
                    index,
                    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..Default::default()
                });
            }
        }
    }
    // Bits needed to number `count` cores: the x2APIC-id shift of the core level.
    let core_shift = 32 - (count - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((count & 0xff) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            // Deterministic cache parameters (Intel): cores per package, threads sharing.
            4 if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
            }
            0xb | 0x1f => {
                e.edx = id;
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_shift;
                        e.ebx = count;
                        e.ecx = 1 | (2 << 8);
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            0x8000_0008 if amd => {
                // AMD: number of cores - 1 and the APIC-id size.
                e.ecx = (e.ecx & !0xf0ff) | ((count - 1) & 0xff) | (core_shift << 12);
            }
            0x8000_001e if amd => {
                // Extended APIC id; compute-unit id = core; one thread per unit.
                e.eax = id;
                e.ebx = (e.ebx & !0xffff) | (id & 0xff);
            }
            _ => {}
        }
    }
    CpuId::from_entries(&entries)
        .map_err(|e| crate::boot::Error::Cpuid(format!("{} CPUID entries: {e:?}", entries.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// A modern host: everything up to AVX-512 (an AMD Zen 4's values, trimmed).
    fn modern() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            entry(1, 0, 0x00a6_0f12, 0x0002_0800, 0xfef8_3203, 0x178b_fbff),
            entry(7, 0, 1, 0xf1bf_97a9, 0x0040_5fce, 0x10),
            entry(7, 1, 0x30, 0, 0, 0),
            entry(0xa, 0, 0x0703_0002, 0, 0, 0),
            entry(0xd, 0, 0xe7, 0x988, 0x988, 0),
            entry(0xd, 1, 0xf, 0x348, 0x1800, 0),
            entry(0xd, 2, 0x100, 0x240, 0, 0),
            entry(0xd, 5, 0x40, 0x340, 0, 0),
            entry(0xd, 6, 0x200, 0x380, 0, 0),
            entry(0xd, 7, 0x400, 0x580, 0, 0),
            entry(0xd, 9, 0x8, 0x980, 0, 0),
            entry(0x8000_0001, 0, 0, 0, 0x75c2_37ff, 0x2fd3_fbff),
        ]
    }

    fn get(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *e.iter().find(|x| x.function == f && x.index == i).unwrap()
    }

    #[test]
    fn levels_pass_exactly_their_bits() {
        let mut v1 = modern();
        apply_template(&mut v1, &CpuTemplate::Baseline).unwrap();
        assert_eq!(get(&v1, 0, 0).ebx, 0x6874_7541, "vendor kept");
        assert_eq!(get(&v1, 1, 0).ecx & 1, 0, "sse3 hidden");
        assert_ne!(get(&v1, 1, 0).edx & (1 << 26), 0, "sse2 kept");
        assert_eq!(get(&v1, 7, 0).ebx, 0);
        assert_eq!(get(&v1, 0x8000_0001, 0).edx & (1 << 27), 0, "rdtscp hidden");
        assert_eq!(get(&v1, 0xd, 0).ecx, 576);
        assert!(v1.iter().all(|e| !(e.function == 0xd && e.index >= 2)));
        assert_eq!(get(&v1, 0xa, 0).eax, 0, "no PMU");

        let mut v3 = modern();
        apply_template(&mut v3, &CpuTemplate::V3).unwrap();
        assert_eq!(get(&v3, 7, 0).ebx, (1 << 3) | (1 << 5) | (1 << 8));
        assert_eq!(get(&v3, 0xd, 0).eax, 7);
        assert_eq!(get(&v3, 0xd, 0).ecx, 0x240 + 0x100, "XSAVE size up to AVX");
        assert!(v3.iter().all(|e| !(e.function == 0xd && e.index > 2)));
        assert!(v3.iter().all(|e| !(e.function == 7 && e.index > 0)));

        let mut v4 = modern();
        apply_template(&mut v4, &CpuTemplate::V4).unwrap();
        assert_eq!(get(&v4, 0xd, 0).eax, 0xe7);
        assert_eq!(get(&v4, 0xd, 0).ecx, 0x580 + 0x400);
        assert_eq!(get(&v4, 0xd, 1).eax, 0);
        assert_eq!(highest_level(&modern()), Some(CpuTemplate::V4));
    }

    #[test]
    fn a_level_the_host_lacks_is_refused_by_name() {
        let mut host = modern();
        host[2].ebx &= !(1 << 5); // no AVX2
        assert_eq!(missing_for(&CpuTemplate::V3, &host), vec!["avx2"]);
        let err = apply_template(&mut host.clone(), &CpuTemplate::V4).unwrap_err();
        assert!(err.contains("avx2"), "{err}");
        assert!(apply_template(&mut host, &CpuTemplate::V2).is_ok());
    }

    #[test]
    fn topology_has_core_level_subleaves() {
        let mut e = modern();
        e.push(entry(0xb, 0, 0, 0, 0, 1));
        apply_template(&mut e, &CpuTemplate::Baseline).unwrap();
        let c = for_vcpu(&e, 3, 4).unwrap();
        let c = c.as_slice();
        let l1 = get(c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(get(c, 0xb, 1).ebx, 4);
        assert_eq!(get(c, 0xb, 1).eax, 2);
        assert_eq!(get(c, 0xb, 2).ecx, 2);
        assert_eq!(get(c, 0xb, 0).edx, 3);
    }
}
