//! A small blocking client for the OCI distribution API (v2): manifests, blobs (HEAD, GET,
//! ranged GET, POST+PUT and POST+PATCH…+PUT uploads), basic and bearer-token auth, retries
//! with back-off. One `Client` serves one repository and is shared by worker threads.

use std::io::{Read, Write};
use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use sha2::{Digest, Sha256};
use ureq::http::{self, Response};
use ureq::Body;

use crate::reference::Reference;

/// Uploads larger than this go in PATCH pieces of this size.
pub const UPLOAD_PIECE: usize = 16 << 20;
/// Manifests and image indexes larger than this are refused (the distribution spec's
/// SHOULD-accept size, and what Docker Hub and GHCR enforce).
pub const MAX_MANIFEST_LEN: u64 = 4 << 20;

pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Login for a registry.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, ***)", self.username)
    }
}

#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Allow plain HTTP to a registry that is not on loopback.
    pub insecure: bool,
    /// Trust the certificates in this PEM file (instead of the built-in Mozilla roots); the
    /// CLI passes `--ca-file`, else `$SSL_CERT_FILE` (this crate reads no environment).
    pub ca_file: Option<std::path::PathBuf>,
    /// Explicit login (`--username`/`--password-stdin`); otherwise docker's config and
    /// credential helpers are asked.
    pub credentials: Option<Credentials>,
    /// Attempts after the first for a failed request (connection errors, 429, 5xx).
    pub retries: u32,
    /// First back-off delay; doubled per attempt, at most 5 s.
    pub backoff: Duration,
    /// Blob transfers at once.
    pub parallel: usize,
    /// Layers per manifest a push writes before it splits into parts (at least 2; the CLI
    /// passes `$VMPACK_OCI_MAX_LAYERS`, for registries with smaller limits and for tests).
    pub max_layers: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure: false,
            ca_file: None,
            credentials: None,
            retries: 4,
            backoff: Duration::from_millis(250),
            parallel: 4,
            max_layers: crate::oci::DEFAULT_MAX_LAYERS,
        }
    }
}

pub struct Client {
    agent: ureq::Agent,
    /// `http://HOST` or `https://HOST`.
    base: Mutex<String>,
    /// A loopback registry spoken to over plain HTTP so far, which may turn out to be HTTPS.
    try_https: std::sync::atomic::AtomicBool,
    reference: Reference,
    opts: ClientOptions,
    /// The login, looked up on the first challenge: docker's credential helpers are
    /// programs, not worth running for a registry that asks for none.
    creds: std::sync::OnceLock<Option<Credentials>>,
    /// The `Authorization` value in use (basic, or a bearer token got for a scope).
    auth: Mutex<Option<String>>,
}

/// A fetched manifest or image index.
pub struct Manifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn status_error(what: &str, resp: &mut Response<Body>) -> anyhow::Error {
    let code = resp.status();
    let body = resp
        .body_mut()
        .with_config()
        .limit(4096)
        .lossy_utf8(true)
        .read_to_string()
        .unwrap_or_default();
    // The registry's JSON errors: {"errors":[{"code":..,"message":..}]}
    let detail = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let e = v.get("errors")?.get(0)?;
            Some(format!(
                "{} {}",
                e.get("code")?.as_str().unwrap_or(""),
                e.get("message").and_then(|m| m.as_str()).unwrap_or("")
            ))
        })
        .unwrap_or_else(|| body.trim().chars().take(200).collect());
    anyhow!("{what}: HTTP {code} {detail}")
}

fn retryable_status(code: u16) -> bool {
    code == 429 || code == 408 || (500..600).contains(&code)
}

