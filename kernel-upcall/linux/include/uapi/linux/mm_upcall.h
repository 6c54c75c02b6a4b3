/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * mm_upcall: forward memory-management decisions for managed (compressed)
 * NUMA nodes to a user-space memory manager over io_uring.
 *
 * Transport (the ublk pattern): the server opens /dev/mm_upcall, negotiates
 * with MM_UPCALL_CMD_HELLO, then pre-posts one IORING_OP_URING_CMD with
 * cmd_op MM_UPCALL_IO_FETCH per slot.  The kernel completes a parked FETCH
 * when it needs a decision; the request descriptor (struct mm_upcall_desc)
 * is then readable at the slot's index in the queue's descriptor array,
 * mapped read-only with mmap() at MM_UPCALL_DESC_OFFSET(q_id).  The server
 * answers with MM_UPCALL_IO_COMMIT_AND_FETCH, which carries the verdict in
 * struct mm_upcall_io_cmd and re-arms the slot.
 *
 * Asynchronous events (struct mm_upcall_event) are read(2) from the device
 * in batches; poll(2) reports POLLIN when events are queued.
 *
 * Control commands are URING_CMDs that need IORING_SETUP_SQE128: their
 * payload (one of the mm_upcall_* command structs below) sits at the start
 * of the 80-byte command area, and every byte after it must be zero.
 *
 * The device belongs to the server's process, not to a descriptor:
 * open(), control commands, read() and mmap() need CAP_SYS_ADMIN (EPERM
 * otherwise), and HELLO binds the device to its caller's mm, after which
 * every command, read() and mmap() from another process fails with
 * EBADFD (poll() reports EPOLLERR).  A launcher may open the device and
 * exec the server, which then sends HELLO; once the opener has exec'd or
 * exited and until that HELLO, a new open() may take the device over.
 *
 * Rules for every record in this file: native endianness, fixed-width
 * fields, explicit padding, a size that is a multiple of 8 bytes.  Fields
 * named reserved* and unused flag bits must be zero; both sides reject a
 * record otherwise.  Opcodes, verdicts, events and reasons never use 0.
 *
 * Changelog:
 *   v1 (API version 1): first version.  Later, without a version change:
 *   privilege checked per command, the device bound to HELLO's caller.
 */
#ifndef _UAPI_LINUX_MM_UPCALL_H
#define _UAPI_LINUX_MM_UPCALL_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define MM_UPCALL_API_VERSION		1

/* Feature bits negotiated by HELLO; the kernel masks with MM_UPCALL_F_ALL. */
#define MM_UPCALL_F_WRITE_FAULT		(1ULL << 0)
#define MM_UPCALL_F_HINT_FAULT		(1ULL << 1)
#define MM_UPCALL_F_DEMOTE_CREDIT	(1ULL << 2)
#define MM_UPCALL_F_EVENTS		(1ULL << 3)
#define MM_UPCALL_F_NODE_MMAP		(1ULL << 4)
#define MM_UPCALL_F_PING		(1ULL << 5)
#define MM_UPCALL_F_ALL			(MM_UPCALL_F_WRITE_FAULT |	\
					 MM_UPCALL_F_HINT_FAULT |	\
					 MM_UPCALL_F_DEMOTE_CREDIT |	\
					 MM_UPCALL_F_EVENTS |		\
					 MM_UPCALL_F_NODE_MMAP |	\
					 MM_UPCALL_F_PING)

/* Limits. */
#define MM_UPCALL_MAX_QUEUES		64
#define MM_UPCALL_MAX_QUEUE_DEPTH	1024
#define MM_UPCALL_MIN_TIMEOUT_MS	1
#define MM_UPCALL_MAX_TIMEOUT_MS	60000
#define MM_UPCALL_DEFAULT_TIMEOUT_MS	1000

#define MM_UPCALL_IOC_MAGIC		0xb7

/* Hot-path URING_CMD opcodes (cmd_op); payload: struct mm_upcall_io_cmd. */
#define MM_UPCALL_IO_FETCH \
	_IOWR(MM_UPCALL_IOC_MAGIC, 0x01, struct mm_upcall_io_cmd)
#define MM_UPCALL_IO_COMMIT_AND_FETCH \
	_IOWR(MM_UPCALL_IOC_MAGIC, 0x02, struct mm_upcall_io_cmd)

/* Control URING_CMD opcodes (cmd_op); need IORING_SETUP_SQE128. */
#define MM_UPCALL_CMD_HELLO \
	_IOWR(MM_UPCALL_IOC_MAGIC, 0x10, struct mm_upcall_hello)
