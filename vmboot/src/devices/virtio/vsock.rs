//! virtio-vsock (stream sockets between the guest and the host) with a userspace backend on
//! a host Unix socket, in the shape Firecracker's users know:
//!
//! - host → guest: connect to the socket (`[vsock] uds_path`, or `--vsock-sock`) and write
//!   `CONNECT <port>\n`; once the guest accepts, vmboot answers `OK <hostport>\n` and the
//!   stream carries the connection's bytes. A refused connection is closed without `OK`.
//! - guest → host: a guest connecting to host CID 2, port P reaches the Unix socket
//!   `<uds_path>_P` (connected without blocking; nobody listening there: a reset).
//!
//! Flow control is the spec's credit scheme: every packet to the guest carries the bytes
//! this side can buffer for the connection (`buf_alloc`, [`CONN_BUF`]) and has forwarded to
//! the host stream (`fwd_cnt`); a guest that sends beyond its credit gets its connection
//! reset. Data goes to the guest only within the guest's advertised credit. A packet header
//! that is short, oversized, addressed wrong or of an unknown type or operation is dropped
//! (answered with a reset where it names a connection); nothing from the guest is trusted.
//!
//! Connections are not saved: the host ends of the sockets belong to the saving process. A
//! restore sends the guest a reset (`VIRTIO_VSOCK_OP_RST`) for every connection open at the
//! save and a `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue (for drivers that keep
//! event buffers posted, as Linux does), as Firecracker does. A reset in place
//! (`PUT /vm/reset`) does the same on the socket it has: every host connection made since
//! is closed, and the listener stays.
//!
//! A thread of the device's own waits (edge-triggered epoll) on the listening socket and
//! every host stream and hands the receive queue to the shared worker's code path
//! ([`QueueServer::serve`]) when one becomes readable or writable; only the device, under
//! the transport lock, touches guest memory.

