//! A small test server for managed nodes (`mm-guest --serve managed`),
//! and the handle the scenarios drive it through.
//!
//! The server must be another process than the workload: the kernel never
//! lets the server's own tasks wait on an upcall.  It attaches node 1,
//! answers upcalls by a mode the test sets, keeps the books of node 1 from
//! the kernel's events, and runs commands read from stdin, one reply line
//! each (`OK ...` or `ERR ...`) on stdout.
//!
//! Commands:
//! - `stats`: counters and the books (`key=value` pairs);
//! - `faults <tgid> [<addr> <len>]`: write faults of one process (in one
//!   range of it): total and distinct pages;
//! - `reset`: zero the fault counters;
//! - `wf promote|inplace|default|hold`: verdict for WRITE_FAULT (`hold`
//!   answers none: they wait in their slots until `release`);
//! - `held`: how many WRITE_FAULTs are held; `release`: answer them DEFAULT;
//! - `hints hold`: never answer HINT_FAULTs from now on;
//! - `credit set <pages>` (SET_CREDIT), `credit mode deny|grant:<pages>`;
//! - `standing none|default|<target> [<nid>]`: SET_STANDING (of node 1
//!   unless `nid` is given): the command's result;
//! - `detach` (DETACH_NODE) and `attach <credit>` (ATTACH_NODE again):
//!   the commands' results;
//! - `move <pid> <addr> <pages> <node>`: `move_pages(2)` as the server;
//! - `promote <pfn> <nid>`: PROMOTE_PFN;
//! - `resync`: forget the books and rebuild them with RESYNC;
//! - `raw-promote <pfn> <nid>` and `raw-resync <start> <pages>`: the
//!   commands' results, for error cases;
//! - `self-write`: move 16 of the server's own pages to node 1 and write
//!   them (the kernel must not make the server wait on itself): pages
//!   moved, pages on node 0 afterwards, whether the data is right;
//! - `placed-by`: pages of PLACED events per tgid, as `tgid:pages` words;
//! - `quit`: detach node 1 and exit.
//!
//! Option `pidns` starts the server as the first process of a new PID
//! namespace (the PIDs the kernel reports must be that namespace's).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mm_upcall_kernel::proto::control::{Control, Standing, decode_node_info};
use mm_upcall_kernel::proto::event::Event;
use mm_upcall_kernel::proto::raw::{self, NodeInfo};
use mm_upcall_kernel::proto::upcall::Upcall;
use mm_upcall_kernel::proto::verdict::Verdict;
use mm_upcall_kernel::{Completion, Config, Transport};

use crate::sys::{self, PAGE_SIZE};

/// The managed node of the test bed.
pub const NODE: u32 = 1;

