//! The i8042 (only its CPU-reset command matters) and the debug-exit port.

use super::bus::{lock, BusDevice, IoAction};
use super::Result;
use crate::persist::{DeviceState, I8042State, Pausable, Persist, VmDevice};
use std::cell::Cell;
use std::sync::Mutex;
use vm_superio::{I8042Device, Trigger};

/// Records that the guest asked for a CPU reset.
#[derive(Default)]
pub struct ResetFlag(Cell<bool>);

impl Trigger for ResetFlag {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.set(true);
        Ok(())
    }
}

/// i8042 at 0x60 (data) and 0x64 (command/status).
pub struct I8042 {
    dev: I8042Device<ResetFlag>,
}

// SAFETY: the Cell inside ResetFlag is only touched while holding the bus's Mutex.
unsafe impl Send for I8042 {}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    pub fn new() -> Self {
        I8042 {
            dev: I8042Device::new(ResetFlag::default()),
        }
    }
}

impl Persist<'_> for I8042 {
    type State = I8042State;
    type ConstructorArgs = ();
    const VERSION: u32 = 1;
    type Error = super::Error;

    fn save(&self) -> Result<I8042State> {
        Ok(I8042State {})
    }

    fn restore(_: (), _: &I8042State) -> Result<I8042> {
        Ok(I8042::new())
    }
}

impl Pausable for Mutex<I8042> {}

impl VmDevice for Mutex<I8042> {
    fn save(&self, id: &str) -> Result<DeviceState> {
        DeviceState::new(id, &*lock(self))
    }

    fn reset_to(&self, state: &DeviceState) -> Result<()> {
        *lock(self) = I8042::restore((), &state.decode::<I8042>()?)?;
        Ok(())
    }

    fn resettable(&self) -> bool {
        true
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.dev.read(offset as u8);
        data.fill(0);
        data[0] = v;
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        let _ = self.dev.write(offset as u8, data[0]);
        if self.dev.reset_evt().0.replace(false) {
            IoAction::Exit {
                code: 0,
                message: "guest requested a reset through the i8042 (0xfe)".into(),
            }
        } else {
            IoAction::Continue
        }
    }
}

/// Port 0xf4: a byte V ends vmboot with exit status V.
pub struct DebugExit;

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> IoAction {
        let code = i32::from(data[0]);
        IoAction::Exit {
            code,
            message: format!("guest wrote {code} to the debug-exit port 0xf4"),
        }
    }
}
