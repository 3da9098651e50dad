//! `vmpack push`, `vmpack pull` and `vmpack cache`: packs through OCI registries, with the
//! local chunk cache (the work is in the `vmpack_registry` crate).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use vmpack_formats::pack::PackReader;
use vmpack_registry::{ChunkCache, Client, ClientOptions, Credentials, Reference};

use crate::output::AtomicFile;
use crate::progress::Bar;
use crate::util::human_bytes;

/// How to reach a registry (shared by push, pull, `save --push`, `test REF`).
#[derive(Args, Clone, Default)]
pub struct RegistryArgs {
    /// Registry login; the password is read from standard input (with --password-stdin).
    /// Without it, docker's config (~/.docker/config.json, $DOCKER_CONFIG) and its
    /// credential helpers are used, else no login.
    #[arg(long, requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the password for --username from standard input.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// Allow plain HTTP to a registry that is not on loopback (loopback always may).
    #[arg(long)]
    pub insecure: bool,
    /// Trust the CA certificates in this PEM file for the registry's HTTPS (instead of the
    /// built-in Mozilla roots); without it, $SSL_CERT_FILE if set.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Blob transfers at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub transfers: u32,
}

impl RegistryArgs {
    pub fn client(&self, reference: &Reference) -> Result<Client> {
        let credentials = match &self.username {
            Some(u) => {
                let mut pw = String::new();
                std::io::stdin()
                    .read_to_string(&mut pw)
                    .context("reading the password from standard input")?;
                let pw = pw.trim_end_matches(['\n', '\r']).to_string();
                if pw.is_empty() {
                    bail!("--password-stdin: standard input held no password");
                }
                Some(Credentials {
                    username: u.clone(),
                    password: pw,
                })
            }
            None => None,
        };
        Client::new(
            reference,
            ClientOptions {
                insecure: self.insecure,
                ca_file: self
                    .ca_file
                    .clone()
                    .or_else(crate::environment::default_ca_file),
                credentials,
                parallel: self.transfers as usize,
                max_layers: crate::environment::max_layers(),
                ..Default::default()
            },
        )
    }
}

#[derive(Args)]
pub struct PushArgs {
    /// The pack to push (it is verified first).
    #[arg(value_name = "PACK")]
    pack: PathBuf,
    /// Where: REGISTRY/REPOSITORY:TAG, e.g. localhost:5000/team/vm:v1.
    #[arg(value_name = "REF")]
    reference: String,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args)]
pub struct PullArgs {
    /// What: REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:DIGEST.
    #[arg(value_name = "REF")]
    reference: String,
    /// The pack file to write (the same bytes that were pushed).
    #[arg(short, long, value_name = "PACK")]
    output: PathBuf,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,
}

pub fn run_push(a: PushArgs) -> Result<()> {
    let reference = Reference::parse(&a.reference)?;
    let client = a.registry.client(&reference)?;
    let report = push_file(&a.pack, &client, a.quiet)?;
    if a.json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else if !a.quiet {
        print_push(&report, &a.pack.display().to_string());
    }
    Ok(())
}

/// Pushes with progress bars; shared with `save --push`. A diff pack's parents (the files
/// next to it, as a restore finds them) are pushed first, base first, each tagged
/// `vmpack-root-<its root digest>` in the same repository, and each child's config names
/// its parent's manifest digest (docs/FORMAT.md §14, "Diff packs").
pub fn push_file(pack: &Path, client: &Client, quiet: bool) -> Result<vmpack_registry::PushReport> {
    let is_diff = parent_of(pack).is_some();
    let mut link = None;
    if is_diff {
        let chain = vmpack_formats::diff::open_chain(pack, None)?;
        for p in &chain.packs[..chain.packs.len() - 1] {
            let root = hex::encode(p.reader().root_digest());
            let reference = Reference {
                tag: Some(vmpack_registry::root_tag(&root)),
                digest: None,
                ..client.reference().clone()
            };
            let c = Client::new(&reference, client.options().clone())?;
            let r = push_one(p.path(), &c, link.as_ref(), quiet)?;
            if !quiet {
                eprintln!(
                    "vmpack: pushed the parent pack {} as {} ({})",
                    p.path().display(),
                    r.reference,
                    r.digest
                );
            }
            link = Some(vmpack_registry::ParentLink {
                root_digest: r.root_digest,
                digest: r.digest,
            });
        }
    }
    push_one(pack, client, link.as_ref(), quiet)
}

