//! `vmpack sign` and the signature checks of `verify --allowed-signers` and
//! `restore --require-signature`: SSH signatures (SSHSIG, namespace `vmpack`) over a pack's
//! root digest, kept in its SIGN frames (docs/FORMAT.md §3.6, docs/SECURITY.md).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use vmpack_formats::pack::PackReader;
use vmpack_registry::signature::{self, SignatureCheck};

use crate::output::AtomicFile;

#[derive(Args)]
pub struct SignArgs {
    /// The pack to sign (replaced by the signed pack unless -o is given).
    #[arg(value_name = "PACK")]
    pack: PathBuf,
    /// OpenSSH private key to sign with (e.g. ~/.ssh/id_ed25519; without a passphrase).
    #[arg(long, value_name = "KEY")]
    key: Option<PathBuf>,
    /// Attach a signature made elsewhere: `ssh-keygen -Y sign -n vmpack -f KEY MSG` over the
    /// message `vmpack sign PACK --message` prints.
    #[arg(long, value_name = "FILE", conflicts_with = "key")]
    signature: Option<PathBuf>,
    /// Print the message a signature covers (the root digest in hex, then a newline) and exit.
    #[arg(long, conflicts_with_all = ["key", "signature"])]
    message: bool,
    /// Write the signed pack here instead of replacing PACK.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,
}

pub fn run_sign(a: SignArgs) -> Result<()> {
    let reader = PackReader::open(&a.pack)?;
    let root = reader.root_digest();
    if a.message {
        crate::out!("{}", String::from_utf8_lossy(&signature::message(&root)));
        return Ok(());
    }
    let (sig, who) = match (&a.key, &a.signature) {
        (Some(key), None) => {
            let sig = signature::sign(key, &root)?;
            let who = signature::check_own(&sig, &root)?;
            (sig, who)
        }
        (None, Some(file)) => {
            let sig = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let who = signature::check_own(&sig, &root).with_context(|| {
                format!("{}: cannot attach to {}", file.display(), a.pack.display())
            })?;
            (sig, who)
        }
        _ => bail!("give --key KEY, --signature FILE or --message"),
    };
    // A key signs a pack once: a new signature by the same key replaces the old one.
    let mut sigs: Vec<Vec<u8>> = reader
        .signatures()?
        .into_iter()
        .filter(|s| signature::check_own(s, &root).ok().as_deref() != Some(who.as_str()))
        .collect();
    sigs.push(sig);
    let target = a.output.clone().unwrap_or_else(|| a.pack.clone());
    let mut out = AtomicFile::create(&target)?;
    reader.write_with_signatures(sigs, out.file())?;
    // The signed pack must read back with the same root digest before it replaces anything.
    let check = PackReader::open(out.temp_path())?;
    if check.root_digest() != root {
        bail!(
            "{}: the signed pack's root digest changed",
            target.display()
        );
    }
    drop(check);
    drop(reader);
    out.commit()?;
    if !a.quiet {
        eprintln!(
            "vmpack: signed {} ({who}); root digest {} unchanged",
            target.display(),
            hex::encode(root)
        );
    }
    Ok(())
}

/// Checks every signature of a pack against an allowed-signers file.
pub fn check_pack(pack: &Path, allowed: &Path) -> Result<Vec<SignatureCheck>> {
    let signers = signature::parse_allowed_signers(allowed)?;
    let reader = PackReader::open(pack)?;
    let root = reader.root_digest();
    Ok(reader
        .signatures()?
        .iter()
        .map(|s| signature::check(s, &root, &signers))
        .collect())
}

/// Ok with the good signatures, or an error naming what was found instead.
pub fn require_signature(pack: &Path, allowed: &Path) -> Result<Vec<SignatureCheck>> {
    let checks = check_pack(pack, allowed)?;
    if checks.is_empty() {
        bail!(
            "{}: not signed; a signature from a key in {} is required",
            pack.display(),
            allowed.display()
        );
    }
    let good: Vec<SignatureCheck> = checks.iter().filter(|c| c.ok).cloned().collect();
    if good.is_empty() {
        let found: Vec<String> = checks
            .iter()
            .map(|c| {
                format!(
                    "{}: {}",
                    c.key.as_deref().unwrap_or("unreadable signature"),
                    c.problem.as_deref().unwrap_or("")
                )
            })
            .collect();
        bail!(
            "{}: no good signature from a key in {}; found {}",
            pack.display(),
            allowed.display(),
            found.join("; ")
        );
    }
    Ok(good)
}

pub fn describe_good(c: &SignatureCheck) -> String {
    format!(
        "good signature by {} ({})",
        c.signer.as_deref().unwrap_or("?"),
        c.key.as_deref().unwrap_or("?")
    )
}
