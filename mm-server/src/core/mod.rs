//! The server's logic as a state machine with no I/O: no syscalls, no
//! clock reads, no threads.  The [driver](crate::driver) feeds it what
//! the kernel and the clock say and carries out what it asks; the
//! simulator (`mm-sim`) does the same against a simulated kernel.
//!
//! Inputs: an upcall ([`Core::upcall`], answered at once), an event
//! ([`Core::event`]) and the end of a batch of them
//! ([`Core::events_applied`]), a control command's result
//! ([`Core::completed`]), a page's measured size ([`Core::measured`]), the
//! tick ([`Core::tick`]) and signals ([`Core::signal`]).  Every input that
//! depends on time carries `now`, in nanoseconds from any fixed origin.
//!
//! Outputs: verdicts (returned), control commands ([`Core::poll_command`],
//! each answered later by [`Core::completed`] with its [`CmdId`]), pages
//! to measure ([`Core::pop_measure`]), a metrics [`Snapshot`], readiness
//! ([`Core::take_ready`]), a fatal error ([`Core::take_fatal`]) and the
//! [`Phase`].
//!
//! What the core keeps: the books of every managed node (rebuilt with
//! `RESYNC` when events were lost), the demotion credit the kernel holds
//! (granted in one place, `Core::grant`), the watermarks and their
//! evictions, and the drain at shutdown.

mod node;

use std::collections::{HashMap, HashSet, VecDeque};

use mm_upcall_proto::control::{Control, Standing};
use mm_upcall_proto::event::{Event, PlaceReason};
use mm_upcall_proto::upcall::{Fault, Upcall};
use mm_upcall_proto::verdict::Verdict;

pub use self::node::{Books, CreditCmd, Life, Node, Watermark};
use crate::capacity::{AccountError, BLOCK_PAGES, Level, NodeAccount, PageState};
use crate::metrics::{Metrics, NodeGauges, Snapshot};
use crate::policy::{Policy, PolicyConfig};

const MS: u64 = 1_000_000;
const S: u64 = 1_000 * MS;
/// Period of the watermark / credit / metrics work.
pub const TICK_NS: u64 = 50 * MS;
/// `PROMOTE_PFN` commands in flight at once per node.
pub const MAX_EVICTIONS_IN_FLIGHT: usize = 128;
/// How long credit taken back by SET_CREDIT stays reserved after the
/// command completed: demotions that allocated their target before it ran
/// report PLACED within this time.  A new server also grants nothing for
/// this long: demotions on the credit of the server before it may still
/// report.
pub const RETIRE_GRACE_NS: u64 = S;
/// Longest a move waiting for the kernel's credit to be taken back holds
/// credit off (see [`Core::begin_move`]).
pub const MOVE_WAIT_NS: u64 = 10 * S;
/// How long eviction waits for the measurement backlog.
const EVICT_PATIENCE_NS: u64 = S;
/// How long a pfn the kernel would not evict is left alone.
const EVICT_BACKOFF_NS: u64 = 5 * S;
/// The same while draining.
const DRAIN_BACKOFF_NS: u64 = 200 * MS;
/// How long after a failed SET_STANDING it is tried again.
const STANDING_RETRY_NS: u64 = 10 * S;
/// How long no fast node must have been short of memory before the
/// standing verdict is left again (a node hovering at the mark would
/// otherwise flip it every tick).
pub const STANDING_CALM_NS: u64 = 5 * S;
/// Largest RESYNC range per command (the kernel's count is an `int`).
const MAX_RESYNC_PAGES: u64 = i32::MAX as u64;
/// RESYNC failures in a row after which the books cannot be rebuilt.
const MAX_RESYNC_FAILURES: u32 = 3;

const EAGAIN: i32 = 11;
const EINTR: i32 = 4;
const ENOENT: i32 = 2;

/// Names a control command the core asked for; give it back to
/// [`Core::completed`] with the command's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CmdId(pub u64);

/// Why a control command was sent.
#[derive(Debug, Clone, Copy)]
enum Cmd {
    Resync { node: usize },
    SetCredit { node: usize, pages: u64 },
    Evict { node: usize, pfn: u64 },
    Detach { node: usize },
    SetStanding { node: usize, standing: Standing },
}

/// The knobs `mmctl policy` reads and sets at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimePolicy {
    pub writable_budget: u64,
    pub hot_threshold: u8,
    pub promote_rate_limit_mbps: u64,
    pub credit_chunk_pages: u64,
    pub hot_window_ms: u32,
    /// The node whose watermarks these are.
    pub nid: u16,
    /// Low, high, critical, percent of the node's capacity.
    pub watermarks: (u8, u8, u8),
}

impl RuntimePolicy {
    /// The wire record of it.
    pub fn to_rec(&self) -> mm_upcall_proto::socket::PolicyRec {
        let (low, high, critical) = self.watermarks;
        mm_upcall_proto::socket::PolicyRec {
            writable_budget: self.writable_budget,
            promote_rate_limit_mbps: self.promote_rate_limit_mbps,
            credit_chunk_pages: self.credit_chunk_pages,
            hot_window_ms: self.hot_window_ms,
            nid: self.nid,
            hot_threshold: self.hot_threshold,
            low,
            high,
            critical,
            ..Default::default()
        }
    }
}

/// Why [`Core::drain_node`] or [`Core::evict_queued`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRefused {
    /// The node is not one of ours.
    NotManaged,
    /// Drained or being drained already.
    Draining,
    /// The server is stopping.
    Stopping,
}

/// Room reserved by [`Core::begin_move`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// Give it back to [`Core::end_move`].
    pub ticket: u64,
    /// The node to move to.
    pub nid: u16,
    /// Pages reserved: move no more.
    pub pages: u64,
    /// Room is being made (the kernel's credit taken back): ask again
    /// shortly for the rest.
    pub more: bool,
}

/// Why [`Core::begin_move`] reserved nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveRefused {
    /// No managed node is served (none, or all drained).
    NotManaged,
    /// Not now: the books are being rebuilt, the node is evicting, the
    /// server is draining or has just started.
    NotNow,
}

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Answering upcalls and keeping the books.
    Serving,
    /// A stop signal arrived: credit revoked, (with `detach`) every page
    /// evicted and the node shown empty by a RESYNC, until `deadline`;
    /// `hurry` after a second signal.
    Draining { deadline: u64, hurry: bool },
    /// DETACH_NODE sent to the nodes shown empty; waiting for them.
    Finishing,
    /// Nothing left to do: the driver exits.
    Done,
}

