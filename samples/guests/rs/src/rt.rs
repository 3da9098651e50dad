//! The guest's tiny runtime: entry, COM1 output, exit port, page tables for the 3..4 GiB
//! device window, IDT, local APIC + IOAPIC interrupts, a LAPIC one-shot timer, device
//! discovery and the `virtio-drivers` HAL. Shared by the binaries through `#[path]`.
//!
//! Start state (docs/CONFIG.md, flat `mode = "long"`): the first GiB identity-mapped, flat
//! segments, interrupts off. Every physical address the guest uses is its virtual address.

#![allow(dead_code)] // each binary uses a different part

use core::arch::{asm, global_asm};
use core::fmt::{self, Write};
use core::ptr::{addr_of, addr_of_mut, NonNull};
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

const COM1: u16 = 0x3f8;
const EXIT_PORT: u16 = 0xf4;

/// virtio-mmio slot i: `MMIO_BASE + i * MMIO_SIZE`, IOAPIC pin `FIRST_GSI + i` (CONFIG.md).
pub const MMIO_BASE: u64 = 0xd000_0000;
pub const MMIO_SIZE: u64 = 0x1000;
pub const FIRST_GSI: u32 = 5;
const MAX_SLOTS: usize = 19;

const LAPIC: u64 = 0xfee0_0000;
const IOAPIC: u64 = 0xfec0_0000;
/// Vector of virtio-mmio slot i's interrupt: `VEC_DEVICE + i`.
const VEC_DEVICE: u32 = 0x30;
const VEC_TIMER: u32 = 0x50;
const VEC_SPURIOUS: u32 = 0xff;

// Entry: a stack of our own (the start stack below 0x9000 is small), a zeroed .bss, then
// Rust. Exception and interrupt stubs: each pushes its vector and jumps to a common path
// that saves the registers the SysV ABI lets Rust clobber (no SSE state exists here).
global_asm!(
    r#"
    .section .text.start, "ax"
    .globl _start
_start:
    cli
    cld
    lea __stack_top(%rip), %rsp
    lea __bss_start(%rip), %rdi
    lea __bss_end(%rip), %rcx
    sub %rdi, %rcx
    xor %eax, %eax
    rep stosb
    call rt_start
2:  hlt
    jmp 2b

    .text
    .p2align 4
    .globl rt_exc_stubs
rt_exc_stubs:
    .set vec, 0
    .rept 32
    .p2align 4
    pushq $vec
    jmp rt_exc_common
    .set vec, vec + 1
    .endr

rt_exc_common:
    popq %rdi
    mov %rsp, %rsi
    and $-16, %rsp
    call rt_exception
3:  hlt
    jmp 3b

    .p2align 4
    .globl rt_irq_stubs
rt_irq_stubs:
    .set vec, 0x30
    .rept 0x30
    .p2align 4
    pushq $vec
    jmp rt_irq_common
    .set vec, vec + 1
    .endr

rt_irq_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    sub $8, %rsp
    mov 80(%rsp), %rdi
    call rt_irq
    add $8, %rsp
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $8, %rsp
    iretq

    .globl rt_spurious
rt_spurious:
    iretq
"#,
    options(att_syntax)
);

extern "C" {
    static rt_exc_stubs: u8;
    static rt_irq_stubs: u8;
    static rt_spurious: u8;
}

#[no_mangle]
extern "C" fn rt_start() -> ! {
    map_device_window();
    setup_idt();
    setup_interrupt_controllers();
    crate::guest_main()
}

// ---- console and exit ----------------------------------------------------------------

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to COM1, the PIC or the debug-exit port; no memory is touched.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) }
}

pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // vmboot's 16550 is always ready to transmit: no LSR polling (each poll is an exit).
        for b in s.bytes() {
            outb(COM1, b);
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! print {
    ($($a:tt)*) => {{ let _ = core::fmt::Write::write_fmt(&mut $crate::rt::Serial, format_args!($($a)*)); }};
}

#[macro_export]
macro_rules! println {
    ($($a:tt)*) => {{ $crate::print!($($a)*); $crate::print!("\n"); }};
}

/// Ends the VM with exit status `code` (vmboot's debug-exit port).
pub fn exit(code: u8) -> ! {
    outb(EXIT_PORT, code);
    loop {
        // SAFETY: halting with interrupts off; only reached if the exit port is absent.
        unsafe { asm!("cli; hlt") }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("panic: {info}");
    exit(9)
}

#[no_mangle]
extern "C" fn rt_exception(vector: u64, frame: *const u64) -> ! {
    // SAFETY: `frame` points at the CPU's exception frame on our stack (at least 5 qwords).
    let f = unsafe { core::slice::from_raw_parts(frame, 5) };
    println!(
        "exception {vector} frame {:#x} {:#x} {:#x}",
        f[0], f[1], f[2]
    );
    exit(6)
}

// ---- paging ------------------------------------------------------------------------------

#[repr(C, align(4096))]
struct Page([u64; 512]);

static mut DEVICE_PD: Page = Page([0; 512]);

/// Maps 3..4 GiB (virtio-mmio, IOAPIC, LAPIC) uncached with 2 MiB pages: vmboot's identity
/// map covers only the first GiB.
fn map_device_window() {
    // SAFETY: single-threaded start-up; the page directory is ours, and the PDPT is the one
    // CR3 leads to (identity-mapped low memory), whose entry 3 vmboot leaves empty.
    unsafe {
        let pd = addr_of_mut!(DEVICE_PD);
        for (i, e) in (*pd).0.iter_mut().enumerate() {
            // P | RW | PWT | PCD | PS
            *e = (0xc000_0000 + ((i as u64) << 21)) | 0x9b;
        }
        let cr3: u64;
        asm!("mov {}, cr3", out(reg) cr3);
        let mask = 0x000f_ffff_ffff_f000u64;
        let pml4 = (cr3 & mask) as *mut u64;
        let pdpt = (pml4.read_volatile() & mask) as *mut u64;
        pdpt.add(3).write_volatile(pd as u64 | 3);
        asm!("mov cr3, {}", in(reg) cr3);
    }
}

// ---- interrupts --------------------------------------------------------------------------

#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);

static mut IDT: Idt = Idt([[0; 2]; 256]);

fn gate(handler: u64) -> [u64; 2] {
    let cs: u16;
    // SAFETY: reads the code segment selector.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs) };
    let low = (handler & 0xffff)
        | (u64::from(cs) << 16)
        | (0x8e00u64 << 32)
        | ((handler >> 16) & 0xffff) << 48;
    [low, handler >> 32]
}

fn setup_idt() {
    // SAFETY: single-threaded start-up with interrupts off; the stubs are defined above.
    unsafe {
        let idt = addr_of_mut!(IDT);
        let exc = addr_of!(rt_exc_stubs) as u64;
        let irq = addr_of!(rt_irq_stubs) as u64;
        for v in 0..32 {
            (*idt).0[v] = gate(exc + 16 * v as u64);
        }
        for v in 0x30..0x60 {
            (*idt).0[v] = gate(irq + 16 * (v as u64 - 0x30));
        }
        (*idt).0[VEC_SPURIOUS as usize] = gate(addr_of!(rt_spurious) as u64);
        #[repr(C, packed)]
        struct Desc {
            limit: u16,
            base: u64,
        }
        let d = Desc {
            limit: (core::mem::size_of::<Idt>() - 1) as u16,
            base: idt as u64,
        };
        asm!("lidt [{}]", in(reg) &d);
    }
}

fn lapic_write(reg: u64, v: u32) {
    // SAFETY: the LAPIC page is mapped uncached by map_device_window.
    unsafe { ((LAPIC + reg) as *mut u32).write_volatile(v) }
}

fn ioapic_write(reg: u32, v: u32) {
    // SAFETY: IOREGSEL / IOWIN of the IOAPIC, mapped by map_device_window.
    unsafe {
        (IOAPIC as *mut u32).write_volatile(reg);
        ((IOAPIC + 0x10) as *mut u32).write_volatile(v);
    }
}

fn setup_interrupt_controllers() {
    // The 8259s: remapped away from the exception vectors and fully masked. Every GSI also
    // reaches a PIC input under KVM's default routing; only the IOAPIC path is used here.
    for (port, v) in [
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, 0xff),
        (0xa0, 0x11),
        (0xa1, 0x28),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0xa1, 0xff),
    ] {
        outb(port, v);
    }
    lapic_write(0x80, 0); // TPR: accept everything
    lapic_write(0xf0, 0x100 | VEC_SPURIOUS); // software-enable
    lapic_write(0x350, 0x1_0000); // LINT0 masked: no ExtINT from the PIC
}

