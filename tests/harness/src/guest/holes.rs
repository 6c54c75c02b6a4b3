//! Regression scenarios for the kernel review of 2026-11-30
//! (`shared/reviews/kernel-2026-11-30.md`; the finding table is in
//! `docs/REVIEW.md`):
//!
//! - `fence-holes`: a write never passes the fence without a verdict and
//!   never hangs on what the fence covers (findings 1, 3, 4, 5);
//! - `no-hang`: no task hangs on a write, whatever the server does
//!   (findings 2, 10, 11);
//! - `isolation-paths`: nothing but demotion and the server's placements
//!   reaches a managed node (findings 6, 7, 9).
//!
//! A store that hangs never returns, so these scenarios give stores
//! [`HANG`] before they call them hung.  That is a liveness check, not a
//! performance threshold: a store that returns does so in milliseconds.
#![allow(unsafe_code)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use io_uring::{IoUring, opcode, types};

use crate::fence::demoted;
use crate::managed::{NODE, Server, where_are};
use crate::sys::{self, Anon, Cgroup, PAGE_SIZE, ensure};
use crate::upcall::stat;

/// How long a store or a stop may take before it counts as hung.
const HANG: Duration = Duration::from_secs(20);

fn pid() -> u32 {
    std::process::id()
}

fn store(addr: usize, v: u64) {
    // SAFETY: callers pass the address of a mapped, writable page of
    // this process; a volatile store so that it is really made.
    unsafe { std::ptr::write_volatile(addr as *mut u64, v) };
}

fn load(addr: usize) -> u64 {
    // SAFETY: as in store(), readable.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

fn mprotect(addr: usize, len: usize, prot: i32) -> Result<()> {
    // SAFETY: our own mapping.
    if unsafe { libc::mprotect(addr as *mut _, len, prot) } != 0 {
        return Err(std::io::Error::last_os_error()).context("mprotect");
    }
    Ok(())
}

/// Make the mapping of `addr..addr+len` read-only and writable again: a
/// page on the managed node comes back read-only (fenced).
fn refence(addr: usize, len: usize) -> Result<()> {
    mprotect(addr, len, libc::PROT_READ)?;
    mprotect(addr, len, libc::PROT_READ | libc::PROT_WRITE)
}

/// Wait up to [`HANG`] for `pid` to exit; if it does not, SIGKILL it and
/// wait up to [`HANG`] more.  Ok(true): exited by itself with status 0;
/// Ok(false): it hung and was killed; Err: it exited with an error or
/// could not even be killed.
fn wait_or_kill(pid: i32, what: &str) -> Result<bool> {
    let reap = |limit: Duration| -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            let r = unsafe { libc::waitpid(pid, &raw mut status, libc::WNOHANG) };
            if r == pid {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    };
    if let Some(status) = reap(HANG) {
        ensure(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            || format!("{what}: the child failed (wait status {status:#x})"),
        )?;
        return Ok(true);
    }
    sys::signal(pid, libc::SIGKILL)?;
    if reap(HANG).is_none() {
        bail!(
            "{what}: the child did not return in {} s and survives SIGKILL (an unkillable loop)",
            HANG.as_secs()
        );
    }
    Ok(false)
}

/// In a forked child: `prep(addr)`, then a store to `addr`, then exit.
/// Returns the child's pid and whether it returned (see [`wait_or_kill`]).
/// The child makes its own mapping of the page: fork copies no page
/// table entries of a file mapping.
fn store_in_child(addr: usize, prep: fn(usize), what: &str) -> Result<(u32, bool)> {
    // SAFETY: the child only makes system calls and stores before _exit
    // (prep functions allocate nothing).
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if child == 0 {
        prep(addr);
        store(addr, 0xa5a5);
        // SAFETY: leaving the forked child without running any Rust code.
        unsafe { libc::_exit(0) };
    }
    Ok((child as u32, wait_or_kill(child, what)?))
}

/// Map the page read-only first, so that the store is a write fault on a
/// present entry (do_wp_page()).
fn read_first(addr: usize) {
    load(addr);
}

/// As [`read_first`], then make the entry read-only and the mapping
/// writable again.
fn read_refence(addr: usize) {
    load(addr);
    // SAFETY: our own mapping; errors show as the store's outcome.
    unsafe {
        libc::mprotect(addr as *mut _, PAGE_SIZE, libc::PROT_READ);
        libc::mprotect(
            addr as *mut _,
            PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
        );
    }
}

/// A shared or private mapping of a file, unmapped on drop.
struct FileMap {
    addr: usize,
    len: usize,
}

impl FileMap {
    fn new(fd: &OwnedFd, len: usize, flags: i32) -> Result<Self> {
        // SAFETY: a fresh mapping of our own file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the memfd");
        }
        Ok(Self {
            addr: p as usize,
            len,
        })
    }

    /// Read every page (map it) and return the node of each.
    fn nodes(&self) -> Result<Vec<i32>> {
        for i in 0..self.len / PAGE_SIZE {
            load(self.addr + i * PAGE_SIZE);
        }
        sys::page_nodes_at(self.addr, self.len / PAGE_SIZE)
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in new().
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

/// A memfd of `len` bytes whose page cache sits on node 1, written while
/// node 1 is not managed (as after a DETACH, or before the first ATTACH).
fn memfd_on_node1(len: usize) -> Result<OwnedFd> {
    // Allocated before the node-1 policy, so that only the page cache
    // lands there.
    let data = vec![0x5a; len];
    ensure(sys::set_mempolicy(sys::MPOL_BIND, NODE as i32) == 0, || {
        "set_mempolicy(MPOL_BIND, node 1) before attach failed".into()
    })?;
    // SAFETY: memfd_create with a constant name; the fd is owned below.
    let fd = unsafe { libc::memfd_create(c"mm-guest-holes".as_ptr(), 0) };
    let made = if fd < 0 {
        Err(std::io::Error::last_os_error()).context("memfd_create")
    } else {
        // SAFETY: a fresh fd we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let written = made.and_then(|fd| {
        let mut f = std::fs::File::from(fd);
        f.write_all(&data).context("write the memfd")?;
        Ok(OwnedFd::from(f))
    });
    let reset = sys::set_mempolicy(0, -1);
    let fd = written?;
    ensure(reset == 0, || "set_mempolicy(MPOL_DEFAULT) failed".into())?;
    Ok(fd)
}

// ---------------------------------------------------------------------------

/// Run every part of a scenario, even after one fails, and fail with all
/// their reasons: each part is the regression test of its own finding.
type Part<'a> = (&'a str, fn() -> Result<()>);

