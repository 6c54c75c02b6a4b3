//! Scenarios of the managed-node mechanism (kernel invariants K1-K5, K9):
//! `demote-write-promote`, `isolation`, `write-fence`, `credit`, `resync`
//! and `fault-no-server`.  The test server is `managed::Server`, another
//! process; the workload is this one.
#![allow(unsafe_code)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::managed::{
    KPF_TYPED, NODE, Server, books_diff, kpageflags_all, kpageflags_anon, kpageflags_truth, pages,
    where_are,
};
use crate::sys::{self, Anon, Cgroup, PAGE_SIZE, ensure};
use crate::upcall::stat;

/// The first word of page `i` as `sys::fill_pattern(_, seed)` wrote it.
pub fn first_word(i: usize, seed: u64) -> u64 {
    (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed
}

/// Invert the first word of each page of `mem` whose index satisfies `pick`.
pub fn flip(mem: &mut Anon, pick: impl Fn(usize) -> bool) {
    for (i, page) in mem.as_mut_slice().chunks_mut(PAGE_SIZE).enumerate() {
        if pick(i) {
            let w: &mut [u8; 8] = (&mut page[..8]).try_into().expect("8 bytes");
            *w = (!u64::from_ne_bytes(*w)).to_ne_bytes();
        }
    }
}

/// Check that the pages `pick` selects hold the inverted first word and
/// the others the pattern; then restore the pattern and check it all.
fn check_flipped(mem: &mut Anon, seed: u64, pick: impl Fn(usize) -> bool + Copy) -> Result<()> {
    for (i, page) in mem.as_slice().chunks(PAGE_SIZE).enumerate() {
        let w = u64::from_ne_bytes(page[..8].try_into().expect("8 bytes"));
        let want = if pick(i) {
            !first_word(i, seed)
        } else {
            first_word(i, seed)
        };
        ensure(w == want, || {
            format!("page {i}: first word {w:#x}, want {want:#x}")
        })?;
    }
    flip(mem, pick);
    match sys::check_pattern(mem.as_slice(), seed) {
        Some(i) => bail!("page {i} lost its contents"),
        None => Ok(()),
    }
}

fn pid() -> u32 {
    std::process::id()
}

/// A region of `len` bytes with the pattern `seed`, moved to node 1 by the
/// server; with `huge`, backed by transparent huge pages where possible.
/// The most a scenario places at once when it wants the server's books
/// to come from events alone: an eighth of the kernel's event queue
/// (16384 events, one per 4 KiB page placed), which the server reads
/// between steps.  A burst larger than the queue loses events by design
/// (`OVERFLOW`).
pub const EVENT_STEP: usize = 8 << 20;

pub fn demoted(srv: &mut Server, len: usize, seed: u64, huge: bool) -> Result<Anon> {
    let mut mem = Anon::new(len)?;
    sys::madvise(
        &mem,
        if huge {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        },
    )?;
    sys::fill_pattern(mem.as_mut_slice(), seed);
    // A page can be busy for a moment (a huge page being split, a per-CPU
    // LRU batch); moving again is a no-op for the pages already there.
    // In steps of an eighth of the kernel's event queue (16384 entries),
    // which the server reads between steps.
    let step = EVENT_STEP / PAGE_SIZE;
    let mut moved = 0;
    for _ in 0..3 {
        moved = 0;
        for first in (0..pages(len)).step_by(step) {
            let n = step.min(pages(len) - first);
            moved += srv.move_pages(pid(), mem.addr() + first * PAGE_SIZE, n, NODE)?;
        }
        if moved == pages(len) {
            break;
        }
    }
    ensure(moved == pages(len), || {
        format!("the server moved {moved} of {} pages to node 1", pages(len))
    })?;
    Ok(mem)
}

/// All of `mem` on node 0.
fn all_on_node0(what: &str, mem: &Anon) -> Result<()> {
    let (n0, n1, other) = where_are(mem)?;
    ensure(n0 == pages(mem.as_slice().len()), || {
        format!("{what}: {n0} pages on node 0, {n1} on node 1, {other} elsewhere")
    })
}

// ---------------------------------------------------------------------------

/// Demote, check placement, write every page, check one WRITE_FAULT per page,
/// promotion to node 0 and the data.
fn write_after_demotion(srv: &mut Server, how: &str, mut mem: Anon, seed: u64) -> Result<()> {
    let n = pages(mem.as_slice().len());
    let (n0, n1, other) = where_are(&mem)?;
    ensure(n1 == n, || {
        format!("{how}: {n1} of {n} pages on node 1 ({n0} on node 0, {other} elsewhere)")
    })?;
    println!("demote-write-promote: {how}: move_pages reports all {n} pages on node 1");
    srv.cmd("reset")?;
    // PROMOTE(0) moves a page where the kernel's default would, so the
    // server answers pages at odd addresses ALLOW_IN_PLACE instead: where
    // each page ends up shows that the kernel applied the server's verdict.
    // A page allowed in place stays on node 1, where a NUMA hint scan
    // between the upcall and its retry would end the allowance (it lives
    // for one fault) and cost a second upcall: no hint scans meanwhile.
    const NUMA_BALANCING: &str = "/proc/sys/kernel/numa_balancing";
    let balancing = sys::read(NUMA_BALANCING)?;
    sys::write(NUMA_BALANCING, "0")?;
    srv.cmd("wf alternate")?;
    let promoted0 = stat("promoted")?;
    let start = Instant::now();
    flip(&mut mem, |_| true);
    let secs = start.elapsed().as_secs_f64();
    srv.cmd("wf promote")?;
    sys::write(NUMA_BALANCING, &balancing)?;
    let promoted = stat("promoted")? - promoted0;
    let (total, distinct) = srv.faults_at(mem.addr(), mem.as_slice().len())?;
    println!(
        "demote-write-promote: {how}: wrote {n} pages in {secs:.1} s; \
         the server saw {total} WRITE_FAULTs on {distinct} pages"
    );
    ensure(total == n as u64 && distinct == n as u64, || {
        format!("{how}: {total} WRITE_FAULTs on {distinct} pages, want exactly one per page ({n})")
    })?;
    let nodes = mem.page_nodes()?;
    let misplaced = (0..n)
        .filter(|&i| nodes[i] != i32::from((mem.addr() / PAGE_SIZE + i) % 2 == 1))
        .count();
    println!(
        "demote-write-promote: {how}: {promoted} pages promoted; {misplaced} of {n} pages \
         not where their verdict puts them"
    );
    ensure(misplaced == 0 && promoted == n as u64 / 2, || {
        format!(
            "{how}: {misplaced} pages are not where the server's verdict puts them (PROMOTE(0) \
             at even addresses, ALLOW_IN_PLACE at odd ones), {promoted} promoted for {} \
             PROMOTE verdicts",
            n / 2
        )
    })?;
    check_flipped(&mut mem, seed, |_| true)?;
    println!("demote-write-promote: {how}: every page where its verdict puts it, every byte right");
    Ok(())
}

/// `demote-write-promote`: 64 MiB demoted by reclaim, then 64 MiB moved
/// by the server; every page written once through a WRITE_FAULT.
pub fn demote_write_promote() -> Result<()> {
    const LEN: usize = 64 << 20;
    let mut srv = Server::start(1 << 30)?;

    let cg = Cgroup::enter("mm-guest-dwp")?;
    let mut mem = Anon::new(LEN)?;
    sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
    sys::fill_pattern(mem.as_mut_slice(), 0xd1);
    for _ in 0..10 {
        cg.reclaim(LEN + LEN / 2);
        if where_are(&mem)?.1 == pages(LEN) {
            break;
        }
    }
    drop(cg);
    let placed = srv.stat("placed")?;
    println!("demote-write-promote: memory.reclaim: the server saw {placed} pages PLACED");
    write_after_demotion(&mut srv, "memory.reclaim", mem, 0xd1)?;

    let mem = demoted(&mut srv, LEN, 0xd2, false)?;
    write_after_demotion(&mut srv, "server move_pages", mem, 0xd2)?;
    srv.quit()
}

// ---------------------------------------------------------------------------

/// `isolation`: nothing lands on node 1 without the server.
pub fn isolation() -> Result<()> {
    const LEN: usize = 64 << 20;
    // A preference for node 1 given while it is not managed yet.
    let mut pre = Anon::new(16 << 20)?;
    ensure(
        sys::mbind(&pre, sys::MPOL_PREFERRED, NODE as i32, 0) == 0,
        || "mbind(MPOL_PREFERRED, node 1) before attach failed".into(),
    )?;

    let mut srv = Server::start(0)?;
    let free_before = sys::node_meminfo(NODE, "MemFree")?;

    sys::fill_pattern(pre.as_mut_slice(), 0x150);
    let (n0, n1, _) = where_are(&pre)?;
    println!(
        "isolation: MPOL_PREFERRED node 1 set before attach: {n0} pages on node 0, {n1} on node 1"
    );
    ensure(n1 == 0, || {
        format!("{n1} pages of a node-1 policy landed on node 1")
    })?;

    let expect = |what: &str, got: i32, want: i32| sys::expect_eq("isolation", what, got, want);
    expect(
        "set_mempolicy(MPOL_BIND, node 1)",
        sys::set_mempolicy(sys::MPOL_BIND, NODE as i32),
        -libc::EINVAL,
    )?;
    expect(
        "set_mempolicy(MPOL_PREFERRED, node 1)",
        sys::set_mempolicy(sys::MPOL_PREFERRED, NODE as i32),
        -libc::EINVAL,
    )?;
    // The workload is charged to a memory cgroup, to put it under pressure.
    let cg = Cgroup::enter("mm-guest-isolation")?;
    let mut mem = Anon::new(LEN)?;
    sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
    expect(
        "mbind(MPOL_BIND, node 1, MPOL_MF_MOVE)",
        sys::mbind(&mem, sys::MPOL_BIND, NODE as i32, sys::MPOL_MF_MOVE as u32),
        -libc::EINVAL,
    )?;
    sys::fill_pattern(mem.as_mut_slice(), 0x151);
    let (r, _) = sys::move_pages(0, mem.addr(), pages(LEN), NODE as i32);
    expect(
        "move_pages to node 1 by a process that is not the server",
        r,
        -libc::EACCES,
    )?;

    // Memory pressure on node 0 with no credit: reclaim may not demote.
    for _ in 0..3 {
        cg.reclaim(2 * LEN);
    }
    drop(cg);
    let (n0, n1, other) = where_are(&mem)?;
    println!(
        "isolation: after memory.reclaim with no credit: {n0} on node 0, {n1} on node 1, {other} elsewhere"
    );
    ensure(n1 == 0 && n0 == pages(LEN), || {
        format!("{n1} pages went to node 1 without credit ({n0} on node 0)")
    })?;
    if let Some(i) = sys::check_pattern(mem.as_slice(), 0x151) {
        bail!("page {i} lost its contents");
    }
    let creq = srv.stat("creq")?;
    let placed = srv.stat("placed")?;
    println!(
        "isolation: the server got {creq} DEMOTE_CREDIT request(s), {placed} pages PLACED; \
         the kernel counted {} demotions without credit",
        stat("demotions_without_credit")?
    );
    ensure(creq >= 1 && placed == 0, || {
        format!("want >= 1 credit request and nothing placed; got {creq} and {placed}")
    })?;
    let free_after = sys::node_meminfo(NODE, "MemFree")?;
    println!("isolation: node 1 MemFree {free_before} kB before, {free_after} kB after");
    // Per-CPU page lists may hold a few pages back: allow 1 MiB.
    ensure(free_after + 1024 >= free_before, || {
        format!("node 1 lost {} kB of free memory", free_before - free_after)
    })?;
    // Node-wide, from the kernel's own page flags: no anonymous page of
    // anyone on node 1.
    let anon = kpageflags_anon(srv.start_pfn, srv.spanned)?;
    ensure(anon.is_empty(), || {
        format!(
            "{} anonymous pages on node 1 with no credit given (first: {:#x?})",
            anon.len(),
            anon.keys().take(4).collect::<Vec<_>>()
        )
    })?;
    println!("isolation: /proc/kpageflags: no anonymous page on node 1");
    srv.quit()
}

// ---------------------------------------------------------------------------

/// `credit`: at most N pages before a DEMOTE_CREDIT request; none after
/// DENY; SET_CREDIT and GRANT let more through, within what they gave.
/// Counted node-wide (`/proc/kpageflags`): credit bounds every demotion
/// to the node, not only this mapping's.
pub fn credit() -> Result<()> {
    const LEN: usize = 64 << 20;
    const N: u64 = 1024;
    let mut srv = Server::start(N)?;
    let cg = Cgroup::enter("mm-guest-credit")?;
    let mut mem = Anon::new(LEN)?;
    sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
    sys::fill_pattern(mem.as_mut_slice(), 0xc4);
    let (start, span) = (srv.start_pfn, srv.spanned);
    let on1 = |mem: &Anon| -> Result<u64> {
        let node = kpageflags_truth(start, span)?.0;
        let mine = where_are(mem)?.1 as u64;
        ensure(mine <= node, || {
            format!("move_pages shows {mine} of this mapping's pages on node 1, kpageflags {node}")
        })?;
        Ok(node)
    };
    let n1_0 = on1(&mem)?;
    ensure(n1_0 == 0, || {
        format!("{n1_0} anonymous pages on node 1 before any credit was spent")
    })?;

    cg.reclaim(2 * LEN);
    let n1 = on1(&mem)?;
    let creq = srv.stat("creq")?;
    let first: String = srv.stats()?.remove("placed_first").unwrap_or_default();
    println!(
        "credit: credit {N}: {n1} pages on node 1; {creq} DEMOTE_CREDIT request(s), \
         the first after {first} pages placed"
    );
    ensure(n1 > 0 && n1 <= N, || {
        format!("{n1} pages placed with credit {N}")
    })?;
    ensure(creq == 1, || format!("{creq} credit requests, want 1"))?;
    ensure(first.parse::<u64>().is_ok_and(|p| p <= N), || {
        format!("the first request came after {first} pages, more than the credit {N}")
    })?;

    // The server said DENY: nothing more, and no more requests.
    cg.reclaim(2 * LEN);
    cg.reclaim(2 * LEN);
    let n1b = on1(&mem)?;
    let creq_b = srv.stat("creq")?;
    println!("credit: after DENY: {n1b} pages on node 1, {creq_b} request(s)");
    ensure(n1b == n1 && creq_b == creq, || {
        format!("after DENY: {n1b} pages (was {n1}), {creq_b} requests (was {creq})")
    })?;

    // SET_CREDIT lets 2048 more through.
    ensure(srv.result("credit set 2048")? == 0, || {
        "SET_CREDIT failed".into()
    })?;
    cg.reclaim(2 * LEN);
    let n1c = on1(&mem)?;
    println!("credit: after SET_CREDIT 2048: {n1c} pages on node 1");
    ensure(n1c > n1b && n1c <= n1b + 2048, || {
        format!("after SET_CREDIT 2048: {n1c} pages (was {n1b})")
    })?;

    // That round ran out of credit again and was denied.  Now a server
    // that grants: SET_CREDIT 0 lifts the DENY, and the next request is
    // answered with 4096 pages.
    let creq_c = srv.stat("creq")?;
    srv.cmd("credit mode grant:4096")?;
    ensure(srv.result("credit set 0")? == 0, || {
        "SET_CREDIT failed".into()
    })?;
    for _ in 0..4 {
        cg.reclaim(2 * LEN);
        std::thread::sleep(Duration::from_millis(100));
    }
    let n1d = on1(&mem)?;
    let creq_d = srv.stat("creq")?;
    let grants = creq_d - creq_c;
    println!("credit: granting 4096 per request: {n1d} pages on node 1 after {grants} grant(s)");
    ensure(grants >= 1 && n1d > n1c, || {
        format!("GRANT did not let more through: {n1d} pages (was {n1c}), {grants} grants")
    })?;
    ensure(n1d <= n1c + 4096 * grants, || {
        format!("{n1d} pages placed, more than the {grants} grants allow")
    })?;
    drop(cg);
    if let Some(i) = sys::check_pattern(mem.as_slice(), 0xc4) {
        bail!("page {i} lost its contents");
    }
    drop(mem);
    srv.quit()
}

// ---------------------------------------------------------------------------

/// `standing-verdict`: with a standing verdict (SET_STANDING) a write
/// fault on node 1 is decided without asking: the page is promoted, the
/// data intact, the books exact from PROMOTED events; clearing it, a
/// DETACH/ATTACH and the server's death each make faults ask again.
pub fn standing_verdict() -> Result<()> {
    const LEN: usize = 4 << 20;
    let n = pages(LEN) as u64;
    let mut srv = Server::start(1 << 20)?;
    let expect = |what: &str, got: i32, want: i32| sys::expect_eq("standing", what, got, want);
    expect(
        "a PROMOTE to the managed node itself",
        srv.result(&format!("standing {NODE}"))?,
        -libc::EINVAL,
    )?;
    expect(
        "a PROMOTE to a node that does not exist",
        srv.result("standing 9")?,
        -libc::EINVAL,
    )?;
    expect(
        "a standing verdict for node 0 (not managed)",
        srv.result("standing default 0")?,
        -libc::ENOENT,
    )?;
    expect(
        "a standing verdict for node 4096",
        srv.result("standing default 4096")?,
        -libc::ENXIO,
    )?;

    // Each standing verdict, then none: (verdict, faults asked per page).
    for (how, asked) in [("default", 0), ("0", 0), ("none", 1)] {
        let mut mem = demoted(&mut srv, LEN, 0x57a, false)?;
        srv.cmd("reset")?;
        expect(
            &format!("SET_STANDING {how}"),
            srv.result(&format!("standing {how}"))?,
            0,
        )?;
        let (requests, standing) = (stat("requests")?, stat("standing_verdicts")?);
        flip(&mut mem, |_| true);
        let faults = my_faults(&mut srv, &mem)?;
        let decided = stat("standing_verdicts")? - standing;
        let requests = stat("requests")? - requests;
        let (_, books, truth) = srv.settled()?;
        println!(
            "standing-verdict: {how}: {n} pages written: {faults} WRITE_FAULTs asked, {decided} \
             decided standing, {requests} upcall requests; books {} pages, kernel {}",
            books.0, truth.0
        );
        ensure(faults == asked * n, || {
            format!(
                "standing {how}: {faults} WRITE_FAULTs asked, want {}",
                asked * n
            )
        })?;
        ensure(decided == (1 - asked) * n, || {
            format!(
                "standing {how}: {decided} faults decided standing, want {}",
                (1 - asked) * n
            )
        })?;
        ensure(books == truth, || {
            format!("standing {how}: books {books:?}, kernel {truth:?}")
        })?;
        all_on_node0(how, &mem)?;
        check_flipped(&mut mem, 0x57a, |_| true)?;
    }

    // A DETACH and ATTACH, and then the server's death, forget it.
    for end in ["detach", "death"] {
        expect("SET_STANDING default", srv.result("standing default")?, 0)?;
        if end == "detach" {
            expect("DETACH_NODE", srv.result("detach")?, 0)?;
            expect("ATTACH_NODE", srv.result("attach 1048576")?, 0)?;
        } else {
            srv.kill()?;
            srv = Server::start(1 << 20)?;
        }
        let mut mem = demoted(&mut srv, LEN, 0x57b, false)?;
        srv.cmd("reset")?;
        flip(&mut mem, |_| true);
        let faults = my_faults(&mut srv, &mem)?;
        println!("standing-verdict: after the {end}: {faults} WRITE_FAULTs asked for {n} pages");
        ensure(faults == n, || {
            format!("after the {end}: {faults} WRITE_FAULTs asked, want {n}")
        })?;
        check_flipped(&mut mem, 0x57b, |_| true)?;
    }
    srv.quit()?;
    // A server that is not asked about write faults has no say.
    let mut srv = Server::start_with(0, "no-write-fault")?;
    expect(
        "SET_STANDING by a server without WRITE_FAULT",
        srv.result("standing default")?,
        -libc::EINVAL,
    )?;
    srv.quit()?;
    crate::clients::standing_by_default()
}

/// `resync`: a new server's RESYNC reports exactly what is on node 1.
pub fn resync() -> Result<()> {
    let mut a = Server::start(1 << 20)?;
    let lost_before = stat("events_lost")?;
    let cg = Cgroup::enter("mm-guest-resync")?;
    let mut by_reclaim = Anon::new(32 << 20)?;
    sys::madvise(&by_reclaim, libc::MADV_NOHUGEPAGE)?;
    sys::fill_pattern(by_reclaim.as_mut_slice(), 0x5e1);
    // Demoted in steps the event queue holds; the server reads them
    // between steps (`stats` reads all that are queued).
    for _ in 0..6 {
        cg.reclaim(EVENT_STEP);
        a.stats()?;
    }
    drop(cg);
    let by_server = demoted(&mut a, 16 << 20, 0x5e2, false)?;
    let (start, span) = (a.start_pfn, a.spanned);

    let (stats, books_a, truth_a) = a.settled()?;
    // Server A's books come from events alone: none lost, no RESYNC.
    let lost = stat("events_lost")? - lost_before;
    ensure(
        lost == 0 && stats["overflow"] == "0" && stats["malformed"] == "0",
        || {
            format!(
                "server A's books are not from events alone: {lost} events lost, {} OVERFLOW \
             records, {} malformed events",
                stats["overflow"], stats["malformed"]
            )
        },
    )?;
    println!(
        "resync: server A's books: {} pages; /proc/kpageflags: {} anonymous pages on node 1",
        books_a.0, truth_a.0
    );
    if books_a != truth_a {
        let diff = books_diff(&a.books()?, &kpageflags_anon(start, span)?);
        bail!("server A's books {books_a:?} differ from the kernel's {truth_a:?}: {diff}");
    }
    ensure(books_a.0 > pages(16 << 20) as u64, || {
        format!("only {} pages on node 1", books_a.0)
    })?;

    let set_a = a.books()?;
    println!("resync: SIGKILL server A (pid {})", a.pid);
    a.kill()?;
    let mut b = Server::start(0)?;
    let books_b = b.resync()?;
    let truth_b = kpageflags_truth(start, span)?;
    // Reclaim demoted this process's incidental pages too (heap, stack);
    // one may be freed since server A's look.  The test's own pages must
    // all still be there, and nothing may have come.
    let set_b = b.books()?;
    let mut ours: BTreeSet<u64> = sys::pfns(&by_reclaim)?.into_iter().collect();
    ours.extend(sys::pfns(&by_server)?);
    let gone: Vec<u64> = set_a.difference(&set_b).copied().collect();
    let came = set_b.difference(&set_a).count();
    println!(
        "resync: since server A's look, {} incidental page(s) freed, {came} arrived",
        gone.len()
    );
    ensure(came == 0 && !gone.iter().any(|p| ours.contains(p)), || {
        format!(
            "between server A's books and server B's RESYNC, {came} pages arrived and {} of the \
             test's pages left node 1",
            gone.iter().filter(|p| ours.contains(p)).count()
        )
    })?;
    let anon_kb = sys::node_meminfo(NODE, "AnonPages")?;
    println!(
        "resync: server B after RESYNC: {} pages; kpageflags {}; node 1 AnonPages {} kB ({} pages)",
        books_b.0,
        truth_b.0,
        anon_kb,
        anon_kb / 4
    );
    if books_b != truth_b {
        let diff = books_diff(&b.books()?, &kpageflags_anon(start, span)?);
        bail!("RESYNC gave {books_b:?}; kernel {truth_b:?}; server A had {books_a:?}: {diff}");
    }
    // Typed pages whose overlaid fields read as an anonymous mapping (the
    // node's own slab pages, with SLUB's per-CPU partial lists) are not
    // anonymous memory: RESYNC must not report them.
    let lookalikes: Vec<u64> = kpageflags_all(start, span)?
        .into_iter()
        .filter(|(_, f)| f & KPF_TYPED != 0)
        .map(|(p, _)| p)
        .collect();
    let books = b.books()?;
    let reported = lookalikes.iter().filter(|p| books.contains(p)).count();
    println!(
        "resync: {} typed pages on node 1 look anonymous in kpageflags; RESYNC reported {reported}",
        lookalikes.len()
    );
    ensure(reported == 0, || {
        format!("RESYNC reported {reported} typed (slab) pages as anonymous folios")
    })?;

    // Error cases of the commands, then one eviction.
    let expect = |what: &str, got: i32, want: i32| sys::expect_eq("resync", what, got, want);
    expect(
        "RESYNC of 0 pages",
        b.result(&format!("raw-resync {start} 0"))?,
        -libc::EINVAL,
    )?;
    let pfn = sys::pfns(&by_server)?[0];
    expect(
        "PROMOTE_PFN to the managed node",
        b.result(&format!("raw-promote {pfn} {NODE}"))?,
        -libc::EINVAL,
    )?;
    let mut on_node0 = Anon::new(PAGE_SIZE)?;
    on_node0.as_mut_slice()[0] = 1;
    let pfn0 = sys::pfns(&on_node0)?[0];
    expect(
        "PROMOTE_PFN of a node-0 page",
        b.result(&format!("raw-promote {pfn0} 0"))?,
        -libc::ENOENT,
    )?;
    expect(
        "PROMOTE_PFN of a node-1 page to node 0",
        b.result(&format!("promote {pfn} 0"))?,
        0,
    )?;
    ensure(by_server.page_nodes()?[0] == 0, || {
        "the promoted page is not on node 0".into()
    })?;
    let (_, (books, _), (truth, _)) = b.settled()?;
    ensure(books == truth && books == books_b.0 - 1, || {
        format!(
            "after PROMOTE_PFN: books {books}, kernel {truth}, before {}",
            books_b.0
        )
    })?;
    println!("resync: after PROMOTE_PFN the books ({books} pages) still match the kernel");
    if let Some(i) = sys::check_pattern(by_server.as_slice(), 0x5e2) {
        bail!("page {i} lost its contents");
    }
    if let Some(i) = sys::check_pattern(by_reclaim.as_slice(), 0x5e1) {
        bail!("page {i} lost its contents");
    }
    drop((by_server, by_reclaim));
    resync_after_overflow(&mut b)?;
    b.quit()
}

/// Lost events on purpose: 96 MiB demoted while the server is stopped
/// (24576 PLACED events for a queue of 16384).  The server is told
/// (`OVERFLOW`), rebuilds its books with RESYNC, and they equal the kernel.
fn resync_after_overflow(b: &mut Server) -> Result<()> {
    const LEN: usize = 96 << 20;
    let (start, span) = (b.start_pfn, b.spanned);
    let before = (stat("events_lost")?, b.stat("overflow")?);
    ensure(b.result("credit set 1048576")? == 0, || {
        "SET_CREDIT failed".into()
    })?;
    let cg = Cgroup::enter("mm-guest-overflow")?;
    let mut mem = Anon::new(LEN)?;
    sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
    sys::fill_pattern(mem.as_mut_slice(), 0x5e3);
    sys::signal(b.pid as i32, libc::SIGSTOP)?;
    cg.reclaim(2 * LEN);
    sys::signal(b.pid as i32, libc::SIGCONT)?;
    drop(cg);
    let (_, n1, _) = where_are(&mem)?;
    let (_, books, truth) = b.settled()?;
    let lost = stat("events_lost")? - before.0;
    let overflows = b.stat("overflow")? - before.1;
    println!(
        "resync: {n1} pages demoted with the server stopped: {lost} events lost, {overflows} \
         OVERFLOW; books after its RESYNC {}, kernel {}",
        books.0, truth.0
    );
    ensure(n1 > 16384 && lost > 0 && overflows >= 1, || {
        format!(
            "the burst did not overflow the event queue: {n1} pages demoted, {lost} events \
             lost, {overflows} OVERFLOW records"
        )
    })?;
    if books != truth {
        let diff = books_diff(&b.books()?, &kpageflags_anon(start, span)?);
        bail!(
            "after OVERFLOW and RESYNC the books {books:?} differ from the kernel's {truth:?}: {diff}"
        );
    }
    if let Some(i) = sys::check_pattern(mem.as_slice(), 0x5e3) {
        bail!("page {i} lost its contents");
    }
    Ok(())
}

// ---------------------------------------------------------------------------

/// `fault-no-server`: managed pages are written with no server attached:
/// the kernel promotes them itself, nobody hangs.
pub fn fault_no_server() -> Result<()> {
    const LEN: usize = 16 << 20;
    let mut srv = Server::start(0)?;

    // The server's own tasks never wait on an upcall: its write faults on
    // node 1 take the default at once.
    let no_server = stat("no_server")?;
    let timeouts = stat("timeouts")?;
    let w = srv.cmd("self-write")?;
    let no_server = stat("no_server")? - no_server;
    let timeouts = stat("timeouts")? - timeouts;
    println!(
        "fault-no-server: the server wrote {} of its own pages on node 1: {} now on node 0, \
         data right: {}; {no_server} requests without a server, {timeouts} timeouts",
        w[0], w[1], w[2]
    );
    ensure(
        w == ["16", "16", "true"] && no_server >= 16 && timeouts == 0,
        || "the server's own write faults did not take the default at once".into(),
    )?;

    let mem = demoted(&mut srv, LEN, 0xfa, false)?;
    srv.kill()?;
    let faults_before = stat("write_faults")?;
    let promoted_before = stat("promoted")?;

    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let mut mem = mem;
        flip(&mut mem, |_| true);
        let _ = tx.send(mem);
    });
    let Ok(mut mem) = rx.recv_timeout(Duration::from_secs(120)) else {
        bail!("writes to managed pages with no server did not finish in 120 s");
    };
    let secs = start.elapsed().as_secs_f64();
    let faults = stat("write_faults")? - faults_before;
    let promoted = stat("promoted")? - promoted_before;
    println!(
        "fault-no-server: {} pages written in {secs:.1} s with no server: \
         {faults} write faults, {promoted} default promotions",
        pages(LEN)
    );
    ensure(
        faults == pages(LEN) as u64 && promoted == pages(LEN) as u64,
        || format!("want {} write faults and promotions", pages(LEN)),
    )?;
    all_on_node0("after the writes", &mem)?;
    check_flipped(&mut mem, 0xfa, |_| true)?;
    // The node stayed managed: a new server adopts it and detaches it.
    Server::start(0)?.quit()
}

