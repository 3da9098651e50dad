//! The pack ↔ OCI mapping (docs/FORMAT.md §14): a pack is an OCI 1.1 image manifest with
//! `artifactType` [`ARTIFACT_TYPE`]; its config blob holds the header and the placement of
//! the index, the first layer is the pack's `INDX` frame, and every non-zero chunk's stored
//! payload is one more layer, in file order. Packs with more chunks than fit one manifest
//! are split into parts listed by an image index. A pulled pack is rebuilt from these byte
//! for byte.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use oci_spec::image::{
    Descriptor, Digest, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder,
    MediaType,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use vmpack_formats::pack::{ChunkEntry, Codec, PackReader, Progress, Skeleton};

use crate::cache::ChunkCache;
use crate::client::{sha256_digest, BlobMismatch, Client, MEDIA_INDEX, MEDIA_MANIFEST};

pub const ARTIFACT_TYPE: &str = "application/vnd.vmpack.pack.v1";
pub const PART_ARTIFACT_TYPE: &str = "application/vnd.vmpack.pack.part.v1";
pub const CONFIG_MEDIA: &str = "application/vnd.vmpack.pack.config.v1+json";
pub const INDEX_MEDIA: &str = "application/vnd.vmpack.pack.index.v1";
pub const CHUNK_MEDIA: &str = "application/vnd.vmpack.pack.chunk.v1";
pub const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.vmpack.signature.v1";
pub const SIGNATURE_MEDIA: &str = "application/vnd.vmpack.signature.v1+sshsig";
pub const EMPTY_MEDIA: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_BLOB: &[u8] = b"{}";

/// Layers per manifest that vmpack writes: well under the 4 MiB manifest limit (about
/// 120 bytes a layer) and under the layer counts hosted registries accept.
pub const DEFAULT_MAX_LAYERS: usize = 4000;
/// Parts of one pack (bounds what a reader fetches before any data).
pub const MAX_PARTS: usize = 4096;
/// The config blob is a few hundred bytes plus signatures.
const MAX_CONFIG_LEN: u64 = 8 << 20;
/// Largest index blob a pull accepts (the format's own limit is 4 GiB).
const MAX_INDEX_LEN: u64 = 1 << 30;

/// The config blob (JSON).
#[derive(Serialize, Deserialize, Debug)]
pub struct PackConfig {
    /// Always `"vmpack"`.
    pub format: String,
    /// Version of this mapping: 1.
    pub mapping: u32,
    /// The 32 header bytes, hex.
    pub header: String,
    /// File offset of the `INDX` frame.
    pub index_offset: u64,
    /// Size of the whole pack file.
    pub size: u64,
    /// `sha256:<hex>` of the `INDX` frame: the pack's root digest.
    pub root_digest: String,
    /// Bodies of the pack's `SIGN` frames, base64 (standard alphabet, padded), in order.
    #[serde(default)]
    pub signatures: Vec<String>,
    /// For a diff pack: where its parent is in the same repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentLink>,
}

/// Where a diff pack's parent is: in the same repository, by the digest of what its own
/// tag points to (docs/FORMAT.md §14, "Diff packs").
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ParentLink {
    /// `sha256:` + the parent's root digest (which the diff pack's manifest names too).
    pub root_digest: String,
    /// `sha256:` digest of the parent's head manifest or image index.
    pub digest: String,
}

impl ParentLink {
    fn check(&self, what: &str) -> Result<()> {
        for d in [&self.root_digest, &self.digest] {
            let ok = d.strip_prefix("sha256:").is_some_and(|h| {
                h.len() == 64
                    && h.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            });
            if !ok {
                bail!("{what}: the config's parent digest '{}' is not sha256:<64 lowercase hex digits>", d.escape_debug());
            }
        }
        Ok(())
    }
}

/// The tag a diff pack's parent is pushed under: `vmpack-root-` + its root digest's hex.
pub fn root_tag(root_hex: &str) -> String {
    format!("vmpack-root-{root_hex}")
}

fn other(s: &str) -> MediaType {
    MediaType::Other(s.to_string())
}

fn descriptor(media: MediaType, digest: &str, size: u64) -> Result<Descriptor> {
    Ok(Descriptor::new(media, size, Digest::from_str(digest)?))
}

