//! Firecracker's `--config-file` JSON (`boot-source`, `drives`, `machine-config`), with
//! an ELF `vmlinux` (Firecracker on x86-64 refuses bzImages) and raw drives.
//!
//! Field names and rules follow Firecracker's API description (swagger `BootSource`,
//! `Drive`, `MachineConfiguration`): `kernel_image_path` is required; each drive needs
//! `drive_id`, `is_root_device`, and for virtio-block `path_on_host` and `is_read_only`;
//! `vcpu_count` is 1 or an even number up to 32. Paths are relative to the folder, which is
//! where Firecracker must be started (it resolves them against its working directory).

use std::path::Path;

use serde_json::{json, Value};

use super::{err, io_err, ExportVm, ImportedDisk, ImportedFile, ImportedVm, Result, MAX_DISKS};
use crate::config::{CpuTemplate, DiskFormat};
use crate::pack::{FileSource, Progress};

pub const CONFIG_FILE: &str = "vm.json";
pub const MAX_VCPUS: u32 = 32;

/// Checks what Firecracker would refuse, before anything is written.
pub fn check_exportable(vm: &ExportVm<'_>) -> std::result::Result<(), String> {
    if vm.kernel.is_none() {
        return Err(
            "Firecracker boots only a Linux kernel, and this pack boots a flat image".into(),
        );
    }
    if vm.vcpus > MAX_VCPUS || (vm.vcpus > 1 && vm.vcpus % 2 == 1) {
        return Err(format!(
            "{} vCPUs: Firecracker accepts 1 or an even number up to {MAX_VCPUS}",
            vm.vcpus
        ));
    }
    Ok(())
}

/// The config JSON for an export whose files are `disks` (file name, read-only).
pub fn config_json(vm: &ExportVm<'_>, initrd: bool, disks: &[(String, String, bool)]) -> Value {
    let mut boot = json!({
        "kernel_image_path": "vmlinux",
        "boot_args": vm.cmdline,
    });
    if initrd {
        boot["initrd_path"] = json!("initrd.img");
    }
    json!({
        "boot-source": boot,
        "drives": disks.iter().map(|(id, path, ro)| json!({
            "drive_id": id,
            "path_on_host": path,
            // The pack's command line already says which disk is the root; Firecracker
            // would add its own root= for a root device.
            "is_root_device": false,
            "is_read_only": ro,
        })).collect::<Vec<_>>(),
        "machine-config": {
            "vcpu_count": vm.vcpus,
            "mem_size_mib": vm.memory_mib,
            "smt": false,
        },
    })
}

pub struct Exported {
    pub files: Vec<String>,
    pub config: Value,
    /// True when the kernel was a bzImage and its ELF payload was extracted.
    pub extracted_elf: bool,
}

/// Writes `vm.json`, `vmlinux`, `initrd.img` and raw disks into `dir`.
pub fn export(vm: &ExportVm<'_>, dir: &Path, progress: &dyn Progress) -> Result<Exported> {
    check_exportable(vm).map_err(|m| err("firecracker export", m))?;
    let k = vm.kernel.expect("checked");
    if k.len() > super::kernel::MAX_VMLINUX {
        return Err(err("kernel", "too large"));
    }
    let mut kbytes = vec![0u8; k.len() as usize];
    k.read_at(&mut kbytes, 0).map_err(io_err("kernel"))?;
    let extracted_elf = super::kernel::kind(&kbytes) == super::kernel::KernelKind::BzImage;
    let elf = super::kernel::vmlinux(&kbytes).map_err(|m| err("kernel", m))?;
    drop(kbytes);
    std::fs::write(dir.join("vmlinux"), &elf).map_err(io_err("vmlinux"))?;
    let mut files = vec!["vmlinux".to_string()];
    if let Some(i) = vm.initrd {
        super::copy_to_file(i, &dir.join("initrd.img"), progress)?;
        files.push("initrd.img".into());
    }
    let mut disks = Vec::new();
    for d in &vm.disks {
        let name = super::write_disk(dir, d, DiskFormat::Raw, progress)?;
        let id: String = d
            .stem
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        disks.push((id, name.clone(), d.read_only));
        files.push(name);
    }
    let config = config_json(vm, vm.initrd.is_some(), &disks);
    let text = serde_json::to_string_pretty(&config).expect("JSON") + "\n";
    std::fs::write(dir.join(CONFIG_FILE), text).map_err(io_err(CONFIG_FILE))?;
    files.push(CONFIG_FILE.into());
    Ok(Exported {
        files,
        config,
        extracted_elf,
    })
}

