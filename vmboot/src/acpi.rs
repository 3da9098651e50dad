//! ACPI tables for Linux guests: RSDP, XSDT, FADT (hardware-reduced), MADT and a DSDT, the
//! last two generated from the device registry ([`DeviceManager`]).
//!
//! With a hardware-reduced FADT Linux allocates only the interrupts ACPI names, so every
//! device that raises one must be in the DSDT: COM1 (`PNP0501`, else the 8250 driver's
//! `request_irq(4)` fails and `/dev/console` writes get EIO), the i8042 (`PNP0303`) and the
//! virtio-mmio windows.
//!
//! Stock distribution kernels do not honour `virtio_mmio.device=` (Debian builds without
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`), but their virtio-mmio driver binds to ACPI devices
//! with `_HID "LNRO0005"`, so the DSDT is how they find the disks. The tables live in the
//! BIOS area at 0xe0000, where Linux scans for the RSDP, below the MP table at 0xf0000.

use crate::boot::{Context, Error, Result};
use crate::device_manager::{AcpiId, DeviceManager};
use crate::memory::GuestRam;
use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Memory32Fixed, Name, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

/// Where the RSDP goes (Linux scans 0xe0000..0xfffff for it).
pub const RSDP_ADDR: u64 = 0xe0000;
/// The tables must end before the VM generation ID's page (below the MP table, see
/// `crate::mptable`).
const TABLES_END: u64 = crate::devices::vmgenid::ADDR;
const OEM_ID: [u8; 6] = *b"VMBOOT";
const OEM_TABLE_ID: [u8; 8] = *b"VMBOOT  ";
const OEM_REVISION: u32 = 1;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// IA-PC boot architecture flags: an i8042 exists; no VGA, no MSI, no CMOS RTC.
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_MSI: u16 = 1 << 3;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

fn table_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT: under `\_SB`, one node per registered device that has an ACPI id, with its
/// ports, MMIO window and interrupt from the registry.
pub fn dsdt(dm: &DeviceManager) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    let mut virtio_index = 0u32;
    for d in dm.devices() {
        let Some(acpi) = &d.acpi else { continue };
        let ios: Vec<IO> = d
            .pio
            .iter()
            .map(|&(base, len)| IO::new(base as u16, base as u16, 1, len as u8))
            .collect();
        let mem = d
            .mmio
            .map(|(base, len)| Memory32Fixed::new(true, base as u32, len as u32));
        // Edge-triggered, active high, exclusive: irqfds pulse the IOAPIC pin.
        let irq = d.gsi.map(|g| Interrupt::new(true, true, false, false, g));
        let mut res: Vec<&dyn Aml> = ios.iter().map(|i| i as &dyn Aml).collect();
        if let Some(m) = &mem {
            res.push(m);
        }
        if let Some(i) = &irq {
            res.push(i);
        }
        let crs = ResourceTemplate::new(res);
        let crs = Name::new("_CRS".into(), &crs);
        match acpi {
            AcpiId::Pnp { hid, name } => {
                let eisa = EISAName::new(hid);
                let hid = Name::new("_HID".into(), &eisa);
                let uid = Name::new("_UID".into(), &aml::ZERO);
                Device::new(Path::new(name), vec![&hid, &uid, &crs]).to_aml_bytes(&mut body);
            }
            AcpiId::VirtioMmio => {
                let name = format!("V{virtio_index:03}");
                let hid = Name::new("_HID".into(), &"LNRO0005");
                let uid = Name::new("_UID".into(), &virtio_index);
                // Cache-coherent DMA: the device reads guest RAM through the host's
                // coherent view.
                let cca = Name::new("_CCA".into(), &aml::ONE);
                Device::new(Path::new(&name), vec![&hid, &uid, &cca, &crs]).to_aml_bytes(&mut body);
                virtio_index += 1;
            }
            AcpiId::VmGenId { addr } => vmgenid(*addr, d.gsi, &crs, &mut body),
        }
    }
    let body = RawAml(&body);
    Scope::new("\\_SB_".into(), vec![&body]).to_aml_bytes(&mut dsdt);
    dsdt.as_slice().to_vec()
}

/// The VM generation ID (`\_SB.VGEN`: what Linux's `vmgenid` driver and Windows look for;
/// `ADDR` gives the ID's address as a package of two 32-bit halves) and, with a `gsi`, the
/// Generic Event Device (`\_SB.GED0`, `ACPI0013`) whose `_EVT` notifies it when that line
/// is raised (`crs`, its `_CRS`, names the line).
fn vmgenid(addr: u64, gsi: Option<u32>, crs: &dyn Aml, body: &mut Vec<u8>) {
    let hid = Name::new("_HID".into(), &"VMGENCTR");
    let cid = Name::new("_CID".into(), &"VM_Gen_Counter");
    let ddn = Name::new("_DDN".into(), &"VM_Gen_Counter");
    let (low, high) = (addr as u32, (addr >> 32) as u32);
    let pkg = aml::Package::new(vec![&low, &high]);
    let ret = aml::Return::new(&pkg);
    let method = aml::Method::new("ADDR".into(), 0, false, vec![&ret]);
    Device::new(Path::new("VGEN"), vec![&hid, &cid, &ddn, &method]).to_aml_bytes(body);
    let Some(gsi) = gsi else { return };
    let hid = Name::new("_HID".into(), &"ACPI0013");
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let target = Path::new("\\_SB_.VGEN");
    let notify = aml::Notify::new(&target, &0x80u8);
    let is_ours = aml::Equal::new(&aml::Arg(0), &gsi);
    let when = aml::If::new(&is_ours, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&when]);
    Device::new(Path::new("GED0"), vec![&hid, &uid, crs, &evt]).to_aml_bytes(body);
}

/// Already-encoded AML, spliced into a parent object.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.0);
    }
}

/// The MADT: one local APIC per vCPU (APIC ID = index), the IOAPIC (ID = vCPU count, GSI
/// base 0, as in the MP table) and an interrupt source override for each registered ISA
/// device wired differently from a PC (KVM's PIT raises GSI 0, and without the entry a
/// guest would assume the PC's usual IRQ 0 -> pin 2).
pub fn madt(vcpus: u32, dm: &DeviceManager) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR);
    // PCAT_COMPAT: KVM's dual 8259 is there too.
    madt.write_u32(40, 1);
    for id in 0..vcpus {
        // Processor Local APIC: type 0, length 8, UID, APIC ID, flags (enabled).
        madt.append_slice(&[0, 8, id as u8, id as u8, 1, 0, 0, 0]);
    }
    let mut ioapic = vec![1u8, 12, vcpus as u8, 0];
    ioapic.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    madt.append_slice(&ioapic);
    for (irq, gsi) in dm.isa_overrides() {
        // Interrupt Source Override: type 2, length 10, bus 0 (ISA), IRQ -> GSI, flags 0
        // (bus default polarity and trigger).
        let mut iso = vec![2u8, 10, 0, irq];
        iso.extend_from_slice(&gsi.to_le_bytes());
        iso.extend_from_slice(&0u16.to_le_bytes());
        madt.append_slice(&iso);
    }
    madt.as_slice().to_vec()
}

/// Builds every table for `vcpus` processors and the devices of `dm`, as `(gpa, bytes)`
/// pieces starting at [`RSDP_ADDR`].
pub fn tables(vcpus: u32, dm: &DeviceManager) -> Result<Vec<(u64, Vec<u8>)>> {
    let align = |a: u64| (a + 15) & !15;
    let xsdt_addr = align(RSDP_ADDR + Rsdp::len() as u64);
    // XSDT with 2 entries: header 36 + 16.
    let fadt_addr = align(xsdt_addr + 36 + 16);
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let fadt_len =
        table_bytes(&FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION).finalize()).len() as u64;
    let madt_addr = align(fadt_addr + fadt_len);
    let madt = madt(vcpus, dm);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let dsdt = dsdt(dm);
    if dsdt_addr + dsdt.len() as u64 > TABLES_END {
        return Err(Error::Layout(format!(
            "ACPI tables for {vcpus} vCPUs and {} devices do not fit below {TABLES_END:#x}",
            dm.devices().len()
        )));
    }
    fadt = fadt.flag(Flags::HwReducedAcpi).dsdt_64(dsdt_addr);
    fadt.iapc_boot_arch = (IAPC_8042 | IAPC_NO_VGA | IAPC_NO_MSI | IAPC_NO_CMOS_RTC).into();
    let fadt = table_bytes(&fadt.finalize());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = table_bytes(&xsdt);
    debug_assert_eq!(xsdt.len(), 36 + 16);
    let rsdp = table_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(vec![
        (RSDP_ADDR, rsdp),
        (xsdt_addr, xsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (dsdt_addr, dsdt),
    ])
}

/// Writes the tables into guest memory (Linux boots only; flat guests do not need them).
pub fn write(mem: &GuestRam, vcpus: u32, dm: &DeviceManager) -> Result<()> {
    for (gpa, bytes) in tables(vcpus, dm)? {
        mem.write(gpa, &bytes)
            .with_context(|| format!("writing ACPI table at {gpa:#x}"))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x)) == 0
    }

    pub(crate) fn registry(virtio: usize) -> DeviceManager {
        use crate::device_manager::tests::null_virtio;
        let n =
            || null_virtio().0 as std::sync::Arc<std::sync::Mutex<dyn crate::devices::BusDevice>>;
        let mut dm = DeviceManager::new();
        crate::device_manager::add_pc_devices(&mut dm, (n(), None), (n(), None), n()).unwrap();
        for i in 0..virtio {
            dm.add_virtio_mmio(&format!("virtio-blk{i}"), |_, _| Ok(null_virtio()))
                .unwrap();
        }
        dm
    }

    #[test]
    fn tables_are_consistent() {
        let t = tables(2, &registry(3)).unwrap();
        let (rsdp_at, rsdp) = &t[0];
        assert_eq!(*rsdp_at, RSDP_ADDR);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(rsdp));
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let find = |a: u64| t.iter().find(|(g, _)| *g == a).map(|(_, b)| b).unwrap();
        let xsdt = find(xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let sigs: Vec<&[u8]> = entries.iter().map(|&a| &find(a)[..4]).collect();
        assert_eq!(sigs, [b"FACP", b"APIC"]);
        let fadt = find(entries[0]);
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = find(x_dsdt);
        assert_eq!(&dsdt[..4], b"DSDT");
        for (_, b) in &t[1..] {
            let len = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, b.len());
            assert!(checksum_ok(b), "checksum of {:?}", &b[..4]);
        }
        // Three devices, each with the LNRO0005 id and its window in the DSDT.
        let hid = b"LNRO0005";
        assert_eq!(dsdt.windows(hid.len()).filter(|w| w == hid).count(), 3);
        for name in [b"COM1", b"PS2_"] {
            assert_eq!(dsdt.windows(4).filter(|w| w == name).count(), 1);
        }
        let madt = find(entries[1]);
        // 2 LAPICs (8) + IOAPIC (12) + ISO (10) after the 44-byte header.
        assert_eq!(madt.len(), 44 + 16 + 12 + 10);
        let end = t.last().map(|(g, b)| g + b.len() as u64).unwrap();
        assert!(end <= TABLES_END);
    }
}

/// The generated tables checked by an independent reader: ACPICA's disassembler.
#[cfg(test)]
mod iasl {
    use super::tests::registry;
    use super::*;
    use std::process::Command;

    /// What `iasl -d` shows of one `Device` of the DSDT.
    #[derive(Debug, Default, PartialEq)]
    struct Node {
        name: String,
        hid: String,
        io: Vec<(u64, u64)>,
        mem: Option<(u64, u64)>,
        irqs: Vec<u32>,
    }

    fn num(s: &str) -> u64 {
        let t = s.trim().trim_end_matches(',');
        let t = t
            .split_whitespace()
            .next()
            .unwrap_or(t)
            .trim_end_matches(',');
        u64::from_str_radix(t.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("{s:?}"))
    }

    fn parse_dsdt(text: &str) -> Vec<Node> {
        let mut nodes = Vec::new();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let mut i = 0;
        while i < lines.len() {
            let l = lines[i];
            if let Some(name) = l.strip_prefix("Device (").and_then(|r| r.strip_suffix(')')) {
                // iasl drops a name's trailing padding underscores.
                nodes.push(Node {
                    name: format!("{name:_<4}"),
                    ..Node::default()
                });
            } else if let Some(n) = nodes.last_mut() {
                if l.starts_with("Name (_HID") {
                    let q: Vec<&str> = l.split('"').collect();
                    n.hid = q[1].to_string();
                } else if l.starts_with("IO (Decode16") {
                    // Minimum, maximum, alignment, length on the next four lines.
                    n.io.push((num(lines[i + 1]), num(lines[i + 4])));
                } else if l.starts_with("Memory32Fixed (") {
                    n.mem = Some((num(lines[i + 1]), num(lines[i + 2])));
                } else if l.starts_with("Interrupt (") {
                    let mut j = i + 2;
                    while lines[j] != "}" {
                        n.irqs.push(num(lines[j]) as u32);
                        j += 1;
                    }
                    assert!(
                        l.contains("ResourceConsumer, Edge, ActiveHigh, Exclusive"),
                        "{l}"
                    );
                }
            }
            i += 1;
        }
        nodes
    }

    /// Runs `iasl -d` on `bytes` saved as `name`.dat; returns the .dsl text. None (after a
    /// loud message) when iasl is not installed: scripts/test-all.sh installs it.
    fn disassemble(dir: &std::path::Path, name: &str, bytes: &[u8]) -> Option<String> {
        let dat = dir.join(format!("{name}.dat"));
        std::fs::write(&dat, bytes).unwrap();
        let out = match Command::new("iasl")
            .arg("-d")
            .arg(&dat)
            .current_dir(dir)
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                eprintln!("*** SKIPPED: iasl (Debian acpica-tools) not runnable: {e} ***");
                return None;
            }
        };
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "iasl -d {name}: {log}");
        assert!(
            !log.contains("Error") && !log.contains("Warning"),
            "iasl -d {name} complained:\n{log}"
        );
        Some(std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap())
    }

    #[test]
    fn iasl_reads_the_tables_and_they_match_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let mut dm = registry(3);
        let genid_gsi = dm
            .add_platform(
                crate::device_manager::DeviceInfo {
                    acpi: Some(AcpiId::VmGenId {
                        addr: 0x1_2345_6000,
                    }),
                    ..crate::device_manager::DeviceInfo::new("vmgenid")
                },
                |_| Ok(crate::device_manager::tests::null_virtio().1),
            )
            .unwrap();
        let Some(dsl) = disassemble(dir.path(), "dsdt", &dsdt(&dm)) else {
            return;
        };
        let mut want = Vec::new();
        for d in dm.devices() {
            let Some(acpi) = &d.acpi else { continue };
            let (name, hid) = match acpi {
                AcpiId::Pnp { hid, name } => (name.to_string(), hid.to_string()),
                AcpiId::VirtioMmio => (
                    format!(
                        "V{:03}",
                        want.iter().filter(|n: &&Node| n.hid == "LNRO0005").count()
                    ),
                    "LNRO0005".to_string(),
                ),
                AcpiId::VmGenId { .. } => {
                    want.push(Node {
                        name: "VGEN".into(),
                        hid: "VMGENCTR".into(),
                        ..Node::default()
                    });
                    ("GED0".to_string(), "ACPI0013".to_string())
                }
            };
            want.push(Node {
                name,
                hid,
                io: d.pio.clone(),
                mem: d.mmio,
                irqs: d.gsi.into_iter().collect(),
            });
        }
        let got = parse_dsdt(&dsl);
        assert_eq!(got, want, "DSDT as iasl reads it:\n{dsl}");
        // The generation ID: Linux's vmgenid driver evaluates ADDR (low and high halves of
        // the address) and is notified by the GED's _EVT for the device's line.
        let squash: String = dsl.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in [
            "Name (_CID, \"VM_Gen_Counter\")".to_string(),
            "Method (ADDR, 0, NotSerialized) { Return (Package (0x02) { 0x23456000, One }) }"
                .to_string(),
            format!(
                "Method (_EVT, 1, Serialized) // _EVT: Event {{ If ((Arg0 == {genid_gsi:#04X})) {{ Notify (\\_SB.VGEN, 0x80) // Status Change"
            )
            .replace("0X", "0x"),
        ] {
            assert!(squash.contains(&want), "{want} not in:\n{dsl}");
        }
        // COM1 and the i8042 at their PC places, as Linux's 8250 and i8042 drivers expect.
        assert!(got.contains(&Node {
            name: "COM1".into(),
            hid: "PNP0501".into(),
            io: vec![(0x3f8, 8)],
            mem: None,
            irqs: vec![4],
        }));
        assert!(got.contains(&Node {
            name: "PS2_".into(),
            hid: "PNP0303".into(),
            io: vec![(0x60, 1), (0x64, 1)],
            mem: None,
            irqs: vec![1],
        }));

        let madt_text = disassemble(dir.path(), "apic", &madt(4, &dm)).unwrap();
        // Field `key` of a block of the disassembly (the header, or one subtable).
        let field = |block: &str, key: &str| -> u64 {
            let l = block
                .lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim().ends_with(key)))
                .unwrap_or_else(|| panic!("no {key} in {block}"));
            num(l.split(':').nth(1).unwrap())
        };
        let mut blocks = madt_text.split("Subtable Type :");
        let header = blocks.next().unwrap();
        assert_eq!(field(header, "Local Apic Address"), u64::from(LAPIC_ADDR));
        let (mut lapics, mut ioapics, mut overrides) = (vec![], vec![], vec![]);
        for b in blocks {
            match num(b) {
                0 => lapics.push(field(b, "Local Apic ID")),
                1 => ioapics.push((
                    field(b, "I/O Apic ID"),
                    field(b, "Address"),
                    field(b, "Interrupt"),
                )),
                2 => overrides.push((field(b, "Source"), field(b, "Interrupt"))),
                t => panic!("unexpected MADT subtable {t}"),
            }
        }
        assert_eq!(lapics, vec![0, 1, 2, 3], "{madt_text}");
        assert_eq!(ioapics, vec![(4, u64::from(IOAPIC_ADDR), 0)], "{madt_text}");
        let want: Vec<(u64, u64)> = dm
            .isa_overrides()
            .into_iter()
            .map(|(i, g)| (u64::from(i), u64::from(g)))
            .collect();
        assert_eq!(overrides, want, "{madt_text}");
        assert_eq!(want, vec![(0, 0)]);
    }
}
