//! Boots tiny guests through the real `vmboot` binary.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[test]
fn real_mode_guest_prints_and_exits_with_debug_code() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = r#"
.code16
.globl _start
_start:
    mov $0x3f8, %dx
    mov $'H', %al
    out %al, %dx
    mov $'i', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    mov %edi, %eax          # RAM size in bytes
    shr $20, %eax
    out %al, $0xf4          # 16 MiB -> status 16
"#;
    let Some(bin) = assemble(d.path(), "rm", src, true, 0x1000) else {
        return;
    };
    let cfg = flat_config(d.path(), "rm", &bin, "real", 0x1000, 16, 1);
    let o = run_vmboot(&cfg, T);
    assert_eq!(o.stdout, "Hi\n", "stderr: {}", o.stderr);
    assert_eq!(o.code, Some(16), "stderr: {}", o.stderr);
}

#[test]
fn long_mode_guest_sees_documented_start_state() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // Prints 'L', then checks RSP, CS, the GDT base and RDI; the exit code says which failed.
    let src = r#"
.code64
.globl _start
_start:
    mov $0x3f8, %dx
    mov $'L', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    mov $1, %al
    cmp $0x8ff0, %rsp
    jne 9f
    mov $2, %al
    mov %cs, %bx
    cmp $0x08, %bx
    jne 9f
    mov $3, %al
    sgdt gdtr(%rip)
    cmpq $0x500, gdtr+2(%rip)
    jne 9f
    mov $4, %al
    cmp $(24 << 20), %rdi
    jne 9f
    mov $5, %al
    mov %ds, %bx
    cmp $0x10, %bx
    jne 9f
    mov $100, %al
9:  out %al, $0xf4
gdtr: .quad 0, 0
"#;
    let Some(bin) = assemble(d.path(), "lm", src, false, 0x100000) else {
        return;
    };
    let cfg = flat_config(d.path(), "lm", &bin, "long", 0x100000, 24, 1);
    let o = run_vmboot(&cfg, T);
    assert_eq!(o.stdout, "L\n", "stderr: {}", o.stderr);
    assert_eq!(o.code, Some(100), "stderr: {}", o.stderr);
}

#[test]
fn unknown_ports_are_ignored_and_read_all_ones() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = r#"
.code64
.globl _start
_start:
    mov $0x55, %al
    out %al, $0x80
    out %al, $0x99
    mov $0x1234, %dx
    outw %ax, %dx
    inw %dx, %ax
    cmp $0xffff, %ax
    jne 1f
    in $0x99, %al          # 0xff -> exit status 255
    out %al, $0xf4
1:  mov $1, %al
    out %al, $0xf4
"#;
    let Some(bin) = assemble(d.path(), "ports", src, false, 0x100000) else {
        return;
    };
    let cfg = flat_config(d.path(), "ports", &bin, "long", 0x100000, 16, 1);
    let o = run_vmboot(&cfg, T);
    assert_eq!(o.code, Some(255), "stderr: {}", o.stderr);
}

#[test]
fn triple_fault_ends_with_a_clear_message() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // IDT limit 0: the #UD cannot be delivered, escalating to a triple fault.
    let src = ".code64\n.globl _start\n_start:\n nop\n ud2\n";
    let Some(bin) = assemble(d.path(), "tf", src, false, 0x100000) else {
        return;
    };
    let cfg = flat_config(d.path(), "tf", &bin, "long", 0x100000, 16, 1);
    let o = run_vmboot(&cfg, T);
    assert_eq!(o.code, Some(70), "stderr: {}", o.stderr);
    assert!(o.stderr.contains("triple fault"), "{}", o.stderr);
    assert!(o.stderr.contains("RIP 0x100001"), "{}", o.stderr);
    assert!(o.stderr.contains("code at RIP: 0f 0b"), "{}", o.stderr);
}

