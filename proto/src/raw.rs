//! Records and constants of `include/uapi/linux/mm_upcall.h`, one to one.
//!
//! Field names follow the C header.  Use the typed modules to build or
//! parse them; these exist so that the bytes on the wire have exactly one
//! definition per side and the ABI test can compare the two.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `MM_UPCALL_API_VERSION`.
pub const API_VERSION: u16 = 1;

bitflags::bitflags! {
    /// `MM_UPCALL_F_*`: features negotiated by HELLO.  Bits this crate
    /// does not know are kept (`from_bits_retain`): the wire carries
    /// them, and the kernel masks off what it does not know.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Features: u64 {
        const WRITE_FAULT = 1 << 0;
        const HINT_FAULT = 1 << 1;
        const DEMOTE_CREDIT = 1 << 2;
        const EVENTS = 1 << 3;
        const NODE_MMAP = 1 << 4;
        const PING = 1 << 5;
    }
}

impl Features {
    /// `MM_UPCALL_F_ALL`.
    pub const ALL: Self = Self::all();
}

pub const MAX_QUEUES: u16 = 64;
pub const MAX_QUEUE_DEPTH: u16 = 1024;
pub const MIN_TIMEOUT_MS: u32 = 1;
pub const MAX_TIMEOUT_MS: u32 = 60_000;
pub const DEFAULT_TIMEOUT_MS: u32 = 1000;

