//! Which MSRs a vCPU snapshot contains.
//!
//! KVM's index list (`KVM_GET_MSR_INDEX_LIST`) misses several MSRs that a guest depends on
//! (measured on this PVM host: MTRRdefType, APIC base, EFER, FS/GS base), so they are added
//! explicitly; the union is then filtered to what the vCPU can actually read.

/// What reading or writing MSRs can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("too many MSRs ({count}): {detail}")]
    TooMany { count: usize, detail: String },
    #[error(transparent)]
    Kvm(#[from] kvm_ioctls::Error),
    /// KVM_GET_MSRS stopped early at an MSR that was known readable.
    #[error("KVM_GET_MSRS read {read} of {count} MSRs (stopped at {stopped_at:#x})")]
    Partial {
        read: usize,
        count: usize,
        stopped_at: u32,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_APICBASE: u32 = 0x1b;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_EFER: u32 = 0xc000_0080;

/// MSRs saved in addition to KVM's index list (kept if readable).
pub const EXTRA_MSRS: &[u32] = &[
    MSR_IA32_TSC,
    0x11, // MSR_KVM_WALL_CLOCK (old)
    0x12, // MSR_KVM_SYSTEM_TIME (old)
    MSR_IA32_APICBASE,
    0x174, // SYSENTER_CS
    0x175, // SYSENTER_ESP
    0x176, // SYSENTER_EIP
    0x277, // PAT
    MSR_MTRR_DEF_TYPE,
    // Fixed-range MTRRs.
    0x250,
    0x258,
    0x259,
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f,
    // Variable-range MTRRs 0..7 (base, mask).
    0x200,
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207,
    0x208,
    0x209,
    0x20a,
    0x20b,
    0x20c,
    0x20d,
    0x20e,
    0x20f,
    MSR_EFER,
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0100, // FS base
    0xc000_0101, // GS base
    0xc000_0102, // KERNEL_GS base
    0x4b56_4d00, // MSR_KVM_WALL_CLOCK_NEW
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
];

/// KVM's list plus [`EXTRA_MSRS`], without duplicates, sorted.
pub fn candidate_list(kvm_list: &[u32]) -> Vec<u32> {
    let mut v: Vec<u32> = kvm_list.iter().chain(EXTRA_MSRS).copied().collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Keeps only the MSRs `vcpu` can read. KVM_GET_MSRS stops at the first unreadable index and
/// returns how many it read, so the culprit is dropped and the read retried.
pub fn filter_readable(vcpu: &VcpuFd, mut list: Vec<u32>) -> Result<Vec<u32>> {
    loop {
        if list.is_empty() {
            return Ok(list);
        }
        let n = read_count(vcpu, &list)?;
        if n >= list.len() {
            return Ok(list);
        }
        list.remove(n);
    }
}

fn read_count(vcpu: &VcpuFd, list: &[u32]) -> Result<usize> {
    let entries: Vec<kvm_msr_entry> = list
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::TooMany {
        count: list.len(),
        detail: format!("{e:?}"),
    })?;
    Ok(vcpu.get_msrs(&mut msrs)?)
}

/// Reads `list` (all known readable).
pub fn read(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let entries: Vec<kvm_msr_entry> = list
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::TooMany {
        count: list.len(),
        detail: format!("{e:?}"),
    })?;
    let n = vcpu.get_msrs(&mut msrs)?;
    if n != list.len() {
        return Err(Error::Partial {
            read: n,
            count: list.len(),
            stopped_at: list[n],
        });
    }
    Ok(msrs.as_slice().to_vec())
}

/// Writes `entries`; an MSR this host refuses is reported on stderr and skipped, so one
/// unsupported MSR does not stop a restore.
pub fn write(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<()> {
    let mut rest: Vec<kvm_msr_entry> = entries.to_vec();
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(&rest).map_err(|e| Error::TooMany {
            count: rest.len(),
            detail: format!("{e:?}"),
        })?;
        let n = vcpu.set_msrs(&msrs)?;
        if n >= rest.len() {
            break;
        }
        log::warn!(
            "this host refused MSR {:#x} = {:#x}; skipped",
            rest[n].index,
            rest[n].data
        );
        rest.drain(..=n);
    }
    Ok(())
}
