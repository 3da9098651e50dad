//! libvirt domain XML (`virsh define`): export writes a folder with `domain.xml`, the disks
//! and the boot files; import reads a domain XML whose files lie in its own folder.

use std::path::Path;

use super::xml::{self, attr, child, child_text, Writer};
use super::{
    copy_to_file, err, read_text, resolve_inside, write_disk, ExportVm, ImportedDisk, ImportedFile,
    ImportedVm, Result, MAX_DISKS,
};
use crate::config::{CpuTemplate, DiskFormat};
use crate::pack::{FileSource, Progress};

/// Name of the domain definition in an exported folder.
pub const DOMAIN_FILE: &str = "domain.xml";
/// Serial console log that libvirt's virtlogd writes, in the exported folder.
pub const SERIAL_LOG: &str = "serial.log";
/// CPU model named for the baseline template (QEMU's generic x86-64 model).
pub const BASELINE_MODEL: &str = "qemu64";

/// QEMU's named CPU model closest to each x86-64 level (QEMU has no models named after
/// the levels): the oldest CPU generation that has every feature of the level.
const LEVEL_MODELS: [(CpuTemplate, &str); 4] = [
    (CpuTemplate::Baseline, BASELINE_MODEL),
    (CpuTemplate::V2, "Nehalem"),
    (CpuTemplate::V3, "Haswell-noTSX"),
    (CpuTemplate::V4, "Skylake-Server-noTSX-IBRS"),
];

/// The libvirt CPU model exported for a named template other than `host`.
pub fn model_for(t: &CpuTemplate) -> &'static str {
    LEVEL_MODELS
        .iter()
        .find(|(l, _)| l == t)
        .map_or(BASELINE_MODEL, |(_, m)| m)
}

/// The template a libvirt CPU model is imported as, for the models [`model_for`] writes.
pub fn template_for(model: &str) -> Option<CpuTemplate> {
    LEVEL_MODELS
        .iter()
        .find(|(_, m)| *m == model)
        .map(|(t, _)| t.clone())
}

/// Options of `--format libvirt`.
#[derive(Clone, Copy, Debug)]
pub struct ExportOptions {
    /// Format of the disk images (qcow2 by default).
    pub disk_format: DiskFormat,
}

/// What an export wrote.
pub struct Exported {
    pub files: Vec<String>,
    pub domain_xml: String,
}

/// Writes `dir/domain.xml`, the disks and boot files. `final_dir` is where `dir` will be
/// renamed to: libvirt needs absolute paths, so the XML names files there.
pub fn export(
    vm: &ExportVm<'_>,
    dir: &Path,
    final_dir: &Path,
    opts: ExportOptions,
    progress: &dyn Progress,
) -> Result<Exported> {
    let mut files = Vec::new();
    let mut kernel = None;
    let mut initrd = None;
    if let Some(k) = vm.kernel {
        copy_to_file(k, &dir.join(&vm.kernel_name), progress)?;
        files.push(vm.kernel_name.clone());
        kernel = Some(final_dir.join(&vm.kernel_name));
    }
    if let Some(i) = vm.initrd {
        copy_to_file(i, &dir.join(&vm.initrd_name), progress)?;
        files.push(vm.initrd_name.clone());
        initrd = Some(final_dir.join(&vm.initrd_name));
    }
    let mut disks = Vec::new();
    for d in &vm.disks {
        let name = write_disk(dir, d, opts.disk_format, progress)?;
        disks.push((final_dir.join(&name), d.read_only));
        files.push(name);
    }
    let mut w = Writer::new();
    w.open("domain", &[("type", "kvm")]);
    w.leaf("name", &[], Some(&vm.name));
    w.leaf(
        "memory",
        &[("unit", "MiB")],
        Some(&vm.memory_mib.to_string()),
    );
    w.leaf("vcpu", &[], Some(&vm.vcpus.to_string()));
    match &vm.cpu_template {
        CpuTemplate::Host => {
            w.leaf("cpu", &[("mode", "host-passthrough")], None);
        }
        t => {
            w.open(
                "cpu",
                &[("mode", "custom"), ("match", "exact"), ("check", "none")],
            );
            w.leaf("model", &[("fallback", "allow")], Some(model_for(t)));
            w.close();
        }
    }
    w.open("os", &[]);
    w.leaf(
        "type",
        &[("arch", "x86_64"), ("machine", "pc")],
        Some("hvm"),
    );
    if let Some(k) = &kernel {
        w.leaf("kernel", &[], Some(&k.to_string_lossy()));
        if let Some(i) = &initrd {
            w.leaf("initrd", &[], Some(&i.to_string_lossy()));
        }
        w.leaf("cmdline", &[], Some(&vm.cmdline));
    } else {
        w.leaf("boot", &[("dev", "hd")], None);
    }
    w.close();
    w.open("features", &[])
        .leaf("acpi", &[], None)
        .leaf("apic", &[], None)
        .close();
    w.leaf("clock", &[("offset", "utc")], None);
    // vmboot ends the VM when the guest resets; keep that meaning.
    w.leaf("on_poweroff", &[], Some("destroy"));
    w.leaf("on_reboot", &[], Some("destroy"));
    w.leaf("on_crash", &[], Some("destroy"));
    w.open("devices", &[]);
    for (i, (path, ro)) in disks.iter().enumerate() {
        w.open("disk", &[("type", "file"), ("device", "disk")]);
        let t = opts.disk_format.to_string();
        w.leaf("driver", &[("name", "qemu"), ("type", &t)], None);
        w.leaf("source", &[("file", &path.to_string_lossy())], None);
        w.leaf("target", &[("dev", &vd_name(i)), ("bus", "virtio")], None);
        if *ro {
            w.leaf("readonly", &[], None);
        }
        w.close();
    }
    let log = final_dir.join(SERIAL_LOG);
    w.open("serial", &[("type", "pty")]);
    w.leaf(
        "log",
        &[("file", &log.to_string_lossy()), ("append", "off")],
        None,
    );
    w.leaf("target", &[("port", "0")], None);
    w.close();
    w.open("console", &[("type", "pty")]);
    w.leaf("target", &[("type", "serial"), ("port", "0")], None);
    w.close();
    w.close();
    let text = w.finish();
    std::fs::write(dir.join(DOMAIN_FILE), &text).map_err(super::io_err(DOMAIN_FILE))?;
    files.push(DOMAIN_FILE.to_string());
    Ok(Exported {
        files,
        domain_xml: text,
    })
}

