# build: load_address=0x100000
# kvstore: a tiny key-value store on the serial console (64-bit long mode).
# Load at 0x100000, entry 0x100000, mode "long" (samples/kvstore.toml).
#
# Prints "kvstore ready\n> " and then reads commands, one per line, from COM1
# (no echo; "\r" is ignored):
#   set KEY VALUE   ->  "ok"       (KEY: 1-31 bytes, no spaces; VALUE: the
#                                   rest of the line, 1-95 bytes)
#   get KEY         ->  VALUE, or "missing"
#   count           ->  the number of keys
#   quit            ->  "bye", then the VM ends with status 0
# anything else answers "error: ...". Every answer is one line followed by
# the prompt "> ", so a test can wait for "> " to know the command is done.
#
# Waiting for input does not spin: the guest sleeps in `hlt` until the UART's
# receive interrupt (IRQ4 through the 8259 PIC, vector 0x24) wakes it, so an
# idle clone costs no host CPU. Up to 256 keys live in a table at 2 MiB
# (128 bytes each: key NUL-padded to 32, value NUL-padded to 96).

	.equ	VEC_COM1, 0x24
	.equ	VEC_PIC_SPURIOUS, 0x27
	.equ	MAX_KEYS, 256
	.equ	KEY_MAX, 31
	.equ	VAL_MAX, 95
	.equ	TABLE, 0x200000
	.equ	LINE_MAX, 200
	.equ	COM1_IER, 0x3f9
	.equ	COM1_MCR, 0x3fc
	.equ	COM1_LSR, 0x3fd

	.code64
	.text
	.globl	_start
_start:
	cli
	cld
	call	map_lapic

	# IDT: exceptions report and exit; other vectors are ignored, COM1 EOIs.
	xor	%ecx, %ecx
	lea	fault_handler(%rip), %rax
1:	call	set_gate
	inc	%ecx
	cmp	$32, %ecx
	jb	1b
	lea	ignore_handler(%rip), %rax
2:	call	set_gate
	inc	%ecx
	cmp	$256, %ecx
	jb	2b
	mov	$VEC_COM1, %ecx
	lea	com1_handler(%rip), %rax
	call	set_gate
	lidt	idtr(%rip)

	# 8259 pair: master at 0x20, slave at 0x28, only IRQ4 (COM1) unmasked.
	mov	$0x11, %al
	out	%al, $0x20
	out	%al, $0xa0
	mov	$0x20, %al
	out	%al, $0x21
	mov	$0x28, %al
	out	%al, $0xa1
	mov	$0x04, %al
	out	%al, $0x21
	mov	$0x02, %al
	out	%al, $0xa1
	mov	$0x01, %al
	out	%al, $0x21
	out	%al, $0xa1
	mov	$0xef, %al
	out	%al, $0x21
	mov	$0xff, %al
	out	%al, $0xa1

	# LAPIC: software-enable and take PIC interrupts on LINT0 as ExtINT
	# (KVM drops them while the LAPIC is enabled with LINT0 masked).
	mov	$LAPIC, %ebx
	movl	$0, LAPIC_TPR(%rbx)
	movl	$0x1ff, LAPIC_SVR(%rbx)
	movl	$0x700, LAPIC_LVT_LINT0(%rbx)

	# UART: interrupt on received data; OUT2 | RTS | DTR as a PC driver sets.
	mov	$COM1_MCR, %dx
	mov	$0x0b, %al
	out	%al, %dx
	mov	$COM1_IER, %dx
	mov	$0x01, %al
	out	%al, %dx

	lea	s_ready(%rip), %rsi
	call	puts

prompt:
	lea	s_prompt(%rip), %rsi
	call	puts
	call	read_line
	lea	linebuf(%rip), %rsi
	cmpb	$0, (%rsi)
	je	prompt
	lea	w_set(%rip), %rdi
	call	starts_with
	jz	cmd_set
	lea	w_get(%rip), %rdi
	call	starts_with
	jz	cmd_get
	lea	w_count(%rip), %rdi
	call	is_word
	jz	cmd_count
	lea	w_quit(%rip), %rdi
	call	is_word
	jz	cmd_quit
	lea	s_unknown(%rip), %rsi
	jmp	answer

