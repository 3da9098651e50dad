//! Point-in-time views of the VM's disks, so a save can pack a disk while the guest writes it.
//!
//! Every disk the VM's virtio-blk devices serve is a [`TrackedDisk`]: the backend image plus
//! a shared [`DiskTrack`]. A save calls [`DiskTrack::freeze`] while the VM is paused; from
//! then until the returned [`FrozenDisk`] is dropped, the first guest write (or discard,
//! or write-zeroes) to a block of [`BLOCK_SIZE`] bytes first keeps the block's old content:
//! in memory up to [`MEMORY_LIMIT`] bytes per disk, then in an unlinked temporary file (so
//! nothing is left behind, whatever happens). The pack reads the `FrozenDisk`: a kept block
//! from where it was kept, any other block from the live image under the same lock the
//! writes take, so a read never sees half a write. The guest can therefore run again as
//! soon as the memory is copied, however large the disks.
//!
//! A block that cannot be kept (the backend cannot be read, the temporary file cannot be
//! written) breaks the view: the guest's write still happens, and the save reading the view
//! fails, which leaves the VM running.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vmpack_formats::config::DiskFormat;
use vmpack_formats::disk::DiskImage;
use vmpack_formats::pack::SectionSource;

/// The unit in which a frozen view keeps old content.
pub const BLOCK_SIZE: u64 = 64 << 10;

/// How many disk marks besides mark 0 are kept: as many as the memory marks they go with.
pub const MAX_MARKS: usize = crate::vstate::dirty::MAX_MARKS;

/// Old content a frozen view keeps in memory, per disk, before it goes to a temporary file.
pub const MEMORY_LIMIT: usize = 64 << 20;

/// A disk image whose writes a [`DiskTrack`] sees first.
pub struct TrackedDisk(Arc<DiskTrack>);

/// The shared side of a [`TrackedDisk`]: what a save freezes.
pub struct DiskTrack {
    inner: Box<dyn DiskImage>,
    state: RwLock<Track>,
}

struct Track {
    frozen: Option<Frozen>,
    /// Per dirty mark (the numbers of the VM's memory marks, `vstate::dirty`), one bit per
    /// block written since: mark 0 first (the disk as the VM started), then the newest
    /// [`MAX_MARKS`]. Grown on demand, so an unwritten disk costs nothing.
    marks: VecDeque<(u64, Vec<u64>)>,
}

impl Default for Track {
    fn default() -> Track {
        Track {
            frozen: None,
            marks: VecDeque::from([(0, Vec::new())]),
        }
    }
}

impl Track {
    /// Notes a change of `off..off + len` (clamped to `size`) in every kept mark.
    fn note_written(&mut self, off: u64, len: u64, size: u64) {
        let end = off.saturating_add(len).min(size);
        if len == 0 || off >= end {
            return;
        }
        let (first, last) = (off / BLOCK_SIZE, (end - 1) / BLOCK_SIZE);
        for (_, bits) in self.marks.iter_mut() {
            let words = (last / 64 + 1) as usize;
            if bits.len() < words {
                bits.resize(words, 0);
            }
            for b in first..=last {
                bits[(b / 64) as usize] |= 1 << (b % 64);
            }
        }
    }
}

/// The content of the disk as of a freeze, where it differs from the live image.
struct Frozen {
    kept: HashMap<u64, Kept>,
    in_memory: usize,
    memory_limit: usize,
    spill_dir: PathBuf,
    spill: Option<File>,
    spill_len: u64,
    kept_bytes: u64,
    broken: Option<String>,
}

enum Kept {
    Zero,
    Memory(Box<[u8]>),
    Spilled(u64),
}

/// Wraps `image`; the VM's device serves the first, a save freezes the second.
pub fn track(image: Box<dyn DiskImage>) -> (TrackedDisk, Arc<DiskTrack>) {
    let t = Arc::new(DiskTrack {
        inner: image,
        state: RwLock::new(Track::default()),
    });
    (TrackedDisk(t.clone()), t)
}

impl DiskTrack {
    fn read(&self) -> RwLockReadGuard<'_, Track> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Track> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Freezes the disk's current content until the returned view is dropped; old content
    /// that has to go to a file goes to an unlinked temporary file in `spill_dir`. Call it
    /// while no request is in flight (the VM paused) for the view to be the guest's disk
    /// at one instant.
    pub fn freeze(self: &Arc<Self>, spill_dir: &Path) -> io::Result<FrozenDisk> {
        self.freeze_bounded(spill_dir, MEMORY_LIMIT)
    }

