# build: load_address=0x100000
# memtest: guest RAM pattern test (64-bit long mode, memory_mib = 32).
# Load at 0x100000, entry 0x100000, mode "long" (samples/memtest.toml).
# RDI holds the guest RAM size at entry. Every 4 KiB page from 2 MiB up to
# the RAM size (capped at the 1 GiB identity map) is filled with a pattern
# derived from its page number. Then it prints "filled\n", waits ~3 s (so a
# test can snapshot and restore between fill and check), checks every page,
# and prints "memtest: N pages ok\n" + exit 0, or
# "memtest: mismatch at 0x<16 hex digits>\n" + exit 1 (first bad qword).

	.equ	TEST_START, 0x200000		# above this image, its stack and page tables
	.equ	TEST_CAP, 0x40000000		# the VMM identity-maps only the first GiB
	.equ	WAIT_STEPS, 150			# x ~20 ms

	.code64
	.text
	.globl	_start
_start:
	cli
	cld
	mov	$TEST_CAP, %eax
	cmp	%rax, %rdi
	cmova	%rax, %rdi
	and	$~0xfff, %rdi
	mov	%rdi, test_end(%rip)

	mov	$TEST_START, %edx
1:	cmp	test_end(%rip), %rdx
	jae	2f
	call	pattern
	mov	%rdx, %rdi
	mov	$512, %ecx
	rep stosq
	add	$4096, %rdx
	jmp	1b
2:
	lea	s_filled(%rip), %rsi
	call	puts

	mov	$WAIT_STEPS, %ebx
3:	call	delay_step
	dec	%ebx
	jnz	3b

	mov	$TEST_START, %edx
	xor	%ebx, %ebx			# pages checked
4:	cmp	test_end(%rip), %rdx
	jae	ok
	call	pattern
	mov	%rdx, %rdi
	mov	$512, %ecx
	repe scasq
	jne	bad
	add	$4096, %rdx
	inc	%rbx
	jmp	4b

ok:
	lea	s_ok1(%rip), %rsi
	call	puts
	mov	%rbx, %rax
	call	print_dec
	lea	s_ok2(%rip), %rsi
	call	puts
	mov	$0, %al
	jmp	exit

bad:
	lea	s_bad(%rip), %rsi
	call	puts
	lea	-8(%rdi), %rax
	call	print_hex
	mov	$'\n', %al
	call	putc
	mov	$1, %al
	jmp	exit

# pattern: RAX = pattern for the page at RDX. Distinct per page, so a page
# written to the wrong place or restored from the wrong offset is caught.
pattern:
	mov	%rdx, %rax
	shr	$12, %rax
	movabs	$0x0101010101010101, %rcx
	imul	%rcx, %rax
	movabs	$0x5aa5c33c0ff09669, %rcx
	xor	%rcx, %rax
	ret

	.include "lib64.inc"

s_filled:	.asciz	"filled\n"
s_ok1:		.asciz	"memtest: "
s_ok2:		.asciz	" pages ok\n"
s_bad:		.asciz	"memtest: mismatch at 0x"

	.balign	8
test_end:	.quad	0