/// How the core is set up.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub policy: PolicyConfig,
    /// Heat of the pages halves this often.
    pub hot_window_ns: u64,
    /// Longest drain after a stop signal.
    pub drain_timeout_ns: u64,
    /// Evict everything and detach the nodes at stop (else leave them
    /// managed, isolated and fenced, for the next server).
    pub detach_on_stop: bool,
}

/// The server's state machine.
#[derive(Debug)]
pub struct Core {
    policy: Policy,
    nodes: Vec<Node>,
    metrics: Metrics,
    hot_window_ns: u64,
    drain_timeout_ns: u64,
    detach_on_stop: bool,
    phase: Phase,
    /// Commands asked for and not yet completed.
    pending: HashMap<CmdId, Cmd>,
    /// Commands asked for and not yet taken by the driver.
    out: VecDeque<CmdId>,
    controls: HashMap<CmdId, Control>,
    next_id: u64,
    /// The next ticket of a move (see [`Core::begin_move`]).
    next_ticket: u64,
    /// Node promotions (evictions) go to.
    fast_nid: u16,
    /// Unmanaged nodes promotions may go to.
    fast_nodes: Vec<u16>,
    start: u64,
    /// No credit before this: the server before us may have left
    /// demotions in flight on credit we do not know.
    foreign_credit_until: u64,
    last_tick: u64,
    last_cool: u64,
    ready: Readiness,
    fatal: Option<String>,
    /// The kernel answered SET_STANDING `EOPNOTSUPP` (no patch 0031).
    standing_unsupported: bool,
    /// A fast node was short of memory: every write fault is asked until
    /// this time (ns).
    standing_low_until: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    Starting,
    Ready,
    Reported,
}

