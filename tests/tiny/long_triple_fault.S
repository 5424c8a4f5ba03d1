# Loads an empty IDT and executes an undefined instruction: #UD cannot be delivered, nor
# can the resulting #GP or #DF, so the CPU shuts down (a triple fault).
	.code64
	.globl start
start:
	lidt	empty_idt(%rip)
	ud2
empty_idt:
	.word	0			# limit
	.quad	0			# base
