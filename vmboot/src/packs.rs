//! The pack layer's error: writing a pack of a running VM and restoring one (`snapshot`),
//! expanding one for clones (`clone`), diff packs (`diff`) and reading a saved pack for a
//! verdict (`compat::SavedPack`).

/// What saving, restoring or reading a pack can fail with. A refusal names the file,
/// section and offset (docs/SECURITY.md); the format layer's errors pass through unchanged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Pack(#[from] vmpack_formats::pack::PackError),
    #[error(transparent)]
    VmPack(#[from] vmpack_formats::vm::VmPackError),
    /// A pack (or a chain of them) this vmboot does not restore, with the reason, naming
    /// the file and section.
    #[error("{0}")]
    Refused(String),
    /// What the caller must set up or choose differently first (a cache folder, a full
    /// save instead of a diff).
    #[error("{0}")]
    Unsupported(String),
    /// Building, running or driving the VM.
    #[error(transparent)]
    Vm(#[from] crate::vmm::Error),
    /// Encoding the vmstate.
    #[error("{what}")]
    Encode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// A host call whose error is its own message.
    #[error(transparent)]
    Host(#[from] std::io::Error),
    /// A host call failed (what it was for in `what`).
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Not used by this layer; the `Context` trait maps KVM errors here.
    #[error("{what}")]
    Kvm {
        what: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An error of this layer, with where it happened.
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        source: Box<Error>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

crate::error::layer_context!(Error);

impl Error {
    /// The pause failure behind this error, if it is one (the VM ended, or the vCPUs did not
    /// park in time).
    pub fn as_pause(&self) -> Option<&crate::vmm::PauseError> {
        match self {
            Error::Vm(e) => e.as_pause(),
            Error::Context { source, .. } => source.as_pause(),
            _ => None,
        }
    }
}

/// The lower layers' errors reach a pack operation through the VM's.
macro_rules! through_vm {
    ($($from:ty),*) => {$(
        impl From<$from> for Error {
            fn from(e: $from) -> Error {
                Error::Vm(e.into())
            }
        }
    )*};
}

through_vm!(
    crate::vmm::PauseError,
    crate::boot::Error,
    crate::vstate::Error,
    crate::devices::Error,
    crate::persist::StateError
);

impl<T> Context<T> for std::result::Result<T, crate::vmm::Error> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(Error::from).context(what)
    }
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(Error::from).with_context(what)
    }
}

impl<T> Context<T> for std::result::Result<T, crate::vstate::Error> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::Vm(e.into())).context(what)
    }
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error::Vm(e.into())).with_context(what)
    }
}

impl<T> Context<T> for std::result::Result<T, vmpack_formats::vm::VmPackError> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(Error::from).context(what)
    }
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(Error::from).with_context(what)
    }
}

impl<T> Context<T> for std::result::Result<T, vmpack_formats::pack::PackError> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(Error::from).context(what)
    }
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(Error::from).with_context(what)
    }
}

/// Guest memory is chunked finer than files and disks: a chunk holding one dirty page is
/// stored whole, and on the mmap restore path every non-zero chunk is one mapping.
pub const MEMORY_CHUNK_SIZE: u32 = 256 << 10;

/// Chunk size of a diff pack's disk diff sections: the chunk size saves write disks in,
/// so a chain's disk chunks line up and a lazy restore serves each from one pack.
pub const DISK_CHUNK_SIZE: u32 = vmpack_formats::pack::DEFAULT_CHUNK_SIZE;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::PauseError;

    /// A save that failed because the VM ended is told from any other failure by variant.
    #[test]
    fn a_pause_failure_is_found_by_variant() {
        let ended = || Error::from(PauseError::Ended("exit status 0".into()));
        assert!(matches!(ended().as_pause(), Some(PauseError::Ended(_))));
        let wrapped: Result<()> = Err(ended()).context("capturing vCPU and device state");
        assert!(wrapped.unwrap_err().as_pause().is_some());
        assert!(Error::Refused("x".into()).as_pause().is_none());
    }
}