fn parts(scenario: &str, parts: &[Part<'_>]) -> Result<()> {
    let mut failed = Vec::new();
    for (name, part) in parts {
        let before = crate::upcall::stats().unwrap_or_default();
        let result = part();
        // Which part moved the kernel's anomaly counters (checked for the
        // whole scenario by main).
        let after = crate::upcall::stats().unwrap_or_default();
        for c in crate::ANOMALIES {
            let d = after.get(*c).copied().unwrap_or(0) - before.get(*c).copied().unwrap_or(0);
            if d != 0 {
                println!("{scenario}: {name}: kernel counter {c} +{d}");
            }
        }
        match result {
            Ok(()) => println!("{scenario}: {name}: ok"),
            Err(e) => {
                println!("{scenario}: {name}: FAILED: {e:#}");
                failed.push(format!("{name}: {e:#}"));
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("{}", failed.join("; "))
    }
}

/// `fence-holes`.
pub fn fence_holes() -> Result<()> {
    parts(
        "fence-holes",
        &[
            ("finding 1 (file pages)", file_pages),
            ("finding 3 (stale allowance)", stale_allowance),
            ("findings 4, 5 (long-term pin)", longterm_pin),
        ],
    )
}

/// Finding 1: page-cache pages that sat on node 1 before ATTACH.  The
/// fence covers anonymous folios only (the only ones demotion and the
/// server place there); a store to a file page must return, with a server
/// and without one.
fn file_pages() -> Result<()> {
    const LEN: usize = 1 << 20;
    let fd = memfd_on_node1(LEN)?;
    let mut srv = Server::start(0)?;
    let private = FileMap::new(&fd, LEN, libc::MAP_PRIVATE)?;
    let (n0, n1, other) = sys::histogram(&private.nodes()?);
    println!("fence-holes: memfd written before ATTACH: {n1} pages on node 1, {n0} on node 0");
    ensure(n1 == LEN / PAGE_SIZE, || {
        format!("{n1} memfd pages on node 1 ({n0} on node 0, {other} other), want all")
    })?;

    let what = "MAP_PRIVATE store to a node-1 file page";
    let (child, ok) = store_in_child(private.addr, read_first, what)?;
    let asked = srv.faults(child)?.0;
    println!(
        "fence-holes: MAP_PRIVATE store to a node-1 file page: returned {ok}, {asked} write faults"
    );
    ensure(ok, || {
        format!(
            "a MAP_PRIVATE store to a node-1 page-cache page did not return in {} s \
             ({asked} WRITE_FAULT upcalls meanwhile)",
            HANG.as_secs()
        )
    })?;
    ensure(asked == 0, || {
        format!(
            "{asked} write faults for a copy-on-write of a file page, want 0 (copies land off the node)"
        )
    })?;

    let shared = FileMap::new(&fd, LEN, libc::MAP_SHARED)?;
    let what = "MAP_SHARED store to a node-1 file page";
    let (_, ok) = store_in_child(shared.addr + PAGE_SIZE, read_refence, what)?;
    println!("fence-holes: MAP_SHARED store to a node-1 file page: returned {ok}");
    ensure(ok, || {
        "a MAP_SHARED store to a node-1 page-cache page did not return".into()
    })?;

    // With the server dead and the node still managed.
    srv.kill()?;
    let (_, ok) = store_in_child(private.addr + 2 * PAGE_SIZE, read_first, "no server")?;
    println!("fence-holes: MAP_PRIVATE store with the server killed: returned {ok}");
    ensure(ok, || {
        "with the server killed, a MAP_PRIVATE store to a node-1 file page did not return".into()
    })?;
    drop((private, shared, fd));
    Server::start(0)?.quit()
}

enum Cmd {
    /// Store after meeting the other worker at the barrier.
    Together(usize),
    Alone(usize),
}

/// A thread that stores when told: a per-task allowance lives in a task,
/// so the same two tasks are used throughout.  Worker `i` increments word
/// `i + 1` of the page, so that the two never race on one word.
struct Worker {
    tx: mpsc::Sender<Cmd>,
    done: mpsc::Receiver<()>,
}

impl Worker {
    fn spawn(barrier: Arc<Barrier>, word: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Cmd>();
        let (done_tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            for cmd in rx {
                let addr = match cmd {
                    Cmd::Together(a) => {
                        barrier.wait();
                        a
                    }
                    Cmd::Alone(a) => a,
                } + 8 * word;
                store(addr, load(addr).wrapping_add(1));
                if done_tx.send(()).is_err() {
                    break;
                }
            }
        });
        Self { tx, done }
    }

    fn wait(&self) -> Result<()> {
        self.done
            .recv_timeout(HANG)
            .map_err(|_| anyhow::anyhow!("a store did not return in {} s", HANG.as_secs()))
    }
}

/// Finding 3: two threads write one node-1 page at once and both get
/// ALLOW_IN_PLACE; one retry makes the page writable, so the other
/// thread's allowance is never used.  Once the page is fenced again, every
/// store by either thread must ask again.
fn stale_allowance() -> Result<()> {
    let mut srv = Server::start(0)?;
    let mem = demoted(&mut srv, PAGE_SIZE, 0x3a, false)?;
    let addr = mem.addr();
    srv.cmd("wf inplace")?;
    let barrier = Arc::new(Barrier::new(2));
    let workers = [Worker::spawn(barrier.clone(), 1), Worker::spawn(barrier, 2)];
    let mut rounds = 0u64;
    loop {
        rounds += 1;
        if rounds > 500 {
            bail!("two threads never both asked about one page in 500 rounds");
        }
        refence(addr, PAGE_SIZE)?;
        srv.cmd("reset")?;
        for w in &workers {
            w.tx.send(Cmd::Together(addr))?;
        }
        for w in &workers {
            w.wait()?;
        }
        if srv.faults_at(addr, PAGE_SIZE)?.0 == 2 {
            break;
        }
    }
    let (_, n1, _) = where_are(&mem)?;
    println!("fence-holes: both threads asked about one page in round {rounds}; on node 1: {n1}");
    ensure(n1 == 1, || {
        "ALLOW_IN_PLACE moved the page off node 1".into()
    })?;
    for (i, w) in workers.iter().enumerate() {
        refence(addr, PAGE_SIZE)?;
        srv.cmd("reset")?;
        w.tx.send(Cmd::Alone(addr))?;
        w.wait()?;
        let asked = srv.faults_at(addr, PAGE_SIZE)?.0;
        println!("fence-holes: thread {i} stored to the fenced page: {asked} WRITE_FAULTs");
        ensure(asked == 1, || {
            format!(
                "thread {i} wrote the re-fenced node-1 page with {asked} WRITE_FAULTs, want 1 \
                 (an allowance outlived the fault it was given for)"
            )
        })?;
    }
    // fill_pattern's word j is first_word + j; each worker stored once
    // per round and once alone.
    for word in [1u64, 2] {
        let want = crate::fence::first_word(0, 0x3a).wrapping_add(word + rounds + 1);
        let got = load(addr + 8 * word as usize);
        ensure(got == want, || {
            format!("word {word} holds {got:#x} after every store, want {want:#x}")
        })?;
    }
    drop(workers);
    srv.quit()
}

/// An io_uring with `addr..addr+len` registered as fixed buffer 0
/// (`FOLL_WRITE | FOLL_LONGTERM` pins).
fn pin(addr: usize, len: usize) -> Result<IoUring> {
    let ring = IoUring::new(4).context("io_uring_setup")?;
    let iov = libc::iovec {
        iov_base: addr as *mut _,
        iov_len: len,
    };
    // SAFETY: the buffer is our own mapping, which outlives the ring in
    // every caller (the ring is dropped first).
    unsafe { ring.submitter().register_buffers(&[iov]) }.context("register the buffer")?;
    Ok(ring)
}

/// What the pin sees: the first 8 bytes of fixed buffer 0, written to a
/// pipe with IORING_OP_WRITE_FIXED and read back.
fn pinned_word(ring: &mut IoUring, addr: usize) -> Result<u64> {
    let mut fds = [0; 2];
    // SAFETY: a two-element array for pipe(2).
    ensure(unsafe { libc::pipe(fds.as_mut_ptr()) } == 0, || {
        "pipe".into()
    })?;
    // SAFETY: fresh fds we own.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let sqe = opcode::WriteFixed::new(types::Fd(w.as_raw_fd()), addr as *const u8, 8, 0)
        .build()
        .user_data(1);
    // SAFETY: the buffer is registered and mapped.
    unsafe { ring.submission().push(&sqe) }.context("push WRITE_FIXED")?;
    ring.submit_and_wait(1).context("io_uring_enter")?;
    let cqe = ring.completion().next().context("no completion")?;
    ensure(cqe.result() == 8, || {
        format!("WRITE_FIXED returned {}", cqe.result())
    })?;
    let mut buf = [0u8; 8];
    std::fs::File::from(r).read_exact(&mut buf)?;
    Ok(u64::from_ne_bytes(buf))
}

/// Findings 4 and 5: a page written in place on node 1 and then pinned
/// long-term.  The pin must move it off the managed node first (node 1
/// is ZONE_NORMAL, so nothing else would), and what the pin sees must
/// stay what the page table maps.
fn longterm_pin() -> Result<()> {
    let mut srv = Server::start(0)?;
    let mem = demoted(&mut srv, PAGE_SIZE, 0x4a, false)?;
    let addr = mem.addr();
    srv.cmd("wf inplace")?;
    store(addr, 1);
    let (_, n1, _) = where_are(&mem)?;
    ensure(n1 == 1, || "ALLOW_IN_PLACE moved the page".into())?;
    let mut ring = pin(addr, PAGE_SIZE)?;
    let (n0, n1, _) = where_are(&mem)?;
    println!(
        "fence-holes: a node-1 page pinned long-term (io_uring fixed buffer): on node 0: {n0}, on node 1: {n1}"
    );
    ensure(n0 == 1, || {
        "a long-term pin was taken on a page of the managed node (it must migrate off first)".into()
    })?;
    refence(addr, PAGE_SIZE)?;
    srv.cmd("wf promote")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        store(addr, 2);
        let _ = tx.send(());
    });
    ensure(rx.recv_timeout(HANG).is_ok(), || {
        "a store to a pinned page did not return".into()
    })?;
    let seen = pinned_word(&mut ring, addr)?;
    println!(
        "fence-holes: after the store, the pin sees {seen}, the mapping {}",
        load(addr)
    );
    ensure(seen == 2 && load(addr) == 2, || {
        format!(
            "the pin sees {seen} and the mapping {}: they diverged",
            load(addr)
        )
    })?;
    drop(ring);
    drop(mem);
    srv.quit()
}

