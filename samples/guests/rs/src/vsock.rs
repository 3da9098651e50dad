//! The guest's vsock services, over `virtio-drivers`' `VsockConnectionManager`:
//!
//! - port 5000: echo (every byte received is sent back);
//! - port 5001: a line-based key-value service, one answer line per command line:
//!   `set K V` -> `ok`; `get K` -> `V` or `none`; `rng` -> `rng <64 hex digits>` (32 bytes
//!   from virtio-rng, or `rng none`); `genid` -> `genid <32 hex digits>` (the VM
//!   generation ID, or `genid none`); `dial P` -> `dialing P`, and the guest connects to
//!   host port P, sends `hello from cid N` and echoes on that connection; anything else
//!   -> `error`.
//!
//! Receiving is interrupt-driven: the guest sleeps in `hlt` until the device's interrupt
//! (IOAPIC pin of its slot) and then drains the receive queue. Sending uses the crate's
//! only way, which waits on the transmit ring.
//!
//! Serial lines: `vsock cid N`, `vsock ready`, `conn P L` (peer port P to local port L),
//! `connected P`, `closed P reset|shutdown`.

extern crate alloc;

use virtio_drivers::device::socket::{
    DisconnectReason, SocketError, VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEvent,
    VsockEventType, VMADDR_CID_HOST,
};
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::Error;

pub const ECHO_PORT: u32 = 5000;
pub const KV_PORT: u32 = 5001;
/// Local ports of connections the guest dials.
const DIAL_BASE: u32 = 40000;
/// Receive buffer of each connection: the credit the host gets.
const CONN_CAPACITY: u32 = 32 << 10;
const RX_BUF: usize = 4096;
const MAX_CONNS: usize = 16;
const LINE: usize = 256;
const KV_ENTRIES: usize = 32;

type Mgr = VsockConnectionManager<crate::rt::GuestHal, MmioTransport<'static>, RX_BUF>;

/// What the kv service's `rng` and `genid` commands answer from.
pub trait Identity {
    /// 32 bytes of entropy, if the VM has virtio-rng.
    fn entropy(&mut self) -> Option<[u8; 32]>;
    /// The 16-byte VM generation ID, if the VM has one.
    fn generation_id(&mut self) -> Option<[u8; 16]>;
}

#[derive(Clone, Copy)]
struct Conn {
    peer: VsockAddr,
    local: u32,
    line: [u8; LINE],
    len: usize,
}

struct Kv {
    keys: [[u8; 32]; KV_ENTRIES],
    vals: [[u8; 64]; KV_ENTRIES],
    klen: [usize; KV_ENTRIES],
    vlen: [usize; KV_ENTRIES],
    used: usize,
}

struct Service<'a> {
    mgr: Mgr,
    conns: [Option<Conn>; MAX_CONNS],
    kv: Kv,
    next_dial: u32,
    id: &'a mut dyn Identity,
    slot: usize,
    /// Events that arrived while a send waited for credit.
    backlog: alloc::collections::VecDeque<VsockEvent>,
}

fn hex(out: &mut [u8], bytes: &[u8]) -> usize {
    const D: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = D[(b >> 4) as usize];
        out[2 * i + 1] = D[(b & 15) as usize];
    }
    2 * bytes.len()
}

fn parse_u32(s: &[u8]) -> Option<u32> {
    if s.is_empty() || s.len() > 9 {
        return None;
    }
    let mut v = 0u32;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u32::from(c - b'0');
    }
    Some(v)
}

