//! virtio-net over a host tap: one receive and one transmit queue, no offloads (only
//! `VERSION_1`, `MAC` and `STATUS` are offered), for the config's `[[net]]` tables.
//!
//! The tap is opened `IFF_TAP | IFF_NO_PI` without `IFF_VNET_HDR`: with no offload
//! negotiated the 12-byte virtio-net header carries nothing, so the device writes a zero
//! header (`num_buffers` 1) before each received frame and drops the header of each sent
//! one. The tap must exist (`ip tuntap add NAME mode tap`): vmboot checks the name first and
//! never creates an interface, so neither a config nor a pack can make one.
//!
//! Receiving: the tap fd sits in the VM's one epoll worker (edge-triggered) next to the
//! queues' notify eventfds. A frame is read from the tap first and then put in the next
//! buffer the guest offers; with no buffer it waits (one frame at most) until the guest adds
//! buffers and notifies the receive queue. Bad input never reaches the host: a chain
//! that loops, points outside guest RAM or is too small for the frame gets the frame
//! dropped (counted) and its buffer back with length 0; a sent frame larger than
//! [`MAX_FRAME`] or on a bad chain is dropped (counted).

use super::blk::check_chain;
use super::device::VirtioMmio;
use super::mmio::{MmioTransportState, VirtioDevice};
use super::worker::Worker;
use crate::devices::bus::lock;
use crate::devices::{Context, Error, Result};
use crate::memory::GuestMemoryMmap;
use crate::persist::{DeviceState, Persist, VmDevice};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmpack_formats::config::{MacAddr, VmConfig};

/// Ring size offered for each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The virtio 1.x header before every frame (`struct virtio_net_hdr_v1`).
pub const HDR_LEN: usize = 12;
/// Largest frame carried either way (no offloads: an Ethernet frame of a 1500-byte MTU is
/// 1514 bytes; a tap with a larger MTU may pass jumbo frames up to this).
pub const MAX_FRAME: usize = 65535;
/// Queue indexes (virtio spec 5.1.2).
pub const RX: usize = 0;
pub const TX: usize = 1;

/// The registry id of `[[net]]` `i`.
pub fn id(i: usize) -> String {
    format!("virtio-net{i}")
}

/// Features offered: no checksum or segmentation offload, no mergeable buffers.
const FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS);

/// Counters, in `GET /vm` and in the saved state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames from the tap not given to the guest (buffer too small or outside RAM).
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames from the guest not sent (bad chain, too large, tap full or gone).
    pub tx_dropped: u64,
}

/// A virtio-net device as saved in a pack.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    pub transport: MmioTransportState,
    /// The MAC the guest was given (a restore with another signals a config change).
    pub mac: String,
    /// The tap it was attached to (informational: a restore uses the config's or the
    /// override's).
    pub tap: String,
    pub counters: NetCounters,
}

impl VirtioNetState {
    pub fn validate(&self) -> Result<()> {
        self.transport
            .validate(FEATURES, &[QUEUE_SIZE, QUEUE_SIZE])?;
        self.mac
            .parse::<MacAddr>()
            .map_err(|e| Error::InvalidState(format!("saved virtio-net state: {e}")))?;
        Ok(())
    }
}

/// Where frames go and come from: the tap, or a test double.
pub trait Backend: Send {
    /// One frame into `buf`; `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Sends one frame.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;
}

/// A host tap interface, non-blocking.
pub struct Tap {
    file: std::fs::File,
    pub name: String,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

impl Tap {
    /// Attaches to the existing tap `name` (never creates one).
    pub fn open(name: &str) -> Result<Tap> {
        vmpack_formats::config::check_ifname(name).map_err(Error::Config)?;
        let c = std::ffi::CString::new(name)
            .map_err(|_| Error::Config(format!("tap {name}: the name holds a NUL byte")))?;
        // SAFETY: a NUL-terminated string; the call only reads it.
        if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
            return Err(Error::Config(format!(
                "tap {name}: no such network interface in this network namespace; create it first (ip tuntap add {name} mode tap)"
            )));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .context("opening /dev/net/tun")?;
        // struct ifreq: the name (IFNAMSIZ bytes), then ifr_flags in the union.
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, 40 bytes on x86-64.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(libc::EBUSY) => "; is another VM attached to it?",
                Some(libc::EINVAL) => "; is it a tun (layer 3) device rather than a tap?",
                Some(libc::EPERM) => "; attaching needs CAP_NET_ADMIN or the tap's owner",
                _ => "",
            };
            return Err(Error::Config(format!(
                "tap {name}: attaching (TUNSETIFF): {e}{hint}"
            )));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }
}

