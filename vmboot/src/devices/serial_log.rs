//! The guest's serial output kept in memory ([`SerialLog`]), for the control API's
//! `GET /vm/serial/output` and for [`crate::console::Console`].

use super::{Error, Result};
use crate::devices::bus::lock;
use regex::bytes::Regex;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

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
                return Err(Error::EndedBeforeMatch {
                    why: why.clone(),
                    pattern: re.to_string(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::OutputTimeout {
                    pattern: re.to_string(),
                });
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
