//! OVF 1.0/2.0 descriptors and OVA archives (VirtualBox, VMware, virt-v2v).
//!
//! Export writes one `.ova`: a ustar archive with the `.ovf` descriptor first, then one
//! stream-optimized VMDK per disk (in `References` order, as VirtualBox reads disks
//! forward only), the kernel and initrd when the pack boots one directly, and last the
//! `.mf` manifest of SHA-256 digests (OVF allows it right after the descriptor or at the
//! end; at the end, every digest is computed while the file is written, in one pass).
//!
//! Direct kernel boot has no OVF element, so it goes into a `vmpack:BootSection` marked
//! `ovf:required="false"`, which other tools skip. Import reads an `.ova` in place (disks
//! are decoded from the archive without extracting them) or an `.ovf` with its files
//! beside it, checks the manifest first, and refuses what does not add up.

use std::io::{Seek, Write};
use std::path::Path;
use std::sync::Arc;

use sha2::Digest;

use super::archive::{self, Member, TarWriter};
use super::vmdk::{self, FileSlice, VmdkReader};
use super::xml::{self, attr, child, child_text, children, Writer};
use super::{err, io_err, ExportVm, ImportedDisk, ImportedFile, ImportedVm, Result, MAX_DISKS};
use crate::config::{CpuTemplate, DiskFormat};
use crate::pack::{Progress, SectionSource};

pub const NS_OVF1: &str = "http://schemas.dmtf.org/ovf/envelope/1";
pub const NS_OVF2: &str = "http://schemas.dmtf.org/ovf/envelope/2";
const NS_RASD: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData";
const NS_VSSD: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData";
/// Namespace of vmpack's own OVF section (direct kernel boot, CPU template).
pub const NS_VMPACK: &str = "urn:vmpack:ovf:1";
const VMDK_STREAM_FORMAT: &str =
    "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";

/// Which OVF version an export writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OvfVersion {
    V1,
    V2,
}

impl std::str::FromStr for OvfVersion {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "1" | "1.0" => Ok(OvfVersion::V1),
            "2" | "2.0" => Ok(OvfVersion::V2),
            _ => Err(format!("'{s}': expected 1.0 or 2.0")),
        }
    }
}

/// What an OVA export wrote.
pub struct OvaSummary {
    /// Members in archive order with their SHA-256 digests (the manifest's lines).
    pub members: Vec<(String, String)>,
    pub descriptor: String,
}

