//! Snapshot-based testing: `vmpack test PACK CASES.toml` runs every case in a fresh clone
//! of the saved VM, and `vmpack restore PACK --clones N` runs N clones side by side.
//!
//! Clones are restored in this process, each with its own KVM VM and vCPU threads. Their
//! memory maps the same uncompressed pack privately (see `vmboot::clone`), so a clone costs
//! the pages it writes; its disks are private copies in a work folder removed with it.

use crate::output::AtomicFile;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use regex::bytes::Regex;
use serde::Deserialize;
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmboot::clone::{mappable_pack, Source};
use vmboot::console::Console;
use vmboot::snapshot::{PackInput, RestoreOptions, VerifyPolicy};
use vmboot::verified_cache;
use vmboot::{RunOptions, SerialSink};

/// Time limit of a step that names none (the file's `timeout_ms` overrides it).
const DEFAULT_TIMEOUT_MS: u64 = 10_000;

#[derive(Args)]
pub struct TestArgs {
    /// A pack made by `vmpack save` (compressed packs are expanded once into a cache), or a
    /// registry reference (REGISTRY/REPOSITORY:TAG), pulled into the cache first.
    #[arg(value_name = "PACK|REF", required_unless_present = "merge_junit")]
    pack: Option<String>,
    /// The test cases (TOML, see docs/TESTING.md).
    #[arg(required_unless_present = "merge_junit")]
    cases: Option<PathBuf>,
    /// Run only the K-th of N parts of the cases (1 <= K <= N). A case's part depends on
    /// its name alone, so it is stable when cases are added, removed or reordered.
    #[arg(long, value_name = "K/N", value_parser = parse_shard)]
    shard: Option<(u64, u64)>,
    /// Merge these JUnit files (written by `vmpack test --junit`, e.g. one per shard) into
    /// the one --junit names, print the summary, and exit 1 if any case failed.
    #[arg(long, value_name = "XML", num_args = 1.., conflicts_with_all = ["pack", "cases", "shard"], requires = "junit")]
    merge_junit: Vec<PathBuf>,
    #[command(flatten)]
    registry: crate::registry_cmd::RegistryArgs,
    /// Cases run at the same time, each in its own clone.
    #[arg(short = 'j', long, default_value_t = 1)]
    jobs: usize,
    /// Keep each of the -j clones for the next case: put it back to the pack's state in
    /// place (PUT /vm/reset) instead of restoring a fresh one. A clone whose VM ended or
    /// cannot be reset is replaced by a fresh one.
    #[arg(long)]
    reuse: bool,
    /// Also write the results as JUnit XML here.
    #[arg(long)]
    junit: Option<PathBuf>,
    /// Print the results as one JSON object on stdout (`passed`, `failed`, `seconds`,
    /// `cases`: `name`, `passed`, `ms`, `message`, `output`) instead of the table.
    #[arg(long)]
    json: bool,
    /// Print only the summary and failures.
    #[arg(long, short)]
    quiet: bool,
    /// Case i's clone gets `--net-tap` with `%d` = i and `--mac auto` = clone i's MAC.
    #[command(flatten)]
    net: crate::identity::NetIdentityArgs,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesFile {
    /// Default time limit per step, in milliseconds.
    timeout_ms: Option<u64>,
    /// Default channel of the cases: `serial` or `vsock:PORT`.
    channel: Option<String>,
    #[serde(default, rename = "case")]
    cases: Vec<CaseDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseDef {
    name: String,
    channel: Option<String>,
    send: Option<String>,
    expect: Option<String>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    steps: Vec<StepDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepDef {
    send: Option<String>,
    expect: Option<String>,
    timeout_ms: Option<u64>,
}

struct Step {
    send: Option<String>,
    expect: Option<Regex>,
    timeout: Duration,
}

/// What a case's steps talk to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Channel {
    /// The guest's serial console (COM1).
    Serial,
    /// A stream connection to this guest vsock port, through the clone's vsock socket.
    Vsock(u32),
}

fn parse_channel(s: &str) -> Option<Channel> {
    match s {
        "serial" => Some(Channel::Serial),
        _ => s
            .strip_prefix("vsock:")
            .and_then(|p| p.parse().ok())
            .map(Channel::Vsock),
    }
}

pub struct Case {
    name: String,
    channel: Channel,
    steps: Vec<Step>,
}

/// Reads and checks a cases file: every pattern compiles, names are unique.
fn load_cases(path: &Path) -> Result<Vec<Case>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: CasesFile = toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if file.cases.is_empty() {
        bail!("{}: no [[case]] entries", path.display());
    }
    let default = file.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    let mut names = HashSet::new();
    let mut cases = Vec::new();
    for (i, c) in file.cases.into_iter().enumerate() {
        let label = format!("{}: case {} ({:?})", path.display(), i + 1, c.name);
        if !names.insert(c.name.clone()) {
            bail!("{label}: the name is used twice");
        }
        let channel = match c.channel.as_deref().or(file.channel.as_deref()) {
            None => Channel::Serial,
            Some(ch) => parse_channel(ch).ok_or_else(|| {
                anyhow!("{label}: channel {ch:?}: expected \"serial\" or \"vsock:PORT\"")
            })?,
        };
        let mut defs = Vec::new();
        if c.send.is_some() || c.expect.is_some() {
            defs.push(StepDef {
                send: c.send,
                expect: c.expect,
                timeout_ms: c.timeout_ms,
            });
        }
        defs.extend(c.steps);
        if defs.is_empty() {
            bail!("{label}: nothing to do (give send/expect or steps)");
        }
        let mut steps = Vec::new();
        for (j, d) in defs.into_iter().enumerate() {
            let expect = d
                .expect
                .as_deref()
                .map(Regex::new)
                .transpose()
                .map_err(|e| anyhow!("{label}: step {}: bad expect pattern: {e}", j + 1))?;
            steps.push(Step {
                send: d.send,
                expect,
                timeout: Duration::from_millis(d.timeout_ms.or(c.timeout_ms).unwrap_or(default)),
            });
        }
        cases.push(Case {
            name: c.name,
            channel,
            steps,
        });
    }
    Ok(cases)
}

/// A folder for the clones' work folders, removed with everything in it when dropped.
pub struct WorkBase(PathBuf);

impl WorkBase {
    pub fn new(what: &str) -> Result<WorkBase> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let p =
            std::env::temp_dir().join(format!("vmpack-{what}-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(WorkBase(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A fresh folder for clone `i` (restore makes its own folder inside).
    pub fn clone_dir(&self, i: usize) -> Result<PathBuf> {
        let p = self.0.join(format!("clone-{i}"));
        std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(p)
    }
}

impl Drop for WorkBase {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The pack clones restore from (expanded into the cache if compressed), verified once
/// here so the clones themselves only check the index digest.
pub fn prepare_source(pack: &Path, quiet: bool) -> Result<PathBuf> {
    if !pack.exists() {
        bail!("{}: no such file", pack.display());
    }
    let t = Instant::now();
    let (src, how) = mappable_pack(pack)?;
    if !quiet {
        match how {
            Source::Direct => {}
            Source::Cached => eprintln!(
                "vmpack: using the expanded copy {} of the compressed pack",
                src.display()
            ),
            Source::Expanded => eprintln!(
                "vmpack: expanded the compressed pack into {} in {:.0} ms (reused next time)",
                src.display(),
                t.elapsed().as_secs_f64() * 1000.0
            ),
        }
    }
    let p = vmpack_formats::vm::VmPack::open(&src)?;
    let root = p.reader().root_digest();
    if !verified_cache::is_verified(&src, root) {
        p.reader().verify(&())?;
        verified_cache::record(&src, root);
    }
    Ok(src)
}

/// Restores one clone of `src` driven through its console.
pub fn start_clone(src: &Path, work: &WorkBase, i: usize, run: RunOptions) -> Result<Console> {
    let (console, info) = Console::restore(
        PackInput::File(src.to_path_buf()),
        RestoreOptions {
            report: Default::default(),
            bench_timestamps: false,
            verify: VerifyPolicy::Auto,
            // Clones of one verified pack share its page cache through the mapping.
            memory: vmboot::snapshot::MemoryPolicy::Eager,
            run,
            work_dir: work.clone_dir(i)?,
            source: Default::default(),
            parent: None,
        },
    )?;
    for w in &info.warnings {
        eprintln!("vmpack: warning: clone {i}: {w}");
    }
    Ok(console)
}

struct CaseResult {
    name: String,
    passed: bool,
    secs: f64,
    message: String,
    output: String,
}

/// Where a case's clone comes from: a fresh one per case, or (`--reuse`) the worker's
/// clone of the previous case, put back to the pack's state.
struct Clones<'a> {
    src: &'a Path,
    work: &'a WorkBase,
    net: &'a crate::identity::NetIdentityArgs,
    /// Numbers the clones `--reuse` restores (their work folders, taps and MACs); a fresh
    /// clone per case takes the case's index.
    next: &'a AtomicUsize,
    reuse: bool,
}

impl Clones<'_> {
    fn get(&self, kept: &mut Option<Console>, case: usize) -> Result<Console> {
        if let Some(mut c) = kept.take() {
            // A VM that cannot be reset (it ended, or the reset failed) is replaced.
            if !c.ended() && c.reset().is_ok() {
                return Ok(c);
            }
        }
        let i = if self.reuse {
            self.next.fetch_add(1, Ordering::SeqCst)
        } else {
            self.next.fetch_add(1, Ordering::SeqCst);
            case
        };
        let run = RunOptions {
            serial_out: SerialSink::None,
            net: self.net.for_clone(i)?,
            vsock_sock: Some(self.work.0.join(format!("vsock-{i}.sock"))),
            ..Default::default()
        };
        start_clone(self.src, self.work, i, run)
    }
}

/// Runs case `i`; with `--reuse` the clone is left in `kept` for the next case unless its
/// VM ended.
fn run_case(clones: &Clones, kept: &mut Option<Console>, i: usize, case: &Case) -> CaseResult {
    let t = Instant::now();
    let mut result = CaseResult {
        name: case.name.clone(),
        passed: false,
        secs: 0.0,
        message: String::new(),
        output: String::new(),
    };
    match clones.get(kept, i) {
        Err(e) => result.message = format!("restore failed: {e:#}"),
        Ok(mut console) => {
            let mut failure = None;
            let mut vsock = None;
            if let Channel::Vsock(port) = case.channel {
                let sock = console.handle().vsock_socket().unwrap_or_default();
                match VsockChannel::connect(&sock, port, DEFAULT_TIMEOUT) {
                    Ok(v) => vsock = Some(v),
                    Err(e) => failure = Some(format!("vsock:{port}: {e:#}")),
                }
            }
            for (j, step) in case.steps.iter().enumerate() {
                if failure.is_some() {
                    break;
                }
                if let Some(s) = &step.send {
                    let sent = match &mut vsock {
                        Some(v) => v.send(s),
                        None => console.send(s).map_err(anyhow::Error::from),
                    };
                    if let Err(e) = sent {
                        failure = Some(format!("step {}: sending {s:?}: {e:#}", j + 1));
                        break;
                    }
                }
                if let Some(re) = &step.expect {
                    let got = match &mut vsock {
                        Some(v) => v.expect_re(re, step.timeout),
                        None => console
                            .expect_re(re, step.timeout)
                            .map(drop)
                            .map_err(anyhow::Error::from),
                    };
                    if let Err(e) = got {
                        failure = Some(format!("step {}: {e:#}", j + 1));
                        break;
                    }
                }
            }
            result.output = match &vsock {
                Some(v) => v.output(),
                None => console.output(),
            };
            let ended = if clones.reuse && !console.ended() {
                *kept = Some(console);
                None
            } else if clones.reuse {
                Some(console.wait().map_err(anyhow::Error::from))
            } else {
                Some(console.stop().map_err(anyhow::Error::from))
            };
            match ended {
                Some(Err(e)) if failure.is_none() => {
                    failure = Some(format!("stopping the clone: {e:#}"));
                }
                Some(Ok(r))
                    if failure.is_none() && r.code != 0 && r.message != "shutdown requested" =>
                {
                    failure = Some(format!("the VM ended: {} (status {})", r.message, r.code));
                }
                _ => {}
            }
            result.passed = failure.is_none();
            result.message = failure.unwrap_or_default();
        }
    }
    result.secs = t.elapsed().as_secs_f64();
    result
}

/// How long a vsock case waits for the guest to accept its connection.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(DEFAULT_TIMEOUT_MS);

/// A case's connection to a guest vsock port (the host side of docs/CONFIG.md, "vsock"):
/// what the guest sent so far, and how much of it earlier steps matched.
struct VsockChannel {
    stream: std::os::unix::net::UnixStream,
    received: Vec<u8>,
    cursor: usize,
}

impl VsockChannel {
    fn connect(sock: &Path, port: u32, timeout: Duration) -> Result<VsockChannel> {
        let mut stream = std::os::unix::net::UnixStream::connect(sock).with_context(|| {
            format!(
                "cannot connect to the clone's vsock socket {} (does the saved VM have a [vsock] device?)",
                sock.display()
            )
        })?;
        stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
        let mut v = VsockChannel {
            stream,
            received: Vec::new(),
            cursor: 0,
        };
        let ok = Regex::new(r"^OK [0-9]+\n").expect("a valid pattern");
        v.expect_re(&ok, timeout).map_err(|_| {
            anyhow!("the guest did not accept the connection (nothing listening on port {port}?)")
        })?;
        v.received.clear();
        v.cursor = 0;
        Ok(v)
    }

