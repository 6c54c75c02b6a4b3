//! The core's answers to clients and operators, driven as the driver
//! drives it (a kernel played by hand): room for `Cold` moves taken back
//! from the kernel's credit, a node drained and detached while serving,
//! queued evictions, run-time policy, and page ages.

use mm_server::capacity::{Geometry, MAX_AGE_S, NodeAccount};
use mm_server::core::{
    Core, CoreConfig, Life, MoveRefused, NodeRefused, RETIRE_GRACE_NS, RuntimePolicy,
    STANDING_CALM_NS, TICK_NS,
};
use mm_server::policy::PolicyConfig;
use mm_upcall_proto::control::{Control, Standing};
use mm_upcall_proto::event::{Event, PlaceReason};

const START: u64 = 0x10_0000;
const PAGES: usize = 8192;
const S: u64 = 1_000_000_000;

fn geometry() -> Geometry {
    Geometry {
        capacity: 16 << 20,
        granule: 64,
        low: 60,
        high: 80,
        critical: 95,
    }
}

/// A new core managing node 1 with `policy`.
fn core(policy: PolicyConfig) -> Core {
    let cfg = CoreConfig {
        policy,
        hot_window_ns: S,
        drain_timeout_ns: 10 * S,
        detach_on_stop: true,
    };
    let account = NodeAccount::new(geometry(), START, PAGES).unwrap();
    Core::new(cfg, vec![(1, account)], 0).unwrap()
}

/// A core whose first RESYNC found the node empty, past the new server's
/// grace: serving, with the kernel holding whatever credit it set.
fn serving() -> (Core, u64) {
    let mut c = core(PolicyConfig::default());
    let mut now = 0;
    while now < 2 * RETIRE_GRACE_NS {
        now += TICK_NS;
        run_commands(&mut c, now, |_| 0);
        c.events_applied(now);
        c.tick(now, Vec::new());
    }
    run_commands(&mut c, now, |_| 0);
    (c, now)
}

/// Complete every command the core asked for with `result(cmd)` (a
/// RESYNC covers its whole range and reports no page); returns them.
fn run_commands(c: &mut Core, now: u64, mut result: impl FnMut(&Control) -> i32) -> Vec<Control> {
    let mut done = Vec::new();
    while let Some((id, ctrl)) = c.poll_command() {
        let r = match ctrl {
            Control::Resync { nr_pages, .. } => nr_pages as i32,
            _ => result(&ctrl),
        };
        c.completed(id, r, now);
        done.push(ctrl);
    }
    done
}

fn place(c: &mut Core, pfn: u64, reason: PlaceReason) {
    c.event(&Event::Placed {
        nid: 1,
        pfn,
        order: 0,
        tgid: 1,
        vaddr: 0,
        reason,
    });
}

#[test]
fn cold_moves_take_the_room_back_from_the_kernels_credit() {
    let (mut c, mut now) = serving();
    let credit = c.nodes()[0].account.credit();
    assert!(credit > 0, "the kernel was granted the node's room");
    // All the room is promised to the kernel: nothing now, but the credit
    // is taken back (SET_CREDIT 0) and more room is on the way.
    let m = c.begin_move(2048, now).unwrap();
    assert_eq!((m.nid, m.pages, m.more), (1, 0, true));
    let cmds = run_commands(&mut c, now, |_| 0);
    assert!(
        cmds.contains(&Control::SetCredit { nid: 1, pages: 0 }),
        "{cmds:?}"
    );
    // After the grace period the retired credit is released; the ticks
    // meanwhile grant the kernel nothing.
    for _ in 0..(2 * RETIRE_GRACE_NS / TICK_NS) {
        now += TICK_NS;
        c.tick(now, Vec::new());
        assert!(
            run_commands(&mut c, now, |_| 0)
                .iter()
                .all(|k| !matches!(k, Control::SetCredit { pages: 1.., .. })),
            "credit granted while a move waits"
        );
    }
    let m2 = c.begin_move(2048, now).unwrap();
    assert_eq!(m2.pages, 2048);
    // The pages arrive (the server's move_pages), then the moves end: the
    // reservation is released once their events are in.
    for p in 0..2048 {
        place(&mut c, START + p, PlaceReason::Migration);
    }
    c.end_move(m.ticket);
    c.end_move(m2.ticket);
    assert_eq!(c.nodes()[0].account.moving(), 0);
    assert_eq!(c.nodes()[0].account.resident_pages(), 2048);
    // Credit flows again.
    now += TICK_NS;
    c.tick(now, Vec::new());
    let cmds = run_commands(&mut c, now, |_| 0);
    assert!(
        cmds.iter()
            .any(|k| matches!(k, Control::SetCredit { pages: 1.., .. })),
        "{cmds:?}"
    );
}