cmd_count:
	mov	count(%rip), %rax
	call	print_dec
	mov	$'\n', %al
	call	putc
	jmp	prompt

cmd_quit:
	lea	s_bye(%rip), %rsi
	call	puts
	mov	$0, %al
	jmp	exit

cmd_get:
	call	parse_key
	test	%rax, %rax
	jnz	key_error
	cmpb	$0, (%rsi)
	jne	bad_args
	call	find_key
	test	%rdi, %rdi
	jz	get_missing
	lea	32(%rdi), %rsi
	call	puts
	mov	$'\n', %al
	call	putc
	jmp	prompt
get_missing:
	lea	s_missing(%rip), %rsi
	jmp	answer

cmd_set:
	call	parse_key
	test	%rax, %rax
	jnz	key_error
	cmpb	$' ', (%rsi)
	jne	bad_args
	inc	%rsi
	# RSI = value; RCX = its length.
	xor	%ecx, %ecx
1:	cmpb	$0, (%rsi,%rcx)
	je	2f
	inc	%rcx
	jmp	1b
2:	test	%rcx, %rcx
	jz	bad_args
	cmp	$VAL_MAX, %rcx
	ja	val_too_long
	call	find_key
	test	%rdi, %rdi
	jnz	set_value
	mov	count(%rip), %rax
	cmp	$MAX_KEYS, %rax
	jae	table_full
	incq	count(%rip)
	shl	$7, %rax
	add	$TABLE, %rax
	mov	%rax, %rdi
	lea	keybuf(%rip), %rdx
	mov	(%rdx), %rax
	mov	%rax, (%rdi)
	mov	8(%rdx), %rax
	mov	%rax, 8(%rdi)
	mov	16(%rdx), %rax
	mov	%rax, 16(%rdi)
	mov	24(%rdx), %rax
	mov	%rax, 24(%rdi)
set_value:
	# Clear the old value (96 bytes), then copy RCX bytes from RSI.
	add	$32, %rdi
	xor	%eax, %eax
	xor	%edx, %edx
3:	mov	%rax, (%rdi,%rdx,8)
	inc	%edx
	cmp	$12, %edx
	jb	3b
	xor	%edx, %edx
4:	mov	(%rsi,%rdx), %al
	mov	%al, (%rdi,%rdx)
	inc	%rdx
	cmp	%rcx, %rdx
	jb	4b
	lea	s_ok(%rip), %rsi
	jmp	answer

key_error:
	mov	%rax, %rsi
	jmp	answer
bad_args:
	lea	s_bad_args(%rip), %rsi
	jmp	answer
val_too_long:
	lea	s_val_long(%rip), %rsi
	jmp	answer
table_full:
	lea	s_full(%rip), %rsi
answer:
	call	puts
	jmp	prompt

# getc: wait for a byte from COM1 and return it in AL. Checks the LSR with
# interrupts off and only then does `sti; hlt` (STI's one-instruction shadow
# means an interrupt cannot slip in between), so no wake-up is lost.
getc:
	push	%rdx
1:	cli
	mov	$COM1_LSR, %dx
	in	%dx, %al
	test	$1, %al
	jnz	2f
	sti
	hlt
	jmp	1b
2:	mov	$COM1, %dx
	in	%dx, %al
	pop	%rdx
	ret

# read_line: read one line into linebuf, NUL-terminated, without the "\n";
# "\r" is dropped and bytes past LINE_MAX are discarded.
read_line:
	push	%rax
	push	%rcx
	push	%rdi
	lea	linebuf(%rip), %rdi
	xor	%ecx, %ecx
1:	call	getc
	cmp	$'\r', %al
	je	1b
	cmp	$'\n', %al
	je	2f
	cmp	$LINE_MAX, %ecx
	jae	1b
	mov	%al, (%rdi,%rcx)
	inc	%ecx
	jmp	1b
2:	movb	$0, (%rdi,%rcx)
	pop	%rdi
	pop	%rcx
	pop	%rax
	ret

# starts_with: ZF set and RSI advanced past the word if the string at RSI
# begins with the NUL-terminated word at RDI.
starts_with:
	push	%rax
	push	%rcx
	push	%rdi
	xor	%ecx, %ecx