impl Service<'_> {
    fn find(&self, peer: VsockAddr, local: u32) -> Option<usize> {
        self.conns
            .iter()
            .position(|c| c.is_some_and(|c| c.peer == peer && c.local == local))
    }

    fn add(&mut self, peer: VsockAddr, local: u32) {
        if self.find(peer, local).is_some() {
            return;
        }
        if let Some(slot) = self.conns.iter_mut().find(|c| c.is_none()) {
            *slot = Some(Conn {
                peer,
                local,
                line: [0; LINE],
                len: 0,
            });
        }
    }

    /// Sends all of `data`, sleeping until the host's credit update when it runs short.
    /// Events that arrive meanwhile wait in `backlog` for the main loop.
    fn send(&mut self, peer: VsockAddr, local: u32, data: &[u8]) {
        for chunk in data.chunks(RX_BUF) {
            loop {
                let seen = crate::rt::device_irqs(self.slot);
                match self.mgr.send(peer, local, chunk) {
                    Ok(()) => break,
                    Err(Error::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer)) => {
                        ack_interrupt(self.slot);
                        let mut gone = false;
                        for ev in poll_all(&mut self.mgr) {
                            gone |= ev.source == peer
                                && ev.destination.port == local
                                && matches!(ev.event_type, VsockEventType::Disconnected { .. });
                            self.backlog.push_back(ev);
                        }
                        if gone {
                            return;
                        }
                        // Gone already (reset, or the manager closed it).
                        if self.mgr.recv_buffer_available_bytes(peer, local).is_err() {
                            return;
                        }
                        crate::rt::wait_for(|| crate::rt::device_irqs(self.slot) != seen);
                    }
                    Err(e) => {
                        println!("send to {}: {e:?}", peer.port);
                        return;
                    }
                }
            }
        }
    }

    fn command(&mut self, peer: VsockAddr, local: u32, line: &[u8]) {
        let mut out = [0u8; 128];
        let mut n = 0;
        let mut put = |out: &mut [u8; 128], s: &[u8]| {
            let k = s.len().min(out.len() - 1 - n);
            out[n..n + k].copy_from_slice(&s[..k]);
            n += k;
        };
        let (cmd, rest) = match line.iter().position(|&c| c == b' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &[][..]),
        };
        match cmd {
            b"set" => {
                let (k, v) = match rest.iter().position(|&c| c == b' ') {
                    Some(i) => (&rest[..i], &rest[i + 1..]),
                    None => (rest, &[][..]),
                };
                let kv = &mut self.kv;
                let at = (0..kv.used).find(|&i| &kv.keys[i][..kv.klen[i]] == k);
                match at.or((kv.used < KV_ENTRIES).then_some(kv.used)) {
                    Some(i) if k.len() <= 32 && v.len() <= 64 => {
                        kv.keys[i][..k.len()].copy_from_slice(k);
                        kv.klen[i] = k.len();
                        kv.vals[i][..v.len()].copy_from_slice(v);
                        kv.vlen[i] = v.len();
                        if i == kv.used {
                            kv.used += 1;
                        }
                        put(&mut out, b"ok");
                    }
                    _ => put(&mut out, b"full"),
                }
            }
            b"get" => {
                let kv = &self.kv;
                match (0..kv.used).find(|&i| &kv.keys[i][..kv.klen[i]] == rest) {
                    Some(i) => put(&mut out, &kv.vals[i][..kv.vlen[i]]),
                    None => put(&mut out, b"none"),
                }
            }
            b"rng" => match self.id.entropy() {
                Some(e) => {
                    put(&mut out, b"rng ");
                    let mut h = [0u8; 64];
                    hex(&mut h, &e);
                    put(&mut out, &h);
                }
                None => put(&mut out, b"rng none"),
            },
            b"genid" => match self.id.generation_id() {
                Some(g) => {
                    put(&mut out, b"genid ");
                    let mut h = [0u8; 32];
                    hex(&mut h, &g);
                    put(&mut out, &h);
                }
                None => put(&mut out, b"genid none"),
            },
            b"dial" => match parse_u32(rest) {
                Some(port) => {
                    let local = self.next_dial;
                    self.next_dial += 1;
                    let dst = VsockAddr {
                        cid: VMADDR_CID_HOST,
                        port,
                    };
                    match self.mgr.connect(dst, local) {
                        Ok(()) => {
                            self.add(dst, local);
                            put(&mut out, b"dialing ");
                            put(&mut out, rest);
                        }
                        Err(_) => put(&mut out, b"error"),
                    }
                }
                None => put(&mut out, b"error"),
            },
            _ => put(&mut out, b"error"),
        }
        out[n] = b'\n';
        self.send(peer, local, &out[..n + 1]);
    }

    fn received(&mut self, peer: VsockAddr, local: u32) {
        let mut buf = [0u8; 2048];
        loop {
            let n = match self.mgr.recv(peer, local, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // The host learns of the freed space (its credit) at once.
            let _ = self.mgr.update_credit(peer, local);
            if local != KV_PORT {
                self.send(peer, local, &buf[..n]);
                continue;
            }
            let Some(i) = self.find(peer, local) else {
                continue;
            };
            for &b in &buf[..n] {
                let c = self.conns[i].as_mut().expect("found above");
                if b == b'\n' {
                    let (line, len) = (c.line, c.len);
                    c.len = 0;
                    let l = if len > 0 && line[len - 1] == b'\r' {
                        len - 1
                    } else {
                        len
                    };
                    self.command(peer, local, &line[..l]);
                } else if c.len < LINE {
                    c.line[c.len] = b;
                    c.len += 1;
                }
            }
        }
    }

    fn event(&mut self, ev: VsockEvent) {
        let (peer, local) = (ev.source, ev.destination.port);
        match ev.event_type {
            VsockEventType::ConnectionRequest => {
                println!("conn {} {local}", peer.port);
                self.add(peer, local);
            }
            VsockEventType::Connected => {
                println!("connected {}", peer.port);
                let mut msg = [0u8; 40];
                msg[..15].copy_from_slice(b"hello from cid ");
                let mut digits = [0u8; 20];
                let (mut cid, mut n) = (self.mgr.guest_cid(), 0);
                loop {
                    digits[n] = b'0' + (cid % 10) as u8;
                    n += 1;
                    cid /= 10;
                    if cid == 0 {
                        break;
                    }
                }
                for i in 0..n {
                    msg[15 + i] = digits[n - 1 - i];
                }
                msg[15 + n] = b'\n';
                self.send(peer, local, &msg[..16 + n]);
            }
            VsockEventType::Received { .. } => self.received(peer, local),
            VsockEventType::Disconnected { reason } => {
                let why = match reason {
                    DisconnectReason::Reset => "reset",
                    DisconnectReason::Shutdown => "shutdown",
                };
                println!("closed {} {why}", peer.port);
                // What was received before the end is still answered.
                self.received(peer, local);
                if let Some(i) = self.find(peer, local) {
                    self.conns[i] = None;
                }
            }
            _ => {}
        }
    }
}

