//! Unpack a pack (random access and streaming) into a fresh folder inside a sandbox folder
//! and assert that nothing appears anywhere else in the sandbox, and nothing inside the
//! output is a link: a pack never makes unpack write outside the folder it was given.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;
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

/// One sandbox per process (a fresh one per input cost most of each run), emptied after
/// every input so each starts from the same empty sandbox.
fn sandbox() -> &'static Path {
    static S: OnceLock<std::path::PathBuf> = OnceLock::new();
    S.get_or_init(|| common::scratch_dir("sandbox"))
}

fn empty(sandbox: &Path) {
    for e in std::fs::read_dir(sandbox).unwrap() {
        let p = e.unwrap().path();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let bytes = common::build(data);
    let sandbox = sandbox();
    let pack = sandbox.join("a.vmpack.in");
    if std::fs::write(&pack, &bytes).is_err() {
        return;
    }
    let (a, b) = (sandbox.join("a"), sandbox.join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    if let Ok(p) = VmPack::open(&pack) {
        let _ = p.extract_to_dir(&a, None, &());
    }
    std::fs::remove_file(&pack).unwrap();
    let _ = extract_stream(&bytes[..], "fuzz", &b, None, &());
    only_out(sandbox);
    empty(sandbox);
});