// ---------------------------------------------------------------------------

/// Write faults of this process on `mem` counted by the server since
/// `reset`.
fn my_faults(srv: &mut Server, mem: &Anon) -> Result<u64> {
    Ok(srv.faults_at(mem.addr(), mem.as_slice().len())?.0)
}

fn fence_case(
    srv: &mut Server,
    name: &str,
    seed: u64,
    write: impl FnOnce(&mut Anon) -> Result<()>,
) -> Result<()> {
    const LEN: usize = 4 << 20;
    let mut mem = demoted(srv, LEN, seed, false)?;
    srv.cmd("reset")?;
    write(&mut mem)?;
    let faults = my_faults(srv, &mem)?;
    println!(
        "write-fence: {name}: {faults} WRITE_FAULTs for {} pages",
        pages(LEN)
    );
    ensure(faults == pages(LEN) as u64, || {
        format!("{name}: {faults} WRITE_FAULTs, want {}", pages(LEN))
    })?;
    all_on_node0(name, &mem)?;
    check_flipped(&mut mem, seed, |_| true)
}

fn mprotect(mem: &Anon, prot: i32) -> Result<()> {
    // SAFETY: changing the protection of our own mapping.
    if unsafe { libc::mprotect(mem.addr() as *mut _, mem.as_slice().len(), prot) } < 0 {
        return Err(std::io::Error::last_os_error()).context("mprotect");
    }
    Ok(())
}