/// A pfn's contribution to a set hash (order-independent: summed).
pub fn pfn_hash(pfn: u64) -> u64 {
    let mut z = pfn.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The pages the server believes are resident on node 1.
#[derive(Default)]
struct Books {
    pages: HashSet<u64>,
}

impl Books {
    fn add(&mut self, pfn: u64, order: u32) {
        self.pages.extend(pfn..pfn + (1 << order));
    }

    fn remove(&mut self, pfn: u64, order: u32) {
        for p in pfn..pfn + (1 << order) {
            self.pages.remove(&p);
        }
    }

    fn summary(&self) -> (usize, u64) {
        let hash = self
            .pages
            .iter()
            .fold(0u64, |h, &p| h.wrapping_add(pfn_hash(p)));
        (self.pages.len(), hash)
    }
}

#[derive(Clone, Copy)]
enum CreditMode {
    Deny,
    Grant(u32),
}

struct State {
    info: NodeInfo,
    wf_verdict: Verdict,
    /// `wf alternate`: pages at even addresses PROMOTE(0), odd ones
    /// ALLOW_IN_PLACE, so that where a page ends up shows which verdict
    /// the kernel applied (the default promotes, like PROMOTE(0)).
    wf_alternate: bool,
    credit_mode: CreditMode,
    /// Write faults per (tgid, page address).
    faults: HashMap<(u32, u64), u32>,
    thp_faults: u64,
    hint_faults: u64,
    credit_requests: u64,
    /// Pages placed when the first DEMOTE_CREDIT arrived.
    placed_at_first_request: Option<u64>,
    placed: u64,
    freed: u64,
    promoted: u64,
    overflows: u64,
    malformed: u64,
    /// Slots whose fetch failed (re-armed); `quit` requires none.
    slot_failures: u64,
    books: Books,
    /// Pages of PLACED events per tgid.
    placed_by: BTreeMap<u32, u64>,
    /// Events were lost: the books need a RESYNC.
    stale: bool,
    /// `wf hold`: WRITE_FAULTs are not answered.
    hold: bool,
    /// The held WRITE_FAULTs: (slot, seq).
    held: Vec<(u16, u32)>,
    /// `hints hold`: HINT_FAULTs are never answered (they stay in their
    /// slots until the server goes).
    hold_hints: bool,
}

impl State {
    fn decide(&mut self, upcall: &Upcall) -> Verdict {
        match *upcall {
            Upcall::WriteFault(f) => {
                *self.faults.entry((f.tgid, f.vaddr & !0xfff)).or_default() += 1;
                if f.thp {
                    self.thp_faults += 1;
                }
                if self.wf_alternate && (f.vaddr >> 12) & 1 == 1 {
                    Verdict::AllowInPlace
                } else {
                    self.wf_verdict
                }
            }
            Upcall::HintFault { .. } => {
                self.hint_faults += 1;
                Verdict::Stay
            }
            Upcall::DemoteCredit { .. } => {
                self.credit_requests += 1;
                self.placed_at_first_request.get_or_insert(self.placed);
                match self.credit_mode {
                    CreditMode::Deny => Verdict::Deny,
                    CreditMode::Grant(pages) => Verdict::Grant { pages },
                }
            }
            Upcall::Ping { cookie } => Verdict::Pong { cookie },
        }
    }

    fn events(&mut self, t: &Transport) -> Result<()> {
        loop {
            let batch = t.read_events().context("read events")?;
            if batch.is_empty() {
                return Ok(());
            }
            for e in batch {
                match e {
                    Ok(Event::Placed {
                        nid,
                        pfn,
                        order,
                        tgid,
                        ..
                    }) if u32::from(nid) == NODE => {
                        self.placed += 1 << order;
                        *self.placed_by.entry(tgid).or_default() += 1 << order;
                        self.books.add(pfn, order);
                    }
                    Ok(Event::Freed { pfn, order, .. }) => {
                        self.freed += 1 << order;
                        self.books.remove(pfn, order);
                    }
                    Ok(Event::FreedRange { pfn, pages, .. }) => {
                        self.freed += pages;
                        for p in pfn..pfn.saturating_add(pages) {
                            self.books.remove(p, 0);
                        }
                    }
                    Ok(Event::Promoted { pfn, order, .. }) => {
                        self.promoted += 1 << order;
                        self.books.remove(pfn, order);
                    }
                    Ok(Event::Overflow { .. }) => {
                        self.overflows += 1;
                        self.stale = true;
                    }
                    Ok(_) => {}
                    Err(_) => self.malformed += 1,
                }
            }
        }
    }

    fn stats(&self) -> String {
        let (pages, hash) = self.books.summary();
        let wf: u32 = self.faults.values().sum();
        let max = self.faults.values().max().copied().unwrap_or(0);
        format!(
            "OK wf={wf} distinct={} maxpp={max} thp={} hint={} creq={} placed_first={} \
             placed={} freed={} promoted={} overflow={} malformed={} books={pages} hash={hash}",
            self.faults.len(),
            self.thp_faults,
            self.hint_faults,
            self.credit_requests,
            self.placed_at_first_request
                .map_or_else(|| "none".to_string(), |p| p.to_string()),
            self.placed,
            self.freed,
            self.promoted,
            self.overflows,
            self.malformed,
        )
    }
}

fn errno_of(out: &mm_upcall_kernel::ControlOutcome) -> i32 {
    match &out.result {
        Ok(v) => *v,
        Err(e) => e.errno(),
    }
}

/// Rebuild the books with RESYNC over the whole node.
fn resync(t: &mut Transport, st: &mut State) -> Result<()> {
    st.events(t)?;
    st.books = Books::default();
    let end = st.info.start_pfn + st.info.spanned_pages;
    let mut pfn = st.info.start_pfn;
    let deadline = Instant::now() + Duration::from_secs(120);
    while pfn < end {
        let out = t.control_sync(Control::Resync {
            nid: NODE,
            start_pfn: pfn,
            nr_pages: end - pfn,
        })?;
        match errno_of(&out) {
            n if n > 0 => pfn += n as u64,
            n if n == -libc::EAGAIN => {}
            n => bail!("RESYNC from pfn {pfn:#x}: errno {n}"),
        }
        st.events(t)?;
        if Instant::now() > deadline {
            bail!("RESYNC did not finish in 120 s (at pfn {pfn:#x})");
        }
    }
    st.events(t)
}

fn command(t: &mut Transport, st: &mut State, line: &str) -> Result<Option<String>> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| -> Result<u64> {
        let s = w.get(i).context("missing argument")?;
        Ok(match s.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16)?,
            None => s.parse()?,
        })
    };
    let reply = match w.as_slice() {
        ["stats"] => {
            st.events(t)?;
            if st.stale {
                st.stale = false;
                resync(t, st)?;
            }
            st.stats()
        }
        ["books"] => {
            st.events(t)?;
            let mut pfns: Vec<u64> = st.books.pages.iter().copied().collect();
            pfns.sort_unstable();
            let list: Vec<String> = pfns.iter().map(|p| format!("{p:x}")).collect();
            format!("OK {}", list.join(" "))
        }
        ["placed-by"] => {
            st.events(t)?;
            let words: Vec<String> = st
                .placed_by
                .iter()
                .map(|(tgid, pages)| format!("{tgid}:{pages}"))
                .collect();
            format!("OK {}", words.join(" "))
        }
        ["faults", _] | ["faults", _, _, _] => {
            let tgid = num(1)? as u32;
            let range = match w.len() {
                4 => num(2)?..num(2)? + num(3)?,
                _ => 0..u64::MAX,
            };
            let mine: Vec<u32> = st
                .faults
                .iter()
                .filter(|((g, a), _)| *g == tgid && range.contains(a))
                .map(|(_, &n)| n)
                .collect();
            format!("OK {} {}", mine.iter().sum::<u32>(), mine.len())
        }
        ["reset"] => {
            st.faults.clear();
            st.thp_faults = 0;
            st.hint_faults = 0;
            "OK".into()
        }
        ["wf", "hold"] => {
            st.hold = true;
            "OK".into()
        }
        ["held"] => format!("OK {}", st.held.len()),
        ["hints", "hold"] => {
            st.hold_hints = true;
            "OK".into()
        }
        ["release"] => {
            st.hold = false;
            let n = st.held.len();
            for (slot, seq) in st.held.drain(..) {
                t.commit(slot, seq, Verdict::Default)?;
            }
            t.flush()?;
            format!("OK {n}")
        }
        ["wf", mode] => {
            st.hold = false;
            st.wf_alternate = *mode == "alternate";
            st.wf_verdict = match *mode {
                "alternate" => Verdict::Promote { nid: 0 },
                "promote" => Verdict::Promote { nid: 0 },
                "inplace" => Verdict::AllowInPlace,
                "default" => Verdict::Default,
                other => bail!("unknown write-fault mode {other}"),
            };
            "OK".into()
        }
        ["credit", "set", _] => {
            let out = t.control_sync(Control::SetCredit {
                nid: NODE,
                pages: num(2)?,
            })?;
            format!("OK {}", errno_of(&out))
        }
        ["credit", "mode", mode] => {
            st.credit_mode = match mode.strip_prefix("grant:") {
                Some(n) => CreditMode::Grant(n.parse()?),
                None if *mode == "deny" => CreditMode::Deny,
                None => bail!("unknown credit mode {mode}"),
            };
            "OK".into()
        }
        ["move", _, _, _, _] => {
            let (r, status) = sys::move_pages(
                num(1)? as i32,
                num(2)? as usize,
                num(3)? as usize,
                num(4)? as i32,
            );
            let node = num(4)? as i32;
            let on = status.iter().filter(|&&s| s == node).count();
            format!("OK {r} {on} {}", status.len() - on)
        }
        ["promote" | "raw-promote", _, _] => {
            let out = t.control_sync(Control::PromotePfn {
                pfn: num(1)?,
                nid: num(2)? as u32,
            })?;
            format!("OK {}", errno_of(&out))
        }
        ["raw-resync", _, _] => {
            let out = t.control_sync(Control::Resync {
                nid: NODE,
                start_pfn: num(1)?,
                nr_pages: num(2)?,
            })?;
            format!("OK {}", errno_of(&out))
        }
        ["resync"] => {
            resync(t, st)?;
            let (pages, hash) = st.books.summary();
            format!("OK books={pages} hash={hash}")
        }
        ["self-write"] => self_write()?,
        ["standing", what] | ["standing", what, _] => {
            let standing = match *what {
                "none" => Standing::Ask,
                "default" => Standing::Default,
                n => Standing::Promote(n.parse()?),
            };
            let nid = if w.len() == 3 { num(2)? as u32 } else { NODE };
            let out = t.control_sync(Control::SetStanding { nid, standing })?;
            format!("OK {}", errno_of(&out))
        }
        ["detach"] => {
            let out = t.control_sync(Control::DetachNode { nid: NODE })?;
            format!("OK {}", errno_of(&out))
        }
        ["attach", _] => {
            let out = t.control_sync(Control::AttachNode {
                nid: NODE,
                credit_pages: num(1)?,
                reply_addr: 0,
            })?;
            format!("OK {}", errno_of(&out))
        }
        ["quit"] => {
            let out = t.control_sync(Control::DetachNode { nid: NODE })?;
            println!("OK {} {}", errno_of(&out), st.slot_failures);
            return Ok(None);
        }
        _ => bail!("unknown command `{line}`"),
    };
    Ok(Some(reply))
}

