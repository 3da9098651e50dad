//! Client for vmboot's control socket (see `docs/API.md`), used by `vmpack save` and tests.
//!
//! One connection per call, `Connection: close`: calls are rare, and it keeps the response
//! framing trivial for the close-delimited pack stream.

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::api::PACK_CONTENT_TYPE;

/// Largest response head accepted from the server.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Largest JSON response body accepted (the pack stream is not limited).
const MAX_JSON_BODY: u64 = 16 * 1024 * 1024;

pub struct ApiClient {
    socket: PathBuf,
    timeout: Option<Duration>,
}

struct ResponseHead {
    status: u16,
    content_type: Option<String>,
    content_length: Option<u64>,
}

impl ApiClient {
    /// A client for the socket at `socket`. Nothing is connected until a call is made.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ApiClient {
            socket: socket.into(),
            timeout: Some(Duration::from_secs(120)),
        }
    }

    /// Per-read/write timeout (default 120 s); `None` waits forever.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// `GET path`, expecting a JSON body.
    pub fn get_json(&self, path: &str) -> Result<Value> {
        let (head, mut reader) = self.request("GET", path, None)?;
        let body = self.read_json_body(&head, &mut reader, "GET", path)?;
        if !(200..300).contains(&head.status) {
            bail!(self.error_message("GET", path, head.status, &body));
        }
        serde_json::from_slice(&body).with_context(|| {
            format!(
                "vmboot API at {}: GET {path} returned invalid JSON",
                self.socket.display()
            )
        })
    }

    /// `PUT path` without a body, expecting success (204 or any 2xx).
    pub fn put(&self, path: &str) -> Result<()> {
        let (head, mut reader) = self.request("PUT", path, None)?;
        let body = self.read_json_body(&head, &mut reader, "PUT", path)?;
        if !(200..300).contains(&head.status) {
            bail!(self.error_message("PUT", path, head.status, &body));
        }
        Ok(())
    }

    /// `POST path` with a JSON body; copies the response body to `out` and returns its length.
    /// The stream ends when the server closes the connection, so a cut-short stream is only
    /// detected by the pack's own trailer.
    pub fn post_stream(&self, path: &str, body: &Value, out: &mut dyn Write) -> Result<u64> {
        let body = serde_json::to_vec(body)?;
        let (head, mut reader) = self.request("POST", path, Some(&body))?;
        if !(200..300).contains(&head.status) {
            let body = self.read_json_body(&head, &mut reader, "POST", path)?;
            bail!(self.error_message("POST", path, head.status, &body));
        }
        if head.content_type.as_deref() != Some(PACK_CONTENT_TYPE) {
            bail!(
                "vmboot API at {}: POST {path} answered with content type {:?}, expected {PACK_CONTENT_TYPE}",
                self.socket.display(),
                head.content_type.as_deref().unwrap_or("(none)")
            );
        }
        let mut limited: Box<dyn Read> = match head.content_length {
            Some(n) => Box::new((&mut reader).take(n)),
            None => Box::new(&mut reader),
        };
        let mut buf = vec![0u8; 256 * 1024];
        let mut copied = 0u64;
        loop {
            let n = match limited.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(anyhow!(e)).with_context(|| {
                        format!(
                            "vmboot API at {}: stream from POST {path} broke after {copied} bytes",
                            self.socket.display()
                        )
                    })
                }
            };
            out.write_all(&buf[..n])
                .context("cannot write the received stream")?;
            copied += n as u64;
        }
        if let Some(expected) = head.content_length {
            if copied != expected {
                bail!(
                    "vmboot API at {}: POST {path} stream ended after {copied} of {expected} bytes",
                    self.socket.display()
                );
            }
        }
        Ok(copied)
    }

    fn connect(&self) -> Result<UnixStream> {
        let stream = UnixStream::connect(&self.socket).map_err(|e| {
            let hint = match e.kind() {
                ErrorKind::NotFound | ErrorKind::ConnectionRefused => format!(
                    "; is a VM running with --api-sock {}?",
                    self.socket.display()
                ),
                _ => String::new(),
            };
            anyhow!(
                "{}: cannot connect to the VM's control socket: {e}{hint}",
                self.socket.display()
            )
        })?;
        stream.set_read_timeout(self.timeout)?;
        stream.set_write_timeout(self.timeout)?;
        Ok(stream)
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(ResponseHead, BufReader<UnixStream>)> {
        let mut stream = self.connect()?;
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Some(body) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        stream.write_all(&bytes).with_context(|| {
            format!(
                "cannot send {method} {path} to vmboot API socket {}",
                self.socket.display()
            )
        })?;
        let mut reader = BufReader::new(stream);
        loop {
            let head = self.read_head(&mut reader).with_context(|| {
                format!(
                    "no valid answer to {method} {path} from vmboot API socket {}",
                    self.socket.display()
                )
            })?;
            // Interim answers (100 Continue) precede the real one.
            if head.status >= 200 {
                return Ok((head, reader));
            }
        }
    }

    fn read_head(&self, reader: &mut BufReader<UnixStream>) -> Result<ResponseHead> {
        let mut total = 0usize;
        let mut next_line = |reader: &mut BufReader<UnixStream>| -> Result<String> {
            let mut line = Vec::new();
            let n = reader
                .by_ref()
                .take((MAX_RESPONSE_HEAD - total) as u64 + 1)
                .read_until(b'\n', &mut line)?;
            total += n;
            if total > MAX_RESPONSE_HEAD {
                bail!("response head exceeds {MAX_RESPONSE_HEAD} bytes");
            }
            if n == 0 || !line.ends_with(b"\n") {
                return Err(io::Error::from(ErrorKind::UnexpectedEof))
                    .context("connection closed before the response head ended");
            }
            let line = String::from_utf8(line).context("response head is not UTF-8")?;
            Ok(line.trim_end_matches(['\r', '\n']).to_string())
        };
        let status_line = next_line(reader)?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        let status = parts.next().and_then(|s| s.parse::<u16>().ok());
        let (true, Some(status)) = (version.starts_with("HTTP/1."), status) else {
            bail!("malformed status line {status_line:?}");
        };
        let mut head = ResponseHead {
            status,
            content_type: None,
            content_length: None,
        };
        loop {
            let line = next_line(reader)?;
            if line.is_empty() {
                return Ok(head);
            }
            let Some((name, value)) = line.split_once(':') else {
                bail!("malformed header line {line:?}");
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                head.content_length = Some(
                    value
                        .parse()
                        .with_context(|| format!("invalid Content-Length {value:?}"))?,
                );
            } else if name.eq_ignore_ascii_case("content-type") {
                head.content_type = Some(value.to_string());
            }
        }
    }

    fn read_json_body(
        &self,
        head: &ResponseHead,
        reader: &mut BufReader<UnixStream>,
        method: &str,
        path: &str,
    ) -> Result<Vec<u8>> {
        if head.status == 204 || head.status == 304 {
            return Ok(Vec::new());
        }
        if let Some(n) = head.content_length.filter(|&n| n > MAX_JSON_BODY) {
            bail!(
                "vmboot API at {}: {method} {path} answered with {n} bytes, more than the {MAX_JSON_BODY} accepted",
                self.socket.display()
            );
        }
        let limit = head.content_length.unwrap_or(MAX_JSON_BODY + 1);
        let mut body = Vec::new();
        reader.take(limit).read_to_end(&mut body).with_context(|| {
            format!(
                "vmboot API at {}: cannot read the answer to {method} {path}",
                self.socket.display()
            )
        })?;
        if let Some(expected) = head.content_length {
            if body.len() as u64 != expected {
                bail!(
                    "vmboot API at {}: answer to {method} {path} ended after {} of {expected} bytes",
                    self.socket.display(),
                    body.len()
                );
            }
        } else if body.len() as u64 > MAX_JSON_BODY {
            bail!(
                "vmboot API at {}: answer to {method} {path} exceeds {MAX_JSON_BODY} bytes",
                self.socket.display()
            );
        }
        Ok(body)
    }

    fn error_message(&self, method: &str, path: &str, status: u16, body: &[u8]) -> String {
        let detail = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                if text.is_empty() {
                    "no details given".to_string()
                } else {
                    text.chars().take(200).collect()
                }
            });
        format!(
            "vmboot API at {}: {method} {path} failed with HTTP {status}: {detail}",
            self.socket.display()
        )
    }
}
