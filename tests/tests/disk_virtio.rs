//! virtio-blk end to end: the `blk` sample guest (samples/guests/blk.S) drives a real
//! virtio-mmio disk in vmboot, uninterrupted and across save (in one process) / restore (in
//! another), on raw and qcow2 images; the result is checked byte for byte.

mod common;
use common::*;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DISK_SIZE: u64 = 1 << 20;
const SECTORS: u64 = 64;
const PASSES: u64 = 3;

fn vmboot() -> PathBuf {
    bin("vmboot")
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The guest image (assembled by vmboot's build script, which `bin("vmboot")` runs).
fn guest_image() -> PathBuf {
    let _ = vmboot();
    let p = workspace().join("samples/guests/bin/blk.bin");
    assert!(p.exists(), "{} missing after building vmboot", p.display());
    p
}

/// What the disk starts with: noise everywhere, so reads of unwritten data are checked too.
fn initial_content() -> Vec<u8> {
    noise(DISK_SIZE as usize, 77)
}

/// The guest's pattern for one sector (see blk.S `fill`).
fn pattern(sector: u64, pass: u64) -> Vec<u8> {
    let base = ((sector << 16) | pass).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..64u64)
        .flat_map(|i| base.wrapping_add(i).to_le_bytes())
        .collect()
}

/// The guest's checksum of sectors 0..63 (see blk.S `read_check`).
fn checksum(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for q in data[..(SECTORS * 512) as usize].chunks(8) {
        h = (h ^ u64::from_le_bytes(q.try_into().unwrap())).wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

fn final_content() -> Vec<u8> {
    let mut d = initial_content();
    for s in 0..SECTORS {
        let o = (s * 512) as usize;
        d[o..o + 512].copy_from_slice(&pattern(s, PASSES));
    }
    d
}

/// The serial output of a complete run over `initial_content()`.
fn expected_output() -> String {
    let mut out = format!(
        "capacity {}\npass 0 sum={}\n",
        DISK_SIZE / 512,
        checksum(&initial_content())
    );
    for p in 1..=PASSES {
        let data: Vec<u8> = (0..SECTORS).flat_map(|s| pattern(s, p)).collect();
        out += &format!("pass {p} written\npass {p} sum={} bad=0\n", checksum(&data));
    }
    out + "flush status=0\nid vmboot-disk0\n"
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Fmt {
    Raw,
    Qcow2,
}

/// A folder with the disk (raw, or qcow2 made by qemu-img) and `blk.toml`. None when the
/// qcow2 variant cannot be made here (qemu-img missing: skipped loudly).
fn setup(dir: &Path, fmt: Fmt, read_only: bool) -> Option<(PathBuf, PathBuf)> {
    let raw = dir.join("initial.raw");
    std::fs::write(&raw, initial_content()).unwrap();
    let disk = match fmt {
        Fmt::Raw => {
            let d = dir.join("disk.img");
            std::fs::copy(&raw, &d).unwrap();
            d
        }
        Fmt::Qcow2 => {
            if !have_qemu_img() {
                return None;
            }
            let d = dir.join("disk.qcow2");
            qemu_img(&["create", "-f", "qcow2", d.to_str().unwrap(), "1M"]);
            // Fill it through qemu-img so allocated clusters come from QEMU's writer.
            qemu_img(&[
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "qcow2",
                raw.to_str().unwrap(),
                d.to_str().unwrap(),
            ]);
            d
        }
    };
    let cfg = dir.join("blk.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"blk\"\nmemory_mib = 16\n\n[flat]\nimage = \"{}\"\nload_address = 0x100000\n\
             entry = 0x100000\nmode = \"long\"\n\n[[disk]]\npath = \"{}\"\nformat = \"{}\"\n\
             read_only = {read_only}\n",
            guest_image().display(),
            disk.display(),
            if fmt == Fmt::Raw { "raw" } else { "qcow2" },
        ),
    )
    .unwrap();
    Some((cfg, disk))
}

/// Disk bytes as the guest sees them (qcow2 converted to raw by qemu-img).
fn disk_bytes(dir: &Path, disk: &Path, fmt: Fmt) -> Vec<u8> {
    match fmt {
        Fmt::Raw => std::fs::read(disk).unwrap(),
        Fmt::Qcow2 => {
            let out = dir.join("as-raw.img");
            let _ = std::fs::remove_file(&out);
            qemu_img(&[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                disk.to_str().unwrap(),
                out.to_str().unwrap(),
            ]);
            std::fs::read(out).unwrap()
        }
    }
}

fn sha256(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

/// A vmboot process whose stdout is collected in the background.
struct Running {
    child: Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

fn spawn(args: &[&str], cwd: &Path) -> Running {
    let mut child = Command::new(vmboot())
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning vmboot");
    let collect = |mut r: Box<dyn Read + Send>| {
        let buf = Arc::new(Mutex::new(String::new()));
        let b = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = r.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        buf
    };
    let out = collect(Box::new(child.stdout.take().unwrap()));
    let err = collect(Box::new(child.stderr.take().unwrap()));
    Running { child, out, err }
}

impl Running {
    fn wait_for(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.out.lock().unwrap().contains(text) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {text:?}; stdout:\n{}\nstderr:\n{}",
                self.out.lock().unwrap(),
                self.err.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit; returns (status, stdout, stderr).
    fn finish(mut self, timeout: Duration) -> (i32, String, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "vmboot did not finish; stdout:\n{}\nstderr:\n{}",
                    self.out.lock().unwrap(),
                    self.err.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the readers drain the pipes.
        std::thread::sleep(Duration::from_millis(100));
        let out = self.out.lock().unwrap().clone();
        let err = self.err.lock().unwrap().clone();
        (status.code().unwrap_or(-1), out, err)
    }
}

fn save(dir: &Path, sock: &Path, out: &Path, then: &str) {
    let o = run(
        dir,
        &[
            "save",
            "--api-sock",
            sock.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--then",
            then,
            "--quiet",
        ],
    );
    ok(&o);
}

fn export_disk(dir: &Path, pack: &Path, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    ok(&run(
        dir,
        &[
            "export",
            "--format",
            "raw",
            "-o",
            out.to_str().unwrap(),
            "--quiet",
            pack.to_str().unwrap(),
        ],
    ));
    let mut disks: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            // The export keeps the config's disk file name (disk.img / disk.qcow2, now raw).
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with("disk") && p.is_file()
        })
        .collect();
    disks.sort();
    assert_eq!(disks.len(), 1, "exported files: {disks:?}");
    std::fs::read(&disks[0]).unwrap()
}

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn uninterrupted(fmt: Fmt) {
    if !common::kvm_available("virtio-blk tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some((cfg, disk)) = setup(dir.path(), fmt, false) else {
        return;
    };
    let r = spawn(&["run", cfg.to_str().unwrap()], dir.path());
    let (code, out, err) = r.finish(RUN_TIMEOUT);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(out, expected_output(), "stderr:\n{err}");
    assert!(
        disk_bytes(dir.path(), &disk, fmt) == final_content(),
        "disk content after the run is not what the guest wrote"
    );
}

#[test]
fn raw_disk_uninterrupted() {
    uninterrupted(Fmt::Raw);
}

#[test]
fn qcow2_disk_uninterrupted() {
    uninterrupted(Fmt::Qcow2);
}

/// Save between pass 1's writes and its read-back, stop; restore in a new process; save
/// again (resuming) after the last writes; the guest's output is exactly the uninterrupted
/// one, the final pack's disk is exactly what an uninterrupted run leaves, and neither the
/// source image nor the first pack changed.
fn save_restore(fmt: Fmt) {
    if !common::kvm_available("virtio-blk tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some((cfg, disk)) = setup(d, fmt, false) else {
        return;
    };
    // Built now, not on first use: a build at save time would let the guest run past the
    // point the test saves at.
    let _ = vmpack();
    let sock1 = d.join("api1.sock");
    let r = spawn(
        &[
            "run",
            "--api-sock",
            sock1.to_str().unwrap(),
            cfg.to_str().unwrap(),
        ],
        d,
    );
    r.wait_for("pass 1 written\n", RUN_TIMEOUT);
    let mid = d.join("mid.vmpack");
    save(d, &sock1, &mid, "stop");
    let (code, out1, err1) = r.finish(RUN_TIMEOUT);
    assert_eq!(code, 0, "stderr:\n{err1}");
    assert!(out1.contains("pass 1 written\n"), "first half:\n{out1}");

    let source_sum = sha256(&disk);
    let pack_sum = sha256(&mid);
    // Between "pass N written" and the read-back nothing is written, so a save there holds
    // exactly pass N's sectors over the initial noise. (On a loaded machine the save may
    // land later; the output and final-disk checks below still hold.)
    let last = out1.lines().last().unwrap_or("");
    if let Some(n) = last
        .strip_prefix("pass ")
        .and_then(|r| r.strip_suffix(" written"))
    {
        let n: u64 = n.parse().unwrap();
        let mut at_pause = initial_content();
        for s in 0..SECTORS {
            let o = (s * 512) as usize;
            at_pause[o..o + 512].copy_from_slice(&pattern(s, n));
        }
        assert!(
            export_disk(d, &mid, "mid-export") == at_pause,
            "the mid-run pack's disk is not the disk at the pause"
        );
    } else {
        eprintln!("note: the save landed after {last:?}; mid-pack disk check skipped");
    }

    let sock2 = d.join("api2.sock");
    let r = spawn(
        &[
            "restore",
            "--quiet",
            "--api-sock",
            sock2.to_str().unwrap(),
            mid.to_str().unwrap(),
        ],
        d,
    );
    r.wait_for("pass 3 written\n", RUN_TIMEOUT);
    let end = d.join("end.vmpack");
    save(d, &sock2, &end, "resume");
    let (code, out2, err2) = r.finish(RUN_TIMEOUT);
    assert_eq!(code, 0, "stdout:\n{out2}\nstderr:\n{err2}");
    assert_eq!(
        format!("{out1}{out2}"),
        expected_output(),
        "stderr:\n{err2}"
    );

    assert_eq!(
        sha256(&disk),
        source_sum,
        "restore wrote to the source image"
    );
    assert_eq!(sha256(&mid), pack_sum, "restore wrote to the pack");
    assert!(
        export_disk(d, &end, "end-export") == final_content(),
        "the end pack's disk differs from an uninterrupted run's result"
    );
}

#[test]
fn raw_disk_save_restore() {
    save_restore(Fmt::Raw);
}

#[test]
fn qcow2_disk_save_restore() {
    save_restore(Fmt::Qcow2);
}

#[test]
fn read_only_disk_rejects_writes() {
    if !common::kvm_available("virtio-blk tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cfg, disk) = setup(dir.path(), Fmt::Raw, true).unwrap();
    let before = sha256(&disk);
    let r = spawn(&["run", cfg.to_str().unwrap()], dir.path());
    let (code, out, err) = r.finish(RUN_TIMEOUT);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(
        out,
        format!(
            "capacity {}\nread-only disk\nwrite status=1\npass 0 sum={}\n",
            DISK_SIZE / 512,
            checksum(&initial_content())
        )
    );
    assert_eq!(sha256(&disk), before);
}

/// The `blkbad` guest sends malformed requests: each completes with an error status (or,
/// without a usable status descriptor, with nothing written), vmboot warns and keeps
/// running, and a good request afterwards works.
#[test]
fn malformed_requests_get_error_statuses() {
    if !common::kvm_available("virtio-blk tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cfg, disk) = setup(dir.path(), Fmt::Raw, false).unwrap();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("blk.bin", "blkbad.bin");
    std::fs::write(&cfg, text).unwrap();
    let r = spawn(&["run", cfg.to_str().unwrap()], dir.path());
    let (code, out, err) = r.finish(RUN_TIMEOUT);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(
        out,
        "case 1 status=1 len=1\n\
         case 2 status=1 len=1\n\
         case 3 status=2 len=1\n\
         case 4 status=255 len=0\n\
         case 5 status=255 len=0\n\
         case 6 status=255 len=512\n\
         case 7 status=1 len=1\n\
         case 8 status=1 len=1\n\
         case 9 status=1 len=1\n\
         case 10 status=1 len=1\n\
         case 11 status=1 len=1\n\
         case 12 status=1 len=1\n\
         recovered write=0 read=0 match=1\n",
        "stderr:\n{err}"
    );
    assert!(err.contains("outside guest RAM"), "stderr:\n{err}");
    assert!(err.contains("past the end of the disk"), "stderr:\n{err}");
    assert!(!err.contains("panicked"), "stderr:\n{err}");
    // Only sector 5 changed.
    let mut expect = initial_content();
    expect[5 * 512..6 * 512].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes().repeat(64));
    assert!(std::fs::read(&disk).unwrap() == expect);
}

/// A pack saved by vmboot 0.1.0 (main before the device model, issue 11) while the `blk`
/// guest was between its first writes and their read-back (tests/fixtures/README.md):
/// its virtio-blk device is live (driver OK, queue ready, used ring advanced), and a
/// restore by this vmboot carries on exactly where that one would, without touching the
/// pack.
#[test]
fn pack_saved_by_v0_1_main_with_a_live_disk_restores() {
    if !common::kvm_available("virtio-blk tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pack = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/blk-v0.1-main.vmpack");
    let before = sha256(&pack);
    let r = spawn(&["restore", "--quiet", pack.to_str().unwrap()], dir.path());
    let (code, out, err) = r.finish(RUN_TIMEOUT);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(
        out,
        "pass 1 sum=8c38d0dba9636325 bad=0\npass 2 written\npass 2 sum=5fd561ed60cd8325 bad=0\n\
         pass 3 written\npass 3 sum=b758e28f3e824325 bad=0\nflush status=0\nid vmboot-disk0\n",
        "stderr:\n{err}"
    );
    assert_eq!(sha256(&pack), before, "restore wrote to the pack");
}