impl Core {
    /// A core for the managed nodes `nodes` (node id and its books), at
    /// time `now`.  Every node starts with a RESYNC.
    ///
    /// # Errors
    ///
    /// `policy.fast_nodes` names no unmanaged node.
    pub fn new(cfg: CoreConfig, nodes: Vec<(u16, NodeAccount)>, now: u64) -> Result<Self, String> {
        let mut policy = Policy::new(cfg.policy.clone(), now);
        let managed: Vec<u16> = nodes.iter().map(|(nid, _)| *nid).collect();
        for &nid in &managed {
            policy.set_managed(nid);
        }
        let nodes: Vec<Node> = nodes
            .into_iter()
            .map(|(nid, account)| Node::new(nid, account))
            .collect();
        let fast_nodes: Vec<u16> = cfg
            .policy
            .fast_nodes
            .iter()
            .copied()
            .filter(|f| !managed.contains(f))
            .collect();
        let fast_nid = *fast_nodes
            .first()
            .ok_or("policy.fast_nodes names no unmanaged node")?;
        let mut core = Self {
            policy,
            metrics: Metrics {
                resyncs: nodes.len() as u64,
                ..Metrics::default()
            },
            nodes,
            hot_window_ns: cfg.hot_window_ns,
            drain_timeout_ns: cfg.drain_timeout_ns,
            detach_on_stop: cfg.detach_on_stop,
            phase: Phase::Serving,
            pending: HashMap::new(),
            out: VecDeque::new(),
            controls: HashMap::new(),
            next_id: 0,
            next_ticket: 0,
            fast_nid,
            fast_nodes,
            start: now,
            foreign_credit_until: now + RETIRE_GRACE_NS,
            last_tick: now,
            last_cool: now,
            ready: Readiness::Starting,
            fatal: None,
            standing_unsupported: false,
            standing_low_until: 0,
        };
        for i in 0..core.nodes.len() {
            core.resync_step(i);
        }
        Ok(core)
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Nodes promotions may go to (the driver reports which are short of
    /// memory on the tick).
    pub fn fast_nodes(&self) -> &[u16] {
        &self.fast_nodes
    }

    /// Commands asked for and not completed.
    pub fn commands_in_flight(&self) -> usize {
        self.pending.len()
    }

    fn node_index(&self, nid: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.nid == nid)
    }

    fn draining(&self) -> bool {
        !matches!(self.phase, Phase::Serving)
    }

    // ---- upcalls ----------------------------------------------------

    /// The verdict for one upcall.
    pub fn upcall(&mut self, upcall: &Upcall, now: u64) -> Verdict {
        match *upcall {
            Upcall::WriteFault(_) => self.metrics.write_faults += 1,
            Upcall::HintFault { .. } => self.metrics.hint_faults += 1,
            Upcall::DemoteCredit { .. } => self.metrics.credit_requests += 1,
            Upcall::Ping { .. } => self.metrics.pings += 1,
        }
        let v = match *upcall {
            Upcall::DemoteCredit { nid, .. } => self.credit_request(upcall, nid, now),
            Upcall::WriteFault(Fault { nid, .. })
            | Upcall::HintFault {
                fault: Fault { nid, .. },
                ..
            } => {
                let acc = self
                    .nodes
                    .iter_mut()
                    .find(|n| n.nid == nid)
                    .map(|n| &mut n.account);
                self.policy.decide_with(upcall, acc, now)
            }
            Upcall::Ping { cookie } => Verdict::Pong { cookie },
        };
        if v == Verdict::Default {
            self.metrics.defaults += 1;
        }
        v
    }

    /// An upcall whose descriptor did not decode (answered DEFAULT).
    pub fn malformed(&mut self) {
        self.metrics.malformed += 1;
        self.metrics.defaults += 1;
    }

    /// A slot the kernel rejected (re-armed by the driver).
    pub fn slot_failed(&mut self) {
        self.metrics.slot_failures += 1;
    }

    /// Time to answer one upcall, as the driver measured it.
    pub fn observe_latency(&mut self, ns: u64) {
        self.metrics.latency.observe(ns);
    }

    /// Whether node `i` may be granted credit now: the one place that
    /// decides it.  Nothing is granted while the books are being rebuilt,
    /// an eviction runs, the server is draining, or the server before us
    /// may still have demotions in flight.
    fn credit_allowed(&self, i: usize, now: u64) -> bool {
        self.placement_allowed(i, now)
            && self.nodes[i]
                .moves_waiting_until
                .is_none_or(|until| now >= until)
    }

    /// Whether anything may be placed on node `i` now: credit, and the
    /// server's own moves.  Credit also waits for moves that asked the
    /// kernel's credit back.
    fn placement_allowed(&self, i: usize, now: u64) -> bool {
        let n = &self.nodes[i];
        !self.draining()
            && n.life == Life::Active
            && !n.rebuilding()
            && n.watermark == Watermark::Normal
            && now >= self.foreign_credit_until
    }

    /// A credit request: the policy sizes the grant (its chunk, its
    /// decision counters), once the core allows credit at all.
    fn credit_request(&mut self, upcall: &Upcall, nid: u16, now: u64) -> Verdict {
        let Some(i) = self.node_index(nid) else {
            return self.policy.decide_with(upcall, None, now);
        };
        let v = if self.credit_allowed(i, now) {
            self.policy
                .decide_with(upcall, Some(&mut self.nodes[i].account), now)
        } else {
            self.policy.decisions.deny += 1;
            Verdict::Deny
        };
        let n = &mut self.nodes[i];
        n.muted = v == Verdict::Deny;
        if n.muted {
            n.counters.denials += 1;
        }
        v
    }

    /// Grant up to `want` pages of credit to node `i` (0 when not allowed
    /// or there is no room; see [`NodeAccount::grant`] for the bounds).
    fn grant(&mut self, i: usize, want: u64, now: u64) -> u64 {
        if !self.credit_allowed(i, now) {
            return 0;
        }
        self.nodes[i].account.grant(want)
    }

    // ---- the server's own moves (client advice) -------------------------

    /// Reserve room on the first served managed node for moving up to
    /// `want` pages there (`Cold` advice).  Each reserved page is held at
    /// the worst case, as credit is, until [`Core::end_move`] with the
    /// returned ticket, after the move and after its events were applied.
    ///
    /// The room may be promised to the kernel as demotion credit: then
    /// the credit is taken back (`SET_CREDIT` 0; it stays reserved for the
    /// grace period of [`RETIRE_GRACE_NS`] after the command), and no
    /// credit is granted until the node's moves end or [`MOVE_WAIT_NS`]
    /// passes, once per such episode; [`Move::more`] says room is coming
    /// (ask again shortly).
    ///
    /// # Errors
    ///
    /// [`MoveRefused`]: no managed node is served, or no placement is
    /// allowed now (books being rebuilt, evicting, draining, or just
    /// started).
    pub fn begin_move(&mut self, want: u64, now: u64) -> Result<Move, MoveRefused> {
        let i = self
            .nodes
            .iter()
            .position(|n| n.life == Life::Active)
            .ok_or(MoveRefused::NotManaged)?;
        if !self.placement_allowed(i, now) {
            return Err(MoveRefused::NotNow);
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let n = &mut self.nodes[i];
        let got = n.account.reserve_moves(want);
        n.moves.push((ticket, got));
        if got < want && n.moves_waiting_until.is_none() && n.account.credit() > 0 {
            n.moves_waiting_until = Some(now + MOVE_WAIT_NS);
            n.account.retire();
            n.muted = true;
            self.set_credit(i, 0);
        }
        let n = &self.nodes[i];
        let more = got < want
            && n.moves_waiting_until.is_some_and(|t| now < t)
            && (n.account.retiring() > 0 || n.credit_busy());
        Ok(Move {
            ticket,
            nid: n.nid,
            pages: got,
            more,
        })
    }

    /// The move of `ticket` ended and every event queued until then was
    /// applied: its reservation is released.  Unknown tickets are ignored.
    pub fn end_move(&mut self, ticket: u64) {
        for n in &mut self.nodes {
            if let Some(k) = n.moves.iter().position(|&(t, _)| t == ticket) {
                let (_, pages) = n.moves.swap_remove(k);
                n.account.release_moves(pages);
                if n.moves.is_empty() {
                    n.moves_waiting_until = None;
                }
                return;
            }
        }
    }

    /// The measured compressed size of page `pfn` of managed node `nid`
    /// (see [`NodeAccount::size_of`]).
    pub fn page_size(&self, nid: u16, pfn: u64) -> Option<u32> {
        let i = self.node_index(nid)?;
        self.nodes[i].account.size_of(pfn)
    }

    // ---- operators' requests (mmctl) ----------------------------------

    fn operable(&self, nid: u16) -> Result<usize, NodeRefused> {
        let i = self.node_index(nid).ok_or(NodeRefused::NotManaged)?;
        if self.draining() {
            return Err(NodeRefused::Stopping);
        }
        if self.nodes[i].life != Life::Active {
            return Err(NodeRefused::Draining);
        }
        Ok(i)
    }

    /// Drain node `nid` while serving the others: take its credit back,
    /// evict every page, show it empty with a RESYNC, then detach it
    /// (it becomes ordinary memory).  Progress is in the snapshot.
    ///
    /// # Errors
    ///
    /// [`NodeRefused`].
    pub fn drain_node(&mut self, nid: u16, now: u64) -> Result<(), NodeRefused> {
        let i = self.operable(nid)?;
        tracing::info!(nid, "drain requested: evicting every page, then detaching");
        let n = &mut self.nodes[i];
        n.life = Life::Draining;
        n.drain_checked = false;
        n.evict_queue.clear();
        n.account.retire();
        n.muted = true;
        self.set_credit(i, 0);
        self.node_drain_step(i, now);
        Ok(())
    }

    /// The run-time policy, and node `nid`'s watermarks.
    ///
    /// # Errors
    ///
    /// [`NodeRefused::NotManaged`].
    pub fn policy_get(&self, nid: u16) -> Result<RuntimePolicy, NodeRefused> {
        let i = self.node_index(nid).ok_or(NodeRefused::NotManaged)?;
        let c = self.policy.config();
        let g = self.nodes[i].account.geometry();
        Ok(RuntimePolicy {
            writable_budget: c.writable_budget,
            hot_threshold: c.hot_threshold,
            promote_rate_limit_mbps: c.promote_rate_limit_mbps,
            credit_chunk_pages: c.credit_chunk_pages,
            hot_window_ms: (self.hot_window_ns / MS) as u32,
            nid,
            watermarks: (g.low, g.high, g.critical),
        })
    }

    /// Set the run-time policy and node `p.nid`'s watermarks, checked as
    /// the configuration file is; all or nothing.
    ///
    /// # Errors
    ///
    /// What is wrong with it, in the configuration's words.
    pub fn policy_set(&mut self, p: &RuntimePolicy, now: u64) -> Result<(), &'static str> {
        let i = self
            .node_index(p.nid)
            .ok_or("the node is not managed by this server")?;
        let (low, high, critical) = p.watermarks;
        p.to_rec().check()?;
        // The last check: nothing is changed unless it passes.
        self.nodes[i]
            .account
            .set_watermarks(low, high, critical)
            .map_err(|_| "watermarks must be 0 < low < high < critical <= 100 (percent)")?;
        self.hot_window_ns = u64::from(p.hot_window_ms) * MS;
        self.policy.reconfigure(
            PolicyConfig {
                writable_budget: p.writable_budget,
                hot_threshold: p.hot_threshold,
                promote_rate_limit_mbps: p.promote_rate_limit_mbps,
                fast_nodes: Vec::new(),
                credit_chunk_pages: p.credit_chunk_pages,
                // Kept from the configuration by `reconfigure`.
                standing_verdicts: false,
            },
            now,
        );
        tracing::info!(?p, "policy set at run time");
        self.sync_standing(now);
        Ok(())
    }

    /// Resident pages of node `nid` that arrived at least `min_age_s`
    /// seconds ago, the oldest first, at most `max` (for `mmctl evict`,
    /// which keeps those of one cgroup).
    pub fn aged_pages(&self, nid: u16, min_age_s: u32, max: usize) -> Vec<u64> {
        self.node_index(nid)
            .map(|i| self.nodes[i].account.aged(min_age_s, max))
            .unwrap_or_default()
    }

    /// Resident pages of node `nid` from `from_pfn` on, with their cost
    /// and age, about `max` of them, and where to go on
    /// ([`crate::capacity::NodeAccount::costed`]); nothing for a node not
    /// managed here.
    pub fn costed_pages(
        &self,
        nid: u16,
        from_pfn: u64,
        max: usize,
    ) -> (Vec<crate::capacity::Costed>, Option<u64>) {
        let Some(i) = self.node_index(nid) else {
            return Default::default();
        };
        let n = &self.nodes[i];
        let (mut pages, next) = n.account.costed(from_pfn, max);
        // Evictions queued or in flight, for the caller not to ask again
        // (a refused one is not pending: it may be asked for again).
        if !n.evicting.is_empty() || !n.evict_queue.is_empty() {
            let pending: HashSet<u64> = n
                .evicting
                .iter()
                .chain(n.evict_queue.iter())
                .copied()
                .collect();
            for p in &mut pages {
                p.pending = pending.contains(&p.pfn);
            }
        }
        (pages, next)
    }

    /// Whether the server still serves (no stop signal yet).
    pub fn serving(&self) -> bool {
        matches!(self.phase, Phase::Serving)
    }

    /// Queue `pfns` of node `nid` for eviction (PROMOTE_PFN to the fast
    /// node), submitted as eviction slots free up.
    ///
    /// # Errors
    ///
    /// [`NodeRefused`].
    pub fn evict_queued(&mut self, nid: u16, pfns: Vec<u64>, now: u64) -> Result<(), NodeRefused> {
        let i = self.operable(nid)?;
        self.nodes[i].evict_queue.extend(pfns);
        self.submit_queued(i, now);
        Ok(())
    }

    /// Submit queued evictions while slots are free.
    fn submit_queued(&mut self, i: usize, now: u64) {
        let n = &mut self.nodes[i];
        let room = MAX_EVICTIONS_IN_FLIGHT.saturating_sub(n.evicting.len());
        let take = room.min(n.evict_queue.len());
        let batch: Vec<u64> = n.evict_queue.drain(..take).collect();
        self.submit_evictions(i, batch, now);
    }

    /// One step of an operator's drain of node `i` (see
    /// [`Core::drain_node`]).
    fn node_drain_step(&mut self, i: usize, now: u64) {
        if self.nodes[i].life != Life::Draining || self.drain_busy(i, now) {
            return;
        }
        let n = &mut self.nodes[i];
        n.life = Life::Detaching;
        let nid = u32::from(n.nid);
        self.submit(Control::DetachNode { nid }, Cmd::Detach { node: i });
    }

    /// Drain work on node `i`: evict what is left, then ask the kernel
    /// with a RESYNC whether the node is empty.  Returns whether work is
    /// still going on (`false`: the node was shown empty).
    fn drain_busy(&mut self, i: usize, now: u64) -> bool {
        let n = &self.nodes[i];
        let in_flight = n.credit_busy();
        // A move begun before the drain may still land pages.
        if n.rebuilding() || !n.moves.is_empty() {
            return true;
        }
        if n.account.resident_pages() > 0 {
            let left = n.account.resident_sample(MAX_EVICTIONS_IN_FLIGHT, |p| {
                n.evicting.contains(&p) || n.refused.get(&p).is_some_and(|&t| t > now)
            });
            self.nodes[i].drain_checked = false;
            self.submit_evictions(i, left, now);
            true
        } else if !n.evicting.is_empty() || in_flight {
            true
        } else if !n.drain_checked {
            // The books say empty: ask the kernel.
            let n = &mut self.nodes[i];
            n.drain_checked = true;
            n.books = Books::Stale;
            self.resync_step(i);
            true
        } else {
            false
        }
    }

    // ---- events -----------------------------------------------------

    /// An event record that did not decode: it may hide a page, so every
    /// node's books are rebuilt.
    pub fn event_undecodable(&mut self) {
        for n in &mut self.nodes {
            n.make_stale();
        }
    }

    /// The time, for stamping the pages that arrive next (the tick sets
    /// it too; call this before applying a batch of events, so that a
    /// late tick does not make pages look older than they are).
    pub fn clock(&mut self, now: u64) {
        for n in &mut self.nodes {
            n.account.set_clock(now / S, 0);
        }
    }

    /// Apply one event to the books.
    pub fn event(&mut self, ev: &Event) {
        let (nid, pfn, order) = match *ev {
            Event::Placed {
                nid, pfn, order, ..
            }
            | Event::Freed { nid, pfn, order }
            | Event::Promoted {
                nid, pfn, order, ..
            } => (nid, pfn, order),
            Event::Overflow { lost } => {
                self.metrics.event_overflows += 1;
                if self.nodes.iter().any(Node::rebuilding) {
                    tracing::debug!(lost, "the kernel dropped more events");
                } else {
                    tracing::warn!(lost, "the kernel dropped events: resyncing");
                }
                for n in &mut self.nodes {
                    n.make_stale();
                }
                return;
            }
            Event::FreedRange { nid, pfn, pages } => return self.freed_range(nid, pfn, pages),
            Event::Ping { .. } => return,
        };
        let Some(i) = self.node_index(nid) else {
            return;
        };
        let pages = 1u64 << order.min(20);
        let n = &mut self.nodes[i];
        let resyncing = n.rebuilding();
        let r = match *ev {
            Event::Placed { reason, .. } => {
                // PLACED comes once per mapping: the second mapping of a
                // shared folio reports it again.
                if n.account.all_resident(pfn, order) {
                    n.counters.duplicate_placed += pages;
                    return;
                }
                let credited = reason == PlaceReason::Demotion;
                let r = n.account.placed(pfn, order, credited);
                if r.is_ok() {
                    if credited {
                        n.counters.demoted += pages;
                    } else {
                        n.counters.placed_other += pages;
                    }
                    n.drain_checked = false;
                }
                r
            }
            Event::Freed { .. } => {
                let r = n.account.left(pfn, order);
                if r.is_ok() {
                    n.counters.freed += pages;
                }
                r
            }
            _ => {
                let r = n.account.left(pfn, order);
                if r.is_ok() {
                    n.counters.promoted += pages;
                }
                r
            }
        };
        match r {
            Ok(()) => {}
            // A FREED or PROMOTED page the books do not hold: the free that
            // follows every promotion (the page already left with
            // PROMOTED), or the target of a demotion that failed after its
            // page was allocated (no PLACED).
            Err(AccountError::NotResident { .. }) => n.counters.unknown_frees += pages,
            // While a RESYNC runs, events race with its reports.
            Err(_) if resyncing => {}
            // A folio partly in the books, or a pfn outside the node as
            // ATTACH_NODE reported it: the books are wrong.
            Err(e) => {
                n.counters.disagreements += 1;
                n.make_stale();
                tracing::warn!(nid, "event disagrees with the books ({e}): resyncing");
            }
        }
    }

    /// Frees the kernel folded into one record: each base page leaves
    /// the books (those the books do not hold are counted, as for a
    /// `FREED` folio).
    fn freed_range(&mut self, nid: u16, pfn: u64, pages: u64) {
        let Some(i) = self.node_index(nid) else {
            return;
        };
        let n = &mut self.nodes[i];
        let end = pfn.saturating_add(pages);
        if pfn < n.account.start_pfn() || end > n.end_pfn() {
            n.counters.disagreements += 1;
            n.make_stale();
            tracing::warn!(nid, pfn, pages, "FREED range outside the node: resyncing");
            return;
        }
        for p in pfn..end {
            match n.account.left(p, 0) {
                Ok(()) => n.counters.freed += 1,
                Err(_) => n.counters.unknown_frees += 1,
            }
        }
    }

    /// Every event queued so far was applied: RESYNCs go on (a RESYNC
    /// whose last chunk completed has all its reports in the books now),
    /// the drain takes its next step, and the invariant is sampled.
    pub fn events_applied(&mut self, now: u64) {
        for i in 0..self.nodes.len() {
            self.resync_step(i);
            self.sample(i);
        }
        if let Phase::Draining { .. } = self.phase {
            self.drain_step(now);
        } else {
            for i in 0..self.nodes.len() {
                self.node_drain_step(i, now);
            }
        }
    }

    /// Keep the high-water mark of committed bytes and count breaches of
    /// capacity (only settled books are judged: pages a RESYNC reports
    /// cost the worst case until measured).
    fn sample(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if !n.settled() {
            return;
        }
        let (committed, cap) = (n.account.committed(), n.account.geometry().capacity);
        let c = &mut n.counters;
        c.max_committed = c.max_committed.max(committed);
        if committed > cap {
            c.over_capacity += 1;
        }
    }

    // ---- measurement ------------------------------------------------

    /// The next page to measure: `(node index, pfn)`.  Read it through
    /// the node mapping and report its size with [`Core::measured`].  The
    /// backlog is the pages the books hold as unmeasured (no queue: a
    /// RESYNC of a 1 TiB node reports 268 M pages).
    pub fn pop_measure(&mut self) -> Option<(usize, u64)> {
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if let Some(pfn) = n.account.next_unmeasured() {
                return Some((i, pfn));
            }
            if n.books == (Books::Live { settling: true }) {
                n.books = Books::Live { settling: false };
            }
        }
        None
    }

