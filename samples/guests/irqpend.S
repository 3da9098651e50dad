# build: load_address=0x100000
# irqpend: a virtio completion interrupt pending across a save (64-bit long mode; load at
# 0x100000, entry 0x100000, samples/irqpend.toml). The guest routes the virtio-rng device's
# GSI (5: device 0 when the config has no disks) through the IOAPIC to vector 0x50, asks the
# device for 64 bytes with interrupts disabled, waits for the used ring, and prints
#   "pending status=S"
# where S is the device's InterruptStatus register (1: a used-buffer interrupt is raised
# and not acknowledged). It then keeps interrupts disabled for ~5 s (a test saves here), so
# the interrupt is still pending in the saved VM. Then it enables interrupts, waits up to
# ~1 s for the handler (which acknowledges the device and the LAPIC) and prints
#   "irq count=N status=S"
# (N interrupts taken, S the InterruptStatus after them), and exits 0 if exactly one came,
# 5 if none or more came, 2 if there is no virtio 1.x entropy device, 4 if the request
# never completes. Any other vector prints "unexpected vector 0xNN" and exits 3.

	.equ	MMIO, 0xd0000000
	.equ	PDPT, 0xa000		# the VMM's page tables; entry 3 maps 3..4 GiB
	.equ	PD_HIGH, 0x204000	# our page directory for 3..4 GiB (uncached)
	.equ	DESC, 0x200000
	.equ	AVAIL, 0x201000
	.equ	USED, 0x202000
	.equ	BUF, 0x203000
	.equ	HDR, 0x203200		# used only by virtio.inc's block helpers
	.equ	STATUS, 0x203300
	.equ	QSIZE, 16
	.equ	LEN, 64
	.equ	GSI, 5
	.equ	VEC, 0x50
	.equ	VEC_SPURIOUS, 0xff
	.equ	LAPIC, 0xfee00000
	.equ	IOAPIC, 0xfec00000
	.equ	PENDING_STEPS, 250	# x ~20 ms: the window for the save
	.equ	IRQ_STEPS, 50
	.equ	POLL_LIMIT, 20000000

	.code64
	.text
	.globl	_start
_start:
	cli
	cld
	call	virtio_map_mmio		# 3..4 GiB uncached: the device, the IOAPIC, the LAPIC

	xor	%ecx, %ecx
	lea	stubs(%rip), %rax
1:	call	set_gate
	add	$16, %rax
	inc	%ecx
	cmp	$256, %ecx
	jb	1b
	mov	$VEC, %ecx
	lea	irq_handler(%rip), %rax
	call	set_gate
	mov	$VEC_SPURIOUS, %ecx
	lea	spurious_handler(%rip), %rax
	call	set_gate
	lidt	idtr(%rip)

	# The 8259s see the GSI too: masked, so the IOAPIC is the one path.
	mov	$0xff, %al
	out	%al, $0x21
	out	%al, $0xa1
	mov	$LAPIC, %ebx
	movl	$0, 0x80(%rbx)			# TPR
	movl	$(0x100 | VEC_SPURIOUS), 0xf0(%rbx)	# SVR: enabled
	# IOAPIC redirection entry GSI: vector VEC, fixed, edge, active high, unmasked, to
	# APIC 0 (high dword first, so the entry is never live with a stale destination).
	mov	$IOAPIC, %ebx
	movl	$(0x11 + 2 * GSI), (%rbx)
	movl	$0, 0x10(%rbx)
	movl	$(0x10 + 2 * GSI), (%rbx)
	movl	$VEC, 0x10(%rbx)

	call	rng_setup
	jc	fail_probe
	call	request
	lea	s_pending(%rip), %rsi
	call	puts
	mov	0x60(%r12), %eax		# InterruptStatus
	call	print_dec
	call	newline
	mov	$PENDING_STEPS, %ebx
2:	call	delay_step
	dec	%ebx
	jnz	2b

	sti
	mov	$IRQ_STEPS, %ebx
