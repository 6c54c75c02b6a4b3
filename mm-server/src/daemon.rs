//! The daemon: one io_uring event loop that answers upcalls, keeps the
//! books of every managed node from the kernel's events, measures what
//! each resident page really costs, and keeps the device under its
//! watermarks.
//!
//! One thread, one queue.  The loop sleeps in the ring
//! ([`Transport::wait_timeout`]) and wakes for an upcall, a control
//! command's completion, the signal eventfd, or the tick.  Each turn:
//!
//! 1. answer every upcall with the [`Policy`]'s verdict (nothing on that
//!    path blocks or allocates per upcall beyond the batch vector);
//! 2. read the events: `PLACED` charges the page at the worst case and
//!    queues it for measurement, `PROMOTED`/`FREED` release it, `OVERFLOW`
//!    (lost events) or a disagreement starts a `RESYNC`;
//! 3. measure queued pages through the read-only node mapping (LZ4), a
//!    few milliseconds per turn;
//! 4. on the tick: watermarks (above high: evict with `PROMOTE_PFN`, the
//!    costliest pages first, down to low; above critical: revoke all
//!    credit), re-grant credit the kernel was denied once there is room,
//!    cool page heat, publish a metrics snapshot.
//!
//! Control commands (`RESYNC` chunks, `SET_CREDIT`, `PROMOTE_PFN`) are
//! submitted asynchronously and finish in step 1 of a later turn, so a
//! long `RESYNC` never stops the verdicts.
//!
//! SIGINT/SIGTERM (through `ctrlc` and an eventfd the ring watches) start a
//! drain: credit is revoked, credit requests are denied, the node's pages
//! are evicted (for at most `drain_timeout_ms`), the node is detached if it
//! is empty (else left managed, isolated and fenced, for the next server),
//! and the process exits 0.  Upcalls are answered throughout.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use mm_upcall_kernel::proto::control::{Control, decode_node_info};
use mm_upcall_kernel::proto::event::{Event, PlaceReason};
use mm_upcall_kernel::proto::raw::{self, NodeInfo};
use mm_upcall_kernel::proto::upcall::Upcall;
use mm_upcall_kernel::proto::verdict::Verdict;
use mm_upcall_kernel::{Completion, ControlOutcome, NodeMap, PAGE_SIZE, Transport};

use crate::capacity::{self, AccountError, Level, NodeAccount, PageState};
use crate::config::Config;
use crate::metrics::{Metrics, NodeCounters, NodeGauges, Snapshot};
use crate::policy::Policy;

/// Features the daemon needs from the kernel.
pub const FEATURES: u64 = raw::features::WRITE_FAULT
    | raw::features::HINT_FAULT
    | raw::features::DEMOTE_CREDIT
    | raw::features::EVENTS
    | raw::features::NODE_MMAP;

/// Period of the watermark / credit / metrics work.
const TICK: Duration = Duration::from_millis(50);
/// Longest measuring slice per turn.
const MEASURE_SLICE: Duration = Duration::from_millis(3);
/// `PROMOTE_PFN` commands in flight at once.
const MAX_EVICTIONS_IN_FLIGHT: usize = 128;
/// Token of the signal eventfd's watch.
const STOP_TOKEN: u32 = 0;
/// How long credit taken back by SET_CREDIT stays reserved after the
/// command completed: demotions that allocated their target before it ran
/// report PLACED within this time.
const RETIRE_GRACE: Duration = Duration::from_secs(1);
/// How long eviction waits for the measurement backlog.
const EVICT_PATIENCE: Duration = Duration::from_secs(1);
/// How long a pfn the kernel would not evict is left alone.
const EVICT_BACKOFF: Duration = Duration::from_secs(5);
/// Largest RESYNC range per command (the kernel's count is an `int`).
const MAX_RESYNC_PAGES: u64 = i32::MAX as u64;

/// Why a control command was sent.
#[derive(Debug, Clone, Copy)]
enum Ctrl {
    Resync { node: usize },
    SetCredit { node: usize, pages: u64 },
    Evict { node: usize, pfn: u64 },
}

