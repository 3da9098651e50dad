//! Feeds arbitrary bytes to the VMDK sparse-extent reader: it must refuse or read within the
//! file, never panic, hang or allocate what the header merely claims.
//!
//! Run with `cargo fuzz run vmdk_reader` from `formats/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;
use vmpack_formats::interchange::vmdk::{FileSlice, VmdkReader};
use vmpack_formats::pack::SectionSource;

fuzz_target!(|data: &[u8]| {
    let Ok(mut f) = tempfile::tempfile() else {
        return;
    };
    if f.write_all(data).is_err() {
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