/// Runs `work(i)` for i in 0..n on `threads` threads; stops at the first error.
pub fn parallel_for(
    n: usize,
    threads: usize,
    work: &(dyn Fn(usize) -> Result<()> + Sync),
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first: Mutex<Option<(usize, anyhow::Error)>> = Mutex::new(None);
    std::thread::scope(|s| {
        let mut started = 0;
        for _ in 0..threads.clamp(1, n.max(1)) {
            // Workers are a speed-up: short of threads, fewer do the work (this one at least).
            let spawned = std::thread::Builder::new().spawn_scoped(s, || {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    if let Err(e) = work(i) {
                        stop.store(true, Ordering::Relaxed);
                        let mut g = first.lock().unwrap_or_else(|p| p.into_inner());
                        // The lowest item wins, for stable messages.
                        if g.as_ref().is_none_or(|(j, _)| i < *j) {
                            *g = Some((i, e));
                        }
                        break;
                    }
                }
            });
            match spawned {
                Ok(_) => started += 1,
                Err(_) => break,
            }
        }
        if started == 0 {
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                if let Err(e) = work(i) {
                    *first.lock().unwrap_or_else(|p| p.into_inner()) = Some((i, e));
                    break;
                }
            }
        }
    });
    match first.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

/// One blob the push must make sure the registry has.
enum BlobSource<'a> {
    Bytes(&'a [u8]),
    Chunk(&'a ChunkEntry),
}

/// What [`push`] did.
#[derive(Debug, Serialize)]
pub struct PushReport {
    pub reference: String,
    /// `sha256:` digest of the manifest (or image index) the tag points to.
    pub digest: String,
    pub root_digest: String,
    pub chunks: u64,
    /// Distinct blobs the pack needs (chunks, index, config).
    pub blobs: u64,
    pub uploaded_blobs: u64,
    pub uploaded_bytes: u64,
    /// Blobs the registry already had (bytes not sent).
    pub present_blobs: u64,
    pub present_bytes: u64,
    /// The repository blobs were mounted from (cross-repository mount), if one was tried.
    pub mounted_from: Option<String>,
    /// Blobs the registry mounted from `mounted_from` (bytes not sent).
    pub mounted_blobs: u64,
    pub mounted_bytes: u64,
    pub manifests: u64,
    pub signatures: u64,
    /// Whether the registry has the referrers API (false: the tag fallback was used).
    pub referrers_api: Option<bool>,
    /// For a diff pack: its parent, as the config names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentLink>,
}

/// Pushes the pack at `path` to the client's reference (which must carry a tag).
/// `verify` sees the full verification, `progress` the bytes of blobs handled.
/// Blobs the repository lacks are mounted from repository `mount_from` of the same registry
/// where the registry can (cross-repository blob mount), else uploaded.
/// A diff pack names its parent with `parent` (pushed before it, in the same repository).
pub fn push(
    path: &Path,
    client: &Client,
    parent: Option<&ParentLink>,
    mount_from: Option<&str>,
    verify: &dyn Progress,
    progress: &dyn Progress,
) -> Result<PushReport> {
    let reference = client.reference().clone();
    let tag = reference
        .tag
        .clone()
        .ok_or_else(|| anyhow!("{reference}: push needs a tag (REPO:TAG)"))?;
    let reader = PackReader::open(path)?;
    // Never publish a damaged pack: every byte is checked first.
    reader.verify(verify)?;
    let skel = reader.skeleton()?;
    let threads = client.options().parallel.max(1);

    // Layer digests: an uncompressed chunk's is its SHA-256, already in the index.
    let chunks: Vec<&ChunkEntry> = skel
        .chunks()
        .iter()
        .filter(|c| c.codec != Codec::Zero)
        .collect();
    let digests: Vec<Mutex<String>> = chunks
        .iter()
        .map(|c| {
            Mutex::new(if c.codec == Codec::None {
                format!("sha256:{}", hex::encode(c.sha256))
            } else {
                String::new()
            })
        })
        .collect();
    parallel_for(chunks.len(), threads, &|i| {
        if chunks[i].codec == Codec::None {
            return Ok(());
        }
        let mut buf = Vec::new();
        reader.read_payload(chunks[i], false, &mut buf)?;
        *digests[i].lock().unwrap() = sha256_digest(&buf);
        Ok(())
    })?;
    let digests: Vec<String> = digests
        .into_iter()
        .map(|m| m.into_inner().unwrap())
        .collect();

    let config = PackConfig {
        format: "vmpack".into(),
        mapping: 1,
        header: hex::encode(skel.header()),
        index_offset: skel.index_offset(),
        size: skel.file_size(),
        root_digest: format!("sha256:{}", hex::encode(skel.root_digest())),
        signatures: skel
            .signatures()
            .iter()
            .map(|s| base64::engine::general_purpose::STANDARD.encode(s))
            .collect(),
        parent: parent.cloned(),
    };
    let config_bytes = serde_json::to_vec(&config)?;
    let config_digest = sha256_digest(&config_bytes);
    let index_bytes = skel.index_frame();
    let index_digest = config.root_digest.clone();

    // Manifests: the head holds the index and the first chunks, parts the rest.
    let per = client.options().max_layers.max(2);
    let mut layers = vec![{
        let mut d = descriptor(other(INDEX_MEDIA), &index_digest, index_bytes.len() as u64)?;
        d.set_annotations(Some(HashMap::from([(
            "org.opencontainers.image.title".to_string(),
            "index".to_string(),
        )])));
        d
    }];
    let mut chunk_layers = chunks
        .iter()
        .zip(&digests)
        .map(|(c, d)| descriptor(other(CHUNK_MEDIA), d, c.clen as u64));
    for l in chunk_layers.by_ref().take(per - 1) {
        layers.push(l?);
    }
    let empty_digest = sha256_digest(EMPTY_BLOB);
    let mut parts: Vec<Vec<u8>> = Vec::new();
    loop {
        let group: Vec<Descriptor> = chunk_layers.by_ref().take(per).collect::<Result<_>>()?;
        if group.is_empty() {
            break;
        }
        let m = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .artifact_type(other(PART_ARTIFACT_TYPE))
            .config(descriptor(MediaType::EmptyJSON, &empty_digest, 2)?)
            .layers(group)
            .build()?;
        parts.push(serde_json::to_vec(&m)?);
    }
    if parts.len() + 1 > MAX_PARTS {
        bail!(
            "{}: {} chunks need more than {MAX_PARTS} manifests",
            path.display(),
            chunks.len()
        );
    }
    let head = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .artifact_type(other(ARTIFACT_TYPE))
        .config(descriptor(
            other(CONFIG_MEDIA),
            &config_digest,
            config_bytes.len() as u64,
        )?)
        .layers(layers)
        .build()?;
    let head_bytes = serde_json::to_vec(&head)?;

    // Blobs the registry is known to hold: those of what the tag points to now.
    let mut present: HashSet<String> = HashSet::new();
    if let Ok(Some((_, old, _))) = resolve_manifests(client, &tag, None, false) {
        for m in &old {
            present.extend(m.layers().iter().map(|l| l.digest().to_string()));
            present.insert(m.config().digest().to_string());
        }
    }
    let mut wanted: Vec<(String, u64, BlobSource)> = vec![
        (
            index_digest.clone(),
            index_bytes.len() as u64,
            BlobSource::Bytes(index_bytes),
        ),
        (
            config_digest.clone(),
            config_bytes.len() as u64,
            BlobSource::Bytes(&config_bytes),
        ),
    ];
    if !parts.is_empty() || !skel.signatures().is_empty() {
        wanted.push((empty_digest.clone(), 2, BlobSource::Bytes(EMPTY_BLOB)));
    }
    for (c, d) in chunks.iter().zip(&digests) {
        wanted.push((d.clone(), c.clen as u64, BlobSource::Chunk(c)));
    }
    let mut seen = HashSet::new();
    wanted.retain(|(d, _, _)| seen.insert(d.clone()));
    let (up_blobs, up_bytes, have_blobs, have_bytes) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let (mounted_blobs, mounted_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    parallel_for(wanted.len(), threads, &|i| {
        let (digest, size, src) = &wanted[i];
        if present.contains(digest) || client.blob_exists(digest)? {
            have_blobs.fetch_add(1, Ordering::Relaxed);
            have_bytes.fetch_add(*size, Ordering::Relaxed);
            progress.advance(*size);
            return Ok(());
        }
        let mut buf = Vec::new();
        let data: &[u8] = match src {
            BlobSource::Bytes(b) => b,
            BlobSource::Chunk(c) => {
                reader.read_payload(c, false, &mut buf)?;
                &buf
            }
        };
        if client.upload_or_mount(digest, data, mount_from)? {
            mounted_blobs.fetch_add(1, Ordering::Relaxed);
            mounted_bytes.fetch_add(*size, Ordering::Relaxed);
        } else {
            up_blobs.fetch_add(1, Ordering::Relaxed);
            up_bytes.fetch_add(*size, Ordering::Relaxed);
        }
        progress.advance(*size);
        Ok(())
    })?;

    let mut manifests = 1u64;
    let top: (String, &'static str, u64) = if parts.is_empty() {
        let (d, _) = client.put_manifest(&tag, MEDIA_MANIFEST, &head_bytes)?;
        (d, MEDIA_MANIFEST, head_bytes.len() as u64)
    } else {
        let mut entries = Vec::new();
        let (hd, _) =
            client.put_manifest(&sha256_digest(&head_bytes), MEDIA_MANIFEST, &head_bytes)?;
        let mut e = descriptor(MediaType::ImageManifest, &hd, head_bytes.len() as u64)?;
        e.set_artifact_type(Some(other(ARTIFACT_TYPE)));
        entries.push(e);
        for p in &parts {
            let (pd, _) = client.put_manifest(&sha256_digest(p), MEDIA_MANIFEST, p)?;
            let mut e = descriptor(MediaType::ImageManifest, &pd, p.len() as u64)?;
            e.set_artifact_type(Some(other(PART_ARTIFACT_TYPE)));
            entries.push(e);
            manifests += 1;
        }
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .artifact_type(other(ARTIFACT_TYPE))
            .manifests(entries)
            .build()?;
        let ib = serde_json::to_vec(&index)?;
        let (d, _) = client.put_manifest(&tag, MEDIA_INDEX, &ib)?;
        manifests += 1;
        (d, MEDIA_INDEX, ib.len() as u64)
    };

    let mut referrers_api = None;
    let subject = descriptor(
        if top.1 == MEDIA_INDEX {
            MediaType::ImageIndex
        } else {
            MediaType::ImageManifest
        },
        &top.0,
        top.2,
    )?;
    for sig in skel.signatures() {
        referrers_api = Some(push_signature(client, &subject, sig)?);
    }
    Ok(PushReport {
        reference: reference.to_string(),
        digest: top.0,
        root_digest: config.root_digest,
        chunks: chunks.len() as u64,
        blobs: wanted.len() as u64,
        uploaded_blobs: up_blobs.into_inner(),
        uploaded_bytes: up_bytes.into_inner(),
        present_blobs: have_blobs.into_inner(),
        present_bytes: have_bytes.into_inner(),
        mounted_from: mount_from.map(str::to_string),
        mounted_blobs: mounted_blobs.into_inner(),
        mounted_bytes: mounted_bytes.into_inner(),
        manifests,
        signatures: skel.signatures().len() as u64,
        referrers_api,
        parent: config.parent,
    })
}

/// Stores one signature as an OCI referrer of `subject`; where the registry has no
/// referrers API, also lists it in the `sha256-<hex>` tag's image index (the spec's
/// fallback). Returns whether the registry has the referrers API.
pub fn push_signature(client: &Client, subject: &Descriptor, sig: &[u8]) -> Result<bool> {
    let empty = sha256_digest(EMPTY_BLOB);
    if !client.blob_exists(&empty)? {
        client.upload_blob(&empty, EMPTY_BLOB)?;
    }
    let sd = sha256_digest(sig);
    if !client.blob_exists(&sd)? {
        client.upload_blob(&sd, sig)?;
    }
    let m = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .artifact_type(other(SIGNATURE_ARTIFACT_TYPE))
        .config(descriptor(MediaType::EmptyJSON, &empty, 2)?)
        .layers(vec![descriptor(
            other(SIGNATURE_MEDIA),
            &sd,
            sig.len() as u64,
        )?])
        .subject(subject.clone())
        .build()?;
    let mb = serde_json::to_vec(&m)?;
    let (md, api) = client.put_manifest(&sha256_digest(&mb), MEDIA_MANIFEST, &mb)?;
    if api {
        return Ok(true);
    }
    let tag = subject.digest().to_string().replace(':', "-");
    let mut index: ImageIndex = match client.get_manifest(&tag)? {
        Some(old) if old.media_type.starts_with(MEDIA_INDEX) => serde_json::from_slice(&old.bytes)
            .with_context(|| format!("{}: the referrers tag {tag}", client.reference()))?,
        _ => ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(Vec::new())
            .build()?,
    };
    if !index
        .manifests()
        .iter()
        .any(|d| d.digest().to_string() == md)
    {
        let mut d = descriptor(MediaType::ImageManifest, &md, mb.len() as u64)?;
        d.set_artifact_type(Some(other(SIGNATURE_ARTIFACT_TYPE)));
        let mut list = index.manifests().clone();
        list.push(d);
        index.set_manifests(list);
        client.put_manifest(&tag, MEDIA_INDEX, &serde_json::to_vec(&index)?)?;
    }
    Ok(false)
}

/// The manifests of the pack a reference names: the head first, then its parts.
/// `None` if the registry has nothing under that reference.
/// With a `cache`, a digest reference's manifest comes from it where it holds it, and with
/// `guess` so does the one a tag pointed to when last resolved; the returned flag says
/// whether the registry was asked (`false`: the caller must confirm the tag's digest).
fn resolve_manifests(
    client: &Client,
    reference: &str,
    cache: Option<&ChunkCache>,
    guess: bool,
) -> Result<Option<(String, Vec<ImageManifest>, bool)>> {
    let by_digest = reference.starts_with("sha256:");
    let recalled = match cache {
        Some(_) if by_digest => Some(reference.to_string()),
        Some(c) if guess => c.recall_ref(&client.reference().to_string()),
        _ => None,
    };
    let cached_top = recalled.and_then(|d| {
        let bytes = cached_blob(cache, &d, None)?;
        Some(crate::client::Manifest {
            bytes,
            media_type: String::new(),
            digest: d,
        })
    });
    let asked = cached_top.is_none() || by_digest;
    let top = match cached_top {
        Some(m) => m,
        None => {
            let Some(m) = client.get_manifest(reference)? else {
                return Ok(None);
            };
            cache_blob(cache, &m.digest, &m.bytes);
            if let (Some(c), false) = (cache, by_digest) {
                c.remember_ref(&client.reference().to_string(), &m.digest);
            }
            m
        }
    };
    let what = format!("{}", client.reference());
    let is_index = top.media_type.starts_with(MEDIA_INDEX)
        || serde_json::from_slice::<serde_json::Value>(&top.bytes)
            .ok()
            .and_then(|v| v.get("manifests").map(|_| ()))
            .is_some();
    let manifests = if is_index {
        let index: ImageIndex = serde_json::from_slice(&top.bytes)
            .with_context(|| format!("{what}: not an OCI image index"))?;
        if index
            .artifact_type()
            .as_ref()
            .map(|m| m.to_string())
            .as_deref()
            != Some(ARTIFACT_TYPE)
        {
            bail!("{what}: not a vmpack pack (image index without artifactType {ARTIFACT_TYPE})");
        }
        if index.manifests().is_empty() || index.manifests().len() > MAX_PARTS {
            bail!(
                "{what}: a pack has 1 to {MAX_PARTS} manifests, this index lists {}",
                index.manifests().len()
            );
        }
        // Parts are named by digest: the cache may hold them, and the rest come in parallel.
        let parts: Vec<Mutex<Option<ImageManifest>>> =
            index.manifests().iter().map(|_| Mutex::new(None)).collect();
        parallel_for(parts.len(), client.options().parallel.max(1), &|i| {
            let d = &index.manifests()[i];
            let digest = d.digest().to_string();
            let bytes = match cached_blob(cache, &digest, Some(d.size())) {
                Some(b) => b,
                None => {
                    let m = client.get_manifest(&digest)?.ok_or_else(|| {
                        anyhow!("{what}: manifest {digest} listed by the index is missing")
                    })?;
                    cache_blob(cache, &digest, &m.bytes);
                    m.bytes
                }
            };
            *parts[i].lock().unwrap_or_else(|p| p.into_inner()) =
                Some(parse_manifest(&bytes, &what)?);
            Ok(())
        })?;
        parts
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(|p| p.into_inner())
                    .expect("every part was fetched")
            })
            .collect()
    } else {
        vec![parse_manifest(&top.bytes, &what)?]
    };
    let head_type = manifests[0].artifact_type().as_ref().map(|m| m.to_string());
    if head_type.as_deref() != Some(ARTIFACT_TYPE) {
        bail!(
            "{what}: not a vmpack pack (artifactType {}, expected {ARTIFACT_TYPE})",
            head_type.as_deref().unwrap_or("none")
        );
    }
    for p in &manifests[1..] {
        if p.artifact_type().as_ref().map(|m| m.to_string()).as_deref() != Some(PART_ARTIFACT_TYPE)
        {
            bail!("{what}: a part manifest without artifactType {PART_ARTIFACT_TYPE}");
        }
    }
    Ok(Some((top.digest, manifests, asked)))
}

