//! Outputs appear under their final name only when complete: they are written to a
//! temporary sibling (`.NAME.tmp-PID-RANDOM`, created with `O_CREAT|O_EXCL`, so a file or
//! link planted under a guessed name is never followed) and renamed. SIGINT/SIGTERM/SIGHUP remove the
//! temporaries before exiting; after SIGKILL a temporary may remain, but never a partial
//! file under the target name.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

/// Temporaries to remove if a signal ends the process.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn register(p: &Path) {
    PENDING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(p.to_path_buf());
}

fn unregister(p: &Path) {
    PENDING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|x| x != p);
}

fn remove_any(p: &Path) {
    if p.is_dir() {
        // A worker may create a file between the listing and the rmdir; retry a few times.
        for _ in 0..5 {
            if std::fs::remove_dir_all(p).is_ok() || !p.exists() {
                break;
            }
        }
    } else {
        let _ = std::fs::remove_file(p);
    }
}

/// Removes every output still under its temporary name (the process is about to end).
pub fn remove_pending() {
    let pending: Vec<PathBuf> = PENDING.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for p in &pending {
        remove_any(p);
    }
}

/// Blocks the termination signals in every thread and handles them on a dedicated one,
/// where cleanup can use ordinary (non-async-signal-safe) code. Call before spawning
/// threads: the mask is inherited.
pub fn install_signal_cleanup() {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask affects only this thread
    // (and threads spawned later).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return;
        }
        set
    };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits on a valid set for one of the blocked signals.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            remove_pending();
            eprintln!("vmpack: interrupted");
            std::process::exit(128 + sig);
        });
    if spawned.is_err() {
        // Without the handler thread, let the signals act normally again.
        // SAFETY: as above.
        unsafe {
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
}

/// Set by the global `--force`: an existing file the user may not write is replaced anyway.
static FORCE: AtomicBool = AtomicBool::new(false);

pub fn set_force(force: bool) {
    FORCE.store(force, Ordering::Relaxed);
}

/// The folder a target lives in, and the prefix of its temporaries: `.NAME.tmp-PID-`, then
/// random characters. The PID only helps a human; the random part is what keeps another
/// user from planting a file or link under the name first.
fn temp_parts(target: &Path) -> Result<(PathBuf, String)> {
    let name = target
        .file_name()
        .with_context(|| format!("{}: not a file name", target.display()))?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Named here, so the error is about the folder the user gave, not a temporary name.
    if !parent.is_dir() {
        bail!(
            "{}: folder {} does not exist; create it first",
            target.display(),
            parent.display()
        );
    }
    let mut name = name.to_string_lossy().into_owned();
    // Room for the prefix and suffix within NAME_MAX (255 bytes).
    if name.len() > 200 {
        let mut cut = 200;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    Ok((parent, format!(".{name}.tmp-{}-", std::process::id())))
}

/// Refuses a target that is a symbolic link: replacing the link would surprise whoever made
/// it, and writing through it would let whoever made it choose which file is overwritten.
fn refuse_symlink(target: &Path, meta: &std::fs::Metadata) -> Result<()> {
    if meta.file_type().is_symlink() {
        bail!(
            "{}: is a symbolic link; vmpack never writes through or replaces a link: name the file itself",
            target.display()
        );
    }
    Ok(())
}

/// Whether the permission bits of an existing file let this user write it. Root is judged
/// by the bits too (as if it were the owner when it owns the file, or another user): a
/// mode of 444 means "do not replace", whoever runs vmpack.
fn bits_allow_write(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode();
    // SAFETY: plain getters without arguments.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if meta.uid() == uid {
        return mode & 0o200 != 0;
    }
    if meta.gid() == gid || in_groups(meta.gid()) {
        return mode & 0o020 != 0;
    }
    mode & 0o002 != 0
}

fn in_groups(gid: libc::gid_t) -> bool {
    // SAFETY: first call asks for the count; the second fills a buffer of that size.
    unsafe {
        let n = libc::getgroups(0, std::ptr::null_mut());
        if n <= 0 {
            return false;
        }
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let n = libc::getgroups(n, groups.as_mut_ptr());
        n > 0 && groups[..n as usize].contains(&gid)
    }
}

/// A file being written under a temporary name.
pub struct AtomicFile {
    target: PathBuf,
    /// `None` for a device or FIFO target (`-o /dev/null`), written in place, never renamed
    /// over (a rename would replace `/dev/null` with a regular file for the whole host).
    temp: Option<tempfile::TempPath>,
    file: Option<File>,
}

impl AtomicFile {
    /// Starts writing `target`. Refuses a directory, a symbolic link to anything but a device
    /// or FIFO, and (without `--force`) an existing file whose permission bits deny this user
    /// writing it. A replaced file's permission bits carry over to the new one.
    pub fn create(target: &Path) -> Result<AtomicFile> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
        let link = std::fs::symlink_metadata(target).ok();
        let meta = std::fs::metadata(target).ok();
        if meta.as_ref().is_some_and(|m| m.is_dir()) {
            bail!("{}: is a directory", target.display());
        }
        let is_special = |t: std::fs::FileType| {
            t.is_char_device() || t.is_block_device() || t.is_fifo() || t.is_socket()
        };
        if let Some(m) = &meta {
            if is_special(m.file_type()) {
                // `-o /dev/stdout` is a link to the process's own descriptor: links are
                // followed only here, and only to a device or FIFO, checked again once open.
                let nofollow = if link.as_ref().is_some_and(|l| l.file_type().is_symlink()) {
                    0
                } else {
                    libc::O_NOFOLLOW
                };
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(nofollow)
                    .open(target)
                    .with_context(|| format!("opening {}", target.display()))?;
                let opened = file
                    .metadata()
                    .with_context(|| format!("opening {}", target.display()))?;
                if !is_special(opened.file_type()) {
                    bail!(
                        "{}: changed from a device to a file while being opened",
                        target.display()
                    );
                }
                return Ok(AtomicFile {
                    target: target.to_path_buf(),
                    temp: None,
                    file: Some(file),
                });
            }
        }
        if let Some(l) = &link {
            refuse_symlink(target, l)?;
        }
        // A new file gets 0666 less the umask, as any created file; a replaced one keeps its
        // permission bits.
        let mode = match &link {
            Some(m) => {
                if !FORCE.load(Ordering::Relaxed) && !bits_allow_write(m) {
                    bail!(
                        "{}: exists and its permissions (mode {:o}) do not let you write it; not replaced (--force replaces it, keeping its mode)",
                        target.display(),
                        m.permissions().mode() & 0o7777
                    );
                }
                m.permissions().mode() & 0o777
            }
            None => 0o666,
        };
        let (parent, prefix) = temp_parts(target)?;
        // O_CREAT|O_EXCL under a random name: nothing planted in the folder is followed.
        let named = tempfile::Builder::new()
            .prefix(&prefix)
            .permissions(std::fs::Permissions::from_mode(mode))
            .tempfile_in(&parent)
            .with_context(|| format!("creating a temporary file in {}", parent.display()))?;
        let (file, temp) = named.into_parts();
        register(&temp);
        if link.is_some() {
            // The umask applied at creation; the old file's bits are set exactly.
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting the mode of {}", temp.display()))?;
        }
        Ok(AtomicFile {
            target: target.to_path_buf(),
            temp: Some(temp),
            file: Some(file),
        })
    }

    /// True when the target is a device or FIFO written in place (nothing to read back).
    pub fn is_special(&self) -> bool {
        self.temp.is_none()
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file present until commit")
    }

    /// A writer for long sequential outputs (packs): it asks the kernel to start writing
    /// each [`WRITE_BEHIND_BYTES`] to disk as soon as they are written, so the disk works
    /// while the rest is still produced and [`AtomicFile::commit`]'s sync only waits for
    /// the tail. Durability is unchanged: only `commit`'s sync promises anything.
    pub fn write_behind(&mut self) -> WriteBehind<'_> {
        let special = self.is_special();
        WriteBehind {
            file: self.file(),
            written: 0,
            started: 0,
            enabled: !special,
        }
    }

    /// Where the data is until [`AtomicFile::commit`] renames it.
    pub fn temp_path(&self) -> &Path {
        match &self.temp {
            Some(t) => t,
            None => &self.target,
        }
    }

    /// Makes the data durable and moves it to the target name (replacing the file there,
    /// never following a link that appeared there meanwhile: rename replaces the name).
    pub fn commit(mut self) -> Result<()> {
        let f = self.file.take().expect("file present until commit");
        let Some(temp) = self.temp.take() else {
            return Ok(());
        };
        f.sync_all()
            .with_context(|| format!("syncing {}", temp.display()))?;
        drop(f);
        let path = temp.to_path_buf();
        temp.persist(&self.target).map_err(|e| {
            unregister(&path);
            anyhow::Error::new(e.error).context(format!(
                "renaming {} to {}",
                path.display(),
                self.target.display()
            ))
        })?;
        unregister(&path);
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // The TempPath removes the file as it drops.
        if let Some(t) = &self.temp {
            unregister(t);
        }
    }
}

