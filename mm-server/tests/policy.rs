//! Policy decisions.

use mm_server::capacity::{Geometry, NodeAccount, PAGE_SIZE};
use mm_server::policy::{Policy, PolicyConfig, RateLimit};
use mm_upcall_proto::upcall::{Fault, Upcall};
use mm_upcall_proto::verdict::Verdict;

const NID: u16 = 1;
const START: u64 = 0x4_0000;

fn node(pages: usize, capacity_pages: u64) -> NodeAccount {
    NodeAccount::new(
        Geometry {
            capacity: capacity_pages * u64::from(PAGE_SIZE),
            granule: 64,
            low: 60,
            high: 80,
            critical: 95,
        },
        START,
        pages,
    )
    .unwrap()
}

fn fault(pfn: u64) -> Fault {
    Fault {
        nid: NID,
        cpu_nid: 0,
        order: 0,
        thp: false,
        tgid: 100,
        tid: 100,
        pfn,
        vaddr: 0x7000_0000 + (pfn - START) * 4096,
    }
}

fn policy(cfg: PolicyConfig, pages: usize) -> Policy {
    let mut p = Policy::new(cfg, 0);
    let mut n = node(pages, pages as u64);
    for i in 0..pages as u64 {
        n.placed(START + i, 0, false).unwrap();
        n.measured(START + i, 512).unwrap();
    }
    p.add_node(NID, n);
    p
}

#[test]
fn write_fault_promotes_to_the_faulting_cpus_node_by_default() {
    let mut p = policy(PolicyConfig::default(), 8);
    assert_eq!(
        p.decide(&Upcall::WriteFault(fault(START)), 0),
        Verdict::Promote { nid: 0 }
    );
}

#[test]
fn writable_budget_is_honoured() {
    let cfg = PolicyConfig {
        writable_budget: 2,
        ..PolicyConfig::default()
    };
    let mut p = policy(cfg, 8);
    let v: Vec<Verdict> = (0..4)
        .map(|i| p.decide(&Upcall::WriteFault(fault(START + i)), 0))
        .collect();
    assert_eq!(
        v,
        [
            Verdict::AllowInPlace,
            Verdict::AllowInPlace,
            Verdict::Promote { nid: 0 },
            Verdict::Promote { nid: 0 }
        ]
    );
    assert_eq!(p.decisions.in_place, 2);
}

#[test]
fn promotion_goes_to_a_fast_node_with_free_memory() {
    let cfg = PolicyConfig {
        fast_nodes: vec![0, 2],
        ..PolicyConfig::default()
    };
    let mut p = policy(cfg, 8);
    let wf = |p: &mut Policy| p.decide(&Upcall::WriteFault(fault(START)), 0);
    assert_eq!(wf(&mut p), Verdict::Promote { nid: 0 });
    // The faulting CPU's node is short: the next fast node.
    p.set_low_on_memory(vec![0]);
    assert_eq!(wf(&mut p), Verdict::Promote { nid: 2 });
    // All short: the nearest anyway.
    p.set_low_on_memory(vec![0, 2]);
    assert_eq!(wf(&mut p), Verdict::Promote { nid: 0 });
}

#[test]
fn a_thp_is_never_written_in_place() {
    // A PMD write would make 512 pages writable on one page of budget.
    let cfg = PolicyConfig {
        writable_budget: 1024,
        ..PolicyConfig::default()
    };
    let mut p = policy(cfg, 8);
    let thp = Fault {
        thp: true,
        order: 9,
        ..fault(START)
    };
    assert_eq!(
        p.decide(&Upcall::WriteFault(thp), 0),
        Verdict::Promote { nid: 0 }
    );
    assert_eq!(p.decisions.in_place, 0);
}

#[test]
fn credit_requests_get_a_chunk_not_one_page() {
    let mut p = Policy::new(PolicyConfig::default(), 0);
    p.add_node(NID, node(1 << 16, 1 << 16));
    let v = p.decide(
        &Upcall::DemoteCredit {
            nid: NID,
            wanted_pages: 1,
        },
        0,
    );
    assert_eq!(v, Verdict::Grant { pages: 4096 });
}

#[test]
fn hint_faults_promote_hot_pages_only() {
    let mut p = policy(PolicyConfig::default(), 8);
    let hint = |pfn| Upcall::HintFault {
        fault: fault(pfn),
        since_scan_ms: 10,
    };
    assert_eq!(
        p.decide(&hint(START), 0),
        Verdict::Stay,
        "one access is not hot"
    );
    assert_eq!(
        p.decide(&hint(START), 1),
        Verdict::Promote { nid: 0 },
        "two are (threshold 2)"
    );
    assert_eq!(p.decide(&hint(START + 1), 2), Verdict::Stay);
}

#[test]
fn promotion_rate_limit_is_honoured() {
    // 1 MB/s = 256 pages/s; every page is hot at its first hint.
    let cfg = PolicyConfig {
        hot_threshold: 1,
        promote_rate_limit_mbps: 1,
        ..PolicyConfig::default()
    };
    let pages = 4096;
    let mut p = policy(cfg, pages);
    let mut promoted = 0;
    // 4096 hint faults spread over 2 simulated seconds.
    for i in 0..pages as u64 {
        let now = i * 2_000_000_000 / pages as u64;
        let v = p.decide(
            &Upcall::HintFault {
                fault: fault(START + i),
                since_scan_ms: 0,
            },
            now,
        );
        if v != Verdict::Stay {
            promoted += 1;
        }
    }
    // At most one second of burst plus two seconds of refill.
    assert!(
        promoted <= 3 * 256,
        "{promoted} promotions at 1 MB/s over 2 s"
    );
    assert!(
        promoted >= 2 * 256,
        "only {promoted} promotions: the limiter starves"
    );
    assert!(p.decisions.rate_limited > 0);
}

#[test]
fn rate_limit_refills_with_time() {
    let mut r = RateLimit::new(1, 0);
    assert!(r.take(1 << 20, 0));
    assert!(!r.take(4096, 0));
    assert!(r.take(4096, 1_000_000_000 / 256 + 1));
}

#[test]
fn credit_is_granted_until_the_high_watermark_then_denied() {
    let mut p = Policy::new(PolicyConfig::default(), 0);
    p.add_node(NID, node(1024, 100));
    let mut granted = 0u64;
    loop {
        match p.decide(
            &Upcall::DemoteCredit {
                nid: NID,
                wanted_pages: 16,
            },
            0,
        ) {
            Verdict::Grant { pages } => granted += u64::from(pages),
            Verdict::Deny => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let n = p.node(NID).unwrap();
    assert_eq!(n.credit(), granted);
    assert!(n.committed() <= 100 * 4096 * 80 / 100);
    assert!(granted > 0);
    assert_eq!(
        p.decide(
            &Upcall::DemoteCredit {
                nid: 7,
                wanted_pages: 1
            },
            0
        ),
        Verdict::Deny,
        "unknown node"
    );
}
