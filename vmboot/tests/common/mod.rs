//! Shared helpers: KVM availability, assembling tiny guests with binutils, running vmboot.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// False (after a loud note on stderr) when /dev/kvm cannot be opened.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm not available ({e})");
            false
        }
    }
}

/// Assembles `src` (GNU as syntax) linked at `addr` into a flat binary; None (with a note)
/// when binutils are missing.
pub fn assemble(dir: &Path, name: &str, src: &str, code16: bool, addr: u64) -> Option<PathBuf> {
    let s = dir.join(format!("{name}.S"));
    let o = dir.join(format!("{name}.o"));
    let bin = dir.join(format!("{name}.bin"));
    std::fs::write(&s, src).unwrap();
    let as_arch = if code16 { "--32" } else { "--64" };
    let st = Command::new("as")
        .arg(as_arch)
        .arg(&s)
        .arg("-o")
        .arg(&o)
        .status();
    match st {
        Ok(s) if s.success() => {}
        Ok(_) => panic!("assembling {name} failed"),
        Err(e) => {
            eprintln!("SKIPPED: GNU as not available ({e})");
            return None;
        }
    }
    let mut ld = Command::new("ld");
    if code16 {
        ld.args(["-m", "elf_i386"]);
    }
    let st = ld
        .arg(format!("-Ttext={addr:#x}"))
        .arg("--oformat=binary")
        .arg(&o)
        .arg("-o")
        .arg(&bin)
        .status()
        .expect("ld");
    assert!(st.success(), "linking {name} failed");
    Some(bin)
}

pub fn flat_config(
    dir: &Path,
    name: &str,
    image: &Path,
    mode: &str,
    addr: u64,
    mib: u64,
    vcpus: u32,
) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "name = \"{name}\"\nvcpus = {vcpus}\nmemory_mib = {mib}\n[flat]\nimage = \"{}\"\n\
             load_address = {addr:#x}\nentry = {addr:#x}\nmode = \"{mode}\"\n",
            image.display()
        ),
    )
    .unwrap();
    p
}

pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `vmboot run CONFIG`, killing it after `timeout`.
pub fn run_vmboot(config: &Path, timeout: Duration) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let out_p = dir.path().join("out");
    let err_p = dir.path().join("err");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmboot"))
        .arg("run")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_p).unwrap())
        .stderr(std::fs::File::create(&err_p).unwrap())
        .spawn()
        .expect("start vmboot");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.and_then(|s| s.code()),
        stdout: std::fs::read_to_string(&out_p).unwrap(),
        stderr: std::fs::read_to_string(&err_p).unwrap(),
    }
}

/// The workspace's samples folder.
pub fn samples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples")
}
