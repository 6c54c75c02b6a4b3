//! The daemon's counters and gauges, and their Prometheus text rendering.
//!
//! The event loop owns a [`Metrics`] and publishes a copy ([`Snapshot`])
//! for the admin socket every few milliseconds; rendering happens on the
//! admin thread, never on the verdict path.

use std::fmt::Write as _;

use mm_upcall_proto::socket::StatsRec;

use crate::capacity::{Level, NodeAccount, PAGE_SIZE};
use crate::policy::Decisions;

/// Upper bounds of the verdict latency histogram, nanoseconds.
pub const LATENCY_BUCKETS_NS: [u64; 10] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
];

/// Verdict latency, decode to encode, as a cumulative histogram.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Observations at or below each bound of [`LATENCY_BUCKETS_NS`].
    pub buckets: [u64; LATENCY_BUCKETS_NS.len()],
    pub count: u64,
    pub sum_ns: u64,
}

impl Histogram {
    pub fn observe(&mut self, ns: u64) {
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        if let Some(i) = LATENCY_BUCKETS_NS.iter().position(|&b| ns <= b) {
            self.buckets[i] += 1;
        }
    }
}

/// Counters of one managed node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeCounters {
    /// Pages that arrived by credited demotion.
    pub demoted: u64,
    /// Pages that arrived otherwise (RESYNC, the server's migrations).
    pub placed_other: u64,
    pub promoted: u64,
    pub freed: u64,
    pub measured: u64,
    pub evictions: u64,
    pub evictions_failed: u64,
    /// Times use crossed the high watermark and eviction began.
    pub high_episodes: u64,
    /// Credit requests answered DENY.
    pub denials: u64,
    /// Events the books disagreed with (each leads to a RESYNC).
    pub disagreements: u64,
    /// Pages FREED or PROMOTED that the books did not hold (targets of
    /// failed demotions, races with RESYNC).
    pub unknown_frees: u64,
    /// Largest `used + reserved` seen, bytes.
    pub max_committed: u64,
    /// Times accounted use exceeded capacity (must stay 0).
    pub over_capacity: u64,
    /// Pages placed and not measured yet (a gauge).
    pub measure_backlog: u64,
    /// PLACED events for folios the books already hold (one per extra
    /// mapping of a shared folio).
    pub duplicate_placed: u64,
}

/// Gauges of one managed node, copied from its account.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeGauges {
    pub nid: u16,
    pub start_pfn: u64,
    pub spanned_pages: u64,
    pub capacity: u64,
    pub used: u64,
    pub reserved: u64,
    pub credit: u64,
    pub resident: u64,
    pub set_hash: u64,
    pub zero: u64,
    pub level: u8,
    /// 0 served, 1 draining (`mmctl drain`), 2 detaching, 3 detached.
    pub state: u8,
    /// 1 while the kernel decides write faults by a standing verdict.
    pub standing: u8,
}

impl NodeGauges {
    pub fn of(nid: u16, a: &NodeAccount) -> Self {
        Self {
            nid,
            start_pfn: a.start_pfn(),
            spanned_pages: a.nr_pages() as u64,
            capacity: a.geometry().capacity,
            used: a.used(),
            reserved: a.reserved(),
            credit: a.credit(),
            resident: a.resident_pages(),
            set_hash: a.set_hash(),
            zero: a.zero_pages(),
            level: match a.level() {
                Level::Normal => 0,
                Level::High => 1,
                Level::Critical => 2,
            },
            state: 0,
            standing: 0,
        }
    }

    /// Logical bytes resident per physical byte charged (1.0 when empty).
    pub fn compression_ratio(&self) -> f64 {
        if self.used == 0 {
            return if self.resident == 0 {
                1.0
            } else {
                f64::INFINITY
            };
        }
        (self.resident * u64::from(PAGE_SIZE)) as f64 / self.used as f64
    }
}

/// Daemon-wide counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    pub write_faults: u64,
    pub hint_faults: u64,
    pub credit_requests: u64,
    pub pings: u64,
    pub malformed: u64,
    pub defaults: u64,
    pub slot_failures: u64,
    pub resyncs: u64,
    pub event_overflows: u64,
    /// Pages of credit set by SET_CREDIT (absolute; each replaces what
    /// the kernel had left).
    pub credit_set_pages: u64,
    pub latency: Histogram,
}

impl Metrics {
    pub fn upcalls(&self) -> u64 {
        self.write_faults + self.hint_faults + self.credit_requests + self.pings + self.malformed
    }
}

/// What the admin socket serves: a copy of the loop's state.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub metrics: Metrics,
    pub decisions: Decisions,
    pub nodes: Vec<(NodeGauges, NodeCounters)>,
    pub uptime_s: f64,
}

