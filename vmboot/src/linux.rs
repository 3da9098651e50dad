//! Linux boot: bzImage or ELF vmlinux, 64-bit entry per the x86 boot protocol.
//!
//! Memory map (guest-physical):
//! - 0x500: GDT (null, null, 0x10 = 64-bit code, 0x18 = data: the boot protocol's
//!   `__BOOT_CS`/`__BOOT_DS`); 0x7000: boot_params (zero page); 0x8ff0: initial stack;
//!   0x9000-0xbfff: page tables identity-mapping the first 1 GiB; 0x20000: command line;
//!   0xf0000: MP table; 0x100000 (1 MiB): kernel.
//! - e820: RAM 0..0x9fc00, RAM 1 MiB..min(size, 3 GiB), RAM 4 GiB.. for the rest.
//! - initrd: at the top of low RAM (below the MMIO hole and `initrd_addr_max`), page-aligned.

use crate::boot::{Context, Error, Result};
use crate::flat::{setup_long_mode, BOOT_STACK, GDT_CODE64, GDT_DATA};
use crate::memory::GuestRam;
use kvm_bindings::{kvm_regs, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use std::io::Cursor;
use vm_memory::{Address, GuestAddress};

pub const ZERO_PAGE: u64 = 0x7000;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
pub const HIMEM_START: u64 = 0x100000;
/// Start of the EBDA: conventional RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

fn is_elf(image: &[u8]) -> bool {
    image.starts_with(b"\x7fELF")
}

/// The e820 map for `mem`.
pub fn e820(mem: &GuestRam) -> Vec<(u64, u64)> {
    let mut v = vec![(0, EBDA_START)];
    for (gpa, size) in mem.layout() {
        if gpa == 0 {
            if size > HIMEM_START {
                v.push((HIMEM_START, size - HIMEM_START));
            }
        } else {
            v.push((gpa, size));
        }
    }
    v
}

/// vCPU 0's registers and special registers, and where the initrd went (`(gpa, len)`).
pub type Loaded = (kvm_regs, kvm_sregs, Option<(u64, u64)>);

/// Loads kernel, initrd, command line, boot_params and page tables; returns vCPU 0's state
/// and where the initrd went (`(gpa, len)`), which a save uses to avoid storing it twice.
pub fn load(
    mem: &GuestRam,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    mut sregs: kvm_sregs,
) -> Result<Loaded> {
    let mut initrd_at = None;
    let gm = mem.memory();
    let (entry, mut hdr, kernel_end) = if is_elf(kernel) {
        let r = Elf::load(
            gm,
            None,
            &mut Cursor::new(kernel),
            Some(GuestAddress(HIMEM_START)),
        )
        .map_err(|e| Error::Payload(format!("loading ELF kernel: {e}")))?;
        let hdr = linux_loader::loader::bootparam::setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            kernel_alignment: KERNEL_MIN_ALIGNMENT,
            ..Default::default()
        };
        (r.kernel_load.raw_value(), hdr, r.kernel_end)
    } else {
        let r = BzImage::load(
            gm,
            None,
            &mut Cursor::new(kernel),
            Some(GuestAddress(HIMEM_START)),
        )
        .map_err(|e| Error::Payload(format!("loading bzImage kernel: {e}")))?;
        let hdr = r
            .setup_header
            .ok_or_else(|| Error::Payload("bzImage without a setup header".into()))?;
        if hdr.version < 0x0206 {
            return Err(Error::Payload(format!(
                "bzImage boot protocol {}.{:02} is too old (2.06+ needed for the 64-bit entry)",
                hdr.version >> 8,
                hdr.version & 0xff
            )));
        }
        if hdr.xloadflags & 1 == 0 {
            return Err(Error::Payload(
                "bzImage has no 64-bit entry point (XLF_KERNEL_64 not set)".into(),
            ));
        }
        // The 64-bit entry is 0x200 past the start of the protected-mode code.
        (r.kernel_load.raw_value() + 0x200, hdr, r.kernel_end)
    };

    let max_cmdline = if hdr.cmdline_size != 0 {
        (hdr.cmdline_size as usize + 1).min(CMDLINE_MAX)
    } else {
        CMDLINE_MAX
    };
    let cl = Cmdline::try_from(cmdline, max_cmdline)
        .map_err(|e| Error::Payload(format!("kernel command line: {e}")))?;
    load_cmdline(gm, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| Error::Payload(format!("writing the kernel command line: {e}")))?;

    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline.len() as u32;
    if hdr.kernel_alignment == 0 {
        hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }

    if let Some(initrd) = initrd {
        let mut top = mem.low_end();
        if hdr.initrd_addr_max != 0 {
            top = top.min(u64::from(hdr.initrd_addr_max) + 1);
        }
        let addr = top
            .checked_sub(initrd.len() as u64)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= kernel_end)
            .ok_or_else(|| {
                Error::Payload(format!(
                    "initrd ({} bytes) does not fit between the kernel end {kernel_end:#x} and \
                     {top:#x}; give the guest more memory",
                    initrd.len()
                ))
            })?;
        mem.write(addr, initrd).context("writing the initrd")?;
        initrd_at = Some((addr, initrd.len() as u64));
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = initrd.len() as u32;
    }

    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let map = e820(mem);
    if map.len() > params.e820_table.len() {
        return Err(Error::Layout("too many e820 entries".into()));
    }
    for (i, &(addr, size)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<crate::memory::GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        gm,
    )
    .map_err(|e| Error::Payload(format!("writing boot_params: {e}")))?;

    setup_long_mode(mem, &mut sregs, &[0, 0, GDT_CODE64, GDT_DATA], 0x10, 0x18)?;
    let regs = kvm_regs {
        rflags: 2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    Ok((regs, sregs, initrd_at))
}
