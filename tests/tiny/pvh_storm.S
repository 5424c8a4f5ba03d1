# The heaviest dirtier, bootable by any VMM that boots a PVH ELF (ferry run --kernel, QEMU
# -kernel): it builds its own long mode, drops to ring 3 and stores one word into each page
# of 256 MiB from 64 MiB, pass after pass, as fast as the CPU goes (ring 3 makes no exits, so
# it runs at native speed even where guest ring 0 is emulated). A periodic local APIC timer
# (1 ms: KVM's APIC timer counts nanoseconds, divide by 1) interrupts it into a ring-0
# handler that writes the low byte of a heartbeat count to the debug port 0xe9. Needs 512 MiB
# of RAM or more. Prints "GUEST-READY pvh_storm" on COM1 once the timer runs.
#
# Memory it uses besides its image (at 1 MiB): page tables, IDT, TSS and stacks at 2 MiB;
# the pass count at 0x300000; the working set at 0x4000000.
	.set	LAPIC, 0xfee00000
	.set	PML4, 0x200000
	.set	PDPT, 0x201000
	.set	PD, 0x202000		# four page directories: the first 4 GiB, 2 MiB pages
	.set	IDT, 0x206000
	.set	TSS, 0x207000
	.set	KSTACK, 0x20f000
	.set	USTACK, 0x21f000
	.set	STATUS, 0x300000
	.set	BUF, 0x4000000
	.set	PAGES, 65536
	.set	COM1, 0x3f8

	# The PVH entry note: XEN_ELFNOTE_PHYS32_ENTRY (18), the 32-bit entry point.
	.section .note.Xen, "a", @note
	.p2align 2
	.long	4, 8, 18
	.asciz	"Xen"
	.quad	pvh_start

	.text
	.code32
	.globl	start
start:
pvh_start:
	cli
	# Identity map of 4 GiB, user-accessible (P|RW|US), 2 MiB pages; the local APIC's
	# page uncached.
	movl	$(PDPT | 7), PML4
	movl	$(PD | 7), PDPT
	movl	$((PD + 0x1000) | 7), PDPT + 8
	movl	$((PD + 0x2000) | 7), PDPT + 16
	movl	$((PD + 0x3000) | 7), PDPT + 24
	mov	$PD, %edi
	xor	%eax, %eax
	mov	$2048, %ecx
1:	mov	%eax, %ebx
	or	$0x87, %ebx		# P|RW|US|PS
	mov	%ebx, (%edi)
	movl	$0, 4(%edi)
	add	$0x200000, %eax
	add	$8, %edi
	loop	1b
	orl	$0x18, PD + (LAPIC >> 21) * 8	# PCD|PWT
	mov	$PML4, %eax
	mov	%eax, %cr3
	mov	%cr4, %eax
	or	$0x20, %eax		# PAE
	mov	%eax, %cr4
	mov	$0xc0000080, %ecx	# EFER
	rdmsr
	or	$0x100, %eax		# LME
	wrmsr
	mov	%cr0, %eax
	or	$0x80000001, %eax	# PG|PE
	mov	%eax, %cr0
	lgdt	gdt_desc
	ljmp	$0x08, $long_entry

	.code64
long_entry:
	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	%ax, %fs
	mov	%ax, %gs
	mov	$KSTACK, %rsp
	movq	$KSTACK, TSS + 4	# rsp0: the stack interrupts from ring 3 use
	movw	$0x68, TSS + 0x66	# I/O map base past the limit: no I/O bitmap
	mov	$0x28, %ax
	ltr	%ax
	# The IDT: every vector to `fault`, 0x20 to the timer, 0xff (spurious) to `spurious`.
	mov	$IDT, %rdi
	xor	%ecx, %ecx
2:	lea	fault(%rip), %rax
	cmp	$0x20, %ecx
	jne	3f
	lea	timer(%rip), %rax
3:	cmp	$0xff, %ecx
	jne	4f
	lea	spurious(%rip), %rax
4:	mov	%rax, %rdx
	and	$0xffff, %edx		# offset 15:0
	mov	%rax, %rbx
	shr	$16, %rbx
	and	$0xffff, %ebx
	shl	$48, %rbx		# offset 31:16
	or	%rbx, %rdx
	movabs	$0x00008e0000080000, %rbx	# present interrupt gate, DPL 0, selector 0x08
	or	%rbx, %rdx
	mov	%rdx, (%rdi)
	shr	$32, %rax
	mov	%rax, 8(%rdi)		# offset 63:32
	add	$16, %rdi
	inc	%ecx
	cmp	$256, %ecx
	jne	2b
	lidt	idt_desc(%rip)
	# The local APIC: enabled, timer periodic on vector 0x20 every 1,000,000 ticks.
	mov	$LAPIC, %rbx
	movl	$0x1ff, 0xf0(%rbx)	# spurious vector 0xff, APIC enabled
	movl	$0xb, 0x3e0(%rbx)	# divide by 1
	movl	$0x20020, 0x320(%rbx)	# LVT timer: periodic, vector 0x20
	movl	$1000000, 0x380(%rbx)	# initial count
	lea	ready(%rip), %rsi
	call	puts
	# Ring 3, interrupts on.
	push	$(0x18 | 3)		# ss
	push	$USTACK			# rsp
	push	$0x202			# rflags: IF
	push	$(0x20 | 3)		# cs
	lea	user(%rip), %rax
	push	%rax
	iretq

user:
	xor	%rcx, %rcx
5:	inc	%rcx
	mov	$BUF, %rdi
	mov	$PAGES, %edx
6:	mov	%rcx, (%rdi)
	add	$4096, %rdi
	dec	%edx
	jnz	6b
	mov	%rcx, STATUS
	jmp	5b

# The heartbeat: count, write the count's low byte to the debug port, end the interrupt.
timer:
	push	%rax
	push	%rdx
	incq	beats(%rip)
	mov	beats(%rip), %rax
	mov	$0xe9, %dx
	out	%al, %dx
	mov	$LAPIC, %rax
	movl	$0, 0xb0(%rax)		# EOI
	pop	%rdx
	pop	%rax
	iretq

spurious:
	iretq

fault:
	lea	faulted(%rip), %rsi
	call	puts
7:	cli
	hlt
	jmp	7b

# Writes the NUL-terminated string at rsi to COM1.
puts:
	mov	$COM1, %dx
8:	lodsb
	test	%al, %al
	jz	9f
	out	%al, %dx
	jmp	8b
9:	ret

	.data
	.p2align 3
beats:	.quad	0
gdt:
	.quad	0			# null
	.quad	0x00af9b000000ffff	# 0x08 kernel code, 64-bit
	.quad	0x00cf93000000ffff	# 0x10 kernel data
	.quad	0x00cff3000000ffff	# 0x18 user data, DPL 3
	.quad	0x00affb000000ffff	# 0x20 user code, 64-bit, DPL 3
	# 0x28: the TSS (available 64-bit TSS at TSS, limit 0x67)
	.word	0x67, TSS & 0xffff
	.byte	(TSS >> 16) & 0xff, 0x89, 0, (TSS >> 24) & 0xff
	.quad	0
gdt_end:
gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	gdt
idt_desc:
	.word	256 * 16 - 1
	.quad	IDT
ready:	.asciz	"GUEST-READY pvh_storm\n"
faulted: .asciz	"PVH-STORM-FAULT\n"
