# build: load_address=0x100000
# rng: a minimal virtio-rng driver (virtio-mmio device 0 at 0xd0000000, the config's entropy
# device when it has no disks), 64-bit long mode. Load at 0x100000, entry 0x100000, mode
# "long" (samples/rng.toml). It polls the used ring (no interrupts). For each of ROUNDS
# rounds it asks the device for 64 bytes and prints
#   "round R len=L new=N"
# where L is the length the device reports and N is 1 if the bytes differ from the previous
# round's (and are not all zero), then waits ~2 s (so a test can save here). Exits 0 after
# the last round; 2 if there is no virtio 1.x entropy device, 4 if a request never completes.

	.equ	MMIO, 0xd0000000
	.equ	PDPT, 0xa000		# the VMM's page tables; entry 3 maps 3..4 GiB
	.equ	PD_HIGH, 0x204000	# our page directory for 3..4 GiB (uncached)
	.equ	DESC, 0x200000
	.equ	AVAIL, 0x201000
	.equ	USED, 0x202000
	.equ	BUF, 0x203000
	.equ	PREV, 0x203100
	.equ	HDR, 0x203200		# used only by virtio.inc's block helpers
	.equ	STATUS, 0x203300
	.equ	QSIZE, 16
	.equ	LEN, 64
	.equ	ROUNDS, 4
	.equ	WAIT_STEPS, 100		# x ~20 ms
	.equ	POLL_LIMIT, 20000000

	.code64
	.text
	.globl	_start
_start:
	cli
	cld
	call	virtio_map_mmio
	call	rng_setup
	jc	fail_probe
	xor	%r13d, %r13d		# round
round:
	inc	%r13d
	mov	$BUF, %edi		# clear the buffer: the device must fill it
	xor	%eax, %eax
	mov	$(LEN / 8), %ecx
	rep stosq
	call	request			# EAX = used length
	mov	%eax, %r14d
	# new = the bytes are not all zero and differ from the previous round's.
	xor	%r15d, %r15d
	mov	$BUF, %esi
	xor	%eax, %eax
	mov	$(LEN / 8), %ecx
1:	or	(%rsi), %rax
	add	$8, %rsi
	dec	%ecx
	jnz	1b
	test	%rax, %rax
	jz	2f
	mov	$BUF, %esi
	mov	$PREV, %edi
	mov	$LEN, %ecx
	repe cmpsb
	je	2f
	mov	$1, %r15d
2:	mov	$BUF, %esi		# keep this round's bytes
	mov	$PREV, %edi
	mov	$(LEN / 8), %ecx
	rep movsq
	lea	s_round(%rip), %rsi
	call	puts
	mov	%r13, %rax
	call	print_dec
	lea	s_len(%rip), %rsi
	call	puts
	mov	%r14, %rax
	call	print_dec
	lea	s_new(%rip), %rsi
	call	puts
	mov	%r15, %rax
	call	print_dec
	call	newline
	cmp	$ROUNDS, %r13d
	jae	done
	mov	$WAIT_STEPS, %ebx
3:	call	delay_step
	dec	%ebx
	jnz	3b
	jmp	round
done:
	mov	$0, %al
	jmp	exit

fail_probe:
	mov	$2, %al
	jmp	exit

# rng_setup: virtio-mmio device 0 as an entropy device (type 4) with VERSION_1 and one
# polled queue of QSIZE entries. Out: %r12 = MMIO; CF set if anything is refused.
rng_setup:
	mov	$MMIO, %r12d
	movl	$0, 0x70(%r12)		# reset
	movl	$1, 0x70(%r12)		# ACKNOWLEDGE
	movl	$3, 0x70(%r12)		# DRIVER
	cmpl	$0x74726976, (%r12)	# "virt"
	jne	9f
	cmpl	$2, 4(%r12)		# version 2 (virtio 1.x layout)
	jne	9f
	cmpl	$4, 8(%r12)		# entropy device
	jne	9f
	movl	$1, 0x24(%r12)
	movl	$1, 0x20(%r12)		# VERSION_1
	movl	$0, 0x24(%r12)
	movl	$0, 0x20(%r12)
	movl	$0xb, 0x70(%r12)	# FEATURES_OK
	testl	$8, 0x70(%r12)
	jz	9f
	movl	$0, 0x30(%r12)		# queue 0
	cmpl	$QSIZE, 0x34(%r12)
	jb	9f
	movl	$QSIZE, 0x38(%r12)
	movl	$DESC, 0x80(%r12)
	movl	$0, 0x84(%r12)
	movl	$AVAIL, 0x90(%r12)
	movl	$0, 0x94(%r12)
	movl	$USED, 0xa0(%r12)
	movl	$0, 0xa4(%r12)
	movw	$1, AVAIL		# VRING_AVAIL_F_NO_INTERRUPT: we poll
	movl	$1, 0x44(%r12)		# queue ready
	movl	$0xf, 0x70(%r12)	# DRIVER_OK
	clc
	ret
9:	stc
	ret

# request: one device-writable buffer of LEN bytes at BUF; waits for it. Returns the used
# length in EAX.
request:
	movq	$BUF, DESC
	movl	$LEN, DESC + 8
	movw	$2, DESC + 12		# WRITE
	movw	$0, DESC + 14
	movzwl	AVAIL + 2, %edx
	mov	%edx, %edi
	and	$(QSIZE - 1), %edi
	movw	$0, AVAIL + 4(,%rdi,2)
	inc	%edx
	movw	%dx, AVAIL + 2
	movl	$0, 0x50(%r12)		# QueueNotify
	mov	$POLL_LIMIT, %edi
1:	cmpw	%dx, USED + 2
	je	2f
	pause
	dec	%edi
	jnz	1b
	lea	s_timeout(%rip), %rsi
	call	puts
	mov	$4, %al
	jmp	exit
2:	movzwl	USED + 2, %edi		# the used element of this request
	dec	%edi
	and	$(QSIZE - 1), %edi
	mov	USED + 4 + 4(,%rdi,8), %eax
	ret

newline:
	mov	$'\n', %al
	jmp	putc

	.include "lib64.inc"
	.include "virtio.inc"

s_round:	.asciz	"round "
s_len:		.asciz	" len="
s_new:		.asciz	" new="
s_timeout:	.asciz	"request timed out\n"
