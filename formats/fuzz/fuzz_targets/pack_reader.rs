//! Feeds arbitrary bytes to both pack readers and the manifest parser: they must return
//! errors, never panic, hang or allocate what the input merely claims.
//!
//! Run with `cargo fuzz run pack_reader` from `formats/` (needs cargo-fuzz and a nightly
//! toolchain); `cargo build` builds it on stable so it cannot rot.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;
use vmpack_formats::pack::{PackReader, StreamEvent, StreamReader};

fuzz_target!(|data: &[u8]| {
    // The stream reader works on any Read.
    if let Ok(mut sr) = StreamReader::new(data, "fuzz") {
        for _ in 0..100_000 {
            match sr.next_event() {
                Ok(StreamEvent::End(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    // The random-access reader needs a file.
    let Ok(mut f) = tempfile() else { return };
    if f.1.write_all(data).is_err() {
        return;
    }
    if let Ok(r) = PackReader::open(&f.0) {
        let _ = r.verify(&());
        for s in r.sections() {
            let _ = r.read_section(s.id, 1 << 20);
        }
    }
    let _ = std::fs::remove_file(&f.0);
    let _ = vmpack_formats::vm::Manifest::parse(data, "fuzz");
});

fn tempfile() -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
    let p = std::env::temp_dir().join(format!("vmpack-fuzz-{}", std::process::id()));
    let f = std::fs::File::create(&p)?;
    Ok((p, f))
}