    fn freeze_bounded(
        self: &Arc<Self>,
        spill_dir: &Path,
        memory_limit: usize,
    ) -> io::Result<FrozenDisk> {
        let mut t = self.write();
        if t.frozen.is_some() {
            return Err(io::Error::other(
                "the disk is already frozen for another save",
            ));
        }
        t.frozen = Some(Frozen {
            kept: HashMap::new(),
            in_memory: 0,
            memory_limit,
            spill_dir: spill_dir.to_path_buf(),
            spill: None,
            spill_len: 0,
            kept_bytes: 0,
            broken: None,
        });
        Ok(FrozenDisk(self.clone()))
    }

    /// Keeps the old content of every block `off..off + len` touches that is not kept yet.
    fn keep(&self, f: &mut Frozen, off: u64, len: u64) {
        if f.broken.is_some() || len == 0 {
            return;
        }
        let size = self.inner.virtual_size();
        let end = off.saturating_add(len).min(size);
        let mut block = off / BLOCK_SIZE;
        while block * BLOCK_SIZE < end {
            if !f.kept.contains_key(&block) {
                if let Err(e) = self.keep_block(f, block, size) {
                    f.broken = Some(format!(
                        "keeping the content of block {block} ({BLOCK_SIZE} bytes) as of the pause: {e}"
                    ));
                    return;
                }
            }
            block += 1;
        }
    }

    fn keep_block(&self, f: &mut Frozen, block: u64, size: u64) -> io::Result<()> {
        let start = block * BLOCK_SIZE;
        let n = BLOCK_SIZE.min(size - start) as usize;
        let mut buf = vec![0u8; n];
        self.inner.read_at(&mut buf, start)?;
        let kept = if buf.iter().all(|&b| b == 0) {
            Kept::Zero
        } else if f.in_memory + n <= f.memory_limit {
            f.in_memory += n;
            Kept::Memory(buf.into_boxed_slice())
        } else {
            if f.spill.is_none() {
                f.spill = Some(tempfile::tempfile_in(&f.spill_dir).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("a temporary file in {}: {e}", f.spill_dir.display()),
                    )
                })?);
            }
            let at = f.spill_len;
            f.spill
                .as_ref()
                .expect("opened above")
                .write_all_at(&buf, at)?;
            f.spill_len += n as u64;
            Kept::Spilled(at)
        };
        f.kept_bytes += n as u64;
        f.kept.insert(block, kept);
        Ok(())
    }

    /// Runs a change of `off..off + len` of the live image, keeping the old content first.
    fn change(
        &self,
        off: u64,
        len: u64,
        op: impl FnOnce(&dyn DiskImage) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut t = self.write();
        if let Some(f) = t.frozen.as_mut() {
            self.keep(f, off, len);
        }
        // Counted even if the change fails: the block may have changed partly.
        t.note_written(off, len, self.inner.virtual_size());
        op(self.inner.as_ref())
    }

    /// Starts disk mark `id` (the number of the memory mark taken at the same instant):
    /// from now, every block written is added to it. Call it while no request is in flight
    /// (the VM paused) for the mark to be the disk at one instant.
    pub fn mark(&self, id: u64) {
        let mut t = self.write();
        t.marks.retain(|(m, _)| *m != id || id == 0);
        if id != 0 {
            t.marks.push_back((id, Vec::new()));
        }
        while t.marks.len() > MAX_MARKS + 1 {
            t.marks.remove(1);
        }
    }

    /// Drops mark `id` (mark 0 stays).
    pub fn forget(&self, id: u64) {
        if id != 0 {
            self.write().marks.retain(|(m, _)| *m != id);
        }
    }

    /// After the disk was put back to its state at mark 0 (a reset): every other mark is
    /// dropped and nothing counts as written.
    pub fn reset_marks(&self) {
        let mut t = self.write();
        t.marks.truncate(1);
        t.marks[0].1.clear();
    }

    /// The blocks of [`BLOCK_SIZE`] bytes written since mark `id` (bit `b % 64` of word
    /// `b / 64` = block `b`; words past the end are zero), or None if the mark is not kept.
    pub fn written_since(&self, id: u64) -> Option<Vec<u64>> {
        self.read()
            .marks
            .iter()
            .find(|(m, _)| *m == id)
            .map(|(_, bits)| bits.clone())
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.virtual_size()
    }
}

