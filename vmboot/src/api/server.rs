//! Control socket: HTTP/1.1 + JSON over a Unix socket (`--api-sock PATH`).
//!
//! Written by hand on `std::os::unix::net` so vmboot needs no async runtime: one accept thread,
//! one thread per connection. The VMM plugs in through [`VmControl`]; this module knows nothing
//! about KVM. The protocol is documented in `docs/API.md`.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::types::{
    ApiError, DirtyLog, DirtyMark, ErrorBody, ErrorKind, ResetStats, SaveRequest, SerialOutput,
    VmStatus, PACK_CONTENT_TYPE,
};

/// Largest accepted request line + header block, in bytes.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest accepted request body, in bytes.
pub const MAX_BODY_BYTES: u64 = 1024 * 1024;

/// Save bodies are held back up to this size so that a controller failing early still gets a
/// JSON error out instead of a truncated pack.
const SAVE_BUFFER_BYTES: usize = 64 * 1024;

/// What the API server needs from the VMM.
///
/// Guarantees the server gives the implementation:
/// - `pause`, `resume`, `shutdown` and `save` are never called concurrently with each other
///   (the server serializes them); `status` may be called at any time, also during a save.
/// - A panic in a method is caught and answered with HTTP 500; the server keeps running.
pub trait VmControl: Send + Sync {
    /// The body of `GET /vm` (fields listed in `docs/API.md`). Must not block for long: it is
    /// also called while a save streams.
    fn status(&self) -> VmStatus;
    /// Return once every vCPU is out of `KVM_RUN` and parked, with in-flight port/MMIO
    /// accesses completed. Idempotent; [`ErrorKind::Conflict`] if the VM is stopped,
    /// [`ErrorKind::Timeout`] if the vCPUs did not all park in time (the VM then runs on).
    fn pause(&self) -> Result<(), ApiError>;
    /// Let parked vCPUs run again. Idempotent; `ApiError::conflict` if the VM is stopped.
    fn resume(&self) -> Result<(), ApiError>;
    /// Ask the VM to end; vmboot then exits with status 0. Succeeds on a stopped VM too.
    /// The 204 is written after this returns, so the main thread must stop the [`ApiServer`]
    /// (drop it or call `stop`; `process::exit` skips destructors) before exiting: `stop`
    /// waits up to `stop_grace` for answers in flight. Never stop the server from inside a
    /// `VmControl` method: `stop` would wait for that very request.
    fn shutdown(&self) -> Result<(), ApiError>;
    /// Pause, write a pack of the VM to `out`, then follow `req.then` (`Resume` restores the
    /// run state from before the save: a VM paused beforehand stays paused). Writes to `out`
    /// fail once the client goes away or stops reading for `write_timeout`; on any failure
    /// return the error and restore the run state from before the save, ignoring `then`.
    /// An error returned before 64 KiB were written (and before any `flush`) reaches the
    /// client as a JSON error with its status; after that the stream is cut short, which the
    /// pack reader detects.
    fn save(&self, req: &SaveRequest, out: &mut dyn Write) -> Result<(), ApiError>;
    /// `PUT /vm/serial/input`: give `bytes` to the guest's serial port, returning once they
    /// are all in its receive FIFO.
    fn serial_input(&self, _bytes: &[u8]) -> Result<(), ApiError> {
        Err(ApiError::not_found("this VM has no serial console"))
    }
    /// `GET /vm/serial/output?since=N`: the serial output from byte offset `since` on, as
    /// [`SerialOutput`] (see docs/API.md).
    fn serial_output(&self, _since: u64) -> Result<SerialOutput, ApiError> {
        Err(ApiError::not_found("this VM has no serial console"))
    }
    /// `PUT /vm/reset`: put a VM restored from a pack back to the pack's state in place;
    /// answers `{"pages", "disks", "pause_ms"}` (see docs/API.md).
    fn reset(&self) -> Result<ResetStats, ApiError> {
        Err(ApiError::not_found("this VM cannot be reset"))
    }
    /// `PUT /vm/dirty/mark`: start a new dirty-page mark and return its number.
    fn dirty_mark(&self) -> Result<DirtyMark, ApiError> {
        Err(ApiError::not_found("this VM keeps no dirty-page log"))
    }
    /// `GET /vm/dirty?since=M`: the guest pages written since mark `M` (see docs/API.md).
    fn dirty_since(&self, _since: u64) -> Result<DirtyLog, ApiError> {
        Err(ApiError::not_found("this VM keeps no dirty-page log"))
    }
}

/// Tunables; [`Default`] is what vmboot uses.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Time allowed from the first byte of a request to its last (answered with 408).
    pub request_timeout: Duration,
    /// How long an idle keep-alive connection is kept open.
    pub idle_timeout: Duration,
    /// A response write that makes no progress for this long drops the connection, so a
    /// client that stops reading cannot hold a save (and a paused VM) forever.
    pub write_timeout: Duration,
    /// Connections beyond this many are answered with 503.
    pub max_connections: usize,
    /// How long `stop` waits for requests in flight to be answered.
    pub stop_grace: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            max_connections: 64,
            stop_grace: Duration::from_secs(5),
        }
    }
}

/// The running control socket. Dropping it (or [`ApiServer::stop`]) stops accepting, lets
/// requests in flight finish (bounded by `stop_grace`) and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
    wake: Option<UnixStream>,
    /// Identity of the socket file we created, so `stop` never removes someone else's.
    socket_id: (u64, u64),
}

struct Shared {
    ctl: Arc<dyn VmControl>,
    opts: ServerOptions,
    stopping: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, UnixStream>>,
    conns_done: Condvar,
    /// Serializes the state-changing controller calls.
    op_lock: Mutex<()>,
    saving: AtomicBool,
}

impl ApiServer {
    /// Listen on `path` with default options.
    pub fn start(path: &Path, ctl: Arc<dyn VmControl>) -> io::Result<ApiServer> {
        Self::start_with(path, ctl, ServerOptions::default())
    }

