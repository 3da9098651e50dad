//! Client for vmboot's control socket (see `docs/API.md`), used by `vmpack save` and tests.
//!
//! One connection per call, `Connection: close`: calls are rare, and it keeps the response
//! framing trivial for the close-delimited pack stream.

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::types::{ErrorBody, SaveRequest, SerialOutput, VmStatus, PACK_CONTENT_TYPE};

/// Largest response head accepted from the server.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Largest JSON response body accepted (the pack stream is not limited).
const MAX_JSON_BODY: u64 = 16 * 1024 * 1024;

/// Why a call failed. Every message names the socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody answers at the socket.
    #[error("{socket}: cannot connect to the VM's control socket: {source}{hint}")]
    Connect {
        socket: String,
        source: io::Error,
        /// What to check, when the error suggests it.
        hint: String,
    },
    /// The server answered with an error status (its `{"error"}` message).
    #[error("vmboot API at {socket}: {method} {path} failed with HTTP {status}: {message}")]
    Status {
        socket: String,
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    /// The connection broke, or the answer is not what the API sends.
    #[error("vmboot API at {socket}: {what}")]
    Protocol {
        socket: String,
        what: String,
        #[source]
        source: Option<io::Error>,
    },
    /// Writing the received pack stream failed (the caller's output).
    #[error("cannot write the received stream: {0}")]
    Output(#[source] io::Error),
}

impl ClientError {
    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, ClientError>;

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

    /// `GET /vm`.
    pub fn status(&self) -> Result<VmStatus> {
        self.get_json("/vm")
    }

    /// `PUT /vm/pause`.
    pub fn pause(&self) -> Result<()> {
        self.put("/vm/pause")
    }

    /// `PUT /vm/resume`.
    pub fn resume(&self) -> Result<()> {
        self.put("/vm/resume")
    }

    /// `PUT /vm/shutdown`.
    pub fn shutdown(&self) -> Result<()> {
        self.put("/vm/shutdown")
    }

    /// `GET /vm/serial/output?since=N`.
    pub fn serial_output(&self, since: u64) -> Result<SerialOutput> {
        self.get_json(&format!("/vm/serial/output?since={since}"))
    }

    /// `POST /vm/save`: copies the pack to `out` and returns its length. The stream ends when
    /// the server closes the connection, so a cut-short stream is only detected by the
    /// pack's own trailer.
    pub fn save(&self, req: &SaveRequest, out: &mut dyn Write) -> Result<u64> {
        let body = serde_json::to_vec(req).expect("a SaveRequest always serializes");
        self.post_stream("/vm/save", &body, out)
    }

    /// `GET path`, expecting a JSON body of type `T`.
    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let (head, mut reader) = self.request("GET", path, None)?;
        let body = self.read_json_body(&head, &mut reader, "GET", path)?;
        if !(200..300).contains(&head.status) {
            return Err(self.error_answer("GET", path, head.status, &body));
        }
        serde_json::from_slice(&body)
            .map_err(|e| self.protocol(format!("GET {path} returned unexpected JSON: {e}"), None))
    }

    /// `PUT path` without a body, expecting success (204 or any 2xx).
    pub fn put(&self, path: &str) -> Result<()> {
        let (head, mut reader) = self.request("PUT", path, None)?;
        let body = self.read_json_body(&head, &mut reader, "PUT", path)?;
        if !(200..300).contains(&head.status) {
            return Err(self.error_answer("PUT", path, head.status, &body));
        }
        Ok(())
    }

    /// `POST path` with a JSON body, expecting a pack stream; see [`ApiClient::save`].
    pub fn post_stream(&self, path: &str, body: &[u8], out: &mut dyn Write) -> Result<u64> {
        let (head, mut reader) = self.request("POST", path, Some(body))?;
        if !(200..300).contains(&head.status) {
            let body = self.read_json_body(&head, &mut reader, "POST", path)?;
            return Err(self.error_answer("POST", path, head.status, &body));
        }
        if head.content_type.as_deref() != Some(PACK_CONTENT_TYPE) {
            return Err(self.protocol(
                format!(
                    "POST {path} answered with content type {:?}, expected {PACK_CONTENT_TYPE}",
                    head.content_type.as_deref().unwrap_or("(none)")
                ),
                None,
            ));
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
                    return Err(self.protocol(
                        format!("stream from POST {path} broke after {copied} bytes"),
                        Some(e),
                    ))
                }
            };
            out.write_all(&buf[..n]).map_err(ClientError::Output)?;
            copied += n as u64;
        }
        if let Some(expected) = head.content_length {
            if copied != expected {
                return Err(self.protocol(
                    format!("POST {path} stream ended after {copied} of {expected} bytes"),
                    None,
                ));
            }
        }
        Ok(copied)
    }

    fn socket_name(&self) -> String {
        self.socket.display().to_string()
    }

    fn protocol(&self, what: String, source: Option<io::Error>) -> ClientError {
        // The cause is part of the message: callers print errors with `{}` as often as `{:#}`.
        let what = match &source {
            Some(e) => format!("{what}: {e}"),
            None => what,
        };
        ClientError::Protocol {
            socket: self.socket_name(),
            what,
            source,
        }
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
            ClientError::Connect {
                socket: self.socket_name(),
                source: e,
                hint,
            }
        })?;
        let set = stream
            .set_read_timeout(self.timeout)
            .and_then(|()| stream.set_write_timeout(self.timeout));
        set.map_err(|e| self.protocol("cannot set the socket's timeouts".into(), Some(e)))?;
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
        stream
            .write_all(&bytes)
            .map_err(|e| self.protocol(format!("cannot send {method} {path}"), Some(e)))?;
        let mut reader = BufReader::new(stream);
        loop {
            let head = read_head(&mut reader).map_err(|(what, e)| {
                self.protocol(format!("no valid answer to {method} {path}: {what}"), e)
            })?;
            // Interim answers (100 Continue) precede the real one.
            if head.status >= 200 {
                return Ok((head, reader));
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
            return Err(self.protocol(
                format!("{method} {path} answered with {n} bytes, more than the {MAX_JSON_BODY} accepted"),
                None,
            ));
        }
        let limit = head.content_length.unwrap_or(MAX_JSON_BODY + 1);
        let mut body = Vec::new();
        reader.take(limit).read_to_end(&mut body).map_err(|e| {
            self.protocol(
                format!("cannot read the answer to {method} {path}"),
                Some(e),
            )
        })?;
        if let Some(expected) = head.content_length {
            if body.len() as u64 != expected {
                return Err(self.protocol(
                    format!(
                        "answer to {method} {path} ended after {} of {expected} bytes",
                        body.len()
                    ),
                    None,
                ));
            }
        } else if body.len() as u64 > MAX_JSON_BODY {
            return Err(self.protocol(
                format!("answer to {method} {path} exceeds {MAX_JSON_BODY} bytes"),
                None,
            ));
        }
        Ok(body)
    }

    fn error_answer(&self, method: &str, path: &str, status: u16, body: &[u8]) -> ClientError {
        let message = serde_json::from_slice::<ErrorBody>(body)
            .map(|b| b.error)
            .unwrap_or_else(|_| {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                if text.is_empty() {
                    "no details given".to_string()
                } else {
                    text.chars().take(200).collect()
                }
            });
        ClientError::Status {
            socket: self.socket_name(),
            method: method.to_string(),
            path: path.to_string(),
            status,
            message,
        }
    }
}

