//! `vmpack bench-snapshot`: pause, save time, pack size and restore latency of Linux guests
//! (nearly empty, and holding a large initrd the loader copied into RAM), next to QEMU's
//! `migrate "exec:cat > FILE"` / `-incoming` on the same guests.
//!
//! Every VM runs in a child process (`vmboot run`, `vmboot restore`, `qemu-system-x86_64`);
//! children are killed when this process ends, also by a signal.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use vmboot::api::ApiClient;
use vmpack_formats::pack::Compression;

use crate::output::AtomicDir;

#[derive(Args)]
pub struct BenchSnapshotArgs {
    /// Guest RAM sizes in MiB [default: 256,1024,4096; with --quick 256,1024].
    #[arg(long, value_delimiter = ',', value_name = "MIB")]
    sizes: Vec<u64>,
    /// Compressions to measure [default: none,deflate,zstd; with --quick none,zstd].
    #[arg(long, value_delimiter = ',')]
    compress: Vec<Compression>,
    /// Non-zero data (initrd size) of the "full" guests in MiB. Guests too small for it get
    /// their size minus 106 MiB (150 MiB in a 256 MiB guest).
    #[arg(long, default_value_t = 600, value_name = "MIB")]
    data_mib: u64,
    /// Fewer guests and compressions (see --sizes, --compress).
    #[arg(long)]
    quick: bool,
    /// Linux bzImage to boot [default: samples/linux/out/vmlinuz, from fetch-kernel.sh].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Folder for the scratch files (removed afterwards) [default: the temp folder].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Leave out the QEMU columns.
    #[arg(long)]
    no_qemu: bool,
    /// Also wait this long after a restore for vCPU 0's first exit and log it. The table
    /// times process start to the vCPUs starting, like QEMU's "running": a Linux guest
    /// saved while it decompresses itself may not exit to the VMM for seconds.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    first_exit_wait_ms: u64,
    /// Print only the results (no progress notes).
    #[arg(long, short)]
    pub quiet: bool,
}

const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 nomodeset nokaslr";

// ---------------------------------------------------------------------------------------
// Data

/// wyrand: fast, and enough to defeat compressors.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xe703_7ed1_a0b4_28db) as u128);
        ((t >> 64) ^ t) as u64
    }
}

const WORDS: &[&str] = &[
    "the", "kernel", "memory", "page", "disk", "virtual", "machine", "device", "queue", "error",
    "boot", "init", "mount", "process", "signal", "buffer", "network", "packet", "config", "value",
    "user", "system", "file", "read", "write", "open", "close", "time", "state",
];

/// Writes `mib` MiB alternating 4 MiB stripes of random bytes and English-like text: about
/// half incompressible, like a guest page cache full of binaries and logs.
fn make_initrd(path: &Path, mib: u64) -> Result<()> {
    const STRIPE: usize = 4 << 20;
    let mut out = BufWriter::with_capacity(STRIPE, File::create(path)?);
    let mut rng = Rng(0x5eed ^ mib);
    let mut buf = vec![0u8; STRIPE];
    let total = mib << 20;
    let mut written = 0u64;
    let mut stripe = 0u64;
    while written < total {
        let n = (total - written).min(STRIPE as u64) as usize;
        let b = &mut buf[..n];
        if stripe.is_multiple_of(2) {
            for c in b.chunks_mut(8) {
                let v = rng.next().to_le_bytes();
                c.copy_from_slice(&v[..c.len()]);
            }
        } else {
            let mut i = 0;
            while i < n {
                let r = rng.next();
                let w = WORDS[(r % WORDS.len() as u64) as usize].as_bytes();
                let sep: &[u8] = if (r >> 32) & 15 == 0 { b".\n" } else { b" " };
                for &c in w.iter().chain(sep) {
                    if i < n {
                        b[i] = c;
                        i += 1;
                    }
                }
            }
        }
        out.write_all(b)?;
        written += n as u64;
        stripe += 1;
    }
    out.into_inner().map_err(|e| e.into_error())?;
    Ok(())
}

/// Non-zero data put into a guest of `guest_mib`: the kernel and its decompression need
/// roughly 100 MiB below the initrd.
fn data_for(guest_mib: u64, want: u64) -> u64 {
    want.min(guest_mib.saturating_sub(106))
}

// ---------------------------------------------------------------------------------------
// Processes

fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// A child that is killed when dropped, and (PR_SET_PDEATHSIG) when this process dies:
/// VMs of several GiB must not outlive an interrupted benchmark.
struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    fn spawn(mut cmd: Command, what: impl Into<String>) -> Result<Proc> {
        let what = what.into();
        // SAFETY: only async-signal-safe calls run between fork and exec. The signal mask
        // is reset because vmpack blocks SIGINT/SIGTERM/SIGHUP in every thread (see
        // output.rs) and a blocked mask survives exec.
        unsafe {
            cmd.pre_exec(|| {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(Proc { child, what })
    }

    /// Fails with `log`'s content if the child has ended.
    fn check_alive(&mut self, log: Option<&Path>) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            let text = log
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            bail!("{} ended early ({st}): {}", self.what, text.trim());
        }
        Ok(())
    }

    /// Waits up to `grace` for the child to end by itself, then kills it.
    fn finish(mut self, grace: Duration) {
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Resets the peak resident size of process `pid` (`/proc/PID/clear_refs`, Linux ≥ 4.0) and
/// returns its resident size now, in bytes; `None` where /proc does not allow it.
fn rss_reset(pid: u32) -> Option<u64> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").ok()?;
    proc_status_kb(pid, "VmRSS:")
}

/// The peak resident size of `pid` since the last [`rss_reset`], in bytes.
fn rss_peak(pid: u32) -> Option<u64> {
    proc_status_kb(pid, "VmHWM:")
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The saving process's resident size before a save and its peak during it.
#[derive(Clone, Copy, Default)]
struct Rss {
    before: u64,
    peak: u64,
}

impl Rss {
    /// `"+X MB"`: what the save added to the VM process's resident size at its peak.
    fn extra(self) -> String {
        if self.peak == 0 {
            return "-".into();
        }
        format!("{:.0}", mb(self.peak.saturating_sub(self.before)))
    }
}

/// Runs `f` (a save of the VM in process `pid`) and measures [`Rss`] around it.
fn with_rss<T>(pid: u32, f: impl FnOnce() -> T) -> (T, Rss) {
    let before = rss_reset(pid);
    let r = f();
    let rss = match (before, rss_peak(pid)) {
        (Some(before), Some(peak)) => Rss { before, peak },
        _ => Rss::default(),
    };
    (r, rss)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

// ---------------------------------------------------------------------------------------
// vmpack / vmboot

struct Guest {
    mib: u64,
    /// Initrd size in MiB (0: no initrd, "nearly empty").
    data_mib: u64,
    initrd: Option<PathBuf>,
}

#[derive(Default, Clone)]
struct OursRow {
    pause_ms: f64,
    save_s: f64,
    bytes: u64,
    /// (first restore: verifies every chunk, second: uses the verified-pack record), both
    /// `--memory eager`
    restore: [Option<RestoreSample>; 2],
    /// First restore with `--memory lazy` (chunks verified on first touch).
    lazy: Option<RestoreSample>,
    /// For the `none` pack: a diff save against it a moment later.
    diff: Option<Result<DiffSample, String>>,
    /// Then a live diff save (`--live --diff-from`) against it, a moment after that.
    live_diff: Option<Result<DiffSample, String>>,
    /// For the `none` compression: a live save (`--live`) after the diff save.
    live: Option<Result<LiveSample, String>>,
    /// The VM process's resident size around this save.
    rss: Rss,
    error: Option<String>,
}

/// `vmpack save --diff-from` the full `none` pack (with `live`, `--live` too), [`DIFF_AFTER`]
/// after the save before.
#[derive(Clone)]
struct DiffSample {
    pause_ms: f64,
    /// `vmpack save --json`'s `milliseconds`: request to pack complete on disk.
    save_ms: f64,
    /// `--json`'s `written_ms`: request to the last byte written, before the sync.
    written_ms: f64,
    /// Process start to end of `vmpack save`.
    process_ms: f64,
    bytes: u64,
    /// Guest memory stored: the chunks written since the full save.
    memory_bytes: u64,
}

/// How long the guest runs between the full save and the diff save.
const DIFF_AFTER: Duration = Duration::from_secs(1);

fn measure_diff(
    bins: &Bins,
    sock: &Path,
    client: &ApiClient,
    parent: &Path,
    out: &Path,
    live: bool,
) -> Result<DiffSample> {
    std::thread::sleep(DIFF_AFTER);
    let t = Instant::now();
    let o = Command::new(&bins.vmpack)
        .arg("save")
        .args(live.then_some("--live"))
        .arg("--api-sock")
        .arg(sock)
        .arg("-o")
        .arg(out)
        .arg("--diff-from")
        .arg(parent)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .context("running vmpack save --diff-from")?;
    let process_ms = t.elapsed().as_secs_f64() * 1000.0;
    if !o.status.success() {
        bail!("{}", String::from_utf8_lossy(&o.stderr).trim());
    }
    let j: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let st = client.status()?;
    let _ = std::fs::remove_file(out);
    Ok(DiffSample {
        pause_ms: j["pause_ms"].as_f64().unwrap_or(f64::NAN),
        save_ms: j["milliseconds"].as_f64().unwrap_or(f64::NAN),
        written_ms: j["written_ms"].as_f64().unwrap_or(f64::NAN),
        process_ms,
        bytes: j["bytes"].as_u64().unwrap_or(0),
        memory_bytes: st.last_save.and_then(|l| l.diff_bytes).unwrap_or(0),
    })
}

/// `vmpack save --live` (default pause target) of the running guest.
#[derive(Clone)]
struct LiveSample {
    pause_ms: f64,
    /// `vmpack save --json`'s `milliseconds`: request to pack complete on disk.
    save_ms: f64,
    /// `--json`'s `written_ms`: request to the last byte written, before the sync.
    written_ms: f64,
    /// Process start to end of `vmpack save`.
    process_ms: f64,
    rounds: usize,
    /// Bytes copied by the pre-copy rounds, and during the pause.
    precopy_bytes: u64,
    final_bytes: u64,
    met: bool,
    rss: Rss,
}

fn measure_live(bins: &Bins, sock: &Path, out: &Path) -> Result<LiveSample> {
    let t = Instant::now();
    let o = Command::new(&bins.vmpack)
        .arg("save")
        .arg("--api-sock")
        .arg(sock)
        .arg("-o")
        .arg(out)
        .arg("--live")
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .context("running vmpack save --live")?;
    let process_ms = t.elapsed().as_secs_f64() * 1000.0;
    let _ = std::fs::remove_file(out);
    if !o.status.success() {
        bail!("{}", String::from_utf8_lossy(&o.stderr).trim());
    }
    let j: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let live = &j["live"];
    let rounds = live["rounds"].as_array().cloned().unwrap_or_default();
    Ok(LiveSample {
        pause_ms: j["pause_ms"].as_f64().unwrap_or(f64::NAN),
        save_ms: j["milliseconds"].as_f64().unwrap_or(f64::NAN),
        written_ms: j["written_ms"].as_f64().unwrap_or(f64::NAN),
        process_ms,
        rounds: rounds.len(),
        precopy_bytes: rounds.iter().filter_map(|r| r["bytes"].as_u64()).sum(),
        final_bytes: live["final_bytes"].as_u64().unwrap_or(0),
        met: live["max_pause_met"].as_bool().unwrap_or(false),
        rss: Rss::default(),
    })
}

#[derive(Clone)]
struct RestoreSample {
    /// Process start to the restored VM's vCPUs starting.
    ms: f64,
    /// Process start to vCPU 0's first exit, if it came within the wait.
    first_exit_ms: Option<f64>,
    /// What vmboot reported: memory path and verification.
    memory: String,
    /// Lazy restores: process start to every memory chunk verified and in place.
    resident_ms: Option<f64>,
}

fn write_config(dir: &Path, g: &Guest, kernel: &Path) -> Result<PathBuf> {
    let path = dir.join(format!("guest-{}-{}.toml", g.mib, g.data_mib));
    let mut text = format!(
        "name = \"bench-{}\"\nmemory_mib = {}\n[kernel]\npath = {:?}\ncmdline = {:?}\n",
        g.mib,
        g.mib,
        kernel.display().to_string(),
        CMDLINE
    );
    if let Some(i) = &g.initrd {
        text.push_str(&format!("initrd = {:?}\n", i.display().to_string()));
    }
    text.push_str("[serial]\noutput = \"none\"\n");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Boots the guest under `vmboot run`, saves it once per compression (the VM resumes after
/// each save), then restores every pack twice.
fn measure_ours(
    bins: &Bins,
    d: &Path,
    g: &Guest,
    kernel: &Path,
    comps: &[Compression],
    first_exit_wait: Duration,
) -> Result<Vec<(Compression, OursRow)>> {
    let cfg = write_config(d, g, kernel)?;
    let sock = d.join("api.sock");
    let _ = std::fs::remove_file(&sock);
    let log = d.join("vmboot-run.log");
    let mut cmd = Command::new(&bins.vmboot);
    cmd.arg("run")
        .arg(&cfg)
        .arg("--api-sock")
        .arg(&sock)
        .args(["--serial-out", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log)?);
    let t0 = Instant::now();
    let mut vm = Proc::spawn(cmd, "vmboot run")?;
    let client = ApiClient::new(&sock);
    loop {
        vm.check_alive(Some(&log))?;
        if sock.exists() && client.status().is_ok() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("vmboot run: control socket not ready after 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    crate::note!(
        "  vmboot: {} MiB guest up in {:.0} ms",
        g.mib,
        t0.elapsed().as_secs_f64() * 1000.0
    );

    let mut packs = Vec::new();
    for &c in comps {
        let pack = d.join(format!("guest-{}-{}-{c}.vmpack", g.mib, g.data_mib));
        let t = Instant::now();
        let (out, rss) = with_rss(vm.child.id(), || {
            Command::new(&bins.vmpack)
                .arg("save")
                .arg("--api-sock")
                .arg(&sock)
                .arg("-o")
                .arg(&pack)
                .arg("--compress")
                .arg(c.to_string())
                .arg("--json")
                .stdin(Stdio::null())
                .output()
        });
        let out = out.context("running vmpack save")?;
        let save_s = t.elapsed().as_secs_f64();
        let written_ms = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|j| j["written_ms"].as_f64())
            .unwrap_or(f64::NAN);
        let mut row = OursRow {
            save_s,
            rss,
            ..Default::default()
        };
        if !out.status.success() {
            row.error = Some(format!(
                "save failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            packs.push((c, pack, row));
            continue;
        }
        let ls = client.status()?.last_save;
        row.pause_ms = ls.as_ref().map_or(f64::NAN, |l| l.pause_ms);
        row.bytes = ls
            .map(|l| l.bytes)
            .unwrap_or_else(|| std::fs::metadata(&pack).map_or(0, |m| m.len()));
        crate::note!(
            "  save {c:<7} pause {:8.1} ms, written after {:6.2} s, wall {:6.2} s (synced), {:8.1} MB; vmboot resident {:.0} MB, +{} MB at its peak",
            row.pause_ms,
            written_ms / 1000.0,
            save_s,
            mb(row.bytes),
            mb(rss.before),
            rss.extra()
        );
        packs.push((c, pack, row));
    }
    // A diff against the full uncompressed pack: only what the guest wrote since.
    if let Some((_, parent, row)) = packs
        .iter_mut()
        .find(|(c, _, r)| *c == Compression::None && r.error.is_none())
    {
        let out = d.join(format!("guest-{}-{}-diff.vmpack", g.mib, g.data_mib));
        for live in [false, true] {
            let r = measure_diff(bins, &sock, &client, parent, &out, live)
                .map_err(|e| format!("{e:#}"));
            if let Ok(s) = &r {
                crate::note!(
                    "  {}diff save: pause {:.1} ms, save {:.1} ms ({:.1} ms with the process), {:.2} MB of memory written since, {:.2} MB pack",
                    if live { "live " } else { "" },
                    s.pause_ms,
                    s.save_ms,
                    s.process_ms,
                    mb(s.memory_bytes),
                    mb(s.bytes)
                );
            }
            if live {
                row.live_diff = Some(r);
            } else {
                row.diff = Some(r);
            }
        }
        let out = d.join(format!("guest-{}-{}-live.vmpack", g.mib, g.data_mib));
        let (r, rss) = with_rss(vm.child.id(), || measure_live(bins, &sock, &out));
        let r = r
            .map(|s| LiveSample { rss, ..s })
            .map_err(|e| format!("{e:#}"));
        if let Ok(s) = &r {
            crate::note!(
                "  live save: pause {:.1} ms, save {:.1} ms ({:.1} ms with the process), {} rounds; vmboot resident {:.0} MB, +{} MB at its peak",
                s.pause_ms,
                s.save_ms,
                s.process_ms,
                s.rounds,
                mb(rss.before),
                rss.extra()
            );
        }
        row.live = Some(r);
    }
    let _ = client.shutdown();
    vm.finish(Duration::from_secs(5));

    let mut rows = Vec::new();
    for (c, pack, mut row) in packs {
        if row.error.is_none() {
            // A fresh record folder per pack: the first restore has not seen it.
            let cache = d.join(format!("cache-{}-{}-{c}", g.mib, g.data_mib));
            let lazy_cache = d.join(format!("cache-lazy-{}-{}-{c}", g.mib, g.data_mib));
            match restore_ours(bins, d, &pack, &lazy_cache, "lazy", first_exit_wait) {
                Ok(s) => {
                    eprintln!(
                        "  restore {c:<7} lazy: {:8.1} ms, every chunk in place at {} ms ({})",
                        s.ms,
                        s.resident_ms.map_or("-".into(), |v| format!("{v:.1}")),
                        s.memory
                    );
                    row.lazy = Some(s);
                }
                Err(e) => row.error = Some(format!("lazy restore: {e:#}")),
            }
            for i in 0..2 {
                if row.error.is_some() {
                    break;
                }
                match restore_ours(bins, d, &pack, &cache, "eager", first_exit_wait) {
                    Ok(s) => {
                        let exit = s
                            .first_exit_ms
                            .map_or(String::new(), |e| format!(", first exit {e:.1} ms"));
                        crate::note!(
                            "  restore {c:<7} #{}: {:8.1} ms{exit} ({})",
                            i + 1,
                            s.ms,
                            s.memory
                        );
                        row.restore[i] = Some(s);
                    }
                    Err(e) => {
                        row.error = Some(format!("restore: {e:#}"));
                        break;
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&pack);
        rows.push((c, row));
    }
    Ok(rows)
}

/// Runs `vmboot restore` and times process start to the vCPUs starting (and to vCPU 0's
/// first exit, if it comes within `wait`), then kills it.
/// With `memory` "lazy", also waits for every chunk to be in place.
fn restore_ours(
    bins: &Bins,
    d: &Path,
    pack: &Path,
    cache: &Path,
    memory_mode: &str,
    wait: Duration,
) -> Result<RestoreSample> {
    let lazy = memory_mode == "lazy";
    let mut cmd = Command::new(&bins.vmboot);
    cmd.arg("restore")
        .arg(pack)
        .args(["--serial-out", "none", "--memory", memory_mode])
        .env("VMBOOT_BENCH_TIMESTAMPS", "1")
        .env("VMPACK_CACHE_DIR", cache)
        // The private work folder of a killed restore stays behind: keep it in scratch.
        .env("TMPDIR", d)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t0 = monotonic_ns();
    let mut p = Proc::spawn(cmd, "vmboot restore")?;
    let stderr = p.child.stderr.take().context("no stderr pipe")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::Builder::new()
        .spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
        .context("cannot start a thread")?;
    let mut log = String::new();
    let mut ready: Option<u128> = None;
    let mut first: Option<u128> = None;
    let mut resident: Option<u128> = None;
    let mut memory = String::new();
    let hard = Instant::now() + Duration::from_secs(300);
    let mut deadline = hard;
    let stamp = |l: &str| {
        l.split_whitespace()
            .nth(2)
            .and_then(|s| s.parse::<u128>().ok())
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.contains("restored-monotonic-ns") {
                    ready = stamp(&line);
                    if lazy {
                        continue;
                    }
                    if wait.is_zero() {
                        break;
                    }
                    deadline = Instant::now() + wait;
                } else if line.contains("resident-monotonic-ns") {
                    resident = stamp(&line);
                    break;
                } else if line.contains("first-exit-monotonic-ns") {
                    first = stamp(&line);
                    if !lazy {
                        break;
                    }
                } else if let Some(i) = line.find("(memory: ") {
                    memory = line[i + 9..].trim_end_matches(')').to_string();
                } else {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if ready.is_none() {
                    bail!("vmboot restore ended: {}", log.trim());
                }
                break;
            }
        }
    }
    drop(p);
    drop(rx);
    let _ = reader.join();
    let ms = |t: u128| t.saturating_sub(t0) as f64 / 1e6;
    let Some(ready) = ready else {
        bail!(
            "vmboot restore printed no timestamp (built without VMBOOT_BENCH_TIMESTAMPS?): {}",
            log.trim()
        );
    };
    Ok(RestoreSample {
        ms: ms(ready),
        first_exit_ms: first.map(ms),
        memory,
        resident_ms: resident.map(ms),
    })
}

// ---------------------------------------------------------------------------------------
// QEMU

#[derive(Default, Clone)]
struct QemuRow {
    downtime_ms: f64,
    save_s: f64,
    bytes: u64,
    restore_ms: [Option<f64>; 2],
}

/// QEMU's human monitor over a Unix socket.
struct Hmp {
    s: UnixStream,
}

impl Hmp {
    fn connect(path: &Path, proc: &mut Proc, timeout: Duration) -> Result<Hmp> {
        let end = Instant::now() + timeout;
        loop {
            if let Ok(s) = UnixStream::connect(path) {
                s.set_read_timeout(Some(Duration::from_secs(60)))?;
                let mut h = Hmp { s };
                h.read_prompt()?;
                return Ok(h);
            }
            proc.check_alive(None)?;
            if Instant::now() > end {
                bail!("QEMU monitor {} not ready", path.display());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn read_prompt(&mut self) -> Result<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !out.ends_with(b"(qemu) ") {
            let n = self.s.read(&mut buf).context("reading the QEMU monitor")?;
            if n == 0 {
                bail!("QEMU monitor closed");
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn cmd(&mut self, c: &str) -> Result<String> {
        self.s.write_all(format!("{c}\n").as_bytes())?;
        self.read_prompt()
    }
}

fn qemu_cmd(g: &Guest, kernel: &Path, mon: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-enable-kvm", "-m"])
        .arg(format!("{}M", g.mib))
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", CMDLINE]);
    if let Some(i) = &g.initrd {
        c.arg("-initrd").arg(i);
    }
    c.args(["-nographic", "-serial", "none", "-no-reboot", "-monitor"])
        .arg(format!("unix:{},server=on,wait=off", mon.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// The number after `key` in `info migrate` output (e.g. "downtime: 12 ms").
fn field(text: &str, key: &str) -> Option<f64> {
    let i = text.find(key)? + key.len();
    text[i..].split_whitespace().next()?.parse().ok()
}

fn measure_qemu(d: &Path, g: &Guest, kernel: &Path) -> Result<QemuRow> {
    let mon = d.join("qemu.mon");
    let file = d.join("qemu.migration");
    let _ = std::fs::remove_file(&mon);
    let t0 = Instant::now();
    let mut q = Proc::spawn(qemu_cmd(g, kernel, &mon), "qemu-system-x86_64")?;
    let mut h = Hmp::connect(&mon, &mut q, Duration::from_secs(120))?;
    while !h.cmd("info status")?.contains("running") {
        std::thread::sleep(Duration::from_millis(5));
    }
    // QEMU's firmware (SeaBIOS and the linuxboot ROM, emulated here) copies the initrd into
    // RAM before it enters the kernel; in long mode the data is in place, as in vmboot.
    loop {
        if h.cmd("info registers")?.contains("CS64") {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("QEMU guest not in long mode after 300 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    crate::note!(
        "  qemu: {} MiB guest in the kernel after {:.0} ms",
        g.mib,
        t0.elapsed().as_secs_f64() * 1000.0
    );
    let r = h.cmd("migrate_set_parameter max-bandwidth 100G")?;
    if r.to_lowercase().contains("error") || r.contains("nvalid") {
        h.cmd("migrate_set_speed 100G")?;
    }
    let target = format!("exec:cat > '{}'", file.display());
    let t = Instant::now();
    // Without -d the monitor command waits for the end, polling once a second.
    let r = h.cmd(&format!("migrate -d \"{target}\""))?;
    if r.to_lowercase().contains("error") {
        bail!("QEMU migrate: {}", r.trim());
    }
    let info = loop {
        let info = h.cmd("info migrate")?;
        if info.contains("Migration status: completed") {
            break info;
        }
        if info.contains("Migration status: failed") {
            bail!("QEMU migration failed: {}", info.trim());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let save_s = t.elapsed().as_secs_f64();
    let mut row = QemuRow {
        save_s,
        downtime_ms: field(&info, "downtime:").unwrap_or(f64::NAN),
        ..Default::default()
    };
    let _ = h.s.write_all(b"quit\n");
    drop(h);
    q.finish(Duration::from_secs(5));
    // After QEMU ends, `cat` has written everything.
    row.bytes = std::fs::metadata(&file)?.len();
    crate::note!(
        "  qemu save: downtime {:.1} ms, wall {:.2} s, {:.1} MB",
        row.downtime_ms,
        save_s,
        mb(row.bytes)
    );

    for i in 0..2 {
        let mut cmd = qemu_cmd(g, kernel, &mon);
        cmd.arg("-incoming")
            .arg(format!("exec:cat '{}'", file.display()));
        let _ = std::fs::remove_file(&mon);
        let t = Instant::now();
        let mut q = Proc::spawn(cmd, "qemu-system-x86_64 -incoming")?;
        let mut h = Hmp::connect(&mon, &mut q, Duration::from_secs(120))?;
        loop {
            let s = h.cmd("info status")?;
            if s.contains("VM status: running") {
                break;
            }
            if t.elapsed() > Duration::from_secs(120) {
                bail!("QEMU restore: not running after 120 s ({})", s.trim());
            }
        }
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        crate::note!("  qemu restore #{}: {ms:8.1} ms", i + 1);
        row.restore_ms[i] = Some(ms);
        let _ = h.s.write_all(b"quit\n");
        drop(h);
        q.finish(Duration::from_secs(5));
    }
    let _ = std::fs::remove_file(&file);
    Ok(row)
}

// ---------------------------------------------------------------------------------------

struct Bins {
    vmboot: PathBuf,
    vmpack: PathBuf,
}

fn find_bins() -> Result<Bins> {
    let vmpack = std::env::current_exe().context("locating vmpack")?;
    let vmboot = vmpack.with_file_name("vmboot");
    if !vmboot.is_file() {
        bail!(
            "{}: not found; build it next to vmpack (cargo build --release -p vmpack -p vmboot)",
            vmboot.display()
        );
    }
    Ok(Bins { vmboot, vmpack })
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

fn opt_ms(s: &Option<RestoreSample>) -> String {
    match s {
        Some(s) => format!("{:.1}", s.ms),
        None => "-".into(),
    }
}

pub fn run(a: BenchSnapshotArgs) -> Result<()> {
    let sizes = if !a.sizes.is_empty() {
        a.sizes.clone()
    } else if a.quick {
        vec![256, 1024]
    } else {
        vec![256, 1024, 4096]
    };
    let comps = if !a.compress.is_empty() {
        a.compress.clone()
    } else if a.quick {
        vec![Compression::None, Compression::Zstd]
    } else {
        vec![Compression::None, Compression::Deflate, Compression::Zstd]
    };
    if let Some(&s) = sizes.iter().find(|&&s| s < 128) {
        bail!("--sizes: {s} MiB is too small for a Linux guest (at least 128)");
    }
    let kernel = a
        .kernel
        .clone()
        .unwrap_or_else(|| PathBuf::from("samples/linux/out/vmlinuz"));
    let kernel = std::fs::canonicalize(&kernel).map_err(|e| {
        anyhow!(
            "{}: {e}; run `bash samples/linux/fetch-kernel.sh` first or pass --kernel",
            kernel.display()
        )
    })?;
    let bins = find_bins()?;
    let qemu = !a.no_qemu && have("qemu-system-x86_64");
    let qemu_note = if a.no_qemu {
        "left out (--no-qemu)"
    } else if qemu {
        "qemu-system-x86_64"
    } else {
        "SKIPPED (qemu-system-x86_64 not found; apt-get install qemu-system-x86)"
    };

    let base = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let scratch =
        AtomicDir::create(&base.join(format!("vmpack-bench-snapshot-{}", std::process::id())))?;
    let d = scratch.path().to_path_buf();
    let started = Instant::now();

    // One initrd per distinct data size.
    let mut initrds: BTreeMap<u64, PathBuf> = BTreeMap::new();
    for &s in &sizes {
        let m = data_for(s, a.data_mib);
        if m > 0 && !initrds.contains_key(&m) {
            let p = d.join(format!("data-{m}.img"));
            crate::note!("writing a {m} MiB initrd (random and text stripes) ...");
            make_initrd(&p, m)?;
            initrds.insert(m, p);
        }
    }

    struct Result1 {
        g: Guest,
        ours: Vec<(Compression, OursRow)>,
        qemu: Option<std::result::Result<QemuRow, String>>,
    }
    let mut results = Vec::new();
    for &s in &sizes {
        for full in [false, true] {
            let m = if full { data_for(s, a.data_mib) } else { 0 };
            if full && m == 0 {
                continue;
            }
            let g = Guest {
                mib: s,
                data_mib: m,
                initrd: initrds.get(&m).cloned(),
            };
            crate::note!(
                "guest {s} MiB, {}:",
                if m == 0 {
                    "nearly empty".to_string()
                } else {
                    format!("{m} MiB initrd")
                }
            );
            let ours = measure_ours(
                &bins,
                &d,
                &g,
                &kernel,
                &comps,
                Duration::from_millis(a.first_exit_wait_ms),
            )
            .unwrap_or_else(|e| {
                eprintln!("  vmpack: {e:#}");
                comps
                    .iter()
                    .map(|&c| {
                        (
                            c,
                            OursRow {
                                error: Some(format!("{e:#}")),
                                ..Default::default()
                            },
                        )
                    })
                    .collect()
            });
            let qemu_row = qemu.then(|| {
                measure_qemu(&d, &g, &kernel).map_err(|e| {
                    eprintln!("  qemu: {e:#}");
                    format!("{e:#}")
                })
            });
            results.push(Result1 {
                g,
                ours,
                qemu: qemu_row,
            });
        }
    }

    crate::outln!();
    crate::outln!(
        "Linux guests (Debian kernel {}), saved right after start; ours: `vmpack save` from \
         `vmboot run`, restore = `vmboot restore` process start to the vCPUs starting \
         (memory: mmap = pages map from the pack and fault in later). QEMU: {qemu_note}, \
         restore = process start to `info status` running.",
        kernel.display()
    );
    crate::outln!(
        "restore1 = first restore of the pack (verifies every chunk), restore2 = warm \
         (verified-pack record), both `--memory eager`; lazy1 = first restore with `--memory \
         lazy` (each chunk verified on first touch), resident = until its every chunk is \
         verified and in place (eager: restore1). Packs and QEMU files are in the page cache. \
         Sizes in MB (10^6)."
    );
    crate::outln!();
    crate::outln!(
        "{:>6} {:>6} {:<8} {:>9} {:>7} {:>8} {:>9} {:>9} {:>8} {:>9} | {:>6} {:>6} {:>6} {:>6}  memory",
        "guest",
        "data",
        "what",
        "pause ms",
        "save s",
        "size MB",
        "restore1",
        "restore2",
        "lazy1",
        "resident",
        "x save",
        "x size",
        "x rst1",
        "x rst2"
    );
    crate::outln!(
        "{:>6} {:>6} {:<8} {:>9} {:>7} {:>8} {:>9} {:>9} {:>8} {:>9} | {:<27}",
        "MiB",
        "MiB",
        "",
        "",
        "",
        "",
        "ms",
        "ms",
        "ms",
        "ms",
        "ratio ours / QEMU"
    );
    for r in &results {
        let q = match &r.qemu {
            Some(Ok(q)) => Some(q.clone()),
            _ => None,
        };
        for (c, o) in &r.ours {
            if let Some(e) = &o.error {
                crate::outln!(
                    "{:>6} {:>6} {:<8} ERROR {}",
                    r.g.mib,
                    r.g.data_mib,
                    c.to_string(),
                    e
                );
                continue;
            }
            let (rs, sz, r1, r2) = match &q {
                Some(q) => (
                    ratio(o.save_s, q.save_s),
                    ratio(o.bytes as f64, q.bytes as f64),
                    ratio(
                        o.restore[0].as_ref().map_or(f64::NAN, |s| s.ms),
                        q.restore_ms[0].unwrap_or(f64::NAN),
                    ),
                    ratio(
                        o.restore[1].as_ref().map_or(f64::NAN, |s| s.ms),
                        q.restore_ms[1].unwrap_or(f64::NAN),
                    ),
                ),
                None => ("-".into(), "-".into(), "-".into(), "-".into()),
            };
            let memory = o.restore[1]
                .as_ref()
                .or(o.restore[0].as_ref())
                .map(|s| s.memory.split(';').next().unwrap_or("").to_string())
                .unwrap_or_default();
            crate::outln!(
                "{:>6} {:>6} {:<8} {:>9.1} {:>7.2} {:>8.1} {:>9} {:>9} {:>8} {:>9} | {:>6} {:>6} {:>6} {:>6}  {}",
                r.g.mib,
                r.g.data_mib,
                c.to_string(),
                o.pause_ms,
                o.save_s,
                mb(o.bytes),
                opt_ms(&o.restore[0]),
                opt_ms(&o.restore[1]),
                opt_ms(&o.lazy),
                o.lazy
                    .as_ref()
                    .and_then(|s| s.resident_ms)
                    .map_or("-".into(), |v| format!("{v:.1}")),
                rs,
                sz,
                r1,
                r2,
                memory
            );
        }
        match &r.qemu {
            Some(Ok(q)) => crate::outln!(
                "{:>6} {:>6} {:<8} {:>9.1} {:>7.2} {:>8.1} {:>9} {:>9} {:>8} {:>9} |",
                r.g.mib,
                r.g.data_mib,
                "QEMU",
                q.downtime_ms,
                q.save_s,
                mb(q.bytes),
                q.restore_ms[0].map_or("-".into(), |v| format!("{v:.1}")),
                q.restore_ms[1].map_or("-".into(), |v| format!("{v:.1}")),
                "-",
                "-",
            ),
            Some(Err(e)) => {
                crate::outln!("{:>6} {:>6} {:<8} ERROR {e}", r.g.mib, r.g.data_mib, "QEMU")
            }
            None => crate::outln!(
                "{:>6} {:>6} {:<8} {}",
                r.g.mib,
                r.g.data_mib,
                "QEMU",
                if qemu { "-" } else { "SKIPPED" }
            ),
        }
    }
    crate::outln!();
    crate::outln!(
        "Diff saves: `vmpack save --diff-from` the `none` pack (plain: copies the chunks written \
         since it before pausing, docs/CLI.md \"Diff packs\"), {} s after it (the guest idle \
         in between), then `--live --diff-from` it {} s after that; written = request to the \
         last byte written (`--json` written_ms), save = request to pack complete and synced \
         (`--json` milliseconds), process = the whole `vmpack save` command.",
        DIFF_AFTER.as_secs(),
        DIFF_AFTER.as_secs()
    );
    crate::outln!(
        "{:>6} {:>6} {:>7} {:>14} {:>8} {:>9} {:>10} {:>8} {:>11}",
        "guest",
        "data",
        "kind",
        "written MB",
        "size MB",
        "pause ms",
        "written ms",
        "save ms",
        "process ms"
    );
    for r in &results {
        for (_, o) in &r.ours {
            for (kind, d) in [("plain", &o.diff), ("live", &o.live_diff)] {
                match d {
                    Some(Ok(s)) => crate::outln!(
                        "{:>6} {:>6} {:>7} {:>14.2} {:>8.2} {:>9.1} {:>10.1} {:>8.1} {:>11.1}",
                        r.g.mib,
                        r.g.data_mib,
                        kind,
                        mb(s.memory_bytes),
                        mb(s.bytes),
                        s.pause_ms,
                        s.written_ms,
                        s.save_ms,
                        s.process_ms
                    ),
                    Some(Err(e)) => {
                        crate::outln!("{:>6} {:>6} {:>7} ERROR {e}", r.g.mib, r.g.data_mib, kind)
                    }
                    None => {}
                }
            }
        }
    }
    crate::outln!();
    crate::outln!(
        "Live saves: `vmpack save --live` (pause target 20 ms) of the running guest after the \
         diff saves; pause = guest stopped; written = request to the last byte written, before \
         the sync (`--json` written_ms); save = request to pack complete and synced \
         (`--json` milliseconds), process = the whole command; pre-copy = bytes the rounds \
         copied while the guest ran, final = bytes copied during the pause; RSS = the VM \
         process's resident size before the save, +peak = what the save added to it at its \
         peak (/proc VmHWM after clear_refs), also for the ordinary uncompressed save of the \
         same guest (+ord). QEMU: its migration downtime and save time (no fsync)."
    );
    crate::outln!(
        "{:>6} {:>6} {:>9} {:>10} {:>8} {:>11} {:>7} {:>12} {:>9} {:>5} {:>7} {:>9} {:>8} | {:>11} {:>7}",
        "guest",
        "data",
        "pause ms",
        "written ms",
        "save ms",
        "process ms",
        "rounds",
        "pre-copy MB",
        "final MB",
        "met",
        "RSS MB",
        "+peak MB",
        "+ord MB",
        "QEMU down",
        "save s"
    );
    for r in &results {
        let (qd, qs) = match &r.qemu {
            Some(Ok(q)) => (format!("{:.1}", q.downtime_ms), format!("{:.2}", q.save_s)),
            _ => ("-".into(), "-".into()),
        };
        for (_, o) in &r.ours {
            match &o.live {
                Some(Ok(s)) => crate::outln!(
                    "{:>6} {:>6} {:>9.1} {:>10.1} {:>8.1} {:>11.1} {:>7} {:>12.1} {:>9.2} {:>5} {:>7.0} {:>9} {:>8} | {:>11} {:>7}",
                    r.g.mib,
                    r.g.data_mib,
                    s.pause_ms,
                    s.written_ms,
                    s.save_ms,
                    s.process_ms,
                    s.rounds,
                    mb(s.precopy_bytes),
                    mb(s.final_bytes),
                    if s.met { "yes" } else { "no" },
                    mb(s.rss.before),
                    s.rss.extra(),
                    o.rss.extra(),
                    qd,
                    qs
                ),
                Some(Err(e)) => {
                    crate::outln!("{:>6} {:>6} ERROR {e}", r.g.mib, r.g.data_mib)
                }
                None => {}
            }
        }
    }
    crate::outln!();
    crate::outln!(
        "QEMU's pause column is its reported downtime (live migration: the guest runs during \
         most of the save). Total run time {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    drop(scratch);
    Ok(())
}
