//! What vmboot trusts, through the real binaries: the control socket is the owner's alone
//! (from its creation, and by peer uid), API input outside the documented ranges is
//! refused, and a guest flooding its disk cannot stall a pause.

mod common;

use common::{bin, http, vmpack};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `vmboot run` with a control socket, ended (and reaped) when dropped.
struct Vm {
    child: Child,
    sock: PathBuf,
}

impl Vm {
    fn start(cmd: &mut Command, sock: &Path) -> Vm {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting vmboot");
        let vm = Vm {
            child,
            sock: sock.to_path_buf(),
        };
        vm.wait_ready();
        vm
    }

    fn wait_ready(&self) {
        let t = Instant::now();
        loop {
            if self.sock.exists() && http(&self.sock, "GET", "/vm", b"").0 == 200 {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "no control socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn status(&self) -> Value {
        let (st, body) = http(&self.sock, "GET", "/vm", b"");
        assert_eq!(st, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn put(&self, path: &str) {
        let (st, body) = http(&self.sock, "PUT", path, b"");
        assert_eq!(st, 204, "{path}: {body}");
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.sock.exists() {
            let _ = std::panic::catch_unwind(|| http(&self.sock, "PUT", "/vm/shutdown", b""));
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("\n*** SKIPPED: {tool} not found (scripts/test-all.sh installs it) ***\n");
    }
    found
}

/// The kvstore sample: it waits for input on its serial console, so it runs until ended.
fn kvstore() -> PathBuf {
    common::samples_dir().join("kvstore.toml")
}

#[test]
fn the_control_socket_is_owner_only_from_its_creation() {
    if !common::kvm_available("control socket tests") || !have("strace") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    // A permissive umask, and every chmod held back by 1.5 s: a socket bound at its path and
    // chmod'ed afterwards would be visible with mode 0777 meanwhile.
    let script = format!(
        "umask 0; exec strace -f -qq -o /dev/null -e trace=chmod,fchmodat \
         -e inject=chmod,fchmodat:delay_enter=1500000 '{}' run '{}' --serial-out none \
         --api-sock '{}'",
        bin("vmboot").display(),
        kvstore().display(),
        sock.display()
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let mut seen = Vec::new();
    while t.elapsed() < Duration::from_secs(60) {
        if let Ok(m) = std::fs::symlink_metadata(&sock) {
            let mode = m.permissions().mode() & 0o777;
            if !seen.contains(&mode) {
                seen.push(mode);
            }
            if http(&sock, "GET", "/vm", b"").0 == 200 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // Nothing is left next to the socket: the private folder it was bound in is gone.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let _ = http(&sock, "PUT", "/vm/shutdown", b"");
    let _ = child.wait();
    assert_eq!(
        seen,
        vec![0o600],
        "modes the socket was seen with (octal): {seen:?}"
    );
    assert_eq!(names, vec![std::ffi::OsString::from("vm.sock")]);
}

#[test]
fn a_peer_with_another_uid_is_refused() {
    if !common::kvm_available("control socket tests") || !have("curl") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("\n*** SKIPPED: not root; cannot run a client as another user ***\n");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("vm.sock");
    let vm = Vm::start(
        Command::new(bin("vmboot"))
            .args(["run", "--serial-out", "none", "--api-sock"])
            .arg(&sock)
            .arg(kvstore()),
        &sock,
    );
    // Even with the socket's permissions loosened, another user is refused.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let curl = |uid: Option<u32>| {
        let mut c = Command::new("curl");
        c.args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&sock)
            .arg("http://localhost/vm");
        if let Some(u) = uid {
            use std::os::unix::process::CommandExt;
            c.uid(u).gid(u);
        }
        let o = c.output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let nobody = curl(Some(65534));
    assert!(
        nobody.ends_with("\n403") && nobody.contains("serves only uid 0, not uid 65534"),
        "{nobody}"
    );
    assert!(curl(None).ends_with("\n200"));
    assert_eq!(vm.status()["state"], "running");
}

#[test]
fn save_requests_outside_the_documented_ranges_get_400() {
    if !common::kvm_available("control socket tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let vm = Vm::start(
        Command::new(bin("vmboot"))
            .args(["run", "--serial-out", "none", "--api-sock"])
            .arg(&sock)
            .arg(kvstore()),
        &sock,
    );
    for body in [
        r#"{"compress":"zstd","level":23}"#,
        r#"{"compress":"zstd","level":-8}"#,
        r#"{"compress":"zstd","level":0}"#,
        r#"{"compress":"deflate","level":10}"#,
        r#"{"compress":"deflate","level":-1}"#,
        r#"{"compress":"none","level":1}"#,
        r#"{"level":3}"#,
        "[]",
        r#"["zstd",3,"stop"]"#,
        "null",
    ] {
        let (st, answer) = http(&sock, "POST", "/vm/save", body.as_bytes());
        let answer: String = answer.chars().take(200).collect();
        assert_eq!(st, 400, "{body}: {answer}");
        assert!(answer.contains("\"error\""), "{body}: {answer}");
    }
    // The edges of the ranges are fine, and the VM kept running through all of it.
    for body in [
        r#"{"compress":"zstd","level":22}"#,
        r#"{"compress":"zstd","level":-7}"#,
        r#"{"compress":"deflate","level":0}"#,
    ] {
        assert_eq!(
            http(&sock, "POST", "/vm/save", body.as_bytes()).0,
            200,
            "{body}"
        );
    }
    assert_eq!(vm.status()["state"], "running");
    let o = Command::new(vmpack())
        .args(["save", "--compress", "zstd", "--level", "30", "-o"])
        .arg(dir.path().join("x.vmpack"))
        .arg("--api-sock")
        .arg(&sock)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    // Refused by vmpack itself before the VM is asked (a usage error), as `pack` does.
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("level 30 is not valid for zstd"), "{err}");
    assert!(!dir.path().join("x.vmpack").exists());
}

/// The last line of the guest's serial output.
fn last_line(serial: &Path) -> String {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    text.lines().last().unwrap_or("").to_string()
}

#[test]
fn a_guest_flooding_its_disk_cannot_stall_a_pause() {
    if !common::kvm_available("virtio-blk flood test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::sparse_raw(&d.join("disk.img"), 16 << 20, &[]);
    let cfg = std::fs::read_to_string(common::samples_dir().join("blkflood.toml"))
        .unwrap()
        .replace(
            "guests/bin/",
            &format!("{}/guests/bin/", common::samples_dir().display()),
        )
        .replace("blk-disk.img", "disk.img");
    std::fs::write(d.join("vm.toml"), cfg).unwrap();
    let (sock, serial) = (d.join("vm.sock"), d.join("serial.txt"));
    let vm = Vm::start(
        Command::new(bin("vmboot"))
            .arg("run")
            .arg(d.join("vm.toml"))
            .arg("--api-sock")
            .arg(&sock)
            .arg("--serial-out")
            .arg(&serial),
        &sock,
    );
    const NREQ: u64 = 64;
    let disk = |v: &Value, k: &str| {
        v["disks"][0][k]
            .as_u64()
            .unwrap_or_else(|| panic!("GET /vm has no disks[0].{k}: {v}"))
    };
    let (mut round_paused, mut caught) = (0, 0);
    let t = Instant::now();
    loop {
        let line = last_line(&serial);
        if line == "done" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "the guest is stuck: {line}"
        );
        // Pause each round once, while its 64 reads of 8 MiB are being served.
        let round = line
            .strip_prefix("round ")
            .and_then(|r| r.strip_suffix(" queued"))
            .and_then(|r| r.parse::<u64>().ok());
        match round {
            Some(r) if r > round_paused => {
                round_paused = r;
                vm.put("/vm/pause");
                // The round the guest is in now that it stands still (it may have moved on
                // since the line was read): all of its requests were made available.
                let r = std::fs::read_to_string(&serial)
                    .unwrap()
                    .lines()
                    .rev()
                    .find_map(|l| l.strip_prefix("round ")?.split(' ').next()?.parse().ok())
                    .unwrap_or(r);
                round_paused = round_paused.max(r);
                let a = vm.status();
                std::thread::sleep(Duration::from_millis(300));
                let b = vm.status();
                assert_eq!(a["state"], "paused");
                // Nothing is served while paused, and the device's accounting adds up:
                // every request the guest made available was either served or is queued.
                assert_eq!(disk(&a, "requests"), disk(&b, "requests"), "{a}\n{b}");
                assert_eq!(disk(&a, "queued"), disk(&b, "queued"));
                assert_eq!(
                    disk(&a, "requests") + disk(&a, "queued"),
                    r * NREQ,
                    "round {r}: {a}"
                );
                if disk(&a, "queued") > 0 {
                    caught += 1;
                }
                vm.put("/vm/resume");
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    // The pause returned while requests remained queued: it did not wait for the guest's
    // I/O (which takes about a second per round here).
    assert!(caught > 0, "no pause ever found requests still queued");
    let text = std::fs::read_to_string(&serial).unwrap();
    let mut want = String::new();
    for r in 1..=8 {
        want.push_str(&format!("round {r} queued\nround {r} ok\n"));
    }
    want.push_str("oversize status=1\nsegments status=1\ndone\n");
    assert_eq!(text, want, "every request completed exactly once");
    let s = vm.status();
    assert_eq!(disk(&s, "requests"), 8 * NREQ + 2, "{s}");
    assert_eq!(disk(&s, "errors"), 2, "{s}");
    assert_eq!(disk(&s, "queued"), 0, "{s}");
}

/// Runs `vmboot ARGS` under `ulimit -v kib` (stdin from `input`); returns status and stderr.
fn under_ulimit(kib: u64, args: &str, input: Option<&Path>, cache: &Path) -> (Option<i32>, String) {
    use std::os::unix::process::ExitStatusExt;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "ulimit -v {kib}; exec '{}' {args}",
            bin("vmboot").display()
        ))
        .env("VMPACK_CACHE_DIR", cache)
        // With RUST_BACKTRACE set, std's panic hook symbolises a backtrace under its
        // backtrace lock; an allocation failing there takes that lock again and hangs.
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdout(Stdio::null());
    match input {
        Some(p) => cmd.stdin(std::fs::File::open(p).unwrap()),
        None => cmd.stdin(Stdio::null()),
    };
    let o = cmd.output().unwrap();
    let code = o.status.code().or(o.status.signal().map(|s| 128 + s));
    (code, String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn restore_short_of_memory_fails_cleanly() {
    if !common::kvm_available("low-memory restore test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let pack = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/counter-v0.1-main.vmpack");
    // Below some limit the dynamic loader itself fails; start where vmboot runs at all.
    let floor = (4..128u64)
        .map(|m| m * 1024)
        .find(|&k| under_ulimit(k, "--version", None, &cache).0 == Some(0))
        .expect("vmboot never starts under ulimit -v");
    const STEP: u64 = 512;
    for stdin in [false, true] {
        let (args, input) = if stdin {
            (
                "restore - --serial-out none".to_string(),
                Some(pack.as_path()),
            )
        } else {
            (
                format!(
                    "restore '{}' --serial-out none --verify always",
                    pack.display()
                ),
                None,
            )
        };
        // From the floor up until a restore succeeds: every limit in between makes some
        // allocation, thread or codec context fail somewhere along the restore.
        let (mut kib, mut clean, mut aborted) = (floor, 0, 0);
        loop {
            let (code, err) = under_ulimit(kib, &args, input, &cache);
            assert!(
                !err.contains("panicked")
                    && !err.contains("failed to spawn thread")
                    && !err.contains("null pointer when creating new context"),
                "ulimit -v {kib} (stdin: {stdin}): {err}"
            );
            match code {
                Some(0) => break,
                Some(1) => {
                    assert!(
                        err.lines().any(|l| l.starts_with("vmboot: error: ")),
                        "{kib}: {err}"
                    );
                    // A pipe restore reserves guest RAM (staged, then moved) before it
                    // starts any worker: most limits stop it there.
                    if ["cannot start", "zstd", "chunk buffer", "cannot reserve"]
                        .iter()
                        .any(|m| err.contains(m))
                    {
                        clean += 1;
                    }
                }
                // The global allocator (or glibc itself, registering a thread's TLS
                // destructor) aborts on a failed small allocation, and a stack that cannot
                // grow is a SIGSEGV: none of these is a thread or codec failure.
                Some(134)
                    if err.contains("memory allocation of")
                        || (err.contains("Fatal glibc error") && err.contains("out of memory")) =>
                {
                    aborted += 1
                }
                Some(139) => aborted += 1,
                other => panic!("ulimit -v {kib} (stdin: {stdin}): status {other:?}: {err}"),
            }
            kib += STEP;
            assert!(
                kib < floor + (256 << 10),
                "no restore succeeded below {kib} KiB"
            );
        }
        eprintln!(
            "stdin {stdin}: {clean} clean thread/codec/buffer/RAM errors, {aborted} allocator aborts \
             between {floor} and {kib} KiB"
        );
        assert!(
            clean > 0,
            "no limit reached a thread, codec, buffer or RAM failure"
        );
    }
}