// ---------------------------------------------------------------------------

/// A helper process (`mm-guest --helper <what>`), driven line by line.
struct Helper {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdin: std::process::ChildStdin,
}

impl Helper {
    fn spawn(what: &str) -> Result<Self> {
        let mut child = Command::new("/proc/self/exe")
            .args(["--helper", what])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn the helper")?;
        let stdin = child.stdin.take().context("helper stdin")?;
        let out = BufReader::new(child.stdout.take().context("helper stdout")?);
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            stdin,
        })
    }

    fn expect(&self, prefix: &str, limit: Duration) -> Result<String> {
        loop {
            match self.lines.recv_timeout(limit) {
                Ok(l) if l.starts_with(prefix) => return Ok(l),
                Ok(l) => println!("{l}"),
                Err(_) => bail!("the helper did not say `{prefix}` in {} s", limit.as_secs()),
            }
        }
    }

    fn say(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin, "{line}")?;
        Ok(self.stdin.flush()?)
    }

    /// SIGKILL it; an error if it cannot be reaped in [`HANG`].
    fn kill(mut self, what: &str) -> Result<()> {
        let _ = self.child.kill();
        let start = Instant::now();
        while start.elapsed() < HANG {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("{what}: the helper survives SIGKILL (an unkillable loop in the kernel)")
    }

    fn finish(mut self) -> Result<()> {
        drop(self.stdin);
        let st = self.child.wait()?;
        ensure(st.success(), || format!("the helper failed: {st}"))
    }
}