fn push_one(
    pack: &Path,
    client: &Client,
    parent: Option<&vmpack_registry::ParentLink>,
    quiet: bool,
) -> Result<vmpack_registry::PushReport> {
    let reader = PackReader::open(pack)?;
    let total: u64 = reader.sections().iter().map(|s| s.size).sum();
    let stored = reader.file_size();
    drop(reader);
    let verify = Bar::new(Some(total), "verifying", quiet);
    let bar = Bar::new(Some(stored), "pushing", quiet);
    let t = Instant::now();
    // Blobs another repository of the same registry has (one this cache pushed to last) are
    // mounted from it rather than sent again.
    let cache = crate::environment::chunk_cache().ok();
    let reference = client.reference();
    let from = cache
        .as_ref()
        .and_then(|c| c.recent_repository(&reference.registry, &reference.repository));
    let r = vmpack_registry::push(pack, client, parent, from.as_deref(), &verify, &bar)
        .with_context(|| format!("pushing {} to {}", pack.display(), client.reference()))?;
    if let Some(c) = &cache {
        c.remember_repository(&reference.registry, &reference.repository);
    }
    bar.finish();
    verify.finish();
    if !quiet {
        eprintln!("vmpack: pushed in {:.2} s", t.elapsed().as_secs_f64());
    }
    Ok(r)
}

pub fn print_push(r: &vmpack_registry::PushReport, pack: &str) {
    crate::outln!(
        "pushed {} to {} ({}): {} chunks in {} blobs; uploaded {} blobs ({}), {} already there ({}){}; root digest {}{}",
        pack,
        r.reference,
        r.digest,
        r.chunks,
        r.blobs,
        r.uploaded_blobs,
        human_bytes(r.uploaded_bytes),
        r.present_blobs,
        human_bytes(r.present_bytes),
        match (&r.mounted_from, r.mounted_blobs) {
            (Some(from), n) if n > 0 =>
                format!(", {n} mounted from {from} ({})", human_bytes(r.mounted_bytes)),
            _ => String::new(),
        },
        r.root_digest,
        match r.signatures {
            0 => String::new(),
            n => format!(
                "; {n} signature(s) as referrers{}",
                if r.referrers_api == Some(false) { " (tag fallback)" } else { "" }
            ),
        }
    );
}

pub fn run_pull(a: PullArgs) -> Result<()> {
    let reference = Reference::parse(&a.reference)?;
    let client = a.registry.client(&reference)?;
    let cache = crate::environment::chunk_cache()?;
    let (report, _) = pull_to(&client, &cache, &a.output, a.quiet)?;
    if a.json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else if !a.quiet {
        crate::outln!(
            "pulled {} ({}) to {}: {}, {} chunks in {} blobs; fetched {} blobs ({}), {} from the cache ({}); root digest {}",
            report.reference,
            report.digest,
            a.output.display(),
            human_bytes(report.size),
            report.chunks,
            report.blobs,
            report.fetched_blobs,
            human_bytes(report.fetched_bytes),
            report.cached_blobs,
            human_bytes(report.cached_bytes),
            report.root_digest
        );
    }
    Ok(())
}

