//! `vmpack bench-clones`: what a clone of a saved VM costs next to booting the same guest.
//!
//! The guest is the kvstore sample with `--memory-mib` of RAM. For each count N, N clones
//! are restored at once (one thread each) from an uncompressed pack, each answers one
//! command, and the host memory they hold is measured; then the same with N fresh boots from
//! the config. Latency is from the start of the restore (or boot) to the guest's answer.

use crate::test_cmd::{prepare_source, start_clone, WorkBase};
use anyhow::{anyhow, Context, Result};
use clap::Args;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmboot::console::{Console, SerialLog};
use vmboot::snapshot::{MemoryPolicy, PackInput, RestoreOptions, VerifyPolicy};
use vmboot::{BootPayload, RunOptions, SerialSink, Vm};
use vmpack_formats::config::VmConfig;
use vmpack_formats::pack::Compression;

#[derive(Args)]
pub struct BenchClonesArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Numbers of concurrent clones to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 10, 100])]
    counts: Vec<usize>,
    /// In-place resets to measure for each way a restore fills memory and with a vsock
    /// device and a generation ID (the `dirty` guest writes 1 MiB in 256 runs before each),
    /// and cases to run each way (fresh clone per case, one clone reset between cases).
    #[arg(long, default_value_t = 50)]
    resets: usize,
    /// Print only the results (no progress notes).
    #[arg(long, short)]
    pub quiet: bool,
}

const TIMEOUT: Duration = Duration::from_secs(120);

fn console_opts(log: &Arc<SerialLog>) -> RunOptions {
    RunOptions {
        serial_out: SerialSink::Console {
            log: log.clone(),
            also: Box::new(SerialSink::None),
        },
        ..Default::default()
    }
}

fn boot(cfg: &VmConfig) -> Result<Console> {
    let log = SerialLog::new();
    let payload = BootPayload {
        image: Some(vmboot::samples::KVSTORE.to_vec()),
        ..Default::default()
    };
    Ok(Console::start(Vm::create(
        cfg,
        payload,
        &console_opts(&log),
    )?)?)
}

/// `MemAvailable` from /proc/meminfo, in bytes: counts guest pages, KVM's kernel memory and
/// page tables alike, which per-process RSS would miss.
fn mem_available() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| anyhow!("no MemAvailable in /proc/meminfo"))
}

fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

struct Row {
    what: &'static str,
    n: usize,
    median_ms: f64,
    max_ms: f64,
    mem_mib: f64,
    rss_mib: f64,
}

