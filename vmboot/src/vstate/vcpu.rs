//! vCPUs: their fds and kicking (leaving KVM_RUN on request), setup, state capture and
//! restore, the crash report, and the vCPU manager ([`VcpuManager`]): the run loop of each
//! vCPU thread, pause and resume, and how the VM ended.

use super::{Context, Error, Result};
use crate::devices::bus::lock;
use crate::devices::{Bus, IoAction};
use crate::memory::GuestRam;
use crate::msr;
use crate::persist::{Persist, VcpuState};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, CpuId, KVM_MP_STATE_RUNNABLE,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
    /// The MSRs a save captures (the VM's list, readable on this host).
    msrs: Arc<[u32]>,
}

// SAFETY: `run` points into the mmap owned by `fd`, which lives as long as the struct; other
// threads only touch its `immediate_exit` byte, through an atomic.
unsafe impl Send for Vcpu {}
// SAFETY: see `Send`.
unsafe impl Sync for Vcpu {}

impl Vcpu {
    pub fn new(id: u32, mut fd: VcpuFd, cpuid: Vec<kvm_cpuid_entry2>, msrs: Arc<[u32]>) -> Vcpu {
        let run: *mut kvm_bindings::kvm_run = fd.get_kvm_run();
        Vcpu {
            id,
            cpuid,
            fd: Mutex::new(fd),
            run,
            thread: Mutex::new(None),
            msrs,
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
}

/// What a restored vCPU is built from besides its state: a fresh vCPU fd of the new VM, and
/// the MSRs its saves capture.
pub struct VcpuArgs {
    pub fd: VcpuFd,
    pub msrs: Arc<[u32]>,
}

impl Persist<'_> for Vcpu {
    type State = VcpuState;
    type ConstructorArgs = VcpuArgs;
    const VERSION: u32 = crate::persist::VCPU_STATE_VERSION;
    type Error = Error;

    /// Only while the vCPU is outside KVM_RUN with any pending I/O completed (parked).
    fn save(&self) -> Result<VcpuState> {
        save(self.id, &lock(&self.fd), &self.msrs, &self.cpuid)
    }

    fn restore(args: VcpuArgs, s: &VcpuState) -> Result<Vcpu> {
        restore(&args.fd, s)?;
        Ok(Vcpu::new(s.id, args.fd, s.cpuid.clone(), args.msrs))
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
    .map_err(Error::KickHandler)
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
    )
    .context("KVM_SET_MSRS")?;
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
fn save(id: u32, fd: &VcpuFd, msr_list: &[u32], cpuid: &[kvm_cpuid_entry2]) -> Result<VcpuState> {
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

/// How far apart two TSC rates may be before the guest's clock visibly drifts: Firecracker's
/// threshold, 250 parts per million.
pub fn tsc_differs(saved_khz: u32, host_khz: u32) -> bool {
    let (a, b) = (saved_khz as u64, host_khz as u64);
    a.abs_diff(b) * 1_000_000 > b * 250
}

/// Loads `s` into a fresh vCPU, in the order measured to work on this host (CPUID before
/// LAPIC; MSRs and events last).
fn restore(fd: &VcpuFd, s: &VcpuState) -> Result<()> {
    let id = s.id;
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| Error::CpuidTooLarge {
        id,
        detail: format!("{e:?}"),
    })?;
    fd.set_cpuid2(&cpuid)
        .with_context(|| format!("vCPU {id}: KVM_SET_CPUID2"))?;
    let host_khz = fd.get_tsc_khz().unwrap_or(0);
    // Within 250 ppm (Firecracker's threshold) the guest cannot tell; beyond it, ask KVM to
    // scale the TSC, which needs hardware TSC scaling.
    if s.tsc_khz != 0 && host_khz != 0 && tsc_differs(s.tsc_khz, host_khz) {
        if let Err(e) = fd.set_tsc_khz(s.tsc_khz) {
            log::warn!(
                "vCPU {id}: the guest was saved with a {} kHz TSC but this host \
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

// ---- The vCPU manager: the vCPU threads, pause/kick and the run state. ----

/// Exit statuses for VM failures (guest-chosen statuses come from the debug-exit port).
pub const EXIT_TRIPLE_FAULT: i32 = 70;
pub const EXIT_INTERNAL_ERROR: i32 = 71;
pub const EXIT_FAIL_ENTRY: i32 = 72;
pub const EXIT_GUEST_CRASH: i32 = 73;
pub const EXIT_UNEXPECTED: i32 = 74;
pub const EXIT_KVM_ERROR: i32 = 75;
/// A lazily restored guest touched a memory chunk that failed verification.
pub const EXIT_CORRUPT_MEMORY: i32 = 76;

/// How a VM ended: the process exit status vmboot uses and a one-line explanation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitReason {
    pub code: i32,
    pub message: String,
}

/// Why a pause or resume did not happen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    /// The VM has ended: there is nothing to pause or resume.
    #[error("the VM has ended ({0})")]
    Ended(String),
    /// Not every vCPU parked within the time allowed; the pause was withdrawn and the VM
    /// runs on.
    #[error("timed out pausing: {parked} of {running} vCPUs parked; the VM keeps running")]
    TimedOut { parked: usize, running: usize },
}

/// How long [`VcpuManager::pause`] waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Control {
    /// Pause requested (vCPUs park as soon as they see it).
    paused: bool,
    /// vCPU threads currently parked.
    parked: usize,
    /// vCPU threads started and not yet finished.
    running: usize,
    started: bool,
    exit: Option<ExitReason>,
}

/// The vCPUs of a VM and their threads' shared state: whether a pause is requested, how many
/// threads run and are parked, and how the VM ended. Pausing is real: every vCPU thread
/// leaves KVM_RUN and parks on a condvar. A vCPU is kicked by setting `immediate_exit` in its
/// `kvm_run` page and sending it a signal whose handler does nothing (see [`Vcpu::kick`]).
/// Before parking, each vCPU does one more KVM_RUN with `immediate_exit = 1`, which
/// completes an in-flight port IN/MMIO read (data in the register, RIP past the
/// instruction) without running guest code, so the saved state never holds a half-done
/// instruction.
pub struct VcpuManager {
    vcpus: Vec<Vcpu>,
    ctl: Mutex<Control>,
    cv: Condvar,
    /// Fast-path copies of `ctl` for the vCPU loop.
    pause_flag: AtomicBool,
    stop_flag: AtomicBool,
    first_exit: OnceLock<Instant>,
}

impl VcpuManager {
    pub fn new(vcpus: Vec<Vcpu>) -> VcpuManager {
        VcpuManager {
            vcpus,
            ctl: Mutex::new(Control::default()),
            cv: Condvar::new(),
            pause_flag: AtomicBool::new(false),
            stop_flag: AtomicBool::new(false),
            first_exit: OnceLock::new(),
        }
    }

    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    /// How the VM ended, once it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        lock(&self.ctl).exit.clone()
    }

    /// True when a pause was requested and every running vCPU is parked.
    pub fn is_paused(&self) -> bool {
        let c = lock(&self.ctl);
        c.paused && c.parked >= c.running
    }

    /// True when no vCPU can be in KVM_RUN: paused, not started yet, or ended.
    pub fn is_quiescent(&self) -> bool {
        let c = lock(&self.ctl);
        !c.started || c.running == 0 || (c.paused && c.parked >= c.running)
    }

    /// Instant of vCPU 0's first exit.
    pub fn first_exit(&self) -> Option<Instant> {
        self.first_exit.get().copied()
    }

    /// Marks every vCPU thread as about to start; `Err` with the reason if the VM already
    /// ended (then no thread may start).
    pub fn begin_run(&self) -> std::result::Result<(), ExitReason> {
        let mut c = lock(&self.ctl);
        if let Some(e) = &c.exit {
            return Err(e.clone());
        }
        c.started = true;
        c.running = self.vcpus.len();
        Ok(())
    }

    /// The threads of vCPUs `idx..` could not be started: they will never run.
    pub fn not_started(&self, idx: usize) {
        lock(&self.ctl).running -= self.vcpus.len() - idx;
        self.cv.notify_all();
    }

    /// Blocks until the VM has ended and every vCPU thread has left its loop.
    pub fn wait_exit(&self) -> ExitReason {
        let mut c = lock(&self.ctl);
        while c.exit.is_none() {
            c = self.cv.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        // Wake parked vCPUs and bounce running ones out of KVM_RUN until all have finished.
        while c.running > 0 {
            drop(c);
            self.kick_all();
            c = lock(&self.ctl);
            if c.running > 0 {
                c = self
                    .cv
                    .wait_timeout(c, Duration::from_millis(20))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        c.exit.clone().expect("checked above")
    }

    /// Parks every vCPU: returns once each vCPU thread is out of KVM_RUN with its in-flight
    /// port/MMIO access completed, and has told the guest's kvmclock it was stopped. Gives
    /// up after [`PAUSE_TIMEOUT`], withdrawing the pause.
    pub fn pause(&self) -> std::result::Result<(), PauseError> {
        let mut c = lock(&self.ctl);
        if let Some(e) = &c.exit {
            return Err(PauseError::Ended(e.message.clone()));
        }
        c.paused = true;
        self.pause_flag.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while c.parked < c.running && c.exit.is_none() {
            drop(c);
            self.kick_all();
            c = lock(&self.ctl);
            if c.parked < c.running {
                c = self
                    .cv
                    .wait_timeout(c, Duration::from_millis(10))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if Instant::now() > deadline {
                // Withdrawn, so the VM is not left half paused: the parked vCPUs run again.
                c.paused = false;
                self.pause_flag.store(false, Ordering::SeqCst);
                self.cv.notify_all();
                return Err(PauseError::TimedOut {
                    parked: c.parked,
                    running: c.running,
                });
            }
        }
        drop(c);
        for v in &self.vcpus {
            tell_kvmclock_paused(&lock(&v.fd));
        }
        Ok(())
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) -> std::result::Result<(), PauseError> {
        let mut c = lock(&self.ctl);
        if let Some(e) = &c.exit {
            return Err(PauseError::Ended(e.message.clone()));
        }
        c.paused = false;
        self.pause_flag.store(false, Ordering::SeqCst);
        self.cv.notify_all();
        Ok(())
    }
}

/// Unregisters a vCPU thread when it ends, also by panic, so `run` and `pause` never wait
/// for a thread that is gone.
struct ThreadDone<'a> {
    h: &'a VcpuManager,
    idx: usize,
}

impl Drop for ThreadDone<'_> {
    fn drop(&mut self) {
        *lock(&self.h.vcpus[self.idx].thread) = None;
        if std::thread::panicking() {
            let mut c = lock(&self.h.ctl);
            if c.exit.is_none() {
                c.exit = Some(ExitReason {
                    code: EXIT_KVM_ERROR,
                    message: format!("vCPU {} thread panicked", self.idx),
                });
            }
            self.h.stop_flag.store(true, Ordering::SeqCst);
        }
        let mut c = lock(&self.h.ctl);
        c.running -= 1;
        self.h.cv.notify_all();
    }
}

enum Outcome {
    Continue,
    Exit(ExitReason),
}

impl VcpuManager {
    fn kick_all(&self) {
        for v in &self.vcpus {
            v.kick();
        }
    }

    /// Ends the VM with `reason` unless it already ended (the first reason wins).
    pub fn request_exit(&self, reason: ExitReason) {
        let mut c = lock(&self.ctl);
        if c.exit.is_none() {
            c.exit = Some(reason);
        }
        self.stop_flag.store(true, Ordering::SeqCst);
        self.cv.notify_all();
        drop(c);
        self.kick_all();
    }

    /// The body of vCPU `idx`'s thread: runs it, hands its port and MMIO exits to `pio` and
    /// `mmio`, parks it while the VM is paused, and returns once the VM has ended.
    pub fn run_loop(&self, idx: usize, pio: &Bus, mmio: &Bus, mem: &GuestRam) {
        let slot = &self.vcpus[idx];
        let _done = ThreadDone { h: self, idx };
        // SAFETY: pthread_self has no preconditions.
        *lock(&slot.thread) = Some(unsafe { libc::pthread_self() });
        loop {
            if self.pause_flag.load(Ordering::SeqCst) || self.stop_flag.load(Ordering::SeqCst) {
                complete_pending_io(&mut lock(&slot.fd));
                let mut c = lock(&self.ctl);
                if c.exit.is_some() {
                    break;
                }
                if c.paused {
                    c.parked += 1;
                    self.cv.notify_all();
                    while c.paused && c.exit.is_none() {
                        c = self.cv.wait(c).unwrap_or_else(|p| p.into_inner());
                    }
                    c.parked -= 1;
                    self.cv.notify_all();
                }
                continue;
            }
            let outcome = {
                let mut fd = lock(&slot.fd);
                self.run_once(slot.id, &mut fd, pio, mmio, mem)
            };
            if let Outcome::Exit(r) = outcome {
                self.request_exit(r);
            }
        }
    }

    fn run_once(&self, id: u32, fd: &mut VcpuFd, pio: &Bus, mmio: &Bus, mem: &GuestRam) -> Outcome {
        let exit = fd.run();
        if id == 0 {
            self.first_exit.get_or_init(Instant::now);
        }
        let fatal = |code: i32, what: String, fd: &VcpuFd| {
            Outcome::Exit(ExitReason {
                code,
                message: format!("vCPU {id}: {what}; {}", crash_report(fd, mem)),
            })
        };
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                pio.read(u64::from(port), data);
                Outcome::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => match pio.write(u64::from(port), data) {
                IoAction::Continue => Outcome::Continue,
                IoAction::Exit { code, message } => Outcome::Exit(ExitReason { code, message }),
            },
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio.read(addr, data);
                Outcome::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => match mmio.write(addr, data) {
                IoAction::Continue => Outcome::Continue,
                IoAction::Exit { code, message } => Outcome::Exit(ExitReason { code, message }),
            },
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => {
                Outcome::Continue
            }
            Ok(VcpuExit::Shutdown) => fatal(
                EXIT_TRIPLE_FAULT,
                "guest triple fault (KVM_EXIT_SHUTDOWN)".into(),
                fd,
            ),
            Ok(VcpuExit::FailEntry(reason, cpu)) => fatal(
                EXIT_FAIL_ENTRY,
                format!(
                    "KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x}, cpu {cpu})"
                ),
                fd,
            ),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
                // union member.
                let internal = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                let what = match internal.suberror {
                    1 => "emulation failure (an instruction KVM cannot emulate)".to_string(),
                    2 => "simultaneous exception".to_string(),
                    3 => "delivery event failure".to_string(),
                    s => format!("suberror {s}"),
                };
                fatal(
                    EXIT_INTERNAL_ERROR,
                    format!(
                        "KVM internal error: {what}, data {:x?}",
                        &internal.data[..n]
                    ),
                    fd,
                )
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Outcome::Exit(ExitReason {
                    code: 0,
                    message: "guest powered off".into(),
                }),
                KVM_SYSTEM_EVENT_RESET => Outcome::Exit(ExitReason {
                    code: 0,
                    message: "guest requested a reset".into(),
                }),
                KVM_SYSTEM_EVENT_CRASH => {
                    fatal(EXIT_GUEST_CRASH, "guest reported a crash".into(), fd)
                }
                k => fatal(EXIT_UNEXPECTED, format!("unexpected system event {k}"), fd),
            },
            Ok(other) => fatal(EXIT_UNEXPECTED, format!("unexpected exit {other:?}"), fd),
            Err(e) if e.errno() == libc::EINTR => {
                fd.set_kvm_immediate_exit(0);
                Outcome::Continue
            }
            // An AP's KVM_RUN returns EAGAIN once after INIT/SIPI: re-enter.
            Err(e) if e.errno() == libc::EAGAIN => Outcome::Continue,
            Err(e) => fatal(EXIT_KVM_ERROR, format!("KVM_RUN failed: {e}"), fd),
        }
    }
}

/// KVM_KVMCLOCK_CTRL: tells a guest using kvmclock that it was stopped by the host (the
/// PVCLOCK_GUEST_STOPPED flag), so the time it spent paused or saved is not taken for a
/// soft lockup. KVM refuses it (EINVAL) when the guest has not enabled kvmclock: nothing to
/// tell then.
pub fn tell_kvmclock_paused(fd: &VcpuFd) {
    let _ = fd.kvmclock_ctrl();
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