/// `vda`, `vdb`, … `vdz`, `vdaa`, …
fn vd_name(i: usize) -> String {
    let mut n = i;
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    s.reverse();
    format!("vd{}", String::from_utf8(s).expect("ascii"))
}

fn unit_bytes(unit: &str) -> Option<u64> {
    Some(match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "K" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    })
}

/// Elements of `<domain>` that carry nothing a pack needs or that are host-side only.
const QUIET_DOMAIN: &[&str] = &[
    "name",
    "uuid",
    "title",
    "description",
    "metadata",
    "memory",
    "currentMemory",
    "maxMemory",
    "vcpu",
    "vcpus",
    "cpu",
    "os",
    "features",
    "clock",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "on_lockfailure",
    "pm",
    "devices",
    "seclabel",
    "resource",
    "sysinfo",
    "genid",
];

/// Devices that every libvirt domain gets implicitly and that a pack has no use for.
const QUIET_DEVICES: &[&str] = &["emulator", "controller", "memballoon", "console", "audio"];

/// Reads a domain XML. Disk images, kernel and initrd must lie in the XML's folder; host
/// devices are refused. Devices vmboot does not have are listed in `dropped`, or refused
/// when `strict`.
pub fn import(path: &Path, strict: bool) -> Result<ImportedVm> {
    let label = path.display().to_string();
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let text = read_text(path)?;
    let doc = xml::parse(&text, &label)?;
    let dom = doc.root_element();
    if dom.tag_name().name() != "domain" {
        return Err(err(
            &label,
            format!("root element <{}> is not <domain>", dom.tag_name().name()),
        ));
    }
    match attr(dom, "type") {
        Some("kvm") | Some("qemu") | None => {}
        Some(t) => {
            return Err(err(
                &label,
                format!("domain type '{t}': only kvm and qemu domains can be imported"),
            ))
        }
    }
    let name = child_text(dom, "name").unwrap_or("imported");
    let mut vm = ImportedVm::new(name);
    let mut dropped: Vec<String> = Vec::new();

    let mem = child(dom, "memory").ok_or_else(|| err(&label, "<memory> is missing"))?;
    let unit = attr(mem, "unit").unwrap_or("KiB");
    let value: u64 = mem
        .text()
        .map(str::trim)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| err(&label, "<memory>: not a number"))?;
    let ub = unit_bytes(unit)
        .ok_or_else(|| err(&label, format!("<memory unit='{unit}'>: unknown unit")))?;
    vm.memory_mib =
        Some(super::to_mib(value, ub).ok_or_else(|| err(&label, "<memory>: too large"))?);
    if let Some(v) = child(dom, "vcpu") {
        vm.vcpus = v
            .text()
            .map(str::trim)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| err(&label, "<vcpu>: not a number"))?;
    }
    if let Some(cpu) = child(dom, "cpu") {
        match attr(cpu, "mode").unwrap_or("custom") {
            "host-passthrough" | "host-model" | "maximum" => vm.cpu_template = CpuTemplate::Host,
            _ => {
                let model = child_text(cpu, "model").unwrap_or("(none)");
                vm.cpu_template = template_for(model).unwrap_or(CpuTemplate::Baseline);
                if template_for(model).is_none() {
                    dropped.push(format!(
                        "CPU model '{model}': mapped to the baseline template"
                    ));
                }
            }
        }
        if child(cpu, "topology").is_some() || child(cpu, "numa").is_some() {
            dropped.push("CPU topology/NUMA layout: the pack has flat vCPUs".into());
        }
    }
    let mut kernel_path = None;
    let mut initrd_path = None;
    if let Some(os) = child(dom, "os") {
        if let Some(t) = child_text(os, "type") {
            if t != "hvm" {
                return Err(err(
                    &label,
                    format!("<os><type>{t}</type>: only hvm guests can be imported"),
                ));
            }
        }
        if let Some(k) = child_text(os, "kernel") {
            kernel_path = Some(resolve_inside(base, k, &format!("{label}: <os><kernel>"))?);
        }
        if let Some(i) = child_text(os, "initrd") {
            initrd_path = Some(resolve_inside(base, i, &format!("{label}: <os><initrd>"))?);
        }
        vm.cmdline = child_text(os, "cmdline").unwrap_or("").to_string();
        if child(os, "loader").is_some() {
            dropped
                .push("firmware <loader> (UEFI/custom BIOS): vmboot boots kernels directly".into());
        }
    }
    for c in dom.children().filter(|c| c.is_element()) {
        let n = c.tag_name().name();
        if !QUIET_DOMAIN.contains(&n) {
            dropped.push(format!("domain setting <{n}>"));
        }
    }

    let devices = child(dom, "devices");
    let mut serials = 0;
    for d in devices
        .iter()
        .flat_map(|d| d.children())
        .filter(|c| c.is_element())
    {
        let n = d.tag_name().name();
        match n {
            "disk" => {
                let dtype = attr(d, "type").unwrap_or("file");
                let device = attr(d, "device").unwrap_or("disk");
                let target = child(d, "target")
                    .and_then(|t| attr(t, "dev"))
                    .unwrap_or("?");
                let source = child(d, "source");
                if matches!(dtype, "block" | "dir" | "nvme" | "vhostuser") {
                    let what = source
                        .and_then(|s| attr(s, "dev").or(attr(s, "dir")).or(attr(s, "file")))
                        .unwrap_or("?");
                    return Err(err(
                        &label,
                        format!("disk {target} is host {dtype} '{what}': refused (only image files inside the XML's folder are imported)"),
                    ));
                }
                if device != "disk" {
                    dropped.push(format!("{device} {target}"));
                    continue;
                }
                if dtype != "file" {
                    dropped.push(format!(
                        "disk {target} of type '{dtype}' (only file disks are imported)"
                    ));
                    continue;
                }
                let file = source.and_then(|s| attr(s, "file")).ok_or_else(|| {
                    err(
                        &label,
                        format!("disk {target}: <source file=...> is missing"),
                    )
                })?;
                let driver = child(d, "driver")
                    .and_then(|dr| attr(dr, "type"))
                    .unwrap_or("raw");
                let fmt = match driver {
                    "raw" => DiskFormat::Raw,
                    // Decoded by vmpack's VMDK reader; the pack keeps it as qcow2.
                    "qcow2" | "vmdk" => DiskFormat::Qcow2,
                    other => {
                        return Err(err(
                            &label,
                            format!("disk {target}: format '{other}' (raw, qcow2 and sparse VMDK are imported)"),
                        ))
                    }
                };
                if child(d, "backingStore").is_some_and(|b| b.has_children()) {
                    return Err(err(
                        &label,
                        format!("disk {target} has a backing chain; flatten it first"),
                    ));
                }
                let p = resolve_inside(base, file, &format!("{label}: disk {target}"))?;
                if vm.disks.len() >= MAX_DISKS {
                    return Err(err(&label, format!("more than {MAX_DISKS} disks")));
                }
                let stem = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                vm.disks.push(ImportedDisk {
                    name: stem,
                    format: fmt,
                    read_only: child(d, "readonly").is_some(),
                    source: if driver == "vmdk" {
                        let label = p.display().to_string();
                        let f = std::fs::File::open(&p).map_err(super::io_err(&label))?;
                        let slice =
                            super::vmdk::FileSlice::whole(f).map_err(super::io_err(&label))?;
                        Box::new(
                            super::vmdk::VmdkReader::open(slice)
                                .map_err(|e| err(&label, e.to_string()))?,
                        )
                    } else {
                        super::open_named_disk(&p, fmt)?
                    },
                });
            }
            "hostdev" => {
                return Err(err(
                    &label,
                    "<hostdev> passes a host device through: refused",
                ))
            }
            "serial" => {
                if attr(d, "type") == Some("dev") {
                    let p = child(d, "source")
                        .and_then(|s| attr(s, "path"))
                        .unwrap_or("?");
                    return Err(err(
                        &label,
                        format!("serial port on host device '{p}': refused"),
                    ));
                }
                serials += 1;
                if serials > 1 {
                    dropped.push("serial port beyond the first".into());
                }
            }
            "filesystem" => {
                return Err(err(
                    &label,
                    "<filesystem> shares a host folder with the guest: refused",
                ))
            }
            "input" if attr(d, "bus") == Some("ps2") => {}
            n if QUIET_DEVICES.contains(&n) => {}
            other => {
                let t = attr(d, "type")
                    .or(attr(d, "model"))
                    .map(|t| format!(" ({t})"))
                    .unwrap_or_default();
                dropped.push(format!("<{other}>{t}"));
            }
        }
    }
    let stems = super::unique_stems(vm.disks.iter().map(|d| d.name.as_str()));
    for (d, s) in vm.disks.iter_mut().zip(stems) {
        d.name = format!("{s}.{}", super::ext(d.format));
    }
    if let Some(k) = kernel_path {
        vm.kernel = Some(ImportedFile {
            name: file_name(&k, "vmlinuz"),
            source: Box::new(FileSource::open(&k).map_err(super::io_err(k.display()))?),
        });
    }
    if let Some(i) = initrd_path {
        vm.initrd = Some(ImportedFile {
            name: file_name(&i, "initrd.img"),
            source: Box::new(FileSource::open(&i).map_err(super::io_err(i.display()))?),
        });
    }
    if strict && !dropped.is_empty() {
        return Err(err(
            &label,
            format!(
                "--strict: not carried into the pack: {}",
                dropped.join("; ")
            ),
        ));
    }
    vm.dropped = dropped;
    Ok(vm)
}

