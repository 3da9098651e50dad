//! `vmpack inspect`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use vmpack_formats::pack::{kind, PackReader, SectionInfo};
use vmpack_formats::vm::{Manifest, VmPack};

use crate::util::human_bytes;

#[derive(Args)]
pub struct InspectArgs {
    /// The pack to describe.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print nothing; the exit status alone says whether FILE is a readable pack.
    #[arg(long, short, conflicts_with = "json")]
    pub quiet: bool,
    /// For a diff pack: its parent pack, instead of the file its manifest names in its
    /// folder.
    #[arg(long, value_name = "FILE")]
    pub parent: Option<PathBuf>,
}

/// A diff pack's chain, base first, as `{file, root_digest, diff}`; or why it cannot be
/// followed (a missing or different parent). `None` for a full pack.
pub fn chain_json(
    file: &std::path::Path,
    parent: Option<&std::path::Path>,
) -> Option<Result<Vec<serde_json::Value>, String>> {
    let vm = VmPack::open(file).ok()?;
    vm.manifest().parent.as_ref()?;
    Some(
        vmpack_formats::diff::open_chain(file, parent)
            .map(|c| {
                c.packs
                    .iter()
                    .map(|p| {
                        json!({
                            "file": p.path().display().to_string(),
                            "root_digest": hex::encode(p.reader().root_digest()),
                            "diff": p.manifest().parent.is_some(),
                        })
                    })
                    .collect()
            })
            .map_err(|e| e.to_string()),
    )
}

fn kind_name(k: u16) -> String {
    match k {
        kind::MANIFEST => "manifest".into(),
        kind::FILE => "file".into(),
        kind::DISK => "disk".into(),
        kind::MEMORY => "memory".into(),
        kind::VMSTATE => "vmstate".into(),
        kind::MEMORY_DIFF => "memory-diff".into(),
        kind::DISK_DIFF => "disk-diff".into(),
        other => format!("{other:#06x}"),
    }
}

/// For a diff section (memory or disk): `(chunks stored, chunks of the region or disk)`,
/// from its `present` bitmap; None for any other section or an unreadable bitmap.
fn diff_chunks(s: &SectionInfo, m: Option<&Manifest>) -> Option<(u64, u64)> {
    use vmpack_formats::diff::ChunkMap;
    let m = m?;
    let map = match s.kind {
        kind::DISK_DIFF => {
            let d = m.disks.iter().find(|d| d.section == s.name)?;
            ChunkMap::from_disk_section(s, d.virtual_size).ok()?
        }
        kind::MEMORY_DIFF => {
            let r = m.memory.iter().find(|r| r.section == s.name)?;
            ChunkMap::from_section(s, r.size).ok()?
        }
        _ => return None,
    };
    Some((map.present().len() as u64, map.chunks()))
}

fn ratio(s: &SectionInfo) -> f64 {
    if s.stored_bytes == 0 {
        // All-zero or empty sections store nothing; report them as infinitely compressible
        // with a finite stand-in so JSON stays numeric.
        if s.size == 0 {
            1.0
        } else {
            f64::MAX
        }
    } else {
        s.size as f64 / s.stored_bytes as f64
    }
}

fn fmt_ratio(s: &SectionInfo) -> String {
    let r = ratio(s);
    if r == f64::MAX {
        "all zero".into()
    } else {
        format!("{r:.2}x")
    }
}

