//! Deterministic simulation of `mm-server`'s [`Core`] against a simulated
//! kernel (a fake, for tests only), in the manner of FoundationDB and
//! TigerBeetle: one seed drives everything (the workload, the kernel's
//! timing and the faults it injects), the same seed replays the same run,
//! and the invariants are checked after every step.
//!
//! The simulated kernel does what the real one can do to a server:
//! - loses events when its queue is full and reports `OVERFLOW`;
//! - runs control commands late and completes them out of order;
//! - refuses `PROMOTE_PFN` (busy pages), or finds the page gone;
//! - frees, promotes and rewrites pages while evictions are in flight;
//! - refunds credit of demotions that failed after allocating their
//!   target (a `FREED` the books never saw placed);
//! - kills the server at any step: a new core starts, attaches and
//!   rebuilds its books with `RESYNC` while demotions granted by the dead
//!   one still land;
//! - rewrites pages written in place, up to incompressible.
//!
//! The invariants (see [`Sim::check`]): physical use never exceeds the
//! device's capacity, nor would it if every page of credit the kernel
//! holds were spent at the worst case; the kernel never holds more credit
//! than the books reserve; once the events are drained the books equal
//! the kernel's resident set and charge at least its physical use; a
//! drain detaches only an empty node; the core never gives up.

pub mod scale;

use std::collections::VecDeque;
use std::fmt;

use mm_server::capacity::{Geometry, NodeAccount, PAGE_SIZE, pfn_hash};
use mm_server::core::{Books, CmdId, Core, CoreConfig, Life, Phase};
use mm_server::policy::PolicyConfig;
use mm_upcall_proto::control::{Control, Standing};
use mm_upcall_proto::event::{Event, PlaceReason};
use mm_upcall_proto::upcall::{Fault, Upcall};
use mm_upcall_proto::verdict::Verdict;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const NID: u16 = 1;
const START_PFN: u64 = 0x10_0000;
const MS: u64 = 1_000_000;
/// Longest time a demotion takes from allocating its target to PLACED.
const MAX_DEMOTION_NS: u64 = 300 * MS;

const EBUSY: i32 = 16;
const ENOENT: i32 = 2;
const EAGAIN: i32 = 11;

/// What a run may do; [`Knobs::for_seed`] draws them from the seed.
#[derive(Debug, Clone)]
pub struct Knobs {
    /// Pages of the node.
    pub pages: usize,
    /// Physical capacity, bytes.
    pub capacity: u64,
    /// Events the kernel's queue holds.
    pub queue: usize,
    /// Pages the server may let be written in place.
    pub writable_budget: u64,
    /// Chance per step that the server dies (per million).
    pub crash_ppm: u32,
    /// Chance that a PROMOTE_PFN is refused (percent).
    pub refuse_pct: u32,
    /// Chance that a demotion fails after allocating (percent).
    pub demotion_fail_pct: u32,
    /// The server detaches the node when stopped.
    pub detach_on_stop: bool,
    /// Keep pages written in place writable across a server's death, as
    /// the kernel does today (a known gap, see the `known_gap` test).
    pub known_gap: bool,
}

impl Knobs {
    /// The knobs of `seed`: small and large nodes, tight and roomy
    /// queues, crashes on some seeds, writable budgets on others (never
    /// both: that is [`Knobs::known_gap`]'s territory).
    pub fn for_seed(seed: u64) -> Self {
        let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x6b6e_6f62);
        let pages = [64, 256, 1024][r.random_range(0..3)];
        let ratio = r.random_range(15..=60) as u64; // capacity in % of the pages
        let crashes = r.random_bool(0.3);
        Self {
            pages,
            capacity: pages as u64 * u64::from(PAGE_SIZE) * ratio / 100,
            queue: [8, 32, 256, 4096][r.random_range(0..4)],
            writable_budget: if crashes { 0 } else { r.random_range(0..16) },
            crash_ppm: if crashes { 2_000 } else { 0 },
            refuse_pct: r.random_range(0..30),
            demotion_fail_pct: r.random_range(0..10),
            detach_on_stop: r.random_bool(0.7),
            known_gap: false,
        }
    }
}