impl Client {
    pub fn new(reference: &Reference, opts: ClientOptions) -> Result<Client> {
        let host = reference.api_host();
        let ca = opts.ca_file.clone();
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(path) = &ca {
            let pem = std::fs::read(path)
                .with_context(|| format!("{}: reading the CA file", path.display()))?;
            let mut certs = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                if let ureq::tls::PemItem::Certificate(c) =
                    item.with_context(|| format!("{}: not PEM", path.display()))?
                {
                    certs.push(c.to_owned());
                }
            }
            if certs.is_empty() {
                bail!("{}: no PEM certificate in the CA file", path.display());
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(format!("vmpack/{}", env!("CARGO_PKG_VERSION")))
            .max_idle_connections_per_host(opts.parallel.max(1) * 2)
            .build()
            .into();
        let creds = std::sync::OnceLock::new();
        if let Some(c) = &opts.credentials {
            let _ = creds.set(Some(c.clone()));
        }
        // Loopback registries may speak plain HTTP (docker's rule too): tried first, and a
        // TLS server's answer to plain HTTP (a 400 that says so) switches to HTTPS.
        let plain = opts.insecure || reference.is_loopback();
        let base = format!("{}://{host}", if plain { "http" } else { "https" });
        let try_https = !opts.insecure && reference.is_loopback();
        Ok(Client {
            agent,
            base: Mutex::new(base),
            try_https: std::sync::atomic::AtomicBool::new(try_https),
            reference: reference.clone(),
            opts,
            creds,
            auth: Mutex::new(None),
        })
    }

    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v2/{}/{path}", self.base(), self.reference.repository)
    }

