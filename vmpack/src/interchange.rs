//! `vmpack export --format libvirt|vagrant|ova|firecracker` and `vmpack import` from those
//! ecosystems. The formats live in `vmpack_formats::interchange`; this module opens the
//! pack or the source, applies the command line and reports.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use vmpack_formats::config::{
    DiskConfig, DiskFormat, FlatBoot, KernelBoot, SerialConfig, VmConfig,
};
use vmpack_formats::interchange::{
    self as ic, firecracker, libvirt, ovf, vagrant, Detected, Ecosystem, ExportDisk, ExportVm,
    ImportedFile, ImportedVm,
};
use vmpack_formats::pack::{FileSource, SectionRange, SectionSource};
use vmpack_formats::vm::{PreparedPack, VmPack, VmPackPlan};

use crate::output::{AtomicDir, AtomicFile};
use crate::progress::Bar;
use crate::util::Usage;

/// Options of `vmpack export` that only some formats take.
pub struct ExportOpts {
    pub disk_format: Option<DiskFormat>,
    pub quiet: bool,
    pub json: bool,
}

fn saved_state_note(pack: &VmPack) -> Option<String> {
    pack.manifest().vmstate.as_ref().map(|_| {
        "the pack holds a saved run state (guest memory, vCPU and device state); it stays behind: \
         only the cold definition is exported (config, boot files, and the disks as they were at \
         the saved instant), because no other VMM can resume vmboot's saved KVM state, so the \
         exported VM boots afresh"
            .to_string()
    })
}

pub fn export(pack_path: &Path, eco: Ecosystem, out: &Path, o: &ExportOpts) -> Result<()> {
    export_inner(pack_path, eco, out, o).map_err(|e| {
        if e.downcast_ref::<Usage>().is_some() || e.to_string().starts_with("cannot export") {
            e
        } else {
            e.context(format!("cannot export the pack as {eco}"))
        }
    })
}

