//! A VM that keeps writing its disk is saved while it runs: the guest goes on writing while
//! the pack is written, and the pack holds the disk exactly as it was at the pause (through
//! the real `vmboot` and `vmpack` binaries and the `diskloop` sample guest).

mod common;

use common::{bin, vmpack};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DISK: u64 = 64 << 20;
/// The guest's slots: 64, one per 64 KiB from the start of the disk.
const SLOTS: u64 = 64;
const STRIDE: u64 = 64 << 10;

struct Vmboot {
    child: Child,
    serial: PathBuf,
}

impl Vmboot {
    fn spawn(args: &[&std::ffi::OsStr], serial: PathBuf) -> Vmboot {
        let child = Command::new(bin("vmboot"))
            .args(args)
            .arg("--serial-out")
            .arg(&serial)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning vmboot");
        Vmboot { child, serial }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn wait_for(&self, needle: &str) {
        let t = Instant::now();
        while !self.output().contains(needle) {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "timed out waiting for {needle:?}; serial so far:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the guest to end; returns (exit status, serial output, stderr).
    fn finish(mut self) -> (i32, String, String) {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                return (st.code().unwrap_or(-1), self.output(), err);
            }
            if t.elapsed() > Duration::from_secs(180) {
                let _ = self.child.kill();
                panic!("the VM did not end; serial:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn wait_socket(sock: &Path) {
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first qword of each slot of the raw disk image at `path`.
fn slots(path: &Path) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    (0..SLOTS)
        .map(|s| {
            let mut sector = [0u8; 512];
            f.read_exact_at(&mut sector, s * STRIDE).unwrap();
            let first = u64::from_le_bytes(sector[..8].try_into().unwrap());
            assert!(
                sector
                    .chunks(8)
                    .all(|q| u64::from_le_bytes(q.try_into().unwrap()) == first),
                "slot {s} holds a torn sector"
            );
            first
        })
        .collect()
}

/// What the slots hold once rounds 1..=w have written them.
fn slots_after(w: u64) -> Vec<u64> {
    (0..SLOTS)
        .map(|s| (1..=w).rev().find(|r| r % SLOTS == s).unwrap_or(0))
        .collect()
}

/// The last round the output reports as done.
fn last_ok(out: &str) -> u64 {
    out.lines()
        .filter_map(|l| l.strip_suffix(" ok"))
        .filter_map(|n| n.parse().ok())
        .next_back()
        .unwrap_or(0)
}

#[test]
fn a_disk_written_during_the_save_is_packed_as_of_the_pause() {
    if !common::kvm_available("disk-during-save test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The guest's slots (first 4 MiB) start zeroed; the rest holds data, so the pack has
    // a disk worth reading while the guest runs.
    let disk = d.join("disk.img");
    common::sparse_raw(
        &disk,
        DISK,
        &[(4 << 20, common::noise((DISK - (4 << 20)) as usize, 5))],
    );
    let image = common::samples_dir().join("guests/bin/diskloop.bin");
    let config = d.join("vm.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"diskloop\"\nmemory_mib = 16\n\n[flat]\nimage = \"{}\"\n\
             load_address = 0x100000\nentry = 0x100000\nmode = \"long\"\n\n\
             [[disk]]\npath = \"disk.img\"\nformat = \"raw\"\n",
            image.display()
        ),
    )
    .unwrap();
    let _ = vmpack();
    let sock = d.join("a.sock");
    let a = Vmboot::spawn(
        &[
            "run".as_ref(),
            config.as_os_str(),
            "--api-sock".as_ref(),
            sock.as_os_str(),
        ],
        d.join("a.serial"),
    );
    wait_socket(&sock);
    a.wait_for("\n100 ok\n");
    let pack = d.join("p.vmpack");
    let o = Command::new(vmpack())
        .args(["save", "--api-sock"])
        .arg(&sock)
        .arg("-o")
        .arg(&pack)
        .args(["--then", "resume", "--compress", "zstd"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "save: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (status, body) = common::http(&sock, "GET", "/vm", b"");
    assert_eq!(status, 200, "{body}");
    let vm: serde_json::Value = serde_json::from_str(&body).unwrap();
    let kept = vm["last_save"]["disk_kept_bytes"].as_u64().unwrap();
    assert!(
        kept > 0,
        "the guest wrote its disk while the pack was written (old content kept): {body}"
    );
    let (code, full, err) = a.finish();
    assert_eq!(code, 0, "the original guest: {err}\n{full}");
    assert!(!full.contains(" bad "), "{full}");
    assert_eq!(last_ok(&full), 3000);

    // The live disk went on; the pack's disk is the one of the paused instant.
    let unpacked = d.join("unpacked");
    common::ok(&common::run(
        d,
        &[
            "unpack",
            pack.to_str().unwrap(),
            "-o",
            unpacked.to_str().unwrap(),
        ],
    ));
    let packed = std::fs::read_dir(&unpacked)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "img"))
        .expect("the unpacked disk");
    assert_eq!(
        slots(&disk),
        slots_after(3000),
        "the live disk after the run"
    );
    let at_pause = slots(&packed);
    assert_ne!(
        at_pause,
        slots(&disk),
        "the guest wrote the disk after the save"
    );

    // The restored guest continues exactly: its output is the rest of the original's.
    let b = Vmboot::spawn(&["restore".as_ref(), pack.as_os_str()], d.join("b.serial"));
    let (code, after, err) = b.finish();
    assert_eq!(code, 0, "the restored guest: {err}\n{after}");
    assert!(
        !after.is_empty() && full.ends_with(&after),
        "restored output:\n{after}"
    );
    let before = &full[..full.len() - after.len()];
    // The pause fell after round N's "ok" or between round N+1's write and its "ok".
    let n = last_ok(before);
    assert!(
        at_pause == slots_after(n) || at_pause == slots_after(n + 1),
        "the packed disk is the disk after round {n} or {}: {at_pause:?}",
        n + 1
    );
    // The remaining non-zero noise of the disk is packed unchanged.
    let mut tail = vec![0u8; 1 << 20];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&packed)
        .unwrap()
        .read_exact_at(&mut tail, DISK - (1 << 20))
        .unwrap();
    assert!(tail == common::noise((DISK - (4 << 20)) as usize, 5)[(DISK - (5 << 20)) as usize..]);
}
