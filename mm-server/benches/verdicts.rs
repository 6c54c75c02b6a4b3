//! Verdict decisions per second on one core: decode a raw descriptor,
//! decide, encode the COMMIT_AND_FETCH payload.  The baseline in the same
//! run is the decode+encode alone (no policy), so the ratio is the cost the
//! policy adds.
//!
//! `cargo bench -p mm-server --bench verdicts`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mm_server::capacity::{Geometry, NodeAccount};
use mm_server::core::{Core, CoreConfig};
use mm_server::policy::{Policy, PolicyConfig};
use mm_upcall_proto::event::{Event, PlaceReason};
use mm_upcall_proto::upcall::{Fault, Request, Upcall};
use mm_upcall_proto::verdict::{IoCommand, Verdict};
use zerocopy::IntoBytes as _;

const N: usize = 4096;
const START: u64 = 0x4_0000;

fn descs() -> Vec<[u8; 56]> {
    (0..N as u64)
        .map(|i| {
            let fault = Fault {
                nid: 1,
                cpu_nid: 0,
                order: 0,
                thp: false,
                tgid: 1,
                tid: 1,
                pfn: START + i,
                vaddr: i * 4096,
            };
            let upcall = if i % 2 == 0 {
                Upcall::WriteFault(fault)
            } else {
                Upcall::HintFault {
                    fault,
                    since_scan_ms: 5,
                }
            };
            let mut b = [0u8; 56];
            b.copy_from_slice(
                Request {
                    seq: i as u32,
                    upcall,
                }
                .to_raw()
                .as_bytes(),
            );
            b
        })
        .collect()
}

fn policy() -> Policy {
    let g = Geometry {
        capacity: 1 << 30,
        granule: 64,
        low: 60,
        high: 80,
        critical: 95,
    };
    let mut n = NodeAccount::new(g, START, N).unwrap();
    for i in 0..N as u64 {
        n.placed(START + i, 0, false).unwrap();
        n.measured(START + i, 700).unwrap();
    }
    let mut p = Policy::new(PolicyConfig::default(), 0);
    p.add_node(1, n);
    p
}

/// The server's core with the same node, its books built from PLACED
/// events as the driver would.
fn core() -> Core {
    let g = Geometry {
        capacity: 1 << 30,
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
    let mut c = Core::new(cfg, vec![(1, NodeAccount::new(g, START, N).unwrap())], 0).unwrap();
    for i in 0..N as u64 {
        c.event(&Event::Placed {
            nid: 1,
            pfn: START + i,
            order: 0,
            tgid: 1,
            vaddr: 0,
            reason: PlaceReason::Resync,
        });
    }
    while let Some((n, pfn)) = c.pop_measure() {
        c.measured(n, pfn, Some(700));
    }
    c
}

/// Decode every descriptor, decide with `decide` (the clock advancing
/// 1 ms per batch), encode the COMMIT_AND_FETCH.
fn decide_all(
    b: &mut criterion::Bencher<'_>,
    descs: &[[u8; 56]],
    mut decide: impl FnMut(&Upcall, u64) -> Verdict,
) {
    let mut now = 0u64;
    b.iter(|| {
        now += 1_000_000;
        for d in descs {
            let r = Request::decode(black_box(d)).unwrap();
            let cmd = IoCommand::CommitAndFetch {
                q_id: 0,
                slot: 0,
                seq: r.seq,
                verdict: decide(&r.upcall, now),
            };
            black_box(cmd.to_raw());
        }
    });
}

fn bench(c: &mut Criterion) {
    let descs = descs();
    let mut g = c.benchmark_group("verdict");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("decode+encode (baseline)", |b| {
        b.iter(|| {
            for d in &descs {
                let r = Request::decode(black_box(d)).unwrap();
                let cmd = IoCommand::CommitAndFetch {
                    q_id: 0,
                    slot: 0,
                    seq: r.seq,
                    verdict: Verdict::Default,
                };
                black_box(cmd.to_raw());
            }
        })
    });
    let mut p = policy();
    g.bench_function("decode+decide+encode", |b| {
        decide_all(b, &descs, |u, now| p.decide(u, now));
    });
    let mut core = core();
    g.bench_function("decode+core+encode", |b| {
        decide_all(b, &descs, |u, now| core.upcall(u, now));
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
