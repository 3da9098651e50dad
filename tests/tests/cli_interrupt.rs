//! An interrupted `vmpack pack` never leaves a partial file under the target name.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A config whose disk takes seconds to pack (incompressible data at deflate level 9).
fn slow_vm(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("g.bin"), FLAT_GUEST).unwrap();
    let blocks: Vec<(u64, Vec<u8>)> = (0..96u64)
        .map(|i| (i * (8 << 20), noise(2 << 20, i + 1)))
        .collect();
    sparse_raw(&dir.join("big.img"), 768 << 20, &blocks);
    std::fs::write(
        dir.join("vm.toml"),
        "name = \"slow\"\nmemory_mib = 16\n[flat]\nimage = \"g.bin\"\nload_address = 0x1000\n\
         entry = 0x1000\nmode = \"real\"\n[[disk]]\npath = \"big.img\"\n",
    )
    .unwrap();
}

fn temps(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

/// Starts a slow pack and waits until it has written part of its temporary file.
fn start_slow_pack(dir: &Path) -> std::process::Child {
    let child = Command::new(vmpack())
        .current_dir(dir)
        .args([
            "pack",
            "vm.toml",
            "-o",
            "out.vmpack",
            "--compress",
            "deflate",
            "--level",
            "9",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // `.NAME.tmp-PID-` and random characters (docs/CLI.md, "Outputs").
    let prefix = format!(".out.vmpack.tmp-{}-", child.id());
    let t0 = Instant::now();
    loop {
        let started = temps(dir)
            .iter()
            .filter(|n| n.starts_with(&prefix))
            .any(|n| std::fs::metadata(dir.join(n)).is_ok_and(|m| m.len() > 1 << 20));
        if started {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "pack never started writing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn signal(child: &std::process::Child, sig: &str) {
    let st = Command::new("kill")
        .args(["-s", sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn killed_pack_leaves_no_target() {
    let t = tempfile::tempdir().unwrap();
    slow_vm(t.path());
    let mut child = start_slow_pack(t.path());
    signal(&child, "KILL");
    let st = child.wait().unwrap();
    assert!(!st.success());
    assert!(
        !t.path().join("out.vmpack").exists(),
        "partial pack under the target name"
    );
}

#[test]
fn terminated_pack_removes_its_temporary() {
    for sig in ["TERM", "INT"] {
        let t = tempfile::tempdir().unwrap();
        slow_vm(t.path());
        let mut child = start_slow_pack(t.path());
        assert!(!temps(t.path()).is_empty());
        signal(&child, sig);
        let st = child.wait().unwrap();
        assert!(!st.success(), "{sig}");
        assert!(
            !t.path().join("out.vmpack").exists(),
            "{sig}: partial pack under the target name"
        );
        assert!(
            temps(t.path()).is_empty(),
            "{sig}: temporaries left: {:?}",
            temps(t.path())
        );
    }
}
