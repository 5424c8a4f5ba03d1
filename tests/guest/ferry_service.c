// SPDX-License-Identifier: GPL-2.0
/*
 * ferry test-guest network service, built into the guest kernel (kernel/ferry_service.c).
 *
 * Guest user space cannot make system calls on the CI hosts, so, like the heartbeat, the
 * service is a kernel thread: kernel sockets for TCP, the block layer for the disk. It runs
 * only when the command line names a port:
 *
 *   ferry.service=PORT     listen on TCP PORT (all addresses; `ip=` configures the card)
 *   ferry.log_disk=NAME    the disk that holds the request log (default vda)
 *   ferry.bench_disk=NAME  the disk that DISKW/DISKR use (default: the log disk)
 *
 * Requests, one line each, answered in order on the same connection:
 *
 *   REQ <n>      append the record {seq, n} to the log, wait until the disk has it
 *                (a FUA write), then answer "ACK <n> <seq>"; seq counts 1, 2, 3 ... over the
 *                whole log, across connections and reboots
 *   PING <n>     answer "PONG <n>" (no disk: request/response latency)
 *   SINK <b>     read b more bytes, then answer "GOT <b>" (host -> guest throughput)
 *   SOURCE <b>   send b bytes of 'x', then "\nSENT <b>" (guest -> host throughput)
 *   DISKW <mb>   write mb MiB sequentially in 128 KiB writes, then flush, to the last mb MiB
 *   DISKR <mb>   of the bench disk (away from the log at its start), or read them; answer
 *                "DISK <mb>" when done
 *   anything else: "ERR"
 *
 * On UDP port PORT too, every datagram is sent back to its sender as it came (a
 * benchmark's probes: which of them come back, and when).
 *
 * The log: one 512-byte sector per record from sector 0, little-endian:
 *   0: "FERRYLOG"  8: seq (u64)  16: n (u64)  24: CRC-32 (IEEE, as zlib) of bytes 0..24
 *   28..512: zero
 * At start the service reads the log up to the first sector that is not a valid record and
 * appends from there. Console lines (KERN_ERR, so that `quiet` lets them through):
 *   SERVICE-READY port=<p> log=<disk> records=<valid records found> sectors=<disk size>
 *   SERVICE-ERROR <what> <errno>
 */
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/kthread.h>
#include <linux/string.h>
#include <linux/slab.h>
#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/crc32.h>
#include <linux/net.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <net/sock.h>
#include <net/net_namespace.h>

#define LOG_MAGIC "FERRYLOG"
#define SECTOR 512
#define BENCH_CHUNK (128 * 1024)

static unsigned int ferry_port;
static char ferry_log_disk[16] = "vda";
static char ferry_bench_disk[16];

static int __init ferry_service_setup(char *s)
{
	if (kstrtouint(s, 10, &ferry_port) || ferry_port > 65535)
		ferry_port = 0;
	return 1;
}
__setup("ferry.service=", ferry_service_setup);

static int __init ferry_log_disk_setup(char *s)
{
	strscpy(ferry_log_disk, s, sizeof(ferry_log_disk));
	return 1;
}
__setup("ferry.log_disk=", ferry_log_disk_setup);

static int __init ferry_bench_disk_setup(char *s)
{
	strscpy(ferry_bench_disk, s, sizeof(ferry_bench_disk));
	return 1;
}
__setup("ferry.bench_disk=", ferry_bench_disk_setup);

struct ferry_log {
	struct block_device *bdev;
	struct page *page;
	u64 next_seq;     /* seq of the next record; its sector is next_seq - 1 */
	sector_t sectors; /* the disk's size */
};

static struct block_device *ferry_open_disk(const char *name)
{
	dev_t devt = blk_lookup_devt(name, 0);

	if (!devt)
		return ERR_PTR(-ENODEV);
	return blkdev_get_by_dev(devt, FMODE_READ | FMODE_WRITE, ferry_open_disk);
}

