# A counter in ring 0 that prints each value on COM1 as 16 hex digits and a newline, for
# snapshot tests across processes: a restored guest must print the next value. The
# counter lives in memory (at COUNTER), so it travels with RAM as well as in registers.
	.code64
	.globl start
	.set	COUNTER, 0x300000
start:
	mov	$COUNTER, %rdi
	movq	$0, (%rdi)
next:
	incq	(%rdi)
	mov	(%rdi), %rbx		# the value to print
	mov	$16, %ecx		# hex digits
digit:
	rol	$4, %rbx
	mov	%bl, %al
	and	$0xf, %al
	add	$'0', %al
	cmp	$'9', %al
	jbe	1f
	add	$('a' - '0' - 10), %al
1:	mov	$0x3f8, %dx
	out	%al, %dx		# COM1 data register (the 16550 model never backs up)
	dec	%ecx
	jnz	digit
	mov	$'\n', %al
	out	%al, %dx
	jmp	next