/// Pulls into `output` (written under a temporary name, fully verified, then renamed). A
/// diff pack's parents are pulled next to it, each under the file name its child's manifest
/// names (`parent.file`: a plain name, so always in `output`'s folder), each checked
/// against the root digest its child names; a file already there with that root digest is
/// kept, any other is refused. Nothing takes its name until the whole chain is verified.
pub fn pull_to(
    client: &Client,
    cache: &ChunkCache,
    output: &Path,
    quiet: bool,
) -> Result<(vmpack_registry::PullReport, f64)> {
    let t = Instant::now();
    let (report, out) = pull_one(client, cache, output, quiet)?;
    let folder = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut names: Vec<std::ffi::OsString> =
        output.file_name().into_iter().map(Into::into).collect();
    let mut named = parent_of(out.temp_path());
    let mut link = report.parent.clone();
    let mut what = client.reference().to_string();
    let mut files = vec![(out, output.to_path_buf())];
    while let Some(p) = named.take() {
        if files.len() > vmpack_formats::diff::MAX_CHAIN {
            bail!(
                "{what}: the chain of parent packs is longer than {}",
                vmpack_formats::diff::MAX_CHAIN
            );
        }
        let l = checked_link(&what, &p, link.take())?;
        // `p.file` was checked to be one plain file name when the manifest was read.
        if names.iter().any(|n| *n == *p.file) {
            bail!(
                "{what}: two packs of the chain are named {}; pull them one by one",
                vmpack_formats::vm::printable(&p.file)
            );
        }
        names.push(p.file.clone().into());
        let target = folder.join(&p.file);
        let reference = Reference {
            tag: None,
            digest: Some(l.digest.clone()),
            ..client.reference().clone()
        };
        let pc = Client::new(&reference, client.options().clone())?;
        what = reference.to_string();
        if std::fs::symlink_metadata(&target).is_ok() {
            let have = PackReader::open(&target)
                .ok()
                .map(|r| hex::encode(r.root_digest()));
            if have.as_deref() != Some(p.root_digest.as_str()) {
                bail!(
                    "{what}: {} exists and is not the parent pack (root digest {}); move it away or pull into another folder",
                    target.display(),
                    p.root_digest
                );
            }
            if !quiet {
                eprintln!(
                    "vmpack: {}: already here (root digest {}); kept",
                    target.display(),
                    p.root_digest
                );
            }
            let remote = vmpack_registry::resolve(&pc)?;
            named = parent_of(&target);
            link = remote.parent;
            continue;
        }
        let (r, f) = pull_one(&pc, cache, &target, quiet)?;
        if r.root_digest != format!("sha256:{}", p.root_digest) {
            bail!(
                "{what}: root digest {}, the diff pack names sha256:{}; refused",
                r.root_digest,
                p.root_digest
            );
        }
        named = parent_of(f.temp_path());
        link = r.parent.clone();
        if !quiet {
            eprintln!(
                "vmpack: pulled the parent pack {what} to {}",
                target.display()
            );
        }
        files.push((f, target));
    }
    // Parents first: a child never has its name without its parents.
    for (f, path) in files.into_iter().rev() {
        let root = PackReader::open(f.temp_path())?.root_digest();
        f.commit()?;
        // Checked just now: the first restore need not check again.
        vmboot::verified_cache::record(&path, root);
    }
    Ok((report, t.elapsed().as_secs_f64()))
}

/// The registry's link to the parent `p` a diff pack (`what`) names, refused when missing
/// or naming another root digest.
pub(crate) fn checked_link(
    what: &str,
    p: &vmpack_formats::diff::ParentRef,
    link: Option<vmpack_registry::ParentLink>,
) -> Result<vmpack_registry::ParentLink> {
    let Some(l) = link else {
        bail!(
            "{what}: a diff pack whose parent ({}, root digest {}) the registry does not name; push the diff pack again with this vmpack (push sends the chain), or push a flattened pack",
            vmpack_formats::vm::printable(&p.file),
            p.root_digest
        );
    };
    if l.root_digest != format!("sha256:{}", p.root_digest) {
        bail!(
            "{what}: the registry names a parent with root digest {}, the diff pack names sha256:{}; refused",
            l.root_digest,
            p.root_digest
        );
    }
    Ok(l)
}

/// The parent a VM pack's manifest names (none for a pack that is not a VM pack).
pub(crate) fn parent_of(pack: &Path) -> Option<vmpack_formats::diff::ParentRef> {
    vmpack_formats::vm::VmPack::open(pack)
        .ok()
        .and_then(|p| p.manifest().parent.clone())
}

/// One pack into a temporary file for `output`, fully verified, not yet renamed.
fn pull_one(
    client: &Client,
    cache: &ChunkCache,
    output: &Path,
    quiet: bool,
) -> Result<(vmpack_registry::PullReport, AtomicFile)> {
    let mut out = AtomicFile::create(output)?;
    let bar = Bar::new(None, "pulling", quiet);
    let report = {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, out.file());
        let r = vmpack_registry::pull(client, cache, &mut w, &bar)
            .with_context(|| format!("pulling {} into {}", client.reference(), output.display()))?;
        std::io::Write::flush(&mut w)?;
        r
    };
    bar.finish();
    // Every byte is checked before the file takes its name: the index against the root
    // digest, every chunk against its SHA-256 (and CRC-32).
    let reader = PackReader::open(out.temp_path())?;
    let total: u64 = reader.sections().iter().map(|s| s.size).sum();
    let vbar = Bar::new(Some(total), "verifying", quiet);
    reader
        .verify(&vbar)
        .with_context(|| format!("the pack pulled from {} is damaged", client.reference()))?;
    vbar.finish();
    if format!("sha256:{}", hex::encode(reader.root_digest())) != report.root_digest {
        bail!(
            "{}: the pulled pack's root digest differs from the registry's",
            client.reference()
        );
    }
    drop(reader);
    Ok((report, out))
}

