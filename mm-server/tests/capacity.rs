//! The capacity model against a plain model of the same rules, plus the
//! behaviours the design names.

use std::collections::BTreeMap;

use mm_server::capacity::{
    AccountError, Geometry, Level, NodeAccount, PAGE_SIZE, PageState, measure, pfn_hash,
};
use proptest::prelude::*;

const START: u64 = 0x4_0000;
const PAGES: usize = 64;

fn geometry(capacity_pages: u64) -> Geometry {
    Geometry {
        capacity: capacity_pages * u64::from(PAGE_SIZE),
        granule: 64,
        low: 60,
        high: 80,
        critical: 95,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Grant(u64),
    Revoke(u64),
    Place(usize),
    Measure(usize, u32),
    Leave(usize),
    Allow(usize),
    Evict,
    /// SET_CREDIT: live credit becomes retiring.
    Retire,
    /// The grace period after it ended.
    Release,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..20).prop_map(Op::Grant),
        (0u64..5).prop_map(Op::Revoke),
        (0..PAGES).prop_map(Op::Place),
        (0..PAGES, prop_oneof![Just(0u32), 1u32..=5000]).prop_map(|(i, s)| Op::Measure(i, s)),
        (0..PAGES).prop_map(Op::Leave),
        (0..PAGES).prop_map(Op::Allow),
        Just(Op::Evict),
        Just(Op::Retire),
        Just(Op::Release),
    ]
}

/// The plain model: what each resident page costs, by the stated rules.
#[derive(Default)]
struct Model {
    pages: BTreeMap<u64, Option<u32>>, // None: unmeasured or writable
    writable: BTreeMap<u64, ()>,
    credit: u64,
    retiring: u64,
}