    fn send(&mut self, s: &str) -> Result<()> {
        self.stream.write_all(s.as_bytes())?;
        Ok(())
    }

    /// Waits until the bytes since the previous match match `re`.
    fn expect_re(&mut self, re: &Regex, timeout: Duration) -> Result<()> {
        use std::io::Read;
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = re.find(&self.received[self.cursor..]) {
                self.cursor += m.end();
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "timed out after {} ms waiting for /{}/ on the vsock connection",
                    timeout.as_millis(),
                    re.as_str()
                );
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut buf) {
                Ok(0) => bail!(
                    "the guest closed the vsock connection before /{}/ matched",
                    re.as_str()
                ),
                Ok(n) => self.received.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e).context("reading the vsock connection"),
            }
        }
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.received).into_owned()
    }
}

fn parse_shard(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("{s}: expected K/N with 1 <= K <= N, e.g. 2/4");
    let (k, n) = s.split_once('/').ok_or_else(bad)?;
    let (k, n): (u64, u64) = (
        k.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if k == 0 || n == 0 || k > n {
        return Err(bad());
    }
    Ok((k, n))
}

/// The part (0-based, of `n`) a case belongs to: the first 8 bytes of the SHA-256 of its
/// name, big-endian, modulo `n`.
pub fn shard_of(name: &str, n: u64) -> u64 {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(name.as_bytes());
    u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) % n
}

