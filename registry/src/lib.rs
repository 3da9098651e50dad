//! Moving `.vmpack` files through OCI registries (docker's `registry`, Harbor, GHCR, ECR,
//! Docker Hub): push and pull with chunk-level dedupe, a local content-addressed chunk
//! cache, and SSH signatures over a pack's root digest. No KVM here.
//!
//! The HTTP side is a small blocking client over `ureq` (a CLI moves blobs with a few
//! worker threads; an async runtime would add weight and nothing else), with the
//! manifest types of `oci-spec`. The mapping is specified in docs/FORMAT.md §14.

pub mod cache;
pub mod client;
pub mod oci;
pub mod reference;
pub mod signature;

pub use cache::ChunkCache;
pub use client::{Client, ClientOptions, Credentials};
pub use oci::{
    fetch_chunk, pull, push, resolve, resolve_cached, root_tag, ParentLink, PullReport, PushReport,
    RemotePack,
};
pub use reference::Reference;