/// One managed node.
struct Managed {
    nid: u16,
    info: NodeInfo,
    map: NodeMap,
    counters: NodeCounters,
    /// Pages placed and not measured yet.
    to_measure: VecDeque<u64>,
    /// The kernel got DENY (or had its credit revoked) and asks no more:
    /// grant again with SET_CREDIT when there is room.
    muted: bool,
    /// Next pfn a RESYNC covers; `None` when no RESYNC is running.
    resync_at: Option<u64>,
    resync_in_flight: bool,
    /// RESYNC commands that failed in a row.
    resync_failures: u32,
    /// Since the last RESYNC began, until its pages are all measured.
    settling: bool,
    /// A RESYNC must start (lost events, or the books disagreed).
    stale: bool,
    /// Pfns with a PROMOTE_PFN in flight.
    evicting: HashSet<u64>,
    /// Pfns the kernel would not evict, and when to try them again.
    refused: HashMap<u64, Instant>,
    /// A SET_CREDIT is in flight; at most one is, so that they apply in
    /// order (the kernel may run control commands from io-wq workers).
    credit_in_flight: bool,
    /// The credit to set once the one in flight completes.
    credit_next: Option<u64>,
    /// When the retiring credit may be released.
    release_retired_at: Option<Instant>,
    /// Drain: a RESYNC has been started to show the node empty.
    drain_checked: bool,
    /// Since when an eviction has waited for the measurement backlog.
    evict_waiting_since: Option<Instant>,
    /// Evictions are under way (for logging the start and end only).
    evicting_episode: bool,
}

impl Managed {
    fn end_pfn(&self) -> u64 {
        self.info.start_pfn + self.info.spanned_pages
    }
}

/// The running server.
pub struct Daemon {
    t: Transport,
    policy: Policy,
    nodes: Vec<Managed>,
    metrics: Metrics,
    snapshot: Arc<Mutex<Snapshot>>,
    stop_fd: OwnedFd,
    ctrl: HashMap<usize, Ctrl>,
    fast_nid: u16,
    /// Unmanaged nodes promotions may go to (checked for free memory).
    fast_nodes: Vec<u16>,
    epoch: Instant,
    last_tick: Instant,
    last_cool: Instant,
    hot_window: Duration,
    draining: bool,
    /// A second signal arrived: cut the drain short.
    hurry: bool,
    /// Why the loop must stop with an error.
    fatal: Option<String>,
    ready_sent: bool,
    page: Box<[u8; PAGE_SIZE]>,
}

fn errno_of(out: &ControlOutcome) -> i32 {
    match &out.result {
        Ok(v) => *v,
        Err(e) => e.errno(),
    }
}

fn os_error(errno: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(-errno)
}

/// Open the device, retrying while a previous server is still going away.
fn open(cfg: &Config) -> Result<Transport> {
    let tcfg = mm_upcall_kernel::Config {
        path: cfg.server.device.display().to_string(),
        nr_queues: 1,
        queue_depth: cfg.server.queue_depth,
        timeout_ms: cfg.server.timeout_ms,
        features: FEATURES,
        required: FEATURES,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Transport::open(&tcfg) {
            Ok(t) => return Ok(t),
            Err(e) if e.errno() == -libc::EBUSY && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) if e.errno() == -libc::EBUSY => {
                return Err(e)
                    .context(format!("another server holds {}: stop it first", tcfg.path));
            }
            Err(mm_upcall_kernel::Error::Features { missing }) => bail!(
                "the kernel lacks features {missing:#x} that mm-server needs: \
                 boot a kernel with the whole kernel-upcall series (patches 0001-0012)"
            ),
            Err(e) => return Err(e).context(format!("cannot open {}", tcfg.path)),
        }
    }
}

/// The nodes among `nids` whose free memory is under 2 % of their total
/// (`/sys/devices/system/node/node<N>/meminfo`); unreadable ones are not
/// reported short.
fn low_on_memory(nids: &[u16]) -> Vec<u16> {
    let kb = |text: &str, key: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.split_whitespace().nth(2) == Some(key))?
            .split_whitespace()
            .nth(3)?
            .parse()
            .ok()
    };
    nids.iter()
        .copied()
        .filter(|n| {
            let path = format!("/sys/devices/system/node/node{n}/meminfo");
            let Ok(text) = std::fs::read_to_string(path) else {
                return false;
            };
            matches!(
                (kb(&text, "MemFree:"), kb(&text, "MemTotal:")),
                (Some(free), Some(total)) if free * 50 < total
            )
        })
        .collect()
}