/// `write-fence`: every way of writing to a demoted page asks first.
pub fn write_fence() -> Result<()> {
    let mut srv = Server::start(0)?;

    fence_case(&mut srv, "plain store", 0xf1, |mem| {
        flip(mem, |_| true);
        Ok(())
    })?;

    fence_case(&mut srv, "mprotect RO->RW then store", 0xf2, |mem| {
        mprotect(mem, libc::PROT_READ)?;
        mprotect(mem, libc::PROT_READ | libc::PROT_WRITE)?;
        flip(mem, |_| true);
        Ok(())
    })?;

    fence_case(&mut srv, "process_vm_writev", 0xf3, |mem| {
        let mut data = mem.as_slice().to_vec();
        for (i, page) in data.chunks_mut(PAGE_SIZE).enumerate() {
            page[..8].copy_from_slice(&(!first_word(i, 0xf3)).to_ne_bytes());
        }
        let local = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        let remote = libc::iovec {
            iov_base: mem.addr() as *mut _,
            iov_len: data.len(),
        };
        // SAFETY: one local and one remote iovec of the same length; the
        // remote one is our own mapping.
        let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
        ensure(n == data.len() as isize, || {
            format!(
                "process_vm_writev wrote {n}: {}",
                std::io::Error::last_os_error()
            )
        })
    })?;

    in_place_case(&mut srv)?;
    numa_case(&mut srv)?;
    direct_read(&mut srv)?;
    fork_case(&mut srv)?;
    thp_case(&mut srv)?;
    ptrace_case(&mut srv)?;
    srv.quit()
}

