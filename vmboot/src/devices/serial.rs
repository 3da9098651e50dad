//! COM1: vm-superio's 16550 with its interrupt delivered through an irqfd on GSI 4.

use super::bus::{lock, BusDevice, IoAction};
use super::{Context, Error, Result};
use crate::persist::{DeviceState, Pausable, Persist, SerialDeviceState, VmDevice};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Where guest serial output goes.
#[derive(Clone, Debug, Default)]
pub enum SerialSink {
    #[default]
    Stdout,
    None,
    /// Appended to (created if missing).
    File(PathBuf),
    /// Kept in memory (tests, embedding).
    Capture(Arc<Mutex<Vec<u8>>>),
    /// Into a console log that programs wait on (see `crate::console`), and on to `also`.
    Console {
        log: Arc<super::serial_log::SerialLog>,
        also: Box<SerialSink>,
    },
}

impl SerialSink {
    fn writer(&self) -> Result<Box<dyn Write + Send>> {
        Ok(match self {
            SerialSink::Stdout => Box::new(Flushing(std::io::stdout())),
            SerialSink::None => Box::new(std::io::sink()),
            SerialSink::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("serial output file {}", p.display()))?,
            ),
            SerialSink::Capture(buf) => Box::new(Capture(buf.clone())),
            SerialSink::Console { log, also } => Box::new(super::serial_log::LogWriter {
                log: log.clone(),
                also: also.writer()?,
            }),
        })
    }
}

/// Flushes after every write so guest output appears as it is produced (and survives an
/// abrupt exit); one syscall per byte is cheap next to a ~13 us port-I/O exit.
struct Flushing<W: Write>(W);

impl<W: Write> Write for Flushing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Raises the serial interrupt by signalling an eventfd registered as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART in `state` (default state for a fresh boot). The caller registers
    /// `irq_fd()` with KVM.
    pub fn new(state: &SerialDeviceState, sink: &SerialSink) -> Result<SerialDevice> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).context("serial eventfd")?;
        let serial = Serial::from_state(&state.into(), IrqTrigger(evt), NoEvents, sink.writer()?)
            .map_err(|e| Error::InvalidState(format!("serial state: {e}")))?;
        Ok(SerialDevice { serial })
    }

    /// Back to `state` in place: the same irqfd (a duplicate of its eventfd, so the KVM
    /// registration stays) and the same output.
    pub fn reset_to(&mut self, state: &SerialDeviceState) -> Result<()> {
        let evt = self.irq_fd().try_clone().context("serial eventfd")?;
        let out = std::mem::replace(self.serial.writer_mut(), Box::new(std::io::sink()));
        self.serial = Serial::from_state(&state.into(), IrqTrigger(evt), NoEvents, out)
            .map_err(|e| Error::InvalidState(format!("serial state: {e}")))?;
        Ok(())
    }

    pub fn irq_fd(&self) -> &EventFd {
        &self.serial.interrupt_evt().0
    }

    pub fn state(&self) -> SerialDeviceState {
        (&self.serial.state()).into()
    }

    /// Queues host input; returns how many bytes fit in the FIFO.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        if self.serial.fifo_capacity() == 0 {
            return 0;
        }
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

impl Persist<'_> for SerialDevice {
    type State = SerialDeviceState;
    /// Where the output goes.
    type ConstructorArgs = SerialSink;
    const VERSION: u32 = 1;
    type Error = Error;

    fn save(&self) -> Result<SerialDeviceState> {
        Ok(self.state())
    }

    fn restore(sink: SerialSink, state: &SerialDeviceState) -> Result<SerialDevice> {
        SerialDevice::new(state, &sink)
    }
}

/// The UART does its work on the vCPU thread that accesses it: nothing to pause.
impl Pausable for Mutex<SerialDevice> {}

impl VmDevice for Mutex<SerialDevice> {
    fn save(&self, id: &str) -> Result<DeviceState> {
        DeviceState::new(id, &*lock(self))
    }

    fn reset_to(&self, state: &DeviceState) -> Result<()> {
        let s = state.decode::<SerialDevice>()?;
        lock(self).reset_to(&s)
    }

    fn resettable(&self) -> bool {
        true
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.serial.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        // An output error (closed pipe, full disk) must not stop the guest.
        let _ = self.serial.write(offset as u8, data[0]);
        IoAction::Continue
    }
}

/// Forwards stdin to the UART from a background thread (only when stdin is a terminal; a
/// piped stdin would otherwise race the test harness).
pub fn spawn_stdin_forwarder(dev: Arc<Mutex<SerialDevice>>) {
    let spawned = std::thread::Builder::new()
        .name("serial-stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                // SAFETY: reading into a local buffer from fd 0.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    if n < 0
                        && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                    {
                        continue;
                    }
                    return;
                }
                let mut pending = &buf[..n as usize];
                while !pending.is_empty() {
                    let took = lock(&dev).enqueue(pending);
                    pending = &pending[took..];
                    if took == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("keyboard input to the guest is off: cannot start a thread: {e}");
    }
}