    /// Pages waiting to be measured, over all nodes.
    pub fn measure_backlog(&self) -> u64 {
        self.nodes.iter().map(|n| n.account.unmeasured()).sum()
    }

    /// The compressed size of page `pfn` of node `i`.  `None`: the page
    /// could not be read; it is booked at the worst case (as measured, so
    /// that it is not asked for again until it is placed anew).
    pub fn measured(&mut self, i: usize, pfn: u64, bytes: Option<u32>) {
        let Some(n) = self.nodes.get_mut(i) else {
            return;
        };
        let worst = n.account.geometry().worst_case();
        if n.account.state(pfn) == Some(PageState::Unmeasured)
            && n.account.measured(pfn, bytes.unwrap_or(worst)).is_ok()
        {
            n.counters.measured += 1;
        }
    }

    // ---- control commands -------------------------------------------

    fn submit(&mut self, ctrl: Control, why: Cmd) {
        let id = CmdId(self.next_id);
        self.next_id += 1;
        self.pending.insert(id, why);
        self.controls.insert(id, ctrl);
        self.out.push_back(id);
    }

    /// The next control command to send.
    pub fn poll_command(&mut self) -> Option<(CmdId, Control)> {
        let id = self.out.pop_front()?;
        let c = self.controls.remove(&id)?;
        Some((id, c))
    }