#[derive(Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Show what the cache holds: chunks, expanded packs, verified records.
    Ls {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        /// Accepted for symmetry; ls prints only its listing.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove cached chunks (least recently used first) and expanded packs.
    Prune {
        /// Keep up to this many bytes of chunks (suffixes K, M, G); default: keep none.
        #[arg(long, value_parser = parse_size, default_value = "0")]
        keep: u64,
        /// Print nothing but errors.
        #[arg(short, long)]
        quiet: bool,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match s[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1u64 << 40,
                u => return Err(format!("unknown unit '{u}' (K, M, G, T)")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .map_err(|e| format!("{s}: {e}"))
        .map(|n| n.saturating_mul(mul))
}

/// Files (not starting with '.') in `dir` and in its folders one level down (a pulled diff
/// pack's chain), and their bytes.
fn dir_usage(dir: &Path) -> (u64, u64) {
    let mut n = 0;
    let mut bytes = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if let Ok(m) = e.metadata() {
                if m.is_file() {
                    n += 1;
                    bytes += m.len();
                } else if m.is_dir() && dir.ends_with("pulled") {
                    let (k, b) = dir_usage(&e.path());
                    n += k;
                    bytes += b;
                }
            }
        }
    }
    (n, bytes)
}

pub fn run_cache(a: CacheArgs) -> Result<()> {
    let root = crate::environment::cache_root()
        .context("no cache folder: set VMPACK_CACHE_DIR, XDG_CACHE_HOME or HOME")?;
    let chunks = ChunkCache::at(&root);
    match a.command {
        CacheCommand::Ls { json, .. } => {
            let entries = chunks.entries()?;
            let chunk_bytes: u64 = entries.iter().map(|e| e.1).sum();
            let (expanded, expanded_bytes) = dir_usage(&root.join("expanded"));
            let (verified, _) = dir_usage(&root.join("verified"));
            let (pulled, pulled_bytes) = dir_usage(&root.join("pulled"));
            if json {
                crate::outln!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "path": root,
                        "chunks": {"count": entries.len(), "bytes": chunk_bytes},
                        "expanded": {"count": expanded, "bytes": expanded_bytes},
                        "pulled": {"count": pulled, "bytes": pulled_bytes},
                        "verified": {"count": verified},
                    }))?
                );
            } else {
                crate::outln!("{}", root.display());
                crate::outln!(
                    "  chunks    {:>6}  {}",
                    entries.len(),
                    human_bytes(chunk_bytes)
                );
                crate::outln!(
                    "  expanded  {:>6}  {}",
                    expanded,
                    human_bytes(expanded_bytes)
                );
                crate::outln!("  pulled    {:>6}  {}", pulled, human_bytes(pulled_bytes));
                crate::outln!("  verified  {:>6}  records", verified);
            }
        }
        CacheCommand::Prune { keep, quiet } => {
            let (n, freed) = chunks.prune(keep)?;
            // What describes packs goes with their chunks (a few KiB each: all or none).
            if keep == 0 || n > 0 {
                let _ = chunks.meta().prune(0);
            }
            let mut packs = 0;
            let mut pack_bytes = 0;
            // Local files of `restore REF` runs that were killed (one left for a day is
            // taken for dead; a VM running that long keeps its file open, which stays readable).
            if let Ok(rd) = std::fs::read_dir(&root) {
                for e in rd.flatten() {
                    let stale = e
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age.as_secs() > 86400);
                    if stale && e.file_name().to_string_lossy().starts_with(".remote-") {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
            for sub in ["expanded", "pulled"] {
                if let Ok(rd) = std::fs::read_dir(root.join(sub)) {
                    for e in rd.flatten() {
                        if e.metadata().is_ok_and(|m| m.is_dir()) {
                            // A pulled diff pack with its parents.
                            let (k, b) = dir_usage(&e.path());
                            if std::fs::remove_dir_all(e.path()).is_ok() {
                                packs += k;
                                pack_bytes += b;
                            }
                            continue;
                        }
                        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                        if std::fs::remove_file(e.path()).is_ok() {
                            packs += 1;
                            pack_bytes += len;
                        }
                    }
                }
            }
            if !quiet {
                crate::outln!(
                    "removed {n} chunks ({}) and {packs} cached packs ({}) from {}",
                    human_bytes(freed),
                    human_bytes(pack_bytes),
                    root.display()
                );
            }
        }
    }
    Ok(())
}
