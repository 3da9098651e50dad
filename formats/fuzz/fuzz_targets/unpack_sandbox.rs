//! Unpack a pack (random access and streaming) into a fresh folder inside a sandbox folder
//! and assert that nothing appears anywhere else in the sandbox, and nothing inside the
//! output is a link: a pack never makes unpack write outside the folder it was given.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use vmpack_formats::vm::{extract_stream, VmPack};

fn only_out(sandbox: &Path) {
    let names: Vec<String> = std::fs::read_dir(sandbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for n in &names {
        assert!(n == "a" || n == "b", "unpack wrote {n} outside its folder");
    }
    for d in ["a", "b"] {
        for e in std::fs::read_dir(sandbox.join(d)).unwrap() {
            let e = e.unwrap();
            let t = std::fs::symlink_metadata(e.path()).unwrap().file_type();
            assert!(t.is_file(), "{}: not a regular file", e.path().display());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let bytes = common::build(data);
    let Ok(sandbox) = tempfile::tempdir() else {
        return;
    };
    let pack = sandbox.path().join("a.vmpack.in");
    if std::fs::write(&pack, &bytes).is_err() {
        return;
    }
    let (a, b) = (sandbox.path().join("a"), sandbox.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    if let Ok(p) = VmPack::open(&pack) {
        let _ = p.extract_to_dir(&a, None, &());
    }
    std::fs::remove_file(&pack).unwrap();
    let _ = extract_stream(&bytes[..], "fuzz", &b, None, &());
    only_out(sandbox.path());
});
