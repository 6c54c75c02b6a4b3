//! Placement policy: the verdict for each upcall.
//!
//! - Write fault: `AllowInPlace` only within the node's writable budget
//!   (default 0) and physical room; otherwise `Promote` to the nearest
//!   fast node.
//! - Hint fault: count the access; `Promote` once a page's heat reaches the
//!   threshold, if the global promotion rate limit (MB/s, like the kernel's
//!   `numa_balancing_promote_rate_limit_MBps`) has room; else `Stay`.
//! - Demotion credit: `Grant` what keeps the node under its high watermark
//!   (worst-case reservations), `Deny` when that is nothing.
//! - Ping: `Pong` with the cookie.

use mm_upcall_proto::control::Standing;
use mm_upcall_proto::upcall::{Fault, Upcall};
use mm_upcall_proto::verdict::Verdict;

use crate::capacity::{NodeAccount, PAGE_SIZE};

/// Policy knobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Pages per managed node that may be written in place.
    pub writable_budget: u64,
    /// Hint faults in a window before a page is promoted.
    pub hot_threshold: u8,
    /// Promotion budget, MB/s, shared by all managed nodes.
    pub promote_rate_limit_mbps: u64,
    /// Fast (non-managed) nodes in order of preference, nearest first.
    pub fast_nodes: Vec<u16>,
    /// Least credit granted per DEMOTE_CREDIT request, pages.  The kernel
    /// asks when a demotion finds no credit, for that one folio, and fails
    /// demotions until the answer arrives: granting in chunks keeps
    /// reclaim from stalling on round trips.
    pub credit_chunk_pages: u64,
    /// Leave the kernel a standing verdict (`SET_STANDING`) while the
    /// write-fault verdict cannot depend on the fault: see
    /// [`Policy::standing`].
    pub standing_verdicts: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            writable_budget: 0,
            hot_threshold: 2,
            promote_rate_limit_mbps: 65536,
            fast_nodes: vec![0],
            credit_chunk_pages: 4096,
            standing_verdicts: true,
        }
    }
}

/// A token bucket in bytes, refilled at `rate` bytes per second, holding
/// at most one second's worth.
#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: u64,
    tokens: u64,
    last_ns: u64,
}

impl RateLimit {
    pub fn new(mbps: u64, now_ns: u64) -> Self {
        let rate = mbps.saturating_mul(1 << 20);
        Self {
            rate,
            tokens: rate,
            last_ns: now_ns,
        }
    }

    /// Take `bytes` if available at time `now_ns`.
    pub fn take(&mut self, bytes: u64, now_ns: u64) -> bool {
        let dt = now_ns.saturating_sub(self.last_ns);
        self.last_ns = self.last_ns.max(now_ns);
        let refill = (u128::from(self.rate) * u128::from(dt) / 1_000_000_000) as u64;
        self.tokens = self.tokens.saturating_add(refill).min(self.rate);
        if self.tokens >= bytes {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }
}

/// Counters of decisions, as plain integers (rendered by the daemon).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decisions {
    pub promote: u64,
    pub in_place: u64,
    pub stay: u64,
    pub rate_limited: u64,
    pub grant: u64,
    pub granted_pages: u64,
    pub deny: u64,
    pub unknown_node: u64,
}

/// The policy over a set of managed nodes.
#[derive(Debug)]
pub struct Policy {
    cfg: PolicyConfig,
    /// Indexed by node id; `None` for nodes that are not managed.
    nodes: Vec<Option<NodeAccount>>,
    rate: RateLimit,
    /// Nodes known to be short of free memory (see [`Policy::set_low_on_memory`]).
    low_on_memory: Vec<u16>,
    /// Managed nodes whose books are kept elsewhere (see
    /// [`Policy::decide_with`]).
    managed: Vec<u16>,
    pub decisions: Decisions,
}

impl Policy {
    pub fn new(cfg: PolicyConfig, now_ns: u64) -> Self {
        Self {
            rate: RateLimit::new(cfg.promote_rate_limit_mbps, now_ns),
            cfg,
            nodes: Vec::new(),
            low_on_memory: Vec::new(),
            managed: Vec::new(),
            decisions: Decisions::default(),
        }
    }

    /// Manage node `nid` with this accounting.
    pub fn add_node(&mut self, nid: u16, account: NodeAccount) {
        let i = usize::from(nid);
        if self.nodes.len() <= i {
            self.nodes.resize_with(i + 1, || None);
        }
        self.nodes[i] = Some(account);
    }

    pub fn node(&self, nid: u16) -> Option<&NodeAccount> {
        self.nodes.get(usize::from(nid)).and_then(Option::as_ref)
    }

    pub fn node_mut(&mut self, nid: u16) -> Option<&mut NodeAccount> {
        self.nodes
            .get_mut(usize::from(nid))
            .and_then(Option::as_mut)
    }

