//! `vmpack pack` and `vmpack import`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use vmpack_formats::config::{
    CpuTemplate, DiskConfig, FlatBoot, KernelBoot, SerialConfig, StartMode, VmConfig,
};
use vmpack_formats::disk::detect_format;
use vmpack_formats::pack::{Compression, PackSummary, WriteOptions};
use vmpack_formats::vm::{PreparedPack, VmPackPlan};

use crate::output::AtomicFile;
use crate::progress::Bar;
use crate::util::{human_bytes, stdout_is_terminal};

#[derive(Args, Clone)]
pub struct WriteArgs {
    /// Output file; `-` writes the pack to stdout.
    #[arg(short, long, value_name = "OUT.vmpack")]
    pub output: PathBuf,
    /// Chunk compression. Default zstd, unlike `save`: a VM at rest is mostly moved and
    /// stored; `--compress none --aligned` makes a pack whose memory maps directly.
    #[arg(long, default_value = "zstd", value_name = "none|deflate|zstd")]
    pub compress: Compression,
    /// Compression level (deflate 0-9, zstd -7..=22 except 0; none takes none); default:
    /// the fastest useful one.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub level: Option<i32>,
    /// Keep uncompressed chunks 4 KiB-aligned so memory can be mapped straight from the file.
    #[arg(long)]
    pub aligned: bool,
    /// Print nothing on success.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct PackArgs {
    /// The VM config (TOML, see docs/CONFIG.md).
    #[arg(value_name = "CONFIG.toml")]
    pub config: PathBuf,
    #[command(flatten)]
    pub write: WriteArgs,
}

/// Without `--kernel`, a pack still needs a boot source to hold a valid config, so a flat
/// image (`--image` with `--load-address`, `--entry`, `--mode`) is the alternative.
#[derive(Args)]
pub struct ImportArgs {
    /// What to import: a disk image (raw or qcow2), a libvirt domain XML, a Vagrant .box,
    /// an .ova or .ovf, or a Firecracker config JSON (recognized by content).
    #[arg(value_name = "SOURCE")]
    pub source: PathBuf,
    /// Read SOURCE as this kind instead of recognizing it.
    #[arg(long, value_name = "auto|libvirt|vagrant|ova|ovf|firecracker|disk")]
    pub from: Option<String>,
    /// Guest memory in MiB (required for a disk image; overrides the source's otherwise).
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,
    /// Number of vCPUs (default: the source's, or 1).
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// VM name (default: the source's, or the file's stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Linux kernel (bzImage or ELF vmlinux) to boot the disk with.
    #[arg(long, value_name = "PATH", conflicts_with = "image")]
    pub kernel: Option<PathBuf>,
    /// Initrd for --kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "TEXT")]
    pub cmdline: Option<String>,
    /// Flat binary image to boot instead of a kernel.
    #[arg(long, value_name = "PATH", requires_all = ["load_address", "entry", "mode"])]
    pub image: Option<PathBuf>,
    /// Where the flat image is loaded (e.g. 0x1000).
    #[arg(long, value_name = "ADDR", value_parser = parse_u64, requires = "image")]
    pub load_address: Option<u64>,
    /// Flat image entry point.
    #[arg(long, value_name = "ADDR", value_parser = parse_u64, requires = "image")]
    pub entry: Option<u64>,
    /// Flat image start mode: real (16-bit) or long (64-bit).
    #[arg(long, value_name = "real|long", value_parser = parse_mode, requires = "image")]
    pub mode: Option<StartMode>,
    /// Attach the disks read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Refuse the import when anything of the source would be dropped (devices, settings
    /// the pack cannot carry) instead of warning.
    #[arg(long)]
    pub strict: bool,
    /// Print a JSON summary (what was imported, what was dropped) on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub write: WriteArgs,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("'{s}': {e}"))
}

fn parse_mode(s: &str) -> Result<StartMode, String> {
    match s {
        "real" => Ok(StartMode::Real),
        "long" => Ok(StartMode::Long),
        _ => Err(format!("'{s}': expected real or long")),
    }
}

pub fn write_options(a: &WriteArgs) -> Result<WriteOptions> {
    a.compress
        .check_level(a.level)
        .map_err(|e| crate::util::Usage(format!("--{e}")))?;
    Ok(WriteOptions {
        compression: a.compress,
        level: a.level,
        aligned: a.aligned,
        ..WriteOptions::default()
    })
}

pub fn run_pack(a: PackArgs) -> Result<()> {
    let cfg = VmConfig::from_file(&a.config)?;
    write_pack(&cfg, &a.write)
}

/// Writes the pack for `cfg` to the output the arguments name, atomically for files.
pub fn write_pack(cfg: &VmConfig, w: &WriteArgs) -> Result<()> {
    let prepared = PreparedPack::new(cfg, VmPackPlan::default())?;
    write_prepared(cfg, prepared, w)
}