/// A pack file, or a registry reference pulled (once) into the cache's `pulled/` folder.
fn local_pack(a: &TestArgs, arg: &str) -> Result<PathBuf> {
    pulled_pack(arg, &a.registry, a.quiet)
}

/// A pack file, or a registry reference pulled (once) into the cache's `pulled/` folder
/// (shared by `test REF` and `restore REF --clones N`, whose clones share the pages of
/// one local file).
pub fn pulled_pack(
    arg: &str,
    registry: &crate::registry_cmd::RegistryArgs,
    quiet: bool,
) -> Result<PathBuf> {
    let p = Path::new(arg);
    if p.exists() || !vmpack_registry::Reference::looks_like(arg) {
        return Ok(p.to_path_buf());
    }
    let reference = vmpack_registry::Reference::parse(arg)?;
    let client = registry.client(&reference)?;
    let top = client
        .get_manifest(reference.manifest_reference())?
        .ok_or_else(|| anyhow!("{reference}: not found in the registry"))?;
    let root = crate::environment::cache_root()
        .context("no cache folder: set VMPACK_CACHE_DIR, XDG_CACHE_HOME or HOME")?;
    let cache = crate::environment::chunk_cache()?;
    let hex = top.digest.trim_start_matches("sha256:");
    let mut dir = root.join("pulled");
    // A diff pack's parents land beside it under the names it records: a folder of its own
    // keeps them apart from other chains' parents of the same name.
    let by_digest = vmpack_registry::Reference {
        tag: None,
        digest: Some(top.digest.clone()),
        ..reference.clone()
    };
    let pinned = vmpack_registry::Client::new(&by_digest, client.options().clone())?;
    if vmpack_registry::resolve_cached(&pinned, Some(&cache), false)?
        .parent
        .is_some()
    {
        dir = dir.join(hex);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = dir.join(format!("{hex}.vmpack"));
    if vmpack_formats::pack::PackReader::open(&target).is_ok() {
        return Ok(target);
    }
    let (r, secs) = crate::registry_cmd::pull_to(&pinned, &cache, &target, quiet)?;
    if !quiet {
        eprintln!(
            "vmpack: pulled {reference} in {secs:.2} s: fetched {} blobs, {} from the chunk cache",
            r.fetched_blobs, r.cached_blobs
        );
    }
    Ok(target)
}

pub fn run(a: TestArgs) -> Result<i32> {
    if !a.merge_junit.is_empty() {
        let out = a.junit.as_deref().expect("clap requires --junit");
        return merge_junit(&a.merge_junit, out, a.quiet);
    }
    let (pack_arg, cases_path) = match (&a.pack, &a.cases) {
        (Some(p), Some(c)) => (p.clone(), c.clone()),
        _ => bail!("give PACK|REF and CASES"),
    };
    let mut cases = load_cases(&cases_path)?;
    if let Some((k, n)) = a.shard {
        let all = cases.len();
        cases.retain(|c| shard_of(&c.name, n) == k - 1);
        if !a.quiet {
            eprintln!("vmpack: shard {k}/{n}: {} of {all} cases", cases.len());
        }
        if cases.is_empty() {
            crate::outln!("0 passed, 0 failed (shard {k}/{n} of {all} cases is empty)");
            if let Some(path) = &a.junit {
                write_junit(path, &[], 0.0)?;
            }
            return Ok(0);
        }
    }
    let jobs = a.jobs.clamp(1, cases.len());
    a.net.check(if jobs > 1 { cases.len() } else { 1 })?;
    let pack = local_pack(&a, &pack_arg)?;
    let src = prepare_source(&pack, a.quiet)?;
    let work = WorkBase::new("test")?;
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<CaseResult>>> =
        Mutex::new((0..cases.len()).map(|_| None).collect());
    let started = Instant::now();
    let clone_ids = AtomicUsize::new(0);
    let clones = Clones {
        src: &src,
        work: &work,
        net: &a.net,
        next: &clone_ids,
        reuse: a.reuse,
    };
    let worker = || {
        let mut kept = None;
        loop {
            let i = next.fetch_add(1, Ordering::SeqCst);
            let Some(case) = cases.get(i) else { break };
            let r = run_case(&clones, &mut kept, i, case);
            if !a.quiet {
                eprintln!(
                    "vmpack: {} {} ({:.0} ms)",
                    if r.passed { "pass" } else { "FAIL" },
                    r.name,
                    r.secs * 1000.0
                );
            }
            results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
        }
        // The kept clone (if any) ends here, before the work folders go.
        drop(kept);
    };
    std::thread::scope(|s| {
        // Short of threads, fewer jobs run at once; with none, this thread runs them all.
        let mut started = 0;
        while started < jobs && std::thread::Builder::new().spawn_scoped(s, worker).is_ok() {
            started += 1;
        }
        if started == 0 {
            worker();
        }
    });
    let total = started.elapsed().as_secs_f64();
    drop(work);
    let results: Vec<CaseResult> = results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.expect("every case ran"))
        .collect();
    let failed = results.iter().filter(|r| !r.passed).count();

    if a.json {
        let cases: Vec<_> = results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "passed": r.passed,
                    "ms": r.secs * 1000.0,
                    "message": r.message,
                    "output": r.output,
                })
            })
            .collect();
        crate::outln!(
            "{}",
            serde_json::json!({
                "passed": results.len() - failed,
                "failed": failed,
                "seconds": total,
                "clones": clone_ids.load(Ordering::SeqCst),
                "cases": cases,
            })
        );
        if let Some(path) = &a.junit {
            write_junit(path, &results, total)?;
        }
        return Ok(if failed == 0 { 0 } else { 1 });
    }
    let mut out = std::io::stdout().lock();
    let width = results
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    writeln!(out, "{:<width$}  result  time", "case")
        .unwrap_or_else(|e| crate::util::stdout_failed(e));
    for r in &results {
        writeln!(
            out,
            "{:<width$}  {:<6}  {:.0} ms",
            r.name,
            if r.passed { "pass" } else { "FAIL" },
            r.secs * 1000.0
        )
        .unwrap_or_else(|e| crate::util::stdout_failed(e));
    }
    for r in results.iter().filter(|r| !r.passed) {
        writeln!(out, "\n--- {} failed: {}", r.name, r.message)
            .unwrap_or_else(|e| crate::util::stdout_failed(e));
        writeln!(out, "--- serial output of {}:", r.name)
            .unwrap_or_else(|e| crate::util::stdout_failed(e));
        for line in r.output.lines() {
            writeln!(out, "  | {line}").unwrap_or_else(|e| crate::util::stdout_failed(e));
        }
    }
    writeln!(
        out,
        "\n{} passed, {} failed ({} cases, {jobs} at a time, {total:.2} s{})",
        results.len() - failed,
        failed,
        results.len(),
        if a.reuse {
            format!(
                ", {} clones reset between cases",
                clone_ids.load(Ordering::SeqCst)
            )
        } else {
            String::new()
        }
    )
    .unwrap_or_else(|e| crate::util::stdout_failed(e));
    if let Some(path) = &a.junit {
        write_junit(path, &results, total)?;
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

fn write_junit(path: &Path, results: &[CaseResult], total: f64) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.file()
        .write_all(junit_xml(results, total).as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    f.commit()
}

/// Attribute `name="…"` of an XML start tag (our own JUnit output: double quotes).
fn xml_attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

/// `vmpack test --merge-junit A.xml B.xml … --junit ALL.xml`: every `<testcase>` of the
/// inputs, in order, in one suite; exit status 1 if any failed.
fn merge_junit(inputs: &[PathBuf], out: &Path, quiet: bool) -> Result<i32> {
    let mut cases: Vec<String> = Vec::new();
    let (mut failed, mut time) = (0usize, 0f64);
    let mut names = HashSet::new();
    for p in inputs {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        if !text.contains("<testsuite") {
            bail!("{}: not a JUnit XML file (no <testsuite>)", p.display());
        }
        let mut rest = text.as_str();
        while let Some(start) = rest.find("<testcase") {
            let after = &rest[start..];
            let tag_end = after
                .find('>')
                .ok_or_else(|| anyhow!("{}: unterminated <testcase>", p.display()))?;
            let tag = &after[..tag_end + 1];
            let end = if tag.ends_with("/>") {
                tag_end + 1
            } else {
                after
                    .find("</testcase>")
                    .ok_or_else(|| anyhow!("{}: <testcase> without </testcase>", p.display()))?
                    + "</testcase>".len()
            };
            let block = &after[..end];
            let name = xml_attr(tag, "name").unwrap_or("");
            if !names.insert(name.to_string()) {
                bail!(
                    "{}: case {name:?} appears in two of the merged files",
                    p.display()
                );
            }
            if block.contains("<failure") || block.contains("<error") {
                failed += 1;
            }
            time += xml_attr(tag, "time")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0.0);
            cases.push(format!("  {block}\n"));
            rest = &after[end..];
        }
    }
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x.push_str(&format!(
        "<testsuites tests=\"{n}\" failures=\"{failed}\" time=\"{time:.3}\">\n<testsuite name=\"vmpack test\" tests=\"{n}\" failures=\"{failed}\" errors=\"0\" time=\"{time:.3}\">\n",
        n = cases.len()
    ));
    for c in &cases {
        x.push_str(c);
    }
    x.push_str("</testsuite>\n</testsuites>\n");
    let mut f = AtomicFile::create(out)?;
    f.file()
        .write_all(x.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    f.commit()?;
    if !quiet {
        eprintln!(
            "vmpack: merged {} files into {}",
            inputs.len(),
            out.display()
        );
    }
    crate::outln!(
        "{} passed, {failed} failed ({} cases from {} files)",
        cases.len() - failed,
        cases.len(),
        inputs.len()
    );
    Ok(if failed == 0 { 0 } else { 1 })
}

fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // XML 1.0 allows no other control characters.
            '\t' | '\n' | '\r' => o.push(c),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\x{:02x}", c as u32)),
            c => o.push(c),
        }
    }
    o
}

