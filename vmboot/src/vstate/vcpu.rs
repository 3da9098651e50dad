//! vCPUs: their fds and kicking (leaving KVM_RUN on request), setup, state capture and
//! restore, and the crash report. The run loop that dispatches exits is the VMM's
//! (`crate::vmm`).

use crate::memory::GuestRam;
use crate::msr;
use crate::persist::VcpuState;
use anyhow::{Context, Result};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, CpuId, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::VcpuFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

/// One vCPU of a running VM.
pub struct Vcpu {
    pub id: u32,
    /// What KVM_SET_CPUID2 was given (saved instead of reading it back, see [`save`]).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub fd: Mutex<VcpuFd>,
    /// The vCPU's `kvm_run` page, for setting `immediate_exit` from other threads. Valid as
    /// long as `fd` lives.
    run: *mut kvm_bindings::kvm_run,
    /// The thread running it, while one does.
    pub thread: Mutex<Option<libc::pthread_t>>,
}

// SAFETY: `run` points into the mmap owned by `fd`, which lives as long as the struct; other
// threads only touch its `immediate_exit` byte, through an atomic.
unsafe impl Send for Vcpu {}
// SAFETY: see `Send`.
unsafe impl Sync for Vcpu {}

impl Vcpu {
    pub fn new(id: u32, mut fd: VcpuFd, cpuid: Vec<kvm_cpuid_entry2>) -> Vcpu {
        let run: *mut kvm_bindings::kvm_run = fd.get_kvm_run();
        Vcpu {
            id,
            cpuid,
            fd: Mutex::new(fd),
            run,
            thread: Mutex::new(None),
        }
    }

    /// Makes the vCPU leave KVM_RUN (or not enter it): sets `immediate_exit` and signals its
    /// thread, whose handler does nothing (the signal only has to interrupt the ioctl;
    /// `immediate_exit` covers the window where it lands just before KVM_RUN).
    pub fn kick(&self) {
        // SAFETY: `run` is valid (see the struct); KVM reads this byte on KVM_RUN entry.
        unsafe { AtomicU8::from_ptr(std::ptr::addr_of_mut!((*self.run).immediate_exit)) }
            .store(1, Ordering::SeqCst);
        if let Some(t) = *crate::devices::bus::lock(&self.thread) {
            // SAFETY: the thread is registered only while it runs (cleared before it exits).
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Captures this vCPU (see [`save`]).
    pub fn save(&self, msr_list: &[u32]) -> Result<VcpuState> {
        save(
            self.id,
            &crate::devices::bus::lock(&self.fd),
            msr_list,
            &self.cpuid,
        )
        .with_context(|| format!("saving vCPU {}", self.id))
    }
}

fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

extern "C" fn noop_handler(_: libc::c_int) {}

/// Installs the do-nothing handler of the kick signal (once per process).
pub fn install_kick_handler() -> Result<()> {
    static ONCE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: installs a handler that does nothing; no SA_RESTART so KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = noop_handler as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
        }
        Ok(())
    })
    .clone()
    .map_err(|e| anyhow::anyhow!("installing the vCPU kick signal handler: {e}"))
}

