//! rsblk: the blk sample's checks (samples/guests/blk.S) through an independent driver stack,
//! the rcore-os `virtio-drivers` crate, with interrupt-driven completion.
//!
//! Disk 0 (virtio-mmio slot 0) needs at least 64 sectors. Output on COM1:
//!   "capacity N"                 disk size in 512-byte sectors
//!   "pass 0 sum=H"               FNV-style checksum of sectors 0..63 as found
//!   for pass P = 1..3:
//!   "pass P written"             64 single-sector writes of pattern(sector, P), then ~2 s asleep
//!   "pass P sum=H bad=N"         one 32 KiB read of sectors 0..63, then ~1 s asleep
//!   "flush status=0", "id TEXT"  a FLUSH and a GET_ID request
//!   "rng ok"                     only with a virtio-rng device: 32 bytes of entropy came
//!   "interrupts ok"              the disk's interrupt arrived (exit 4 if it never did)
//! then exits 0 (1 if any qword read back was wrong; 2-5 driver failures, 6 CPU exception,
//! 7 rng failure, 9 panic). A read-only disk gets one write instead, which must fail:
//! "read-only disk", "write status=1" (IOERR), "pass 0 sum=H", exit 0.
//!
//! Every data request is submitted with `*_blocks_nb`, and the guest sleeps in `hlt` until
//! the disk's interrupt (IOAPIC pin 5 -> vector 0x30) shows the request in the used ring.
//! FLUSH and GET_ID use the crate's blocking calls (it offers no other), which spin on the
//! used ring; their interrupts still arrive.
#![no_std]
#![no_main]

#[path = "../rt.rs"]
#[macro_use]
mod rt;

use core::ptr::addr_of_mut;
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::Error;

const NSECT: usize = 64;
const PASSES: u64 = 3;
const DISK_SLOT: usize = 0;
const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_ID_RNG: u32 = 4;

type Blk = VirtIOBlk<rt::GuestHal, MmioTransport<'static>>;

static mut WBUF: [u8; SECTOR_SIZE] = [0; SECTOR_SIZE];
static mut RBUF: [u8; NSECT * SECTOR_SIZE] = [0; NSECT * SECTOR_SIZE];

/// pattern(sector, pass): qword i = ((sector << 16) | pass) * K + i, as blk.S writes it.
fn fill(buf: &mut [u8], sector: u64, pass: u64) {
    let base = ((sector << 16) | pass).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (i, q) in buf.chunks_exact_mut(8).enumerate() {
        q.copy_from_slice(&base.wrapping_add(i as u64).to_le_bytes());
    }
}

/// Sleeps until the request `token` is in the used ring, then acknowledges the interrupt.
fn wait_used(blk: &mut Blk, token: u16) {
    rt::wait_for(|| blk.peek_used() == Some(token));
    blk.ack_interrupt();
}

fn write_sector(blk: &mut Blk, sector: usize, buf: &[u8]) -> Result<(), Error> {
    let mut req = BlkReq::default();
    let mut resp = BlkResp::default();
    // SAFETY: req, buf and resp stay untouched until complete_write_blocks below.
    let token = unsafe { blk.write_blocks_nb(sector, &mut req, buf, &mut resp)? };
    wait_used(blk, token);
    // SAFETY: the same buffers as submitted.
    unsafe { blk.complete_write_blocks(token, &req, buf, &mut resp) }
}

fn read_sectors(blk: &mut Blk, sector: usize, buf: &mut [u8]) -> Result<(), Error> {
    let mut req = BlkReq::default();
    let mut resp = BlkResp::default();
    // SAFETY: req, buf and resp stay untouched until complete_read_blocks below.
    let token = unsafe { blk.read_blocks_nb(sector, &mut req, buf, &mut resp)? };
    wait_used(blk, token);
    // SAFETY: the same buffers as submitted.
    unsafe { blk.complete_read_blocks(token, &req, buf, &mut resp) }
}

fn status_code(r: Result<(), Error>) -> u8 {
    match r {
        Ok(()) => 0,
        Err(Error::IoError) => 1,
        Err(Error::Unsupported) => 2,
        Err(e) => {
            println!("request failed: {e:?}");
            rt::exit(3)
        }
    }
}

fn check(r: Result<(), Error>) {
    if let Err(e) = r {
        println!("request failed, status {}", status_code(Err(e)));
        rt::exit(3)
    }
}

