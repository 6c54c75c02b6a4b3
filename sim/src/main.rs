//! `mm-sim`: run the deterministic simulation over many seeds.
//!
//! `mm-sim --seeds N [--from S] [--steps K]` runs seeds `S..S+N` and stops
//! at the first failure, which it prints with the command that replays
//! it; `mm-sim --seed S [--trace]` replays one seed (with `--trace`, every
//! step).  `mm-sim --scale PAGES` measures the core on a node of `PAGES`
//! pages next to a 1 GiB node (see `scale`).  `cargo xtask sim` runs it
//! optimized.

use std::process::ExitCode;
use std::time::Instant;

use mm_sim::{Knobs, Sim};

fn usage() -> ExitCode {
    eprintln!(
        "usage: mm-sim --seeds N [--from S] [--steps K] | --seed S [--steps K] [--trace] \
         | --scale PAGES"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut seeds = None;
    let mut one = None;
    let mut from = 0u64;
    let mut steps = 2_000u64;
    let mut trace = false;
    let mut scale = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || args.next().and_then(|v| v.parse::<u64>().ok());
        match a.as_str() {
            "--seeds" => seeds = num(),
            "--seed" => one = num(),
            "--from" => from = num().unwrap_or(0),
            "--steps" => steps = num().unwrap_or(steps),
            "--trace" => trace = true,
            "--scale" => scale = num(),
            _ => return usage(),
        }
    }
    if let Some(pages) = scale {
        for f in [mm_sim::scale::run(262_144), mm_sim::scale::run(pages)] {
            println!(
                "node of {} pages ({} GiB): server RSS {:.1} MiB ({:.2} bytes/page), \
                 RESYNC rebuild {:.2} s, measuring {:.2} s, one eviction plan ({} pages) {:.3} ms",
                f.pages,
                f.pages >> 18,
                f.rss_bytes as f64 / f64::from(1 << 20),
                f.rss_bytes as f64 / f.pages as f64,
                f.rebuild.as_secs_f64(),
                f.measure.as_secs_f64(),
                f.plan_pages,
                f.plan.as_secs_f64() * 1e3
            );
        }
        return ExitCode::SUCCESS;
    }
    let range = match (seeds, one) {
        (Some(n), None) => from..from + n,
        (None, Some(s)) => s..s + 1,
        _ => return usage(),
    };
    let t0 = Instant::now();
    let (mut crashes, mut overflows, mut resyncs, mut evictions, mut n) = (0, 0, 0, 0, 0u64);
    for seed in range {
        let mut sim = Sim::new(seed, Knobs::for_seed(seed));
        sim.trace(trace);
        match sim.run(steps) {
            Ok(s) => {
                n += 1;
                crashes += s.crashes;
                overflows += s.overflows;
                resyncs += s.resyncs;
                evictions += s.evictions;
            }
            Err(f) => {
                eprintln!("mm-sim: {f}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "{n} seeds clean in {:.1} s ({steps} steps each): {crashes} server crashes, \
         {overflows} event overflows, {resyncs} RESYNCs, {evictions} evictions",
        t0.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}
