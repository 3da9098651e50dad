//! The VM config: one TOML schema shared by `vmboot`, `vmpack pack` and the packs themselves.
//!
//! The schema is documented in `docs/CONFIG.md`. Parsing is strict: unknown keys are errors,
//! and every error names the file, line and column.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// Guests smaller than this cannot hold a Linux kernel's boot structures and page tables.
pub const MIN_LINUX_MEMORY_MIB: u64 = 16;
/// 64 GiB: the largest guest we test and document.
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;
/// One less than the xAPIC broadcast ID.
pub const MAX_VCPUS: u32 = 254;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub cpu_template: CpuTemplate,
    /// A virtio-rng entropy device (after the disks).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rng: bool,
    /// A VM generation ID (ACPI `VMGENCTR`), fresh on every restore.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vmgenid: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flat: Option<FlatBoot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelBoot>,
    #[serde(default, rename = "disk", skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices over host taps (after the disks and the rng).
    #[serde(default, rename = "net", skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    #[serde(default)]
    pub serial: SerialConfig,
    /// A virtio-vsock device (after the disks and the entropy device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
}

fn default_vcpus() -> u32 {
    1
}

/// The CPU model the guest sees; each is defined bit by bit in `docs/CPU-TEMPLATES.md`.
/// In TOML a name (`host`, `x86-64-v1` or `baseline`, `x86-64-v2`, `x86-64-v3`,
/// `x86-64-v4`) or the path of a template file ending in `.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum CpuTemplate {
    /// Everything the host's KVM supports.
    #[default]
    Host,
    /// x86-64-v1 (alias `baseline`): what every x86-64 CPU has.
    Baseline,
    /// x86-64-v2: v1 plus CMPXCHG16B, LAHF/SAHF, POPCNT, SSE3, SSSE3, SSE4.1, SSE4.2.
    V2,
    /// x86-64-v3: v2 plus AVX, AVX2, BMI1, BMI2, F16C, FMA, LZCNT, MOVBE, XSAVE.
    V3,
    /// x86-64-v4: v3 plus AVX-512 F, BW, CD, DQ, VL.
    V4,
    /// A template file (`vmpack template --fit` output, or a Firecracker custom CPU
    /// template), relative to the config's folder.
    Custom(PathBuf),
}

impl Serialize for CpuTemplate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            CpuTemplate::Custom(p) => s.serialize_str(&p.to_string_lossy()),
            t => s.serialize_str(t.name()),
        }
    }
}

impl<'de> Deserialize<'de> for CpuTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Some(t) = CpuTemplate::from_name(&s) {
            return Ok(t);
        }
        if s.ends_with(".json") {
            return Ok(CpuTemplate::Custom(PathBuf::from(s)));
        }
        Err(serde::de::Error::custom(format!(
            "unknown cpu_template '{s}': expected host, x86-64-v1 (baseline), x86-64-v2, x86-64-v3, x86-64-v4 or a template file ending in .json"
        )))
    }
}

impl CpuTemplate {
    /// Every template, from the least to the most demanding named level, `host` last.
    pub const ALL: [CpuTemplate; 5] = [
        CpuTemplate::Baseline,
        CpuTemplate::V2,
        CpuTemplate::V3,
        CpuTemplate::V4,
        CpuTemplate::Host,
    ];

    /// The template a name (as in a config, including the alias `baseline`) stands for.
    pub fn from_name(name: &str) -> Option<CpuTemplate> {
        match name {
            "baseline" => Some(CpuTemplate::Baseline),
            _ => CpuTemplate::ALL.into_iter().find(|t| t.name() == name),
        }
    }

