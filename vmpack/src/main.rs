//! `vmpack`: pack a VM into one portable file, inspect, verify and unpack it.
//!
//! Each command lives in its own module and only parses arguments, calls the
//! `vmpack_formats` library and reports; exit status 0 on success, 1 on any error
//! (printed to stderr), 2 on bad usage.

mod anyhost;
mod bench;
mod environment;
mod flatten;
mod identity;
mod inspect;
mod interchange;
mod output;
mod pack;
mod progress;
mod registry_cmd;
mod remote;
mod sign;
mod test_cmd;
mod unpack;
mod util;
mod verify;
mod vm;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vmpack",
    version,
    about = "Pack a virtual machine into one portable .vmpack file"
)]
struct Cli {
    /// Let an output replace an existing file whose permissions deny you writing it (the
    /// new file keeps the old one's mode). Never replaces a symbolic link or writes through one.
    #[arg(long, global = true)]
    force: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pack the VM a config describes (boot files and disks) into one file.
    Pack(pack::PackArgs),
    /// Pack a VM from another ecosystem (libvirt, Vagrant, OVA/OVF, Firecracker) or a disk image.
    Import(pack::ImportArgs),
    /// Show a pack's metadata, config and sections.
    Inspect(inspect::InspectArgs),
    /// Check every chunk and the index of a pack.
    Verify(verify::VerifyArgs),
    /// Unpack a pack into a folder (config, boot files, disks in their original format).
    Unpack(unpack::UnpackArgs),
    /// Export a pack as raw/qcow2 disks or for libvirt, Vagrant, OVA or Firecracker.
    Export(unpack::ExportArgs),
    /// Measure packing speed and ratio against standard tools.
    Bench(bench::pack::BenchArgs),
    /// Measure save/restore of Linux guests (pause, pack size, restore latency) against QEMU.
    BenchSnapshot(bench::snapshot::BenchSnapshotArgs),
    /// Boot a config, a pack, or (with no argument) the built-in counter sample.
    Run(vm::RunArgs),
    /// Save a running VM (through its control socket) into one pack.
    Save(vm::SaveArgs),
    /// Resume a saved VM from a pack, in this process.
    Restore(vm::RestoreArgs),
    /// Make a diff pack (`save --diff-from`) and its parents, or a live save's pack (base and
    /// overlays), into one ordinary full pack.
    Flatten(flatten::FlattenArgs),
    /// Measure clone restore latency and memory against booting the same guest.
    BenchClones(bench::clones::BenchClonesArgs),
    /// Run test cases against a saved VM, each in a fresh clone (see docs/TESTING.md).
    Test(test_cmd::TestArgs),
    /// Push a pack to an OCI registry (only the chunks the registry lacks are uploaded).
    Push(registry_cmd::PushArgs),
    /// Pull a pack from an OCI registry (only the chunks the local cache lacks are fetched).
    Pull(registry_cmd::PullArgs),
    /// List or prune the local chunk cache.
    Cache(registry_cmd::CacheArgs),
    /// Measure what chunk sizes make a second push of a changed guest send to a registry.
    BenchRegistry(bench::registry::BenchRegistryArgs),
    /// Print this host's fingerprint (CPU, KVM CPUID, MSRs, capabilities, TSC) for `compat` and `template`.
    HostInfo(anyhost::HostInfoArgs),
    /// Tell whether a saved pack resumes on this host or on fingerprinted hosts: ok, ok with warnings, refused.
    Compat(anyhost::CompatArgs),
    /// The CPU a fleet shares: `--level` (highest x86-64 level) or `--fit` (a template file).
    Template(anyhost::TemplateArgs),
    /// Sign a pack's root digest with an SSH key (the signature is kept in the pack).
    Sign(sign::SignArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(CompletionsArgs),
    /// Write the manual pages (vmpack.1 and one per command) into a folder.
    Man(ManArgs),
}

#[derive(clap::Args)]
struct CompletionsArgs {
    /// The shell the script is for.
    shell: clap_complete::Shell,
    /// Accepted for uniformity; the script is the only output.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(clap::Args)]
struct ManArgs {
    /// Folder to write the pages into (created if missing).
    #[arg(short, long, value_name = "DIR")]
    output: std::path::PathBuf,
    /// Print nothing on success.
    #[arg(long, short)]
    quiet: bool,
}

fn completions(a: CompletionsArgs) -> anyhow::Result<()> {
    let _ = a.quiet;
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut Cli::command(), "vmpack", &mut buf);
    crate::out!("{}", String::from_utf8_lossy(&buf));
    Ok(())
}

fn man(a: ManArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(&a.output).with_context(|| a.output.display().to_string())?;
    let mut pages = 0;
    let root = Cli::command();
    let mut cmds = vec![(String::from("vmpack"), root.clone())];
    for sub in root.get_subcommands() {
        cmds.push((format!("vmpack-{}", sub.get_name()), sub.clone()));
    }
    for (name, cmd) in cmds {
        let mut buf = Vec::new();
        // clap names are 'static; a handful of short strings for a process about to end.
        let static_name: &'static str = Box::leak(name.clone().into_boxed_str());
        let cmd = cmd.name(static_name).version(env!("CARGO_PKG_VERSION"));
        clap_mangen::Man::new(cmd)
            .render(&mut buf)
            .with_context(|| format!("rendering {name}"))?;
        let path = a.output.join(format!("{name}.1"));
        let mut f = output::AtomicFile::create(&path)?;
        std::io::Write::write_all(f.file(), &buf).with_context(|| path.display().to_string())?;
        f.commit()?;
        pages += 1;
    }
    if !a.quiet {
        crate::outln!("wrote {pages} manual pages to {}", a.output.display());
    }
    Ok(())
}

/// The vmboot library's warnings and errors (the `log` facade: the library prints nothing
/// itself), on stderr as vmpack's own.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        match r.level() {
            log::Level::Error => eprintln!("vmpack: {}", r.args()),
            log::Level::Warn => eprintln!("vmpack: warning: {}", r.args()),
            _ => {}
        }
    }
    fn flush(&self) {}
}