fn attach(t: &mut Transport, nid: u16) -> Result<NodeInfo> {
    let out = t.control_sync(Control::AttachNode {
        nid: u32::from(nid),
        credit_pages: 0,
        reply_addr: 0,
    })?;
    match errno_of(&out) {
        0.. => Ok(decode_node_info(&out.reply)?),
        e if e == -libc::ENXIO => bail!(
            "ATTACH_NODE {nid}: node {nid} does not exist, is offline or has no memory; \
             fix `nid` in [[node]]"
        ),
        e if e == -libc::EINVAL => {
            bail!("ATTACH_NODE {nid}: node {nid} has CPUs; a managed node must be memory-only")
        }
        e if e == -libc::EEXIST => bail!("ATTACH_NODE {nid}: node {nid} is attached already"),
        e => Err(os_error(e)).context(format!("ATTACH_NODE {nid}")),
    }
}

impl Daemon {
    /// Open the device, attach and map every configured node, and start
    /// rebuilding their books with RESYNC.  `stop_fd` is the eventfd the
    /// signal handler writes.
    ///
    /// # Errors
    ///
    /// Opening the device, attaching or mapping a node; each error says
    /// what to fix.
    pub fn start(cfg: &Config, stop_fd: OwnedFd, snapshot: Arc<Mutex<Snapshot>>) -> Result<Self> {
        let mut t = open(cfg)?;
        let policy_cfg = cfg.policy();
        let epoch = Instant::now();
        let mut policy = Policy::new(policy_cfg.clone(), 0);
        let mut nodes = Vec::new();
        for n in &cfg.node {
            let info = attach(&mut t, n.nid)?;
            let map = t
                .map_node(&info)
                .with_context(|| format!("node {}", n.nid))?;
            let pages = usize::try_from(info.spanned_pages).context("node size")?;
            let account = NodeAccount::new(n.geometry(), info.start_pfn, pages)
                .with_context(|| format!("[[node]] nid {}", n.nid))?;
            tracing::info!(
                nid = n.nid,
                start_pfn = format_args!("{:#x}", info.start_pfn),
                pages = info.spanned_pages,
                capacity_mib = n.capacity_mib,
                "attached"
            );
            policy.add_node(n.nid, account);
            nodes.push(Managed {
                nid: n.nid,
                info,
                map,
                counters: NodeCounters::default(),
                to_measure: VecDeque::new(),
                muted: true,
                resync_at: Some(info.start_pfn),
                resync_in_flight: false,
                resync_failures: 0,
                settling: true,
                stale: false,
                evicting: HashSet::new(),
                refused: HashMap::new(),
                credit_in_flight: false,
                credit_next: None,
                release_retired_at: None,
                drain_checked: false,
                evict_waiting_since: None,
                evicting_episode: false,
            });
        }
        let fast_nid = policy_cfg
            .fast_nodes
            .iter()
            .copied()
            .find(|&f| policy.node(f).is_none())
            .context("policy.fast_nodes names no unmanaged node")?;
        t.watch(stop_fd.as_fd(), STOP_TOKEN)?;
        Ok(Self {
            t,
            policy,
            nodes,
            metrics: Metrics {
                // Every node starts with a RESYNC (it may hold pages from a
                // server before us).
                resyncs: cfg.node.len() as u64,
                ..Metrics::default()
            },
            snapshot,
            stop_fd,
            ctrl: HashMap::new(),
            fast_nid,
            fast_nodes: policy_cfg
                .fast_nodes
                .iter()
                .copied()
                .filter(|&f| cfg.node.iter().all(|n| n.nid != f))
                .collect(),
            epoch,
            last_tick: epoch,
            last_cool: epoch,
            hot_window: Duration::from_millis(u64::from(cfg.policy.hot_window_ms)),
            draining: false,
            hurry: false,
            fatal: None,
            ready_sent: false,
            page: Box::new([0u8; PAGE_SIZE]),
        })
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn account(&mut self, i: usize) -> &mut NodeAccount {
        let nid = self.nodes[i].nid;
        self.policy
            .node_mut(nid)
            .expect("every Managed node has an account")
    }

    fn account_ref(&self, i: usize) -> &NodeAccount {
        self.policy
            .node(self.nodes[i].nid)
            .expect("every Managed node has an account")
    }

    fn node_index(&self, nid: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.nid == nid)
    }