/// `mm-guest --helper <what>`: the other side of [`Helper`].
pub fn helper(what: &str) -> Result<()> {
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut next = move || -> Result<String> {
        lines
            .next()
            .context("the scenario went away")?
            .map_err(Into::into)
    };
    match what {
        // Finding 2 and 5: a page pinned on node 1 before ATTACH, then
        // fenced; a futex op on it (a fault that cannot be retried), then
        // a plain store.
        "pinned" => {
            ensure(sys::set_mempolicy(sys::MPOL_BIND, NODE as i32) == 0, || {
                "set_mempolicy(MPOL_BIND, node 1) failed".into()
            })?;
            let mut mem = Anon::new(PAGE_SIZE)?;
            sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
            mem.as_mut_slice().fill(0);
            ensure(sys::set_mempolicy(0, -1) == 0, || "MPOL_DEFAULT".into())?;
            let addr = mem.addr();
            let mut ring = pin(addr, PAGE_SIZE)?;
            let (_, n1, _) = where_are(&mem)?;
            println!("READY {n1}");
            next()?;
            refence(addr, PAGE_SIZE)?;
            // FUTEX_WAKE_OP: *uaddr2 += 1 (fault_in_user_writeable() on
            // failure: fixup_user_fault() with no retry).
            let other = 0u32;
            let op = (1 << 28) | (1 << 12); // FUTEX_OP(FUTEX_OP_ADD, 1, FUTEX_OP_CMP_EQ, 0)
            // SAFETY: both futex words are ours and mapped.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    &raw const other,
                    libc::FUTEX_WAKE_OP | libc::FUTEX_PRIVATE_FLAG,
                    1,
                    0,
                    addr as *mut u32,
                    op,
                )
            };
            println!("FUTEX {r} {}", load(addr) as u32);
            refence(addr, PAGE_SIZE)?;
            store(addr + 8, 7);
            let seen = pinned_word(&mut ring, addr + 8)?;
            println!("STORE {} {seen}", load(addr + 8));
            next()?;
            drop(ring);
            Ok(())
        }
        // Finding 11: one page; the scenario has the server move it to
        // node 1, then this process stores to it.
        "store" => {
            let mut mem = Anon::new(PAGE_SIZE)?;
            sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
            mem.as_mut_slice().fill(1);
            println!("READY {}", mem.addr());
            next()?;
            store(mem.addr(), 42);
            println!("STORED {}", load(mem.addr()));
            next()?;
            Ok(())
        }
        other => bail!("unknown helper {other}"),
    }
}

/// `no-hang`.
pub fn no_hang() -> Result<()> {
    parts(
        "no-hang",
        &[
            ("findings 2, 5 (pinned before ATTACH)", pinned_before_attach),
            ("finding 11 (SIGSTOP while waiting)", stop_while_waiting),
            ("finding 11 (stopped server)", stopped_server),
            ("finding 10 (hints fill the slots)", hints_fill_slots),
            ("eject under a write storm", eject),
        ],
    )
}

/// The helper's line starting with `prefix`; if it does not come (the
/// helper hangs in the kernel), kill the helper and fail, also when it
/// cannot even be killed.  (The caller's server goes with its `Drop`.)
fn expect_or_kill(h: Helper, prefix: &str, what: &str) -> Result<(Helper, String)> {
    match h.expect(prefix, HANG) {
        Ok(l) => Ok((h, l)),
        Err(e) => {
            h.kill(what)?;
            Err(e.context(format!("{what} did not return")))
        }
    }
}

/// Findings 2 and 5: a page pinned on node 1 before ATTACH stays pinned
/// there.  A futex op on it (a fault that cannot be retried) and a store
/// must return, and the pin must keep seeing what the mapping shows.
fn pinned_before_attach() -> Result<()> {
    let mut h = Helper::spawn("pinned")?;
    let ready = h.expect("READY", HANG)?;
    ensure(ready == "READY 1", || {
        format!("the helper's pinned page is not on node 1: {ready}")
    })?;
    let srv = Server::start(0)?;
    h.say("go")?;
    let (h, futex) = expect_or_kill(h, "FUTEX", "FUTEX_WAKE_OP on a pinned node-1 page")?;
    println!("no-hang: FUTEX_WAKE_OP on a pinned node-1 page: {futex}");
    ensure(futex == "FUTEX 0 1", || {
        format!("FUTEX_WAKE_OP: `{futex}`, want `FUTEX 0 1` (returned 0, word incremented)")
    })?;
    let (mut h, st) = expect_or_kill(h, "STORE", "a store to a pinned node-1 page")?;
    println!("no-hang: store to the pinned node-1 page: {st} (mapping, pin)");
    ensure(st == "STORE 7 7", || {
        format!("`{st}`: want `STORE 7 7` (the pin sees what the mapping maps)")
    })?;
    h.say("done")?;
    h.finish()?;
    srv.quit()
}

/// The state letter of `/proc/<pid>/stat`.
fn task_state(pid: u32) -> Result<char> {
    let s = sys::read(&format!("/proc/{pid}/stat"))?;
    let after = s.rsplit_once(") ").context("stat format")?.1;
    after.chars().next().context("stat format")
}

/// Finding 11: a task waiting for a verdict stops on SIGSTOP at once, as
/// under handle_userfault(), instead of after the upcall's timeout.
fn stop_while_waiting() -> Result<()> {
    let mut srv = Server::start_with(0, "timeout=60000")?;
    let mut h = Helper::spawn("store")?;
    let hp = h.child.id();
    let addr: usize = h.expect("READY", HANG)?[6..].parse()?;
    ensure(srv.move_pages(hp, addr, 1, NODE)? == 1, || {
        "the server could not move the helper's page".into()
    })?;
    srv.cmd("wf hold")?;
    h.say("go")?;
    let start = Instant::now();
    while srv.cmd("held")?[0] != "1" {
        ensure(start.elapsed() < HANG, || {
            "the helper's store never reached the server".into()
        })?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let timeouts = stat("timeouts")?;
    sys::signal(hp as i32, libc::SIGSTOP)?;
    let start = Instant::now();
    let mut state = task_state(hp)?;
    while state != 'T' && start.elapsed() < HANG {
        std::thread::sleep(Duration::from_millis(20));
        state = task_state(hp)?;
    }
    let timed_out = stat("timeouts")? - timeouts;
    println!(
        "no-hang: SIGSTOP to a task waiting for a verdict: state {state}, {timed_out} timeouts meanwhile"
    );
    ensure(state == 'T' && timed_out == 0, || {
        format!(
            "a task waiting for a verdict did not stop on SIGSTOP (state {state} after {} s)",
            HANG.as_secs()
        )
    })?;
    sys::signal(hp as i32, libc::SIGCONT)?;
    srv.cmd("release")?;
    srv.cmd("wf promote")?;
    let stored = h.expect("STORED", HANG)?;
    ensure(stored == "STORED 42", || format!("helper: {stored}"))?;
    h.say("done")?;
    h.finish()?;
    srv.quit()
}

/// Finding 11: a server that is alive but stopped costs one timeout, not
/// one per page: after a timeout, write faults take the default at once
/// until the server answers again.
fn stopped_server() -> Result<()> {
    const N: usize = 16;
    let mut srv = Server::start_with(0, "timeout=1000")?;
    let mem = demoted(&mut srv, N * PAGE_SIZE, 0xb5, false)?;
    sys::signal(srv.pid as i32, libc::SIGSTOP)?;
    let timeouts = stat("timeouts")?;
    let stalled = stat("stalled")?;
    let addr = mem.addr();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for i in 0..N {
            store(addr + i * PAGE_SIZE, i as u64);
        }
        let _ = tx.send(());
    });
    let done = rx.recv_timeout(Duration::from_secs(120)).is_ok();
    let timed_out = stat("timeouts")? - timeouts;
    let stalled = stat("stalled")? - stalled;
    sys::signal(srv.pid as i32, libc::SIGCONT)?;
    println!(
        "no-hang: {N} stores with the server stopped: {timed_out} timeouts, {stalled} defaults \
         at once"
    );
    ensure(done, || "the stores did not finish".into())?;
    ensure(timed_out == 1 && stalled == N as u64 - 1, || {
        format!(
            "{timed_out} timeouts and {stalled} immediate defaults for {N} stores to a stopped \
             server, want 1 and {}",
            N - 1
        )
    })?;
    let (n0, _, _) = where_are(&mem)?;
    ensure(n0 == N, || {
        format!("{n0} of {N} pages promoted by the default")
    })?;
    for i in 0..N {
        ensure(load(addr + i * PAGE_SIZE) == i as u64, || {
            format!("page {i} lost its store")
        })?;
    }
    // The server answers the upcall that timed out once it runs again
    // (the test server counts a fault before it commits the verdict).
    let start = Instant::now();
    while srv.faults_at(mem.addr(), mem.as_slice().len())?.0 == 0 {
        ensure(start.elapsed() < HANG, || {
            "the resumed server never answered the upcall that timed out".into()
        })?;
        std::thread::sleep(Duration::from_millis(20));
    }
    // It answers again: the next write fault asks it.
    let again = demoted(&mut srv, PAGE_SIZE, 0xb6, false)?;
    srv.cmd("reset")?;
    store(again.addr(), 1);
    let asked = srv.faults_at(again.addr(), PAGE_SIZE)?.0;
    println!("no-hang: after SIGCONT, a store asks the server again: {asked} WRITE_FAULTs");
    ensure(asked == 1, || {
        format!("after the server answered again, a store made {asked} WRITE_FAULTs, want 1")
    })?;
    srv.quit()
}

