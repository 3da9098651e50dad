//! "Which guest pages were written since mark M": the one query diff packs, live pre-copy and
//! in-place reset build on.
//!
//! Two sources are merged, one bit per 4 KiB page, per RAM region:
//! - KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES` on every RAM slot, read and cleared with
//!   `KVM_GET_DIRTY_LOG`): what the vCPUs wrote, including what KVM's instruction emulator
//!   and page walker (accessed/dirty bits) wrote for them;
//! - vm-memory's [`AtomicBitmap`](vm_memory::bitmap::AtomicBitmap) of each region: what the
//!   VMM wrote through [`GuestMemoryMmap`](crate::memory::GuestMemoryMmap) (virtio used
//!   rings and status bytes, disk reads into guest buffers, entropy, the loaders).
//!
//! Both sources are cleared when read, so every read ("harvest") ORs what it found into
//! every mark still kept. A mark is a generation number: mark 0 is the moment the guest
//! memory was created (for a restore: the pack's state) and is always kept; `mark` starts a
//! new one, and the last [`MAX_MARKS`] of those are kept (an older one is refused by name).

use super::{Error, Result};
use std::collections::VecDeque;
use std::sync::Mutex;

/// Page size of both bitmaps.
pub const PAGE: u64 = 4096;
/// How many marks besides mark 0 are kept.
pub const MAX_MARKS: usize = 16;

/// The marks and what was written since each.
pub struct DirtyLog {
    inner: Mutex<Inner>,
}

struct Inner {
    /// `(gpa, size)` of every RAM region, in slot order.
    layout: Vec<(u64, u64)>,
    next: u64,
    marks: VecDeque<Mark>,
}

struct Mark {
    id: u64,
    /// Per region, one bit per page.
    bits: Vec<Vec<u64>>,
}

/// The pages written since a mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyPages {
    pub mark: u64,
    /// `(gpa, size)` per region.
    pub layout: Vec<(u64, u64)>,
    /// Per region, one bit per page (bit `i % 64` of word `i / 64` = page `i`).
    pub bits: Vec<Vec<u64>>,
}

impl DirtyPages {
    /// Number of pages written.
    pub fn count(&self) -> u64 {
        self.bits
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The written pages as `(gpa, bytes)` runs, in address order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (&(gpa, size), bits) in self.layout.iter().zip(&self.bits) {
            let pages = size / PAGE;
            for (w, &word) in bits.iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    let b = u64::from(word.trailing_zeros());
                    word &= word - 1;
                    let page = w as u64 * 64 + b;
                    if page >= pages {
                        break;
                    }
                    let at = gpa + page * PAGE;
                    match out.last_mut() {
                        Some((start, len)) if *start + *len == at => *len += PAGE,
                        _ => out.push((at, PAGE)),
                    }
                }
            }
        }
        out
    }
}

fn words(size: u64) -> usize {
    (size / PAGE).div_ceil(64) as usize
}

impl DirtyLog {
    /// A log for RAM of this layout, holding mark 0 (nothing written yet).
    pub fn new(layout: &[(u64, u64)]) -> DirtyLog {
        let bits = layout.iter().map(|&(_, s)| vec![0u64; words(s)]).collect();
        DirtyLog {
            inner: Mutex::new(Inner {
                layout: layout.to_vec(),
                next: 1,
                marks: VecDeque::from([Mark { id: 0, bits }]),
            }),
        }
    }

    /// Reads (and clears) both sources and adds what they held to every kept mark.
    /// `kvm(slot, size)` reads KVM's log of a slot; `vmm()` takes the VMM's bitmaps.
    fn harvest(
        inner: &mut Inner,
        kvm: &mut dyn FnMut(u32, u64) -> Result<Vec<u64>>,
        vmm: &mut dyn FnMut() -> Vec<Vec<u64>>,
    ) -> Result<()> {
        let mut fold = |region: usize, found: &[u64]| {
            for m in inner.marks.iter_mut() {
                for (d, s) in m.bits[region].iter_mut().zip(found) {
                    *d |= s;
                }
            }
        };
        // The VMM's bits first: they are never lost, whatever KVM answers.
        for (region, found) in vmm().iter().enumerate().take(inner.layout.len()) {
            fold(region, found);
        }
        // Each slot's bits are folded in as soon as KVM hands (and clears) them.
        for (region, &(_, size)) in inner.layout.clone().iter().enumerate() {
            let found = kvm(region as u32, size)?;
            fold(region, &found);
        }
        Ok(())
    }