#define MM_UPCALL_CMD_ATTACH_NODE \
	_IOWR(MM_UPCALL_IOC_MAGIC, 0x11, struct mm_upcall_attach_node)
#define MM_UPCALL_CMD_DETACH_NODE \
	_IOW(MM_UPCALL_IOC_MAGIC, 0x12, struct mm_upcall_detach_node)
#define MM_UPCALL_CMD_SET_CREDIT \
	_IOW(MM_UPCALL_IOC_MAGIC, 0x13, struct mm_upcall_set_credit)
#define MM_UPCALL_CMD_PROMOTE_PFN \
	_IOW(MM_UPCALL_IOC_MAGIC, 0x14, struct mm_upcall_promote_pfn)
#define MM_UPCALL_CMD_RESYNC \
	_IOW(MM_UPCALL_IOC_MAGIC, 0x15, struct mm_upcall_resync)
#define MM_UPCALL_CMD_PING \
	_IOWR(MM_UPCALL_IOC_MAGIC, 0x16, struct mm_upcall_ping)
#define MM_UPCALL_CMD_SET_STANDING \
	_IOW(MM_UPCALL_IOC_MAGIC, 0x17, struct mm_upcall_set_standing)

/* Size of the command area of a 128-byte SQE. */
#define MM_UPCALL_CTRL_CMD_SIZE		80

/* Upcall opcodes: struct mm_upcall_desc.op. */
#define MM_UPCALL_OP_WRITE_FAULT	1
#define MM_UPCALL_OP_HINT_FAULT		2
#define MM_UPCALL_OP_DEMOTE_CREDIT	3
#define MM_UPCALL_OP_PING		4

/* Flags of struct mm_upcall_desc.flags. */
#define MM_UPCALL_DESC_F_THP		(1U << 0)	/* PMD-mapped folio */
#define MM_UPCALL_DESC_F_NO_WAIT	(1U << 1)	/* nobody waits (credit) */
#define MM_UPCALL_DESC_F_ALL		(MM_UPCALL_DESC_F_THP |	\
					 MM_UPCALL_DESC_F_NO_WAIT)

/*
 * Request descriptor, one per slot, written by the kernel.
 *
 * WRITE_FAULT, HINT_FAULT: pfn/order/nid of the folio on the managed node,
 *   tgid/tid/vaddr of the faulting task, cpu_nid the faulting CPU's node.
 *   tgid and tid are those of the PID namespace of the task that sent
 *   HELLO; 0 if the faulting task is not visible there.
 *   arg is 0 for WRITE_FAULT; for HINT_FAULT it is reserved for the time
 *   since the folio was last scanned and is 0 in this version.  HINT_FAULT
 *   has flag NO_WAIT: nobody waits for its verdict.
 * DEMOTE_CREDIT: nid of the managed node, arg the number of pages that
 *   demotion wanted and could not place; every other field is 0.
 * PING: arg is a cookie below 2^32; every other field except seq is 0.
 */
struct mm_upcall_desc {
	__u16	op;		/* MM_UPCALL_OP_* */
	__u16	flags;		/* MM_UPCALL_DESC_F_* */
	__u16	nid;		/* node holding the folio */
	__u16	cpu_nid;	/* node of the faulting CPU */
	__u32	order;		/* folio order */
	__u32	seq;		/* echoed by the verdict */
	__u32	tgid;
	__u32	tid;
	__u64	pfn;
	__u64	vaddr;
	__u64	arg;
	__u64	reserved;
};

/* Verdicts: struct mm_upcall_io_cmd.verdict. */
#define MM_UPCALL_V_NONE		0	/* SET_STANDING: ask per fault */
#define MM_UPCALL_V_PROMOTE		1	/* arg: target nid */
#define MM_UPCALL_V_ALLOW_IN_PLACE	2	/* WRITE_FAULT only */
#define MM_UPCALL_V_STAY		3	/* HINT_FAULT only */
#define MM_UPCALL_V_GRANT		4	/* DEMOTE_CREDIT; arg: pages */
#define MM_UPCALL_V_DENY		5	/* DEMOTE_CREDIT only */
#define MM_UPCALL_V_DEFAULT		6	/* the kernel's own default */
#define MM_UPCALL_V_PONG		7	/* PING only; arg: the cookie */

/*
 * Payload of MM_UPCALL_IO_FETCH (verdict, seq and arg zero) and
 * MM_UPCALL_IO_COMMIT_AND_FETCH; fits the 16 bytes of a 64-byte SQE.
 * A verdict that is not valid for the descriptor's op, or a seq that does
 * not match, fails the command with -EINVAL and the waiter gets the
 * default verdict.
 */