/// A server that answers ALLOW_IN_PLACE: each page faults once, is written
/// where it is, stays on node 1, and later writes to it do not fault.
fn in_place_case(srv: &mut Server) -> Result<()> {
    const LEN: usize = 1 << 20;
    let mut mem = demoted(srv, LEN, 0xf9, false)?;
    srv.cmd("reset")?;
    srv.cmd("wf inplace")?;
    flip(&mut mem, |_| true);
    let first = my_faults(srv, &mem)?;
    flip(&mut mem, |_| true);
    flip(&mut mem, |_| true);
    let again = my_faults(srv, &mem)? - first;
    srv.cmd("wf promote")?;
    let (n0, n1, _) = where_are(&mem)?;
    println!(
        "write-fence: ALLOW_IN_PLACE: {first} WRITE_FAULTs for {} pages, {again} more for two \
         more passes; {n1} pages still on node 1, {n0} on node 0",
        pages(LEN)
    );
    ensure(
        first == pages(LEN) as u64 && again == 0 && n1 == pages(LEN),
        || "ALLOW_IN_PLACE did not make exactly those mappings writable in place".into(),
    )?;
    check_flipped(&mut mem, 0xf9, |_| true)
}

/// NUMA balancing in tiering mode (2) scans the demoted pages; the hint
/// faults go to the server, which says STAY; then a store still asks.
fn numa_case(srv: &mut Server) -> Result<()> {
    const LEN: usize = 4 << 20;
    const KNOBS: &str = "/sys/kernel/debug/sched/numa_balancing";
    let mut mem = demoted(srv, LEN, 0xf8, false)?;
    srv.cmd("reset")?;
    let old = sys::read("/proc/sys/kernel/numa_balancing")?;
    sys::write("/proc/sys/kernel/numa_balancing", "2")?;
    // Scan soon and often where the kernel lets us say so.
    let _ = sys::write(&format!("{KNOBS}/scan_delay_ms"), "0");
    let _ = sys::write(&format!("{KNOBS}/scan_period_min_ms"), "100");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sum = 0u64;
    let hints = loop {
        for _ in 0..20 {
            for page in mem.as_slice().chunks(PAGE_SIZE) {
                sum = sum.wrapping_add(u64::from(std::hint::black_box(page[8])));
            }
        }
        let hints = srv.stat("hint")?;
        if hints >= 2 || Instant::now() > deadline {
            break hints;
        }
    };
    sys::write("/proc/sys/kernel/numa_balancing", &old)?;
    let (n0, n1, _) = where_are(&mem)?;
    println!(
        "write-fence: NUMA balancing mode 2: {hints} HINT_FAULT upcalls answered STAY; {n1} pages still on node 1, {n0} on node 0 (read sum {sum:#x})"
    );
    ensure(hints >= 1, || {
        "no HINT_FAULT upcall in 60 s of NUMA balancing".into()
    })?;
    ensure(n1 == pages(LEN), || {
        format!("{n0} pages left node 1 although the server said STAY")
    })?;
    flip(&mut mem, |_| true);
    let faults = my_faults(srv, &mem)?;
    println!(
        "write-fence: store after hint faults: {faults} WRITE_FAULTs for {} pages",
        pages(LEN)
    );
    ensure(faults == pages(LEN) as u64, || {
        format!(
            "store after hint faults: {faults} WRITE_FAULTs, want {}",
            pages(LEN)
        )
    })?;
    all_on_node0("store after hint faults", &mem)?;
    check_flipped(&mut mem, 0xf8, |_| true)
}

