//! Scenarios of the upcall transport (`/dev/mm_upcall`): `upcall-ping`,
//! `upcall-server-death`, `upcall-slow-server`, `upcall-bad-input`.
//!
//! The kernel's PING command makes kernel threads issue synthetic upcalls
//! through the same request/wait path the mm hooks use; the server answers
//! them here.  Servers that must die run as child processes
//! (`mm-guest --serve <mode>`), so the parent can SIGKILL them.

use std::collections::HashSet;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mm_upcall_kernel::proto::control::Control;
use mm_upcall_kernel::proto::event::Event;
use mm_upcall_kernel::proto::raw::{self, PingReply};
use mm_upcall_kernel::proto::upcall::Upcall;
use mm_upcall_kernel::proto::verdict::Verdict;
use mm_upcall_kernel::{Completion, Config, CtrlToken, Error, Transport, ping_reply};

use crate::sys::ensure;

/// Ask the kernel for a PING run; its result arrives as a control
/// completion with the returned token.
fn start_ping(t: &mut Transport, n: u32, threads: u16, events: bool) -> Result<CtrlToken> {
    Ok(t.submit_control(Control::Ping {
        nr_upcalls: n,
        nr_threads: threads,
        events,
        reply_addr: 0,
    })?)
}

/// Answer a PING upcall with its PONG; anything else is a test failure.
fn pong(
    t: &mut Transport,
    slot: u16,
    request: &mm_upcall_kernel::proto::upcall::Request,
) -> Result<()> {
    let Upcall::Ping { cookie } = request.upcall else {
        bail!("queue {}: unexpected upcall {:?}", t.q_id(), request.upcall);
    };
    t.commit(slot, request.seq, Verdict::Pong { cookie })?;
    Ok(())
}

/// Run a PING of `n` upcalls from `threads` kernel threads and answer every
/// upcall with its PONG; returns the kernel's reply and how many upcalls we
/// saw.  With `events`, also collect the PING events.
pub fn serve_ping(
    t: &mut Transport,
    n: u32,
    threads: u16,
    events: bool,
) -> Result<(PingReply, u64, Vec<u64>)> {
    let token = start_ping(t, n, threads, events)?;
    let mut seen = 0u64;
    let mut cookies = Vec::new();
    let mut out = Vec::new();
    loop {
        out.clear();
        t.wait(&mut out)?;
        for c in out.drain(..) {
            match c {
                Completion::Upcall { slot, request } => {
                    pong(t, slot, &request)?;
                    seen += 1;
                }
                Completion::Control { token: tk, outcome } if tk == token => {
                    let reply = ping_reply(outcome)?;
                    if events {
                        // Only the events not collected yet: asking for n
                        // more would sit out the 30 s (review L8).
                        let more = (n as usize).saturating_sub(cookies.len());
                        cookies.extend(drain_ping_events(t, more)?);
                    }
                    return Ok((reply, seen, cookies));
                }
                other => bail!("unexpected completion {other:?}"),
            }
        }
        if events {
            cookies.extend(drain_ping_events(t, 0)?);
        }
    }
}

