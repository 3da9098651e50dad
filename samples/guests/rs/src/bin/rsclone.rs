//! rsclone: a clone's four identities in one guest (samples/rsclone.toml): the vsock
//! services of rsvsock (echo on port 5000, key-value with `rng` and `genid` on 5001) and
//! the network responder of rsnet (10.0.0.2/24: ARP, ping, UDP echo on port 7, only for
//! frames sent to its MAC), both interrupt-driven from one loop, so a test can check that a
//! clone restored with `--clones N --net-tap --mac auto --vsock-sock` answers only its own
//! traffic and reports its own generation ID. Output on COM1: "net mac ... ready" (or
//! "no virtio-net device"), "vsock cid N", "vsock ready", and "net mac ..." when a restore
//! changed the MAC. A UDP "exit" is echoed and ignored (the VM runs until stopped). Without a
//! vsock device it prints "no virtio-vsock device" and idles (the benchmark's baseline);
//! exits 2 when the vsock device fails to probe, 3 on a net driver failure.
#![no_std]
#![no_main]

#[path = "../rt.rs"]
#[macro_use]
mod rt;
#[path = "../net.rs"]
mod net;
#[path = "../vsock.rs"]
mod vsock;

use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::mmio::MmioTransport;

const VIRTIO_ID_NET: u32 = 1;
const VIRTIO_ID_RNG: u32 = 4;
const VIRTIO_ID_VSOCK: u32 = 19;
const IP: [u8; 4] = [10, 0, 0, 2];

struct Id {
    rng: Option<VirtIORng<rt::GuestHal, MmioTransport<'static>>>,
}

impl vsock::Identity for Id {
    fn entropy(&mut self) -> Option<[u8; 32]> {
        let rng = self.rng.as_mut()?;
        let mut b = [0u8; 32];
        let n = rng.request_entropy(&mut b).ok()?;
        rng.ack_interrupt();
        (n == 32).then_some(b)
    }

    fn generation_id(&mut self) -> Option<[u8; 16]> {
        rt::generation_id()
    }
}

struct Net(Option<net::Responder>);

impl vsock::Also for Net {
    fn irqs(&self) -> u32 {
        self.0.as_ref().map_or(0, |r| r.irqs())
    }
    fn poll(&mut self) {
        if let Some(r) = self.0.as_mut() {
            r.handle_pending();
        }
    }
}

#[no_mangle]
fn guest_main() -> ! {
    let (slots, _) = rt::probe();
    let find = |id| slots.iter().flatten().find(|s| s.device_id == id).copied();
    let Some(vs) = find(VIRTIO_ID_VSOCK) else {
        // Idles, so the same guest without its devices is the clone benchmark's baseline.
        println!("no virtio-vsock device");
        loop {
            rt::sleep_ms(60_000);
        }
    };
    let net = find(VIRTIO_ID_NET).map(|s| {
        let r = net::Responder::new(s.index, IP);
        println!(
            "net mac {} ip {}.{}.{}.{} ready",
            net::MacFmt(r.mac),
            IP[0],
            IP[1],
            IP[2],
            IP[3]
        );
        r
    });
    if net.is_none() {
        println!("no virtio-net device");
    }
    let rng = find(VIRTIO_ID_RNG).and_then(|s| VirtIORng::new(rt::transport(s.index)).ok());
    let mut id = Id { rng };
    vsock::serve_also(vs.index, &mut id, &mut Net(net))
}