fn parse_manifest(bytes: &[u8], what: &str) -> Result<ImageManifest> {
    serde_json::from_slice(bytes).with_context(|| format!("{what}: not an OCI image manifest"))
}

/// A pack in a registry, resolved down to its skeleton: enough to fetch any chunk.
pub struct RemotePack {
    /// `sha256:` digest of what the reference points to.
    pub digest: String,
    /// Whether the registry confirmed what the reference points to. `false`: the manifest
    /// is the one the tag pointed to when last resolved, taken from the cache; the caller
    /// checks it with [`Client::manifest_digest`] before trusting it is the tag's.
    pub confirmed: bool,
    /// When each step of the resolve ended, in ms after it started: `manifest`, then
    /// `config and index` (for `restore REF`'s timing line).
    pub timings: Vec<(&'static str, f64)>,
    pub skeleton: Skeleton,
    /// For a diff pack: its parent, as the config names it (checked against the pack's own
    /// manifest by the caller).
    pub parent: Option<ParentLink>,
    /// The blob of every non-zero chunk, keyed by the chunk's payload file offset.
    blobs: HashMap<u64, (String, u64)>,
}

impl RemotePack {
    /// The blob holding a chunk's stored payload (`None` for zero chunks).
    pub fn blob_of(&self, chunk: &ChunkEntry) -> Option<&(String, u64)> {
        self.blobs.get(&chunk.payload_offset)
    }