/// A page as the simulated kernel holds it.
#[derive(Debug, Clone, Copy)]
struct KPage {
    /// Compressed size of its contents (before rounding).
    bytes: u32,
    writable: bool,
}

/// A demotion that allocated its target and has not placed it yet.
#[derive(Debug, Clone, Copy)]
struct Demotion {
    pfn: u64,
    bytes: u32,
    at: u64,
    /// Started on credit of the server incarnation `generation`.
    generation: u32,
    credit_gen: u64,
    fails: bool,
}

/// The simulated kernel (a fake: no memory is touched).
#[derive(Debug)]
struct Kernel {
    pages: Vec<Option<KPage>>,
    /// Demotion credit the kernel holds.
    credit: u64,
    /// Bumped by every SET_CREDIT and ATTACH_NODE: a failed demotion
    /// refunds its credit only to the generation it was charged to.
    credit_gen: u64,
    /// The kernel asks for credit (cleared by DENY, set by SET_CREDIT).
    asks: bool,
    queue: VecDeque<Event>,
    cap: usize,
    lost: u64,
    /// Frees folded into queued records.
    folded: u64,
    /// Commands sent and not yet run.
    submitted: Vec<(CmdId, Control)>,
    /// Commands run whose completion was not delivered yet.
    done: Vec<(CmdId, i32)>,
    demoting: Vec<Demotion>,
    attached: bool,
    /// A DETACH_NODE ran while pages were resident.
    detached_nonempty: Option<u64>,
    /// The node's standing verdict for write faults (SET_STANDING).
    standing: Standing,
}

impl Kernel {
    /// Queue an event, folding frees as the kernel does (patch 0030): the
    /// free of a folio whose PROMOTED is queued is dropped, and a free
    /// next to the FREED at the tail extends it into a range; a queued
    /// record about the same pages stops the search; nothing is folded
    /// past lost events.
    fn post(&mut self, ev: Event) {
        if let Event::Freed { nid, pfn, order } = ev
            && self.lost == 0
        {
            let nr = 1u64 << order;
            for (i, q) in self.queue.iter_mut().rev().take(16).enumerate() {
                let (qnid, qpfn, qn) = match *q {
                    Event::Promoted {
                        nid: n,
                        pfn: p,
                        order: o,
                        ..
                    } => {
                        if n == nid && p == pfn && o == order {
                            self.folded += 1;
                            return;
                        }
                        (n, p, 1u64 << o)
                    }
                    Event::Freed {
                        nid: n,
                        pfn: p,
                        order: o,
                    } => (n, p, 1u64 << o),
                    Event::FreedRange {
                        nid: n,
                        pfn: p,
                        pages,
                    } => (n, p, pages),
                    Event::Placed {
                        nid: n,
                        pfn: p,
                        order: o,
                        ..
                    } => (n, p, 1u64 << o),
                    _ => continue,
                };
                if qnid != nid {
                    continue;
                }
                let is_free = matches!(q, Event::Freed { .. } | Event::FreedRange { .. });
                if i == 0 && is_free && (qpfn + qn == pfn || pfn + nr == qpfn) {
                    *q = Event::FreedRange {
                        nid,
                        pfn: qpfn.min(pfn),
                        pages: qn + nr,
                    };
                    self.folded += 1;
                    return;
                }
                if qpfn < pfn + nr && pfn < qpfn + qn {
                    break;
                }
            }
        }
        if self.queue.len() >= self.cap {
            self.lost += 1;
        } else {
            self.queue.push_back(ev);
        }
    }

    fn resident(&self) -> impl Iterator<Item = (u64, &KPage)> + '_ {
        self.pages
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (START_PFN + i as u64, p)))
    }

    fn page(&mut self, pfn: u64) -> &mut Option<KPage> {
        &mut self.pages[(pfn - START_PFN) as usize]
    }
}

/// Why a run failed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    pub step: u64,
    pub what: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} failed at step {}: {}\n  replay: cargo xtask sim --seed {} --trace",
            self.seed, self.step, self.what, self.seed
        )
    }
}