impl Backend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write(frame).map(drop)
    }
}

pub struct Net {
    backend: Box<dyn Backend>,
    /// For `AsFd` of the tap (the worker's epoll); `None` for a test double.
    tap_fd: Option<std::os::fd::OwnedFd>,
    tap: String,
    mac: MacAddr,
    config: [u8; 8],
    counters: NetCounters,
    /// A frame read from the tap and not yet placed (no guest buffer was free).
    pending: Option<usize>,
    frame: Vec<u8>,
    tx: Vec<u8>,
    warnings: u64,
}

impl Net {
    pub fn new(backend: Box<dyn Backend>, tap: &str, mac: MacAddr, counters: NetCounters) -> Net {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac.0);
        // The link is always up: a restore reattaches the tap without the guest noticing.
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Net {
            backend,
            tap_fd: None,
            tap: tap.to_string(),
            mac,
            config,
            counters,
            pending: None,
            frame: vec![0u8; HDR_LEN + MAX_FRAME],
            tx: Vec::with_capacity(HDR_LEN + MAX_FRAME),
            warnings: 0,
        }
    }

    fn from_tap(tap: Tap, mac: MacAddr, counters: NetCounters) -> Result<Net> {
        let fd = tap
            .file
            .as_fd()
            .try_clone_to_owned()
            .context("cloning the tap fd")?;
        let name = tap.name.clone();
        let mut n = Net::new(Box::new(tap), &name, mac, counters);
        n.tap_fd = Some(fd);
        Ok(n)
    }

    pub fn counters(&self) -> &NetCounters {
        &self.counters
    }

    fn warn(&mut self, msg: &str) {
        self.warnings += 1;
        if self.warnings <= 5 {
            log::warn!("virtio-net {}: {msg}", self.tap);
        } else if self.warnings == 6 {
            log::warn!(
                "virtio-net {}: more warnings; counting them silently",
                self.tap
            );
        }
    }

    /// Moves frames from the backend into the guest's receive buffers.
    fn receive(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        hold: &AtomicBool,
        budget: usize,
    ) -> (usize, bool) {
        let (table, size) = (q.desc_table(), q.size());
        for served in 0..budget {
            if hold.load(Ordering::Acquire) {
                return (served, false);
            }
            let len = match self.pending {
                Some(n) => n,
                None => match self.backend.recv(&mut self.frame[HDR_LEN..]) {
                    Ok(n) => n,
                    // Nothing waiting; the tap's next frame wakes the worker again.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return (served, false),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.warn(&format!("reading the tap: {e}"));
                        return (served, false);
                    }
                },
            };
            self.pending = Some(len);
            // With no buffer the frame waits: the guest's notify brings the worker back.
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                return (served, false);
            };
            self.pending = None;
            let head = chain.head_index();
            let checked = check_chain(mem, table, size, head);
            let hdr = {
                let mut h = [0u8; HDR_LEN];
                h[10] = 1; // num_buffers
                h
            };
            self.frame[..HDR_LEN].copy_from_slice(&hdr);
            let total = HDR_LEN + len;
            let mut written = 0usize;
            let result = checked.and_then(|()| {
                for d in chain {
                    if written == total {
                        break;
                    }
                    if !d.is_write_only() {
                        return Err("a device-readable descriptor in a receive chain".into());
                    }
                    let n = (d.len() as usize).min(total - written);
                    mem.write_slice(&self.frame[written..written + n], d.addr())
                        .map_err(|e| format!("buffer at {:#x}: {e}", d.addr().0))?;
                    written += n;
                }
                if written < total {
                    return Err(format!(
                        "a {len}-byte frame does not fit the guest's {}-byte buffer",
                        written.saturating_sub(HDR_LEN)
                    ));
                }
                Ok(())
            });
            let used = match result {
                Ok(()) => {
                    self.counters.rx_frames += 1;
                    self.counters.rx_bytes += len as u64;
                    total as u32
                }
                Err(m) => {
                    self.counters.rx_dropped += 1;
                    self.warn(&format!("received frame dropped: {m}"));
                    0
                }
            };
            if let Err(e) = q.add_used(mem, head, used) {
                self.warn(&format!("cannot add to the used ring: {e}"));
            }
        }
        (budget, true)
    }

    /// Sends the guest's frames to the backend.
    fn transmit(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        hold: &AtomicBool,
        budget: usize,
    ) -> (usize, bool) {
        let (table, size) = (q.desc_table(), q.size());
        for served in 0..budget {
            if hold.load(Ordering::Acquire) {
                return (served, false);
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                return (served, false);
            };
            let head = chain.head_index();
            self.tx.clear();
            let mut result = check_chain(mem, table, size, head);
            if result.is_ok() {
                for d in chain.filter(|d| !d.is_write_only()) {
                    let n = d.len() as usize;
                    if self.tx.len() + n > HDR_LEN + MAX_FRAME {
                        result = Err(format!(
                            "a frame of more than {MAX_FRAME} bytes (descriptor of {n} bytes)"
                        ));
                        break;
                    }
                    let at = self.tx.len();
                    self.tx.resize(at + n, 0);
                    if let Err(e) = mem.read_slice(&mut self.tx[at..], d.addr()) {
                        result = Err(format!("buffer at {:#x}: {e}", d.addr().0));
                        break;
                    }
                }
            }
            if result.is_ok() && self.tx.len() < HDR_LEN {
                result = Err(format!("{} bytes, shorter than the header", self.tx.len()));
            }
            let result = result.map_err(Some).and_then(|()| {
                match self.backend.send(&self.tx[HDR_LEN..]) {
                    Ok(()) => Ok(()),
                    // A full tap queue (EAGAIN) or a tap that is down on the host (EIO):
                    // a network dropping a frame, not worth a warning.
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.raw_os_error() == Some(libc::EIO) =>
                    {
                        Err(None)
                    }
                    Err(e) => Err(Some(format!("writing to the tap: {e}"))),
                }
            });
            match result {
                Ok(()) => {
                    self.counters.tx_frames += 1;
                    self.counters.tx_bytes += (self.tx.len() - HDR_LEN) as u64;
                }
                Err(m) => {
                    self.counters.tx_dropped += 1;
                    if let Some(m) = m {
                        self.warn(&format!("sent frame dropped: {m}"));
                    }
                }
            }
            if let Err(e) = q.add_used(mem, head, 0) {
                self.warn(&format!("cannot add to the used ring: {e}"));
            }
        }
        (budget, true)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
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
            RX => self.receive(q, mem, hold, budget),
            TX => self.transmit(q, mem, hold, budget),
            _ => (0, false),
        }
    }

    fn reset(&mut self) {
        self.pending = None;
    }
}

