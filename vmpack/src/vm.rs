//! Commands that run VMs: `run`, `save`, `restore`. The VMM is the vmboot library, running
//! in this process; `save` talks to a running vmboot (or vmpack) over its control socket.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmboot::api::{AfterSave, ApiClient, RunState, SaveRequest, VmStatus};
use vmboot::snapshot::{self, PackInput, RestoreOptions, VerifyPolicy};
use vmboot::{BootPayload, RunOptions, SerialSink, Vm};
use vmpack_formats::config::{SerialOutput, VmConfig};
use vmpack_formats::pack::{Compression, MAGIC};

use crate::output::AtomicFile;
use crate::util::human_bytes;

#[derive(Args)]
pub struct RunArgs {
    /// A VM config (.toml) or a pack (.vmpack). Without it, the built-in counter sample
    /// boots: a real-mode guest that prints 1 to 300 on its serial console and exits.
    target: Option<PathBuf>,
    /// Serve the HTTP control API on this Unix socket (see docs/API.md).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Guest serial output: stdout, none, or a file path (overrides the config).
    #[arg(long)]
    serial_out: Option<String>,
    /// When to check a pack's chunk hashes.
    #[arg(long, value_enum, default_value = "auto")]
    verify: VerifyPolicy,
    /// Print nothing but errors.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
pub struct SaveArgs {
    /// The control socket of the running VM (`vmboot run --api-sock PATH`).
    #[arg(long)]
    api_sock: PathBuf,
    /// Output pack, or - for standard output (e.g. to pipe into `vmpack restore -`).
    /// Optional with --push (the pack then goes through a temporary file).
    #[arg(short, long, required_unless_present = "push")]
    output: Option<PathBuf>,
    /// Also push the pack to this registry reference (REGISTRY/REPOSITORY:TAG); only the
    /// chunks the registry lacks are uploaded.
    #[arg(long, value_name = "REF")]
    push: Option<String>,
    #[command(flatten)]
    registry: crate::registry_cmd::RegistryArgs,
    /// Chunk compression. Default none, unlike `pack`: guest memory stays page-aligned so
    /// restore maps it straight from the pack (milliseconds, shared by clones); zstd makes
    /// smaller packs to move around.
    #[arg(long, default_value = "none", value_name = "none|deflate|zstd")]
    compress: Compression,
    /// Compression level (deflate 0-9, zstd -7..=22 except 0; none takes none); default:
    /// the fastest useful one.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    level: Option<i32>,
    /// What the VM does after the save: keep running, or end.
    #[arg(
        long,
        default_value = "resume",
        value_parser = clap::builder::TypedValueParser::map(
            clap::builder::PossibleValuesParser::new(["resume", "stop"]),
            |s| s.parse::<AfterSave>().expect("one of the possible values"),
        ),
    )]
    then: AfterSave,
    /// Write a diff pack: only the memory and disk chunks written since the VM was restored
    /// from, or last saved to, PARENT (which the pack names by file name and root digest).
    #[arg(long, value_name = "PARENT", conflicts_with = "push")]
    diff_from: Option<PathBuf>,
    /// Live save: copy guest memory in rounds while the guest runs, then pause only for the
    /// pages written since the last round and the device state (docs/CLI.md, "Live save").
    #[arg(long)]
    live: bool,
    /// With --live: the pause to aim for, in ms (default 20). A guest that writes memory
    /// faster than it can be copied is paused anyway, with a warning.
    #[arg(long, value_name = "MS", requires = "live", value_parser = clap::value_parser!(u64).range(0..=60_000))]
    max_pause: Option<u64>,
    /// Print the result as JSON on stdout (`output`, `bytes`, `milliseconds`, `pause_ms`,
    /// `root_digest`, `parent`, `live`, `vm`); not with `-o -`.
    #[arg(long)]
    json: bool,
    /// Print nothing but errors.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// A pack made by `vmpack save`, - to read it from standard input, or a registry
    /// reference (REGISTRY/REPOSITORY:TAG or @sha256:DIGEST) to run straight from the
    /// registry, memory and disks fetched on first touch. An argument that names an existing file is
    /// a file; otherwise one whose first component has a '.' or ':' or is `localhost` is a
    /// reference.
    pack: PathBuf,
    #[command(flatten)]
    registry: crate::registry_cmd::RegistryArgs,
    /// Serve the HTTP control API on this Unix socket, so the VM can be saved again.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Guest serial output: stdout, none, or a file path.
    #[arg(long, default_value = "stdout")]
    serial_out: String,
    /// When to check chunk hashes (docs/FORMAT.md, "Verification on restore").
    #[arg(long, value_enum, default_value = "auto")]
    verify: VerifyPolicy,
    /// How guest memory is filled: auto, lazy (on first touch, each chunk verified first)
    /// or eager (docs/FORMAT.md, "Guest memory on restore").
    #[arg(long, value_enum, default_value = "auto")]
    memory: snapshot::MemoryPolicy,
    /// Print nothing but errors and warnings.
    #[arg(long, short)]
    quiet: bool,
    /// For a diff pack: its parent pack, instead of the file its manifest names in its
    /// folder (the root digest must still match).
    #[arg(long, value_name = "FILE")]
    parent: Option<PathBuf>,
    /// Refuse a pack without a good signature from a key in --allowed-signers.
    #[arg(long, requires = "allowed_signers")]
    require_signature: bool,
    /// Allowed-signers file (git's format) for --require-signature.
    #[arg(long, value_name = "FILE")]
    allowed_signers: Option<PathBuf>,
    /// Run N identical clones at once (sharing the pack's memory pages). Clone i serves
    /// its control socket at `SOCK.i`; its serial output goes to stdout as lines prefixed
    /// `[i] `, or to `PATH.i` for `--serial-out PATH`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    clones: u32,
    /// The vsock device's host socket (a pack's own path is never used); with --clones a
    /// pattern in which `%d` is the clone index. Default: `vsock.sock` in the VM's work
    /// folder (`GET /vm` shows it).
    #[arg(long, value_name = "PATH")]
    vsock_sock: Option<String>,
    /// Once the VM (with --clones, every clone) runs, print one JSON line on stdout (`clones`,
    /// `sockets`, `milliseconds`; one restore adds `memory`, and from a reference
    /// `reference`, `digest`, `root_digest`, `steps`) before any serial output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    net: crate::identity::NetIdentityArgs,
}