/// What a run did (for reports and for tests that a fault really
/// happened).
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub steps: u64,
    pub crashes: u64,
    pub overflows: u64,
    pub resyncs: u64,
    pub evictions: u64,
    pub refused: u64,
    pub refunds: u64,
    pub placed: u64,
    /// Steps at which the books were compared with the kernel's pages.
    pub quiet_checks: u64,
    /// Frees the kernel folded into queued records.
    pub folded: u64,
    /// Write faults the standing verdict decided without asking.
    pub standing: u64,
    pub detached: bool,
    /// A digest of the run (same seed, same digest).
    pub digest: u64,
}

/// One simulation.
pub struct Sim {
    seed: u64,
    rng: ChaCha8Rng,
    knobs: Knobs,
    geometry: Geometry,
    now: u64,
    step: u64,
    k: Kernel,
    core: Core,
    generation: u32,
    trace: bool,
    /// Check the invariants broken on purpose by a test (see
    /// [`Sim::break_credit_bound`]).
    grant_unchecked: bool,
    pub stats: Stats,
}

fn core_config(knobs: &Knobs) -> CoreConfig {
    CoreConfig {
        policy: PolicyConfig {
            writable_budget: knobs.writable_budget,
            hot_threshold: 2,
            promote_rate_limit_mbps: 65536,
            fast_nodes: vec![0],
            credit_chunk_pages: 16,
            standing_verdicts: true,
        },
        hot_window_ns: 200 * MS,
        drain_timeout_ns: 30_000 * MS,
        detach_on_stop: knobs.detach_on_stop,
    }
}

impl Sim {
    pub fn new(seed: u64, knobs: Knobs) -> Self {
        let geometry = Geometry {
            capacity: knobs.capacity,
            granule: 64,
            low: 60,
            high: 80,
            critical: 95,
        };
        let k = Kernel {
            pages: vec![None; knobs.pages],
            credit: 0,
            credit_gen: 0,
            asks: true,
            queue: VecDeque::new(),
            cap: knobs.queue,
            lost: 0,
            folded: 0,
            submitted: Vec::new(),
            done: Vec::new(),
            demoting: Vec::new(),
            attached: true,
            detached_nonempty: None,
            standing: Standing::Ask,
        };
        let core = Self::new_core(&knobs, geometry, 0);
        Self {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            knobs,
            geometry,
            now: 0,
            step: 0,
            k,
            core,
            generation: 0,
            trace: false,
            grant_unchecked: false,
            stats: Stats::default(),
        }
    }

    fn new_core(knobs: &Knobs, g: Geometry, now: u64) -> Core {
        let account = NodeAccount::new(g, START_PFN, knobs.pages).expect("valid geometry");
        Core::new(core_config(knobs), vec![(NID, account)], now).expect("valid config")
    }

    /// Print every step to stderr.
    pub fn trace(&mut self, on: bool) {
        self.trace = on;
    }

    /// Break the server on purpose, to show the invariants catch it: the
    /// kernel is handed credit the books do not reserve (a grant without
    /// the safety bound).
    pub fn break_credit_bound(&mut self) {
        self.grant_unchecked = true;
    }

    fn fail(&self, what: impl Into<String>) -> Failure {
        Failure {
            seed: self.seed,
            step: self.step,
            what: what.into(),
        }
    }

    fn log(&self, what: fmt::Arguments<'_>) {
        if self.trace {
            eprintln!("[{:>6} {:>8.3}s] {what}", self.step, self.now as f64 / 1e9);
        }
    }

    fn digest(&mut self, x: u64) {
        self.stats.digest = (self.stats.digest ^ x).wrapping_mul(0x100_0000_01b3);
    }

    fn worst(&self) -> u64 {
        u64::from(self.geometry.worst_case())
    }

    /// A page's contents: zero, compressible, or not at all.
    fn contents(&mut self) -> u32 {
        match self.rng.random_range(0..10) {
            0 => 0,
            1..=6 => self.rng.random_range(200..1600),
            7 | 8 => self.rng.random_range(1600..3500),
            _ => PAGE_SIZE + 16,
        }
    }

