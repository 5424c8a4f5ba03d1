// SPDX-License-Identifier: GPL-2.0
/*
 * ferry test-guest workload, built into the guest kernel (kernel/ferry_workload.c).
 *
 * On the CI hosts (KVM from the PVM module) guest user space cannot make system calls, so
 * the workload runs as kernel threads started from a late_initcall. It is selected on the
 * kernel command line:
 *
 *   workload=idle          heartbeat only (the default)
 *   workload=dirty:MB      rewrite MB MiB in passes; every page is checked against the
 *                          value written to it in the previous pass
 *   hb_ms=N                heartbeat interval in milliseconds (default 1000, minimum 1)
 *   hb_us=N                heartbeat interval in microseconds (overrides hb_ms)
 *   hb_port                also write each heartbeat's number (its low byte) to I/O port
 *                          0xe9, the debug console: one exit per beat, cheap enough for a
 *                          1 ms interval where printing a line is not
 *   hb_print=N             print only every Nth HB line (default 1: all)
 *   hb_max=N               after heartbeat N, reboot (ends the VMM with status 0)
 *   ferry.park             PID 1 sleeps in the kernel instead of executing /init
 *   ferry.cpuid            before GUEST-READY, print every CPUID leaf as read in ring 0
 *
 * Output on the console, one line each, nothing else from this file:
 *   CPUID <function> <subleaf>: <eax> <ebx> <ecx> <edx>   (hex; with ferry.cpuid)
 *   GUEST-READY cpus=<online cpus> vendor=<id> family=<f> model=<m> stepping=<s> workload=<w>
 *   HB <n> cpus=<online cpus> pass=<dirty passes done>      n = 1, 2, 3 ... without gaps
 *   HB-CORRUPT pass=<p> page=<i> word=<w> want=<x> got=<y>
 * Lines are printed at KERN_ERR so that they pass the `quiet` console level.
 */
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/kthread.h>
#include <linux/hrtimer.h>
#include <linux/sched.h>
#include <linux/string.h>
#include <linux/vmalloc.h>
#include <linux/reboot.h>
#include <linux/delay.h>
#include <asm/processor.h>
#include <asm/io.h>

static unsigned long ferry_dirty_mb;
static unsigned int ferry_hb_ms = 1000;
static unsigned int ferry_hb_us;
static bool ferry_hb_port;
static unsigned long ferry_hb_print = 1;
static unsigned long ferry_hb_max;
static bool ferry_park;
static bool ferry_cpuid;
static atomic64_t ferry_passes = ATOMIC64_INIT(0);

static int __init ferry_workload_setup(char *s)
{
	if (!strcmp(s, "idle"))
		ferry_dirty_mb = 0;
	else if (!strncmp(s, "dirty:", 6) && !kstrtoul(s + 6, 10, &ferry_dirty_mb) && ferry_dirty_mb)
		;
	else
		pr_err("ferry: bad workload=%s, using idle\n", s);
	return 1;
}
__setup("workload=", ferry_workload_setup);

static int __init ferry_hb_ms_setup(char *s)
{
	if (kstrtouint(s, 10, &ferry_hb_ms) || ferry_hb_ms == 0)
		ferry_hb_ms = 1000;
	return 1;
}
__setup("hb_ms=", ferry_hb_ms_setup);

static int __init ferry_hb_us_setup(char *s)
{
	if (kstrtouint(s, 10, &ferry_hb_us))
		ferry_hb_us = 0;
	return 1;
}
__setup("hb_us=", ferry_hb_us_setup);

static int __init ferry_hb_port_setup(char *s)
{
	ferry_hb_port = true;
	return 1;
}
__setup("hb_port", ferry_hb_port_setup);

static int __init ferry_hb_print_setup(char *s)
{
	if (kstrtoul(s, 10, &ferry_hb_print) || ferry_hb_print == 0)
		ferry_hb_print = 1;
	return 1;
}
__setup("hb_print=", ferry_hb_print_setup);

static int __init ferry_hb_max_setup(char *s)
{
	if (kstrtoul(s, 10, &ferry_hb_max))
		ferry_hb_max = 0;
	return 1;
}
__setup("hb_max=", ferry_hb_max_setup);

static int __init ferry_park_setup(char *s)
{
	ferry_park = true;
	return 1;
}
__setup("ferry.park", ferry_park_setup);

static int __init ferry_cpuid_setup(char *s)
{
	ferry_cpuid = true;
	return 1;
}
__setup("ferry.cpuid", ferry_cpuid_setup);

static void __init ferry_print_leaf(u32 fn, u32 idx, u32 *eax_out)
{
	u32 a, b, c, d;

	cpuid_count(fn, idx, &a, &b, &c, &d);
	pr_err("CPUID %08x %02x: %08x %08x %08x %08x\n", fn, idx, a, b, c, d);
	if (eax_out)
		*eax_out = a;
}

