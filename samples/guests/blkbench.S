# build: load_address=0x100000
# blkbench: virtio-blk throughput from the guest's side (queue depth 1, 4 KiB requests).
# Disk 0 must hold at least 64 MiB. Four phases of COUNT requests each, every one framed by
# lines the host timestamps: "start seqwrite" .. "end seqwrite", then seqread (the same
# 8 MiB), randwrite and randread (4 KiB blocks anywhere in the first 64 MiB, picked by the
# LCG x = x * 6364136223846793005 + 1442695040888963407, block = (x >> 33) & 16383, x0 = 1).
# Exits 0 (3 if a request fails). Used by the ignored benchmark in vmboot/tests/virtio_blk.rs.

	.equ	MMIO, 0xd0000000
	.equ	PDPT, 0xa000
	.equ	PD_HIGH, 0x204000
	.equ	DESC, 0x200000
	.equ	AVAIL, 0x201000
	.equ	USED, 0x202000
	.equ	HDR, 0x203000
	.equ	STATUS, 0x203100
	.equ	IDBUF, 0x203200
	.equ	WBUF, 0x208000
	.equ	RBUF, 0x210000
	.equ	QSIZE, 16
	.equ	NSECT, 64
	.equ	POLL_LIMIT, 20000000
	.equ	COUNT, 2048
	.equ	BLOCKS_MASK, 16383

	.code64
	.text
	.globl	_start
_start:
	cli
	cld
	call	virtio_map_mmio
	mov	$((1 << 5) | (1 << 9)), %eax	# RO, FLUSH
	call	virtio_blk_setup
	jc	fail_probe
	mov	%eax, features(%rip)
	lea	s_capacity(%rip), %rsi
	call	puts
	mov	0x100(%r12), %rax	# capacity (config space)
	call	print_dec
	call	newline
	cmp	$NSECT, %rax
	jb	fail_small


	cmp	$(64 << 11), %rax
	jb	fail_small
	mov	$WBUF, %edi
	mov	$512, %ecx
	mov	$0x5a5a5a5a5a5a5a5a, %rax
	rep stosq

	lea	s_seqwrite(%rip), %r15
	mov	$1, %r14d		# VIRTIO_BLK_T_OUT
	xor	%r13d, %r13d		# sequential
	call	phase
	lea	s_seqread(%rip), %r15
	xor	%r14d, %r14d
	call	phase
	lea	s_randwrite(%rip), %r15
	mov	$1, %r14d
	mov	$1, %r13d
	call	phase
	lea	s_randread(%rip), %r15
	xor	%r14d, %r14d
	call	phase
	xor	%eax, %eax
	jmp	exit

# phase: COUNT 4 KiB requests of type R14, sequential (R13 = 0) or random; prints
# "start NAME" / "end NAME" (NAME at R15).
phase:
	lea	s_start(%rip), %rsi
	call	puts
	mov	%r15, %rsi
	call	puts
	call	newline
	mov	$1, %r10		# LCG state
	xor	%r9d, %r9d		# request number
1:	mov	%r9, %rbx
	test	%r13, %r13
	jz	2f
	mov	$6364136223846793005, %rax
	imul	%rax, %r10
	mov	$1442695040888963407, %rax
	add	%rax, %r10
	mov	%r10, %rbx
	shr	$33, %rbx
	and	$BLOCKS_MASK, %ebx
2:	shl	$3, %rbx		# 4 KiB block -> sector
	mov	%r14d, %eax
	mov	$WBUF, %esi
	test	%eax, %eax
	jnz	3f
	mov	$RBUF, %esi
3:	mov	$4096, %ecx
	xor	%r8d, %r8d
	test	%eax, %eax
	jnz	4f
	mov	$2, %r8d
4:	call	submit
	test	%al, %al
	jnz	fail_status
	inc	%r9
	cmp	$COUNT, %r9
	jb	1b
	lea	s_end(%rip), %rsi
	call	puts
	mov	%r15, %rsi
	call	puts
	call	newline
	ret

newline:
	push	%rax
	mov	$'\n', %al
	call	putc
	pop	%rax
	ret

fail_probe:
	lea	s_probe(%rip), %rsi
	call	puts
	mov	$2, %al
	jmp	exit
fail_status:
	push	%rax
	lea	s_status(%rip), %rsi
	call	puts
	pop	%rax
	movzbl	%al, %eax
	call	print_dec
	call	newline
	mov	$3, %al
	jmp	exit
fail_small:
	lea	s_small(%rip), %rsi
	call	puts
	mov	$5, %al
	jmp	exit

	.include "lib64.inc"
	.include "virtio.inc"

features:	.long	0
s_capacity:	.asciz	"capacity "
s_start:	.asciz	"start "
s_end:		.asciz	"end "
s_seqwrite:	.asciz	"seqwrite"
s_seqread:	.asciz	"seqread"
s_randwrite:	.asciz	"randwrite"
s_randread:	.asciz	"randread"
s_timeout:	.asciz	"request timed out\n"
s_probe:	.asciz	"virtio-blk probe failed\n"
s_status:	.asciz	"request failed, status "
s_small:	.asciz	"disk smaller than 64 MiB\n"