impl Model {
    fn cost(&self, g: &Geometry, pfn: u64) -> u64 {
        match self.pages.get(&pfn) {
            None => 0,
            Some(_) if self.writable.contains_key(&pfn) => u64::from(g.worst_case()),
            Some(None) => u64::from(g.worst_case()),
            Some(Some(b)) => u64::from(g.round(*b)),
        }
    }
    fn used(&self, g: &Geometry) -> u64 {
        self.pages.keys().map(|&p| self.cost(g, p)).sum()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever the kernel and the server do, with placements only through
    /// credit, `used + reserved` never exceeds capacity, and the running
    /// totals equal both a recount and the plain model.
    #[test]
    fn accounted_use_never_exceeds_capacity(cap in 4u64..80, ops in proptest::collection::vec(op(), 1..200)) {
        let g = geometry(cap);
        let mut acct = NodeAccount::new(g, START, PAGES).unwrap();
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Grant(n) => {
                    let got = acct.grant(n);
                    prop_assert!(got <= n);
                    model.credit += got;
                }
                Op::Revoke(n) => {
                    acct.revoke(n);
                    model.credit = model.credit.saturating_sub(n);
                }
                Op::Place(i) => {
                    let pfn = START + i as u64;
                    // The kernel places only with credit (retiring credit
                    // is what in-flight demotions already took).
                    if model.credit + model.retiring > 0 && !model.pages.contains_key(&pfn) {
                        acct.placed(pfn, 0, true).unwrap();
                        if model.retiring > 0 {
                            model.retiring -= 1;
                        } else {
                            model.credit -= 1;
                        }
                        model.pages.insert(pfn, None);
                    } else if model.pages.contains_key(&pfn) {
                        prop_assert_eq!(acct.placed(pfn, 0, true), Err(AccountError::AlreadyResident { pfn }));
                    }
                }
                Op::Measure(i, bytes) => {
                    let pfn = START + i as u64;
                    let bytes = bytes.min(g.worst_case());
                    match model.pages.get_mut(&pfn) {
                        Some(m) => {
                            acct.measured(pfn, bytes).unwrap();
                            // Writable pages stay at the worst case; a
                            // measured page keeps its first size.
                            if !model.writable.contains_key(&pfn) && m.is_none() {
                                *m = Some(bytes);
                            }
                        }
                        None => prop_assert_eq!(acct.measured(pfn, bytes), Err(AccountError::NotResident { pfn })),
                    }
                }
                Op::Leave(i) => {
                    let pfn = START + i as u64;
                    if model.pages.remove(&pfn).is_some() {
                        model.writable.remove(&pfn);
                        acct.left(pfn, 0).unwrap();
                    } else {
                        prop_assert!(acct.left(pfn, 0).is_err());
                    }
                }
                Op::Allow(i) => {
                    let pfn = START + i as u64;
                    if model.pages.contains_key(&pfn) && acct.allow_in_place(pfn, 4).unwrap() {
                        model.writable.insert(pfn, ());
                    }
                }
                Op::Evict => {
                    let pressured = acct.level() >= Level::High;
                    for pfn in acct.eviction_plan() {
                        acct.left(pfn, 0).unwrap();
                        model.pages.remove(&pfn);
                        model.writable.remove(&pfn);
                    }
                    // Eviction frees pages, not credit: what stays resident
                    // fits under the low watermark.
                    let low = g.capacity * u64::from(g.low) / 100;
                    prop_assert!(!pressured || acct.used() <= low,
                        "used {} > low {low} after eviction", acct.used());
                }
                Op::Retire => {
                    prop_assert_eq!(acct.retire(), model.credit);
                    model.retiring += model.credit;
                    model.credit = 0;
                }
                Op::Release => {
                    // In the daemon, only after the in-flight demotions
                    // have landed: the model drops what is left.
                    acct.release_retired();
                    model.retiring = 0;
                }
            }
            prop_assert!(acct.committed() <= g.capacity,
                "committed {} > capacity {}", acct.committed(), g.capacity);
            prop_assert_eq!(acct.used(), model.used(&g));
            prop_assert_eq!(acct.credit(), model.credit);
            prop_assert_eq!(acct.retiring(), model.retiring);
            let (used, resident, zero) = acct.recount();
            prop_assert_eq!(used, acct.used());
            prop_assert_eq!(resident, acct.resident_pages());
            prop_assert_eq!(zero, acct.zero_pages());
            // The block summaries agree with the pages.
            prop_assert_eq!(acct.resident_sample(usize::MAX, |_| false).len() as u64, resident);
            let unmeasured = (0..PAGES as u64)
                .filter(|i| acct.state(START + i) == Some(PageState::Unmeasured))
                .count() as u64;
            prop_assert_eq!(acct.unmeasured(), unmeasured);
            // The set hash is the model's set, not just its size.
            let set = model.pages.keys().fold(0u64, |h, &p| h.wrapping_add(pfn_hash(p)));
            prop_assert_eq!(acct.set_hash(), set & ((1 << 52) - 1));
            prop_assert!(model.writable.len() <= 4);
        }
    }

    /// After applying the eviction plan, use is below the low watermark
    /// (unless what is left costs nothing or is credit).
    #[test]
    fn watermark_eviction_brings_use_under_the_low_mark(sizes in proptest::collection::vec(0u32..=4096, 1..PAGES)) {
        let g = geometry(40);
        let mut acct = NodeAccount::new(g, START, PAGES).unwrap();
        for (i, &s) in sizes.iter().enumerate() {
            let pfn = START + i as u64;
            acct.placed(pfn, 0, false).unwrap();
            acct.measured(pfn, s).unwrap();
        }
        let pressured = acct.level() >= Level::High;
        let plan = acct.eviction_plan();
        prop_assert_eq!(plan.is_empty(), !pressured, "evict only above the high watermark");
        for pfn in plan {
            acct.left(pfn, 0).unwrap();
        }
        let low = g.capacity * u64::from(g.low) / 100;
        if pressured {
            prop_assert!(acct.used() <= low, "used {} > low {}", acct.used(), low);
        }
    }
}

#[test]
fn grant_when_node_full_is_denied() {
    let g = geometry(10);
    let mut acct = NodeAccount::new(g, START, PAGES).unwrap();
    let first = acct.grant(1000);
    assert!(first > 0 && first < 1000, "granted {first}");
    assert_eq!(acct.grant(1), 0, "no credit above the high watermark");
    assert!(acct.committed() <= g.capacity * 80 / 100);
}

