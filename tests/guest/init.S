/*
 * /init of the test guest's initramfs: a static x86-64 program with no libc.
 * Where guest user space works (hardware KVM) it sleeps for ever in pause(2).
 * On hosts where it does not, the kernel is booted with `ferry.park` and never runs it.
 */
	.globl _start
	.text
_start:
1:	mov	$34, %eax		/* __NR_pause */
	syscall
	jmp	1b