struct Hashing<W> {
    w: W,
    h: sha2::Sha256,
    n: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(b)?;
        self.h.update(&b[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// The OVF descriptor for `vm` whose disks are `disk_files` (name, virtual size).
pub fn descriptor(
    vm: &ExportVm<'_>,
    version: OvfVersion,
    disk_files: &[(String, u64)],
    kernel: Option<&str>,
    initrd: Option<&str>,
) -> String {
    let ns = match version {
        OvfVersion::V1 => NS_OVF1,
        OvfVersion::V2 => NS_OVF2,
    };
    let ver = match version {
        OvfVersion::V1 => "1.0",
        OvfVersion::V2 => "2.0",
    };
    let mut w = Writer::new();
    w.declaration();
    w.open(
        "Envelope",
        &[
            ("ovf:version", ver),
            ("xml:lang", "en-US"),
            ("xmlns", ns),
            ("xmlns:ovf", ns),
            ("xmlns:rasd", NS_RASD),
            ("xmlns:vssd", NS_VSSD),
            ("xmlns:xsi", "http://www.w3.org/2001/XMLSchema-instance"),
            ("xmlns:vmpack", NS_VMPACK),
        ],
    );
    w.open("References", &[]);
    for (i, (name, _)) in disk_files.iter().enumerate() {
        w.leaf(
            "File",
            &[("ovf:id", &format!("file{}", i + 1)), ("ovf:href", name)],
            None,
        );
    }
    if let Some(k) = kernel {
        w.leaf("File", &[("ovf:id", "kernel"), ("ovf:href", k)], None);
    }
    if let Some(i) = initrd {
        w.leaf("File", &[("ovf:id", "initrd"), ("ovf:href", i)], None);
    }
    w.close();
    w.open("DiskSection", &[]);
    w.leaf("Info", &[], Some("Virtual disks"));
    for (i, (_, size)) in disk_files.iter().enumerate() {
        w.leaf(
            "Disk",
            &[
                ("ovf:diskId", &format!("vmdisk{}", i + 1)),
                ("ovf:fileRef", &format!("file{}", i + 1)),
                ("ovf:capacity", &size.to_string()),
                ("ovf:capacityAllocationUnits", "byte"),
                ("ovf:format", VMDK_STREAM_FORMAT),
            ],
            None,
        );
    }
    w.close();
    w.open("VirtualSystem", &[("ovf:id", &vm.name)]);
    w.leaf("Info", &[], Some("A virtual machine exported by vmpack"));
    w.leaf("Name", &[], Some(&vm.name));
    w.open("OperatingSystemSection", &[("ovf:id", "101")]);
    w.leaf("Info", &[], Some("The guest operating system"));
    w.leaf("Description", &[], Some("Linux 64-bit"));
    w.close();
    w.open("VirtualHardwareSection", &[]);
    w.leaf("Info", &[], Some("Virtual hardware requirements"));
    w.open("System", &[]);
    w.leaf("vssd:ElementName", &[], Some("Virtual Hardware Family"));
    w.leaf("vssd:InstanceID", &[], Some("0"));
    w.leaf("vssd:VirtualSystemIdentifier", &[], Some(&vm.name));
    w.leaf("vssd:VirtualSystemType", &[], Some("vmx-07"));
    w.close();
    // rasd elements in the alphabetical order the CIM schema's sequence requires.
    let item = |w: &mut Writer, fields: &[(&str, String)]| {
        w.open("Item", &[]);
        for (k, v) in fields {
            w.leaf(&format!("rasd:{k}"), &[], Some(v));
        }
        w.close();
    };
    item(
        &mut w,
        &[
            ("AllocationUnits", "hertz * 10^6".into()),
            ("Description", "Number of virtual CPUs".into()),
            ("ElementName", format!("{} virtual CPU(s)", vm.vcpus)),
            ("InstanceID", "1".into()),
            ("ResourceType", "3".into()),
            ("VirtualQuantity", vm.vcpus.to_string()),
        ],
    );
    item(
        &mut w,
        &[
            ("AllocationUnits", "byte * 2^20".into()),
            ("Description", "Memory size".into()),
            ("ElementName", format!("{} MB of memory", vm.memory_mib)),
            ("InstanceID", "2".into()),
            ("ResourceType", "4".into()),
            ("VirtualQuantity", vm.memory_mib.to_string()),
        ],
    );
    if !disk_files.is_empty() {
        item(
            &mut w,
            &[
                ("Address", "0".into()),
                ("Description", "SCSI Controller".into()),
                ("ElementName", "scsiController0".into()),
                ("InstanceID", "3".into()),
                ("ResourceSubType", "lsilogic".into()),
                ("ResourceType", "6".into()),
            ],
        );
    }
    for i in 0..disk_files.len() {
        item(
            &mut w,
            &[
                ("AddressOnParent", i.to_string()),
                ("ElementName", format!("disk{i}")),
                ("HostResource", format!("ovf:/disk/vmdisk{}", i + 1)),
                ("InstanceID", (4 + i).to_string()),
                ("Parent", "3".into()),
                ("ResourceType", "17".into()),
            ],
        );
    }
    w.close();
    let read_only: Vec<usize> = (0..vm.disks.len())
        .filter(|&i| vm.disks[i].read_only)
        .collect();
    if kernel.is_some() || vm.cpu_template != CpuTemplate::Host || !read_only.is_empty() {
        w.open("vmpack:BootSection", &[("ovf:required", "false")]);
        w.leaf(
            "Info",
            &[],
            Some("Direct Linux kernel boot and CPU template (vmpack)"),
        );
        if kernel.is_some() {
            w.leaf("vmpack:Kernel", &[("ovf:fileRef", "kernel")], None);
        }
        if initrd.is_some() {
            w.leaf("vmpack:Initrd", &[("ovf:fileRef", "initrd")], None);
        }
        if kernel.is_some() {
            w.leaf("vmpack:CommandLine", &[], Some(&vm.cmdline));
        }
        w.leaf(
            "vmpack:CpuTemplate",
            &[],
            Some(&vm.cpu_template.to_string()),
        );
        for i in read_only {
            w.leaf(
                "vmpack:ReadOnly",
                &[("ovf:diskId", &format!("vmdisk{}", i + 1))],
                None,
            );
        }
        w.close();
    }
    w.close();
    w.finish()
}

/// Writes the OVA for `vm` to `out`. `base` names the descriptor and manifest members.
pub fn export_ova<W: Write + Seek>(
    vm: &ExportVm<'_>,
    out: W,
    base: &str,
    version: OvfVersion,
    mtime: u64,
    progress: &dyn Progress,
) -> Result<OvaSummary> {
    let label = format!("{base}.ova");
    let ioe = |e: std::io::Error| err(&label, e.to_string());
    let disk_files: Vec<(String, u64)> = vm
        .disks
        .iter()
        .map(|d| {
            (
                format!("{}.vmdk", d.stem),
                d.source.len().div_ceil(vmdk::SECTOR) * vmdk::SECTOR,
            )
        })
        .collect();
    let kernel = vm.kernel.map(|_| vm.kernel_name.as_str());
    let initrd = vm.initrd.map(|_| vm.initrd_name.as_str());
    let desc = descriptor(vm, version, &disk_files, kernel, initrd);
    let mut tw = TarWriter::new(out, mtime);
    let mut members = Vec::new();
    let ovf_name = format!("{base}.ovf");
    tw.add(&ovf_name, desc.as_bytes()).map_err(ioe)?;
    members.push((ovf_name, hex::encode(sha2::Sha256::digest(desc.as_bytes()))));
    let mut streamed = |tw: &mut TarWriter<W>,
                        name: &str,
                        f: &dyn Fn(&mut Hashing<&mut W>) -> std::io::Result<u64>|
     -> Result<()> {
        let mut digest = String::new();
        tw.add_streamed(name, |w| {
            let mut h = Hashing {
                w,
                h: sha2::Sha256::new(),
                n: 0,
            };
            f(&mut h)?;
            digest = hex::encode(h.h.finalize_reset());
            Ok(h.n)
        })
        .map_err(|e| err(&label, format!("writing {name}: {e}")))?;
        members.push((name.to_string(), digest));
        Ok(())
    };
    for (d, (name, _)) in vm.disks.iter().zip(&disk_files) {
        streamed(&mut tw, name, &|w| {
            vmdk::write_stream_optimized(
                std::io::BufWriter::with_capacity(1 << 20, w),
                name,
                d.source,
                progress,
            )
        })?;
    }
    for (src, name) in [(vm.kernel, kernel), (vm.initrd, initrd)] {
        if let (Some(src), Some(name)) = (src, name) {
            streamed(&mut tw, name, &|w| copy_source(src, w))?;
        }
    }
    let mf: String = members
        .iter()
        .map(|(n, d)| format!("SHA256({n})= {d}\n"))
        .collect();
    tw.add(&format!("{base}.mf"), mf.as_bytes()).map_err(ioe)?;
    tw.finish().map_err(ioe)?;
    Ok(OvaSummary {
        members,
        descriptor: desc,
    })
}

fn copy_source(src: &dyn SectionSource, w: &mut dyn Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < src.len() {
        let n = (src.len() - off).min(buf.len() as u64) as usize;
        src.read_at(&mut buf[..n], off)?;
        w.write_all(&buf[..n])?;
        off += n as u64;
    }
    Ok(off)
}

/// Where the files an OVF names come from: members of an OVA, or files beside an `.ovf`.
enum Files {
    Archive(Arc<std::fs::File>, Vec<Member>),
    Folder(std::path::PathBuf),
}

impl Files {
    fn open(&self, name: &str, label: &str) -> Result<FileSlice> {
        match self {
            Files::Archive(f, members) => members
                .iter()
                .find(|m| m.name == name)
                .map(|m| archive::slice(f, m))
                .ok_or_else(|| {
                    err(
                        label,
                        format!("'{name}' is referenced but not in the archive"),
                    )
                }),
            Files::Folder(base) => {
                if !crate::vm::is_safe_name(name) {
                    return Err(err(label, format!("file reference '{name}': not a plain file name next to the descriptor: refused")));
                }
                let p = super::resolve_inside(base, name, label)?;
                let f = std::fs::File::open(&p).map_err(io_err(p.display()))?;
                FileSlice::whole(f).map_err(io_err(p.display()))
            }
        }
    }
}

/// Reads an `.ova` (in place) or an `.ovf` with its files beside it.
pub fn import(path: &Path, strict: bool) -> Result<ImportedVm> {
    let label = path.display().to_string();
    let (text, files, manifest) = if super::detect(path)? == super::Detected::Ova {
        let (file, members) = archive::list(path)?;
        let first = members
            .first()
            .ok_or_else(|| err(&label, "empty archive"))?;
        if !first.name.ends_with(".ovf") {
            return Err(err(
                &label,
                format!(
                    "the first member is '{}', not the .ovf descriptor",
                    first.name
                ),
            ));
        }
        let text = archive::read_small(&file, first, super::MAX_TEXT_LEN, &label)?;
        let text = String::from_utf8(text)
            .map_err(|_| err(&label, format!("{}: not UTF-8", first.name)))?;
        let mfs: Vec<&Member> = members.iter().filter(|m| m.name.ends_with(".mf")).collect();
        if mfs.len() > 1 {
            return Err(err(&label, "more than one .mf manifest"));
        }
        let manifest = match mfs.first() {
            Some(m) => Some((
                m.name.clone(),
                String::from_utf8(archive::read_small(&file, m, super::MAX_TEXT_LEN, &label)?)
                    .map_err(|_| err(&label, format!("{}: not UTF-8", m.name)))?,
            )),
            None => None,
        };
        let all: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
        let files = Files::Archive(file, members);
        (text, (files, all), manifest)
    } else {
        let text = super::read_text(path)?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let mf = path.with_extension("mf");
        let manifest = if mf.exists() {
            let name = mf
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            Some((name, super::read_text(&mf)?))
        } else {
            None
        };
        let own = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        (text, (Files::Folder(base), vec![own]), manifest)
    };
    let (files, archive_names) = files;
    let ovf_name = archive_names.first().cloned().unwrap_or_default();
    let mut dropped = Vec::new();

    // The manifest first: nothing named in the descriptor is trusted before its digest.
    let mut checked: Vec<String> = Vec::new();
    match &manifest {
        Some((mf_name, mf)) => {
            for (n, line) in mf.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let bad = || {
                    err(
                        &label,
                        format!("{mf_name}, line {}: not 'ALGO(file)= digest'", n + 1),
                    )
                };
                let (lhs, digest) = line.split_once('=').ok_or_else(bad)?;
                let (algo, rest) = lhs.split_once('(').ok_or_else(bad)?;
                let file = rest.trim_end().strip_suffix(')').ok_or_else(bad)?;
                let digest = digest.trim().to_ascii_lowercase();
                let data = if file == ovf_name {
                    FileData::Text(text.as_bytes())
                } else {
                    FileData::Slice(files.open(file, &format!("{label}: {mf_name}"))?)
                };
                let actual = data.digest(algo.trim()).ok_or_else(|| {
                    err(&label, format!("{mf_name}: digest algorithm '{algo}' is not supported (SHA1, SHA256, SHA512 are)"))
                })?.map_err(|e| err(&label, format!("{file}: {e}")))?;
                if actual != digest {
                    return Err(err(
                        &label,
                        format!("{mf_name} says {algo}({file})= {digest}, but the file's is {actual}: the archive was altered or damaged; refused"),
                    ));
                }
                checked.push(file.to_string());
            }
        }
        None => dropped.push("no .mf manifest: file digests not checked".to_string()),
    }

    let doc = xml::parse(&text, &format!("{label}: {ovf_name}"))?;
    let env = doc.root_element();
    let ns = env.tag_name().namespace().unwrap_or("");
    if env.tag_name().name() != "Envelope" || !(ns == NS_OVF1 || ns == NS_OVF2) {
        return Err(err(
            &label,
            format!("{ovf_name}: root is not an OVF 1.x/2.x <Envelope>"),
        ));
    }
    let mut refs: Vec<(String, String)> = Vec::new();
    if let Some(r) = child(env, "References") {
        for f in children(r, "File") {
            let id = attr(f, "id").unwrap_or("").to_string();
            let href = attr(f, "href").unwrap_or("").to_string();
            if attr(f, "compression").is_some_and(|c| c != "identity") {
                return Err(err(
                    &label,
                    format!(
                        "file '{href}' is compressed ({}); not supported",
                        attr(f, "compression").unwrap_or("")
                    ),
                ));
            }
            if attr(f, "chunkSize").is_some() {
                return Err(err(
                    &label,
                    format!("file '{href}' is split in chunks; not supported"),
                ));
            }
            refs.push((id, href));
        }
    }
    if manifest.is_some() {
        for (_, href) in &refs {
            if !checked.contains(href) {
                return Err(err(
                    &label,
                    format!("'{href}' is not listed in the manifest: refused"),
                ));
            }
        }
    }
    let href = |id: &str| -> Result<&str> {
        refs.iter()
            .find(|(i, _)| i == id)
            .map(|(_, h)| h.as_str())
            .ok_or_else(|| {
                err(
                    &label,
                    format!("file reference '{id}' is not in <References>"),
                )
            })
    };
    // diskId → (href, capacity in bytes)
    let mut disk_defs: Vec<(String, String, u64)> = Vec::new();
    if let Some(ds) = child(env, "DiskSection") {
        for d in children(ds, "Disk") {
            let id = attr(d, "diskId").unwrap_or("").to_string();
            let fref = attr(d, "fileRef").ok_or_else(|| {
                err(
                    &label,
                    format!("disk '{id}' has no fileRef (empty disks are not imported)"),
                )
            })?;
            let cap: u64 = attr(d, "capacity")
                .and_then(|c| c.trim().parse().ok())
                .ok_or_else(|| err(&label, format!("disk '{id}': capacity is not a number")))?;
            let units = attr(d, "capacityAllocationUnits").unwrap_or("byte");
            let mult = alloc_units(units).ok_or_else(|| {
                err(
                    &label,
                    format!("disk '{id}': unknown capacityAllocationUnits '{units}'"),
                )
            })?;
            let bytes = cap
                .checked_mul(mult)
                .filter(|b| *b <= vmdk::MAX_CAPACITY)
                .ok_or_else(|| {
                    err(
                        &label,
                        format!(
                            "disk '{id}': capacity {cap} × {mult} exceeds the {} TiB limit",
                            vmdk::MAX_CAPACITY >> 40
                        ),
                    )
                })?;
            disk_defs.push((id, href(fref)?.to_string(), bytes));
        }
    }
    let vs = children(env, "VirtualSystem").next().ok_or_else(|| {
        err(
            &label,
            "no <VirtualSystem> (a VirtualSystemCollection is not imported)",
        )
    })?;
    if children(env, "VirtualSystem").count() > 1 || child(env, "VirtualSystemCollection").is_some()
    {
        return Err(err(&label, "more than one virtual system: not supported"));
    }
    for s in env.children().filter(|c| c.is_element()) {
        let n = s.tag_name().name();
        if !matches!(
            n,
            "References" | "DiskSection" | "NetworkSection" | "VirtualSystem"
        ) {
            section_unknown(s, &label, &mut dropped)?;
        }
        if n == "NetworkSection" {
            for net in children(s, "Network") {
                dropped.push(format!("network '{}'", attr(net, "name").unwrap_or("?")));
            }
        }
    }
    let name = child_text(vs, "Name")
        .or(attr(vs, "id"))
        .unwrap_or("imported");
    let mut vm = ImportedVm::new(name);
    let hw = child(vs, "VirtualHardwareSection")
        .ok_or_else(|| err(&label, "no <VirtualHardwareSection>"))?;
    let mut disk_order: Vec<String> = Vec::new();
    for it in hw
        .children()
        .filter(|c| c.is_element() && c.tag_name().name().ends_with("Item"))
    {
        let field = |k: &'static str| child_text(it, k);
        let rtype: u32 = field("ResourceType")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        let what = field("ElementName").unwrap_or("?").to_string();
        match rtype {
            3 => {
                vm.vcpus = field("VirtualQuantity")
                    .and_then(|q| q.parse().ok())
                    .ok_or_else(|| err(&label, "CPU item: VirtualQuantity is not a number"))?;
            }
            4 => {
                let q: u64 = field("VirtualQuantity")
                    .and_then(|q| q.parse().ok())
                    .ok_or_else(|| err(&label, "memory item: VirtualQuantity is not a number"))?;
                let units = field("AllocationUnits").unwrap_or("byte * 2^20");
                let mult = alloc_units(units).ok_or_else(|| {
                    err(
                        &label,
                        format!("memory item: unknown AllocationUnits '{units}'"),
                    )
                })?;
                vm.memory_mib = Some(
                    super::to_mib(q, mult).ok_or_else(|| err(&label, "memory item: too large"))?,
                );
            }
            17 => {
                let hr = field("HostResource").unwrap_or("");
                let id = hr.rsplit('/').next().unwrap_or("").to_string();
                if !disk_order.contains(&id) {
                    disk_order.push(id);
                }
            }
            // Controllers: the pack's disks are virtio.
            5 | 6 | 20 => {}
            10 => dropped.push(format!("network adapter '{what}'")),
            14..=16 => dropped.push(format!("removable drive '{what}'")),
            23 => dropped.push(format!("USB controller '{what}'")),
            24 => dropped.push(format!("graphics '{what}'")),
            35 => dropped.push(format!("sound card '{what}'")),
            0 => {}
            t => dropped.push(format!("hardware item '{what}' (resource type {t})")),
        }
    }
    for (id, _, _) in &disk_defs {
        if !disk_order.contains(id) {
            disk_order.push(id.clone());
        }
    }
    let mut kernel_ref = None;
    let mut initrd_ref = None;
    let mut read_only_ids: Vec<String> = Vec::new();
    for s in vs.children().filter(|c| c.is_element()) {
        let n = s.tag_name().name();
        if s.tag_name().namespace() == Some(NS_VMPACK) && n == "BootSection" {
            kernel_ref = child(s, "Kernel")
                .and_then(|k| attr(k, "fileRef"))
                .map(str::to_string);
            initrd_ref = child(s, "Initrd")
                .and_then(|k| attr(k, "fileRef"))
                .map(str::to_string);
            vm.cmdline = child_text(s, "CommandLine").unwrap_or("").to_string();
            read_only_ids = children(s, "ReadOnly")
                .filter_map(|r| attr(r, "diskId"))
                .map(str::to_string)
                .collect();
            if let Some(t) = child_text(s, "CpuTemplate").and_then(CpuTemplate::from_name) {
                vm.cpu_template = t;
            }
            continue;
        }
        if !matches!(
            n,
            "Info"
                | "Name"
                | "VirtualHardwareSection"
                | "OperatingSystemSection"
                | "AnnotationSection"
        ) {
            section_unknown(s, &label, &mut dropped)?;
        }
    }
    for id in &disk_order {
        let (_, href, cap) = disk_defs.iter().find(|(i, _, _)| i == id).ok_or_else(|| {
            err(
                &label,
                format!("disk item names '{id}', which <DiskSection> does not define"),
            )
        })?;
        if vm.disks.len() >= MAX_DISKS {
            return Err(err(&label, format!("more than {MAX_DISKS} disks")));
        }
        let dl = format!("{label}: {href}");
        let slice = files.open(href, &label)?;
        let mut head = [0u8; 4];
        let _ = slice.read_exact_at(&mut head, 0);
        if !vmdk::is_vmdk(&head) {
            return Err(err(&dl, "not a sparse VMDK (monolithicSparse or streamOptimized); other disk formats in OVAs are not imported"));
        }
        let r = VmdkReader::open(slice).map_err(|e| err(&dl, e.to_string()))?;
        if r.capacity() != cap.div_ceil(vmdk::SECTOR) * vmdk::SECTOR {
            return Err(err(
                &dl,
                format!(
                    "the descriptor says the disk holds {cap} bytes, the VMDK says {}: refused",
                    r.capacity()
                ),
            ));
        }
        let stem = Path::new(href)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        vm.disks.push(ImportedDisk {
            name: stem,
            format: DiskFormat::Qcow2,
            read_only: read_only_ids.contains(id),
            source: Box::new(r),
        });
    }
    let stems = super::unique_stems(vm.disks.iter().map(|d| d.name.as_str()));
    for (d, s) in vm.disks.iter_mut().zip(stems) {
        d.name = format!("{s}.qcow2");
    }
    for (r, slot, fallback) in [
        (kernel_ref, &mut vm.kernel, "vmlinuz"),
        (initrd_ref, &mut vm.initrd, "initrd.img"),
    ] {
        if let Some(id) = r {
            let h = href(&id)?;
            let name = if crate::vm::is_safe_name(h) {
                h
            } else {
                fallback
            };
            *slot = Some(ImportedFile {
                name: name.to_string(),
                source: Box::new(files.open(h, &label)?),
            });
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
    Ok(vm)
}

enum FileData<'a> {
    Text(&'a [u8]),
    Slice(FileSlice),
}

impl FileData<'_> {
    fn digest(&self, algo: &str) -> Option<std::io::Result<String>> {
        fn run<D: Digest>(d: &FileData<'_>) -> std::io::Result<String> {
            let mut h = D::new();
            match d {
                FileData::Text(t) => h.update(t),
                FileData::Slice(s) => {
                    let mut r = s.reader();
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = std::io::Read::read(&mut r, &mut buf)?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                    }
                }
            }
            Ok(hex::encode(h.finalize()))
        }
        Some(match algo.to_ascii_uppercase().as_str() {
            "SHA256" => run::<sha2::Sha256>(self),
            "SHA512" => run::<sha2::Sha512>(self),
            "SHA1" => run::<sha1::Sha1>(self),
            _ => return None,
        })
    }
}

/// A section this reader does not know: refused when the descriptor says it is required
/// (the OVF rule), listed as dropped otherwise.
fn section_unknown(
    s: roxmltree::Node<'_, '_>,
    label: &str,
    dropped: &mut Vec<String>,
) -> Result<()> {
    let n = s.tag_name().name();
    let required = attr(s, "required").is_none_or(|r| r != "false");
    let known_optional = matches!(
        n,
        "ProductSection"
            | "EulaSection"
            | "StartupSection"
            | "DeploymentOptionSection"
            | "ResourceAllocationSection"
            | "InstallSection"
            | "AnnotationSection"
            | "Info"
    );
    if required
        && !known_optional
        && s.tag_name().namespace() != Some(NS_OVF1)
        && s.tag_name().namespace() != Some(NS_OVF2)
    {
        return Err(err(
            label,
            format!("section <{n}> is marked required and is not understood: refused"),
        ));
    }
    if n != "Info" {
        dropped.push(format!("OVF section <{n}>"));
    }
    Ok(())
}

/// Bytes per unit of an OVF/CIM allocation unit string (`byte`, `byte * 2^20`,
/// `MegaBytes`, `KB`, …).
pub fn alloc_units(u: &str) -> Option<u64> {
    let s: String = u.chars().filter(|c| !c.is_whitespace()).collect();
    let s = s.to_ascii_lowercase();
    Some(match s.as_str() {
        "byte" | "bytes" | "b" => 1,
        "kilobytes" | "kb" | "kib" => 1 << 10,
        "megabytes" | "mb" | "mib" => 1 << 20,
        "gigabytes" | "gb" | "gib" => 1 << 30,
        "terabytes" | "tb" | "tib" => 1 << 40,
        _ => {
            let rest = s.strip_prefix("byte*")?;
            let (b, e) = rest.split_once('^')?;
            let (b, e): (u64, u32) = (b.parse().ok()?, e.parse().ok()?);
            b.checked_pow(e)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(alloc_units("byte * 2^20"), Some(1 << 20));
        assert_eq!(alloc_units("MegaBytes"), Some(1 << 20));
        assert_eq!(alloc_units("byte * 10^9"), Some(1_000_000_000));
        assert_eq!(alloc_units("furlongs"), None);
        assert_eq!(alloc_units("byte * 2^99"), None);
    }

    // Vec<u8> (not [u8]) is the sized SectionSource that coerces to a trait object.
    #[allow(clippy::ptr_arg)]
    fn vm<'a>(disk: &'a Vec<u8>, kernel: &'a Vec<u8>) -> ExportVm<'a> {
        ExportVm {
            name: "t".into(),
            vcpus: 2,
            memory_mib: 128,
            cpu_template: CpuTemplate::Baseline,
            kernel: Some(kernel),
            initrd: None,
            kernel_name: "vmlinuz".into(),
            initrd_name: "initrd.img".into(),
            cmdline: "console=ttyS0 a=<b>".into(),
            disks: vec![super::super::ExportDisk {
                stem: "root".into(),
                source: disk,
                read_only: false,
            }],
        }
    }

    #[test]
    fn ova_roundtrip_and_lying_manifest() {
        let t = tempfile::tempdir().unwrap();
        let mut disk = vec![0u8; 4 << 20];
        disk[1 << 20..(1 << 20) + 5000].fill(0xab);
        let kernel = vec![0x42u8; 3000];
        let p = t.path().join("t.ova");
        let f = std::fs::File::create(&p).unwrap();
        export_ova(&vm(&disk, &kernel), f, "t", OvfVersion::V1, 0, &()).unwrap();
        let got = import(&p, true).unwrap();
        // The OVF 2.0 namespace reads the same.
        let p2 = t.path().join("t2.ova");
        export_ova(
            &vm(&disk, &kernel),
            std::fs::File::create(&p2).unwrap(),
            "t",
            OvfVersion::V2,
            0,
            &(),
        )
        .unwrap();
        assert_eq!(import(&p2, true).unwrap().memory_mib, Some(128));
        assert_eq!(got.vcpus, 2);
        assert_eq!(got.memory_mib, Some(128));
        assert_eq!(got.cpu_template, CpuTemplate::Baseline);
        assert_eq!(got.cmdline, "console=ttyS0 a=<b>");
        assert_eq!(got.disks.len(), 1);
        let mut back = vec![0u8; disk.len()];
        got.disks[0].source.read_at(&mut back, 0).unwrap();
        assert!(back == disk);
        // Alter one byte of the kernel: the manifest no longer matches.
        let mut bytes = std::fs::read(&p).unwrap();
        let i = bytes
            .windows(64)
            .position(|w| w.iter().all(|&b| b == 0x42))
            .unwrap();
        bytes[i] = 0x43;
        std::fs::write(&p, &bytes).unwrap();
        let e = import(&p, false).err().unwrap().to_string();
        assert!(
            e.contains("SHA256(vmlinuz)") && e.contains("refused"),
            "{e}"
        );
    }
}