fn export_inner(pack_path: &Path, eco: Ecosystem, out: &Path, o: &ExportOpts) -> Result<()> {
    if o.disk_format.is_some() && eco != Ecosystem::Libvirt {
        return Err(Usage(format!(
            "--disk-format applies to --format libvirt only ({eco} disks are {})",
            match eco {
                Ecosystem::Vagrant => "qcow2",
                Ecosystem::Ova => "streamOptimized VMDK",
                _ => "raw",
            }
        ))
        .into());
    }
    if pack_path == Path::new("-") {
        return Err(Usage(format!(
            "--format {eco} reads a pack file, not standard input"
        ))
        .into());
    }
    let pack = VmPack::open(pack_path)?;
    let label = pack_path.display().to_string();
    let cfg = pack.config()?;
    let m = pack.manifest();
    if cfg.kernel.is_none() {
        bail!(
            "cannot export the pack: {label}: it boots a flat image, which {eco} cannot express (it boots Linux kernels or disks); use --format raw or qcow2"
        );
    }
    let range = |role: &str| -> Result<Option<SectionRange<'_>>> {
        match m.file(role) {
            Some(e) => Ok(Some(pack.boot_file_range(e)?)),
            None => Ok(None),
        }
    };
    let kernel = range("kernel")?;
    let initrd = range("initrd")?;
    let mut disk_ranges = Vec::new();
    for d in &m.disks {
        let s = pack
            .reader()
            .section(&d.section)
            .with_context(|| format!("{label}: section '{}': missing from the pack", d.section))?;
        disk_ranges.push(SectionRange::whole(pack.reader(), s.id));
    }
    let stems = ic::unique_stems(
        m.disks
            .iter()
            .map(|d| d.name.rsplit_once('.').map_or(d.name.as_str(), |(s, _)| s)),
    );
    let vm = ExportVm {
        name: ic::sanitize_name(&cfg.name),
        vcpus: cfg.vcpus,
        memory_mib: cfg.memory_mib,
        cpu_template: cfg.cpu_template,
        kernel: kernel.as_ref().map(|k| k as &dyn SectionSource),
        initrd: initrd.as_ref().map(|k| k as &dyn SectionSource),
        kernel_name: ic::boot_file_name(m.file("kernel").map(|f| f.name.as_str()), "vmlinuz"),
        initrd_name: ic::boot_file_name(m.file("initrd").map(|f| f.name.as_str()), "initrd.img"),
        cmdline: cfg
            .kernel
            .as_ref()
            .map(|k| k.cmdline.clone())
            .unwrap_or_default(),
        disks: m
            .disks
            .iter()
            .zip(&disk_ranges)
            .zip(stems)
            .map(|((d, r), stem)| ExportDisk {
                stem,
                source: r,
                read_only: d.read_only,
            })
            .collect(),
    };
    let total: u64 = vm.disks.iter().map(|d| d.source.len()).sum();
    let bar = Bar::new(Some(total), "exporting", o.quiet || o.json);
    let mut notes: Vec<String> = saved_state_note(&pack).into_iter().collect();
    if eco == Ecosystem::Vagrant {
        for d in vm.disks.iter().filter(|d| d.read_only) {
            notes.push(format!(
                "disk '{}' is read-only in the pack; vagrant-libvirt boxes have no read-only disks, so it is exported writable",
                d.stem
            ));
        }
    }
    let (files, next): (Vec<String>, String) = match eco {
        Ecosystem::Libvirt | Ecosystem::Firecracker => {
            let dir = AtomicDir::create(out)?;
            let final_dir = absolute_target(out)?;
            let files = if eco == Ecosystem::Libvirt {
                let opts = libvirt::ExportOptions {
                    disk_format: o.disk_format.unwrap_or(DiskFormat::Qcow2),
                };
                libvirt::export(&vm, dir.path(), &final_dir, opts, &bar)?.files
            } else {
                let e = firecracker::export(&vm, dir.path(), &bar)?;
                if e.extracted_elf {
                    notes.push("the kernel was a bzImage: its ELF vmlinux was extracted (Firecracker loads ELF kernels only)".into());
                }
                if vm.cpu_template != vmpack_formats::config::CpuTemplate::Host {
                    notes.push(format!("the {} CPU template has no Firecracker equivalent (its templates are vendor-specific); none is set", vm.cpu_template));
                }
                e.files
            };
            dir.commit()?;
            let next = if eco == Ecosystem::Libvirt {
                format!(
                    "virsh define {}",
                    final_dir.join(libvirt::DOMAIN_FILE).display()
                )
            } else {
                format!(
                    "cd {} && firecracker --no-api --config-file {}",
                    final_dir.display(),
                    firecracker::CONFIG_FILE
                )
            };
            (files, next)
        }
        Ecosystem::Vagrant | Ecosystem::Ova => {
            let mut f = AtomicFile::create(out)?;
            if f.is_special() {
                bail!(
                    "{}: not a regular file; the {eco} archive is written with seeks (member headers are patched after the data), so write it to a file",
                    out.display()
                );
            }
            let mtime = m.created_unix;
            let files = if eco == Ecosystem::Ova {
                let base = vm.name.clone();
                // OVF 1.0: what VirtualBox, VMware and virt-v2v all read (virt-v2v does not
                // read the 2.0 namespace); import takes both.
                let s =
                    ovf::export_ova(&vm, &mut *f.file(), &base, ovf::OvfVersion::V1, mtime, &bar)?;
                s.members
                    .into_iter()
                    .map(|(n, _)| n)
                    .chain([format!("{base}.mf")])
                    .collect()
            } else {
                let parent = parent_dir(out);
                let scratch = tempfile::Builder::new()
                    .prefix(".vmpack-export-")
                    .tempdir_in(&parent)
                    .with_context(|| {
                        format!("creating a scratch folder in {}", parent.display())
                    })?;
                vagrant::export_box(&vm, &mut *f.file(), scratch.path(), mtime, &bar)?
            };
            f.commit()?;
            let next = if eco == Ecosystem::Ova {
                format!(
                    "virt-v2v -i ova {} (or import it in VirtualBox/VMware)",
                    out.display()
                )
            } else {
                format!("vagrant box add --name {} {}", vm.name, out.display())
            };
            (files, next)
        }
    };
    bar.finish();
    if o.json {
        let js = serde_json::json!({
            "format": eco.to_string(),
            "output": out,
            "files": files,
            "notes": notes,
            "next": next,
        });
        crate::outln!("{}", serde_json::to_string_pretty(&js)?);
    } else if !o.quiet {
        for n in &notes {
            eprintln!("vmpack: note: {n}");
        }
        crate::outln!(
            "exported '{}' as {eco} to {}: {}; next: {next}",
            vm.name,
            out.display(),
            files.join(", ")
        );
    }
    Ok(())
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The absolute path `out` will have once created (its parent exists).
fn absolute_target(out: &Path) -> Result<PathBuf> {
    let parent = parent_dir(out);
    let parent = parent
        .canonicalize()
        .with_context(|| format!("{}: no such folder", parent.display()))?;
    let name = out
        .file_name()
        .with_context(|| format!("{}: not a folder name", out.display()))?;
    Ok(parent.join(name))
}

