# Minimal /init for the Linux sample's initramfs (x86-64, static, no libc).
# Integer-only like the flat guests, because the emulated KVM on the
# project's machines cannot run SSE/x87 user code. It prints one line on the
# console the kernel opened for it, then asks for a reboot; with the
# sample's "reboot=k" the kernel resets through the i8042, which ends vmboot
# with status 0.

	.equ	SYS_write, 1
	.equ	SYS_reboot, 169
	.equ	LINUX_REBOOT_MAGIC1, 0xfee1dead
	.equ	LINUX_REBOOT_MAGIC2, 672274793
	.equ	LINUX_REBOOT_CMD_RESTART, 0x01234567

	.text
	.globl	_start
_start:
	mov	$SYS_write, %eax
	mov	$1, %edi
	lea	msg(%rip), %rsi
	mov	$(msg_end - msg), %edx
	syscall
	mov	$SYS_reboot, %eax
	mov	$LINUX_REBOOT_MAGIC1, %edi
	mov	$LINUX_REBOOT_MAGIC2, %esi
	mov	$LINUX_REBOOT_CMD_RESTART, %edx
	xor	%r10d, %r10d
	syscall
	# Only reached if reboot failed; returning would panic the kernel.
1:	pause
	jmp	1b

	.section .rodata
msg:	.ascii	"vmpack-init: hello from the initramfs\n"
msg_end:
