# Prints a line on COM1 the way a BIOS would (poll the line status register until the
# transmitter holding register is empty, then write the byte), then resets the machine
# through the i8042, which ends the VM cleanly.
	.code16
	.globl start
start:
	cli
	mov	$message, %si
next_char:
	lodsb				# al = *si++
	test	%al, %al
	jz	done
	mov	%al, %bl
	mov	$0x3fd, %dx		# COM1 line status register
wait_thre:
	in	%dx, %al
	test	$0x20, %al		# THRE: ready for a byte
	jz	wait_thre
	mov	$0x3f8, %dx		# COM1 data register
	mov	%bl, %al
	out	%al, %dx
	jmp	next_char
done:
	mov	$0xfe, %al		# i8042 command: pulse the reset line
	out	%al, $0x64
	hlt				# not reached
message:
	.asciz	"Hello from ferry's real-mode guest\r\n"
