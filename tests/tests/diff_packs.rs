//! Diff packs through the real binaries: `vmpack save --diff-from`, a chain of diffs
//! restored exactly, `flatten`, `verify` and `inspect` of the chain, and a missing or
//! different parent refused by name; disks stored as the chunks written since the parent.

mod common;

use common::{bin, vmpack};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Running {
    child: Child,
    sock: PathBuf,
    serial: PathBuf,
}

impl Running {
    fn spawn(dir: &Path, args: &[&str], tag: &str) -> Running {
        let _ = vmpack();
        let sock = dir.join(format!("{tag}.sock"));
        let serial = dir.join(format!("{tag}.serial"));
        let child = Command::new(bin("vmboot"))
            .args(args)
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
            assert!(t.elapsed() < Duration::from_secs(20), "no API socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Running {
            child,
            sock,
            serial,
        }
    }

    fn start(dir: &Path, config: &str, tag: &str) -> Running {
        let cfg = common::samples_dir().join(config);
        Running::spawn(dir, &["run", cfg.to_str().unwrap()], tag)
    }

    fn restore(dir: &Path, pack: &Path, tag: &str) -> Running {
        Running::spawn(dir, &["restore", pack.to_str().unwrap()], tag)
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

    /// `vmpack save`, optionally `--diff-from PARENT`; returns the command's output.
    fn save(&self, pack: &Path, diff_from: Option<&Path>, then: &str) -> Output {
        let mut c = Command::new(vmpack());
        c.args(["save", "--api-sock"])
            .arg(&self.sock)
            .arg("-o")
            .arg(pack)
            .args(["--then", then]);
        if let Some(p) = diff_from {
            c.arg("--diff-from").arg(p);
        }
        c.output().expect("running vmpack save")
    }

    fn save_ok(&self, pack: &Path, diff_from: Option<&Path>, then: &str) {
        let o = self.save(pack, diff_from, then);
        assert!(
            o.status.success(),
            "vmpack save failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn finish(mut self) -> (i32, String) {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                return (st.code().unwrap_or(-1), err);
            }
            if t.elapsed() > Duration::from_secs(180) {
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
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

fn root_digest(p: &Path) -> String {
    hex::encode(
        vmpack_formats::pack::PackReader::open(p)
            .unwrap()
            .root_digest(),
    )
}

/// `vmpack restore PACK [args]` to the end, serial output into `serial`: (status, stderr).
fn restore_to_end(pack: &Path, serial: &Path, args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(vmpack())
        .arg("restore")
        .arg(pack)
        .arg("--serial-out")
        .arg(serial)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn depth_3_chain_restores_exactly_flattens_and_refuses_a_wrong_parent() {
    if !common::kvm_available("diff pack tests") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = |n: &str| dir.join(n);
    let a = Running::start(dir, "counter64.toml", "a");
    a.wait_for("\n10\n");
    a.save_ok(&p("base.vmpack"), None, "resume");
    a.wait_for("\n20\n");
    a.save_ok(&p("d1.vmpack"), Some(&p("base.vmpack")), "resume");
    a.wait_for("\n30\n");
    a.save_ok(&p("d2.vmpack"), Some(&p("d1.vmpack")), "resume");
    a.wait_for("\n40\n");
    a.save_ok(&p("d3.vmpack"), Some(&p("d2.vmpack")), "stop");
    let (code, err) = a.finish();
    assert_eq!(code, 0, "original vmboot after --then stop: {err}");
    let before = std::fs::read_to_string(p("a.serial")).unwrap();
    let digests: Vec<String> = ["base", "d1", "d2", "d3"]
        .iter()
        .map(|n| sha256_file(&p(&format!("{n}.vmpack"))))
        .collect();

    // The child names its parent by file name and root digest.
    let m = vmpack_formats::vm::VmPack::open(&p("d3.vmpack")).unwrap();
    let parent = m.manifest().parent.clone().expect("d3 is a diff pack");
    assert_eq!(parent.file, "d2.vmpack");
    assert_eq!(parent.root_digest, root_digest(&p("d2.vmpack")));

    // Restoring the newest diff layers all four packs and continues the count exactly.
    let (code, err) = restore_to_end(&p("d3.vmpack"), &p("b.serial"), &[]);
    assert_eq!(code, Some(0), "restore of the depth-3 chain: {err}");
    assert!(err.contains("layered over the parent packs"), "{err}");
    let after = std::fs::read_to_string(p("b.serial")).unwrap();
    assert!(!after.is_empty());
    assert_eq!(
        format!("{before}{after}"),
        counter_text(300),
        "output before the save + after the restore of the chain must be one uninterrupted count"
    );
    // Served on first touch, each chunk from the newest pack holding it, verified: the same.
    let (code, err) = restore_to_end(&p("d3.vmpack"), &p("l.serial"), &["--memory", "lazy"]);
    assert_eq!(code, Some(0), "lazy restore of the depth-3 chain: {err}");
    assert!(
        err.contains("memory: lazy, layered over the parent packs"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(p("l.serial")).unwrap(), after);
    for (n, d) in ["base", "d1", "d2", "d3"].iter().zip(&digests) {
        assert_eq!(
            &sha256_file(&p(&format!("{n}.vmpack"))),
            d,
            "restore must not modify {n}"
        );
    }

    // verify checks the whole chain; inspect shows it.
    let o = common::run(dir, &["verify", "d3.vmpack", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&common::ok(&o)).unwrap();
    let parents: Vec<&str> = v["parents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["file"].as_str().unwrap())
        .collect();
    assert_eq!(parents.len(), 3, "{v}");
    assert!(parents[0].ends_with("base.vmpack") && parents[2].ends_with("d2.vmpack"));
    let o = common::run(dir, &["inspect", "d3.vmpack"]);
    let text = common::ok(&o);
    assert!(
        text.contains("diff of:      d2.vmpack")
            && text.contains("base.vmpack <- ")
            && text.contains("(4 packs"),
        "{text}"
    );

    // flatten makes one full pack that restores identically.
    let o = common::run(dir, &["flatten", "d3.vmpack", "-o", "full.vmpack"]);
    common::ok(&o);
    let full = vmpack_formats::vm::VmPack::open(&p("full.vmpack")).unwrap();
    assert!(full.manifest().parent.is_none());
    let (code, err) = restore_to_end(&p("full.vmpack"), &p("c.serial"), &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(std::fs::read_to_string(p("c.serial")).unwrap(), after);

    // The counter writes the same few pages all the time: its diffs hold them again, no more.
    let size = |n: &str| std::fs::metadata(p(n)).unwrap().len();
    assert!(
        size("d3.vmpack") <= size("base.vmpack"),
        "diff {} bytes, full {} bytes",
        size("d3.vmpack"),
        size("base.vmpack")
    );

    // A missing parent is refused, naming the file and the digest it must have.
    std::fs::rename(p("d2.vmpack"), p("d2.moved")).unwrap();
    let (code, err) = restore_to_end(&p("d3.vmpack"), &p("x.serial"), &[]);
    assert_eq!(code, Some(1), "{err}");
    let d2_path = p("d2.vmpack").display().to_string();
    assert!(
        err.contains(&format!("its parent pack {d2_path} is missing"))
            && err.contains(&parent.root_digest),
        "{err}"
    );
    // A different file under the parent's name is refused with both digests.
    std::fs::copy(p("d1.vmpack"), p("d2.vmpack")).unwrap();
    let (code, err) = restore_to_end(&p("d3.vmpack"), &p("x.serial"), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "parent pack {d2_path} is not the one it was saved against: root digest {}, expected {}",
            root_digest(&p("d1.vmpack")),
            parent.root_digest
        )),
        "{err}"
    );
    let o = common::run(dir, &["verify", "d3.vmpack"]);
    assert!(common::fails(&o).contains("is not the one it was saved against"));
    assert!(
        !std::fs::read_to_string(p("x.serial"))
            .unwrap_or_default()
            .contains('1'),
        "no guest ran"
    );
    // --parent names the right file wherever it is.
    let o = common::run(dir, &["verify", "d3.vmpack", "--parent", "d2.moved"]);
    common::ok(&o);
}

#[test]
fn diff_of_a_restored_vm_is_small_and_its_memory_exact() {
    if !common::kvm_available("diff pack tests") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = |n: &str| dir.join(n);
    // memtest fills 30 MiB, prints "filled", waits ~3 s, then checks every page.
    let a = Running::start(dir, "memtest.toml", "a");
    a.wait_for("filled");
    a.save_ok(&p("base.vmpack"), None, "stop");
    assert_eq!(a.finish().0, 0);

    // A VM restored from base knows it (and each pack it saves since): diffs against them.
    let b = Running::restore(dir, &p("base.vmpack"), "b");
    let o = b.save(&p("bad.vmpack"), Some(&p("a.serial")), "resume");
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("a.serial"),
        "a parent that is not a pack is refused naming it"
    );
    b.save_ok(&p("d1.vmpack"), Some(&p("base.vmpack")), "resume");
    b.save_ok(&p("x.vmpack"), Some(&p("d1.vmpack")), "stop");
    assert_eq!(b.finish().0, 0);

    let c = Running::start(dir, "counter64.toml", "c");
    c.wait_for("\n2\n");
    c.save_ok(&p("other.vmpack"), None, "resume");
    let o = b_like_refusal(&c.sock, &p("y.vmpack"), &p("base.vmpack"));
    assert!(
        o.contains("neither restored from nor saved to the pack with root digest")
            && o.contains(&root_digest(&p("base.vmpack"))),
        "{o}"
    );
    assert!(!p("y.vmpack").exists());
    let _ = common::http(&c.sock, "PUT", "/vm/shutdown", b"");
    c.finish();

    let size = |n: &str| std::fs::metadata(p(n)).unwrap().len();
    assert!(
        size("x.vmpack") * 20 < size("base.vmpack"),
        "a diff of a guest that wrote little is small: {} vs {}",
        size("x.vmpack"),
        size("base.vmpack")
    );
    // The guest checks all 30 MiB it wrote before base: layered memory is exact.
    let (code, err) = restore_to_end(&p("x.vmpack"), &p("d.serial"), &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(std::fs::read_to_string(p("d.serial"))
        .unwrap()
        .contains("memtest: 7680 pages ok"));
    // From a pipe the parent is named with --parent; without it the pack is refused.
    let o = common::run_with_stdin(
        dir,
        &["restore", "-"],
        &std::fs::read(p("x.vmpack")).unwrap(),
    );
    assert!(
        common::fails(&o).contains("read from a pipe needs its parent: name it with --parent FILE"),
        "{}",
        common::stderr(&o)
    );
}

/// `save --diff-from P -o - | restore - --parent P`: the chain's memory from the parent
/// files, the child's chunks over it as they stream past.
#[test]
fn a_depth_2_chain_restores_from_a_pipe_with_its_parent_named() {
    if !common::kvm_available("diff pack tests") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = |n: &str| dir.join(n);
    let a = Running::start(dir, "counter64.toml", "a");
    a.wait_for("\n10\n");
    a.save_ok(&p("base.vmpack"), None, "resume");
    a.wait_for("\n20\n");
    a.save_ok(&p("d1.vmpack"), Some(&p("base.vmpack")), "resume");
    a.wait_for("\n30\n");
    // The child itself goes through a pipe: `save -o -` into `restore -`.
    let o = Command::new(vmpack())
        .args(["save", "--api-sock"])
        .arg(&a.sock)
        .args(["-o", "-", "--then", "stop", "--diff-from"])
        .arg(p("d1.vmpack"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let child = o.stdout;
    let (code, err) = a.finish();
    assert_eq!(code, 0, "{err}");
    let before = std::fs::read_to_string(p("a.serial")).unwrap();
    std::fs::write(p("d2.vmpack"), &child).unwrap();
    let d1_root = root_digest(&p("d1.vmpack"));

    // The parent is elsewhere: its own parent is found next to it.
    std::fs::create_dir(p("far")).unwrap();
    std::fs::rename(p("d1.vmpack"), p("far/d1.vmpack")).unwrap();
    std::fs::rename(p("base.vmpack"), p("far/base.vmpack")).unwrap();
    let serial = p("b.serial");
    let o = common::run_with_stdin(
        dir,
        &[
            "restore",
            "-",
            "--parent",
            "far/d1.vmpack",
            "--serial-out",
            serial.to_str().unwrap(),
        ],
        &child,
    );
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains("memory: stream, layered over the parent packs"),
        "{}",
        common::stderr(&o)
    );
    let after = std::fs::read_to_string(&serial).unwrap();
    assert!(!after.is_empty());
    assert_eq!(
        format!("{before}{after}"),
        counter_text(300),
        "the piped child over its parents continues the count exactly"
    );
    // vmboot reads the same pipe the same way.
    let mut c = Command::new(bin("vmboot"))
        .current_dir(dir)
        .args([
            "restore",
            "-",
            "--parent",
            "far/d1.vmpack",
            "--serial-out",
            "v.serial",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = c.stdin.take().unwrap();
        stdin.write_all(&child).unwrap();
    }
    let o = c.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read_to_string(p("v.serial")).unwrap(), after);

    // Without --parent, or with a parent of another root digest: refused by name, no VM.
    let x = p("x.serial");
    let args = |parent: Option<&str>| {
        let mut v = vec!["restore", "-", "--serial-out", x.to_str().unwrap()];
        if let Some(f) = parent {
            v.extend(["--parent", f]);
        }
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |parent: Option<&str>| {
        let a = args(parent);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        common::run_with_stdin(dir, &a, &child)
    };
    let err = common::fails(&run(None));
    assert!(
        err.contains("a diff pack (memory layered on d1.vmpack, root digest ")
            && err.contains(&d1_root)
            && err.contains("read from a pipe needs its parent: name it with --parent FILE"),
        "{err}"
    );
    let err = common::fails(&run(Some("far/base.vmpack")));
    assert!(
        err.contains(&format!(
            "parent pack far/base.vmpack is not the one it was saved against: root digest {}, expected {d1_root}",
            root_digest(&p("far/base.vmpack"))
        )),
        "{err}"
    );
    let err = common::fails(&run(Some("nothere.vmpack")));
    assert!(
        err.contains("its parent pack nothere.vmpack is missing") && err.contains(&d1_root),
        "{err}"
    );
    assert!(
        !std::fs::read_to_string(&x)
            .unwrap_or_default()
            .contains('1'),
        "no guest ran"
    );
    // An ordinary pack through a pipe is unchanged by --parent's absence.
    let o = common::run_with_stdin(
        dir,
        &["restore", "-", "--serial-out", "f.serial"],
        &std::fs::read(p("far/base.vmpack")).unwrap(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    let full = std::fs::read_to_string(p("f.serial")).unwrap();
    assert!(
        full.ends_with("\n300\n") && counter_text(300).ends_with(&full),
        "{full}"
    );
}

/// `vmpack save --diff-from PARENT` expected to fail; returns its stderr.
fn b_like_refusal(sock: &Path, out: &Path, parent: &Path) -> String {
    let o = Command::new(vmpack())
        .args(["save", "--api-sock"])
        .arg(sock)
        .arg("-o")
        .arg(out)
        .arg("--diff-from")
        .arg(parent)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    String::from_utf8_lossy(&o.stderr).into()
}

/// The bytes of section `name` of the pack at `p`.
fn section_bytes(p: &Path, name: &str) -> Vec<u8> {
    let r = vmpack_formats::pack::PackReader::open(p).unwrap();
    let s = r.section(name).unwrap();
    r.read_section(s.id, 1 << 30).unwrap()
}

/// `(stored, of)` chunks of the disk diff section `disk/0`, from `vmpack inspect --json`.
fn disk_diff_chunks(dir: &Path, pack: &str) -> (u64, u64) {
    let o = common::run(dir, &["inspect", pack, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&common::ok(&o)).unwrap();
    let s = v["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "disk/0")
        .unwrap_or_else(|| panic!("{pack} has no disk/0: {v}"));
    assert_eq!(s["kind_name"], "disk-diff", "{pack}: {s}");
    (
        s["diff_chunks"]["stored"].as_u64().unwrap(),
        s["diff_chunks"]["of"].as_u64().unwrap(),
    )
}

/// The rounds the diskloop guest reported, in order, and whether every line is "R ok".
fn rounds(out: &str) -> Vec<u64> {
    out.lines()
        .filter(|l| !l.starts_with("sum="))
        .map(|l| {
            l.strip_suffix(" ok")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unexpected guest line {l:?}"))
        })
        .collect()
}

#[test]
fn disk_diffs_store_only_written_chunks_and_a_depth_3_chain_restores_the_disk_exactly() {
    if !common::kvm_available("diff pack tests") {
        return;
    }
    const DISK: u64 = 64 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = |n: &str| dir.join(n);
    // diskloop rewrites 64 slots 64 KiB apart (the disk's first 4 MiB, zeroed at first),
    // checking each slot holds what it last wrote there; the rest of the disk holds data
    // the guest never writes.
    common::sparse_raw(
        &p("disk.img"),
        DISK,
        &[(4 << 20, common::noise((DISK - (4 << 20)) as usize, 9))],
    );
    let image = common::samples_dir().join("guests/bin/diskloop.bin");
    std::fs::write(
        p("vm.toml"),
        format!(
            "name = \"diskloop\"\nmemory_mib = 16\n\n[flat]\nimage = \"{}\"\n\
             load_address = 0x100000\nentry = 0x100000\nmode = \"long\"\n\n\
             [[disk]]\npath = \"disk.img\"\nformat = \"raw\"\n",
            image.display()
        ),
    )
    .unwrap();
    let a = Running::spawn(dir, &["run", p("vm.toml").to_str().unwrap()], "a");
    a.wait_for("\n250 ok\n");
    a.save_ok(&p("base.vmpack"), None, "resume");
    a.wait_for("\n500 ok\n");
    a.save_ok(&p("d1.vmpack"), Some(&p("base.vmpack")), "resume");
    a.wait_for("\n750 ok\n");
    a.save_ok(&p("d2.vmpack"), Some(&p("d1.vmpack")), "resume");
    a.wait_for("\n1000 ok\n");
    // The deepest child and a full pack of the same paused instant.
    let mut a = a;
    if let Some(st) = a.child.try_wait().unwrap() {
        let mut err = String::new();
        use std::io::Read;
        let _ = a.child.stderr.take().unwrap().read_to_string(&mut err);
        panic!("vmboot ended early ({st}): {err}\nserial:\n{}", a.output());
    }
    let (code, _) = common::http(&a.sock, "PUT", "/vm/pause", b"");
    assert_eq!(code, 204);
    a.save_ok(&p("d3.vmpack"), Some(&p("d2.vmpack")), "resume");
    a.save_ok(&p("full3.vmpack"), None, "stop");
    let (code, err) = a.finish();
    assert_eq!(code, 0, "original vmboot after --then stop: {err}");
    let before = a_output(&p("a.serial"));

    // Each child stores of its disk only the chunks holding the slots (the first 4 of 64
    // 1 MiB chunks), and is far smaller than the base with its 60 MiB of data.
    let size = |n: &str| std::fs::metadata(p(n)).unwrap().len();
    for n in ["d1.vmpack", "d2.vmpack", "d3.vmpack"] {
        let (stored, of) = disk_diff_chunks(dir, n);
        assert_eq!(of, 64, "{n}");
        assert!(
            (1..=4).contains(&stored),
            "{n}: {stored} disk chunks stored"
        );
        assert!(
            size(n) * 8 < size("base.vmpack"),
            "{n}: {} bytes, base {} bytes",
            size(n),
            size("base.vmpack")
        );
        let o = common::run(dir, &["inspect", n]);
        assert!(
            common::ok(&o).contains(&format!("changed since the parent: {stored} of 64 chunks")),
            "{n}"
        );
    }
    assert_eq!(
        section_bytes(&p("full3.vmpack"), "disk/0").len() as u64,
        DISK,
        "a full pack stores its disk whole"
    );

    // The guest-visible disk of the chain, flattened, is the full pack's of the same instant.
    common::ok(&common::run(
        dir,
        &["flatten", "d3.vmpack", "-o", "flat3.vmpack"],
    ));
    let flat = section_bytes(&p("flat3.vmpack"), "disk/0");
    assert!(
        flat == section_bytes(&p("full3.vmpack"), "disk/0"),
        "the flattened chain's disk differs from a full save's"
    );
    assert!(flat == std::fs::read(p("disk.img")).unwrap());
    common::ok(&common::run(dir, &["verify", "d3.vmpack"]));

    // Restored (eagerly, then lazily), the guest checks every slot it rewrites, continues
    // the rounds exactly and ends with the same slots.
    let mut ends = Vec::new();
    for (tag, args) in [("e", &[][..]), ("l", &["--memory", "lazy"][..])] {
        let serial = p(&format!("{tag}.serial"));
        let (code, err) = restore_to_end(&p("d3.vmpack"), &serial, args);
        assert_eq!(code, Some(0), "restore {args:?} of the chain: {err}");
        let after = std::fs::read_to_string(&serial).unwrap();
        // Joined first: the pause may fall inside a line.
        let all = rounds(&format!("{before}{after}"));
        assert_eq!(all, (1..=3000).collect::<Vec<u64>>(), "{args:?}");
        ends.push(after);
    }
    // From a pipe, the parent named: the disk starts as the parents' and the child's
    // chunks land over it as they stream past.
    let o = common::run_with_stdin(
        dir,
        &[
            "restore",
            "-",
            "--parent",
            "d2.vmpack",
            "--serial-out",
            p("s.serial").to_str().unwrap(),
        ],
        &std::fs::read(p("d3.vmpack")).unwrap(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    let after = std::fs::read_to_string(p("s.serial")).unwrap();
    let all = rounds(&format!("{before}{after}"));
    assert_eq!(all, (1..=3000).collect::<Vec<u64>>(), "from a pipe");
    ends.push(after);
    let ends: Vec<String> = ends;
    assert!(ends[0].lines().last().unwrap().starts_with("sum="));
    assert_eq!(ends[0], ends[1], "eager and lazy restores of the chain");
    assert_eq!(ends[0], ends[2], "eager and piped restores of the chain");
    let (code, err) = restore_to_end(&p("full3.vmpack"), &p("f.serial"), &[]);
    assert_eq!(code, Some(0), "{err}");
    let full_end = std::fs::read_to_string(p("f.serial")).unwrap();
    assert_eq!(full_end, ends[0], "the full pack of the same instant");

    // An in-place reset of a VM restored from the chain puts its disk back to the chain's:
    // the guest, run again from the chain's state, finds every slot as the chain holds it
    // and prints exactly what a restore of the chain prints.
    let r = Running::restore(dir, &p("d3.vmpack"), "r");
    r.wait_for("\n1100 ok\n");
    let (code, body) = common::http(&r.sock, "PUT", "/vm/reset", b"");
    assert_eq!(code, 200, "{body}");
    let (code, err) = r.finish();
    assert_eq!(code, 0, "{err}");
    let out = a_output(&p("r.serial"));
    assert!(
        out.contains("\n1100 ok\n") && out.ends_with(&ends[0]),
        "{out}"
    );
    assert!(!out.contains("bad"));

    // A parent whose disk chunk was altered: refused before the guest runs by an eager
    // restore; a lazy one stops with status 76 naming that pack, section and chunk.
    std::fs::create_dir(p("bad")).unwrap();
    for n in ["base", "d1", "d2", "d3"] {
        std::fs::copy(p(&format!("{n}.vmpack")), p(&format!("bad/{n}.vmpack"))).unwrap();
    }
    let bad_base = p("bad/base.vmpack");
    let e = {
        let r = vmpack_formats::pack::PackReader::open(&bad_base).unwrap();
        let id = r.section("disk/0").unwrap().id;
        r.chunks(id)
            .iter()
            .find(|e| e.offset == 10 << 20)
            .unwrap()
            .clone()
    };
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&bad_base)
            .unwrap();
        let mut b = [0u8; 1];
        std::fs::File::open(&bad_base)
            .unwrap()
            .read_exact_at(&mut b, e.payload_offset + 100)
            .unwrap();
        f.write_all_at(&[b[0] ^ 0x55], e.payload_offset + 100)
            .unwrap();
    }
    let bad_d3 = p("bad/d3.vmpack");
    let (code, err) = restore_to_end(&bad_d3, &p("x.serial"), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&bad_base.display().to_string()) && err.contains("'disk/0'"),
        "{err}"
    );
    assert!(
        std::fs::read_to_string(p("x.serial"))
            .unwrap_or_default()
            .is_empty(),
        "no guest ran"
    );
    // Paused at once, so the guest cannot end before the background fill reaches the chunk.
    let l = Running::spawn(
        dir,
        &["restore", bad_d3.to_str().unwrap(), "--memory", "lazy"],
        "y",
    );
    let _ = common::http(&l.sock, "PUT", "/vm/pause", b"");
    let (code, err) = l.finish();
    assert_eq!(code, 76, "{err}");
    assert!(
        err.contains(&bad_base.display().to_string())
            && err.contains("section 'disk/0'")
            && err.contains(&format!("chunk {}", e.seq))
            && err.contains("disk 0 at 0xa00000..0xb00000"),
        "{err}"
    );
}

fn a_output(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}