#[test]
fn overlapping_moves_each_release_their_own_reservation() {
    let (mut c, now) = serving();
    // Moves that never end together (two clients alternating): each end
    // releases that move's reservation, so nothing piles up.
    let mut open = c.begin_move(0, now).unwrap();
    for _ in 0..100 {
        let next = c.begin_move(10, now).unwrap();
        c.end_move(open.ticket);
        open = next;
        assert!(c.nodes()[0].account.moving() <= 10);
    }
    c.end_move(open.ticket);
    assert_eq!(c.nodes()[0].account.moving(), 0);
    // An unknown or repeated ticket changes nothing.
    c.end_move(open.ticket);
    c.end_move(u64::MAX);
    assert_eq!(c.nodes()[0].account.moving(), 0);
}

#[test]
fn a_detached_node_is_left_alone_by_overflows_and_the_stop() {
    let (mut c, mut now) = serving();
    c.drain_node(1, now).unwrap();
    for _ in 0..50 {
        now += TICK_NS;
        c.tick(now, Vec::new());
        run_commands(&mut c, now, |_| 0);
        c.events_applied(now);
    }
    assert_eq!(c.nodes()[0].life, Life::Detached);
    // Lost events, then SIGTERM: nothing is asked about the detached node
    // (the kernel would refuse it with ENOENT), and the server stops.
    c.event(&Event::Overflow { lost: 10 });
    c.event_undecodable();
    c.events_applied(now);
    c.signal(1, now);
    for _ in 0..50 {
        now += TICK_NS;
        c.tick(now, Vec::new());
        let cmds = run_commands(&mut c, now, |_| -2);
        assert!(cmds.is_empty(), "commands about a detached node: {cmds:?}");
        c.events_applied(now);
    }
    assert_eq!(c.take_fatal(), None);
    assert_eq!(c.phase(), mm_server::core::Phase::Done);
    assert!(matches!(c.begin_move(1, now), Err(MoveRefused::NotManaged)));
}

#[test]
fn a_drain_waits_for_moves_in_flight() {
    let (mut c, mut now) = serving();
    // The first move takes the kernel's credit back; once the grace
    // period is over a second one gets room.
    let first = c.begin_move(1, now).unwrap();
    run_commands(&mut c, now, |_| 0);
    for _ in 0..(2 * RETIRE_GRACE_NS / TICK_NS) {
        now += TICK_NS;
        c.tick(now, Vec::new());
        run_commands(&mut c, now, |_| 0);
    }
    let m = c.begin_move(1, now).unwrap();
    assert_eq!(m.pages, 1);
    c.end_move(first.ticket);
    c.drain_node(1, now).unwrap();
    for _ in 0..20 {
        now += TICK_NS;
        c.tick(now, Vec::new());
        let cmds = run_commands(&mut c, now, |_| 0);
        assert!(
            !cmds.contains(&Control::DetachNode { nid: 1 }),
            "detached under a move"
        );
        c.events_applied(now);
    }
    c.end_move(m.ticket);
    for _ in 0..20 {
        now += TICK_NS;
        c.tick(now, Vec::new());
        run_commands(&mut c, now, |_| 0);
        c.events_applied(now);
    }
    assert_eq!(c.nodes()[0].life, Life::Detached);
}

