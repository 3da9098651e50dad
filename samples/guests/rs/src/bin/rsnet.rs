//! rsnet: answers on its virtio-net through the rcore-os `virtio-drivers` crate's raw net
//! driver, interrupt-driven (samples/rsnet.toml). Its address is 10.0.0.2/24; it answers
//! ARP for it, ICMP echo (ping) and UDP echo on port 7, only for frames sent to its MAC.
//! Output on COM1:
//!   "net mac XX:XX:XX:XX:XX:XX ip 10.0.0.2 ready"   after the driver is up
//!   "net mac XX:XX:XX:XX:XX:XX"                     when the device's MAC changed (a clone
//!                                                   restored with --mac), then a gratuitous ARP
//!   "net done arp=A icmp=I udp=U ignored=N"         after a UDP echo datagram "exit"
//! then exits 0 (3 driver failure, 6 CPU exception, 9 panic). Without a virtio-net device it
//! prints "no virtio-net device (N virtio-mmio devices); idling" and sleeps forever.
#![no_std]
#![no_main]

#[path = "../rt.rs"]
#[macro_use]
mod rt;

#[path = "../net.rs"]
mod net;

const VIRTIO_ID_NET: u32 = 1;
const IP: [u8; 4] = [10, 0, 0, 2];

#[no_mangle]
pub fn guest_main() -> ! {
    let (slots, n) = rt::probe();
    let Some(slot) = slots
        .iter()
        .flatten()
        .find(|s| s.device_id == VIRTIO_ID_NET)
        .map(|s| s.index)
    else {
        // Idles instead of ending, so a VM without a network can be saved and cloned as the
        // baseline of the clone benchmark (tests/tests/net.rs, net_bench).
        println!("no virtio-net device ({n} virtio-mmio devices); idling");
        loop {
            rt::sleep_ms(1000);
        }
    };
    let mut r = net::Responder::new(slot, IP);
    println!(
        "net mac {} ip {}.{}.{}.{} ready",
        net::MacFmt(r.mac),
        IP[0],
        IP[1],
        IP[2],
        IP[3]
    );
    while !r.serve_once() {}
    let s = r.stats;
    println!(
        "net done arp={} icmp={} udp={} ignored={}",
        s.arp, s.icmp, s.udp, s.ignored
    );
    rt::exit(0)
}
