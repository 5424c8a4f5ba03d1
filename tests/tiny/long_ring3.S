# Drops to ring 3 and stores to many pages at full speed there: pass p writes p into the
# first quadword of each of 256 pages at 0x200000 (1 MiB), then reports p by an MMIO write
# to 0xd0000000 (ring 3 cannot do port I/O on every host). The counter only grows, so a
# test can see whether the vCPU runs.
	.code64
	.globl start
	.set	BUF, 0x200000
	.set	PAGES, 256
start:
	lgdt	gdt_desc(%rip)		# our own GDT, with ring-3 segments
	push	$(0x18 | 3)		# ss: user data, RPL 3
	push	$0x1f0000		# rsp: a user stack (unused)
	push	$0x002			# rflags: IF=0, IOPL=0
	push	$(0x20 | 3)		# cs: user code, RPL 3
	lea	user(%rip), %rax
	push	%rax			# rip
	iretq
user:
	mov	$0xd0000000, %rbx	# the MMIO report address
	xor	%rcx, %rcx		# pass
pass:
	inc	%rcx
	mov	$BUF, %rdi
	mov	$PAGES, %rdx
page:
	mov	%rcx, (%rdi)		# dirty one page
	add	$4096, %rdi
	dec	%rdx
	jnz	page
	mov	%rcx, (%rbx)		# report the pass (MMIO exit)
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
