# build: load_address=0x100000
# dirty: a guest whose writes are known exactly, for the dirty-page tracking and in-place
# reset tests (tests/tests/dirty_pages.rs). 64-bit long mode, load and entry 0x100000, one
# writable virtio-blk disk of at least 24 sectors, no interrupts (polled queue, polled COM1).
#
# Setup touches every page a round will write (so the page tables' accessed and dirty bits
# are set already), reads sectors 16..23 once, prints "ready\n", then runs rounds. A round
# waits for one byte on COM1 ('q': exit 0), then, using no stack and no variable:
#   - reads sectors 16..23 (4 KiB) into RBUF, which spans two pages;
#   - adds 1 to the byte at each of T1, T2, T3 (3 pages) and to the first byte of RBUF;
#   - writes RBUF back to sectors 16..23;
#   - prints "done XY\n": X = '0' + the byte at T1, Y = '0' + the disk's byte (RBUF[0]).
# So from a disk of zeros, rounds print "done 11", "done 22", ...; and a round writes
# exactly these 4 KiB pages: T1, T2, T3, DESC, AVAIL (guest), USED (device), HDR (guest;
# the device writes STATUS in it) and the two pages of RBUF (device and guest).
# A 'w' instead adds 1 to the first byte of every other page from WBIG on, 256 pages
# (1 MiB in 256 separate runs), and prints "wrote\n" (for `vmpack bench-clones`' reset
# figure; the guest needs 32 MiB of RAM or more for it).

	.equ	MMIO, 0xd0000000
	.equ	PDPT, 0xa000		# the VMM's page tables; entry 3 maps 3..4 GiB
	.equ	PD_HIGH, 0x204000	# our page directory for 3..4 GiB (uncached)
	.equ	DESC, 0x200000
	.equ	AVAIL, 0x201000
	.equ	USED, 0x202000
	.equ	HDR, 0x203000
	.equ	STATUS, 0x203100
	.equ	QSIZE, 16
	.equ	POLL_LIMIT, 20000000
	.equ	T1, 0x300000
	.equ	T2, 0x301000
	.equ	T3, 0x5ff000
	.equ	RBUF, 0x401800		# 4 KiB: pages 0x401000 and 0x402000
	.equ	SECTOR, 16
	.equ	WBIG, 0x1000000

# request TYPE, FLAGS: one request on sectors SECTOR.. with RBUF (4 KiB) as data buffer
# (FLAGS 3 = NEXT|WRITE: the device writes it), waiting for its completion; no stack.
	.macro	request type, flags
	movl	$\type, HDR
	movl	$0, HDR + 4
	movq	$SECTOR, HDR + 8
	movb	$0xff, STATUS
	movq	$HDR, DESC
	movl	$16, DESC + 8
	movw	$1, DESC + 12		# NEXT
	movw	$1, DESC + 14
	movq	$RBUF, DESC + 16
	movl	$4096, DESC + 24
	movw	$\flags, DESC + 28
	movw	$2, DESC + 30
	movq	$STATUS, DESC + 32
	movl	$1, DESC + 40
	movw	$2, DESC + 44		# WRITE
	movw	$0, DESC + 46
	movzwl	AVAIL + 2, %edx
	mov	%edx, %edi
	and	$(QSIZE - 1), %edi
	movw	$0, AVAIL + 4(,%rdi,2)
	inc	%edx
	movw	%dx, AVAIL + 2
	movl	$0, 0x50(%r12)		# QueueNotify
1:	cmpw	%dx, USED + 2
	jne	1b
	cmpb	$0, STATUS
	jne	fail
	.endm

	.code64
	.text
	.globl	_start
_start:
	cli
	cld
	call	virtio_map_mmio
	xor	%eax, %eax
	call	virtio_blk_setup
	jc	fail
	movb	$0, T1
	movb	$0, T2
	movb	$0, T3
	xor	%eax, %eax		# VIRTIO_BLK_T_IN
	mov	$SECTOR, %ebx
	mov	$RBUF, %esi
	mov	$4096, %ecx
	mov	$2, %r8d
	call	submit
	test	%al, %al
	jnz	fail
	lea	s_ready(%rip), %rsi
	call	puts

round:
	mov	$0x3fd, %dx		# COM1 LSR: wait for a byte
1:	in	%dx, %al
	test	$1, %al
	jz	1b
	mov	$0x3f8, %dx
	in	%dx, %al
	cmp	$'q', %al
	jne	6f
	xor	%eax, %eax
	jmp	exit
6:	cmp	$'w', %al
	jne	2f
	mov	$WBIG, %edi
	mov	$256, %ecx
7:	incb	(%rdi)
	add	$0x2000, %rdi
	dec	%ecx
	jnz	7b
	lea	s_wrote(%rip), %rsi
	jmp	8f
2:	request 0, 3			# VIRTIO_BLK_T_IN
	incb	T1
	incb	T2
	incb	T3
	incb	RBUF
	request 1, 1			# VIRTIO_BLK_T_OUT
	lea	s_done(%rip), %rsi
8:	mov	$0x3f8, %dx
4:	lodsb
	test	%al, %al
	jz	5f
	out	%al, %dx
	jmp	4b
5:	cmpb	$'\n', -2(%rsi)		# "wrote\n" ends the line itself
	je	round
	movzbl	T1, %eax
	add	$'0', %al
	out	%al, %dx
	movzbl	RBUF, %eax
	add	$'0', %al
	out	%al, %dx
	mov	$'\n', %al
	out	%al, %dx
	jmp	round

fail:
	lea	s_fail(%rip), %rsi
	call	puts
	mov	$1, %al
	jmp	exit

	.include "lib64.inc"
	.include "virtio.inc"

s_ready:	.asciz	"ready\n"
s_done:		.asciz	"done "
s_wrote:	.asciz	"wrote\n"
s_fail:		.asciz	"virtio-blk failed\n"
s_timeout:	.asciz	"request timed out\n"
