//! Driving a VM's serial console from a program: send input bytes, wait until the output
//! matches a pattern, read what came out.
//!
//! The guest's COM1 output is appended to a [`SerialLog`] (attach one with
//! [`SerialSink::Console`]); input goes into the UART's receive FIFO through
//! [`VmHandle::serial_input`], which raises the receive interrupt like a host terminal would.
//! [`Console`] ties both to a VM running on a background thread. Nothing in vmboot depends
//! on this module: it sits above `vmm` and `snapshot`, for the CLI's `test` and the tests.

pub use crate::devices::serial_log::SerialLog;
use crate::snapshot::{PackInput, RestoreInfo, RestoreOptions};
use crate::vmm::{ExitReason, SerialSink, Vm, VmHandle};
use regex::bytes::Regex;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What driving a VM through its console can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Restoring the pack.
    #[error(transparent)]
    Restore(#[from] crate::packs::Error),
    /// Running, resetting or feeding the VM.
    #[error(transparent)]
    Vm(#[from] crate::vmm::Error),
    /// Waiting for output: the VM ended first, or the time ran out.
    #[error(transparent)]
    Output(#[from] crate::devices::Error),
    #[error("the VM's serial output is not a console (SerialSink::Console)")]
    NotAConsole,
    #[error("cannot start the VM thread: {0}")]
    Thread(std::io::Error),
    #[error("bad pattern {pattern:?}: {error}")]
    BadPattern {
        pattern: String,
        error: regex::Error,
    },
    #[error("the VM thread panicked")]
    Panicked,
    #[error("the VM was already joined")]
    AlreadyJoined,
}

impl From<crate::vmm::PauseError> for Error {
    fn from(e: crate::vmm::PauseError) -> Error {
        Error::Vm(e.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
/// A running VM driven through its serial console.
pub struct Console {
    handle: Arc<VmHandle>,
    log: Arc<SerialLog>,
    /// Offset where the next [`Console::expect`] starts looking.
    cursor: usize,
    /// Where [`Console::output`] starts (the last reset).
    origin: usize,
    runner: Option<JoinHandle<Result<ExitReason>>>,
    /// Default time limit for [`Console::send`].
    pub input_timeout: Duration,
}

impl Console {
    /// Restores `input` and starts it with its serial port attached to a console (any
    /// `serial_out` in `opts.run` still receives a copy of the output).
    pub fn restore(input: PackInput, mut opts: RestoreOptions) -> Result<(Console, RestoreInfo)> {
        let log = SerialLog::new();
        opts.run.serial_out = SerialSink::Console {
            log: log.clone(),
            also: Box::new(std::mem::take(&mut opts.run.serial_out)),
        };
        opts.run.stdin_input = false;
        let (vm, info) = crate::snapshot::restore(input, opts)?;
        Ok((Console::start_with_log(vm, log)?, info))
    }

    /// Starts `vm`, whose options must have a [`SerialSink::Console`] sink, on a background
    /// thread.
    pub fn start(vm: Vm) -> Result<Console> {
        let log = vm.serial_log().ok_or(Error::NotAConsole)?;
        Console::start_with_log(vm, log)
    }

    fn start_with_log(vm: Vm, log: Arc<SerialLog>) -> Result<Console> {
        let handle = vm.controller();
        let log2 = log.clone();
        let runner = std::thread::Builder::new()
            .name("vm-console".into())
            .spawn(move || {
                let r = vm.run().map_err(Error::from);
                log2.close(match &r {
                    Ok(reason) => &reason.message,
                    Err(_) => "the VMM failed",
                });
                r
            })
            .map_err(Error::Thread)?;
        Ok(Console {
            handle,
            log,
            cursor: 0,
            origin: 0,
            runner: Some(runner),
            input_timeout: Duration::from_secs(10),
        })
    }

    pub fn handle(&self) -> &Arc<VmHandle> {
        &self.handle
    }

    pub fn log(&self) -> &Arc<SerialLog> {
        &self.log
    }

    /// Sends bytes to the guest's serial input.
    pub fn send(&self, bytes: impl AsRef<[u8]>) -> Result<()> {
        Ok(self
            .handle
            .serial_input(bytes.as_ref(), self.input_timeout)?)
    }

    /// Waits until the output after the previous match matches `pattern` (a regex, see the
    /// `regex` crate's syntax; `(?m)` makes `^`/`$` match at lines). Returns the output from
    /// the previous match up to the end of this one, and moves past it.
    pub fn expect(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        let re = Regex::new(pattern).map_err(|error| Error::BadPattern {
            pattern: pattern.to_string(),
            error,
        })?;
        self.expect_re(&re, timeout)
    }

    pub fn expect_re(&mut self, re: &Regex, timeout: Duration) -> Result<String> {
        let (_, end) = self
            .log
            .wait_for(self.cursor, re, Instant::now() + timeout)?;
        let (start, text) = self.log.since(self.cursor);
        let upto = end.saturating_sub(start).min(text.len());
        self.cursor = end;
        Ok(String::from_utf8_lossy(&text[..upto]).into_owned())
    }

    /// Everything the guest has written since it started or was last reset (up to the
    /// log's limit).
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.log.since(self.origin).1).into_owned()
    }

    /// Puts the VM back to the state of the pack it was restored from ([`VmHandle::reset`])
    /// and starts the console over: `expect` and `output` see only what comes after.
    pub fn reset(&mut self) -> Result<crate::vmm::ResetStats> {
        let was_paused = self.handle.is_paused();
        self.handle.pause()?;
        let stats = self.handle.reset()?;
        // Taken while paused: nothing the guest prints after the reset is skipped.
        self.cursor = self.log.end();
        self.origin = self.cursor;
        if !was_paused {
            self.handle.resume()?;
        }
        Ok(stats)
    }

    /// Whether the VM has ended (or is ending).
    pub fn ended(&self) -> bool {
        self.handle.run_state() == crate::api::RunState::Stopped
    }

    /// Ends the VM and waits for it; returns how it ended.
    pub fn stop(mut self) -> Result<ExitReason> {
        self.handle.shutdown();
        self.join()
    }

    /// Waits for the VM to end on its own.
    pub fn wait(mut self) -> Result<ExitReason> {
        self.join()
    }

    fn join(&mut self) -> Result<ExitReason> {
        match self.runner.take() {
            Some(t) => t.join().map_err(|_| Error::Panicked)?,
            None => Err(Error::AlreadyJoined),
        }
    }
}

impl Drop for Console {
    /// A console dropped without `stop` still ends its VM (and so removes its work folder).
    fn drop(&mut self) {
        if self.runner.is_some() {
            self.handle.shutdown();
            let _ = self.join();
        }
    }
}