    /// `section 'NAME' chunk N`, for messages.
    pub fn chunk_name(&self, c: &ChunkEntry) -> String {
        format!(
            "section '{}' chunk {}",
            self.skeleton.section_name(c.section),
            c.seq
        )
    }
}

/// Reads a pack's manifests, config and index from the registry and checks that they
/// describe a valid pack (everything but the chunk payloads).
pub fn resolve(client: &Client) -> Result<RemotePack> {
    resolve_cached(client, None, false)
}

/// [`resolve`], with the blobs named by digest (part manifests, config, index) taken from
/// `cache` where it holds them, and stored there when fetched: a second resolve of the same
/// pack asks the registry only what its reference points to now. Cached bytes are checked
/// against their digest like fetched ones. With `guess`, a tag's manifest too is the cached
/// one it pointed to last time, if any (see [`RemotePack::confirmed`]).
pub fn resolve_cached(
    client: &Client,
    cache: Option<&ChunkCache>,
    guess: bool,
) -> Result<RemotePack> {
    let started = std::time::Instant::now();
    let ms = || started.elapsed().as_secs_f64() * 1000.0;
    let meta = cache.map(ChunkCache::meta);
    let cache = meta.as_ref();
    let mut timings = Vec::new();
    let r = client.reference();
    let what = r.to_string();
    let (top_digest, manifests, confirmed) =
        resolve_manifests(client, r.manifest_reference(), cache, guess)?
            .ok_or_else(|| anyhow!("{what}: not found in the registry"))?;
    timings.push(("manifest", ms()));
    let head = &manifests[0];
    let cfg_desc = head.config();
    if cfg_desc.media_type().to_string() != CONFIG_MEDIA || cfg_desc.size() > MAX_CONFIG_LEN {
        bail!("{what}: the config is not a vmpack config of at most {MAX_CONFIG_LEN} bytes");
    }
    let idx_desc = head
        .layers()
        .first()
        .filter(|l| l.media_type().to_string() == INDEX_MEDIA)
        .ok_or_else(|| anyhow!("{what}: the first layer is not the pack index"))?;
    if idx_desc.size() > MAX_INDEX_LEN {
        bail!("{what}: the index layer is over {MAX_INDEX_LEN} bytes");
    }
    // Both are named by the manifest: fetched at once (the index is checked against the
    // config's root digest below).
    let (cfg_bytes, index) = std::thread::scope(|s| {
        let idx =
            s.spawn(|| fetch_small(client, cache, idx_desc.digest().as_ref(), idx_desc.size()));
        let cfg = fetch_small(client, cache, cfg_desc.digest().as_ref(), cfg_desc.size());
        let idx = idx
            .join()
            .unwrap_or_else(|_| Err(anyhow!("{what}: fetching the index failed")));
        Ok::<_, anyhow::Error>((cfg?, idx?))
    })?;
    timings.push(("config and index", ms()));
    let cfg: PackConfig =
        serde_json::from_slice(&cfg_bytes).with_context(|| format!("{what}: the config blob"))?;
    if cfg.format != "vmpack" || cfg.mapping != 1 {
        bail!(
            "{what}: config format '{}' mapping {} (this vmpack reads mapping 1)",
            cfg.format,
            cfg.mapping
        );
    }
    if idx_desc.digest().to_string() != cfg.root_digest {
        bail!(
            "{what}: the index layer does not match the root digest {}",
            cfg.root_digest
        );
    }
    if let Some(p) = &cfg.parent {
        p.check(&what)?;
    }
    let header: [u8; 32] = hex::decode(&cfg.header)
        .ok()
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| anyhow!("{what}: the config's header is not 32 bytes of hex"))?;
    let signatures = cfg
        .signatures
        .iter()
        .map(|s| base64::engine::general_purpose::STANDARD.decode(s))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{what}: a signature in the config"))?;
    let skeleton = Skeleton::new(&what, header, index, cfg.index_offset, signatures)?;
    if skeleton.file_size() != cfg.size {
        bail!(
            "{what}: the config says {} bytes, the index implies {}",
            cfg.size,
            skeleton.file_size()
        );
    }
    let layers: Vec<&Descriptor> = head.layers()[1..]
        .iter()
        .chain(manifests[1..].iter().flat_map(|m| m.layers().iter()))
        .collect();
    let chunks: Vec<&ChunkEntry> = skeleton
        .chunks()
        .iter()
        .filter(|c| c.codec != Codec::Zero)
        .collect();
    if layers.len() != chunks.len() {
        bail!(
            "{what}: {} chunk layers for {} stored chunks",
            layers.len(),
            chunks.len()
        );
    }
    let mut blobs = HashMap::with_capacity(chunks.len());
    for (c, l) in chunks.iter().zip(&layers) {
        let d = l.digest().to_string();
        let ok = l.media_type().to_string() == CHUNK_MEDIA
            && l.size() == c.clen as u64
            && (c.codec != Codec::None || d == format!("sha256:{}", hex::encode(c.sha256)))
            && d.starts_with("sha256:");
        if !ok {
            bail!(
                "{what}: the layer for section '{}' chunk {} does not match the pack index",
                skeleton.section_name(c.section),
                c.seq
            );
        }
        blobs.insert(c.payload_offset, (d, l.size()));
    }
    Ok(RemotePack {
        digest: top_digest,
        confirmed,
        timings,
        skeleton,
        parent: cfg.parent,
        blobs,
    })
}

