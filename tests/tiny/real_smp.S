# Run by every vCPU: reports the vCPU index the VMM put in di, then the initial APIC ID
# from CPUID leaf 1 (EBX bits 31..24), on the test port; then halts with interrupts off.
	.code16
	.globl start
start:
	cli
	mov	%di, %ax
	out	%al, $0xf4		# vCPU index
	mov	$1, %eax
	cpuid
	shr	$24, %ebx
	mov	%bl, %al
	or	$0x80, %al		# tag: 0x80 | APIC ID
	out	%al, $0xf4
halt:
	hlt				# with IF=0 this never wakes; the vCPU stays in KVM_RUN
	jmp	halt