/// `O_DIRECT` read of a file into demoted pages.
fn direct_read(srv: &mut Server) -> Result<()> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    const LEN: usize = 1 << 20;
    let path = std::env::current_exe()?;
    let mut want = vec![0u8; LEN];
    std::fs::File::open(&path)?.read_exact(&mut want)?;
    let mut mem = demoted(srv, LEN, 0xf4, false)?;
    srv.cmd("reset")?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .with_context(|| format!("open {} with O_DIRECT", path.display()))?;
    let mut got = 0;
    while got < LEN {
        let buf = &mut mem.as_mut_slice()[got..];
        // SAFETY: reading into our own mapping, within its length.
        let n = unsafe {
            libc::pread(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                buf.as_mut_ptr().cast(),
                buf.len(),
                got as libc::off_t,
            )
        };
        if n <= 0 {
            return Err(std::io::Error::last_os_error()).context("O_DIRECT pread");
        }
        got += n as usize;
    }
    let faults = my_faults(srv, &mem)?;
    println!(
        "write-fence: O_DIRECT read: {faults} WRITE_FAULTs for {} pages",
        pages(LEN)
    );
    ensure(faults == pages(LEN) as u64, || {
        format!("O_DIRECT read: {faults} WRITE_FAULTs, want {}", pages(LEN))
    })?;
    ensure(mem.as_slice() == want.as_slice(), || {
        "O_DIRECT read: data differs from the file".into()
    })?;
    all_on_node0("O_DIRECT read", &mem)
}