struct mm_upcall_io_cmd {
	__u16	q_id;
	__u16	slot;
	__u16	verdict;	/* MM_UPCALL_V_* */
	__u16	reserved;
	__u32	seq;		/* seq of the descriptor being answered */
	__u32	arg;
};

/* Asynchronous events, read(2) from the device. */
#define MM_UPCALL_EV_PLACED		1
#define MM_UPCALL_EV_FREED		2	/* count: 0, or a range of pages */
#define MM_UPCALL_EV_PROMOTED		3
#define MM_UPCALL_EV_OVERFLOW		4	/* count: events dropped */
#define MM_UPCALL_EV_PING		5	/* count: cookie of a PING */

/* Why a folio was placed on a managed node: mm_upcall_event.reason. */
#define MM_UPCALL_REASON_DEMOTION	1	/* reclaim-time demotion */
#define MM_UPCALL_REASON_MIGRATION	2	/* the server's migration */
#define MM_UPCALL_REASON_RESYNC		3	/* re-reported by RESYNC */

struct mm_upcall_event {
	__u16	type;		/* MM_UPCALL_EV_* */
	__u16	reason;		/* PLACED: MM_UPCALL_REASON_*, else 0 */
	__u16	nid;		/* managed node; PROMOTED: source node */
	__u16	target_nid;	/* PROMOTED: destination node, else 0 */
	__u32	order;
	__u32	tgid;		/* PLACED: as in the descriptor, 0 if unknown */
	__u64	pfn;		/* PROMOTED: pfn on the managed node */
	__u64	vaddr;		/* PLACED: 0 when unknown */
	__u64	count;		/* OVERFLOW: lost; PING: cookie; FREED: pages */
};

/*
 * MM_UPCALL_CMD_HELLO: must be the first command.  The kernel validates
 * the request and writes struct mm_upcall_hello_reply to reply_addr.
 * features is masked with MM_UPCALL_F_ALL; the reply echoes what the
 * kernel grants.  timeout_ms 0 selects MM_UPCALL_DEFAULT_TIMEOUT_MS.
 */
struct mm_upcall_hello {
	__u16	api_version;	/* MM_UPCALL_API_VERSION */
	__u16	nr_queues;
	__u16	queue_depth;	/* slots per queue */
	__u16	reserved0;
	__u32	timeout_ms;	/* longest wait on the server */
	__u32	reserved1;
	__u64	features;	/* MM_UPCALL_F_* wanted */
	__u64	reply_addr;	/* struct mm_upcall_hello_reply */
};

struct mm_upcall_hello_reply {
	__u16	api_version;
	__u16	nr_queues;
	__u16	queue_depth;
	__u16	desc_size;	/* sizeof(struct mm_upcall_desc) */
	__u32	timeout_ms;
	__u32	reserved0;
	__u64	features;	/* MM_UPCALL_F_* granted */
	__u64	reserved1;
};

/* Offset of queue q_id's descriptor array for mmap(). */
#define MM_UPCALL_DESC_OFFSET_BASE	0x0ULL
#define MM_UPCALL_DESC_QUEUE_STRIDE	0x100000ULL
#define MM_UPCALL_DESC_OFFSET(q_id)	(MM_UPCALL_DESC_OFFSET_BASE + \
					 (__u64)(q_id) * MM_UPCALL_DESC_QUEUE_STRIDE)
/* Offset of the read-only mapping of managed node memory for mmap(). */
#define MM_UPCALL_NODE_OFFSET_BASE	0x10000000000ULL

/*
 * MM_UPCALL_CMD_ATTACH_NODE: make memory-only node nid a managed node of
 * this server with an initial demotion credit; writes
 * struct mm_upcall_node_info to reply_addr.
 */
struct mm_upcall_attach_node {
	__u32	nid;
	__u32	flags;		/* none defined: 0 */
	__u64	credit_pages;
	__u64	reply_addr;	/* struct mm_upcall_node_info */
	__u64	reserved;
};

struct mm_upcall_node_info {
	__u32	nid;
	__u32	reserved0;
	__u64	start_pfn;
	__u64	spanned_pages;
	__u64	present_pages;
	__u64	mmap_offset;	/* pass to mmap() for the node's memory */
	__u64	reserved1;
};

/* MM_UPCALL_CMD_DETACH_NODE */
struct mm_upcall_detach_node {
	__u32	nid;
	__u32	flags;		/* none defined: 0 */
	__u64	reserved;
};

/* MM_UPCALL_CMD_SET_CREDIT: set the node's demotion credit to pages. */
struct mm_upcall_set_credit {
	__u32	nid;
	__u32	flags;		/* none defined: 0 */
	__u64	pages;
};

