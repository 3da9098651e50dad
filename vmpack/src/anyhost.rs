//! Moving VMs between hosts: `host-info` (this host's fingerprint), `compat` (will a saved
//! pack resume on these hosts?) and `template` (the largest CPU a fleet shares). The rules
//! are vmboot's (`vmboot::compat`, `vmboot::cpu_fit`); docs/CPU-TEMPLATES.md describes them.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use vmboot::compat::{SavedPack, Verdict};
use vmpack_formats::host::{HostFingerprint, MAX_FINGERPRINT_LEN};

use crate::output::AtomicFile;
use crate::util::Usage;

/// `vmpack compat`'s exit status for "ok with warnings".
pub const EXIT_WARNINGS: u8 = 3;
/// `vmpack compat`'s exit status for "refused".
pub const EXIT_REFUSED: u8 = 4;

#[derive(Args)]
pub struct HostInfoArgs {
    /// Print the fingerprint as JSON (the format `compat --host` and `template --fit` read).
    #[arg(long)]
    json: bool,
    /// Write the JSON fingerprint to FILE (atomically); stdout then only gets a summary.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Name recorded in the fingerprint (default: the hostname).
    #[arg(long)]
    name: Option<String>,
    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,
}

pub fn host_info(a: HostInfoArgs) -> Result<()> {
    let mut f = vmboot::host_info::fingerprint()
        .context("cannot fingerprint this host")?
        .clone();
    if let Some(n) = a.name {
        f.name = n;
    }
    let json = serde_json::to_string_pretty(&f)? + "\n";
    if let Some(out) = &a.output {
        write_atomic(out, json.as_bytes())?;
    }
    if a.quiet {
        return Ok(());
    }
    if a.json && a.output.is_none() {
        crate::out!("{json}");
        return Ok(());
    }
    let caps_missing = vmboot::kvm_caps::CAPS
        .iter()
        .filter(|(_, n, _)| !f.kvm_caps.iter().any(|c| c == n))
        .map(|(_, n, _)| *n)
        .collect::<Vec<_>>();
    crate::outln!("host:          {}", f.name);
    crate::outln!(
        "cpu:           {} family {} model {} stepping {}{}",
        f.cpu.vendor,
        f.cpu.family,
        f.cpu.model,
        f.cpu.stepping,
        if f.cpu.model_name.is_empty() {
            String::new()
        } else {
            format!(" ({})", f.cpu.model_name)
        }
    );
    crate::outln!(
        "highest level: {}",
        f.highest_level
            .as_deref()
            .unwrap_or("none (not even x86-64-v1)")
    );
    crate::outln!("kvm features:  {}", f.features.join(" "));
    crate::outln!("kvm cpuid:     {} entries", f.kvm_cpuid.len());
    crate::outln!("msrs:          {} saveable", f.msrs.len());
    crate::outln!(
        "kvm caps:      {} of {} vmboot uses{}",
        f.kvm_caps.len(),
        vmboot::kvm_caps::CAPS.len(),
        if caps_missing.is_empty() {
            String::new()
        } else {
            format!(" (missing: {})", caps_missing.join(", "))
        }
    );
    crate::outln!(
        "tsc:           {} kHz, scaling {}",
        f.tsc_khz,
        if f.tsc_scaling {
            "available"
        } else {
            "not available"
        }
    );
    crate::outln!("kernel:        {}", f.kernel);
    crate::outln!(
        "vmboot:        {} (vm state version {})",
        f.vmboot_version,
        f.vmstate_version
    );
    if let Some(out) = &a.output {
        crate::outln!("wrote {}", out.display());
    }
    Ok(())
}

fn write_atomic(out: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(out)?;
    f.file()
        .write_all(bytes)
        .with_context(|| format!("writing {}", out.display()))?;
    f.commit()
}

