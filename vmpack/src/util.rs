//! Small helpers shared by the commands.

use std::io::IsTerminal;

/// `outer: inner: innermost`, skipping causes whose text the outer message already holds.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

/// `1.5 GiB`-style sizes for humans.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Whether a binary pack may go to stdout.
pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

/// A usage error found after argument parsing (an option that does not apply to what was
/// given): the process exits with status 2, like clap's own usage errors.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// `println!` for command output: when the reader of stdout has gone away (`| head -1`),
/// the process ends quietly with 141 (128 + SIGPIPE, what a tool killed by SIGPIPE
/// returns) instead of panicking.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::util::stdout_failed(e);
        }
    }};
}

/// `print!` counterpart of [`outln!`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($arg)*) {
            $crate::util::stdout_failed(e);
        }
    }};
}

/// Ends the process after a failed write to stdout: quietly when its reader has gone away,
/// with the error otherwise. Unfinished outputs are removed either way.
pub fn stdout_failed(e: std::io::Error) -> ! {
    crate::output::remove_pending();
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    eprintln!("vmpack: cannot write to standard output: {e}");
    std::process::exit(1);
}

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--quiet` of commands whose progress notes come from deep inside (the benchmarks).
pub fn set_quiet(q: bool) {
    QUIET.store(q, std::sync::atomic::Ordering::Relaxed);
}

pub fn quiet() -> bool {
    QUIET.load(std::sync::atomic::Ordering::Relaxed)
}

/// A progress note on stderr, silenced by `--quiet`.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        if !$crate::util::quiet() {
            eprintln!($($arg)*);
        }
    }};
}
