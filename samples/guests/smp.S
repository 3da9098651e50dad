# build: load_address=0x100000
# smp: two-vCPU test guest (64-bit long mode BSP, vcpus = 2).
# Load at 0x100000, entry 0x100000, mode "long" (samples/smp.toml).
# The BSP copies a real-mode trampoline to 0x10000 and starts APIC ID 1 with
# INIT + SIPI (vector 0x10) through the LAPIC ICR. The AP switches directly
# from real mode to long mode with the BSP's own GDT, CR3 and selectors.
# Each CPU counts 1..100 in guest memory, ~20 ms apart (~2 s run), printing
# "cpu0 N\n" / "cpu1 N\n" under a spinlock so lines never interleave. When
# both reach 100 the BSP writes 0 to port 0xf4. If the AP has not started
# within ~1 s the BSP prints "cpu1 did not start\n" and exits 1; if it does
# not finish within ~10 s after the BSP, "cpu1 timeout\n" and exit 1.

	.equ	LIMIT, 100
	.equ	TRAMPOLINE, 0x10000		# page-aligned, below 1 MiB, free by convention
	.equ	AP_APIC_ID, 1

	.code64
	.text
	.globl	_start
_start:
	cli
	cld
	call	map_lapic

	# Hand the BSP's GDT, CR3 and selectors to the AP, then copy the
	# trampoline down.
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
	movl	$0x1ff, LAPIC_SVR(%rbx)		# software-enable, spurious vector 0xff
	movl	$(AP_APIC_ID << 24), LAPIC_ICR_HI(%rbx)
	movl	$0x4500, LAPIC_ICR_LO(%rbx)	# INIT, level assert
	call	icr_wait
	call	delay_step			# >= 10 ms between INIT and SIPI
	movl	$(AP_APIC_ID << 24), LAPIC_ICR_HI(%rbx)
	movl	$(0x4600 | (TRAMPOLINE >> 12)), LAPIC_ICR_LO(%rbx)	# SIPI
	call	icr_wait

	# Wait up to ~1 s for the AP to report in.
	mov	$50, %ecx
1:	cmpq	$0, ap_alive(%rip)
	jne	bsp_loop
	call	delay_step
	dec	%ecx
	jnz	1b
	lea	s_nostart(%rip), %rsi
	call	locked_puts
	mov	$1, %al
	jmp	exit

bsp_loop:
	incq	cpu0_count(%rip)
	mov	cpu0_count(%rip), %rax
	lea	s_cpu0(%rip), %rsi
	call	print_line
	cmpq	$LIMIT, cpu0_count(%rip)
	jae	bsp_done
	call	delay_step
	jmp	bsp_loop
bsp_done:
	mov	$500, %ecx			# ~10 s
1:	cmpq	$LIMIT, cpu1_count(%rip)
	jae	2f
	call	delay_step
	dec	%ecx
	jnz	1b
	lea	s_timeout(%rip), %rsi
	call	locked_puts
	mov	$1, %al
	jmp	exit
2:	mov	$0, %al
	jmp	exit

icr_wait:
	pause
	testl	$0x1000, LAPIC_ICR_LO(%rbx)	# delivery status
	jnz	icr_wait
	ret

# print_line: "<RSI>" RAX "\n" as one unit under the serial lock.
print_line:
	call	lock_serial
	call	puts
	call	print_dec
	push	%rax
	mov	$'\n', %al
	call	putc
	pop	%rax
	jmp	unlock_serial

locked_puts:
	call	lock_serial
	call	puts
	jmp	unlock_serial

lock_serial:
	push	%rax
1:	mov	$1, %al
	xchg	%al, serial_lock(%rip)		# xchg with memory is implicitly locked
	test	%al, %al
	jz	2f
	pause
	jmp	1b
2:	pop	%rax
	ret

unlock_serial:
	movb	$0, serial_lock(%rip)
	ret

# AP entry in 64-bit mode (reached from the trampoline's far jump).
ap_long:
	mov	ap_data_sel(%rip), %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	lea	ap_stack_top(%rip), %rsp
	cld
	movq	$1, ap_alive(%rip)
ap_loop:
	incq	cpu1_count(%rip)
	mov	cpu1_count(%rip), %rax
	lea	s_cpu1(%rip), %rsi
	call	print_line
	cmpq	$LIMIT, cpu1_count(%rip)
	jae	ap_done
	call	delay_step
	jmp	ap_loop
ap_done:
	cli
	hlt
	jmp	ap_done

# Real-mode trampoline, copied to TRAMPOLINE; the AP starts at
# CS = TRAMPOLINE >> 4, IP = 0. Offsets below are relative to CS.
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
	or	$0x20, %eax			# PAE
	mov	%eax, %cr4
	mov	$0xc0000080, %ecx		# EFER.LME
	rdmsr
	or	$0x100, %eax
	wrmsr
	mov	%cr0, %eax
	or	$0x80000011, %eax		# PG | ET | PE
	mov	%eax, %cr0
	# Straight from real mode into the 64-bit code segment.
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

s_cpu0:		.asciz	"cpu0 "
s_cpu1:		.asciz	"cpu1 "
s_nostart:	.asciz	"cpu1 did not start\n"
s_timeout:	.asciz	"cpu1 timeout\n"

	.balign	8
cpu0_count:	.quad	0
cpu1_count:	.quad	0
ap_alive:	.quad	0
ap_data_sel:	.word	0
serial_lock:	.byte	0

	.balign	4096
lapic_pd:	.skip	4096
ap_stack:	.skip	4096
ap_stack_top:
