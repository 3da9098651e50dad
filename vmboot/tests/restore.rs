//! Pause, capture and restore in-process: a counter guest continues at the next number in a
//! brand-new VM built from the saved state and memory.

mod common;
use common::*;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmboot::{BootPayload, GuestMemoryInit, RunOptions, SerialSink, Vm, VmState};
use vmpack_formats::config::VmConfig;

/// Counts in guest memory (at 0x200000), printing each value in decimal, with a busy-wait
/// between lines; never exits on its own.
const COUNTER: &str = r#"
.code64
.globl _start
_start:
    mov $0x8000, %rsp
1:  incq 0x200000
    mov 0x200000, %rax
    call print_dec
    mov $'\n', %al
    mov $0x3f8, %dx
    out %al, %dx
    mov $20000, %ecx
2:  dec %ecx
    jnz 2b
    jmp 1b
print_dec:                  # RAX as decimal, most significant digit first
    mov $10, %rcx
    xor %r8, %r8
3:  xor %edx, %edx
    div %rcx
    push %rdx
    inc %r8
    test %rax, %rax
    jnz 3b
4:  pop %rax
    add $'0', %al
    mov $0x3f8, %dx
    out %al, %dx
    dec %r8
    jnz 4b
    ret
"#;

fn wait_for(buf: &Arc<Mutex<Vec<u8>>>, lines: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while buf.lock().unwrap().iter().filter(|&&b| b == b'\n').count() < lines {
        assert!(
            Instant::now() < deadline,
            "guest output stalled: {:?}",
            String::from_utf8_lossy(&buf.lock().unwrap())
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn pause_save_restore_continues_counting() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let Some(bin) = assemble(d.path(), "counter", COUNTER, false, 0x100000) else {
        return;
    };
    let cfg_path = flat_config(d.path(), "counter", &bin, "long", 0x100000, 16, 1);
    let cfg = VmConfig::from_file(&cfg_path).unwrap();
    let payload = BootPayload::from_config(&cfg).unwrap();

    let out1 = Arc::new(Mutex::new(Vec::new()));
    let opts = RunOptions {
        serial_out: SerialSink::Capture(out1.clone()),
        ..Default::default()
    };
    let vm = Vm::create(&cfg, payload.clone(), &opts).unwrap();
    let h = vm.controller();
    let runner = std::thread::spawn(move || vm.run().unwrap());
    wait_for(&out1, 5, Duration::from_secs(30));

    h.pause().unwrap();
    assert!(h.is_paused());
    assert_eq!(h.run_state(), vmboot::api::RunState::Paused);
    // Pausing again is fine, and a paused guest produces nothing.
    h.pause().unwrap();
    let len = out1.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(out1.lock().unwrap().len(), len, "guest ran while paused");

    let state = h.save_state().unwrap();
    let memory: Vec<(u64, Vec<u8>)> =
        h.with_memory(|r| r.iter().map(|(gpa, b)| (*gpa, b.to_vec())).collect());
    assert_eq!(memory.len(), 1);
    let counter_at_save = u64::from_le_bytes(memory[0].1[0x200000..0x200008].try_into().unwrap());
    assert!(counter_at_save >= 5);

    // Resume briefly to show resume works, then stop the original.
    h.resume().unwrap();
    let lines_at_pause = out1.lock().unwrap()[..len]
        .iter()
        .filter(|&&b| b == b'\n')
        .count();
    wait_for(&out1, lines_at_pause + 2, Duration::from_secs(30));
    h.shutdown();
    let r = runner.join().unwrap();
    assert_eq!(r.code, 0, "{}", r.message);
    assert!(h.pause().is_err(), "pausing an ended VM must fail");

    // Through a serializer, as a pack would store it.
    let json = serde_json::to_vec(&state).unwrap();
    let state = VmState::parse(&json).unwrap();

    let out2 = Arc::new(Mutex::new(Vec::new()));
    let opts2 = RunOptions {
        serial_out: SerialSink::Capture(out2.clone()),
        ..Default::default()
    };
    let init = GuestMemoryInit::Fill(Box::new(move |regions| {
        for (gpa, dst) in regions.iter_mut() {
            let src = &memory.iter().find(|(g, _)| g == gpa).unwrap().1;
            dst.copy_from_slice(src);
        }
        Ok(())
    }));
    let vm2 = Vm::restore(
        &cfg,
        state.validate(&cfg).unwrap(),
        init,
        BootPayload::default(),
        &opts2,
    )
    .unwrap();
    let h2 = vm2.controller();
    let runner2 = std::thread::spawn(move || vm2.run().unwrap());
    wait_for(&out2, 3, Duration::from_secs(30));
    h2.shutdown();
    runner2.join().unwrap();

    // The output before the pause, then the restored VM's output, form one unbroken count
    // (a line cut by the pause is completed by the restored VM).
    let before = String::from_utf8(out1.lock().unwrap()[..len].to_vec()).unwrap();
    let after = String::from_utf8(out2.lock().unwrap().clone()).unwrap();
    let joined = format!("{before}{after}");
    let nums: Vec<u64> = joined
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.parse()
                .unwrap_or_else(|_| panic!("bad line {l:?} in {joined:?}"))
        })
        .collect();
    for w in nums.windows(2) {
        assert_eq!(w[1], w[0] + 1, "count broken: {joined:?}");
    }
    assert_eq!(nums[0], 1);
    assert!(*nums.last().unwrap() > counter_at_save);
}