#[test]
fn zero_pages_cost_nothing() {
    let g = geometry(10);
    let mut acct = NodeAccount::new(g, START, PAGES).unwrap();
    acct.placed(START, 3, false).unwrap();
    for i in 0..8 {
        acct.measured(START + i, measure(&g, &[0u8; 4096])).unwrap();
    }
    assert_eq!(acct.used(), 0);
    assert_eq!(acct.zero_pages(), 8);
    assert_eq!(acct.resident_pages(), 8);
}

#[test]
fn measured_size_above_the_reservation_is_charged_in_full() {
    let g = geometry(10);
    let mut acct = NodeAccount::new(g, START, PAGES).unwrap();
    assert_eq!(acct.grant(1), 1);
    acct.placed(START, 0, true).unwrap();
    let over = g.worst_case() + 100;
    acct.measured(START, over).unwrap();
    assert_eq!(acct.used(), u64::from(g.round(over)));
    assert_eq!(acct.reserved(), 0);
}

#[test]
fn writable_budget_is_honoured_and_reserves_a_full_page() {
    let g = geometry(40);
    let mut acct = NodeAccount::new(g, START, PAGES).unwrap();
    for i in 0..4 {
        acct.placed(START + i, 0, false).unwrap();
        acct.measured(START + i, 100).unwrap();
    }
    let before = acct.used();
    assert!(acct.allow_in_place(START, 2).unwrap());
    assert!(acct.allow_in_place(START + 1, 2).unwrap());
    assert!(
        !acct.allow_in_place(START + 2, 2).unwrap(),
        "budget of 2 exceeded"
    );
    assert_eq!(acct.used(), before + 2 * u64::from(g.worst_case() - 128));
}

#[test]
fn default_budget_zero_allows_nothing_in_place() {
    let g = geometry(40);
    let mut acct = NodeAccount::new(g, START, PAGES).unwrap();
    acct.placed(START, 0, false).unwrap();
    assert!(!acct.allow_in_place(START, 0).unwrap());
}

