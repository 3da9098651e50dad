# build: load_address=0x100000
# kvmclock: enables kvmclock (MSR_KVM_SYSTEM_TIME_NEW) and watches its PVCLOCK_GUEST_STOPPED
# flag, which the host sets (KVM_KVMCLOCK_CTRL) when it stopped the VM, so a guest does not
# take a pause for a soft lockup. Load at 0x100000, entry 0x100000, mode "long"
# (samples/kvmclock.toml). Prints "tick N" about every 0.2 s; the first time it sees the
# flag it prints "host stopped us", clears the flag (as Linux does) and keeps going. Exits 0
# after 40 ticks, printing how often it saw the flag: "stops S".

	.equ	PVTI, 0x203000			# struct pvclock_vcpu_time_info (32 bytes)
	.equ	PVTI_FLAGS, PVTI + 29
	.equ	PVCLOCK_GUEST_STOPPED, 2
	.equ	MSR_KVM_SYSTEM_TIME_NEW, 0x4b564d01
	.equ	TICKS, 40
	.equ	STEPS_PER_TICK, 10		# x ~20 ms

	.code64
	.text
	.globl	_start
_start:
	cli
	cld
	mov	$PVTI, %edi
	xor	%eax, %eax
	mov	$4, %ecx
	rep stosq
	mov	$(PVTI | 1), %eax		# enable
	xor	%edx, %edx
	mov	$MSR_KVM_SYSTEM_TIME_NEW, %ecx
	wrmsr
	xor	%r13d, %r13d			# ticks
	xor	%r14d, %r14d			# stops seen
tick:
	mov	$STEPS_PER_TICK, %ebx
1:	call	delay_step
	testb	$PVCLOCK_GUEST_STOPPED, PVTI_FLAGS
	jz	2f
	lock andb $~PVCLOCK_GUEST_STOPPED, PVTI_FLAGS
	inc	%r14d
	lea	s_stopped(%rip), %rsi
	call	puts
2:	dec	%ebx
	jnz	1b
	inc	%r13d
	lea	s_tick(%rip), %rsi
	call	puts
	mov	%r13, %rax
	call	print_dec
	mov	$'\n', %al
	call	putc
	cmp	$TICKS, %r13d
	jb	tick
	lea	s_stops(%rip), %rsi
	call	puts
	mov	%r14, %rax
	call	print_dec
	mov	$'\n', %al
	call	putc
	mov	$0, %al
	jmp	exit

	.include "lib64.inc"

s_tick:		.asciz	"tick "
s_stopped:	.asciz	"host stopped us\n"
s_stops:	.asciz	"stops "