/* One synchronous bio of `len` bytes of `page` at `sector`. */
static int ferry_bio(struct block_device *bdev, blk_opf_t op, sector_t sector,
		     struct page *page, unsigned int len)
{
	struct bio *bio = bio_alloc(bdev, 1, op, GFP_KERNEL);
	int ret;

	bio->bi_iter.bi_sector = sector;
	if (bio_add_page(bio, page, len, 0) != len) {
		bio_put(bio);
		return -EIO;
	}
	ret = submit_bio_wait(bio);
	bio_put(bio);
	return ret;
}

static u32 ferry_crc(const u8 *p)
{
	return crc32_le(~0U, p, 24) ^ ~0U;
}

static bool ferry_record_valid(const u8 *p, u64 seq)
{
	u64 s;
	u32 c;

	memcpy(&s, p + 8, 8);
	memcpy(&c, p + 24, 4);
	return !memcmp(p, LOG_MAGIC, 8) && le64_to_cpu(s) == seq &&
	       le32_to_cpu(c) == ferry_crc(p);
}

static int ferry_log_open(struct ferry_log *log)
{
	u8 *buf;
	int ret;

	log->bdev = ferry_open_disk(ferry_log_disk);
	if (IS_ERR(log->bdev))
		return PTR_ERR(log->bdev);
	log->page = alloc_page(GFP_KERNEL);
	if (!log->page)
		return -ENOMEM;
	log->sectors = bdev_nr_sectors(log->bdev);
	buf = page_address(log->page);
	for (log->next_seq = 1; log->next_seq <= log->sectors; log->next_seq++) {
		ret = ferry_bio(log->bdev, REQ_OP_READ, log->next_seq - 1, log->page, SECTOR);
		if (ret)
			return ret;
		if (!ferry_record_valid(buf, log->next_seq))
			break;
	}
	return 0;
}

/* Appends {seq, n} and returns its seq once the disk has it, or a negative errno. */
static s64 ferry_log_append(struct ferry_log *log, u64 n)
{
	u8 *buf = page_address(log->page);
	__le64 v;
	__le32 c;
	int ret;

	if (log->next_seq > log->sectors)
		return -ENOSPC;
	memset(buf, 0, SECTOR);
	memcpy(buf, LOG_MAGIC, 8);
	v = cpu_to_le64(log->next_seq);
	memcpy(buf + 8, &v, 8);
	v = cpu_to_le64(n);
	memcpy(buf + 16, &v, 8);
	c = cpu_to_le32(ferry_crc(buf));
	memcpy(buf + 24, &c, 4);
	ret = ferry_bio(log->bdev, REQ_OP_WRITE | REQ_SYNC | REQ_FUA, log->next_seq - 1,
			log->page, SECTOR);
	if (ret)
		return ret;
	return log->next_seq++;
}

static int ferry_send(struct socket *s, const void *p, size_t len)
{
	struct msghdr msg = { .msg_flags = MSG_NOSIGNAL };
	struct kvec vec = { .iov_base = (void *)p, .iov_len = len };
	int ret;

	while (vec.iov_len) {
		ret = kernel_sendmsg(s, &msg, &vec, 1, vec.iov_len);
		if (ret <= 0)
			return ret ? ret : -EPIPE;
		vec.iov_base += ret;
		vec.iov_len -= ret;
	}
	return 0;
}

/* Reads and drops `bytes` bytes: SINK. */
static int ferry_sink(struct socket *s, char *buf, size_t cap, u64 bytes)
{
	struct msghdr msg = {};
	struct kvec vec;
	int ret;

	while (bytes) {
		vec.iov_base = buf;
		vec.iov_len = min_t(u64, cap, bytes);
		ret = kernel_recvmsg(s, &msg, &vec, 1, vec.iov_len, 0);
		if (ret <= 0)
			return ret ? ret : -EPIPE;
		bytes -= ret;
	}
	return 0;
}

