//! Feeds arbitrary bytes to the VMDK sparse-extent reader: it must refuse or read within the
//! file, never panic, hang or allocate what the header merely claims.
//!
//! Run with `cargo fuzz run vmdk_reader` from `formats/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
use vmpack_formats::interchange::vmdk::{FileSlice, VmdkReader};
use vmpack_formats::pack::SectionSource;

/// One scratch file per process, cut to each input (a fresh file per input cost most of
/// each run).
fn scratch() -> Option<std::fs::File> {
    static F: OnceLock<std::fs::File> = OnceLock::new();
    let f = F.get_or_init(|| tempfile::tempfile().expect("a scratch file"));
    f.try_clone().ok()
}

fuzz_target!(|data: &[u8]| {
    let Some(f) = scratch() else {
        return;
    };
    if f.set_len(0).is_err() || f.write_all_at(data, 0).is_err() {
        return;
    }
    let Ok(slice) = FileSlice::whole(f) else {
        return;
    };
    let Ok(r) = VmdkReader::open(slice) else {
        return;
    };
    let Ok(ranges) = r.data_ranges() else { return };
    // Read at most 4 MiB of what the grain tables say is there.
    let mut budget: u64 = 4 << 20;
    let mut buf = vec![0u8; 64 << 10];
    for range in ranges {
        let mut off = range.start;
        while off < range.end && budget > 0 {
            let n = (range.end - off).min(buf.len() as u64).min(budget) as usize;
            let _ = r.read_at(&mut buf[..n], off);
            off += n as u64;
            budget -= n as u64;
        }
    }
});