/// How much written data [`WriteBehind`] lets accumulate before starting its writeback.
pub const WRITE_BEHIND_BYTES: u64 = 8 << 20;

/// See [`AtomicFile::write_behind`].
pub struct WriteBehind<'a> {
    file: &'a mut File,
    written: u64,
    /// Everything before this offset has had its writeback started.
    started: u64,
    /// Off for devices and FIFOs, and once the kernel refused (a filesystem without it).
    enabled: bool,
}

impl WriteBehind<'_> {
    fn start_writeback(&mut self) {
        use std::os::fd::AsRawFd;
        let len = self.written - self.started;
        if !self.enabled || len == 0 {
            return;
        }
        // SAFETY: plain syscall on an open descriptor; SYNC_FILE_RANGE_WRITE only starts
        // writeback of the range (it neither waits for it nor flushes metadata).
        let r = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                self.started as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r != 0 {
            // Only speed is lost: the final sync writes whatever is left.
            self.enabled = false;
        }
        self.started = self.written;
    }
}

impl std::io::Write for WriteBehind<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = std::io::Write::write(&mut *self.file, buf)?;
        self.written += n as u64;
        if self.written - self.started >= WRITE_BEHIND_BYTES {
            self.start_writeback();
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(&mut *self.file)?;
        self.start_writeback();
        Ok(())
    }
}

