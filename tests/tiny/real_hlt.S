# Halts with interrupts disabled. With the in-kernel irqchip HLT does not exit to the VMM:
# the vCPU sleeps inside KVM_RUN with MP state HALTED until the VMM kicks it.
	.code16
	.globl start
start:
	cli
	mov	$0x48, %al		# 'H': about to halt
	out	%al, $0xf4
	hlt
	mov	$0x57, %al		# 'W': woke up (must not happen)
	out	%al, $0xf4
	jmp	start