impl DiskImage for TrackedDisk {
    fn virtual_size(&self) -> u64 {
        self.0.inner.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        // Reads need no lock: the guest's own reads and writes are ordered by the guest.
        self.0.inner.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0
            .change(off, buf.len() as u64, |d| d.write_at(buf, off))
    }

    fn flush(&self) -> io::Result<()> {
        self.0.inner.flush()
    }

    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        self.0.inner.data_ranges()
    }

    fn block_size(&self) -> u64 {
        self.0.inner.block_size()
    }

    fn format(&self) -> DiskFormat {
        self.0.inner.format()
    }

    fn is_read_only(&self) -> bool {
        self.0.inner.is_read_only()
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.0.change(off, len, |d| d.discard(off, len))
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.0.change(off, len, |d| d.write_zeroes(off, len))
    }
}

/// The disk as it was at [`DiskTrack::freeze`], for as long as this lives.
pub struct FrozenDisk(Arc<DiskTrack>);

impl FrozenDisk {
    /// Bytes of old content kept so far because the guest wrote the disk after the freeze.
    pub fn kept_bytes(&self) -> u64 {
        self.0.read().frozen.as_ref().map_or(0, |f| f.kept_bytes)
    }
}

impl Drop for FrozenDisk {
    fn drop(&mut self) {
        // Dropping the spill file closes it, and being unlinked, it is gone.
        self.0.write().frozen = None;
    }
}

fn broken(f: &Frozen) -> io::Result<()> {
    match &f.broken {
        Some(m) => Err(io::Error::other(m.clone())),
        None => Ok(()),
    }
}

impl SectionSource for FrozenDisk {
    fn len(&self) -> u64 {
        self.0.inner.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let t = self.0.read();
        let f = t.frozen.as_ref().expect("a FrozenDisk keeps its freeze");
        broken(f)?;
        let size = self.0.inner.virtual_size();
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{} is outside the disk's {size} bytes",
                    buf.len()
                ),
            ));
        }
        // Pieces not kept are read from the live image in as few calls as possible.
        let mut live: Option<(usize, usize)> = None;
        let read_live = |buf: &mut [u8], run: Option<(usize, usize)>| match run {
            Some((a, b)) => self.0.inner.read_at(&mut buf[a..b], offset + a as u64),
            None => Ok(()),
        };
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let block = at / BLOCK_SIZE;
            let in_block = (at - block * BLOCK_SIZE) as usize;
            let n = ((BLOCK_SIZE as usize) - in_block).min(buf.len() - pos);
            match f.kept.get(&block) {
                None => {
                    live = Some(match live {
                        Some((a, _)) => (a, pos + n),
                        None => (pos, pos + n),
                    });
                }
                Some(k) => {
                    read_live(buf, live.take())?;
                    let dst = &mut buf[pos..pos + n];
                    match k {
                        Kept::Zero => dst.fill(0),
                        Kept::Memory(b) => dst.copy_from_slice(&b[in_block..in_block + n]),
                        Kept::Spilled(o) => f
                            .spill
                            .as_ref()
                            .expect("a spilled block has its file")
                            .read_exact_at(dst, o + in_block as u64)?,
                    }
                }
            }
            pos += n;
        }
        read_live(buf, live)
    }

    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        let t = self.0.read();
        let f = t.frozen.as_ref().expect("a FrozenDisk keeps its freeze");
        broken(f)?;
        // A block not kept is unchanged since the freeze, so the live image tells whether
        // it holds data; a kept block may have held data then and been discarded since.
        let size = self.0.inner.virtual_size();
        let mut ranges = self.0.inner.data_ranges()?;
        ranges.extend(f.kept.iter().filter_map(|(b, k)| match k {
            Kept::Zero => None,
            _ => Some(b * BLOCK_SIZE..((b + 1) * BLOCK_SIZE).min(size)),
        }));
        Ok(merge(ranges))
    }
}

