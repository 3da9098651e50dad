//! Custom CPU templates from files (`cpu_template = "fleet.json"`): the fingerprint format
//! `vmpack template --fit` writes, or a Firecracker custom CPU template
//! (`cpuid_modifiers`). What each supports is in docs/CPU-TEMPLATES.md.

use crate::cpu_features::{feature_bit, feature_names, has_bit, kvm_cpuid, xsave_size};
use kvm_bindings::kvm_cpuid_entry2;
use serde::Deserialize;
use std::path::Path;
use vmpack_formats::host::{HostFingerprint, MAX_CPUID_ENTRIES, MAX_FINGERPRINT_LEN};

/// A loaded custom template.
pub enum Custom {
    /// The guest gets at most this CPU: feature registers intersected with KVM's.
    Fit(Vec<kvm_cpuid_entry2>),
    /// Firecracker's bitmaps: per (leaf, subleaf, register) bits forced to 1 or 0.
    Firecracker(Vec<Modifier>),
}

pub struct Modifier {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: usize,
    pub set: u32,
    pub clear: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FcTemplate {
    #[serde(default)]
    cpuid_modifiers: Vec<FcCpuid>,
    #[serde(default)]
    msr_modifiers: Vec<serde_json::Value>,
    #[serde(default)]
    kvm_capabilities: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FcCpuid {
    leaf: serde_json::Value,
    subleaf: serde_json::Value,
    #[serde(default)]
    #[allow(dead_code)]
    flags: serde_json::Value,
    modifiers: Vec<FcModifier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FcModifier {
    register: String,
    bitmap: String,
}

fn number(v: &serde_json::Value, what: &str) -> Result<u32, String> {
    match v {
        serde_json::Value::Number(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("{what}: {n} is not a 32-bit number")),
        serde_json::Value::String(s) => {
            let t = s.trim();
            let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(h) => u32::from_str_radix(h, 16),
                None => t.parse(),
            };
            r.map_err(|_| format!("{what}: '{s}' is not a number"))
        }
        _ => Err(format!("{what}: expected a number or a string")),
    }
}

/// Parses "0b" + 32 characters of `0`, `1` or `x` (most significant bit first; `_` allowed
/// as a separator) into (bits to set, bits to clear).
fn bitmap(s: &str, what: &str) -> Result<(u32, u32), String> {
    let body: Vec<char> = s
        .strip_prefix("0b")
        .ok_or_else(|| format!("{what}: bitmap '{s}' does not start with 0b"))?
        .chars()
        .filter(|c| *c != '_')
        .collect();
    if body.len() != 32 {
        return Err(format!(
            "{what}: bitmap '{s}' has {} bits, not 32",
            body.len()
        ));
    }
    let (mut set, mut clear) = (0u32, 0u32);
    for (i, c) in body.iter().enumerate() {
        let bit = 1u32 << (31 - i);
        match c {
            '1' => set |= bit,
            '0' => clear |= bit,
            'x' | 'X' => {}
            _ => return Err(format!("{what}: bitmap '{s}': '{c}' is not 0, 1 or x")),
        }
    }
    Ok((set, clear))
}

/// Reads a template file (at most 1 MiB).
pub fn load(path: &Path) -> Result<Custom, String> {
    let label = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| format!("cpu_template {label}: {e}"))?;
    if meta.len() > MAX_FINGERPRINT_LEN {
        return Err(format!(
            "cpu_template {label}: {} bytes, more than a template may have ({MAX_FINGERPRINT_LEN})",
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cpu_template {label}: {e}"))?;
    parse(&bytes, &label)
}

pub fn parse(bytes: &[u8], label: &str) -> Result<Custom, String> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| format!("cpu_template {label}: not JSON: {e}"))?;
    if v.get("fingerprint_version").is_some() {
        let f = HostFingerprint::parse(bytes, label)?;
        return Ok(Custom::Fit(kvm_cpuid(&f)));
    }
    let fc: FcTemplate = serde_json::from_value(v).map_err(|e| {
        format!("cpu_template {label}: neither a `vmpack template --fit` file nor a Firecracker CPU template: {e}")
    })?;
    if !fc.msr_modifiers.is_empty() {
        return Err(format!(
            "cpu_template {label}: msr_modifiers are not supported (vmboot does not set MSR values from a template); remove them"
        ));
    }
    if !fc.kvm_capabilities.is_empty() {
        return Err(format!(
            "cpu_template {label}: kvm_capabilities are not supported; remove them"
        ));
    }
    if fc.cpuid_modifiers.len() > MAX_CPUID_ENTRIES {
        return Err(format!(
            "cpu_template {label}: {} cpuid_modifiers (at most {MAX_CPUID_ENTRIES})",
            fc.cpuid_modifiers.len()
        ));
    }
    let mut mods = Vec::new();
    for (i, m) in fc.cpuid_modifiers.iter().enumerate() {
        let what = format!("cpu_template {label}: cpuid_modifiers[{i}]");
        let leaf = number(&m.leaf, &format!("{what}.leaf"))?;
        let subleaf = number(&m.subleaf, &format!("{what}.subleaf"))?;
        for (j, r) in m.modifiers.iter().enumerate() {
            let reg = match r.register.to_ascii_lowercase().as_str() {
                "eax" => 0,
                "ebx" => 1,
                "ecx" => 2,
                "edx" => 3,
                other => return Err(format!("{what}.modifiers[{j}]: register '{other}'")),
            };
            let (set, clear) = bitmap(&r.bitmap, &format!("{what}.modifiers[{j}]"))?;
            mods.push(Modifier {
                leaf,
                subleaf,
                reg,
                set,
                clear,
            });
        }
    }
    Ok(Custom::Firecracker(mods))
}

fn regs(e: &mut kvm_cpuid_entry2) -> [&mut u32; 4] {
    [&mut e.eax, &mut e.ebx, &mut e.ecx, &mut e.edx]
}

/// Registers of a leaf that are feature bitmaps, as in `vmpack template --fit`.
fn is_bitmap(leaf: u32, subleaf: u32, reg: usize) -> bool {
    let mask: u8 = match (leaf, subleaf) {
        (1, _) | (0x8000_0001, _) => 0b1100,
        (6, _) => 0b1101,
        (7, 0) => 0b1110,
        (7, _) => 0b1111,
        (0xd, 0) => 0b1001,
        (0xd, 1) => 0b0001,
        (0x8000_0007, _) => 0b1000,
        (0x8000_0008, _) => 0b0010,
        _ => 0,
    };
    mask & (1 << reg) != 0
}

impl Custom {
    /// Applies the template to KVM's supported entries; refuses, naming them, features the
    /// template asks for that KVM lacks.
    pub fn apply(&self, entries: &mut Vec<kvm_cpuid_entry2>, label: &str) -> Result<(), String> {
        let host = entries.clone();
        match self {
            Custom::Fit(t) => {
                let missing: Vec<&str> = feature_names()
                    .filter(|n| !matches!(*n, "hypervisor" | "osxsave"))
                    .filter(|n| {
                        let b = feature_bit(n).expect("from the table");
                        has_bit(t, &b) && !has_bit(&host, &b)
                    })
                    .collect();
                if !missing.is_empty() {
                    return Err(format!(
                        "cpu_template {label} needs CPU features this host's KVM does not offer: {}",
                        missing.join(", ")
                    ));
                }
                entries.retain(|e| {
                    (0x4000_0000..0x5000_0000).contains(&e.function)
                        || t.iter()
                            .any(|x| x.function == e.function && x.index == e.index)
                });
                for e in entries.iter_mut() {
                    let Some(x) = t
                        .iter()
                        .find(|x| x.function == e.function && x.index == e.index)
                    else {
                        continue;
                    };
                    if matches!(e.function, 0 | 0x8000_0000) {
                        e.eax = e.eax.min(x.eax);
                        continue;
                    }
                    let mut x = *x;
                    let tr = regs(&mut x).map(|r| *r);
                    let (f, i) = (e.function, e.index);
                    for (n, r) in regs(e).into_iter().enumerate() {
                        if is_bitmap(f, i, n) {
                            *r &= tr[n];
                        }
                    }
                }
            }
            Custom::Firecracker(mods) => {
                let mut missing = Vec::new();
                for m in mods {
                    for n in feature_names() {
                        let b = feature_bit(n).expect("from the table");
                        if b.leaf == m.leaf
                            && b.subleaf == m.subleaf
                            && b.reg as usize == m.reg
                            && m.set & (1 << b.bit) != 0
                            && !has_bit(&host, &b)
                            && !matches!(n, "hypervisor" | "osxsave")
                        {
                            missing.push(n);
                        }
                    }
                    for e in entries
                        .iter_mut()
                        .filter(|e| e.function == m.leaf && e.index == m.subleaf)
                    {
                        let r = regs(e).into_iter().nth(m.reg).expect("4 registers");
                        *r = (*r | m.set) & !m.clear;
                    }
                }
                if !missing.is_empty() {
                    return Err(format!(
                        "cpu_template {label} sets CPU features this host's KVM does not offer: {}",
                        missing.join(", ")
                    ));
                }
            }
        }
        // XSAVE: only the components the remaining features use, sized from the host.
        let has = |n: &str| has_bit(entries, &feature_bit(n).expect("in the table"));
        let mut xcr0 = entries
            .iter()
            .find(|e| e.function == 0xd && e.index == 0)
            .map_or(3, |d| u64::from(d.eax) | (u64::from(d.edx) << 32));
        if !has("xsave") {
            xcr0 &= 3;
        }
        if !has("avx") {
            xcr0 &= !0x4;
        }
        if !has("avx512f") {
            xcr0 &= !0xe0;
        }
        let size = xsave_size(entries, xcr0);
        entries.retain(|e| {
            !(e.function == 0xd && e.index >= 2 && (e.index >= 64 || xcr0 & (1u64 << e.index) == 0))
        });
        for e in entries
            .iter_mut()
            .filter(|e| e.function == 0xd && e.index == 0)
        {
            e.eax = xcr0 as u32;
            e.edx = (xcr0 >> 32) as u32;
            e.ebx = 576;
            e.ecx = size;
        }
        Ok(())
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
    fn firecracker_bitmaps_set_and_clear_and_refuse_what_kvm_lacks() {
        let t = br#"{"cpuid_modifiers":[{"leaf":"0x1","subleaf":"0x0","flags":0,
            "modifiers":[{"register":"ecx","bitmap":"0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"},
                         {"register":"edx","bitmap":"0bxxxxx0xxxxxxxxxxxxxxxxxxxxxxxxxx"}]}],
            "msr_modifiers":[]}"#;
        let c = parse(t, "t.json").unwrap();
        let mut e = vec![entry(1, 0, 0x1 | (1 << 13), (1 << 26) | (1 << 25))];
        c.apply(&mut e, "t.json").unwrap();
        assert_eq!(e[0].ecx, 1 << 13, "sse3 cleared");
        assert_eq!(e[0].edx, (1 << 25), "sse2 (bit 26) cleared");
        let avx = br#"{"cpuid_modifiers":[{"leaf":1,"subleaf":0,
            "modifiers":[{"register":"ecx","bitmap":"0bxxx1xxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}]}"#;
        let err = parse(avx, "a.json")
            .unwrap()
            .apply(&mut e.clone(), "a.json")
            .unwrap_err();
        assert!(err.contains("avx"), "{err}");
        let msr = br#"{"cpuid_modifiers":[],"msr_modifiers":[{"addr":"0x10a","bitmap":"0b0"}]}"#;
        assert!(parse(msr, "m.json").is_err());
    }
}
