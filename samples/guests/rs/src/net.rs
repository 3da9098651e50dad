//! A minimal IPv4 responder over `virtio-drivers`' raw virtio-net driver: answers ARP
//! requests for its address, ICMP echo requests and UDP datagrams to port 7 (echo), all
//! only when addressed to its own MAC (or broadcast, for ARP). Interrupt-driven: the guest
//! sleeps in `hlt` until the device's interrupt shows a used buffer.
//!
//! A configuration-change interrupt (vmboot sends one when a restore gives the device a new
//! MAC, e.g. `--mac auto` for clones) makes it re-read the MAC from the config space, and it
//! announces the change with a gratuitous ARP.

use crate::rt;
use core::ptr::addr_of_mut;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::InterruptStatus;

pub const QUEUE: usize = 16;
const RX_BUFS: usize = 8;
const BUF_LEN: usize = 2048;
const HDR: usize = 12;
pub const UDP_ECHO_PORT: u16 = 7;

type Dev = VirtIONetRaw<rt::GuestHal, MmioTransport<'static>, QUEUE>;

static mut RX: [[u8; BUF_LEN]; RX_BUFS] = [[0; BUF_LEN]; RX_BUFS];
static mut TX: [u8; BUF_LEN] = [0; BUF_LEN];

/// What the responder did, for the serial log.
#[derive(Default, Clone, Copy)]
pub struct Stats {
    pub arp: u64,
    pub icmp: u64,
    pub udp: u64,
    /// Frames for another MAC or protocol, ignored.
    pub ignored: u64,
}

pub struct Responder {
    dev: Dev,
    slot: usize,
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    tokens: [u16; RX_BUFS],
    pub stats: Stats,
}

/// The device's MAC as its config space holds it now (offset 0x100 of the MMIO window).
fn config_mac(slot: usize) -> [u8; 6] {
    let base = rt::MMIO_BASE + slot as u64 * rt::MMIO_SIZE + 0x100;
    let mut m = [0u8; 6];
    for (i, b) in m.iter_mut().enumerate() {
        // SAFETY: the device window is mapped; config space reads have no side effects.
        *b = unsafe { ((base + i as u64) as *const u8).read_volatile() };
    }
    m
}