    /// The name of a named template; a custom one's is its file name.
    pub fn name(&self) -> &str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::Baseline => "x86-64-v1",
            CpuTemplate::V2 => "x86-64-v2",
            CpuTemplate::V3 => "x86-64-v3",
            CpuTemplate::V4 => "x86-64-v4",
            CpuTemplate::Custom(p) => p.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
        }
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuTemplate::Custom(p) => write!(f, "{}", p.display()),
            t => f.write_str(t.name()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlatBoot {
    pub image: PathBuf,
    pub load_address: u64,
    pub entry: u64,
    pub mode: StartMode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartMode {
    /// 16-bit real mode.
    Real,
    /// 64-bit long mode with identity-mapped low memory.
    Long,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelBoot {
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub format: DiskFormat,
    #[serde(default)]
    pub read_only: bool,
}

/// A `[[net]]` table: a virtio-net device attached to an existing host tap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The host tap interface's name (it must exist: vmboot never creates one).
    pub tap: String,
    /// The guest's MAC address; default: [`MacAddr::auto`]`(0, i)` for `[[net]]` i.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
}

/// Longest interface name Linux takes (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// Checks a host interface name: 1 to 15 bytes of ASCII letters, digits, `-`, `_` and
/// `.`, and not `.` or `..` (what `ip link` accepts, minus anything a shell or a path could
/// read differently).
pub fn check_ifname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tap name {name:?}: expected 1 to {MAX_IFNAME} characters of letters, digits, '-', '_' or '.'"
        ))
    }
}

/// An Ethernet address, written `xx:xx:xx:xx:xx:xx` (hex, either case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The locally administered unicast address of VM `clone`'s `[[net]]` `net`:
    /// `02:76:6d:HH:LL:NN` (`76:6d` is "vm"), HHLL the clone index (big endian, modulo
    /// 65536), NN the net index (modulo 256).
    pub fn auto(clone: u32, net: usize) -> MacAddr {
        MacAddr([0x02, 0x76, 0x6d, (clone >> 8) as u8, clone as u8, net as u8])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("MAC address {s:?}: expected six hex bytes like 02:00:00:00:00:01");
        let mut m = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut m {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if m[0] & 1 != 0 {
            return Err(format!(
                "MAC address {s}: a multicast address (lowest bit of the first byte set) cannot be a VM's"
            ));
        }
        Ok(MacAddr(m))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        })
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            other => Err(format!(
                "unknown disk format '{other}' (expected raw or qcow2)"
            )),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    #[serde(default)]
    pub output: SerialOutput,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// `[vsock]`: the guest's context ID and the host Unix socket of the vsock backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub cid: u64,
    /// Where `vmboot run` listens (relative to the config's folder). A restore never uses
    /// the path a pack names: `--vsock-sock`, or a socket in the restore's work folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uds_path: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialOutput {
    #[default]
    Stdout,
    File,
    None,
}

