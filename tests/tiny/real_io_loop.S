# Reads a byte from port 0xf5 and writes it back to port 0xf4, for ever. A VMM that saves
# this vCPU while an IN is half done (its exit handled, the result not yet in AL) shows AL
# behind the value the device last handed out.
	.code16
	.globl start
start:
	cli
1:	in	$0xf5, %al
	out	%al, $0xf4
	jmp	1b