fn csum(data: &[u8], mut sum: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Responder {
    /// Sets up the device in `slot` (IOAPIC routing included) with every receive buffer
    /// posted.
    pub fn new(slot: usize, ip: [u8; 4]) -> Responder {
        rt::route_device_irq(slot);
        let dev = match Dev::new(rt::transport(slot)) {
            Ok(d) => d,
            Err(e) => {
                println!("virtio-net init: {e:?}");
                rt::exit(3)
            }
        };
        let mac = dev.mac_address();
        let mut r = Responder {
            dev,
            slot,
            mac,
            ip,
            tokens: [0; RX_BUFS],
            stats: Stats::default(),
        };
        for i in 0..RX_BUFS {
            r.post(i);
        }
        r
    }

    fn post(&mut self, i: usize) {
        // SAFETY: buffer i is the device's until its token comes back in the used ring.
        let buf = unsafe { &mut (*addr_of_mut!(RX))[i] };
        // SAFETY: as above.
        match unsafe { self.dev.receive_begin(buf) } {
            Ok(t) => self.tokens[i] = t,
            Err(e) => {
                println!("receive_begin: {e:?}");
                rt::exit(3)
            }
        }
    }

    /// Sleeps until a frame arrives (or the config changes), then handles every frame
    /// waiting. Returns the UDP payload "exit" was received (the sample then ends).
    #[allow(dead_code)]
    pub fn serve_once(&mut self) -> bool {
        let irqs = rt::device_irqs(self.slot);
        rt::wait_for(|| self.dev.poll_receive().is_some() || rt::device_irqs(self.slot) != irqs);
        self.handle_pending()
    }

    /// The device's interrupt count (`rt::device_irqs`), for a loop serving other devices.
    #[allow(dead_code)]
    pub fn irqs(&self) -> u32 {
        rt::device_irqs(self.slot)
    }

    /// Handles a configuration change and every frame waiting, without sleeping first.
    /// Returns the UDP payload "exit" was received.
    pub fn handle_pending(&mut self) -> bool {
        let st = self.dev.ack_interrupt();
        if st.contains(InterruptStatus::DEVICE_CONFIGURATION_INTERRUPT) {
            let m = config_mac(self.slot);
            if m != self.mac {
                self.mac = m;
                println!("net mac {}", MacFmt(m));
                self.gratuitous_arp();
            }
        }
        let mut exit = false;
        while let Some(token) = self.dev.poll_receive() {
            let Some(i) = self.tokens.iter().position(|&t| t == token) else {
                println!("unknown receive token {token}");
                rt::exit(3)
            };
            // SAFETY: the buffer posted with this token.
            let buf = unsafe { &mut (*addr_of_mut!(RX))[i] };
            // SAFETY: the same buffer as given to receive_begin.
            let got = unsafe { self.dev.receive_complete(token, buf) };
            if let Ok((hdr, len)) = got {
                let mut frame = [0u8; BUF_LEN];
                frame[..len].copy_from_slice(&buf[hdr..hdr + len]);
                exit |= self.handle(&frame[..len]);
            }
            self.post(i);
        }
        exit
    }

    /// Sends `frame` and waits (asleep) until the device has taken it.
    fn send(&mut self, frame: &[u8]) {
        // SAFETY: TX is only used here, one frame at a time.
        let tx = unsafe { &mut *addr_of_mut!(TX) };
        let n = HDR + frame.len();
        if self.dev.fill_buffer_header(&mut tx[..]).is_err() || n > BUF_LEN {
            return;
        }
        tx[HDR..n].copy_from_slice(frame);
        // SAFETY: tx stays untouched until transmit_complete below.
        let Ok(token) = (unsafe { self.dev.transmit_begin(&tx[..n]) }) else {
            return;
        };
        rt::wait_for(|| self.dev.poll_transmit() == Some(token));
        // SAFETY: the same buffer as submitted.
        let _ = unsafe { self.dev.transmit_complete(token, &tx[..n]) };
    }

    fn gratuitous_arp(&mut self) {
        let mut f = [0u8; 42];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&self.mac);
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f[22..28].copy_from_slice(&self.mac);
        f[28..32].copy_from_slice(&self.ip);
        f[38..42].copy_from_slice(&self.ip);
        self.send(&f);
    }

    /// Answers one frame; true for a UDP echo datagram saying "exit".
    fn handle(&mut self, f: &[u8]) -> bool {
        if f.len() < 14 {
            self.stats.ignored += 1;
            return false;
        }
        let to_me = f[0..6] == self.mac;
        let broadcast = f[0..6] == [0xff; 6];
        match (u16::from_be_bytes([f[12], f[13]]), to_me, broadcast) {
            (0x0806, true, _) | (0x0806, _, true) => self.arp(f),
            (0x0800, true, _) => return self.ipv4(f),
            _ => self.stats.ignored += 1,
        }
        false
    }

    fn arp(&mut self, f: &[u8]) {
        // Ethernet/IPv4 request for our address.
        if f.len() < 42 || f[14..22] != [0, 1, 8, 0, 6, 4, 0, 1] || f[38..42] != self.ip {
            self.stats.ignored += 1;
            return;
        }
        let mut r = [0u8; 42];
        r[0..6].copy_from_slice(&f[6..12]);
        r[6..12].copy_from_slice(&self.mac);
        r[12..14].copy_from_slice(&[0x08, 0x06]);
        r[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        r[22..28].copy_from_slice(&self.mac);
        r[28..32].copy_from_slice(&self.ip);
        r[32..42].copy_from_slice(&f[22..32]);
        self.stats.arp += 1;
        self.send(&r);
    }

    fn ipv4(&mut self, f: &[u8]) -> bool {
        let ip = &f[14..];
        if ip.len() < 20 || ip[0] >> 4 != 4 || ip[16..20] != self.ip {
            self.stats.ignored += 1;
            return false;
        }
        let ihl = usize::from(ip[0] & 0xf) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        // Fragments are not reassembled.
        let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
        if ihl < 20 || total < ihl || total > ip.len() || frag != 0 {
            self.stats.ignored += 1;
            return false;
        }
        let mut r = [0u8; BUF_LEN];
        let n = 14 + total;
        r[..n].copy_from_slice(&f[..n]);
        // Ethernet and IP addresses swapped, TTL 64, no options kept beyond the header.
        r[0..6].copy_from_slice(&f[6..12]);
        r[6..12].copy_from_slice(&self.mac);
        let src = [ip[12], ip[13], ip[14], ip[15]];
        r[14 + 12..14 + 16].copy_from_slice(&self.ip);
        r[14 + 16..14 + 20].copy_from_slice(&src);
        r[14 + 8] = 64;
        let body = 14 + ihl;
        let mut exit = false;
        match ip[9] {
            1 if total - ihl >= 8 && r[body] == 8 => {
                r[body] = 0;
                r[body + 2..body + 4].copy_from_slice(&[0, 0]);
                let c = csum(&r[body..n], 0);
                r[body + 2..body + 4].copy_from_slice(&c.to_be_bytes());
                self.stats.icmp += 1;
            }
            17 if total - ihl >= 8
                && u16::from_be_bytes([r[body + 2], r[body + 3]]) == UDP_ECHO_PORT =>
            {
                let (sp, dp) = ([r[body], r[body + 1]], [r[body + 2], r[body + 3]]);
                r[body..body + 2].copy_from_slice(&dp);
                r[body + 2..body + 4].copy_from_slice(&sp);
                // No UDP checksum (optional over IPv4).
                r[body + 6..body + 8].copy_from_slice(&[0, 0]);
                exit = &r[body + 8..n] == b"exit";
                self.stats.udp += 1;
            }
            _ => {
                self.stats.ignored += 1;
                return false;
            }
        }
        r[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
        let c = csum(&r[14..14 + ihl], 0);
        r[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
        self.send(&r[..n]);
        exit
    }
}

/// Prints a MAC as `xx:xx:xx:xx:xx:xx`.
pub struct MacFmt(pub [u8; 6]);

impl core::fmt::Display for MacFmt {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}
