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
