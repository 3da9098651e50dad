//! `vmpack template --fit` and `--level`: the CPU a whole fleet shares, from the hosts'
//! fingerprints. The fit is the intersection of their KVM CPUID, normalised into a coherent
//! CPU (a feature whose prerequisite is missing goes too, XSAVE sizes follow the remaining
//! components), written in the fingerprint format (docs/CPU-TEMPLATES.md).

use crate::cpu_features::{feature_bit, feature_names, has_bit, kvm_cpuid, to_entry, xsave_size};
use kvm_bindings::kvm_cpuid_entry2;
use vmpack_formats::config::CpuTemplate;
use vmpack_formats::host::{HostCpu, HostFingerprint, FINGERPRINT_VERSION};

/// (feature, the feature it needs): a CPU never has the first without the second.
pub const DEPENDS_ON: &[(&str, &str)] = &[
    ("sse3", "sse2"),
    ("ssse3", "sse3"),
    ("sse4_1", "ssse3"),
    ("sse4_2", "sse4_1"),
    ("pclmulqdq", "sse2"),
    ("aes", "sse2"),
    ("osxsave", "xsave"),
    ("avx", "xsave"),
    ("xsaveopt", "xsave"),
    ("xsavec", "xsave"),
    ("xsaves", "xsave"),
    ("fma", "avx"),
    ("f16c", "avx"),
    ("avx2", "avx"),
    ("vaes", "avx"),
    ("vpclmulqdq", "avx"),
    ("avx512f", "avx2"),
    ("avx512dq", "avx512f"),
    ("avx512cd", "avx512f"),
    ("avx512bw", "avx512f"),
    ("avx512vl", "avx512f"),
    ("avx512vbmi", "avx512bw"),
];

/// The highest named level every host supports.
pub fn common_level(hosts: &[HostFingerprint]) -> Option<CpuTemplate> {
    let cpuids: Vec<Vec<kvm_cpuid_entry2>> = hosts.iter().map(kvm_cpuid).collect();
    CpuTemplate::ALL
        .into_iter()
        .filter(|t| *t != CpuTemplate::Host)
        .take_while(|t| {
            cpuids
                .iter()
                .all(|c| crate::cpuid::missing_for(t, c).is_empty())
        })
        .last()
}

pub struct Fit {
    pub fingerprint: HostFingerprint,
    /// Features every host has but removed because a prerequisite is missing somewhere.
    pub removed: Vec<String>,
}

/// Registers of a leaf that are feature bitmaps (intersected), as (leaf, subleaf or None for
/// every subleaf, register mask: bit 0 = EAX .. bit 3 = EDX).
const BITMAPS: &[(u32, Option<u32>, u8)] = &[
    (1, None, 0b1100),
    (6, None, 0b1101),
    (7, Some(0), 0b1110),
    (7, Some(1), 0b1111),
    (7, Some(2), 0b1111),
    (0xd, Some(0), 0b1001),
    (0xd, Some(1), 0b0001),
    (0x8000_0001, None, 0b1100),
    (0x8000_0007, None, 0b1000),
    (0x8000_0008, None, 0b0010),
];

fn regs_mut(e: &mut kvm_cpuid_entry2) -> [&mut u32; 4] {
    [&mut e.eax, &mut e.ebx, &mut e.ecx, &mut e.edx]
}

fn clear(entries: &mut [kvm_cpuid_entry2], name: &str) {
    let b = feature_bit(name).expect("dependency names are in the table");
    for e in entries
        .iter_mut()
        .filter(|e| e.function == b.leaf && e.index == b.subleaf)
    {
        *regs_mut(e)[b.reg as usize] &= !(1 << b.bit);
    }
}