/// An attached virtio-net device.
pub type NetHandle = VirtioMmio<Net>;

/// The tap and MAC of `[[net]]` `i` of `cfg` (the MAC defaulting to [`MacAddr::auto`]).
pub fn identity(cfg: &VmConfig, i: usize) -> (String, MacAddr) {
    let n = &cfg.nets[i];
    (n.tap.clone(), n.mac.unwrap_or_else(|| MacAddr::auto(0, i)))
}

/// What a restore may change about the first `[[net]]` (per clone: its tap and MAC).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetOverride {
    pub tap: Option<String>,
    pub mac: Option<MacAddr>,
}

impl NetOverride {
    pub fn is_empty(&self) -> bool {
        self.tap.is_none() && self.mac.is_none()
    }

    /// `cfg` with the override applied to its first `[[net]]`; an error if there is none.
    pub fn apply(&self, cfg: &VmConfig) -> Result<VmConfig> {
        let mut cfg = cfg.clone();
        if self.is_empty() {
            return Ok(cfg);
        }
        let Some(n) = cfg.nets.first_mut() else {
            return Err(Error::Config(
                "--net-tap and --mac need a VM with a [[net]] device; this one has none".into(),
            ));
        };
        if let Some(t) = &self.tap {
            vmpack_formats::config::check_ifname(t).map_err(Error::Config)?;
            n.tap = t.clone();
        }
        if let Some(m) = self.mac {
            n.mac = Some(m);
        }
        Ok(cfg)
    }
}

fn state_of(t: &super::mmio::MmioTransport<Net>) -> VirtioNetState {
    VirtioNetState {
        transport: t.state(),
        mac: t.device.mac.to_string(),
        tap: t.device.tap.clone(),
        counters: t.device.counters.clone(),
    }
}