    /// Serve until a signal; then drain and detach.
    ///
    /// # Errors
    ///
    /// The transport failed or the kernel tore the server down.
    pub fn run(&mut self, drain_timeout: Duration, detach: bool) -> Result<()> {
        let mut stop = false;
        while !stop {
            let idle = self.nodes.iter().all(|n| n.to_measure.is_empty());
            stop = self.turn(if idle { TICK } else { Duration::ZERO })?;
        }
        tracing::info!("signal received: draining");
        self.drain(drain_timeout, detach)
    }

    /// One turn of the loop; `true` when a stop signal arrived.
    fn turn(&mut self, timeout: Duration) -> Result<bool> {
        let mut batch = Vec::new();
        self.t.wait_timeout(&mut batch, timeout)?;
        let mut stop = false;
        for c in batch {
            stop |= self.complete(c)?;
        }
        self.t.flush()?;
        self.events()?;
        // RESYNC goes as fast as its events are read, not at the tick.
        for i in 0..self.nodes.len() {
            if self.nodes[i].resync_at.is_some() {
                self.resync_step(i)?;
            }
        }
        if let Some(why) = self.fatal.take() {
            bail!(why);
        }
        self.measure();
        if self.last_tick.elapsed() >= TICK {
            self.last_tick = Instant::now();
            self.tick()?;
        } else {
            self.publish();
        }
        Ok(stop)
    }

