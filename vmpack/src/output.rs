//! Outputs appear under their final name only when complete: they are written to a
//! temporary sibling (`.NAME.tmp-PID`) and renamed. SIGINT/SIGTERM/SIGHUP remove the
//! temporaries before exiting; after SIGKILL a temporary may remain, but never a partial
//! file under the target name.

use std::fs::File;
use std::path::{Path, PathBuf};
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

fn temp_sibling(target: &Path) -> Result<PathBuf> {
    let name = target
        .file_name()
        .with_context(|| format!("{}: not a file name", target.display()))?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Named here, so the error is about the folder the user gave, not a temporary name.
    if !parent.is_dir() {
        bail!(
            "{}: folder {} does not exist; create it first",
            target.display(),
            parent.display()
        );
    }
    Ok(parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// A file being written under a temporary name.
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
    /// The target is a device or FIFO (`-o /dev/null`): written in place, never renamed
    /// over (a rename would replace `/dev/null` with a regular file for the whole host).
    special: bool,
}

impl AtomicFile {
    pub fn create(target: &Path) -> Result<AtomicFile> {
        if target.is_dir() {
            bail!("{}: is a directory", target.display());
        }
        if let Ok(meta) = std::fs::metadata(target) {
            use std::os::unix::fs::FileTypeExt;
            let t = meta.file_type();
            if t.is_char_device() || t.is_block_device() || t.is_fifo() {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(target)
                    .with_context(|| format!("opening {}", target.display()))?;
                return Ok(AtomicFile {
                    target: target.to_path_buf(),
                    temp: target.to_path_buf(),
                    file: Some(file),
                    special: true,
                });
            }
        }
        let temp = temp_sibling(target)?;
        register(&temp);
        let file = File::create(&temp)
            .with_context(|| format!("{}: cannot create it", target.display()))?;
        Ok(AtomicFile {
            target: target.to_path_buf(),
            temp,
            file: Some(file),
            special: false,
        })
    }

    /// True when the target is a device or FIFO written in place (nothing to read back).
    pub fn is_special(&self) -> bool {
        self.special
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file present until commit")
    }

    /// Where the data is until [`AtomicFile::commit`] renames it.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Makes the data durable and moves it to the target name.
    pub fn commit(mut self) -> Result<()> {
        let f = self.file.take().expect("file present until commit");
        if self.special {
            return Ok(());
        }
        f.sync_all()
            .with_context(|| format!("syncing {}", self.temp.display()))?;
        drop(f);
        std::fs::rename(&self.temp, &self.target).with_context(|| {
            format!(
                "renaming {} to {}",
                self.temp.display(),
                self.target.display()
            )
        })?;
        unregister(&self.temp);
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.is_some() && !self.special {
            let _ = std::fs::remove_file(&self.temp);
            unregister(&self.temp);
        }
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
        if target.exists() {
            let mut entries = std::fs::read_dir(target)
                .with_context(|| format!("{}: not a readable directory", target.display()))?;
            if entries.next().is_some() {
                bail!("{}: directory is not empty", target.display());
            }
        }
        let temp = temp_sibling(target)?;
        register(&temp);
        std::fs::create_dir(&temp)
            .with_context(|| format!("{}: cannot create it", target.display()))?;
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