/// Reads a fingerprint file made by `vmpack host-info -o`.
pub fn read_fingerprint(path: &Path) -> Result<HostFingerprint> {
    let label = path.display().to_string();
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {label}"))?;
    if meta.len() > MAX_FINGERPRINT_LEN {
        anyhow::bail!(
            "{label}: {} bytes, more than a fingerprint may have ({MAX_FINGERPRINT_LEN})",
            meta.len()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {label}"))?;
    HostFingerprint::parse(&bytes, &label).map_err(anyhow::Error::msg)
}

#[derive(Args)]
pub struct CompatArgs {
    /// A pack made by `vmpack save`.
    #[arg(value_name = "PACK")]
    pack: PathBuf,
    /// Judge for the host this fingerprint describes (`vmpack host-info -o FILE`) instead of
    /// this host; repeat for several hosts.
    #[arg(long = "host", value_name = "FILE")]
    hosts: Vec<PathBuf>,
    /// Print the verdicts as JSON.
    #[arg(long)]
    json: bool,
    /// Print nothing; the exit status tells the verdict.
    #[arg(short, long)]
    quiet: bool,
}

/// Returns the exit status: 0 ok, [`EXIT_WARNINGS`], [`EXIT_REFUSED`] (the worst over all
/// hosts).
pub fn compat(a: CompatArgs) -> Result<u8> {
    if a.json && a.quiet {
        return Err(Usage("--json and --quiet do not go together".into()).into());
    }
    let saved = SavedPack::open(&a.pack)?;
    let mut targets: Vec<(Option<&Path>, HostFingerprint)> = Vec::new();
    if a.hosts.is_empty() {
        let f = vmboot::host_info::fingerprint().with_context(|| {
            "cannot fingerprint this host; give fingerprints of other hosts with --host FILE"
        })?;
        targets.push((None, f.clone()));
    }
    for h in &a.hosts {
        targets.push((Some(h), read_fingerprint(h)?));
    }
    let mut worst = Verdict::Ok;
    let mut results = Vec::new();
    for (file, host) in &targets {
        let j = saved.judge(host);
        worst = worst.max(j.verdict);
        results.push(serde_json::json!({
            "host": host.name,
            "file": file.map(|f| f.display().to_string()),
            "verdict": j.verdict,
            "reasons": j.reasons,
        }));
        if !a.quiet && !a.json {
            let who = match file {
                Some(f) => format!("{} ({})", f.display(), host.name),
                None => format!("this host ({})", host.name),
            };
            crate::outln!("{}: {who}: {}", a.pack.display(), j.verdict);
            for r in &j.reasons {
                let sev = if r.severity == Verdict::Refused {
                    "refused"
                } else {
                    "warning"
                };
                crate::outln!("  {sev}: {}", r.message);
            }
        }
    }
    if a.json {
        let saved_on = saved.saved_on().map(|f| {
            serde_json::json!({
                "name": f.name,
                "cpu": f.cpu,
                "kernel": f.kernel,
                "vmboot_version": f.vmboot_version,
                "tsc_khz": f.tsc_khz,
            })
        });
        let v = serde_json::json!({
            "pack": a.pack.display().to_string(),
            "cpu_template": saved.template.to_string(),
            "saved_on": saved_on,
            "verdict": worst,
            "hosts": results,
        });
        crate::outln!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(match worst {
        Verdict::Ok => 0,
        Verdict::OkWithWarnings => EXIT_WARNINGS,
        Verdict::Refused => EXIT_REFUSED,
    })
}

#[derive(Args)]
pub struct TemplateArgs {
    /// Fingerprints (`vmpack host-info -o FILE`) of every host of the fleet.
    #[arg(value_name = "HOST.json", required = true)]
    hosts: Vec<PathBuf>,
    /// Write the largest CPU every host can run as a fingerprint-format template to FILE.
    #[arg(long, requires = "output", conflicts_with = "level")]
    fit: bool,
    /// Print the highest named level (x86-64-v1 .. v4) every host supports.
    #[arg(long)]
    level: bool,
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,
}

pub fn template(a: TemplateArgs) -> Result<u8> {
    if a.fit == a.level {
        return Err(Usage("give exactly one of --fit or --level".into()).into());
    }
    let hosts = a
        .hosts
        .iter()
        .map(|h| read_fingerprint(h))
        .collect::<Result<Vec<_>>>()?;
    if a.level {
        let level = vmboot::cpu_fit::common_level(&hosts);
        if a.json {
            let per_host: Vec<_> = hosts
                .iter()
                .zip(&a.hosts)
                .map(|(h, f)| {
                    serde_json::json!({
                        "file": f.display().to_string(),
                        "host": h.name,
                        "highest_level": vmboot::cpuid::highest_level(&vmboot::cpu_features::kvm_cpuid(h)).map(|t| t.to_string()),
                    })
                })
                .collect();
            crate::outln!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "level": level.as_ref().map(|t| t.to_string()),
                    "hosts": per_host,
                }))?
            );
        } else if !a.quiet {
            match &level {
                Some(t) => crate::outln!("{t}"),
                None => crate::outln!("none"),
            }
        }
        return Ok(if level.is_some() { 0 } else { 1 });
    }
    let out = a
        .output
        .as_deref()
        .expect("clap requires --output with --fit");
    let fit = vmboot::cpu_fit::fit(&hosts).map_err(anyhow::Error::msg)?;
    write_atomic(
        out,
        (serde_json::to_string_pretty(&fit.fingerprint)? + "\n").as_bytes(),
    )?;
    if a.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "output": out.display().to_string(),
                "hosts": a.hosts.iter().map(|h| h.display().to_string()).collect::<Vec<_>>(),
                "features": fit.fingerprint.features,
                "highest_level": fit.fingerprint.highest_level,
                "removed": fit.removed,
            }))?
        );
    } else if !a.quiet {
        crate::outln!(
            "wrote {}: {} features every host has (highest named level: {})",
            out.display(),
            fit.fingerprint.features.len(),
            fit.fingerprint.highest_level.as_deref().unwrap_or("none")
        );
        if !fit.removed.is_empty() {
            crate::outln!(
                "removed with a missing feature they depend on: {}",
                fit.removed.join(", ")
            );
        }
    }
    Ok(0)
}
