//! `vmpack unpack` and `vmpack export`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use vmpack_formats::config::DiskFormat;
use vmpack_formats::vm::{extract_stream, VmPack};

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
    /// The pack; `-` reads it from stdin in one pass.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Format of every disk written.
    #[arg(long, value_name = "raw|qcow2")]
    pub format: DiskFormat,
    /// Folder to create (or an empty one to fill).
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
    /// Print nothing on success.
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run_unpack(a: UnpackArgs) -> Result<()> {
    extract(&a.file, &a.output, None, a.quiet)
}

pub fn run_export(a: ExportArgs) -> Result<()> {
    extract(&a.file, &a.output, Some(a.format), a.quiet)
}

fn extract(file: &Path, out: &Path, format: Option<DiskFormat>, quiet: bool) -> Result<()> {
    let dir = AtomicDir::create(out)?;
    let (cfg, digest) = if file == Path::new("-") {
        let bar = Bar::new(None, "unpacking", quiet);
        let stdin = std::io::stdin();
        let (cfg, summary) = extract_stream(stdin.lock(), "<stdin>", dir.path(), format, &bar)?;
        (cfg, summary.root_digest)
    } else {
        let pack = VmPack::open(file)?;
        let total: u64 = pack.reader().sections().iter().map(|s| s.size).sum();
        let bar = Bar::new(Some(total), "unpacking", quiet);
        let cfg = pack.extract_to_dir(dir.path(), format, &bar)?;
        (cfg, pack.reader().root_digest())
    };
    dir.commit()?;
    if !quiet {
        println!(
            "unpacked '{}' into {} ({} boot file(s), {} disk(s)); config {}; root digest {}",
            cfg.name,
            out.display(),
            cfg.boot_files().len(),
            cfg.disks.len(),
            out.join(vmpack_formats::vm::CONFIG_FILE_NAME).display(),
            hex::encode(digest)
        );
    }
    Ok(())
}
