//! Snapshot-based testing through the real binaries: `vmpack test` runs cases in fresh
//! clones of a saved kvstore guest, `vmpack restore --clones` runs copies side by side.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn serial_output(sock: &Path) -> String {
    let (st, body) = http(sock, "GET", "/vm/serial/output?since=0", b"");
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["output"].as_str().unwrap().to_string()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boots the kvstore sample, sets a=1, b=2, greeting="hello world" through the control
/// socket and saves it with `--then stop`.
fn make_pack(dir: &Path, name: &str, compress: &str) -> PathBuf {
    let sock = dir.join(format!("{name}.sock"));
    let mut vm = Command::new(bin("vmboot"))
        .args(["run", "--serial-out", "none", "--api-sock"])
        .arg(&sock)
        .arg(workspace().join("samples/kvstore.toml"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the control socket", Duration::from_secs(20), || {
        sock.exists() && UnixStream::connect(&sock).is_ok()
    });
    wait_for("the prompt", Duration::from_secs(20), || {
        serial_output(&sock).ends_with("> ")
    });
    for cmd in ["set a 1\n", "set b 2\n", "set greeting hello world\n"] {
        let (st, body) = http(&sock, "PUT", "/vm/serial/input", cmd.as_bytes());
        assert_eq!(st, 204, "{body}");
    }
    wait_for("three answers", Duration::from_secs(20), || {
        serial_output(&sock).matches("ok\n> ").count() == 3
    });
    let pack = dir.join(format!("{name}.vmpack"));
    ok(&run(
        dir,
        &[
            "save",
            "--api-sock",
            sock.to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
            "--compress",
            compress,
            "--then",
            "stop",
            "-q",
        ],
    ));
    assert!(vm.wait().unwrap().success());
    pack
}

