//! Outputs in a folder other users can write (`/tmp`): nothing planted there makes vmpack
//! write anywhere but the file it was asked to write, an existing file's permissions are
//! respected, and a failed save leaves the VM running.

mod common;

use common::{fails, flat_vm, ok, run, vmpack};
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A victim file whose content a test checks afterwards.
fn victim(dir: &Path) -> (PathBuf, Vec<u8>) {
    let p = dir.join("victim.txt");
    let content = b"the user's precious file\n".to_vec();
    std::fs::write(&p, &content).unwrap();
    (p, content)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Today's temporary names start `.NAME.tmp-PID`: a symlink planted under the name the
/// process would once have used (PID known through `exec` from a shell that waits) is
/// never followed.
#[test]
fn a_symlink_planted_under_a_temporary_name_is_not_followed() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    flat_vm(&src, false);
    let shared = t.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let (v, content) = victim(t.path());
    let out = shared.join("x.vmpack");
    let mut child = Command::new("sh")
        .current_dir(&src)
        .args([
            "-c",
            r#"read go; exec "$0" pack vm.toml -o "$1" --quiet"#,
            vmpack().to_str().unwrap(),
            out.to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // The old predictable name, and a few variants an attacker might try.
    for name in [
        format!(".x.vmpack.tmp-{pid}"),
        format!(".x.vmpack.tmp-{pid}-"),
        format!(".x.vmpack.tmp-{pid}-000000"),
    ] {
        symlink(&v, shared.join(name)).unwrap();
    }
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let o = child.wait_with_output().unwrap();
    ok(&o);
    assert_eq!(
        std::fs::read(&v).unwrap(),
        content,
        "the victim was written"
    );
    assert!(std::fs::symlink_metadata(&out).unwrap().is_file());
    assert_eq!(
        ok(&run(&src, &["verify", out.to_str().unwrap(), "--quiet"])),
        ""
    );
    // The planted links are left alone, and no temporary of ours remains.
    let names: Vec<String> = std::fs::read_dir(&shared)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
}

#[test]
fn a_symlink_target_is_refused_and_its_file_untouched() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    flat_vm(&src, false);
    let (v, content) = victim(t.path());
    let link = t.path().join("link.vmpack");
    symlink(&v, &link).unwrap();
    for extra in [&[][..], &["--force"][..]] {
        let mut args = vec!["pack", "vm.toml", "-o", link.to_str().unwrap()];
        args.extend_from_slice(extra);
        let err = fails(&run(&src, &args));
        assert!(
            err.contains(&format!("{}: is a symbolic link", link.display())),
            "{err}"
        );
        assert_eq!(std::fs::read(&v).unwrap(), content);
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }
    // A dangling link too: creating its target would write where the link's maker chose.
    let dangling = t.path().join("dangling.vmpack");
    let aim = t.path().join("created-through-link");
    symlink(&aim, &dangling).unwrap();
    let err = fails(&run(
        &src,
        &["pack", "vm.toml", "-o", dangling.to_str().unwrap()],
    ));
    assert!(err.contains("is a symbolic link"), "{err}");
    assert!(!aim.exists());
    // Unpack to a linked folder: refused as well.
    let pack = t.path().join("p.vmpack");
    ok(&run(
        &src,
        &["pack", "vm.toml", "-o", pack.to_str().unwrap()],
    ));
    let real = t.path().join("realdir");
    std::fs::create_dir(&real).unwrap();
    let dirlink = t.path().join("dirlink");
    symlink(&real, &dirlink).unwrap();
    let err = fails(&run(
        &src,
        &[
            "unpack",
            pack.to_str().unwrap(),
            "-o",
            dirlink.to_str().unwrap(),
        ],
    ));
    assert!(err.contains("is a symbolic link"), "{err}");
    assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0);
}

#[test]
fn a_read_only_output_is_replaced_only_with_force_and_keeps_its_mode() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    flat_vm(&src, false);
    let out = t.path().join("ro.vmpack");
    std::fs::write(&out, b"old").unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o444)).unwrap();
    let err = fails(&run(
        &src,
        &["pack", "vm.toml", "-o", out.to_str().unwrap()],
    ));
    assert!(
        err.contains(&format!(
            "{}: exists and its permissions (mode 444) do not let you write it",
            out.display()
        )) && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    assert_eq!(mode(&out), 0o444);
    ok(&run(
        &src,
        &["pack", "vm.toml", "-o", out.to_str().unwrap(), "--force"],
    ));
    assert_ne!(std::fs::read(&out).unwrap(), b"old");
    assert_eq!(mode(&out), 0o444, "--force kept the mode");
    // A writable file is replaced without --force and keeps its (unusual) mode.
    let w = t.path().join("w.vmpack");
    std::fs::write(&w, b"old").unwrap();
    std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o640)).unwrap();
    ok(&run(&src, &["pack", "vm.toml", "-o", w.to_str().unwrap()]));
    assert_eq!(mode(&w), 0o640);
    // A new file: 0666 less the umask (the test process's umask is inherited).
    let n = t.path().join("new.vmpack");
    ok(&run(&src, &["pack", "vm.toml", "-o", n.to_str().unwrap()]));
    // SAFETY: reads and restores this process's umask.
    let umask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m as u32
    };
    assert_eq!(mode(&n), 0o666 & !umask);
}

