//! A stock kernel nobody here wrote: Debian's cloud kernel (fetched by
//! `samples/linux/fetch-kernel.sh`) must load, decompress and print its banner under vmboot,
//! and a snapshot taken mid-boot must resume and print the boot lines that follow.
//!
//! Slow on machines whose KVM emulates every instruction (PVM): the banner takes about a
//! minute, the whole test 2-4 minutes. On hardware virtualization it takes seconds.

mod common;

use common::{bin, vmpack};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn kernel_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("samples/linux")
}

fn spawn(args: &[&std::ffi::OsStr]) -> Child {
    Command::new(bin("vmboot"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning vmboot")
}

fn wait_for(serial: &Path, needle: &str, timeout: Duration, child: &mut Child) -> String {
    let t = Instant::now();
    loop {
        let out = std::fs::read_to_string(serial).unwrap_or_default();
        if out.contains(needle) {
            return out;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("vmboot ended ({st}) before {needle:?}; serial:\n{out}");
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            panic!("no {needle:?} within {timeout:?}; serial:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Kernel log timestamps (`[    1.234567]`) in order of appearance.
fn timestamps(log: &str) -> Vec<f64> {
    log.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix('[')?;
            rest.split_once(']')?.0.trim().parse().ok()
        })
        .collect()
}

#[test]
fn debian_kernel_boots_to_its_banner_and_resumes_from_a_mid_boot_snapshot() {
    let kernel = kernel_dir().join("out/vmlinuz");
    if !kernel.exists() {
        eprintln!(
            "\n*** SKIPPED: {} is missing; run samples/linux/fetch-kernel.sh (scripts/test-all.sh does) ***\n",
            kernel.display()
        );
        return;
    }
    if !common::kvm_available("the Linux test") {
        return;
    }
    let _ = vmpack();
    let dir = tempfile::tempdir().unwrap();
    let (sock, serial_a, serial_b) = (
        dir.path().join("a.sock"),
        dir.path().join("a.serial"),
        dir.path().join("b.serial"),
    );
    let pack = dir.path().join("linux.vmpack");
    let config = kernel_dir().join("linux.toml");
    let mut a = spawn(&[
        "run".as_ref(),
        config.as_os_str(),
        "--api-sock".as_ref(),
        sock.as_os_str(),
        "--serial-out".as_ref(),
        serial_a.as_os_str(),
    ]);
    let started = Instant::now();
    let banner = wait_for(&serial_a, "Linux version", Duration::from_secs(300), &mut a);
    eprintln!(
        "banner after {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        banner
            .lines()
            .find(|l| l.contains("Linux version"))
            .unwrap()
    );
    // Save a little after the banner, in the middle of early boot.
    wait_for(&serial_a, "BIOS-e820", Duration::from_secs(120), &mut a);
    let o = Command::new(vmpack())
        .args(["save", "--then", "stop", "--compress", "zstd", "--api-sock"])
        .arg(&sock)
        .arg("-o")
        .arg(&pack)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = a.wait();
    let before = std::fs::read_to_string(&serial_a).unwrap();
    assert!(
        !before.contains("Memory:"),
        "saved too late to prove anything:\n{before}"
    );

    // The initrd still lies where the loader put it, so the pack keeps it there only once,
    // and unpacking cuts it back out byte for byte.
    let pack_reader = vmpack_formats::vm::VmPack::open(&pack).unwrap();
    let initrd = pack_reader.manifest().file("initrd").unwrap();
    assert!(initrd.in_memory.is_some(), "{initrd:?}");
    assert!(pack_reader.reader().section("boot/initrd").is_none());
    drop(pack_reader);
    let unpacked = dir.path().join("unpacked");
    let o = Command::new(vmpack())
        .args(["unpack", "-q", "-o"])
        .arg(&unpacked)
        .arg(&pack)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(unpacked.join("initrd.img")).unwrap(),
        std::fs::read(kernel_dir().join("out/initrd.img")).unwrap()
    );

    let mut b = spawn(&[
        "restore".as_ref(),
        pack.as_os_str(),
        "--serial-out".as_ref(),
        serial_b.as_os_str(),
    ]);
    let after = wait_for(&serial_b, "Memory:", Duration::from_secs(300), &mut b);
    let _ = b.kill();
    let _ = b.wait();
    let (t_before, t_after) = (timestamps(&before), timestamps(&after));
    assert!(
        !t_after.is_empty(),
        "the restored kernel printed no log lines:\n{after}"
    );
    let last_before = t_before.last().copied().unwrap_or(0.0);
    assert!(
        t_after[0] >= last_before,
        "kernel time must continue after restore ({} then {}):\n{before}\n---\n{after}",
        last_before,
        t_after[0]
    );
    assert!(
        !after.contains("Linux version"),
        "the restored kernel must continue, not boot again:\n{after}"
    );
}

#[test]
fn debian_kernel_as_elf_vmlinux_boots_to_its_memory_line() {
    let kernel = kernel_dir().join("out/vmlinux");
    if !kernel.exists() {
        eprintln!(
            "\n*** SKIPPED: {} is missing; samples/linux/fetch-kernel.sh extracts it (needs lz4) ***\n",
            kernel.display()
        );
        return;
    }
    if !common::kvm_available("the ELF vmlinux test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("elf.serial");
    let config = kernel_dir().join("linux-elf.toml");
    let mut vm = spawn(&[
        "run".as_ref(),
        config.as_os_str(),
        "--serial-out".as_ref(),
        serial.as_os_str(),
    ]);
    // The ELF entry point is the kernel proper: no self-decompression, the banner comes at
    // once, and early boot goes on to set up memory.
    let log = wait_for(&serial, "Memory:", Duration::from_secs(240), &mut vm);
    let _ = vm.kill();
    let _ = vm.wait();
    assert!(log.contains("Linux version 6."), "{log}");
    assert!(
        log.contains("Command line: console=ttyS0"),
        "the kernel got our command line:\n{log}"
    );
    assert!(
        log.contains("BIOS-e820"),
        "the kernel read our e820 map:\n{log}"
    );
}
