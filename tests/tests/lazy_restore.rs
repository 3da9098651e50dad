//! Verified lazy restore (`--memory lazy`, and the default for a pack file not yet verified
//! on this host) through the real `vmboot` and `vmpack` binaries: guest memory is served on
//! first touch, each chunk checked against the pack's index before the guest sees it.

mod common;

use common::{bin, vmpack};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Vm {
    child: Child,
    sock: PathBuf,
    serial: PathBuf,
}

impl Vm {
    fn spawn(dir: &Path, tag: &str, args: &[&std::ffi::OsStr]) -> Vm {
        let _ = vmpack();
        let sock = dir.join(format!("{tag}.sock"));
        let serial = dir.join(format!("{tag}.serial"));
        let child = Command::new(bin("vmboot"))
            .args(args)
            .arg("--api-sock")
            .arg(&sock)
            .arg("--serial-out")
            .arg(&serial)
            // Each test has its own verification records and touch orders.
            .env("VMPACK_CACHE_DIR", dir.join("cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning vmboot");
        let vm = Vm {
            child,
            sock,
            serial,
        };
        let t = Instant::now();
        while !vm.sock.exists() {
            assert!(t.elapsed() < Duration::from_secs(20), "no control socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        vm
    }

    fn run(dir: &Path, config: &str) -> Vm {
        let cfg = common::samples_dir().join(config);
        Vm::spawn(dir, "a", &["run".as_ref(), cfg.as_os_str()])
    }

    fn restore(dir: &Path, pack: &Path, tag: &str, memory: &str) -> Vm {
        Vm::spawn(
            dir,
            tag,
            &[
                "restore".as_ref(),
                pack.as_os_str(),
                "--memory".as_ref(),
                memory.as_ref(),
            ],
        )
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn wait_for(&self, needle: &str) {
        let t = Instant::now();
        while !self.output().contains(needle) {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "timed out waiting for {needle:?}; serial:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn save(&self, pack: &Path, then: &str, compress: &str) {
        let o = Command::new(vmpack())
            .args(["save", "--api-sock"])
            .arg(&self.sock)
            .arg("-o")
            .arg(pack)
            .args(["--then", then, "--compress", compress])
            .output()
            .expect("running vmpack save");
        assert!(o.status.success(), "save: {}", common::stderr(&o));
    }

    /// (exit status, stderr, serial output)
    fn finish(mut self) -> (i32, String, String) {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                return (st.code().unwrap_or(-1), err, self.output());
            }
            if t.elapsed() > Duration::from_secs(90) {
                let _ = self.child.kill();
                panic!("VM did not end; serial:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn counter_text(last: u32) -> String {
    (1..=last).map(|i| format!("{i}\n")).collect()
}

fn sha256_file(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

fn counter_continues(compress: &str, memory: &str) {
    if !common::kvm_available("lazy restore tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("c.vmpack");
    let a = Vm::run(dir.path(), "counter64.toml");
    a.wait_for("\n20\n");
    a.save(&pack, "stop", compress);
    let (code, err, before) = a.finish();
    assert_eq!(code, 0, "{err}");
    let digest = sha256_file(&pack);
    let (code, err, after) = Vm::restore(dir.path(), &pack, "b", memory).finish();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("memory: lazy"), "lazy path taken: {err}");
    assert!(
        err.contains("each memory and disk chunk verified on first touch"),
        "{err}"
    );
    assert_eq!(format!("{before}{after}"), counter_text(300));
    assert_eq!(
        sha256_file(&pack),
        digest,
        "restore must not modify the pack"
    );
}

#[test]
fn lazy_restore_continues_exactly_uncompressed() {
    counter_continues("none", "lazy");
}

#[test]
fn lazy_restore_continues_exactly_zstd() {
    counter_continues("zstd", "lazy");
}

/// `--memory auto` (the default): the first restore of a pack file is lazy and, once every
/// chunk was checked, records the pack as verified and keeps the touch order; the next
/// restore of the same uncompressed file maps it.
#[test]
fn first_restore_is_lazy_then_mapped() {
    if !common::kvm_available("lazy restore tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("m.vmpack");
    let a = Vm::run(dir.path(), "memtest.toml");
    a.wait_for("filled\n");
    a.save(&pack, "stop", "none");
    a.finish();
    // inspect says what a restore here would do, from the same records.
    let inspect = || {
        let o = Command::new(vmpack())
            .arg("inspect")
            .arg(&pack)
            .env("VMPACK_CACHE_DIR", dir.path().join("cache"))
            .output()
            .unwrap();
        let text = common::ok(&o);
        let o = Command::new(vmpack())
            .args(["inspect", "--json"])
            .arg(&pack)
            .env("VMPACK_CACHE_DIR", dir.path().join("cache"))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&common::ok(&o)).unwrap();
        (text, v["lazy"].clone())
    };
    let (text, lazy) = inspect();
    assert!(
        text.contains("lazy restore: possible (")
            && text.contains("no touch order recorded on this host yet; --memory auto takes: lazy"),
        "{text}"
    );
    assert_eq!(
        (&lazy["possible"], &lazy["touch_order"], &lazy["auto"]),
        (
            &serde_json::json!(true),
            &serde_json::Value::Null,
            &serde_json::json!("lazy")
        ),
        "{lazy}"
    );
    assert!(lazy["chunks"].as_u64().unwrap() > 0, "{lazy}");
    let (code, err, out) = Vm::restore(dir.path(), &pack, "b", "auto").finish();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("memtest: 7680 pages ok"), "{out}");
    assert!(err.contains("memory: lazy"), "{err}");
    let (text, lazy) = inspect();
    assert!(
        text.contains("touch order recorded on this host (")
            && text.contains("--memory auto takes: mmap"),
        "{text}"
    );
    assert!(lazy["touch_order"].is_u64(), "{lazy}");
    let root = vmpack_formats::pack::PackReader::open(&pack)
        .unwrap()
        .root_digest();
    let cache = dir.path().join("cache");
    assert!(cache.join("verified").join(hex::encode(root)).exists());
    // The order is recorded; it may be empty, since the background prefetch can outrun a
    // guest running in KVM's instruction emulator and leave it nothing to fault on.
    let order = std::fs::read_to_string(cache.join("touch").join(hex::encode(root))).unwrap();
    assert!(
        order.split_whitespace().all(|c| c.parse::<u64>().is_ok()),
        "touch order: {order}"
    );
    let (code, err, out) = Vm::restore(dir.path(), &pack, "c", "auto").finish();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("memtest: 7680 pages ok"), "{out}");
    assert!(err.contains("memory: mmap"), "{err}");
}

/// memtest checks every page about 3 s after the restore: a corrupt chunk near the end of
/// its RAM is touched late. The VM stops with status 76 naming the file, section, chunk and
/// offset, and the guest never reports on that memory (it would print a mismatch had it
/// read any wrong byte).
#[test]
fn a_corrupt_chunk_stops_the_vm_before_the_guest_reads_it() {
    if !common::kvm_available("lazy restore tests") {
        return;
    }
    for compress in ["none", "zstd"] {
        let dir = tempfile::tempdir().unwrap();
        let pack = dir.path().join("m.vmpack");
        let a = Vm::run(dir.path(), "memtest.toml");
        a.wait_for("filled\n");
        a.save(&pack, "stop", compress);
        a.finish();
        let r = vmpack_formats::pack::PackReader::open(&pack).unwrap();
        let chunks = r.chunks(r.section("memory/0").unwrap().id);
        let (seq, e) = chunks
            .iter()
            .enumerate()
            .rev()
            .find(|(_, e)| e.clen > 0)
            .unwrap();
        let e = e.clone();
        drop(r);
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&pack)
                .unwrap();
            let at = e.payload_offset + u64::from(e.clen) / 2;
            let mut b = [0u8];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
        }
        let (code, err, out) = Vm::restore(dir.path(), &pack, "b", "lazy").finish();
        assert_eq!(code, 76, "{compress}: {err}");
        assert!(err.contains(&pack.display().to_string()), "{err}");
        assert!(err.contains("section 'memory/0'"), "{err}");
        assert!(err.contains(&format!("chunk {seq}")), "{err}");
        assert!(err.contains("failed verification"), "{err}");
        assert!(
            !out.contains("memtest:"),
            "{compress}: the guest read it: {out}"
        );
    }
}

/// A save of a lazily restored VM holds all of its memory, pages the guest never touched
/// since the restore included.
#[test]
fn save_after_lazy_restore_has_the_same_memory() {
    if !common::kvm_available("lazy restore tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (dir.path().join("m1.vmpack"), dir.path().join("m2.vmpack"));
    let a = Vm::run(dir.path(), "memtest.toml");
    a.wait_for("filled\n");
    a.save(&p1, "stop", "zstd");
    a.finish();
    // Saved at once: the guest is in its delay loop, touching no RAM above 2 MiB.
    let b = Vm::restore(dir.path(), &p1, "b", "lazy");
    b.save(&p2, "resume", "none");
    let (code, err, out) = b.finish();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("memtest: 7680 pages ok"), "{out}");
    let memory = |p: &Path| {
        let r = vmpack_formats::pack::PackReader::open(p).unwrap();
        let s = r.section("memory/0").unwrap();
        r.read_section(s.id, 1 << 30).unwrap()
    };
    let (m1, m2) = (memory(&p1), memory(&p2));
    assert_eq!(m1.len(), 32 << 20);
    assert!(m1[2 << 20..] == m2[2 << 20..], "RAM above 2 MiB differs");
}

/// A pack read from a pipe is read whole before the guest runs, whatever `--memory` says.
#[test]
fn a_pipe_restore_stays_eager() {
    if !common::kvm_available("lazy restore tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("c.vmpack");
    let a = Vm::run(dir.path(), "counter64.toml");
    a.wait_for("\n20\n");
    a.save(&pack, "stop", "zstd");
    let (_, _, before) = a.finish();
    let o = Command::new(bin("vmboot"))
        .args(["restore", "-", "--memory", "lazy"])
        .env("VMPACK_CACHE_DIR", dir.path().join("cache"))
        .stdin(std::fs::File::open(&pack).unwrap())
        .output()
        .unwrap();
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("memory: stream"), "{err}");
    assert_eq!(format!("{before}{}", common::stdout(&o)), counter_text(300));
}
