# build: load_address=0x100000
# timer: interrupt and timer test guest (64-bit long mode).
# Load at 0x100000, entry 0x100000, mode "long" (samples/timer.toml).
# Sets up an IDT, remaps the 8259 PIC to vectors 0x20-0x2f, runs PIT channel 0
# at 1000 Hz (IRQ0 through the PIC and LAPIC LINT0), and a periodic LAPIC
# timer (vector 0x40; divide 1, initial count 1000000, i.e. 1000 Hz with
# KVM's 1 GHz APIC bus). Each interrupt is counted in guest memory. After
# every 500 PIT ticks it prints "pit=N lapic=M\n" (N is 500, 1000, ...;
# M is the LAPIC count at that moment); after 20 lines (~10 s) it writes 0
# to port 0xf4. Any other vector prints "unexpected vector 0xNN\n" and
# exits with status 3.

	.equ	PIT_HZ_DIVISOR, 1193		# 1193182 Hz / 1193 = 1000.2 Hz
	.equ	LAPIC_INIT_COUNT, 1000000
	.equ	VEC_PIT, 0x20
	.equ	VEC_PIC_SPURIOUS_M, 0x27
	.equ	VEC_PIC_SPURIOUS_S, 0x2f
	.equ	VEC_LAPIC_TIMER, 0x40
	.equ	VEC_LAPIC_SPURIOUS, 0xff
	.equ	TICKS_PER_LINE, 500
	.equ	LINES, 20

	.code64
	.text
	.globl	_start
_start:
	cli
	cld
	call	map_lapic

	# IDT: every vector goes to its own reporting stub unless overridden.
	xor	%ecx, %ecx
	lea	stubs(%rip), %rax
1:	call	set_gate
	add	$16, %rax
	inc	%ecx
	cmp	$256, %ecx
	jb	1b
	mov	$VEC_PIT, %ecx
	lea	pit_handler(%rip), %rax
	call	set_gate
	mov	$VEC_LAPIC_TIMER, %ecx
	lea	lapic_handler(%rip), %rax
	call	set_gate
	lea	spurious_handler(%rip), %rax
	mov	$VEC_PIC_SPURIOUS_M, %ecx
	call	set_gate
	mov	$VEC_PIC_SPURIOUS_S, %ecx
	call	set_gate
	mov	$VEC_LAPIC_SPURIOUS, %ecx
	call	set_gate
	lidt	idtr(%rip)

	# 8259 pair: ICW1-4, master at 0x20, slave at 0x28, only IRQ0 unmasked.
	mov	$0x11, %al
	out	%al, $0x20
	out	%al, $0xa0
	mov	$0x20, %al
	out	%al, $0x21
	mov	$0x28, %al
	out	%al, $0xa1
	mov	$0x04, %al
	out	%al, $0x21
	mov	$0x02, %al
	out	%al, $0xa1
	mov	$0x01, %al
	out	%al, $0x21
	out	%al, $0xa1
	mov	$0xfe, %al
	out	%al, $0x21
	mov	$0xff, %al
	out	%al, $0xa1

	# PIT channel 0: lobyte/hibyte, mode 2 (rate generator).
	mov	$0x34, %al
	out	%al, $0x43
	mov	$(PIT_HZ_DIVISOR & 0xff), %al
	out	%al, $0x40
	mov	$(PIT_HZ_DIVISOR >> 8), %al
	out	%al, $0x40

	# LAPIC: software-enable, accept PIC interrupts on LINT0 as ExtINT
	# (KVM drops PIC interrupts once the LAPIC is enabled with LINT0
	# masked), then start the periodic timer; the initial count goes last
	# because writing it arms the timer.
	mov	$LAPIC, %ebx
	movl	$0, LAPIC_TPR(%rbx)
	movl	$(0x100 | VEC_LAPIC_SPURIOUS), LAPIC_SVR(%rbx)
	movl	$0x700, LAPIC_LVT_LINT0(%rbx)
	movl	$0xb, LAPIC_TIMER_DIV(%rbx)		# divide by 1
	movl	$(0x20000 | VEC_LAPIC_TIMER), LAPIC_LVT_TIMER(%rbx)
	movl	$LAPIC_INIT_COUNT, LAPIC_TIMER_INIT(%rbx)

	sti
wait:
	hlt
	mov	pit_count(%rip), %rax
	cmp	next_line(%rip), %rax
	jb	wait
	# Take both counts together so a line is one consistent sample.
	cli
	mov	pit_count(%rip), %rax
	mov	lapic_count(%rip), %rbx
	addq	$TICKS_PER_LINE, next_line(%rip)
	sti
	lea	s_pit(%rip), %rsi
	call	puts
	call	print_dec
	lea	s_lapic(%rip), %rsi
	call	puts
	mov	%rbx, %rax
	call	print_dec
	mov	$'\n', %al
	call	putc
	incq	lines(%rip)
	cmpq	$LINES, lines(%rip)
	jb	wait
	mov	$0, %al
	jmp	exit

pit_handler:
	push	%rax
	incq	pit_count(%rip)
	mov	$0x20, %al			# non-specific EOI to the master PIC
	out	%al, $0x20
	pop	%rax
	iretq

lapic_handler:
	push	%rax
	incq	lapic_count(%rip)
	mov	$LAPIC, %eax
	movl	$0, LAPIC_EOI(%rax)
	pop	%rax
	iretq

# Spurious interrupts (PIC IRQ7/15, LAPIC 0xff) must not be EOI'd.
spurious_handler:
	iretq

unexpected:
	pop	%rbx
	lea	s_unexpected(%rip), %rsi
	call	puts
	mov	%bl, %al
	shr	$4, %al
	call	hexdigit
	mov	%bl, %al
	call	hexdigit
	mov	$'\n', %al
	call	putc
	mov	$3, %al
	jmp	exit

hexdigit:
	and	$0xf, %al
	add	$'0', %al
	cmp	$'9', %al
	jbe	1f
	add	$('a' - '9' - 1), %al
1:	jmp	putc

# One 16-byte stub per vector, so stub address = stubs + 16 * vector.
	.balign	16
stubs:
	.set	vec, 0
	.rept	256
	.balign	16
	pushq	$vec
	jmp	unexpected
	.set	vec, vec + 1
	.endr

	.include "lib64.inc"
	.include "idt.inc"
	.include "lapic.inc"

s_pit:		.asciz	"pit="
s_lapic:	.asciz	" lapic="
s_unexpected:	.asciz	"unexpected vector 0x"

	.balign	8
pit_count:	.quad	0
lapic_count:	.quad	0
next_line:	.quad	TICKS_PER_LINE
lines:		.quad	0
idtr:		.word	256 * 16 - 1
		.quad	idt

	.balign	4096
idt:		.skip	256 * 16
lapic_pd:	.skip	4096