#[test]
fn real_contents_compress_by_their_entropy() {
    let g = geometry(10);
    let text: Vec<u8> = b"mm-upcall ".iter().copied().cycle().take(4096).collect();
    let mut random = vec![0u8; 4096];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in &mut random {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let t = measure(&g, &text);
    let r = measure(&g, &random);
    assert!(t > 0 && t <= 256, "repetitive text took {t}");
    assert!(r > 4096 && r <= g.worst_case(), "random page took {r}");
    assert_eq!(t % 64, 0);
}

#[test]
fn bad_geometry_says_what_to_fix() {
    let mut g = geometry(10);
    g.granule = 48;
    assert_eq!(
        g.validate().unwrap_err().to_string(),
        "granule must be a power of two between 8 and 4096 bytes, got 48"
    );
    let mut g = geometry(10);
    g.high = 50;
    g.low = 70;
    assert!(
        g.validate()
            .unwrap_err()
            .to_string()
            .contains("low < high < critical")
    );
    let mut g = geometry(10);
    g.capacity = 100;
    assert!(NodeAccount::new(g, 0, 1).is_err());
}

#[test]
fn events_outside_the_node_are_errors_not_panics() {
    let g = geometry(10);
    let mut acct = NodeAccount::new(g, START, PAGES).unwrap();
    assert_eq!(
        acct.placed(START - 1, 0, true),
        Err(AccountError::OutOfNode { pfn: START - 1 })
    );
    assert!(
        acct.placed(START + PAGES as u64 - 1, 1, true).is_err(),
        "folio crossing the end"
    );
    assert_eq!(
        acct.measured(START + 1000, 5),
        Err(AccountError::OutOfNode { pfn: START + 1000 })
    );
    assert_eq!(acct.resident_pages(), 0);
}

#[test]
fn metadata_is_four_bytes_per_page() {
    let acct = NodeAccount::new(geometry(10), START, PAGES).unwrap();
    assert_eq!(acct.metadata_bytes_per_page(), 4);
}

#[test]
fn compressible_pages_earn_credit_beyond_the_worst_case() {
    // 100 pages of capacity; pages that compress to one granule each.
    let g = geometry(100);
    let mut acct = NodeAccount::new(g, START, 8192).unwrap();
    let mut placed = 0u64;
    loop {
        let got = acct.grant(64);
        if got == 0 {
            break;
        }
        for _ in 0..got {
            let pfn = START + placed;
            acct.placed(pfn, 0, true).unwrap();
            acct.measured(pfn, 40).unwrap();
            placed += 1;
            assert!(acct.committed() <= g.capacity);
        }
        if placed >= 8000 {
            break;
        }
    }
    // 80 % of 100 pages at 64 bytes a page.
    assert!(placed > 4000, "only {placed} pages fit");
    assert!(acct.used() <= g.capacity * 80 / 100);
    assert_eq!(acct.expected_cost(), 64);
}

#[test]
fn retired_credit_stays_reserved_until_released() {
    let g = geometry(100);
    let mut acct = NodeAccount::new(g, START, PAGES).unwrap();
    let first = acct.grant(10);
    assert_eq!(first, 10);
    let committed = acct.committed();
    // SET_CREDIT 0: the kernel may still place what it took before.
    assert_eq!(acct.retire(), 10);
    assert_eq!(acct.credit(), 0);
    assert_eq!(
        acct.committed(),
        committed,
        "retiring credit is still reserved"
    );
    // A regrant counts the retiring reservation: capacity is never doubled.
    let again = acct.grant(1000);
    assert!(acct.committed() <= g.capacity);
    // A late PLACED of the old credit uses the retiring reservation.
    acct.placed(START, 0, true).unwrap();
    assert_eq!(acct.retiring(), 9);
    assert_eq!(acct.credit(), again);
    acct.release_retired();
    assert_eq!(acct.retiring(), 0);
    assert!(acct.committed() <= g.capacity);
}

#[test]
fn eviction_goes_on_from_high_down_to_low() {
    let g = geometry(40);
    let mut acct = NodeAccount::new(g, START, PAGES).unwrap();
    for i in 0..36 {
        acct.placed(START + i, 0, false).unwrap();
        acct.measured(START + i, 4096).unwrap();
    }
    assert!(acct.level() >= Level::High);
    // Evict only what takes it just under high: the level is Normal again,
    // but an eviction that started goes on to low.
    let high = g.capacity * u64::from(g.high) / 100;
    let mut i = 0;
    while acct.projected() >= high {
        acct.left(START + i, 0).unwrap();
        i += 1;
    }
    assert_eq!(acct.level(), Level::Normal);
    assert!(acct.eviction_plan().is_empty());
    assert!(acct.above_low());
    let rest = acct.plan_to_low();
    assert!(!rest.is_empty());
    for pfn in rest {
        acct.left(pfn, 0).unwrap();
    }
    assert!(!acct.above_low());
}

#[test]
fn costed_walks_the_node_a_block_at_a_time_with_each_pages_cost() {
    use mm_server::capacity::BLOCK_PAGES;
    let g = geometry(1 << 20);
    let pages = 3 * BLOCK_PAGES;
    let mut acct = NodeAccount::new(g, START, pages).unwrap();
    // One page in the first block (measured), none in the second, two in
    // the third (one not measured yet).
    let third = START + 2 * BLOCK_PAGES as u64;
    for pfn in [START + 5, third, third + 1] {
        acct.placed(pfn, 0, false).unwrap();
    }
    acct.measured(START + 5, 100).unwrap();
    let (first, next) = acct.costed(START, 1);
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].pfn, first[0].bytes), (START + 5, 128));
    assert_eq!(next, Some(START + BLOCK_PAGES as u64));
    let (rest, end) = acct.costed(next.unwrap(), 1);
    assert_eq!(
        rest.iter().map(|c| c.pfn).collect::<Vec<_>>(),
        [third, third + 1]
    );
    assert_eq!(
        rest[1].bytes,
        g.worst_case(),
        "an unmeasured page costs the worst case"
    );
    assert_eq!(end, None);
    // From the middle of a block: only what lies from there on.
    assert_eq!(acct.costed(third + 1, 10).0.len(), 1);
}