/// The largest CPU every host in `hosts` can run.
pub fn fit(hosts: &[HostFingerprint]) -> Result<Fit, String> {
    let first = hosts.first().ok_or("no host fingerprints given")?;
    let cpuids: Vec<Vec<kvm_cpuid_entry2>> = hosts.iter().map(kvm_cpuid).collect();
    let mut out: Vec<kvm_cpuid_entry2> = cpuids[0]
        .iter()
        .filter(|e| {
            cpuids.iter().all(|c| {
                c.iter()
                    .any(|x| x.function == e.function && x.index == e.index)
            })
        })
        .copied()
        .collect();
    for e in out.iter_mut() {
        let others: Vec<kvm_cpuid_entry2> = cpuids
            .iter()
            .filter_map(|c| {
                c.iter()
                    .find(|x| x.function == e.function && x.index == e.index)
                    .copied()
            })
            .collect();
        if matches!(e.function, 0 | 0x8000_0000) {
            // The highest leaf every host has.
            e.eax = others.iter().map(|o| o.eax).min().unwrap_or(e.eax);
            continue;
        }
        for &(leaf, sub, mask) in BITMAPS {
            if leaf != e.function || sub.is_some_and(|s| s != e.index) {
                continue;
            }
            for o in &others {
                let mut o = *o;
                let src = regs_mut(&mut o).map(|r| *r);
                for (i, r) in regs_mut(e).into_iter().enumerate() {
                    if mask & (1 << i) != 0 {
                        *r &= src[i];
                    }
                }
            }
        }
    }
    let before: Vec<&str> = feature_names()
        .filter(|n| has_bit(&out, &feature_bit(n).expect("from the table")))
        .collect();
    // Prerequisites first removed make their dependants go on the next pass.
    loop {
        let mut changed = false;
        for (f, needs) in DEPENDS_ON {
            let fb = feature_bit(f).expect("in the table");
            let nb = feature_bit(needs).expect("in the table");
            if has_bit(&out, &fb) && !has_bit(&out, &nb) {
                clear(&mut out, f);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    // XSAVE components follow the features that use them.
    let mut xcr0: u64 = 0;
    if let Some(d) = out.iter().find(|e| e.function == 0xd && e.index == 0) {
        xcr0 = u64::from(d.eax) | (u64::from(d.edx) << 32);
    }
    let has = |n: &str| has_bit(&out, &feature_bit(n).expect("in the table"));
    let xsave = has("xsave");
    if !xsave {
        xcr0 &= 0x3;
    }
    if !has("avx") {
        xcr0 &= !0x4;
    }
    if !has("avx512f") {
        xcr0 &= !0xe0;
    }
    let xsave_max = xsave_size(&out, xcr0);
    out.retain(|e| {
        !(e.function == 0xd && e.index >= 2 && (e.index >= 64 || xcr0 & (1u64 << e.index) == 0))
    });
    for e in out.iter_mut().filter(|e| e.function == 0xd) {
        if e.index == 0 {
            e.eax = xcr0 as u32;
            e.edx = (xcr0 >> 32) as u32;
            e.ebx = 576;
            e.ecx = xsave_max;
        } else if e.index == 1 && !xsave {
            e.eax = 0;
        }
    }
    let features: Vec<String> = feature_names()
        .filter(|n| has_bit(&out, &feature_bit(n).expect("from the table")))
        .map(str::to_string)
        .collect();
    let removed = before
        .into_iter()
        .filter(|n| !features.iter().any(|f| f == n))
        .map(str::to_string)
        .collect();
    let all = |pick: &dyn Fn(&HostFingerprint) -> &Vec<String>| -> Vec<String> {
        pick(first)
            .iter()
            .filter(|c| hosts.iter().all(|h| pick(h).contains(c)))
            .cloned()
            .collect()
    };
    let kvm_caps = all(&|h| &h.kvm_caps);
    let msrs = first
        .msrs
        .iter()
        .filter(|m| hosts.iter().all(|h| h.msrs.contains(m)))
        .copied()
        .collect();
    let vendors: Vec<&str> = hosts.iter().map(|h| h.cpu.vendor.as_str()).collect();
    Ok(Fit {
        fingerprint: HostFingerprint {
            fingerprint_version: FINGERPRINT_VERSION,
            name: format!(
                "fit of {}",
                hosts
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            cpu: HostCpu {
                vendor: if vendors.iter().all(|v| *v == vendors[0]) {
                    vendors[0].to_string()
                } else {
                    String::new()
                },
                ..Default::default()
            },
            highest_level: crate::cpuid::highest_level(&out).map(|t| t.to_string()),
            kvm_cpuid: out.iter().map(to_entry).collect(),
            features,
            msrs,
            kvm_caps,
            tsc_khz: 0,
            tsc_scaling: hosts.iter().all(|h| h.tsc_scaling),
            kernel: String::new(),
            vmboot_version: env!("CARGO_PKG_VERSION").to_string(),
            vmstate_version: hosts.iter().map(|h| h.vmstate_version).min().unwrap_or(0),
        },
        removed,
    })
}