/// What a virtio-net device is built from besides its state.
pub struct NetArgs<'a> {
    pub vm: &'a kvm_ioctls::VmFd,
    pub mem: &'a GuestMemoryMmap,
    pub worker: &'a Worker,
    pub net: Net,
    pub base: u64,
    pub gsi: u32,
}

impl NetArgs<'_> {
    /// Starts the device (fresh, or with a saved transport) and puts the tap in the worker.
    fn start(self, transport: Option<&MmioTransportState>) -> Result<Arc<NetHandle>> {
        let fd: Option<OwnedFd> = self
            .net
            .tap_fd
            .as_ref()
            .map(|f| f.try_clone())
            .transpose()?;
        let h = VirtioMmio::start(
            self.vm,
            self.mem,
            self.worker,
            self.net,
            (self.base, self.gsi),
            transport,
            "virtio-net",
        )?;
        if let Some(fd) = &fd {
            self.worker.add_backend(fd.as_fd(), h.clone(), RX)?;
        }
        Ok(h)
    }
}

impl<'a> Persist<'a> for Arc<NetHandle> {
    type State = VirtioNetState;
    type ConstructorArgs = NetArgs<'a>;
    const VERSION: u32 = 1;
    type Error = Error;

    fn save(&self) -> Result<VirtioNetState> {
        Ok(state_of(&lock(&self.dev)))
    }

    /// The device with its saved transport; the MAC is the args' (a clone's may differ: the
    /// guest then gets a configuration-change interrupt and a new config generation).
    fn restore(a: NetArgs<'a>, state: &VirtioNetState) -> Result<Arc<NetHandle>> {
        let changed = state.mac != a.net.mac.to_string();
        let h = a.start(Some(&state.transport))?;
        if changed {
            lock(&h.dev).signal_config();
        }
        Ok(h)
    }
}

impl VmDevice for NetHandle {
    fn save(&self, id: &str) -> Result<DeviceState> {
        Ok(DeviceState {
            id: id.to_string(),
            version: <Arc<NetHandle> as Persist>::VERSION,
            state: serde_json::to_value(state_of(&lock(&self.dev)))?,
        })
    }

    /// Back to the saved transport and counters with the tap kept attached (its fd stays in
    /// the worker); a frame read from the tap and not yet placed is dropped, as a network
    /// may drop one. The MAC stays this VM's: if the pack's differs, the guest gets the
    /// configuration-change interrupt again, as on the restore.
    fn reset_to(&self, state: &DeviceState) -> Result<()> {
        let s = state.decode::<Arc<NetHandle>>()?;
        let mut changed = false;
        VirtioMmio::reset_to(self, &s.transport, |d| {
            d.counters = s.counters.clone();
            d.pending = None;
            changed = s.mac != d.mac.to_string();
            Ok(())
        })?;
        if changed {
            lock(&self.dev).signal_config();
        }
        Ok(())
    }

    fn resettable(&self) -> bool {
        true
    }

    fn status(&self) -> Option<crate::api::DeviceStatus> {
        let t = lock(&self.dev);
        let c = &t.device.counters;
        Some(crate::api::DeviceStatus::Net(crate::api::NetStatus {
            mmio_base: self.base,
            gsi: self.gsi,
            tap: t.device.tap.clone(),
            mac: t.device.mac.to_string(),
            rx_frames: c.rx_frames,
            rx_bytes: c.rx_bytes,
            rx_dropped: c.rx_dropped,
            tx_frames: c.tx_frames,
            tx_bytes: c.tx_bytes,
            tx_dropped: c.tx_dropped,
        }))
    }
}

/// Attaches every `[[net]]` of `cfg` (its tap opened by name) and registers a virtio-net
/// device for it with `dm` (fresh, or from its saved state, whose MAC, if the config's
/// differs, is replaced with a configuration-change interrupt).
pub fn attach_all<'s>(
    cfg: &VmConfig,
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMemoryMmap,
    worker: &Worker,
    dm: &mut crate::device_manager::DeviceManager,
    saved: impl Fn(&str) -> Option<&'s DeviceState>,
) -> Result<()> {
    for i in 0..cfg.nets.len() {
        let id = id(i);
        let state = saved(&id)
            .map(|s| s.decode::<Arc<NetHandle>>())
            .transpose()?;
        let (tap, mac) = identity(cfg, i);
        let opened = Tap::open(&tap).with_context(|| format!("[[net]] {i}"))?;
        let counters = state
            .as_ref()
            .map(|s| s.counters.clone())
            .unwrap_or_default();
        let net = Net::from_tap(opened, mac, counters)?;
        dm.add_virtio_mmio(&id, |base, gsi| {
            let args = NetArgs {
                vm,
                mem,
                worker,
                net,
                base,
                gsi,
            };
            let h = match &state {
                Some(s) => Arc::<NetHandle>::restore(args, s)?,
                None => args.start(None)?,
            };
            let dev = h.dev.clone();
            Ok((dev, h as Arc<dyn VmDevice>))
        })?;
    }
    Ok(())
}