/// Keys of the full VM configuration that a pack cannot carry.
const DROPPABLE: &[&str] = &[
    "network-interfaces",
    "vsock",
    "balloon",
    "logger",
    "metrics",
    "mmds-config",
    "entropy",
    "cpu-config",
    "memory-hotplug",
    "pmem",
    "serial",
];

/// Reads a Firecracker config file; the files it names must lie in its folder.
pub fn import(path: &Path, strict: bool) -> Result<ImportedVm> {
    let label = path.display().to_string();
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let text = super::read_text(path)?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| err(&label, format!("not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| err(&label, "not a JSON object"))?;
    let mut dropped = Vec::new();
    for k in obj.keys() {
        match k.as_str() {
            "boot-source" | "drives" | "machine-config" => {}
            k if DROPPABLE.contains(&k) => dropped.push(format!("\"{k}\"")),
            k => {
                return Err(err(
                    &label,
                    format!("unknown key \"{k}\" (Firecracker would refuse it too)"),
                ))
            }
        }
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The config has no name; a generic file name yields to its folder's.
    let folder = base
        .canonicalize()
        .ok()
        .and_then(|b| b.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let name = if matches!(stem.as_str(), "vm" | "config" | "vm_config") && !folder.is_empty() {
        folder
    } else {
        stem
    };
    let mut vm = ImportedVm::new(&name);
    let mc = &v["machine-config"];
    let num = |x: &Value, what: &str| -> Result<u64> {
        x.as_u64().ok_or_else(|| {
            err(
                &label,
                format!("machine-config.{what}: required, a positive integer"),
            )
        })
    };
    vm.vcpus = u32::try_from(num(&mc["vcpu_count"], "vcpu_count")?)
        .map_err(|_| err(&label, "machine-config.vcpu_count: too large"))?;
    vm.memory_mib = Some(num(&mc["mem_size_mib"], "mem_size_mib")?);
    if let Some(t) = mc["cpu_template"].as_str().filter(|t| *t != "None") {
        vm.cpu_template = CpuTemplate::Baseline;
        dropped.push(format!("CPU template {t}: mapped to the baseline template"));
    }
    if mc["smt"].as_bool() == Some(true) {
        dropped.push("smt: the pack's vCPUs are one thread per core".into());
    }
    let bs = &v["boot-source"];
    let kpath = bs["kernel_image_path"]
        .as_str()
        .ok_or_else(|| err(&label, "boot-source.kernel_image_path: required"))?;
    let k = super::resolve_inside(
        base,
        kpath,
        &format!("{label}: boot-source.kernel_image_path"),
    )?;
    vm.kernel = Some(ImportedFile {
        name: file_name(&k, "vmlinux"),
        source: Box::new(FileSource::open(&k).map_err(io_err(k.display()))?),
    });
    if let Some(i) = bs["initrd_path"].as_str() {
        let p = super::resolve_inside(base, i, &format!("{label}: boot-source.initrd_path"))?;
        vm.initrd = Some(ImportedFile {
            name: file_name(&p, "initrd.img"),
            source: Box::new(FileSource::open(&p).map_err(io_err(p.display()))?),
        });
    }
    let mut cmdline = bs["boot_args"].as_str().unwrap_or("").to_string();
    let drives = v["drives"].as_array().cloned().unwrap_or_default();
    if drives.len() > MAX_DISKS {
        return Err(err(&label, format!("more than {MAX_DISKS} drives")));
    }
    // Firecracker attaches the root device first, as /dev/vda.
    let mut ordered: Vec<&Value> = drives
        .iter()
        .filter(|d| d["is_root_device"] == true)
        .collect();
    if ordered.len() > 1 {
        return Err(err(&label, "more than one drive has is_root_device = true"));
    }
    ordered.extend(drives.iter().filter(|d| d["is_root_device"] != true));
    for (i, d) in ordered.iter().enumerate() {
        let id = d["drive_id"].as_str().unwrap_or("?");
        if d.get("socket").is_some() {
            return Err(err(
                &label,
                format!("drive {id} is a vhost-user socket: refused"),
            ));
        }
        let p = d["path_on_host"]
            .as_str()
            .ok_or_else(|| err(&label, format!("drive {id}: path_on_host is required")))?;
        let file = super::resolve_inside(base, p, &format!("{label}: drive {id}"))?;
        let ro = d["is_read_only"].as_bool().unwrap_or(false);
        if i == 0 && d["is_root_device"] == true {
            let part = d["partuuid"].as_str();
            let root = match part {
                Some(u) => format!("root=PARTUUID={u}"),
                None => "root=/dev/vda".into(),
            };
            // What Firecracker adds to the command line for its root device.
            cmdline = format!("{cmdline} {root} {}", if ro { "ro" } else { "rw" })
                .trim()
                .to_string();
        }
        for k in ["rate_limiter", "io_engine", "cache_type"] {
            if d.get(k).is_some() {
                dropped.push(format!("drive {id}: {k}"));
            }
        }
        vm.disks.push(ImportedDisk {
            name: super::sanitize_name(id),
            format: DiskFormat::Raw,
            read_only: ro,
            source: super::open_named_disk(&file, DiskFormat::Raw)?,
        });
    }
    let stems = super::unique_stems(vm.disks.iter().map(|d| d.name.as_str()));
    for (d, s) in vm.disks.iter_mut().zip(stems) {
        d.name = format!("{s}.img");
    }
    vm.cmdline = cmdline;
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

    /// The generated config against Firecracker's documented API: required fields
    /// present, types right, no key the API does not define.
    #[test]
    fn config_follows_the_api() {
        let k = vec![0u8; 10];
        let d = vec![0u8; 512];
        let vm = ExportVm {
            name: "x".into(),
            vcpus: 2,
            memory_mib: 256,
            cpu_template: CpuTemplate::Host,
            kernel: Some(&k),
            initrd: Some(&k),
            kernel_name: "vmlinux".into(),
            initrd_name: "initrd.img".into(),
            cmdline: "console=ttyS0".into(),
            disks: vec![super::super::ExportDisk {
                stem: "root".into(),
                source: &d,
                read_only: true,
            }],
        };
        let c = config_json(&vm, true, &[("root".into(), "root.img".into(), true)]);
        let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
        assert_eq!(keys(&c), ["boot-source", "drives", "machine-config"]);
        let bs = &c["boot-source"];
        assert!(bs["kernel_image_path"].is_string());
        for k in keys(bs) {
            assert!(
                ["kernel_image_path", "boot_args", "initrd_path"].contains(&k.as_str()),
                "{k}"
            );
        }
        let drive = &c["drives"][0];
        for req in ["drive_id", "is_root_device", "path_on_host", "is_read_only"] {
            assert!(drive.get(req).is_some(), "{req}");
        }
        assert!(drive["is_root_device"].is_boolean() && drive["is_read_only"].is_boolean());
        let mc = &c["machine-config"];
        assert!(mc["vcpu_count"]
            .as_u64()
            .is_some_and(|n| (1..=32).contains(&n)));
        assert!(mc["mem_size_mib"].is_u64());
        for k in keys(mc) {
            assert!(
                [
                    "vcpu_count",
                    "mem_size_mib",
                    "smt",
                    "cpu_template",
                    "track_dirty_pages",
                    "huge_pages"
                ]
                .contains(&k.as_str()),
                "{k}"
            );
        }
        let odd = ExportVm { vcpus: 3, ..vm };
        assert!(check_exportable(&odd).unwrap_err().contains("even"));
    }
}