    fn fault(&self, pfn: u64) -> Fault {
        Fault {
            nid: NID,
            cpu_nid: 0,
            order: 0,
            thp: false,
            tgid: 1,
            tid: 1,
            pfn,
            vaddr: pfn << 12,
        }
    }

    fn random_resident(&mut self) -> Option<u64> {
        let n = self.k.pages.len();
        let i = self.rng.random_range(0..n);
        (0..n)
            .map(|d| (i + d) % n)
            .find(|&j| self.k.pages[j].is_some())
            .map(|j| START_PFN + j as u64)
    }

    fn random_free(&mut self) -> Option<u64> {
        let n = self.k.pages.len();
        let i = self.rng.random_range(0..n);
        (0..n)
            .map(|d| (i + d) % n)
            .find(|&j| {
                let pfn = START_PFN + j as u64;
                self.k.pages[j].is_none() && !self.k.demoting.iter().any(|d| d.pfn == pfn)
            })
            .map(|j| START_PFN + j as u64)
    }

    // ---- the workload --------------------------------------------------

    /// Reclaim demotes one page: on credit, else it asks for some.
    fn demote(&mut self) {
        if self.k.credit == 0 {
            if !self.k.asks {
                return;
            }
            let up = Upcall::DemoteCredit {
                nid: NID,
                wanted_pages: 1,
            };
            match self.core.upcall(&up, self.now) {
                Verdict::Grant { pages } => {
                    self.log(format_args!("credit request: GRANT {pages}"));
                    self.k.credit += u64::from(pages);
                }
                v => {
                    self.log(format_args!("credit request: {v:?}"));
                    self.k.asks = false;
                    if self.grant_unchecked {
                        self.k.credit += 16;
                    }
                }
            }
            return;
        }
        let Some(pfn) = self.random_free() else {
            return;
        };
        self.k.credit -= 1;
        let bytes = self.contents();
        let at = self.now + self.rng.random_range(0..MAX_DEMOTION_NS);
        let fails = self.rng.random_range(0..100) < self.knobs.demotion_fail_pct;
        self.k.demoting.push(Demotion {
            pfn,
            bytes,
            at,
            generation: self.generation,
            credit_gen: self.k.credit_gen,
            fails,
        });
    }

    /// Demotions whose copy finished land (or fail and refund).
    fn land_demotions(&mut self) {
        let now = self.now;
        let (due, rest): (Vec<_>, Vec<_>) = self.k.demoting.drain(..).partition(|d| d.at <= now);
        self.k.demoting = rest;
        for d in due {
            if d.fails {
                // The target is freed, its credit refunded if SET_CREDIT
                // did not replace that credit meanwhile.
                if d.credit_gen == self.k.credit_gen {
                    self.k.credit += 1;
                    self.stats.refunds += 1;
                }
                self.k.post(Event::Freed {
                    nid: NID,
                    pfn: d.pfn,
                    order: 0,
                });
                continue;
            }
            *self.k.page(d.pfn) = Some(KPage {
                bytes: d.bytes,
                writable: false,
            });
            self.stats.placed += 1;
            self.k.post(Event::Placed {
                nid: NID,
                pfn: d.pfn,
                order: 0,
                tgid: 1,
                vaddr: d.pfn << 12,
                reason: PlaceReason::Demotion,
            });
        }
    }

    fn leave(&mut self, pfn: u64, promoted: bool) {
        *self.k.page(pfn) = None;
        if promoted {
            self.k.post(Event::Promoted {
                nid: NID,
                pfn,
                order: 0,
                target_nid: 0,
            });
        }
        // The source folio of a promotion is freed too.
        self.k.post(Event::Freed {
            nid: NID,
            pfn,
            order: 0,
        });
    }

    /// A process exits: a run of resident pages is freed in address
    /// order (which the kernel folds into ranges).
    fn exit(&mut self) {
        let Some(first) = self.random_resident() else {
            return;
        };
        let end = START_PFN + self.knobs.pages as u64;
        let run = self.rng.random_range(1..256u64);
        for pfn in first..(first + run).min(end) {
            if self.k.page(pfn).is_some() {
                self.leave(pfn, false);
            }
        }
    }