/// What `vmpack import` was given besides the source.
pub struct ImportOpts {
    pub from: Option<String>,
    pub memory: Option<u64>,
    pub vcpus: Option<u32>,
    pub name: Option<String>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub flat: Option<FlatBoot>,
    pub read_only: bool,
    pub strict: bool,
    pub json: bool,
}

fn detect(src: &Path, from: Option<&str>) -> Result<Detected> {
    Ok(match from {
        None | Some("auto") => ic::detect(src)?,
        Some("libvirt") => Detected::Libvirt,
        Some("vagrant") => Detected::Vagrant,
        Some("ova") | Some("ovf") => {
            if ic::detect(src)? == Detected::Ova {
                Detected::Ova
            } else {
                Detected::Ovf
            }
        }
        Some("firecracker") => Detected::Firecracker,
        Some("disk") => Detected::DiskImage,
        Some(other) => {
            return Err(Usage(format!(
                "--from {other}: expected auto, libvirt, vagrant, ova, ovf, firecracker or disk"
            ))
            .into())
        }
    })
}

/// Reads an ecosystem's files into a config plus sources, applying the options. `None` for
/// a plain disk image (handled by the existing import).
pub fn read_source(
    src: &Path,
    o: &ImportOpts,
    out: &Path,
) -> Result<Option<(ImportedVm, &'static str)>> {
    let kind = detect(src, o.from.as_deref())?;
    let label = src.display().to_string();
    let (vm, what) = match kind {
        Detected::DiskImage => {
            if o.strict {
                return Err(Usage("--strict applies to libvirt, Vagrant, OVA/OVF and Firecracker sources, not to a disk image".into()).into());
            }
            return Ok(None);
        }
        Detected::Libvirt => (libvirt::import(src, o.strict), "libvirt domain"),
        Detected::Ova => (ovf::import(src, o.strict), "OVA"),
        Detected::Ovf => (ovf::import(src, o.strict), "OVF"),
        Detected::Firecracker => (firecracker::import(src, o.strict), "Firecracker config"),
        Detected::Vagrant => (
            vagrant::import(src, &parent_dir(out), o.strict),
            "Vagrant box",
        ),
    };
    let vm = vm.with_context(|| format!("cannot import the {what}"))?;
    let _ = label;
    Ok(Some((vm, what)))
}