fn sha256(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

/// vmpack with TMPDIR and the cache pointed into `dir`, so leftovers can be seen.
fn vmpack_in(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(vmpack())
        .current_dir(dir)
        .env("TMPDIR", dir.join("tmp"))
        .env("VMPACK_CACHE_DIR", dir.join("cache"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn assert_empty(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        left.is_empty(),
        "left behind in {}: {left:?}",
        dir.display()
    );
}

#[test]
fn cases_are_isolated_and_failures_show_output() {
    if !common::kvm_available("snapshot testing") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    std::fs::create_dir(dir.join("tmp")).unwrap();
    let pack = make_pack(dir, "kv", "none");
    let before = sha256(&pack);

    // Five cases each add their own key: each sees the saved keys plus only its own.
    let mut cases = String::from("timeout_ms = 10000\n");
    for i in 0..5 {
        let other = (i + 1) % 5;
        cases.push_str(&format!(
            "[[case]]\nname = \"own key {i}\"\nsteps = [\n\
             {{ send = \"set k{i} v{i}\\n\", expect = \"^ok\\n> \" }},\n\
             {{ send = \"count\\n\", expect = \"^4\\n> \" }},\n\
             {{ send = \"get k{other}\\n\", expect = \"^missing\\n> \" }},\n\
             {{ send = \"get k{i}\\n\", expect = \"^v{i}\\n> \" }},\n\
             {{ send = \"get greeting\\n\", expect = \"^hello world\\n> \" }},\n]\n"
        ));
    }
    std::fs::write(dir.join("cases.toml"), &cases).unwrap();
    // Fresh clones, one per case; then two clones reset between cases (--reuse): each
    // clone runs cases after another one's, and still sees only the saved keys.
    for mode in [&["-j", "5"][..], &["-j", "2", "--reuse"][..]] {
        let mut args = vec!["test", "kv.vmpack", "cases.toml", "--junit", "ok.xml"];
        args.extend(mode);
        let o = vmpack_in(dir, &args);
        let out = ok(&o);
        assert!(out.contains("5 passed, 0 failed"), "{mode:?}: {out}");
        if mode.contains(&"--reuse") {
            assert!(out.contains(", 2 clones reset between cases)"), "{out}");
        }
        let xml = std::fs::read_to_string(dir.join("ok.xml")).unwrap();
        assert!(xml.contains("tests=\"5\" failures=\"0\""), "{xml}");
    }
    // One clone for all, with a case that ends its VM ("quit"): the next case gets a fresh
    // clone and still passes.
    let mut quit = cases.clone();
    quit.push_str("[[case]]\nname = \"quit\"\nsend = \"quit\\n\"\nexpect = \"bye\"\n");
    quit.push_str("[[case]]\nname = \"after quit\"\nsend = \"count\\n\"\nexpect = \"^3\\n> \"\n");
    std::fs::write(dir.join("quit.toml"), &quit).unwrap();
    let o = vmpack_in(
        dir,
        &["test", "kv.vmpack", "quit.toml", "--reuse", "--json"],
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(
        (v["passed"].as_u64(), v["failed"].as_u64()),
        (Some(7), Some(0)),
        "{v}"
    );
    // The one clone, and a fresh one after "quit" if the guest ended before the next
    // reset could stop it.
    let clones = v["clones"].as_u64().unwrap();
    assert!(clones == 1 || clones == 2, "{v}");

    // The shipped sample cases pass too.
    let sample = workspace().join("samples/kvstore-cases.toml");
    let o = vmpack_in(
        dir,
        &["test", "kv.vmpack", sample.to_str().unwrap(), "-j", "3"],
    );
    ok(&o);

    // A wrong expectation fails the run, names the case and shows its serial output.
    std::fs::write(
        dir.join("bad.toml"),
        "[[case]]\nname = \"right\"\nsend = \"get b\\n\"\nexpect = \"^2\\n> \"\n\n\
         [[case]]\nname = \"wrong count\"\nsend = \"count\\n\"\nexpect = \"^999\\n\"\ntimeout_ms = 1500\n",
    )
    .unwrap();
    let o = vmpack_in(
        dir,
        &[
            "test",
            "kv.vmpack",
            "bad.toml",
            "-j",
            "2",
            "--junit",
            "bad.xml",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("1 passed, 1 failed"), "{out}");
    assert!(out.contains("wrong count failed"), "{out}");
    assert!(
        out.contains("timed out waiting for output matching /^999\n/"),
        "{out}"
    );
    assert!(
        out.contains("  | 3\n"),
        "the failing case's output is shown: {out}"
    );
    let xml = std::fs::read_to_string(dir.join("bad.xml")).unwrap();
    assert!(xml.contains("<failure message="), "{xml}");

    // The same run for scripts: one JSON document with the fields docs/CLI.md lists.
    let o = vmpack_in(dir, &["test", "kv.vmpack", "bad.toml", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("one JSON document");
    assert_eq!(v["passed"], 1, "{v}");
    assert_eq!(v["failed"], 1, "{v}");
    assert!(v["seconds"].is_number(), "{v}");
    let cases = v["cases"].as_array().expect("cases");
    let wrong = cases
        .iter()
        .find(|c| c["name"] == "wrong count")
        .expect("the failing case is listed");
    assert_eq!(wrong["passed"], false, "{v}");
    assert!(wrong["ms"].is_number(), "{v}");
    assert!(
        wrong["message"].as_str().unwrap().contains("/^999\n/"),
        "{v}"
    );
    assert!(wrong["output"].as_str().unwrap().contains("3\n"), "{v}");
    let right = cases.iter().find(|c| c["name"] == "right").unwrap();
    assert_eq!(right["passed"], true, "{v}");

    // A bad pattern is refused before anything runs.
    std::fs::write(
        dir.join("badre.toml"),
        "[[case]]\nname = \"x\"\nexpect = \"(unclosed\"\n",
    )
    .unwrap();
    let err = fails(&vmpack_in(dir, &["test", "kv.vmpack", "badre.toml"]));
    assert!(err.contains("bad expect pattern"), "{err}");

    assert_eq!(sha256(&pack), before, "the pack changed");
    assert_empty(&dir.join("tmp"));
}

#[test]
fn fifty_clones_of_a_compressed_pack() {
    if !common::kvm_available("snapshot testing") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    std::fs::create_dir(dir.join("tmp")).unwrap();
    let pack = make_pack(dir, "kvz", "zstd");
    let before = sha256(&pack);
    let mut cases = String::from("timeout_ms = 60000\n");
    for i in 0..50 {
        cases.push_str(&format!(
            "[[case]]\nname = \"clone {i}\"\nsteps = [\n\
             {{ send = \"set n{i} {i}\\n\", expect = \"^ok\\n> \" }},\n\
             {{ send = \"count\\n\", expect = \"^4\\n> \" }},\n\
             {{ send = \"get a\\n\", expect = \"^1\\n> \" }},\n]\n"
        ));
    }
    std::fs::write(dir.join("cases.toml"), &cases).unwrap();
    let o = vmpack_in(dir, &["test", "kvz.vmpack", "cases.toml", "-j", "50"]);
    let out = ok(&o);
    assert!(out.contains("50 passed, 0 failed"), "{out}");
    assert!(
        stderr(&o).contains("expanded the compressed pack"),
        "{}",
        stderr(&o)
    );
    // The expanded copy is kept under its root digest, with no temporary files.
    let cached: Vec<_> = std::fs::read_dir(dir.join("cache/expanded"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(cached[0].ends_with(".vmpack") && !cached[0].starts_with('.'));
    // A second run reuses it.
    let o = vmpack_in(dir, &["test", "kvz.vmpack", "cases.toml", "-j", "50"]);
    ok(&o);
    assert!(
        stderr(&o).contains("using the expanded copy"),
        "{}",
        stderr(&o)
    );
    // Three clones reset between the cases: each case still sees only the saved keys.
    let o = vmpack_in(
        dir,
        &["test", "kvz.vmpack", "cases.toml", "-j", "3", "--reuse"],
    );
    let out = ok(&o);
    assert!(out.contains("50 passed, 0 failed"), "{out}");
    assert!(out.contains(", 3 clones reset between cases)"), "{out}");

    assert_eq!(sha256(&pack), before, "the pack changed");
    assert_empty(&dir.join("tmp"));
}

#[test]
fn restore_clones_each_with_a_socket() {
    if !common::kvm_available("snapshot testing") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    std::fs::create_dir(dir.join("tmp")).unwrap();
    let pack = make_pack(dir, "kv", "none");
    let before = sha256(&pack);
    let sock = dir.join("c.sock");
    let child = Command::new(vmpack())
        .current_dir(dir)
        .env("TMPDIR", dir.join("tmp"))
        .env("VMPACK_CACHE_DIR", dir.join("cache"))
        .args(["restore", "kv.vmpack", "--clones", "3", "-q", "--api-sock"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let socks: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("c.sock.{i}"))).collect();
    for s in &socks {
        wait_for("a clone's socket", Duration::from_secs(20), || {
            UnixStream::connect(s).is_ok()
        });
    }
    for (i, s) in socks.iter().enumerate() {
        let (st, _) = http(
            s,
            "PUT",
            "/vm/serial/input",
            format!("set c {i}\n").as_bytes(),
        );
        assert_eq!(st, 204);
    }
    for (i, s) in socks.iter().enumerate() {
        http(s, "PUT", "/vm/serial/input", b"get c\n");
        wait_for("an answer", Duration::from_secs(20), || {
            serial_output(s) == format!("ok\n> {i}\n> ")
        });
    }
    for s in &socks {
        assert_eq!(http(s, "PUT", "/vm/shutdown", b"").0, 204);
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for i in 0..3 {
        // Lines of different clones interleave; each clone's own lines keep their order.
        let mine: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with(&format!("[{i}] ")))
            .collect();
        let want = [
            format!("[{i}] ok"),
            format!("[{i}] > {i}"),
            format!("[{i}] > "),
        ];
        assert_eq!(mine, want, "{out}");
    }
    assert_eq!(sha256(&pack), before);
    assert_empty(&dir.join("tmp"));
}