    fn write_fault(&mut self) {
        let Some(pfn) = self.random_resident() else {
            return;
        };
        let page = (*self.k.page(pfn)).expect("resident");
        if page.writable {
            // Written in place again: maybe incompressible now.
            let bytes = self.contents();
            self.k.page(pfn).as_mut().expect("resident").bytes = bytes;
            return;
        }
        if self.k.standing != Standing::Ask {
            // Decided by the standing verdict, without asking: promoted.
            self.stats.standing += 1;
            self.leave(pfn, true);
            return;
        }
        match self
            .core
            .upcall(&Upcall::WriteFault(self.fault(pfn)), self.now)
        {
            Verdict::AllowInPlace => {
                let bytes = self.contents();
                *self.k.page(pfn) = Some(KPage {
                    bytes,
                    writable: true,
                });
            }
            Verdict::Promote { .. } | Verdict::Default => self.leave(pfn, true),
            v => self.log(format_args!("write fault {pfn:#x}: {v:?}")),
        }
    }

    fn hint_fault(&mut self) {
        let Some(pfn) = self.random_resident() else {
            return;
        };
        let up = Upcall::HintFault {
            fault: self.fault(pfn),
            since_scan_ms: 0,
        };
        if let Verdict::Promote { .. } = self.core.upcall(&up, self.now) {
            self.leave(pfn, true);
        }
    }

    // ---- control commands ------------------------------------------------

