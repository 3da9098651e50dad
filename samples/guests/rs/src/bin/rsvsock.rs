//! rsvsock: the vsock services of `src/vsock.rs` (echo on port 5000, key-value on 5001)
//! through `virtio-drivers`, with entropy from virtio-rng and the VM generation ID on
//! request. virtio-rng is optional. Without a virtio-vsock device (`[vsock]` in the config)
//! it prints "no virtio-vsock device" and sleeps (the benchmark's VM without vsock); runs
//! until the VM is stopped; exit 2 if the vsock device fails to probe.
#![no_std]
#![no_main]

#[path = "../rt.rs"]
#[macro_use]
mod rt;
#[path = "../vsock.rs"]
mod vsock;

use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::mmio::MmioTransport;

const VIRTIO_ID_RNG: u32 = 4;
const VIRTIO_ID_VSOCK: u32 = 19;

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

#[no_mangle]
fn guest_main() -> ! {
    let (slots, _) = rt::probe();
    let find = |id| slots.iter().flatten().find(|s| s.device_id == id).copied();
    let Some(vs) = find(VIRTIO_ID_VSOCK) else {
        println!("no virtio-vsock device");
        loop {
            rt::sleep_ms(60_000);
        }
    };
    let rng = find(VIRTIO_ID_RNG).and_then(|s| VirtIORng::new(rt::transport(s.index)).ok());
    let mut id = Id { rng };
    vsock::serve(vs.index, &mut id)
}