/// The server writes its own pages on node 1: the kernel cannot ask the
/// server about its own faults, so it applies the default at once.
fn self_write() -> Result<String> {
    const N: usize = 16;
    let mut mem = sys::Anon::new(N * PAGE_SIZE)?;
    sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
    sys::fill_pattern(mem.as_mut_slice(), 0x5e1f);
    let (r, status) = sys::move_pages(0, mem.addr(), N, NODE as i32);
    let moved = status.iter().filter(|&&s| s == NODE as i32).count();
    if r < 0 {
        bail!("move_pages of the server's own pages: errno {r}");
    }
    for page in mem.as_mut_slice().chunks_mut(PAGE_SIZE) {
        page[8] ^= 0xff;
    }
    let (n0, _, _) = where_are(&mem)?;
    for page in mem.as_mut_slice().chunks_mut(PAGE_SIZE) {
        page[8] ^= 0xff;
    }
    let ok = sys::check_pattern(mem.as_slice(), 0x5e1f).is_none();
    Ok(format!("OK {moved} {n0} {ok}"))
}

/// `mm-guest --serve managed <credit pages>`: the test server.
pub fn serve(args: &[String]) -> Result<()> {
    let credit: u64 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(0);
    let mut features = raw::Features::WRITE_FAULT
        | raw::Features::HINT_FAULT
        | raw::Features::DEMOTE_CREDIT
        | raw::Features::EVENTS
        | raw::Features::NODE_MMAP;
    let (mut timeout_ms, mut queue_depth) = (10_000, 64);
    for option in args.get(1).map_or("", String::as_str).split(',') {
        if option == "no-write-fault" {
            features &= !raw::Features::WRITE_FAULT;
        } else if let Some(ms) = option.strip_prefix("timeout=") {
            timeout_ms = ms.parse().context("timeout=<ms>")?;
        } else if let Some(d) = option.strip_prefix("depth=") {
            queue_depth = d.parse().context("depth=<slots>")?;
        } else if option == "pidns" {
            sys::enter_new_pid_namespace()?;
        } else if !option.is_empty() {
            bail!("unknown server option {option}");
        }
    }
    // The previous server may still be going away: retry EBUSY a while.
    let mut t = crate::upcall::open_retry(&Config {
        queue_depth,
        timeout_ms,
        features,
        required: features,
        ..Config::default()
    })?;
    let out = t.control_sync(Control::AttachNode {
        nid: NODE,
        credit_pages: credit,
        reply_addr: 0,
    })?;
    if let Err(e) = &out.result {
        bail!("ATTACH_NODE {NODE}: {e}");
    }
    let info = decode_node_info(&out.reply)?;
    let mut st = State {
        info,
        wf_verdict: Verdict::Promote { nid: 0 },
        wf_alternate: false,
        credit_mode: CreditMode::Deny,
        faults: HashMap::new(),
        thp_faults: 0,
        hint_faults: 0,
        credit_requests: 0,
        placed_at_first_request: None,
        placed: 0,
        freed: 0,
        promoted: 0,
        overflows: 0,
        malformed: 0,
        slot_failures: 0,
        books: Books::default(),
        placed_by: BTreeMap::new(),
        stale: false,
        hold: false,
        held: Vec::new(),
        hold_hints: false,
    };

    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    println!(
        "READY {} {} {}",
        std::process::id(),
        info.start_pfn,
        info.spanned_pages
    );
    std::io::stdout().flush()?;

    let mut out = Vec::new();
    loop {
        out.clear();
        t.wait_timeout(&mut out, Duration::from_millis(20))?;
        for c in out.drain(..) {
            match c {
                Completion::Upcall { slot, request } => {
                    let v = st.decide(&request.upcall);
                    if st.hold && matches!(request.upcall, Upcall::WriteFault(_)) {
                        st.held.push((slot, request.seq));
                        continue;
                    }
                    if st.hold_hints && matches!(request.upcall, Upcall::HintFault { .. }) {
                        continue;
                    }
                    t.commit(slot, request.seq, v)?;
                }
                Completion::Malformed { slot, seq, .. } => {
                    st.malformed += 1;
                    t.commit(slot, seq, Verdict::Default)?;
                }
                Completion::SlotFailed { slot, error } => {
                    st.slot_failures += 1;
                    eprintln!("server: slot {slot} failed: {error}; re-arming");
                    t.fetch(slot)?;
                }
                Completion::Control { .. } | Completion::Readable { .. } => {}
                Completion::Teardown { .. } => bail!("the kernel tore the server down"),
            }
        }
        t.flush()?;
        st.events(&t)?;
        // Lost events: rebuild the books, as a real server does.
        if st.stale {
            st.stale = false;
            resync(&mut t, &mut st)?;
        }
        while let Ok(line) = rx.try_recv() {
            let reply = match command(&mut t, &mut st, &line) {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(()),
                Err(e) => format!("ERR {e:#}"),
            };
            println!("{reply}");
            std::io::stdout().flush()?;
            // A command may have placed pages (move): read their events
            // before the next one, so that the queue does not overflow.
            st.events(&t)?;
        }
    }
}