    /// Listen on `path`. A stale socket file there (nobody listening) is replaced; anything
    /// else at `path` is an error. The socket is owner-only (0600) from the moment it
    /// appears at `path`, and only connections from this process's effective user are
    /// served, because a save exposes all of guest memory.
    pub fn start_with(
        path: &Path,
        ctl: Arc<dyn VmControl>,
        opts: ServerOptions,
    ) -> io::Result<ApiServer> {
        remove_stale_socket(path)?;
        let listener = bind_private(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on API socket {}: {e}", path.display()),
            )
        })?;
        let meta = std::fs::symlink_metadata(path)?;
        let socket_id = (meta.dev(), meta.ino());
        let setup = (|| {
            listener.set_nonblocking(true)?;
            UnixStream::pair()
        })();
        let (wake_rx, wake_tx) = match setup {
            Ok(pair) => pair,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        let shared = Arc::new(Shared {
            ctl,
            opts,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            conns_done: Condvar::new(),
            op_lock: Mutex::new(()),
            saving: AtomicBool::new(false),
        });
        let thread_shared = shared.clone();
        let accept_thread = std::thread::Builder::new()
            .name("api-accept".into())
            .spawn(move || accept_loop(thread_shared, listener, wake_rx));
        let accept_thread = match accept_thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        Ok(ApiServer {
            path: path.to_path_buf(),
            shared,
            accept_thread: Some(accept_thread),
            wake: Some(wake_tx),
            socket_id,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop accepting, remove the socket file, close idle connections and wait up to
    /// `stop_grace` for requests in flight to be answered. Idempotent.
    pub fn stop(&mut self) {
        let Some(accept_thread) = self.accept_thread.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(mut wake) = self.wake.take() {
            let _ = wake.write_all(b"x");
        }
        let _ = accept_thread.join();
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.socket_id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        // Shutting down only the read side wakes idle readers with EOF while answers still
        // being written (a 204 for /vm/shutdown, a pack stream) go out intact.
        let deadline = Instant::now() + self.shared.opts.stop_grace;
        let mut conns = lock(&self.shared.conns);
        for stream in conns.values() {
            let _ = stream.shutdown(Shutdown::Read);
        }
        while !conns.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            conns = match self.shared.conns_done.wait_timeout(conns, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Binds a socket at `path` that nobody else can ever reach: it is bound inside a fresh
/// folder of mode 0700 next to `path`, made 0600 there, and renamed into place (never over
/// an existing file). Binding at `path` directly and chmod'ing afterwards would leave a
/// window in which the socket has the umask's permissions; setting the umask around the
/// bind would change it for every thread of the process.
pub(crate) fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = tempfile::Builder::new()
        .prefix(".vmboot-")
        .rand_bytes(6)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)?;
    let tmp = dir.path().join("s");
    let listener = UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
    };
    let (from, to) = (c(&tmp)?, c(path)?);
    // SAFETY: two valid NUL-terminated paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(listener)
}

/// The effective uid of the process at the other end of a Unix socket (`SO_PEERCRED`).
fn peer_uid(stream: &UnixStream) -> io::Result<libc::uid_t> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

pub(crate) fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot inspect {}: {e}", path.display()),
            ))
        }
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another process is listening on API socket {}",
                path.display()
            ),
        ));
    }
    std::fs::remove_file(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot remove stale socket {}: {e}", path.display()),
        )
    })
}

fn accept_loop(shared: Arc<Shared>, listener: UnixListener, wake: UnixStream) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // poll on two valid fds does not fail otherwise; avoid spinning if it does.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if fds[1].revents != 0 || shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => spawn_connection(&shared, stream),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            // Out of fds or similar: back off instead of spinning; the VM must not suffer.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn spawn_connection(shared: &Arc<Shared>, stream: UnixStream) {
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    // Socket permissions are the first line; this one holds even if someone loosens them.
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    match peer_uid(&stream) {
        Ok(uid) if uid == me => {}
        other => {
            let who =
                other.map_or_else(|e| format!("an unknown user ({e})"), |u| format!("uid {u}"));
            refuse(
                stream,
                ApiError::new(
                    ErrorKind::Forbidden,
                    format!("this VM's control socket serves only uid {me}, not {who}"),
                ),
            );
            return;
        }
    }
    let _ = stream.set_write_timeout(Some(shared.opts.write_timeout));
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    {
        let mut conns = lock(&shared.conns);
        if conns.len() >= shared.opts.max_connections {
            drop(conns);
            refuse(
                stream,
                ApiError::new(ErrorKind::Unavailable, "too many API connections"),
            );
            return;
        }
        match stream.try_clone() {
            Ok(clone) => {
                conns.insert(id, clone);
            }
            Err(_) => return,
        }
    }
    let thread_shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("api-conn".into())
        .spawn(move || {
            let _guard = ConnGuard {
                shared: thread_shared.clone(),
                id,
            };
            serve_connection(&thread_shared, stream);
        });
    if spawned.is_err() {
        let mut conns = lock(&shared.conns);
        if let Some(mut stream) = conns.remove(&id) {
            let _ = stream.write_all(&error_response(
                &ApiError::new(ErrorKind::Unavailable, "cannot start API connection"),
                true,
            ));
        }
        shared.conns_done.notify_all();
    }
}

/// Answers a connection that will not be served with `status` and closes it, from the
/// accept thread: a short write timeout and drain, so the client reads the answer rather
/// than ECONNRESET, without letting a flood of connections stall the accept thread.
fn refuse(mut stream: UnixStream, e: ApiError) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(&error_response(&e, true));
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut sink = [0u8; 4096];
    while let Ok(1..) = stream.read(&mut sink) {}
}

/// Deregisters a connection even when its thread unwinds.
struct ConnGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.shared.conns).remove(&self.id);
        self.shared.conns_done.notify_all();
    }
}

/// A parsed request.
#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    /// The target's query string (after `?`), empty if none.
    query: String,
    keep_alive: bool,
    body: Vec<u8>,
}

enum ReadOutcome {
    Request(Request),
    /// The client closed, went idle past the timeout, or vanished mid-request: nobody to answer.
    Closed,
    Error(ApiError),
}

struct Connection {
    stream: UnixStream,
    /// Bytes read but not consumed yet (the start of a pipelined request).
    buf: Vec<u8>,
}

fn serve_connection(shared: &Shared, stream: UnixStream) {
    let mut conn = Connection {
        stream,
        buf: Vec::new(),
    };
    loop {
        if shared.stopping.load(Ordering::SeqCst) && conn.buf.is_empty() {
            return;
        }
        let req = match read_request(&mut conn, &shared.opts) {
            ReadOutcome::Request(req) => req,
            ReadOutcome::Closed => return,
            ReadOutcome::Error(err) => {
                let _ = conn.stream.write_all(&error_response(&err, true));
                linger_close(&conn.stream);
                return;
            }
        };
        let keep_alive = req.keep_alive && !shared.stopping.load(Ordering::SeqCst);
        match handle(shared, &req, &mut conn.stream, keep_alive) {
            Ok(true) => {}
            Ok(false) => {
                linger_close(&conn.stream);
                return;
            }
            // The client is gone; nothing left to tell it.
            Err(_) => return,
        }
    }
}