fn file_name(p: &Path, fallback: &str) -> String {
    p.file_name()
        .and_then(|n| n.to_str())
        .filter(|n| crate::vm::is_safe_name(n))
        .unwrap_or(fallback)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_names() {
        assert_eq!(vd_name(0), "vda");
        assert_eq!(vd_name(25), "vdz");
        assert_eq!(vd_name(26), "vdaa");
    }

    #[test]
    fn import_refuses_host_devices_and_outside_files() {
        let t = tempfile::tempdir().unwrap();
        let x = t.path().join("d.xml");
        let dom = |devs: &str| {
            format!("<domain type='kvm'><name>x</name><memory unit='MiB'>64</memory><devices>{devs}</devices></domain>")
        };
        std::fs::write(&x, dom("<disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vda'/></disk>")).unwrap();
        let e = import(&x, false).err().unwrap().to_string();
        assert!(e.contains("/dev/sda") && e.contains("refused"), "{e}");
        std::fs::write(&x, dom("<disk type='file' device='disk'><source file='/etc/passwd'/><target dev='vda'/></disk>")).unwrap();
        let e = import(&x, false).err().unwrap().to_string();
        assert!(e.contains("outside the folder"), "{e}");
        std::fs::write(&x, dom("<hostdev mode='subsystem' type='pci'/>")).unwrap();
        assert!(import(&x, false)
            .err()
            .unwrap()
            .to_string()
            .contains("hostdev"));
        std::fs::write(&x, dom("<interface type='network'/><graphics type='vnc'/>")).unwrap();
        let vm = import(&x, false).unwrap();
        assert_eq!(vm.memory_mib, Some(64));
        assert_eq!(vm.dropped, ["<interface> (network)", "<graphics> (vnc)"]);
        let e = import(&x, true).err().unwrap().to_string();
        assert!(e.contains("--strict") && e.contains("<interface>"), "{e}");
    }
}
