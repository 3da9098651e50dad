//! The whole validation a restore runs before KVM is touched
//! (`vmboot::snapshot::check_pack_before_kvm`): the pack and its manifest, the config built
//! only from the pack's sections, the vmstate's parse with every KVM structure of exactly
//! its size, and the memory sections against the saved RAM regions. Inputs are edits of a
//! valid saved-VM pack (formats/fuzz/fuzz_targets/common), re-hashed so they reach these
//! checks. Every outcome is a value, never a panic.
#![no_main]

#[path = "../../../formats/fuzz/fuzz_targets/common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = common::build(data);
    let Some(path) = common::to_file("restore", &bytes) else {
        return;
    };
    let _ = vmboot::snapshot::check_pack_before_kvm(&path);
});