/// Close so the client reads our last answer and then EOF: closing a Unix socket with unread
/// input would hand the peer ECONNRESET instead.
fn linger_close(stream: &UnixStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut sink = [0u8; 8192];
    let mut drained = 0usize;
    let mut reader = stream;
    while drained < MAX_BODY_BYTES as usize {
        match reader.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// Reads more bytes into `conn.buf`, giving up at `deadline`. `Ok(false)` means EOF.
fn fill(conn: &mut Connection, deadline: Instant) -> io::Result<bool> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(io::Error::from(io::ErrorKind::TimedOut));
    }
    conn.stream.set_read_timeout(Some(remaining))?;
    let mut chunk = [0u8; 8192];
    loop {
        match conn.stream.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                conn.buf.extend_from_slice(&chunk[..n]);
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn read_request(conn: &mut Connection, opts: &ServerOptions) -> ReadOutcome {
    let idle_deadline = Instant::now() + opts.idle_timeout;
    let mut request_deadline: Option<Instant> = None;
    let head_len = loop {
        // Empty lines before a request line are allowed (RFC 9112 section 2.2).
        let blank = conn
            .buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        conn.buf.drain(..blank);
        if !conn.buf.is_empty() && request_deadline.is_none() {
            request_deadline = Some(Instant::now() + opts.request_timeout);
        }
        if let Some(end) = find_head_end(&conn.buf) {
            if end > MAX_HEADER_BYTES {
                return ReadOutcome::Error(header_too_large());
            }
            break end;
        }
        if conn.buf.len() > MAX_HEADER_BYTES {
            return ReadOutcome::Error(header_too_large());
        }
        match fill(conn, request_deadline.unwrap_or(idle_deadline)) {
            Ok(true) => {}
            Ok(false) => return ReadOutcome::Closed,
            Err(e) if is_timeout(&e) && request_deadline.is_some() => {
                return ReadOutcome::Error(request_timeout());
            }
            Err(_) => return ReadOutcome::Closed,
        }
    };
    let deadline = request_deadline.unwrap_or(idle_deadline);
    let head: Vec<u8> = conn.buf.drain(..head_len).collect();
    let head = match parse_head(&head) {
        Ok(head) => head,
        Err(e) => return ReadOutcome::Error(e),
    };
    if head.content_length > MAX_BODY_BYTES {
        return ReadOutcome::Error(ApiError::new(
            ErrorKind::BodyTooLarge,
            format!(
                "request body of {} bytes exceeds the limit of {MAX_BODY_BYTES}",
                head.content_length
            ),
        ));
    }
    let body_len = head.content_length as usize;
    let must_continue = head.expect_continue && body_len > conn.buf.len();
    if must_continue
        && conn
            .stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .is_err()
    {
        return ReadOutcome::Closed;
    }
    while conn.buf.len() < body_len {
        match fill(conn, deadline) {
            Ok(true) => {}
            Ok(false) => return ReadOutcome::Closed,
            Err(e) if is_timeout(&e) => return ReadOutcome::Error(request_timeout()),
            Err(_) => return ReadOutcome::Closed,
        }
    }
    let body: Vec<u8> = conn.buf.drain(..body_len).collect();
    ReadOutcome::Request(Request {
        method: head.method,
        path: head.path,
        query: head.query,
        keep_alive: head.keep_alive,
        body,
    })
}

fn header_too_large() -> ApiError {
    ApiError::new(
        ErrorKind::HeaderTooLarge,
        format!("request line and headers exceed {MAX_HEADER_BYTES} bytes"),
    )
}

fn request_timeout() -> ApiError {
    ApiError::new(ErrorKind::RequestTimeout, "request not received in time")
}

/// Length of the head including its terminating empty line, if complete. Bare LF line ends
/// are accepted, as RFC 9112 allows.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(pos) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + pos;
        let next = &buf[nl + 1..];
        if next.starts_with(b"\n") {
            return Some(nl + 2);
        }
        if next.starts_with(b"\r\n") {
            return Some(nl + 3);
        }
        i = nl + 1;
    }
    None
}

struct Head {
    method: String,
    path: String,
    query: String,
    keep_alive: bool,
    content_length: u64,
    expect_continue: bool,
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn parse_head(head: &[u8]) -> Result<Head, ApiError> {
    let text = std::str::from_utf8(head)
        .map_err(|_| ApiError::new(ErrorKind::BadRequest, "request head is not valid UTF-8"))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or("");
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(ApiError::new(
            ErrorKind::BadRequest,
            format!("malformed request line {:?}", clip(request_line)),
        ));
    };
    if !is_token(method) {
        return Err(ApiError::new(
            ErrorKind::BadRequest,
            format!("malformed method {:?}", clip(method)),
        ));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => {
            return Err(ApiError::new(
                ErrorKind::HttpVersion,
                format!("HTTP version {:?} is not supported", clip(v)),
            ))
        }
        v => {
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                format!("malformed HTTP version {:?}", clip(v)),
            ))
        }
    };
    let path = request_path(target)?;
    let query = target
        .split('#')
        .next()
        .and_then(|t| t.split_once('?'))
        .map_or(String::new(), |(_, q)| q.to_string());

    let mut content_length: Option<u64> = None;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut expect_continue = false;
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                "folded header lines are not allowed",
            ));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                format!("malformed header line {:?}", clip(line)),
            ));
        };
        if !is_token(name) {
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                format!("malformed header name {:?}", clip(name)),
            ));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            let n = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
                value.parse::<u64>().ok()
            } else {
                None
            };
            let Some(n) = n else {
                return Err(ApiError::new(
                    ErrorKind::BadRequest,
                    format!("invalid Content-Length {:?}", clip(value)),
                ));
            };
            if content_length.is_some_and(|old| old != n) {
                return Err(ApiError::new(
                    ErrorKind::BadRequest,
                    "conflicting Content-Length headers",
                ));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ApiError::new(
                ErrorKind::NotImplemented,
                "Transfer-Encoding is not supported; send the body with Content-Length",
            ));
        } else if name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(str::trim) {
                connection_close |= option.eq_ignore_ascii_case("close");
                connection_keep_alive |= option.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(ApiError::new(
                    ErrorKind::ExpectationFailed,
                    format!("unsupported Expect {:?}", clip(value)),
                ));
            }
            expect_continue = true;
        }
    }
    let keep_alive = !connection_close && (!http10 || connection_keep_alive);
    Ok(Head {
        query,
        method: method.to_string(),
        path,
        keep_alive,
        content_length: content_length.unwrap_or(0),
        expect_continue,
    })
}

/// The path of a request target, without query; absolute-form targets are reduced to it.
fn request_path(target: &str) -> Result<String, ApiError> {
    let mut rest = target;
    if let Some(after) = rest.strip_prefix("http://") {
        rest = after.find('/').map_or("/", |i| &after[i..]);
    }
    if !rest.starts_with('/') || rest.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(ApiError::new(
            ErrorKind::BadRequest,
            format!("malformed request target {:?}", clip(target)),
        ));
    }
    let path = rest.split(['?', '#']).next().unwrap_or("/");
    Ok(path.to_string())
}

/// Keeps echoed client input in error messages short.
fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

fn response(
    status: u16,
    extra_headers: &[(&str, &str)],
    body: Option<&dyn erased::Body>,
    close: bool,
) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\nServer: vmboot\r\n", reason(status));
    for (name, value) in extra_headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    let body = body.map(|v| {
        let mut text = v.to_json();
        text.push('\n');
        text
    });
    match &body {
        Some(text) => out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        )),
        None if status == 204 => out.push_str("\r\n"),
        None => out.push_str("Content-Length: 0\r\n\r\n"),
    }
    out.into_bytes()
}

