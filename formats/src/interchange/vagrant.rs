//! Vagrant boxes for the libvirt provider (vagrant-libvirt): a tar of `metadata.json`, a
//! `Vagrantfile` with the machine's settings, and qcow2 disks (`box.img`, then
//! `box_2.img`, …). Kernel-booting packs carry the kernel and initrd in the box, named in
//! the Vagrantfile relative to it.
//!
//! Import also takes compressed boxes (`.box` as tar.gz, as Vagrant Cloud serves them)
//! and VirtualBox-provider boxes (whose `box.ovf` goes through the OVF reader).

use std::io::{Seek, Write};
use std::path::Path;

use super::archive::{self, TarWriter};
use super::{err, io_err, ExportVm, ImportedDisk, ImportedFile, ImportedVm, Result, MAX_DISKS};
use crate::config::{CpuTemplate, DiskFormat};
use crate::disk;
use crate::pack::Progress;

/// vagrant-libvirt's defaults when a box does not set them.
pub const DEFAULT_MEMORY_MIB: u64 = 512;

/// Disk member names: `box.img`, `box_2.img`, …
pub fn disk_member(i: usize) -> String {
    if i == 0 {
        "box.img".into()
    } else {
        format!("box_{}.img", i + 1)
    }
}

/// A Ruby single-quoted string literal.
fn ruby_str(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

pub fn vagrantfile(vm: &ExportVm<'_>) -> String {
    let mut v = String::from(
        "# Written by vmpack export (vagrant-libvirt provider).\nVagrant.configure(\"2\") do |config|\n  config.vm.provider :libvirt do |libvirt|\n    libvirt.driver = \"kvm\"\n",
    );
    v.push_str(&format!("    libvirt.title = {}\n", ruby_str(&vm.name)));
    v.push_str(&format!("    libvirt.memory = {}\n", vm.memory_mib));
    v.push_str(&format!("    libvirt.cpus = {}\n", vm.vcpus));
    match &vm.cpu_template {
        CpuTemplate::Host => v.push_str("    libvirt.cpu_mode = \"host-passthrough\"\n"),
        t => v.push_str(&format!(
            "    libvirt.cpu_mode = \"custom\"\n    libvirt.cpu_model = \"{}\"\n",
            super::libvirt::model_for(t)
        )),
    }
    if vm.kernel.is_some() {
        v.push_str(&format!(
            "    libvirt.kernel = File.join(File.dirname(__FILE__), \"{}\")\n",
            vm.kernel_name
        ));
        if vm.initrd.is_some() {
            v.push_str(&format!(
                "    libvirt.initrd = File.join(File.dirname(__FILE__), \"{}\")\n",
                vm.initrd_name
            ));
        }
        v.push_str(&format!(
            "    libvirt.cmd_line = {}\n",
            ruby_str(&vm.cmdline)
        ));
    }
    v.push_str("  end\nend\n");
    v
}

/// Writes the box to `out`. The qcow2 disks are built in `scratch` (a folder on the
/// output's file system) and then streamed into the archive.
pub fn export_box<W: Write + Seek>(
    vm: &ExportVm<'_>,
    out: W,
    scratch: &Path,
    mtime: u64,
    progress: &dyn Progress,
) -> Result<Vec<String>> {
    let label = "box";
    let ioe = |e: std::io::Error| err(label, e.to_string());
    let gib = |b: u64| b.div_ceil(1 << 30).max(1);
    let mut meta = serde_json::json!({
        "provider": "libvirt",
        "format": "qcow2",
        "virtual_size": vm.disks.first().map_or(1, |d| gib(d.source.len())),
    });
    if !vm.disks.is_empty() {
        meta["disks"] = vm
            .disks
            .iter()
            .enumerate()
            .map(|(i, _)| serde_json::json!({"path": disk_member(i), "format": "qcow2"}))
            .collect();
    }
    let mut tw = TarWriter::new(out, mtime);
    let mut names = Vec::new();
    let meta_text = serde_json::to_string_pretty(&meta).expect("JSON") + "\n";
    tw.add("metadata.json", meta_text.as_bytes()).map_err(ioe)?;
    tw.add("Vagrantfile", vagrantfile(vm).as_bytes())
        .map_err(ioe)?;
    names.extend(["metadata.json".to_string(), "Vagrantfile".to_string()]);
    for (i, d) in vm.disks.iter().enumerate() {
        let name = disk_member(i);
        let tmp = scratch.join(&name);
        {
            let img = disk::create_disk(&tmp, DiskFormat::Qcow2, d.source.len())
                .map_err(io_err(&name))?;
            super::copy_to_disk(d.source, img.as_ref(), progress).map_err(io_err(&name))?;
        }
        let f = std::fs::File::open(&tmp).map_err(io_err(&name))?;
        let mut src = f;
        tw.add_streamed(&name, |w| std::io::copy(&mut src, w))
            .map_err(ioe)?;
        let _ = std::fs::remove_file(&tmp);
        names.push(name);
    }
    for (src, name) in [
        (vm.kernel, vm.kernel_name.as_str()),
        (vm.initrd, vm.initrd_name.as_str()),
    ] {
        if let Some(s) = src {
            tw.add_streamed(name, |w| {
                let mut buf = vec![0u8; 1 << 20];
                let mut off = 0;
                while off < s.len() {
                    let n = (s.len() - off).min(buf.len() as u64) as usize;
                    s.read_at(&mut buf[..n], off)?;
                    w.write_all(&buf[..n])?;
                    off += n as u64;
                }
                Ok(off)
            })
            .map_err(ioe)?;
            names.push(name.to_string());
        }
    }
    tw.finish().map_err(ioe)?;
    Ok(names)
}

/// Settings read from a Vagrantfile (only simple `libvirt.KEY = VALUE` lines).
#[derive(Debug, Default, PartialEq)]
struct Settings {
    memory: Option<u64>,
    cpus: Option<u32>,
    kernel: Option<String>,
    initrd: Option<String>,
    cmd_line: Option<String>,
    cpu_mode: Option<String>,
    title: Option<String>,
}

fn ruby_literal(v: &str) -> Option<String> {
    let v = v.trim();
    let q = v.chars().next()?;
    if q != '"' && q != '\'' {
        return None;
    }
    let mut out = String::new();
    let mut chars = v[1..].chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            c if c == q => return Some(out),
            c => out.push(c),
        }
    }
    None
}

