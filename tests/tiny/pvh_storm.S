# The heaviest dirtier, bootable by any VMM that boots a PVH ELF (ferry run --kernel, QEMU
# -kernel): it builds its own long mode, brings up the other vCPUs the VMM gave it (INIT and
# SIPI to all but itself, as a kernel does), drops every vCPU to ring 3, and there each of the
# N vCPUs that came up stores one word into each page of its N-th of 256 MiB from 64 MiB,
# pass after pass, as fast as the CPU goes (ring 3 makes no exits, so it runs at native
# speed even where guest ring 0 is emulated). A periodic local APIC timer (1 ms: KVM's APIC
# timer counts nanoseconds, divide by 1) interrupts the boot vCPU into a ring-0 handler that
# writes the low byte of a heartbeat count to the debug port 0xe9. Needs 512 MiB of RAM or
# more. Prints "GUEST-READY pvh_storm cpus=N" on COM1 once all run (N: one digit, up to 8).
#
# Memory it uses besides its image (at 1 MiB): the other vCPUs' real-mode start at 0x8000;
# page tables, IDT, TSSes and stacks from 2 MiB; vCPU i's pass count at 0x300000 + 8 * i;
# the working set at 0x4000000.
	.set	LAPIC, 0xfee00000
	.set	PML4, 0x200000
	.set	PDPT, 0x201000
	.set	PD, 0x202000		# four page directories: the first 4 GiB, 2 MiB pages
	.set	IDT, 0x206000
	.set	TSS, 0x207000		# vCPU i's at TSS + 0x80 * i
	.set	KSTACKS, 0x210000	# vCPU i's ring-0 stack ends at KSTACKS + 0x1000 * (i + 1)
	.set	USTACKS, 0x220000	# and its ring-3 stack at USTACKS + 0x1000 * (i + 1)
	.set	STATUS, 0x300000
	.set	BUF, 0x4000000
	.set	PAGES, 65536
	.set	MAXCPUS, 8
	.set	TRAMPOLINE, 0x8000	# SIPI vector 0x08
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
	lgdt	gdt_desc
	ljmp	$0x28, $paging_on

# Every vCPU from 32-bit protected mode (flat segments, paging off) to long mode on the
# boot vCPU's page tables.
paging_on:
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
	ljmp	$0x08, $long_entry

	.code64
long_entry:
	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	%ax, %fs
	mov	%ax, %gs
	# Which vCPU this is: its local APIC ID (0 .. N-1 under ferry and QEMU alike).
	mov	$LAPIC, %rax
	mov	0x20(%rax), %ebx
	shr	$24, %ebx
	cmp	$MAXCPUS, %ebx
	jae	halt
	# Its ring-0 stack, its TSS (rsp0: the stack interrupts from ring 3 use; I/O map base
	# past the limit: no I/O bitmap), and the TSS's selector 0x30 + 16 * i.
	lea	1(%rbx), %rax
	shl	$12, %rax
	lea	KSTACKS(%rax), %rsp
	mov	%rbx, %rdi
	shl	$7, %rdi
	mov	%rsp, TSS + 4(%rdi)
	movw	$0x68, TSS + 0x66(%rdi)
	mov	%rbx, %rax
	shl	$4, %rax
	add	$0x30, %eax
	ltr	%ax
	test	%ebx, %ebx
	jnz	ap_ready
	call	build_idt
	lidt	idt_desc(%rip)
	# The local APIC: enabled, timer periodic on vector 0x20 every 1,000,000 ticks.
	mov	$LAPIC, %rbx
	movl	$0x1ff, 0xf0(%rbx)	# spurious vector 0xff, APIC enabled
	movl	$0xb, 0x3e0(%rbx)	# divide by 1
	movl	$0x20020, 0x320(%rbx)	# LVT timer: periodic, vector 0x20
	movl	$1000000, 0x380(%rbx)	# initial count
	call	start_others
	lea	ready(%rip), %rsi
	call	puts
	xor	%ebx, %ebx
	jmp	to_ring3

# Another vCPU, in long mode: it says it is here and waits in ring 3 for the count.
ap_ready:
	lidt	idt_desc(%rip)
	movb	$1, present(%rbx)
	jmp	to_ring3

# Ring 3 for vCPU rbx: interrupts on for the boot vCPU (its heartbeat), off for the others.
to_ring3:
	push	$(0x18 | 3)		# ss
	lea	1(%rbx), %rax
	shl	$12, %rax
	add	$USTACKS, %rax
	push	%rax			# rsp
	mov	$0x202, %eax		# rflags: IF
	test	%ebx, %ebx
	jz	1f
	mov	$0x2, %eax
1:	push	%rax
	push	$(0x20 | 3)		# cs
	lea	user(%rip), %rax
	push	%rax
	iretq

# Copies the real-mode start to TRAMPOLINE, sends INIT and then SIPI (twice, as the MP
# specification asks) to all but this vCPU, waits 200 heartbeats for the others to say they
# are here, and publishes how many vCPUs rewrite the working set (`cpus`) and the digit
# the ready line prints.
start_others:
	lea	trampoline(%rip), %rsi
	mov	$TRAMPOLINE, %rdi
	mov	$(trampoline_end - trampoline), %ecx
	rep movsb
	mov	$LAPIC, %rbx
	movl	$0, 0x310(%rbx)
	movl	$0xc4500, 0x300(%rbx)	# INIT, level assert, all excluding self
	mov	$2, %ecx
	call	wait_beats
	movl	$(0xc4600 | (TRAMPOLINE >> 12)), 0x300(%rbx)	# SIPI
	mov	$1, %ecx
	call	wait_beats
	movl	$(0xc4600 | (TRAMPOLINE >> 12)), 0x300(%rbx)
	mov	$200, %ecx
	call	wait_beats
	movb	$1, present(%rip)
	xor	%eax, %eax
	xor	%ecx, %ecx
