# build: load_address=0x100000
# livemem: a guest that keeps writing its memory, for the live save tests
# (tests/tests/live_save.rs). 64-bit long mode, load and entry 0x100000, no
# devices but COM1 (samples/livemem.toml).
#
# RDI holds the guest RAM size at entry. Round r (1..ROUNDS) visits every 4 KiB
# page from 2 MiB up to the RAM size (capped at the 1 GiB identity map): it
# checks that the page's first and last qwords hold pattern(page) + r - 1 (0 in
# round 1: fresh RAM), then writes pattern(page) + r into both, prints
# "round r ok\n" and waits ~20 ms. After ROUNDS rounds it prints
# "livemem: done\n" and exits 0; a page that lost a write (a live save that
# missed a dirty page) prints "livemem: mismatch at 0x<16 hex digits>\n" and
# exits 1. So the serial output is the same whether or not the VM was saved
# and restored along the way.

	.equ	TEST_START, 0x200000
	.equ	TEST_CAP, 0x40000000
	.equ	ROUNDS, 60

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
	mov	$1, %ebx			# round

round:
	mov	$TEST_START, %edx
1:	cmp	test_end(%rip), %rdx
	jae	2f
	call	pattern				# RAX = pattern(page)
	lea	-1(%rax,%rbx), %r8		# what the previous round wrote
	cmp	$1, %ebx
	jne	3f
	xor	%r8d, %r8d			# round 1: fresh, zero RAM
3:	cmp	%r8, (%rdx)
	jne	bad_first
	cmp	%r8, 4088(%rdx)
	jne	bad_last
	add	%rbx, %rax
	mov	%rax, (%rdx)
	mov	%rax, 4088(%rdx)
	add	$4096, %rdx
	jmp	1b
2:
	lea	s_round(%rip), %rsi
	call	puts
	mov	%rbx, %rax
	call	print_dec
	lea	s_ok(%rip), %rsi
	call	puts
	call	delay_step
	inc	%ebx
	cmp	$ROUNDS, %ebx
	jbe	round
	lea	s_done(%rip), %rsi
	call	puts
	mov	$0, %al
	jmp	exit

bad_last:
	add	$4088, %rdx
bad_first:
	lea	s_bad(%rip), %rsi
	call	puts
	mov	%rdx, %rax
	call	print_hex
	mov	$'\n', %al
	call	putc
	mov	$1, %al
	jmp	exit

# pattern: RAX = pattern for the page at RDX (distinct per page); clobbers RCX.
pattern:
	mov	%rdx, %rax
	shr	$12, %rax
	movabs	$0x0101010101010101, %rcx
	imul	%rcx, %rax
	movabs	$0x5aa5c33c0ff09669, %rcx
	xor	%rcx, %rax
	ret

	.include "lib64.inc"

s_round:	.asciz	"round "
s_ok:		.asciz	" ok\n"
s_done:		.asciz	"livemem: done\n"
s_bad:		.asciz	"livemem: mismatch at 0x"

	.balign	8
test_end:	.quad	0
