//! Shared by the virtio-blk tests of the assembly guest (disk_virtio.rs) and the Rust guest
//! (rs_guest.rs): both guests follow the same protocol (sectors, passes, pattern, checksum),
//! so the host side checking them is one piece of code.

use super::{bin, ok, qemu_img, run};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const DISK_SIZE: u64 = 1 << 20;
pub const SECTORS: u64 = 64;
pub const PASSES: u64 = 3;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The guests' pattern for one sector (blk.S and rsblk.rs `fill`).
pub fn pattern(sector: u64, pass: u64) -> Vec<u8> {
    let base = ((sector << 16) | pass).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..64u64)
        .flat_map(|i| base.wrapping_add(i).to_le_bytes())
        .collect()
}

/// The guests' checksum of sectors 0..63 (blk.S `read_check`, and rsblk.rs).
pub fn checksum(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for q in data[..(SECTORS * 512) as usize].chunks(8) {
        h = (h ^ u64::from_le_bytes(q.try_into().unwrap())).wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Fmt {
    Raw,
    Qcow2,
}

/// Disk bytes as the guest sees them (qcow2 read back through qemu-img, the oracle).
pub fn disk_bytes(dir: &Path, disk: &Path, fmt: Fmt) -> Vec<u8> {
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

/// A vmboot process whose stdout and stderr are collected in the background, so a test can
/// act (save, wait) on what the guest has printed so far.
pub struct Running {
    pub child: Child,
    pub out: Arc<Mutex<String>>,
    pub err: Arc<Mutex<String>>,
}

pub fn spawn(args: &[&str], cwd: &Path) -> Running {
    let child = Command::new(bin("vmboot"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning vmboot");
    Running::from_child(child)
}

impl Running {
    /// Collects the output of a child spawned with piped stdout and stderr.
    pub fn from_child(mut child: Child) -> Running {
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

    pub fn wait_for(&self, text: &str, timeout: Duration) {
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
    pub fn finish(mut self, timeout: Duration) -> (i32, String, String) {
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

/// `vmpack save` through the API socket of a running vmboot.
pub fn save(dir: &Path, sock: &Path, out: &Path, then: &str) {
    ok(&run(
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
    ));
}

/// The pack's disk as raw bytes, exported by `vmpack export --format raw`.
pub fn export_disk(dir: &Path, pack: &Path, name: &str) -> Vec<u8> {
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
