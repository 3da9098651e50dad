# build: load_address=0x100000
# diskloop: keeps writing virtio-blk disk 0 (0xd0000000, 64-bit long mode, polled queue, no
# interrupts), so a test can save it while it writes (tests/tests/disk_during_save.rs).
# Sixty-four slots, slot s at sector 128·s (one per 64 KiB, the unit a save keeps old disk
# content in). Round R = 1..ROUNDS works on slot R mod 64: it reads the slot's sector and
# checks that all of it holds the round that last wrote it (R - 64, or 0 the first time,
# so the disk's first 4 MiB must start zeroed), writes R into all of it, and prints
# "R ok" or "R bad V" (V: the first qword found). Then it reads every slot and prints
# "sum=H" (FNV-style hash of what the slots hold) and exits 0, or 1 if a round was bad
# (2: no virtio-blk device, 3: a request failed, 4: a request never completed).
# Config: samples/diskloop.toml (disk of 4 MiB or more).

	.equ	MMIO, 0xd0000000
	.equ	PDPT, 0xa000		# the VMM's page tables; entry 3 maps 3..4 GiB
	.equ	PD_HIGH, 0x204000	# our page directory for 3..4 GiB (uncached)
	.equ	DESC, 0x200000
	.equ	AVAIL, 0x201000
	.equ	USED, 0x202000
	.equ	HDR, 0x203000
	.equ	STATUS, 0x203100
	.equ	WBUF, 0x208000
	.equ	RBUF, 0x210000
	.equ	QSIZE, 16
	.equ	NSLOT, 64
	.equ	STRIDE, 128		# sectors between slots: 64 KiB
	.equ	ROUNDS, 3000
	.equ	POLL_LIMIT, 20000000

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
	xor	%r14d, %r14d		# bad rounds
	mov	$1, %r13d		# round
round:
	mov	%r13, %rbx
	and	$(NSLOT - 1), %ebx
	imul	$STRIDE, %ebx		# the slot's sector
	xor	%eax, %eax		# VIRTIO_BLK_T_IN
	mov	$RBUF, %esi
	mov	$512, %ecx
	mov	$2, %r8d
	call	submit
	test	%al, %al
	jnz	fail_status
	xor	%edx, %edx		# expected: R - NSLOT, or 0
	cmp	$NSLOT, %r13
	jbe	1f
	lea	-NSLOT(%r13), %rdx
1:	xor	%ecx, %ecx
2:	cmp	RBUF(,%rcx,8), %rdx
	jne	bad
	inc	%ecx
	cmp	$64, %ecx
	jb	2b
	mov	$WBUF, %edi		# all 64 qwords = R
	mov	%r13, %rax
	mov	$64, %ecx
	rep stosq
	mov	$1, %eax		# VIRTIO_BLK_T_OUT
	mov	$WBUF, %esi
	mov	$512, %ecx
	xor	%r8d, %r8d
	call	submit
	test	%al, %al
	jnz	fail_status
	mov	%r13, %rax
	call	print_dec
	lea	s_ok(%rip), %rsi
	call	puts
next:
	inc	%r13
	cmp	$ROUNDS, %r13
	jbe	round

	mov	$0xcbf29ce484222325, %r9
	mov	$0x100000001b3, %r11
	xor	%r15d, %r15d		# slot
3:	mov	%r15, %rbx
	imul	$STRIDE, %ebx
	xor	%eax, %eax
	mov	$RBUF, %esi
	mov	$512, %ecx
	mov	$2, %r8d
	call	submit
	test	%al, %al
	jnz	fail_status
	xor	RBUF, %r9
	imul	%r11, %r9
	inc	%r15d
	cmp	$NSLOT, %r15d
	jb	3b
	lea	s_sum(%rip), %rsi
	call	puts
	mov	%r9, %rax
	call	print_hex
	mov	$'\n', %al
	call	putc
	test	%r14, %r14
	setnz	%al
	jmp	exit

bad:
	inc	%r14
	mov	%r13, %rax
	call	print_dec
	lea	s_bad(%rip), %rsi
	call	puts
	mov	RBUF(,%rcx,8), %rax
	call	print_dec
	mov	$'\n', %al
	call	putc
	jmp	next

fail_probe:
	lea	s_probe(%rip), %rsi
	call	puts
	mov	$2, %al
	jmp	exit
fail_status:
	lea	s_status(%rip), %rsi
	call	puts
	mov	$3, %al
	jmp	exit

	.include "lib64.inc"
	.include "virtio.inc"

s_ok:		.asciz	" ok\n"
s_bad:		.asciz	" bad "
s_sum:		.asciz	"sum="
s_timeout:	.asciz	"request timed out\n"
s_probe:	.asciz	"virtio-blk probe failed\n"
s_status:	.asciz	"request failed\n"