#[test]
fn map_private_restore_from_a_file() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let Some(bin) = assemble(d.path(), "counter", COUNTER, false, 0x100000) else {
        return;
    };
    let cfg_path = flat_config(d.path(), "counter", &bin, "long", 0x100000, 16, 1);
    let cfg = VmConfig::from_file(&cfg_path).unwrap();
    let payload = BootPayload::from_config(&cfg).unwrap();
    let out1 = Arc::new(Mutex::new(Vec::new()));
    let vm = Vm::create(
        &cfg,
        payload.clone(),
        &RunOptions {
            serial_out: SerialSink::Capture(out1.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let h = vm.controller();
    let runner = std::thread::spawn(move || vm.run().unwrap());
    wait_for(&out1, 3, Duration::from_secs(30));
    h.pause().unwrap();
    let state = h.save_state().unwrap();
    // Memory image file: the first 2 MiB + 4 KiB (code, page tables, counter page) only;
    // everything else comes back as zero.
    let mem_path = d.path().join("mem.img");
    h.with_memory(|r| std::fs::write(&mem_path, &r[0].1[..0x201000]).unwrap());
    let printed = out1.lock().unwrap().len();
    h.shutdown();
    runner.join().unwrap();

    let out2 = Arc::new(Mutex::new(Vec::new()));
    let file = std::fs::File::open(&mem_path).unwrap();
    let vm2 = Vm::restore(
        &cfg,
        state.validate(&cfg).unwrap(),
        GuestMemoryInit::MapPrivate {
            file,
            pieces: vec![(0, 0, 0x201000)],
        },
        BootPayload::default(),
        &RunOptions {
            serial_out: SerialSink::Capture(out2.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let h2 = vm2.controller();
    let runner2 = std::thread::spawn(move || vm2.run().unwrap());
    wait_for(&out2, 2, Duration::from_secs(30));
    h2.shutdown();
    runner2.join().unwrap();
    let before = String::from_utf8(out1.lock().unwrap()[..printed].to_vec()).unwrap();
    let joined = format!(
        "{before}{}",
        String::from_utf8(out2.lock().unwrap().clone()).unwrap()
    );
    let nums: Vec<u64> = joined.lines().map(|l| l.parse().unwrap()).collect();
    for w in nums.windows(2) {
        assert_eq!(w[1], w[0] + 1, "count broken: {joined:?}");
    }
    // The file was mapped copy-on-write: the guest's increments did not reach it.
    let img = std::fs::read(&mem_path).unwrap();
    let in_file = u64::from_le_bytes(img[0x200000..0x200008].try_into().unwrap());
    assert!(in_file < *nums.last().unwrap());
}

#[test]
fn smp_guest_survives_pause_save_restore() {
    if !kvm_available() {
        return;
    }
    let cfg_path = samples_dir().join("smp.toml");
    let cfg = VmConfig::from_file(&cfg_path).unwrap();
    let Ok(payload) = BootPayload::from_config(&cfg) else {
        eprintln!("SKIPPED: samples/guests/bin/smp.bin not built");
        return;
    };
    let out1 = Arc::new(Mutex::new(Vec::new()));
    let vm = Vm::create(
        &cfg,
        payload.clone(),
        &RunOptions {
            serial_out: SerialSink::Capture(out1.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let h = vm.controller();
    let runner = std::thread::spawn(move || vm.run().unwrap());
    // Both CPUs are counting once "cpu1" lines appear.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&out1.lock().unwrap()).contains("cpu1 10\n") {
        assert!(Instant::now() < deadline, "AP never reached 10");
        std::thread::sleep(Duration::from_millis(10));
    }
    h.pause().unwrap();
    let state = h.save_state().unwrap();
    assert_eq!(state.vcpus.len(), 2);
    let memory: Vec<(u64, Vec<u8>)> =
        h.with_memory(|r| r.iter().map(|(gpa, b)| (*gpa, b.to_vec())).collect());
    let printed = out1.lock().unwrap().len();
    h.shutdown();
    runner.join().unwrap();

    let out2 = Arc::new(Mutex::new(Vec::new()));
    let vm2 = Vm::restore(
        &cfg,
        state.validate(&cfg).unwrap(),
        GuestMemoryInit::Fill(Box::new(move |regions| {
            for ((_, dst), (_, src)) in regions.iter_mut().zip(&memory) {
                dst.copy_from_slice(src);
            }
            Ok(())
        })),
        BootPayload::default(),
        &RunOptions {
            serial_out: SerialSink::Capture(out2.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let r = vm2.run().unwrap();
    let before = String::from_utf8_lossy(&out1.lock().unwrap()[..printed]).to_string();
    let after = String::from_utf8_lossy(&out2.lock().unwrap()).to_string();
    assert_eq!(r.code, 0, "{}: {after}", r.message);
    let all = format!("{before}{after}");
    for cpu in ["cpu0", "cpu1"] {
        let nums: Vec<u64> = all
            .lines()
            .filter_map(|l| l.strip_prefix(cpu))
            .map(|n| n.trim().parse().unwrap())
            .collect();
        assert_eq!(nums, (1..=100).collect::<Vec<_>>(), "{cpu}: {all}");
    }
}

const KVMCLOCK: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kvmclock.bin"));

fn text(buf: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap()).into_owned()
}

fn wait_text(buf: &Arc<Mutex<Vec<u8>>>, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !text(buf).contains(needle) {
        assert!(Instant::now() < deadline, "no {needle:?} in: {}", text(buf));
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// KVM_KVMCLOCK_CTRL on pause and after restore: the `kvmclock` guest (samples/guests/
/// kvmclock.S) enables kvmclock and reports the PVCLOCK_GUEST_STOPPED flag, which is how a
/// Linux guest learns that a long gap was the host stopping it, not a soft lockup. It sees
/// the flag after a pause and resume, and again in a VM restored from a capture.
#[test]
fn a_kvmclock_guest_learns_it_was_stopped() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("kvmclock.bin");
    std::fs::write(&bin, KVMCLOCK).unwrap();
    let cfg_path = flat_config(d.path(), "kvmclock", &bin, "long", 0x100000, 16, 1);
    let cfg = VmConfig::from_file(&cfg_path).unwrap();
    let payload = BootPayload::from_config(&cfg).unwrap();
    let out1 = Arc::new(Mutex::new(Vec::new()));
    let vm = Vm::create(
        &cfg,
        payload,
        &RunOptions {
            serial_out: SerialSink::Capture(out1.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let h = vm.controller();
    let runner = std::thread::spawn(move || vm.run().unwrap());
    wait_text(&out1, "tick 3\n", Duration::from_secs(60));
    assert!(!text(&out1).contains("stopped"), "{}", text(&out1));
    h.pause().unwrap();
    h.resume().unwrap();
    wait_text(&out1, "host stopped us\n", Duration::from_secs(30));

    h.pause().unwrap();
    let state = h.save_state().unwrap();
    let memory: Vec<(u64, Vec<u8>)> =
        h.with_memory(|r| r.iter().map(|(gpa, b)| (*gpa, b.to_vec())).collect());
    h.shutdown();
    runner.join().unwrap();
    // The capture holds the flag cleared (the guest cleared it): the restored VM must set it
    // again itself.
    let out2 = Arc::new(Mutex::new(Vec::new()));
    let vm2 = Vm::restore(
        &cfg,
        state.validate(&cfg).unwrap(),
        GuestMemoryInit::Fill(Box::new(move |regions| {
            for ((_, dst), (_, src)) in regions.iter_mut().zip(&memory) {
                dst.copy_from_slice(src);
            }
            Ok(())
        })),
        BootPayload::default(),
        &RunOptions {
            serial_out: SerialSink::Capture(out2.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let r = vm2.run().unwrap();
    assert_eq!(r.code, 0, "{}: {}", r.message, text(&out2));
    let after = text(&out2);
    assert!(after.contains("host stopped us\n"), "{after}");
    assert!(
        after.ends_with("stops 1\n") || after.ends_with("stops 2\n"),
        "{after}"
    );
}