/// Routes virtio-mmio slot `slot`'s GSI through the IOAPIC to this CPU (APIC ID 0), edge
/// triggered, active high (vmboot pulses the pin through an irqfd).
pub fn route_device_irq(slot: usize) {
    let pin = FIRST_GSI + slot as u32;
    ioapic_write(0x11 + 2 * pin, 0);
    ioapic_write(0x10 + 2 * pin, VEC_DEVICE + slot as u32);
}

static DEVICE_IRQS: [AtomicU32; MAX_SLOTS] = [const { AtomicU32::new(0) }; MAX_SLOTS];
static TIMER_IRQS: AtomicU32 = AtomicU32::new(0);

/// Interrupts taken so far from virtio-mmio slot `slot`.
pub fn device_irqs(slot: usize) -> u32 {
    DEVICE_IRQS[slot].load(Ordering::SeqCst)
}

#[no_mangle]
extern "C" fn rt_irq(vector: u64) {
    let v = vector as u32;
    if v == VEC_TIMER {
        TIMER_IRQS.fetch_add(1, Ordering::SeqCst);
    } else if let Some(c) = v
        .checked_sub(VEC_DEVICE)
        .and_then(|s| DEVICE_IRQS.get(s as usize))
    {
        c.fetch_add(1, Ordering::SeqCst);
    }
    lapic_write(0xb0, 0); // EOI
}

/// Sleeps in `hlt` until `done()` holds, checking it after every interrupt. Interrupts are
/// off while `done()` runs, and `sti; hlt` cannot lose a wake-up: an interrupt pending at
/// `sti` is taken only after the `hlt` has started, and ends it.
pub fn wait_for(mut done: impl FnMut() -> bool) {
    loop {
        // SAFETY: toggles IF and halts; handlers are installed.
        unsafe { asm!("cli") };
        if done() {
            // SAFETY: as above.
            unsafe { asm!("sti") };
            return;
        }
        // SAFETY: as above.
        unsafe { asm!("sti; hlt") };
    }
}

/// Sleeps `ms` milliseconds on the LAPIC one-shot timer (1 GHz bus clock, divided by 16),
/// in `hlt`: no CPU burnt, and the timer's state travels in a snapshot like the rest.
pub fn sleep_ms(ms: u32) {
    let mut left = ms;
    while left > 0 {
        let step = left.min(60_000);
        let before = TIMER_IRQS.load(Ordering::SeqCst);
        lapic_write(0x3e0, 0x3); // divide by 16
        lapic_write(0x320, VEC_TIMER); // one-shot
        lapic_write(0x380, step * 62_500);
        wait_for(|| TIMER_IRQS.load(Ordering::SeqCst) != before);
        left -= step;
    }
}

// ---- devices -----------------------------------------------------------------------------

/// A virtio-mmio slot that answers with the magic value: its index and virtio device ID.
#[derive(Clone, Copy)]
pub struct Slot {
    pub index: usize,
    pub device_id: u32,
}

/// vmboot places its virtio-mmio devices in consecutive 4 KiB slots from `MMIO_BASE`: the
/// walk stops at the first slot without the "virt" magic.
pub fn probe() -> ([Option<Slot>; MAX_SLOTS], usize) {
    let mut found = [None; MAX_SLOTS];
    let mut n = 0;
    for (i, f) in found.iter_mut().enumerate() {
        let base = MMIO_BASE + i as u64 * MMIO_SIZE;
        // SAFETY: the device window is mapped; an empty slot reads as all ones.
        let (magic, id) = unsafe {
            (
                (base as *const u32).read_volatile(),
                ((base + 8) as *const u32).read_volatile(),
            )
        };
        if magic != 0x7472_6976 {
            break;
        }
        *f = Some(Slot {
            index: i,
            device_id: id,
        });
        n += 1;
    }
    (found, n)
}