static int ferry_source(struct socket *s, char *buf, size_t cap, u64 bytes)
{
	int ret;

	memset(buf, 'x', cap);
	while (bytes) {
		size_t n = min_t(u64, cap, bytes);

		ret = ferry_send(s, buf, n);
		if (ret)
			return ret;
		bytes -= n;
	}
	return 0;
}

/* DISKW / DISKR: the last `mb` MiB of the bench disk in 128 KiB bios. */
static int ferry_disk_bench(bool write, u64 mb)
{
	struct block_device *bdev =
		ferry_open_disk(ferry_bench_disk[0] ? ferry_bench_disk : ferry_log_disk);
	struct page *pages;
	u64 chunks = mb * (1024 * 1024 / BENCH_CHUNK), i;
	u64 per = BENCH_CHUNK / SECTOR;
	sector_t start;
	int ret = 0, order = get_order(BENCH_CHUNK);

	if (IS_ERR(bdev))
		return PTR_ERR(bdev);
	pages = alloc_pages(GFP_KERNEL | __GFP_ZERO, order);
	if (!pages) {
		blkdev_put(bdev, FMODE_READ | FMODE_WRITE);
		return -ENOMEM;
	}
	if (chunks * per > bdev_nr_sectors(bdev))
		ret = -ENOSPC;
	start = bdev_nr_sectors(bdev) - chunks * per;
	for (i = 0; !ret && i < chunks; i++)
		ret = ferry_bio(bdev, write ? REQ_OP_WRITE : REQ_OP_READ, start + i * per,
				pages, BENCH_CHUNK);
	if (!ret && write)
		ret = blkdev_issue_flush(bdev);
	__free_pages(pages, order);
	blkdev_put(bdev, FMODE_READ | FMODE_WRITE);
	return ret;
}

/*
 * Serves one line. `rest` bytes came in after it (a SINK's data may be among them).
 * Returns how many of those it used, or < 0 to drop the connection.
 */
static int ferry_line(struct socket *s, struct ferry_log *log, const char *line,
		      size_t rest, char *buf, size_t cap)
{
	char out[64];
	size_t used = 0;
	u64 n;
	s64 seq;
	int ret;

	if (sscanf(line, "REQ %llu", &n) == 1) {
		seq = ferry_log_append(log, n);
		if (seq < 0) {
			pr_err("SERVICE-ERROR log-write %lld\n", seq);
			return ferry_send(s, "ERR\n", 4);
		}
		ret = scnprintf(out, sizeof(out), "ACK %llu %lld\n", n, seq);
	} else if (sscanf(line, "PING %llu", &n) == 1) {
		ret = scnprintf(out, sizeof(out), "PONG %llu\n", n);
	} else if (sscanf(line, "SINK %llu", &n) == 1) {
		used = min_t(u64, rest, n);
		ret = ferry_sink(s, buf, cap, n - used);
		if (ret)
			return ret;
		ret = scnprintf(out, sizeof(out), "GOT %llu\n", n);
	} else if (sscanf(line, "SOURCE %llu", &n) == 1) {
		ret = ferry_source(s, buf, cap, n);
		if (ret)
			return ret;
		ret = scnprintf(out, sizeof(out), "\nSENT %llu\n", n);
	} else if (sscanf(line, "DISKW %llu", &n) == 1 || sscanf(line, "DISKR %llu", &n) == 1) {
		ret = ferry_disk_bench(line[4] == 'W', n);
		ret = ret ? scnprintf(out, sizeof(out), "ERR %d\n", ret)
			  : scnprintf(out, sizeof(out), "DISK %llu\n", n);
	} else {
		ret = scnprintf(out, sizeof(out), "ERR\n");
	}
	ret = ferry_send(s, out, ret);
	return ret < 0 ? ret : used;
}

