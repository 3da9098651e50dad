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
        config: PathBuf,
        /// Serve the HTTP control API on this Unix socket.
        #[arg(long)]
        api_sock: Option<PathBuf>,
        /// Guest serial output: stdout, none, or a file path (overrides the config's [serial]).
        #[arg(long)]
        serial_out: Option<String>,
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

fn run(config: PathBuf, api_sock: Option<PathBuf>, serial_out: Option<String>) -> Result<i32> {
    let cfg = VmConfig::from_file(&config)?;
    let payload = BootPayload::from_config(&cfg)?;
    let opts = RunOptions {
        serial_out: sink_for(&cfg, serial_out.as_deref()),
        api_sock,
        stdin_input: true,
        ..Default::default()
    };
    let vm = Vm::create(&cfg, payload, &opts)?;
    vmboot::terminate_on_signals(vm.controller())?;
    let reason = vm.run()?;
    if reason.code != 0 {
        eprintln!("vmboot: {} (exit status {})", reason.message, reason.code);
    }
    Ok(reason.code)
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
    println!("first-exit-monotonic-ns {first_ns}");
    Ok(reason.code)
}

fn bench(sizes: &[u64], runs: usize) -> Result<i32> {
    let exe = std::env::current_exe().context("locating vmboot")?;
    println!("time from process start to the first guest instruction (median of {runs} runs)");
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
        println!(
            "{:>6} MiB: {:8.2} ms (min {:.2}, max {:.2})",
            mib,
            samples[samples.len() / 2],
            samples[0],
            samples[samples.len() - 1]
        );
    }
    Ok(0)
}

fn main() {
    let cli = Cli::parse();
    // Before any thread starts, so every thread inherits the mask; the VM's own signal
    // thread turns them into a clean end.
    vmboot::block_exit_signals();
    let result = match cli.cmd {
        Cmd::Run {
            config,
            api_sock,
            serial_out,
        } => run(config, api_sock, serial_out),
        Cmd::Restore {
            pack,
            api_sock,
            serial_out,
            verify,
            memory,
            quiet,
        } => {
            use vmboot::snapshot::{restore_and_run, PackInput, RestoreOptions};
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
                ..Default::default()
            };
            restore_and_run(
                input,
                RestoreOptions {
                    verify,
                    memory,
                    run,
                    work_dir: None,
                    source: Default::default(),
                },
                quiet,
            )
        }
        Cmd::BenchStart {
            child: Some(mib), ..
        } => bench_child(mib),
        Cmd::BenchStart { sizes, runs, .. } => bench(&sizes, runs),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vmboot: error: {e:#}");
            std::process::exit(1);
        }
    }
}
