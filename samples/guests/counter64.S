# build: load_address=0x100000
# counter64: 64-bit long-mode counter guest.
# Load at 0x100000, entry 0x100000, mode "long" (samples/counter64.toml).
# Prints "1\n", "2\n", ... "300\n" on COM1, ~20 ms apart (~6 s run), then
# writes 0 to port 0xf4. The counter lives in guest memory and is incremented
# before it is printed, so a VM restored from a snapshot continues with
# exactly the next number.

	.equ	LIMIT, 300

	.code64
	.text
	.globl	_start
_start:
	cli
	cld
next:
	incq	counter(%rip)
	mov	counter(%rip), %rax
	call	print_dec
	mov	$'\n', %al
	call	putc
	cmpq	$LIMIT, counter(%rip)
	jae	done
	call	delay_step
	jmp	next
done:
	mov	$0, %al
	jmp	exit

	.include "lib64.inc"

	.balign	8
counter:
	.quad	0
