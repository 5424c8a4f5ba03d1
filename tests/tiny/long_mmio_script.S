# Plays a script of 32-bit MMIO accesses that the test wrote at 0x200000, then writes 1 to
# the MMIO test page and halts: a virtio driver's register traffic (status, features,
# queue setup, QueueNotify) with the queues the test laid out in RAM.
# Entry (16 bytes): op u32 | value u32 | address u64.
#   op 1: write value to address
#   op 2: read address into the entry's value
#   op 3: read address until (read & value) != 0, at most 2^24 times; the last read goes
#         into the entry's value
#   op 0: end
	.code64
	.globl start
start:
	mov	$0x200000, %rsi
next:
	mov	(%rsi), %eax
	test	%eax, %eax
	jz	done
	mov	8(%rsi), %rbx
	cmp	$1, %eax
	jne	1f
	mov	4(%rsi), %ecx
	movl	%ecx, (%rbx)		# MMIO write
	jmp	step
1:	cmp	$2, %eax
	jne	2f
	movl	(%rbx), %ecx		# MMIO read
	mov	%ecx, 4(%rsi)
	jmp	step
2:	mov	4(%rsi), %edx		# the bits to wait for
	mov	$0x1000000, %edi
3:	movl	(%rbx), %ecx
	test	%edx, %ecx
	jnz	4f
	dec	%edi
	jnz	3b
4:	mov	%ecx, 4(%rsi)
step:
	add	$16, %rsi
	jmp	next
done:
	mov	$0xd0000000, %rbx
	movl	$1, (%rbx)
5:	hlt
	jmp	5b
