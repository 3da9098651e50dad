//! Feeds arbitrary bytes to the libvirt domain XML, OVF descriptor, OVA archive and
//! Firecracker config readers, each from a file alone in its folder: they must refuse or
//! read, never panic, hang, open a file outside that folder or allocate without bound.
//!
//! Run with `cargo fuzz run interchange_xml` from `formats/`.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use vmpack_formats::interchange::{firecracker, libvirt, ovf};

/// One folder per process: a fresh one per input cost most of each run. Every input's
/// file is removed before the next, so each still reads its file alone in the folder.
fn dir() -> &'static std::path::Path {
    static D: OnceLock<std::path::PathBuf> = OnceLock::new();
    D.get_or_init(|| common::scratch_dir("xml"))
}

fuzz_target!(|data: &[u8]| {
    let dir = dir();
    for (name, f) in [("d.xml", 0), ("d.ovf", 1), ("d.ova", 1), ("d.json", 2)] {
        let p = dir.join(name);
        if std::fs::write(&p, data).is_err() {
            return;
        }
        let _ = match f {
            0 => libvirt::import(&p, false).map(drop),
            1 => ovf::import(&p, false).map(drop),
            _ => firecracker::import(&p, false).map(drop),
        };
        let _ = std::fs::remove_file(&p);
    }
});
