//! `vmpack`: pack a VM into one portable file, inspect, verify and unpack it.
//!
//! Each command lives in its own module and only parses arguments, calls the
//! `vmpack_formats` library and reports; exit status 0 on success, 1 on any error
//! (printed to stderr), 2 on bad usage.

mod bench;
mod bench_clones;
mod bench_registry;
mod bench_snapshot;
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

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vmpack",
    version,
    about = "Pack a virtual machine into one portable .vmpack file"
)]
struct Cli {
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
    Bench(bench::BenchArgs),
    /// Measure save/restore of Linux guests (pause, pack size, restore latency) against QEMU.
    BenchSnapshot(bench_snapshot::BenchSnapshotArgs),
    /// Boot a config, a pack, or (with no argument) the built-in counter sample.
    Run(vm::RunArgs),
    /// Save a running VM (through its control socket) into one pack.
    Save(vm::SaveArgs),
    /// Resume a saved VM from a pack, in this process.
    Restore(vm::RestoreArgs),
    /// Measure clone restore latency and memory against booting the same guest.
    BenchClones(bench_clones::BenchClonesArgs),
    /// Run test cases against a saved VM, each in a fresh clone (see docs/TESTING.md).
    Test(test_cmd::TestArgs),
    /// Push a pack to an OCI registry (only the chunks the registry lacks are uploaded).
    Push(registry_cmd::PushArgs),
    /// Pull a pack from an OCI registry (only the chunks the local cache lacks are fetched).
    Pull(registry_cmd::PullArgs),
    /// List or prune the local chunk cache.
    Cache(registry_cmd::CacheArgs),
    /// Measure what chunk sizes make a second push of a changed guest send to a registry.
    BenchRegistry(bench_registry::BenchRegistryArgs),
    /// Sign a pack's root digest with an SSH key (the signature is kept in the pack).
    Sign(sign::SignArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any worker thread starts, so every thread inherits the blocked mask.
    output::install_signal_cleanup();
    let guest_status = |r: anyhow::Result<i32>| -> anyhow::Result<()> {
        let code = r?;
        if code != 0 {
            std::process::exit(code);
        }
        Ok(())
    };
    let result = match cli.command {
        Command::Run(a) => guest_status(vm::run(a)),
        Command::Save(a) => vm::save(a),
        Command::Restore(a) => guest_status(vm::restore(a)),
        Command::BenchClones(a) => bench_clones::run(a),
        Command::Test(a) => guest_status(test_cmd::run(a)),
        Command::Pack(a) => pack::run_pack(a),
        Command::Import(a) => pack::run_import(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Unpack(a) => unpack::run_unpack(a),
        Command::Export(a) => unpack::run_export(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchSnapshot(a) => bench_snapshot::run(a),
        Command::Push(a) => registry_cmd::run_push(a),
        Command::Pull(a) => registry_cmd::run_pull(a),
        Command::Cache(a) => registry_cmd::run_cache(a),
        Command::Sign(a) => sign::run_sign(a),
        Command::BenchRegistry(a) => bench_registry::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmpack: {}", util::error_chain(&e));
            if e.downcast_ref::<util::Usage>().is_some() {
                return ExitCode::from(2);
            }
            ExitCode::from(1)
        }
    }
}
