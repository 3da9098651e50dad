use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use vmboot::{BootPayload, RunOptions, SerialSink, Vm};
use vmpack_formats::config::{SerialOutput, VmConfig};

#[derive(Parser)]
#[command(
    name = "vmboot",
    version,
    about = "Boot a VM from a TOML config on KVM"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot CONFIG and run until the guest ends; exits with the guest's status.
    Run {
        /// The VM config (TOML: vcpus, memory, kernel or flat image, disks, serial; see
        /// docs/CONFIG.md). Relative paths inside it are relative to its folder.
        #[arg(value_name = "CONFIG")]
        config: PathBuf,
        /// Serve the HTTP control API on this Unix socket.
        #[arg(long)]
        api_sock: Option<PathBuf>,
        /// Guest serial output: stdout, none, or a file path (overrides the config's [serial]).
        #[arg(long)]
        serial_out: Option<String>,
        /// The vsock device's host socket (overrides the config's [vsock] uds_path).
        #[arg(long, value_name = "PATH")]
        vsock_sock: Option<PathBuf>,
        /// Print nothing but errors (the guest's serial output is governed by --serial-out).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Build a fresh VM from a pack made by `vmpack save` and resume it where it stopped.
    Restore {
        /// The pack, or - to read it from standard input.
        pack: PathBuf,
        /// Serve the HTTP control API on this Unix socket.
        #[arg(long)]
        api_sock: Option<PathBuf>,
        /// Guest serial output: stdout, none, or a file path.
        #[arg(long, default_value = "stdout")]
        serial_out: String,
        /// The vsock device's host socket; default: vsock.sock in the restore's work folder
        /// (a pack's own path is never used).
        #[arg(long, value_name = "PATH")]
        vsock_sock: Option<PathBuf>,
        /// When to check chunk hashes (see docs/FORMAT.md, "Verification on restore").
        #[arg(long, value_enum, default_value = "auto")]
        verify: vmboot::snapshot::VerifyPolicy,
        /// How guest memory is filled: auto, lazy (on first touch, each chunk verified
        /// first) or eager (docs/FORMAT.md, "Guest memory on restore").
        #[arg(long, value_enum, default_value = "auto")]
        memory: vmboot::snapshot::MemoryPolicy,
        /// Print nothing but errors and warnings.
        #[arg(long, short)]
        quiet: bool,
        /// For a diff pack: its parent pack, instead of the file its manifest names in its
        /// folder (the root digest must still match); needed when the pack is read from
        /// standard input.
        #[arg(long, value_name = "FILE")]
        parent: Option<PathBuf>,
    },
    /// Measure the time from process start to the guest's first instruction for several
    /// guest sizes (anonymous MAP_NORESERVE memory, so large guests cost little).
    BenchStart {
        /// Guest sizes in MiB.
        #[arg(long, value_delimiter = ',', default_values_t = [256u64, 4096, 32768])]
        sizes: Vec<u64>,
        /// Runs per size (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, hide = true)]
        child: Option<u64>,
        /// Accepted for uniformity: the results are the only output.
        #[arg(long, short)]
        quiet: bool,
    },
}

fn sink_for(cfg: &VmConfig, arg: Option<&str>) -> SerialSink {
    match arg {
        Some("stdout") => SerialSink::Stdout,
        Some("none") => SerialSink::None,
        Some(path) => SerialSink::File(PathBuf::from(path)),
        None => match cfg.serial.output {
            SerialOutput::Stdout => SerialSink::Stdout,
            SerialOutput::None => SerialSink::None,
            SerialOutput::File => cfg
                .serial
                .path
                .clone()
                .map_or(SerialSink::None, SerialSink::File),
        },
    }
}

fn run(
    config: PathBuf,
    api_sock: Option<PathBuf>,
    serial_out: Option<String>,
    vsock_sock: Option<PathBuf>,
    quiet: bool,
) -> Result<i32> {
    let cfg = VmConfig::from_file(&config)?;
    let payload = BootPayload::from_config(&cfg)?;
    let opts = RunOptions {
        serial_out: sink_for(&cfg, serial_out.as_deref()),
        api_sock,
        stdin_input: true,
        vsock_sock,
        temp_dir: Some(std::env::temp_dir()),
        ..Default::default()
    };
    let vm = Vm::create(&cfg, payload, &opts)?;
    vmboot::terminate_on_signals(vm.controller())?;
    let reason = vm.run()?;
    // The guest's failure is the message even with --quiet: it is why the status is not 0.
    let _ = quiet;
    if reason.code != 0 {
        eprintln!("vmboot: {} (exit status {})", reason.message, reason.code);
    }
    Ok(reason.code)
}

/// `outer: inner: innermost`, skipping causes whose text an outer message already holds
/// (an error that displays its source would otherwise print it twice).
fn error_chain(e: &anyhow::Error) -> String {
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

/// Ends the process quietly when stdout's reader has gone away (`| head -1`).
fn outln(line: std::fmt::Arguments) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout(), "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("vmboot: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// Child side of bench-start: boot a long-mode guest whose first instruction is
/// `out %al, $0xf4`, and print the CLOCK_MONOTONIC time of that exit.
fn bench_child(mib: u64) -> Result<i32> {
    let text = format!(
        "name = \"bench\"\nmemory_mib = {mib}\n[flat]\nimage = \"unused.bin\"\n\
         load_address = 0x100000\nentry = 0x100000\nmode = \"long\"\n"
    );
    let cfg = VmConfig::parse(&text, std::path::Path::new("/bench/bench.toml"))?;
    let payload = BootPayload {
        image: Some(vec![0xb0, 0x00, 0xe6, 0xf4]), // mov $0, %al; out %al, $0xf4
        ..Default::default()
    };
    let vm = Vm::create(
        &cfg,
        payload,
        &RunOptions {
            serial_out: SerialSink::None,
            ..Default::default()
        },
    )?;
    let h = vm.controller();
    let start = std::time::Instant::now();
    let now_ns = monotonic_ns();
    let reason = vm.run()?;
    let first = h.first_exit_instant().context("the guest never ran")?;
    let first_ns = now_ns + first.duration_since(start).as_nanos();
    outln(format_args!("first-exit-monotonic-ns {first_ns}"));
    Ok(reason.code)
}

fn bench(sizes: &[u64], runs: usize) -> Result<i32> {
    let exe = std::env::current_exe().context("locating vmboot")?;
    outln(format_args!(
        "time from process start to the first guest instruction (median of {runs} runs)"
    ));
    for &mib in sizes {
        let mut samples = Vec::new();
        for _ in 0..runs.max(1) {
            let t0 = monotonic_ns();
            let out = std::process::Command::new(&exe)
                .args(["bench-start", "--child", &mib.to_string()])
                .output()
                .context("starting the benchmark child")?;
            if !out.status.success() {
                anyhow::bail!(
                    "benchmark child for {mib} MiB failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let t1: u128 = text
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .context("benchmark child printed no timestamp")?;
            samples.push((t1 - t0) as f64 / 1e6);
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        outln(format_args!(
            "{:>6} MiB: {:8.2} ms (min {:.2}, max {:.2})",
            mib,
            samples[samples.len() / 2],
            samples[0],
            samples[samples.len() - 1]
        ));
    }
    Ok(0)
}

/// A thread that cannot map its signal stack (a tight `ulimit -v`) panics inside std before
/// any of its code runs, and std's default hook can then deadlock: printing the backtrace
/// runs out of memory too and the out-of-memory handler waits for the lock the printer
/// holds. That panic is reported as the error it is and ends the process (status 1); any
/// other panic goes to the default hook.
fn report_thread_start_failures() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if msg.contains("alternative stack") {
            eprintln!("vmboot: error: cannot start a thread: {msg}");
            // SAFETY: ends the process at once; nothing may wait for this thread.
            unsafe { libc::_exit(1) };
        }
        default(info)
    }));
}

/// The library's warnings and errors (the `log` facade: the library prints nothing itself),
/// on stderr as vmboot's own.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        match r.level() {
            log::Level::Error => eprintln!("vmboot: {}", r.args()),
            log::Level::Warn => eprintln!("vmboot: warning: {}", r.args()),
            _ => {}
        }
    }
    fn flush(&self) {}
}

/// The cache folder (verified packs, touch orders, expanded packs): `$VMPACK_CACHE_DIR`,
/// else `$XDG_CACHE_HOME/vmpack`, else `~/.cache/vmpack`; shared with vmpack.
fn cache_dir_from_env() -> Option<PathBuf> {
    std::env::var_os("VMPACK_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|p| PathBuf::from(p).join("vmpack")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/vmpack")))
}

fn main() {
    report_thread_start_failures();
    static LOG: StderrLog = StderrLog;
    if log::set_logger(&LOG).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    vmboot::verified_cache::set_base_dir(cache_dir_from_env());
    if let Some(n) = std::env::var("VMBOOT_PREFETCH_THREADS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        vmboot::vstate::lazy::set_prefetch_threads(n);
    }
    let cli = Cli::parse();
    // Before any thread starts, so every thread inherits the mask; the VM's own signal
    // thread turns them into a clean end.
    vmboot::block_exit_signals();
    let result = match cli.cmd {
        Cmd::Run {
            config,
            api_sock,
            serial_out,
            vsock_sock,
            quiet,
        } => run(config, api_sock, serial_out, vsock_sock, quiet),
        Cmd::Restore {
            pack,
            api_sock,
            serial_out,
            vsock_sock,
            verify,
            memory,
            quiet,
            parent,
        } => {
            use vmboot::snapshot::{
                restore_and_run, PackInput, Reporter, RestoreEvent, RestoreOptions,
            };
            let input = if pack.as_os_str() == "-" {
                PackInput::Stdin
            } else {
                PackInput::File(pack)
            };
            let run = RunOptions {
                serial_out: match serial_out.as_str() {
                    "stdout" => SerialSink::Stdout,
                    "none" => SerialSink::None,
                    p => SerialSink::File(PathBuf::from(p)),
                },
                api_sock,
                // stdin may be the pack itself.
                stdin_input: !matches!(input, PackInput::Stdin),
                vsock_sock,
                ..Default::default()
            };
            let reporter = Reporter::new(move |e| {
                if !(quiet && matches!(e, RestoreEvent::Restored { .. })) {
                    eprintln!("{}", e.message("vmboot"));
                }
            });
            restore_and_run(
                input,
                RestoreOptions {
                    report: reporter,
                    bench_timestamps: std::env::var_os("VMBOOT_BENCH_TIMESTAMPS").is_some(),
                    verify,
                    memory,
                    run,
                    work_dir: std::env::temp_dir(),
                    source: Default::default(),
                    parent,
                },
            )
            .map(|reason| {
                if reason.code != 0 {
                    eprintln!("vmboot: {} (exit status {})", reason.message, reason.code);
                }
                reason.code
            })
            .map_err(anyhow::Error::from)
        }
        Cmd::BenchStart {
            child: Some(mib), ..
        } => bench_child(mib),
        Cmd::BenchStart { sizes, runs, .. } => bench(&sizes, runs),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // Messages quote names from packs and configs: never a raw control character.
            eprintln!(
                "vmboot: error: {}",
                vmpack_formats::vm::printable_lines(&error_chain(&e))
            );
            std::process::exit(1);
        }
    }
}