/// Reads sectors 0..63 in one request and prints "pass P sum=H[ bad=N]"; returns bad qwords.
fn read_check(blk: &mut Blk, pass: u64) -> u64 {
    // SAFETY: the buffers are used by this single thread only, one request at a time.
    let (rbuf, wbuf) = unsafe { (&mut *addr_of_mut!(RBUF), &mut *addr_of_mut!(WBUF)) };
    check(read_sectors(blk, 0, rbuf));
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut bad = 0;
    for (s, sector) in rbuf.chunks_exact(SECTOR_SIZE).enumerate() {
        fill(wbuf, s as u64, pass);
        for (q, want) in sector.chunks_exact(8).zip(wbuf.chunks_exact(8)) {
            let v = u64::from_le_bytes(q.try_into().unwrap());
            h = (h ^ v).wrapping_mul(0x100_0000_01b3);
            if q != want {
                bad += 1;
            }
        }
    }
    if pass == 0 {
        println!("pass 0 sum={h:016x}");
        0
    } else {
        println!("pass {pass} sum={h:016x} bad={bad}");
        bad
    }
}

/// With a virtio-rng device among the slots, 32 bytes through the crate's rng driver:
/// "rng ok" when they came and are not all alike (exit 7 otherwise). Without one, nothing.
fn rng_check(slots: &[Option<rt::Slot>]) {
    let Some(slot) = slots
        .iter()
        .flatten()
        .find(|s| s.device_id == VIRTIO_ID_RNG)
    else {
        return;
    };
    let mut rng = match VirtIORng::<rt::GuestHal, _>::new(rt::transport(slot.index)) {
        Ok(r) => r,
        Err(e) => {
            println!("virtio-rng probe failed: {e:?}");
            rt::exit(7)
        }
    };
    rt::route_device_irq(slot.index);
    rng.enable_interrupts();
    let mut buf = [0u8; 32];
    let got = rng.request_entropy(&mut buf);
    rng.ack_interrupt();
    match got {
        Ok(32) if buf.iter().any(|&b| b != buf[0]) => println!("rng ok"),
        other => {
            println!("rng failed: {other:?} {buf:02x?}");
            rt::exit(7)
        }
    }
}

pub fn guest_main() -> ! {
    let (slots, n) = rt::probe();
    match slots[DISK_SLOT] {
        Some(s) if s.device_id == VIRTIO_ID_BLOCK => {}
        _ => {
            println!("virtio-blk probe failed ({n} virtio-mmio devices)");
            rt::exit(2)
        }
    }
    let mut blk = match Blk::new(rt::transport(DISK_SLOT)) {
        Ok(b) => b,
        Err(e) => {
            println!("virtio-blk probe failed: {e:?}");
            rt::exit(2)
        }
    };
    rt::route_device_irq(DISK_SLOT);
    blk.enable_interrupts();

    println!("capacity {}", blk.capacity());
    if blk.capacity() < NSECT as u64 {
        println!("disk smaller than 64 sectors");
        rt::exit(5)
    }

    // SAFETY: single-threaded; no request holds WBUF between these uses.
    let wbuf = unsafe { &mut *addr_of_mut!(WBUF) };
    if blk.readonly() {
        println!("read-only disk");
        fill(wbuf, 0, 1);
        let st = status_code(write_sector(&mut blk, 0, wbuf));
        println!("write status={st}");
        read_check(&mut blk, 0);
        rt::exit(0)
    }

    read_check(&mut blk, 0);
    let mut bad_total = 0;
    for pass in 1..=PASSES {
        for s in 0..NSECT {
            // SAFETY: as above.
            let wbuf = unsafe { &mut *addr_of_mut!(WBUF) };
            fill(wbuf, s as u64, pass);
            check(write_sector(&mut blk, s, wbuf));
        }
        println!("pass {pass} written");
        rt::sleep_ms(2000);
        bad_total += read_check(&mut blk, pass);
        rt::sleep_ms(1000);
    }

    let st = status_code(blk.flush());
    blk.ack_interrupt();
    println!("flush status={st}");

    let mut id = [0u8; 20];
    let len = match blk.device_id(&mut id) {
        Ok(len) => len,
        Err(e) => {
            println!("request failed, status {}", status_code(Err(e)));
            rt::exit(3)
        }
    };
    blk.ack_interrupt();
    let id = core::str::from_utf8(&id[..len]).unwrap_or("?");
    println!("id {id}");

    rng_check(&slots[..n]);

    // Edge-triggered pulses that arrive while one is still pending merge (as on hardware), so
    // the count is not one per request; every wait above ended in `hlt`, which only an
    // interrupt ends, and this says the disk's own interrupt did arrive.
    if rt::device_irqs(DISK_SLOT) == 0 {
        println!("no interrupt from the disk");
        rt::exit(4)
    }
    println!("interrupts ok");
    rt::exit(u8::from(bad_total != 0))
}
