//! Feeds arbitrary bytes to the libvirt domain XML, OVF descriptor, OVA archive and
//! Firecracker config readers, each from a file alone in its folder: they must refuse or
//! read, never panic, hang, open a file outside that folder or allocate without bound.
//!
//! Run with `cargo fuzz run interchange_xml` from `formats/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmpack_formats::interchange::{firecracker, libvirt, ovf};

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    for (name, f) in [("d.xml", 0), ("d.ovf", 1), ("d.ova", 1), ("d.json", 2)] {
        let p = dir.path().join(name);
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
