# build: load_address=0x100000
# blkbad: sends malformed virtio-blk requests (device 0 at 0xd0000000, 64-bit long mode)
# and prints what came back, one line per case: "case N status=S len=L" (S: the status
# byte, 255 if the device never wrote it; L: the used-ring length). Then one good write
# and read of sector 5: "recovered write=S read=S match=M", and exit 0. Exit 2 if the
# device cannot be set up, 4 if a request never completes. Config: samples/blkbad.toml.
#
# Cases: 1 data buffer outside guest RAM; 2 sector past the end of the disk; 3 unknown
# request type; 4 header only (no status descriptor); 5 `next` index past the queue size;
# 6 status byte outside guest RAM; 7 data length not a multiple of 512; 8 header shorter
# than 16 bytes; 9 GET_ID into a device-readable buffer; 10 DISCARD past the end; 11 a
# descriptor whose `next` is itself (a loop); 12 an indirect descriptor table, a feature
# the device never offers (its status byte is the table's last descriptor).

	.equ	MMIO, 0xd0000000
	.equ	PDPT, 0xa000
	.equ	PD_HIGH, 0x204000
	.equ	DESC, 0x200000
	.equ	AVAIL, 0x201000
	.equ	USED, 0x202000
	.equ	HDR, 0x203000
	.equ	STATUS, 0x203100
	.equ	SEG, 0x203200
	.equ	TABLE, 0x203400		# case 12's indirect table
	.equ	BUF, 0x208000
	.equ	OUTSIDE, 0x7ff00000	# not guest RAM (the config has 16 MiB)
	.equ	QSIZE, 16
	.equ	POLL_LIMIT, 20000000
	.equ	F_NEXT, 1
	.equ	F_WRITE, 2
	.equ	F_INDIRECT, 4

# DESC i, addr, len, flags, next: fill descriptor i.
.macro	DESC i, addr, len, flags, next, table=DESC
	movq	$\addr, \table + 16 * \i
	movl	$\len, \table + 16 * \i + 8
	movw	$\flags, \table + 16 * \i + 12
	movw	$\next, \table + 16 * \i + 14
.endm

