//! Live save (`vmpack save --live`) through the real binaries, with a guest that keeps
//! rewriting its memory during the save (samples/guests/livemem.S): every round it checks
//! the previous round's values in every page, so a page the save missed or tore makes the
//! restored guest print a mismatch and fail.
//!
//! The original VM resumes after a live save and runs to its end, so the restored run's
//! output must be exactly the rest of the one deterministic output, cut inside the save's
//! window: output before the save + output of the restore = an uninterrupted run.

mod common;

use common::{bin, vmpack};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const CONFIG: &str = "livemem.toml";

/// What one uninterrupted run of the livemem guest prints.
fn full_output() -> String {
    let mut s: String = (1..=60).map(|r| format!("round {r} ok\n")).collect();
    s.push_str("livemem: done\n");
    s
}

struct Running {
    child: Child,
    sock: PathBuf,
    serial: PathBuf,
}

impl Running {
    fn start(dir: &Path) -> Running {
        Running::start_config(dir, &common::samples_dir().join(CONFIG))
    }

    fn start_config(dir: &Path, config: &Path) -> Running {
        let _ = vmpack();
        let sock = dir.join("a.sock");
        let serial = dir.join("a.serial");
        let child = Command::new(bin("vmboot"))
            .arg("run")
            .arg(config)
            .arg("--api-sock")
            .arg(&sock)
            .arg("--serial-out")
            .arg(&serial)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning vmboot");
        let t = Instant::now();
        while !sock.exists() {
            assert!(t.elapsed() < Duration::from_secs(20), "no control socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Running {
            child,
            sock,
            serial,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn wait_for(&self, needle: &str) {
        let t = Instant::now();
        while !self.output().contains(needle) {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "timed out waiting for {needle:?}; serial so far:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the guest to end; its status and the whole serial output.
    fn finish(mut self) -> (i32, String) {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st.code().unwrap_or(-1), self.output());
            }
            if t.elapsed() > Duration::from_secs(120) {
                let _ = self.child.kill();
                panic!("the original VM did not end; serial:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn save_args(sock: &Path, out: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(vmpack());
    c.args(["save", "--live", "-o", out])
        .args(extra)
        .arg("--api-sock")
        .arg(sock);
    c
}

/// The original ran to its end unharmed, and `after` (the restored run's output) is the
/// rest of the same run from a point inside the save's window `[from, to]` (bytes of
/// output the original had printed before the save started and after it returned).
fn check_continuation(orig_code: i32, orig: &str, after: &str, from: usize, to: usize) {
    let full = full_output();
    assert_eq!(orig_code, 0, "the original VM after a live save: {orig}");
    assert_eq!(orig, full, "the original kept running to its end");
    assert!(
        after.ends_with("livemem: done\n") && full.ends_with(after),
        "the restored guest must continue exactly (a missed page prints a mismatch): {after:?}"
    );
    let cut = full.len() - after.len();
    assert!(
        (from..=to).contains(&cut),
        "the restored run starts where the original was during the save: at byte {cut}, the save ran while it printed bytes {from}..{to}"
    );
    assert_eq!(
        format!("{}{after}", &full[..cut]),
        full,
        "before the save + after the restore = one uninterrupted run"
    );
}

fn restore_file(pack: &Path, serial: &Path) -> Output {
    Command::new(vmpack())
        .arg("restore")
        .arg(pack)
        .arg("--serial-out")
        .arg(serial)
        .arg("--quiet")
        .output()
        .expect("running vmpack restore")
}

#[test]
fn live_save_of_a_guest_writing_memory_restores_exactly() {
    if !common::kvm_available("live save tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("live.vmpack");
    let a = Running::start(dir.path());
    a.wait_for("round 5 ok\n");
    let from = a.output().len();
    let o = save_args(&a.sock, pack.to_str().unwrap(), &["--json"])
        .output()
        .unwrap();
    let to = a.output().len();
    let out = common::ok(&o);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("save --json");
    assert_eq!(v["vm"], "resumed");
    // Written (page cache), then synced and renamed: the second includes the first.
    let (written, total) = (v["written_ms"].as_f64(), v["milliseconds"].as_f64());
    assert!(
        matches!((written, total), (Some(w), Some(t)) if w > 0.0 && w <= t),
        "written_ms within milliseconds: {v}"
    );
    let live = &v["live"];
    let rounds = live["rounds"].as_array().expect("live.rounds");
    assert!(!rounds.is_empty(), "at least the first full copy: {v}");
    assert!(
        rounds[0]["bytes"].as_u64().unwrap() >= 10 << 20,
        "the first round copies the guest's resident memory (its ~14 MiB of pages): {v}"
    );
    assert_eq!(live["max_pause_ms"], 20.0, "the default target: {v}");
    assert!(live["final_bytes"].is_u64() && live["max_pause_met"].is_boolean());
    assert_eq!(
        live["max_pause_met"].as_bool(),
        Some(v["pause_ms"].as_f64().unwrap() <= 20.0),
        "max_pause_met says whether pause_ms met the target: {v}"
    );
    let (code, orig) = a.finish();

    // A live-saved pack is an ordinary pack: it verifies and restores by any path.
    common::ok(&common::run(
        dir.path(),
        &["verify", pack.to_str().unwrap(), "--quiet"],
    ));
    let serial = dir.path().join("b.serial");
    let r = restore_file(&pack, &serial);
    assert_eq!(r.status.code(), Some(0), "{}", common::stderr(&r));
    let after = std::fs::read_to_string(&serial).unwrap();
    check_continuation(code, &orig, &after, from, to);

    // And eagerly, mapped from the file (the first restore verified it).
    let serial = dir.path().join("c.serial");
    let r = Command::new(vmpack())
        .arg("restore")
        .arg(&pack)
        .args(["--memory", "eager", "--quiet", "--serial-out"])
        .arg(&serial)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(0), "{}", common::stderr(&r));
    assert_eq!(std::fs::read_to_string(&serial).unwrap(), after);
}

#[test]
fn live_save_streams_into_restore_from_a_pipe() {
    if !common::kvm_available("live save tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = Running::start(dir.path());
    a.wait_for("round 5 ok\n");
    let from = a.output().len();
    let mut save = save_args(&a.sock, "-", &["--quiet"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let serial = dir.path().join("b.serial");
    let restore = Command::new(vmpack())
        .args(["restore", "-", "--quiet", "--serial-out"])
        .arg(&serial)
        .stdin(save.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(save.wait().unwrap().success());
    let to = a.output().len();
    assert_eq!(
        restore.status.code(),
        Some(0),
        "{}",
        common::stderr(&restore)
    );
    let (code, orig) = a.finish();
    let after = std::fs::read_to_string(&serial).unwrap();
    // The restore ran to the guest's end after the save returned: the window is the save's.
    check_continuation(code, &orig, &after, from, to.max(from));
}

#[test]
fn a_pause_target_that_cannot_be_met_takes_the_fallback_and_still_restores() {
    if !common::kvm_available("live save tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("fast.vmpack");
    let a = Running::start(dir.path());
    // The API refuses what does not fit together before it touches the VM.
    let d = "ab".repeat(32);
    for (body, status) in [
        (r#"{"max_pause_ms":5}"#.to_string(), 400),
        (r#"{"live":true,"max_pause_ms":60001}"#.to_string(), 400),
        // A live diff save is refused like any diff save whose parent the VM does not know.
        (
            format!(r#"{{"live":true,"diff_from":{{"root_digest":"{d}","file":"p.vmpack"}}}}"#),
            409,
        ),
    ] {
        let (code, text) = common::http(&a.sock, "POST", "/vm/save", body.as_bytes());
        assert_eq!(code, status, "{body}: {text}");
    }
    a.wait_for("round 5 ok\n");
    let from = a.output().len();
    // No pause takes 0 ms: the guest is paused anyway, the save says so and succeeds.
    let o = save_args(&a.sock, pack.to_str().unwrap(), &["--max-pause", "0"])
        .output()
        .unwrap();
    let to = a.output().len();
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    let err = common::stderr(&o);
    assert!(
        err.contains("pause target 0 ms missed") && err.contains("vmpack: warning: live save: "),
        "the missed target is reported with a warning: {err}"
    );
    let (code, orig) = a.finish();
    let serial = dir.path().join("b.serial");
    let r = restore_file(&pack, &serial);
    assert_eq!(r.status.code(), Some(0), "{}", common::stderr(&r));
    let after = std::fs::read_to_string(&serial).unwrap();
    check_continuation(code, &orig, &after, from, to);
}

#[test]
fn live_save_of_a_guest_writing_its_disk_restores_exactly() {
    if !common::kvm_available("live save tests") {
        return;
    }
    // The blk guest writes, reads back and checksums its disk in three passes: a disk in the
    // pack that does not match the pause instant shows in the restored run's sums.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let cfg = d.join("blk.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"blk\"\nmemory_mib = 16\n\n[flat]\nimage = \"{}\"\nload_address = 0x100000\n\
             entry = 0x100000\nmode = \"long\"\n\n[[disk]]\npath = \"{}\"\nformat = \"raw\"\n",
            common::samples_dir().join("guests/bin/blk.bin").display(),
            disk.display()
        ),
    )
    .unwrap();
    let a = Running::start_config(d, &cfg);
    a.wait_for("pass 1 written\n");
    let pack = d.join("blk.vmpack");
    let o = save_args(&a.sock, pack.to_str().unwrap(), &["--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(common::ok(&o).trim()).unwrap();
    assert!(
        !v["live"]["rounds"].as_array().unwrap().is_empty(),
        "a writable disk does not stop the pre-copy: {v}"
    );
    let (code, orig) = a.finish();
    assert_eq!(code, 0, "{orig}");
    assert!(
        orig.contains("pass 3 sum=") && !orig.contains("bad=1"),
        "{orig}"
    );
    let serial = d.join("b.serial");
    let r = restore_file(&pack, &serial);
    assert_eq!(r.status.code(), Some(0), "{}", common::stderr(&r));
    let after = std::fs::read_to_string(&serial).unwrap();
    assert!(
        !after.is_empty() && orig.ends_with(&after),
        "the restored guest continues the same run, disk included:\n{after}\nof:\n{orig}"
    );
}

#[test]
fn live_flags_are_checked_before_the_vm_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let s = sock.to_str().unwrap();
    let o = common::run(
        dir.path(),
        &[
            "save",
            "--api-sock",
            s,
            "-o",
            "x.vmpack",
            "--max-pause",
            "5",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "--max-pause needs --live");
    let o = common::run(
        dir.path(),
        &[
            "save",
            "--api-sock",
            s,
            "-o",
            "x.vmpack",
            "--live",
            "--max-pause",
            "60001",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "--max-pause over a minute");
    assert!(!dir.path().join("x.vmpack").exists());
}

/// `save --live --diff-from`: a live save of the running guest, then a live diff save of it
/// against that pack; the diff names its parent, holds only memory chunks (whole ones), and
/// restored over the parent it continues exactly.
#[test]
fn live_diff_save_restores_exactly_over_its_parent() {
    if !common::kvm_available("live save tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vmpack");
    let child = dir.path().join("child.vmpack");
    let a = Running::start(dir.path());
    a.wait_for("round 3 ok\n");
    let o = save_args(&a.sock, base.to_str().unwrap(), &["--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(common::ok(&o).trim()).unwrap();
    let base_root = v["root_digest"].as_str().unwrap().to_string();
    a.wait_for("round 8 ok\n");
    let from = a.output().len();
    let o = save_args(
        &a.sock,
        child.to_str().unwrap(),
        &["--json", "--diff-from", base.to_str().unwrap()],
    )
    .output()
    .unwrap();
    let to = a.output().len();
    let v: serde_json::Value = serde_json::from_str(common::ok(&o).trim()).unwrap();
    assert_eq!(
        v["parent"],
        base_root.as_str(),
        "the child names its parent: {v}"
    );
    assert!(
        v["live"]["rounds"]
            .as_array()
            .is_some_and(|r| !r.is_empty()),
        "{v}"
    );
    let (code, orig) = a.finish();

    common::ok(&common::run(
        dir.path(),
        &["verify", child.to_str().unwrap(), "--quiet"],
    ));
    let serial = dir.path().join("b.serial");
    let r = restore_file(&child, &serial);
    assert_eq!(r.status.code(), Some(0), "{}", common::stderr(&r));
    let after = std::fs::read_to_string(&serial).unwrap();
    check_continuation(code, &orig, &after, from, to);
}

/// Rewrites `src` into `dst` with its sections sorted by `rank` of their kind (then as they
/// were), leaving out those ranked `None`.
fn reorder(src: &Path, dst: &Path, rank: impl Fn(u16) -> Option<u8>) -> Vec<u16> {
    use vmpack_formats::pack::{Compression, PackReader, PackWriter, SectionRange};
    let r = PackReader::open(src).unwrap();
    let mut order: Vec<_> = r
        .sections()
        .iter()
        .filter_map(|s| Some((rank(s.kind)?, s.clone())))
        .collect();
    order.sort_by_key(|(k, s)| (*k, s.id));
    let opts = vmpack_formats::pack::WriteOptions {
        compression: Compression::None,
        aligned: r.aligned(),
        ..Default::default()
    };
    let mut w = PackWriter::new(std::fs::File::create(dst).unwrap(), opts).unwrap();
    for (_, s) in &order {
        let data = SectionRange::whole(&r, s.id);
        w.add_section_with(
            s.kind,
            &s.name,
            s.meta.clone(),
            &data,
            s.chunk_size,
            Compression::None,
            &(),
        )
        .unwrap();
    }
    w.finish().unwrap();
    order.iter().map(|(_, s)| s.kind).collect()
}

/// The manifest and boot files, then memory, then the disks, the vmstate last; without
/// memory if `!with_memory`.
fn memory_first(src: &Path, dst: &Path, with_memory: bool) {
    use vmpack_formats::pack::kind;
    let kinds = reorder(src, dst, |k| match k {
        kind::MANIFEST => Some(0),
        kind::FILE => Some(1),
        kind::MEMORY if with_memory => Some(2),
        kind::MEMORY => None,
        kind::DISK => Some(3),
        _ => Some(4),
    });
    assert_eq!(kinds.last(), Some(&kind::VMSTATE), "{kinds:?}");
    assert!(
        !with_memory
            || kinds.iter().position(|&k| k == kind::MEMORY)
                < kinds.iter().position(|&k| k == kind::VMSTATE)
    );
}

#[test]
fn a_pack_with_memory_before_its_vmstate_restores_from_a_pipe_and_a_file() {
    if !common::kvm_available("live save tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("saved.vmpack");
    let pack = dir.path().join("memfirst.vmpack");
    let a = Running::start(dir.path());
    a.wait_for("round 5 ok\n");
    let from = a.output().len();
    let o = save_args(&a.sock, saved.to_str().unwrap(), &["--quiet"])
        .output()
        .unwrap();
    let to = a.output().len();
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    let (code, orig) = a.finish();
    memory_first(&saved, &pack, true);
    // Every reader takes the sections in any order after the manifest (FORMAT.md §12).
    common::ok(&common::run(
        dir.path(),
        &["verify", pack.to_str().unwrap(), "--quiet"],
    ));
    common::ok(&common::run(
        dir.path(),
        &["inspect", pack.to_str().unwrap()],
    ));
    let unpacked = dir.path().join("unpacked");
    let u = Command::new(vmpack())
        .args(["unpack", "-", "--quiet", "-o"])
        .arg(&unpacked)
        .stdin(std::fs::File::open(&pack).unwrap())
        .output()
        .unwrap();
    assert_eq!(u.status.code(), Some(0), "unpack -: {}", common::stderr(&u));
    assert!(unpacked.join("vm.toml").is_file());

    // From a pipe: memory is staged as it streams past, the vmstate read after it.
    let serial = dir.path().join("b.serial");
    let restore = Command::new(vmpack())
        .args(["restore", "-", "--quiet", "--serial-out"])
        .arg(&serial)
        .stdin(std::fs::File::open(&pack).unwrap())
        .output()
        .unwrap();
    assert_eq!(
        restore.status.code(),
        Some(0),
        "{}",
        common::stderr(&restore)
    );
    let after = std::fs::read_to_string(&serial).unwrap();
    check_continuation(code, &orig, &after, from, to);

    // A memory section the manifest lists but the stream lacks, and memory before the
    // manifest, are refused by name.
    let holed = dir.path().join("nomemory.vmpack");
    memory_first(&saved, &holed, false);
    let early = dir.path().join("early.vmpack");
    reorder(&saved, &early, |k| {
        Some(match k {
            vmpack_formats::pack::kind::MEMORY => 0,
            _ => 1,
        })
    });
    for (p, why) in [
        (&holed, "section 'memory/0' is missing"),
        (&early, "section 'memory/0' before the manifest"),
    ] {
        let r = Command::new(vmpack())
            .args(["restore", "-", "--quiet"])
            .stdin(std::fs::File::open(p).unwrap())
            .output()
            .unwrap();
        assert_eq!(r.status.code(), Some(1), "{}", common::stderr(&r));
        assert!(common::stderr(&r).contains(why), "{}", common::stderr(&r));
    }

    // From the file: `auto` first (lazy where userfaultfd opens), then mapped.
    for (i, memory) in ["auto", "eager"].iter().enumerate() {
        let serial = dir.path().join(format!("f{i}.serial"));
        let r = Command::new(vmpack())
            .arg("restore")
            .arg(&pack)
            .args(["--memory", memory, "--quiet", "--serial-out"])
            .arg(&serial)
            .output()
            .unwrap();
        assert_eq!(r.status.code(), Some(0), "{memory}: {}", common::stderr(&r));
        assert_eq!(std::fs::read_to_string(&serial).unwrap(), after, "{memory}");
    }
}