/// The settings, and the lines that were not understood.
fn parse_vagrantfile(text: &str) -> (Settings, Vec<String>) {
    let mut s = Settings::default();
    let mut unread = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty()
            || line.starts_with('#')
            || line == "end"
            || line.starts_with("Vagrant.configure(")
            || line.starts_with("config.vm.provider :libvirt do")
            || line.starts_with("config.vm.provider \"libvirt\" do")
        {
            continue;
        }
        let Some((lhs, rhs)) = line.split_once('=') else {
            unread.push(line.to_string());
            continue;
        };
        let key = lhs.trim().rsplit('.').next().unwrap_or("").trim();
        let rhs = rhs.trim();
        match key {
            "memory" => s.memory = rhs.parse().ok(),
            "cpus" => s.cpus = rhs.parse().ok(),
            "cmd_line" => s.cmd_line = ruby_literal(rhs),
            "cpu_mode" => s.cpu_mode = ruby_literal(rhs),
            "title" => s.title = ruby_literal(rhs),
            "kernel" | "initrd" => {
                // `File.join(File.dirname(__FILE__), "vmlinuz")` or a plain literal: the
                // last string literal is the file name inside the box.
                let lit = rhs.rfind(['"', '\'']).and_then(|end| {
                    let q = rhs.as_bytes()[end] as char;
                    rhs[..end]
                        .rfind(q)
                        .map(|start| rhs[start + 1..end].to_string())
                });
                if key == "kernel" {
                    s.kernel = lit;
                } else {
                    s.initrd = lit;
                }
            }
            "driver" | "cpu_model" => {}
            _ => unread.push(line.to_string()),
        }
    }
    (s, unread)
}

