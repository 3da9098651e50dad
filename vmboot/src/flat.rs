//! Start state for flat binary guests, and the long-mode setup shared with Linux boot.
//!
//! The layout is a contract with guest authors (docs/CONFIG.md):
//! - long mode: GDT at 0x500 (null, 0x08 = 64-bit code, 0x10 = data), IDT limit 0, PML4 at
//!   0x9000, PDPT at 0xa000, PD at 0xb000 identity-mapping the first 1 GiB with 2 MiB pages,
//!   CR0 = PE|ET|NE|PG, CR4 = PAE, EFER = LME|LMA, RSP = 0x8ff0, RFLAGS = 0x2,
//!   RDI = RAM size in bytes, other GPRs 0.
//! - real mode: all selectors and bases 0 (limit 0xffff), IP = entry, SP = 0x7000,
//!   FLAGS = 0x2, EDI = RAM size (clamped to 0xffffffff).

use crate::boot::{Error, Result};
use crate::memory::GuestRam;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vmpack_formats::config::{FlatBoot, StartMode};

pub const GDT_ADDR: u64 = 0x500;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const REAL_MODE_STACK: u64 = 0x7000;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// 64-bit code, present, DPL 0, readable, 4 KiB granularity.
pub const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
/// Flat data, present, writable, 32-bit, 4 KiB granularity.
pub const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;

/// The kvm_segment matching GDT descriptor `desc` loaded with `selector`.
pub fn segment_from_gdt(desc: u64, selector: u16) -> kvm_segment {
    let limit = ((desc & 0xffff) | ((desc >> 32) & 0xf_0000)) as u32;
    let g = ((desc >> 55) & 1) as u8;
    kvm_segment {
        base: ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((desc >> 40) & 0xf) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g,
        avl: ((desc >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes `gdt` at [`GDT_ADDR`] and the 1 GiB identity map, and turns `sregs` into 64-bit
/// mode with `cs`/`ds` selectors (indices into `gdt`).
pub fn setup_long_mode(
    mem: &GuestRam,
    sregs: &mut kvm_sregs,
    gdt: &[u64],
    cs: u16,
    ds: u16,
) -> Result<()> {
    if mem.low_end() < PD_ADDR + 0x1000 {
        return Err(Error::Layout(
            "guest RAM too small for the long-mode page tables (needs 48 KiB)".into(),
        ));
    }
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write(GDT_ADDR, &bytes)?;
    mem.write(PML4_ADDR, &(PDPT_ADDR | 3).to_le_bytes())?;
    mem.write(PDPT_ADDR, &(PD_ADDR | 3).to_le_bytes())?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    mem.write(PD_ADDR, &pd)?;

    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let code = segment_from_gdt(gdt[usize::from(cs >> 3)], cs);
    let data = segment_from_gdt(gdt[usize::from(ds >> 3)], ds);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    Ok(())
}

/// Loads the image and computes vCPU 0's registers for a flat guest.
pub fn load(
    mem: &GuestRam,
    flat: &FlatBoot,
    image: &[u8],
    mut sregs: kvm_sregs,
) -> Result<(kvm_regs, kvm_sregs)> {
    let ram = mem.size();
    let end = flat
        .load_address
        .checked_add(image.len() as u64)
        .filter(|&e| e <= mem.low_end())
        .ok_or_else(|| {
            Error::Payload(format!(
                "flat image ({} bytes at {:#x}) does not fit in guest RAM below {:#x}",
                image.len(),
                flat.load_address,
                mem.low_end()
            ))
        })?;
    let mut regs = kvm_regs {
        rflags: 2,
        rip: flat.entry,
        ..Default::default()
    };
    match flat.mode {
        StartMode::Long => {
            for (name, a, b) in [
                ("GDT", GDT_ADDR, GDT_ADDR + 24),
                ("page tables", PML4_ADDR, PD_ADDR + 0x1000),
            ] {
                if flat.load_address < b && a < end {
                    return Err(Error::Payload(format!(
                        "flat image {:#x}..{end:#x} overlaps the {name} at {a:#x}..{b:#x}; \
                         load long-mode images at 0x100000",
                        flat.load_address
                    )));
                }
            }
            setup_long_mode(mem, &mut sregs, &[0, GDT_CODE64, GDT_DATA], 0x08, 0x10)?;
            regs.rsp = BOOT_STACK;
            regs.rdi = ram;
        }
        StartMode::Real => {
            if flat.entry >= 0x10000 {
                return Err(Error::Payload(format!(
                    "real-mode entry {:#x} must be below 0x10000 (CS is 0)",
                    flat.entry
                )));
            }
            for seg in [
                &mut sregs.cs,
                &mut sregs.ds,
                &mut sregs.es,
                &mut sregs.fs,
                &mut sregs.gs,
                &mut sregs.ss,
            ] {
                seg.selector = 0;
                seg.base = 0;
                seg.limit = 0xffff;
            }
            regs.rsp = REAL_MODE_STACK;
            regs.rdi = ram.min(0xffff_ffff);
        }
    }
    mem.write(flat.load_address, image)?;
    Ok((regs, sregs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_descriptors_decode() {
        let c = segment_from_gdt(GDT_CODE64, 8);
        assert_eq!((c.l, c.db, c.type_, c.present, c.s), (1, 0, 0xb, 1, 1));
        assert_eq!(c.limit, 0xffff_ffff);
        let d = segment_from_gdt(GDT_DATA, 0x10);
        assert_eq!((d.l, d.db, d.type_, d.base), (0, 1, 3, 0));
    }
}
