# 64-bit MMIO: stores 0x1122334455667788 at 0xd0000000, loads a quadword the test chose
# from 0xd0000008, stores it plus one at 0xd0000010, then resets through the i8042.
	.code64
	.globl start
start:
	mov	$0xd0000000, %rbx
	mov	$0x1122334455667788, %rax
	mov	%rax, (%rbx)		# MMIO write exit, 8 bytes
	mov	8(%rbx), %rax		# MMIO read exit, 8 bytes
	inc	%rax
	mov	%rax, 16(%rbx)		# MMIO write exit
	mov	$0xfe, %al
	out	%al, $0x64		# i8042 reset
	hlt
