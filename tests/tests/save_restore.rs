//! Save a running VM into one pack and resume it in another process, through the real
//! `vmboot` and `vmpack` binaries and the sample guests.
//!
//! The central assertion: the serial output of the original run up to the save, followed
//! by the output of the restored run, is exactly what one uninterrupted run prints.

mod common;

use common::{bin, vmpack};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A VM started with `vmboot run CONFIG --api-sock`, serial output to a file.
struct Running {
    child: Child,
    sock: PathBuf,
    serial: PathBuf,
}

impl Running {
    fn start(dir: &Path, config: &str, tag: &str) -> Running {
        // Build both binaries before the guest starts its clock.
        let _ = vmpack();
        let sock = dir.join(format!("{tag}.sock"));
        let serial = dir.join(format!("{tag}.serial"));
        let child = Command::new(bin("vmboot"))
            .arg("run")
            .arg(common::samples_dir().join(config))
            .arg("--api-sock")
            .arg(&sock)
            .arg("--serial-out")
            .arg(&serial)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning vmboot");
        let r = Running {
            child,
            sock,
            serial,
        };
        r.wait_socket();
        r
    }

    /// A restored VM (`vmboot restore PACK --api-sock`), serial output to a file.
    fn restore(dir: &Path, pack: &Path, tag: &str) -> Running {
        let sock = dir.join(format!("{tag}.sock"));
        let serial = dir.join(format!("{tag}.serial"));
        let child = Command::new(bin("vmboot"))
            .arg("restore")
            .arg(pack)
            .arg("--api-sock")
            .arg(&sock)
            .arg("--serial-out")
            .arg(&serial)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning vmboot restore");
        let r = Running {
            child,
            sock,
            serial,
        };
        r.wait_socket();
        r
    }