    /// Command `id` ended with `r` (the CQE result: >= 0, or `-errno`).
    pub fn completed(&mut self, id: CmdId, r: i32, now: u64) {
        let Some(op) = self.pending.remove(&id) else {
            return;
        };
        match op {
            Cmd::Resync { node } => self.resync_done(node, r),
            Cmd::SetCredit { node, pages } => {
                let n = &mut self.nodes[node];
                let next = match n.credit_cmd {
                    CreditCmd::Setting { next } => next,
                    CreditCmd::Idle => None,
                };
                n.credit_cmd = CreditCmd::Idle;
                if r < 0 {
                    // The kernel kept its previous credit, which the books
                    // still reserve as retiring: keep it reserved (no
                    // release) and let a RESYNC set things straight.
                    n.release_retired_at = None;
                    n.make_stale();
                    tracing::error!(nid = n.nid, pages, "SET_CREDIT failed: errno {}", -r);
                } else {
                    n.release_retired_at = Some(now + RETIRE_GRACE_NS);
                }
                if let Some(next) = next {
                    self.set_credit(node, next);
                }
            }
            Cmd::Evict { node, pfn } => {
                let draining = self.draining();
                let n = &mut self.nodes[node];
                n.evicting.remove(&pfn);
                if r >= 0 {
                    n.counters.evictions += 1;
                    n.refused.remove(&pfn);
                } else {
                    n.counters.evictions_failed += 1;
                    // ENOENT: no anonymous folio there now (freed or
                    // promoted meanwhile: its event is on the way); EBUSY,
                    // EAGAIN, ENOMEM, EINVAL: the migration failed (busy,
                    // pinned, no room).  Leave the pfn alone for a while.
                    // Draining needs exact books: there, ENOENT resyncs.
                    if draining && r == -ENOENT {
                        n.make_stale();
                    }
                    let wait = if draining {
                        DRAIN_BACKOFF_NS
                    } else {
                        EVICT_BACKOFF_NS
                    };
                    n.refused.insert(pfn, now + wait);
                    tracing::debug!(nid = n.nid, pfn, "PROMOTE_PFN: errno {}", -r);
                }
            }
            Cmd::SetStanding { node, standing } => {
                let n = &mut self.nodes[node];
                n.standing_sending = false;
                if r >= 0 {
                    // After DETACH_NODE completed (commands complete in
                    // any order), the kernel has none.
                    if n.life != Life::Detached {
                        n.standing = standing;
                        tracing::info!(nid = n.nid, ?standing, "standing verdict for write faults");
                    }
                } else if r == -libc::EOPNOTSUPP {
                    self.standing_unsupported = true;
                    tracing::info!(
                        "the kernel has no SET_STANDING (patch 0031): every write fault is \
                         asked"
                    );
                } else {
                    n.standing_retry_at = now + STANDING_RETRY_NS;
                    tracing::warn!(nid = n.nid, ?standing, "SET_STANDING failed: errno {}", -r);
                }
                // The policy may have changed while it was in flight.
                self.sync_standing(now);
            }
            Cmd::Detach { node } => {
                let n = &mut self.nodes[node];
                let nid = n.nid;
                if r >= 0 {
                    tracing::info!(nid, "node empty (RESYNC reports no page): detached");
                    n.life = Life::Detached;
                    // DETACH_NODE cleared it in the kernel.
                    n.standing = Standing::Ask;
                } else {
                    tracing::error!(nid, "DETACH_NODE failed: errno {}", -r);
                    if n.life == Life::Detaching {
                        // Still managed: serve it again.
                        n.life = Life::Active;
                    }
                }
            }
        }
        if self.phase == Phase::Finishing && self.pending.is_empty() {
            self.phase = Phase::Done;
        }
    }

