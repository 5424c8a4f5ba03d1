# Jumps to an address no memory backs (the MMIO test device's page). KVM cannot fetch
# instructions from MMIO, so it stops the vCPU with an internal error (emulation failure).
	.code64
	.globl start
start:
	mov	$0xd0000800, %rax
	jmp	*%rax