/// One KVM_RUN with `immediate_exit = 1`: KVM finishes an in-flight port IN / MMIO read
/// (register written, RIP advanced) and returns EINTR without running guest code, so a
/// saved state never holds a half-done instruction.
pub fn complete_pending_io(fd: &mut VcpuFd) {
    fd.set_kvm_immediate_exit(1);
    let _ = fd.run();
    fd.set_kvm_immediate_exit(0);
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b: Vec<u8> = l.regs[off..off + 4].iter().map(|&c| c as u8).collect();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// CPUID first (a LAPIC configured before CPUID misbehaves on this host), then LINT0 as
/// ExtINT and LINT1 as NMI so the legacy PIC reaches the CPU.
pub fn configure_new(fd: &VcpuFd, cpuid: &CpuId) -> Result<()> {
    fd.set_cpuid2(cpuid).context("KVM_SET_CPUID2")?;
    let mut l = fd.get_lapic().context("KVM_GET_LAPIC")?;
    let lint0 = lapic_reg(&l, APIC_LVT0);
    set_lapic_reg(
        &mut l,
        APIC_LVT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = lapic_reg(&l, APIC_LVT1);
    set_lapic_reg(&mut l, APIC_LVT1, with_delivery_mode(lint1, APIC_MODE_NMI));
    fd.set_lapic(&l).context("KVM_SET_LAPIC")?;
    // What firmware would leave behind: fast strings on, MTRRs on with write-back default.
    msr::write(
        fd,
        &[
            kvm_msr_entry {
                index: msr::MSR_IA32_MISC_ENABLE,
                data: 1,
                ..Default::default()
            },
            kvm_msr_entry {
                index: msr::MSR_MTRR_DEF_TYPE,
                data: (1 << 11) | 6,
                ..Default::default()
            },
        ],
    )?;
    Ok(())
}

/// Marks the boot vCPU runnable (needed with an in-kernel irqchip when the VMM set its
/// registers directly).
pub fn set_runnable(fd: &VcpuFd) -> Result<()> {
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .context("KVM_SET_MP_STATE")
}

/// Captures a vCPU that is outside KVM_RUN with any pending I/O completed.
///
/// `cpuid` is what vmboot gave the vCPU: KVM_GET_CPUID2 is not used because on some hosts
/// (PVM, seen here) it reports bits the host's KVM cannot provide, which would make the pack
/// unrestorable there.
pub fn save(
    id: u32,
    fd: &VcpuFd,
    msr_list: &[u32],
    cpuid: &[kvm_cpuid_entry2],
) -> Result<VcpuState> {
    Ok(VcpuState {
        version: crate::persist::VCPU_STATE_VERSION,
        id,
        mp_state: fd.get_mp_state().context("KVM_GET_MP_STATE")?,
        regs: fd.get_regs().context("KVM_GET_REGS")?,
        sregs: fd.get_sregs().context("KVM_GET_SREGS")?,
        xsave: fd.get_xsave().context("KVM_GET_XSAVE")?,
        xcrs: fd.get_xcrs().context("KVM_GET_XCRS")?,
        debugregs: fd.get_debug_regs().context("KVM_GET_DEBUGREGS")?,
        lapic: fd.get_lapic().context("KVM_GET_LAPIC")?,
        tsc_khz: fd.get_tsc_khz().context("KVM_GET_TSC_KHZ")?,
        cpuid: cpuid.to_vec(),
        msrs: msr::read(fd, msr_list).context("KVM_GET_MSRS")?,
        vcpu_events: fd.get_vcpu_events().context("KVM_GET_VCPU_EVENTS")?,
    })
}

/// Loads `s` into a fresh vCPU, in the order measured to work on this host (CPUID before
/// LAPIC; MSRs and events last).
pub fn restore(fd: &VcpuFd, s: &VcpuState) -> Result<()> {
    let id = s.id;
    let cpuid = CpuId::from_entries(&s.cpuid)
        .map_err(|e| anyhow::anyhow!("vCPU {id}: saved CPUID has too many entries: {e:?}"))?;
    fd.set_cpuid2(&cpuid)
        .with_context(|| format!("vCPU {id}: KVM_SET_CPUID2"))?;
    let host_khz = fd.get_tsc_khz().unwrap_or(0);
    // Within 250 ppm (Firecracker's threshold) the guest cannot tell; beyond it, ask KVM to
    // scale the TSC, which needs hardware TSC scaling.
    if s.tsc_khz != 0 && host_khz != 0 && crate::compat::tsc_differs(s.tsc_khz, host_khz) {
        if let Err(e) = fd.set_tsc_khz(s.tsc_khz) {
            eprintln!(
                "vmboot: warning: vCPU {id}: the guest was saved with a {} kHz TSC but this host \
                 runs at {host_khz} kHz and KVM cannot scale it ({e}); the guest's TSC now runs \
                 {:.4}x as fast as before, so TSC-based clocks drift by that factor",
                s.tsc_khz,
                host_khz as f64 / s.tsc_khz as f64
            );
        }
    }
    load(fd, s)
}

/// Loads `s` into a vCPU that already has its CPUID and TSC frequency (set by [`restore`]);
/// also what a reset in place does (KVM refuses a CPUID change once a vCPU has run).
pub fn load(fd: &VcpuFd, s: &VcpuState) -> Result<()> {
    let id = s.id;
    fd.set_mp_state(s.mp_state)
        .with_context(|| format!("vCPU {id}: KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs)
        .with_context(|| format!("vCPU {id}: KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs)
        .with_context(|| format!("vCPU {id}: KVM_SET_SREGS"))?;
    // SAFETY: `kvm_xsave` is the fixed 4 KiB legacy layout, exactly what KVM_SET_XSAVE reads.
    unsafe { fd.set_xsave(&s.xsave) }.with_context(|| format!("vCPU {id}: KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs)
        .with_context(|| format!("vCPU {id}: KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs)
        .with_context(|| format!("vCPU {id}: KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic)
        .with_context(|| format!("vCPU {id}: KVM_SET_LAPIC"))?;
    let (msrs, deadline) = tsc_deadline_last(&s.msrs, &s.lapic);
    msr::write(fd, &msrs).with_context(|| format!("vCPU {id}: KVM_SET_MSRS"))?;
    fd.set_vcpu_events(&s.vcpu_events)
        .with_context(|| format!("vCPU {id}: KVM_SET_VCPU_EVENTS"))?;
    // Last, once the TSC and the LAPIC's timer mode are in place: KVM arms the timer from
    // it relative to the guest's TSC.
    if let Some(d) = deadline {
        msr::write(fd, &[d]).with_context(|| format!("vCPU {id}: KVM_SET_MSRS (TSC deadline)"))?;
    }
    Ok(())
}

/// LAPIC timer mode bits (LVT timer, bits 18:17) of the TSC-deadline mode.
const LVTT_TSC_DEADLINE: u32 = 2 << 17;
const APIC_LVTT: usize = 0x320;

/// Splits off IA32_TSC_DEADLINE to be written after everything else (Firecracker does the
/// same). A deadline of 0 in TSC-deadline mode means it fired and the guest has not armed
/// the next one yet; restored as 0, KVM would leave the vCPU without timer interrupts if the
/// pending one is lost, so it becomes the saved TSC: the timer fires once more at once and
/// the guest's handler re-arms it.
fn tsc_deadline_last(
    msrs: &[kvm_msr_entry],
    lapic: &kvm_lapic_state,
) -> (Vec<kvm_msr_entry>, Option<kvm_msr_entry>) {
    let mut rest = Vec::with_capacity(msrs.len());
    let mut deadline = None;
    for m in msrs {
        if m.index == msr::MSR_IA32_TSC_DEADLINE {
            deadline = Some(*m);
        } else {
            rest.push(*m);
        }
    }
    let tsc = msrs
        .iter()
        .find(|m| m.index == msr::MSR_IA32_TSC)
        .map(|m| m.data);
    let deadline_mode = lapic_reg(lapic, APIC_LVTT) & (3 << 17) == LVTT_TSC_DEADLINE;
    if let (Some(d), Some(tsc)) = (deadline.as_mut(), tsc) {
        if d.data == 0 && deadline_mode {
            d.data = tsc;
        }
    }
    (rest, deadline)
}

const CR0_PG: u64 = 1 << 31;
const EFER_LMA: u64 = 1 << 10;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Walks 4-level page tables at `cr3` for linear address `la`.
pub fn translate_long(mem: &GuestRam, cr3: u64, la: u64) -> Option<u64> {
    let mut table = cr3 & ADDR_MASK;
    for level in (0..4u32).rev() {
        let shift = 12 + 9 * level;
        let e = mem.read_u64(table + ((la >> shift) & 511) * 8).ok()?;
        if e & 1 == 0 {
            return None;
        }
        if (level == 1 || level == 2) && e & 0x80 != 0 {
            let span = (1u64 << shift) - 1;
            return Some((e & ADDR_MASK & !span) | (la & span));
        }
        table = e & ADDR_MASK;
    }
    Some(table | (la & 0xfff))
}

/// "RIP ... CS base ... bytes at RIP ..." for a vCPU that stopped unexpectedly.
pub fn crash_report(fd: &VcpuFd, mem: &GuestRam) -> String {
    let (regs, sregs) = match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => (r, s),
        (Err(e), _) | (_, Err(e)) => return format!("(registers unavailable: {e})"),
    };
    let linear = sregs.cs.base.wrapping_add(regs.rip);
    let paged_long = sregs.cr0 & CR0_PG != 0 && sregs.efer & EFER_LMA != 0;
    let mut bytes = Vec::new();
    for i in 0..15u64 {
        let la = linear.wrapping_add(i);
        let pa = if paged_long {
            translate_long(mem, sregs.cr3, la)
        } else {
            // Real mode, or 32-bit flat protected mode: identity.
            Some(la)
        };
        match pa.and_then(|pa| mem.read(pa, 1).ok()) {
            Some(b) => bytes.push(format!("{:02x}", b[0])),
            None => break,
        }
    }
    let code = if bytes.is_empty() {
        "unreadable".to_string()
    } else {
        bytes.join(" ")
    };
    format!(
        "RIP {:#x} (CS {:#x} base {:#x}, linear {linear:#x}{}), RSP {:#x}, RFLAGS {:#x}, \
         CR0 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x}; code at RIP: {code}",
        regs.rip,
        sregs.cs.selector,
        sregs.cs.base,
        if paged_long { ", paged" } else { "" },
        regs.rsp,
        regs.rflags,
        sregs.cr0,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn the_tsc_deadline_is_written_last_and_a_spent_one_fires_again() {
        let msrs = [
            entry(msr::MSR_IA32_TSC, 5000),
            entry(msr::MSR_IA32_TSC_DEADLINE, 0),
            entry(msr::MSR_EFER, 0x500),
        ];
        let mut lapic = kvm_lapic_state::default();
        let (rest, d) = tsc_deadline_last(&msrs, &lapic);
        assert_eq!(
            rest.iter().map(|m| m.index).collect::<Vec<_>>(),
            [msr::MSR_IA32_TSC, msr::MSR_EFER]
        );
        // Not in TSC-deadline mode: 0 stays 0.
        assert_eq!(d.unwrap().data, 0);
        set_lapic_reg(&mut lapic, APIC_LVTT, LVTT_TSC_DEADLINE | 0x40);
        assert_eq!(tsc_deadline_last(&msrs, &lapic).1.unwrap().data, 5000);
        let armed = [
            entry(msr::MSR_IA32_TSC, 5000),
            entry(msr::MSR_IA32_TSC_DEADLINE, 9000),
        ];
        assert_eq!(tsc_deadline_last(&armed, &lapic).1.unwrap().data, 9000);
    }
}
