//! `vmpack verify`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use vmpack_formats::pack::{StreamEvent, StreamReader};
use vmpack_formats::vm::{Manifest, VmPack, MANIFEST_SECTION, MAX_MANIFEST_LEN};

use crate::progress::Bar;
use crate::util::human_bytes;

#[derive(Args)]
pub struct VerifyArgs {
    /// The pack to check; `-` reads it from stdin in one pass.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Also require a good signature from a key in this allowed-signers file (git's
    /// format, see `ssh-keygen(1)`); exit 1 naming the signer found otherwise.
    #[arg(long, value_name = "FILE")]
    pub allowed_signers: Option<PathBuf>,
    /// Print the result as JSON on stdout (`file`, `sections`, `chunks`, `zero_chunks`,
    /// `bytes`, `root_digest`, `signers`); errors stay on stderr with exit status 1.
    #[arg(long, conflicts_with = "quiet")]
    pub json: bool,
    /// Print nothing on success.
    #[arg(short, long)]
    pub quiet: bool,
    /// For a diff pack: its parent pack, instead of the file its manifest names in its
    /// folder.
    #[arg(long, value_name = "FILE")]
    pub parent: Option<PathBuf>,
}

pub fn run(a: VerifyArgs) -> Result<()> {
    if a.file == Path::new("-") {
        if a.allowed_signers.is_some() {
            anyhow::bail!("--allowed-signers needs a pack file, not standard input");
        }
        return verify_stream(&a);
    }
    // The manifest first: sizes it declares beyond the VM's limits are refused before any
    // chunk is read.
    let pack = VmPack::open(&a.file)?;
    let reader = pack.reader();
    let total: u64 = reader.sections().iter().map(|s| s.size).sum();
    let bar = Bar::new(Some(total), "verifying", a.quiet);
    let report = reader.verify(&bar)?;
    bar.finish();
    // A diff pack is whole only with its parents: each must be the one it names, intact.
    let mut chain = Vec::new();
    if pack.manifest().parent.is_some() {
        let c = vmpack_formats::diff::open_chain(&a.file, a.parent.as_deref())?;
        for p in &c.packs[..c.packs.len() - 1] {
            p.reader().verify(&())?;
            chain.push(serde_json::json!({
                "file": p.path().display().to_string(),
                "root_digest": hex::encode(p.reader().root_digest()),
            }));
        }
    }
    if a.json {
        let mut signers = Vec::new();
        if let Some(allowed) = &a.allowed_signers {
            for good in crate::sign::require_signature(&a.file, allowed)? {
                signers.push(crate::sign::describe_good(&good));
            }
        }
        crate::outln!(
            "{}",
            serde_json::json!({
                "file": a.file.display().to_string(),
                "sections": report.sections,
                "chunks": report.chunks,
                "zero_chunks": report.zero_chunks,
                "bytes": report.bytes,
                "root_digest": hex::encode(reader.root_digest()),
                "signers": signers,
                "parents": chain,
            })
        );
        return Ok(());
    }
    if !a.quiet {
        crate::outln!(
            "OK {}: {} sections, {} chunks ({} zero), {} checked, root digest {}",
            a.file.display(),
            report.sections,
            report.chunks,
            report.zero_chunks,
            human_bytes(report.bytes),
            hex::encode(reader.root_digest())
        );
        for p in &chain {
            crate::outln!(
                "OK parent {}: root digest {} as named, every chunk checked",
                p["file"].as_str().unwrap_or(""),
                p["root_digest"].as_str().unwrap_or("")
            );
        }
    }
    if let Some(allowed) = &a.allowed_signers {
        for good in crate::sign::require_signature(&a.file, allowed)? {
            if !a.quiet {
                crate::outln!("{}", crate::sign::describe_good(&good));
            }
        }
    }
    Ok(())
}

fn verify_stream(a: &VerifyArgs) -> Result<()> {
    let stdin = std::io::stdin();
    let mut sr = StreamReader::new(stdin.lock(), "<stdin>")?;
    let overlay_flag = sr.overlays();
    let bar = Bar::new(None, "verifying", a.quiet);
    let mut manifest = Vec::new();
    let mut manifest_id = None;
    let mut first = true;
    loop {
        match sr.next_event()? {
            StreamEvent::Section(s) => {
                if first && s.name == MANIFEST_SECTION && s.size <= MAX_MANIFEST_LEN {
                    manifest_id = Some(s.id);
                }
                first = false;
            }
            StreamEvent::Chunk { section, data, .. } => {
                if Some(section) == manifest_id {
                    manifest.extend_from_slice(data);
                }
                use vmpack_formats::pack::Progress;
                bar.advance(data.len() as u64);
            }
            StreamEvent::SectionEnd(_) => {}
            StreamEvent::End(summary) => {
                bar.finish();
                if manifest_id.is_none() {
                    anyhow::bail!(
                        "<stdin>: section '{MANIFEST_SECTION}': missing: the first section must be the manifest"
                    );
                }
                let m = Manifest::parse(&manifest, "<stdin>")?;
                m.check_sections(&summary.sections, "<stdin>")?;
                m.check_overlay_flag(overlay_flag, "<stdin>")?;
                m.check_memory("<stdin>", &|_| None)?;
                if a.json {
                    crate::outln!(
                        "{}",
                        serde_json::json!({
                            "file": "-",
                            "sections": summary.sections.len(),
                            "chunks": summary.sections.iter().map(|s| s.chunks).sum::<u64>(),
                            "zero_chunks": summary.sections.iter().map(|s| s.zero_chunks).sum::<u64>(),
                            "bytes": summary.sections.iter().map(|s| s.size).sum::<u64>(),
                            "root_digest": hex::encode(summary.root_digest),
                            "signers": Vec::<String>::new(),
                        })
                    );
                } else if !a.quiet {
                    let chunks: u64 = summary.sections.iter().map(|s| s.chunks).sum();
                    let zero: u64 = summary.sections.iter().map(|s| s.zero_chunks).sum();
                    let bytes: u64 = summary.sections.iter().map(|s| s.size).sum();
                    crate::outln!(
                        "OK <stdin>: {} sections, {chunks} chunks ({zero} zero), {} checked, root digest {}",
                        summary.sections.len(),
                        human_bytes(bytes),
                        hex::encode(summary.root_digest)
                    );
                }
                return Ok(());
            }
        }
    }
}