/// A small blob (config, index, part manifest): from `cache` if it holds it intact, else
/// from the registry (checked against its digest, then cached).
fn fetch_small(
    client: &Client,
    cache: Option<&ChunkCache>,
    digest: &str,
    size: u64,
) -> Result<Vec<u8>> {
    if let Some(v) = cached_blob(cache, digest, Some(size)) {
        return Ok(v);
    }
    let mut v = Vec::with_capacity(size as usize);
    client.get_blob(digest, size, &mut v, &|_| {})?;
    cache_blob(cache, digest, &v);
    Ok(v)
}

/// A cached blob whose bytes match `digest` (a damaged entry is removed). Without a known
/// `size`, one of at most a manifest's size limit.
fn cached_blob(cache: Option<&ChunkCache>, digest: &str, size: Option<u64>) -> Option<Vec<u8>> {
    let cache = cache?;
    if let Some(size) = size {
        if !cache.contains(digest, size) {
            return None;
        }
    }
    let mut v = Vec::new();
    cache
        .open(digest)?
        .take(crate::client::MAX_MANIFEST_LEN.max(size.unwrap_or(0)) + 1)
        .read_to_end(&mut v)
        .ok()?;
    if sha256_digest(&v) == digest {
        Some(v)
    } else {
        cache.remove(digest);
        None
    }
}

