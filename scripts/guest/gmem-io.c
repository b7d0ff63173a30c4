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
 *   gmem-io seqio DEV BLOCKS SEED [PACE_US [STRIDE [PROGRESS_EVERY]]]
 *                                        migration workload, see seqio()
 *   gmem-io convert DEV SEED PACE_US     reads into one page the host
 *                                        turns private, see convert()
 *
 * Numbers are decimal. Prints one "GMEMD-RESULT key=value ..." line on
 * success; any error goes to stderr and the exit status is 1.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
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
			"rand-read DEV COUNT [SPAN_MIB] | "
			"seqio DEV BLOCKS SEED [PACE_US [STRIDE [PROGRESS_EVERY]]] | "
			"convert DEV SEED PACE_US\n");
	exit(1);
}

/* Strict decimal parse: a typo must not silently become 0. */
static uint64_t parse_num(const char *s, int allow_zero)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s || *end || (v == 0 && !allow_zero) || s[0] == '-') {
		fprintf(stderr, "gmem-io: bad number '%s'\n", s);
		exit(1);
	}
	return v;
}

static uint64_t parse_u64(const char *s)
{
	return parse_num(s, 0);
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

/*
 * seqio's block contents, mirrored by gmem_tests::seqio::block in the tests
 * crate (change both or neither). Block i of seed SEED is 512 little-endian
 * u64 words w[0..512) drawn from xorshift64* (all arithmetic mod 2^64):
 *
 *   x = SEED ^ (i * 0x9E3779B97F4A7C15)
 *   if x == 0: x = 0x853C49E6748FEA9B        (0 is xorshift's fixed point)
 *   for k in 0..512:
 *       x ^= x >> 12;  x ^= x << 25;  x ^= x >> 27
 *       w[k] = x * 0x2545F4914F6CDD1D
 */
#define SEQIO_STRIDE 0x9E3779B97F4A7C15ull
#define SEQIO_ZERO_STATE 0x853C49E6748FEA9Bull
#define XORSHIFT64STAR_MUL 0x2545F4914F6CDD1Dull
#define SEQIO_FILL 0xA5
#define SEQIO_PROGRESS_EVERY 256u /* default of PROGRESS_EVERY */

static void seqio_pattern(uint64_t seed, uint64_t i, uint64_t words[BLOCK / 8])
{
	uint64_t x = seed ^ (i * SEQIO_STRIDE);
	if (x == 0)
		x = SEQIO_ZERO_STATE;
	for (size_t k = 0; k < BLOCK / 8; k++) {
		x ^= x >> 12;
		x ^= x << 25;
		x ^= x >> 27;
		words[k] = htole64(x * XORSHIFT64STAR_MUL);
	}
}

/* FNV-1a 64: h = 0xcbf29ce484222325; per byte: h ^= byte; h *= 0x100000001b3.
 * Mirrored by gmem_tests::seqio::Fnv1a. */
#define FNV1A_OFFSET 0xcbf29ce484222325ull
#define FNV1A_PRIME 0x100000001b3ull

static uint64_t fnv1a(uint64_t h, const void *data, size_t len)
{
	const unsigned char *p = data;
	for (size_t k = 0; k < len; k++) {
		h ^= p[k];
		h *= FNV1A_PRIME;
	}
	return h;
}

static uint64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* The running checksum of seqio. volatile: stored to guest RAM after every
 * block, so it is state a migration must carry, like the slots. */
static volatile uint64_t seqio_sum;

/*
 * seqio: a disk workload for live-migration tests whose progress is guest
 * RAM that both the vCPU and the device write.
 *
 * "slots" (BLOCKS * 4 KiB, page aligned, all 0xA5 first so every page is
 * present and non-zero before migration starts) receive the device's DMA:
 * for i in 0..BLOCKS, block i = pattern(SEED, i) is pwritten at i * 4 KiB
 * (O_DIRECT), folded into the running FNV-1a checksum, and pread (O_DIRECT)
 * straight into slot i; then usleep(PACE_US) if PACE_US > 0. Every
 * PROGRESS_EVERY blocks (default 256) "GMEMD-PROGRESS seqio=<blocks done>"
 * goes to stdout; a small PROGRESS_EVERY lets the host timestamp the lines
 * finely enough to see how long the guest's I/O stalls during a migration.
 *
 * At the end:
 *  - every slot is compared with pattern(SEED, i) in RAM, without touching
 *    the disk: a stale slot is a device write into guest RAM that got lost
 *    (on a migration: a page the device dirtied but that was not resent, or
 *    a postcopy page that arrived over the device's data);
 *  - the range is read again from the disk (O_DIRECT, 1 MiB reads) and its
 *    FNV-1a compared with the running one: a lost disk write or a lost
 *    update of the checksum.
 *
 * Prints "GMEMD-RESULT seqio_blocks=N seqio_bad_slots=X
 * seqio_first_bad_slot=K|none seqio_sum=<hex16> seqio_disk_sum=<hex16>
 * seqio_max_op_us=M" (M: the slowest pwrite + pread of one block, in
 * microseconds) and returns 0, or 1 if a slot or the checksum is wrong.
 */
static uint64_t gcd(uint64_t a, uint64_t b)
{
	while (b) {
		uint64_t t = a % b;
		a = b;
		b = t;
	}
	return a;
}

static int seqio(const char *dev, uint64_t blocks, uint64_t seed, uint64_t pace_us, uint64_t stride,
		 uint64_t progress_every)
{
	/* Block i is read back into slot (i * stride) % blocks: a stride coprime
	 * to blocks visits every slot once, and a large one makes the device's
	 * writes jump around guest RAM instead of walking it in order (in
	 * postcopy, QEMU streams the pages after a requested one, so a
	 * sequential walk meets few missing pages). */
	if (gcd(stride, blocks) != 1) {
		fprintf(stderr, "gmem-io: seqio: stride %llu shares a factor with %llu blocks\n",
			(unsigned long long)stride, (unsigned long long)blocks);
		exit(1);
	}
	int fd = open(dev, O_RDWR | O_DIRECT);
	if (fd < 0)
		die(dev);
	if (blocks > dev_size(fd) / BLOCK) {
		fprintf(stderr, "gmem-io: %s is smaller than %llu blocks of %u bytes\n",
			dev, (unsigned long long)blocks, BLOCK);
		exit(1);
	}
	size_t len = (size_t)blocks * BLOCK;
	unsigned char *slots = mmap(NULL, len, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (slots == MAP_FAILED)
		die("mmap");
	memset(slots, SEQIO_FILL, len);
	uint64_t *block = aligned_buf(BLOCK);

	uint64_t max_op_us = 0;
	seqio_sum = FNV1A_OFFSET;
	for (uint64_t i = 0; i < blocks; i++) {
		seqio_pattern(seed, i, block);
		uint64_t t0 = now_us();
		xfer(fd, 1, block, BLOCK, i * BLOCK);
		uint64_t write_us = now_us() - t0;
		seqio_sum = fnv1a(seqio_sum, block, BLOCK);
		t0 = now_us();
		xfer(fd, 0, slots + (i * stride % blocks) * BLOCK, BLOCK, i * BLOCK);
		uint64_t op_us = write_us + (now_us() - t0);
		if (op_us > max_op_us)
			max_op_us = op_us;
		if (pace_us)
			usleep(pace_us);
		if ((i + 1) % progress_every == 0) {
			printf("GMEMD-PROGRESS seqio=%llu\n", (unsigned long long)(i + 1));
			if (fflush(stdout))
				die("stdout");
		}
	}
	if (fdatasync(fd))
		die("fdatasync");

	/* (a) The slots, from RAM only. */
	uint64_t bad = 0, first_bad = 0;
	for (uint64_t i = 0; i < blocks; i++) {
		seqio_pattern(seed, i, block);
		if (memcmp(slots + (i * stride % blocks) * BLOCK, block, BLOCK)) {
			if (!bad++)
				first_bad = i;
		}
	}
	/* (b) The disk, read again. */
	unsigned char *chunk = aligned_buf(MIB);
	uint64_t disk_sum = FNV1A_OFFSET;
	for (size_t off = 0; off < len; off += MIB) {
		size_t n = len - off < MIB ? len - off : MIB;
		xfer(fd, 0, chunk, n, off);
		disk_sum = fnv1a(disk_sum, chunk, n);
	}
	close(fd);

	uint64_t sum = seqio_sum;
	char first[24] = "none";
	if (bad)
		snprintf(first, sizeof(first), "%llu", (unsigned long long)first_bad);
	printf("GMEMD-RESULT seqio_blocks=%llu seqio_bad_slots=%llu seqio_first_bad_slot=%s "
	       "seqio_sum=%016llx seqio_disk_sum=%016llx seqio_max_op_us=%llu\n",
	       (unsigned long long)blocks, (unsigned long long)bad, first,
	       (unsigned long long)sum, (unsigned long long)disk_sum,
	       (unsigned long long)max_op_us);
	int rc = 0;
	if (bad) {
		unsigned char *slot = slots + (first_bad * stride % blocks) * BLOCK;
		size_t fill = 0;
		while (fill < BLOCK && slot[fill] == SEQIO_FILL)
			fill++;
		fprintf(stderr, "gmem-io: seqio: %llu of %llu slots in RAM do not hold their "
			"block; the first, %llu, holds %s\n",
			(unsigned long long)bad, (unsigned long long)blocks,
			(unsigned long long)first_bad,
			fill == BLOCK ? "the 0xa5 fill (the device's write never showed)"
				      : "other data");
		rc = 1;
	}
	if (sum != disk_sum) {
		fprintf(stderr, "gmem-io: seqio: the disk's checksum %016llx differs from the "
			"running one %016llx\n",
			(unsigned long long)disk_sum, (unsigned long long)sum);
		rc = 1;
	}
	return rc;
}

/* The guest-physical frame of the page at `addr` (mapped and locked), from
 * /proc/self/pagemap: bit 63 present, bits 0-54 the frame (root only). */
static uint64_t page_frame(const void *addr)
{
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0)
		die("/proc/self/pagemap");
	uint64_t entry;
	off_t at = (off_t)((uintptr_t)addr / BLOCK * sizeof(entry));
	if (pread(fd, &entry, sizeof(entry), at) != (ssize_t)sizeof(entry))
		die("reading /proc/self/pagemap");
	close(fd);
	uint64_t frame = entry & ((1ull << 55) - 1);
	if (!(entry >> 63) || !frame) {
		fprintf(stderr, "gmem-io: pagemap gives no frame for %p (entry %#llx)\n", addr,
			(unsigned long long)entry);
		exit(1);
	}
	return frame;
}

#define CONVERT_EIO_WANTED 3u    /* errors to see before expecting recovery */
#define CONVERT_OK_AFTER 256u    /* good reads after the last error to finish */
#define CONVERT_MAX_READS 200000u

/*
 * convert: the guest's side of the host turning its I/O buffer private.
 *
 * Writes pattern(SEED, 0) to block 0 (O_DIRECT), then reads block 0 back
 * into one locked page, again and again, PACE_US apart. First prints the
 * page's guest-physical frame, "GMEMD-PROGRESS convert_pfn=<frame>", for
 * the host to convert exactly that page; then "GMEMD-PROGRESS
 * convert_eio=<n>" at every read that fails with EIO (the device refused
 * to write private memory) and "GMEMD-PROGRESS convert_ok=<n>" every 64
 * good reads. The page is filled with SEQIO_FILL before each read, so a
 * read that claims success but left the page alone is caught: every good
 * read must return the pattern exactly, or zeroes: a conversion discards
 * the page's content, and one that comes between a read's completion and
 * its check leaves the page empty (counted apart; a host that converts a
 * page the guest is using takes its content by contract).
 *
 * Ends once CONVERT_EIO_WANTED errors were followed by CONVERT_OK_AFTER
 * good reads (the host made the page shared again), or after
 * CONVERT_MAX_READS reads. Prints "GMEMD-RESULT convert_ok=N
 * convert_eio=E convert_zeroed=Z convert_bad=B" and returns 1 if a read
 * returned wrong data, failed otherwise than with EIO, or the errors and
 * the recovery never came.
 */
static int convert(const char *dev, uint64_t seed, uint64_t pace_us)
{
	int fd = open(dev, O_RDWR | O_DIRECT);
	if (fd < 0)
		die(dev);
	unsigned char *page = mmap(NULL, BLOCK, PROT_READ | PROT_WRITE,
				   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (page == MAP_FAILED)
		die("mmap");
	if (mlock(page, BLOCK))
		die("mlock");
	uint64_t expected[BLOCK / 8];
	seqio_pattern(seed, 0, expected);
	memcpy(page, expected, BLOCK);
	xfer(fd, 1, page, BLOCK, 0);
	printf("GMEMD-PROGRESS convert_pfn=%llu\n", (unsigned long long)page_frame(page));
	fflush(stdout);

	static const unsigned char zeroes[BLOCK];
	uint64_t ok = 0, eio = 0, zeroed = 0, bad = 0, ok_since_eio = 0;
	for (uint64_t n = 0; n < CONVERT_MAX_READS; n++) {
		memset(page, SEQIO_FILL, BLOCK);
		ssize_t got = pread(fd, page, BLOCK, 0);
		if (got < 0 && errno == EIO) {
			eio++;
			ok_since_eio = 0;
			printf("GMEMD-PROGRESS convert_eio=%llu\n", (unsigned long long)eio);
			fflush(stdout);
		} else if (got == (ssize_t)BLOCK) {
			if (!memcmp(page, zeroes, BLOCK))
				zeroed++;
			else if (memcmp(page, expected, BLOCK) && !bad++)
				fprintf(stderr, "gmem-io: convert: read %llu returned %02x%02x%02x%02x... "
					"where the pattern has %02x%02x%02x%02x...\n", (unsigned long long)n,
					page[0], page[1], page[2], page[3], ((unsigned char *)expected)[0],
					((unsigned char *)expected)[1], ((unsigned char *)expected)[2],
					((unsigned char *)expected)[3]);
			ok++;
			ok_since_eio++;
			if (ok % 64 == 0) {
				printf("GMEMD-PROGRESS convert_ok=%llu\n", (unsigned long long)ok);
				fflush(stdout);
			}
			if (eio >= CONVERT_EIO_WANTED && ok_since_eio >= CONVERT_OK_AFTER)
				break;
		} else {
			die("pread");
		}
		if (pace_us)
			usleep((useconds_t)pace_us);
	}
	printf("GMEMD-RESULT convert_ok=%llu convert_eio=%llu convert_zeroed=%llu convert_bad=%llu\n",
	       (unsigned long long)ok, (unsigned long long)eio, (unsigned long long)zeroed, (unsigned long long)bad);
	close(fd);
	return bad || eio < CONVERT_EIO_WANTED || ok_since_eio < CONVERT_OK_AFTER;
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
	int rc = 0;
	if (!strcmp(op, "seq-write") && argc == 4)
		seq(dev, parse_u64(argv[3]), 1);
	else if (!strcmp(op, "seq-read") && argc == 4)
		seq(dev, parse_u64(argv[3]), 0);
	else if (!strcmp(op, "rand-read") && (argc == 4 || argc == 5))
		rand_read(dev, parse_u64(argv[3]), argc == 5 ? parse_u64(argv[4]) : 0);
	else if (!strcmp(op, "seqio") && argc >= 5 && argc <= 8)
		rc = seqio(dev, parse_u64(argv[3]), parse_num(argv[4], 1),
			   argc >= 6 ? parse_num(argv[5], 1) : 0,
			   argc >= 7 ? parse_u64(argv[6]) : 1,
			   argc == 8 ? parse_u64(argv[7]) : SEQIO_PROGRESS_EVERY);
	else if (!strcmp(op, "convert") && argc == 5)
		rc = convert(dev, parse_num(argv[3], 1), parse_num(argv[4], 1));
	else
		usage();
	/* stdout may be a pipe: make a failed write of the result line visible. */
	if (fflush(stdout))
		die("stdout");
	return rc;
}
