//! `vmpack flatten CHILD -o FULL`: a diff pack and its parents made into one full pack.

use crate::output::AtomicFile;
use anyhow::{Context, Result};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use vmpack_formats::pack::Compression;

#[derive(Args)]
pub struct FlattenArgs {
    /// The diff pack (made by `vmpack save --diff-from`).
    pack: PathBuf,
    /// Its parent pack, instead of the file its manifest names in its folder.
    #[arg(long, value_name = "FILE")]
    parent: Option<PathBuf>,
    /// The full pack to write.
    #[arg(short, long)]
    output: PathBuf,
    /// Chunk compression. Default none, as `save`: memory stays page-aligned so a restore
    /// maps it.
    #[arg(long, default_value = "none", value_name = "none|deflate|zstd")]
    compress: Compression,
    /// Print nothing but errors.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(a: FlattenArgs) -> Result<()> {
    let chain = vmpack_formats::diff::open_chain(&a.pack, a.parent.as_deref())?;
    // Every pack is read whole: check every chunk of each first.
    for p in &chain.packs {
        p.reader().verify(&())?;
    }
    let mut out = AtomicFile::create(&a.output)?;
    let scratch = a
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let summary = {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, out.file());
        let s = vmboot::diff::flatten(&chain, &scratch, a.compress, &mut w)?;
        w.flush()
            .with_context(|| format!("writing {}", a.output.display()))?;
        s
    };
    out.commit()?;
    if !a.quiet {
        eprintln!(
            "vmpack: flattened {} ({} packs) into {}: {} bytes, root digest {}",
            a.pack.display(),
            chain.packs.len(),
            a.output.display(),
            summary.bytes_written,
            hex::encode(summary.root_digest)
        );
    }
    Ok(())
}
