# Executes CPUID in ring 0 for inputs the test feeds it, and reports the outputs:
#   read  MMIO +8:  function (low 32 bits) and subleaf (high 32 bits); all ones = done
#   write MMIO +16: eax | ebx << 32
#   write MMIO +24: ecx | edx << 32
# When done, resets through the i8042.
	.code64
	.globl start
start:
	mov	$0xd0000000, %rsi	# MMIO test device
next:
	mov	8(%rsi), %rax		# the next (function, subleaf)
	cmp	$-1, %rax
	je	done
	mov	%rax, %rcx
	shr	$32, %rcx		# ecx = subleaf
	cpuid				# eax = function (the low half)
	shl	$32, %rbx
	or	%rbx, %rax
	mov	%rax, 16(%rsi)		# eax, ebx
	shl	$32, %rdx
	mov	%ecx, %ecx		# zero-extend
	or	%rdx, %rcx
	mov	%rcx, 24(%rsi)		# ecx, edx
	jmp	next
done:
	mov	$0xfe, %al
	out	%al, $0x64
	hlt