/// A folder being filled under a temporary name; the target must not exist or be empty.
pub struct AtomicDir {
    target: PathBuf,
    temp: PathBuf,
    done: bool,
}

impl AtomicDir {
    pub fn create(target: &Path) -> Result<AtomicDir> {
        if let Ok(l) = std::fs::symlink_metadata(target) {
            refuse_symlink(target, &l)?;
            let mut entries = std::fs::read_dir(target)
                .with_context(|| format!("{}: not a readable directory", target.display()))?;
            if entries.next().is_some() {
                bail!("{}: directory is not empty", target.display());
            }
        }
        let (parent, prefix) = temp_parts(target)?;
        // Created exclusively (mkdir fails on anything already there) under a random name.
        let temp = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir_in(&parent)
            .with_context(|| format!("creating a temporary folder in {}", parent.display()))?
            .keep();
        register(&temp);
        // tempdir makes it 0700; the unpacked folder gets the usual 0777 less the umask.
        let _ = std::fs::set_permissions(&temp, {
            use std::os::unix::fs::PermissionsExt;
            std::fs::Permissions::from_mode(0o777 & !current_umask())
        });
        Ok(AtomicDir {
            target: target.to_path_buf(),
            temp,
            done: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// Moves the folder to the target name (replacing an empty folder there).
    pub fn commit(mut self) -> Result<()> {
        std::fs::rename(&self.temp, &self.target).with_context(|| {
            format!(
                "renaming {} to {}",
                self.temp.display(),
                self.target.display()
            )
        })?;
        unregister(&self.temp);
        self.done = true;
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.done {
            remove_any(&self.temp);
            unregister(&self.temp);
        }
    }
}

/// The process's umask (read by setting and restoring it; called before any worker thread
/// creates files).
fn current_umask() -> u32 {
    // SAFETY: umask cannot fail; the old value is put back at once.
    unsafe {
        let old = libc::umask(0o022);
        libc::umask(old);
        old as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn write_behind_writes_every_byte_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let mut f = AtomicFile::create(&target).unwrap();
        let data: Vec<u8> = (0..(3 * WRITE_BEHIND_BYTES as usize + 12345))
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        {
            let mut w = f.write_behind();
            // Uneven pieces, so writeback ranges start and end mid-piece.
            for piece in data.chunks(1_000_003) {
                w.write_all(piece).unwrap();
            }
            w.flush().unwrap();
        }
        f.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), data);
    }
}
