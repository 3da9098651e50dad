//! Live save (`vmpack save --live`, `"live": true`): guest memory is copied in pre-copy
//! rounds while the guest runs, and the guest pauses only for the pages written since the
//! last round and the device state (docs/ARCHITECTURE.md, "Live save").
//!
//! A full live save writes each RAM region into the pack straight from guest RAM while the
//! guest runs (the base), and the rounds copy only the chunks written since into a sparse
//! buffer, written after the pause as one overlay section per region (docs/FORMAT.md §12,
//! "Live saves"): the saving process holds the guest's writes during the save, not a copy of
//! its RAM. A live diff save copies the chunks written since its parent into a private copy
//! and writes an ordinary diff pack from it after the pause.

use crate::api::{LiveRound, LiveStats, SaveStats};
use crate::packs::{Context, Error, Result};
use crate::packs::{DISK_CHUNK_SIZE, MEMORY_CHUNK_SIZE};
use crate::snapshot::{copy_fits, write_pack, RamCopy};
use crate::vmm::VmHandle;
use crate::vstate::dirty::{DirtyPages, PAGE};
use std::io::Write;
use std::ops::Range;
use std::time::{Duration, Instant};
use vmpack_formats::diff::{ChunkMap, ParentRef};
use vmpack_formats::pack::{Compression, SectionSource};

/// Pre-copy rounds at most (the first, which copies all resident memory, included). Each
/// round holds one dirty mark for its duration only.
pub const MAX_ROUNDS: usize = 8;

/// What the planner decides after a round.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Copy the pages written since the last round, guest running.
    Round,
    /// Pause now; with `Some`, the pause is expected to exceed the target, and why.
    Pause(Option<String>),
}

