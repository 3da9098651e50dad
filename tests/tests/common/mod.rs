//! Helpers for the end-to-end tests: build and locate the real binaries, run them, make
//! fixtures.
#![allow(dead_code)]

pub mod blk;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

/// Binaries already built by this test process.
static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// `target/<profile>`, found from the test executable (`target/<profile>/deps/x-hash`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// Builds `name` (same profile as the tests) once per test process and returns its path.
/// Binaries of other crates are not built by `cargo test -p vmpack-e2e`, hence this. It
/// builds what `scripts/test-all.sh` builds (`--workspace --all-targets`): `-p NAME` alone
/// would unify features without the dev-dependencies and rebuild rustls and friends.
pub fn bin(name: &str) -> PathBuf {
    let dir = target_dir();
    let path = dir.join(name);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let profile = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug")
            .to_string();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace)
            .args(["build", "--quiet", "--workspace", "--all-targets"]);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let st = cmd.status().expect("running cargo build");
        assert!(st.success(), "cargo build -p {name} failed");
        built.push(name.to_string());
    }
    assert!(path.exists(), "{} missing after build", path.display());
    path
}

pub fn vmpack() -> PathBuf {
    bin("vmpack")
}

/// Runs vmpack with `args` in `cwd`; stdin empty.
pub fn run(cwd: &Path, args: &[&str]) -> Output {
    Command::new(vmpack())
        .current_dir(cwd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running vmpack")
}

/// Runs vmpack with `input` on stdin.
pub fn run_with_stdin(cwd: &Path, args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(vmpack())
        .current_dir(cwd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning vmpack");
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let writer = std::thread::spawn(move || {
        // The child may stop reading early on bad input; a broken pipe is its answer.
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().expect("waiting for vmpack");
    writer.join().unwrap();
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "expected success, got {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// Asserts failure (exit 1, no panic) and returns stderr.
#[track_caller]
pub fn fails(o: &Output) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit 1\nstdout:\n{}\nstderr:\n{err}",
        stdout(o)
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

pub fn have_qemu_img() -> bool {
    let found = Command::new("qemu-img")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("\n*** SKIPPED: qemu-img not found; qcow2 checks not run ***\n");
    }
    found
}

#[track_caller]
pub fn qemu_img(args: &[&str]) -> String {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        o.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A sparse raw image of `size` bytes with `blocks` written at their offsets.
pub fn sparse_raw(path: &Path, size: u64, blocks: &[(u64, Vec<u8>)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (off, data) in blocks {
        f.write_all_at(data, *off).unwrap();
    }
}

pub const FLAT_GUEST: &[u8] = b"\xb0\x2a\xe6\xf4\xf4\xeb\xfe";

/// A folder with a flat guest, a sparse raw disk and (if qemu-img exists) a qcow2 disk,
/// plus `vm.toml` naming them. Returns whether the qcow2 disk is present.
pub fn flat_vm(dir: &Path, with_qcow2: bool) -> bool {
    std::fs::create_dir_all(dir.join("guests")).unwrap();
    std::fs::write(dir.join("guests/counter.bin"), FLAT_GUEST).unwrap();
    let mut marker = b"RAW-DISK-MARKER:".to_vec();
    marker.extend(noise(200_000, 1));
    sparse_raw(
        &dir.join("data.img"),
        64 << 20,
        &[
            (1 << 20, marker),
            (40 << 20, noise(3 << 20, 2)),
            ((64 << 20) - 4096, vec![0x55; 4096]),
        ],
    );
    let mut cfg = String::from(
        "name = \"counter\"\nmemory_mib = 16\n\n[flat]\nimage = \"guests/counter.bin\"\n\
         load_address = 0x1000\nentry = 0x1000\nmode = \"real\"\n\n\
         [[disk]]\npath = \"data.img\"\n",
    );
    let qcow2 = with_qcow2 && have_qemu_img();
    if qcow2 {
        let src = dir.join("qsrc.raw");
        let mut text = Vec::new();
        for i in 0..20000 {
            text.extend_from_slice(format!("line {i} of the qcow2 disk\n").as_bytes());
        }
        sparse_raw(&src, 32 << 20, &[(0, text), (20 << 20, noise(1 << 20, 3))]);
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            dir.join("root.qcow2").to_str().unwrap(),
        ]);
        cfg.push_str("\n[[disk]]\npath = \"root.qcow2\"\nformat = \"qcow2\"\nread_only = true\n");
    }
    std::fs::write(dir.join("vm.toml"), cfg).unwrap();
    qcow2
}

#[track_caller]
pub fn same_file(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
    let y = std::fs::read(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}

/// True when /dev/kvm opens for read and write. Otherwise says SKIPPED loudly (naming what
/// did not run), so a machine without KVM never passes the KVM tests silently.
pub fn kvm_available(what: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("\n*** SKIPPED: /dev/kvm cannot be opened; {what} did not run ***\n");
    }
    ok
}

/// The workspace's `samples/` folder.
pub fn samples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .join("samples")
}

/// Builds the Rust guests once per test process (`samples/guests/rs/build.sh`) and returns
/// the flat image `samples/guests/bin/<name>.bin`.
pub fn rs_guest(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let samples = samples_dir();
    BUILT.get_or_init(|| {
        let o = Command::new("bash")
            .arg(samples.join("guests/rs/build.sh"))
            .output()
            .expect("running samples/guests/rs/build.sh");
        assert!(
            o.status.success(),
            "building the Rust guest failed (scripts/test-all.sh installs the \
             x86_64-unknown-none target):\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    });
    samples.join("guests/bin").join(format!("{name}.bin"))
}

/// Rewrites a pack section by section: `edit` gets each section's name and bytes and
/// returns the new bytes, or `None` to leave the section out. The result is an intact
/// container (fresh digests), so only the VM layer's own checks can refuse it.
pub fn rewrite_pack(src: &Path, dst: &Path, edit: impl Fn(&str, Vec<u8>) -> Option<Vec<u8>>) {
    use vmpack_formats::pack::{Compression, PackReader, PackWriter, WriteOptions};
    let r = PackReader::open(src).unwrap();
    let out = std::fs::File::create(dst).unwrap();
    let mut w = PackWriter::new(
        out,
        WriteOptions {
            aligned: r.aligned(),
            compression: Compression::None,
            ..Default::default()
        },
    )
    .unwrap();
    for s in r.sections() {
        let Some(bytes) = edit(&s.name, r.read_section(s.id, 1 << 30).unwrap()) else {
            continue;
        };
        w.add_section_with(
            s.kind,
            &s.name,
            s.meta.clone(),
            &bytes,
            s.chunk_size,
            Compression::None,
            &(),
        )
        .unwrap();
    }
    w.finish().unwrap();
}

/// [`rewrite_pack`] for the usual case: edit the manifest and the vmstate as JSON.
pub fn rewrite_pack_json(
    src: &Path,
    dst: &Path,
    manifest: impl Fn(&mut serde_json::Value),
    vmstate: impl Fn(&mut serde_json::Value),
) {
    rewrite_pack(src, dst, |name, data| {
        let edit: &dyn Fn(&mut serde_json::Value) = match name {
            "manifest" => &manifest,
            "vmstate" => &vmstate,
            _ => return Some(data),
        };
        let mut v: serde_json::Value = serde_json::from_slice(&data).unwrap();
        edit(&mut v);
        Some(serde_json::to_vec(&v).unwrap())
    });
}

/// One HTTP request over a control socket; returns status and body.
pub fn http(sock: &Path, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer);
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}
