//! CPUID the guest sees: KVM's supported set, filtered by a template, fixed up per vCPU.
//!
//! Templates:
//! - `host`: everything KVM reports as supported.
//! - `baseline`: a portable x86-64-v1 set (what every x86-64 CPU has: FPU, TSC, MSR, PAE,
//!   CX8, APIC, SEP, MTRR, PGE, MCA, CMOV, PAT, CLFLUSH, MMX, FXSR, SSE, SSE2, SYSCALL, NX, LM).
//!   SSE3 and later, XSAVE/AVX, leaf 7 extended features, 1 GiB pages and RDTSCP are hidden.
//!   The vendor string, family/model and cache/topology leaves are kept; the KVM-emulated
//!   x2APIC and TSC-deadline timer stay visible because KVM provides them on every host.
//!
//! On every template: the hypervisor bit is set, KVM's signature leaves (0x4000_0000..) are
//! kept, and topology (APIC IDs, logical counts) describes `vcpus` single-threaded cores in
//! one package.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use vmpack_formats::config::CpuTemplate;

const LEAF1_EDX_BASELINE: u32 = (1 << 0) // fpu
    | (1 << 1) // vme
    | (1 << 2) // de
    | (1 << 3) // pse
    | (1 << 4) // tsc
    | (1 << 5) // msr
    | (1 << 6) // pae
    | (1 << 7) // mce
    | (1 << 8) // cx8
    | (1 << 9) // apic
    | (1 << 11) // sep
    | (1 << 12) // mtrr
    | (1 << 13) // pge
    | (1 << 14) // mca
    | (1 << 15) // cmov
    | (1 << 16) // pat
    | (1 << 17) // pse36
    | (1 << 19) // clflush
    | (1 << 23) // mmx
    | (1 << 24) // fxsr
    | (1 << 25) // sse
    | (1 << 26) // sse2
    | (1 << 28); // htt (set per topology below)
const LEAF1_ECX_BASELINE: u32 = (1 << 21) // x2apic (emulated by KVM)
    | (1 << 24) // tsc-deadline (emulated by KVM)
    | (1 << 31); // hypervisor
/// 0x8000_0001 EDX: syscall, nx, lm, plus the AMD mirrors of leaf-1 EDX bits.
const EXT1_EDX_BASELINE: u32 =
    (1 << 11) | (1 << 20) | (1 << 29) | (LEAF1_EDX_BASELINE & 0x0183_f3ff);

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Applies `template` to KVM's supported entries (done once per VM).
pub fn apply_template(entries: &mut Vec<kvm_cpuid_entry2>, template: CpuTemplate) {
    if template == CpuTemplate::Host {
        return;
    }
    // Leaves describing features the baseline hides: XSAVE sub-leaves beyond x87/SSE,
    // processor trace, SGX, AVX-512/AMX tiles and similar.
    let hidden = |e: &kvm_cpuid_entry2| {
        (e.function == 0xd && e.index >= 2)
            || matches!(e.function, 0x12 | 0x14 | 0x19 | 0x1d | 0x1e | 0x24)
    };
    entries.retain(|e| !hidden(e));
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.edx &= LEAF1_EDX_BASELINE;
                e.ecx &= LEAF1_ECX_BASELINE;
            }
            7 => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xd if e.index == 0 => {
                // x87 | SSE only: the legacy area plus the XSAVE header.
                e.eax &= 3;
                e.edx = 0;
                e.ebx = 512 + 64;
                e.ecx = 512 + 64;
            }
            0xd => {
                // No XSAVEOPT/XSAVEC/XSAVES.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x8000_0001 => {
                e.edx &= EXT1_EDX_BASELINE;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

/// The entries for vCPU `id` of `count`: topology and hypervisor bit.
pub fn for_vcpu(template_entries: &[kvm_cpuid_entry2], id: u32, count: u32) -> CpuId {
    let mut entries: Vec<kvm_cpuid_entry2> = template_entries.to_vec();
    let count = count.max(1);
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
            0x8000_0008 => {
                // AMD: number of cores - 1 and the APIC-id size.
                e.ecx = (e.ecx & !0xf0ff) | ((count - 1) & 0xff) | (core_shift << 12);
            }
            0x8000_001e => {
                // Extended APIC id; compute-unit id = core; one thread per unit.
                e.eax = id;
                e.ebx = (e.ebx & !0xffff) | (id & 0xff);
            }
            _ => {}
        }
    }
    CpuId::from_entries(&entries).expect("no more entries than KVM returned")
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

    #[test]
    fn baseline_hides_modern_features_and_topology_is_per_vcpu() {
        let mut e = vec![
            entry(0, 0, 0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            entry(1, 0, 0x800f12, 0x0002_0800, 0x7ed8_3203, 0x178b_fbff),
            entry(7, 0, 0, 0x219c_91a9, 0x4, 0x10),
            entry(0xd, 2, 256, 576, 0, 0),
            entry(0x8000_0001, 0, 0, 0, 0x35c1_f3ff, 0x2fd3_fbff),
        ];
        apply_template(&mut e, CpuTemplate::Baseline);
        assert_eq!(e.len(), 4, "xsave sub-leaf 2 dropped");
        assert_eq!(e[0].ebx, 0x6874_7541, "vendor kept");
        assert_eq!(e[1].ecx & 1, 0, "sse3 hidden");
        assert_ne!(e[1].edx & (1 << 26), 0, "sse2 kept");
        assert_eq!(e[2].ebx, 0);
        assert_eq!(e[3].edx & (1 << 27), 0, "rdtscp hidden");
        assert_ne!(e[3].edx & (1 << 29), 0, "lm kept");

        let c = for_vcpu(&e, 3, 4);
        let l1 = c.as_slice().iter().find(|x| x.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
    }
}