2:	movzbl	present(%rcx), %edx
	add	%edx, %eax
	inc	%ecx
	cmp	$MAXCPUS, %ecx
	jne	2b
	add	%al, ready_count(%rip)
	mov	%rax, cpus(%rip)
	ret

# Waits ecx heartbeats with interrupts on (the timer's handler runs at ring 0 here).
wait_beats:
	add	beats(%rip), %rcx
3:	sti
	hlt
	cli
	cmp	beats(%rip), %rcx
	ja	3b
	ret

# The IDT: every vector to `fault`, 0x20 to the timer, 0xff (spurious) to `spurious`.
build_idt:
	mov	$IDT, %rdi
	xor	%ecx, %ecx
4:	lea	fault(%rip), %rax
	cmp	$0x20, %ecx
	jne	5f
	lea	timer(%rip), %rax
5:	cmp	$0xff, %ecx
	jne	6f
	lea	spurious(%rip), %rax
6:	mov	%rax, %rdx
	and	$0xffff, %edx		# offset 15:0
	mov	%rax, %rsi
	shr	$16, %rsi
	and	$0xffff, %esi
	shl	$48, %rsi		# offset 31:16
	or	%rsi, %rdx
	movabs	$0x00008e0000080000, %rsi	# present interrupt gate, DPL 0, selector 0x08
	or	%rsi, %rdx
	mov	%rdx, (%rdi)
	shr	$32, %rax
	mov	%rax, 8(%rdi)		# offset 63:32
	add	$16, %rdi
	inc	%ecx
	cmp	$256, %ecx
	jne	4b
	ret

# Ring 3, vCPU rbx: waits for the count of vCPUs, then rewrites its share of the working
# set pass after pass, its pass count at STATUS + 8 * rbx. A vCPU past the count (one that
# came up too late to be counted) only waits.
user:
	mov	cpus(%rip), %r8
	test	%r8, %r8
	jz	user
	cmp	%r8, %rbx
	jae	idle
	mov	$PAGES, %eax
	xor	%edx, %edx
	div	%r8			# rax: pages per vCPU
	mov	%rax, %r9
	imul	%rbx, %rax
	shl	$12, %rax
	add	$BUF, %rax
	mov	%rax, %r10		# this vCPU's first page
	lea	STATUS(,%rbx,8), %r11
	xor	%rcx, %rcx
7:	inc	%rcx
	mov	%r10, %rdi
	mov	%r9, %rdx
8:	mov	%rcx, (%rdi)
	add	$4096, %rdi
	dec	%rdx
	jnz	8b
	mov	%rcx, (%r11)
	jmp	7b
idle:
	pause
	jmp	idle

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
halt:
	cli
	hlt
	jmp	halt

# Writes the NUL-terminated string at rsi to COM1.
puts:
	mov	$COM1, %dx
9:	lodsb
	test	%al, %al
	jz	10f
	out	%al, %dx
	jmp	9b
10:	ret

# The other vCPUs start here in real mode, copied to TRAMPOLINE (cs = TRAMPOLINE >> 4, ip 0):
# the GDT and on to 32-bit protected mode in the image.
	.code16
trampoline:
	cli
	mov	%cs, %ax
	mov	%ax, %ds
	lgdtl	(tramp_gdt_desc - trampoline)
	mov	%cr0, %eax
	or	$1, %eax		# PE
	mov	%eax, %cr0
	ljmpl	$0x28, $ap_protected
	.p2align 2
tramp_gdt_desc:
	.word	gdt_end - gdt - 1
	.long	gdt
trampoline_end:

	.code32
ap_protected:
	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	jmp	paging_on

	.data
	.p2align 3
beats:	.quad	0
cpus:	.quad	0			# how many vCPUs rewrite the working set; 0 until known
present: .fill	MAXCPUS, 1, 0		# vCPU i in long mode
gdt:
	.quad	0			# null
	.quad	0x00af9b000000ffff	# 0x08 kernel code, 64-bit
	.quad	0x00cf93000000ffff	# 0x10 kernel data
	.quad	0x00cff3000000ffff	# 0x18 user data, DPL 3
	.quad	0x00affb000000ffff	# 0x20 user code, 64-bit, DPL 3
	.quad	0x00cf9b000000ffff	# 0x28 kernel code, 32-bit
	# 0x30 + 16 * i: vCPU i's TSS (available 64-bit TSS at TSS + 0x80 * i, limit 0x67)
	.irp	i, 0, 1, 2, 3, 4, 5, 6, 7
	.word	0x67, (TSS + 0x80 * \i) & 0xffff
	.byte	((TSS + 0x80 * \i) >> 16) & 0xff, 0x89, 0, ((TSS + 0x80 * \i) >> 24) & 0xff
	.quad	0
	.endr
gdt_end:
gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	gdt
idt_desc:
	.word	256 * 16 - 1
	.quad	IDT
ready:	.ascii	"GUEST-READY pvh_storm cpus="
ready_count: .asciz "0\n"
faulted: .asciz	"PVH-STORM-FAULT\n"