/// Writes a prepared pack (inputs already open) to the output the arguments name.
pub fn write_prepared(cfg: &VmConfig, prepared: PreparedPack<'_>, w: &WriteArgs) -> Result<()> {
    let opts = write_options(w)?;
    let bar = Bar::new(Some(prepared.total_bytes()), "packing", w.quiet);
    let summary = if w.output == Path::new("-") {
        if stdout_is_terminal() {
            bail!("refusing to write a pack to a terminal; redirect stdout or use -o FILE");
        }
        let stdout = std::io::stdout();
        let mut lock = stdout.lock();
        let s = prepared.write(&mut lock, &opts, "<stdout>", &bar)?;
        lock.flush().context("writing to stdout")?;
        s
    } else {
        let mut out = AtomicFile::create(&w.output)?;
        let label = w.output.display().to_string();
        let s = prepared.write(out.file(), &opts, &label, &bar)?;
        out.commit()?;
        s
    };
    bar.finish();
    if !w.quiet {
        report(cfg, &w.output, &summary, prepared.total_bytes());
    }
    Ok(())
}

fn report(cfg: &VmConfig, out: &Path, s: &PackSummary, total: u64) {
    // A ratio only where compression shrank something: for a tiny VM the pack's fixed
    // structure outweighs the data, and "0.10x" read as a failure.
    let ratio = if total > s.bytes_written {
        format!(
            " ({:.2}x smaller)",
            total as f64 / s.bytes_written.max(1) as f64
        )
    } else {
        String::new()
    };
    let line = format!(
        "packed '{}' into {}: {} sections, {} of data in a {} file{ratio}, root digest {}",
        cfg.name,
        if out == Path::new("-") {
            "standard output".to_string()
        } else {
            out.display().to_string()
        },
        s.sections.len(),
        human_bytes(total),
        human_bytes(s.bytes_written),
        hex::encode(s.root_digest),
    );
    // stdout carries the pack itself when streaming.
    if out == Path::new("-") {
        eprintln!("{line}");
    } else {
        crate::outln!("{line}");
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| p.display().to_string())
}

/// Checks a config built from options with the rules of config files; the generated text's
/// line numbers mean nothing to the user, so only the message is kept.
pub fn validate_generated(cfg: &VmConfig) -> Result<()> {
    let text = cfg.to_toml_string();
    if let Err(e) = VmConfig::parse(&text, Path::new("import.toml")) {
        let msg = match e {
            vmpack_formats::config::ConfigError::Invalid { message, .. } => message,
            other => other.to_string(),
        };
        bail!("invalid import options: {msg}");
    }
    Ok(())
}

pub fn run_import(a: ImportArgs) -> Result<()> {
    if a.initrd.is_some() && a.kernel.is_none() && a.from.as_deref() == Some("disk") {
        return Err(crate::util::Usage("--initrd needs --kernel for a disk image".into()).into());
    }
    let opts = crate::interchange::ImportOpts {
        from: a.from.clone(),
        memory: a.memory,
        vcpus: a.vcpus,
        name: a.name.clone(),
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        cmdline: a.cmdline.clone(),
        flat: a.image.as_ref().map(|img| FlatBoot {
            image: img.clone(),
            load_address: a.load_address.unwrap_or_default(),
            entry: a.entry.unwrap_or_default(),
            mode: a.mode.unwrap_or(StartMode::Long),
        }),
        read_only: a.read_only,
        strict: a.strict,
        json: a.json,
    };
    if crate::interchange::import(&a.source, opts, &a.write)? {
        return Ok(());
    }
    if a.json {
        return Err(crate::util::Usage(
            "--json applies to libvirt, Vagrant, OVA/OVF and Firecracker sources".into(),
        )
        .into());
    }
    let Some(memory) = a.memory else {
        return Err(crate::util::Usage(
            "--memory MIB is required when importing a disk image".into(),
        )
        .into());
    };
    if a.kernel.is_none() && (a.initrd.is_some() || a.cmdline.is_some()) {
        return Err(crate::util::Usage(
            "--initrd and --cmdline need --kernel for a disk image".into(),
        )
        .into());
    }
    let disk = absolute(&a.source)?;
    let format = detect_format(&disk)?;
    let name = match &a.name {
        Some(n) => n.clone(),
        None => disk
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "imported".into()),
    };
    let (kernel, flat) = match (&a.kernel, &a.image) {
        (Some(k), None) => (
            Some(KernelBoot {
                path: absolute(k)?,
                initrd: a.initrd.as_deref().map(absolute).transpose()?,
                cmdline: a.cmdline.clone().unwrap_or_default(),
            }),
            None,
        ),
        (None, Some(img)) => (
            None,
            Some(FlatBoot {
                image: absolute(img)?,
                // clap's `requires_all` guarantees these with --image.
                load_address: a.load_address.unwrap_or_default(),
                entry: a.entry.unwrap_or_default(),
                mode: a.mode.unwrap_or(StartMode::Long),
            }),
        ),
        _ => bail!(
            "a pack needs a boot source: pass --kernel PATH (Linux, with optional --initrd and \
             --cmdline) or --image PATH --load-address ADDR --entry ADDR --mode real|long"
        ),
    };
    let cfg = VmConfig {
        name,
        vcpus: a.vcpus.unwrap_or(1),
        memory_mib: memory,
        cpu_template: CpuTemplate::Host,
        rng: false,
        vmgenid: false,
        nets: Vec::new(),
        flat,
        kernel,
        disks: vec![DiskConfig {
            path: disk,
            format,
            read_only: a.read_only,
        }],
        serial: SerialConfig::default(),
        vsock: None,
    };
    validate_generated(&cfg)?;
    write_pack(&cfg, &a.write)
}