/// Finding 10: a server that negotiated HINT_FAULT but never answers hints
/// must not take the slots a write fault needs: with 4 slots and 8 or more
/// hints outstanding, a store is still answered, without a timeout.
fn hints_fill_slots() -> Result<()> {
    const LEN: usize = 4 << 20;
    const KNOBS: &str = "/sys/kernel/debug/sched/numa_balancing";
    let mut srv = Server::start_with(0, "timeout=3000,depth=4")?;
    let mem = demoted(&mut srv, LEN, 0xa1, false)?;
    srv.cmd("hints hold")?;
    let requests = stat("requests")?;
    let old = sys::read("/proc/sys/kernel/numa_balancing")?;
    sys::write("/proc/sys/kernel/numa_balancing", "2")?;
    let _ = sys::write(&format!("{KNOBS}/scan_delay_ms"), "0");
    let _ = sys::write(&format!("{KNOBS}/scan_period_min_ms"), "100");
    let start = Instant::now();
    let mut sum = 0u64;
    let issued = loop {
        for page in mem.as_slice().chunks(PAGE_SIZE) {
            sum = sum.wrapping_add(u64::from(std::hint::black_box(page[8])));
        }
        let issued = stat("requests")? - requests;
        if issued >= 8 || start.elapsed() > Duration::from_secs(60) {
            break issued;
        }
    };
    sys::write("/proc/sys/kernel/numa_balancing", &old)?;
    let held = srv.stat("hint")?;
    println!(
        "no-hang: {issued} HINT_FAULT requests issued, {held} delivered to a server that answers \
         none (4 slots; read sum {sum:#x})"
    );
    ensure(issued >= 8, || {
        format!("only {issued} hint requests in 60 s of NUMA balancing, want 8")
    })?;
    let timeouts = stat("timeouts")?;
    srv.cmd("reset")?;
    let addr = mem.addr() + LEN / 2;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        store(addr, 1);
        let _ = tx.send(());
    });
    ensure(rx.recv_timeout(HANG).is_ok(), || {
        "the store did not return".into()
    })?;
    let timed_out = stat("timeouts")? - timeouts;
    let asked = srv.faults_at(addr, PAGE_SIZE)?.0;
    println!(
        "no-hang: a store with the hints held: {asked} WRITE_FAULTs answered, {timed_out} timeouts"
    );
    ensure(asked == 1 && timed_out == 0, || {
        format!(
            "with unanswered hints in the slots, a store got {asked} answered WRITE_FAULTs and \
             {timed_out} timeouts; want 1 and 0"
        )
    })?;
    drop(mem);
    srv.quit()
}

/// The operator's eject (`/sys/kernel/debug/mm_upcall/eject`) under a
/// write storm: writers waiting on a server that holds their upcalls get
/// the default at once, every store lands, the node stays managed, and a
/// new server attaches afterwards.
fn eject() -> Result<()> {
    const THREADS: usize = 8;
    const PER: usize = 32;
    let mut srv = Server::start_with(0, "timeout=60000")?;
    let mut regions = Vec::new();
    for t in 0..THREADS {
        regions.push(demoted(&mut srv, PER * PAGE_SIZE, 0xe0 + t as u64, false)?);
    }
    srv.cmd("wf hold")?;
    let aborted = stat("aborted")?;
    let (tx, rx) = mpsc::channel();
    for mem in &regions {
        let (addr, tx) = (mem.addr(), tx.clone());
        std::thread::spawn(move || {
            for i in 0..PER {
                store(addr + i * PAGE_SIZE, !(i as u64));
            }
            let _ = tx.send(());
        });
    }
    // Every writer is waiting for a verdict the server holds.
    let start = Instant::now();
    while srv.cmd("held")?[0].parse::<usize>()? < THREADS {
        ensure(start.elapsed() < HANG, || {
            "the writers' upcalls never all reached the server".into()
        })?;
        std::thread::sleep(Duration::from_millis(20));
    }
    sys::write("/sys/kernel/debug/mm_upcall/eject", "1")?;
    let mut done = 0;
    while done < THREADS && rx.recv_timeout(HANG).is_ok() {
        done += 1;
    }
    let aborted = stat("aborted")? - aborted;
    println!(
        "no-hang: eject with {THREADS} writers waiting: {done} of {THREADS} writers finished, \
         {aborted} upcalls given the default at once"
    );
    ensure(done == THREADS, || {
        format!("{} writers still hang after the eject", THREADS - done)
    })?;
    ensure(aborted >= THREADS as u64, || {
        format!("{aborted} waiters released by the eject, want at least {THREADS}")
    })?;
    for (t, mem) in regions.iter().enumerate() {
        let (n0, n1, _) = where_are(mem)?;
        ensure(n0 == PER, || {
            format!("writer {t}: {n0} pages on node 0, {n1} on node 1 after its stores")
        })?;
        for i in 0..PER {
            let want = !(i as u64);
            let got = load(mem.addr() + i * PAGE_SIZE);
            ensure(got == want, || {
                format!("writer {t}, page {i}: {got:#x}, want {want:#x}")
            })?;
        }
    }
    let log = std::process::Command::new("dmesg")
        .output()
        .context("dmesg")?;
    let log = String::from_utf8_lossy(&log.stdout);
    ensure(log.contains("mm_upcall: eject: queue 0:"), || {
        "the eject left no dump of the transport in the kernel log".into()
    })?;
    // The node stayed managed (isolated: no policy may name it), and a
    // new server attaches and detaches it.
    let bind = sys::set_mempolicy(sys::MPOL_BIND, NODE as i32);
    if bind == 0 {
        sys::set_mempolicy(0, -1);
    }
    ensure(bind == -libc::EINVAL, || {
        format!("after the eject, set_mempolicy(MPOL_BIND, node 1) returned {bind}, want -EINVAL")
    })?;
    drop(srv);
    Server::start(0)?.quit()
}