/// The README's first command: a VM that needs no files at all.
const BUILTIN_COUNTER: &str = r#"
name = "counter"
vcpus = 1
memory_mib = 16
[flat]
image = "builtin-counter16.bin"
load_address = 0x1000
entry = 0x1000
mode = "real"
"#;

fn sink(arg: Option<&str>, cfg: Option<&VmConfig>) -> SerialSink {
    match arg {
        Some("stdout") => SerialSink::Stdout,
        Some("none") => SerialSink::None,
        Some(p) => SerialSink::File(PathBuf::from(p)),
        None => match cfg.map(|c| (c.serial.output, c.serial.path.clone())) {
            Some((SerialOutput::None, _)) => SerialSink::None,
            Some((SerialOutput::File, Some(p))) => SerialSink::File(p),
            _ => SerialSink::Stdout,
        },
    }
}

/// Serial output of a packed VM: where the command line says; else the packed config's
/// `stdout` or `none`. A packed `output = "file"` is ignored with a notice: a pack never
/// chooses a host path to write.
fn packed_sink(a: &RunArgs, cfg: &VmConfig, pack: &Path) -> SerialSink {
    if a.serial_out.is_some() {
        return sink(a.serial_out.as_deref(), None);
    }
    match cfg.serial.output {
        SerialOutput::None => SerialSink::None,
        SerialOutput::Stdout => SerialSink::Stdout,
        SerialOutput::File => {
            if !a.quiet {
                eprintln!(
                    "vmpack: {}: the packed config's [serial] file is ignored; serial output goes to stdout (--serial-out PATH writes it to a file)",
                    pack.display()
                );
            }
            SerialSink::Stdout
        }
    }
}

fn is_pack(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == MAGIC
}