/* MM_UPCALL_CMD_PROMOTE_PFN: migrate the folio at pfn to node nid. */
struct mm_upcall_promote_pfn {
	__u64	pfn;
	__u32	nid;		/* target, a node that is not managed */
	__u32	flags;		/* none defined: 0 */
};

/*
 * MM_UPCALL_CMD_RESYNC: report every anonymous folio of managed node nid
 * whose head pfn is in [start_pfn, start_pfn + nr_pages) as a PLACED event
 * with reason RESYNC.  It stops before the event queue fills up; the CQE
 * result is how many pfns from start_pfn it covered (-EAGAIN if none):
 * read the events and issue it again from start_pfn + result.
 */
struct mm_upcall_resync {
	__u32	nid;
	__u32	flags;		/* none defined: 0 */
	__u64	start_pfn;
	__u64	nr_pages;
	__u64	reserved;
};

/*
 * MM_UPCALL_CMD_SET_STANDING: a verdict for the WRITE_FAULTs on managed
 * node nid from now on, taken without asking: MM_UPCALL_V_PROMOTE (arg:
 * the target, valid as in a PROMOTE verdict; if it is not valid any more
 * when a fault takes it, the default applies) or MM_UPCALL_V_DEFAULT (arg
 * 0: the faulting CPU's node, as with no server).  MM_UPCALL_V_NONE (arg
 * 0) asks per fault again.  Needs MM_UPCALL_F_WRITE_FAULT.  ATTACH_NODE
 * and DETACH_NODE of nid and the server's death clear it.  The folios
 * leave the node as after an answered WRITE_FAULT, with PROMOTED events.
 * Replacing it is not a barrier: faults already asking get their answers,
 * and a fault that read the old verdict applies it.  Write faults that
 * cannot be retried (a forced write, an exiting task) are never asked and
 * are decided at once, as before.
 */
struct mm_upcall_set_standing {
	__u32	nid;
	__u16	verdict;
	__u16	flags;		/* none defined: 0 */
	__u32	arg;
	__u32	reserved;
};

/*
 * MM_UPCALL_CMD_PING: issue nr_upcalls synthetic PING upcalls from
 * nr_threads kernel threads through the same post-and-wait path as the mm
 * hooks; the server answers each with MM_UPCALL_V_PONG and the cookie in
 * arg.  With MM_UPCALL_PING_F_EVENTS each upcall also posts an
 * MM_UPCALL_EV_PING event through the event path.  The command completes
 * when every upcall has; it writes struct mm_upcall_ping_reply to
 * reply_addr.  total_ns and max_ns cover answered upcalls.  A run ends
 * early, its remaining upcalls counted as defaulted without being asked,
 * when an upcall times out, when the server is killed or its ring goes,
 * and MM_UPCALL_PING_MAX_SECS after it started.
 */
#define MM_UPCALL_PING_F_EVENTS		(1U << 0)
#define MM_UPCALL_PING_F_ALL		MM_UPCALL_PING_F_EVENTS
#define MM_UPCALL_PING_MAX_UPCALLS	10000000
#define MM_UPCALL_PING_MAX_THREADS	64
#define MM_UPCALL_PING_MAX_SECS		60

struct mm_upcall_ping {
	__u32	nr_upcalls;
	__u16	nr_threads;
	__u16	flags;		/* MM_UPCALL_PING_F_* */
	__u64	reply_addr;	/* struct mm_upcall_ping_reply */
	__u64	reserved;
};

/*
 * Round-trip histogram of answered PING upcalls, four buckets per power of
 * two: a round trip of n ns (n >= 4) with k = floor(log2(n)) and s the two
 * bits below the top bit, s = (n >> (k - 2)) & 3, is counted in bucket
 * 4 * k + s - 4, at most MM_UPCALL_PING_HIST_BUCKETS - 1; n < 4 in bucket n.
 */
#define MM_UPCALL_PING_HIST_BUCKETS	128

struct mm_upcall_ping_reply {
	__u64	issued;
	__u64	answered;	/* verdict from the server, cookie intact */
	__u64	mismatched;	/* verdict from the server, wrong cookie */
	__u64	timed_out;	/* default verdict after the timeout */
	__u64	defaulted;	/* default verdict: no server, cancelled */
	__u64	total_ns;	/* sum of round-trip times */
	__u64	max_ns;
	__u64	reserved;
	__u32	hist[MM_UPCALL_PING_HIST_BUCKETS];
};

#endif /* _UAPI_LINUX_MM_UPCALL_H */
