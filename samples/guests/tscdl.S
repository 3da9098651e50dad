# build: load_address=0x100000
# tscdl: the LAPIC timer in TSC-deadline mode (64-bit long mode), re-armed by its own
# interrupt handler DELTA TSC cycles ahead (IA32_TSC_DEADLINE, MSR 0x6e0), as Linux's
# clockevent does. Load at 0x100000, entry 0x100000, mode "long" (samples/tscdl.toml).
# After every 100 timer interrupts it prints "tick N\n" (N = 100, 200, ...); after 60 lines
# it writes 0 to port 0xf4. Exits with status 4 if CPUID leaf 1 does not offer the
# TSC-deadline timer (ECX bit 24); any unexpected vector prints "unexpected vector" and
# exits with status 3.

	.equ	DELTA, 2500000			# ~1 ms at 2.5 GHz
	.equ	VEC_TIMER, 0x40
	.equ	VEC_LAPIC_SPURIOUS, 0xff
	.equ	TICKS_PER_LINE, 100
	.equ	LINES, 60
	.equ	MSR_TSC_DEADLINE, 0x6e0
	.equ	LVT_TSC_DEADLINE, 0x40000	# timer mode bits 18:17 = 10b

	.code64
	.text
	.globl	_start
_start:
	cli
	cld
	mov	$1, %eax
	cpuid
	bt	$24, %ecx
	jnc	no_deadline
	call	map_lapic

	xor	%ecx, %ecx
	lea	unexpected(%rip), %rax
1:	call	set_gate
	inc	%ecx
	cmp	$256, %ecx
	jb	1b
	mov	$VEC_TIMER, %ecx
	lea	timer_handler(%rip), %rax
	call	set_gate
	mov	$VEC_LAPIC_SPURIOUS, %ecx
	lea	spurious_handler(%rip), %rax
	call	set_gate
	lidt	idtr(%rip)

	mov	$LAPIC, %ebx
	movl	$0, LAPIC_TPR(%rbx)
	movl	$(0x100 | VEC_LAPIC_SPURIOUS), LAPIC_SVR(%rbx)
	movl	$(LVT_TSC_DEADLINE | VEC_TIMER), LAPIC_LVT_TIMER(%rbx)
	call	arm
	sti
wait:
	hlt
	mov	count(%rip), %rax
	cmp	next_line(%rip), %rax
	jb	wait
	mov	next_line(%rip), %rax
	addq	$TICKS_PER_LINE, next_line(%rip)
	lea	s_tick(%rip), %rsi
	call	puts
	call	print_dec
	mov	$'\n', %al
	call	putc
	incq	lines(%rip)
	cmpq	$LINES, lines(%rip)
	jb	wait
	mov	$0, %al
	jmp	exit

no_deadline:
	mov	$4, %al
	jmp	exit

# Arms the timer DELTA cycles from now.
arm:
	rdtsc
	shl	$32, %rdx
	or	%rdx, %rax
	add	$DELTA, %rax
	mov	%rax, %rdx
	shr	$32, %rdx
	mov	$MSR_TSC_DEADLINE, %ecx
	wrmsr
	ret

timer_handler:
	push	%rax
	push	%rcx
	push	%rdx
	incq	count(%rip)
	mov	$LAPIC, %eax
	movl	$0, LAPIC_EOI(%rax)
	call	arm
	pop	%rdx
	pop	%rcx
	pop	%rax
	iretq

spurious_handler:
	iretq

unexpected:
	lea	s_unexpected(%rip), %rsi
	call	puts
	mov	$3, %al
	jmp	exit

	.include "lib64.inc"
	.include "idt.inc"
	.include "lapic.inc"

s_tick:		.asciz	"tick "
s_unexpected:	.asciz	"unexpected vector\n"

	.balign	8
count:		.quad	0
next_line:	.quad	TICKS_PER_LINE
lines:		.quad	0
idtr:		.word	256 * 16 - 1
		.quad	idt

	.balign	4096
idt:		.skip	256 * 16
lapic_pd:	.skip	4096