    /// Node `nid` is managed, its books kept by the caller of
    /// [`Policy::decide_with`].
    pub fn set_managed(&mut self, nid: u16) {
        self.managed.push(nid);
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Replace the knobs at run time (the fast nodes and the use of
    /// standing verdicts stay); the promotion rate limit starts afresh.
    pub fn reconfigure(&mut self, cfg: PolicyConfig, now_ns: u64) {
        self.rate = RateLimit::new(cfg.promote_rate_limit_mbps, now_ns);
        self.cfg = PolicyConfig {
            fast_nodes: std::mem::take(&mut self.cfg.fast_nodes),
            standing_verdicts: self.cfg.standing_verdicts,
            ..cfg
        };
    }

    /// The write-fault verdict the kernel may apply without asking, the
    /// same for every fault as [`Policy::decide`] would give: with no
    /// writable budget a write fault always promotes, and with no fast
    /// node short of memory the target is the faulting CPU's node, which
    /// is the kernel's default.  Otherwise (or when disabled) every fault
    /// is asked.
    pub fn standing(&self) -> Standing {
        if self.cfg.standing_verdicts
            && self.cfg.writable_budget == 0
            && self.low_on_memory.is_empty()
        {
            Standing::Default
        } else {
            Standing::Ask
        }
    }

    fn is_managed(&self, nid: u16) -> bool {
        self.node(nid).is_some() || self.managed.contains(&nid)
    }

    /// Which fast nodes are short of free memory now (the daemon reads
    /// their free memory on its tick).
    pub fn set_low_on_memory(&mut self, nids: Vec<u16>) {
        self.low_on_memory = nids;
    }

    /// Nearest fast node with free memory: the faulting CPU's node unless
    /// it is managed or short, else the first configured fast node that is
    /// not; when all are short, the nearest anyway (the kernel then copies
    /// the page instead of migrating it).
    fn target(&self, f: &Fault) -> u16 {
        let fast = |n: &u16| !self.is_managed(*n);
        let mut candidates = std::iter::once(f.cpu_nid)
            .chain(self.cfg.fast_nodes.iter().copied())
            .filter(fast);
        let first = candidates.clone().next();
        candidates
            .find(|n| !self.low_on_memory.contains(n))
            .or(first)
            .unwrap_or(0)
    }

    /// The verdict for one upcall at time `now_ns`, with the books this
    /// policy holds.
    pub fn decide(&mut self, upcall: &Upcall, now_ns: u64) -> Verdict {
        let nid = match *upcall {
            Upcall::WriteFault(ref f) | Upcall::HintFault { fault: ref f, .. } => f.nid,
            Upcall::DemoteCredit { nid, .. } => nid,
            Upcall::Ping { cookie } => return Verdict::Pong { cookie },
        };
        // The books are lent out for the call (a move of the Vec, not of
        // the books).
        let mut nodes = std::mem::take(&mut self.nodes);
        let node = nodes.get_mut(usize::from(nid)).and_then(Option::as_mut);
        let v = self.decide_with(upcall, node, now_ns);
        self.nodes = nodes;
        v
    }

    /// The verdict for one upcall at time `now_ns`; `node` holds the
    /// books of the node the upcall is about (`None`: not managed).
    pub fn decide_with(
        &mut self,
        upcall: &Upcall,
        node: Option<&mut NodeAccount>,
        now_ns: u64,
    ) -> Verdict {
        match *upcall {
            Upcall::Ping { cookie } => Verdict::Pong { cookie },
            Upcall::WriteFault(ref f) => {
                let budget = self.cfg.writable_budget;
                let target = self.target(f);
                // A PMD-mapped THP would become writable as a whole; the
                // budget is counted in base pages, so THPs always promote.
                let allowed = !f.thp
                    && node
                        .and_then(|n| n.allow_in_place(f.pfn, budget).ok())
                        .unwrap_or(false);
                if allowed {
                    self.decisions.in_place += 1;
                    Verdict::AllowInPlace
                } else {
                    self.decisions.promote += 1;
                    Verdict::Promote { nid: target }
                }
            }
            Upcall::HintFault { ref fault, .. } => {
                let threshold = self.cfg.hot_threshold;
                let target = self.target(fault);
                let Some(node) = node else {
                    self.decisions.unknown_node += 1;
                    return Verdict::Default;
                };
                node.touch(fault.pfn);
                if node.heat(fault.pfn) < threshold {
                    self.decisions.stay += 1;
                    return Verdict::Stay;
                }
                let bytes = u64::from(PAGE_SIZE) << fault.order.min(20);
                if self.rate.take(bytes, now_ns) {
                    self.decisions.promote += 1;
                    Verdict::Promote { nid: target }
                } else {
                    self.decisions.rate_limited += 1;
                    self.decisions.stay += 1;
                    Verdict::Stay
                }
            }
            Upcall::DemoteCredit { wanted_pages, .. } => {
                let chunk = self.cfg.credit_chunk_pages;
                let Some(node) = node else {
                    self.decisions.unknown_node += 1;
                    return Verdict::Deny;
                };
                let want = wanted_pages.max(chunk).min(u64::from(u32::MAX));
                let got = node.grant(want);
                if got == 0 {
                    self.decisions.deny += 1;
                    Verdict::Deny
                } else {
                    self.decisions.grant += 1;
                    self.decisions.granted_pages += got;
                    Verdict::Grant { pages: got as u32 }
                }
            }
        }
    }
}
