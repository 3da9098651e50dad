# build: load_address=0x100000
# blk: a minimal virtio-blk driver (virtio-mmio device 0 at 0xd0000000), 64-bit long mode.
# Load at 0x100000, entry 0x100000, mode "long" (samples/blk.toml); the disk needs at least
# 64 sectors (32 KiB). It polls the used ring (no interrupts) and prints to COM1:
#   "capacity N"                       disk size in 512-byte sectors
#   "pass 0 sum=H"                     checksum of sectors 0..63 as found
#   then for pass P = 1..3:
#   "pass P written"                   64 single-sector writes of pattern(sector, P) done
#   (~2 s pause, so a test can save here)
#   "pass P sum=H bad=N"               one 32 KiB read of sectors 0..63: checksum, bad qwords
#   "flush status=S", "id TEXT"        a FLUSH and a GET_ID request
# and exits 0 (1 if any qword was wrong; 2-5 for driver failures). A read-only device
# (VIRTIO_BLK_F_RO) gets one write instead, prints "write status=S" (1 = IOERR expected),
# "pass 0 sum=H" and exits 0.

	.equ	MMIO, 0xd0000000
	.equ	PDPT, 0xa000		# the VMM's page tables; entry 3 maps 3..4 GiB
	.equ	PD_HIGH, 0x204000	# our page directory for 3..4 GiB (uncached)
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
	.equ	PASSES, 3
	.equ	WAIT_STEPS, 100		# x ~20 ms
	.equ	POLL_LIMIT, 20000000

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

	testl	$(1 << 5), features(%rip)
	jnz	read_only

	xor	%r13d, %r13d		# pass 0: what the disk holds now
	call	read_check
	mov	$1, %r13d
pass_loop:
	xor	%ebx, %ebx
2:	mov	$WBUF, %edi
	call	fill
	mov	$1, %eax		# VIRTIO_BLK_T_OUT
	mov	$WBUF, %esi
	mov	$512, %ecx
	xor	%r8d, %r8d
	call	submit
	test	%al, %al
	jnz	fail_status
	inc	%ebx
	cmp	$NSECT, %ebx
	jb	2b
	lea	s_pass(%rip), %rsi
	call	puts
	mov	%r13, %rax
	call	print_dec
	lea	s_written(%rip), %rsi
	call	puts
	call	wait
	call	read_check
	call	wait
	inc	%r13d
	cmp	$PASSES, %r13d
	jbe	pass_loop

	mov	$4, %eax		# VIRTIO_BLK_T_FLUSH
	xor	%ebx, %ebx
	xor	%ecx, %ecx
	call	submit
	lea	s_flush(%rip), %rsi
	call	puts
	movzbl	%al, %eax
	call	print_dec
	call	newline

	mov	$8, %eax		# VIRTIO_BLK_T_GET_ID
	xor	%ebx, %ebx
	mov	$IDBUF, %esi
	mov	$20, %ecx
	mov	$2, %r8d
	call	submit
	test	%al, %al
	jnz	fail_status
	lea	s_id(%rip), %rsi
	call	puts
	mov	$IDBUF, %esi
	call	puts
	call	newline

	mov	bad_total(%rip), %rax
	test	%rax, %rax
	setnz	%al
	jmp	exit

read_only:
	lea	s_ro(%rip), %rsi
	call	puts
	xor	%ebx, %ebx
	mov	$WBUF, %edi
	mov	$1, %r13d
	call	fill
	mov	$1, %eax
	mov	$WBUF, %esi
	mov	$512, %ecx
	xor	%r8d, %r8d
	call	submit
	lea	s_wstatus(%rip), %rsi
	call	puts
	movzbl	%al, %eax
	call	print_dec
	call	newline
	xor	%r13d, %r13d
	call	read_check
	xor	%eax, %eax
	jmp	exit

# read_check: read sectors 0..63 in one request, print "pass R13 sum=H bad=N"
# (bad counts qwords differing from pattern(sector, R13); not printed for pass 0).
read_check:
	push	%rbx
	xor	%eax, %eax		# VIRTIO_BLK_T_IN
	xor	%ebx, %ebx
	mov	$RBUF, %esi
	mov	$(NSECT * 512), %ecx
	mov	$2, %r8d
	call	submit
	test	%al, %al
	jnz	fail_status
	mov	$0xcbf29ce484222325, %r9	# checksum
	mov	$0x100000001b3, %r11
	xor	%r10d, %r10d		# bad qwords
	xor	%ebx, %ebx
1:	mov	$WBUF, %edi
	call	fill
	mov	%ebx, %esi
	shl	$9, %esi
	add	$RBUF, %esi
	xor	%ecx, %ecx
2:	mov	(%rsi,%rcx,8), %rax
	xor	%rax, %r9		# FNV-style: h = (h ^ v) * prime
	imul	%r11, %r9
	cmp	WBUF(,%rcx,8), %rax
	je	3f
	inc	%r10
3:	inc	%ecx
	cmp	$64, %ecx
	jb	2b
	inc	%ebx
	cmp	$NSECT, %ebx
	jb	1b
	lea	s_pass(%rip), %rsi
	call	puts
	mov	%r13, %rax
	call	print_dec
	lea	s_sum(%rip), %rsi
	call	puts
	mov	%r9, %rax
	call	print_hex
	test	%r13, %r13
	jz	4f
	lea	s_bad(%rip), %rsi
	call	puts
	mov	%r10, %rax
	call	print_dec
	add	%r10, bad_total(%rip)
4:	call	newline
	pop	%rbx
	ret

# fill: 64 qwords at RDI = pattern(sector RBX, pass R13): (RBX << 16 | R13) * K + i.
fill:
	push	%rax
	push	%rcx
	push	%rdx
	mov	%rbx, %rax
	shl	$16, %rax
	or	%r13, %rax
	mov	$0x9e3779b97f4a7c15, %rdx
	imul	%rdx, %rax
	xor	%ecx, %ecx
1:	mov	%rax, (%rdi,%rcx,8)
	inc	%rax
	inc	%ecx
	cmp	$64, %ecx
	jb	1b
	pop	%rdx
	pop	%rcx
	pop	%rax
	ret

wait:
	push	%rbx
	mov	$WAIT_STEPS, %ebx
1:	call	delay_step
	dec	%ebx
	jnz	1b
	pop	%rbx
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
	.balign	8
bad_total:	.quad	0
s_capacity:	.asciz	"capacity "
s_pass:		.asciz	"pass "
s_written:	.asciz	" written\n"
s_sum:		.asciz	" sum="
s_bad:		.asciz	" bad="
s_flush:	.asciz	"flush status="
s_id:		.asciz	"id "
s_ro:		.asciz	"read-only disk\n"
s_wstatus:	.asciz	"write status="
s_timeout:	.asciz	"request timed out\n"
s_probe:	.asciz	"virtio-blk probe failed\n"
s_status:	.asciz	"request failed, status "
s_small:	.asciz	"disk smaller than 64 sectors\n"