/// Runs until the guest ends and returns its exit status (the process exits with it).
pub fn run(a: RunArgs) -> Result<i32> {
    let vm = match &a.target {
        None => {
            let cfg = VmConfig::parse(BUILTIN_COUNTER, Path::new("builtin/counter.toml"))?;
            let payload = BootPayload {
                image: Some(vmboot::samples::COUNTER16.to_vec()),
                ..Default::default()
            };
            if !a.quiet {
                eprintln!(
                    "vmpack: booting the built-in counter sample (prints 1 to 300, then exits)"
                );
            }
            Vm::create(&cfg, payload, &run_options(&a, Some(&cfg)))?
        }
        Some(p) if is_pack(p) => {
            let pack = vmpack_formats::vm::VmPack::open(p)?;
            if pack.manifest().vmstate.is_some() {
                drop(pack);
                return restore(RestoreArgs {
                    pack: p.clone(),
                    api_sock: a.api_sock,
                    serial_out: a.serial_out.unwrap_or_else(|| "stdout".into()),
                    verify: a.verify,
                    memory: snapshot::MemoryPolicy::Auto,
                    quiet: a.quiet,
                    clones: 1,
                    json: false,
                    vsock_sock: None,
                    require_signature: false,
                    allowed_signers: None,
                    registry: Default::default(),
                    parent: None,
                    net: Default::default(),
                });
            }
            let cfg = pack.config()?;
            drop(pack);
            let run = RunOptions {
                serial_out: packed_sink(&a, &cfg, p),
                ..run_options(&a, None)
            };
            snapshot::boot_at_rest(p, a.verify, run, &std::env::temp_dir())?
        }
        Some(p) => {
            let cfg = VmConfig::from_file(p).map_err(|e| {
                let toml = p.extension().is_some_and(|x| x == "toml");
                if toml || !p.exists() {
                    anyhow::Error::from(e)
                } else {
                    anyhow::anyhow!(
                        "cannot run {}: neither a pack (no vmpack magic) nor a VM config (TOML): {e}",
                        p.display()
                    )
                }
            })?;
            let payload = BootPayload::from_config(&cfg)?;
            Vm::create(&cfg, payload, &run_options(&a, Some(&cfg)))?
        }
    };
    vmboot::terminate_on_signals(vm.controller())?;
    let reason = vm.run()?;
    if reason.code != 0 {
        eprintln!("vmpack: {} (exit status {})", reason.message, reason.code);
    }
    Ok(reason.code)
}

fn run_options(a: &RunArgs, cfg: Option<&VmConfig>) -> RunOptions {
    RunOptions {
        serial_out: sink(a.serial_out.as_deref(), cfg),
        api_sock: a.api_sock.clone(),
        stdin_input: true,
        temp_dir: Some(std::env::temp_dir()),
        ..Default::default()
    }
}

