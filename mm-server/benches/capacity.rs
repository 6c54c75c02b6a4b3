//! Capacity-model costs: LZ4 size measurement per page next to a `memcpy`
//! of the same pages (the physical baseline), and the accounting of a
//! place/measure/leave cycle.
//!
//! `cargo bench -p mm-server --bench capacity`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mm_server::capacity::{Geometry, NodeAccount, PAGE_SIZE, measure};

fn pages() -> Vec<u8> {
    // Half text-like, half random: a realistic mix of compressibility.
    let mut v = Vec::with_capacity(256 * 4096);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for p in 0..256 {
        for i in 0..4096 {
            if p % 2 == 0 {
                v.push(b"the quick brown fox jumps over the lazy dog "[i % 44]);
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
        }
    }
    v
}

fn geometry() -> Geometry {
    Geometry {
        capacity: 1 << 30,
        granule: 64,
        low: 60,
        high: 80,
        critical: 95,
    }
}

fn measure_vs_memcpy(c: &mut Criterion) {
    let src = pages();
    let g = geometry();
    let mut dst = vec![0u8; src.len()];
    let mut group = c.benchmark_group("per-page");
    group.throughput(Throughput::Bytes(src.len() as u64));
    group.bench_function("memcpy (baseline)", |b| {
        b.iter(|| {
            for (s, d) in src.chunks(4096).zip(dst.chunks_mut(4096)) {
                d.copy_from_slice(black_box(s));
            }
            black_box(&dst);
        })
    });
    group.bench_function("lz4 measure", |b| {
        b.iter(|| {
            let total: u32 = src.chunks(4096).map(|p| measure(&g, black_box(p))).sum();
            black_box(total)
        })
    });
    group.finish();
}

fn accounting(c: &mut Criterion) {
    let g = geometry();
    let n = (g.capacity / u64::from(PAGE_SIZE)) as usize;
    let mut acct = NodeAccount::new(g, 0, n).unwrap();
    let mut pfn = 0u64;
    c.bench_function("place+measure+leave", |b| {
        b.iter(|| {
            acct.placed(pfn, 0, false).unwrap();
            acct.measured(pfn, 1000).unwrap();
            acct.left(pfn, 0).unwrap();
            pfn = (pfn + 1) % n as u64;
        })
    });
}

criterion_group!(benches, measure_vs_memcpy, accounting);
criterion_main!(benches);
