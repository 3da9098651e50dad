//! Driving a VM's serial console from a program: send input bytes, wait until the output
//! matches a pattern, read what came out.
//!
//! The guest's COM1 output is appended to a [`SerialLog`] (attach one with
//! [`SerialSink::Console`]); input goes into the UART's receive FIFO through
//! [`VmHandle::serial_input`], which raises the receive interrupt like a host terminal would.
//! [`Console`] ties both to a VM running on a background thread.

use crate::devices::bus::lock;
use crate::snapshot::{PackInput, RestoreInfo, RestoreOptions};
use crate::vmm::{ExitReason, RunOptions, SerialSink, Vm, VmHandle};
use anyhow::{anyhow, bail, Result};
use regex::bytes::Regex;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Output kept in memory per VM; older bytes are dropped (offsets stay valid, see
/// [`SerialLog::since`]).
const LOG_LIMIT: usize = 16 << 20;

#[derive(Default)]
struct LogInner {
    /// Bytes `base..base + bytes.len()` of everything the guest wrote.
    bytes: Vec<u8>,
    base: usize,
    /// Set when the VM has ended: waiting for more output is pointless.
    ended: Option<String>,
}

/// Everything a guest wrote to its serial port, shared between the VM and its readers.
/// Offsets count bytes since the VM (or its restore) started.
#[derive(Default)]
pub struct SerialLog {
    inner: Mutex<LogInner>,
    cv: Condvar,
}

impl std::fmt::Debug for SerialLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SerialLog({} bytes)", self.end())
    }
}

impl SerialLog {
    pub fn new() -> Arc<SerialLog> {
        Arc::new(SerialLog::default())
    }

    /// Offset just past the last byte written so far.
    pub fn end(&self) -> usize {
        let g = lock(&self.inner);
        g.base + g.bytes.len()
    }

    /// The bytes from offset `from` on (from the oldest kept byte if `from` was dropped),
    /// and the offset they start at.
    pub fn since(&self, from: usize) -> (usize, Vec<u8>) {
        let g = lock(&self.inner);
        let start = from.clamp(g.base, g.base + g.bytes.len());
        (start, g.bytes[start - g.base..].to_vec())
    }

    /// Everything kept.
    pub fn contents(&self) -> Vec<u8> {
        self.since(0).1
    }

    /// Why the VM ended, once it has.
    pub fn ended(&self) -> Option<String> {
        lock(&self.inner).ended.clone()
    }

    pub(crate) fn push(&self, data: &[u8]) {
        let mut g = lock(&self.inner);
        g.bytes.extend_from_slice(data);
        if g.bytes.len() > LOG_LIMIT {
            let drop = g.bytes.len() - LOG_LIMIT / 2;
            g.bytes.drain(..drop);
            g.base += drop;
        }
        self.cv.notify_all();
    }

    pub(crate) fn close(&self, why: &str) {
        let mut g = lock(&self.inner);
        if g.ended.is_none() {
            g.ended = Some(why.to_string());
        }
        self.cv.notify_all();
    }

    /// Waits until the output from offset `from` on matches `re`; returns the match's
    /// `(start, end)` offsets. Fails when `deadline` passes or the VM ends without a match.
    pub fn wait_for(&self, from: usize, re: &Regex, deadline: Instant) -> Result<(usize, usize)> {
        let mut g = lock(&self.inner);
        loop {
            let start = from.clamp(g.base, g.base + g.bytes.len());
            if let Some(m) = re.find(&g.bytes[start - g.base..]) {
                return Ok((start + m.start(), start + m.end()));
            }
            if let Some(why) = &g.ended {
                bail!("the VM ended ({why}) before its output matched /{re}/");
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("timed out waiting for output matching /{re}/");
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The serial device's writer for [`SerialSink::Console`]: into the log, and on to `also`.
pub(crate) struct LogWriter {
    pub(crate) log: Arc<SerialLog>,
    pub(crate) also: Box<dyn Write + Send>,
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.log.push(buf);
        // The log is the point of this sink; a failing copy (closed stdout) must not stop it.
        let _ = self.also.write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.also.flush();
        Ok(())
    }
}

/// `opts` with a serial log attached: the one it already has (a [`SerialSink::Console`]),
/// or, when a control socket is served, a new one that also passes output on to the
/// configured sink (so `GET /vm/serial/output` works for every VM with an API socket).
pub(crate) fn with_log(opts: &RunOptions) -> RunOptions {
    let mut o = opts.clone();
    if opts.api_sock.is_some() && !matches!(opts.serial_out, SerialSink::Console { .. }) {
        o.serial_out = SerialSink::Console {
            log: SerialLog::new(),
            also: Box::new(opts.serial_out.clone()),
        };
    }
    o
}

impl VmHandle {
    /// Puts `bytes` into COM1's receive FIFO, waiting while the FIFO is full (the guest reads
    /// it at its own pace). Fails if the guest has not made room within `timeout` or the VM
    /// has ended.
    pub fn serial_input(&self, bytes: &[u8], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut pending = bytes;
        while !pending.is_empty() {
            let took = lock(self.serial()).enqueue(pending);
            pending = &pending[took..];
            if took == 0 {
                if self.has_ended() {
                    bail!("the VM has ended; {} input bytes not sent", pending.len());
                }
                if Instant::now() >= deadline {
                    bail!(
                        "the guest did not read its serial input within {timeout:?}; {} bytes not sent",
                        pending.len()
                    );
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }

    fn has_ended(&self) -> bool {
        self.status_json()["state"] == "stopped"
    }
}

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
        let log = vm.serial_log().ok_or_else(|| {
            anyhow!("the VM's serial output is not a console (SerialSink::Console)")
        })?;
        Console::start_with_log(vm, log)
    }

    fn start_with_log(vm: Vm, log: Arc<SerialLog>) -> Result<Console> {
        let handle = vm.controller();
        let log2 = log.clone();
        let runner = std::thread::Builder::new()
            .name("vm-console".into())
            .spawn(move || {
                let r = vm.run();
                log2.close(match &r {
                    Ok(reason) => &reason.message,
                    Err(_) => "the VMM failed",
                });
                r
            })
            .map_err(|e| anyhow!("cannot start the VM thread: {e}"))?;
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
        self.handle.serial_input(bytes.as_ref(), self.input_timeout)
    }

    /// Waits until the output after the previous match matches `pattern` (a regex, see the
    /// `regex` crate's syntax; `(?m)` makes `^`/`$` match at lines). Returns the output from
    /// the previous match up to the end of this one, and moves past it.
    pub fn expect(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        let re = Regex::new(pattern).map_err(|e| anyhow!("bad pattern {pattern:?}: {e}"))?;
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
        self.handle.status_json()["state"] == "stopped"
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
            Some(t) => t.join().map_err(|_| anyhow!("the VM thread panicked"))?,
            None => bail!("the VM was already joined"),
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
