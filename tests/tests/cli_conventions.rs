//! The conventions every command follows (docs/CLI.md): `--quiet` everywhere, a quiet end
//! when stdout's reader goes away, one exit-status table, messages that name the real
//! problem, completions and manual pages; and that `vmpack run`/`restore`/`--clones` remove
//! their control sockets when Ctrl-C or `kill` ends them.

mod common;

use common::*;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn vmboot() -> PathBuf {
    bin("vmboot")
}

/// Subcommand names listed under `Commands:` in a `--help` text.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(String::from)
        .collect()
}

/// Every leaf command of `exe` (`[]` is the program itself), found through `--help`.
fn leaf_commands(exe: &Path, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut args = prefix.clone();
    args.push("--help".into());
    let o = Command::new(exe).args(&args).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    let subs = subcommands(&stdout(&o));
    if subs.is_empty() {
        out.push(prefix);
        return;
    }
    for s in subs {
        let mut p = prefix.clone();
        p.push(s);
        leaf_commands(exe, p, out);
    }
}

#[test]
fn every_command_takes_quiet() {
    for exe in [vmpack(), vmboot()] {
        let mut leaves = Vec::new();
        leaf_commands(&exe, Vec::new(), &mut leaves);
        assert!(leaves.len() > 2, "{leaves:?}");
        for cmd in leaves {
            let mut args = cmd.clone();
            args.push("--help".into());
            let help = stdout(&Command::new(&exe).args(&args).output().unwrap());
            assert!(
                help.contains("-q, --quiet"),
                "{} {cmd:?} has no --quiet:\n{help}",
                exe.display()
            );
        }
    }
}

#[test]
fn every_command_is_in_cli_md() {
    let doc = std::fs::read_to_string(samples_dir().join("../docs/CLI.md")).unwrap();
    let mut leaves = Vec::new();
    leaf_commands(&vmpack(), Vec::new(), &mut leaves);
    for cmd in leaves {
        let row = format!("| `vmpack {}", cmd.join(" "));
        assert!(
            doc.contains(&format!("{row}`")) || doc.contains(&format!("{row} ")),
            "docs/CLI.md has no row {row}`"
        );
    }
}

/// Runs `vmpack args` with stdout a pipe whose reader is already gone.
fn with_closed_stdout(cwd: &Path, args: &[&str]) -> std::process::Output {
    let mut fds = [0; 2];
    // SAFETY: pipe() fills two new descriptors, each owned exactly once below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Command::new(vmpack())
        .current_dir(cwd)
        .args(args)
        .env("VMPACK_CACHE_DIR", cwd.join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn a_closed_stdout_ends_commands_quietly() {
    let t = tempfile::tempdir().unwrap();
    let pack = t.path().join("c.vmpack");
    ok(&run(
        t.path(),
        &[
            "pack",
            samples_dir().join("counter.toml").to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
        ],
    ));
    std::fs::create_dir(t.path().join("cache")).unwrap();
    let p = pack.to_str().unwrap();
    for args in [
        vec!["inspect", p, "--json"],
        vec!["inspect", p],
        vec!["verify", p],
        vec!["verify", p, "--json"],
        vec!["completions", "bash"],
        vec!["cache", "ls"],
        vec![
            "pack",
            samples_dir().join("counter.toml").to_str().unwrap(),
            "-o",
            "again.vmpack",
        ],
    ] {
        let o = with_closed_stdout(t.path(), &args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(141), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?} printed on stderr: {err}");
    }
    // The pipe was closed before the pack was complete? No: the summary comes after the
    // rename, so the pack is there and whole.
    ok(&run(t.path(), &["verify", "again.vmpack"]));

    // The shell's way of saying it.
    let sh = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; for i in 1 2 3 4 5 6 7 8; do '{}' inspect '{p}' --json; done | head -1",
            vmpack().display()
        ))
        .output()
        .unwrap();
    assert!(stdout(&sh).starts_with('{'), "{}", stdout(&sh));
    assert!(!stderr(&sh).contains("panicked"), "{}", stderr(&sh));
    assert!(!stderr(&sh).contains("Broken pipe"), "{}", stderr(&sh));
}