3:	call	delay_step
	dec	%ebx
	jnz	3b
	cli
	lea	s_irq(%rip), %rsi
	call	puts
	mov	irq_count(%rip), %rax
	call	print_dec
	lea	s_status(%rip), %rsi
	call	puts
	mov	0x60(%r12), %eax
	call	print_dec
	call	newline
	cmpq	$1, irq_count(%rip)
	jne	fail_count
	mov	$0, %al
	jmp	exit

fail_count:
	mov	$5, %al
	jmp	exit

fail_probe:
	mov	$2, %al
	jmp	exit

irq_handler:
	push	%rax
	push	%rbx
	incq	irq_count(%rip)
	mov	$MMIO, %ebx
	mov	0x60(%rbx), %eax		# InterruptStatus
	mov	%eax, 0x64(%rbx)		# InterruptACK
	mov	$LAPIC, %ebx
	movl	$0, 0xb0(%rbx)			# EOI
	pop	%rbx
	pop	%rax
	iretq

spurious_handler:
	iretq

unexpected:
	pop	%rbx
	lea	s_unexpected(%rip), %rsi
	call	puts
	mov	%rbx, %rax
	call	print_hex
	call	newline
	mov	$3, %al
	jmp	exit

# rng_setup: virtio-mmio device 0 as an entropy device (type 4) with VERSION_1 and one
# queue of QSIZE entries that interrupts on use. Out: %r12 = MMIO; CF set if refused.
rng_setup:
	mov	$MMIO, %r12d
	movl	$0, 0x70(%r12)		# reset
	movl	$1, 0x70(%r12)		# ACKNOWLEDGE
	movl	$3, 0x70(%r12)		# DRIVER
	cmpl	$0x74726976, (%r12)	# "virt"
	jne	9f
	cmpl	$2, 4(%r12)		# version 2 (virtio 1.x layout)
	jne	9f
	cmpl	$4, 8(%r12)		# entropy device
	jne	9f
	movl	$1, 0x24(%r12)
	movl	$1, 0x20(%r12)		# VERSION_1
	movl	$0, 0x24(%r12)
	movl	$0, 0x20(%r12)
	movl	$0xb, 0x70(%r12)	# FEATURES_OK
	testl	$8, 0x70(%r12)
	jz	9f
	movl	$0, 0x30(%r12)		# queue 0
	cmpl	$QSIZE, 0x34(%r12)
	jb	9f
	movl	$QSIZE, 0x38(%r12)
	movl	$DESC, 0x80(%r12)
	movl	$0, 0x84(%r12)
	movl	$AVAIL, 0x90(%r12)
	movl	$0, 0x94(%r12)
	movl	$USED, 0xa0(%r12)
	movl	$0, 0xa4(%r12)
	movw	$0, AVAIL		# interrupts wanted
	movl	$1, 0x44(%r12)		# queue ready
	movl	$0xf, 0x70(%r12)	# DRIVER_OK
	clc
	ret
9:	stc
	ret

# request: one device-writable buffer of LEN bytes at BUF; waits (polling) until it is used.
request:
	movq	$BUF, DESC
	movl	$LEN, DESC + 8
	movw	$2, DESC + 12		# WRITE
	movw	$0, DESC + 14
	movw	$0, AVAIL + 4
	movw	$1, AVAIL + 2
	movl	$0, 0x50(%r12)		# QueueNotify
	mov	$POLL_LIMIT, %edi
1:	cmpw	$1, USED + 2
	je	2f
	pause
	dec	%edi
	jnz	1b
	lea	s_timeout(%rip), %rsi
	call	puts
	mov	$4, %al
	jmp	exit
2:	ret

newline:
	mov	$'\n', %al
	jmp	putc

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
	.include "virtio.inc"

s_pending:	.asciz	"pending status="
s_irq:		.asciz	"irq count="
s_status:	.asciz	" status="
s_unexpected:	.asciz	"unexpected vector 0x"
s_timeout:	.asciz	"request timed out\n"

	.balign	8
irq_count:	.quad	0
idtr:		.word	256 * 16 - 1
		.quad	idt

	.balign	4096
idt:		.skip	256 * 16