    /// Resolves a `Location` header against the registry.
    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}{location}", self.base())
        }
    }

    fn base(&self) -> String {
        self.base.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn sleep_backoff(&self, attempt: u32) {
        let d = self
            .opts
            .backoff
            .saturating_mul(1 << attempt.min(10))
            .min(Duration::from_secs(5));
        std::thread::sleep(d);
    }

    /// Sends one request, answering an auth challenge once and retrying transient
    /// failures. Returns the final response whatever its status.
    fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response<Body>> {
        let mut attempt = 0;
        let mut authed = false;
        let mut url = url.to_string();
        loop {
            let mut b = http::Request::builder().method(method).uri(&url);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            if let Some(a) = self.auth.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                b = b.header("Authorization", a);
            }
            let result = match body {
                Some(data) => self.agent.run(b.body(data)?),
                None => self.agent.run(b.body(())?),
            };
            if let Ok(r) = &result {
                if r.status() != 400 {
                    // It answered plain HTTP: no TLS server.
                    self.try_https
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                }
            }
            match result {
                Ok(mut resp)
                    if resp.status() == 400
                        && url.starts_with("http://")
                        && self.try_https.load(std::sync::atomic::Ordering::SeqCst) =>
                {
                    let body = resp
                        .body_mut()
                        .with_config()
                        .limit(4096)
                        .lossy_utf8(true)
                        .read_to_string()
                        .unwrap_or_default();
                    if !body.contains("HTTPS") {
                        bail!("{method} {url}: HTTP 400 {}", body.trim());
                    }
                    self.try_https
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                    let host = self.reference.api_host();
                    *self.base.lock().unwrap_or_else(|e| e.into_inner()) =
                        format!("https://{host}");
                    url = url.replacen("http://", "https://", 1);
                }
                Ok(resp) if resp.status() == 401 && !authed => {
                    let challenge = resp
                        .headers()
                        .get("www-authenticate")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    self.authenticate(&challenge)?;
                    authed = true;
                }
                Ok(resp)
                    if retryable_status(resp.status().as_u16()) && attempt < self.opts.retries =>
                {
                    self.sleep_backoff(attempt);
                    attempt += 1;
                }
                Ok(resp) => return Ok(resp),
                Err(e) if attempt < self.opts.retries && transient(&e) => {
                    self.sleep_backoff(attempt);
                    attempt += 1;
                }
                Err(e) => {
                    let hint = if e.to_string().contains("certificate") {
                        "; the registry's TLS certificate is not trusted: give --ca-file FILE \
                         with the CA that signed it (or set SSL_CERT_FILE)"
                    } else {
                        ""
                    };
                    bail!("{method} {url}: {e}{hint}");
                }
            }
        }
    }

    /// Answers a `WWW-Authenticate` challenge: basic auth, or a bearer token from the
    /// realm it names (with the login, if any, as basic auth on the token request).
    fn authenticate(&self, challenge: &str) -> Result<()> {
        let host = &self.reference.registry;
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let params = parse_challenge_params(params);
        let creds = match self.creds.get() {
            Some(c) => c,
            None => {
                let found = docker_config_credentials(&self.reference.registry)?;
                self.creds.get_or_init(|| found)
            }
        };
        let basic = creds.as_ref().map(|c| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", c.username, c.password))
            )
        });
        let value = match scheme.to_ascii_lowercase().as_str() {
            "basic" => basic.ok_or_else(|| {
                anyhow!(
                    "{host}: the registry wants a login; use --username and --password-stdin, \
                     or `docker login {host}`"
                )
            })?,
            "bearer" => {
                let realm = params
                    .iter()
                    .find(|(k, _)| k == "realm")
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| anyhow!("{host}: bearer challenge without a realm"))?;
                let mut url = realm.clone();
                let mut sep = if url.contains('?') { '&' } else { '?' };
                for key in ["service", "scope"] {
                    for (k, v) in params.iter().filter(|(k, _)| k == key) {
                        url.push(sep);
                        url.push_str(k);
                        url.push('=');
                        url.push_str(&form_encode(v));
                        sep = '&';
                    }
                }
                let mut b = http::Request::builder().method("GET").uri(&url);
                if let Some(a) = &basic {
                    b = b.header("Authorization", a);
                }
                let mut resp = self
                    .agent
                    .run(b.body(())?)
                    .with_context(|| format!("{host}: getting a token from {realm}"))?;
                if resp.status() != 200 {
                    return Err(status_error(
                        &format!("{host}: token from {realm}"),
                        &mut resp,
                    ));
                }
                let v: serde_json::Value = serde_json::from_slice(
                    &resp.body_mut().with_config().limit(1 << 20).read_to_vec()?,
                )
                .with_context(|| format!("{host}: token response from {realm}"))?;
                let token = v
                    .get("token")
                    .or_else(|| v.get("access_token"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| anyhow!("{host}: token response from {realm} has no token"))?;
                format!("Bearer {token}")
            }
            _ => bail!("{host}: unsupported authentication challenge '{challenge}'"),
        };
        let mut a = self.auth.lock().unwrap_or_else(|e| e.into_inner());
        if a.as_deref() == Some(value.as_str()) && scheme.eq_ignore_ascii_case("basic") {
            bail!("{host}: the registry refused the login (HTTP 401)");
        }
        *a = Some(value);
        Ok(())
    }

    /// Fetches a manifest or image index; `None` if the registry has no such reference.
    pub fn get_manifest(&self, reference: &str) -> Result<Option<Manifest>> {
        let url = self.url(&format!("manifests/{reference}"));
        let accept = format!("{MEDIA_MANIFEST}, {MEDIA_INDEX}");
        let mut resp = self.send("GET", &url, &[("Accept", &accept)], None)?;
        let what = format!("{}: manifest {reference}", self.reference);
        match resp.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            _ => return Err(status_error(&what, &mut resp)),
        }
        let media_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_MANIFEST_LEN)
            .read_to_vec()
            .with_context(|| what.clone())?;
        let digest = sha256_digest(&bytes);
        if reference.starts_with("sha256:") && digest != reference {
            bail!("{what}: the registry sent a manifest whose digest is {digest}");
        }
        Ok(Some(Manifest {
            bytes,
            media_type,
            digest,
        }))
    }

    /// The digest of what `reference` points to now (a HEAD request: the registry sends
    /// no body), `None` if nothing.
    pub fn manifest_digest(&self, reference: &str) -> Result<Option<String>> {
        let url = self.url(&format!("manifests/{reference}"));
        let accept = format!("{MEDIA_MANIFEST}, {MEDIA_INDEX}");
        let mut resp = self.send("HEAD", &url, &[("Accept", &accept)], None)?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            _ => {
                return Err(status_error(
                    &format!("{}: manifest {reference}", self.reference),
                    &mut resp,
                ))
            }
        }
        match resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            Some(d) if d.starts_with("sha256:") => Ok(Some(d.to_string())),
            // A registry that does not say: the manifest itself tells.
            _ => Ok(self.get_manifest(reference)?.map(|m| m.digest)),
        }
    }

    /// Stores a manifest or index under a tag or its digest. Returns its digest and
    /// whether the registry processed its `subject` (the `OCI-Subject` header: a registry
    /// with the referrers API).
    pub fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(String, bool)> {
        if bytes.len() as u64 > MAX_MANIFEST_LEN {
            bail!(
                "{}: manifest of {} bytes is over the {MAX_MANIFEST_LEN}-byte limit registries enforce",
                self.reference,
                bytes.len()
            );
        }
        let url = self.url(&format!("manifests/{reference}"));
        let mut resp = self.send("PUT", &url, &[("Content-Type", media_type)], Some(bytes))?;
        if resp.status() != 201 && resp.status() != 200 {
            return Err(status_error(
                &format!("{}: storing manifest {reference}", self.reference),
                &mut resp,
            ));
        }
        let subject = resp.headers().contains_key("oci-subject");
        Ok((sha256_digest(bytes), subject))
    }

    /// Whether the repository has a blob.
    pub fn blob_exists(&self, digest: &str) -> Result<bool> {
        let url = self.url(&format!("blobs/{digest}"));
        let mut resp = self.send("HEAD", &url, &[], None)?;
        match resp.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(status_error(
                &format!("{}: blob {digest}", self.reference),
                &mut resp,
            )),
        }
    }

    /// Uploads a blob: POST for a session, then one PUT with the data, or PATCH pieces of
    /// [`UPLOAD_PIECE`] bytes and a closing PUT. Each request is retried on its own; a
    /// sequence that still fails (e.g. the session was lost) starts over once.
    pub fn upload_blob(&self, digest: &str, data: &[u8]) -> Result<()> {
        self.upload_or_mount(digest, data, None).map(|_| ())
    }

    /// [`Client::upload_blob`], first asking the registry to mount the blob from repository
    /// `from` on the same registry (`POST …/blobs/uploads/?mount=…&from=…`). Returns whether
    /// it was mounted; a registry that cannot (or does not have it there) opens an upload
    /// session instead, which the upload uses, so asking costs no request.
    pub fn upload_or_mount(&self, digest: &str, data: &[u8], from: Option<&str>) -> Result<bool> {
        match self.upload_once(digest, data, from) {
            Ok(m) => Ok(m),
            Err(_) if self.opts.retries > 0 => {
                self.sleep_backoff(0);
                self.upload_once(digest, data, None)
            }
            Err(e) => Err(e),
        }
    }

    fn upload_once(&self, digest: &str, data: &[u8], from: Option<&str>) -> Result<bool> {
        let what = format!("{}: uploading blob {digest}", self.reference);
        let mut url = self.url("blobs/uploads/");
        if let Some(from) = from {
            url += &format!("?mount={}&from={}", form_encode(digest), form_encode(from));
        }
        let mut resp = self.send("POST", &url, &[("Content-Length", "0")], Some(&[]))?;
        if from.is_some() && resp.status() == 201 {
            return Ok(true);
        }
        if resp.status() != 202 {
            return Err(status_error(&what, &mut resp));
        }
        let mut location = self.location(&resp, &what)?;
        if data.len() > UPLOAD_PIECE {
            let mut off = 0;
            while off < data.len() {
                let end = (off + UPLOAD_PIECE).min(data.len());
                let range = format!("{off}-{}", end - 1);
                let mut resp = self.send(
                    "PATCH",
                    &location,
                    &[
                        ("Content-Type", "application/octet-stream"),
                        ("Content-Range", &range),
                    ],
                    Some(&data[off..end]),
                )?;
                if resp.status() != 202 {
                    return Err(status_error(&what, &mut resp));
                }
                location = self.location(&resp, &what)?;
                off = end;
            }
        }
        let sep = if location.contains('?') { '&' } else { '?' };
        let put_url = format!("{location}{sep}digest={}", form_encode(digest));
        let body: &[u8] = if data.len() > UPLOAD_PIECE { &[] } else { data };
        let mut resp = self.send(
            "PUT",
            &put_url,
            &[("Content-Type", "application/octet-stream")],
            Some(body),
        )?;
        if resp.status() != 201 {
            return Err(status_error(&what, &mut resp));
        }
        Ok(false)
    }

    fn location(&self, resp: &Response<Body>, what: &str) -> Result<String> {
        let l = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| anyhow!("{what}: the registry gave no upload location"))?;
        Ok(self.absolute(l))
    }

    /// Streams a blob into `out`, checking its size and digest; `progress(n)` is called as
    /// bytes arrive. The caller retries on error (it must discard what `out` got).
    pub fn get_blob(
        &self,
        digest: &str,
        size: u64,
        out: &mut dyn Write,
        progress: &dyn Fn(u64),
    ) -> Result<()> {
        let what = format!("{}: blob {digest}", self.reference);
        let url = self.url(&format!("blobs/{digest}"));
        let mut resp = self.send("GET", &url, &[], None)?;
        if resp.status() != 200 {
            return Err(status_error(&what, &mut resp));
        }
        let mut reader = resp.body_mut().with_config().limit(size + 1).reader();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0u64;
        loop {
            let n = reader.read(&mut buf).with_context(|| what.clone())?;
            if n == 0 {
                break;
            }
            got += n as u64;
            if got > size {
                bail!("{what}: the registry sent more than the {size} bytes the manifest says");
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n]).with_context(|| what.clone())?;
            progress(n as u64);
        }
        if got != size {
            bail!("{what}: the registry sent {got} bytes, the manifest says {size}");
        }
        let found = format!("sha256:{}", hex::encode(h.finalize()));
        if found != digest {
            bail!(BlobMismatch {
                digest: digest.to_string(),
                found
            });
        }
        Ok(())
    }

    /// Reads `range` of a blob with an HTTP range request (one chunk of a larger blob, or
    /// the first bytes of one). A registry that ignores `Range` and sends the whole blob
    /// is handled by cutting the range out, if the blob is at most `max_whole` bytes.
    /// The bytes are not verified here: the caller checks them against the pack index.
    pub fn get_blob_range(
        &self,
        digest: &str,
        range: Range<u64>,
        max_whole: u64,
    ) -> Result<Vec<u8>> {
        let what = format!(
            "{}: blob {digest} bytes {}..{}",
            self.reference, range.start, range.end
        );
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let url = self.url(&format!("blobs/{digest}"));
        let header = format!("bytes={}-{}", range.start, range.end - 1);
        let mut resp = self.send("GET", &url, &[("Range", &header)], None)?;
        let len = range.end - range.start;
        match resp.status().as_u16() {
            206 => {
                let v = resp.body_mut().with_config().limit(len).read_to_vec()?;
                if v.len() as u64 != len {
                    bail!("{what}: got {} bytes", v.len());
                }
                Ok(v)
            }
            200 => {
                let v = resp
                    .body_mut()
                    .with_config()
                    .limit(max_whole)
                    .read_to_vec()?;
                v.get(range.start as usize..range.end as usize)
                    .map(|s| s.to_vec())
                    .ok_or_else(|| anyhow!("{what}: the blob is only {} bytes", v.len()))
            }
            _ => Err(status_error(&what, &mut resp)),
        }
    }
}

