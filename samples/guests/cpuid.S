# build: load_address=0x100000
# cpuid: prints the CPUID every vCPU sees, for the template and topology tests
# (samples/cpuid.toml; any vcpus from 1 to 16). Load at 0x100000, entry 0x100000,
# mode "long".
# Each vCPU prints one line per (leaf, subleaf) in `leaves` below:
#   "cpuid APIC LEAF.SUB EAX EBX ECX EDX\n"
# (APIC: the APIC ID from leaf 1 EBX[31:24], two hex digits; LEAF eight hex
# digits; SUB two; registers eight each), all lines of one vCPU together under a
# spinlock. The BSP prints first, then starts every other vCPU with a broadcast
# INIT + SIPI (vector 0x10), waits until the count of leaf 1 EBX[23:16] has
# printed and writes "cpuid done N\n" and exit status 0; if the others have not
# all printed within ~5 s it writes "cpuid missing\n" and exits 1.

	.equ	TRAMPOLINE, 0x10000
	.equ	AP_STACK_SIZE, 1024

	.code64
	.text
	.globl	_start
_start:
	cli
	cld
	call	map_lapic
	call	dump_locked

	mov	$1, %eax
	cpuid
	shr	$16, %ebx
	and	$0xff, %ebx
	cmp	$1, %ebx
	jbe	all_done
	mov	%ebx, expected(%rip)

	sgdt	tr_gdtr(%rip)
	mov	%cr3, %rax
	mov	%eax, tr_cr3(%rip)
	mov	%cs, %ax
	mov	%ax, tr_code_sel(%rip)
	mov	%ds, %ax
	mov	%ax, ap_data_sel(%rip)
	lea	tramp_start(%rip), %rsi
	mov	$TRAMPOLINE, %edi
	mov	$(tramp_end - tramp_start), %ecx
	rep movsb

	mov	$LAPIC, %ebx
	movl	$0x1ff, LAPIC_SVR(%rbx)
	movl	$0, LAPIC_ICR_HI(%rbx)
	movl	$0xc4500, LAPIC_ICR_LO(%rbx)	# INIT to all but self, level assert
	call	icr_wait
	call	delay_step
	movl	$0, LAPIC_ICR_HI(%rbx)
	movl	$(0xc4600 | (TRAMPOLINE >> 12)), LAPIC_ICR_LO(%rbx)	# SIPI to all but self
	call	icr_wait

	mov	$250, %ecx			# ~5 s
1:	mov	printed(%rip), %eax
	inc	%eax				# the BSP's own dump
	cmp	expected(%rip), %eax
	jae	all_done
	call	delay_step
	dec	%ecx
	jnz	1b
	lea	s_missing(%rip), %rsi
	call	puts
	mov	$1, %al
	jmp	exit

all_done:
	lea	s_done(%rip), %rsi
	call	puts
	mov	printed(%rip), %eax
	inc	%eax
	call	print_dec
	mov	$'\n', %al
	call	putc
	mov	$0, %al
	jmp	exit

icr_wait:
	pause
	testl	$0x1000, LAPIC_ICR_LO(%rbx)
	jnz	icr_wait
	ret

# dump_locked: print this vCPU's lines under the serial lock.
dump_locked:
	push	%rax
1:	mov	$1, %al
	xchg	%al, serial_lock(%rip)
	test	%al, %al
	jz	2f
	pause
	jmp	1b
2:	pop	%rax
	call	dump
	movb	$0, serial_lock(%rip)
	ret

# dump: one line per entry of `leaves`.
dump:
	push	%rax
	push	%rbx
	push	%rcx
	push	%rdx
	push	%rsi
	push	%rdi
	push	%rbp
	mov	$1, %eax
	cpuid
	shr	$24, %ebx
	mov	%ebx, %ebp			# APIC ID
	lea	leaves(%rip), %rdi
1:	mov	(%rdi), %eax
	mov	4(%rdi), %ecx
	cmp	$0xffffffff, %eax
	je	9f
	lea	s_cpuid(%rip), %rsi
	call	puts
	mov	%ebp, %eax
	mov	$2, %ecx
	call	hexn
	mov	$' ', %al
	call	putc
	mov	(%rdi), %eax
	mov	$8, %ecx
	call	hexn
	mov	$'.', %al
	call	putc
	mov	4(%rdi), %eax
	mov	$2, %ecx
	call	hexn
	mov	(%rdi), %eax
	mov	4(%rdi), %ecx
	cpuid
	push	%rdx
	push	%rcx
	push	%rbx
	push	%rax
	mov	$4, %esi