pub fn run(a: InspectArgs) -> Result<()> {
    // The container is described even when its manifest is broken; the manifest problem is
    // then reported as the command's error.
    let reader = PackReader::open(&a.file)?;
    let vm = VmPack::open(&a.file);
    let (manifest, manifest_err) = match &vm {
        Ok(v) => (Some(v.manifest().clone()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let config_err = vm
        .as_ref()
        .ok()
        .and_then(|v| v.config().err())
        .map(|e| e.to_string());
    let restore = manifest
        .as_ref()
        .and_then(|m| m.memory_restore_path(&reader));
    // Whether and how a restore here would serve memory on first touch (FORMAT.md §12.4).
    let lazy = manifest
        .as_ref()
        .filter(|m| m.vmstate.is_some() && !m.memory.is_empty())
        .map(|_| vmboot::restore_plan::plan(&a.file, a.parent.as_deref()));
    // The host that saved the VM, recorded in the vm state (docs/FORMAT.md §12.2).
    let saved_on = match manifest.as_ref().and_then(|m| m.vmstate.as_ref()) {
        Some(_) => vmboot::compat::SavedPack::open(&a.file)
            .ok()
            .and_then(|p| p.saved_on().map(saved_on_json)),
        None => None,
    };
    if a.quiet {
    } else if a.json {
        print_json(
            &a,
            &reader,
            manifest.as_ref(),
            &manifest_err,
            restore,
            &saved_on,
            &lazy,
        )?;
    } else {
        use std::fmt::Write as _;
        let mut text = text_report(&a, &reader, manifest.as_ref(), restore);
        if let Some(l) = &lazy {
            let _ = writeln!(text, "{}", lazy_line(l));
        }
        if let Some(h) = &saved_on {
            let _ = writeln!(
                text,
                "saved on:     {}: {} family {} model {}, KVM features up to {}, TSC {} kHz (scaling {}), kernel {}, vmboot {}",
                h["name"].as_str().unwrap_or(""),
                h["cpu"]["vendor"].as_str().unwrap_or(""),
                h["cpu"]["family"],
                h["cpu"]["model"],
                h["highest_level"].as_str().unwrap_or("none"),
                h["tsc_khz"],
                if h["tsc_scaling"] == json!(true) { "available" } else { "not available" },
                h["kernel"].as_str().unwrap_or(""),
                h["vmboot_version"].as_str().unwrap_or(""),
            );
        }
        crate::out!("{}", vmpack_formats::vm::printable_lines(&text));
    }
    if let Some(e) = manifest_err.or(config_err) {
        anyhow::bail!("{e}");
    }
    Ok(())
}

/// serde_json escapes U+0000-U+001F; DEL and the C1 controls (U+0080-U+009F, e.g. CSI) are
/// escaped here too. They can only occur inside strings, where `\uXXXX` is valid JSON.
fn escape_json(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() && c != '\n' {
                format!("\\u{:04x}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
}

macro_rules! textln {
    ($o:ident, $($t:tt)*) => {
        let _ = writeln!($o, $($t)*);
    };
}

/// The saving host's fingerprint without its raw CPUID and MSR list (`vmpack compat` reads
/// those).
fn saved_on_json(f: &vmpack_formats::host::HostFingerprint) -> serde_json::Value {
    json!({
        "name": f.name,
        "cpu": f.cpu,
        "highest_level": f.highest_level,
        "features": f.features,
        "kvm_caps": f.kvm_caps,
        "msrs": f.msrs.len(),
        "tsc_khz": f.tsc_khz,
        "tsc_scaling": f.tsc_scaling,
        "kernel": f.kernel,
        "vmboot_version": f.vmboot_version,
        "vmstate_version": f.vmstate_version,
    })
}

fn print_json(
    a: &InspectArgs,
    r: &PackReader,
    m: Option<&Manifest>,
    manifest_err: &Option<String>,
    restore: Option<&str>,
    saved_on: &Option<serde_json::Value>,
    lazy: &Option<vmboot::restore_plan::LazyPlan>,
) -> Result<()> {
    let (major, minor) = r.version();
    let sections: Vec<_> = r
        .sections()
        .iter()
        .map(|s| {
            let mut v = serde_json::to_value(s).unwrap_or_default();
            v["kind_name"] = json!(kind_name(s.kind));
            if let Some((stored, of)) = diff_chunks(s, m) {
                v["diff_chunks"] = json!({"stored": stored, "of": of});
            }
            v["ratio"] = if ratio(s) == f64::MAX {
                serde_json::Value::Null
            } else {
                json!(ratio(s))
            };
            v
        })
        .collect();
    let out = json!({
        "file": a.file.display().to_string(),
        "file_size": r.file_size(),
        "version": format!("{major}.{minor}"),
        "aligned": r.aligned(),
        "root_digest": hex::encode(r.root_digest()),
        "manifest": m,
        "manifest_error": manifest_err,
        "sections": sections,
        "memory_restore": restore,
        "lazy": lazy,
        "signatures": signatures(r),
        "saved_on": saved_on,
        "chain": match chain_json(&a.file, a.parent.as_deref()) {
            None => serde_json::Value::Null,
            Some(Ok(c)) => json!(c),
            Some(Err(e)) => json!({"error": e}),
        },
    });
    crate::outln!("{}", escape_json(&serde_json::to_string_pretty(&out)?));
    Ok(())
}

/// The `lazy restore:` line of the text report.
fn lazy_line(l: &vmboot::restore_plan::LazyPlan) -> String {
    let auto = match l.auto {
        "layered" => "eager, layered over the parent packs (lazy only with --memory lazy)",
        other => other,
    };
    if !l.possible {
        return format!(
            "lazy restore: not possible here: {}; --memory auto takes: {auto}",
            l.why_not.as_deref().unwrap_or("")
        );
    }
    let order = match l.touch_order {
        Some(n) => format!("touch order recorded on this host ({n} chunks prefetched first)"),
        None => "no touch order recorded on this host yet".into(),
    };
    format!(
        "lazy restore: possible ({} chunks, each verified on first touch); {order}; --memory auto takes: {auto}",
        l.chunks
    )
}

/// The pack's signatures as `{key, signature}` (armored text); not checked against any
/// allowed signers here.
fn signatures(r: &PackReader) -> Vec<serde_json::Value> {
    let root = r.root_digest();
    r.signatures()
        .unwrap_or_default()
        .iter()
        .map(|s| {
            let key = vmpack_registry::signature::check_own(s, &root).map_err(|e| e.to_string());
            json!({
                "key": key.as_ref().ok(),
                "problem": key.as_ref().err(),
                "signature": String::from_utf8_lossy(s),
            })
        })
        .collect()
}

fn text_report(
    a: &InspectArgs,
    r: &PackReader,
    m: Option<&Manifest>,
    restore: Option<&str>,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let (major, minor) = r.version();
    textln!(
        out,
        "file:         {} ({})",
        a.file.display(),
        human_bytes(r.file_size())
    );
    textln!(
        out,
        "format:       vmpack {major}.{minor}{}",
        if r.aligned() { ", aligned" } else { "" }
    );
    textln!(out, "root digest:  {}", hex::encode(r.root_digest()));
    let sigs = signatures(r);
    if !sigs.is_empty() {
        let keys: Vec<String> = sigs
            .iter()
            .map(|s| s["key"].as_str().unwrap_or("unreadable").to_string())
            .collect();
        textln!(
            out,
            "signatures:   {} (unchecked; `vmpack verify --allowed-signers FILE` checks them)",
            keys.join(", ")
        );
    }
    if let Some(p) = m.and_then(|m| m.parent.as_ref()) {
        textln!(
            out,
            "diff of:      {} (root digest {}): memory and disks hold only what changed since",
            p.file,
            p.root_digest
        );
        match chain_json(&a.file, a.parent.as_deref()) {
            Some(Ok(c)) => {
                let files: Vec<String> = c
                    .iter()
                    .map(|p| p["file"].as_str().unwrap_or("").to_string())
                    .collect();
                textln!(
                    out,
                    "chain:        {} ({} packs, base first; parents' digests match)",
                    files.join(" <- "),
                    c.len()
                );
            }
            Some(Err(e)) => {
                textln!(out, "chain:        broken: {e}");
            }
            None => {}
        }
    }
    if let Some(m) = m {
        textln!(out, "written by:   {} {}", m.tool, m.tool_version);
        textln!(out, "created:      {}", m.created);
        textln!(
            out,
            "host cpu:     {} family {} model {} stepping {}{}",
            m.host.vendor,
            m.host.family,
            m.host.model,
            m.host.stepping,
            if m.host.model_name.is_empty() {
                String::new()
            } else {
                format!(" ({})", m.host.model_name)
            }
        );
        if !m.files.is_empty() {
            textln!(out, "boot files:");
            for f in &m.files {
                let place = match f.in_memory {
                    Some(gpa) => format!("in guest RAM at {gpa:#x}, [{}]", f.section),
                    None => format!("[{}]", f.section),
                };
                textln!(
                    out,
                    "  {:<7} {:<24} {:>10}  {place}",
                    f.role,
                    f.name,
                    human_bytes(f.size),
                );
            }
        }
        if !m.disks.is_empty() {
            textln!(out, "disks:");
            for d in &m.disks {
                let changed = r
                    .section(&d.section)
                    .and_then(|s| diff_chunks(s, Some(m)))
                    .map(|(stored, of)| {
                        format!(", changed since the parent: {stored} of {of} chunks")
                    })
                    .unwrap_or_default();
                textln!(
                    out,
                    "  {:<7} {:<24} {:>10}  {} {} [{}]{changed}",
                    d.index,
                    d.name,
                    human_bytes(d.virtual_size),
                    d.format,
                    if d.read_only { "ro" } else { "rw" },
                    d.section
                );
            }
        }
        if m.memory.is_empty() {
            textln!(out, "memory:       none (not a saved VM)");
        } else {
            let total: u64 = m.memory.iter().map(|x| x.size).sum();
            textln!(
                out,
                "memory:       {} in {} region(s); restore would {}",
                human_bytes(total),
                m.memory.len(),
                match restore {
                    Some("mmap") => "map it from the file (aligned, uncompressed)",
                    _ => "decompress it into fresh memory",
                }
            );
            for x in &m.memory {
                textln!(
                    out,
                    "  gpa {:#x} {} [{}]",
                    x.gpa,
                    human_bytes(x.size),
                    x.section
                );
            }
        }
        textln!(
            out,
            "vmstate:      {}",
            m.vmstate.as_deref().unwrap_or("none")
        );
    }
    textln!(out, "sections:");
    textln!(
        out,
        "  {:>3} {:<8} {:<14} {:>12} {:>12} {:>9} {:>8} {:>8}",
        "id",
        "kind",
        "name",
        "size",
        "stored",
        "ratio",
        "chunks",
        "zero"
    );
    for s in r.sections() {
        textln!(
            out,
            "  {:>3} {:<8} {:<14} {:>12} {:>12} {:>9} {:>8} {:>8}",
            s.id,
            kind_name(s.kind),
            s.name,
            human_bytes(s.size),
            human_bytes(s.stored_bytes),
            fmt_ratio(s),
            s.chunks,
            s.zero_chunks
        );
    }
    if let Some(m) = m {
        textln!(out, "config:");
        for line in m.config.lines() {
            textln!(out, "  {line}");
        }
    }
    out
}