    fn wait_socket(&self) {
        let t = Instant::now();
        while !self.sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{} did not appear",
                self.sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until the serial output contains `needle`.
    fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let t = Instant::now();
        loop {
            let out = self.output();
            if out.contains(needle) {
                return out;
            }
            assert!(
                t.elapsed() < timeout,
                "timed out waiting for {needle:?}; serial so far:\n{out}"
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
        assert!(
            o.status.success(),
            "vmpack save failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("guest paused"),
            "save reports the pause: {err}"
        );
    }

    /// Waits for the process to end; returns (exit code, stderr).
    fn finish(mut self, timeout: Duration) -> (i32, String) {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                return (st.code().unwrap_or(-1), err);
            }
            if t.elapsed() > timeout {
                let _ = self.child.kill();
                panic!(
                    "VM did not end within {timeout:?}; serial:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Runs `config` until its serial output shows `marker`, saves it with `--then stop`,
/// restores the pack in a new process and lets the guest finish there (exit status 0).
/// Returns the pack, its SHA-256 taken before the restore, and the serial output before the
/// save and after the restore.
fn save_stop_restore(dir: &Path, config: &str, marker: &str) -> (PathBuf, String, String, String) {
    let pack = dir.join("saved.vmpack");
    let a = Running::start(dir, config, "a");
    a.wait_for(marker, Duration::from_secs(60));
    a.save(&pack, "stop", "none");
    let (code, err) = a.finish(Duration::from_secs(30));
    assert_eq!(code, 0, "original vmboot after --then stop: {err}");
    let before = std::fs::read_to_string(dir.join("a.serial")).unwrap();
    let digest = sha256_file(&pack);
    let b = Running::restore(dir, &pack, "b");
    let (code, err) = b.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "restored guest exit status; stderr: {err}");
    let after = std::fs::read_to_string(dir.join("b.serial")).unwrap();
    (pack, digest, before, after)
}

fn counter_text(last: u32) -> String {
    (1..=last).map(|i| format!("{i}\n")).collect()
}

fn sha256_file(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

fn counter_continues_exactly(config: &str) {
    if !common::kvm_available("save/restore tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pack, digest, before, after) = save_stop_restore(dir.path(), config, "\n20\n");
    assert!(!after.is_empty(), "the restored guest printed nothing");
    assert_eq!(
        format!("{before}{after}"),
        counter_text(300),
        "output before the save + after the restore must be one uninterrupted count"
    );
    assert_eq!(
        sha256_file(&pack),
        digest,
        "restore must not modify the pack"
    );
}

#[test]
fn real_mode_counter_continues_with_the_next_number() {
    counter_continues_exactly("counter.toml");
}

#[test]
fn long_mode_counter_continues_with_the_next_number() {
    counter_continues_exactly("counter64.toml");
}

#[test]
fn save_then_resume_keeps_the_original_running() {
    if !common::kvm_available("save/restore tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("p.vmpack");
    let a = Running::start(dir.path(), "counter64.toml", "a");
    a.wait_for("\n15\n", Duration::from_secs(60));
    a.save(&pack, "resume", "zstd");
    let (code, _) = a.finish(Duration::from_secs(60));
    assert_eq!(code, 0);
    let full = std::fs::read_to_string(dir.path().join("a.serial")).unwrap();
    assert_eq!(
        full,
        counter_text(300),
        "the original kept counting to the end"
    );

    let b = Running::restore(dir.path(), &pack, "b");
    let (code, err) = b.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{err}");
    let after = std::fs::read_to_string(dir.path().join("b.serial")).unwrap();
    assert!(
        !after.is_empty() && after.len() < full.len() && full.ends_with(&after),
        "the clone continues the same count from the save point: {after:?}"
    );
}

#[test]
fn streamed_save_restores_from_a_pipe() {
    if !common::kvm_available("save/restore tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = Running::start(dir.path(), "counter.toml", "a");
    a.wait_for("\n10\n", Duration::from_secs(60));
    let mut save = Command::new(vmpack())
        .args([
            "save",
            "--then",
            "stop",
            "--compress",
            "zstd",
            "-o",
            "-",
            "--api-sock",
        ])
        .arg(&a.sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let restore = Command::new(vmpack())
        .args(["restore", "-", "--serial-out"])
        .arg(dir.path().join("b.serial"))
        .stdin(save.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(save.wait().unwrap().success());
    assert_eq!(
        restore.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&restore.stderr)
    );
    let (code, _) = a.finish(Duration::from_secs(30));
    assert_eq!(code, 0);
    let before = std::fs::read_to_string(dir.path().join("a.serial")).unwrap();
    let after = std::fs::read_to_string(dir.path().join("b.serial")).unwrap();
    assert_eq!(format!("{before}{after}"), counter_text(300));
}

#[test]
fn save_restore_chain_and_two_restores_of_one_pack() {
    if !common::kvm_available("save/restore tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p1 = dir.path().join("1.vmpack");
    let p2 = dir.path().join("2.vmpack");
    let a = Running::start(dir.path(), "counter64.toml", "a");
    a.wait_for("\n10\n", Duration::from_secs(60));
    a.save(&p1, "stop", "none");
    a.finish(Duration::from_secs(30));

    // Restore, let it count a while, save again from the restored VM, restore that.
    let b = Running::restore(dir.path(), &p1, "b");
    let t = Instant::now();
    while b.output().lines().count() < 20 {
        assert!(t.elapsed() < Duration::from_secs(60), "restored VM stalled");
        std::thread::sleep(Duration::from_millis(50));
    }
    b.save(&p2, "stop", "deflate");
    assert_eq!(b.finish(Duration::from_secs(30)).0, 0);
    let c = Running::restore(dir.path(), &p2, "c");
    let (code, err) = c.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{err}");
    let text = |t: &str| std::fs::read_to_string(dir.path().join(format!("{t}.serial"))).unwrap();
    assert_eq!(
        format!("{}{}{}", text("a"), text("b"), text("c")),
        counter_text(300),
        "save, restore, save, restore continues one count"
    );

    // The restored VM carried the boot image from the first pack into the second.
    let image = |p: &Path| {
        let r = vmpack_formats::pack::PackReader::open(p).unwrap();
        let s = r.section("boot/image").expect("boot/image section");
        r.read_section(s.id, 1 << 20).unwrap()
    };
    assert_eq!(image(&p1), image(&p2));
    assert!(!image(&p2).is_empty());

    // A second restore of the first pack replays the same continuation.
    let d = Running::restore(dir.path(), &p1, "d");
    assert_eq!(d.finish(Duration::from_secs(60)).0, 0);
    assert_eq!(format!("{}{}", text("a"), text("d")), counter_text(300));
}

#[test]
fn timer_interrupts_keep_their_rate_after_restore() {
    if !common::kvm_available("save/restore tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, _, before, after) = save_stop_restore(dir.path(), "timer.toml", "pit=3000 ");
    let all = format!("{before}{after}");
    let lines: Vec<(u64, u64)> = all
        .lines()
        .map(|l| {
            let mut it = l.split_whitespace().map(|kv| {
                kv.split_once('=')
                    .and_then(|(_, v)| v.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("unexpected timer line {l:?} in:\n{all}"))
            });
            (it.next().unwrap(), it.next().unwrap())
        })
        .collect();
    assert_eq!(lines.len(), 20, "20 report lines in all:\n{all}");
    for (i, (pit, _)) in lines.iter().enumerate() {
        assert_eq!(
            *pit,
            500 * (i as u64 + 1),
            "PIT ticks continue exactly:\n{all}"
        );
    }
    // LAPIC ticks per 500 PIT ticks stay near 500 on both sides of the restore (the two
    // timers run at about the same rate). The bounds are loose because KVM re-injects lost
    // PIT ticks but not LAPIC ones, so a loaded host loses some LAPIC ticks; the failures
    // this guards against are a timer that stops (0) or runs twice (about 1000).
    for w in lines.windows(2) {
        let d = w[1].1 - w[0].1;
        assert!(
            (200..=800).contains(&d),
            "LAPIC ticks per 500 PIT ticks = {d}, timers out of step after restore:\n{all}"
        );
    }
}

#[test]
fn both_vcpus_continue_after_restore() {
    if !common::kvm_available("save/restore tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, _, before, after) = save_stop_restore(dir.path(), "smp.toml", "cpu1 20\n");
    let all = format!("{before}{after}");
    for cpu in ["cpu0", "cpu1"] {
        let seq: Vec<u32> = all
            .lines()
            .filter_map(|l| l.strip_prefix(cpu))
            .map(|n| n.trim().parse().unwrap())
            .collect();
        assert_eq!(
            seq,
            (1..=100).collect::<Vec<_>>(),
            "{cpu} counts 1..100 across the restore"
        );
        assert!(
            after.lines().any(|l| l.starts_with(cpu)),
            "{cpu} ran after the restore:\n{after}"
        );
    }
}

/// The `memory/0` section of a pack, as bytes.
fn memory_of(pack: &Path) -> Vec<u8> {
    let r = vmpack_formats::pack::PackReader::open(pack).unwrap();
    let s = r.section("memory/0").expect("memory section");
    r.read_section(s.id, 1 << 30).unwrap()
}

#[test]
fn memory_is_identical_after_restore() {
    if !common::kvm_available("save/restore tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p1 = dir.path().join("m1.vmpack");
    let p2 = dir.path().join("m2.vmpack");
    let a = Running::start(dir.path(), "memtest.toml", "a");
    a.wait_for("filled\n", Duration::from_secs(60));
    a.save(&p1, "stop", "zstd");
    a.finish(Duration::from_secs(30));
    // Restore and save again at once: the guest is in its delay loop, which touches no
    // RAM, so every byte must be the same.
    let b = Running::restore(dir.path(), &p1, "b");
    b.save(&p2, "resume", "none");
    let (code, err) = b.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{err}");
    let out = std::fs::read_to_string(dir.path().join("b.serial")).unwrap();
    assert!(out.contains("memtest: 7680 pages ok"), "guest check: {out}");
    let (m1, m2) = (memory_of(&p1), memory_of(&p2));
    assert_eq!(m1.len(), 32 << 20);
    // The first 2 MiB hold the guest's code, stack and page tables (accessed bits).
    let first_diff = m1[2 << 20..]
        .iter()
        .zip(&m2[2 << 20..])
        .position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "RAM above 2 MiB differs after restore");
}

fn restore_output(pack: &Path) -> Output {
    restore_output_with(pack, &[])
}

fn restore_output_with(pack: &Path, args: &[&str]) -> Output {
    Command::new(bin("vmboot"))
        .arg("restore")
        .arg(pack)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn damaged_or_foreign_packs_are_refused_before_the_guest_runs() {
    if !common::kvm_available("save/restore tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.vmpack");
    std::env::set_var("VMPACK_CACHE_DIR", dir.path().join("cache"));
    let a = Running::start(dir.path(), "counter.toml", "a");
    a.wait_for("\n5\n", Duration::from_secs(60));
    a.save(&good, "stop", "none");
    a.finish(Duration::from_secs(30));

    // One flipped byte inside the guest's memory.
    let r = vmpack_formats::pack::PackReader::open(&good).unwrap();
    let mem = r.section("memory/0").unwrap().id;
    let chunk = r
        .chunks(mem)
        .iter()
        .find(|c| c.codec == vmpack_formats::pack::Codec::None)
        .unwrap()
        .clone();
    drop(r);
    let flipped = dir.path().join("flipped.vmpack");
    let mut bytes = std::fs::read(&good).unwrap();
    bytes[(chunk.payload_offset + 100) as usize] ^= 0x01;
    std::fs::write(&flipped, &bytes).unwrap();
    // Eager: refused before any vCPU runs. Lazy (the default for a pack not verified yet):
    // the VM stops when the chunk is first placed, before the guest sees it (status 76).
    for (args, status) in [(&["--memory", "eager"][..], 1), (&[][..], 76)] {
        let o = restore_output_with(&flipped, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(status), "{args:?}: {err}");
        assert!(
            o.stdout.is_empty(),
            "the guest must not run: {:?}",
            o.stdout
        );
        assert!(
            err.contains("flipped.vmpack")
                && err.contains("section 'memory/0'")
                && err.contains(&format!("chunk {}", chunk.seq)),
            "the error names file, section and chunk: {err}"
        );
    }

    // Truncated.
    let truncated = dir.path().join("truncated.vmpack");
    std::fs::write(
        &truncated,
        &std::fs::read(&good).unwrap()[..bytes.len() / 2],
    )
    .unwrap();
    let o = restore_output(&truncated);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(o.stdout.is_empty());
    assert!(err.contains("truncated.vmpack"), "{err}");

    // A guest that was given CPU features no host offers all of.
    let foreign = dir.path().join("foreign.vmpack");
    common::rewrite_pack(&good, &foreign, |name, data| {
        if name != "vmstate" {
            return Some(data);
        }
        let mut v: serde_json::Value = serde_json::from_slice(&data).unwrap();
        for vcpu in v["vcpus"].as_array_mut().unwrap() {
            for e in vcpu["cpuid"].as_array_mut().unwrap() {
                // kvm_cpuid_entry2 as raw bytes: function, index, flags, eax, ebx, ecx, edx.
                let b = e.as_array_mut().unwrap();
                let word = |b: &[serde_json::Value], i: usize| -> u32 {
                    (0..4)
                        .map(|k| (b[i * 4 + k].as_u64().unwrap() as u32) << (8 * k))
                        .sum()
                };
                let (function, index) = (word(b, 0), word(b, 1));
                let mut set_all = |reg: usize| {
                    for k in 0..4 {
                        b[reg * 4 + k] = serde_json::json!(0xff);
                    }
                };
                match (function, index) {
                    (1, _) => set_all(5),
                    (7, 0) => {
                        set_all(4);
                        set_all(5)
                    }
                    (0x8000_0001, _) => {
                        set_all(5);
                        set_all(6)
                    }
                    _ => {}
                }
            }
        }
        Some(serde_json::to_vec(&v).unwrap())
    });
    let o = restore_output(&foreign);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(o.stdout.is_empty(), "the guest must not run");
    assert!(
        err.contains("CPU features this host does not offer"),
        "names the missing features: {err}"
    );
}

/// The LAPIC timer in TSC-deadline mode (how Linux drives it), re-armed from its handler,
/// keeps firing across six saves and restores in new processes: the output is one unbroken
/// sequence and the guest finishes (vmboot writes the deadline MSR last and turns a spent
/// deadline into an immediate one).
#[test]
fn tsc_deadline_timer_keeps_ticking_across_restores() {
    if !common::kvm_available("save/restore tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut all = String::new();
    let mut r = Running::start(d, "tscdl.toml", "r0");
    for i in 1..=6 {
        r.wait_for(&format!("tick {}\n", i * 300), Duration::from_secs(60));
        let pack = d.join(format!("p{i}.vmpack"));
        r.save(&pack, "stop", "none");
        let serial = r.serial.clone();
        let (code, err) = r.finish(Duration::from_secs(30));
        assert_eq!(code, 0, "vmboot after save {i}: {err}");
        all += &std::fs::read_to_string(serial).unwrap();
        r = Running::restore(d, &pack, &format!("r{i}"));
    }
    let serial = r.serial.clone();
    let (code, err) = r.finish(Duration::from_secs(60));
    all += &std::fs::read_to_string(serial).unwrap();
    assert_eq!(code, 0, "the last restore: {err}\n{all}");
    let want: String = (1..=60).map(|i| format!("tick {}\n", i * 100)).collect();
    assert_eq!(all, want);
}

/// virtio-rng: the `rng` guest reads host entropy through it; saved between two rounds, its
/// device state (queue positions, bytes given) is in the pack's vmstate under
/// `virtio-rng0`, and the restored guest goes on reading fresh entropy through the restored
/// queue.
#[test]
fn virtio_rng_gives_entropy_and_its_state_survives_a_restore() {
    if !common::kvm_available("save/restore tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pack, _, before, after) = save_stop_restore(dir.path(), "rng.toml", "round 2 ");
    let line = |r: u32| format!("round {r} len=64 new=1\n");
    assert_eq!(
        format!("{before}{after}"),
        (1..=4).map(line).collect::<String>()
    );
    let r = vmpack_formats::pack::PackReader::open(&pack).unwrap();
    let s = r.section("vmstate").unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&r.read_section(s.id, 64 << 20).unwrap()).unwrap();
    assert_eq!(state["version"], 2);
    let rng = state["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "virtio-rng0")
        .unwrap_or_else(|| panic!("no virtio-rng0 in {}", state["devices"]));
    assert_eq!(rng["version"], 1);
    // The save came after round 2's request at the earliest: 2 (or, late, 3) requests of
    // 64 bytes, each taken off the ring and completed.
    let rounds = before.lines().count() as u64;
    assert_eq!(rng["state"]["bytes"], 64 * rounds, "{rng}");
    let q = &rng["state"]["transport"]["queues"][0];
    assert_eq!(q["next_avail"], rounds);
    assert_eq!(q["next_used"], rounds);
    assert_eq!(rng["state"]["transport"]["status"], 0xf);
}

/// A virtio completion interrupt pending at the save (the device's InterruptStatus is 1,
/// the guest has interrupts off and has not acknowledged it) is delivered to the restored
/// guest, exactly once, and the guest's acknowledgement clears it.
#[test]
fn a_virtio_interrupt_pending_at_the_save_reaches_the_restored_guest() {
    if !common::kvm_available("save/restore tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pack, _, before, after) =
        save_stop_restore(dir.path(), "irqpend.toml", "pending status=1\n");
    assert_eq!(
        before, "pending status=1\n",
        "saved before the interrupt was taken"
    );
    assert_eq!(after, "irq count=1 status=0\n");
    let r = vmpack_formats::pack::PackReader::open(&pack).unwrap();
    let s = r.section("vmstate").unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&r.read_section(s.id, 64 << 20).unwrap()).unwrap();
    let rng = state["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "virtio-rng0")
        .unwrap_or_else(|| panic!("no virtio-rng0 in {}", state["devices"]));
    assert_eq!(
        rng["state"]["transport"]["interrupt_status"], 1,
        "the save caught the interrupt pending: {rng}"
    );
}
