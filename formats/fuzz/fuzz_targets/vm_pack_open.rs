//! Open and check a VM pack built from the fuzzer's edit of a valid saved-VM pack (see
//! common/mod.rs): manifest, config, vmstate, boot file and disk sections, re-hashed so the
//! VM layer's checks are what the input meets. Every outcome is a value, never a panic.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use vmpack_formats::vm::VmPack;

fuzz_target!(|data: &[u8]| {
    static BASE: std::sync::Once = std::sync::Once::new();
    BASE.call_once(|| {
        let p = common::to_file("open", &common::build(&[])).expect("scratch file");
        let pack = VmPack::open(&p).expect("the unedited seed opens");
        pack.config().expect("the unedited seed's config");
        pack.reader()
            .verify(&())
            .expect("the unedited seed verifies");
    });
    let bytes = common::build(data);
    let Some(path) = common::to_file("open", &bytes) else {
        return;
    };
    if let Ok(pack) = VmPack::open(&path) {
        let _ = pack.config();
        let _ = pack.reader().verify(&());
        for f in &pack.manifest().files {
            let _ = pack.boot_file(&f.role);
        }
        let _ = pack.manifest().memory_restore_path(pack.reader());
    }
});