/// virtio-net against virtio-queue's mock rings and an in-memory backend.
#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    #[derive(Clone, Default)]
    struct Wire {
        to_guest: Arc<Mutex<VecDeque<Vec<u8>>>>,
        from_guest: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl Backend for Wire {
        fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.to_guest.lock().unwrap().pop_front() {
                Some(f) => {
                    let n = f.len().min(buf.len());
                    buf[..n].copy_from_slice(&f[..n]);
                    Ok(n)
                }
                None => Err(std::io::ErrorKind::WouldBlock.into()),
            }
        }
        fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
            self.from_guest.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    fn setup() -> (GuestMemoryMmap, Wire, Net) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let wire = Wire::default();
        let net = Net::new(
            Box::new(wire.clone()),
            "test0",
            MacAddr::auto(3, 0),
            NetCounters::default(),
        );
        (mem, wire, net)
    }

    fn serve(net: &mut Net, idx: usize, q: &mut Queue, mem: &GuestMemoryMmap) -> (usize, bool) {
        VirtioDevice::process_queue(net, idx, q, mem, &AtomicBool::new(false), 16)
    }

    #[test]
    fn config_space_has_mac_and_link_up() {
        let (_, _, net) = setup();
        assert_eq!(net.config(), &[2, 0x76, 0x6d, 0, 3, 0, 1, 0]);
        assert_eq!(net.features() & (1 << 0), 0, "no checksum offload");
    }

    #[test]
    fn frames_both_ways_with_header() {
        let (mem, wire, mut net) = setup();
        let rxq = MockSplitQueue::new(&mem, 16);
        let mut rx: Queue = rxq.create_queue().unwrap();
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let mut tx: Queue = txq.create_queue().unwrap();

        // A frame waits when the guest has no buffer, then lands with a zero header.
        wire.to_guest.lock().unwrap().push_back(vec![0xaa; 60]);
        assert_eq!(serve(&mut net, RX, &mut rx, &mem), (0, false));
        assert_eq!(net.pending, Some(60));
        rxq.add_desc_chains(&[desc(0x10_0000, 1526, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        assert_eq!(serve(&mut net, RX, &mut rx, &mem), (1, false));
        let used = rxq.used().ring().ref_at(0).unwrap().load();
        assert_eq!((used.id(), used.len()), (0, 72));
        let mut got = [0u8; 72];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(got[..12], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(got[12..], [0xaa; 60]);

        // A frame sent across two descriptors loses its header on the way out.
        mem.write_slice(&[0u8; 12], GuestAddress(0x20_0000))
            .unwrap();
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x20_1000))
            .unwrap();
        txq.add_desc_chains(
            &[
                desc(0x20_0000, 12, VRING_DESC_F_NEXT, 1),
                desc(0x20_1000, 4, 0, 0),
            ],
            0,
        )
        .unwrap();
        assert_eq!(serve(&mut net, TX, &mut tx, &mem), (1, false));
        assert_eq!(*wire.from_guest.lock().unwrap(), vec![vec![1, 2, 3, 4]]);
        assert_eq!(net.counters.tx_frames, 1);
        assert_eq!(net.counters.rx_frames, 1);
    }

    #[test]
    fn bad_input_is_dropped_not_fatal() {
        let (mem, wire, mut net) = setup();
        let rxq = MockSplitQueue::new(&mem, 16);
        let mut rx: Queue = rxq.create_queue().unwrap();
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let mut tx: Queue = txq.create_queue().unwrap();

        // A frame larger than the buffer: dropped, the buffer given back with length 0.
        wire.to_guest.lock().unwrap().push_back(vec![0x55; 1514]);
        rxq.add_desc_chains(&[desc(0x10_0000, 100, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        assert_eq!(serve(&mut net, RX, &mut rx, &mem), (1, false));
        assert_eq!(rxq.used().ring().ref_at(0).unwrap().load().len(), 0);
        assert_eq!(net.counters.rx_dropped, 1);

        // A buffer that claims to reach past guest RAM.
        wire.to_guest.lock().unwrap().push_back(vec![0x55; 60]);
        rxq.add_desc_chains(&[desc(0x3f_fff0, 0x1000, VRING_DESC_F_WRITE, 0)], 1)
            .unwrap();
        assert_eq!(serve(&mut net, RX, &mut rx, &mem), (1, false));
        assert_eq!(rxq.used().ring().ref_at(1).unwrap().load().len(), 0);
        assert_eq!(net.counters.rx_dropped, 2);

        // A device-readable descriptor in a receive chain.
        wire.to_guest.lock().unwrap().push_back(vec![0x55; 60]);
        rxq.add_desc_chains(&[desc(0x10_0000, 2048, 0, 0)], 2)
            .unwrap();
        assert_eq!(serve(&mut net, RX, &mut rx, &mem), (1, false));
        assert_eq!(net.counters.rx_dropped, 3);

        // Sent: a descriptor lying about its length (4 GiB), one outside RAM, one looping
        // chain, one shorter than the header: all dropped, all completed.
        txq.add_desc_chains(&[desc(0x20_0000, u32::MAX, 0, 0)], 0)
            .unwrap();
        txq.add_desc_chains(&[desc(0x50_0000, 64, 0, 0)], 1)
            .unwrap();
        txq.add_desc_chains(
            &[
                desc(0x20_0000, 12, VRING_DESC_F_NEXT, 3),
                desc(0x20_0000, 12, VRING_DESC_F_NEXT, 2),
            ],
            2,
        )
        .unwrap();
        txq.add_desc_chains(&[desc(0x20_0000, 4, 0, 0)], 4).unwrap();
        assert_eq!(serve(&mut net, TX, &mut tx, &mem), (4, false));
        assert_eq!(txq.used().idx().load(), 4);
        assert!(wire.from_guest.lock().unwrap().is_empty());
        assert_eq!(net.counters.tx_dropped, 4);
        assert_eq!(net.counters.tx_frames, 0);
    }

    #[test]
    fn a_pause_leaves_the_rings_alone() {
        let (mem, wire, mut net) = setup();
        let rxq = MockSplitQueue::new(&mem, 16);
        let mut rx: Queue = rxq.create_queue().unwrap();
        wire.to_guest.lock().unwrap().push_back(vec![1; 60]);
        rxq.add_desc_chains(&[desc(0x10_0000, 1526, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        let r =
            VirtioDevice::process_queue(&mut net, RX, &mut rx, &mem, &AtomicBool::new(true), 16);
        assert_eq!(r, (0, false));
        assert_eq!(rxq.used().idx().load(), 0);
        assert_eq!(wire.to_guest.lock().unwrap().len(), 1);
    }

    #[test]
    fn override_and_state() {
        let cfg = VmConfig::parse(
            "name = \"n\"\nmemory_mib = 16\n[flat]\nimage = \"g.bin\"\nload_address = 0x100000\n\
             entry = 0x100000\nmode = \"long\"\n[[net]]\ntap = \"tap0\"\n",
            std::path::Path::new("n.toml"),
        )
        .unwrap();
        assert_eq!(identity(&cfg, 0), ("tap0".into(), MacAddr::auto(0, 0)));
        let o = NetOverride {
            tap: Some("tap7".into()),
            mac: Some(MacAddr::auto(7, 0)),
        };
        let c2 = o.apply(&cfg).unwrap();
        assert_eq!(
            identity(&c2, 0),
            ("tap7".into(), "02:76:6d:00:07:00".parse().unwrap())
        );
        let bad = NetOverride {
            tap: Some("a/b".into()),
            mac: None,
        };
        assert!(bad.apply(&cfg).is_err());
        let mut none = cfg.clone();
        none.nets.clear();
        assert!(o.apply(&none).unwrap_err().to_string().contains("[[net]]"));

        let mut s = VirtioNetState {
            transport: MmioTransportState {
                queues: vec![Default::default(); 2],
                ..Default::default()
            },
            mac: "02:00:00:00:00:01".into(),
            tap: "tap0".into(),
            counters: NetCounters::default(),
        };
        for q in &mut s.transport.queues {
            q.max_size = QUEUE_SIZE;
        }
        s.validate().unwrap();
        s.mac = "ff:ff:ff:ff:ff:ff".into();
        assert!(s.validate().is_err());
    }
}