/* Every leaf and subleaf the CPU reports, read in ring 0 (where KVM intercepts CPUID). */
static void __init ferry_print_cpuid(void)
{
	static const u32 bases[] = { 0, 0x80000000 };
	u32 base, fn, max, i, r, a, b, c, d;

	for (r = 0; r < ARRAY_SIZE(bases); r++) {
		base = bases[r];
		cpuid_count(base, 0, &max, &b, &c, &d);
		if (max < base || max > base + 0xff)
			max = base;
		for (fn = base; fn <= max; fn++) {
			switch (fn) {
			case 4:
			case 0x8000001d:
				for (i = 0; i < 16; i++) {
					ferry_print_leaf(fn, i, &a);
					if (!(a & 0x1f))
						break;
				}
				break;
			case 7:
				ferry_print_leaf(fn, 0, &a);
				for (i = 1; i <= a && i < 8; i++)
					ferry_print_leaf(fn, i, NULL);
				break;
			case 0xb:
			case 0x1f:
				for (i = 0; i < 8; i++) {
					cpuid_count(fn, i, &a, &b, &c, &d);
					ferry_print_leaf(fn, i, NULL);
					if (!((c >> 8) & 0xff))
						break;
				}
				break;
			case 0xd:
				cpuid_count(fn, 0, &a, &b, &c, &d);
				ferry_print_leaf(fn, 0, NULL);
				ferry_print_leaf(fn, 1, NULL);
				for (i = 2; i < 32; i++)
					if (a & (1u << i))
						ferry_print_leaf(fn, i, NULL);
				break;
			default:
				ferry_print_leaf(fn, 0, NULL);
			}
		}
		if (base == 0) {
			ferry_print_leaf(0x40000000, 0, NULL);
			ferry_print_leaf(0x40000001, 0, NULL);
		}
	}
}

/* Called by kernel_init() just before it would execute /init (see the init-park patch). */
void ferry_park_init(void)
{
	if (!ferry_park)
		return;
	for (;;)
		schedule_timeout_interruptible(MAX_SCHEDULE_TIMEOUT);
}

/* The value every word of page `page` holds after pass `pass`. Never zero. */
static u64 ferry_pattern(u64 pass, u64 page)
{
	return ((pass + 1) << 40) ^ (page * 0x9E3779B97F4A7C15ULL) ^ 0xF0F0F0F0ULL;
}

/* Words checked in each page: every 64th word and the last one. */
#define FERRY_CHECK_STRIDE 64

static int ferry_dirty_thread(void *arg)
{
	unsigned long pages = ferry_dirty_mb << (20 - PAGE_SHIFT);
	u64 *buf = vmalloc(pages << PAGE_SHIFT);
	u64 pass, i, w;

	if (!buf) {
		pr_err("HB-CORRUPT pass=0 page=0 word=0 want=0 got=0 (vmalloc of %lu MiB failed)\n",
		       ferry_dirty_mb);
		return -ENOMEM;
	}
	for (pass = 0;; pass++) {
		for (i = 0; i < pages; i++) {
			u64 *p = buf + i * (PAGE_SIZE / 8);

			if (pass) {
				u64 want = ferry_pattern(pass - 1, i);

				for (w = 0; w < PAGE_SIZE / 8; w += FERRY_CHECK_STRIDE) {
					u64 ww = w ? w : PAGE_SIZE / 8 - 1;

					if (READ_ONCE(p[ww]) != want)
						pr_err("HB-CORRUPT pass=%llu page=%llu word=%llu want=%llx got=%llx\n",
						       pass, i, ww, want, p[ww]);
					if (READ_ONCE(p[w]) != want)
						pr_err("HB-CORRUPT pass=%llu page=%llu word=%llu want=%llx got=%llx\n",
						       pass, i, w, want, p[w]);
				}
			}
			memset64(p, ferry_pattern(pass, i), PAGE_SIZE / 8);
			cond_resched();
		}
		atomic64_set(&ferry_passes, pass + 1);
	}
	return 0;
}

static int ferry_heartbeat_thread(void *arg)
{
	u64 period = ferry_hb_us ? (u64)ferry_hb_us * NSEC_PER_USEC :
				   (u64)ferry_hb_ms * NSEC_PER_MSEC;
	ktime_t next = ktime_get();
	unsigned long n;

	for (n = 1;; n++) {
		ktime_t now;

		next = ktime_add_ns(next, period);
		now = ktime_get();
		if (ktime_before(next, now))
			next = now;
		set_current_state(TASK_INTERRUPTIBLE);
		schedule_hrtimeout(&next, HRTIMER_MODE_ABS);
		if (ferry_hb_port)
			outb((u8)n, 0xe9);
		if (n % ferry_hb_print == 0)
			pr_err("HB %lu cpus=%u pass=%lld\n", n, num_online_cpus(),
			       (long long)atomic64_read(&ferry_passes));
		if (ferry_hb_max && n >= ferry_hb_max) {
			pr_err("ferry: %lu heartbeats done, rebooting\n", n);
			kernel_restart(NULL);
		}
	}
	return 0;
}

static int __init ferry_workload_init(void)
{
	struct task_struct *t;

	if (ferry_cpuid)
		ferry_print_cpuid();
	pr_err("GUEST-READY cpus=%u vendor=%s family=%u model=%u stepping=%u workload=%s%lu\n",
	       num_online_cpus(), boot_cpu_data.x86_vendor_id, boot_cpu_data.x86,
	       boot_cpu_data.x86_model, boot_cpu_data.x86_stepping,
	       ferry_dirty_mb ? "dirty:" : "idle:", ferry_dirty_mb);
	t = kthread_run(ferry_heartbeat_thread, NULL, "ferry-hb");
	if (!IS_ERR(t))
		sched_set_fifo(t);
	if (ferry_dirty_mb)
		kthread_run(ferry_dirty_thread, NULL, "ferry-dirty");
	return 0;
}
late_initcall(ferry_workload_init);