/// Read PING events until `want` more have arrived (0: whatever is queued).
fn drain_ping_events(t: &Transport, want: usize) -> Result<Vec<u64>> {
    let mut got = Vec::new();
    let start = Instant::now();
    loop {
        for e in t.read_events()? {
            match e? {
                Event::Ping { cookie } => got.push(cookie),
                other => bail!("unexpected event {other:?}"),
            }
        }
        if got.len() >= want || start.elapsed() > Duration::from_secs(30) {
            return Ok(got);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn stats() -> Result<std::collections::HashMap<String, u64>> {
    let text = crate::sys::read("/sys/kernel/debug/mm_upcall/stats")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect())
}

pub fn stat(name: &str) -> Result<u64> {
    stats()?
        .get(name)
        .copied()
        .with_context(|| format!("no `{name}` in debugfs stats"))
}

/// `upcall-ping`: 100,000 synthetic upcalls from 4 kernel threads, every
/// verdict routed back intact, no timeouts; then the event path.
pub fn ping() -> Result<()> {
    let timeouts_before = stat("timeouts")?;
    let mut t = Transport::open(&Config {
        queue_depth: 64,
        required: raw::Features::PING | raw::Features::EVENTS,
        ..Config::default()
    })?;
    let n = 100_000;
    let start = Instant::now();
    let (r, seen, _) = serve_ping(&mut t, n, 4, false)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "upcall-ping: {} issued, {} answered, {} mismatched, {} timed out, {} defaulted; \
         server saw {seen}; {:.0} upcalls/s, mean {:.1} us, max {:.1} us (TCG)",
        r.issued,
        r.answered,
        r.mismatched,
        r.timed_out,
        r.defaulted,
        f64::from(n) / secs,
        r.total_ns as f64 / r.answered.max(1) as f64 / 1e3,
        r.max_ns as f64 / 1e3
    );
    ensure(r.issued == u64::from(n), || {
        format!("issued {} of {n}", r.issued)
    })?;
    ensure(r.answered == u64::from(n), || {
        format!("only {} of {n} verdicts came back intact", r.answered)
    })?;
    ensure(r.mismatched == 0, || {
        format!(
            "{} verdicts did not match what the server sent",
            r.mismatched
        )
    })?;
    ensure(r.timed_out == 0 && r.defaulted == 0, || {
        format!(
            "{} timeouts and {} defaults with a healthy server",
            r.timed_out, r.defaulted
        )
    })?;
    ensure(seen == u64::from(n), || {
        format!("the server saw {seen} upcalls, want {n}")
    })?;
    let timeouts_after = stat("timeouts")?;
    ensure(timeouts_after == timeouts_before, || {
        format!("debugfs timeouts went from {timeouts_before} to {timeouts_after}")
    })?;

    // Events: every PING upcall also posts one event; all arrive, in full.
    let m = 2000;
    let (r, _, cookies) = serve_ping(&mut t, m, 2, true)?;
    ensure(r.answered == u64::from(m), || {
        format!("event run: {} of {m} answered", r.answered)
    })?;
    let unique: HashSet<u64> = cookies.iter().copied().collect();
    ensure(
        cookies.len() == m as usize && unique.len() == m as usize,
        || {
            format!(
                "{} PING events ({} distinct), want {m}",
                cookies.len(),
                unique.len()
            )
        },
    )?;
    ensure((1..=u64::from(m)).all(|c| unique.contains(&c)), || {
        "PING event cookies are not 1..=N".into()
    })?;
    println!("upcall-ping: {m} events delivered through read(2), none lost");
    drop(t);
    two_queues()
}

/// Serve queue 1 of the server on its own thread until `stop`; returns how
/// many upcalls it answered.
fn serve_queue(
    opener: mm_upcall_kernel::QueueOpener,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<u64> {
    use std::sync::atomic::Ordering;
    let mut t = opener.open(1)?;
    let mut seen = 0;
    let mut out = Vec::new();
    while !stop.load(Ordering::Acquire) {
        out.clear();
        t.wait_timeout(&mut out, Duration::from_millis(50))?;
        for c in out.drain(..) {
            match c {
                Completion::Upcall { slot, request } => {
                    pong(&mut t, slot, &request)?;
                    seen += 1;
                }
                other => bail!("queue 1: unexpected completion {other:?}"),
            }
        }
        t.flush()?;
    }
    Ok(seen)
}

/// Two queues, one thread each: PING threads are spread over both CPUs,
/// and requests go to the queue of the CPU they run on, so both queues must
/// carry upcalls and every verdict must come back.
fn two_queues() -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut t = open_retry(&Config {
        nr_queues: 2,
        queue_depth: 16,
        ..Config::default()
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let opener = t.queue_opener()?;
    let worker = {
        let stop = stop.clone();
        std::thread::spawn(move || serve_queue(opener, stop))
    };
    let n = 20_000;
    let served = serve_ping(&mut t, n, 4, false);
    // The PING completed, so every upcall of either queue was answered.
    stop.store(true, Ordering::Release);
    let seen1 = worker
        .join()
        .map_err(|_| anyhow::anyhow!("queue 1 thread panicked"))??;
    let (r, seen0, _) = served?;
    println!(
        "upcall-ping: two queues: {} of {n} answered; queue 0 served {seen0}, queue 1 served {seen1}",
        r.answered
    );
    ensure(
        r.answered == u64::from(n) && r.mismatched == 0 && r.timed_out == 0,
        || {
            format!(
                "two queues: {} answered, {} mismatched, {} timed out of {n}",
                r.answered, r.mismatched, r.timed_out
            )
        },
    )?;
    ensure(seen0 > 0 && seen1 > 0, || {
        format!("queue 0 served {seen0}, queue 1 {seen1}: requests did not use both queues")
    })?;
    ensure(seen0 + seen1 == u64::from(n), || {
        format!("queues served {seen0} + {seen1}, want {n}")
    })?;
    Ok(())
}

/// Child-process servers for the death scenario.
pub fn serve(mode: &str) -> Result<()> {
    match mode {
        // Answer forever while a huge PING runs.
        "answer" => {
            let mut t = Transport::open(&Config {
                queue_depth: 16,
                timeout_ms: raw::MAX_TIMEOUT_MS,
                ..Config::default()
            })?;
            start_ping(&mut t, raw::ping::MAX_UPCALLS, 4, false)?;
            let mut answered = 0u64;
            let mut out = Vec::new();
            loop {
                out.clear();
                t.wait(&mut out)?;
                for c in out.drain(..) {
                    if let Completion::Upcall { slot, request } = c {
                        if let Upcall::Ping { cookie } = request.upcall {
                            t.commit(slot, request.seq, Verdict::Pong { cookie })?;
                        }
                        answered += 1;
                        if answered == 1000 {
                            println!("SERVING");
                        }
                    }
                }
            }
        }
        // Take upcalls into every slot and never answer.
        "hold" => {
            let depth = 8;
            let mut t = Transport::open(&Config {
                queue_depth: depth,
                timeout_ms: raw::MAX_TIMEOUT_MS,
                ..Config::default()
            })?;
            start_ping(&mut t, 1000, 16, false)?;
            let mut held = 0;
            let mut out = Vec::new();
            while held < depth {
                out.clear();
                t.wait(&mut out)?;
                held += out
                    .iter()
                    .filter(|c| matches!(c, Completion::Upcall { .. }))
                    .count() as u16;
            }
            println!("HELD {held}");
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        other => bail!("unknown server mode `{other}`"),
    }
}

fn spawn_server(mode: &str, ready: &str) -> Result<Child> {
    let me = std::env::current_exe()?;
    let mut child = Command::new(me)
        .args(["--serve", mode])
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the server child")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if !line.starts_with(ready) {
        let _ = child.kill();
        // Say how it went: an empty line is a child that died silently.
        let status = child.wait().map(|s| format!("{s}")).unwrap_or_default();
        bail!("server `{mode}` did not get ready: {line:?} (the child: {status})");
    }
    Ok(child)
}

/// Tasks whose comm starts with `prefix`, and tasks in D state (excluding
/// idle kernel threads, which sleep in D legitimately: state `I`).
fn tasks() -> Result<(Vec<String>, Vec<String>)> {
    let mut ping = Vec::new();
    let mut d = Vec::new();
    for e in std::fs::read_dir("/proc")? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{name}/stat")) else {
            continue;
        };
        // pid (comm) state ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let state = stat[close + 1..].split_whitespace().next().unwrap_or("");
        if comm.starts_with("mm_upcall-ping") {
            ping.push(format!("{name}:{comm}:{state}"));
        }
        if state == "D" {
            d.push(format!("{name} ({comm})"));
        }
    }
    Ok((ping, d))
}

/// Open the transport, retrying while the previous holder's file is still
/// being released (io_uring tears rings down asynchronously).
pub fn open_retry(cfg: &Config) -> Result<Transport> {
    let start = Instant::now();
    loop {
        match Transport::open(cfg) {
            Ok(t) => return Ok(t),
            Err(Error::Open { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY)
                    && start.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// After a server died: every PING waiter got its default long before the
/// (60 s) timeout, nothing is in D state, and a new server can serve.
fn after_death(what: &str, killed_at: Instant) -> Result<()> {
    loop {
        let (ping, _) = tasks()?;
        if ping.is_empty() {
            break;
        }
        // The server asked for the longest timeout (60 s); waiters that
        // needed it would still be here.  Defaults "at once" finish far
        // sooner, whatever the machine's speed.
        if killed_at.elapsed() > Duration::from_secs(30) {
            bail!("{what}: PING threads still waiting 30 s after the server died: {ping:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "upcall-server-death: {what}: every waiter released {:.0} ms after SIGKILL (timeout 60000 ms)",
        killed_at.elapsed().as_secs_f64() * 1e3
    );
    // Teardown work (file release, io_uring exit work) may pass through D
    // briefly; a task *left* in D state stays there.
    let mut d = tasks()?.1;
    for _ in 0..100 {
        if d.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        d = tasks()?.1;
    }
    ensure(d.is_empty(), || {
        format!("{what}: tasks stuck in D state for 10 s: {d:?}")
    })?;

    // A new server attaches.
    let mut t = open_retry(&Config::default())
        .with_context(|| format!("{what}: a new server cannot attach"))?;
    let (r, _, _) = serve_ping(&mut t, 1000, 2, false)?;
    ensure(r.answered == 1000, || {
        format!("{what}: the new server got {} of 1000 answers", r.answered)
    })?;
    Ok(())
}

/// `upcall-server-death`.
pub fn server_death() -> Result<()> {
    let aborted = stat("aborted")?;
    for (mode, ready, what) in [
        ("answer", "SERVING", "upcalls outstanding"),
        ("hold", "HELD", "every slot busy"),
    ] {
        let mut child = spawn_server(mode, ready)?;
        std::thread::sleep(Duration::from_millis(200));
        child.kill()?;
        let killed_at = Instant::now();
        child.wait()?;
        after_death(what, killed_at)?;
    }
    let aborted_after = stat("aborted")?;
    ensure(aborted_after > aborted, || {
        "no waiter was aborted by the server deaths".into()
    })?;
    println!(
        "upcall-server-death: {} waiters aborted to the default verdict",
        aborted_after - aborted
    );
    Ok(())
}

/// `upcall-slow-server`: a server that never answers; every waiter times
/// out into the default, and the kernel counts it.  A PING run ends at its
/// first timeout (transport review finding 12): each of its 4 threads
/// waits out one upcall, and the other 20 default without being asked,
/// instead of each holding a slot for a timeout (24 timeouts before).
pub fn slow_server() -> Result<()> {
    let before = stat("timeouts")?;
    let mut t = Transport::open(&Config {
        queue_depth: 4,
        timeout_ms: 200,
        ..Config::default()
    })?;
    let n = 24;
    let token = start_ping(&mut t, n, 4, false)?;
    let mut held = 0;
    let mut out = Vec::new();
    let reply = loop {
        out.clear();
        t.wait(&mut out)?;
        let mut done = None;
        for c in out.drain(..) {
            match c {
                Completion::Upcall { .. } => held += 1,
                Completion::Control { token: tk, outcome } if tk == token => {
                    done = Some(ping_reply(outcome)?)
                }
                other => bail!("unexpected completion {other:?}"),
            }
        }
        if let Some(r) = done {
            break r;
        }
    };
    let after = stat("timeouts")?;
    println!(
        "upcall-slow-server: {} issued, {} timed out, {} defaulted, {} answered; server held \
         {held} upcalls; debugfs timeouts +{}",
        reply.issued,
        reply.timed_out,
        reply.defaulted,
        reply.answered,
        after - before
    );
    // At most one timeout per thread (a thread that starts after another
    // has timed out asks nothing at all).
    const THREADS: u64 = 4;
    let timed_out = reply.timed_out;
    ensure(
        reply.issued == u64::from(n)
            && (1..=THREADS).contains(&timed_out)
            && reply.defaulted == u64::from(n) - timed_out,
        || {
            format!(
                "{} issued, {timed_out} timed out, {} defaulted; want {n}, 1 to {THREADS} (at most \
                 one per thread: the run ends at its first timeout), the rest",
                reply.issued, reply.defaulted,
            )
        },
    )?;
    ensure(reply.answered == 0, || {
        "a server that never answers got answers counted".into()
    })?;
    ensure(after - before == timed_out, || {
        format!(
            "debugfs counted {} timeouts, want {timed_out}",
            after - before
        )
    })?;
    ensure(held == timed_out, || {
        format!("the server saw {held} upcalls, want one per timeout ({timed_out})")
    })?;
    Ok(())
}

/// `upcall-c-client`: the kselftest / reference client of the series
/// (`tools/testing/selftests/mm_upcall`), built on the host by xtask.
pub fn c_client() -> Result<()> {
    let path =
        std::env::var("MM_SELFTEST").context("MM_SELFTEST is not set (run through xtask)")?;
    let out = Command::new(&path)
        .output()
        .with_context(|| format!("cannot run {path}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    for l in text.lines() {
        println!("upcall-c-client: {l}");
    }
    // kselftest: exit 0 = pass, 4 = skip; a skip is a failure here.
    ensure(out.status.code() == Some(0), || {
        format!("{path} exited with {}", out.status)
    })?;
    ensure(text.contains("# Totals: pass:5 fail:0"), || {
        "the selftest did not report 5 passes".into()
    })
}

/// `xtask demo`, after the topology: a server answers 10,000 PING upcalls
/// from kernel threads, then attaches node 1 and maps it read-only.
pub fn demo() -> Result<()> {
    let mut t = open_retry(&Config::default())?;
    let h = *t.hello();
    println!(
        "demo: server attached to /dev/mm_upcall: API {}, features {:#x}, {} slots, timeout {} ms",
        raw::API_VERSION,
        h.features,
        h.queue_depth,
        h.timeout_ms
    );
    let n = 10_000;
    let (r, seen, _) = serve_ping(&mut t, n, 2, false)?;
    println!(
        "demo: {n} PING upcalls from 2 kernel threads: {} answered, {} timed out, mean round trip {:.0} us, p99 {:.0} us (TCG); server saw {seen}",
        r.answered,
        r.timed_out,
        r.total_ns as f64 / r.answered.max(1) as f64 / 1e3,
        r.quantile_ns(990) as f64 / 1e3
    );
    // For the report's chart (`xtask demo` reads the `report:` lines).
    for (b, &c) in r.hist.iter().enumerate().filter(|&(_, &c)| c > 0) {
        println!(
            "report: ping {} {c}",
            mm_upcall_kernel::proto::raw::ping::hist_lower_bound(b)
        );
    }
    let out = t.control_sync(Control::AttachNode {
        nid: 1,
        credit_pages: 0,
        reply_addr: 0,
    })?;
    out.result?;
    let info = mm_upcall_kernel::proto::control::decode_node_info(&out.reply)?;
    println!(
        "demo: node 1 attached: pfns {:#x}..{:#x} ({} MiB), mappable read-only at offset {:#x}",
        info.start_pfn,
        info.start_pfn + info.spanned_pages,
        (info.spanned_pages * 4096) >> 20,
        info.mmap_offset
    );
    ensure(r.answered == u64::from(n), || {
        format!("only {} of {n} answered", r.answered)
    })
}
