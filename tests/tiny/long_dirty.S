# Dirties exactly N pages for the dirty-log test: reads N from the MMIO test device
# (offset 8), stores one byte into each of N consecutive pages from 0x400000 (4 MiB),
# reports N back (MMIO write to offset 0), then halts with interrupts off. It writes no
# other memory (no stack use), so the pages KVM logs in that range are exactly the N.
	.code64
	.globl start
	.set	BUF, 0x400000
start:
	cli
	mov	$0xd0000000, %rbx	# MMIO test device
	mov	8(%rbx), %rcx		# N, chosen by the test
	mov	%rcx, %rdx
	mov	$BUF, %rdi
page:
	test	%rdx, %rdx
	jz	done
	movb	$0xa5, (%rdi)
	add	$4096, %rdi
	dec	%rdx
	jmp	page
done:
	mov	%rcx, (%rbx)		# report N: all stores are done
halt:
	hlt
	jmp	halt