    /// Run one submitted command, picked at random (commands run out of
    /// order, as io-wq workers may run them).
    fn run_command(&mut self) {
        if self.k.submitted.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..self.k.submitted.len());
        let (id, ctrl) = self.k.submitted.swap_remove(i);
        let r = self.execute(ctrl);
        self.log(format_args!("kernel ran {ctrl:?}: {r}"));
        self.k.done.push((id, r));
    }

    fn execute(&mut self, ctrl: Control) -> i32 {
        match ctrl {
            Control::SetCredit { pages, .. } => {
                self.k.credit = pages;
                self.k.credit_gen += 1;
                self.k.asks = true;
                0
            }
            Control::PromotePfn { pfn, .. } => {
                if !(START_PFN..START_PFN + self.knobs.pages as u64).contains(&pfn) {
                    return -22;
                }
                if self.k.page(pfn).is_none() {
                    return -ENOENT;
                }
                if self.rng.random_range(0..100) < self.knobs.refuse_pct {
                    self.stats.refused += 1;
                    return -EBUSY;
                }
                self.stats.evictions += 1;
                self.leave(pfn, true);
                0
            }
            Control::Resync {
                start_pfn,
                nr_pages,
                ..
            } => {
                let end = (start_pfn + nr_pages).min(START_PFN + self.knobs.pages as u64);
                let mut pfn = start_pfn;
                while pfn < end {
                    if let Some(p) = *self.k.page(pfn) {
                        if self.k.queue.len() >= self.k.cap {
                            break;
                        }
                        let _ = p;
                        self.k.post(Event::Placed {
                            nid: NID,
                            pfn,
                            order: 0,
                            tgid: 0,
                            vaddr: 0,
                            reason: PlaceReason::Resync,
                        });
                    }
                    pfn += 1;
                }
                let covered = pfn - start_pfn;
                if covered == 0 {
                    -EAGAIN
                } else {
                    covered as i32
                }
            }
            Control::SetStanding { standing, .. } => {
                if !self.k.attached {
                    return -2;
                }
                if self.rng.random_bool(0.05) {
                    return -5;
                }
                self.k.standing = standing;
                0
            }
            Control::DetachNode { .. } => {
                let resident = self.k.resident().count() as u64 + self.k.demoting.len() as u64;
                if resident > 0 {
                    self.k.detached_nonempty = Some(resident);
                }
                self.k.attached = false;
                self.k.standing = Standing::Ask;
                self.stats.detached = true;
                0
            }
            _ => -22,
        }
    }

    /// Deliver one completion, picked at random.
    fn deliver(&mut self) {
        if self.k.done.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..self.k.done.len());
        let (id, r) = self.k.done.swap_remove(i);
        self.digest(id.0 ^ (r as u64) << 32);
        self.core.completed(id, r, self.now);
    }

    // ---- the driver --------------------------------------------------------

    /// One turn of a driver: every queued event (after OVERFLOW if any
    /// were lost), then measuring, the tick, and the commands asked for.
    fn driver_turn(&mut self) {
        if self.k.lost > 0 {
            let lost = std::mem::take(&mut self.k.lost);
            self.stats.overflows += 1;
            self.core.event(&Event::Overflow { lost });
        }
        while let Some(ev) = self.k.queue.pop_front() {
            self.core.event(&ev);
        }
        self.core.events_applied(self.now);
        let budget = self.rng.random_range(0..64);
        for _ in 0..budget {
            let Some((i, pfn)) = self.core.pop_measure() else {
                break;
            };
            let bytes = self.k.page(pfn).map(|p| p.bytes);
            self.core.measured(i, pfn, bytes);
        }
        if self.core.tick_due(self.now) {
            // Now and then node 0 is short of memory (standing verdicts
            // are withdrawn, then left again).
            let low = if self.rng.random_bool(0.02) {
                vec![0]
            } else {
                Vec::new()
            };
            self.core.tick(self.now, low);
        }
        while let Some((id, ctrl)) = self.core.poll_command() {
            self.log(format_args!("server sent {ctrl:?}"));
            self.k.submitted.push((id, ctrl));
        }
    }

    /// The server dies: its commands die with it, a new one attaches
    /// (the kernel's credit is set to 0; demotions already allocated
    /// still land) and starts over.
    fn crash(&mut self) {
        self.log(format_args!("server killed"));
        self.stats.crashes += 1;
        self.generation += 1;
        self.k.submitted.clear();
        self.k.done.clear();
        self.k.queue.clear();
        self.k.lost = 0;
        self.k.credit = 0;
        self.k.credit_gen += 1;
        self.k.asks = true;
        // The server's death clears it; the new server attaches anyway.
        self.k.standing = Standing::Ask;
        if !self.knobs.known_gap {
            // The fence comes back with the server.
            for p in self.k.pages.iter_mut().flatten() {
                p.writable = false;
            }
        }
        self.core = Self::new_core(&self.knobs, self.geometry, self.now);
        while let Some((id, ctrl)) = self.core.poll_command() {
            self.k.submitted.push((id, ctrl));
        }
    }

    // ---- invariants ----------------------------------------------------------

    /// Check every invariant; `quiet` when nothing is in flight (books
    /// must equal the truth).
    pub fn check(&mut self) -> Result<(), Failure> {
        if let Some(why) = self.core.take_fatal() {
            return Err(self.fail(format!("the core gave up: {why}")));
        }
        if let Some(n) = self.k.detached_nonempty {
            return Err(self.fail(format!("DETACH_NODE with {n} pages on the node")));
        }
        let g = self.geometry;
        let phys: u64 = self
            .k
            .resident()
            .map(|(_, p)| u64::from(g.round(p.bytes)))
            .sum();
        let cap = g.capacity;
        if phys > cap {
            return Err(self.fail(format!("physical use {phys} over capacity {cap}")));
        }
        let worst = self.worst();
        let pending = self.k.credit + self.k.demoting.len() as u64;
        if phys + pending * worst > cap {
            return Err(self.fail(format!(
                "physical use {phys} + {pending} pages of credit and demotions at {worst} \
                 exceed capacity {cap}"
            )));
        }
        let n = &self.core.nodes()[0];
        // With no SET_STANDING or DETACH_NODE in flight, the core knows
        // the kernel's standing verdict.
        if !n.standing_sending && n.life != Life::Detaching && n.standing != self.k.standing {
            return Err(self.fail(format!(
                "the core thinks the standing verdict is {:?}, the kernel has {:?}",
                n.standing, self.k.standing
            )));
        }
        let a = &n.account;
        let mine = self.k.credit
            + self
                .k
                .demoting
                .iter()
                .filter(|d| d.generation == self.generation)
                .count() as u64;
        if self.k.attached && mine > a.credit() + a.retiring() {
            return Err(self.fail(format!(
                "the kernel holds {mine} pages of credit and demotions, the books reserve {} + {} \
                 retiring",
                a.credit(),
                a.retiring()
            )));
        }
        let quiet = self.k.queue.is_empty()
            && self.k.lost == 0
            && self.k.demoting.is_empty()
            && matches!(n.books, Books::Live { .. })
            && self.k.attached;
        if quiet {
            self.stats.quiet_checks += 1;
            let truth: Vec<u64> = self.k.resident().map(|(pfn, _)| pfn).collect();
            let hash =
                truth.iter().fold(0u64, |h, &p| h.wrapping_add(pfn_hash(p))) & ((1 << 52) - 1);
            // Evictions of pages the kernel already executed are in the
            // events just read, so the books must match.
            if a.resident_pages() != truth.len() as u64 || a.set_hash() != hash {
                return Err(self.fail(format!(
                    "books hold {} pages (hash {:#x}), the kernel {} (hash {hash:#x})",
                    a.resident_pages(),
                    a.set_hash(),
                    truth.len()
                )));
            }
            if a.used() < phys {
                return Err(self.fail(format!(
                    "books charge {} bytes, the pages use {phys}",
                    a.used()
                )));
            }
        }
        Ok(())
    }

    // ---- running -------------------------------------------------------------

    /// One step: something happens, time passes, the driver turns, the
    /// invariants hold.
    ///
    /// # Errors
    ///
    /// The invariant that broke.
    pub fn step(&mut self, workload: bool) -> Result<(), Failure> {
        self.step += 1;
        self.stats.steps += 1;
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=24 if workload => self.demote(),
            25..=28 if workload => {
                if let Some(pfn) = self.random_resident() {
                    self.leave(pfn, false);
                }
            }
            29 if workload => self.exit(),
            30..=34 if workload => self.write_fault(),
            35..=39 if workload => self.hint_fault(),
            40..=64 => self.run_command(),
            65..=84 => self.deliver(),
            _ => {}
        }
        if workload && self.rng.random_range(0..1_000_000) < self.knobs.crash_ppm {
            self.crash();
        }
        self.now += self.rng.random_range(0..10 * MS);
        self.land_demotions();
        if self.rng.random_bool(0.5) {
            self.driver_turn();
        }
        self.digest(self.now ^ self.k.credit << 40 ^ self.k.queue.len() as u64);
        self.check()
    }

    /// Run `steps` steps of workload, then let everything settle, then
    /// stop the server (SIGTERM) and let it drain.
    ///
    /// # Errors
    ///
    /// The first invariant that broke, or a server that did not finish.
    pub fn run(&mut self, steps: u64) -> Result<Stats, Failure> {
        for _ in 0..steps {
            self.step(true)?;
        }
        // Quiet: no workload; everything in flight ends.
        for _ in 0..20_000 {
            self.step(false)?;
            if self.k.submitted.is_empty()
                && self.k.done.is_empty()
                && self.k.demoting.is_empty()
                && self.core.commands_in_flight() == 0
                && self.core.measure_backlog() == 0
                && !self.core.nodes()[0].rebuilding()
            {
                break;
            }
        }
        self.log(format_args!("SIGTERM"));
        self.core.signal(1, self.now);
        for _ in 0..200_000 {
            if self.core.phase() == Phase::Done {
                break;
            }
            self.step(false)?;
            self.driver_turn();
        }
        if self.core.phase() != Phase::Done {
            return Err(self.fail(format!("the drain did not finish: {:?}", self.core.phase())));
        }
        if self.knobs.detach_on_stop && !self.stats.detached {
            return Err(self.fail(format!(
                "stopped without detaching a quiet node ({} pages left)",
                self.k.resident().count()
            )));
        }
        self.stats.resyncs = self.core.metrics().resyncs;
        self.stats.folded = self.k.folded;
        Ok(self.stats.clone())
    }
}

/// Run seed `seed` with its own knobs for `steps` steps.
///
/// # Errors
///
/// The [`Failure`], which names the seed to replay.
pub fn run_seed(seed: u64, steps: u64) -> Result<Stats, Failure> {
    Sim::new(seed, Knobs::for_seed(seed)).run(steps)
}
