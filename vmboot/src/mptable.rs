//! Intel MultiProcessor Specification 1.4 tables, so Linux finds the vCPUs and the IOAPIC
//! without ACPI.
//!
//! Layout: the 16-byte floating pointer at [`MPTABLE_START`] (0xf0000, inside the BIOS area
//! Linux scans), the configuration table right after it. Entries: one processor per vCPU
//! (APIC ID = vCPU index, vCPU 0 is the bootstrap processor), one ISA bus, the IOAPIC (ID =
//! vCPU count) at 0xfec00000, ISA IRQ n → IOAPIC pin n for n < 24 (KVM's default routing:
//! the PIT arrives on pin 0), and LINT0 = ExtINT / LINT1 = NMI on every local APIC.

use crate::boot::{Error, Result};
use crate::memory::GuestRam;

pub const MPTABLE_START: u64 = 0xf0000;
pub const MPTABLE_LIMIT: u64 = 0x100000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// The tables as bytes, to be placed at [`MPTABLE_START`].
pub fn build(vcpus: u32) -> Result<Vec<u8>> {
    if vcpus == 0 || vcpus > 254 {
        return Err(Error::Layout(format!(
            "MP table: {vcpus} vCPUs (1..=254 supported)"
        )));
    }
    let ioapic_id = vcpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        entries.push(0); // processor
        entries.push(id as u8);
        entries.push(APIC_VERSION);
        entries.push(if id == 0 { 0x3 } else { 0x1 }); // enabled, BSP
        entries.extend_from_slice(&0x0000_0600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x0000_0201u32.to_le_bytes()); // FPU | APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // I/O interrupt: INT, conforming polarity/trigger, ISA bus irq → IOAPIC pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts to all local APICs (0xff): LINT0 ExtINT, LINT1 NMI.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_START as u32 + 16;
    let mut hdr = Vec::with_capacity(44);
    hdr.extend_from_slice(b"PCMP");
    hdr.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    hdr.push(4); // spec revision 1.4
    hdr.push(0); // checksum, below
    hdr.extend_from_slice(b"VMBOOT  ");
    hdr.extend_from_slice(b"KVM-FLAT    ");
    hdr.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    hdr.extend_from_slice(&0u16.to_le_bytes());
    hdr.extend_from_slice(&count.to_le_bytes());
    hdr.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    hdr.extend_from_slice(&0u16.to_le_bytes()); // extended table
    hdr.push(0);
    hdr.push(0);
    let mut table = hdr;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4);
    fp.push(0); // checksum
    fp.extend_from_slice(&[0; 5]); // default config 0 = use the table; no IMCR
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    if MPTABLE_START + out.len() as u64 > MPTABLE_LIMIT {
        return Err(Error::Layout(format!(
            "MP table for {vcpus} vCPUs does not fit below 1 MiB"
        )));
    }
    Ok(out)
}

pub fn write(mem: &GuestRam, vcpus: u32) -> Result<()> {
    Ok(mem.write(MPTABLE_START, &build(vcpus)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = build(4).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        let table = &t[16..];
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        assert_eq!(
            u16::from_le_bytes([table[34], table[35]]),
            4 + 1 + 1 + 24 + 2
        );
        assert!(build(254).is_ok());
        assert!(build(255).is_err());
    }
}
