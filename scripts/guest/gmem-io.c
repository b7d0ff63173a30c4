/*
 * gmem-io: timed O_DIRECT block I/O for the gmemd test guest.
 *
 * Busybox dd can do O_DIRECT but cannot time itself precisely or issue random
 * reads, so the guest's bench agent uses this instead. Every transfer goes
 * through O_DIRECT with page-aligned buffers, so the figures measure the
 * virtio-blk path and not the guest page cache.
 *
 *   gmem-io seq-write DEV MIB            1 MiB pwrite()s, then fdatasync()
 *   gmem-io seq-read  DEV MIB            1 MiB pread()s
 *   gmem-io rand-read DEV COUNT [SPAN_MIB]  COUNT 4 KiB pread()s at random
 *                                        4 KiB-aligned offsets in the first
 *                                        SPAN_MIB (default: whole device)
 *
 * Prints one "GMEMD-RESULT op=... key=value ..." line on success; any error
 * goes to stderr and the exit status is 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024u * 1024u)
#define BLOCK 4096u

static void die(const char *what)
{
	fprintf(stderr, "gmem-io: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void usage(void)
{
	fprintf(stderr, "usage: gmem-io seq-write DEV MIB | seq-read DEV MIB | "
			"rand-read DEV COUNT [SPAN_MIB]\n");
	exit(1);
}

/* Strict positive integer parse: a typo must not silently become 0. */
static uint64_t parse_u64(const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s || *end || v == 0 || s[0] == '-') {
		fprintf(stderr, "gmem-io: bad number '%s'\n", s);
		exit(1);
	}
	return v;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* xorshift64: cheap, good enough to scatter offsets and to make written data
 * non-zero and non-repeating (a zero-page-aware backend must not get a free
 * ride). */
static uint64_t rng_state;
static uint64_t rng(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static void *aligned_buf(size_t len)
{
	void *p;
	int rc = posix_memalign(&p, BLOCK, len);
	if (rc) {
		errno = rc;
		die("posix_memalign");
	}
	return p;
}

static uint64_t dev_size(int fd)
{
	struct stat st;
	uint64_t size;
	if (fstat(fd, &st))
		die("fstat");
	if (S_ISBLK(st.st_mode)) {
		if (ioctl(fd, BLKGETSIZE64, &size))
			die("BLKGETSIZE64");
		return size;
	}
	return (uint64_t)st.st_size; /* a plain file, handy for host-side testing */
}

/* One full transfer or exit: a short count on a block device is an error. */
static void xfer(int fd, int write_op, void *buf, size_t len, uint64_t off)
{
	ssize_t n = write_op ? pwrite(fd, buf, len, (off_t)off)
			     : pread(fd, buf, len, (off_t)off);
	if (n < 0)
		die(write_op ? "pwrite" : "pread");
	if ((size_t)n != len) {
		fprintf(stderr, "gmem-io: short %s at offset %llu: %zd of %zu bytes\n",
			write_op ? "write" : "read", (unsigned long long)off, n, len);
		exit(1);
	}
}

static void seq(const char *dev, uint64_t mib, int write_op)
{
	int fd = open(dev, (write_op ? O_WRONLY : O_RDONLY) | O_DIRECT);
	if (fd < 0)
		die(dev);
	if (dev_size(fd) < mib * MIB) {
		fprintf(stderr, "gmem-io: %s is smaller than %llu MiB\n", dev,
			(unsigned long long)mib);
		exit(1);
	}
	uint64_t *buf = aligned_buf(MIB);
	for (size_t i = 0; i < MIB / sizeof(*buf); i++)
		buf[i] = rng();

	double t0 = now();
	for (uint64_t i = 0; i < mib; i++) {
		if (write_op)
			buf[0] = i; /* every block differs, even the first word */
		xfer(fd, write_op, buf, MIB, i * MIB);
	}
	/* O_DIRECT bypasses the guest cache, but the device may still have a
	 * volatile write cache: the flush is part of the cost of a write. */
	if (write_op && fdatasync(fd))
		die("fdatasync");
	double secs = now() - t0;
	close(fd);
	printf("GMEMD-RESULT op=%s mib=%llu seconds=%.6f mib_per_s=%.2f\n",
	       write_op ? "seq-write" : "seq-read", (unsigned long long)mib, secs,
	       (double)mib / secs);
}

static void rand_read(const char *dev, uint64_t count, uint64_t span_mib)
{
	int fd = open(dev, O_RDONLY | O_DIRECT);
	if (fd < 0)
		die(dev);
	uint64_t size = dev_size(fd);
	uint64_t span = span_mib ? span_mib * MIB : size;
	if (span > size || span < BLOCK) {
		fprintf(stderr, "gmem-io: span %llu bytes does not fit device of %llu bytes\n",
			(unsigned long long)span, (unsigned long long)size);
		exit(1);
	}
	uint64_t blocks = span / BLOCK;
	void *buf = aligned_buf(BLOCK);

	double t0 = now();
	for (uint64_t i = 0; i < count; i++)
		xfer(fd, 0, buf, BLOCK, (rng() % blocks) * BLOCK);
	double secs = now() - t0;
	close(fd);
	printf("GMEMD-RESULT op=rand-read count=%llu seconds=%.6f iops=%.0f\n",
	       (unsigned long long)count, secs, (double)count / secs);
}

int main(int argc, char **argv)
{
	if (argc < 4)
		usage();
	/* Seed from the clock so repeated runs do not hit the same offsets;
	 * "| 1" keeps xorshift away from its all-zero fixed point. */
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	rng_state = ((uint64_t)ts.tv_sec * 1000000007u) ^ (uint64_t)ts.tv_nsec ^ (uint64_t)getpid();
	rng_state |= 1;

	const char *op = argv[1], *dev = argv[2];
	if (!strcmp(op, "seq-write") && argc == 4)
		seq(dev, parse_u64(argv[3]), 1);
	else if (!strcmp(op, "seq-read") && argc == 4)
		seq(dev, parse_u64(argv[3]), 0);
	else if (!strcmp(op, "rand-read") && (argc == 4 || argc == 5))
		rand_read(dev, parse_u64(argv[3]), argc == 5 ? parse_u64(argv[4]) : 0);
	else
		usage();
	/* stdout may be a pipe: make a failed write of the result line visible. */
	if (fflush(stdout))
		die("stdout");
	return 0;
}
