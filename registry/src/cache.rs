//! The local content-addressed chunk cache, shared by every pack and registry:
//! `<cache>/chunks/sha256/<hex>` holds one stored chunk payload whose SHA-256 is `<hex>`
//! (the blob digest in a registry). Entries appear by rename once complete and verified, so
//! a killed transfer leaves no partial entry; their mtime is refreshed on use, so pruning
//! can drop the least recently used first.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};

pub struct ChunkCache {
    dir: PathBuf,
    /// `<cache>/refs/`: the digest each tag pointed to when last resolved.
    refs: PathBuf,
}

/// The file name of a reference's record: the SHA-256 of its text (a reference may hold
/// characters no file name should).
fn ref_key(reference: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(reference.as_bytes()))
}

fn hex_of(digest: &str) -> Option<&str> {
    let h = digest.strip_prefix("sha256:")?;
    (h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then_some(h)
}

impl ChunkCache {
    /// The cache under `root` (which holds `chunks/`).
    pub fn at(root: &Path) -> ChunkCache {
        ChunkCache {
            dir: root.join("chunks").join("sha256"),
            refs: root.join("refs"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the entry for `digest` (`sha256:<hex>`) lives, whether or not it exists.
    pub fn path(&self, digest: &str) -> Option<PathBuf> {
        hex_of(digest).map(|h| self.dir.join(h))
    }

    /// Whether the cache holds `digest` with `size` bytes (a size mismatch is a damaged
    /// entry, removed here).
    pub fn contains(&self, digest: &str, size: u64) -> bool {
        let Some(p) = self.path(digest) else {
            return false;
        };
        match std::fs::metadata(&p) {
            Ok(m) if m.len() == size => true,
            Ok(_) => {
                let _ = std::fs::remove_file(&p);
                false
            }
            Err(_) => false,
        }
    }

    /// The cache of the small blobs that describe packs (manifests, configs, indexes):
    /// `<cache>/meta/sha256/`, apart from the chunks so that counts and pruning of chunks
    /// mean chunks.
    pub fn meta(&self) -> ChunkCache {
        let root = self.refs.parent().unwrap_or(Path::new("."));
        ChunkCache {
            dir: root.join("meta").join("sha256"),
            refs: self.refs.clone(),
        }
    }

    /// The digest `reference` (a tag) pointed to when last resolved, if recorded: a guess
    /// to start from, which the caller confirms with the registry.
    pub fn recall_ref(&self, reference: &str) -> Option<String> {
        let s = std::fs::read_to_string(self.refs.join(ref_key(reference))).ok()?;
        let d = s.trim();
        hex_of(d).map(|_| d.to_string())
    }

    /// Records what `reference` points to now (best effort).
    pub fn remember_ref(&self, reference: &str, digest: &str) {
        if hex_of(digest).is_none() || std::fs::create_dir_all(&self.refs).is_err() {
            return;
        }
        if let Ok(mut t) = tempfile::Builder::new()
            .prefix(".incoming-")
            .tempfile_in(&self.refs)
        {
            if t.write_all(digest.as_bytes()).is_ok() {
                let _ = t.persist(self.refs.join(ref_key(reference)));
            }
        }
    }

    /// The repository of `registry` most recently pushed to other than `except`: where a
    /// push asks the registry to mount blobs from.
    pub fn recent_repository(&self, registry: &str, except: &str) -> Option<String> {
        let s = std::fs::read_to_string(self.repos_file(registry)).ok()?;
        s.lines()
            .rev()
            .find(|l| !l.is_empty() && *l != except)
            .map(str::to_string)
    }

    /// Records a push to `repository` of `registry` (the last 16 kept, best effort).
    pub fn remember_repository(&self, registry: &str, repository: &str) {
        let path = self.repos_file(registry);
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let mut list: Vec<&str> = old
            .lines()
            .filter(|l| !l.is_empty() && *l != repository)
            .collect();
        list.push(repository);
        let keep = &list[list.len().saturating_sub(16)..];
        if std::fs::create_dir_all(&self.refs).is_err() {
            return;
        }
        if let Ok(mut t) = tempfile::Builder::new()
            .prefix(".incoming-")
            .tempfile_in(&self.refs)
        {
            if t.write_all((keep.join("\n") + "\n").as_bytes()).is_ok() {
                let _ = t.persist(path);
            }
        }
    }

    fn repos_file(&self, registry: &str) -> PathBuf {
        self.refs
            .join(format!("repositories-{}", ref_key(registry)))
    }

    /// Opens an entry for reading and marks it used.
    pub fn open(&self, digest: &str) -> Option<File> {
        let p = self.path(digest)?;
        let f = File::open(&p).ok()?;
        let _ = f.set_modified(SystemTime::now());
        Some(f)
    }

    /// Removes an entry (found damaged).
    pub fn remove(&self, digest: &str) {
        if let Some(p) = self.path(digest) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Adds an entry: `fill` writes the bytes to a temporary file in the cache folder and
    /// checks them (it errs if the digest does not match); the file then takes its name.
    pub fn insert_with(
        &self,
        digest: &str,
        fill: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
    ) -> Result<()> {
        let target = self
            .path(digest)
            .with_context(|| format!("{digest}: not a sha256 digest"))?;
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".incoming-")
            .tempfile_in(&self.dir)
            .with_context(|| format!("creating a temporary file in {}", self.dir.display()))?;
        {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
            fill(&mut w)?;
            w.flush()?;
        }
        tmp.persist(&target)
            .map_err(|e| e.error)
            .with_context(|| format!("storing {}", target.display()))?;
        Ok(())
    }

    /// Every complete entry: (digest, size, last use).
    pub fn entries(&self) -> Result<Vec<(String, u64, SystemTime)>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.dir.display())),
        };
        for ent in rd {
            let ent = ent?;
            let name = ent.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{name}");
            if hex_of(&digest).is_none() {
                continue;
            }
            let m = ent.metadata()?;
            out.push((
                digest,
                m.len(),
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            ));
        }
        Ok(out)
    }

    /// Removes least recently used entries until at most `keep_bytes` remain, and any
    /// leftover temporary files. Returns (entries removed, bytes freed).
    pub fn prune(&self, keep_bytes: u64) -> Result<(u64, u64)> {
        let mut entries = self.entries()?;
        entries.sort_by_key(|e| std::cmp::Reverse(e.2));
        let (mut kept, mut removed, mut freed) = (0u64, 0u64, 0u64);
        for (digest, size, _) in entries {
            if kept + size <= keep_bytes {
                kept += size;
                continue;
            }
            self.remove(&digest);
            removed += 1;
            freed += size;
        }
        // Leftovers of killed transfers; a transfer running now is younger than an hour.
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for ent in rd.flatten() {
                let old = ent
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 3600);
                if old && ent.file_name().to_string_lossy().starts_with(".incoming-") {
                    let _ = std::fs::remove_file(ent.path());
                }
            }
        }
        Ok((removed, freed))
    }
}