/* Serves one connection until the peer closes it. */
static void ferry_serve(struct socket *s, struct ferry_log *log, char *buf, size_t cap)
{
	char line[128];
	size_t used = 0;
	struct msghdr msg = {};
	struct kvec vec;
	int got, i;

	for (;;) {
		vec.iov_base = line + used;
		vec.iov_len = sizeof(line) - 1 - used;
		got = kernel_recvmsg(s, &msg, &vec, 1, vec.iov_len, 0);
		if (got <= 0)
			return;
		used += got;
		for (i = 0; i < used;) {
			char *nl = memchr(line + i, '\n', used - i);

			if (!nl)
				break;
			*nl = 0;
			got = ferry_line(s, log, line + i, used - (nl - line + 1), buf, cap);
			if (got < 0)
				return;
			i = nl - line + 1 + got;
		}
		memmove(line, line + i, used - i);
		used -= i;
		if (used == sizeof(line) - 1)
			return; /* a line longer than any request */
	}
}

static int ferry_service_thread(void *unused)
{
	struct sockaddr_in addr = {
		.sin_family = AF_INET,
		.sin_addr.s_addr = htonl(INADDR_ANY),
		.sin_port = htons(ferry_port),
	};
	struct ferry_log log = {};
	struct socket *ls, *cs;
	size_t cap = 64 * 1024;
	char *buf = kmalloc(cap, GFP_KERNEL);
	int ret;

	if (!buf)
		return -ENOMEM;
	ret = ferry_log_open(&log);
	if (ret) {
		pr_err("SERVICE-ERROR log-open %d\n", ret);
		return ret;
	}
	ret = sock_create_kern(&init_net, AF_INET, SOCK_STREAM, IPPROTO_TCP, &ls);
	if (ret) {
		pr_err("SERVICE-ERROR socket %d\n", ret);
		return ret;
	}
	sock_set_reuseaddr(ls->sk);
	ret = kernel_bind(ls, (struct sockaddr *)&addr, sizeof(addr));
	if (!ret)
		ret = kernel_listen(ls, 4);
	if (ret) {
		pr_err("SERVICE-ERROR listen %d\n", ret);
		return ret;
	}
	pr_err("SERVICE-READY port=%u log=%s records=%llu sectors=%llu\n", ferry_port,
	       ferry_log_disk, log.next_seq - 1, (u64)log.sectors);
	for (;;) {
		ret = kernel_accept(ls, &cs, 0);
		if (ret)
			continue;
		tcp_sock_set_nodelay(cs->sk);
		ferry_serve(cs, &log, buf, cap);
		kernel_sock_shutdown(cs, SHUT_RDWR);
		sock_release(cs);
	}
	return 0;
}

/* UDP echo on the service's port: each datagram back to its sender, unchanged. */
static int ferry_echo_thread(void *unused)
{
	struct sockaddr_in addr = {
		.sin_family = AF_INET,
		.sin_addr.s_addr = htonl(INADDR_ANY),
		.sin_port = htons(ferry_port),
	};
	size_t cap = 2048;
	char *buf = kmalloc(cap, GFP_KERNEL);
	struct socket *s;
	int ret;

	if (!buf)
		return -ENOMEM;
	ret = sock_create_kern(&init_net, AF_INET, SOCK_DGRAM, IPPROTO_UDP, &s);
	if (!ret)
		ret = kernel_bind(s, (struct sockaddr *)&addr, sizeof(addr));
	if (ret) {
		pr_err("SERVICE-ERROR udp %d\n", ret);
		return ret;
	}
	for (;;) {
		struct sockaddr_in from;
		struct msghdr msg = { .msg_name = &from, .msg_namelen = sizeof(from) };
		struct kvec vec = { .iov_base = buf, .iov_len = cap };
		int n = kernel_recvmsg(s, &msg, &vec, 1, cap, 0);

		if (n <= 0)
			continue;
		msg = (struct msghdr){ .msg_name = &from, .msg_namelen = sizeof(from) };
		vec.iov_len = n;
		kernel_sendmsg(s, &msg, &vec, 1, n);
	}
	return 0;
}

static int __init ferry_service_init(void)
{
	if (ferry_port) {
		kthread_run(ferry_service_thread, NULL, "ferry-service");
		kthread_run(ferry_echo_thread, NULL, "ferry-echo");
	}
	return 0;
}
late_initcall(ferry_service_init);