pub fn save(a: SaveArgs) -> Result<()> {
    // Refused before the VM is touched, with the ranges `pack` uses.
    a.compress
        .check_level(a.level)
        .map_err(|e| crate::util::Usage(format!("--{e}")))?;
    if a.json && a.output.as_deref() == Some(Path::new("-")) {
        return Err(crate::util::Usage(
            "--json needs -o FILE or --push: with -o - the pack itself is on stdout".into(),
        )
        .into());
    }
    // The parent is read (its root digest) before the VM is touched.
    let diff_from = match &a.diff_from {
        Some(p) => Some(parent_ref(p, a.output.as_deref())?),
        None => None,
    };
    // Resolve the registry (and read a password from stdin) before the VM is touched.
    let push = match &a.push {
        Some(r) => {
            let reference = vmpack_registry::Reference::parse(r)?;
            if a.output.as_deref() == Some(Path::new("-")) {
                bail!("--push needs a pack file (-o FILE) or none, not standard output");
            }
            Some(a.registry.client(&reference)?)
        }
        None => None,
    };
    // Without -o the pack goes to a temporary file next to the chunk cache, removed after.
    let scratch = match &a.output {
        Some(_) => None,
        None => {
            let root = crate::environment::cache_root().context(
                "no cache folder for the temporary pack: set VMPACK_CACHE_DIR or give -o",
            )?;
            std::fs::create_dir_all(&root)?;
            Some(
                tempfile::Builder::new()
                    .prefix(".save-")
                    .suffix(".vmpack")
                    .tempdir_in(&root)?,
            )
        }
    };
    let output = match (&a.output, &scratch) {
        (Some(o), _) => o.clone(),
        (None, Some(d)) => d.path().join("pack.vmpack"),
        (None, None) => unreachable!("clap requires -o without --push"),
    };
    let client = ApiClient::new(&a.api_sock);
    let stop = a.then == AfterSave::Stop;
    // Everything that can be checked is checked before the VM is touched: the socket
    // answers, the output can be created (folder exists, writable, not a link, not a file
    // the user may not replace), and the folder has room where that is knowable.
    let before = client.status()?;
    let was_paused = before.state == RunState::Paused;
    let mut out = if output.as_os_str() == "-" {
        None
    } else {
        let out = AtomicFile::create(&output)
            .with_context(|| format!("cannot save the VM to {}", output.display()))?;
        if !out.is_special() {
            check_free_space(out.temp_path(), &before, a.compress, a.quiet)?;
        }
        Some(out)
    };
    // For --then stop the VM is paused first and shut down only after the figures of the
    // save have been read back, so they can be reported.
    if stop {
        client.pause()?;
    }
    let body = SaveRequest {
        compress: Some(a.compress),
        level: a.level,
        then: AfterSave::Resume,
        diff_from: diff_from.clone(),
        live: a.live,
        max_pause_ms: a.max_pause,
    };
    let t = Instant::now();
    // When the last byte was in the file (page cache), before the sync.
    let mut written = None;
    let result = (|| -> Result<u64> {
        match out.take() {
            None => {
                let stdout = std::io::stdout();
                let mut lock = stdout.lock();
                let n = client.save(&body, &mut lock)?;
                lock.flush()
                    .context("writing the pack to standard output")?;
                Ok(n)
            }
            Some(mut out) => {
                let mut w = out.write_behind();
                let n = client.save(&body, &mut w)?;
                w.flush()
                    .with_context(|| format!("writing {}", output.display()))?;
                written = Some(t.elapsed());
                // A stream cut short (the VM died mid-save) is caught here, before the
                // rename: the trailer and index digest prove the pack arrived whole. A
                // device target (`-o /dev/null`) has nothing to read back.
                if !out.is_special() {
                    vmpack_formats::pack::PackReader::open(out.temp_path()).map_err(|e| {
                        anyhow::anyhow!(
                            "the pack received for {} is incomplete or damaged: {e}",
                            output.display()
                        )
                    })?;
                }
                out.commit()?;
                Ok(n)
            }
        }
    })();
    let bytes = match result {
        Ok(n) => n,
        Err(e) => {
            // The VM keeps the run state it had before the command: the server restores
            // it after a failed stream; a pause of our own (--then stop) is undone here.
            if stop && !was_paused {
                return Err(match resume_after_failure(&client) {
                    Ok(()) => e.context("the save failed; the VM was resumed"),
                    Err(r) => e.context(format!(
                        "the save failed and the VM stays paused ({r:#}); resume it with PUT /vm/resume"
                    )),
                });
            }
            return Err(e);
        }
    };
    let wall = t.elapsed();
    let last_save = client.status().ok().and_then(|s| s.last_save);
    if stop {
        client.shutdown()?;
    }
    let pause = last_save.as_ref().map_or(f64::NAN, |l| l.pause_ms);
    let digest = last_save.as_ref().map_or("?", |l| l.root_digest.as_str());
    if a.json {
        crate::outln!(
            "{}",
            serde_json::json!({
                "output": a.output.as_ref().map(|o| o.display().to_string()),
                "bytes": bytes,
                "milliseconds": wall.as_secs_f64() * 1000.0,
                "written_ms": written.map(|w| w.as_secs_f64() * 1000.0),
                "pause_ms": last_save.as_ref().map(|l| l.pause_ms),
                "root_digest": last_save.as_ref().map(|l| &l.root_digest),
                "parent": diff_from.as_ref().map(|p| &p.root_digest),
                "live": last_save.as_ref().and_then(|l| l.live.as_ref()),
                "vm": if stop { "stopped" } else { "resumed" },
            })
        );
    } else if !a.quiet {
        let place = match &a.output {
            None => "a temporary file".to_string(),
            Some(o) if o.as_os_str() == "-" => "standard output".to_string(),
            Some(o) => o.display().to_string(),
        };
        let what = match &diff_from {
            Some(p) => format!("a diff pack against {} ({})", p.file, p.root_digest),
            None => "the VM".to_string(),
        };
        let synced = match written {
            Some(w) => format!(
                " ({:.1} ms to write it, the rest to sync it to disk)",
                w.as_secs_f64() * 1000.0
            ),
            None => String::new(),
        };
        eprintln!(
            "vmpack: saved {what}, {}, to {place} in {:.1} ms{synced}; guest paused {pause:.1} ms for the capture; root digest {digest}; VM {}",
            human_bytes(bytes),
            wall.as_secs_f64() * 1000.0,
            if stop { "stopped" } else { "resumed" }
        );
    }
    if let Some(live) = last_save.as_ref().and_then(|l| l.live.as_ref()) {
        if !a.quiet && !a.json {
            let rounds: Vec<String> = live
                .rounds
                .iter()
                .map(|r| format!("{} in {:.1} ms", human_bytes(r.bytes), r.ms))
                .collect();
            eprintln!(
                "vmpack: live save: {} pre-copy round(s) ({}), then {} copied during the pause; pause target {} ms {}",
                live.rounds.len(),
                if rounds.is_empty() { "none".to_string() } else { rounds.join(", ") },
                human_bytes(live.final_bytes),
                live.max_pause_ms,
                if live.max_pause_met { "met" } else { "missed" }
            );
        }
        if let Some(w) = &live.warning {
            if !a.quiet {
                eprintln!("vmpack: warning: live save: {w}");
            }
        }
    }
    if let Some(client) = push {
        let report = crate::registry_cmd::push_file(&output, &client, a.quiet || a.json)?;
        if !a.quiet && !a.json {
            let label = match &a.output {
                Some(o) => o.display().to_string(),
                None => "the saved VM".to_string(),
            };
            crate::registry_cmd::print_push(&report, &label);
        }
    }
    Ok(())
}

