/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/*
 * mm_client.h - the C ABI of mm-upcall's hint API (libmmclient.so).
 *
 * Advice about memory for the compressed memory tier, after madvise(2).
 * Every function returns 0 or a negative errno; mm_client_error() says
 * more about the last failure of a client.  A client is not thread-safe:
 * use one per thread, or lock around it.
 *
 *	struct mm_client *c;
 *	struct mm_advised r;
 *
 *	if (mm_client_open(NULL, &c) == 0) {
 *		mm_client_advise(c, buf, len, MM_ADVICE_COLD, &r);
 *		mm_client_close(c);
 *	}
 *
 * Link with `pkg-config --libs mmclient`.
 */
#ifndef MM_CLIENT_H
#define MM_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum mm_advice {
	/* Undo earlier advice (unlocks a KEEP_FAST range). */
	MM_ADVICE_NORMAL = 1,
	/* Move the range off the compressed node now. */
	MM_ADVICE_HOT = 2,
	/* Move the range to the compressed node now, within its capacity. */
	MM_ADVICE_COLD = 3,
	/*
	 * Lock the range (mlock: reclaim, and so demotion, never takes
	 * locked pages), then move it off the compressed node; it stays off
	 * until other advice covers it or the client is closed.  Only on
	 * the caller's own memory.
	 */
	MM_ADVICE_KEEP_FAST = 4,
};

/* What the server did with a range, in pages. */
struct mm_advised {
	uint64_t pages;		/* in the range */
	uint64_t moved;		/* moved as advised */
	uint64_t already;	/* already where the advice wants them */
	uint64_t skipped;	/* not present, not movable, or no room */
};

/* mm_page.compressed_bytes of a page with no measured size. */
#define MM_SIZE_UNKNOWN UINT32_MAX

/* Where one page lives. */
struct mm_page {
	/* NUMA node, or -ENOENT (not present), -EFAULT (not mapped). */
	int32_t node;
	/* Measured size on a compressed node, else MM_SIZE_UNKNOWN. */
	uint32_t compressed_bytes;
};

/* What mm_probe() found, like numa_available(). */
struct mm_probe {
	int kernel;		/* the kernel has the feature (/dev/mm_upcall) */
	int server;		/* a server answers on the client socket */
	uint16_t version;	/* the protocol version agreed, if it does */
};

struct mm_client;

/*
 * Connect to the client socket at @path (NULL: $MM_UPCALL_SOCKET or
 * /run/mm-upcall/client.sock).  -ECONNREFUSED/-ENOENT: no server;
 * -EACCES: this user may not use the socket.
 */
int mm_client_open(const char *path, struct mm_client **out);

/* Close the client; KEEP_FAST ranges are unlocked.  NULL is ignored. */
void mm_client_close(struct mm_client *c);

/*
 * Advise @len bytes at page-aligned @addr of this process.  @out may be
 * NULL.  -EINVAL: unaligned or wrapping range; -EAGAIN: over the rate
 * limits or the server cannot place pages now, retry later; -ENOMEM:
 * KEEP_FAST could not lock the range (RLIMIT_MEMLOCK).
 */
int mm_client_advise(struct mm_client *c, void *addr, size_t len,
		     enum mm_advice advice, struct mm_advised *out);

/*
 * The same on the process @pidfd refers to (not KEEP_FAST: -EOPNOTSUPP).
 * -EPERM without CAP_SYS_NICE, or without its uid or CAP_SYS_PTRACE.
 */
int mm_client_advise_pidfd(struct mm_client *c, int pidfd, uint64_t addr,
			   size_t len, enum mm_advice advice,
			   struct mm_advised *out);

/*
 * Where each page of @len bytes at @addr of this process lives: fills
 * @pages, which has room for @npages (at least len / page size, rounded
 * up; else -ERANGE).
 */
int mm_client_residency(struct mm_client *c, const void *addr, size_t len,
			struct mm_page *pages, size_t npages);

/* The last failure of @c, as text (valid until its next call). */
const char *mm_client_error(const struct mm_client *c);

/* Fill @out; returns 0 (or -EINVAL for NULL). */
int mm_probe(struct mm_probe *out);

#ifdef __cplusplus
}
#endif

#endif /* MM_CLIENT_H */