    fn resync_done(&mut self, i: usize, r: i32) {
        let end = self.nodes[i].end_pfn();
        let n = &mut self.nodes[i];
        let Books::Rebuilding { at, again, .. } = n.books else {
            return;
        };
        if r > 0 {
            // Done when the next chunk would start past the end; the books
            // are final once this turn's events are in (resync_step).
            n.resync_failures = 0;
            n.books = Books::Rebuilding {
                at: (at + r as u64).min(end),
                in_flight: false,
                again,
            };
        } else if r == -EAGAIN || r == -EINTR {
            n.books = Books::Rebuilding {
                at,
                in_flight: false,
                again,
            };
        } else {
            n.resync_failures += 1;
            tracing::error!(nid = n.nid, at, "RESYNC failed: errno {}", -r);
            if n.resync_failures >= MAX_RESYNC_FAILURES {
                self.fatal = Some(format!(
                    "RESYNC of node {} failed {MAX_RESYNC_FAILURES} times (errno {}): \
                     the books cannot be rebuilt",
                    n.nid, -r
                ));
            }
            n.books = Books::Stale;
        }
    }

    /// Start, continue or finish a RESYNC of node `i`.
    fn resync_step(&mut self, i: usize) {
        if self.nodes[i].gone() {
            return;
        }
        if self.nodes[i].books == Books::Stale {
            // Forget the books, take back the credit, and ask for every
            // page again.
            let n = &mut self.nodes[i];
            n.forget();
            n.account.retire();
            n.muted = true;
            self.set_credit(i, 0);
            self.metrics.resyncs += 1;
        }
        let end = self.nodes[i].end_pfn();
        let n = &mut self.nodes[i];
        let Books::Rebuilding {
            at,
            in_flight: false,
            again,
        } = n.books
        else {
            return;
        };
        if at >= end {
            if again {
                n.books = Books::Stale;
                return self.resync_step(i);
            }
            n.books = Books::Live { settling: true };
            tracing::info!(
                nid = n.nid,
                resident = n.account.resident_pages(),
                "books rebuilt"
            );
            return;
        }
        n.books = Books::Rebuilding {
            at,
            in_flight: true,
            again,
        };
        let ctrl = Control::Resync {
            nid: u32::from(n.nid),
            start_pfn: at,
            nr_pages: (end - at).min(MAX_RESYNC_PAGES),
        };
        self.submit(ctrl, Cmd::Resync { node: i });
    }