    fn complete(&mut self, c: Completion) -> Result<bool> {
        match c {
            Completion::Upcall { slot, request } => {
                let t0 = Instant::now();
                let v = self.decide(&request.upcall);
                self.t.commit(slot, request.seq, v)?;
                self.metrics.latency.observe(t0.elapsed().as_nanos() as u64);
            }
            Completion::Malformed { slot, seq, error } => {
                self.metrics.malformed += 1;
                self.metrics.defaults += 1;
                tracing::warn!(slot, seq, "malformed upcall ({error}): answered DEFAULT");
                self.t.commit(slot, seq, Verdict::Default)?;
            }
            Completion::SlotFailed { slot, error } => {
                self.metrics.slot_failures += 1;
                tracing::warn!(slot, "slot failed ({error}): re-arming");
                self.t.fetch(slot)?;
            }
            Completion::Control { token, outcome } => {
                if let Some(op) = self.ctrl.remove(&token) {
                    self.control_done(op, &outcome);
                }
            }
            Completion::Teardown { .. } => {
                bail!("the kernel tore the server down (another server took the device?)")
            }
            Completion::Readable { token, result } => {
                if token == STOP_TOKEN {
                    if result < 0 {
                        bail!("watching the signal eventfd failed: {}", os_error(result));
                    }
                    // Two signals before we looked, or one during the
                    // drain: hurry.
                    if crate::sys::eventfd_clear(self.stop_fd.as_fd()) >= 2 || self.draining {
                        self.hurry = true;
                    }
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    fn decide(&mut self, upcall: &Upcall) -> Verdict {
        match *upcall {
            Upcall::WriteFault(_) => self.metrics.write_faults += 1,
            Upcall::HintFault { .. } => self.metrics.hint_faults += 1,
            Upcall::DemoteCredit { .. } => self.metrics.credit_requests += 1,
            Upcall::Ping { .. } => self.metrics.pings += 1,
        }
        if let Upcall::DemoteCredit { nid, .. } = *upcall {
            let Some(i) = self.node_index(nid) else {
                self.policy.decisions.unknown_node += 1;
                return Verdict::Deny;
            };
            // Nothing is granted while the books are being rebuilt, an
            // eviction runs or the server is draining; SET_CREDIT grants
            // again later.
            let n = &self.nodes[i];
            if self.draining || n.resync_at.is_some() || n.stale || n.evicting_episode {
                self.policy.decisions.deny += 1;
                self.nodes[i].muted = true;
                self.nodes[i].counters.denials += 1;
                return Verdict::Deny;
            }
        }
        let now = self.now_ns();
        let v = self.policy.decide(upcall, now);
        if let Upcall::DemoteCredit { nid, .. } = *upcall
            && let Some(i) = self.node_index(nid)
        {
            if v == Verdict::Deny {
                self.nodes[i].muted = true;
                self.nodes[i].counters.denials += 1;
            } else {
                self.nodes[i].muted = false;
            }
        }
        if v == Verdict::Default {
            self.metrics.defaults += 1;
        }
        v
    }

    fn submit(&mut self, ctrl: Control, why: Ctrl) -> Result<()> {
        let token = self.t.submit_control(ctrl)?;
        self.ctrl.insert(token, why);
        Ok(())
    }

    fn control_done(&mut self, op: Ctrl, out: &ControlOutcome) {
        let r = errno_of(out);
        match op {
            Ctrl::Resync { node } => {
                let n = &mut self.nodes[node];
                n.resync_in_flight = false;
                let Some(at) = n.resync_at else { return };
                if r > 0 {
                    // Done when the next chunk would start past the end;
                    // the books are final once this turn's events are in
                    // (see resync_step).
                    n.resync_failures = 0;
                    n.resync_at = Some((at + r as u64).min(n.end_pfn()));
                } else if r != -libc::EAGAIN && r != -libc::EINTR {
                    n.resync_failures += 1;
                    tracing::error!(nid = n.nid, at, "RESYNC failed: {}", os_error(r));
                    if n.resync_failures >= 3 {
                        self.fatal = Some(format!(
                            "RESYNC of node {} failed 3 times ({}): the books cannot be rebuilt",
                            n.nid,
                            os_error(r)
                        ));
                    }
                    n.resync_at = None;
                    n.stale = true;
                }
            }
            Ctrl::SetCredit { node, pages } => {
                let n = &mut self.nodes[node];
                n.credit_in_flight = false;
                n.release_retired_at = Some(Instant::now() + RETIRE_GRACE);
                if r < 0 {
                    // The kernel kept its previous credit, which the books
                    // still reserve as retiring: keep it reserved (no
                    // release) and let a RESYNC set things straight.
                    n.release_retired_at = None;
                    n.stale = true;
                    tracing::error!(nid = n.nid, pages, "SET_CREDIT failed: {}", os_error(r));
                }
                if let Some(next) = n.credit_next.take()
                    && let Err(e) = self.set_credit(node, next)
                {
                    self.fatal = Some(format!("SET_CREDIT: {e:#}"));
                }
            }
            Ctrl::Evict { node, pfn } => {
                let draining = self.draining;
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
                    if draining && r == -libc::ENOENT {
                        n.stale = true;
                    }
                    let wait = if draining {
                        Duration::from_millis(200)
                    } else {
                        EVICT_BACKOFF
                    };
                    n.refused.insert(pfn, Instant::now() + wait);
                    tracing::debug!(nid = n.nid, pfn, "PROMOTE_PFN: {}", os_error(r));
                }
            }
        }
    }

    /// Apply the queued events to the books.
    fn events(&mut self) -> Result<()> {
        loop {
            let batch = self.t.read_events().context("read events")?;
            if batch.is_empty() {
                break;
            }
            for e in batch {
                match e {
                    Ok(ev) => self.event(ev),
                    Err(err) => {
                        // A record we cannot read may hide a page: rebuild.
                        tracing::warn!("malformed event ({err}): resyncing");
                        for n in &mut self.nodes {
                            n.stale = true;
                        }
                    }
                }
            }
        }
        for i in 0..self.nodes.len() {
            self.sample(i);
        }
        Ok(())
    }

    fn event(&mut self, ev: Event) {
        let (nid, pfn, order) = match ev {
            Event::Placed {
                nid, pfn, order, ..
            }
            | Event::Freed { nid, pfn, order }
            | Event::Promoted {
                nid, pfn, order, ..
            } => (nid, pfn, order),
            Event::Overflow { lost } => {
                self.metrics.event_overflows += 1;
                if self.nodes.iter().any(|n| n.stale || n.resync_at.is_some()) {
                    tracing::debug!(lost, "the kernel dropped more events");
                } else {
                    tracing::warn!(lost, "the kernel dropped events: resyncing");
                }
                for n in &mut self.nodes {
                    n.stale = true;
                }
                return;
            }
            Event::Ping { .. } => return,
        };
        let Some(i) = self.node_index(nid) else {
            return;
        };
        let pages = 1u64 << order.min(20);
        let resyncing = self.nodes[i].resync_at.is_some();
        let r = match ev {
            Event::Placed { reason, .. } => {
                // PLACED comes once per mapping: the second mapping of a
                // shared folio reports it again.
                if self.account_ref(i).all_resident(pfn, order) {
                    self.nodes[i].counters.duplicate_placed += pages;
                    return;
                }
                let credited = reason == PlaceReason::Demotion;
                let r = self.account(i).placed(pfn, order, credited);
                if r.is_ok() {
                    let n = &mut self.nodes[i];
                    if credited {
                        n.counters.demoted += pages;
                    } else {
                        n.counters.placed_other += pages;
                    }
                    n.to_measure.extend(pfn..pfn + pages);
                }
                r
            }
            Event::Freed { .. } => {
                let r = self.account(i).left(pfn, order);
                if r.is_ok() {
                    self.nodes[i].counters.freed += pages;
                }
                r
            }
            _ => {
                let r = self.account(i).left(pfn, order);
                if r.is_ok() {
                    self.nodes[i].counters.promoted += pages;
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
            Err(AccountError::NotResident { .. }) => {
                self.nodes[i].counters.unknown_frees += pages;
            }
            // While a RESYNC runs, events race with its reports.
            Err(_) if resyncing => {}
            // A folio partly in the books, or a pfn outside the node as
            // ATTACH_NODE reported it: the books are wrong.
            Err(e) => {
                let n = &mut self.nodes[i];
                n.counters.disagreements += 1;
                n.stale = true;
                tracing::warn!(nid, "event disagrees with the books ({e}): resyncing");
            }
        }
    }

    /// Check the invariant and keep the high-water mark.
    fn sample(&mut self, i: usize) {
        let a = self.account_ref(i);
        let (committed, cap) = (a.committed(), a.geometry().capacity);
        let n = &mut self.nodes[i];
        // Pages a RESYNC reports cost the worst case until measured, which
        // may well exceed capacity on a node of compressible pages: only
        // measured books are judged.
        if n.resync_at.is_some() || n.stale || n.settling {
            return;
        }
        let c = &mut n.counters;
        c.max_committed = c.max_committed.max(committed);
        if committed > cap {
            c.over_capacity += 1;
        }
    }

    /// Measure queued pages for at most [`MEASURE_SLICE`].
    fn measure(&mut self) {
        let t0 = Instant::now();
        for i in 0..self.nodes.len() {
            while let Some(pfn) = self.nodes[i].to_measure.pop_front() {
                if self.account_ref(i).state(pfn) != Some(PageState::Unmeasured) {
                    continue;
                }
                if !self.nodes[i].map.read_page(pfn, &mut self.page) {
                    continue;
                }
                let g = *self.account_ref(i).geometry();
                let bytes = capacity::measure(&g, &self.page[..]);
                if self.account(i).measured(pfn, bytes).is_ok() {
                    self.nodes[i].counters.measured += 1;
                }
                if t0.elapsed() >= MEASURE_SLICE {
                    return;
                }
            }
            let n = &mut self.nodes[i];
            if n.settling && n.resync_at.is_none() && !n.stale {
                n.settling = false;
            }
        }
    }

    /// Watermarks, credit, cooling, snapshot.
    fn tick(&mut self) -> Result<()> {
        let now = Instant::now();
        for i in 0..self.nodes.len() {
            if let Some(at) = self.nodes[i].release_retired_at
                && now >= at
                && !self.nodes[i].credit_in_flight
            {
                self.nodes[i].release_retired_at = None;
                self.account(i).release_retired();
            }
            self.resync_step(i)?;
            if self.nodes[i].resync_at.is_some() {
                continue;
            }
            let level = self.account_ref(i).level();
            if level == Level::Critical && self.account_ref(i).credit() > 0 {
                // Take back every page of credit: the kernel may not place
                // another page until we are below high again.
                self.account(i).retire();
                self.nodes[i].muted = true;
                self.set_credit(i, 0)?;
                tracing::warn!(
                    nid = self.nodes[i].nid,
                    "critical watermark: credit revoked"
                );
            }
            // Above high, evict; once started, go on down to low (no
            // credit is granted meanwhile), so that the node does not
            // hover at high, evicting and refilling.
            if level >= Level::High
                || (self.nodes[i].evicting_episode && self.account_ref(i).above_low())
            {
                self.evict(i)?;
                continue;
            }
            if std::mem::take(&mut self.nodes[i].evicting_episode) {
                tracing::info!(
                    nid = self.nodes[i].nid,
                    used_mib = self.account_ref(i).used() >> 20,
                    evictions = self.nodes[i].counters.evictions,
                    "below the low watermark: eviction done, credit again"
                );
            }
            if self.nodes[i].muted && !self.draining {
                self.regrant(i)?;
            }
        }
        self.policy
            .set_low_on_memory(low_on_memory(&self.fast_nodes));
        if self.last_cool.elapsed() >= self.hot_window {
            self.last_cool = Instant::now();
            for i in 0..self.nodes.len() {
                self.account(i).cool();
            }
        }
        if !self.ready_sent && self.nodes.iter().all(|n| n.resync_at.is_none()) {
            self.ready_sent = true;
            match crate::sys::notify_ready() {
                Ok(true) => tracing::info!("serving; READY=1 sent to systemd"),
                Ok(false) => tracing::info!("serving"),
                Err(e) => tracing::warn!("serving, but READY=1 could not be sent: {e}"),
            }
        }
        self.publish();
        Ok(())
    }

    /// Start, continue or finish a RESYNC of node `i`.  Called after the
    /// turn's events were applied, so a RESYNC whose last chunk completed
    /// has all its reports in the books.
    fn resync_step(&mut self, i: usize) -> Result<()> {
        if self.nodes[i].stale && self.nodes[i].resync_at.is_none() {
            // Forget the books, take back the credit, and ask for every
            // page again.
            let n = &mut self.nodes[i];
            n.stale = false;
            n.settling = true;
            n.to_measure.clear();
            n.evicting.clear();
            n.refused.clear();
            n.resync_at = Some(n.info.start_pfn);
            self.account(i).retire();
            self.account(i).clear();
            self.nodes[i].muted = true;
            self.set_credit(i, 0)?;
            self.metrics.resyncs += 1;
        }
        let n = &self.nodes[i];
        let Some(at) = n.resync_at else {
            return Ok(());
        };
        if n.resync_in_flight {
            return Ok(());
        }
        if at >= n.end_pfn() {
            self.nodes[i].resync_at = None;
            let resident = self.account_ref(i).resident_pages();
            tracing::info!(nid = self.nodes[i].nid, resident, "books rebuilt");
            return Ok(());
        }
        let ctrl = Control::Resync {
            nid: u32::from(n.nid),
            start_pfn: at,
            nr_pages: (n.end_pfn() - at).min(MAX_RESYNC_PAGES),
        };
        self.nodes[i].resync_in_flight = true;
        self.submit(ctrl, Ctrl::Resync { node: i })
    }

    /// SET_CREDIT, one at a time per node: a later value waits for the
    /// one in flight (and replaces any other waiting).
    fn set_credit(&mut self, i: usize, pages: u64) -> Result<()> {
        let n = &mut self.nodes[i];
        if n.credit_in_flight {
            n.credit_next = Some(pages);
            return Ok(());
        }
        n.credit_in_flight = true;
        let nid = u32::from(n.nid);
        self.metrics.credit_set_pages += pages;
        self.submit(
            Control::SetCredit { nid, pages },
            Ctrl::SetCredit { node: i, pages },
        )
    }

    /// Grant credit again after a DENY, once the node has room: SET_CREDIT
    /// to what fits.  The kernel's leftover credit is replaced, so the
    /// books retire theirs (still reserved for a grace period).
    fn regrant(&mut self, i: usize) -> Result<()> {
        let want = self.nodes[i].info.spanned_pages;
        let a = self.account(i);
        let old = a.retire();
        let g = a.grant(want);
        if g == 0 {
            // No room: make sure the kernel holds nothing either.
            return if old > 0 {
                self.set_credit(i, 0)
            } else {
                Ok(())
            };
        }
        self.nodes[i].muted = false;
        self.set_credit(i, g)
    }

    /// Evict the costliest pages down to the low watermark.  While pages
    /// wait to be measured, wait up to [`EVICT_PATIENCE`]: they are charged
    /// the worst case and may turn out cheap (after a RESYNC, all of them
    /// do).  No credit is granted above high meanwhile.  A backlog that
    /// persists (pages arriving as fast as they are measured) does not
    /// hold eviction off longer.
    fn evict(&mut self, i: usize) -> Result<()> {
        let n = &mut self.nodes[i];
        if !n.evicting.is_empty() {
            return Ok(());
        }
        if n.to_measure.is_empty() {
            n.evict_waiting_since = None;
        } else {
            let since = *n.evict_waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() < EVICT_PATIENCE {
                return Ok(());
            }
        }
        let plan = self.account_ref(i).plan_to_low();
        let episode = !plan.is_empty();
        if episode && !std::mem::replace(&mut self.nodes[i].evicting_episode, true) {
            let a = self.account_ref(i);
            tracing::info!(
                nid = self.nodes[i].nid,
                used_mib = a.used() >> 20,
                projected_mib = a.projected() >> 20,
                pages = plan.len(),
                "above the high watermark: evicting down to the low watermark"
            );
        }
        self.submit_evictions(i, plan)
    }

    fn submit_evictions(&mut self, i: usize, pfns: Vec<u64>) -> Result<()> {
        let nid = u32::from(self.fast_nid);
        let now = Instant::now();
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
                Ctrl::Evict { node: i, pfn },
            )?;
        }
        Ok(())
    }

    fn publish(&mut self) {
        let nodes = (0..self.nodes.len())
            .map(|i| {
                let mut c = self.nodes[i].counters.clone();
                c.measure_backlog = self.nodes[i].to_measure.len() as u64;
                (NodeGauges::of(self.nodes[i].nid, self.account_ref(i)), c)
            })
            .collect();
        let snap = Snapshot {
            metrics: self.metrics.clone(),
            decisions: self.policy.decisions.clone(),
            nodes,
            uptime_s: self.epoch.elapsed().as_secs_f64(),
        };
        *self
            .snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = snap;
    }

    /// Revoke credit; with `detach`, evict every page, check with a RESYNC
    /// that the kernel reports none, and detach the nodes that emptied.
    fn drain(&mut self, timeout: Duration, detach: bool) -> Result<()> {
        self.draining = true;
        for i in 0..self.nodes.len() {
            self.account(i).retire();
            self.set_credit(i, 0)?;
        }
        // Watch for a second signal (the first one was read).
        self.t.watch(self.stop_fd.as_fd(), STOP_TOKEN)?;
        let deadline = Instant::now() + timeout;
        loop {
            let mut busy = false;
            for i in 0..self.nodes.len() {
                let n = &self.nodes[i];
                let in_flight = n.credit_in_flight || n.credit_next.is_some();
                if n.resync_at.is_some() || n.stale {
                    busy = true;
                    continue;
                }
                if !detach {
                    busy |= in_flight;
                    continue;
                }
                if self.account_ref(i).resident_pages() > 0 {
                    self.nodes[i].drain_checked = false;
                    let left: Vec<u64> = self.account_ref(i).resident_pfns().collect();
                    self.submit_evictions(i, left)?;
                    busy = true;
                } else if !n.evicting.is_empty() || in_flight {
                    busy = true;
                } else if !n.drain_checked {
                    // The books say empty: ask the kernel.
                    self.nodes[i].drain_checked = true;
                    self.nodes[i].stale = true;
                    busy = true;
                }
            }
            if !busy || self.hurry {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!("drain timeout reached");
                break;
            }
            self.turn(Duration::from_millis(10))?;
        }
        if self.hurry {
            tracing::warn!("second signal: drain cut short");
        }
        for i in 0..self.nodes.len() {
            let nid = self.nodes[i].nid;
            let resident = self.account_ref(i).resident_pages();
            let n = &self.nodes[i];
            if !detach {
                tracing::info!(
                    nid,
                    resident,
                    "left managed (isolated and fenced) for the next server to adopt"
                );
                continue;
            }
            if n.resync_at.is_some() || n.stale || !n.drain_checked || resident > 0 {
                // Detaching a node with pages on it would let them be
                // written in place, and makes it ordinary memory.
                tracing::warn!(
                    nid,
                    resident,
                    "node not shown empty: left managed (isolated and fenced) \
                     for the next server to adopt"
                );
                continue;
            }
            let out = self.t.control_sync(Control::DetachNode {
                nid: u32::from(nid),
            })?;
            match errno_of(&out) {
                0.. => tracing::info!(nid, "node empty (RESYNC reports no page): detached"),
                e => tracing::error!(nid, "DETACH_NODE failed: {}", os_error(e)),
            }
        }
        self.publish();
        Ok(())
    }
}