// ---------------------------------------------------------------------------

/// `isolation-paths`: paths besides the page allocator that could place
/// pages on a managed node or keep them there (findings 6-9; the ones the
/// test bed cannot reach are argued in `docs/REVIEW.md`).
pub fn isolation_paths() -> Result<()> {
    parts(
        "isolation-paths",
        &[
            ("finding 6 (hugetlb pool pages)", hugetlb_pool),
            ("finding 7 (MADV_COLLAPSE of demoted ranges)", collapse),
            ("finding 9 (DAMON migrate_cold)", damon_migrate),
            ("finding 9 (refund after a revoke)", refund_after_revoke),
        ],
    )
}

/// Allocations the page allocator satisfied on `nid` (its `numastat`
/// `numa_hit`; the test kernel has no `/proc/vmstat` event counters).
fn numa_hit(nid: u32) -> Result<u64> {
    let path = format!("/sys/devices/system/node/node{nid}/numastat");
    sys::read(&path)?
        .lines()
        .find_map(|l| l.strip_prefix("numa_hit ")?.trim().parse().ok())
        .with_context(|| format!("{path} has no numa_hit"))
}

/// Finding 9, second half: a demotion target given back after the server
/// set the node's credit again must not refund into the new credit.
///
/// Every page of a buffer is spliced into a pipe, so it holds an extra
/// reference: its demotion spends a page of credit, allocates the target
/// on node 1, fails to move and gives the target back (a refund), again
/// and again, while a thread keeps reclaiming the buffer's cgroup.  The
/// server sets the credit to 0 among those attempts, the thread stops,
/// and pages of another cgroup are reclaimed: with the credit really 0
/// none of them may reach node 1 (the server denies every request).  Before
/// the fix, a refund that landed after the SET_CREDIT put credit back that
/// the server never gave.
fn refund_after_revoke() -> Result<()> {
    const HELD: usize = 512;
    const CYCLES: usize = 30;
    let mut srv = Server::start(0)?;
    srv.cmd("credit mode deny")?;
    let probe_cg = Cgroup::enter("mm-guest-refund-probe")?;
    let mut probe = Anon::new(1 << 20)?;
    sys::madvise(&probe, libc::MADV_NOHUGEPAGE)?;
    sys::fill_pattern(probe.as_mut_slice(), 0x9b);
    let cg = Cgroup::enter("mm-guest-refund")?;
    let mut held = Anon::new(HELD * PAGE_SIZE)?;
    sys::madvise(&held, libc::MADV_NOHUGEPAGE)?;
    sys::fill_pattern(held.as_mut_slice(), 0x9a);
    // Splice every page into pipes of 256 buffers each (not read: each
    // buffer keeps its page referenced).
    let mut pipes = Vec::new();
    for chunk in held.as_slice().chunks(256 * PAGE_SIZE) {
        let mut fds = [0i32; 2];
        // SAFETY: fds has room for the two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error()).context("pipe2");
        }
        // SAFETY: pipe2 returned two descriptors we now own.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: plain fcntl on a pipe we own.
        if unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 256 * PAGE_SIZE as i32) } < 0 {
            return Err(std::io::Error::last_os_error()).context("F_SETPIPE_SZ");
        }
        let iov = libc::iovec {
            iov_base: chunk.as_ptr() as *mut libc::c_void,
            iov_len: chunk.len(),
        };
        // SAFETY: one iovec over our own mapping; the pipe takes page
        // references and never writes to them.
        let n = unsafe { libc::vmsplice(w.as_raw_fd(), &iov, 1, libc::SPLICE_F_NONBLOCK) };
        ensure(n == chunk.len() as isize, || {
            format!("vmsplice took {n} of {} bytes", chunk.len())
        })?;
        pipes.push((r, w));
    }
    // Out of the cgroup before the hammer starts: otherwise the pages this
    // process touches next (the hammer's stack, the heap) are charged to it
    // and demoted, and writing them races the hammer's reclaim of node 1
    // into a failed promotion (an anomaly this part is not about).
    cg.leave()?;
    let hit0 = numa_hit(NODE)?;
    let mut leaked = 0;
    let mut cycles = 0;
    while cycles < CYCLES && leaked == 0 {
        cycles += 1;
        ensure(srv.result("credit set 65536")? == 0, || {
            "SET_CREDIT 65536 failed".into()
        })?;
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| -> Result<()> {
            let hammer = s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    cg.reclaim(2 * HELD * PAGE_SIZE);
                }
            });
            std::thread::sleep(Duration::from_millis(20 + 7 * cycles as u64));
            let r = srv.result("credit set 0");
            std::thread::sleep(Duration::from_millis(20));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            hammer
                .join()
                .map_err(|_| anyhow::anyhow!("the reclaim thread panicked"))?;
            ensure(r? == 0, || "SET_CREDIT 0 failed".into())
        })?;
        probe_cg.reclaim(2 * probe.as_slice().len());
        leaked = where_are(&probe)?.1;
    }
    // Nothing but these demotions allocates on node 1 meanwhile.
    let targets = numa_hit(NODE)? - hit0;
    let on1 = where_are(&held)?.1;
    println!(
        "isolation-paths: {cycles} revokes among demotions of {HELD} referenced pages \
         ({targets} targets allocated on node 1, each given back); {on1} of them on node 1; \
         then {leaked} pages of another cgroup demoted with the credit at 0"
    );
    drop(pipes);
    drop(cg);
    drop(probe_cg);
    ensure(targets >= HELD as u64 && on1 == 0, || {
        format!(
            "{targets} targets allocated on node 1 and {on1} referenced pages moved there: \
             the demotions did not fail as set up"
        )
    })?;
    ensure(leaked == 0, || {
        format!(
            "after SET_CREDIT 0, {leaked} pages were demoted without credit from the server: a \
             refund across the revoke put credit back"
        )
    })?;
    if let Some(i) = sys::check_pattern(probe.as_slice(), 0x9b)
        .or_else(|| sys::check_pattern(held.as_slice(), 0x9a))
    {
        bail!("page {i} lost its contents");
    }
    srv.quit()
}