use super::device::VirtioMmio;
use super::mmio::{MmioTransportState, VirtioDevice};
use super::worker::{QueueServer, Worker};
use crate::devices::bus::lock;
use crate::devices::{Context, Error, Result};
use crate::memory::GuestMemoryMmap;
use crate::persist::{DeviceState, Persist, VmDevice};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_ID_VSOCK`.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The registry id of the vsock device.
pub const ID: &str = "virtio-vsock0";
/// Ring size offered to drivers (each of rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of guest data buffered per connection on their way to the host stream: the
/// `buf_alloc` the guest sees, and so the most it may have in flight.
pub const CONN_BUF: u32 = 256 << 10;
/// Largest packet body taken from or given to the guest.
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// Connections open at once; a request beyond is reset.
pub const MAX_CONNECTIONS: usize = 1024;
/// Host connections that have not yet sent their `CONNECT` line.
const MAX_HANDSHAKES: usize = 64;
/// Control packets (responses, resets, credit updates) waiting for a receive buffer; beyond
/// this, new ones are dropped (a guest flooding bogus packets loses its resets).
const MAX_CONTROL: usize = 4 * QUEUE_SIZE as usize;
/// First host port handed to host-initiated connections (as Firecracker).
const FIRST_HOST_PORT: u32 = 1 << 30;

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;

pub const HOST_CID: u64 = 2;
const HDR_LEN: usize = 44;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_SEND: u32 = 2;
const EVENT_TRANSPORT_RESET: u32 = 0;

/// A packet header (virtio spec 5.10.6), little endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    pub fn parse(b: &[u8; HDR_LEN]) -> Hdr {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A virtio-vsock device as saved in a pack.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioVsockState {
    pub transport: MmioTransportState,
    pub cid: u64,
    /// The connections open at the save, `(host port, guest port)`: each gets a reset on
    /// restore.
    pub connections: Vec<(u32, u32)>,
    /// Body bytes given to / taken from the guest so far.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// A guest CID the spec allows: 3 up to 2^32 - 2 (the upper 32 bits are reserved, 0-2 and
/// u32::MAX are well-known addresses).
pub fn valid_cid(cid: u64) -> bool {
    (3..u64::from(u32::MAX)).contains(&cid)
}

impl VirtioVsockState {
    pub fn validate(&self) -> Result<()> {
        self.transport
            .validate(1 << VIRTIO_F_VERSION_1, &[QUEUE_SIZE; 3])?;
        if !valid_cid(self.cid) {
            return Err(Error::InvalidState(format!(
                "saved vsock CID {} is outside 3..2^32-1",
                self.cid
            )));
        }
        if self.connections.len() > MAX_CONNECTIONS {
            return Err(Error::InvalidState(format!(
                "saved vsock device lists {} connections (at most {MAX_CONNECTIONS})",
                self.connections.len()
            )));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated: the request went to the guest, no answer yet.
    Requested,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: ConnState,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Body bytes sent to the guest (wrapping, as the spec's counters).
    rx_cnt: u32,
    /// Guest bytes written to the host stream.
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_told: u32,
    /// Guest bytes the host stream has not taken yet (at most `CONN_BUF`).
    pending: Vec<u8>,
    /// The guest asked for credit while `pending` was not empty.
    credit_wanted: bool,
    /// The guest will send no more: shut the host stream's write side once `pending` is out.
    guest_done: bool,
    /// The host stream ended and the guest was told.
    eof_told: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: ConnState) -> Conn {
        Conn {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_told: 0,
            pending: Vec::new(),
            credit_wanted: false,
            guest_done: false,
            eof_told: false,
        }
    }

    /// Bytes the guest can still take on this connection.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Writes as much of `pending` as the host stream takes. Err: the stream is gone.
    fn flush(&mut self) -> std::io::Result<()> {
        while !self.pending.is_empty() {
            match self.stream.write(&self.pending) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.guest_done {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }
}

/// A host connection that has not finished its `CONNECT <port>\n` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The host side of the device: the listening socket and the thread that watches it.
struct Backend {
    path: PathBuf,
    listener: UnixListener,
    /// (device, inode) of the socket file, so only our own socket is removed at the end.
    socket_id: (u64, u64),
    epoll: Arc<Epoll>,
    stop: EventFd,
    /// Written to make the backend thread serve the receive queue (packets were queued for
    /// the guest while serving another queue).
    wake: EventFd,
}

const TAG_STOP: u64 = 0;
const TAG_WAKE: u64 = 1;
const TAG_SOCKET: u64 = 2;

impl Backend {
    fn bind(path: &Path) -> Result<Backend> {
        crate::api::server::remove_stale_socket(path)?;
        let listener = crate::api::server::bind_private(path)
            .with_context(|| format!("cannot listen on vsock socket {}", path.display()))?;
        let meta = std::fs::symlink_metadata(path)?;
        let b = Backend {
            path: path.to_path_buf(),
            listener,
            socket_id: (meta.dev(), meta.ino()),
            epoll: Arc::new(Epoll::new().context("epoll for the vsock backend")?),
            stop: EventFd::new(libc::EFD_NONBLOCK).context("vsock stop eventfd")?,
            wake: EventFd::new(libc::EFD_NONBLOCK).context("vsock wake eventfd")?,
        };
        b.listener.set_nonblocking(true)?;
        for (fd, tag) in [
            (b.stop.as_raw_fd(), TAG_STOP),
            (b.wake.as_raw_fd(), TAG_WAKE),
            (b.listener.as_raw_fd(), TAG_SOCKET),
        ] {
            b.epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, tag),
                )
                .context("epoll_ctl for the vsock backend")?;
        }
        Ok(b)
    }

    fn watch(&self, s: &UnixStream) {
        let _ = self.epoll.ctl(
            ControlOperation::Add,
            s.as_raw_fd(),
            EpollEvent::new(
                EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
                TAG_SOCKET,
            ),
        );
    }
}

impl Backend {
    /// Stops the backend thread and removes the socket file (if it is still ours).
    fn close(&self) {
        let _ = self.stop.write(1);
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.socket_id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.close();
    }
}

/// The vsock device model.
pub struct Vsock {
    cid: u64,
    config: [u8; 8],
    backend: Backend,
    conns: BTreeMap<(u32, u32), Conn>,
    handshakes: Vec<Handshake>,
    /// Header-only packets for the guest, sent before any data.
    control: VecDeque<Hdr>,
    /// A transport reset event is owed to the guest.
    reset_event: bool,
    next_host_port: u32,
    /// Where the data round robin resumes.
    cursor: (u32, u32),
    rx_bytes: u64,
    tx_bytes: u64,
}

impl Vsock {
    /// A device for guest `cid` listening on `path` (a stale socket there is replaced;
    /// anything else is an error).
    pub fn new(cid: u64, path: &Path) -> Result<Vsock> {
        if !valid_cid(cid) {
            return Err(Error::Config(format!(
                "vsock cid = {cid}: expected 3 to 4294967294"
            )));
        }
        Ok(Vsock {
            cid,
            config: cid.to_le_bytes(),
            backend: Backend::bind(path)?,
            conns: BTreeMap::new(),
            handshakes: Vec::new(),
            control: VecDeque::new(),
            reset_event: false,
            next_host_port: FIRST_HOST_PORT,
            cursor: (0, 0),
            rx_bytes: 0,
            tx_bytes: 0,
        })
    }

    /// A device rebuilt from `s`: the guest hears that every saved connection was reset.
    fn restored(path: &Path, s: &VirtioVsockState) -> Result<Vsock> {
        let mut v = Vsock::new(s.cid, path)?;
        v.rx_bytes = s.rx_bytes;
        v.tx_bytes = s.tx_bytes;
        v.reset_event = true;
        for &(host, guest) in &s.connections {
            let h = v.hdr(host, guest, OP_RST);
            v.push_control(h);
        }
        Ok(v)
    }

    /// Back to `s` in place, as [`Vsock::restored`] would build it but on the same socket:
    /// every host connection goes (accepted ones, unfinished `CONNECT` lines and those still
    /// waiting in the listener's backlog: their host ends see the connection closed), and
    /// the guest hears a reset for each connection open at the save and the transport
    /// reset event. The listener stays, so connections made after the reset are served.
    fn reset_to_saved(&mut self, s: &VirtioVsockState) -> Result<()> {
        if s.cid != self.cid {
            return Err(Error::InvalidState(format!(
                "saved vsock CID {} differs from this device's {}",
                s.cid, self.cid
            )));
        }
        self.conns.clear();
        self.handshakes.clear();
        loop {
            match self.backend.listener.accept() {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.control.clear();
        self.next_host_port = FIRST_HOST_PORT;
        self.cursor = (0, 0);
        self.rx_bytes = s.rx_bytes;
        self.tx_bytes = s.tx_bytes;
        self.reset_event = true;
        for &(host, guest) in &s.connections {
            let h = self.hdr(host, guest, OP_RST);
            self.push_control(h);
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.backend.path
    }

    fn state(&self, transport: MmioTransportState) -> VirtioVsockState {
        VirtioVsockState {
            transport,
            cid: self.cid,
            connections: self.conns.keys().copied().collect(),
            rx_bytes: self.rx_bytes,
            tx_bytes: self.tx_bytes,
        }
    }

    /// A header from the host side of connection `(host, guest)`.
    fn hdr(&self, host: u32, guest: u32, op: u16) -> Hdr {
        let (buf_alloc, fwd_cnt) = self
            .conns
            .get(&(host, guest))
            .map_or((0, 0), |c| (CONN_BUF, c.fwd_cnt));
        Hdr {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: host,
            dst_port: guest,
            kind: TYPE_STREAM,
            op,
            buf_alloc,
            fwd_cnt,
            ..Hdr::default()
        }
    }

    fn push_control(&mut self, h: Hdr) {
        if self.control.len() < MAX_CONTROL {
            self.control.push_back(h);
        }
    }

    fn reset_conn(&mut self, host: u32, guest: u32) {
        let h = self.hdr(host, guest, OP_RST);
        self.conns.remove(&(host, guest));
        self.push_control(h);
    }

    /// Host-side housekeeping: new host connections, their `CONNECT` lines, and guest data
    /// waiting for a host stream that can take it again.
    fn poll_host(&mut self) {
        while self.handshakes.len() < MAX_HANDSHAKES {
            match self.backend.listener.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_ok() {
                        self.backend.watch(&s);
                        self.handshakes.push(Handshake {
                            stream: s,
                            line: Vec::new(),
                        });
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let mut i = 0;
        while i < self.handshakes.len() {
            match self.read_handshake(i) {
                None => i += 1,
                Some(port) => {
                    let hs = self.handshakes.swap_remove(i);
                    if let Some(port) = port {
                        self.connect_to_guest(hs.stream, port);
                    }
                }
            }
        }
        let mut gone = Vec::new();
        let mut credit = Vec::new();
        for (&k, c) in self.conns.iter_mut() {
            if c.pending.is_empty() {
                continue;
            }
            if c.flush().is_err() {
                gone.push(k);
            } else if c.credit_wanted && c.pending.is_empty() {
                c.credit_wanted = false;
                credit.push(k);
            }
        }
        for (h, g) in gone {
            self.reset_conn(h, g);
        }
        for (h, g) in credit {
            self.credit_update(h, g);
        }
    }

    /// Reads handshake `i` byte by byte (no guest data is ever read with it). `None`: not
    /// complete yet; `Some(None)`: drop it; `Some(Some(port))`: connect to guest `port`.
    fn read_handshake(&mut self, i: usize) -> Option<Option<u32>> {
        let hs = &mut self.handshakes[i];
        let mut b = [0u8; 1];
        loop {
            match hs.stream.read(&mut b) {
                Ok(0) => return Some(None),
                Ok(_) if b[0] == b'\n' => break,
                Ok(_) if hs.line.len() < 32 => hs.line.push(b[0]),
                Ok(_) => return Some(None),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Some(None),
            }
        }
        let line = String::from_utf8_lossy(&hs.line);
        Some(
            line.strip_prefix("CONNECT ")
                .and_then(|p| p.trim_end_matches('\r').parse::<u32>().ok()),
        )
    }

    fn connect_to_guest(&mut self, stream: UnixStream, guest_port: u32) {
        if self.conns.len() >= MAX_CONNECTIONS {
            return;
        }
        let mut port = self.next_host_port;
        while self.conns.contains_key(&(port, guest_port)) {
            port = port.wrapping_add(1).max(FIRST_HOST_PORT);
        }
        self.next_host_port = port.wrapping_add(1).max(FIRST_HOST_PORT);
        self.conns
            .insert((port, guest_port), Conn::new(stream, ConnState::Requested));
        let h = self.hdr(port, guest_port, OP_REQUEST);
        self.push_control(h);
    }

    fn credit_update(&mut self, host: u32, guest: u32) {
        let h = self.hdr(host, guest, OP_CREDIT_UPDATE);
        if let Some(c) = self.conns.get_mut(&(host, guest)) {
            c.fwd_told = c.fwd_cnt;
        }
        self.push_control(h);
    }

    /// One packet from the guest. `body` is its payload, already bounded by `hdr.len`.
    fn guest_packet(&mut self, h: &Hdr, body: &[u8]) {
        let (host, guest) = (h.dst_port, h.src_port);
        // Misaddressed: dropped (a reset to a CID that is not the guest's would go nowhere).
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            return;
        }
        if h.kind != TYPE_STREAM {
            if h.op != OP_RST {
                let r = self.hdr(host, guest, OP_RST);
                self.push_control(r);
            }
            return;
        }
        if h.op == OP_REQUEST {
            if self.conns.contains_key(&(host, guest)) || self.conns.len() >= MAX_CONNECTIONS {
                let r = self.hdr(host, guest, OP_RST);
                self.push_control(r);
                return;
            }
            let mut p = self.backend.path.as_os_str().to_owned();
            p.push(format!("_{host}"));
            match connect_nonblocking(Path::new(&p)) {
                Ok(s) => {
                    self.backend.watch(&s);
                    let mut c = Conn::new(s, ConnState::Established);
                    c.peer_buf_alloc = h.buf_alloc;
                    c.peer_fwd_cnt = h.fwd_cnt;
                    self.conns.insert((host, guest), c);
                    let r = self.hdr(host, guest, OP_RESPONSE);
                    self.push_control(r);
                }
                Err(_) => {
                    let r = self.hdr(host, guest, OP_RST);
                    self.push_control(r);
                }
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&(host, guest)) else {
            // A connection this side does not know (e.g. one from before a restore).
            if h.op != OP_RST {
                let r = self.hdr(host, guest, OP_RST);
                self.push_control(r);
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match (h.op, c.state) {
            (OP_RESPONSE, ConnState::Requested) => {
                c.state = ConnState::Established;
                let ok = format!("OK {host}\n");
                // A fresh stream's buffer is empty: the short line fits unless the peer is gone.
                if c.stream.write(ok.as_bytes()).ok() != Some(ok.len()) {
                    self.reset_conn(host, guest);
                }
            }
            (OP_RST, _) => {
                self.conns.remove(&(host, guest));
            }
            (OP_RW, ConnState::Established) => {
                if c.pending.len() + body.len() > CONN_BUF as usize {
                    // Beyond the credit it was given.
                    self.reset_conn(host, guest);
                    return;
                }
                self.tx_bytes += body.len() as u64;
                c.pending.extend_from_slice(body);
                if c.flush().is_err() {
                    self.reset_conn(host, guest);
                    return;
                }
                // Tell the guest about freed space before it runs dry.
                if c.fwd_cnt.wrapping_sub(c.fwd_told) >= CONN_BUF / 2 {
                    self.credit_update(host, guest);
                }
            }
            (OP_SHUTDOWN, ConnState::Established) => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.guest_done = true;
                    let _ = c.flush();
                }
                if h.flags & 3 == 3 {
                    // Nothing more either way: the connection ends (what is still pending
                    // for the host was flushed as far as it would go).
                    self.reset_conn(host, guest);
                }
            }
            (OP_CREDIT_UPDATE, ConnState::Established) => {}
            (OP_CREDIT_REQUEST, ConnState::Established) => {
                if c.pending.is_empty() {
                    self.credit_update(host, guest);
                } else {
                    c.credit_wanted = true;
                }
            }
            _ => self.reset_conn(host, guest),
        }
    }

    /// Serves the transmit queue: packets from the guest.
    fn process_tx(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        hold: &AtomicBool,
        budget: usize,
    ) -> (usize, bool) {
        let before = self.control.len();
        let mut body = Vec::new();
        for served in 0..budget {
            if hold.load(Ordering::Acquire) {
                return (served, false);
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                self.wake_rx(before);
                return (served, false);
            };
            let head = chain.head_index();
            if let Some(h) = read_packet(chain, mem, &mut body) {
                self.guest_packet(&h, &body);
            }
            let _ = q.add_used(mem, head, 0);
        }
        self.wake_rx(before);
        (budget, true)
    }

    /// After the guest's packets: if any asked for an answer, or gave credit, the receive
    /// queue has work.
    fn wake_rx(&self, before: usize) {
        if self.control.len() != before || self.conns.values().any(|c| c.peer_credit() > 0) {
            let _ = self.backend.wake.write(1);
        }
    }

    /// Serves the receive queue: control packets first, then data from the host streams in
    /// turn, each within the guest's credit for its connection.
    fn process_rx(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        hold: &AtomicBool,
        budget: usize,
    ) -> (usize, bool) {
        self.poll_host();
        let mut data = vec![0u8; MAX_PAYLOAD as usize];
        for served in 0..budget {
            if hold.load(Ordering::Acquire) {
                return (served, false);
            }
            if self.control.is_empty()
                && !self
                    .conns
                    .values()
                    .any(|c| c.state == ConnState::Established && !c.eof_told)
            {
                return (served, false);
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                return (served, false);
            };
            let head = chain.head_index();
            let Ok(mut w) = chain.writer(mem) else {
                let _ = q.add_used(mem, head, 0);
                continue;
            };
            let room = w.available_bytes();
            if room < HDR_LEN {
                let _ = q.add_used(mem, head, 0);
                continue;
            }
            let room = (room - HDR_LEN).min(MAX_PAYLOAD as usize);
            let packet = match self.control.pop_front() {
                Some(h) => Some((h, 0)),
                None => self.next_data(&mut data[..room]),
            };
            let Some((h, n)) = packet else {
                // Nothing to give: the buffer stays with the guest.
                q.go_to_previous_position();
                return (served, false);
            };
            let ok = w.write_all(&h.bytes()).is_ok() && w.write_all(&data[..n]).is_ok();
            let _ = q.add_used(mem, head, if ok { (HDR_LEN + n) as u32 } else { 0 });
        }
        (budget, true)
    }

    /// The next data packet (or end-of-stream notice) from a host stream, round robin.
    fn next_data(&mut self, buf: &mut [u8]) -> Option<(Hdr, usize)> {
        let keys: Vec<(u32, u32)> = self
            .conns
            .range(self.cursor..)
            .chain(self.conns.range(..self.cursor))
            .filter(|(_, c)| c.state == ConnState::Established && !c.eof_told)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            let c = self.conns.get_mut(&k).expect("listed above");
            let credit = c.peer_credit() as usize;
            // Without credit only the end of the stream can go (it carries no bytes).
            if credit == 0 && !at_eof(&c.stream) {
                continue;
            }
            let want = credit.min(buf.len());
            match c.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    c.eof_told = true;
                    let mut h = self.hdr(k.0, k.1, OP_SHUTDOWN);
                    h.flags = 3;
                    self.cursor = (k.0, k.1.wrapping_add(1));
                    return Some((h, 0));
                }
                Ok(n) => {
                    c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                    c.fwd_told = c.fwd_cnt;
                    self.rx_bytes += n as u64;
                    let mut h = self.hdr(k.0, k.1, OP_RW);
                    h.len = n as u32;
                    self.cursor = (k.0, k.1.wrapping_add(1));
                    return Some((h, n));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    let h = self.hdr(k.0, k.1, OP_RST);
                    self.conns.remove(&k);
                    return Some((h, 0));
                }
            }
        }
        None
    }

    fn process_event(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> (usize, bool) {
        if !self.reset_event {
            return (0, false);
        }
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            return (0, false);
        };
        let head = chain.head_index();
        let ok = chain
            .writer(mem)
            .ok()
            .filter(|w| w.available_bytes() >= 4)
            .map(|mut w| w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).is_ok())
            .unwrap_or(false);
        self.reset_event = false;
        let _ = q.add_used(mem, head, if ok { 4 } else { 0 });
        (1, false)
    }
}

/// Reads one packet from a transmit chain: its header and (up to [`MAX_PAYLOAD`]) body into
/// `body`. `None` for a chain that cannot hold what its header claims.
fn read_packet(
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    body: &mut Vec<u8>,
) -> Option<Hdr> {
    let mut r = chain.reader(mem).ok()?;
    let mut hb = [0u8; HDR_LEN];
    r.read_exact(&mut hb).ok()?;
    let h = Hdr::parse(&hb);
    if h.len > MAX_PAYLOAD || (h.len as usize) > r.available_bytes() {
        return None;
    }
    body.clear();
    body.resize(h.len as usize, 0);
    r.read_exact(body).ok()?;
    Some(h)
}

/// The host stream has ended (a peek finds end-of-file rather than bytes or nothing yet).
fn at_eof(s: &UnixStream) -> bool {
    let mut b = 0u8;
    // SAFETY: peeks at most one byte into `b`.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

/// Connects to the Unix socket at `path` without ever blocking (a full backlog is a refusal).
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(ErrorKind::InvalidInput.into());
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un of the size given.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn process_queue(
        &mut self,
        idx: usize,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        hold: &AtomicBool,
        budget: usize,
    ) -> (usize, bool) {
        match idx {
            RXQ => self.process_rx(q, mem, hold, budget),
            TXQ => self.process_tx(q, mem, hold, budget),
            EVQ => self.process_event(q, mem),
            _ => (0, false),
        }
    }

    fn reset(&mut self) {
        // The driver's connections went with its queues; the host ends see them close.
        self.conns.clear();
        self.control.clear();
        self.reset_event = false;
    }
}

/// An attached virtio-vsock device.
pub type VsockHandle = VirtioMmio<Vsock>;

/// What a virtio-vsock device is built from besides its state.
pub struct VsockArgs<'a> {
    pub vm: &'a kvm_ioctls::VmFd,
    pub mem: &'a GuestMemoryMmap,
    pub worker: &'a Worker,
    pub base: u64,
    pub gsi: u32,
    /// The host socket: from the command line or the config, never from a pack.
    pub path: &'a Path,
}

impl<'a> Persist<'a> for Arc<VsockHandle> {
    type State = VirtioVsockState;
    type ConstructorArgs = VsockArgs<'a>;
    const VERSION: u32 = 1;
    type Error = Error;

    fn save(&self) -> Result<VirtioVsockState> {
        let t = lock(&self.dev);
        Ok(t.device.state(t.state()))
    }

    fn restore(a: VsockArgs<'a>, state: &VirtioVsockState) -> Result<Arc<VsockHandle>> {
        let dev = Vsock::restored(a.path, state)?;
        start(a, dev, Some(&state.transport))
    }
}

fn start(
    a: VsockArgs<'_>,
    dev: Vsock,
    state: Option<&MmioTransportState>,
) -> Result<Arc<VsockHandle>> {
    let epoll = dev.backend.epoll.clone();
    let h = VirtioMmio::start(
        a.vm,
        a.mem,
        a.worker,
        dev,
        (a.base, a.gsi),
        state,
        "virtio-vsock",
    )?;
    let weak = Arc::downgrade(&h);
    std::thread::Builder::new()
        .name("vsock".into())
        .spawn(move || backend_loop(&epoll, &weak))
        .context("starting the vsock backend thread")?;
    Ok(h)
}

/// Waits for host socket activity (or a wake from the device) and serves the receive queue;
/// ends at the stop event or when the device is gone.
fn backend_loop(epoll: &Epoll, dev: &Weak<VsockHandle>) {
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if events[..n].iter().any(|e| e.data() == TAG_STOP) {
            return;
        }
        let Some(h) = dev.upgrade() else { return };
        if events[..n].iter().any(|e| e.data() == TAG_WAKE) {
            let _ = lock(&h.dev).device.backend.wake.read();
        }
        h.serve(RXQ);
    }
}

impl VmDevice for VsockHandle {
    fn save(&self, id: &str) -> Result<DeviceState> {
        let t = lock(&self.dev);
        let s = t.device.state(t.state());
        Ok(DeviceState {
            id: id.to_string(),
            version: <Arc<VsockHandle> as Persist>::VERSION,
            state: serde_json::to_value(s)?,
        })
    }

    /// Back to the pack's device as a fresh restore builds it (see `Vsock::reset_to_saved`),
    /// keeping the socket, its listener and the backend thread. The receive and event
    /// queues are served when the VM resumes (its kick), or now if it is running.
    fn reset_to(&self, state: &DeviceState) -> Result<()> {
        let s = state.decode::<Arc<VsockHandle>>()?;
        VirtioMmio::reset_to(self, &s.transport, |d| d.reset_to_saved(&s))?;
        Ok(())
    }

    fn resettable(&self) -> bool {
        true
    }

    /// The VM ended: the host ends of every connection close and the socket goes now, not
    /// whenever the last reference to the device does.
    fn stop(&self) {
        let mut t = lock(&self.dev);
        t.device.conns.clear();
        t.device.handshakes.clear();
        t.device.backend.close();
    }

    fn status(&self) -> Option<crate::api::DeviceStatus> {
        let t = lock(&self.dev);
        let d = &t.device;
        Some(crate::api::DeviceStatus::Vsock(crate::api::VsockStatus {
            mmio_base: self.base,
            gsi: self.gsi,
            cid: d.cid,
            uds_path: d.path().display().to_string(),
            connections: d.conns.len() as u64,
            rx_bytes: d.rx_bytes,
            tx_bytes: d.tx_bytes,
        }))
    }
}

/// Registers the vsock device with `dm` (fresh, or from `saved`), listening on `path`.
pub fn attach(
    cid: u64,
    path: &Path,
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMemoryMmap,
    worker: &Worker,
    dm: &mut crate::device_manager::DeviceManager,
    saved: Option<&DeviceState>,
) -> Result<()> {
    let state = saved.map(|s| s.decode::<Arc<VsockHandle>>()).transpose()?;
    if let Some(s) = &state {
        if s.cid != cid {
            return Err(Error::InvalidState(format!(
                "saved vsock CID {} differs from the config's {cid}",
                s.cid
            )));
        }
    }
    dm.add_virtio_mmio(ID, |base, gsi| {
        let args = VsockArgs {
            vm,
            mem,
            worker,
            base,
            gsi,
            path,
        };
        let h = match &state {
            Some(s) => Arc::<VsockHandle>::restore(args, s)?,
            None => start(args, Vsock::new(cid, path)?, None)?,
        };
        let dev = h.dev.clone();
        Ok((dev, h as Arc<dyn VmDevice>))
    })?;
    Ok(())
}

/// The device against virtio-queue's mock rings and real host Unix sockets: no KVM.
#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const CID: u64 = 3;
    const TX_BUF: u64 = 0x10_0000;
    const RX_BUF: u64 = 0x20_0000;
    const EV_BUF: u64 = 0x30_0000;

    struct Rig<'a> {
        mem: &'a GuestMemoryMmap,
        rxq: MockSplitQueue<'a, GuestMemoryMmap>,
        txq: MockSplitQueue<'a, GuestMemoryMmap>,
        rx: Queue,
        tx: Queue,
        rx_next: u16,
        tx_next: u16,
        rx_seen: u16,
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    impl<'a> Rig<'a> {
        fn new(mem: &'a GuestMemoryMmap) -> Rig<'a> {
            let rxq = MockSplitQueue::create(mem, GuestAddress(0), 64);
            let txq = MockSplitQueue::create(mem, GuestAddress(0x8000), 64);
            let (rx, tx) = (rxq.create_queue().unwrap(), txq.create_queue().unwrap());
            Rig {
                mem,
                rxq,
                txq,
                rx,
                tx,
                rx_next: 0,
                tx_next: 0,
                rx_seen: 0,
            }
        }

        /// The guest sends `h` (with `body`; `h.len` as given) in one readable descriptor.
        fn send(&mut self, dev: &mut Vsock, h: Hdr, body: &[u8]) {
            let at = TX_BUF + u64::from(self.tx_next) * 0x1_0000 % 0x8_0000;
            let mut b = h.bytes().to_vec();
            b.extend_from_slice(body);
            self.send_raw(dev, at, &b, b.len() as u32);
        }

        fn send_raw(&mut self, dev: &mut Vsock, at: u64, bytes: &[u8], len: u32) {
            self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
            let d = RawDescriptor::from(SplitDescriptor::new(at, len, 0, 0));
            self.txq.add_desc_chains(&[d], self.tx_next % 64).unwrap();
            self.tx_next += 1;
            let before = self.txq.used().idx().load();
            dev.process_queue(TXQ, &mut self.tx, self.mem, &AtomicBool::new(false), 16);
            assert_eq!(
                self.txq.used().idx().load(),
                before + 1,
                "the packet was used"
            );
        }

        /// Offers one receive buffer of `len` bytes and serves the queue: the packet the
        /// device put there, if any.
        fn recv_len(&mut self, dev: &mut Vsock, len: u32) -> Option<(Hdr, Vec<u8>)> {
            if self.rx_next == self.rx_seen {
                let at = RX_BUF + u64::from(self.rx_next % 16) * 0x1_0000;
                let d = RawDescriptor::from(SplitDescriptor::new(
                    at,
                    len,
                    VRING_DESC_F_WRITE as u16,
                    0,
                ));
                self.rxq.add_desc_chains(&[d], self.rx_next % 64).unwrap();
                self.rx_next += 1;
            }
            dev.process_queue(RXQ, &mut self.rx, self.mem, &AtomicBool::new(false), 1);
            if self.rxq.used().idx().load() == self.rx_seen {
                return None;
            }
            let used = self
                .rxq
                .used()
                .ring()
                .ref_at(self.rx_seen as usize % 64)
                .unwrap()
                .load();
            let at = RX_BUF + u64::from(self.rx_seen % 16) * 0x1_0000;
            self.rx_seen += 1;
            if (used.len() as usize) < HDR_LEN {
                return Some((Hdr::default(), Vec::new()));
            }
            let mut b = vec![0u8; used.len() as usize];
            self.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
            let h = Hdr::parse(b[..HDR_LEN].try_into().unwrap());
            Some((h, b[HDR_LEN..].to_vec()))
        }

        fn recv(&mut self, dev: &mut Vsock) -> Option<(Hdr, Vec<u8>)> {
            self.recv_len(dev, 4096)
        }

        /// Receives until a packet comes (host sockets may take a moment).
        fn expect(&mut self, dev: &mut Vsock) -> (Hdr, Vec<u8>) {
            for _ in 0..200 {
                if let Some(p) = self.recv(dev) {
                    return p;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("no packet for the guest");
        }
    }

    fn guest(host_port: u32, guest_port: u32, op: u16) -> Hdr {
        Hdr {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            kind: TYPE_STREAM,
            op,
            buf_alloc: 4096,
            ..Hdr::default()
        }
    }

    fn device(dir: &tempfile::TempDir) -> (Vsock, PathBuf) {
        let p = dir.path().join("v.sock");
        (Vsock::new(CID, &p).unwrap(), p)
    }

    fn read_line(s: &mut UnixStream) -> String {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        String::from_utf8(line).unwrap()
    }

    #[test]
    fn host_connects_to_a_guest_port_and_bytes_flow_both_ways() {
        let (dir, m) = (tempfile::tempdir().unwrap(), mem());
        let (mut dev, path) = device(&dir);
        let mut rig = Rig::new(&m);
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 5000\n").unwrap();
        let (req, _) = rig.expect(&mut dev);
        assert_eq!(
            (req.op, req.src_cid, req.dst_cid, req.dst_port, req.kind),
            (OP_REQUEST, HOST_CID, CID, 5000, TYPE_STREAM)
        );
        assert_eq!(req.buf_alloc, CONN_BUF);
        let hp = req.src_port;
        assert!(hp >= FIRST_HOST_PORT);
        rig.send(&mut dev, guest(hp, 5000, OP_RESPONSE), &[]);
        assert_eq!(read_line(&mut host), format!("OK {hp}"));

        // host -> guest, within the guest's credit (4096 bytes)
        host.write_all(b"hello").unwrap();
        let (h, body) = rig.expect(&mut dev);
        assert_eq!(
            (h.op, h.len, h.dst_port, &body[..]),
            (OP_RW, 5, 5000, &b"hello"[..])
        );
        // guest -> host
        let mut w = guest(hp, 5000, OP_RW);
        w.len = 5;
        rig.send(&mut dev, w, b"world");
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"world");

        // The guest's credit bounds what it is given: 4096 - 5 bytes left.
        host.write_all(&[7u8; 8192]).unwrap();
        let mut given = 0;
        while let Some((h, body)) = rig.recv(&mut dev) {
            assert_eq!(h.op, OP_RW);
            given += body.len();
        }
        assert_eq!(given, 4091);
        // The guest frees its buffer: the rest comes.
        let mut cu = guest(hp, 5000, OP_CREDIT_UPDATE);
        cu.fwd_cnt = 4096;
        rig.send(&mut dev, cu, &[]);
        while let Some((_, body)) = rig.recv(&mut dev) {
            given += body.len();
        }
        assert_eq!(given, 4096 + 4096 - 5);

        // The host closes: the 5 bytes left wait for credit, then the guest hears the
        // shutdown; its reset ends the connection.
        drop(host);
        assert!(rig.recv(&mut dev).is_none());
        let mut cu = guest(hp, 5000, OP_CREDIT_UPDATE);
        cu.fwd_cnt = 8192;
        rig.send(&mut dev, cu, &[]);
        let (h, body) = rig.expect(&mut dev);
        assert_eq!((h.op, body.len()), (OP_RW, 5));
        let (h, _) = rig.expect(&mut dev);
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, 3));
        rig.send(&mut dev, guest(hp, 5000, OP_RST), &[]);
        assert!(dev.conns.is_empty());
        assert_eq!(dev.tx_bytes, 5);
    }

    #[test]
    fn guest_connects_to_host_port_socket_or_is_reset() {
        let (dir, m) = (tempfile::tempdir().unwrap(), mem());
        let (mut dev, path) = device(&dir);
        let mut rig = Rig::new(&m);
        let listener = UnixListener::bind(format!("{}_6000", path.display())).unwrap();
        rig.send(&mut dev, guest(6000, 1234, OP_REQUEST), &[]);
        let (h, _) = rig.expect(&mut dev);
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RESPONSE, 6000, 1234));
        let (mut s, _) = listener.accept().unwrap();
        let mut w = guest(6000, 1234, OP_RW);
        w.len = 3;
        rig.send(&mut dev, w, b"abc");
        let mut got = [0u8; 3];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abc");
        s.write_all(b"xyz").unwrap();
        let (h, body) = rig.expect(&mut dev);
        assert_eq!((h.op, &body[..]), (OP_RW, &b"xyz"[..]));
        assert_eq!(
            h.fwd_cnt, 3,
            "the packet tells the guest what was forwarded"
        );
        // Nobody listens on port 6001.
        rig.send(&mut dev, guest(6001, 1235, OP_REQUEST), &[]);
        let (h, _) = rig.expect(&mut dev);
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 6001, 1235));
        // A second request for the same pair is reset too.
        rig.send(&mut dev, guest(6000, 1234, OP_REQUEST), &[]);
        assert_eq!(rig.expect(&mut dev).0.op, OP_RST);
    }

    #[test]
    fn bogus_packets_are_dropped_or_reset_never_trusted() {
        let (dir, m) = (tempfile::tempdir().unwrap(), mem());
        let (mut dev, path) = device(&dir);
        let mut rig = Rig::new(&m);
        // A receive buffer too small for a header gets nothing, and no packet is lost.
        rig.send(&mut dev, guest(6000, 6, 99), &[]);
        assert_eq!(
            rig.recv_len(&mut dev, 8),
            Some((Hdr::default(), Vec::new()))
        );
        assert_eq!(rig.expect(&mut dev).0.op, OP_RST);
        // Shorter than a header.
        rig.send_raw(&mut dev, TX_BUF, &[1u8; 10], 10);
        // A body length the chain does not hold, and one over the limit.
        let mut h = guest(6000, 1, OP_RW);
        h.len = 1000;
        rig.send_raw(&mut dev, TX_BUF, &h.bytes(), HDR_LEN as u32);
        h.len = u32::MAX;
        rig.send_raw(&mut dev, TX_BUF, &h.bytes(), HDR_LEN as u32);
        // A descriptor outside guest memory.
        rig.send_raw(&mut dev, TX_BUF, &[], 0);
        let d = RawDescriptor::from(SplitDescriptor::new(0x4000_0000, 4096, 0, 0));
        rig.txq.add_desc_chains(&[d], rig.tx_next % 64).unwrap();
        rig.tx_next += 1;
        dev.process_queue(TXQ, &mut rig.tx, &m, &AtomicBool::new(false), 16);
        // Misaddressed: dropped silently.
        let mut h = guest(6000, 1, OP_REQUEST);
        h.src_cid = 77;
        rig.send(&mut dev, h, &[]);
        assert!(rig.recv(&mut dev).is_none());
        // Not a stream, unknown op, data on an unknown connection: resets.
        let mut h = guest(6000, 2, OP_REQUEST);
        h.kind = 9;
        rig.send(&mut dev, h, &[]);
        assert_eq!(rig.expect(&mut dev).0.op, OP_RST);
        rig.send(&mut dev, guest(6000, 3, 99), &[]);
        assert_eq!(rig.expect(&mut dev).0.op, OP_RST);
        rig.send(&mut dev, guest(6000, 4, OP_RW), &[]);
        let (r, _) = rig.expect(&mut dev);
        assert_eq!((r.op, r.dst_port), (OP_RST, 4));
        // A reset is never answered.
        rig.send(&mut dev, guest(6000, 5, OP_RST), &[]);
        assert!(rig.recv(&mut dev).is_none());
        // Beyond the credit given (the host side is not reading): reset.
        let _l = UnixListener::bind(format!("{}_7000", path.display())).unwrap();
        rig.send(&mut dev, guest(7000, 9, OP_REQUEST), &[]);
        while rig.recv(&mut dev).is_some_and(|(h, _)| h.op != OP_RESPONSE) {}
        let chunk = vec![1u8; MAX_PAYLOAD as usize];
        let mut reset = false;
        for _ in 0..(2 * CONN_BUF / MAX_PAYLOAD + 200) {
            let mut w = guest(7000, 9, OP_RW);
            w.len = MAX_PAYLOAD;
            rig.send(&mut dev, w, &chunk);
            if !dev.conns.contains_key(&(7000, 9)) {
                reset = true;
                break;
            }
        }
        assert!(reset, "a guest ignoring its credit is reset");
    }

    /// A reset in place ends every host connection made since (established, mid-`CONNECT`,
    /// still in the backlog), tells the guest what a fresh restore tells it, and keeps the
    /// socket listening.
    #[test]
    fn reset_in_place_closes_host_connections_and_keeps_listening() {
        let (dir, m) = (tempfile::tempdir().unwrap(), mem());
        let (mut dev, path) = device(&dir);
        let mut rig = Rig::new(&m);
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 5000\n").unwrap();
        let (req, _) = rig.expect(&mut dev);
        let hp = req.src_port;
        rig.send(&mut dev, guest(hp, 5000, OP_RESPONSE), &[]);
        assert_eq!(read_line(&mut host), format!("OK {hp}"));
        let listener = UnixListener::bind(format!("{}_6000", path.display())).unwrap();
        rig.send(&mut dev, guest(6000, 1234, OP_REQUEST), &[]);
        assert_eq!(rig.expect(&mut dev).0.op, OP_RESPONSE);
        let (mut dialed, _) = listener.accept().unwrap();
        // Half a CONNECT line (accepted by the device), and one not accepted yet.
        let mut half = UnixStream::connect(&path).unwrap();
        half.write_all(b"CONN").unwrap();
        dev.poll_host();
        assert_eq!(dev.handshakes.len(), 1);
        let mut queued = UnixStream::connect(&path).unwrap();

        let saved = VirtioVsockState {
            transport: MmioTransportState::default(),
            cid: CID,
            connections: vec![(6000, 77)],
            rx_bytes: 1,
            tx_bytes: 2,
        };
        dev.reset_to_saved(&saved).unwrap();
        for s in [&mut host, &mut dialed, &mut half, &mut queued] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 16];
            // End of file, or ECONNRESET where bytes it sent were never read.
            assert!(
                matches!(s.read(&mut b), Ok(0) | Err(_)),
                "a host end stays open"
            );
        }
        assert!(dev.conns.is_empty() && dev.handshakes.is_empty());
        assert_eq!((dev.rx_bytes, dev.tx_bytes), (1, 2));
        assert!(dev.reset_event);
        // The guest hears of the pack's connection only, not of those made since.
        let (h, _) = rig.expect(&mut dev);
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 6000, 77));
        assert!(rig.recv(&mut dev).is_none());
        // The socket still listens; host ports start over as on a fresh restore.
        let mut again = UnixStream::connect(&path).unwrap();
        again.write_all(b"CONNECT 5000\n").unwrap();
        let (req, _) = rig.expect(&mut dev);
        assert_eq!((req.op, req.src_port), (OP_REQUEST, FIRST_HOST_PORT));
        let mut bad = saved.clone();
        bad.cid = CID + 1;
        assert!(dev.reset_to_saved(&bad).is_err());
    }

    #[test]
    fn restore_resets_saved_connections_and_raises_the_transport_event() {
        let (dir, m) = (tempfile::tempdir().unwrap(), mem());
        let p = dir.path().join("r.sock");
        let s = VirtioVsockState {
            transport: MmioTransportState {
                queues: vec![
                    crate::devices::virtio::mmio::VirtqState {
                        max_size: QUEUE_SIZE,
                        ..Default::default()
                    };
                    3
                ],
                ..Default::default()
            },
            cid: CID,
            connections: vec![(1 << 30, 5000), (6000, 1234)],
            rx_bytes: 10,
            tx_bytes: 20,
        };
        let mut dev = Vsock::restored(&p, &s).unwrap();
        let mut rig = Rig::new(&m);
        let (a, _) = rig.expect(&mut dev);
        let (b, _) = rig.expect(&mut dev);
        assert_eq!(
            [
                (a.op, a.src_port, a.dst_port),
                (b.op, b.src_port, b.dst_port)
            ],
            [(OP_RST, 1 << 30, 5000), (OP_RST, 6000, 1234)]
        );
        let evq = MockSplitQueue::create(&m, GuestAddress(0x1_0000), 8);
        let mut q: Queue = evq.create_queue().unwrap();
        let d = RawDescriptor::from(SplitDescriptor::new(
            EV_BUF,
            8,
            VRING_DESC_F_WRITE as u16,
            0,
        ));
        m.write_slice(&[0xff; 8], GuestAddress(EV_BUF)).unwrap();
        evq.add_desc_chains(&[d], 0).unwrap();
        assert_eq!(
            dev.process_queue(EVQ, &mut q, &m, &AtomicBool::new(false), 16),
            (1, false)
        );
        assert_eq!(evq.used().ring().ref_at(0).unwrap().load().len(), 4);
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(EV_BUF)).unwrap(),
            EVENT_TRANSPORT_RESET
        );
        // Once only.
        evq.add_desc_chains(&[d], 1).unwrap();
        assert_eq!(
            dev.process_queue(EVQ, &mut q, &m, &AtomicBool::new(false), 16),
            (0, false)
        );
        // The saved counters carry on; the saved connections are gone from the state.
        let saved = dev.state(s.transport.clone());
        assert_eq!((saved.rx_bytes, saved.tx_bytes), (10, 20));
        assert!(saved.connections.is_empty());
        saved.validate().unwrap();
        let mut bad = saved.clone();
        bad.cid = 2;
        assert!(bad.validate().is_err());
        // The socket file goes with the device; a file that is not a socket is never replaced.
        drop(dev);
        assert!(!p.exists());
        std::fs::write(&p, b"x").unwrap();
        let err = Vsock::new(CID, &p).err().unwrap();
        assert!(format!("{err:#}").contains("not a socket"), "{err:#}");
    }
}