/// fork, then the child writes odd pages and the parent even ones; each
/// write to a page still on node 1 asks the server.
fn fork_case(srv: &mut Server) -> Result<()> {
    const LEN: usize = 2 << 20;
    let mut mem = demoted(srv, LEN, 0xf5, false)?;
    srv.cmd("reset")?;
    let odd = |i: usize| !i.is_multiple_of(2);
    let even = |i: usize| i.is_multiple_of(2);
    // SAFETY: the child only touches memory and calls async-signal-safe
    // functions before _exit.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if child == 0 {
        flip(&mut mem, odd);
        let ok = check_flipped(&mut mem, 0xf5, odd).is_ok();
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(child, &raw mut status, 0) };
    ensure(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        || format!("the child found wrong data (status {status:#x})"),
    )?;
    let (child_faults, _) = srv.faults(child as u32)?;
    flip(&mut mem, even);
    let parent_faults = my_faults(srv, &mem)?;
    let half = (pages(LEN) / 2) as u64;
    println!(
        "write-fence: fork: child {child_faults} WRITE_FAULTs for {half} pages, \
         parent {parent_faults} for {half} pages"
    );
    ensure(child_faults == half && parent_faults == half, || {
        format!("fork: child {child_faults}, parent {parent_faults}, want {half} each")
    })?;
    check_flipped(&mut mem, 0xf5, even)?;
    all_on_node0("fork", &mem)
}

