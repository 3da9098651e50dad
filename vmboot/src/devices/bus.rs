//! Address-range routing for port I/O and MMIO exits.
//!
//! Accesses nobody claims are ignored and counted (reads see all-ones, as on a real ISA bus),
//! because guests, Linux included, probe ports that vmboot does not emulate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the VMM must do after a device access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoAction {
    Continue,
    /// End the VM with this process exit status.
    Exit {
        code: i32,
        message: String,
    },
}

pub trait BusDevice: Send {
    /// `offset` is relative to the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction;
}

struct Entry {
    base: u64,
    len: u64,
    /// The device-relative offset of `base` (a device with several ranges, like the
    /// i8042's 0x60 and 0x64, sees one offset space).
    first_offset: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
    unknown_reads: AtomicU64,
    unknown_writes: AtomicU64,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `[base, base + len)`; overlapping claims are a programming error reported as Err.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> super::Result<()> {
        self.insert_at_offset(base, len, 0, dev)
    }

    /// Like [`Bus::insert`], the device seeing `base` as offset `first_offset`.
    pub fn insert_at_offset(
        &mut self,
        base: u64,
        len: u64,
        first_offset: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> super::Result<()> {
        if len == 0 {
            return Err(super::Error::EmptyBusRange { base });
        }
        if let Some(e) = self
            .entries
            .iter()
            .find(|e| base < e.base + e.len && e.base < base + len)
        {
            return Err(super::Error::BusOverlap {
                base,
                len,
                other_base: e.base,
                other_len: e.len,
            });
        }
        self.entries.push(Entry {
            base,
            len,
            first_offset,
            dev,
        });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| addr >= e.base && addr - e.base < e.len)
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some(e) => lock(&e.dev).read(addr - e.base + e.first_offset, data),
            None => {
                self.unknown_reads.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> IoAction {
        match self.find(addr) {
            Some(e) => lock(&e.dev).write(addr - e.base + e.first_offset, data),
            None => {
                self.unknown_writes.fetch_add(1, Ordering::Relaxed);
                IoAction::Continue
            }
        }
    }

    /// (unclaimed reads, unclaimed writes) so far.
    pub fn unknown_counts(&self) -> (u64, u64) {
        (
            self.unknown_reads.load(Ordering::Relaxed),
            self.unknown_writes.load(Ordering::Relaxed),
        )
    }
}

/// A device panicking mid-access must not wedge every other vCPU, so poisoning is ignored.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) -> IoAction {
            self.0 = data[0];
            IoAction::Continue
        }
    }

    #[test]
    fn routes_and_counts_unknown() {
        let mut bus = Bus::new();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Echo(1)))).unwrap();
        assert!(bus.insert(0x13, 1, Arc::new(Mutex::new(Echo(1)))).is_err());
        let mut b = [0u8; 1];
        bus.read(0x12, &mut b);
        assert_eq!(b, [3]);
        bus.write(0x10, &[5]);
        bus.read(0x10, &mut b);
        assert_eq!(b, [5]);
        let mut w = [0u8; 2];
        bus.read(0x20, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        assert_eq!(bus.write(0x20, &[1]), IoAction::Continue);
        assert_eq!(bus.unknown_counts(), (1, 1));
    }
}