fn hugetlb_nr(nid: u32) -> String {
    format!("/sys/devices/system/node/node{nid}/hugepages/hugepages-2048kB/nr_hugepages")
}

/// Set node `nid`'s pool of 2 MiB huge pages to `n` and read back what it
/// holds.
fn hugetlb_pool_set(nid: u32, n: u32) -> Result<u32> {
    sys::write(&hugetlb_nr(nid), &n.to_string())?;
    Ok(sys::read(&hugetlb_nr(nid))?.parse()?)
}

/// A shared 2 MiB `MAP_HUGETLB` mapping (a forked child faults it under
/// the parent's reservation), unmapped on drop.
struct Huge(usize);

impl Huge {
    fn new() -> Result<Self> {
        // SAFETY: a fresh anonymous hugetlb mapping, checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                HPAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap(MAP_HUGETLB)");
        }
        Ok(Self(p as usize))
    }
}

impl Drop for Huge {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new().
        unsafe { libc::munmap(self.0 as *mut _, HPAGE) };
    }
}

/// Finding 6: hugetlb pool pages on node 1 from before ATTACH are never
/// handed out (hugetlb mappings are not fenced), and no new pool page is
/// made there.  With node 0's pool empty and one surplus page allowed, a
/// hugetlb fault gets a fresh huge page off node 1 instead of node 1's
/// pool page (with no surplus allowed it would get SIGBUS: the pool's
/// only free page is not for use).
fn hugetlb_pool() -> Result<()> {
    const OVERCOMMIT: &str = "/proc/sys/vm/nr_overcommit_hugepages";
    sys::write(OVERCOMMIT, "1")?;
    let pools = (hugetlb_pool_set(0, 0)?, hugetlb_pool_set(NODE, 1)?);
    let result = hugetlb_pool_inner(pools);
    let reset = hugetlb_pool_set(NODE, 0);
    sys::write(OVERCOMMIT, "0")?;
    result?;
    ensure(matches!(reset, Ok(0)), || {
        format!("node 1's huge page pool did not empty: {reset:?}")
    })
}

fn hugetlb_pool_inner(pools: (u32, u32)) -> Result<()> {
    ensure(pools == (0, 1), || {
        format!("before ATTACH, node 0 and node 1 pools hold {pools:?} 2 MiB pages, want (0, 1)")
    })?;
    let srv = Server::start(0)?;
    let grown = hugetlb_pool_set(NODE, 2)?;
    ensure(grown == 1, || {
        format!("node 1 is managed, yet its hugetlb pool grew to {grown} pages")
    })?;
    let huge = Huge::new()?;
    let node = hugetlb_fault_in_child(huge.0)?;
    println!(
        "isolation-paths: a hugetlb fault with only node 1's pool page free got a page on node {node}"
    );
    ensure(node == 0, || {
        format!(
            "a hugetlb fault took node {node}'s pool page; want a page on node 0 \
             (hugetlb mappings are not fenced: a managed node's pool is not for use)"
        )
    })?;
    drop(huge);
    srv.quit()
}

/// In a forked child: write every 4 KiB of the huge page at `addr`, read
/// it back, and report the page's node as the exit status (a SIGBUS, if
/// no huge page can be had, kills only the child).
fn hugetlb_fault_in_child(addr: usize) -> Result<i32> {
    // SAFETY: the child makes stores and system calls only, on stack
    // arrays, then _exit()s.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if child == 0 {
        let words = HPAGE / 8;
        for i in (0..words).step_by(PAGE_SIZE / 8) {
            store(addr + i * 8, i as u64 ^ 0x6b6b);
        }
        let mut code = 0;
        for i in (0..words).step_by(PAGE_SIZE / 8) {
            if load(addr + i * 8) != i as u64 ^ 0x6b6b {
                code = 100;
            }
        }
        let pages = [addr as *mut libc::c_void];
        let mut status = [-1i32];
        // SAFETY: one-element arrays; a query (nodes == NULL).
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_pages,
                0,
                1,
                pages.as_ptr(),
                std::ptr::null::<i32>(),
                status.as_mut_ptr(),
                0,
            )
        };
        if code == 0 {
            code = if r == 0 && (0..10).contains(&status[0]) {
                10 + status[0]
            } else {
                101
            };
        }
        // SAFETY: leaving the forked child without running Rust code.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    if unsafe { libc::waitpid(child, &raw mut status, 0) } != child {
        return Err(std::io::Error::last_os_error()).context("waitpid");
    }
    if libc::WIFSIGNALED(status) {
        bail!(
            "the hugetlb fault killed the child with signal {}",
            libc::WTERMSIG(status)
        );
    }
    match libc::WEXITSTATUS(status) {
        100 => bail!("the huge page lost its contents"),
        101 => bail!("move_pages could not tell the huge page's node"),
        code => Ok(code - 10),
    }
}

const DAMON: &str = "/sys/kernel/mm/damon/admin/kdamonds";

/// Write DAMON sysfs files under `kdamonds/`, in order.
fn damon_write(files: &[(&str, String)]) -> Result<()> {
    for (f, v) in files {
        sys::write(&format!("{DAMON}/{f}"), v)?;
    }
    Ok(())
}