/// A blob whose bytes do not match its digest.
#[derive(Debug, thiserror::Error)]
#[error("the registry sent data for {digest} whose digest is {found}")]
pub struct BlobMismatch {
    pub digest: String,
    pub found: String,
}

/// Whether a transport error may go away on retry.
fn transient(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::Protocol(_)
    )
}

/// `key="value", key2="value2"` of a `WWW-Authenticate` header.
fn parse_challenge_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((k, after)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, remaining) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.push((k, v.to_string()));
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The login docker would use for `registry`: `~/.docker/config.json` (or `$DOCKER_CONFIG`)
/// entries and credential helpers. No config or no entry: anonymous.
fn docker_config_credentials(registry: &str) -> Result<Option<Credentials>> {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    let keys: Vec<String> = if registry == "docker.io" {
        vec!["https://index.docker.io/v1/".into(), "docker.io".into()]
    } else {
        vec![registry.to_string(), format!("https://{registry}")]
    };
    for key in &keys {
        match docker_credential::get_credential(key) {
            Ok(DockerCredential::UsernamePassword(username, password)) => {
                return Ok(Some(Credentials { username, password }))
            }
            Ok(DockerCredential::IdentityToken(_)) => bail!(
                "{registry}: docker's config holds an identity token, which vmpack cannot use; \
                 give --username and --password-stdin"
            ),
            Err(E::NoCredentialConfigured) | Err(E::ConfigNotFound) | Err(E::ConfigReadError) => {}
            Err(e) => bail!("{registry}: reading docker credentials: {e}"),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_params() {
        let p = parse_challenge_params(
            r#"realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(p[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(p[1], ("service".into(), "registry.example".into()));
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull,push".into()));
        assert_eq!(
            form_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }
}