2:	mov	$' ', %al
	call	putc
	pop	%rax
	mov	$8, %ecx
	call	hexn
	dec	%esi
	jnz	2b
	mov	$'\n', %al
	call	putc
	add	$8, %rdi
	jmp	1b
9:	pop	%rbp
	pop	%rdi
	pop	%rsi
	pop	%rdx
	pop	%rcx
	pop	%rbx
	pop	%rax
	ret

# hexn: write the low ECX hex digits of EAX (ECX <= 8).
hexn:
	push	%rax
	push	%rcx
	push	%rdx
	mov	%eax, %edx
	mov	$8, %eax
	sub	%ecx, %eax
	shl	$2, %eax
	xchg	%eax, %ecx			# ECX = bits to skip, EAX = digit count
	shl	%cl, %edx
	mov	%eax, %ecx
1:	rol	$4, %edx
	mov	%dl, %al
	and	$0xf, %al
	add	$'0', %al
	cmp	$'9', %al
	jbe	2f
	add	$('a' - '9' - 1), %al
2:	call	putc
	dec	%ecx
	jnz	1b
	pop	%rdx
	pop	%rcx
	pop	%rax
	ret

# AP entry in 64-bit mode: a stack per APIC ID, print, count, halt.
ap_long:
	mov	ap_data_sel(%rip), %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	$1, %eax
	cpuid
	shr	$24, %ebx
	and	$0xf, %ebx
	inc	%ebx
	shl	$10, %ebx			# (id + 1) * AP_STACK_SIZE
	lea	ap_stacks(%rip), %rsp
	add	%rbx, %rsp
	cld
	call	dump_count
1:	cli
	hlt
	jmp	1b

dump_count:
	push	%rax
1:	mov	$1, %al
	xchg	%al, serial_lock(%rip)
	test	%al, %al
	jz	2f
	pause
	jmp	1b
2:	pop	%rax
	call	dump
	incl	printed(%rip)			# under the lock
	movb	$0, serial_lock(%rip)
	ret

	.code16
	.balign	16
tramp_start:
	cli
	mov	%cs, %ax
	mov	%ax, %ds
	lgdtl	(tr_gdtr - tramp_start)
	movl	(tr_cr3 - tramp_start), %eax
	mov	%eax, %cr3
	mov	%cr4, %eax
	or	$0x20, %eax
	mov	%eax, %cr4
	mov	$0xc0000080, %ecx
	rdmsr
	or	$0x100, %eax
	wrmsr
	mov	%cr0, %eax
	or	$0x80000011, %eax
	mov	%eax, %cr0
	.byte	0x66, 0xea
	.long	ap_long
tr_code_sel:
	.word	0x08
	.balign	8
tr_gdtr:
	.word	0
	.quad	0
tr_cr3:
	.long	0
tramp_end:

	.code64
	.include "lib64.inc"
	.include "lapic.inc"

s_cpuid:	.asciz	"cpuid "
s_done:		.asciz	"cpuid done "
s_missing:	.asciz	"cpuid missing\n"

	.balign	4
# (leaf, subleaf) pairs, ended by 0xffffffff.
leaves:
	.long	0x0, 0
	.long	0x1, 0
	.long	0x4, 0
	.long	0x4, 1
	.long	0x4, 2
	.long	0x4, 3
	.long	0x6, 0
	.long	0x7, 0
	.long	0x7, 1
	.long	0xa, 0
	.long	0xb, 0
	.long	0xb, 1
	.long	0xb, 2
	.long	0xd, 0
	.long	0xd, 1
	.long	0xd, 2
	.long	0xd, 5
	.long	0xd, 6
	.long	0xd, 7
	.long	0x1f, 0
	.long	0x1f, 1
	.long	0x1f, 2
	.long	0x80000000, 0
	.long	0x80000001, 0
	.long	0x80000008, 0
	.long	0xffffffff, 0
expected:	.long	1
printed:	.long	0
ap_data_sel:	.word	0
serial_lock:	.byte	0

	.balign	4096
lapic_pd:	.skip	4096
ap_stacks:	.skip	AP_STACK_SIZE * 17
