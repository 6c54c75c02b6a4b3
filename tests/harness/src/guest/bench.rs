//! `bench-upcall` (run by `cargo xtask bench upcall`): the PING round trip
//! through `/dev/mm_upcall` next to a pipe ping-pong between two processes,
//! measured in the same boot, alternating, three rounds each.
#![allow(unsafe_code)]

use std::time::Instant;

use anyhow::{Result, bail};
use mm_upcall_kernel::proto::raw::ping::{HIST_BUCKETS, hist_bucket, hist_lower_bound};
use mm_upcall_kernel::{Config, Transport};

const N: u32 = 20_000;
const ROUNDS: usize = 5;

/// Mean and p99 (lower bound of its histogram bucket, as for the upcall).
struct Stats {
    mean_ns: f64,
    p99_ns: u64,
}

fn p99_of(hist: &[u64]) -> u64 {
    let total: u64 = hist.iter().sum();
    let want = (total * 990).div_ceil(1000).max(1);
    let mut seen = 0;
    for (b, &c) in hist.iter().enumerate() {
        seen += c;
        if seen >= want && c > 0 {
            return hist_lower_bound(b);
        }
    }
    0
}

/// One byte back and forth between this process and a forked child.
fn pipe_round() -> Result<Stats> {
    let mut a = [0i32; 2];
    let mut b = [0i32; 2];
    // SAFETY: pipe() fills the two-element arrays.
    if unsafe { libc::pipe(a.as_mut_ptr()) } != 0 || unsafe { libc::pipe(b.as_mut_ptr()) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the child only uses read/write/_exit on inherited fds.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        let mut byte = 0u8;
        // SAFETY: closing the ends this child does not use, then one-byte
        // reads and writes into a local on valid fds.
        unsafe {
            libc::close(a[1]);
            libc::close(b[0]);
            while libc::read(a[0], (&raw mut byte).cast(), 1) == 1 {
                if libc::write(b[1], (&raw const byte).cast(), 1) != 1 {
                    break;
                }
            }
            libc::_exit(0);
        }
    }
    // SAFETY: the parent's unused ends; the child holds its own copies.
    unsafe {
        libc::close(a[0]);
        libc::close(b[1]);
    }
    let mut hist = vec![0u64; HIST_BUCKETS];
    let mut total = 0u128;
    let mut byte = 1u8;
    for i in 0..(N + 1000) {
        let t = Instant::now();
        // SAFETY: one-byte write and read on our pipe ends.
        let ok = unsafe {
            libc::write(a[1], (&raw const byte).cast(), 1) == 1
                && libc::read(b[0], (&raw mut byte).cast(), 1) == 1
        };
        if !ok {
            bail!("pipe ping-pong: {}", std::io::Error::last_os_error());
        }
        let ns = t.elapsed().as_nanos();
        if i >= 1000 {
            total += ns;
            hist[hist_bucket(ns as u64)] += 1;
        }
    }
    // SAFETY: closing our ends gives the child EOF; then reap it.
    unsafe {
        for fd in [a[1], b[0]] {
            libc::close(fd);
        }
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    Ok(Stats {
        mean_ns: total as f64 / f64::from(N),
        p99_ns: p99_of(&hist),
    })
}

fn upcall_round(t: &mut Transport) -> Result<Stats> {
    let (r, _, _) = crate::upcall::serve_ping(t, N, 1, false)?;
    if r.answered != u64::from(N) {
        bail!("only {} of {N} PING upcalls answered", r.answered);
    }
    Ok(Stats {
        mean_ns: r.total_ns as f64 / r.answered as f64,
        p99_ns: r.quantile_ns(990),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn upcall() -> Result<()> {
    let mut t = Transport::open(&Config {
        queue_depth: 16,
        ..Config::default()
    })?;
    let (mut pm, mut pp, mut um, mut up) = (vec![], vec![], vec![], vec![]);
    let (mut rm, mut rp) = (vec![], vec![]);
    for round in 0..ROUNDS {
        let p = pipe_round()?;
        let u = upcall_round(&mut t)?;
        println!(
            "bench-upcall: round {round}: pipe mean {:.1} us p99 {:.1} us; upcall mean {:.1} us p99 {:.1} us",
            p.mean_ns / 1e3,
            p.p99_ns as f64 / 1e3,
            u.mean_ns / 1e3,
            u.p99_ns as f64 / 1e3
        );
        // Each pair runs back to back: their ratio is the least noisy figure.
        rm.push(u.mean_ns / p.mean_ns);
        rp.push(u.p99_ns as f64 / p.p99_ns.max(1) as f64);
        pm.push(p.mean_ns);
        pp.push(p.p99_ns as f64);
        um.push(u.mean_ns);
        up.push(u.p99_ns as f64);
    }
    let (pm, pp, um, up) = (median(pm), median(pp), median(um), median(up));
    println!("BENCH | metric | pipe ping-pong (baseline) | upcall PING | upcall / pipe |");
    println!("BENCH |---|---|---|---|");
    println!(
        "BENCH | mean round trip | {:.1} us | {:.1} us | {:.2} |",
        pm / 1e3,
        um / 1e3,
        um / pm
    );
    println!(
        "BENCH | p99 round trip | {:.1} us | {:.1} us | {:.2} |",
        pp / 1e3,
        up / 1e3,
        up / pp
    );
    println!(
        "BENCH | median of per-round ratios | | | mean {:.2}, p99 {:.2} |",
        median(rm),
        median(rp)
    );
    println!("BENCH ({N} round trips per run, median of {ROUNDS} alternating runs, one boot, TCG)");
    Ok(())
}

/// Who decides the write faults of a round.
#[derive(Clone, Copy, Debug)]
enum Decided {
    /// The server, asked per fault.
    Upcall,
    /// The node's standing verdict, without asking.
    Standing,
    /// The kernel's default (the server did not negotiate WRITE_FAULT).
    NoServer,
}

/// One timed round of write faults on 2048 managed pages: nanoseconds
/// per page to write the first word of every page of a region the server
/// moved to node 1.  Each round checks from the kernel's counters that
/// it measured what it says (review L6): every fault asked the server
/// (`Upcall`), or none did and each was decided standing (`Standing`) or
/// without a server (`NoServer`).
fn managed_write_round(srv: &mut crate::managed::Server, seed: u64, how: Decided) -> Result<f64> {
    const LEN: usize = 8 << 20;
    let n = (LEN / crate::sys::PAGE_SIZE) as u64;
    let mut mem = crate::fence::demoted(srv, LEN, seed, false)?;
    let before = crate::upcall::stats()?;
    let start = Instant::now();
    crate::fence::flip(&mut mem, |_| true);
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    let after = crate::upcall::stats()?;
    let d = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    let got = (
        d("write_faults"),
        d("no_server"),
        d("answered"),
        d("standing_verdicts"),
    );
    let ok = match how {
        Decided::Upcall => got.0 == n && got.1 == 0 && got.2 >= n && got.3 == 0,
        Decided::Standing => got.0 == n && got.1 == 0 && got.3 == n,
        Decided::NoServer => got.0 == n && got.1 == n && got.3 == 0,
    };
    if !ok {
        bail!(
            "{how:?} round: {} fenced write faults, {} without a server, {} answered, {} \
             decided standing; want {n} faults, all decided the {how:?} way",
            got.0,
            got.1,
            got.2,
            got.3
        );
    }
    let (n0, ..) = crate::managed::where_are(&mem)?;
    if n0 != n as usize {
        bail!("{n0} pages on node 0 after the writes");
    }
    Ok(ns)
}

/// `bench-fault`: a write fault on a managed page answered by the server
/// (PROMOTE to node 0), decided by a standing verdict (SET_STANDING
/// DEFAULT, no round trip), and by the kernel's own default promotion (a
/// server that did not negotiate WRITE_FAULT), alternating, same boot.
pub fn fault() -> Result<()> {
    use crate::managed::Server;
    let (mut upcall, mut standing, mut default) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let mut srv = Server::start(0)?;
        let u = managed_write_round(&mut srv, 0xb0 + round as u64, Decided::Upcall)?;
        if srv.result("standing default")? != 0 {
            bail!("SET_STANDING DEFAULT failed");
        }
        let s = managed_write_round(&mut srv, 0xd0 + round as u64, Decided::Standing)?;
        srv.quit()?;
        let mut srv = Server::start_with(0, "no-write-fault")?;
        let d = managed_write_round(&mut srv, 0xc0 + round as u64, Decided::NoServer)?;
        srv.quit()?;
        println!(
            "BENCH fault round {round}: upcall verdict {u:.0} ns/fault, standing verdict {s:.0} \
             ns/fault, kernel default {d:.0} ns/fault; ratios {:.2} and {:.2}",
            u / d,
            s / d
        );
        upcall.push(u);
        standing.push(s);
        default.push(d);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let median_ratio = |v: &[f64]| {
        let mut r: Vec<f64> = v.iter().zip(&default).map(|(x, d)| x / d).collect();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    println!(
        "BENCH fault: write fault on a managed page: upcall verdict {:.0} ns, standing verdict \
         {:.0} ns, kernel default {:.0} ns (means of {ROUNDS} rounds of 2048 faults); upcall / \
         default: ratio of means {:.2}, median ratio {:.2}; standing / default: ratio of means \
         {:.2}, median ratio {:.2}",
        mean(&upcall),
        mean(&standing),
        mean(&default),
        mean(&upcall) / mean(&default),
        median_ratio(&upcall),
        mean(&standing) / mean(&default),
        median_ratio(&standing),
    );
    Ok(())
}

/// `bench-anon`: first-touch anonymous faults with nothing attached: map
/// 64 MiB, touch every page, unmap; the best of five rounds, in ns/fault.
pub fn anon() -> Result<()> {
    const LEN: usize = 64 << 20;
    let mut best = f64::MAX;
    for _ in 0..ROUNDS {
        let mut mem = crate::sys::Anon::new(LEN)?;
        crate::sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
        let start = Instant::now();
        for page in mem.as_mut_slice().chunks_mut(crate::sys::PAGE_SIZE) {
            page[0] = 1;
        }
        let ns = start.elapsed().as_nanos() as f64 / (LEN / crate::sys::PAGE_SIZE) as f64;
        best = best.min(ns);
    }
    println!(
        "BENCH anon: first-touch anonymous fault, nothing attached: {best:.0} ns/fault (best of {ROUNDS})"
    );
    Ok(())
}