    /// Bring each node's standing verdict in the kernel to what the
    /// policy gives now ([`Policy::standing`]), one SET_STANDING at a
    /// time per node.
    fn sync_standing(&mut self, now: u64) {
        // At the end the nodes are detached (which clears it) or left for
        // the next server (whose ATTACH clears it): nothing more to send.
        if self.standing_unsupported || matches!(self.phase, Phase::Finishing | Phase::Done) {
            return;
        }
        let want = if now < self.standing_low_until {
            Standing::Ask
        } else {
            self.policy.standing()
        };
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            if n.gone() || n.standing_sending || n.standing == want || now < n.standing_retry_at {
                continue;
            }
            n.standing_sending = true;
            let nid = u32::from(n.nid);
            self.submit(
                Control::SetStanding {
                    nid,
                    standing: want,
                },
                Cmd::SetStanding {
                    node: i,
                    standing: want,
                },
            );
        }
    }

    /// SET_CREDIT, one at a time per node.
    fn set_credit(&mut self, i: usize, pages: u64) {
        let n = &mut self.nodes[i];
        if n.gone() {
            // The kernel would refuse it (ENOENT): the node is not managed.
            return;
        }
        if let CreditCmd::Setting { next } = &mut n.credit_cmd {
            *next = Some(pages);
            return;
        }
        n.credit_cmd = CreditCmd::Setting { next: None };
        let nid = u32::from(n.nid);
        self.metrics.credit_set_pages += pages;
        self.submit(
            Control::SetCredit { nid, pages },
            Cmd::SetCredit { node: i, pages },
        );
    }

    // ---- the tick -----------------------------------------------------

    /// Whether [`Core::tick`] is due.
    pub fn tick_due(&self, now: u64) -> bool {
        now.saturating_sub(self.last_tick) >= TICK_NS
    }

    /// How long the driver may sleep before the next tick.
    pub fn wait_ns(&self, now: u64) -> u64 {
        if self.measure_backlog() > 0 {
            return 0;
        }
        TICK_NS.saturating_sub(now.saturating_sub(self.last_tick))
    }

    /// Watermarks, credit, cooling.  `low_on_memory`: the fast nodes
    /// short of free memory now.
    pub fn tick(&mut self, now: u64, low_on_memory: Vec<u16>) {
        self.last_tick = now;
        for i in 0..self.nodes.len() {
            self.tick_node(i, now);
        }
        if !low_on_memory.is_empty() {
            self.standing_low_until = now + STANDING_CALM_NS;
        }
        self.policy.set_low_on_memory(low_on_memory);
        self.sync_standing(now);
        if now.saturating_sub(self.last_cool) >= self.hot_window_ns {
            self.last_cool = now;
            for n in &mut self.nodes {
                n.account.cool();
            }
        }
        if self.ready == Readiness::Starting
            && now >= self.foreign_credit_until
            && self.nodes.iter().all(|n| !n.rebuilding())
        {
            self.ready = Readiness::Ready;
        }
    }

    fn tick_node(&mut self, i: usize, now: u64) {
        let n = &mut self.nodes[i];
        // Every block within MAX_AGE_S (40,960 ticks), with room to spare:
        // four blocks a tick sweep a 1 TiB node in 820 s.
        let blocks = n
            .account
            .nr_pages()
            .div_ceil(BLOCK_PAGES)
            .div_ceil(20_000)
            .max(4);
        n.account.set_clock(now / S, blocks);
        match n.life {
            Life::Active => {}
            Life::Draining => return self.node_drain_step(i, now),
            Life::Detaching | Life::Detached => return,
        }
        if !n.evict_queue.is_empty() && !n.rebuilding() {
            self.submit_queued(i, now);
        }
        let n = &mut self.nodes[i];
        if let Some(at) = n.release_retired_at
            && now >= at
            && !n.credit_busy()
        {
            n.release_retired_at = None;
            n.account.release_retired();
        }
        self.resync_step(i);
        let n = &mut self.nodes[i];
        if n.rebuilding() {
            return;
        }
        let level = n.account.level();
        if level == Level::Critical && n.account.credit() > 0 {
            // Take back every page of credit: the kernel may not place
            // another page until we are below high again.
            n.account.retire();
            n.muted = true;
            tracing::warn!(nid = n.nid, "critical watermark: credit revoked");
            self.set_credit(i, 0);
        }
        // Above high, evict; once started, go on down to low (no credit
        // is granted meanwhile), so that the node does not hover at high,
        // evicting and refilling.
        let n = &self.nodes[i];
        if level >= Level::High || (n.watermark == Watermark::Evicting && n.account.above_low()) {
            self.evict(i, now);
            return;
        }
        let n = &mut self.nodes[i];
        if n.watermark == Watermark::Evicting {
            n.watermark = Watermark::Normal;
            tracing::info!(
                nid = n.nid,
                used_mib = n.account.used() >> 20,
                evictions = n.counters.evictions,
                "below the low watermark: eviction done, credit again"
            );
        }
        if n.muted && !self.draining() {
            self.regrant(i, now);
        }
    }

    /// Grant credit again after a DENY, once the node has room: SET_CREDIT
    /// to what fits.  The kernel's leftover credit is replaced, so the
    /// books retire theirs (still reserved for a grace period).
    fn regrant(&mut self, i: usize, now: u64) {
        if !self.credit_allowed(i, now) {
            return;
        }
        let want = self.nodes[i].account.nr_pages() as u64;
        let old = self.nodes[i].account.retire();
        let g = self.grant(i, want, now);
        if g == 0 {
            // No room: make sure the kernel holds nothing either.
            if old > 0 {
                self.set_credit(i, 0);
            }
            return;
        }
        self.nodes[i].muted = false;
        self.set_credit(i, g);
    }

    /// Evict the costliest pages down to the low watermark.  While pages
    /// wait to be measured, wait up to [`EVICT_PATIENCE_NS`]: they are
    /// charged the worst case and may turn out cheap.  No credit is
    /// granted meanwhile.
    fn evict(&mut self, i: usize, now: u64) {
        let n = &mut self.nodes[i];
        if !n.evicting.is_empty() {
            return;
        }
        if n.account.unmeasured() == 0 {
            n.evict_waiting_since = None;
        } else {
            let since = *n.evict_waiting_since.get_or_insert(now);
            if now - since < EVICT_PATIENCE_NS {
                return;
            }
        }
        let plan = n.account.plan_to_low_limited(MAX_EVICTIONS_IN_FLIGHT, |p| {
            n.refused.get(&p).is_some_and(|&until| until > now)
        });
        if !plan.is_empty() && n.watermark == Watermark::Normal {
            n.watermark = Watermark::Evicting;
            n.counters.high_episodes += 1;
            tracing::info!(
                nid = n.nid,
                used_mib = n.account.used() >> 20,
                projected_mib = n.account.projected() >> 20,
                pages = plan.len(),
                "above the high watermark: evicting down to the low watermark"
            );
        }
        self.submit_evictions(i, plan, now);
    }

    fn submit_evictions(&mut self, i: usize, pfns: impl IntoIterator<Item = u64>, now: u64) {
        let nid = u32::from(self.fast_nid);
        self.nodes[i].refused.retain(|_, until| *until > now);
        for pfn in pfns {
            let n = &mut self.nodes[i];
            if n.evicting.len() >= MAX_EVICTIONS_IN_FLIGHT {
                break;
            }
            if n.refused.contains_key(&pfn) || !n.evicting.insert(pfn) {
                continue;
            }
            self.submit(
                Control::PromotePfn { pfn, nid },
                Cmd::Evict { node: i, pfn },
            );
        }
    }

    // ---- stopping -----------------------------------------------------

    /// `count` stop signals (SIGINT/SIGTERM) arrived: the first starts
    /// the drain, a second (or two at once) cuts it short.
    pub fn signal(&mut self, count: u64, now: u64) {
        match self.phase {
            Phase::Serving => {
                tracing::info!("signal received: draining");
                self.phase = Phase::Draining {
                    deadline: now + self.drain_timeout_ns,
                    hurry: count >= 2,
                };
                for i in 0..self.nodes.len() {
                    self.nodes[i].account.retire();
                    self.nodes[i].muted = true;
                    self.set_credit(i, 0);
                }
                self.drain_step(now);
            }
            Phase::Draining { deadline, .. } => {
                tracing::warn!("second signal: drain cut short");
                self.phase = Phase::Draining {
                    deadline,
                    hurry: true,
                };
                self.drain_step(now);
            }
            Phase::Finishing | Phase::Done => {}
        }
    }

    /// Leave the nodes managed at stop, whatever the configuration says
    /// (SIGUSR2: a restart, whose next server adopts them).  Before the
    /// drain has begun only: a drain under way finishes as it started.
    pub fn keep_nodes_on_stop(&mut self) {
        if !matches!(self.phase, Phase::Draining { .. }) {
            self.detach_on_stop = false;
        }
    }

    /// One step of the drain: evict what is left, show the node empty
    /// with a RESYNC, then detach (or leave the node managed).
    fn drain_step(&mut self, now: u64) {
        let Phase::Draining { deadline, hurry } = self.phase else {
            return;
        };
        let detach = self.detach_on_stop;
        let mut busy = false;
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            match n.life {
                Life::Detached => continue,
                // DETACH_NODE in flight.
                Life::Detaching => {
                    busy = true;
                    continue;
                }
                Life::Active | Life::Draining => {}
            }
            if !detach {
                busy |= n.rebuilding() || n.credit_busy();
                continue;
            }
            busy |= self.drain_busy(i, now);
        }
        if busy && !hurry && now < deadline {
            return;
        }
        if busy && !hurry {
            tracing::warn!("drain timeout reached");
        }
        self.phase = Phase::Finishing;
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            if matches!(n.life, Life::Detached | Life::Detaching) {
                continue;
            }
            let resident = n.account.resident_pages();
            if !detach {
                tracing::info!(
                    nid = n.nid,
                    resident,
                    "left managed (isolated and fenced) for the next server to adopt"
                );
                continue;
            }
            if n.rebuilding() || !n.drain_checked || resident > 0 {
                // Detaching a node with pages on it would let them be
                // written in place, and makes it ordinary memory.
                tracing::warn!(
                    nid = n.nid,
                    resident,
                    "node not shown empty: left managed (isolated and fenced) \
                     for the next server to adopt"
                );
                continue;
            }
            let nid = u32::from(n.nid);
            self.nodes[i].life = Life::Detaching;
            self.submit(Control::DetachNode { nid }, Cmd::Detach { node: i });
        }
        if !self
            .pending
            .values()
            .any(|c| matches!(c, Cmd::Detach { .. }))
        {
            self.phase = Phase::Done;
        }
    }

    // ---- outputs ------------------------------------------------------

    /// `true` once, when every node's books were rebuilt and the server
    /// serves (the driver tells systemd).
    pub fn take_ready(&mut self) -> bool {
        if self.ready == Readiness::Ready {
            self.ready = Readiness::Reported;
            return true;
        }
        false
    }

    /// Why the server must stop with an error, once.
    pub fn take_fatal(&mut self) -> Option<String> {
        self.fatal.take()
    }

    /// The metrics, for the admin socket.
    pub fn snapshot(&self, now: u64) -> Snapshot {
        Snapshot {
            metrics: self.metrics.clone(),
            decisions: self.policy.decisions.clone(),
            nodes: self
                .nodes
                .iter()
                .map(|n| {
                    let mut c = n.counters.clone();
                    c.measure_backlog = n.account.unmeasured();
                    let mut g = NodeGauges::of(n.nid, &n.account);
                    g.state = match n.life {
                        Life::Active => 0,
                        Life::Draining => 1,
                        Life::Detaching => 2,
                        Life::Detached => 3,
                    };
                    g.standing = match n.standing {
                        Standing::Ask => 0,
                        Standing::Default | Standing::Promote(_) => 1,
                    };
                    (g, c)
                })
                .collect(),
            uptime_s: now.saturating_sub(self.start) as f64 / 1e9,
        }
    }
}
