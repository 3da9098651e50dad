//! `vmpack unpack` and `vmpack export`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use vmpack_formats::config::DiskFormat;
use vmpack_formats::vm::{extract_stream, VmPack};

use crate::interchange::ExportFormat;
use crate::output::AtomicDir;
use crate::progress::Bar;

#[derive(Args)]
pub struct UnpackArgs {
    /// The pack; `-` reads it from stdin in one pass.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Folder to create (or an empty one to fill).
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
    /// Print nothing on success.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The pack; `-` reads it from stdin in one pass (raw and qcow2 only).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// raw or qcow2: a folder with vm.toml and every disk in that format. libvirt: a folder
    /// with domain.xml for `virsh define`. vagrant: a .box file. ova: an .ova file.
    /// firecracker: a folder with vm.json for `firecracker --config-file`.
    #[arg(long, value_name = "raw|qcow2|libvirt|vagrant|ova|firecracker")]
    pub format: ExportFormat,
    /// Folder (raw, qcow2, libvirt, firecracker) or file (vagrant, ova) to create.
    #[arg(short, long, value_name = "DIR|FILE")]
    pub output: PathBuf,
    /// libvirt only: format of the disk images (default qcow2).
    #[arg(long, value_name = "raw|qcow2")]
    pub disk_format: Option<DiskFormat>,
    /// Print a JSON summary (files written, notes, the command to run next) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Print nothing on success.
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run_unpack(a: UnpackArgs) -> Result<()> {
    extract(&a.file, &a.output, None, a.quiet)
}

pub fn run_export(a: ExportArgs) -> Result<()> {
    match a.format {
        ExportFormat::Disk(f) => {
            if a.disk_format.is_some() || a.json {
                return Err(crate::util::Usage(
                    "--disk-format and --json apply to the libvirt, vagrant, ova and firecracker formats".into(),
                )
                .into());
            }
            extract(&a.file, &a.output, Some(f), a.quiet)
        }
        ExportFormat::Eco(eco) => crate::interchange::export(
            &a.file,
            eco,
            &a.output,
            &crate::interchange::ExportOpts {
                disk_format: a.disk_format,
                quiet: a.quiet,
                json: a.json,
            },
        ),
    }
}

fn extract(file: &Path, out: &Path, format: Option<DiskFormat>, quiet: bool) -> Result<()> {
    // The input is checked before the output: a missing pack is the problem to report.
    let opened = if file == Path::new("-") {
        None
    } else {
        Some(VmPack::open(file)?)
    };
    let dir = AtomicDir::create(out)?;
    let (cfg, digest) = if let Some(pack) = opened {
        let total: u64 = pack.reader().sections().iter().map(|s| s.size).sum();
        let bar = Bar::new(Some(total), "unpacking", quiet);
        let cfg = pack.extract_to_dir(dir.path(), format, &bar)?;
        (cfg, pack.reader().root_digest())
    } else {
        let bar = Bar::new(None, "unpacking", quiet);
        let stdin = std::io::stdin();
        let (cfg, summary) = extract_stream(stdin.lock(), "<stdin>", dir.path(), format, &bar)?;
        (cfg, summary.root_digest)
    };
    dir.commit()?;
    if !quiet {
        crate::outln!(
            "unpacked '{}' into {} ({} boot file(s), {} disk(s)); config {}; root digest {}",
            vmpack_formats::vm::printable(&cfg.name),
            out.display(),
            cfg.boot_files().len(),
            cfg.disks.len(),
            out.join(vmpack_formats::vm::CONFIG_FILE_NAME).display(),
            hex::encode(digest)
        );
    }
    Ok(())
}