1:	mov	(%rdi,%rcx), %al
	test	%al, %al
	jz	2f
	cmp	(%rsi,%rcx), %al
	jne	3f
	inc	%rcx
	jmp	1b
2:	add	%rcx, %rsi
	xor	%eax, %eax			# sets ZF
3:	pop	%rdi
	pop	%rcx
	pop	%rax
	ret

# is_word: ZF set if the string at RSI equals the word at RDI.
is_word:
	push	%rsi
	call	starts_with
	jnz	1f
	cmpb	$0, (%rsi)
1:	pop	%rsi
	ret

# parse_key: copy the key at RSI (up to a space or NUL) into the zeroed
# 32-byte keybuf; RSI ends on the terminator. RAX = 0, or the address of an
# error message (empty or too long key).
parse_key:
	push	%rcx
	push	%rdi
	lea	keybuf(%rip), %rdi
	xor	%eax, %eax
	mov	%rax, (%rdi)
	mov	%rax, 8(%rdi)
	mov	%rax, 16(%rdi)
	mov	%rax, 24(%rdi)
	xor	%ecx, %ecx
1:	mov	(%rsi), %al
	test	%al, %al
	jz	2f
	cmp	$' ', %al
	je	2f
	cmp	$KEY_MAX, %ecx
	jae	3f
	mov	%al, (%rdi,%rcx)
	inc	%ecx
	inc	%rsi
	jmp	1b
2:	xor	%eax, %eax
	test	%ecx, %ecx
	jnz	4f
	lea	s_bad_args(%rip), %rax
	jmp	4f
3:	lea	s_key_long(%rip), %rax
4:	pop	%rdi
	pop	%rcx
	ret

# find_key: RDI = the table entry whose key equals keybuf, or 0.
find_key:
	push	%rax
	push	%rcx
	push	%rdx
	push	%rsi
	lea	keybuf(%rip), %rsi
	mov	$TABLE, %rdi
	mov	count(%rip), %rcx
1:	test	%rcx, %rcx
	jz	3f
	xor	%edx, %edx
2:	mov	(%rdi,%rdx,8), %rax
	cmp	(%rsi,%rdx,8), %rax
	jne	4f
	inc	%edx
	cmp	$4, %edx
	jb	2b
	jmp	5f
4:	add	$128, %rdi
	dec	%rcx
	jmp	1b
3:	xor	%edi, %edi
5:	pop	%rsi
	pop	%rdx
	pop	%rcx
	pop	%rax
	ret

# The main loop reads the data itself; the interrupt only has to end `hlt`.
com1_handler:
	push	%rax
	mov	$0x20, %al			# non-specific EOI to the master PIC
	out	%al, $0x20
	pop	%rax
	iretq

# Spurious and unexpected external interrupts: no EOI (a spurious IRQ7 must
# not get one, and nothing else is unmasked).
ignore_handler:
	iretq

fault_handler:
	lea	s_fault(%rip), %rsi
	call	puts
	mov	$3, %al
	jmp	exit

	.include "lib64.inc"
	.include "idt.inc"
	.include "lapic.inc"

s_ready:	.asciz	"kvstore ready\n"
s_prompt:	.asciz	"> "
s_ok:		.asciz	"ok\n"
s_missing:	.asciz	"missing\n"
s_bye:		.asciz	"bye\n"
s_unknown:	.asciz	"error: unknown command (set KEY VALUE, get KEY, count, quit)\n"
s_bad_args:	.asciz	"error: usage: set KEY VALUE | get KEY\n"
s_key_long:	.asciz	"error: key longer than 31 bytes\n"
s_val_long:	.asciz	"error: value longer than 95 bytes\n"
s_full:		.asciz	"error: table full (256 keys)\n"
s_fault:	.asciz	"kvstore: CPU exception\n"
w_set:		.asciz	"set "
w_get:		.asciz	"get "
w_count:	.asciz	"count"
w_quit:		.asciz	"quit"

	.balign	8
count:		.quad	0
keybuf:		.skip	32
idtr:		.word	256 * 16 - 1
		.quad	idt
linebuf:	.skip	LINE_MAX + 8

	.balign	4096
idt:		.skip	256 * 16
lapic_pd:	.skip	4096