/// Starts `n` VMs at once with `start`, waits for each to answer, measures, stops them.
fn measure(
    what: &'static str,
    n: usize,
    start: &(dyn Fn(usize) -> Result<Console> + Sync),
    ready: &str,
) -> Result<Row> {
    let (avail0, rss0) = (mem_available()?, rss());
    let results: Vec<Result<(Console, f64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                std::thread::Builder::new().spawn_scoped(s, move || -> Result<(Console, f64)> {
                    let t = Instant::now();
                    let mut c = start(i)?;
                    if ready.starts_with("get") {
                        c.send(ready)?;
                        c.expect("^1\n> ", TIMEOUT)?;
                    } else {
                        c.expect(ready, TIMEOUT)?;
                    }
                    Ok((c, t.elapsed().as_secs_f64() * 1000.0))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or_else(|_| Err(anyhow!("thread panicked"))),
                Err(e) => Err(anyhow!("cannot start a thread: {e}")),
            })
            .collect()
    });
    let (avail1, rss1) = (mem_available()?, rss());
    let mut lat = Vec::new();
    let mut consoles = Vec::new();
    let mut first_err = None;
    for r in results {
        match r {
            Ok((c, ms)) => {
                consoles.push(c);
                lat.push(ms);
            }
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    for c in consoles {
        let _ = c.stop();
    }
    if let Some(e) = first_err {
        return Err(e.context(format!("{what} x{n}")));
    }
    lat.sort_by(f64::total_cmp);
    Ok(Row {
        what,
        n,
        median_ms: lat[lat.len() / 2],
        max_ms: lat[lat.len() - 1],
        mem_mib: avail0.saturating_sub(avail1) as f64 / (1 << 20) as f64,
        rss_mib: rss1.saturating_sub(rss0) as f64 / (1 << 20) as f64,
    })
}

pub fn run(a: BenchClonesArgs) -> Result<()> {
    let work = WorkBase::new("bench")?;
    let text = format!(
        "name = \"kvstore\"\nmemory_mib = {}\n[flat]\nimage = \"kvstore.bin\"\n\
         load_address = 0x100000\nentry = 0x100000\nmode = \"long\"\n",
        a.memory_mib
    );
    let cfg = VmConfig::parse(&text, Path::new("/bench/kvstore.toml"))?;

    // The pack: boot, set a key, save uncompressed (the mappable form), stop.
    let pack = work.clone_dir(usize::MAX)?.join("kvstore.vmpack");
    {
        let mut c = boot(&cfg)?;
        c.expect("> $", TIMEOUT)?;
        c.send("set a 1\n")?;
        c.expect("ok\n> ", TIMEOUT)?;
        let mut f = std::fs::File::create(&pack)?;
        vmboot::snapshot::save(c.handle(), Compression::None, None, false, &mut f)?;
        f.sync_all()?;
        c.stop()?;
    }
    let src = prepare_source(&pack, true)?;
    crate::note!(
        "vmpack: {} MiB kvstore guest; pack {:.1} MiB; counts {:?}",
        a.memory_mib,
        std::fs::metadata(&src)?.len() as f64 / (1 << 20) as f64,
        a.counts
    );
    let clone_start = |i: usize| {
        start_clone(
            &src,
            &work,
            i,
            RunOptions {
                serial_out: SerialSink::None,
                ..Default::default()
            },
        )
    };
    let boot_start = |_: usize| boot(&cfg);
    let mut rows = Vec::new();
    for &n in &a.counts {
        rows.push(measure("clone", n, &clone_start, "get a\n")?);
        // A clone's work folders are not reused; keep numbering unique per round.
        for i in 0..n {
            let _ = std::fs::remove_dir_all(work_dir_of(&work, i));
        }
        rows.push(measure("boot", n, &boot_start, "> $")?);
    }
    crate::outln!(
        "what   count  latency median  latency max  extra memory (MemAvailable)  extra RSS"
    );
    for r in &rows {
        crate::outln!(
            "{:<5}  {:>5}  {:>11.1} ms  {:>8.1} ms  {:>22.1} MiB  {:>6.1} MiB",
            r.what,
            r.n,
            r.median_ms,
            r.max_ms,
            r.mem_mib,
            r.rss_mib
        );
    }
    crate::outln!("(latency: from the start of the restore or boot to the guest's first answer; clones answer `get a`, boots print their prompt)");
    if a.resets > 0 {
        reset_figures(&work, &src, a.memory_mib.max(32), a.resets)?;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Boots the `dirty` guest (with a vsock device and a generation ID if `devices`) and saves
/// it once per compression in `packs`, each into its path.
fn dirty_packs(
    dir: &Path,
    memory_mib: u64,
    devices: bool,
    packs: &[(Compression, &Path)],
) -> Result<()> {
    let disk = dir.join(format!("dirty-disk-{devices}.img"));
    std::fs::write(&disk, vec![0u8; 64 << 10])?;
    let extra = if devices {
        format!(
            "vmgenid = true\n[vsock]\ncid = 3\nuds_path = \"{}\"\n",
            dir.join("dirty-boot.sock").display()
        )
    } else {
        String::new()
    };
    let text = format!(
        "name = \"dirty\"\nmemory_mib = {memory_mib}\n{extra}[flat]\nimage = \"dirty.bin\"\n\
         load_address = 0x100000\nentry = 0x100000\nmode = \"long\"\n\
         [[disk]]\npath = \"{}\"\nformat = \"raw\"\n",
        disk.display()
    );
    let cfg = VmConfig::parse(&text, &dir.join("dirty.toml"))?;
    let log = SerialLog::new();
    let payload = BootPayload {
        image: Some(vmboot::samples::DIRTY.to_vec()),
        ..Default::default()
    };
    let mut c = Console::start(Vm::create(&cfg, payload, &console_opts(&log))?)?;
    c.expect("ready\n", TIMEOUT)?;
    for (i, (compression, path)) in packs.iter().enumerate() {
        let mut f = std::fs::File::create(path)?;
        let resume = i + 1 < packs.len();
        vmboot::snapshot::save(c.handle(), *compression, None, resume, &mut f)?;
        f.sync_all()?;
    }
    c.stop()?;
    Ok(())
}

/// One reset figure: `n` rounds of the guest writing 1 MiB (256 separate pages), then a
/// reset; medians of the reset's pause, of the whole call, and of the guest's round after
/// a reset (which pays for pages a lazy restore serves again). `before_reset` runs just
/// before each reset.
struct ResetFigure {
    pause_ms: f64,
    call_ms: f64,
    round_ms: f64,
    pages: u64,
}

fn measure_resets(
    c: &mut Console,
    n: usize,
    mut before_reset: impl FnMut(&Console) -> Result<()>,
) -> Result<ResetFigure> {
    let (mut pause, mut wall, mut round, mut pages) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for _ in 0..n {
        let t = Instant::now();
        c.send("w")?;
        c.expect("wrote\n", TIMEOUT)?;
        round.push(t.elapsed().as_secs_f64() * 1000.0);
        before_reset(c)?;
        let t = Instant::now();
        let s = c.reset()?;
        wall.push(t.elapsed().as_secs_f64() * 1000.0);
        pause.push(s.pause_ms);
        pages = s.pages;
    }
    Ok(ResetFigure {
        pause_ms: median(pause),
        call_ms: median(wall),
        // The first round ran on a fresh restore, not after a reset.
        round_ms: median(round.split_off(1.min(round.len()))),
        pages,
    })
}

/// The in-place reset (`PUT /vm/reset`): its pause with 1 MiB written, for each way a
/// restore fills memory and with a vsock device and a generation ID, and kvstore cases per
/// second with a fresh clone per case against one clone reset between cases.
fn reset_figures(work: &WorkBase, kv: &Path, memory_mib: u64, n: usize) -> Result<()> {
    let dir = work.clone_dir(usize::MAX - 1)?;
    let (plain, zstd, devices) = (
        dir.join("dirty.vmpack"),
        dir.join("dirty-zstd.vmpack"),
        dir.join("dirty-vsock.vmpack"),
    );
    dirty_packs(
        &dir,
        memory_mib,
        false,
        &[(Compression::None, &plain), (Compression::Zstd, &zstd)],
    )?;
    dirty_packs(&dir, memory_mib, true, &[(Compression::None, &devices)])?;
    let quiet = || RunOptions {
        serial_out: SerialSink::None,
        ..Default::default()
    };
    let restore = |pack: &Path, i: usize, memory: MemoryPolicy, run: RunOptions| {
        // Mapped as `vmpack test` maps it (verified once); the others read the pack itself
        // (the zstd one decompressed whole, or either one served lazily).
        let pack = if memory == MemoryPolicy::Eager && pack != zstd.as_path() {
            prepare_source(pack, true)?
        } else {
            pack.to_path_buf()
        };
        let (c, info) = Console::restore(
            PackInput::File(pack),
            RestoreOptions {
                report: Default::default(),
                bench_timestamps: false,
                verify: VerifyPolicy::Auto,
                memory,
                run,
                work_dir: work.clone_dir(i)?,
                source: Default::default(),
                parent: None,
            },
        )?;
        anyhow::Ok((c, info.memory_path))
    };
    crate::outln!(
        "\nin-place reset of the {memory_mib} MiB dirty guest after it wrote 1 MiB in 256 \
         separate pages (median of {n}):"
    );
    crate::outln!(
        "{:<31}  {:<11}  {:>9}  {:>10}  {:>18}",
        "restore",
        "memory path",
        "paused",
        "whole call",
        "guest's next round"
    );
    let modes: [(&str, &Path, MemoryPolicy, bool); 5] = [
        ("uncompressed, mapped", &plain, MemoryPolicy::Eager, false),
        ("uncompressed, lazy", &plain, MemoryPolicy::Lazy, false),
        (
            "zstd, eager (decompressed)",
            &zstd,
            MemoryPolicy::Eager,
            false,
        ),
        ("zstd, lazy", &zstd, MemoryPolicy::Lazy, false),
        (
            "mapped, vsock + vmgenid",
            &devices,
            MemoryPolicy::Eager,
            true,
        ),
    ];
    for (k, (what, pack, memory, vsock)) in modes.into_iter().enumerate() {
        let mut run = quiet();
        let sock = dir.join(format!("reset-{k}.sock"));
        if vsock {
            run.vsock_sock = Some(sock.clone());
        }
        let (mut c, path) = restore(pack, usize::MAX / 2 + k, memory, run)?;
        if memory == MemoryPolicy::Lazy {
            // The figure is the reset's, not the prefetch's competing for the cores.
            if let Some(e) = c.handle().memory_failure() {
                anyhow::bail!("{what}: {e}");
            }
        }
        // A host connection open at each reset, for the reset to close.
        let mut open = Vec::new();
        let f = measure_resets(&mut c, n, |_| {
            if vsock {
                open.push(
                    std::os::unix::net::UnixStream::connect(&sock)
                        .with_context(|| format!("connecting to {}", sock.display()))?,
                );
            }
            Ok(())
        })?;
        drop(open);
        c.stop()?;
        crate::outln!(
            "{what:<31}  {path:<11}  {:>6.3} ms  {:>7.3} ms  {:>15.3} ms  ({} KiB put back)",
            f.pause_ms,
            f.call_ms,
            f.round_ms,
            f.pages * 4
        );
    }

    // The same kvstore cases, one after the other, each way.
    let case = |c: &mut Console, i: usize| -> Result<()> {
        c.send(format!("set k{i} v{i}\n"))?;
        c.expect("^ok\n> ", TIMEOUT)?;
        c.send("count\n")?;
        c.expect("^2\n> ", TIMEOUT)?;
        Ok(())
    };
    let t = Instant::now();
    for i in 0..n {
        let mut c = start_clone(kv, work, usize::MAX - 10 - i, quiet())?;
        case(&mut c, i)?;
        c.stop()?;
    }
    let fresh = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut c = start_clone(kv, work, usize::MAX - 3, quiet())?;
    for i in 0..n {
        if i > 0 {
            c.reset()?;
        }
        case(&mut c, i)?;
    }
    c.stop()?;
    let reused = n as f64 / t.elapsed().as_secs_f64();
    crate::outln!(
        "kvstore cases, one at a time ({n} each way): {fresh:.1} cases/s with a fresh clone \
         per case, {reused:.1} cases/s with one clone reset between cases ({:.1}x)",
        reused / fresh
    );
    Ok(())
}

fn work_dir_of(work: &WorkBase, i: usize) -> std::path::PathBuf {
    work.path().join(format!("clone-{i}"))
}