#[test]
fn a_drained_node_is_emptied_shown_empty_and_detached() {
    let (mut c, mut now) = serving();
    for p in 0..100 {
        place(&mut c, START + p, PlaceReason::Demotion);
    }
    c.drain_node(1, now).unwrap();
    assert_eq!(c.drain_node(1, now), Err(NodeRefused::Draining));
    assert_eq!(c.nodes()[0].life, Life::Draining);
    let mut detached = false;
    for _ in 0..200 {
        now += TICK_NS;
        c.tick(now, Vec::new());
        let mut freed = Vec::new();
        let cmds = run_commands(&mut c, now, |k| {
            if let Control::PromotePfn { pfn, .. } = *k {
                freed.push(pfn);
            }
            0
        });
        for pfn in freed {
            c.event(&Event::Promoted {
                nid: 1,
                pfn,
                order: 0,
                target_nid: 0,
            });
        }
        c.events_applied(now);
        detached |= cmds.contains(&Control::DetachNode { nid: 1 });
        if c.nodes()[0].life == Life::Detached {
            break;
        }
    }
    assert!(detached);
    assert_eq!(c.nodes()[0].life, Life::Detached);
    assert_eq!(c.nodes()[0].account.resident_pages(), 0);
    // Nothing more for it: no credit, no moves, no operator commands.
    assert!(c.begin_move(1, now).is_err());
    assert_eq!(
        c.evict_queued(1, vec![START], now),
        Err(NodeRefused::Draining)
    );
}

#[test]
fn queued_evictions_go_out_as_slots_free() {
    let (mut c, mut now) = serving();
    for p in 0..1000 {
        place(&mut c, START + p, PlaceReason::Demotion);
    }
    c.evict_queued(1, (START..START + 1000).collect(), now)
        .unwrap();
    let mut evicted = 0;
    for _ in 0..100 {
        let n = run_commands(&mut c, now, |_| 0)
            .iter()
            .filter(|k| matches!(k, Control::PromotePfn { .. }))
            .count();
        assert!(n <= mm_server::core::MAX_EVICTIONS_IN_FLIGHT);
        evicted += n;
        now += TICK_NS;
        c.tick(now, Vec::new());
    }
    assert_eq!(evicted, 1000);
}

#[test]
fn policy_is_set_at_run_time_all_or_nothing() {
    let (mut c, now) = serving();
    let mut p = c.policy_get(1).unwrap();
    assert_eq!(p.watermarks, (60, 80, 95));
    p.watermarks = (50, 70, 90);
    p.hot_window_ms = 500;
    c.policy_set(&p, now).unwrap();
    assert_eq!(c.policy_get(1).unwrap(), p);
    let bad = RuntimePolicy {
        watermarks: (90, 70, 95),
        hot_threshold: 9,
        ..p.clone()
    };
    assert!(c.policy_set(&bad, now).is_err());
    assert_eq!(c.policy_get(1).unwrap(), p, "a refused set changes nothing");
    assert_eq!(c.policy_get(7), Err(NodeRefused::NotManaged));
}

#[test]
fn page_ages_count_from_arrival_and_stop_at_the_maximum() {
    let mut a = NodeAccount::new(geometry(), START, PAGES).unwrap();
    a.set_clock(100, 0);
    a.placed(START, 0, false).unwrap();
    a.set_clock(150, 0);
    a.placed(START + 1, 0, false).unwrap();
    assert_eq!(a.aged(40, 10), vec![START]);
    assert_eq!(a.aged(0, 10), vec![START, START + 1]);
    // Two hours on, swept all along: both count as MAX_AGE_S old, not as
    // whatever their 12-bit stamps wrapped to.
    for t in (150..150 + 7200).step_by(60) {
        a.set_clock(t, 2);
    }
    a.placed(START + 2, 0, false).unwrap();
    assert_eq!(a.aged(MAX_AGE_S, 10), vec![START, START + 1]);
    assert_eq!(a.aged(1, 10), vec![START, START + 1]);
}