/// Finding 9: DAMON's `migrate_cold` naming a managed node is not a
/// placement path: it moves nothing there and spends no credit (before,
/// it spent the server's credit and placed pages with reason MIGRATION).
fn damon_migrate() -> Result<()> {
    let mut srv = Server::start(1 << 16)?;
    let mut mem = Anon::new(8 << 20)?;
    sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
    sys::fill_pattern(mem.as_mut_slice(), 0xda);
    let pfns = sys::pfns(&mem)?;
    let (lo, hi) = (
        pfns.iter().min().copied().unwrap_or(0),
        pfns.iter().max().copied().unwrap_or(0),
    );
    let placed_before = srv.stat("placed")?;
    let ctx = "0/contexts/0";
    let scheme = format!("{ctx}/schemes/0");
    damon_write(&[
        ("nr_kdamonds", "1".into()),
        ("0/contexts/nr_contexts", "1".into()),
        (&format!("{ctx}/operations"), "paddr".into()),
        (&format!("{ctx}/targets/nr_targets"), "1".into()),
        (&format!("{ctx}/targets/0/regions/nr_regions"), "1".into()),
        // The physical range that holds this buffer.
        (
            &format!("{ctx}/targets/0/regions/0/end"),
            ((hi + 1) * PAGE_SIZE as u64).to_string(),
        ),
        (
            &format!("{ctx}/targets/0/regions/0/start"),
            (lo * PAGE_SIZE as u64).to_string(),
        ),
        (&format!("{ctx}/schemes/nr_schemes"), "1".into()),
        (&format!("{scheme}/action"), "migrate_cold".into()),
        (&format!("{scheme}/target_nid"), NODE.to_string()),
        (&format!("{scheme}/access_pattern/sz/min"), "0".into()),
        (
            &format!("{scheme}/access_pattern/sz/max"),
            u64::MAX.to_string(),
        ),
        (
            &format!("{scheme}/access_pattern/nr_accesses/min"),
            "0".into(),
        ),
        (
            &format!("{scheme}/access_pattern/nr_accesses/max"),
            u32::MAX.to_string(),
        ),
        (&format!("{scheme}/access_pattern/age/min"), "0".into()),
        (
            &format!("{scheme}/access_pattern/age/max"),
            u32::MAX.to_string(),
        ),
        ("0/state", "on".into()),
    ])?;
    // Every aggregation interval (100 ms) the scheme is applied to the
    // whole range; wait until it has tried this buffer's size several times.
    let stats = format!("{DAMON}/{scheme}/stats");
    let start = Instant::now();
    let tried = loop {
        std::thread::sleep(Duration::from_millis(200));
        sys::write(&format!("{DAMON}/0/state"), "update_schemes_stats")?;
        let tried: u64 = sys::read(&format!("{stats}/sz_tried"))?.parse()?;
        if tried >= 4 * mem.as_slice().len() as u64 || start.elapsed() > HANG {
            break tried;
        }
    };
    let applied: u64 = sys::read(&format!("{stats}/sz_applied"))?.parse()?;
    let off = sys::write(&format!("{DAMON}/0/state"), "off");
    let _ = sys::write(&format!("{DAMON}/nr_kdamonds"), "0");
    off?;
    let (n0, n1, other) = where_are(&mem)?;
    let placed = srv.stat("placed")? - placed_before;
    println!(
        "isolation-paths: DAMON migrate_cold to node 1 tried {tried} bytes, applied {applied}; \
         buffer: {n0} pages on node 0, {n1} on node 1; {placed} pages placed"
    );
    ensure(tried >= 4 * mem.as_slice().len() as u64, || {
        format!("DAMON tried only {tried} bytes in {HANG:?}: the scheme did not run")
    })?;
    ensure(n1 == 0 && other == 0 && applied == 0 && placed == 0, || {
        format!(
            "DAMON migrate_cold moved {applied} bytes to managed node 1 ({n1} of this \
             buffer's pages, {placed} placements reported): only demotion and the server \
             place pages there"
        )
    })?;
    if let Some(i) = sys::check_pattern(mem.as_slice(), 0xda) {
        bail!("page {i} lost its contents");
    }
    srv.quit()
}

const MADV_COLLAPSE: i32 = 25;
const HPAGE: usize = 2 << 20;

/// `MADV_COLLAPSE` of one 2 MiB range; 0 or `-errno`.
fn madv_collapse(addr: usize) -> i32 {
    // SAFETY: advice on our own mapping.
    if unsafe { libc::madvise(addr as *mut _, HPAGE, MADV_COLLAPSE) } == 0 {
        0
    } else {
        sys::neg_errno()
    }
}

/// Whether the page with this pfn is part of a transparent huge page
/// (`KPF_THP` in `/proc/kpageflags`).
pub fn is_thp(pfn: u64) -> Result<bool> {
    use std::io::{Seek as _, SeekFrom};
    const KPF_THP: u64 = 1 << 22;
    let mut f = std::fs::File::open("/proc/kpageflags").context("open kpageflags")?;
    f.seek(SeekFrom::Start(pfn * 8))?;
    let mut b = [0u8; 8];
    f.read_exact(&mut b)?;
    Ok(u64::from_ne_bytes(b) & KPF_THP != 0)
}

/// Finding 7: a 2 MiB range whose pages the server moved to node 1 (all
/// of them, then all but one written and promoted) collapses into a huge
/// page off the managed node, with the data intact.
fn collapse() -> Result<()> {
    let mut srv = Server::start(0)?;
    for written in [false, true] {
        // 4 MiB, so that an aligned 2 MiB range lies inside.
        let mut mem = Anon::new(2 * HPAGE)?;
        sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
        sys::fill_pattern(mem.as_mut_slice(), 0x77);
        let start = (mem.addr() + HPAGE - 1) & !(HPAGE - 1);
        let n = HPAGE / PAGE_SIZE;
        let moved = srv.move_pages(pid(), start, n, NODE)?;
        ensure(moved == n, || {
            format!("moved {moved} of {n} pages to node 1")
        })?;
        if written {
            store(start, load(start));
        }
        sys::madvise(&mem, libc::MADV_HUGEPAGE)?;
        let r = madv_collapse(start);
        let nodes = mem.page_nodes()?;
        let off = (start - mem.addr()) / PAGE_SIZE;
        let pfns = sys::pfns(&mem)?;
        let huge = (off..off + n)
            .map(|i| is_thp(pfns[i]))
            .collect::<Result<Vec<bool>>>()?
            .iter()
            .filter(|&&t| t)
            .count();
        let (n0, n1, _) = sys::histogram(&nodes[off..off + n]);
        let what = if written {
            "one page written (promoted), the rest on node 1"
        } else {
            "every page on node 1"
        };
        println!(
            "isolation-paths: MADV_COLLAPSE, {what}: returned {r}, {huge} pages in a THP, \
             {n0} pages on node 0, {n1} on node 1"
        );
        ensure(r == 0 && huge == n && n0 == n, || {
            format!(
                "MADV_COLLAPSE of a demoted range ({what}) returned {r} with {huge} of {n} \
                 pages in a THP and {n1} left on node 1; want 0, one huge page off node 1"
            )
        })?;
        if let Some(i) = sys::check_pattern(mem.as_slice(), 0x77) {
            bail!("page {i} lost its contents in the collapse");
        }
    }
    srv.quit()
}