/// The test's handle on a running test server.
pub struct Server {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pid: u32,
    pub start_pfn: u64,
    pub spanned: u64,
}

impl Server {
    /// Start a server that attaches node 1 with `credit` pages of credit.
    pub fn start(credit: u64) -> Result<Self> {
        Self::start_with(credit, "")
    }

    /// As [`Server::start`]; `"no-write-fault"` starts a server that does
    /// not negotiate WRITE_FAULT, so that write faults take the kernel's
    /// default (for benchmarks); `"timeout=<ms>"` negotiates that upcall
    /// timeout instead of 10 s, `"depth=<slots>"` that many slots instead
    /// of 64 (options separated by commas).
    pub fn start_with(credit: u64, option: &str) -> Result<Self> {
        let mut child = Command::new("/proc/self/exe")
            .args(["--serve", "managed", &credit.to_string(), option])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn the test server")?;
        let stdin = child.stdin.take().context("server stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("server stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let w: Vec<&str> = line.split_whitespace().collect();
        let ["READY", pid, start, spanned] = w.as_slice() else {
            let _ = child.kill();
            bail!("the test server did not start: `{}`", line.trim());
        };
        Ok(Self {
            pid: pid.parse()?,
            start_pfn: start.parse()?,
            spanned: spanned.parse()?,
            child,
            stdin,
            stdout,
        })
    }

    /// Send a command and return the words of its `OK` reply.
    pub fn cmd(&mut self, line: &str) -> Result<Vec<String>> {
        writeln!(self.stdin, "{line}").context("write to the test server")?;
        self.stdin.flush()?;
        let mut reply = String::new();
        if self.stdout.read_line(&mut reply)? == 0 {
            bail!("the test server exited during `{line}`");
        }
        let mut w = reply.split_whitespace().map(str::to_string);
        match w.next().as_deref() {
            Some("OK") => Ok(w.collect()),
            _ => bail!("server: `{line}`: {}", reply.trim()),
        }
    }

    /// `stats` as a map.
    pub fn stats(&mut self) -> Result<HashMap<String, String>> {
        Ok(self
            .cmd("stats")?
            .into_iter()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect())
    }

    /// One numeric `stats` value.
    pub fn stat(&mut self, key: &str) -> Result<u64> {
        self.stats()?
            .get(key)
            .with_context(|| format!("no {key} in server stats"))?
            .parse()
            .with_context(|| format!("server stat {key}"))
    }

    /// `stats`, with the books' `(pages, hash)` and the kernel's, from a
    /// look where they agree, or the last of 20 looks 50 ms apart.  The two
    /// reads are not one snapshot: a page of this process freed between
    /// them (glibc trimming a heap page that reclaim demoted) is gone from
    /// kpageflags while its FREED event waits for the next command.
    #[allow(clippy::type_complexity)]
    pub fn settled(&mut self) -> Result<(HashMap<String, String>, (u64, u64), (u64, u64))> {
        let mut tries = 0;
        loop {
            let stats = self.stats()?;
            let books = (stats["books"].parse()?, stats["hash"].parse()?);
            let truth = kpageflags_truth(self.start_pfn, self.spanned)?;
            tries += 1;
            if books == truth || tries == 20 {
                return Ok((stats, books, truth));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pfns in the server's books.
    pub fn books(&mut self) -> Result<BTreeSet<u64>> {
        self.cmd("books")?
            .iter()
            .map(|p| u64::from_str_radix(p, 16).context("books: pfn"))
            .collect()
    }

    /// Write faults of process `tgid`: (total, distinct pages).
    pub fn faults(&mut self, tgid: u32) -> Result<(u64, u64)> {
        let w = self.cmd(&format!("faults {tgid}"))?;
        Ok((w[0].parse()?, w[1].parse()?))
    }

    /// Write faults of this process on `len` bytes at `addr`: (total,
    /// distinct pages).  The process's other pages may sit on node 1 too
    /// (reclaim in an earlier scenario of the boot demoted its heap).
    pub fn faults_at(&mut self, addr: usize, len: usize) -> Result<(u64, u64)> {
        let w = self.cmd(&format!("faults {} {addr} {len}", std::process::id()))?;
        Ok((w[0].parse()?, w[1].parse()?))
    }

    /// `move_pages(2)` of `pages` pages at `addr` of `pid` to `node`, by the
    /// server: how many ended up there.
    pub fn move_pages(&mut self, pid: u32, addr: usize, pages: usize, node: u32) -> Result<usize> {
        let w = self.cmd(&format!("move {pid} {addr} {pages} {node}"))?;
        let r: i32 = w[0].parse()?;
        if r < 0 {
            bail!("the server's move_pages failed: errno {r}");
        }
        Ok(w[1].parse()?)
    }

    /// A control command's result (`promote`, `raw-resync`, `credit set`).
    pub fn result(&mut self, line: &str) -> Result<i32> {
        Ok(self.cmd(line)?[0].parse()?)
    }

    /// (pages, hash) of the server's books after RESYNC.
    pub fn resync(&mut self) -> Result<(u64, u64)> {
        let w = self.cmd("resync")?;
        let get = |k: &str| -> Result<u64> {
            w.iter()
                .find_map(|kv| kv.strip_prefix(k))
                .context("resync reply")?
                .parse()
                .context("resync reply")
        };
        Ok((get("books=")?, get("hash=")?))
    }

    /// Detach node 1 and wait for the server to exit.
    pub fn quit(mut self) -> Result<()> {
        let w = self.cmd("quit")?;
        let status = self.child.wait()?;
        if w.first().map(String::as_str) != Some("0") || !status.success() {
            bail!("the test server did not detach cleanly: {w:?}, {status}");
        }
        // Books and verdicts are only as good as the slots that carried
        // them: a failed fetch is re-armed, and must not happen at all.
        if w.get(1).map(String::as_str) != Some("0") {
            bail!(
                "the test server's slots failed {} time(s)",
                w.get(1).map_or("?", String::as_str)
            );
        }
        Ok(())
    }

    /// SIGKILL the server and reap it.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    /// A scenario that fails half-way must not leave its server holding
    /// the device for the next part (after quit() or kill() this is a
    /// no-op on a reaped child).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The node 1 pages the kernel reports as anonymous in `/proc/kpageflags`:
/// (pages, hash), comparable with the server's books.
pub fn kpageflags_truth(start_pfn: u64, pages: u64) -> Result<(u64, u64)> {
    let anon = kpageflags_anon(start_pfn, pages)?;
    let hash = anon.keys().fold(0u64, |h, &p| h.wrapping_add(pfn_hash(p)));
    Ok((anon.len() as u64, hash))
}

/// `/proc/kpageflags` bits of typed pages (slab, free, page table,
/// offline): their `mapping` word holds other fields, so `KPF_ANON` means
/// nothing on them (a SLUB per-CPU partial slab often shows `ANON|KSM`).
pub const KPF_TYPED: u64 = 1 << 7 | 1 << 10 | 1 << 23 | 1 << 26;

/// The node 1 pages the kernel reports as anonymous (typed pages
/// excluded), with their `/proc/kpageflags` bits.
pub fn kpageflags_anon(start_pfn: u64, pages: u64) -> Result<BTreeMap<u64, u64>> {
    Ok(kpageflags_all(start_pfn, pages)?
        .into_iter()
        .filter(|(_, f)| f & KPF_TYPED == 0)
        .collect())
}

/// As [`kpageflags_anon`], typed pages that look anonymous included.
pub fn kpageflags_all(start_pfn: u64, pages: u64) -> Result<BTreeMap<u64, u64>> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    const KPF_ANON: u64 = 1 << 12;
    const KPF_NOPAGE: u64 = 1 << 20;
    let mut f = std::fs::File::open("/proc/kpageflags").context("open /proc/kpageflags")?;
    f.seek(SeekFrom::Start(start_pfn * 8))?;
    let mut buf = vec![0u8; pages as usize * 8];
    f.read_exact(&mut buf).context("read /proc/kpageflags")?;
    Ok(buf
        .chunks(8)
        .enumerate()
        .filter_map(|(i, c)| {
            let flags = u64::from_ne_bytes(c.try_into().expect("8 bytes"));
            (flags & KPF_ANON != 0 && flags & KPF_NOPAGE == 0)
                .then_some((start_pfn + i as u64, flags))
        })
        .collect())
}

/// What differs between a server's books and the kernel's anonymous
/// pages on node 1, for a failure message: up to 8 pfns each way, with
/// their kpageflags bits.
pub fn books_diff(books: &BTreeSet<u64>, truth: &BTreeMap<u64, u64>) -> String {
    let extra: Vec<String> = books
        .iter()
        .filter(|p| !truth.contains_key(p))
        .take(8)
        .map(|p| format!("{p:#x}"))
        .collect();
    let missing: Vec<String> = truth
        .iter()
        .filter(|(p, _)| !books.contains(p))
        .take(8)
        .map(|(p, f)| format!("{p:#x} (flags {f:#x})"))
        .collect();
    format!(
        "in the books but not anonymous on node 1: {} [{}]; anonymous on node 1 but not \
         in the books: {} [{}]",
        books.iter().filter(|p| !truth.contains_key(p)).count(),
        extra.join(", "),
        truth.keys().filter(|p| !books.contains(p)).count(),
        missing.join(", ")
    )
}

/// `(pages on node 0, on node 1, elsewhere)` of `mem`.
pub fn where_are(mem: &sys::Anon) -> Result<(usize, usize, usize)> {
    Ok(sys::histogram(&mem.page_nodes()?))
}

/// Pages in `len` bytes.
pub const fn pages(len: usize) -> usize {
    len / PAGE_SIZE
}