/// Best effort: a full cache folder only costs a later fetch.
fn cache_blob(cache: Option<&ChunkCache>, digest: &str, bytes: &[u8]) {
    if let Some(c) = cache {
        let _ = c.insert_with(digest, &mut |w| Ok(w.write_all(bytes)?));
    }
}

/// Fetches one chunk's stored payload with a range request on its blob and checks it:
/// an uncompressed chunk against its SHA-256 (the blob digest), a compressed one against
/// the CRC-32 the index holds. The building block of lazy restores from a registry.
pub fn fetch_chunk(client: &Client, pack: &RemotePack, chunk: &ChunkEntry) -> Result<Vec<u8>> {
    let Some((digest, size)) = pack.blob_of(chunk) else {
        return Ok(Vec::new());
    };
    let data = client.get_blob_range(digest, 0..*size, *size)?;
    if sha256_digest(&data) != *digest {
        bail!(
            "{}: {}: the registry's blob {digest} does not match its digest",
            client.reference(),
            pack.chunk_name(chunk)
        );
    }
    Ok(data)
}

/// What [`pull`] did.
#[derive(Debug, Serialize)]
pub struct PullReport {
    pub reference: String,
    pub digest: String,
    pub root_digest: String,
    pub size: u64,
    pub chunks: u64,
    /// Distinct chunk blobs the pack needs.
    pub blobs: u64,
    pub fetched_blobs: u64,
    pub fetched_bytes: u64,
    /// Blobs the local chunk cache already held.
    pub cached_blobs: u64,
    pub cached_bytes: u64,
    /// For a diff pack: its parent, as the config names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentLink>,
}

