//! The guest resources devices are given: MMIO windows in the hole below 4 GiB and interrupt
//! lines (GSIs, which are IOAPIC pins under KVM's default routing).
//!
//! Allocation is first-fit and deterministic, so the same devices registered in the same
//! order get the same places; a restore also replays the saved places exactly
//! ([`RangeAllocator::allocate_at`]), which vm-allocator's `IdAllocator` cannot do.

/// Why a bus range or an interrupt line could not be handed out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("no room for {size:#x} more in the {what} range {start:#x}..{end:#x}")]
    Full {
        what: &'static str,
        size: u64,
        start: u64,
        end: u64,
    },
    #[error("{what} {at:#x}+{size:#x} is taken or outside {start:#x}..{end:#x}")]
    Taken {
        what: &'static str,
        at: u64,
        size: u64,
        start: u64,
        end: u64,
    },
    #[error("no free interrupt line (GSIs {0:?} are all taken)")]
    NoGsi(std::ops::Range<u32>),
    #[error("ISA GSI {0} is taken or not an ISA line")]
    IsaGsi(u32),
}

type Result<T> = std::result::Result<T, AllocError>;
use std::ops::Range;

/// First virtio-mmio window.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Room for device MMIO windows (up to the IOAPIC at 0xfec00000 there is far more; this
/// keeps the tables small and matches what the GSIs allow).
pub const MMIO_LEN: u64 = 0x10_0000;
/// GSIs handed to devices that are not ISA legacy (0-15 are the ISA IRQs, 4 is COM1).
pub const DYNAMIC_GSIS: Range<u32> = 5..24;
/// GSIs of the IOAPIC (24 pins, GSI base 0).
pub const MAX_GSI: u32 = 23;

/// Hands out disjoint sub-ranges of one range.
#[derive(Clone, Debug)]
pub struct RangeAllocator {
    what: &'static str,
    range: Range<u64>,
    used: Vec<Range<u64>>,
}

impl RangeAllocator {
    pub fn new(what: &'static str, range: Range<u64>) -> Self {
        RangeAllocator {
            what,
            range,
            used: Vec::new(),
        }
    }

    fn free(&self, r: &Range<u64>) -> bool {
        r.start >= self.range.start
            && r.end <= self.range.end
            && self
                .used
                .iter()
                .all(|u| r.end <= u.start || u.end <= r.start)
    }

    /// The lowest free `size`-long range aligned to `align` (a power of two).
    pub fn allocate(&mut self, size: u64, align: u64) -> Result<u64> {
        let mut at = self.range.start.next_multiple_of(align);
        while at.checked_add(size).is_some_and(|e| e <= self.range.end) {
            let r = at..at + size;
            match self
                .used
                .iter()
                .find(|u| r.start < u.end && u.start < r.end)
            {
                None => {
                    self.used.push(r);
                    return Ok(at);
                }
                Some(u) => at = u.end.next_multiple_of(align),
            }
        }
        Err(AllocError::Full {
            what: self.what,
            size,
            start: self.range.start,
            end: self.range.end,
        })
    }

    /// Exactly `at..at + size`, which must be free.
    pub fn allocate_at(&mut self, at: u64, size: u64) -> Result<u64> {
        let r = at..at.saturating_add(size);
        if size == 0 || !self.free(&r) {
            return Err(AllocError::Taken {
                what: self.what,
                at,
                size,
                start: self.range.start,
                end: self.range.end,
            });
        }
        self.used.push(r);
        Ok(at)
    }
}

/// Everything the device manager hands out.
#[derive(Clone, Debug)]
pub struct Resources {
    pub mmio: RangeAllocator,
    /// Dynamic GSIs ([`DYNAMIC_GSIS`]).
    pub gsi: RangeAllocator,
    /// Fixed ISA GSIs claimed by legacy devices.
    legacy_gsis: Vec<u32>,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            mmio: RangeAllocator::new("MMIO", MMIO_BASE..MMIO_BASE + MMIO_LEN),
            gsi: RangeAllocator::new(
                "GSI",
                u64::from(DYNAMIC_GSIS.start)..u64::from(DYNAMIC_GSIS.end),
            ),
            legacy_gsis: Vec::new(),
        }
    }
}

impl Resources {
    pub fn allocate_gsi(&mut self) -> Result<u32> {
        self.gsi
            .allocate(1, 1)
            .map(|g| g as u32)
            .map_err(|_| AllocError::NoGsi(DYNAMIC_GSIS))
    }

    /// A legacy device's fixed ISA interrupt line.
    pub fn claim_legacy_gsi(&mut self, gsi: u32) -> Result<u32> {
        if gsi >= DYNAMIC_GSIS.start || self.legacy_gsis.contains(&gsi) {
            return Err(AllocError::IsaGsi(gsi));
        }
        self.legacy_gsis.push(gsi);
        Ok(gsi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_aligned_and_exact() {
        let mut a = RangeAllocator::new("MMIO", 0x1000..0x5000);
        assert_eq!(a.allocate(0x1000, 0x1000).unwrap(), 0x1000);
        assert_eq!(a.allocate_at(0x3000, 0x1000).unwrap(), 0x3000);
        assert_eq!(a.allocate(0x1000, 0x1000).unwrap(), 0x2000);
        assert_eq!(a.allocate(0x1000, 0x1000).unwrap(), 0x4000);
        assert!(a.allocate(0x1000, 0x1000).is_err());
        assert!(a.allocate_at(0x2000, 0x10).is_err());
        let mut r = Resources::default();
        assert_eq!(r.allocate_gsi().unwrap(), 5);
        assert_eq!(r.claim_legacy_gsi(4).unwrap(), 4);
        assert!(r.claim_legacy_gsi(4).is_err());
        assert!(r.claim_legacy_gsi(5).is_err());
        for g in 6..=MAX_GSI {
            assert_eq!(r.allocate_gsi().unwrap(), g);
        }
        assert!(r
            .allocate_gsi()
            .unwrap_err()
            .to_string()
            .contains("no free"));
    }
}