/// Reads a `.box` (tar or tar.gz). Members are checked and extracted into a scratch
/// folder created in `scratch_parent` (on the output's file system; removed with the
/// returned VM).
pub fn import(path: &Path, scratch_parent: &Path, strict: bool) -> Result<ImportedVm> {
    let label = path.display().to_string();
    let scratch = tempfile::Builder::new()
        .prefix(".vmpack-import-")
        .tempdir_in(scratch_parent)
        .map_err(io_err(scratch_parent.display()))?;
    let f = std::fs::File::open(path).map_err(io_err(&label))?;
    let mut head = [0u8; 2];
    let _ = std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0);
    let reader: Box<dyn std::io::Read> = if head == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)))
    } else {
        Box::new(std::io::BufReader::new(f))
    };
    let got = archive::extract(reader, &label, scratch.path(), true, &|_| true)?;
    let has = |n: &str| got.iter().any(|m| m.name == n);
    if !has("metadata.json") {
        return Err(err(&label, "no metadata.json: not a Vagrant box"));
    }
    let meta_text = super::read_text(&scratch.path().join("metadata.json"))?;
    let meta: serde_json::Value =
        serde_json::from_str(&meta_text).map_err(|e| err(&label, format!("metadata.json: {e}")))?;
    let provider = meta["provider"].as_str().unwrap_or("");
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "box".into());
    if provider == "virtualbox" {
        let ovf = got
            .iter()
            .find(|m| m.name.ends_with(".ovf"))
            .ok_or_else(|| err(&label, "VirtualBox box without an .ovf descriptor"))?;
        let mut vm = super::ovf::import(&scratch.path().join(&ovf.name), strict)?;
        vm.name = super::sanitize_name(&stem);
        vm.scratch = Some(scratch);
        return Ok(vm);
    }
    if provider != "libvirt" {
        return Err(err(
            &label,
            format!(
                "metadata.json: provider '{provider}' (libvirt and virtualbox boxes are imported)"
            ),
        ));
    }
    let mut vm = ImportedVm::new(&stem);
    let mut dropped = Vec::new();
    let disk_list: Vec<(String, Option<String>)> = match meta["disks"].as_array() {
        Some(a) => a
            .iter()
            .map(|d| {
                (
                    d["path"].as_str().unwrap_or("").to_string(),
                    d["format"].as_str().map(str::to_string),
                )
            })
            .collect(),
        None => vec![(
            "box.img".into(),
            meta["format"].as_str().map(str::to_string),
        )],
    };
    if disk_list.len() > MAX_DISKS {
        return Err(err(&label, format!("more than {MAX_DISKS} disks")));
    }
    for (i, (name, fmt)) in disk_list.iter().enumerate() {
        if !crate::vm::is_safe_name(name) {
            return Err(err(
                &label,
                format!(
                    "metadata.json names disk '{name}': not a plain file name in the box: refused"
                ),
            ));
        }
        if !has(name) {
            return Err(err(
                &label,
                format!("metadata.json names disk '{name}', which the box does not hold"),
            ));
        }
        let format = match fmt.as_deref().unwrap_or("qcow2") {
            "qcow2" => DiskFormat::Qcow2,
            "raw" => DiskFormat::Raw,
            other => {
                return Err(err(
                    &label,
                    format!("disk '{name}': format '{other}' (qcow2 and raw are imported)"),
                ))
            }
        };
        let p = scratch.path().join(name);
        vm.disks.push(ImportedDisk {
            name: format!("disk{i}.{}", super::ext(format)),
            format,
            read_only: false,
            source: super::open_named_disk(&p, format)?,
        });
    }
    if vm.disks.len() == 1 {
        vm.disks[0].name = format!("{}.{}", vm.name, super::ext(vm.disks[0].format));
    }
    let (settings, unread) = if has("Vagrantfile") {
        parse_vagrantfile(&super::read_text(&scratch.path().join("Vagrantfile"))?)
    } else {
        (Settings::default(), Vec::new())
    };
    vm.memory_mib = Some(settings.memory.unwrap_or_else(|| {
        dropped.push(format!(
            "memory not set in the box: vagrant-libvirt's default, {DEFAULT_MEMORY_MIB} MiB"
        ));
        DEFAULT_MEMORY_MIB
    }));
    vm.vcpus = settings.cpus.unwrap_or(1);
    if let Some(t) = &settings.title {
        vm.name = super::sanitize_name(t);
        if vm.disks.len() == 1 {
            vm.disks[0].name = format!("{}.{}", vm.name, super::ext(vm.disks[0].format));
        }
    }
    if matches!(settings.cpu_mode.as_deref(), Some("custom")) {
        vm.cpu_template = CpuTemplate::Baseline;
    }
    for (which, slot) in [
        (settings.kernel.clone(), &mut vm.kernel),
        (settings.initrd.clone(), &mut vm.initrd),
    ] {
        if let Some(n) = which {
            if !crate::vm::is_safe_name(&n) || !has(&n) {
                return Err(err(
                    &label,
                    format!("the Vagrantfile names '{n}', which is not a file of the box: refused"),
                ));
            }
            let p = scratch.path().join(&n);
            *slot = Some(ImportedFile {
                name: n.clone(),
                source: Box::new(crate::pack::FileSource::open(&p).map_err(io_err(p.display()))?),
            });
        }
    }
    vm.cmdline = settings.cmd_line.unwrap_or_default();
    if let Some(first) = unread.first() {
        dropped.push(format!(
            "{} Vagrantfile line(s) beyond memory, cpus, cpu_mode, kernel, initrd, cmd_line (first: '{first}')",
            unread.len()
        ));
    }
    for m in got
        .iter()
        .filter(|m| m.name != "metadata.json" && m.name != "Vagrantfile")
    {
        let used = disk_list.iter().any(|(n, _)| *n == m.name)
            || settings.kernel.as_deref() == Some(m.name.as_str())
            || settings.initrd.as_deref() == Some(m.name.as_str());
        if !used {
            dropped.push(format!("box file '{}'", m.name));
        }
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
    vm.scratch = Some(scratch);
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vagrantfile_roundtrip() {
        let k = vec![1u8; 10];
        let vm = ExportVm {
            name: "x".into(),
            vcpus: 3,
            memory_mib: 300,
            cpu_template: CpuTemplate::Host,
            kernel: Some(&k),
            initrd: Some(&k),
            kernel_name: "vmlinuz".into(),
            initrd_name: "initrd.img".into(),
            cmdline: "console=ttyS0 it's \\ \"q\"".into(),
            disks: vec![],
        };
        let (s, unread) = parse_vagrantfile(&vagrantfile(&vm));
        assert!(unread.is_empty(), "{unread:?}");
        assert_eq!(s.memory, Some(300));
        assert_eq!(s.cpus, Some(3));
        assert_eq!(s.kernel.as_deref(), Some("vmlinuz"));
        assert_eq!(s.initrd.as_deref(), Some("initrd.img"));
        assert_eq!(s.cmd_line.as_deref(), Some("console=ttyS0 it's \\ \"q\""));
    }
}
