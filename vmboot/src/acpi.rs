//! ACPI tables for Linux guests: RSDP, XSDT, FADT (hardware-reduced), MADT and a DSDT that
//! describes the virtio-mmio devices.
//!
//! Stock distribution kernels do not honour `virtio_mmio.device=` (Debian builds without
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`), but their virtio-mmio driver binds to ACPI devices
//! with `_HID "LNRO0005"`, so the DSDT is how they find the disks. The tables live in the
//! BIOS area at 0xe0000, where Linux scans for the RSDP, below the MP table at 0xf0000.

use crate::devices::virtio;
use crate::memory::GuestRam;
use acpi_tables::aml::{
    self, Device, Interrupt, Memory32Fixed, Name, Path, ResourceTemplate, Scope,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use anyhow::{bail, Context, Result};

/// Where the RSDP goes (Linux scans 0xe0000..0xfffff for it).
pub const RSDP_ADDR: u64 = 0xe0000;
/// The tables must end before the MP table (see `crate::mptable`).
const TABLES_END: u64 = 0xf0000;
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

/// The DSDT: one `LNRO0005` device per virtio-mmio window, under `\_SB`.
pub fn dsdt(devices: usize) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    for i in 0..devices {
        let (base, gsi) = virtio::placement(i);
        let mem = Memory32Fixed::new(true, base as u32, virtio::MMIO_SIZE as u32);
        // Edge-triggered, active high, exclusive: the irqfd pulses the IOAPIC pin.
        let irq = Interrupt::new(true, true, false, false, gsi);
        let crs = ResourceTemplate::new(vec![&mem, &irq]);
        let name = format!("V{i:03}");
        let hid = Name::new("_HID".into(), &"LNRO0005");
        let uid_v = i as u32;
        let uid = Name::new("_UID".into(), &uid_v);
        // Cache-coherent DMA: the device reads guest RAM through the host's coherent view.
        let cca = Name::new("_CCA".into(), &aml::ONE);
        let crs = Name::new("_CRS".into(), &crs);
        Device::new(Path::new(&name), vec![&hid, &uid, &cca, &crs]).to_aml_bytes(&mut body);
    }
    let body = RawAml(&body);
    Scope::new("\\_SB_".into(), vec![&body]).to_aml_bytes(&mut dsdt);
    dsdt.as_slice().to_vec()
}

/// Already-encoded AML, spliced into a parent object.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.0);
    }
}

/// The MADT: one local APIC per vCPU (APIC ID = index), the IOAPIC (ID = vCPU count, GSI
/// base 0, as in the MP table) and an identity override for ISA IRQ 0 (KVM's PIT raises
/// GSI 0, and without the entry a guest could assume the PC's usual IRQ 0 -> pin 2).
pub fn madt(vcpus: u32) -> Vec<u8> {
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
    // Interrupt Source Override: type 2, length 10, bus 0 (ISA), IRQ 0 -> GSI 0, flags
    // 0 (bus default polarity and trigger).
    let mut iso = vec![2u8, 10, 0, 0];
    iso.extend_from_slice(&0u32.to_le_bytes());
    iso.extend_from_slice(&0u16.to_le_bytes());
    madt.append_slice(&iso);
    madt.as_slice().to_vec()
}

/// Builds every table with `vcpus` processors and `devices` virtio-mmio devices, as
/// `(gpa, bytes)` pieces starting at [`RSDP_ADDR`].
pub fn tables(vcpus: u32, devices: usize) -> Result<Vec<(u64, Vec<u8>)>> {
    let align = |a: u64| (a + 15) & !15;
    let xsdt_addr = align(RSDP_ADDR + Rsdp::len() as u64);
    // XSDT with 2 entries: header 36 + 16.
    let fadt_addr = align(xsdt_addr + 36 + 16);
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let fadt_len =
        table_bytes(&FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION).finalize()).len() as u64;
    let madt_addr = align(fadt_addr + fadt_len);
    let madt = madt(vcpus);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let dsdt = dsdt(devices);
    if dsdt_addr + dsdt.len() as u64 > TABLES_END {
        bail!(
            "ACPI tables for {vcpus} vCPUs and {devices} devices do not fit below {TABLES_END:#x}"
        );
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
pub fn write(mem: &GuestRam, vcpus: u32, devices: usize) -> Result<()> {
    for (gpa, bytes) in tables(vcpus, devices)? {
        mem.write(gpa, &bytes)
            .with_context(|| format!("writing ACPI table at {gpa:#x}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x)) == 0
    }

    #[test]
    fn tables_are_consistent() {
        let t = tables(2, 3).unwrap();
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
        let madt = find(entries[1]);
        // 2 LAPICs (8) + IOAPIC (12) + ISO (10) after the 44-byte header.
        assert_eq!(madt.len(), 44 + 16 + 12 + 10);
        let end = t.last().map(|(g, b)| g + b.len() as u64).unwrap();
        assert!(end <= TABLES_END);
    }
}