/// The parent a diff save names: `parent`'s file name and root digest. Refuses an output
/// that would replace the parent.
fn parent_ref(parent: &Path, output: Option<&Path>) -> Result<vmpack_formats::diff::ParentRef> {
    let reader = vmpack_formats::pack::PackReader::open(parent)
        .with_context(|| format!("--diff-from {}", parent.display()))?;
    if let (Some(o), Ok(p)) = (output, parent.canonicalize()) {
        if o.canonicalize().is_ok_and(|o| o == p) {
            return Err(crate::util::Usage(format!(
                "-o {} is the parent pack itself; a diff pack needs its parent",
                o.display()
            ))
            .into());
        }
    }
    let file = parent
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let p = vmpack_formats::diff::ParentRef {
        root_digest: hex::encode(reader.root_digest()),
        file,
    };
    p.check()
        .map_err(|e| anyhow::anyhow!("--diff-from {}: {e}", parent.display()))?;
    Ok(p)
}

/// Resumes a VM this command paused. The server may still be ending the failed save (it
/// answers `409` until it has), so this retries for a bounded time.
fn resume_after_failure(client: &ApiClient) -> Result<()> {
    let t0 = Instant::now();
    loop {
        match client.resume() {
            Ok(()) => return Ok(()),
            Err(e) if e.status() == Some(409) && t0.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Refuses a save to a filesystem with no room at all, and warns where the guest's memory
/// alone (uncompressed, before zero pages are skipped) would not fit. A save that runs out
/// of space anyway fails, removes its temporary and leaves the VM running.
fn check_free_space(
    temp: &Path,
    status: &VmStatus,
    compress: Compression,
    quiet: bool,
) -> Result<()> {
    let Ok(c) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(temp.as_os_str()))
    else {
        return Ok(());
    };
    // SAFETY: statvfs fills a zeroed struct from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Ok(());
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    let folder = temp.parent().unwrap_or(Path::new("."));
    if free == 0 {
        bail!(
            "cannot save the VM to {}: no space left on the filesystem; the VM was not paused",
            folder.display()
        );
    }
    let memory = status.memory_mib << 20;
    if compress == Compression::None && free < memory && !quiet {
        eprintln!(
            "vmpack: warning: {}: {} free, the guest has {} of memory; the save fails (and the VM keeps running) if the pack does not fit",
            folder.display(),
            human_bytes(free),
            human_bytes(memory)
        );
    }
    Ok(())
}

/// Whether a restore argument is a registry reference rather than a file (the rule of
/// `vmpack test`: an existing file wins).
fn is_reference(arg: &Path) -> Option<&str> {
    let s = arg.to_str()?;
    (s != "-" && !arg.exists() && vmpack_registry::Reference::looks_like(s)).then_some(s)
}

pub fn restore(mut a: RestoreArgs) -> Result<i32> {
    if let Some(r) = is_reference(&a.pack) {
        if a.parent.is_some() {
            return Err(crate::util::Usage(
                "--parent names a file; a diff pack from a registry has its parents there".into(),
            )
            .into());
        }
        if a.clones == 1 {
            return restore_remote(r.to_string(), a);
        }
        // Clones share the pages of one local file: the pack is pulled once into the cache.
        a.pack = crate::test_cmd::pulled_pack(r, &a.registry, a.quiet)?;
    }
    if a.require_signature {
        if a.pack.as_os_str() == "-" {
            bail!("--require-signature needs a pack file, not standard input");
        }
        let allowed = a
            .allowed_signers
            .as_deref()
            .expect("clap requires --allowed-signers");
        for good in crate::sign::require_signature(&a.pack, allowed)? {
            if !a.quiet {
                eprintln!(
                    "vmpack: {}: {}",
                    a.pack.display(),
                    crate::sign::describe_good(&good)
                );
            }
        }
    }
    if a.json && a.pack.as_os_str() == "-" {
        return Err(crate::util::Usage(
            "--json needs a pack file or reference, not standard input".into(),
        )
        .into());
    }
    a.net.check(a.clones as usize)?;
    if a.clones > 1 {
        if a.pack.as_os_str() == "-" {
            bail!("--clones needs a pack file, not standard input");
        }
        if a.vsock_sock.as_ref().is_some_and(|p| !p.contains("%d")) {
            return Err(crate::util::Usage(
                "--vsock-sock with --clones needs %d in the path (each clone gets its own socket)"
                    .into(),
            )
            .into());
        }
        return crate::test_cmd::restore_clones(
            &a.pack,
            a.clones as usize,
            a.api_sock.as_deref(),
            &a.serial_out,
            a.vsock_sock.as_deref(),
            a.quiet,
            a.json,
            &a.net,
        );
    }
    let input = if a.pack.as_os_str() == "-" {
        PackInput::Stdin
    } else {
        if !a.pack.exists() {
            bail!("{}: no such file", a.pack.display());
        }
        PackInput::File(a.pack.clone())
    };
    if a.json {
        return restore_json(input, a);
    }
    let run = RunOptions {
        serial_out: sink(Some(&a.serial_out), None),
        api_sock: a.api_sock,
        stdin_input: !matches!(input, PackInput::Stdin),
        vsock_sock: a.vsock_sock.map(PathBuf::from),
        net: a.net.for_clone(0)?,
        ..Default::default()
    };
    let quiet = a.quiet;
    let reason = snapshot::restore_and_run(
        input,
        RestoreOptions {
            report: snapshot::Reporter::new(move |e| {
                if !(quiet && matches!(e, snapshot::RestoreEvent::Restored { .. })) {
                    eprintln!("{}", e.message("vmpack"));
                }
            }),
            bench_timestamps: false,
            verify: a.verify,
            memory: a.memory,
            run,
            work_dir: std::env::temp_dir(),
            source: Default::default(),
            parent: a.parent,
        },
    )?;
    if reason.code != 0 {
        eprintln!("vmpack: {} (exit status {})", reason.message, reason.code);
    }
    Ok(reason.code)
}

/// The document `restore --json` prints when the VM runs, before any serial output: the
/// fields of `restore --clones N --json`, plus `extra`.
fn print_restore_json(
    api_sock: Option<&Path>,
    milliseconds: f64,
    extra: serde_json::Map<String, serde_json::Value>,
) {
    let mut doc = serde_json::json!({
        "clones": 1,
        "sockets": api_sock.map(|p| p.display().to_string()).into_iter().collect::<Vec<_>>(),
        "milliseconds": milliseconds,
    });
    if let Some(o) = doc.as_object_mut() {
        o.extend(extra);
    }
    crate::outln!("{doc}");
}

/// `vmpack restore PACK --json`: as `restore_and_run`, with the document printed once the
/// VM is built, before its vCPUs start.
fn restore_json(input: PackInput, a: RestoreArgs) -> Result<i32> {
    let t = Instant::now();
    let sock = a.api_sock.clone();
    let run = RunOptions {
        serial_out: sink(Some(&a.serial_out), None),
        api_sock: a.api_sock,
        stdin_input: true,
        net: a.net.for_clone(0)?,
        ..Default::default()
    };
    let (vm, info) = snapshot::restore(
        input,
        RestoreOptions {
            report: Default::default(),
            bench_timestamps: false,
            verify: a.verify,
            memory: a.memory,
            run,
            work_dir: std::env::temp_dir(),
            source: Default::default(),
            parent: a.parent.clone(),
        },
    )?;
    for w in &info.warnings {
        eprintln!("vmpack: warning: {w}");
    }
    let milliseconds = t.elapsed().as_secs_f64() * 1000.0;
    if !a.quiet {
        eprintln!(
            "vmpack: restored in {milliseconds:.1} ms (memory: {}; {})",
            info.memory_path, info.verified
        );
    }
    let mut extra = serde_json::Map::new();
    extra.insert("memory".into(), info.memory_path.into());
    extra.insert(
        "disk_chunks_pending".into(),
        vm.controller().disk_chunks_pending().into(),
    );
    print_restore_json(sock.as_deref(), milliseconds, extra);
    vmboot::terminate_on_signals(vm.controller())?;
    let reason = vm.run()?;
    if reason.code != 0 {
        eprintln!("vmpack: {} (exit status {})", reason.message, reason.code);
    }
    Ok(reason.code)
}

/// `vmpack restore REF`: the VM runs before its memory is downloaded (see `remote`).
fn restore_remote(r: String, a: RestoreArgs) -> Result<i32> {
    let started = Instant::now();
    a.net.check(1)?;
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    let reference = vmpack_registry::Reference::parse(&r)?;
    let client = Arc::new(a.registry.client(&reference)?);
    // Without userfaultfd (or with --memory eager) memory is fetched whole first.
    let all = a.memory == snapshot::MemoryPolicy::Eager || !vmboot::vstate::lazy::available();
    let mut guess = true;
    let mut local = loop {
        let cache = crate::environment::chunk_cache()?;
        let mut local =
            match crate::remote::prepare(client.clone(), cache, guess, all, started, a.quiet, None)
            {
                Ok(l) => l,
                // The cached manifest may name blobs the registry no longer has (the tag
                // moved and they were collected): the registry's own manifest decides.
                Err(_) if guess => {
                    guess = false;
                    continue;
                }
                Err(e) => return Err(e),
            };
        if local.confirmed()? {
            break local;
        }
        // The tag moved since the cached manifest: start over from the registry's.
        if !a.quiet {
            eprintln!("vmpack: {r}: the tag moved since it was last resolved; resolving it again");
        }
        guess = false;
    };
    local.phases.push(("tag confirmed", ms(started)));
    // A diff pack: each parent the registry names gets a local skeleton beside the child's
    // (under the name the child records), checked against the root digest the child names,
    // and memory is served from the chain as from files.
    let mut parents: Vec<crate::remote::RemotePackFile> = Vec::new();
    let mut named = crate::registry_cmd::parent_of(&local.path);
    let mut link = local.parent_link().cloned();
    let mut what = r.clone();
    let folder = local
        .path
        .parent()
        .expect("the local file is in a folder")
        .to_path_buf();
    let mut names = vec!["pack.vmpack".to_string()];
    while let Some(p) = named.take() {
        if parents.len() >= vmpack_formats::diff::MAX_CHAIN {
            bail!(
                "{what}: the chain of parent packs is longer than {}",
                vmpack_formats::diff::MAX_CHAIN
            );
        }
        let l = crate::registry_cmd::checked_link(&what, &p, link.take())?;
        if names.contains(&p.file) {
            bail!(
                "{what}: two packs of the chain are named {}",
                vmpack_formats::vm::printable(&p.file)
            );
        }
        names.push(p.file.clone());
        let pref = vmpack_registry::Reference {
            tag: None,
            digest: Some(l.digest.clone()),
            ..client.reference().clone()
        };
        what = pref.to_string();
        let pc = Arc::new(vmpack_registry::Client::new(
            &pref,
            client.options().clone(),
        )?);
        let pf = crate::remote::prepare(
            pc,
            crate::environment::chunk_cache()?,
            false,
            all,
            started,
            a.quiet,
            Some((&folder, &p.file)),
        )?;
        if hex::encode(pf.root_digest()) != p.root_digest {
            bail!(
                "{what}: root digest {}, the diff pack names {}; refused",
                hex::encode(pf.root_digest()),
                p.root_digest
            );
        }
        named = crate::registry_cmd::parent_of(&pf.path);
        link = pf.parent_link().cloned();
        parents.push(pf);
    }
    let fetcher: Arc<dyn vmboot::vstate::lazy::ChunkFetch> = if parents.is_empty() {
        local.fetch.clone()
    } else {
        local.phases.push(("parent packs' skeletons", ms(started)));
        let mut chain: Vec<_> = parents.iter().rev().map(|p| p.fetch.clone()).collect();
        chain.push(local.fetch.clone());
        Arc::new(crate::remote::ChainFetch(chain))
    };
    if a.require_signature {
        let allowed = a
            .allowed_signers
            .as_deref()
            .expect("clap requires --allowed-signers");
        // Signatures sign the root digest, which the local skeleton already carries.
        for good in crate::sign::require_signature(&local.path, allowed)
            .map_err(|e| anyhow::anyhow!("{r}: {e:#}"))?
        {
            if !a.quiet {
                eprintln!("vmpack: {r}: {}", crate::sign::describe_good(&good));
            }
        }
    }
    if !a.quiet {
        eprintln!(
            "vmpack: {r}: skeleton ready in {:.1} ms; {}",
            ms(started),
            if all {
                "memory and disks fetched whole"
            } else {
                "memory and disks fetched on first touch"
            }
        );
    }
    // The serial log lets the first line of output be timed (and the bytes fetched by then).
    let log = vmboot::console::SerialLog::new();
    let sock = a.api_sock.clone();
    let run = RunOptions {
        serial_out: SerialSink::Console {
            log: log.clone(),
            also: Box::new(sink(Some(&a.serial_out), None)),
        },
        api_sock: a.api_sock,
        stdin_input: !a.registry.password_stdin,
        vsock_sock: a.vsock_sock.map(PathBuf::from),
        net: a.net.for_clone(0)?,
        ..Default::default()
    };
    let mut phases = local.phases.clone();
    phases.push(("signature", ms(started)));
    let (vm, info) = snapshot::restore(
        PackInput::File(local.path.clone()),
        RestoreOptions {
            report: Default::default(),
            bench_timestamps: false,
            // A whole temporary file is checked in full and never recorded as verified.
            verify: if all { VerifyPolicy::Always } else { a.verify },
            memory: a.memory,
            run,
            work_dir: std::env::temp_dir(),
            source: if all {
                vmboot::vstate::lazy::ChunkSource::PackFile
            } else {
                vmboot::vstate::lazy::ChunkSource::Fetch(fetcher)
            },
            parent: None,
        },
    )
    .map_err(|e| anyhow::anyhow!("{r}: {}", vmboot::error::Chain(&e)))?;
    let at = phases.last().map_or(0.0, |p| p.1);
    phases.push(("restore checks, disks, memory setup", at + info.prepare_ms));
    phases.push(("VM built", ms(started)));
    for w in &info.warnings {
        eprintln!("vmboot: warning: {w}");
    }
    if !a.quiet {
        eprintln!(
            "vmboot: restored (memory: {}; {})",
            info.memory_path, info.verified
        );
    }
    let counters = local.fetch.counters.clone();
    let first_line: Arc<std::sync::OnceLock<(f64, u64)>> = Arc::default();
    {
        let (log, counters, first_line) = (log.clone(), counters.clone(), first_line.clone());
        let nl = regex::bytes::Regex::new("\n").expect("valid regex");
        // Ends with the process; waits at most a day.
        std::thread::spawn(move || {
            let deadline = Instant::now() + std::time::Duration::from_secs(86400);
            if log.wait_for(0, &nl, deadline).is_ok() {
                let bytes = counters
                    .fetched_bytes
                    .load(std::sync::atomic::Ordering::SeqCst)
                    + counters
                        .cached_bytes
                        .load(std::sync::atomic::Ordering::SeqCst);
                let _ = first_line.set((ms(started), bytes));
            }
        });
    }
    vmboot::terminate_on_signals(vm.controller())?;
    let vcpus_ms = ms(started);
    phases.push(("vCPUs start", vcpus_ms));
    if a.json {
        let mut extra = serde_json::Map::new();
        extra.insert("memory".into(), info.memory_path.into());
        extra.insert(
            "disk_chunks_pending".into(),
            vm.controller().disk_chunks_pending().into(),
        );
        extra.insert("reference".into(), r.clone().into());
        extra.insert("digest".into(), local.digest().into());
        extra.insert(
            "root_digest".into(),
            format!("sha256:{}", hex::encode(local.root_digest())).into(),
        );
        extra.insert(
            "steps".into(),
            serde_json::Value::Array(
                phases
                    .iter()
                    .map(|(n, t)| serde_json::json!({"step": n, "ms": t}))
                    .collect(),
            ),
        );
        print_restore_json(sock.as_deref(), vcpus_ms, extra);
    }
    if !a.quiet {
        let steps: Vec<String> = phases.iter().map(|(n, t)| format!("{n} {t:.1}")).collect();
        eprintln!(
            "vmpack: {r}: steps (ms after the command): {}",
            steps.join(", ")
        );
    }
    let reason = vm.run()?;
    if reason.code != 0 {
        eprintln!(
            "vmpack: {r}: {} (exit status {})",
            reason.message, reason.code
        );
    }
    if !a.quiet {
        eprintln!("vmpack: {r}: {}", counters.summary());
        // A chain's parents count their own chunks (the lines above are the child's).
        for p in &parents {
            eprintln!(
                "vmpack: {r}: parent pack {}: {}",
                p.digest(),
                p.fetch.counters.summary()
            );
        }
        let mut t = format!("vCPUs started {vcpus_ms:.1} ms after the command");
        if let Some((at, bytes)) = first_line.get() {
            t += &format!(
                "; first serial line at {at:.1} ms, {} of chunks fetched or read from the cache by then",
                human_bytes(*bytes)
            );
        }
        eprintln!("vmpack: {r}: {t}");
    }
    Ok(reason.code)
}
