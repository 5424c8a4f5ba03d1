# The heavy dirtier for migration tests: drops to ring 3 and stores to 4096 pages (16 MiB
# from 0x1000000) as fast as it can, checking each page first. Pass p expects every page to
# hold p - 1 (what pass p - 1 stored) and counts each page that does not, then stores p.
# After each pass it writes the pass number to 0x800000 and the count of bad pages to
# 0x800008. It makes no exits at all, so it runs at native speed, and a migration that loses
# or tears a page shows as a non-zero count on the destination.
	.code64
	.globl start
	.set	BUF, 0x1000000
	.set	PAGES, 4096
	.set	STATUS, 0x800000
start:
	lgdt	gdt_desc(%rip)		# our own GDT, with ring-3 segments
	push	$(0x18 | 3)		# ss: user data, RPL 3
	push	$0x7f0000		# rsp: a user stack (unused)
	push	$0x002			# rflags: IF=0, IOPL=0
	push	$(0x20 | 3)		# cs: user code, RPL 3
	lea	user(%rip), %rax
	push	%rax			# rip
	iretq
user:
	xor	%rcx, %rcx		# pass
	xor	%r9, %r9		# bad pages seen
pass:
	mov	%rcx, %r8		# what every page holds now
	inc	%rcx
	mov	$BUF, %rdi
	mov	$PAGES, %rdx
page:
	cmp	%r8, (%rdi)
	je	1f
	inc	%r9
1:	mov	%rcx, (%rdi)
	add	$4096, %rdi
	dec	%rdx
	jnz	page
	mov	$STATUS, %rax
	mov	%r9, 8(%rax)
	mov	%rcx, (%rax)
	jmp	pass

	.p2align 3
gdt:
	.quad	0			# null
	.quad	0x00af9b000000ffff	# 0x08 kernel code 64-bit
	.quad	0x00cf93000000ffff	# 0x10 kernel data
	.quad	0x00cff3000000ffff	# 0x18 user data, DPL 3
	.quad	0x00affb000000ffff	# 0x20 user code 64-bit, DPL 3
gdt_end:
gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	gdt