impl Snapshot {
    /// The fixed-layout `StatsReply` of the socket protocol (all nodes
    /// summed).
    pub fn stats(&self) -> StatsRec {
        let sum = |f: &dyn Fn(&(NodeGauges, NodeCounters)) -> u64| -> u64 {
            self.nodes.iter().map(f).sum()
        };
        StatsRec {
            upcalls: self.metrics.upcalls(),
            write_faults: self.metrics.write_faults,
            hint_faults: self.metrics.hint_faults,
            credit_requests: self.metrics.credit_requests,
            promotions: sum(&|(_, c)| c.promoted),
            placements: sum(&|(_, c)| c.demoted + c.placed_other),
            denials: self.decisions.deny,
            evictions: sum(&|(_, c)| c.evictions),
            physical_used_bytes: sum(&|(g, _)| g.used),
            physical_capacity_bytes: sum(&|(g, _)| g.capacity),
            resident_pages: sum(&|(g, _)| g.resident),
            zero_pages: sum(&|(g, _)| g.zero),
        }
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(4096);
        let m = &self.metrics;
        let d = &self.decisions;
        let family = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP mm_server_{name} {help}");
            let _ = writeln!(o, "# TYPE mm_server_{name} {kind}");
        };
        family(
            &mut o,
            "upcalls_total",
            "counter",
            "Upcalls received, by kind.",
        );
        for (kind, v) in [
            ("write_fault", m.write_faults),
            ("hint_fault", m.hint_faults),
            ("demote_credit", m.credit_requests),
            ("ping", m.pings),
            ("malformed", m.malformed),
        ] {
            let _ = writeln!(o, "mm_server_upcalls_total{{kind=\"{kind}\"}} {v}");
        }
        family(
            &mut o,
            "verdicts_total",
            "counter",
            "Verdicts sent, by verdict.",
        );
        for (verdict, v) in [
            ("promote", d.promote),
            ("allow_in_place", d.in_place),
            ("stay", d.stay),
            ("grant", d.grant),
            ("deny", d.deny),
            ("default", m.defaults + d.unknown_node),
        ] {
            let _ = writeln!(o, "mm_server_verdicts_total{{verdict=\"{verdict}\"}} {v}");
        }
        for (name, help, v) in [
            (
                "promotions_rate_limited_total",
                "Hot pages left in place by the promotion rate limit.",
                d.rate_limited,
            ),
            (
                "granted_pages_total",
                "Pages of demotion credit granted by GRANT verdicts.",
                d.granted_pages,
            ),
            (
                "credit_set_pages_total",
                "Pages of demotion credit set by SET_CREDIT commands.",
                m.credit_set_pages,
            ),
            (
                "resyncs_total",
                "RESYNCs run (start, lost events, disagreements).",
                m.resyncs,
            ),
            (
                "event_overflows_total",
                "OVERFLOW events: the kernel dropped events.",
                m.event_overflows,
            ),
            (
                "slot_failures_total",
                "FETCH/COMMIT commands the kernel rejected.",
                m.slot_failures,
            ),
        ] {
            family(&mut o, name, "counter", help);
            let _ = writeln!(o, "mm_server_{name} {v}");
        }
        type Field = fn(&NodeGauges, &NodeCounters) -> f64;
        let per_node: [(&str, &str, &str, Field); 25] = [
            (
                "measure_backlog_pages",
                "gauge",
                "Pages placed and not measured yet (charged at the worst case).",
                |_, c| c.measure_backlog as f64,
            ),
            (
                "book_disagreements_total",
                "counter",
                "Events that contradicted the books (each starts a RESYNC).",
                |_, c| c.disagreements as f64,
            ),
            (
                "unknown_frees_total",
                "counter",
                "Pages FREED or PROMOTED that were not in the books (the free after each promotion, targets of failed demotions).",
                |_, c| c.unknown_frees as f64,
            ),
            (
                "duplicate_placed_pages_total",
                "counter",
                "PLACED pages the books already held (extra mappings of shared folios).",
                |_, c| c.duplicate_placed as f64,
            ),
            (
                "node_start_pfn",
                "gauge",
                "First pfn of the node.",
                |g, _| g.start_pfn as f64,
            ),
            (
                "node_spanned_pages",
                "gauge",
                "Pages the node spans.",
                |g, _| g.spanned_pages as f64,
            ),
            (
                "demoted_pages_total",
                "counter",
                "Pages demoted onto the node with credit.",
                |_, c| c.demoted as f64,
            ),
            (
                "placed_other_pages_total",
                "counter",
                "Pages found on the node by RESYNC or placed by the server.",
                |_, c| c.placed_other as f64,
            ),
            (
                "promoted_pages_total",
                "counter",
                "Pages promoted off the node.",
                |_, c| c.promoted as f64,
            ),
            (
                "freed_pages_total",
                "counter",
                "Pages freed on the node.",
                |_, c| c.freed as f64,
            ),
            (
                "measured_pages_total",
                "counter",
                "Pages whose compressed size was measured.",
                |_, c| c.measured as f64,
            ),
            (
                "evictions_total",
                "counter",
                "PROMOTE_PFN evictions that succeeded.",
                |_, c| c.evictions as f64,
            ),
            (
                "evictions_failed_total",
                "counter",
                "PROMOTE_PFN evictions the kernel refused.",
                |_, c| c.evictions_failed as f64,
            ),
            (
                "high_watermark_episodes_total",
                "counter",
                "Times use crossed the high watermark and eviction down to low began.",
                |_, c| c.high_episodes as f64,
            ),
            (
                "credit_denials_total",
                "counter",
                "Credit requests denied.",
                |_, c| c.denials as f64,
            ),
            (
                "over_capacity_total",
                "counter",
                "Samples where accounted use exceeded capacity (must be 0).",
                |_, c| c.over_capacity as f64,
            ),
            (
                "physical_capacity_bytes",
                "gauge",
                "Physical capacity of the device.",
                |g, _| g.capacity as f64,
            ),
            (
                "physical_used_bytes",
                "gauge",
                "Physical bytes charged for resident pages.",
                |g, _| g.used as f64,
            ),
            (
                "physical_reserved_bytes",
                "gauge",
                "Physical bytes reserved for credit not yet used.",
                |g, _| g.reserved as f64,
            ),
            (
                "physical_committed_max_bytes",
                "gauge",
                "Largest used + reserved seen.",
                |_, c| c.max_committed as f64,
            ),
            (
                "credit_pages",
                "gauge",
                "Demotion credit outstanding.",
                |g, _| g.credit as f64,
            ),
            (
                "resident_pages",
                "gauge",
                "Pages resident on the node.",
                |g, _| g.resident as f64,
            ),
            (
                "books_set_hash",
                "gauge",
                "Order-independent hash of the resident pfns (52 bits), to compare the books with \
                 another view of the node as sets.",
                |g, _| g.set_hash as f64,
            ),
            (
                "zero_pages",
                "gauge",
                "Resident all-zero pages (they cost nothing).",
                |g, _| g.zero as f64,
            ),
            (
                "compression_ratio",
                "gauge",
                "Resident bytes per physical byte charged.",
                |g, _| g.compression_ratio(),
            ),
        ];
        for (name, kind, help, f) in per_node {
            family(&mut o, name, kind, help);
            for (g, c) in &self.nodes {
                let _ = writeln!(o, "mm_server_{name}{{nid=\"{}\"}} {}", g.nid, f(g, c));
            }
        }
        family(
            &mut o,
            "pressure_level",
            "gauge",
            "0 below the high watermark, 1 at or above high, 2 at or above critical.",
        );
        for (g, _) in &self.nodes {
            let _ = writeln!(
                o,
                "mm_server_pressure_level{{nid=\"{}\"}} {}",
                g.nid, g.level
            );
        }
        family(
            &mut o,
            "node_state",
            "gauge",
            "0 served, 1 draining (mmctl drain), 2 detaching, 3 detached (ordinary memory).",
        );
        for (g, _) in &self.nodes {
            let _ = writeln!(o, "mm_server_node_state{{nid=\"{}\"}} {}", g.nid, g.state);
        }
        family(
            &mut o,
            "standing_verdict",
            "gauge",
            "1 while the kernel promotes written pages without asking (SET_STANDING: no \
             writable budget, no fast node short of memory), 0 while every write fault is asked.",
        );
        for (g, _) in &self.nodes {
            let _ = writeln!(
                o,
                "mm_server_standing_verdict{{nid=\"{}\"}} {}",
                g.nid, g.standing
            );
        }
        family(
            &mut o,
            "verdict_latency_seconds",
            "histogram",
            "Time from reading an upcall to queueing its verdict.",
        );
        let mut cum = 0;
        for (b, n) in LATENCY_BUCKETS_NS.iter().zip(m.latency.buckets) {
            cum += n;
            let _ = writeln!(
                o,
                "mm_server_verdict_latency_seconds_bucket{{le=\"{}\"}} {cum}",
                *b as f64 / 1e9
            );
        }
        let _ = writeln!(
            o,
            "mm_server_verdict_latency_seconds_bucket{{le=\"+Inf\"}} {}",
            m.latency.count
        );
        let _ = writeln!(
            o,
            "mm_server_verdict_latency_seconds_sum {}",
            m.latency.sum_ns as f64 / 1e9
        );
        let _ = writeln!(
            o,
            "mm_server_verdict_latency_seconds_count {}",
            m.latency.count
        );
        family(
            &mut o,
            "uptime_seconds",
            "gauge",
            "Seconds since the server started serving.",
        );
        let _ = writeln!(o, "mm_server_uptime_seconds {:.3}", self.uptime_s);
        o
    }
}

/// The value of an unlabelled or `nid`-labelled sample in rendered text
/// (for tests and `mm-server metrics --get`).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name).then(|| value.parse().ok())?
    })
}