/// A THP-backed region: PMD-mapped folios are fenced and promoted whole.
fn thp_case(srv: &mut Server) -> Result<()> {
    const LEN: usize = 8 << 20;
    let mut mem = demoted(srv, LEN, 0xf6, true)?;
    // The region's own PMD-mapped huge pages, and its folios (a THP's
    // pages share a naturally aligned head pfn): one write fault each.
    let pmd_kb = vma_smaps(mem.addr(), "AnonHugePages")?;
    let pmd_thps = pmd_kb / 2048;
    let mut heads = std::collections::BTreeSet::new();
    for pfn in sys::pfns(&mem)? {
        heads.insert(if crate::holes::is_thp(pfn)? {
            pfn & !511
        } else {
            pfn
        });
    }
    let folios = heads.len() as u64;
    srv.cmd("reset")?;
    flip(&mut mem, |_| true);
    let faults = my_faults(srv, &mem)?;
    let thp = srv.stat("thp")?;
    println!(
        "write-fence: THP region ({pmd_kb} kB PMD-mapped on node 1, {folios} folios): \
         {faults} WRITE_FAULTs ({thp} on PMD-mapped folios) for {} pages",
        pages(LEN)
    );
    ensure(pmd_thps >= 1, || {
        "no huge page on node 1 after the move: the PMD case was not tested".into()
    })?;
    ensure(faults == folios && thp == pmd_thps, || {
        format!(
            "THP region: {faults} WRITE_FAULTs ({thp} PMD-mapped) for {folios} folios \
             ({pmd_thps} PMD-mapped): want one per folio"
        )
    })?;
    all_on_node0("THP region", &mem)?;
    check_flipped(&mut mem, 0xf6, |_| true)
}