/// `MM_UPCALL_IOC_MAGIC`.
pub const IOC_MAGIC: u32 = 0xb7;

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, MM_UPCALL_IOC_MAGIC, nr, size)` (asm-generic layout).
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    // The size field is 14 bits wide; every record here is far smaller.
    assert!(size < (1 << 14));
    (dir << 30) | ((size as u32) << 16) | (IOC_MAGIC << 8) | nr
}
const fn iowr<T>(nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, core::mem::size_of::<T>())
}
const fn iow<T>(nr: u32) -> u32 {
    ioc(IOC_WRITE, nr, core::mem::size_of::<T>())
}

/// Hot-path URING_CMD opcodes (`cmd_op`).
pub mod io_op {
    use super::{IoCmd, iowr};
    pub const FETCH: u32 = iowr::<IoCmd>(0x01);
    pub const COMMIT_AND_FETCH: u32 = iowr::<IoCmd>(0x02);
}

/// Control URING_CMD opcodes (`cmd_op`); they need `IORING_SETUP_SQE128`.
pub mod ctrl_op {
    use super::*;
    pub const HELLO: u32 = iowr::<Hello>(0x10);
    pub const ATTACH_NODE: u32 = iowr::<AttachNode>(0x11);
    pub const DETACH_NODE: u32 = iow::<DetachNode>(0x12);
    pub const SET_CREDIT: u32 = iow::<SetCredit>(0x13);
    pub const PROMOTE_PFN: u32 = iow::<PromotePfn>(0x14);
    pub const RESYNC: u32 = iow::<Resync>(0x15);
    pub const PING: u32 = iowr::<Ping>(0x16);
    pub const SET_STANDING: u32 = iow::<SetStanding>(0x17);

    /// Every control opcode with its name: the one list (the transport's
    /// names, the fuzz target's selector, the tests all use it).
    pub const ALL: [(u32, &str); 8] = [
        (HELLO, "HELLO"),
        (ATTACH_NODE, "ATTACH_NODE"),
        (DETACH_NODE, "DETACH_NODE"),
        (SET_CREDIT, "SET_CREDIT"),
        (PROMOTE_PFN, "PROMOTE_PFN"),
        (RESYNC, "RESYNC"),
        (PING, "PING"),
        (SET_STANDING, "SET_STANDING"),
    ];

    /// The name of control opcode `op` (`None`: not a control opcode).
    pub fn name(op: u32) -> Option<&'static str> {
        ALL.iter().find(|(o, _)| *o == op).map(|(_, n)| *n)
    }
}

/// `MM_UPCALL_CTRL_CMD_SIZE`: the command area of a 128-byte SQE.
pub const CTRL_CMD_SIZE: usize = 80;

/// `MM_UPCALL_OP_*`: upcall opcodes.
pub mod op {
    pub const WRITE_FAULT: u16 = 1;
    pub const HINT_FAULT: u16 = 2;
    pub const DEMOTE_CREDIT: u16 = 3;
    pub const PING: u16 = 4;
}

bitflags::bitflags! {
    /// `MM_UPCALL_DESC_F_*`: flags of an upcall descriptor.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct DescFlags: u16 {
        /// The folio is PMD-mapped.
        const THP = 1 << 0;
        /// Nobody waits for the verdict (hints, credit requests).
        const NO_WAIT = 1 << 1;
    }
}

impl DescFlags {
    /// `MM_UPCALL_DESC_F_ALL`.
    pub const ALL: Self = Self::all();
}

/// `MM_UPCALL_V_*`: verdicts.
pub mod verdict {
    /// `SET_STANDING` only: ask per fault.
    pub const NONE: u16 = 0;
    pub const PROMOTE: u16 = 1;
    pub const ALLOW_IN_PLACE: u16 = 2;
    pub const STAY: u16 = 3;
    pub const GRANT: u16 = 4;
    pub const DENY: u16 = 5;
    pub const DEFAULT: u16 = 6;
    pub const PONG: u16 = 7;
}

/// `MM_UPCALL_EV_*`: event types.
pub mod ev {
    pub const PLACED: u16 = 1;
    pub const FREED: u16 = 2;
    pub const PROMOTED: u16 = 3;
    pub const OVERFLOW: u16 = 4;
    pub const PING: u16 = 5;
}

/// `MM_UPCALL_PING_F_*` and the PING limits.
pub mod ping {
    pub const F_EVENTS: u16 = 1 << 0;
    pub const F_ALL: u16 = F_EVENTS;
    pub const MAX_UPCALLS: u32 = 10_000_000;
    pub const MAX_THREADS: u16 = 64;
    /// A run ends this long after it started (`MM_UPCALL_PING_MAX_SECS`).
    pub const MAX_SECS: u32 = 60;
    /// `MM_UPCALL_PING_HIST_BUCKETS`.
    pub const HIST_BUCKETS: usize = 128;

    /// The histogram bucket of a round trip of `ns` nanoseconds.
    pub const fn hist_bucket(ns: u64) -> usize {
        if ns < 4 {
            return ns as usize;
        }
        let k = 63 - ns.leading_zeros() as u64;
        let s = (ns >> (k - 2)) & 3;
        let b = (4 * k + s - 4) as usize;
        if b >= HIST_BUCKETS {
            HIST_BUCKETS - 1
        } else {
            b
        }
    }

    /// The smallest round trip (ns) counted in bucket `b`.
    pub const fn hist_lower_bound(b: usize) -> u64 {
        if b < 4 {
            return b as u64;
        }
        let k = (b as u64 + 4) / 4;
        let s = (b as u64 + 4) % 4;
        (1 << k) | (s << (k - 2))
    }
}

/// `MM_UPCALL_REASON_*`: why a folio was placed.
pub mod reason {
    pub const DEMOTION: u16 = 1;
    pub const MIGRATION: u16 = 2;
    pub const RESYNC: u16 = 3;
}

/// `MM_UPCALL_DESC_OFFSET_BASE`, `MM_UPCALL_DESC_QUEUE_STRIDE`.
pub const DESC_OFFSET_BASE: u64 = 0;
pub const DESC_QUEUE_STRIDE: u64 = 0x10_0000;
/// `MM_UPCALL_NODE_OFFSET_BASE`.
pub const NODE_OFFSET_BASE: u64 = 0x100_0000_0000;

/// `MM_UPCALL_DESC_OFFSET(q_id)`: mmap offset of a queue's descriptors.
pub const fn desc_offset(q_id: u16) -> u64 {
    DESC_OFFSET_BASE + q_id as u64 * DESC_QUEUE_STRIDE
}

macro_rules! record {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
    };
}

record!(
    /// `struct mm_upcall_desc`: a request descriptor, written by the kernel.
    Desc {
        op: u16,
        flags: u16,
        nid: u16,
        cpu_nid: u16,
        order: u32,
        seq: u32,
        tgid: u32,
        tid: u32,
        pfn: u64,
        vaddr: u64,
        arg: u64,
        reserved: u64,
    }
);

record!(
    /// `struct mm_upcall_io_cmd`: FETCH / COMMIT_AND_FETCH payload.
    IoCmd {
        q_id: u16,
        slot: u16,
        verdict: u16,
        reserved: u16,
        seq: u32,
        arg: u32,
    }
);

record!(
    /// `struct mm_upcall_event`: an asynchronous event.
    Event {
        r#type: u16,
        reason: u16,
        nid: u16,
        target_nid: u16,
        order: u32,
        tgid: u32,
        pfn: u64,
        vaddr: u64,
        count: u64,
    }
);

record!(
    /// `struct mm_upcall_hello`.
    Hello {
        api_version: u16,
        nr_queues: u16,
        queue_depth: u16,
        reserved0: u16,
        timeout_ms: u32,
        reserved1: u32,
        features: u64,
        reply_addr: u64,
    }
);

record!(
    /// `struct mm_upcall_hello_reply`.
    HelloReply {
        api_version: u16,
        nr_queues: u16,
        queue_depth: u16,
        desc_size: u16,
        timeout_ms: u32,
        reserved0: u32,
        features: u64,
        reserved1: u64,
    }
);

record!(
    /// `struct mm_upcall_attach_node`.
    AttachNode {
        nid: u32,
        flags: u32,
        credit_pages: u64,
        reply_addr: u64,
        reserved: u64,
    }
);

record!(
    /// `struct mm_upcall_node_info`.
    NodeInfo {
        nid: u32,
        reserved0: u32,
        start_pfn: u64,
        spanned_pages: u64,
        present_pages: u64,
        mmap_offset: u64,
        reserved1: u64,
    }
);

record!(
    /// `struct mm_upcall_detach_node`.
    DetachNode {
        nid: u32,
        flags: u32,
        reserved: u64,
    }
);

record!(
    /// `struct mm_upcall_set_credit`.
    SetCredit {
        nid: u32,
        flags: u32,
        pages: u64,
    }
);

record!(
    /// `struct mm_upcall_set_standing`.
    SetStanding {
        nid: u32,
        verdict: u16,
        flags: u16,
        arg: u32,
        reserved: u32,
    }
);

record!(
    /// `struct mm_upcall_promote_pfn`.
    PromotePfn {
        pfn: u64,
        nid: u32,
        flags: u32,
    }
);

record!(
    /// `struct mm_upcall_resync`.
    Resync {
        nid: u32,
        flags: u32,
        start_pfn: u64,
        nr_pages: u64,
        reserved: u64,
    }
);

record!(
    /// `struct mm_upcall_ping`.
    Ping {
        nr_upcalls: u32,
        nr_threads: u16,
        flags: u16,
        reply_addr: u64,
        reserved: u64,
    }
);

/// `struct mm_upcall_ping_reply`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PingReply {
    pub issued: u64,
    pub answered: u64,
    pub mismatched: u64,
    pub timed_out: u64,
    pub defaulted: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    pub reserved: u64,
    pub hist: [u32; ping::HIST_BUCKETS],
}

impl Default for PingReply {
    fn default() -> Self {
        zerocopy::FromZeros::new_zeroed()
    }
}

impl PingReply {
    /// The round trip (ns, lower bound of its bucket) at or below which
    /// `permille`/1000 of the answered upcalls fall (990: p99).
    pub fn quantile_ns(&self, permille: u64) -> u64 {
        let total: u64 = self.hist.iter().map(|&c| u64::from(c)).sum();
        let want = (total * permille).div_ceil(1000).max(1);
        let mut seen = 0;
        for (b, &c) in self.hist.iter().enumerate() {
            seen += u64::from(c);
            if seen >= want && c > 0 {
                return ping::hist_lower_bound(b);
            }
        }
        0
    }
}

// The hot-path command must fit the 16-byte command area of a 64-byte SQE,
// and every control payload the 80 bytes of a 128-byte SQE.
const _: () = assert!(core::mem::size_of::<IoCmd>() == 16);
const _: () = assert!(core::mem::size_of::<Desc>() == 56);
const _: () = assert!(core::mem::size_of::<Hello>() <= CTRL_CMD_SIZE);
const _: () = assert!(core::mem::size_of::<AttachNode>() <= CTRL_CMD_SIZE);
const _: () = assert!(core::mem::size_of::<Resync>() <= CTRL_CMD_SIZE);
const _: () = assert!(core::mem::size_of::<Ping>() <= CTRL_CMD_SIZE);