#[test]
fn completions_source_cleanly_and_man_pages_render() {
    let t = tempfile::tempdir().unwrap();
    let script = t.path().join("vmpack.bash");
    std::fs::write(&script, ok(&run(t.path(), &["completions", "bash"]))).unwrap();
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -e; source '{}'; complete -p vmpack",
            script.display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("vmpack"), "{}", stdout(&o));
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    for shell in ["zsh", "fish"] {
        let text = ok(&run(t.path(), &["completions", shell]));
        assert!(
            text.contains("restore") && text.contains("--clones"),
            "{shell}: {text}"
        );
    }
    assert_eq!(
        run(t.path(), &["completions", "tcsh"]).status.code(),
        Some(2)
    );

    let dir = t.path().join("man");
    let said = ok(&run(t.path(), &["man", "-o", dir.to_str().unwrap()]));
    assert!(said.contains("manual pages"), "{said}");
    let top = std::fs::read_to_string(dir.join("vmpack.1"))
        .unwrap()
        .replace("\\-", "-");
    let mut leaves = Vec::new();
    leaf_commands(&vmpack(), Vec::new(), &mut leaves);
    for cmd in &leaves {
        assert!(top.contains(&cmd[0]), "vmpack.1 lacks {}", cmd[0]);
        assert!(
            dir.join(format!("vmpack-{}.1", cmd[0])).exists(),
            "no page for {}",
            cmd[0]
        );
    }
    if Command::new("man").arg("--version").output().is_ok() {
        let o = Command::new("man")
            .args(["-l", dir.join("vmpack-save.1").to_str().unwrap()])
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let page = stdout(&o);
        assert!(
            page.contains("--api-sock") && page.contains("--level"),
            "{page}"
        );
    } else {
        eprintln!("man is not installed: the pages were checked as text only");
    }
}