pub fn import(src: &Path, o: ImportOpts, w: &crate::pack::WriteArgs) -> Result<bool> {
    if o.json && w.output == Path::new("-") {
        return Err(Usage("--json and -o - would both write to standard output".into()).into());
    }
    let Some((mut vm, what)) = read_source(src, &o, &w.output)? else {
        return Ok(false);
    };
    let label = src.display().to_string();
    if let Some(m) = o.memory {
        vm.memory_mib = Some(m);
    }
    if let Some(v) = o.vcpus {
        vm.vcpus = v;
    }
    if let Some(n) = &o.name {
        vm.name = n.clone();
    }
    if o.read_only {
        for d in &mut vm.disks {
            d.read_only = true;
        }
    }
    let host_file = |p: &Path, fallback: &str| -> Result<ImportedFile> {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| vmpack_formats::vm::is_safe_name(n))
            .unwrap_or(fallback)
            .to_string();
        Ok(ImportedFile {
            name,
            source: Box::new(FileSource::open(p).with_context(|| p.display().to_string())?),
        })
    };
    if let Some(k) = &o.kernel {
        vm.kernel = Some(host_file(k, "vmlinuz")?);
        vm.initrd = None;
        vm.cmdline = o.cmdline.clone().unwrap_or_default();
    }
    if let Some(i) = &o.initrd {
        vm.initrd = Some(host_file(i, "initrd.img")?);
    }
    if let (Some(c), None) = (&o.cmdline, &o.kernel) {
        vm.cmdline = c.clone();
    }
    let flat_image = match &o.flat {
        Some(f) => {
            vm.kernel = None;
            vm.initrd = None;
            Some((host_file(&f.image, "image.bin")?, f.clone()))
        }
        None => None,
    };
    if vm.kernel.is_none() && flat_image.is_none() {
        bail!(
            "cannot import the {what}: {label}: it boots from its disk through firmware (BIOS/UEFI), which vmboot does not do; pass --kernel PATH [--initrd PATH] [--cmdline TEXT] to boot its disks with a Linux kernel"
        );
    }
    let memory = vm.memory_mib.with_context(|| {
        format!(
            "cannot import the {what}: {label}: it does not say how much memory; pass --memory MIB"
        )
    })?;
    let cfg = VmConfig {
        name: vm.name.clone(),
        vcpus: vm.vcpus,
        memory_mib: memory,
        cpu_template: vm.cpu_template.clone(),
        rng: false,
        vmgenid: false,
        nets: Vec::new(),
        flat: flat_image.as_ref().map(|(f, fb)| FlatBoot {
            image: PathBuf::from(&f.name),
            ..fb.clone()
        }),
        kernel: vm.kernel.as_ref().map(|k| KernelBoot {
            path: PathBuf::from(&k.name),
            initrd: vm.initrd.as_ref().map(|i| PathBuf::from(&i.name)),
            cmdline: vm.cmdline.clone(),
        }),
        disks: vm
            .disks
            .iter()
            .map(|d| DiskConfig {
                path: PathBuf::from(&d.name),
                format: d.format,
                read_only: d.read_only,
            })
            .collect(),
        serial: SerialConfig::default(),
        vsock: None,
    };
    crate::pack::validate_generated(&cfg)?;
    let mut files: Vec<(&'static str, &dyn SectionSource)> = Vec::new();
    if let Some(k) = &vm.kernel {
        files.push(("kernel", k.source.as_ref()));
    }
    if let Some(i) = &vm.initrd {
        files.push(("initrd", i.source.as_ref()));
    }
    if let Some((f, _)) = &flat_image {
        files.push(("image", f.source.as_ref()));
    }
    let plan = VmPackPlan {
        disks: Some(
            vm.disks
                .iter()
                .map(|d| d.source.as_ref() as &dyn SectionSource)
                .collect(),
        ),
        files: Some(files),
        ..Default::default()
    };
    let prepared = PreparedPack::new(&cfg, plan)?;
    let quiet = w.quiet || o.json;
    if !quiet {
        for d in &vm.dropped {
            eprintln!("vmpack: warning: {label}: not carried into the pack: {d}");
        }
    }
    let w2 = crate::pack::WriteArgs { quiet, ..w.clone() };
    crate::pack::write_prepared(&cfg, prepared, &w2)?;
    if o.json {
        let js = serde_json::json!({
            "source": label,
            "kind": what,
            "output": w.output,
            "name": cfg.name,
            "vcpus": cfg.vcpus,
            "memory_mib": cfg.memory_mib,
            "disks": vm.disks.iter().map(|d| serde_json::json!({"name": d.name, "format": d.format.to_string(), "virtual_size": d.source.len(), "read_only": d.read_only})).collect::<Vec<_>>(),
            "kernel": vm.kernel.as_ref().map(|k| k.name.clone()),
            "initrd": vm.initrd.as_ref().map(|k| k.name.clone()),
            "cmdline": vm.cmdline,
            "dropped": vm.dropped,
        });
        crate::outln!("{}", serde_json::to_string_pretty(&js)?);
    }
    drop(vm);
    Ok(true)
}

/// Parses `--format` of `vmpack export`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    Disk(DiskFormat),
    Eco(Ecosystem),
}

impl std::str::FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "raw" => ExportFormat::Disk(DiskFormat::Raw),
            "qcow2" => ExportFormat::Disk(DiskFormat::Qcow2),
            "libvirt" => ExportFormat::Eco(Ecosystem::Libvirt),
            "vagrant" => ExportFormat::Eco(Ecosystem::Vagrant),
            "ova" => ExportFormat::Eco(Ecosystem::Ova),
            "firecracker" => ExportFormat::Eco(Ecosystem::Firecracker),
            _ => {
                return Err(format!(
                    "'{s}': expected raw, qcow2, libvirt, vagrant, ova or firecracker"
                ))
            }
        })
    }
}