# HDR type, sector: fill the request header.
.macro	HDR type, sector
	movl	$\type, HDR
	movl	$0, HDR + 4
	movq	$\sector, HDR + 8
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
	jc	fail_probe

	# 1: read into a buffer outside guest RAM.
	HDR	0, 0
	DESC	0, HDR, 16, F_NEXT, 1
	DESC	1, OUTSIDE, 512, F_NEXT | F_WRITE, 2
	DESC	2, STATUS, 1, F_WRITE, 0
	mov	$1, %ebx
	call	post
	# 2: read past the end of the disk.
	HDR	0, 0x100000
	DESC	1, BUF, 512, F_NEXT | F_WRITE, 2
	mov	$2, %ebx
	call	post
	# 3: unknown request type.
	HDR	99, 0
	DESC	0, HDR, 16, F_NEXT, 2
	mov	$3, %ebx
	call	post
	# 4: header only.
	HDR	0, 0
	DESC	0, HDR, 16, 0, 0
	mov	$4, %ebx
	call	post
	# 5: next index beyond the queue.
	DESC	0, HDR, 16, F_NEXT, 200
	mov	$5, %ebx
	call	post
	# 6: status byte outside guest RAM.
	DESC	0, HDR, 16, F_NEXT, 1
	DESC	1, BUF, 512, F_NEXT | F_WRITE, 2
	DESC	2, OUTSIDE, 1, F_WRITE, 0
	mov	$6, %ebx
	call	post
	# 7: data length not a multiple of 512.
	DESC	1, BUF, 100, F_NEXT | F_WRITE, 2
	DESC	2, STATUS, 1, F_WRITE, 0
	mov	$7, %ebx
	call	post
	# 8: header shorter than 16 bytes.
	DESC	0, HDR, 8, F_NEXT, 1
	DESC	1, BUF, 512, F_NEXT | F_WRITE, 2
	mov	$8, %ebx
	call	post
	# 9: GET_ID into a buffer the device may only read.
	HDR	8, 0
	DESC	0, HDR, 16, F_NEXT, 1
	DESC	1, BUF, 20, F_NEXT, 2
	mov	$9, %ebx
	call	post
	# 10: DISCARD past the end (one segment: sector, count, flags).
	HDR	11, 0
	movq	$0x100000, SEG
	movl	$8, SEG + 8
	movl	$0, SEG + 12
	DESC	1, SEG, 16, F_NEXT, 2
	mov	$10, %ebx
	call	post
	# 11: a loop: the data descriptor's `next` is itself. Served, it would read a few KiB
	# into STATUS.. and report success there.
	HDR	0, 0
	DESC	0, HDR, 16, F_NEXT, 1
	DESC	1, STATUS, 512, F_NEXT | F_WRITE, 1
	mov	$11, %ebx
	call	post
	# 12: a good read, but through an indirect table.
	DESC	0, HDR, 16, F_NEXT, 1, TABLE
	DESC	1, BUF, 512, F_NEXT | F_WRITE, 2, TABLE
	DESC	2, STATUS, 1, F_WRITE, 0, TABLE
	DESC	0, TABLE, 48, F_INDIRECT, 0
	mov	$12, %ebx
	call	post
	DESC	0, HDR, 16, F_NEXT, 1

	# A good write and read-back of sector 5 still work.
	mov	$BUF, %edi
	mov	$64, %ecx
	mov	$0x1122334455667788, %rax
	rep stosq
	HDR	1, 5
	DESC	1, BUF, 512, F_NEXT, 2
	xor	%ebx, %ebx
	call	post
	mov	%eax, %r13d
	mov	$BUF, %edi
	mov	$64, %ecx
	xor	%eax, %eax
	rep stosq
	HDR	0, 5
	DESC	1, BUF, 512, F_NEXT | F_WRITE, 2
	call	post
	mov	%eax, %r14d
	lea	s_recovered(%rip), %rsi
	call	puts
	mov	%r13, %rax
	call	print_dec
	lea	s_read(%rip), %rsi
	call	puts
	mov	%r14, %rax
	call	print_dec
	lea	s_match(%rip), %rsi
	call	puts
	mov	$0x1122334455667788, %rax
	xor	%edx, %edx
	cmp	%rax, BUF
	jne	2f
	cmp	%rax, BUF + 504
	jne	2f
	inc	%edx
2:	mov	%rdx, %rax
	call	print_dec
	mov	$'\n', %al
	call	putc
	xor	%eax, %eax
	jmp	exit

# post: submit descriptor chain 0 and wait for it. Prints "case EBX status=S len=L"
# unless EBX is 0. Returns the status byte in EAX.
post:
	movb	$0xff, STATUS
	movzwl	AVAIL + 2, %edx
	mov	%edx, %edi
	and	$(QSIZE - 1), %edi
	movw	$0, AVAIL + 4(,%rdi,2)
	inc	%edx
	movw	%dx, AVAIL + 2
	movl	$0, 0x50(%r12)
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
2:	test	%ebx, %ebx
	jz	3f
	lea	s_case(%rip), %rsi
	call	puts
	mov	%rbx, %rax
	call	print_dec
	lea	s_status(%rip), %rsi
	call	puts
	movzbl	STATUS, %eax
	call	print_dec
	lea	s_len(%rip), %rsi
	call	puts
	mov	%edi, %eax		# used ring slot = avail slot (one request at a time)
	mov	USED + 8(,%rax,8), %eax
	call	print_dec
	mov	$'\n', %al
	call	putc
3:	movzbl	STATUS, %eax
	ret

fail_probe:
	lea	s_probe(%rip), %rsi
	call	puts
	mov	$2, %al
	jmp	exit

	.include "lib64.inc"
	.include "virtio.inc"

s_case:		.asciz	"case "
s_status:	.asciz	" status="
s_len:		.asciz	" len="
s_recovered:	.asciz	"recovered write="
s_read:		.asciz	" read="
s_match:	.asciz	" match="
s_timeout:	.asciz	"request timed out\n"
s_probe:	.asciz	"virtio-blk probe failed\n"
