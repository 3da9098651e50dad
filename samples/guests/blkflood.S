# build: load_address=0x100000
# blkflood: floods virtio-blk device 0 (0xd0000000, 64-bit long mode) so a test can check
# that a pause does not wait for the guest's I/O. Each round queues NREQ reads of 8 MiB
# (the largest request vmboot serves) with one notify, prints "round R queued", waits for
# all of them and checks that every request completed exactly once (one used-ring entry per
# chain, status OK, length 8 MiB + 1): "round R ok", or "round R bad=N". After ROUNDS
# rounds, two requests vmboot must refuse: "oversize status=S" (8 MiB + 512 bytes) and
# "segments status=S" (129 data segments, seg_max is 128); 1 = VIRTIO_BLK_S_IOERR. Then
# "done", and the guest halts (the test ends it). Exit 2 if the device cannot be set up,
# 4 if a request never completes. Config: samples/blkflood.toml (disk of 16 MiB or more).

	.equ	MMIO, 0xd0000000
	.equ	PDPT, 0xa000
	.equ	PD_HIGH, 0x204000
	.equ	DESC, 0x200000		# 256 descriptors
	.equ	AVAIL, 0x201000
	.equ	USED, 0x202000
	.equ	HDRS, 0x203000		# NREQ request headers (all zero: read sector 0)
	.equ	STATUSES, 0x203400	# NREQ status bytes
	.equ	SEEN, 0x203500		# NREQ flags: used entry seen for chain i
	.equ	HDR, HDRS		# for virtio.inc's submit (unused here)
	.equ	STATUS, STATUSES
	.equ	BUF, 0x1000000		# 8 MiB + 512, shared by every read
	.equ	QSIZE, 256
	.equ	NREQ, 64
	.equ	ROUNDS, 8
	.equ	REQ_BYTES, 0x800000
	.equ	POLL_LIMIT, 200000000
	.equ	F_NEXT, 1
	.equ	F_WRITE, 2

	.code64
	.text
	.globl	_start
_start:
	cli
	cld
	call	virtio_map_mmio
	xor	%eax, %eax
	call	virtio_blk_setup
	jc	fail_probe

	# Chain i: descriptor 3i (header i) -> 3i+1 (BUF, 8 MiB) -> 3i+2 (status byte i).
	xor	%ecx, %ecx
1:	imul	$48, %ecx, %edi
	add	$DESC, %edi
	mov	%ecx, %eax
	shl	$4, %eax
	add	$HDRS, %eax
	mov	%rax, (%rdi)
	movl	$16, 8(%rdi)
	movw	$F_NEXT, 12(%rdi)
	lea	(%rcx,%rcx,2), %edx
	lea	1(%rdx), %eax
	mov	%ax, 14(%rdi)
	movq	$BUF, 16(%rdi)
	movl	$REQ_BYTES, 24(%rdi)
	movw	$(F_NEXT | F_WRITE), 28(%rdi)
	lea	2(%rdx), %eax
	mov	%ax, 30(%rdi)
	lea	STATUSES(%rcx), %eax
	mov	%rax, 32(%rdi)
	movl	$1, 40(%rdi)
	movw	$F_WRITE, 44(%rdi)
	movw	$0, 46(%rdi)
	inc	%ecx
	cmp	$NREQ, %ecx
	jb	1b

	mov	$1, %r13d		# round
round:
	mov	$STATUSES, %edi
	mov	$NREQ, %ecx
	mov	$0xff, %al
	rep stosb
	mov	$SEEN, %edi
	mov	$NREQ, %ecx
	xor	%eax, %eax
	rep stosb
	# Make all NREQ chains available at once, then notify once.
	movzwl	AVAIL + 2, %edx
	mov	%edx, %r14d		# first ring slot of this round
	xor	%ecx, %ecx
2:	lea	(%rdx,%rcx), %eax
	and	$(QSIZE - 1), %eax
	lea	(%rcx,%rcx,2), %esi
	mov	%si, AVAIL + 4(,%rax,2)
	inc	%ecx
	cmp	$NREQ, %ecx
	jb	2b
	add	$NREQ, %edx
	mov	%dx, AVAIL + 2
	movl	$0, 0x50(%r12)		# QueueNotify
	lea	s_round(%rip), %rsi
	call	puts
	mov	%r13, %rax
	call	print_dec
	lea	s_queued(%rip), %rsi
	call	puts
	call	wait_used

	# Every chain exactly once, with status OK and the full length.
	xor	%r15d, %r15d		# bad entries
	xor	%ecx, %ecx
3:	lea	(%r14,%rcx), %eax
	and	$(QSIZE - 1), %eax
	mov	USED + 4(,%rax,8), %esi	# id
	mov	USED + 8(,%rax,8), %edi	# len
	mov	%esi, %eax
	xor	%edx, %edx
	mov	$3, %ebx
	div	%ebx
	test	%edx, %edx
	jnz	4f
	cmp	$NREQ, %eax
	jae	4f
	cmpb	$0, SEEN(%rax)
	jne	4f
	movb	$1, SEEN(%rax)
	cmp	$(REQ_BYTES + 1), %edi
	jne	4f
	cmpb	$0, STATUSES(%rax)
	jne	4f
	jmp	5f
4:	inc	%r15d
5:	inc	%ecx
	cmp	$NREQ, %ecx
	jb	3b
	lea	s_round(%rip), %rsi
	call	puts
	mov	%r13, %rax
	call	print_dec
	test	%r15d, %r15d
	jnz	6f
	lea	s_ok(%rip), %rsi
	call	puts
	jmp	7f
6:	lea	s_bad(%rip), %rsi
	call	puts
	mov	%r15, %rax
	call	print_dec
	call	newline
7:	inc	%r13d
	cmp	$ROUNDS, %r13d
	jbe	round

	# One request 512 bytes over the limit.
	movl	$(REQ_BYTES + 512), DESC + 24
	movb	$0xff, STATUSES
	call	post_chain0
	movl	$REQ_BYTES, DESC + 24
	lea	s_oversize(%rip), %rsi
	call	print_status

	# One request with 129 data segments of 512 bytes: descriptors 1..129, status at 130.
	mov	$1, %ecx
8:	mov	%ecx, %edi
	shl	$4, %edi
	add	$DESC, %edi
	lea	-1(%rcx), %eax
	shl	$9, %eax
	add	$BUF, %eax
	mov	%rax, (%rdi)
	movl	$512, 8(%rdi)
	movw	$(F_NEXT | F_WRITE), 12(%rdi)
	lea	1(%rcx), %eax
	mov	%ax, 14(%rdi)
	inc	%ecx
	cmp	$129, %ecx
	jbe	8b
	movq	$STATUSES, DESC + 16 * 130
	movl	$1, DESC + 16 * 130 + 8
	movw	$F_WRITE, DESC + 16 * 130 + 12
	movw	$0, DESC + 16 * 130 + 14
	movb	$0xff, STATUSES
	call	post_chain0
	lea	s_segments(%rip), %rsi
	call	print_status

	lea	s_done(%rip), %rsi
	call	puts
9:	cli
	hlt
	jmp	9b

# post_chain0: make chain 0 available, notify, and wait for it.
post_chain0:
	movzwl	AVAIL + 2, %edx
	mov	%edx, %eax
	and	$(QSIZE - 1), %eax
	movw	$0, AVAIL + 4(,%rax,2)
	inc	%edx
	mov	%dx, AVAIL + 2
	movl	$0, 0x50(%r12)
	# fall through

# wait_used: wait until the used index reaches DX.
wait_used:
	mov	$POLL_LIMIT, %ecx
1:	cmpw	%dx, USED + 2
	je	2f
	pause
	dec	%ecx
	jnz	1b
	lea	s_timeout(%rip), %rsi
	call	puts
	mov	$4, %al
	jmp	exit
2:	ret

# print_status: print the string at RSI, then status byte 0 and a newline.
print_status:
	call	puts
	movzbl	STATUSES, %eax
	call	print_dec
	# fall through

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

	.include "lib64.inc"
	.include "virtio.inc"

s_round:	.asciz	"round "
s_queued:	.asciz	" queued\n"
s_ok:		.asciz	" ok\n"
s_bad:		.asciz	" bad="
s_oversize:	.asciz	"oversize status="
s_segments:	.asciz	"segments status="
s_done:		.asciz	"done\n"
s_timeout:	.asciz	"request timed out\n"
s_probe:	.asciz	"virtio-blk probe failed\n"
