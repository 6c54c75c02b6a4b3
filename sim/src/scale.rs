//! The core at scale: a managed node of any size (a 1 TiB node is
//! 268,435,456 pages), filled by a full RESYNC, then measured and planned
//! for eviction.  Prints the server's resident memory, the rebuild time
//! and the cost of one eviction plan, next to the same for a 1 GiB node
//! measured in the same run.
//!
//! The kernel here is a generator (a fake): every page of the node is
//! resident, RESYNC reports them in chunks of the event queue's size as
//! encoded event records, which the core decodes and applies as the
//! driver does.  What is timed is the server's work, not the kernel's.

use std::time::{Duration, Instant};

use mm_server::capacity::{Geometry, NodeAccount, PAGE_SIZE};
use mm_server::core::{Books, Core, CoreConfig};
use mm_server::policy::PolicyConfig;
use mm_upcall_proto::control::Control;
use mm_upcall_proto::event::{self, Event, PlaceReason};
use zerocopy::IntoBytes as _;

const START_PFN: u64 = 0x100_0000;
/// The kernel's event queue (records per RESYNC chunk).
const QUEUE: u64 = 4096;

/// What one node size measured.
#[derive(Debug)]
pub struct Figures {
    pub pages: u64,
    pub rss_bytes: u64,
    pub rebuild: Duration,
    pub measure: Duration,
    pub plan: Duration,
    pub plan_pages: usize,
}

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// A page's compressed size: a spread like a real heap's.
fn size_of_page(pfn: u64) -> u32 {
    match pfn % 10 {
        0 => 0,
        1..=6 => 400 + (pfn % 1200) as u32,
        7 | 8 => 1600 + (pfn % 1800) as u32,
        _ => PAGE_SIZE + 16,
    }
}

/// Build a node of `pages` pages, rebuild its books from a full RESYNC,
/// measure every page, and time one eviction plan.
pub fn run(pages: u64) -> Figures {
    let g = Geometry {
        // A quarter of the logical size: well above high once full.
        capacity: pages * u64::from(PAGE_SIZE) / 4,
        granule: 64,
        low: 60,
        high: 80,
        critical: 95,
    };
    let cfg = CoreConfig {
        policy: PolicyConfig::default(),
        hot_window_ns: 1_000_000_000,
        drain_timeout_ns: 1_000_000_000,
        detach_on_stop: false,
    };
    let before = rss();
    let account = NodeAccount::new(g, START_PFN, pages as usize).expect("geometry");
    let mut core = Core::new(cfg, vec![(1, account)], 0).expect("config");
    let mut buf: Vec<u8> = Vec::with_capacity(QUEUE as usize * event::EVENT_SIZE);
    let t0 = Instant::now();
    let mut now = 0u64;
    while core.nodes()[0].books != (Books::Live { settling: true }) {
        let mut progressed = false;
        while let Some((id, ctrl)) = core.poll_command() {
            progressed = true;
            let r = match ctrl {
                Control::Resync {
                    start_pfn,
                    nr_pages,
                    ..
                } => {
                    // The kernel: every page resident, reported until the
                    // queue is full; the driver reads and decodes them.
                    let n = nr_pages.min(QUEUE);
                    buf.clear();
                    for pfn in start_pfn..start_pfn + n {
                        let ev = Event::Placed {
                            nid: 1,
                            pfn,
                            order: 0,
                            tgid: 0,
                            vaddr: 0,
                            reason: PlaceReason::Resync,
                        };
                        buf.extend_from_slice(ev.to_raw().as_bytes());
                    }
                    for ev in event::decode_batch(&buf) {
                        core.event(&ev.expect("valid record"));
                    }
                    n as i32
                }
                _ => 0,
            };
            core.completed(id, r, now);
        }
        now += 1;
        core.events_applied(now);
        assert!(progressed, "the core stopped asking for RESYNC chunks");
    }
    let rebuild = t0.elapsed();
    let t1 = Instant::now();
    while let Some((i, pfn)) = core.pop_measure() {
        core.measured(i, pfn, Some(size_of_page(pfn)));
    }
    let measure = t1.elapsed();
    let rss_bytes = rss().saturating_sub(before);
    let a = &core.nodes()[0].account;
    let rounds = 20u32;
    let t2 = Instant::now();
    let mut plan_pages = 0;
    for _ in 0..rounds {
        plan_pages = std::hint::black_box(a.plan_to_low_limited(128, |_| false)).len();
    }
    let plan = t2.elapsed() / rounds;
    Figures {
        pages,
        rss_bytes,
        rebuild,
        measure,
        plan,
        plan_pages,
    }
}
