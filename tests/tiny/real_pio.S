# Port I/O in both directions: writes 0x42 to the test port, reads a byte the test chose
# from port 0xf5, writes that byte plus one back, then resets the machine.
	.code16
	.globl start
start:
	cli
	mov	$0x42, %al
	out	%al, $0xf4		# OUT exit: the test sees 0x42
	in	$0xf5, %al		# IN exit: the test supplies al
	inc	%al
	out	%al, $0xf4		# the test sees its value + 1
	mov	$0xfe, %al
	out	%al, $0x64		# i8042 reset: the VM ends
	hlt
