//! What the environment decides, read in one place: the library crates (vmboot, formats,
//! registry) read no environment variable, the CLI passes them what these say.

use anyhow::{Context, Result};
use std::path::PathBuf;
use vmpack_registry::ChunkCache;

/// The vmpack cache folder: `$VMPACK_CACHE_DIR`, else `$XDG_CACHE_HOME/vmpack`, else
/// `~/.cache/vmpack` (chunks, pulled packs, the records of verified packs).
pub fn cache_root() -> Option<PathBuf> {
    std::env::var_os("VMPACK_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|p| PathBuf::from(p).join("vmpack")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/vmpack")))
}

/// The chunk cache under [`cache_root`].
pub fn chunk_cache() -> Result<ChunkCache> {
    let root =
        cache_root().context("no cache folder: set VMPACK_CACHE_DIR, XDG_CACHE_HOME or HOME")?;
    Ok(ChunkCache::at(&root))
}

/// The CA file a registry client trusts when `--ca-file` is not given: `$SSL_CERT_FILE`.
pub fn default_ca_file() -> Option<PathBuf> {
    std::env::var_os("SSL_CERT_FILE").map(PathBuf::from)
}

/// Layers per manifest before a push splits it: `$VMPACK_OCI_MAX_LAYERS` (at least 2), else
/// the registry crate's default.
pub fn max_layers() -> usize {
    std::env::var("VMPACK_OCI_MAX_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n >= 2)
        .unwrap_or(vmpack_registry::oci::DEFAULT_MAX_LAYERS)
}

/// Workers prefetching a lazily restored pack: `$VMBOOT_PREFETCH_THREADS` (vmboot takes 1 to
/// 64; otherwise its default).
pub fn prefetch_threads() -> Option<usize> {
    std::env::var("VMBOOT_PREFETCH_THREADS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
}
