//! One managed node's state: its books (with the state of their
//! rebuilding), its credit and its eviction, as explicit state machines.

use std::collections::{HashMap, HashSet};

use mm_upcall_proto::control::Standing;

use crate::capacity::NodeAccount;
use crate::metrics::NodeCounters;

/// Whether the books of a node can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Books {
    /// Lost events or a disagreement: a RESYNC must start.
    Stale,
    /// A RESYNC runs: `at` is the next pfn it covers; `in_flight` when a
    /// chunk is with the kernel; `again` when events were lost meanwhile
    /// (another RESYNC follows this one).
    Rebuilding {
        at: u64,
        in_flight: bool,
        again: bool,
    },
    /// The books follow the kernel's events.  `settling` until every page
    /// the last RESYNC reported was measured (until then the books charge
    /// many pages the worst case, and are not judged against capacity).
    Live { settling: bool },
}

/// The node's eviction: idle, or an episode that began above the high
/// watermark and goes on down to the low one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watermark {
    Normal,
    Evicting,
}

/// The node's SET_CREDIT commands: at most one is in flight, so that they
/// apply in order (the kernel may run control commands from io-wq
/// workers); a later value waits (and replaces any other waiting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditCmd {
    Idle,
    Setting { next: Option<u64> },
}

/// Where a node is in its life with this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    /// Managed and served.
    Active,
    /// An operator asked to drain it (`mmctl drain`): no credit, every
    /// page evicted, then a RESYNC shows it empty.
    Draining,
    /// Shown empty: DETACH_NODE sent.
    Detaching,
    /// Detached: ordinary memory again; the server no longer serves it.
    Detached,
}

/// One managed node.
#[derive(Debug)]
pub struct Node {
    pub nid: u16,
    pub account: NodeAccount,
    pub counters: NodeCounters,
    pub books: Books,
    pub watermark: Watermark,
    pub credit_cmd: CreditCmd,
    /// The kernel got DENY (or had its credit revoked) and asks no more:
    /// grant again with SET_CREDIT when there is room.
    pub muted: bool,
    /// RESYNC commands that failed in a row.
    pub resync_failures: u32,
    /// Pfns with a PROMOTE_PFN in flight.
    pub evicting: HashSet<u64>,
    /// Pfns the kernel would not evict, and until when they are left
    /// alone (ns).
    pub refused: HashMap<u64, u64>,
    /// When the retiring credit may be released (ns).
    pub release_retired_at: Option<u64>,
    /// Since when an eviction has waited for the measurement backlog.
    pub evict_waiting_since: Option<u64>,
    /// Drain: a RESYNC was started to show the node empty, and no page
    /// was seen since.
    pub drain_checked: bool,
    /// The server's own moves onto the node in flight (`Cold` advice):
    /// each ticket and the pages it reserved.
    pub moves: Vec<(u64, u64)>,
    /// A move found too little room and the kernel's credit was taken
    /// back for it: no credit is granted until this time (ns), or until
    /// the moves end.
    pub moves_waiting_until: Option<u64>,
    pub life: Life,
    /// Pfns an operator asked to evict (`mmctl evict`), submitted as
    /// eviction slots free up.
    pub evict_queue: std::collections::VecDeque<u64>,
    /// The node's standing verdict for write faults in the kernel, as
    /// last acknowledged (`SET_STANDING`; ATTACH clears it).
    pub standing: Standing,
    /// A SET_STANDING is in flight.
    pub standing_sending: bool,
    /// A SET_STANDING failed: not sent again before this time (ns).
    pub standing_retry_at: u64,
}

impl Node {
    pub fn new(nid: u16, account: NodeAccount) -> Self {
        let at = account.start_pfn();
        Self {
            nid,
            account,
            counters: NodeCounters::default(),
            // Every node starts with a RESYNC: it may hold pages from a
            // server before us.
            books: Books::Rebuilding {
                at,
                in_flight: false,
                again: false,
            },
            watermark: Watermark::Normal,
            credit_cmd: CreditCmd::Idle,
            muted: true,
            resync_failures: 0,
            evicting: HashSet::new(),
            refused: HashMap::new(),
            release_retired_at: None,
            evict_waiting_since: None,
            drain_checked: false,
            moves: Vec::new(),
            moves_waiting_until: None,
            life: Life::Active,
            evict_queue: std::collections::VecDeque::new(),
            standing: Standing::Ask,
            standing_sending: false,
            standing_retry_at: 0,
        }
    }

    /// Detached, or DETACH_NODE sent: nothing more is asked of the
    /// kernel about this node.
    pub fn gone(&self) -> bool {
        matches!(self.life, Life::Detaching | Life::Detached)
    }

    pub fn end_pfn(&self) -> u64 {
        self.account.start_pfn() + self.account.nr_pages() as u64
    }

    /// The books are being rebuilt or must be.
    pub fn rebuilding(&self) -> bool {
        !matches!(self.books, Books::Live { .. })
    }

    /// The books are live and every page was measured since the last
    /// RESYNC: they can be judged against capacity.
    pub fn settled(&self) -> bool {
        self.books == Books::Live { settling: false }
    }

    pub fn credit_busy(&self) -> bool {
        self.credit_cmd != CreditCmd::Idle
    }

    /// Forget the books before a RESYNC rebuilds them.
    pub fn forget(&mut self) {
        self.evicting.clear();
        self.refused.clear();
        self.evict_waiting_since = None;
        self.account.clear();
        self.books = Books::Rebuilding {
            at: self.account.start_pfn(),
            in_flight: false,
            again: false,
        };
    }

    /// Events were lost or disagreed with the books: rebuild them (after
    /// the RESYNC that runs, if one does and has reported anything yet).
    pub fn make_stale(&mut self) {
        if self.gone() {
            // Detached (or being detached): the kernel no longer reports
            // on it, and would refuse a RESYNC.
            return;
        }
        match &mut self.books {
            Books::Rebuilding {
                at,
                in_flight,
                again,
            } => {
                if *at != self.account.start_pfn() || *in_flight {
                    *again = true;
                }
            }
            b => *b = Books::Stale,
        }
    }
}
