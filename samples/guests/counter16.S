# build: load_address=0x1000
# counter16: 16-bit real-mode counter guest.
# Load at 0x1000, entry 0x1000, mode "real" (samples/counter.toml).
# Prints "1\n", "2\n", ... "300\n" on COM1, ~20 ms apart (~6 s run), then
# writes 0 to port 0xf4. The counter lives in guest memory and is incremented
# before it is printed, so a VM restored from a snapshot continues with
# exactly the next number. Integer-only: the emulator rejects x87/SSE.

	.equ	LIMIT, 300
	.equ	COM1, 0x3f8
	.equ	EXIT_PORT, 0xf4
	.equ	TSC_STEP, 50000000	# ~20 ms at a ~2.5 GHz TSC

	.code16
	.text
	.globl	_start
_start:
	cli
	cld
	xor	%ax, %ax		# the start state has all bases 0; be explicit
	mov	%ax, %ds
	mov	%ax, %es
next:
	incl	counter
	movl	counter, %eax
	call	print_dec
	mov	$'\n', %al
	call	putc
	cmpl	$LIMIT, counter
	jae	done
	call	delay_step
	jmp	next
done:
	mov	$0, %al
	out	%al, $EXIT_PORT
1:	hlt
	jmp	1b

putc:
	push	%dx
	mov	$COM1, %dx
	out	%al, %dx
	pop	%dx
	ret

# print_dec: write EAX as unsigned decimal.
print_dec:
	pushal
	sub	$16, %sp
	mov	%sp, %bx
	add	$15, %bx
	mov	$10, %ecx
1:	xor	%edx, %edx
	div	%ecx
	add	$'0', %dl
	dec	%bx
	mov	%dl, (%bx)
	test	%eax, %eax
	jnz	1b
	mov	%sp, %cx
	add	$15, %cx
2:	mov	(%bx), %al
	call	putc
	inc	%bx
	cmp	%cx, %bx
	jb	2b
	add	$16, %sp
	popal
	ret

# delay_step: wait TSC_STEP ticks, comparing the low 32 bits of the
# difference (wrap-safe; a TSC that jumps backwards ends the wait early).
delay_step:
	pushal
	rdtsc
	mov	%eax, %ecx
1:	pause
	rdtsc
	sub	%ecx, %eax
	cmp	$TSC_STEP, %eax
	jb	1b
	popal
	ret

	.balign	4
counter:
	.long	0
