//! The whole validation a restore runs before KVM is touched
//! (`vmboot::snapshot::check_pack_before_kvm`): the pack and its manifest, the config built
//! only from the pack's sections, the vmstate's parse with every KVM structure of exactly
//! its size, and the memory sections against the saved RAM regions. Inputs are edits of a
//! valid saved-VM pack (formats/fuzz/fuzz_targets/common), re-hashed so they reach these
//! checks. Every outcome is a value, never a panic.
//!
//! With `VMPACK_FUZZ_STATS=1` in the environment, the process prints at exit how many inputs
//! ended in each kind of refusal (numbers masked): the way to see which checks a corpus
//! reaches (e.g. `saved virtqueue #: size #`).
#![no_main]

#[path = "../../../formats/fuzz/fuzz_targets/common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::sync::{Mutex, Once};

static STATS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

extern "C" {
    fn atexit(f: extern "C" fn()) -> std::os::raw::c_int;
}

extern "C" fn print_stats() {
    if let Ok(s) = STATS.lock() {
        for (k, n) in s.iter() {
            eprintln!("restore_check outcome {n:>9}  {k}");
        }
    }
}

fn count(outcome: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| {
        let on = std::env::var_os("VMPACK_FUZZ_STATS").is_some();
        if on {
            // SAFETY: registers a plain function taking no arguments, as atexit expects.
            unsafe { atexit(print_stats) };
        }
        on
    }) {
        return;
    }
    let mut k = String::new();
    for c in outcome.chars() {
        if !c.is_ascii_digit() {
            k.push(c);
        } else if !k.ends_with('#') {
            k.push('#');
        }
    }
    let k: String = k.chars().take(90).collect();
    if let Ok(mut s) = STATS.lock() {
        *s.entry(k).or_default() += 1;
    }
}

fuzz_target!(|data: &[u8]| {
    static BASE: Once = Once::new();
    BASE.call_once(|| {
        let p = common::to_file("restore", &common::build(&[])).expect("scratch file");
        vmboot::snapshot::check_pack_before_kvm(&p).expect("the unedited seed passes");
    });
    let bytes = common::build(data);
    let Some(path) = common::to_file("restore", &bytes) else {
        return;
    };
    match vmboot::snapshot::check_pack_before_kvm(&path) {
        Ok(()) => count("accepted"),
        Err(e) => {
            let m = format!("{e:#}");
            count(
                m.strip_prefix(&format!("{}: ", path.display()))
                    .unwrap_or(&m),
            );
        }
    }
});
