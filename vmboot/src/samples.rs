//! The flat test guests from `samples/guests/*.S`, assembled by `build.rs`.
//!
//! All are integer-only assembly (the emulated KVM on the project's machines
//! rejects SSE/x87) and follow the flat start state in `docs/CONFIG.md`.
//! Serial output goes to COM1 (0x3f8); the exit status is written to port 0xf4.

/// Load address and entry of the real-mode guest ([`COUNTER16`]).
pub const REAL_MODE_LOAD: u64 = 0x1000;
/// Load address and entry of the long-mode guests.
pub const LONG_MODE_LOAD: u64 = 0x10_0000;

/// Real mode: prints "1\n" .. "300\n" about 50 lines/s, then exits 0.
pub const COUNTER16: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/counter16.bin"));
/// Long mode: prints "1\n" .. "300\n" about 50 lines/s, then exits 0.
pub const COUNTER64: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/counter64.bin"));
/// Long mode: PIT (via PIC) and LAPIC timer at 1000 Hz; 20 lines of
/// "pit=N lapic=M\n", one per 500 PIT ticks, then exits 0.
pub const TIMER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/timer.bin"));
/// Long mode, 2 vCPUs: INIT/SIPI starts the AP; "cpu0 N\n" / "cpu1 N\n"
/// up to 100 each, then exits 0 (1 if the AP fails).
pub const SMP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/smp.bin"));
/// Long mode: fills RAM above 2 MiB, prints "filled\n", waits ~3 s, checks,
/// prints "memtest: N pages ok\n" and exits 0 (or reports a mismatch, exit 1).
pub const MEMTEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/memtest.bin"));
/// Long mode: a key-value store on the serial console (`set k v`, `get k`, `count`,
/// `quit`), each answer followed by the prompt "> "; sleeps in `hlt` between commands.
pub const KVSTORE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kvstore.bin"));

/// Long mode, any vCPU count: every vCPU prints the CPUID it sees, one line per
/// (leaf, subleaf): "cpuid APIC LEAF.SUB EAX EBX ECX EDX\n"; then "cpuid done N\n", exit 0.
pub const CPUID: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cpuid.bin"));

/// Long mode, one virtio-blk disk: a guest whose writes are known exactly (each round
/// writes the same 9 pages, a 'w' writes 1 MiB in 256 runs), for the dirty-page and reset
/// tests and `vmpack bench-clones`; see `samples/guests/dirty.S`.
pub const DIRTY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dirty.bin"));

/// Every sample guest by name (the source file's stem).
pub fn all() -> &'static [(&'static str, &'static [u8])] {
    &[
        ("counter16", COUNTER16),
        ("counter64", COUNTER64),
        ("timer", TIMER),
        ("smp", SMP),
        ("memtest", MEMTEST),
        ("kvstore", KVSTORE),
        ("cpuid", CPUID),
        ("dirty", DIRTY),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_are_embedded() {
        for (name, image) in all() {
            assert!(!image.is_empty(), "{name} is empty");
        }
        // The real-mode image must fit below the real-mode stack at 0x7000.
        assert!(REAL_MODE_LOAD + COUNTER16.len() as u64 <= 0x7000);
    }
}