/// Every event the receive queue holds now. The crate's `poll` also says "nothing" for a
/// packet it handled itself (a credit request, a reset of an unknown connection), so one
/// "nothing" does not mean the queue is empty: it holds at most `QUEUE_SIZE` (8) packets.
fn poll_all(mgr: &mut Mgr) -> alloc::vec::Vec<VsockEvent> {
    let mut out = alloc::vec::Vec::new();
    let mut nothing = 0;
    while nothing <= 8 {
        match mgr.poll() {
            Ok(Some(ev)) => {
                nothing = 0;
                out.push(ev);
            }
            Ok(None) => nothing += 1,
            Err(e) => {
                println!("vsock poll: {e:?}");
                nothing += 1;
            }
        }
    }
    out
}

/// Acknowledges the device's interrupt (the crate's manager does not expose it).
fn ack_interrupt(slot: usize) {
    let base = crate::rt::MMIO_BASE + slot as u64 * crate::rt::MMIO_SIZE;
    // SAFETY: InterruptStatus (0x60) and InterruptACK (0x64) of the slot's register block.
    unsafe {
        let s = ((base + 0x60) as *const u32).read_volatile();
        ((base + 0x64) as *mut u32).write_volatile(s);
    }
}

/// Another device served from the same loop (rsclone's virtio-net): its interrupt count
/// wakes the loop too, and `poll` handles whatever it has waiting without sleeping.
pub trait Also {
    fn irqs(&self) -> u32;
    fn poll(&mut self);
}

#[allow(dead_code)]
struct Nothing;

impl Also for Nothing {
    fn irqs(&self) -> u32 {
        0
    }
    fn poll(&mut self) {}
}

/// Runs the vsock services on virtio-mmio slot `slot` forever.
#[allow(dead_code)]
pub fn serve(slot: usize, id: &mut dyn Identity) -> ! {
    serve_also(slot, id, &mut Nothing)
}

/// As `serve`, also polling `also` whenever either device interrupts.
pub fn serve_also(slot: usize, id: &mut dyn Identity, also: &mut dyn Also) -> ! {
    let sock = match VirtIOSocket::<crate::rt::GuestHal, _, RX_BUF>::new(crate::rt::transport(slot))
    {
        Ok(s) => s,
        Err(e) => {
            println!("virtio-vsock probe failed: {e:?}");
            crate::rt::exit(2)
        }
    };
    let mut mgr = VsockConnectionManager::new_with_capacity(sock, CONN_CAPACITY);
    mgr.listen(ECHO_PORT);
    mgr.listen(KV_PORT);
    crate::rt::route_device_irq(slot);
    println!("vsock cid {}", mgr.guest_cid());
    let mut s = Service {
        mgr,
        conns: [None; MAX_CONNS],
        kv: Kv {
            keys: [[0; 32]; KV_ENTRIES],
            vals: [[0; 64]; KV_ENTRIES],
            klen: [0; KV_ENTRIES],
            vlen: [0; KV_ENTRIES],
            used: 0,
        },
        next_dial: DIAL_BASE,
        id,
        slot,
        backlog: alloc::collections::VecDeque::new(),
    };
    println!("vsock ready");
    loop {
        let seen = crate::rt::device_irqs(slot);
        let seen_also = also.irqs();
        ack_interrupt(slot);
        let events = poll_all(&mut s.mgr);
        s.backlog.extend(events);
        while let Some(ev) = s.backlog.pop_front() {
            s.event(ev);
        }
        also.poll();
        crate::rt::wait_for(|| crate::rt::device_irqs(slot) != seen || also.irqs() != seen_also);
    }
}