#[test]
fn save_and_pack_refuse_the_same_levels_with_the_same_words() {
    let t = tempfile::tempdir().unwrap();
    let counter = samples_dir().join("counter.toml");
    // The socket does not exist: the level is refused before the VM is asked anything.
    for args in [
        vec![
            "save",
            "--api-sock",
            "no.sock",
            "--compress",
            "zstd",
            "--level",
            "50",
            "-o",
            "x.vmpack",
        ],
        vec![
            "pack",
            counter.to_str().unwrap(),
            "--compress",
            "zstd",
            "--level",
            "50",
            "-o",
            "x.vmpack",
        ],
    ] {
        let o = run(t.path(), &args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o)
                .contains("--level 50 is not valid for zstd (deflate: 0-9, zstd: -7..=22 except 0"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    for args in [
        vec![
            "save",
            "--api-sock",
            "no.sock",
            "--compress",
            "deflate",
            "--level",
            "-1",
            "-o",
            "x.vmpack",
        ],
        vec![
            "pack",
            counter.to_str().unwrap(),
            "--compress",
            "none",
            "--level",
            "1",
            "-o",
            "x.vmpack",
        ],
    ] {
        let o = run(t.path(), &args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("is not valid for"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    assert!(!t.path().join("x.vmpack").exists());
    for cmd in ["save", "pack"] {
        let help = ok(&run(t.path(), &[cmd, "--help"]));
        assert!(help.contains("none|deflate|zstd"), "{cmd}: {help}");
        assert!(
            help.contains("deflate 0-9, zstd -7..=22 except 0"),
            "{cmd}: {help}"
        );
        assert!(
            help.contains("unlike `"),
            "{cmd} does not explain its default: {help}"
        );
    }
}

#[test]
fn messages_name_the_real_problem() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let counter = samples_dir().join("counter.toml");

    // A missing input is reported before a non-empty output folder.
    std::fs::create_dir(d.join("full")).unwrap();
    std::fs::write(d.join("full/x"), b"x").unwrap();
    for fmt in ["raw", "libvirt"] {
        let err = fails(&run(
            d,
            &["export", "missing.vmpack", "--format", fmt, "-o", "full"],
        ));
        assert!(err.contains("missing.vmpack: No such file"), "{fmt}: {err}");
        assert!(!err.contains("not empty"), "{fmt}: {err}");
    }

    // One shape: `vmpack: <what failed>: <file or socket>: <why>[; <what to do>]`.
    let err = fails(&run(
        d,
        &["export", "missing.vmpack", "--format", "raw", "-o", "out"],
    ));
    assert!(
        err.starts_with("vmpack: cannot export: missing.vmpack: No such file or directory"),
        "{err}"
    );
    let err = fails(&run(
        d,
        &["save", "--api-sock", "no.sock", "-o", "x.vmpack"],
    ));
    assert!(
        err.starts_with(
            "vmpack: cannot save: no.sock: cannot connect to the VM's control socket: "
        ) && err
            .trim_end()
            .ends_with("; is a VM running with --api-sock no.sock?"),
        "{err}"
    );
    let err = fails(&run(d, &["verify", "missing.vmpack"]));
    assert!(
        err.starts_with("vmpack: verification failed: missing.vmpack: "),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // A small file that is no pack is "not a vmpack file", like a large one; only a file
    // that starts like a pack can be a truncated one.
    std::fs::write(d.join("small.txt"), b"abc").unwrap();
    std::fs::write(d.join("empty"), b"").unwrap();
    std::fs::write(d.join("cut.vmpack"), b"\x89VMP").unwrap();
    for f in ["small.txt", "empty"] {
        let err = fails(&run(d, &["inspect", f]));
        assert!(
            err.starts_with(&format!(
                "vmpack: cannot inspect: {f}: file offset 0: not a vmpack file"
            )),
            "{err}"
        );
    }
    let err = fails(&run(d, &["inspect", "cut.vmpack"]));
    assert!(err.contains("cut.vmpack: file is truncated"), "{err}");

    // `run` of a file that is neither a pack nor a config says so.
    std::fs::write(d.join("notapack.txt"), b"hello there\n").unwrap();
    let err = fails(&run(d, &["run", "notapack.txt"]));
    assert!(
        err.contains(
            "cannot run notapack.txt: neither a pack (no vmpack magic) nor a VM config (TOML)"
        ),
        "{err}"
    );

    // An output in a missing folder names that folder, never a temporary name.
    let err = fails(&run(
        d,
        &["pack", counter.to_str().unwrap(), "-o", "nodir/x.vmpack"],
    ));
    assert!(
        err.starts_with(
            "vmpack: cannot pack: nodir/x.vmpack: folder nodir does not exist; create it first"
        ),
        "{err}"
    );
    assert!(!err.contains(".tmp"), "{err}");

    // pack's summary: no ratio below 1 for a VM smaller than the pack's own structure.
    let said = ok(&run(
        d,
        &["pack", counter.to_str().unwrap(), "-o", "c.vmpack"],
    ));
    assert!(said.contains("of data in a"), "{said}");
    assert!(!said.contains("(0."), "{said}");

    // vmboot says each cause once.
    for (args, cause) in [
        (vec!["run", "nope.toml"], "No such file or directory"),
        (vec!["restore", "small.txt"], "not a vmpack file"),
    ] {
        let o = Command::new(vmboot())
            .current_dir(d)
            .args(&args)
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.matches(cause).count(), 1, "{args:?}: {err}");
    }
    let help = stdout(
        &Command::new(vmboot())
            .args(["run", "--help"])
            .output()
            .unwrap(),
    );
    assert!(help.contains("<CONFIG>  The VM config (TOML"), "{help}");
}

fn wait_for(path: &Path, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{} never appeared; the process ended: {st}", path.display());
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill() on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn spawn(cwd: &Path, args: &[&str]) -> std::process::Child {
    Command::new(vmpack())
        .current_dir(cwd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn run_restore_and_clones_remove_their_sockets_on_signals() {
    if !kvm_available("run_restore_and_clones_remove_their_sockets_on_signals") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let counter = samples_dir().join("counter64.toml");
    let mut vm = spawn(
        d,
        &[
            "run",
            counter.to_str().unwrap(),
            "--api-sock",
            "run.sock",
            "--serial-out",
            "none",
        ],
    );
    wait_for(&d.join("run.sock"), &mut vm);

    // save --json, and save -o - says where the pack went in words.
    let o = run(
        d,
        &[
            "save",
            "--api-sock",
            "run.sock",
            "-o",
            "saved.vmpack",
            "--json",
        ],
    );
    let j: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(j["output"], "saved.vmpack");
    assert_eq!(j["vm"], "resumed");
    assert_eq!(j["root_digest"].as_str().unwrap().len(), 64, "{j}");
    let o = run(d, &["save", "--api-sock", "run.sock", "-o", "-"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(" to standard output in "),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("to -"), "{}", stderr(&o));

    signal(&vm, libc::SIGTERM);
    let out = vm.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert!(!d.join("run.sock").exists(), "vmpack run left its socket");

    let mut r = spawn(
        d,
        &[
            "restore",
            "saved.vmpack",
            "--api-sock",
            "restore.sock",
            "--serial-out",
            "none",
        ],
    );
    wait_for(&d.join("restore.sock"), &mut r);
    signal(&r, libc::SIGINT);
    let out = r.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("vmpack: restored in "), "{err}");
    assert!(!err.contains("vmboot:"), "{err}");
    assert!(
        !d.join("restore.sock").exists(),
        "vmpack restore left its socket"
    );

    let mut c = spawn(
        d,
        &[
            "restore",
            "saved.vmpack",
            "--clones",
            "2",
            "--api-sock",
            "clone.sock",
            "--serial-out",
            "none",
            "--json",
        ],
    );
    wait_for(&d.join("clone.sock.1"), &mut c);
    wait_for(&d.join("clone.sock.0"), &mut c);
    signal(&c, libc::SIGTERM);
    let out = c.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    let j: serde_json::Value = serde_json::from_str(stdout(&out).lines().next().unwrap()).unwrap();
    assert_eq!(j["clones"], 2);
    assert_eq!(j["sockets"][1], "clone.sock.1");
    for i in 0..2 {
        assert!(
            !d.join(format!("clone.sock.{i}")).exists(),
            "clone {i} left its socket"
        );
    }
}

#[test]
fn verify_json_is_one_document() {
    let t = tempfile::tempdir().unwrap();
    let counter = samples_dir().join("counter.toml");
    ok(&run(
        t.path(),
        &["pack", counter.to_str().unwrap(), "-o", "c.vmpack"],
    ));
    let j: serde_json::Value =
        serde_json::from_str(&ok(&run(t.path(), &["verify", "c.vmpack", "--json"]))).unwrap();
    assert_eq!(j["file"], "c.vmpack");
    assert!(j["chunks"].as_u64().unwrap() > 0, "{j}");
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&run(t.path(), &["inspect", "c.vmpack", "--json"]))).unwrap();
    assert!(
        inspect
            .to_string()
            .contains(j["root_digest"].as_str().unwrap()),
        "{j}\n{inspect}"
    );
    let bytes = std::fs::read(t.path().join("c.vmpack")).unwrap();
    let o = run_with_stdin(t.path(), &["verify", "-", "--json"], &bytes);
    let s: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(s["root_digest"], j["root_digest"]);
    // --json with --quiet is a usage error, not silence.
    assert_eq!(
        run(t.path(), &["verify", "c.vmpack", "--json", "--quiet"])
            .status
            .code(),
        Some(2)
    );
}
