//! virtio-blk in-process: the `blk` sample guest (samples/guests/blk.S) runs against a raw
//! disk while the test pauses and resumes it over and over; every pause finds the device
//! drained (each request taken off the ring has completed), the captured device state
//! survives a serializer, and the guest still finishes with the right data on disk.

mod common;
use common::*;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmboot::devices::virtio::VirtioBlkState;
use vmboot::{BootPayload, GuestMemoryInit, RunOptions, SerialSink, Vm, VmState};
use vmpack_formats::config::VmConfig;

const BLK: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/blk.bin"));

fn config(dir: &std::path::Path, disk_len: u64) -> VmConfig {
    std::fs::create_dir_all(dir).unwrap();
    let image = dir.join("blk.bin");
    std::fs::write(&image, BLK).unwrap();
    let disk = dir.join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(disk_len).unwrap();
    let path = dir.join("blk.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"blk\"\nmemory_mib = 16\n[flat]\nimage = \"{}\"\nload_address = 0x100000\n\
             entry = 0x100000\nmode = \"long\"\n[[disk]]\npath = \"{}\"\n",
            image.display(),
            disk.display()
        ),
    )
    .unwrap();
    VmConfig::from_file(&path).unwrap()
}

fn text(buf: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap()).into_owned()
}

#[test]
fn pauses_drain_the_device_and_state_round_trips() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), 1 << 20);
    let payload = BootPayload::from_config(&cfg).unwrap();
    let out = Arc::new(Mutex::new(Vec::new()));
    let opts = RunOptions {
        serial_out: SerialSink::Capture(out.clone()),
        ..Default::default()
    };
    let vm = Vm::create(&cfg, payload, &opts).unwrap();
    let h = vm.controller();
    let runner = std::thread::spawn(move || vm.run().unwrap());

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pauses = 0;
    let mut saw_requests = false;
    let mut last_state = None;
    while !text(&out).contains("id vmboot-disk0") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(37));
        if h.pause().is_err() {
            break; // the guest finished between the check and the pause
        }
        let state = h.save_state().unwrap();
        let ids: Vec<&str> = state.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["com1", "i8042", "virtio-blk0"]);
        let dev = state.device("virtio-blk0").unwrap();
        assert_eq!(dev.version, 1);
        let blk: VirtioBlkState = serde_json::from_value(dev.state.clone()).unwrap();
        let t = &blk.transport;
        if t.status == 0xf {
            let q = &t.queues[0];
            assert!(q.ready);
            assert_eq!(q.size, 16);
            // Everything popped off the avail ring was completed before the pause.
            assert_eq!(q.next_avail, q.next_used, "request in flight at a pause");
            saw_requests |= q.next_used > 0;
        }
        assert_eq!(blk.disk_size, 1 << 20);
        last_state = Some(serde_json::to_vec(&state).unwrap());
        pauses += 1;
        h.resume().unwrap();
    }
    let r = runner.join().unwrap();
    assert_eq!(r.code, 0, "{}: {}", r.message, text(&out));
    assert!(pauses > 5, "only {pauses} pauses");
    assert!(saw_requests);
    let s = text(&out);
    assert_eq!(s.matches(" bad=0").count(), 3, "{s}");
    assert!(s.contains("flush status=0\n"), "{s}");

    // A saved device state names its disk size; a restore with a different disk is refused
    // before anything runs.
    let state = VmState::parse(&last_state.unwrap()).unwrap();
    let small = config(&d.path().join("small"), 64 << 10);
    let err = match Vm::restore(
        &small,
        state.validate(&small).unwrap(),
        GuestMemoryInit::Zeroed,
        BootPayload::default(),
        &RunOptions::default(),
    ) {
        Ok(_) => panic!("restore with a smaller disk succeeded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("disk 0"), "{err}");
}

const BLKBENCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/blkbench.bin"));
const BENCH_COUNT: u64 = 2048;
const BENCH_DISK: u64 = 64 << 20;

/// The 4 KiB blocks a phase touches, as the guest picks them (see blkbench.S).
fn bench_blocks(random: bool) -> Vec<u64> {
    let mut x: u64 = 1;
    (0..BENCH_COUNT)
        .map(|i| {
            if random {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (x >> 33) & 16383
            } else {
                i
            }
        })
        .collect()
}

const PHASES: [(&str, bool, bool); 4] = [
    ("seqwrite", true, false),
    ("seqread", false, false),
    ("randwrite", true, true),
    ("randread", false, true),
];

/// Seconds per phase for the same requests made directly on the backend.
fn host_phases(disk: &dyn vmpack_formats::disk::DiskImage) -> Vec<f64> {
    let mut buf = vec![0x5au8; 4096];
    PHASES
        .iter()
        .map(|&(_, write, random)| {
            let t = Instant::now();
            for b in bench_blocks(random) {
                if write {
                    disk.write_at(&buf, b * 4096).unwrap();
                } else {
                    disk.read_at(&mut buf, b * 4096).unwrap();
                }
            }
            t.elapsed().as_secs_f64()
        })
        .collect()
}

/// Seconds per phase as the guest sees them (between its "start"/"end" lines).
fn guest_phases(dir: &std::path::Path, disk: &std::path::Path, format: &str) -> Vec<f64> {
    let image = dir.join("blkbench.bin");
    std::fs::write(&image, BLKBENCH).unwrap();
    let path = dir.join("bench.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"bench\"\nmemory_mib = 16\n[flat]\nimage = \"{}\"\nload_address = 0x100000\n\
             entry = 0x100000\nmode = \"long\"\n[[disk]]\npath = \"{}\"\nformat = \"{format}\"\n",
            image.display(),
            disk.display()
        ),
    )
    .unwrap();
    let cfg = VmConfig::from_file(&path).unwrap();
    let out = Arc::new(Mutex::new(Vec::new()));
    let opts = RunOptions {
        serial_out: SerialSink::Capture(out.clone()),
        ..Default::default()
    };
    let vm = Vm::create(&cfg, BootPayload::from_config(&cfg).unwrap(), &opts).unwrap();
    let runner = std::thread::spawn(move || vm.run().unwrap());
    let mut seen: Vec<(String, Instant)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while !runner.is_finished() {
        assert!(Instant::now() < deadline, "benchmark guest stalled");
        let t = text(&out);
        for l in t
            .lines()
            .filter(|l| l.starts_with("start ") || l.starts_with("end "))
        {
            if !seen.iter().any(|(s, _)| s == l) {
                seen.push((l.to_string(), Instant::now()));
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let r = runner.join().unwrap();
    assert_eq!(r.code, 0, "{}: {}", r.message, text(&out));
    let at = |l: String| seen.iter().find(|(s, _)| *s == l).map(|(_, t)| *t).unwrap();
    PHASES
        .iter()
        .map(|&(n, _, _)| {
            at(format!("end {n}"))
                .duration_since(at(format!("start {n}")))
                .as_secs_f64()
        })
        .collect()
}

/// `cargo test -p vmboot --release --test virtio_blk -- --ignored --nocapture`
#[test]
#[ignore = "benchmark"]
fn bench_guest_vs_host() {
    use vmpack_formats::config::DiskFormat;
    use vmpack_formats::disk::create_disk;
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    println!("4 KiB requests, {BENCH_COUNT} per phase, queue depth 1; MiB/s and IOPS");
    println!(
        "{:<6} {:<10} {:>10} {:>9} {:>10} {:>9}",
        "format", "phase", "guest", "g-IOPS", "host", "h-IOPS"
    );
    for (fmt, name) in [(DiskFormat::Raw, "raw"), (DiskFormat::Qcow2, "qcow2")] {
        let gdisk = d.path().join(format!("guest.{name}"));
        drop(create_disk(&gdisk, fmt, BENCH_DISK).unwrap());
        let guest = guest_phases(d.path(), &gdisk, name);
        let hdisk = d.path().join(format!("host.{name}"));
        let host = host_phases(create_disk(&hdisk, fmt, BENCH_DISK).unwrap().as_ref());
        for (i, (phase, _, _)) in PHASES.iter().enumerate() {
            let mib = (BENCH_COUNT * 4096) as f64 / (1 << 20) as f64;
            println!(
                "{name:<6} {phase:<10} {:>10.2} {:>9.0} {:>10.1} {:>9.0}",
                mib / guest[i],
                BENCH_COUNT as f64 / guest[i],
                mib / host[i],
                BENCH_COUNT as f64 / host[i]
            );
        }
    }
}
