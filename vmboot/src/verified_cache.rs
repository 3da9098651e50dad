//! Records of packs whose every chunk was verified on this host.
//!
//! A record is keyed by the pack's root digest and names the file's device, inode, size and
//! modification time: a pack rewritten in place (even with the same index) is verified
//! again. It does not protect against silent media corruption after the first check; use
//! `--verify always` for that.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

static BASE_DIR: std::sync::RwLock<Option<PathBuf>> = std::sync::RwLock::new(None);

/// Sets the cache folder (verified records, touch orders, expanded packs) for this
/// process. The binaries set it from the environment at start-up (`$VMPACK_CACHE_DIR`,
/// else `$XDG_CACHE_HOME/vmpack`, else `~/.cache/vmpack`); the library reads no
/// environment. Unset, nothing is cached.
pub fn set_base_dir(dir: Option<PathBuf>) {
    *BASE_DIR.write().unwrap_or_else(|p| p.into_inner()) = dir;
}

/// The cache folder set by [`set_base_dir`].
pub fn base_dir() -> Option<PathBuf> {
    BASE_DIR.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn dir() -> Option<PathBuf> {
    Some(base_dir()?.join("verified"))
}

fn identity(path: &Path) -> Option<String> {
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "{} {} {} {}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

pub fn is_verified(path: &Path, root: [u8; 32]) -> bool {
    let (Some(d), Some(id)) = (dir(), identity(path)) else {
        return false;
    };
    std::fs::read_to_string(d.join(hex::encode(root)))
        .map(|s| s.lines().any(|l| l == id))
        .unwrap_or(false)
}

/// Best effort: a cache that cannot be written only costs a later re-verification.
pub fn record(path: &Path, root: [u8; 32]) {
    let (Some(d), Some(id)) = (dir(), identity(path)) else {
        return;
    };
    if std::fs::create_dir_all(&d).is_err() {
        return;
    }
    let file = d.join(hex::encode(root));
    let mut text = std::fs::read_to_string(&file).unwrap_or_default();
    text.push_str(&id);
    text.push('\n');
    let tmp = d.join(format!(".{}.tmp{}", hex::encode(root), std::process::id()));
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, &file);
    }
}