/// `-o /dev/stdout` is a link to a pipe here: written in place, as before.
#[test]
fn a_link_to_a_pipe_is_still_written_in_place() {
    let t = tempfile::tempdir().unwrap();
    flat_vm(t.path(), false);
    let o = Command::new(vmpack())
        .current_dir(t.path())
        .args(["pack", "vm.toml", "-o", "/dev/stdout", "--quiet"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(&o.stdout[..8], vmpack_formats::pack::MAGIC);
}

/// A kvstore guest under `vmboot run --api-sock`, killed when dropped.
struct Kv {
    child: std::process::Child,
    sock: PathBuf,
    serial: PathBuf,
}

impl Kv {
    fn start(dir: &Path) -> Kv {
        let _ = vmpack();
        let sock = dir.join("kv.sock");
        let serial = dir.join("kv.serial");
        let child = Command::new(common::bin("vmboot"))
            .arg("run")
            .arg(common::samples_dir().join("kvstore.toml"))
            .arg("--api-sock")
            .arg(&sock)
            .arg("--serial-out")
            .arg(&serial)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let kv = Kv {
            child,
            sock,
            serial,
        };
        kv.wait_serial("kvstore ready", 1);
        kv
    }

    fn wait_serial(&self, needle: &str, count: usize) {
        let t0 = std::time::Instant::now();
        loop {
            let out = std::fs::read_to_string(&self.serial).unwrap_or_default();
            if out.matches(needle).count() >= count {
                return;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(30),
                "waiting for {needle:?}: {out}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The VM is running (the server may take a moment to end a failed stream) and its
    /// guest answers a command.
    fn answers(&self, n: usize) {
        let t0 = std::time::Instant::now();
        loop {
            let (code, body) = common::http(&self.sock, "GET", "/vm", b"");
            assert_eq!(code, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["state"] == "running" {
                break;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(20),
                "the VM stayed {}",
                v["state"]
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let (code, body) = common::http(
            &self.sock,
            "PUT",
            "/vm/serial/input",
            format!("set k{n} v\n").as_bytes(),
        );
        assert_eq!(code, 204, "{body}");
        self.wait_serial("ok\n", n);
    }

    fn save(&self, args: &[&str], shell_prefix: &str) -> std::process::Output {
        let mut script = format!("{shell_prefix} exec \"$0\" save --api-sock \"$1\"");
        for (i, _) in args.iter().enumerate() {
            script.push_str(&format!(" \"${}\"", i + 2));
        }
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(vmpack())
            .arg(&self.sock)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for Kv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[test]
fn a_failed_save_leaves_the_vm_running() {
    if !common::kvm_available("failed-save tests") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let kv = Kv::start(t.path());
    let mut answered = 0;
    let mut next = || {
        answered += 1;
        answered
    };
    // A missing folder: refused before the VM is paused.
    for then in ["stop", "resume"] {
        let missing = t.path().join("no/such/folder/x.vmpack");
        let err = fails(&kv.save(&["-o", missing.to_str().unwrap(), "--then", then], ""));
        assert!(
            err.contains(&format!("cannot save the VM to {}", missing.display()))
                && err.contains(&t.path().join("no/such/folder").display().to_string()),
            "{err}"
        );
        kv.answers(next());
    }
    // A read-only pack of a previous save is neither replaced nor re-moded.
    let ro = t.path().join("ro.vmpack");
    std::fs::write(&ro, b"keep").unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
    let err = fails(&kv.save(&["-o", ro.to_str().unwrap(), "--then", "stop"], ""));
    assert!(err.contains("mode 444"), "{err}");
    assert_eq!(std::fs::read(&ro).unwrap(), b"keep");
    assert_eq!(mode(&ro), 0o444);
    kv.answers(next());
    // A failure mid-write: the file size limit (RLIMIT_FSIZE) stops the pack at 8 KiB.
    for then in ["stop", "resume"] {
        let out = t.path().join("big.vmpack");
        let err = fails(&kv.save(
            &["-o", out.to_str().unwrap(), "--then", then],
            "ulimit -f 16;",
        ));
        assert!(err.contains("File too large"), "{err}");
        if then == "stop" {
            assert!(err.contains("the VM was resumed"), "{err}");
        }
        assert!(!out.exists());
        assert!(leftovers(t.path()).is_empty(), "{:?}", leftovers(t.path()));
        kv.answers(next());
    }
    // And a good save still works afterwards.
    let good = t.path().join("good.vmpack");
    ok(&kv.save(&["-o", good.to_str().unwrap(), "--quiet"], ""));
    kv.answers(next());
}
