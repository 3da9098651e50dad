//! Dirty-page tracking and in-place reset through the real `vmboot`: a guest with a known
//! write set (the `dirty` sample guest: three pages, a virtio-blk read into known pages and
//! a write back); `GET /vm/dirty?since=M` must report exactly those pages, from a fresh boot
//! and from a restored pack, and `PUT /vm/reset` must put memory, vCPU, devices and disk
//! back to the pack's state.

mod common;

use common::{bin, http, vmpack};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The 4 KiB pages one round of the `dirty` guest writes (see samples/guests/dirty.S).
const ROUND: &[u64] = &[
    0x200000, // descriptor table (guest)
    0x201000, // avail ring (guest)
    0x202000, // used ring (device)
    0x203000, // request header (guest) and status byte (device)
    0x300000, // T1
    0x301000, // T2
    0x401000, // read buffer, first half (device)
    0x402000, // read buffer, second half (device)
    0x5ff000, // T3
];

struct Vm {
    child: Child,
    sock: PathBuf,
    serial: PathBuf,
}

impl Vm {
    fn spawn(dir: &Path, args: &[&str], tag: &str) -> Vm {
        let _ = vmpack();
        let sock = dir.join(format!("{tag}.sock"));
        let serial = dir.join(format!("{tag}.serial"));
        let child = Command::new(bin("vmboot"))
            .args(args)
            .arg("--api-sock")
            .arg(&sock)
            .arg("--serial-out")
            .arg(&serial)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning vmboot");
        let t = Instant::now();
        while !sock.exists() {
            assert!(t.elapsed() < Duration::from_secs(20), "no API socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Vm {
            child,
            sock,
            serial,
        }
    }

    /// Waits until the guest has printed `needle` `n` times.
    fn wait_for(&self, needle: &str, n: usize) {
        let t = Instant::now();
        loop {
            let out = std::fs::read_to_string(&self.serial).unwrap_or_default();
            if out.matches(needle).count() >= n {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "timed out waiting for {needle:?} x{n}; serial:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn call(&self, method: &str, path: &str, body: &[u8]) -> serde_json::Value {
        let (status, body) = http(&self.sock, method, path, body);
        assert_eq!(status / 100, 2, "{method} {path}: {status} {body}");
        if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&body).unwrap()
        }
    }

    fn mark(&self) -> u64 {
        self.call("PUT", "/vm/dirty/mark", b"")["mark"]
            .as_u64()
            .unwrap()
    }

    /// The pages written since `mark`, one entry per 4 KiB page.
    fn dirty(&self, mark: u64) -> Vec<u64> {
        let v = self.call("GET", &format!("/vm/dirty?since={mark}"), b"");
        assert_eq!(v["mark"], mark);
        assert_eq!(v["page_size"], 4096);
        let mut pages = Vec::new();
        for r in v["ranges"].as_array().unwrap() {
            let (gpa, len) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
            assert!(len > 0 && len % 4096 == 0, "{r}");
            pages.extend((0..len / 4096).map(|i| gpa + i * 4096));
        }
        assert_eq!(v["pages"], pages.len(), "{v}");
        pages
    }

    /// Runs round `n` (counted in this process's output) and returns what it printed.
    fn round(&self, n: usize) -> String {
        self.call("PUT", "/vm/serial/input", b"g");
        self.wait_for("done ", n);
        self.wait_lines(n);
        let out = std::fs::read_to_string(&self.serial).unwrap();
        out.lines()
            .filter(|l| l.starts_with("done "))
            .nth(n - 1)
            .unwrap()
            .to_string()
    }

    fn wait_lines(&self, n: usize) {
        let t = Instant::now();
        loop {
            let out = std::fs::read_to_string(&self.serial).unwrap_or_default();
            if out.lines().filter(|l| l.starts_with("done ")).count() >= n && out.ends_with('\n') {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "serial:\n{out}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn quit(mut self) {
        self.call("PUT", "/vm/serial/input", b"q");
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert_eq!(st.code(), Some(0));
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "guest did not quit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn setup(dir: &Path) -> PathBuf {
    let image = common::samples_dir().join("guests/bin/dirty.bin");
    let _ = bin("vmboot"); // assembles the guest
    std::fs::write(dir.join("disk.img"), vec![0u8; 64 << 10]).unwrap();
    let cfg = dir.join("dirty.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"dirty\"\nmemory_mib = 16\n[flat]\nimage = \"{}\"\n\
             load_address = 0x100000\nentry = 0x100000\nmode = \"long\"\n\
             [[disk]]\npath = \"disk.img\"\nformat = \"raw\"\n",
            image.display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn dirty_log_reports_exactly_what_the_guest_and_the_disk_wrote() {
    if !common::kvm_available("dirty_log_reports_exactly_what_the_guest_and_the_disk_wrote") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    let vm = Vm::spawn(dir.path(), &["run", cfg.to_str().unwrap()], "boot");
    vm.wait_for("ready\n", 1);
    let m1 = vm.mark();
    assert_eq!(vm.dirty(m1), Vec::<u64>::new());
    assert_eq!(vm.round(1), "done 11");
    assert_eq!(vm.dirty(m1), ROUND);
    // A later mark sees only the later round; the earlier mark keeps accumulating.
    let m2 = vm.mark();
    assert!(m2 > m1);
    assert_eq!(vm.dirty(m2), Vec::<u64>::new());
    assert_eq!(vm.round(2), "done 22");
    assert_eq!(vm.dirty(m2), ROUND);
    assert_eq!(vm.dirty(m1), ROUND);
    // Mark 0 (the boot) includes the loaded image and the setup's pages.
    let all = vm.dirty(0);
    assert!(all.contains(&0x100000), "{all:x?}");
    assert!(ROUND.iter().all(|p| all.contains(p)), "{all:x?}");
    let (status, body) = http(&vm.sock, "GET", "/vm/dirty?since=99", b"");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no mark 99"), "{body}");
    let (status, _) = http(&vm.sock, "GET", "/vm/dirty?since=x", b"");
    assert_eq!(status, 400);

    // Restored from a pack, mark 0 is the pack's state: one round writes exactly ROUND.
    let pack = dir.path().join("dirty.vmpack");
    common::blk::save(dir.path(), &vm.sock, &pack, "stop");
    let restored = Vm::spawn(dir.path(), &["restore", pack.to_str().unwrap()], "restored");
    assert_eq!(restored.dirty(0), Vec::<u64>::new());
    assert_eq!(restored.round(1), "done 33");
    assert_eq!(restored.dirty(0), ROUND);
    restored.quit();
}

/// `PUT /vm/reset` on a VM restored from a pack: the guest's pages, its vCPU (it waits in
/// its loop again), the virtio-blk queue positions and the disk it wrote are the pack's
/// again, every time; only the written pages are put back.
#[test]
fn reset_puts_memory_vcpus_devices_and_disks_back() {
    if !common::kvm_available("reset_puts_memory_vcpus_devices_and_disks_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    let vm = Vm::spawn(dir.path(), &["run", cfg.to_str().unwrap()], "boot");
    vm.wait_for("ready\n", 1);
    // A booted VM has no pack state to go back to.
    let (status, body) = http(&vm.sock, "PUT", "/vm/reset", b"");
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("only a VM restored from a pack can be reset"),
        "{body}"
    );
    // The same state twice: compressed (the VM runs on), then uncompressed (it stops).
    let zpack = dir.path().join("dirty-zstd.vmpack");
    common::ok(&common::run(
        dir.path(),
        &[
            "save",
            "--api-sock",
            vm.sock.to_str().unwrap(),
            "-o",
            zpack.to_str().unwrap(),
            "--compress",
            "zstd",
            "--then",
            "resume",
            "--quiet",
        ],
    ));
    let pack = dir.path().join("dirty.vmpack");
    common::blk::save(dir.path(), &vm.sock, &pack, "stop");

    // Mapped, lazily filled (each dropped page served from the pack again), and unpacked
    // from a compressed pack eagerly (dirtied chunks read again) and lazily.
    for (p, memory, tag) in [
        (&pack, "eager", "mapped"),
        (&pack, "lazy", "lazy"),
        (&zpack, "eager", "unpacked"),
        (&zpack, "lazy", "zstd-lazy"),
    ] {
        reset_rounds(dir.path(), p, memory, tag);
    }
}

/// Restores `pack` with `--memory MEMORY` and checks that each reset puts the pack's state
/// back exactly.
fn reset_rounds(dir: &Path, pack: &Path, memory: &str, tag: &str) {
    let r = Vm::spawn(
        dir,
        &["restore", pack.to_str().unwrap(), "--memory", memory],
        tag,
    );
    for n in 1..=3 {
        // Each round from the pack's state: T1 0 -> 1, the disk's byte 0 -> 1.
        assert_eq!(r.round(n), "done 11", "{tag}: round {n}");
        assert_eq!(r.dirty(0), ROUND, "{tag}");
        let v = r.call("PUT", "/vm/reset", b"");
        assert_eq!(v["pages"], ROUND.len(), "{tag}: {v}");
        assert_eq!(v["disks"], 1, "{tag}: {v}");
        assert!(v["pause_ms"].as_f64().unwrap() >= 0.0, "{v}");
        assert_eq!(r.dirty(0), Vec::<u64>::new(), "{tag}");
    }
    // Twice in a row: nothing written, nothing to put back.
    let v = r.call("PUT", "/vm/reset", b"");
    assert_eq!(
        (v["pages"].as_u64(), v["disks"].as_u64()),
        (Some(0), Some(0)),
        "{tag}: {v}"
    );
    // A paused VM stays paused through a reset.
    r.call("PUT", "/vm/pause", b"");
    r.call("PUT", "/vm/reset", b"");
    assert_eq!(r.call("GET", "/vm", b"")["state"], "paused");
    r.call("PUT", "/vm/resume", b"");
    assert_eq!(r.round(4), "done 11", "{tag}");
    r.quit();
}