/// Decides whether another pre-copy round is worth it. `rounds` were done so far, the last
/// one copied `last_bytes`; `dirty` bytes were written since; copies ran at `bytes_per_s`.
/// The pause is estimated as `dirty / bytes_per_s`: pause when that meets `target`; pause
/// anyway (the documented fallback) after [`MAX_ROUNDS`] rounds, or when the written set
/// stopped shrinking (the guest writes as fast as the copy runs: more rounds would not
/// converge).
pub fn plan_next(
    rounds: usize,
    last_bytes: u64,
    dirty: u64,
    bytes_per_s: f64,
    target: Duration,
) -> Next {
    let estimate = if bytes_per_s > 0.0 {
        Duration::from_secs_f64(dirty as f64 / bytes_per_s)
    } else {
        Duration::MAX
    };
    if estimate <= target {
        return Next::Pause(None);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let why = if rounds >= MAX_ROUNDS {
        format!("after {rounds} pre-copy rounds")
    } else if dirty >= last_bytes {
        format!(
            "the guest wrote {dirty} bytes during a round that copied {last_bytes}: its writes outpace the copy"
        )
    } else {
        return Next::Round;
    };
    Next::Pause(Some(format!(
        "{why}, about {dirty} bytes were still to copy (estimated pause {:.1} ms, target {:.1} ms): paused anyway",
        ms(estimate),
        ms(target)
    )))
}

/// Saves the running VM behind `handle` live (see the module doc) to `out`; with
/// `diff_from`, a diff pack (`crate::diff`) whose rounds copy only the chunks written since
/// that parent. Disks are frozen at the pause, as in an ordinary save
/// (`crate::disk_snapshot`), and read while the guest runs on. Where a live save cannot
/// help, it is an ordinary save, with `live.warning` saying why: the VM does not resume
/// afterwards, or a copy of guest RAM would not fit in memory.
pub fn save(
    handle: &VmHandle,
    compression: Compression,
    level: Option<i32>,
    resume_after: bool,
    max_pause: Duration,
    diff_from: Option<&ParentRef>,
    out: &mut dyn Write,
) -> Result<SaveStats> {
    // Refused before anything: the VM must know the parent.
    let parent_mark = match diff_from {
        Some(p) => Some(
            handle
                .pack_mark(&p.root_digest)
                .ok_or_else(|| crate::diff::unknown_parent(&p.root_digest))?,
        ),
        None => None,
    };
    let ordinary = |why: &str, out: &mut dyn Write| -> Result<SaveStats> {
        let mut st =
            crate::snapshot::save_with(handle, compression, level, resume_after, diff_from, out)?;
        st.live = Some(LiveStats {
            max_pause_ms: ms(max_pause),
            max_pause_met: st.pause_ms <= ms(max_pause),
            rounds: Vec::new(),
            final_bytes: 0,
            warning: Some(format!("{why}: saved without pre-copy")),
        });
        Ok(st)
    };
    if !resume_after {
        return ordinary(
            "the VM does not run on after this save (it was paused, or it stops)",
            out,
        );
    }
    // A lazily restored guest's memory is complete (and checked) only once every chunk is
    // placed; one whose pack failed verification is never saved.
    if let Some(e) = handle.memory_failure() {
        return Err(Error::Refused(e));
    }
    // A live diff save keeps the copy below: its copy is only the chunks written since the
    // parent. A full live save writes its base straight from guest RAM into the pack.
    if diff_from.is_none() {
        return save_overlay(handle, compression, level, max_pause, out);
    }
    let mut prev = handle.dirty_mark()?;
    // Taken after the mark: a page that becomes resident (or is written) later is dirty.
    // A diff copies whole chunks (the pack stores chunks): first every chunk written since
    // the parent; `held` is the chunks copied whole so far.
    let mut held = match parent_mark {
        Some(m) => match crate::diff::changed_chunks(handle, m, MEMORY_CHUNK_SIZE) {
            Ok(maps) => Some(maps),
            Err(e) => {
                handle.dirty_forget(prev);
                return Err(e);
            }
        },
        None => None,
    };
    let first_runs: Vec<Vec<Range<u64>>> = match &held {
        Some(maps) => maps
            .iter()
            .map(|m| crate::diff::intersect(std::slice::from_ref(&(0..m.region_size)), m))
            .collect(),
        None => handle.memory_data_ranges(),
    };
    let to_copy = first_runs.iter().flatten().map(|r| r.end - r.start).sum();
    if !copy_fits(handle, Some(to_copy)) {
        handle.dirty_forget(prev);
        return ordinary(
            "a copy of guest memory would take more than half of this host's available memory",
            out,
        );
    }
    let regions = handle.raw_memory();
    let mut copies = regions
        .iter()
        .map(|&(gpa, _, len)| RamCopy::new(gpa, len))
        .collect::<Result<Vec<_>>>()?;
    let resident = first_runs;
    let t = Instant::now();
    let first = copy_runs(&regions, &copies, &resident);
    let mut rounds = vec![LiveRound {
        bytes: first,
        ms: ms(t.elapsed()),
    }];
    for (c, r) in copies.iter_mut().zip(resident) {
        c.ranges = r;
    }
    let (mut copied, mut copy_time) = (first, t.elapsed());
    let warning = loop {
        let rate = copied as f64 / copy_time.as_secs_f64().max(1e-6);
        let dirty = handle.dirty_since(prev)?.count() * PAGE;
        let last = rounds.last().map_or(0, |r| r.bytes);
        match plan_next(rounds.len(), last, dirty, rate, max_pause) {
            Next::Pause(w) => break w,
            Next::Round => {
                let next = handle.dirty_mark()?;
                let pages = handle.dirty_since(prev)?;
                handle.dirty_forget(prev);
                prev = next;
                let runs = widen(region_runs(&pages, &regions), held.as_deref_mut());
                let t = Instant::now();
                let n = copy_runs(&regions, &copies, &runs);
                rounds.push(LiveRound {
                    bytes: n,
                    ms: ms(t.elapsed()),
                });
                copied += n;
                copy_time += t.elapsed();
                add_ranges(&mut copies, runs);
            }
        }
    };

    let t = Instant::now();
    handle.pause()?;
    let captured = (|| -> Result<_> {
        let state = handle
            .save_state()
            .context("capturing vCPU and device state")?;
        // The pack reads each disk as of this instant, whatever the guest writes once it
        // runs again (`crate::disk_snapshot`).
        let disks = handle.freeze_disks()?;
        // Guest memory now equals the pack being written: later diffs start here.
        let mark = handle.dirty_mark()?;
        let pages = handle.dirty_since(prev)?;
        let mut runs = widen(region_runs(&pages, &regions), held.as_deref_mut());
        // The diff's chunks, as of this instant: every one was copied whole by a round (the
        // rounds' marks cover the time since the parent), which `missing` double-checks.
        let maps = match parent_mark {
            Some(m) => {
                let maps = crate::diff::changed_chunks(handle, m, MEMORY_CHUNK_SIZE)?;
                if let Some(held) = &held {
                    missing(&maps, held, &mut runs);
                }
                Some(maps)
            }
            None => None,
        };
        let disk_maps = match parent_mark {
            Some(m) => crate::diff::changed_disk_chunks(handle, m, DISK_CHUNK_SIZE),
            None => Vec::new(),
        };
        let n = copy_runs(&regions, &copies, &runs);
        Ok((state, mark, runs, n, (disks, disk_maps), maps))
    })();
    let resumed = handle.resume();
    let pause = t.elapsed();
    handle.dirty_forget(prev);
    let (state, mark, runs, final_bytes, (disks, disk_maps), maps) = captured?;
    resumed?;
    // Serialized after the pause: the captured state is a plain value.
    let state_bytes = serde_json::to_vec(&state).map_err(|source| Error::Encode {
        what: "serializing the vm state".into(),
        source,
    })?;
    add_ranges(&mut copies, runs);

    let memory: Vec<(u64, &dyn SectionSource)> = copies
        .iter()
        .map(|c| (c.gpa, c as &dyn SectionSource))
        .collect();
    let disk_sources: Vec<&dyn SectionSource> =
        disks.iter().map(|d| d as &dyn SectionSource).collect();
    let diff_bytes = maps
        .as_ref()
        .map(|m| m.iter().map(|m| m.section_size()).sum());
    let diff = match (diff_from, maps) {
        (Some(p), Some(m)) => Some((p.clone(), m, disk_maps)),
        _ => None,
    };
    let written = write_pack(
        handle,
        &state_bytes,
        (memory, disk_sources),
        diff,
        compression,
        level,
        out,
    );
    let disk_kept_bytes = disks.iter().map(|d| d.kept_bytes()).sum();
    // The freeze ends with the pack (written or not): kept old content is dropped.
    drop(disks);
    let summary = written?;
    let pause_ms = ms(pause);
    Ok(SaveStats {
        pause_ms,
        bytes: summary.bytes_written,
        root_digest: hex::encode(summary.root_digest),
        compress: compression,
        parent: diff_from.map(|p| p.root_digest.clone()),
        diff_bytes,
        disk_kept_bytes,
        live: Some(live_stats(
            pause_ms,
            max_pause,
            rounds,
            final_bytes,
            warning,
        )),
        mark: Some(mark),
    })
}

/// A live save's figures: the pause against its target, and the warning a missed target
/// carries (the fallback's own, else the pause's).
fn live_stats(
    pause_ms: f64,
    max_pause: Duration,
    rounds: Vec<LiveRound>,
    final_bytes: u64,
    warning: Option<String>,
) -> LiveStats {
    let met = pause_ms <= ms(max_pause);
    let warning = match (met, warning) {
        (true, _) => None,
        (false, Some(w)) => Some(w),
        (false, None) => Some(format!(
            "the pause took {pause_ms:.1} ms, over the {:.1} ms target: the {final_bytes} bytes written since the last round and the device state took longer than estimated",
            ms(max_pause)
        )),
    };
    LiveStats {
        max_pause_ms: ms(max_pause),
        max_pause_met: met,
        rounds,
        final_bytes,
        warning,
    }
}

/// A full live save (FORMAT.md §12, "Live saves"): the pack's base memory sections are
/// written straight from guest RAM while the guest runs (a dirty mark taken just before);
/// the rounds then copy only the chunks written since that mark into a sparse buffer (each
/// chunk whole the first time, then only its written pages), and the pause the last pages;
/// the buffer becomes the overlays, written after the vmstate, then the frozen disks.
fn save_overlay(
    handle: &VmHandle,
    compression: Compression,
    level: Option<i32>,
    max_pause: Duration,
    out: &mut dyn Write,
) -> Result<SaveStats> {
    let regions = handle.raw_memory();
    let cs = u64::from(MEMORY_CHUNK_SIZE);
    let mut prev = handle.dirty_mark()?;
    let t = Instant::now();
    // Taken after the mark: a page that becomes resident later is dirty.
    let base: Vec<LiveRam> = regions
        .iter()
        .zip(handle.memory_data_ranges())
        .map(|(&(gpa, ptr, len), ranges)| LiveRam {
            gpa,
            ptr,
            len,
            ranges,
        })
        .collect();
    let base_bytes: u64 = base
        .iter()
        .flat_map(|b| &b.ranges)
        .map(|r| r.end - r.start)
        .sum();
    let memory: Vec<(u64, &dyn SectionSource)> = base
        .iter()
        .map(|b| (b.gpa, b as &dyn SectionSource))
        .collect();
    let head = crate::snapshot::write_live_head(
        handle,
        memory,
        &handle.disk_sizes(),
        compression,
        level,
        out,
    );
    let (tail, initrd) = match head {
        Ok(h) => h,
        Err(e) => {
            handle.dirty_forget(prev);
            return Err(e);
        }
    };
    let base_time = t.elapsed();
    let mut rounds = vec![LiveRound {
        bytes: base_bytes,
        ms: ms(base_time),
    }];
    let mut held: Vec<ChunkMap> = regions
        .iter()
        .map(|&(_, _, len)| ChunkMap::new(len as u64, cs))
        .collect();
    let buffer = regions
        .iter()
        .map(|&(gpa, _, len)| RamCopy::new(gpa, len))
        .collect::<Result<Vec<_>>>();
    let mut buffer = match buffer {
        Ok(b) => b,
        Err(e) => {
            handle.dirty_forget(prev);
            return Err(e);
        }
    };
    // Until a round into the buffer was timed, the base pass's speed (hashing and writing
    // included) is the estimate: slower than a copy, so at worst one round too many.
    let (mut copied, mut copy_time) = (base_bytes, base_time);
    let mut timed_copy = false;
    let warning = loop {
        let rate = copied as f64 / copy_time.as_secs_f64().max(1e-6);
        let dirty = match handle.dirty_since(prev) {
            Ok(d) => d.count() * PAGE,
            Err(e) => {
                handle.dirty_forget(prev);
                return Err(e.into());
            }
        };
        let last = rounds.last().map_or(0, |r| r.bytes);
        match plan_next(rounds.len(), last, dirty, rate, max_pause) {
            Next::Pause(w) => break w,
            Next::Round => {
                let held_bytes: u64 = held.iter().map(|m| m.section_size()).sum();
                if !crate::snapshot::copy_fits(handle, Some(held_bytes + dirty)) {
                    break Some(format!(
                        "the chunks written since the base pass ({held_bytes} bytes held, about {dirty} more) would take more than half of this host's available memory: paused anyway"
                    ));
                }
                let next = match handle.dirty_mark() {
                    Ok(n) => n,
                    Err(e) => {
                        handle.dirty_forget(prev);
                        return Err(e.into());
                    }
                };
                let pages = handle.dirty_since(prev);
                handle.dirty_forget(prev);
                prev = next;
                let pages = match pages {
                    Ok(p) => p,
                    Err(e) => {
                        handle.dirty_forget(prev);
                        return Err(e.into());
                    }
                };
                let runs = widen(region_runs(&pages, &regions), Some(&mut held));
                let t = Instant::now();
                let n = copy_runs(&regions, &buffer, &runs);
                rounds.push(LiveRound {
                    bytes: n,
                    ms: ms(t.elapsed()),
                });
                if !timed_copy {
                    (copied, copy_time, timed_copy) = (0, Duration::ZERO, true);
                }
                copied += n;
                copy_time += t.elapsed();
            }
        }
    };

    let t = Instant::now();
    if let Err(e) = handle.pause() {
        handle.dirty_forget(prev);
        return Err(e.into());
    }
    let captured = (|| -> Result<_> {
        let state = handle
            .save_state()
            .context("capturing vCPU and device state")?;
        let disks = handle.freeze_disks()?;
        // Guest memory now equals the pack being written: later diffs start here.
        let mark = handle.dirty_mark()?;
        let pages = handle.dirty_since(prev)?;
        let runs = widen(region_runs(&pages, &regions), Some(&mut held));
        let n = copy_runs(&regions, &buffer, &runs);
        Ok((state, mark, n, disks))
    })();
    let resumed = handle.resume();
    let pause = t.elapsed();
    handle.dirty_forget(prev);
    let (state, mark, final_bytes, disks) = captured?;
    resumed?;
    let state_bytes = serde_json::to_vec(&state).map_err(|source| Error::Encode {
        what: "serializing the vm state".into(),
        source,
    })?;
    for (b, m) in buffer.iter_mut().zip(&held) {
        b.ranges = merge(
            Vec::new(),
            m.present().into_iter().map(|c| m.chunk_range(c)).collect(),
        );
    }
    // The manifest records the initrd in the base memory: true only if none of its chunks
    // was written since the mark (their base bytes are then those of the pause).
    if let Some((gpa, len)) = initrd {
        let written = regions.iter().zip(&held).any(|(&(base, _, size), m)| {
            let (start, end) = (gpa.max(base), (gpa + len).min(base + size as u64));
            start < end && ((start - base) / cs..=(end - 1 - base) / cs).any(|c| m.get(c))
        });
        if written {
            return Err(Error::Refused(format!(
                "live save: the guest wrote into its initrd at {gpa:#x} (which this pack records in guest memory) while the pack was written; save again (the initrd is then stored as a file)"
            )));
        }
    }
    let overlays: Vec<(ChunkMap, &dyn SectionSource)> = held
        .iter()
        .cloned()
        .zip(buffer.iter().map(|b| b as &dyn SectionSource))
        .collect();
    let disk_sources: Vec<&dyn SectionSource> =
        disks.iter().map(|d| d as &dyn SectionSource).collect();
    let written = tail.finish(&state_bytes, overlays, disk_sources, &());
    let disk_kept_bytes = disks.iter().map(|d| d.kept_bytes()).sum();
    drop(disks);
    let summary = written?;
    let pause_ms = ms(pause);
    Ok(SaveStats {
        pause_ms,
        bytes: summary.bytes_written,
        root_digest: hex::encode(summary.root_digest),
        compress: compression,
        parent: None,
        diff_bytes: None,
        disk_kept_bytes,
        live: Some(live_stats(
            pause_ms,
            max_pause,
            rounds,
            final_bytes,
            warning,
        )),
        mark: Some(mark),
    })
}

/// A guest RAM region read while the guest runs: a chunk may be torn, which is harmless
/// because every page written after the dirty mark goes into the overlay.
struct LiveRam {
    gpa: u64,
    ptr: *const u8,
    len: usize,
    ranges: Vec<Range<u64>>,
}

// SAFETY: the pointer is guest RAM, mapped for the VM's lifetime, which the save outlives
// (it holds the handle); it is only read.
unsafe impl Sync for LiveRam {}
// SAFETY: see Sync.
unsafe impl Send for LiveRam {}

impl SectionSource for LiveRam {
    fn len(&self) -> u64 {
        self.len as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len as u64)
            .ok_or_else(|| std::io::Error::other("read past the end of guest RAM"))?;
        debug_assert!(end <= self.len as u64);
        // SAFETY: inside the region (checked). The guest may write these bytes meanwhile:
        // the copy then holds some mix, which the overlay supersedes (see the struct doc).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }
    fn data_ranges(&self) -> std::io::Result<Vec<Range<u64>>> {
        Ok(self.ranges.clone())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The pages of `d`, per region of `regions` (by gpa), as byte ranges within the region.
pub fn region_runs(d: &DirtyPages, regions: &[(u64, *const u8, usize)]) -> Vec<Vec<Range<u64>>> {
    regions
        .iter()
        .map(|&(gpa, _, size)| {
            let Some(i) = d.layout.iter().position(|&(g, _)| g == gpa) else {
                // A region the log does not know: copy it whole (never happens: one layout).
                return std::iter::once(0..size as u64).collect();
            };
            let pages = size as u64 / PAGE;
            let mut runs: Vec<Range<u64>> = Vec::new();
            for (w, &word) in d.bits[i].iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    let page = w as u64 * 64 + u64::from(word.trailing_zeros());
                    word &= word - 1;
                    if page >= pages {
                        break;
                    }
                    let at = page * PAGE;
                    match runs.last_mut() {
                        Some(r) if r.end == at => r.end += PAGE,
                        _ => runs.push(at..at + PAGE),
                    }
                }
            }
            runs
        })
        .collect()
}

/// For a diff save (`held`, per region, the chunks already copied whole): `runs` with each
/// chunk not yet held widened to the whole chunk (and marked held), since the pack stores
/// whole chunks and a chunk's other pages are copied only now. Without `held`, `runs`.
fn widen(runs: Vec<Vec<Range<u64>>>, held: Option<&mut [ChunkMap]>) -> Vec<Vec<Range<u64>>> {
    let Some(held) = held else { return runs };
    runs.into_iter()
        .zip(held.iter_mut())
        .map(|(rs, m)| {
            let mut out = Vec::with_capacity(rs.len());
            for r in rs.into_iter().filter(|r| r.start < r.end) {
                for c in r.start / m.chunk_size..=(r.end - 1) / m.chunk_size {
                    let whole = m.chunk_range(c);
                    if m.get(c) {
                        out.push(r.start.max(whole.start)..r.end.min(whole.end));
                    } else {
                        m.set(c);
                        out.push(whole);
                    }
                }
            }
            merge(Vec::new(), out)
        })
        .collect()
}

/// Adds to `runs` any chunk of `maps` that `held` lacks (none, when the rounds' dirty marks
/// cover the time since the parent, as they do).
fn missing(maps: &[ChunkMap], held: &[ChunkMap], runs: &mut [Vec<Range<u64>>]) {
    for ((m, h), r) in maps.iter().zip(held).zip(runs.iter_mut()) {
        let lacking: Vec<Range<u64>> = m
            .present()
            .into_iter()
            .filter(|&c| !h.get(c))
            .map(|c| m.chunk_range(c))
            .collect();
        if !lacking.is_empty() {
            *r = merge(std::mem::take(r), lacking);
        }
    }
}

/// Adds `runs` (per region) to the ranges each copy holds data in.
fn add_ranges(copies: &mut [RamCopy], runs: Vec<Vec<Range<u64>>>) {
    for (c, r) in copies.iter_mut().zip(runs) {
        if !r.is_empty() {
            c.ranges = merge(std::mem::take(&mut c.ranges), r);
        }
    }
}

/// The union of two lists of ranges, sorted and merged.
pub fn merge(mut a: Vec<Range<u64>>, b: Vec<Range<u64>>) -> Vec<Range<u64>> {
    a.extend(b);
    a.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(a.len());
    for r in a.into_iter().filter(|r| r.start < r.end) {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Copies `runs` (per region) from guest RAM into the copies, on every core; returns the
/// bytes copied. The guest may be running: a page it writes meanwhile is in the dirty log
/// and copied again by a later round or during the pause, so a torn copy never reaches the
/// pack.
fn copy_runs(
    regions: &[(u64, *const u8, usize)],
    copies: &[RamCopy],
    runs: &[Vec<Range<u64>>],
) -> u64 {
    const PIECE: u64 = 8 << 20;
    let mut pieces: Vec<(usize, Range<u64>)> = Vec::new();
    for (i, rs) in runs.iter().enumerate() {
        let size = regions.get(i).map_or(0, |r| r.2 as u64);
        for r in rs {
            let (start, end) = (r.start.min(size), r.end.min(size));
            let mut a = start;
            while a < end {
                let b = (a + PIECE).min(end);
                pieces.push((i, a..b));
                a = b;
            }
        }
    }
    let total = pieces.iter().map(|(_, r)| r.end - r.start).sum();
    let src: Vec<usize> = regions.iter().map(|r| r.1 as usize).collect();
    let dst: Vec<usize> = copies.iter().map(|c| c.ptr as usize).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let worker = || loop {
        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some((i, r)) = pieces.get(n) else { break };
        let (a, len) = (r.start as usize, (r.end - r.start) as usize);
        // SAFETY: `a..a+len` lies inside region i (clipped above) and its same-sized copy;
        // pieces never overlap. The source may change under the copy (see above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                (src[*i] as *const u8).add(a),
                (dst[*i] as *mut u8).add(a),
                len,
            )
        };
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for _ in 1..threads.min(pieces.len()) {
            match std::thread::Builder::new().spawn_scoped(s, worker) {
                Ok(h) => handles.push(h),
                Err(_) => break,
            }
        }
        worker();
        for h in handles {
            let _ = h.join();
        }
    });
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn pauses_when_the_estimate_meets_the_target() {
        // 1 MB at 1 GB/s: 1 ms.
        assert_eq!(
            plan_next(1, 600 << 20, 1 << 20, 1e9, 20 * MS),
            Next::Pause(None)
        );
        assert_eq!(
            plan_next(3, 4 << 20, 0, 1e9, Duration::ZERO),
            Next::Pause(None)
        );
    }

    #[test]
    fn another_round_while_the_dirty_set_shrinks() {
        // 100 MB at 1 GB/s: 100 ms > 20 ms, and fewer than the 600 MB of the last round.
        assert_eq!(
            plan_next(1, 600 << 20, 100 << 20, 1e9, 20 * MS),
            Next::Round
        );
        assert_eq!(
            plan_next(MAX_ROUNDS - 1, 200 << 20, 100 << 20, 1e9, 20 * MS),
            Next::Round
        );
    }

    #[test]
    fn falls_back_after_max_rounds_or_without_convergence() {
        let Next::Pause(Some(w)) = plan_next(MAX_ROUNDS, 200 << 20, 100 << 20, 1e9, 20 * MS) else {
            panic!("expected the fallback");
        };
        assert!(w.contains("after 8 pre-copy rounds"), "{w}");
        let Next::Pause(Some(w)) = plan_next(2, 50 << 20, 60 << 20, 1e9, 20 * MS) else {
            panic!("expected the fallback");
        };
        assert!(w.contains("outpace"), "{w}");
        // No throughput measured yet: never a 0 ms estimate.
        assert!(matches!(
            plan_next(1, 1, 1, 0.0, 20 * MS),
            Next::Pause(Some(_))
        ));
    }

    #[test]
    fn dirty_bits_become_runs_per_region() {
        let d = DirtyPages {
            mark: 1,
            layout: vec![(0, 8 * PAGE), (1 << 32, 4 * PAGE)],
            bits: vec![vec![0b1100_0110], vec![0b1001]],
        };
        let regions = [
            (0u64, std::ptr::null(), 8 * PAGE as usize),
            (1u64 << 32, std::ptr::null(), 4 * PAGE as usize),
        ];
        let runs = region_runs(&d, &regions);
        assert_eq!(
            runs,
            vec![
                vec![PAGE..3 * PAGE, 6 * PAGE..8 * PAGE],
                vec![0..PAGE, 3 * PAGE..4 * PAGE]
            ]
        );
    }

    #[test]
    fn a_diff_copies_a_chunk_whole_the_first_time_then_only_its_pages() {
        let mut m = ChunkMap::new(64, 16);
        m.set(1);
        let mut held = vec![m];
        let runs = widen(vec![vec![4..8, 20..24, 30..36]], Some(&mut held));
        // Chunk 0 is new: whole; chunk 1 is held: its pages; 32..36 starts chunk 2: whole.
        assert_eq!(runs, vec![vec![0..16, 20..24, 30..48]]);
        assert_eq!(held[0].present(), vec![0, 1, 2]);
        let again = widen(vec![vec![4..8]], Some(&mut held));
        assert_eq!(again, vec![vec![4..8]]);
        assert_eq!(widen(vec![vec![4..8]], None), vec![vec![4..8]]);
        let mut runs = vec![vec![]];
        let mut all = ChunkMap::new(64, 16);
        all.set(3);
        missing(&[all], &held, &mut runs);
        assert_eq!(runs, vec![vec![48..64]]);
    }

    #[test]
    fn ranges_merge() {
        assert_eq!(
            merge(vec![0..10, 20..30], vec![5..12, 30..31, 40..40, 50..60]),
            vec![0..12, 20..31, 50..60]
        );
    }

    #[test]
    fn copy_runs_copies_only_the_runs() {
        let src: Vec<u8> = (0..4 * PAGE).map(|i| (i / PAGE + 1) as u8).collect();
        let regions = [(0u64, src.as_ptr(), src.len())];
        let copies = vec![RamCopy::new(0, src.len()).unwrap()];
        let n = copy_runs(
            &regions,
            &copies,
            &[vec![PAGE..2 * PAGE, 3 * PAGE..5 * PAGE]],
        );
        assert_eq!(n, 2 * PAGE);
        let mut got = vec![0u8; src.len()];
        copies[0].read_at(&mut got, 0).unwrap();
        assert!(got[..PAGE as usize].iter().all(|&b| b == 0));
        assert!(got[PAGE as usize..2 * PAGE as usize]
            .iter()
            .all(|&b| b == 2));
        assert!(got[2 * PAGE as usize..3 * PAGE as usize]
            .iter()
            .all(|&b| b == 0));
        assert!(got[3 * PAGE as usize..].iter().all(|&b| b == 4));
    }
}