/// The MMIO transport of slot `slot` (mapped by `map_device_window`).
pub fn transport(slot: usize) -> virtio_drivers::transport::mmio::MmioTransport<'static> {
    let base = MMIO_BASE + slot as u64 * MMIO_SIZE;
    let header = NonNull::new(base as *mut virtio_drivers::transport::mmio::VirtIOHeader).unwrap();
    // SAFETY: a virtio-mmio register block of MMIO_SIZE bytes, mapped for the guest's lifetime
    // and used by one driver only.
    match unsafe { virtio_drivers::transport::mmio::MmioTransport::new(header, MMIO_SIZE as usize) }
    {
        Ok(t) => t,
        Err(e) => {
            println!("virtio-mmio slot {slot}: {e:?}");
            exit(2)
        }
    }
}

// ---- HAL for virtio-drivers --------------------------------------------------------------

const DMA_PAGES: usize = 32;

#[repr(C, align(4096))]
struct DmaPool([u8; DMA_PAGES * 4096]);

static mut DMA_POOL: DmaPool = DmaPool([0; DMA_PAGES * 4096]);
static DMA_NEXT: AtomicUsize = AtomicUsize::new(0);

/// Identity-mapped memory, a bump allocator for the rings (queues are never torn down).
pub struct GuestHal;

// SAFETY: dma_alloc hands out distinct, zeroed, page-aligned pages of the identity-mapped
// pool; physical = virtual for everything the guest owns (first GiB) and the device window.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let off = DMA_NEXT.fetch_add(pages, Ordering::SeqCst);
        if off + pages > DMA_PAGES {
            return (0, NonNull::dangling());
        }
        // SAFETY: pages off..off+pages of the pool belong to this caller alone.
        let p = unsafe { (addr_of_mut!(DMA_POOL) as *mut u8).add(off * 4096) };
        // SAFETY: as above.
        unsafe { core::ptr::write_bytes(p, 0, pages * 4096) };
        (p as u64, NonNull::new(p).unwrap())
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).unwrap()
    }

    unsafe fn share(buffer: NonNull<[u8]>, _dir: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as u64
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _dir: BufferDirection) {}
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

// ---- heap ------------------------------------------------------------------------------

const HEAP_SIZE: usize = 256 << 10;

#[repr(C, align(4096))]
struct Heap([u8; HEAP_SIZE]);

static mut HEAP: Heap = Heap([0; HEAP_SIZE]);
static HEAP_NEXT: AtomicUsize = AtomicUsize::new(0);

/// A bump allocator (`virtio-drivers`' vsock driver keeps its receive buffers and each
/// connection's buffer on the heap). Freeing the newest block gives its space back; other
/// frees are leaks, bounded by the few connections a test opens.
pub struct Bump;

// SAFETY: hands out disjoint, suitably aligned ranges of HEAP (single CPU; the atomics
// keep it sound even so).
unsafe impl core::alloc::GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
        let base = addr_of_mut!(HEAP) as usize;
        let mut cur = HEAP_NEXT.load(Ordering::SeqCst);
        loop {
            let start = (base + cur).next_multiple_of(layout.align()) - base;
            let end = start + layout.size();
            if end > HEAP_SIZE {
                return core::ptr::null_mut();
            }
            match HEAP_NEXT.compare_exchange(cur, end, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return (base + start) as *mut u8,
                Err(now) => cur = now,
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: core::alloc::Layout) {
        let base = addr_of_mut!(HEAP) as usize;
        let off = ptr as usize - base;
        let _ = HEAP_NEXT.compare_exchange(
            off + layout.size(),
            off,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
}

#[global_allocator]
static ALLOC: Bump = Bump;

// ---- VM generation ID -------------------------------------------------------------------

/// Where vmboot keeps the 16-byte VM generation ID (`vmgenid = true`, docs/CONFIG.md).
const VMGENID_ADDR: u64 = 0xef000;

/// The VM generation ID, or None if the VM has none (the page is all zeros then).
pub fn generation_id() -> Option<[u8; 16]> {
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        // SAFETY: identity-mapped guest RAM below 1 MiB; vmboot may rewrite it on a
        // restore, hence the volatile reads.
        *b = unsafe { ((VMGENID_ADDR + i as u64) as *const u8).read_volatile() };
    }
    id.iter().any(|&b| b != 0).then_some(id)
}