fn junit_xml(results: &[CaseResult], total: f64) -> String {
    let failed = results.iter().filter(|r| !r.passed).count();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x.push_str(&format!(
        "<testsuites tests=\"{}\" failures=\"{failed}\" time=\"{total:.3}\">\n<testsuite name=\"vmpack test\" tests=\"{}\" failures=\"{failed}\" errors=\"0\" time=\"{total:.3}\">\n",
        results.len(),
        results.len()
    ));
    for r in results {
        x.push_str(&format!(
            "  <testcase classname=\"vmpack\" name=\"{}\" time=\"{:.3}\">\n",
            xml_escape(&r.name),
            r.secs
        ));
        if !r.passed {
            x.push_str(&format!(
                "    <failure message=\"{}\">{}</failure>\n",
                xml_escape(&r.message),
                xml_escape(&r.output)
            ));
        }
        x.push_str(&format!(
            "    <system-out>{}</system-out>\n  </testcase>\n",
            xml_escape(&r.output)
        ));
    }
    x.push_str("</testsuite>\n</testsuites>\n");
    x
}

/// `vmpack restore PACK --clones N`: N clones at once, until they have all ended.
/// Clone i serves its control socket at `SOCK.i`; its serial output goes to stdout with
/// lines prefixed `[i] `, to `PATH.i` for `--serial-out PATH`, or nowhere.
// The command line's clone options, handed through as they are.
#[allow(clippy::too_many_arguments)]
pub fn restore_clones(
    pack: &Path,
    n: usize,
    api_sock: Option<&Path>,
    serial_out: &str,
    vsock_sock: Option<&str>,
    quiet: bool,
    json: bool,
    net: &crate::identity::NetIdentityArgs,
) -> Result<i32> {
    let src = prepare_source(pack, quiet)?;
    let work = WorkBase::new("clones")?;
    let t = Instant::now();
    let mut consoles = Vec::with_capacity(n);
    for i in 0..n {
        let suffixed = |p: &Path| {
            let mut s = p.as_os_str().to_owned();
            s.push(format!(".{i}"));
            PathBuf::from(s)
        };
        let run = RunOptions {
            serial_out: match serial_out {
                "stdout" | "none" => SerialSink::None,
                p => SerialSink::File(suffixed(Path::new(p))),
            },
            api_sock: api_sock.map(suffixed),
            vsock_sock: vsock_sock.map(|p| PathBuf::from(p.replace("%d", &i.to_string()))),
            net: net.for_clone(i)?,
            ..Default::default()
        };
        consoles.push(start_clone(&src, &work, i, run)?);
    }
    // Ctrl-C or kill ends every clone cleanly: their sockets and work folders go away.
    vmboot::terminate_all_on_signals(consoles.iter().map(|c| c.handle().clone()).collect())?;
    if json {
        let sockets: Vec<String> = match api_sock {
            Some(p) => (0..n).map(|i| format!("{}.{i}", p.display())).collect(),
            None => Vec::new(),
        };
        crate::outln!(
            "{}",
            serde_json::json!({
                "clones": n,
                "sockets": sockets,
                "milliseconds": t.elapsed().as_secs_f64() * 1000.0,
            })
        );
    } else if !quiet {
        eprintln!(
            "vmpack: {n} clones running ({:.1} ms to restore them all)",
            t.elapsed().as_secs_f64() * 1000.0
        );
    }
    let prefix = serial_out == "stdout";
    let logs: Vec<_> = consoles.iter().map(|c| c.log().clone()).collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut status = 0;
    let mut no_printer = None;
    std::thread::scope(|s| {
        if prefix {
            let printer = std::thread::Builder::new().spawn_scoped(s, || {
                let mut offsets = vec![0usize; logs.len()];
                loop {
                    let last = done.load(Ordering::SeqCst);
                    let mut out = std::io::stdout().lock();
                    for (i, log) in logs.iter().enumerate() {
                        let (start, bytes) = log.since(offsets[i]);
                        // Whole lines only, until the end, when the rest goes out too.
                        let upto = if last {
                            bytes.len()
                        } else {
                            bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1)
                        };
                        for line in bytes[..upto].split_inclusive(|&b| b == b'\n') {
                            let _ = write!(out, "[{i}] ");
                            let _ = out.write_all(line);
                            if !line.ends_with(b"\n") {
                                let _ = writeln!(out);
                            }
                        }
                        offsets[i] = start + upto;
                    }
                    let _ = out.flush();
                    if last {
                        break;
                    }
                    drop(out);
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            if let Err(e) = printer {
                no_printer = Some(e);
                return;
            }
        }
        for (i, c) in consoles.drain(..).enumerate() {
            match c.wait() {
                Ok(r) if r.code != 0 => {
                    eprintln!("vmpack: clone {i}: {} (exit status {})", r.message, r.code);
                    if status == 0 {
                        status = r.code;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("vmpack: clone {i}: {}", vmboot::error::Chain(&e));
                    status = 1;
                }
            }
        }
        done.store(true, Ordering::SeqCst);
    });
    if let Some(e) = no_printer {
        for c in consoles {
            let _ = c.stop();
        }
        bail!("cannot start the thread that prints the clones' output: {e}");
    }
    Ok(status)
}
