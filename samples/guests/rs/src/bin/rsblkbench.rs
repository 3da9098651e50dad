//! rsblkbench: virtio-blk throughput through `virtio-drivers`, interrupt-driven, one request
//! in flight. The same phases as the assembly samples/guests/blkbench.S (which polls), so the two
//! compare: 2048 requests of 4 KiB each for "seqwrite" (the first 8 MiB), "seqread" (the same),
//! "randwrite" and "randread" (4 KiB blocks in the first 64 MiB, picked by the LCG
//! x = x * 6364136223846793005 + 1442695040888963407, block = (x >> 33) & 16383, x0 = 1),
//! then "seqwrite64k" and "seqread64k": 1024 requests of 64 KiB over the first 64 MiB.
//! Then all six again with interrupts off, spinning on the used ring ("NAME-poll"): the
//! difference is the cost of sleeping in `hlt` and being woken by the interrupt. Each phase
//! is framed by "start NAME" / "end NAME" lines the host timestamps. Disk 0 must hold at
//! least 64 MiB. Exits 0 (3 if a request fails, 2 without a disk).
#![no_std]
#![no_main]

#[path = "../rt.rs"]
#[macro_use]
mod rt;

use core::ptr::addr_of_mut;
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
use virtio_drivers::transport::mmio::MmioTransport;

type Blk = VirtIOBlk<rt::GuestHal, MmioTransport<'static>>;

const COUNT: u64 = 2048;
const BIG: usize = 64 << 10;

static mut BUF: [u8; BIG] = [0; BIG];

fn request(blk: &mut Blk, poll: bool, write: bool, sector: usize, buf: &mut [u8]) {
    let mut req = BlkReq::default();
    let mut resp = BlkResp::default();
    // SAFETY: req, buf and resp stay untouched until the request completes below.
    let token = unsafe {
        if write {
            blk.write_blocks_nb(sector, &mut req, buf, &mut resp)
        } else {
            blk.read_blocks_nb(sector, &mut req, buf, &mut resp)
        }
    };
    let Ok(token) = token else {
        println!("submit failed");
        rt::exit(3)
    };
    if poll {
        while blk.peek_used() != Some(token) {
            core::hint::spin_loop();
        }
    } else {
        rt::wait_for(|| blk.peek_used() == Some(token));
        blk.ack_interrupt();
    }
    // SAFETY: the same buffers as submitted.
    let r = unsafe {
        if write {
            blk.complete_write_blocks(token, &req, buf, &mut resp)
        } else {
            blk.complete_read_blocks(token, &req, buf, &mut resp)
        }
    };
    if r.is_err() {
        println!("request failed: {r:?}");
        rt::exit(3)
    }
}

pub fn guest_main() -> ! {
    let (slots, _) = rt::probe();
    if !matches!(slots[0], Some(s) if s.device_id == 2) {
        println!("no virtio-blk disk in slot 0");
        rt::exit(2)
    }
    let Ok(mut blk) = Blk::new(rt::transport(0)) else {
        println!("virtio-blk probe failed");
        rt::exit(2)
    };
    rt::route_device_irq(0);
    blk.enable_interrupts();
    // SAFETY: one request at a time uses the buffer.
    let buf = unsafe { &mut *addr_of_mut!(BUF) };
    for poll in [false, true] {
        if poll {
            blk.disable_interrupts();
        }
        let suffix = if poll { "-poll" } else { "" };
        for (name, write, random) in [
            ("seqwrite", true, false),
            ("seqread", false, false),
            ("randwrite", true, true),
            ("randread", false, true),
        ] {
            println!("start {name}{suffix}");
            let mut x: u64 = 1;
            for i in 0..COUNT {
                let block = if random {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    (x >> 33) & 16383
                } else {
                    i
                };
                request(&mut blk, poll, write, block as usize * 8, &mut buf[..4096]);
            }
            println!("end {name}{suffix}");
        }
        for (name, write) in [("seqwrite64k", true), ("seqread64k", false)] {
            println!("start {name}{suffix}");
            for i in 0..1024 {
                request(&mut blk, poll, write, i * (BIG / 512), buf);
            }
            println!("end {name}{suffix}");
        }
    }
    rt::exit(0)
}
