// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hints: the C hint API at work, and the `hints` VM scenario's client.
 *
 * Maps 64 MiB of compressible data, advises it COLD and checks that
 * mm_client_residency() shows it on a compressed node with measured
 * sizes; advises it HOT and checks it is back on node 0; then advises the
 * middle 16 MiB KEEP_FAST, prints "keepfast ready <addr> <len>" and waits
 * for a line on stdin while the caller pushes the cgroup with
 * memory.reclaim (and tries to move the range with COLD itself); then
 * checks that the KEEP_FAST range stayed on node 0 while its neighbours
 * were demoted.  The data is checked after every step.  Exit 0 on
 * success; each failure says what it saw.
 *
 * Build: cc -o hints hints.c $(pkg-config --cflags --libs mmclient)
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "mm_client.h"

#define PAGE 4096UL
#define LEN (64UL << 20)
#define NPAGES (LEN / PAGE)
#define KEEP_OFF (24UL << 20)
#define KEEP_LEN (16UL << 20)

static struct mm_page pages[NPAGES];

static void die(const char *what, struct mm_client *c, int err)
{
	fprintf(stderr, "hints: %s: %s (%s)\n", what, strerror(-err),
		c ? mm_client_error(c) : "");
	exit(1);
}

/* Half text-like, so it compresses; each page names itself. */
static void fill(unsigned char *p)
{
	for (size_t i = 0; i < NPAGES; i++) {
		unsigned char *pg = p + i * PAGE;

		memset(pg, 'a' + (int)(i % 26), PAGE / 2);
		for (size_t j = PAGE / 2; j < PAGE; j++)
			pg[j] = (unsigned char)((i * 131 + j * 7) >> 3);
		memcpy(pg, &i, sizeof(i));
	}
}

static void check(const unsigned char *p, const char *when)
{
	for (size_t i = 0; i < NPAGES; i++) {
		const unsigned char *pg = p + i * PAGE;
		size_t id;

		memcpy(&id, pg, sizeof(id));
		if (id != i || pg[PAGE / 2] != (unsigned char)((i * 131 + (PAGE / 2) * 7) >> 3) ||
		    pg[PAGE - 1] != (unsigned char)((i * 131 + (PAGE - 1) * 7) >> 3)) {
			fprintf(stderr, "hints: %s: page %zu corrupted\n", when, i);
			exit(1);
		}
	}
	printf("hints: %s: data intact\n", when);
}

struct count {
	size_t node0, compressed, other, sized;
	unsigned long long bytes;
};

static struct count where(struct mm_client *c, unsigned char *p, size_t off, size_t len)
{
	struct count n = { 0 };
	int err = mm_client_residency(c, p + off, len, pages, NPAGES);

	if (err)
		die("residency", c, err);
	for (size_t i = 0; i < len / PAGE; i++) {
		if (pages[i].node == 0) {
			n.node0++;
		} else if (pages[i].node > 0) {
			n.compressed++;
			if (pages[i].compressed_bytes != MM_SIZE_UNKNOWN) {
				n.sized++;
				n.bytes += pages[i].compressed_bytes;
			}
		} else {
			n.other++;
		}
	}
	return n;
}

int main(void)
{
	struct mm_client *c;
	struct mm_advised r;
	struct mm_probe pr;
	struct count n;
	unsigned char *p;
	char line[64];
	int err, tries;

	if (mm_probe(&pr) || !pr.kernel || !pr.server) {
		fprintf(stderr, "hints: probe: kernel %d, server %d\n", pr.kernel, pr.server);
		return 1;
	}
	printf("hints: probe: kernel feature present, server speaks version %u\n", pr.version);
	err = mm_client_open(NULL, &c);
	if (err)
		die("open", NULL, err);
	p = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap", c, -errno);
	fill(p);

	/* COLD: onto the compressed node, within the server's room. */
	err = mm_client_advise(c, p, LEN, MM_ADVICE_COLD, &r);
	if (err)
		die("advise COLD", c, err);
	printf("hints: COLD: %llu pages, %llu moved, %llu already, %llu skipped\n",
	       (unsigned long long)r.pages, (unsigned long long)r.moved,
	       (unsigned long long)r.already, (unsigned long long)r.skipped);
	/* The server measures pages as it goes: wait for the sizes. */
	for (tries = 0; tries < 300; tries++) {
		n = where(c, p, 0, LEN);
		if (n.sized == n.compressed)
			break;
		usleep(100000);
	}
	printf("hints: after COLD: %zu pages on node 0, %zu compressed (%zu measured, %llu bytes)\n",
	       n.node0, n.compressed, n.sized, n.bytes);
	if (n.compressed != NPAGES || r.moved != NPAGES) {
		fprintf(stderr, "hints: COLD left %zu of %lu pages off the compressed node\n",
			NPAGES - n.compressed, NPAGES);
		return 1;
	}
	if (n.sized != n.compressed || n.bytes >= (unsigned long long)LEN) {
		fprintf(stderr, "hints: sizes: %zu of %zu measured, %llu bytes for %lu\n",
			n.sized, n.compressed, n.bytes, LEN);
		return 1;
	}
	check(p, "after COLD");

	/* HOT: back to node 0. */
	err = mm_client_advise(c, p, LEN, MM_ADVICE_HOT, &r);
	if (err)
		die("advise HOT", c, err);
	n = where(c, p, 0, LEN);
	printf("hints: HOT: %llu moved; now %zu pages on node 0, %zu compressed\n",
	       (unsigned long long)r.moved, n.node0, n.compressed);
	if (n.node0 != NPAGES) {
		fprintf(stderr, "hints: HOT left %zu pages off node 0\n", NPAGES - n.node0);
		return 1;
	}
	check(p, "after HOT");

	/* KEEP_FAST on the middle; the caller pushes reclaim, then says go. */
	err = mm_client_advise(c, p + KEEP_OFF, KEEP_LEN, MM_ADVICE_KEEP_FAST, &r);
	if (err)
		die("advise KEEP_FAST", c, err);
	printf("hints: keepfast ready %p %lu\n", (void *)(p + KEEP_OFF), KEEP_LEN);
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin)) {
		fprintf(stderr, "hints: no go on stdin\n");
		return 1;
	}
	n = where(c, p, KEEP_OFF, KEEP_LEN);
	printf("hints: KEEP_FAST range: %zu pages on node 0, %zu compressed, %zu other\n",
	       n.node0, n.compressed, n.other);
	if (n.node0 != KEEP_LEN / PAGE) {
		fprintf(stderr, "hints: KEEP_FAST range lost %zu pages to demotion\n",
			KEEP_LEN / PAGE - n.node0);
		return 1;
	}
	n = where(c, p, 0, KEEP_OFF);
	{
		struct count m = where(c, p, KEEP_OFF + KEEP_LEN, LEN - KEEP_OFF - KEEP_LEN);

		printf("hints: neighbours: %zu pages compressed, %zu on node 0\n",
		       n.compressed + m.compressed, n.node0 + m.node0);
		if (n.compressed + m.compressed == 0) {
			fprintf(stderr, "hints: reclaim demoted none of the neighbours\n");
			return 1;
		}
	}
	check(p, "after reclaim");
	err = mm_client_advise(c, p, LEN, MM_ADVICE_NORMAL, &r);
	if (err)
		die("advise NORMAL", c, err);
	mm_client_close(c);
	printf("hints: ok\n");
	return 0;
}