/// The boot source, exactly one per config.
#[derive(Clone, Copy, Debug)]
pub enum Boot<'a> {
    Linux(&'a KernelBoot),
    Flat(&'a FlatBoot),
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// `line`/`column` are 1-based; absent when the problem is not tied to one place.
    #[error("{path}{}: {message}", location(.line, .column))]
    Invalid {
        path: String,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
}

fn location(line: &Option<usize>, column: &Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

impl VmConfig {
    /// Reads and validates a config file; relative paths are made absolute against its folder.
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        VmConfig::parse(&text, path)
    }

    /// Parses `text` as if read from `origin`: messages name `origin`, and relative paths
    /// resolve against its folder.
    pub fn parse(text: &str, origin: &Path) -> Result<VmConfig, ConfigError> {
        let name = origin.display().to_string();
        let mut cfg: VmConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = match e.span() {
                Some(span) => {
                    let (l, c) = line_col(text, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            ConfigError::Invalid {
                path: name.clone(),
                line,
                column,
                message: e.message().trim().to_string(),
            }
        })?;
        if let Err((key, message)) = cfg.validate() {
            let (line, column) = find_key(text, key).unzip();
            return Err(ConfigError::Invalid {
                path: name,
                line,
                column,
                message,
            });
        }
        let base = origin.parent().unwrap_or(Path::new("."));
        let base = if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base
        };
        cfg.resolve_paths(base);
        Ok(cfg)
    }

    /// Checks what the TOML types cannot express. On failure returns the key the problem is
    /// about (to locate it in the text) and what was expected.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.name.trim().is_empty() {
            return Err(("name", "name must not be empty".into()));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err((
                "vcpus",
                format!("vcpus = {}: expected 1 to {MAX_VCPUS}", self.vcpus),
            ));
        }
        if self.memory_mib == 0 || self.memory_mib > MAX_MEMORY_MIB {
            return Err((
                "memory_mib",
                format!(
                    "memory_mib = {}: expected 1 to {MAX_MEMORY_MIB}",
                    self.memory_mib
                ),
            ));
        }
        match (&self.flat, &self.kernel) {
            (Some(_), Some(_)) => {
                return Err((
                    "[kernel]",
                    "both [flat] and [kernel] are given: expected exactly one boot source".into(),
                ))
            }
            (None, None) => {
                return Err((
                    "name",
                    "no boot source: expected a [kernel] or a [flat] table".into(),
                ))
            }
            (Some(flat), None) => {
                let mem = self.memory_bytes();
                if flat.load_address >= mem {
                    return Err((
                        "load_address",
                        format!(
                            "load_address {:#x} is outside the guest's {} MiB of memory",
                            flat.load_address, self.memory_mib
                        ),
                    ));
                }
                if flat.mode == StartMode::Real && flat.entry >= 0x10000 {
                    return Err((
                        "entry",
                        format!(
                            "entry {:#x}: real-mode guests start with CS = 0, so entry must be below 0x10000",
                            flat.entry
                        ),
                    ));
                }
                if flat.entry >= mem {
                    return Err((
                        "entry",
                        format!("entry {:#x} is outside guest memory", flat.entry),
                    ));
                }
            }
            (None, Some(_)) => {
                if self.memory_mib < MIN_LINUX_MEMORY_MIB {
                    return Err((
                        "memory_mib",
                        format!(
                            "memory_mib = {}: a Linux guest needs at least {MIN_LINUX_MEMORY_MIB}",
                            self.memory_mib
                        ),
                    ));
                }
            }
        }
        if let Some(v) = &self.vsock {
            // 0-2 and u32::MAX are well-known addresses; the upper 32 bits are reserved.
            if !(3..u64::from(u32::MAX)).contains(&v.cid) {
                return Err((
                    "cid",
                    format!("vsock cid = {}: expected 3 to 4294967294", v.cid),
                ));
            }
        }
        if self.serial.output == SerialOutput::File && self.serial.path.is_none() {
            return Err(("output", "serial output = \"file\" needs a path".into()));
        }
        for (i, n) in self.nets.iter().enumerate() {
            check_ifname(&n.tap).map_err(|e| ("tap", format!("[[net]] {i}: {e}")))?;
            if self.nets[..i].iter().any(|o| o.tap == n.tap) {
                return Err(("tap", format!("[[net]] {i}: tap {} is used twice", n.tap)));
            }
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(f) = &mut self.flat {
            abs(&mut f.image);
        }
        if let Some(k) = &mut self.kernel {
            abs(&mut k.path);
            if let Some(i) = &mut k.initrd {
                abs(i);
            }
        }
        for d in &mut self.disks {
            abs(&mut d.path);
        }
        if let Some(p) = &mut self.serial.path {
            abs(p);
        }
        if let CpuTemplate::Custom(p) = &mut self.cpu_template {
            abs(p);
        }
        if let Some(p) = self.vsock.as_mut().and_then(|v| v.uds_path.as_mut()) {
            abs(p);
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    pub fn boot(&self) -> Boot<'_> {
        match (&self.kernel, &self.flat) {
            (Some(k), _) => Boot::Linux(k),
            (None, Some(f)) => Boot::Flat(f),
            // validate() guarantees one of them; a hand-built config without either is a
            // programming error.
            (None, None) => panic!("VmConfig without a boot source"),
        }
    }

    /// Every host file the VM needs to boot (kernel, initrd or flat image), with a role name.
    pub fn boot_files(&self) -> Vec<(&'static str, &Path)> {
        let mut v = Vec::new();
        if let Some(k) = &self.kernel {
            v.push(("kernel", k.path.as_path()));
            if let Some(i) = &k.initrd {
                v.push(("initrd", i.as_path()));
            }
        }
        if let Some(f) = &self.flat {
            v.push(("image", f.image.as_path()));
        }
        v
    }

    pub fn to_toml_string(&self) -> String {
        // Serializing plain structs of strings, integers and enums cannot fail.
        toml::to_string_pretty(self).expect("VmConfig serializes to TOML")
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Locates `key = ...` (or a `[table]` header) in the text for error messages.
fn find_key(text: &str, key: &str) -> Option<(usize, usize)> {
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let hit = if key.starts_with('[') {
            trimmed.starts_with(key)
        } else {
            trimmed
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        };
        if hit {
            return Some((i + 1, line.len() - trimmed.len() + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::parse(text, Path::new("/cfg/vm.toml"))
    }

    const FLAT: &str = r#"
name = "counter"
memory_mib = 16
[flat]
image = "guests/bin/counter16.bin"
load_address = 0x1000
entry = 0x1000
mode = "real"
"#;

    #[test]
    fn flat_config_resolves_relative_paths() {
        let c = parse(FLAT).unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.cpu_template, CpuTemplate::Host);
        let f = c.flat.as_ref().unwrap();
        assert_eq!(f.image, Path::new("/cfg/guests/bin/counter16.bin"));
        assert_eq!(f.mode, StartMode::Real);
        assert!(matches!(c.boot(), Boot::Flat(_)));
    }

    #[test]
    fn kernel_config_with_disks() {
        let c = parse(
            r#"
name = "linux"
vcpus = 2
memory_mib = 256
cpu_template = "baseline"
[kernel]
path = "/abs/vmlinuz"
initrd = "initrd.img"
cmdline = "console=ttyS0"
[[disk]]
path = "root.qcow2"
format = "qcow2"
[[disk]]
path = "data.img"
read_only = true
[serial]
output = "file"
path = "serial.log"
"#,
        )
        .unwrap();
        let k = c.kernel.as_ref().unwrap();
        assert_eq!(k.path, Path::new("/abs/vmlinuz"));
        assert_eq!(k.initrd.as_deref(), Some(Path::new("/cfg/initrd.img")));
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].format, DiskFormat::Qcow2);
        assert_eq!(c.disks[1].format, DiskFormat::Raw);
        assert!(c.disks[1].read_only);
        assert_eq!(c.serial.path.as_deref(), Some(Path::new("/cfg/serial.log")));
        let again = VmConfig::parse(&c.to_toml_string(), Path::new("/elsewhere/x.toml")).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn unknown_key_names_file_line_column() {
        let e = parse("name = \"x\"\nmemory_mib = 16\nmemroy = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/cfg/vm.toml:3:1: "), "{e}");
        assert!(e.contains("memroy"), "{e}");
    }

    #[test]
    fn wrong_type_is_located() {
        let e = parse("name = \"x\"\nmemory_mib = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/cfg/vm.toml:2:"), "{e}");
    }

    #[test]
    fn semantic_errors_are_located() {
        let e = parse(&FLAT.replace("entry = 0x1000", "entry = 0x20000"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/cfg/vm.toml:7:1: entry 0x20000"), "{e}");
        let e = parse("name = \"x\"\nmemory_mib = 16\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no boot source"), "{e}");
        let e = parse(&FLAT.replace("memory_mib = 16", "memory_mib = 0"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/cfg/vm.toml:3:1: memory_mib = 0"), "{e}");
    }

    #[test]
    fn net_tables_are_checked() {
        let with = |net: &str| parse(&format!("{FLAT}{net}"));
        let c = with("[[net]]\ntap = \"tap0\"\nmac = \"02:AB:00:00:00:01\"\n").unwrap();
        assert_eq!(c.nets[0].mac.unwrap().to_string(), "02:ab:00:00:00:01");
        assert_eq!(MacAddr::auto(258, 1).to_string(), "02:76:6d:01:02:01");
        for (net, want) in [
            ("[[net]]\ntap = \"../x\"\n", "tap name \"../x\""),
            (
                "[[net]]\ntap = \"abcdefghijklmnop\"\n",
                "1 to 15 characters",
            ),
            (
                "[[net]]\ntap = \"a\"\n[[net]]\ntap = \"a\"\n",
                "tap a is used twice",
            ),
            (
                "[[net]]\ntap = \"a\"\nmac = \"03:00:00:00:00:01\"\n",
                "multicast",
            ),
            (
                "[[net]]\ntap = \"a\"\nmac = \"02:00:00:00:01\"\n",
                "six hex bytes",
            ),
            ("[[net]]\ntap = \"a\"\nbridge = \"br0\"\n", "unknown field"),
        ] {
            let e = with(net).unwrap_err().to_string();
            assert!(e.contains(want), "{net}: {e}");
        }
    }
}