/// The SET_STANDING commands among `cmds`.
fn standings(cmds: &[Control]) -> Vec<Standing> {
    cmds.iter()
        .filter_map(|c| match *c {
            Control::SetStanding { nid: 1, standing } => Some(standing),
            _ => None,
        })
        .collect()
}

#[test]
fn a_standing_verdict_stands_while_the_write_fault_answer_is_fixed() {
    // serving() ran the first ticks: with no writable budget and no fast
    // node short of memory the kernel was told to promote on its own.
    let (mut c, mut now) = serving();
    assert_eq!(c.nodes()[0].standing, Standing::Default);
    assert_eq!(c.snapshot(now).nodes[0].0.standing, 1);
    now += TICK_NS;
    c.tick(now, Vec::new());
    assert!(
        standings(&run_commands(&mut c, now, |_| 0)).is_empty(),
        "nothing is sent while it holds"
    );

    // A writable budget: the answer depends on the page (in place while
    // the budget lasts), so every fault is asked again.
    let mut p = c.policy_get(1).unwrap();
    p.writable_budget = 64;
    c.policy_set(&p, now).unwrap();
    assert_eq!(
        standings(&run_commands(&mut c, now, |_| 0)),
        vec![Standing::Ask]
    );
    assert_eq!(c.nodes()[0].standing, Standing::Ask);
    p.writable_budget = 0;
    c.policy_set(&p, now).unwrap();
    assert_eq!(
        standings(&run_commands(&mut c, now, |_| 0)),
        vec![Standing::Default]
    );

    // A fast node short of memory: the target depends on the faulting
    // CPU's node.
    now += TICK_NS;
    c.tick(now, vec![0]);
    assert_eq!(
        standings(&run_commands(&mut c, now, |_| 0)),
        vec![Standing::Ask]
    );
    // Left again only once no fast node was short for a while (a node
    // hovering at the mark would flip it every tick).
    now += TICK_NS;
    c.tick(now, Vec::new());
    assert!(standings(&run_commands(&mut c, now, |_| 0)).is_empty());
    now += STANDING_CALM_NS;
    // A failure is retried later, not on every tick.
    c.tick(now, Vec::new());
    assert_eq!(
        standings(&run_commands(&mut c, now, |_| -libc::EIO)),
        vec![Standing::Default]
    );
    assert_eq!(c.nodes()[0].standing, Standing::Ask);
    now += TICK_NS;
    c.tick(now, Vec::new());
    assert!(standings(&run_commands(&mut c, now, |_| 0)).is_empty());
    now += 10 * S;
    c.tick(now, Vec::new());
    assert_eq!(
        standings(&run_commands(&mut c, now, |_| 0)),
        vec![Standing::Default]
    );
}

#[test]
fn a_kernel_without_set_standing_is_asked_every_fault() {
    let mut c = core(PolicyConfig::default());
    let mut sent = Vec::new();
    let mut now = 0;
    for _ in 0..20 {
        now += TICK_NS;
        c.tick(now, Vec::new());
        sent.extend(run_commands(&mut c, now, |ctrl| match ctrl {
            Control::SetStanding { .. } => -libc::EOPNOTSUPP,
            _ => 0,
        }));
        now += 10 * S;
    }
    assert_eq!(standings(&sent), vec![Standing::Default], "asked once");
    assert_eq!(c.nodes()[0].standing, Standing::Ask);
}

#[test]
fn standing_verdicts_can_be_turned_off() {
    let mut c = core(PolicyConfig {
        standing_verdicts: false,
        ..PolicyConfig::default()
    });
    let mut now = 0;
    for _ in 0..10 {
        now += TICK_NS;
        c.tick(now, Vec::new());
        assert!(standings(&run_commands(&mut c, now, |_| 0)).is_empty());
    }
}