/// A response body: any of the API's types, as JSON.
mod erased {
    pub trait Body {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Body for T {
        fn to_json(&self) -> String {
            // The API's types are plain structs: serializing them cannot fail.
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}

fn error_response(e: &ApiError, close: bool) -> Vec<u8> {
    let body = ErrorBody {
        error: e.message.clone(),
    };
    response(e.status(), &[], Some(&body), close)
}

/// Runs a controller call, turning a panic into a 500 so one bad call cannot kill the server.
fn guarded<T>(f: impl FnOnce() -> Result<T, ApiError>) -> Result<T, ApiError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(ApiError::internal(
            "internal error: the VM controller panicked",
        ))
    })
}

/// Every endpoint and the one method it answers (others get a 405 naming it).
const ROUTES: &[(&str, &str)] = &[
    ("/vm", "GET"),
    ("/vm/pause", "PUT"),
    ("/vm/resume", "PUT"),
    ("/vm/shutdown", "PUT"),
    ("/vm/serial/input", "PUT"),
    ("/vm/serial/output", "GET"),
    ("/vm/reset", "PUT"),
    ("/vm/dirty/mark", "PUT"),
    ("/vm/dirty", "GET"),
    ("/vm/save", "POST"),
];

/// 200 with the answer as JSON, or the error.
fn json<T: serde::Serialize>(r: Result<T, ApiError>, close: bool) -> Vec<u8> {
    match r {
        Ok(v) => response(200, &[], Some(&v), close),
        Err(e) => error_response(&e, close),
    }
}

/// 204, or the error.
fn empty(r: Result<(), ApiError>, close: bool) -> Vec<u8> {
    match r {
        Ok(()) => response(204, &[], None, close),
        Err(e) => error_response(&e, close),
    }
}

/// Runs a call that changes the run state: refused while a save runs (the save holds the VM
/// paused), and one at a time.
fn exclusive<T>(shared: &Shared, f: impl FnOnce() -> Result<T, ApiError>) -> Result<T, ApiError> {
    if shared.saving.load(Ordering::SeqCst) {
        return Err(ApiError::conflict(
            "a save is in progress; try again when it has finished",
        ));
    }
    let _op = lock(&shared.op_lock);
    guarded(f)
}

/// The `since=N` query parameter (0 when absent); `why` is the 400's message.
fn since(req: &Request, why: &str) -> Result<u64, ApiError> {
    match req
        .query
        .split('&')
        .find_map(|kv| kv.strip_prefix("since="))
    {
        Some(v) => v.parse().map_err(|_| ApiError::bad_request(why)),
        None => Ok(0),
    }
}

/// Answers one request. `Ok(keep)` tells whether the connection stays open; `Err` means the
/// client is gone.
fn handle(
    shared: &Shared,
    req: &Request,
    stream: &mut UnixStream,
    keep_alive: bool,
) -> io::Result<bool> {
    let close = !keep_alive;
    let method_not_allowed = |allow: &str| {
        let e = ApiError::new(
            ErrorKind::MethodNotAllowed,
            format!(
                "method {} is not allowed on {}; use {allow}",
                req.method, req.path
            ),
        );
        let body = ErrorBody { error: e.message };
        response(e.kind.status(), &[("Allow", allow)], Some(&body), close)
    };
    let Some(&(_, allow)) = ROUTES.iter().find(|(path, _)| *path == req.path) else {
        let e = ApiError::not_found(format!("no such endpoint: {}", req.path));
        stream.write_all(&error_response(&e, close))?;
        return Ok(keep_alive);
    };
    if req.method != allow {
        stream.write_all(&method_not_allowed(allow))?;
        return Ok(keep_alive);
    }
    let ctl = &shared.ctl;
    let answer = match req.path.as_str() {
        "/vm" => json(guarded(|| Ok(ctl.status())), close),
        "/vm/pause" => empty(exclusive(shared, || ctl.pause()), close),
        "/vm/resume" => empty(exclusive(shared, || ctl.resume()), close),
        "/vm/shutdown" => empty(exclusive(shared, || ctl.shutdown()), close),
        "/vm/serial/input" => empty(guarded(|| ctl.serial_input(&req.body)), close),
        "/vm/serial/output" => json(
            since(req, "since must be a byte offset (a number)")
                .and_then(|s| guarded(|| ctl.serial_output(s))),
            close,
        ),
        "/vm/reset" => json(exclusive(shared, || ctl.reset()), close),
        "/vm/dirty/mark" => json(guarded(|| ctl.dirty_mark()), close),
        "/vm/dirty" => json(
            since(req, "since must be a mark number").and_then(|s| guarded(|| ctl.dirty_since(s))),
            close,
        ),
        _ => return handle_save(shared, req, stream),
    };
    stream.write_all(&answer)?;
    Ok(keep_alive)
}

fn handle_save(shared: &Shared, req: &Request, stream: &mut UnixStream) -> io::Result<bool> {
    let save_req: SaveRequest = if req.body.iter().all(u8::is_ascii_whitespace) {
        SaveRequest::default()
    } else {
        // serde would also take a JSON array for the struct (`[]` = all defaults); the
        // body is an object or nothing.
        let parsed = serde_json::from_slice::<serde_json::Value>(&req.body).and_then(|v| {
            if v.is_object() {
                serde_json::from_value(v)
            } else {
                Err(serde::de::Error::custom("the body must be a JSON object"))
            }
        });
        match parsed {
            Ok(r) => r,
            Err(e) => {
                stream.write_all(&error_response(
                    &ApiError::bad_request(format!("invalid save request: {e}")),
                    true,
                ))?;
                return Ok(false);
            }
        }
    };
    if shared.saving.swap(true, Ordering::SeqCst) {
        stream.write_all(&error_response(
            &ApiError::conflict("another save is in progress"),
            true,
        ))?;
        return Ok(false);
    }
    struct SavingFlag<'a>(&'a AtomicBool);
    impl Drop for SavingFlag<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::SeqCst);
        }
    }
    let saving = SavingFlag(&shared.saving);
    let op = lock(&shared.op_lock);

    let mut out = SaveStream {
        stream,
        buf: Vec::with_capacity(SAVE_BUFFER_BYTES),
        committed: false,
        sent: 0,
    };
    let result = guarded(|| shared.ctl.save(&save_req, &mut out));
    // Released before the last bytes go out, so a client acting on the answer right away
    // does not find the save still "in progress".
    drop(op);
    drop(saving);
    match result {
        Ok(()) => {
            out.commit()?;
            out.stream.flush()?;
        }
        Err(e) if !out.committed => {
            out.stream.write_all(&error_response(&e, true))?;
        }
        Err(e) => {
            // The client sees a pack cut short; its reader reports the missing trailer.
            log::error!(
                "API save failed after {} bytes were sent: {}",
                out.sent,
                e.message
            );
        }
    }
    Ok(false)
}

/// The `Write` handed to [`VmControl::save`]: holds back the first bytes so an early failure
/// can still become a JSON error, then streams.
struct SaveStream<'a> {
    stream: &'a mut UnixStream,
    buf: Vec<u8>,
    committed: bool,
    sent: u64,
}