fn main() -> ExitCode {
    static LOG: StderrLog = StderrLog;
    if log::set_logger(&LOG).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    // The libraries read no environment (`environment.rs` does).
    vmboot::verified_cache::set_base_dir(crate::environment::cache_root());
    if let Some(n) = crate::environment::prefetch_threads() {
        vmboot::vstate::lazy::set_prefetch_threads(n);
    }
    let cli = Cli::parse();
    // Before any worker thread starts, so every thread inherits the blocked mask. Commands
    // that run a VM hand the signals to the VM instead, which ends cleanly: its control
    // sockets and work folders are removed, as `vmboot run` does.
    match &cli.command {
        Command::Run(_) | Command::Restore(_) => vmboot::block_exit_signals(),
        _ => output::install_signal_cleanup(),
    }
    output::set_force(cli.force);
    // A write past RLIMIT_FSIZE fails with EFBIG instead of killing the process, so a failed
    // save still removes its temporary and resumes the VM it paused.
    // SAFETY: setting a signal's disposition to ignore has no handler to be unsafe in.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // The first part of every error: what failed (docs/CLI.md's error shape).
    let what = match &cli.command {
        Command::Pack(_) => "cannot pack",
        Command::Import(_) => "cannot import",
        Command::Inspect(_) => "cannot inspect",
        Command::Verify(_) => "verification failed",
        Command::Unpack(_) => "cannot unpack",
        Command::Export(_) => "cannot export",
        Command::Run(_) => "cannot run",
        Command::Save(_) => "cannot save",
        Command::Restore(_) => "cannot restore",
        Command::Flatten(_) => "cannot flatten",
        Command::Test(_) => "cannot test",
        Command::Push(_) => "cannot push",
        Command::Pull(_) => "cannot pull",
        Command::Cache(_) => "cannot use the chunk cache",
        Command::Sign(_) => "cannot sign",
        Command::HostInfo(_) => "cannot fingerprint this host",
        Command::Compat(_) => "cannot check compatibility",
        Command::Template(_) => "cannot make a CPU template",
        Command::Completions(_) => "cannot write the completion script",
        Command::Man(_) => "cannot write the manual pages",
        Command::Bench(_)
        | Command::BenchSnapshot(_)
        | Command::BenchClones(_)
        | Command::BenchRegistry(_) => "benchmark failed",
    };
    let guest_status = |r: anyhow::Result<i32>| -> anyhow::Result<()> {
        let code = r?;
        if code != 0 {
            std::process::exit(code);
        }
        Ok(())
    };
    let exit_status = |r: anyhow::Result<u8>| -> anyhow::Result<()> {
        let code = r?;
        if code != 0 {
            std::process::exit(code.into());
        }
        Ok(())
    };
    let result = match cli.command {
        Command::Run(a) => guest_status(vm::run(a)),
        Command::Save(a) => vm::save(a),
        Command::Restore(a) => guest_status(vm::restore(a)),
        Command::Flatten(a) => flatten::run(a),
        Command::BenchClones(a) => {
            util::set_quiet(a.quiet);
            bench::clones::run(a)
        }
        Command::Test(a) => guest_status(test_cmd::run(a)),
        Command::Pack(a) => pack::run_pack(a),
        Command::Import(a) => pack::run_import(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Unpack(a) => unpack::run_unpack(a),
        Command::Export(a) => unpack::run_export(a),
        Command::Bench(a) => {
            util::set_quiet(a.quiet);
            bench::pack::run(a)
        }
        Command::BenchSnapshot(a) => {
            util::set_quiet(a.quiet);
            bench::snapshot::run(a)
        }
        Command::Push(a) => registry_cmd::run_push(a),
        Command::Pull(a) => registry_cmd::run_pull(a),
        Command::Cache(a) => registry_cmd::run_cache(a),
        Command::Sign(a) => sign::run_sign(a),
        Command::HostInfo(a) => anyhost::host_info(a),
        Command::Compat(a) => exit_status(anyhost::compat(a)),
        Command::Template(a) => exit_status(anyhost::template(a)),
        Command::BenchRegistry(a) => {
            util::set_quiet(a.quiet);
            bench::registry::run(a)
        }
        Command::Completions(a) => completions(a),
        Command::Man(a) => man(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Messages quote names from packs and configs: never a raw control character.
            let text = vmpack_formats::vm::printable_lines(&util::error_chain(&e));
            if e.downcast_ref::<util::Usage>().is_some() {
                eprintln!("vmpack: {text}");
                return ExitCode::from(2);
            }
            if text.starts_with("cannot ") || text.starts_with(what) {
                eprintln!("vmpack: {text}");
            } else {
                eprintln!("vmpack: {what}: {text}");
            }
            ExitCode::from(1)
        }
    }
}
