//! Devices emulated in userspace: COM1, i8042 (reset only), the debug-exit port, and the bus
//! that routes port and MMIO exits to them.

pub mod bus;
pub mod legacy;
pub mod serial;
pub mod serial_log;
pub mod virtio;
pub mod vmgenid;

pub use bus::{Bus, BusDevice, IoAction};
pub use legacy::{DebugExit, I8042};
pub use serial::{SerialDevice, SerialSink};

use crate::device_manager::resources::AllocError;
use crate::error::StateError;

/// What building, registering, saving or loading a device can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host resource (eventfd, epoll, file, tap, socket, thread) could not be had.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A KVM registration (ioeventfd, irqfd) failed.
    #[error("{what}")]
    Kvm {
        what: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An error of this layer, with where it happened (the disk, the device).
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        source: Box<Error>,
    },
    #[error("empty bus range at {base:#x}")]
    EmptyBusRange { base: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    BusOverlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
    #[error("device id {0} registered twice")]
    DuplicateId(String),
    /// No room for the device (MMIO window, GSI).
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// The config (or a command-line override of it) asks for a device that cannot be.
    #[error("{0}")]
    Config(String),
    /// A saved device state this build cannot load (checked before any KVM call where
    /// possible).
    #[error("{0}")]
    InvalidState(String),
    /// Encoding or decoding a device's state.
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Writing guest memory (the generation ID).
    #[error("{what}")]
    GuestMemory {
        what: String,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A host call whose error is its own message.
    #[error(transparent)]
    Host(#[from] std::io::Error),
    #[error("device {id} cannot be reset in place")]
    NotResettable { id: String },
    /// `SerialLog::wait_for`: the VM ended before its output matched.
    #[error("the VM ended ({why}) before its output matched /{pattern}/")]
    EndedBeforeMatch { why: String, pattern: String },
    /// `SerialLog::wait_for`: the deadline passed first.
    #[error("timed out waiting for output matching /{pattern}/")]
    OutputTimeout { pattern: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

crate::error::layer_context!(Error);

/// COM1.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// i8042 data port; the command/status port is at +4 (0x64).
pub const I8042_PORT: u64 = 0x60;
/// The keyboard's ISA IRQ (vmboot's i8042 only handles the reset command and never raises
/// it, but the DSDT names it, as on a PC).
pub const I8042_IRQ: u32 = 1;
/// A byte V written here ends vmboot with exit status V.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