impl SaveStream<'_> {
    fn commit(&mut self) -> io::Result<()> {
        if !self.committed {
            let head = format!(
                "HTTP/1.1 200 OK\r\nServer: vmboot\r\nContent-Type: {PACK_CONTENT_TYPE}\r\nConnection: close\r\n\r\n"
            );
            self.stream.write_all(head.as_bytes())?;
            self.committed = true;
        }
        if !self.buf.is_empty() {
            self.stream.write_all(&self.buf)?;
            self.sent += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

impl Write for SaveStream<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > SAVE_BUFFER_BYTES {
            self.commit()?;
            if data.len() >= SAVE_BUFFER_BYTES {
                self.stream.write_all(data)?;
                self.sent += data.len() as u64;
                return Ok(data.len());
            }
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.commit()?;
        self.stream.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{AfterSave, Compression, RunState, UnhandledIo};
    use crate::api::ApiClient;
    use serde_json::{json, Value};
    use std::sync::atomic::AtomicU32;

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum SaveMode {
        Stream(u64),
        FailBefore,
        /// Writes this many bytes, then fails.
        FailAfter(u64),
        Panic,
    }

    struct Fake {
        state: Mutex<&'static str>,
        pauses: AtomicU32,
        resumes: AtomicU32,
        shutdowns: AtomicU32,
        save_mode: Mutex<SaveMode>,
        /// Outcome of the last save as the controller saw it.
        last_save: Mutex<Option<Result<u64, String>>>,
        last_request: Mutex<Option<SaveRequest>>,
        /// The next pause fails as one whose vCPUs did not park in time.
        pause_times_out: AtomicBool,
    }

    impl Fake {
        fn new() -> Arc<Fake> {
            Arc::new(Fake {
                state: Mutex::new("running"),
                pauses: AtomicU32::new(0),
                resumes: AtomicU32::new(0),
                shutdowns: AtomicU32::new(0),
                save_mode: Mutex::new(SaveMode::Stream(1000)),
                last_save: Mutex::new(None),
                last_request: Mutex::new(None),
                pause_times_out: AtomicBool::new(false),
            })
        }
    }

    fn pattern(i: u64) -> u8 {
        (i.wrapping_mul(2_654_435_761) >> 13) as u8
    }

    fn write_pattern(out: &mut dyn Write, total: u64) -> io::Result<u64> {
        let sizes = [1usize, 100, 70_000, 1 << 20, 4096];
        let mut written = 0u64;
        let mut k = 0;
        while written < total {
            let n = (sizes[k % sizes.len()] as u64).min(total - written) as usize;
            k += 1;
            let chunk: Vec<u8> = (written..written + n as u64).map(pattern).collect();
            out.write_all(&chunk)?;
            written += n as u64;
        }
        Ok(written)
    }

    impl VmControl for Fake {
        fn status(&self) -> VmStatus {
            VmStatus {
                state: match *lock(&self.state) {
                    "paused" => RunState::Paused,
                    "stopped" => RunState::Stopped,
                    _ => RunState::Running,
                },
                name: "fake".into(),
                vcpus: 2,
                memory_mib: 16,
                uptime_ms: 5,
                unhandled_io: UnhandledIo::default(),
                last_save: None,
                exit: None,
                disks: Vec::new(),
                entropy: Vec::new(),
                net: Vec::new(),
                vsock: Vec::new(),
                vmgenid: Vec::new(),
            }
        }
        fn pause(&self) -> Result<(), ApiError> {
            let mut state = lock(&self.state);
            if *state == "stopped" {
                return Err(ApiError::conflict("the VM is stopped"));
            }
            if self.pause_times_out.swap(false, Ordering::SeqCst) {
                return Err(ApiError::timeout("timed out pausing"));
            }
            *state = "paused";
            self.pauses.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn resume(&self) -> Result<(), ApiError> {
            let mut state = lock(&self.state);
            if *state == "stopped" {
                return Err("the VM is stopped".into());
            }
            *state = "running";
            self.resumes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn shutdown(&self) -> Result<(), ApiError> {
            *lock(&self.state) = "stopped";
            self.shutdowns.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn save(&self, req: &SaveRequest, out: &mut dyn Write) -> Result<(), ApiError> {
            *lock(&self.last_request) = Some(req.clone());
            let mode = *lock(&self.save_mode);
            let result = match mode {
                SaveMode::Stream(n) => write_pattern(out, n).map_err(|e| e.to_string()),
                SaveMode::FailBefore => Err("disk snapshot failed".to_string()),
                SaveMode::FailAfter(n) => match write_pattern(out, n) {
                    Ok(_) => Err("memory read failed".to_string()),
                    Err(e) => Err(e.to_string()),
                },
                SaveMode::Panic => panic!("fake controller panics on purpose"),
            };
            *lock(&self.last_save) = Some(result.clone());
            result.map(|_| ()).map_err(ApiError::internal)
        }
    }

    struct Setup {
        _dir: tempfile::TempDir,
        sock: PathBuf,
        fake: Arc<Fake>,
        server: ApiServer,
    }

    fn setup_with(opts: ServerOptions) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let fake = Fake::new();
        let server = ApiServer::start_with(&sock, fake.clone(), opts).unwrap();
        Setup {
            _dir: dir,
            sock,
            fake,
            server,
        }
    }

    fn setup() -> Setup {
        setup_with(ServerOptions::default())
    }

    /// Sends raw bytes and returns everything the server answers until it closes.
    fn raw(sock: &Path, request: &[u8]) -> String {
        String::from_utf8_lossy(&raw_bytes(sock, request)).into_owned()
    }

    fn raw_bytes(sock: &Path, request: &[u8]) -> Vec<u8> {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        out
    }

    fn status_of(answer: &str) -> u16 {
        answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn assert_alive(sock: &Path) {
        let v = ApiClient::new(sock).get_json::<Value>("/vm").unwrap();
        assert_eq!(v["name"], "fake");
    }

    #[test]
    fn status_returns_controller_json() {
        let t = setup();
        let v = ApiClient::new(&t.sock).get_json::<Value>("/vm").unwrap();
        assert_eq!(v["state"], "running");
        assert_eq!(v["vcpus"], 2);
        assert!(v["last_save"].is_null());
        let answer = raw(
            &t.sock,
            b"GET /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            answer.contains("Content-Type: application/json\r\n"),
            "{answer}"
        );
    }

    #[test]
    fn reset_and_dirty_routes() {
        let t = setup();
        for (req, want) in [
            (
                &b"GET /vm/reset HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
                "405",
            ),
            (
                b"PUT /vm/reset HTTP/1.1\r\nConnection: close\r\n\r\n",
                "404",
            ),
            (
                b"GET /vm/dirty/mark HTTP/1.1\r\nConnection: close\r\n\r\n",
                "405",
            ),
            (
                b"PUT /vm/dirty?since=1 HTTP/1.1\r\nConnection: close\r\n\r\n",
                "405",
            ),
            (
                b"GET /vm/dirty?since=x HTTP/1.1\r\nConnection: close\r\n\r\n",
                "400",
            ),
            (
                b"GET /vm/dirty HTTP/1.1\r\nConnection: close\r\n\r\n",
                "404",
            ),
        ] {
            let answer = raw(&t.sock, req);
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {want} ")),
                "{}: {answer}",
                String::from_utf8_lossy(req)
            );
        }
        assert_alive(&t.sock);
    }

    #[test]
    fn pause_resume_and_conflict_when_stopped() {
        let t = setup();
        let c = ApiClient::new(&t.sock);
        c.put("/vm/pause").unwrap();
        c.put("/vm/pause").unwrap();
        assert_eq!(c.get_json::<Value>("/vm").unwrap()["state"], "paused");
        assert_eq!(t.fake.pauses.load(Ordering::SeqCst), 2);
        c.put("/vm/resume").unwrap();
        assert_eq!(c.get_json::<Value>("/vm").unwrap()["state"], "running");
        let answer = raw(
            &t.sock,
            b"PUT /vm/pause HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(
            answer.starts_with("HTTP/1.1 204 No Content\r\n"),
            "{answer}"
        );
        assert!(!answer.contains("Content-Length"), "{answer}");

        c.put("/vm/shutdown").unwrap();
        assert_eq!(t.fake.shutdowns.load(Ordering::SeqCst), 1);
        let err = c.put("/vm/pause").unwrap_err().to_string();
        assert!(err.contains("HTTP 409"), "{err}");
        assert!(err.contains("the VM is stopped"), "{err}");
        assert!(err.contains(&t.sock.display().to_string()), "{err}");
        let answer = raw(
            &t.sock,
            b"PUT /vm/pause HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(status_of(&answer), 409);
        assert!(
            answer.ends_with("{\"error\":\"the VM is stopped\"}\n"),
            "{answer}"
        );
        // A plain String error from the controller maps to 500.
        let err = c.put("/vm/resume").unwrap_err().to_string();
        assert!(err.contains("HTTP 500"), "{err}");
    }

    #[test]
    fn a_timed_out_pause_is_504() {
        let t = setup();
        t.fake.pause_times_out.store(true, Ordering::SeqCst);
        let answer = raw(
            &t.sock,
            b"PUT /vm/pause HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(
            answer.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"),
            "{answer}"
        );
        assert!(
            answer.ends_with("{\"error\":\"timed out pausing\"}\n"),
            "{answer}"
        );
        let c = ApiClient::new(&t.sock);
        t.fake.pause_times_out.store(true, Ordering::SeqCst);
        assert_eq!(c.pause().unwrap_err().status(), Some(504));
        c.pause().unwrap();
        assert_eq!(c.status().unwrap().state, RunState::Paused);
    }

    #[test]
    fn unknown_paths_and_wrong_methods() {
        let t = setup();
        let answer = raw(&t.sock, b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!(status_of(&answer), 404);
        assert!(
            answer.contains("\"error\":\"no such endpoint: /nope\""),
            "{answer}"
        );
        let answer = raw(&t.sock, b"POST /vm HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!(status_of(&answer), 405);
        assert!(answer.contains("Allow: GET\r\n"), "{answer}");
        let answer = raw(
            &t.sock,
            b"GET /vm/pause HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(status_of(&answer), 405);
        assert!(answer.contains("Allow: PUT\r\n"), "{answer}");
        assert_eq!(t.fake.pauses.load(Ordering::SeqCst), 0);
        let answer = raw(
            &t.sock,
            b"GET /vm/save HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(answer.contains("Allow: POST\r\n"), "{answer}");
        // Query strings and absolute-form targets address the same resource.
        let answer = raw(
            &t.sock,
            b"GET http://localhost/vm?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(status_of(&answer), 200, "{answer}");
    }

    #[test]
    fn malformed_requests_get_400_and_server_survives() {
        let t = setup();
        let cases: &[(&[u8], u16)] = &[
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET /vm\r\n\r\n", 400),
            (b"GET  /vm HTTP/1.1\r\n\r\n", 400),
            (b"GET vm HTTP/1.1\r\n\r\n", 400),
            (b"G(T /vm HTTP/1.1\r\n\r\n", 400),
            (b"GET /vm HTTP/2.0\r\n\r\n", 505),
            (b"GET /vm FTP/1.1\r\n\r\n", 400),
            (b"GET /vm HTTP/1.1\r\nNoColonHere\r\n\r\n", 400),
            (b"GET /vm HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
            (b"GET /vm HTTP/1.1\r\nX: a\r\n  folded\r\n\r\n", 400),
            (b"GET /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (
                b"GET /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (
                b"GET /vm HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                400,
            ),
            (
                b"POST /vm/save HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                501,
            ),
            (b"\xff\xfe\x00\x01 /vm HTTP/1.1\r\n\r\n", 400),
            (b"GET /vm HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n", 413),
            (b"PUT /vm/pause HTTP/1.1\r\nExpect: magic\r\n\r\n", 417),
        ];
        for (request, expected) in cases {
            let answer = raw(&t.sock, request);
            assert_eq!(
                status_of(&answer),
                *expected,
                "{:?} -> {answer}",
                String::from_utf8_lossy(request)
            );
            assert!(answer.contains("Connection: close\r\n"), "{answer}");
            assert!(answer.contains("{\"error\":"), "{answer}");
        }
        assert_eq!(t.fake.pauses.load(Ordering::SeqCst), 0);
        assert_alive(&t.sock);
    }

    #[test]
    fn oversized_header_block_gets_431() {
        let t = setup();
        let mut req = b"GET /vm HTTP/1.1\r\nX-Big: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', 20_000));
        req.extend_from_slice(b"\r\n\r\n");
        let answer = raw(&t.sock, &req);
        assert_eq!(status_of(&answer), 431, "{answer}");
        // A head that never ends is cut off at the limit too.
        let mut s = UnixStream::connect(&t.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = String::new();
        let junk = vec![b'x'; 4096];
        for _ in 0..10 {
            if s.write_all(&junk).is_err() {
                break;
            }
        }
        let _ = s.read_to_string(&mut answer);
        assert_eq!(status_of(&answer), 431, "{answer}");
        // Just under the limit is fine.
        let mut req = b"GET /vm HTTP/1.1\r\nConnection: close\r\nX-Big: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', 15_000));
        req.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status_of(&raw(&t.sock, &req)), 200);
    }

    #[test]
    fn keep_alive_and_pipelining() {
        let t = setup();
        let mut s = UnixStream::connect(&t.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        let first = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert_eq!(status_of(&first), 200, "{first}");
        assert!(!first.contains("Connection: close"), "{first}");
        // Three pipelined requests in one write, bare-LF line ends in the second one.
        s.write_all(
            b"PUT /vm/pause HTTP/1.1\r\n\r\nGET /vm HTTP/1.1\n\nPUT /vm/resume HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).unwrap();
        assert_eq!(rest.matches("HTTP/1.1 ").count(), 3, "{rest}");
        assert!(rest.starts_with("HTTP/1.1 204"), "{rest}");
        assert!(rest.contains("\"state\":\"paused\""), "{rest}");
        assert_eq!(t.fake.resumes.load(Ordering::SeqCst), 1);
        // HTTP/1.0 closes by default.
        let answer = raw(&t.sock, b"GET /vm HTTP/1.0\r\n\r\n");
        assert_eq!(status_of(&answer), 200);
    }

    #[test]
    fn client_disconnecting_mid_request_is_harmless() {
        let t = setup();
        for partial in [
            &b"GET /vm HT"[..],
            b"PUT /vm/pause HTTP/1.1\r\nHost: x",
            b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 100\r\n\r\n0123456789",
            b"POST /vm/save HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"then\":",
        ] {
            let mut s = UnixStream::connect(&t.sock).unwrap();
            s.write_all(partial).unwrap();
            drop(s);
        }
        // Connect and vanish without a byte.
        drop(UnixStream::connect(&t.sock).unwrap());
        assert_alive(&t.sock);
        assert_eq!(t.fake.pauses.load(Ordering::SeqCst), 0);
        assert!(lock(&t.fake.last_request).is_none());
    }

    #[test]
    fn slow_request_gets_408() {
        let t = setup_with(ServerOptions {
            request_timeout: Duration::from_millis(300),
            ..ServerOptions::default()
        });
        let mut s = UnixStream::connect(&t.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /vm HTTP/1.1\r\n").unwrap();
        let started = Instant::now();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert_eq!(status_of(&answer), 408, "{answer}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Trickling bytes does not extend the deadline.
        let mut s = UnixStream::connect(&t.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = Instant::now();
        for b in b"GET /vm HTTP/1.1\r\nX-Slow: abcdef" {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert_eq!(status_of(&answer), 408, "{answer}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_alive(&t.sock);
    }

    #[test]
    fn idle_keep_alive_connection_is_closed_quietly() {
        let t = setup_with(ServerOptions {
            idle_timeout: Duration::from_millis(200),
            ..ServerOptions::default()
        });
        let mut s = UnixStream::connect(&t.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn twenty_concurrent_clients() {
        let t = setup();
        let threads: Vec<_> = (0..20)
            .map(|i| {
                let sock = t.sock.clone();
                std::thread::spawn(move || {
                    let c = ApiClient::new(&sock);
                    for _ in 0..10 {
                        assert_eq!(c.get_json::<Value>("/vm").unwrap()["name"], "fake");
                        c.put(if i % 2 == 0 {
                            "/vm/pause"
                        } else {
                            "/vm/resume"
                        })
                        .unwrap();
                    }
                    // Also hold a keep-alive connection with several requests.
                    let mut s = UnixStream::connect(&sock).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    s.write_all(
                        b"GET /vm HTTP/1.1\r\n\r\nGET /vm HTTP/1.1\r\nConnection: close\r\n\r\n",
                    )
                    .unwrap();
                    let mut answer = String::new();
                    s.read_to_string(&mut answer).unwrap();
                    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(t.fake.pauses.load(Ordering::SeqCst), 100);
        assert_eq!(t.fake.resumes.load(Ordering::SeqCst), 100);
    }

    /// Checks streamed bytes against the fake's pattern without keeping them.
    struct Verify {
        pos: u64,
    }

    impl Write for Verify {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            for &b in data {
                assert_eq!(b, pattern(self.pos), "byte {} differs", self.pos);
                self.pos += 1;
            }
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn save_streams_50_mb() {
        let t = setup();
        const SIZE: u64 = 50 * 1000 * 1000;
        *lock(&t.fake.save_mode) = SaveMode::Stream(SIZE);
        let mut verify = Verify { pos: 0 };
        let body = SaveRequest {
            compress: Some(Compression::Zstd),
            level: None,
            then: AfterSave::Stop,
            diff_from: None,
            ..Default::default()
        };
        let n = ApiClient::new(&t.sock).save(&body, &mut verify).unwrap();
        assert_eq!(n, SIZE);
        assert_eq!(verify.pos, SIZE);
        assert_eq!(*lock(&t.fake.last_save), Some(Ok(SIZE)));
        let req = lock(&t.fake.last_request).clone().unwrap();
        assert_eq!(
            req,
            SaveRequest {
                compress: Some(Compression::Zstd),
                level: None,
                then: AfterSave::Stop,
                ..Default::default()
            }
        );
        assert_alive(&t.sock);
    }

    #[test]
    fn save_headers_and_defaults() {
        let t = setup();
        *lock(&t.fake.save_mode) = SaveMode::Stream(10);
        let answer = raw(&t.sock, b"POST /vm/save HTTP/1.1\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            answer.contains("Content-Type: application/vnd.vmpack\r\n"),
            "{answer}"
        );
        assert!(answer.contains("Connection: close\r\n"), "{answer}");
        assert!(!answer.contains("Content-Length"), "{answer}");
        let bytes = raw_bytes(
            &t.sock,
            b"POST /vm/save HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        );
        let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let expected: Vec<u8> = (0..10).map(pattern).collect();
        assert_eq!(&bytes[head_end..], &expected[..]);
        assert_eq!(
            lock(&t.fake.last_request).clone().unwrap(),
            SaveRequest::default()
        );
        // An empty save is still a 200 with an empty body.
        *lock(&t.fake.save_mode) = SaveMode::Stream(0);
        let mut out = Vec::new();
        let n = ApiClient::new(&t.sock)
            .post_stream("/vm/save", b"{}", &mut out)
            .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn invalid_save_requests_get_400() {
        let t = setup();
        let c = ApiClient::new(&t.sock);
        let mut out = Vec::new();
        for body in [
            json!({"then": "explode"}),
            json!({"compres": "zstd"}),
            json!({"level": "high"}),
            json!([1]),
            json!([]),
            json!(["zstd", 3, "stop"]),
            json!("zstd"),
            json!(null),
        ] {
            let err = c
                .post_stream("/vm/save", body.to_string().as_bytes(), &mut out)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("HTTP 400") && err.contains("invalid save request"),
                "{err}"
            );
        }
        let answer = raw(
            &t.sock,
            b"POST /vm/save HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope",
        );
        assert_eq!(status_of(&answer), 400, "{answer}");
        assert!(out.is_empty());
        assert!(lock(&t.fake.last_request).is_none());
    }

    #[test]
    fn save_error_before_streaming_is_json() {
        let t = setup();
        let c = ApiClient::new(&t.sock);
        let mut out = Vec::new();
        *lock(&t.fake.save_mode) = SaveMode::FailBefore;
        let err = c
            .post_stream("/vm/save", b"{}", &mut out)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HTTP 500") && err.contains("disk snapshot failed"),
            "{err}"
        );
        assert!(err.contains(&t.sock.display().to_string()), "{err}");
        let answer = raw(&t.sock, b"POST /vm/save HTTP/1.1\r\n\r\n");
        assert!(
            answer.contains("Content-Type: application/json"),
            "{answer}"
        );
        assert!(
            answer.ends_with("{\"error\":\"disk snapshot failed\"}\n"),
            "{answer}"
        );
        // Bytes still held back count as "nothing written".
        *lock(&t.fake.save_mode) = SaveMode::FailAfter(1000);
        let err = c
            .post_stream("/vm/save", b"{}", &mut out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory read failed"), "{err}");
        assert!(out.is_empty());
        // A panic becomes a 500 too.
        *lock(&t.fake.save_mode) = SaveMode::Panic;
        let err = c
            .post_stream("/vm/save", b"{}", &mut out)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HTTP 500") && err.contains("panicked"),
            "{err}"
        );
        // The saving flag and op lock were released.
        c.put("/vm/pause").unwrap();
    }

    #[test]
    fn save_error_mid_stream_truncates() {
        let t = setup();
        *lock(&t.fake.save_mode) = SaveMode::FailAfter(3_000_000);
        let mut verify = Verify { pos: 0 };
        let n = ApiClient::new(&t.sock)
            .post_stream("/vm/save", b"{}", &mut verify)
            .unwrap();
        assert!(n > 0 && n <= 3_000_000, "{n}");
        assert_alive(&t.sock);
    }

    #[test]
    fn client_leaving_mid_save_fails_the_save_not_the_server() {
        let t = setup();
        *lock(&t.fake.save_mode) = SaveMode::Stream(200 * 1000 * 1000);
        let mut s = UnixStream::connect(&t.sock).unwrap();
        s.write_all(b"POST /vm/save HTTP/1.1\r\n\r\n").unwrap();
        let mut buf = vec![0u8; 1 << 20];
        s.read_exact(&mut buf).unwrap();
        drop(s);
        let deadline = Instant::now() + Duration::from_secs(20);
        while lock(&t.fake.last_save).is_none() {
            assert!(Instant::now() < deadline, "save never ended");
            std::thread::sleep(Duration::from_millis(20));
        }
        let outcome = lock(&t.fake.last_save).clone().unwrap();
        assert!(outcome.is_err(), "{outcome:?}");
        assert_alive(&t.sock);
        ApiClient::new(&t.sock).put("/vm/pause").unwrap();
    }

    #[test]
    fn pause_during_save_conflicts() {
        let t = setup();
        *lock(&t.fake.save_mode) = SaveMode::Stream(50 * 1000 * 1000);
        let mut s = UnixStream::connect(&t.sock).unwrap();
        s.write_all(b"POST /vm/save HTTP/1.1\r\n\r\n").unwrap();
        let mut buf = vec![0u8; 1 << 16];
        s.read_exact(&mut buf).unwrap();
        // The save is now blocked on our full socket buffer.
        let c = ApiClient::new(&t.sock);
        assert_eq!(c.get_json::<Value>("/vm").unwrap()["name"], "fake");
        let err = c.put("/vm/pause").unwrap_err().to_string();
        assert!(
            err.contains("HTTP 409") && err.contains("save is in progress"),
            "{err}"
        );
        let err = c
            .post_stream("/vm/save", b"{}", &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("HTTP 409"), "{err}");
        drop(s);
    }

    #[test]
    fn stale_socket_is_replaced_but_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        // A socket left behind by a dead process: bound, nobody listening.
        drop(UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
        let mut server = ApiServer::start(&sock, Fake::new()).unwrap();
        assert_alive(&sock);
        // A second server must not steal a live socket.
        let err = ApiServer::start(&sock, Fake::new()).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        assert_alive(&sock);
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        server.stop();
        assert!(!sock.exists());
        server.stop();

        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, b"keep me").unwrap();
        let err = ApiServer::start(&file, Fake::new()).err().unwrap();
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }

    #[test]
    fn stop_closes_idle_connections_and_removes_socket() {
        let t = setup();
        let mut idle = UnixStream::connect(&t.sock).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut half = UnixStream::connect(&t.sock).unwrap();
        half.write_all(b"GET /vm HTTP/1.1\r\n").unwrap();
        assert_alive(&t.sock);
        let Setup {
            _dir, sock, server, ..
        } = t;
        let started = Instant::now();
        drop(server);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(!sock.exists());
        let mut out = Vec::new();
        idle.read_to_end(&mut out).unwrap();
        assert!(out.is_empty());
        let err = ApiClient::new(&sock)
            .get_json::<Value>("/vm")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot connect") && err.contains("--api-sock"),
            "{err}"
        );
    }

    #[test]
    fn too_many_connections_get_503() {
        let t = setup_with(ServerOptions {
            max_connections: 2,
            ..ServerOptions::default()
        });
        let _a = UnixStream::connect(&t.sock).unwrap();
        let _b = UnixStream::connect(&t.sock).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let answer = raw(&t.sock, b"GET /vm HTTP/1.1\r\n\r\n");
        assert_eq!(status_of(&answer), 503, "{answer}");
        drop(_a);
        drop(_b);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let answer = raw(&t.sock, b"GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n");
            if status_of(&answer) == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "{answer}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn curl_compatibility() {
        let probe = std::process::Command::new("curl").arg("--version").output();
        if !probe.is_ok_and(|o| o.status.success()) {
            eprintln!("\n!!! SKIPPED curl_compatibility: curl is not installed !!!\n");
            return;
        }
        let t = setup();
        let curl = |args: &[&str]| {
            let out = std::process::Command::new("curl")
                .args(["-sS", "--max-time", "30", "--unix-socket"])
                .arg(&t.sock)
                .args(args)
                .output()
                .unwrap();
            (
                out.status.success(),
                out.stdout,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let (ok, body, err) = curl(&["http://localhost/vm"]);
        assert!(ok, "{err}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["state"], "running");

        let (ok, body, err) = curl(&[
            "-X",
            "PUT",
            "-w",
            "%{http_code}",
            "http://localhost/vm/pause",
        ]);
        assert!(ok, "{err}");
        assert_eq!(body, b"204");
        assert_eq!(t.fake.pauses.load(Ordering::SeqCst), 1);

        // Several requests over one keep-alive connection.
        let (ok, body, err) = curl(&["http://localhost/vm", "http://localhost/vm"]);
        assert!(ok, "{err}");
        assert_eq!(
            String::from_utf8_lossy(&body)
                .matches("\"name\":\"fake\"")
                .count(),
            2
        );

        *lock(&t.fake.save_mode) = SaveMode::Stream(3_000_000);
        let (ok, body, err) = curl(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"compress":"zstd","then":"resume"}"#,
            "http://localhost/vm/save",
        ]);
        assert!(ok, "{err}");
        assert_eq!(body.len(), 3_000_000);
        assert!(body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(i as u64)));

        // A large body makes curl send "Expect: 100-continue"; the answer is still right.
        let big = format!(
            "{{\"compress\":\"zstd\",\"level\":3,\"then\":\"resume\"{}}}",
            " ".repeat(5000)
        );
        let (ok, body, err) = curl(&[
            "-X",
            "POST",
            "--data-binary",
            &big,
            "http://localhost/vm/save",
        ]);
        assert!(ok, "{err}");
        assert_eq!(body.len(), 3_000_000);
        assert_eq!(lock(&t.fake.last_request).clone().unwrap().level, Some(3));

        let (_, body, _) = curl(&["-X", "DELETE", "http://localhost/vm"]);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("not allowed"), "{v}");
    }
}