/// Reads a response head; on failure, what was wrong and the I/O error if there was one.
fn read_head(
    reader: &mut BufReader<UnixStream>,
) -> std::result::Result<ResponseHead, (String, Option<io::Error>)> {
    let mut total = 0usize;
    let mut next_line = |reader: &mut BufReader<UnixStream>| {
        let mut line = Vec::new();
        let n = reader
            .by_ref()
            .take((MAX_RESPONSE_HEAD - total) as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| ("cannot read the response head".to_string(), Some(e)))?;
        total += n;
        if total > MAX_RESPONSE_HEAD {
            return Err((
                format!("response head exceeds {MAX_RESPONSE_HEAD} bytes"),
                None,
            ));
        }
        if n == 0 || !line.ends_with(b"\n") {
            return Err((
                "connection closed before the response head ended".to_string(),
                None,
            ));
        }
        let line = String::from_utf8(line)
            .map_err(|_| ("response head is not UTF-8".to_string(), None))?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    };
    let status_line = next_line(reader)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let (true, Some(status)) = (version.starts_with("HTTP/1."), status) else {
        return Err((format!("malformed status line {status_line:?}"), None));
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
            return Err((format!("malformed header line {line:?}"), None));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(
                value
                    .parse()
                    .map_err(|_| (format!("invalid Content-Length {value:?}"), None))?,
            );
        } else if name.eq_ignore_ascii_case("content-type") {
            head.content_type = Some(value.to_string());
        }
    }
}