/// Sorts `ranges` and joins the ones that touch or overlap.
fn merge(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges.into_iter().filter(|r| r.start < r.end) {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmpack_formats::disk::{create_disk, open_disk};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    fn whole(src: &dyn SectionSource) -> Vec<u8> {
        let mut v = vec![0u8; src.len() as usize];
        src.read_at(&mut v, 0).unwrap();
        v
    }

    /// A raw disk of `size` bytes filled with `pattern(size, 7)` except its last 256 KiB
    /// (a hole), tracked.
    fn disk(dir: &Path, size: u64) -> (TrackedDisk, Arc<DiskTrack>, Vec<u8>) {
        let p = dir.join("d.img");
        let d = create_disk(&p, DiskFormat::Raw, size).unwrap();
        let mut content = pattern(size as usize, 7);
        let hole = size as usize - (256 << 10);
        content[hole..].fill(0);
        d.write_at(&content[..hole], 0).unwrap();
        drop(d);
        let (disk, t) = track(open_disk(&p, DiskFormat::Raw, false).unwrap());
        (disk, t, content)
    }

    #[test]
    fn writes_after_the_freeze_do_not_show_through() {
        let dir = tempfile::tempdir().unwrap();
        let size = 2 << 20;
        let (disk, t, before) = disk(dir.path(), size);
        let view = t.freeze(dir.path()).unwrap();
        // Unaligned writes across block edges, a discard, write-zeroes, a write into the hole.
        disk.write_at(&pattern(5000, 1), BLOCK_SIZE - 100).unwrap();
        disk.write_at(&pattern(512, 2), 3 * BLOCK_SIZE).unwrap();
        disk.discard(5 * BLOCK_SIZE, 2 * BLOCK_SIZE).unwrap();
        disk.write_zeroes(9 * BLOCK_SIZE + 512, 1024).unwrap();
        disk.write_at(&pattern(4096, 3), size - 8192).unwrap();
        assert_eq!(
            whole(&view),
            before,
            "the view is the disk as of the freeze"
        );
        // Reads at odd offsets and lengths through kept and live pieces.
        for (off, len) in [
            (0u64, 1usize),
            (BLOCK_SIZE - 3, 7),
            (100, 700_000),
            (size - 9000, 9000),
        ] {
            let mut b = vec![0u8; len];
            view.read_at(&mut b, off).unwrap();
            assert_eq!(b, before[off as usize..off as usize + len], "{off}+{len}");
        }
        // The hole written after the freeze still reads as zeros and a discarded range that
        // held data is still listed as data.
        let ranges = view.data_ranges().unwrap();
        assert!(ranges
            .iter()
            .any(|r| r.start <= 5 * BLOCK_SIZE && r.end >= 7 * BLOCK_SIZE));
        assert!(view.kept_bytes() > 0);
        let mut live = vec![0u8; 512];
        disk.read_at(&mut live, 3 * BLOCK_SIZE).unwrap();
        assert_eq!(live, pattern(512, 2), "the guest sees its own writes");
        drop(view);
        // Once dropped, a new freeze starts from the current content.
        let mut now = vec![0u8; size as usize];
        disk.read_at(&mut now, 0).unwrap();
        let view = t.freeze(dir.path()).unwrap();
        assert_eq!(whole(&view), now);
    }

    #[test]
    fn old_content_beyond_the_memory_limit_goes_to_a_file_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let spill = tempfile::tempdir().unwrap();
        let size = 8 << 20;
        let (disk, t, before) = disk(dir.path(), size);
        let view = t.freeze_bounded(spill.path(), 1 << 20).unwrap();
        let junk = pattern(1 << 20, 9);
        for off in (0..size - (256 << 10)).step_by(1 << 20) {
            let n = (1u64 << 20).min(size - (256 << 10) - off) as usize;
            disk.write_at(&junk[..n], off).unwrap();
        }
        assert_eq!(view.kept_bytes(), size - (256 << 10));
        assert_eq!(whole(&view), before);
        assert_eq!(
            std::fs::read_dir(spill.path()).unwrap().count(),
            0,
            "the spill file is unlinked"
        );
    }

    #[test]
    fn concurrent_reads_of_the_view_are_exact_while_the_guest_writes() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 << 20;
        let (disk, t, before) = disk(dir.path(), size);
        let view = t.freeze(dir.path()).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Rewrites the same blocks again and again, kept or not.
                    let off = (i * 12_345 * 512) % (size - 70_000);
                    disk.write_at(&pattern(70_000 / 512 * 512, i as u8), off / 512 * 512)
                        .unwrap();
                    i += 1;
                }
            });
            for _ in 0..3 {
                let readers: Vec<_> = (0..3)
                    .map(|k| {
                        let view = &view;
                        let before = &before;
                        s.spawn(move || {
                            let piece = 300_000usize + k * 1000;
                            let mut off = 0usize;
                            while off < size as usize {
                                let n = piece.min(size as usize - off);
                                let mut b = vec![0u8; n];
                                view.read_at(&mut b, off as u64).unwrap();
                                assert!(b == before[off..off + n], "torn read at {off}");
                                off += n;
                            }
                        })
                    })
                    .collect();
                for r in readers {
                    r.join().unwrap();
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }

    #[test]
    fn a_block_that_cannot_be_kept_fails_the_view_not_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, t, _) = disk(dir.path(), 1 << 20);
        let view = t
            .freeze_bounded(&dir.path().join("no such folder"), BLOCK_SIZE as usize)
            .unwrap();
        disk.write_at(&[1; 512], 0).unwrap();
        disk.write_at(&[2; 512], BLOCK_SIZE).unwrap();
        let mut b = [0u8; 512];
        disk.read_at(&mut b, BLOCK_SIZE).unwrap();
        assert_eq!(b, [2; 512], "the guest's write happened");
        let e = view.read_at(&mut b, 0).unwrap_err().to_string();
        assert!(e.contains("block 1") && e.contains("no such folder"), "{e}");
        assert!(view.data_ranges().is_err());
    }

    #[test]
    fn a_qcow2_disk_is_frozen_too() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.qcow2");
        let size = 1u64 << 20;
        let content = pattern(size as usize, 4);
        create_disk(&p, DiskFormat::Qcow2, size)
            .unwrap()
            .write_at(&content[..size as usize / 2], 0)
            .unwrap();
        let mut before = content.clone();
        before[size as usize / 2..].fill(0);
        let (disk, t) = track(open_disk(&p, DiskFormat::Qcow2, false).unwrap());
        let view = t.freeze(dir.path()).unwrap();
        disk.write_at(&pattern(300_000, 8), 100_000).unwrap();
        disk.write_at(&pattern(4096, 9), size - 4096).unwrap();
        assert_eq!(whole(&view), before);
    }

    #[test]
    fn marks_count_writes_discards_and_write_zeroes_per_block() {
        let dir = tempfile::tempdir().unwrap();
        let size = 2 << 20;
        let (disk, t, _) = disk(dir.path(), size);
        let mut buf = vec![0u8; 4096];
        disk.read_at(&mut buf, 0).unwrap();
        assert_eq!(t.written_since(0), Some(vec![]), "reads count for nothing");
        disk.write_at(&[1; 512], BLOCK_SIZE - 256).unwrap();
        t.mark(1);
        disk.discard(3 * BLOCK_SIZE, 1).unwrap();
        t.mark(2);
        disk.write_zeroes(size - 1, 1).unwrap();
        let last = (size - 1) / BLOCK_SIZE;
        assert_eq!(t.written_since(0).unwrap()[0], 0b1011 | 1 << last);
        assert_eq!(t.written_since(1).unwrap()[0], 0b1000 | 1 << last);
        assert_eq!(t.written_since(2).unwrap()[0], 1 << last);
        assert_eq!(t.written_since(3), None);
        t.forget(1);
        assert_eq!(t.written_since(1), None);
        for id in 3..3 + MAX_MARKS as u64 {
            t.mark(id);
        }
        assert_eq!(t.written_since(2), None, "older marks are dropped");
        assert!(t.written_since(0).is_some(), "mark 0 stays");
        t.reset_marks();
        assert_eq!(t.written_since(0), Some(vec![]));
        assert_eq!(t.written_since(3), None);
    }

    #[test]
    fn a_second_freeze_is_refused_and_merge_joins_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let (_disk, t, _) = disk(dir.path(), 1 << 20);
        let _v = t.freeze(dir.path()).unwrap();
        assert!(t.freeze(dir.path()).is_err());
        assert_eq!(
            merge(vec![5..9, 0..2, 2..3, 8..12, 20..20]),
            vec![0..3, 5..12]
        );
    }
}