#[test]
fn sse_instruction_ends_with_internal_error() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = ".code64\n.globl _start\n_start:\n nop\n pxor %xmm0, %xmm0\n mov $0, %al\n out %al, $0xf4\n";
    let Some(bin) = assemble(d.path(), "sse", src, false, 0x100000) else {
        return;
    };
    let cfg = flat_config(d.path(), "sse", &bin, "long", 0x100000, 16, 1);
    let o = run_vmboot(&cfg, T);
    if o.code == Some(0) {
        eprintln!("note: this host emulates pxor; the internal-error path was not exercised");
        return;
    }
    assert_eq!(o.code, Some(71), "stderr: {}", o.stderr);
    assert!(o.stderr.contains("internal error"), "{}", o.stderr);
    assert!(
        o.stderr.contains("code at RIP: 66 0f ef c0"),
        "{}",
        o.stderr
    );
}

#[test]
fn serial_starts_with_an_empty_transmitter() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // LSR must report THRE|TEMT (0x60) or polling drivers (Linux earlyprintk) spin.
    let src = ".code16\n.globl _start\n_start:\n mov $0x3fd, %dx\n in %dx, %al\n out %al, $0xf4\n";
    let Some(bin) = assemble(d.path(), "lsr", src, true, 0x1000) else {
        return;
    };
    let cfg = flat_config(d.path(), "lsr", &bin, "real", 0x1000, 16, 1);
    let o = run_vmboot(&cfg, T);
    assert_eq!(o.code, Some(0x60), "stderr: {}", o.stderr);
}

#[test]
fn i8042_reset_ends_cleanly() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = ".code16\n.globl _start\n_start:\n in $0x64, %al\n mov $0xfe, %al\n out %al, $0x64\n mov $9, %al\n out %al, $0xf4\n";
    let Some(bin) = assemble(d.path(), "kbd", src, true, 0x1000) else {
        return;
    };
    let cfg = flat_config(d.path(), "kbd", &bin, "real", 0x1000, 16, 1);
    let o = run_vmboot(&cfg, T);
    assert_eq!(o.code, Some(0), "stderr: {}", o.stderr);
}

#[test]
fn bad_configs_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("x.bin");
    std::fs::write(&bin, [0xf4u8]).unwrap();
    // Real-mode entry beyond 64 KiB.
    let cfg = flat_config(d.path(), "bad", &bin, "real", 0x20000, 16, 1);
    let o = run_vmboot(&cfg, T);
    if o.stderr.contains("/dev/kvm") {
        eprintln!("SKIPPED: /dev/kvm not available");
        return;
    }
    assert_eq!(o.code, Some(1));
    assert!(o.stderr.contains("below 0x10000"), "{}", o.stderr);
    // Image overlapping the long-mode page tables.
    let cfg = flat_config(d.path(), "bad2", &bin, "long", 0x9000, 16, 1);
    let o = run_vmboot(&cfg, T);
    assert_eq!(o.code, Some(1));
    assert!(
        o.stderr.contains("overlaps the page tables"),
        "{}",
        o.stderr
    );
}

/// The sample guests from samples/guests (built by vmboot/build.rs).
fn run_sample(name: &str, expect_last: &str) {
    if !kvm_available() {
        return;
    }
    let cfg = samples_dir().join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&cfg).unwrap();
    let image = text
        .lines()
        .find_map(|l| l.strip_prefix("image = \""))
        .map(|s| s.trim_end_matches('"').to_string())
        .unwrap();
    if !samples_dir().join(&image).exists() {
        eprintln!("SKIPPED: sample guest {image} not built");
        return;
    }
    let o = run_vmboot(&cfg, Duration::from_secs(120));
    assert_eq!(
        o.code,
        Some(0),
        "stderr: {}\nstdout tail: {}",
        o.stderr,
        &o.stdout[o.stdout.len().saturating_sub(300)..]
    );
    assert!(o.stdout.contains(expect_last), "stdout: {}", o.stdout);
}

#[test]
fn sample_smp_starts_the_ap() {
    run_sample("smp", "cpu1 100\n");
}

#[test]
fn sample_counter_real_mode() {
    run_sample("counter", "\n300\n");
}

#[test]
fn sample_counter_long_mode() {
    run_sample("counter64", "\n300\n");
}

#[test]
fn sample_timer() {
    run_sample("timer", "pit=");
}

#[test]
fn sample_memtest() {
    run_sample("memtest", "pages ok");
}