/// A field (kB) of the `/proc/self/smaps` entry of the mapping at `addr`.
fn vma_smaps(addr: usize, key: &str) -> Result<u64> {
    let text = sys::read("/proc/self/smaps")?;
    let mut inside = false;
    for l in text.lines() {
        if let Some((range, _)) = l.split_once(' ')
            && let Some((lo, hi)) = range.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            inside = (lo..hi).contains(&addr);
            continue;
        }
        if inside && let Some(rest) = l.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
            return rest
                .split_whitespace()
                .next()
                .context("smaps field")?
                .parse()
                .context("smaps field");
        }
    }
    bail!("no {key} for the mapping at {addr:#x} in /proc/self/smaps")
}

/// `ptrace(PTRACE_POKEDATA)` into a traced child's demoted pages.  The
/// kernel's access to another process's memory may not drop the mmap lock,
/// so the fault takes the default verdict synchronously, without an upcall.
fn ptrace_case(srv: &mut Server) -> Result<()> {
    const N: usize = 16;
    let mut to_parent = [0i32; 2];
    let mut to_child = [0i32; 2];
    // SAFETY: creating two pipes.
    unsafe {
        libc::pipe(to_parent.as_mut_ptr());
        libc::pipe(to_child.as_mut_ptr());
    }
    // SAFETY: the child only maps, writes memory and uses raw syscalls.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if child == 0 {
        let ok = (|| -> Result<()> {
            let mut mem = Anon::new(N * PAGE_SIZE)?;
            sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
            sys::fill_pattern(mem.as_mut_slice(), 0xf7);
            let addr = mem.addr().to_ne_bytes();
            // SAFETY: writing 8 bytes to our pipe; reading 1 byte from the other.
            unsafe {
                libc::write(to_parent[1], addr.as_ptr().cast(), 8);
                let mut b = 0u8;
                libc::read(to_child[0], (&raw mut b).cast(), 1);
            }
            check_flipped(&mut mem, 0xf7, |_| true)?;
            let (n0, ..) = where_are(&mem)?;
            ensure(n0 == N, || format!("{n0} of {N} pages on node 0"))
        })()
        .is_ok();
        // SAFETY: leaving the child.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut addr = [0u8; 8];
    // SAFETY: reading 8 bytes from our pipe.
    unsafe { libc::read(to_parent[0], addr.as_mut_ptr().cast(), 8) };
    let addr = usize::from_ne_bytes(addr);
    let moved = srv.move_pages(child as u32, addr, N, NODE)?;
    ensure(moved == N, || format!("moved {moved} of {N} child pages"))?;
    srv.cmd("reset")?;
    let faults_before = stat("write_faults")?;
    let at_once_before = stat("decided_without_waiting")?;
    // SAFETY: tracing our own child; POKEDATA writes one word per page of
    // the region the child told us about.
    unsafe {
        if libc::ptrace(libc::PTRACE_ATTACH, child, 0, 0) < 0 {
            return Err(std::io::Error::last_os_error()).context("PTRACE_ATTACH");
        }
        let mut st = 0;
        libc::waitpid(child, &raw mut st, 0);
        for i in 0..N {
            let v = !first_word(i, 0xf7);
            if libc::ptrace(libc::PTRACE_POKEDATA, child, addr + i * PAGE_SIZE, v) < 0 {
                return Err(std::io::Error::last_os_error()).context("PTRACE_POKEDATA");
            }
        }
        libc::ptrace(libc::PTRACE_DETACH, child, 0, 0);
        libc::write(to_child[1], b"g".as_ptr().cast(), 1);
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(child, &raw mut status, 0) };
    let kernel_faults = stat("write_faults")? - faults_before;
    let at_once = stat("decided_without_waiting")? - at_once_before;
    // The kernel names the tracer as the faulting task: count every
    // upcall since the reset, whoever it names.
    let upcalls = srv.stat("wf")?;
    println!(
        "write-fence: PTRACE_POKEDATA: {kernel_faults} fenced write faults for {N} pages, \
         {at_once} decided at once, {upcalls} upcalls (no retry allowed: the default)"
    );
    ensure(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        || format!("the traced child found wrong data or pages off node 0 (status {status:#x})"),
    )?;
    ensure(
        kernel_faults == N as u64 && at_once == N as u64 && upcalls == 0,
        || {
            format!(
                "{kernel_faults} fenced write faults, {at_once} decided at once and {upcalls} \
                 upcalls for {N} poked pages; want {N}, {N} and 0"
            )
        },
    )
}