/// Pulls the client's reference into `out`: chunks missing from `cache` are downloaded
/// (in parallel, each checked against its digest and stored in the cache), then the pack
/// is written in order from the cache. The caller checks the written pack (its root
/// digest and chunks) before giving it its final name.
pub fn pull(
    client: &Client,
    cache: &ChunkCache,
    out: &mut dyn Write,
    progress: &dyn Progress,
) -> Result<PullReport> {
    let pack = resolve_cached(client, Some(cache), false)?;
    let chunks: Vec<&ChunkEntry> = pack
        .skeleton
        .chunks()
        .iter()
        .filter(|c| c.codec != Codec::Zero)
        .collect();
    // Distinct blobs, each named by the first chunk that uses it.
    let mut first_user: HashMap<&str, &ChunkEntry> = HashMap::new();
    let mut unique: Vec<(&str, u64)> = Vec::new();
    for c in &chunks {
        let (d, s) = pack.blob_of(c).expect("every stored chunk has a blob");
        if first_user.insert(d, c).is_none() {
            unique.push((d, *s));
        }
    }
    let missing: Vec<(&str, u64)> = unique
        .iter()
        .filter(|(d, s)| !cache.contains(d, *s))
        .copied()
        .collect();
    let cached_bytes: u64 =
        unique.iter().map(|u| u.1).sum::<u64>() - missing.iter().map(|m| m.1).sum::<u64>();
    progress.advance(cached_bytes);
    let fetched = AtomicU64::new(0);
    let retries = client.options().retries;
    parallel_for(missing.len(), client.options().parallel.max(1), &|i| {
        let (digest, size) = missing[i];
        let mut attempt = 0;
        loop {
            let counted = AtomicU64::new(0);
            let r = cache.insert_with(digest, &mut |w| {
                client.get_blob(digest, size, w, &|n| {
                    counted.fetch_add(n, Ordering::Relaxed);
                    progress.advance(n);
                })
            });
            match r {
                Ok(()) => break,
                Err(e) if e.downcast_ref::<BlobMismatch>().is_some() => {
                    return Err(e.context(format!(
                        "{}: {}: refused",
                        client.reference(),
                        pack.chunk_name(first_user[digest])
                    )));
                }
                // Requests are retried inside the client; this restarts a blob whose body
                // broke off midway, once.
                Err(e) if attempt >= retries.min(1) => return Err(e),
                Err(_) => {
                    // Start the blob over; its bytes so far are not counted twice.
                    attempt += 1;
                    std::thread::sleep(
                        client.options().backoff.saturating_mul(1 << attempt.min(5)),
                    );
                }
            }
            let _ = counted;
        }
        fetched.fetch_add(size, Ordering::Relaxed);
        Ok(())
    })?;

    let mut buf = vec![0u8; 1 << 20];
    pack.skeleton.write_pack(out, &mut |c, w| {
        let (digest, size) = pack.blob_of(c).expect("every stored chunk has a blob");
        let mut f = cache.open(digest).ok_or_else(|| {
            std::io::Error::other(format!("{digest} left the chunk cache during the pull"))
        })?;
        let mut h = Sha256::new();
        let mut left = *size;
        while left > 0 {
            let n = (buf.len() as u64).min(left) as usize;
            f.read_exact(&mut buf[..n])?;
            h.update(&buf[..n]);
            w.write_all(&buf[..n])?;
            left -= n as u64;
        }
        if format!("sha256:{}", hex::encode(h.finalize())) != *digest {
            cache.remove(digest);
            return Err(std::io::Error::other(format!(
                "cached chunk {digest} was damaged (removed from the cache; run the pull again)"
            )));
        }
        Ok(())
    })?;
    Ok(PullReport {
        reference: client.reference().to_string(),
        digest: pack.digest.clone(),
        root_digest: format!("sha256:{}", hex::encode(pack.skeleton.root_digest())),
        size: pack.skeleton.file_size(),
        chunks: chunks.len() as u64,
        blobs: unique.len() as u64,
        fetched_blobs: missing.len() as u64,
        fetched_bytes: fetched.into_inner(),
        cached_blobs: (unique.len() - missing.len()) as u64,
        cached_bytes,
        parent: pack.parent.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_parent_is_checked_and_old_configs_have_none() {
        let hex = "ab".repeat(32);
        let good = ParentLink {
            root_digest: format!("sha256:{hex}"),
            digest: format!("sha256:{}", "01".repeat(32)),
        };
        assert!(good.check("r").is_ok());
        for bad in [
            ParentLink {
                root_digest: hex.clone(),
                ..good.clone()
            },
            ParentLink {
                digest: format!("sha256:{}", "AB".repeat(32)),
                ..good.clone()
            },
            ParentLink {
                digest: "sha256:../x".into(),
                ..good.clone()
            },
        ] {
            let e = bad.check("reg/repo:t").unwrap_err().to_string();
            assert!(
                e.contains("reg/repo:t") && e.contains("parent digest"),
                "{e}"
            );
        }
        // A config without `parent` (every pack pushed before diff packs could be) reads as
        // none, and one without a parent is written without the key.
        let old = r#"{"format":"vmpack","mapping":1,"header":"","index_offset":0,"size":0,"root_digest":"sha256:x"}"#;
        let c: PackConfig = serde_json::from_str(old).unwrap();
        assert!(c.parent.is_none());
        assert!(!serde_json::to_string(&c).unwrap().contains("parent"));
        assert_eq!(root_tag(&hex), format!("vmpack-root-{hex}"));
        assert!(
            root_tag(&hex).len() <= 128,
            "a tag is at most 128 characters"
        );
    }
}