    /// Starts a new mark and returns its number.
    pub fn mark_with(
        &self,
        kvm: &mut dyn FnMut(u32, u64) -> Result<Vec<u64>>,
        vmm: &mut dyn FnMut() -> Vec<Vec<u64>>,
    ) -> Result<u64> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::harvest(&mut inner, kvm, vmm)?;
        let id = inner.next;
        inner.next += 1;
        let bits = inner
            .layout
            .iter()
            .map(|&(_, s)| vec![0u64; words(s)])
            .collect();
        inner.marks.push_back(Mark { id, bits });
        // Mark 0 (the state the VM started from) stays: a reset needs it.
        while inner.marks.len() > MAX_MARKS + 1 {
            inner.marks.remove(1);
        }
        Ok(id)
    }

    /// Drops a mark no one will ask about again (a live save's round marks), so it does not
    /// push older marks that diff saves still need out of the [`MAX_MARKS`] kept. Mark 0
    /// and unknown marks are left alone.
    pub fn forget(&self, mark: u64) {
        if mark == 0 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.marks.retain(|m| m.id != mark);
    }

    /// The pages written since `mark`.
    pub fn since_with(
        &self,
        mark: u64,
        kvm: &mut dyn FnMut(u32, u64) -> Result<Vec<u64>>,
        vmm: &mut dyn FnMut() -> Vec<Vec<u64>>,
    ) -> Result<DirtyPages> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::harvest(&mut inner, kvm, vmm)?;
        let Some(m) = inner.marks.iter().find(|m| m.id == mark) else {
            let kept: Vec<u64> = inner.marks.iter().map(|m| m.id).collect();
            if mark >= inner.next {
                return Err(Error::NoSuchMark {
                    mark,
                    newest: inner.next - 1,
                });
            }
            return Err(Error::MarkGone {
                mark,
                first: kept.get(1).copied().unwrap_or(0),
                last: kept.last().copied().unwrap_or(0),
            });
        };
        Ok(DirtyPages {
            mark,
            layout: inner.layout.clone(),
            bits: m.bits.clone(),
        })
    }

    /// After the memory was put back to mark 0's state: forgets every other mark and what
    /// was written since mark 0 (after a harvest, so nothing written before is reported
    /// later).
    pub fn reset_with(
        &self,
        kvm: &mut dyn FnMut(u32, u64) -> Result<Vec<u64>>,
        vmm: &mut dyn FnMut() -> Vec<Vec<u64>>,
    ) -> Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::harvest(&mut inner, kvm, vmm)?;
        inner.marks.truncate(1);
        for w in inner.marks[0].bits.iter_mut().flatten() {
            *w = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: u32, size: u64) -> Result<Vec<u64>> {
        Ok(vec![0; words(size)])
    }

    #[test]
    fn marks_merge_both_sources_and_ranges_coalesce() {
        let layout = [(0, 1 << 20), (4 << 30, 256 << 10)];
        let log = DirtyLog::new(&layout);
        // KVM: pages 1 and 2 of region 0; VMM: page 3 of region 0 and page 0 of region 1.
        let mut kvm = |slot: u32, size: u64| -> Result<Vec<u64>> {
            let mut v = vec![0; words(size)];
            if slot == 0 {
                v[0] = 0b110;
            }
            Ok(v)
        };
        let mut vmm = || vec![vec![0b1000, 0, 0, 0], vec![1]];
        let m1 = log.mark_with(&mut kvm, &mut vmm).unwrap();
        assert_eq!(m1, 1);
        let p0 = log.since_with(0, &mut none, &mut Vec::new).unwrap();
        assert_eq!(p0.ranges(), vec![(0x1000, 0x3000), (4 << 30, 0x1000)]);
        assert_eq!(p0.count(), 4);
        // Mark 1 started after those writes.
        let p1 = log.since_with(1, &mut none, &mut Vec::new).unwrap();
        assert_eq!(p1.count(), 0);
        let mut vmm = || vec![vec![0, 0, 0, 1 << 63], vec![]];
        let p1 = log.since_with(1, &mut none, &mut vmm).unwrap();
        assert_eq!(p1.ranges(), vec![(255 * 4096, 4096)]);
        assert_eq!(
            log.since_with(0, &mut none, &mut Vec::new).unwrap().count(),
            5
        );
        let err = log.since_with(9, &mut none, &mut Vec::new).unwrap_err();
        assert_eq!(err.to_string(), "there is no mark 9 yet (the newest is 1)");
        for _ in 0..MAX_MARKS {
            log.mark_with(&mut none, &mut Vec::new).unwrap();
        }
        let err = log.since_with(1, &mut none, &mut Vec::new).unwrap_err();
        assert_eq!(
            err.to_string(),
            "mark 1 is no longer kept (kept: 0 and 2..=17)"
        );
        // Mark 0 stays.
        assert_eq!(
            log.since_with(0, &mut none, &mut Vec::new).unwrap().count(),
            5
        );
        log.reset_with(&mut none, &mut Vec::new).unwrap();
        assert_eq!(
            log.since_with(0, &mut none, &mut Vec::new).unwrap().count(),
            0
        );
        assert!(log.since_with(17, &mut none, &mut Vec::new).is_err());
    }

    #[test]
    fn forgotten_marks_leave_room_for_older_ones() {
        let log = DirtyLog::new(&[(0, 1 << 20)]);
        let kept = log.mark_with(&mut none, &mut Vec::new).unwrap();
        // A live save's rounds: many marks, each forgotten once the next exists.
        let mut prev = log.mark_with(&mut none, &mut Vec::new).unwrap();
        for _ in 0..3 * MAX_MARKS {
            let next = log.mark_with(&mut none, &mut Vec::new).unwrap();
            log.forget(prev);
            prev = next;
        }
        assert!(log.since_with(kept, &mut none, &mut Vec::new).is_ok());
        assert!(log.since_with(prev, &mut none, &mut Vec::new).is_ok());
        log.forget(0);
        assert!(log.since_with(0, &mut none, &mut Vec::new).is_ok());
    }

    #[test]
    fn a_failing_kvm_read_keeps_what_was_read() {
        let log = DirtyLog::new(&[(0, 1 << 20), (4 << 30, 1 << 20)]);
        let mut kvm = |slot: u32, size: u64| -> Result<Vec<u64>> {
            if slot == 1 {
                return Err(Error::Layout("KVM_GET_DIRTY_LOG failed".into()));
            }
            let mut v = vec![0; words(size)];
            v[0] = 1;
            Ok(v)
        };
        let mut vmm = || vec![vec![2], vec![]];
        assert!(log.mark_with(&mut kvm, &mut vmm).is_err());
        let p = log.since_with(0, &mut none, &mut Vec::new).unwrap();
        assert_eq!(p.ranges(), vec![(0, 0x2000)]);
    }
}
