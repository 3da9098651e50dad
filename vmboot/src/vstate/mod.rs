//! The VM as KVM holds it, cut the way KVM cuts it: VM-level state (the VM fd, in-kernel
//! irqchip, PIT and clock: [`vm`]), the vCPUs (their fds, kicking, register state, and the
//! vCPU manager: threads, run loop, pause:
//! [`vcpu`]) and guest memory ([`memory`]). Devices live in `crate::devices` and the
//! registry that places them in `crate::device_manager`.

pub mod dirty;
pub mod lazy;
pub mod lazy_disk;
pub mod memory;
pub mod vcpu;
pub mod vm;

use crate::persist::StateError;

/// What the VM, vCPU and memory layer can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host call (mmap, madvise, userfaultfd, a thread) failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A KVM ioctl failed (named in `what`).
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
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error(transparent)]
    MissingCapabilities(#[from] crate::kvm_caps::MissingCapabilities),
    /// A memory layout, piece or chunk that does not fit guest RAM (from a config or a
    /// pack: refused before anything is mapped there).
    #[error("{0}")]
    Layout(String),
    /// Reading or writing guest memory through vm-memory.
    #[error("{what}")]
    GuestMemory {
        what: String,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The closure of `GuestMemoryInit::Fill` failed.
    #[error("filling guest memory")]
    Fill(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("there is no mark {mark} yet (the newest is {newest})")]
    NoSuchMark { mark: u64, newest: u64 },
    #[error("mark {mark} is no longer kept (kept: 0 and {first}..={last})")]
    MarkGone { mark: u64, first: u64, last: u64 },
    #[error("{}", memory::NOT_REVERTIBLE)]
    NotRevertible,
    #[error("installing the vCPU kick signal handler: {0}")]
    KickHandler(String),
    #[error("vCPU {id}: saved CPUID has too many entries: {detail}")]
    CpuidTooLarge { id: u32, detail: String },
    /// Reading or writing MSRs (named in `what`).
    #[error("{what}")]
    Msr {
        what: String,
        #[source]
        source: crate::msr::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
    /// A host call whose error is its own message.
    #[error(transparent)]
    Host(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

crate::error::layer_context!(Error);

impl<T> Context<T> for std::result::Result<T, crate::msr::Error> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Msr {
            what: what.into(),
            source,
        })
    }
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|source| Error::Msr {
            what: what().into(),
            source,
        })
    }
}

/// `.context(..)` for a `None` that is a layout error of this layer.
pub(crate) trait OptionContext<T> {
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T> OptionContext<T> for Option<T> {
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.ok_or_else(|| Error::Layout(what().into()))
    }
}
