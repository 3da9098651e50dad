//! `vmpack run`: the README's first command (the built-in sample), a config, and a pack made
//! by `vmpack pack` booted without unpacking it.

mod common;

use common::{ok, run, samples_dir};

fn counter_text() -> String {
    (1..=300).map(|i| format!("{i}\n")).collect()
}

#[test]
fn builtin_counter_sample_runs_to_the_end() {
    if !common::kvm_available("vmpack run tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = run(dir.path(), &["run"]);
    assert_eq!(ok(&o), counter_text());
    assert!(common::stderr(&o).contains("built-in counter sample"));
}

#[test]
fn a_packed_vm_boots_without_unpacking() {
    if !common::kvm_available("vmpack run tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("counter64.vmpack");
    let cfg = samples_dir().join("counter64.toml");
    ok(&run(
        dir.path(),
        &[
            "pack",
            cfg.to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
            "--compress",
            "zstd",
            "-q",
        ],
    ));
    let o = run(dir.path(), &["run", pack.to_str().unwrap(), "-q"]);
    assert_eq!(ok(&o), counter_text());
    // The same guest from its config, for comparison.
    let o = run(dir.path(), &["run", cfg.to_str().unwrap(), "-q"]);
    assert_eq!(ok(&o), counter_text());
}

#[test]
fn a_guest_exit_status_becomes_vmpacks() {
    if !common::kvm_available("vmpack run tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Real mode: mov al, 7; out 0xf4, al.
    std::fs::write(dir.path().join("exit7.bin"), [0xb0, 0x07, 0xe6, 0xf4]).unwrap();
    std::fs::write(
        dir.path().join("exit7.toml"),
        "name = \"exit7\"\nmemory_mib = 1\n[flat]\nimage = \"exit7.bin\"\n\
         load_address = 0x1000\nentry = 0x1000\nmode = \"real\"\n",
    )
    .unwrap();
    let o = run(dir.path(), &["run", "exit7.toml"]);
    assert_eq!(o.status.code(), Some(7), "{}", common::stderr(&o));
}
