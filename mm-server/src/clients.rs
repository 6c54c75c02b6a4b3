//! The client socket: applications' advice about their memory (`Advise`)
//! and where it lives (`Residency`), in the frames of
//! `mm_upcall_proto::socket`.  `mm-upcall-client` (Rust and C) speaks it.
//!
//! Who may do what:
//! - the socket is mode 0660, group `server.client_group` (root's group
//!   when unset): only members connect at all;
//! - the caller is identified by `SO_PEERCRED` when it connects and held
//!   by a pidfd, so a pid reused after the caller exits is never taken for
//!   it; its capabilities are read then;
//! - its own memory (`pid` 0) it may advise freely; another process's
//!   only as `process_madvise(2)` allows: with `CAP_SYS_NICE`, and the
//!   target has the caller's uid or the caller has `CAP_SYS_PTRACE`;
//! - admin frames (`Stats`, `Metrics`) are refused (`EPERM`): they are on
//!   the admin socket;
//! - each uid has a request rate and an advised-bytes rate
//!   (`server.client_requests_per_s`, `server.client_advise_mib_per_s`),
//!   over which requests get `Busy` (`EAGAIN`);
//! - a frame that does not decode (wrong version, truncated, unknown
//!   opcode, non-zero reserved field, wrong length) gets an `Error` frame
//!   and the connection is closed.
//!
//! Every connection runs on a thread of its own (see [`crate::serve`]);
//! the server's loop only answers short questions from them (reserve room
//! for a move, the sizes of some pages), so a slow client never delays a
//! verdict.  Pages are moved by `move_pages(2)` from the client's thread:
//! `Cold` to the first managed node, within the room the core reserves
//! for it at the worst case (as demotion credit is), never a page locked
//! in memory (`KeepFast` locks its range); `Hot` and `KeepFast` off it, to
//! the first fast node.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mm_upcall_kernel::{PAGE_SIZE, move_pages};
use mm_upcall_proto::socket::{
    Advice, AdviseReplyRec, ErrorCode, Frame, HEADER_SIZE, MAX_REQUEST_PAGES, PageResidency,
    SIZE_UNKNOWN,
};
use zerocopy::IntoBytes as _;

use crate::core::MoveRefused;
use crate::driver::CoreHandle;
use crate::serve::{self, error, send};

/// Connections served at once.
pub const MAX_CLIENTS: usize = 64;
/// Longest a `Cold` request waits for room on the compressed node.
pub const MOVE_WAIT: Duration = Duration::from_secs(10);
/// How often it asks again meanwhile.
const MOVE_RETRY: Duration = Duration::from_millis(50);

const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_NICE: u32 = 23;

/// The client socket's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests per second per uid (burst: one second's worth).
    pub requests_per_s: u32,
    /// Bytes advised per second per uid (burst: one second's worth).
    pub advise_bytes_per_s: u64,
}

/// A refusal: an errno and a code, sent as an `Error` frame.
type Refusal = (i32, ErrorCode);

/// Bind the client socket at `path` with mode 0660 and group `gid`.
///
/// # Errors
///
/// As [`serve::bind`], or the group could not be set.
pub fn bind(path: &std::path::Path, gid: Option<u32>) -> io::Result<UnixListener> {
    let l = serve::bind(path, 0o660)?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    Ok(l)
}

/// Serve the client socket on a new thread, for the life of the process.
///
/// # Errors
///
/// The thread could not be started.
pub fn spawn(listener: UnixListener, core: CoreHandle, limits: Limits) -> io::Result<()> {
    let buckets = Arc::new(Mutex::new(HashMap::new()));
    serve::spawn(listener, "clients", MAX_CLIENTS, move |s, waiting| {
        let mut c = Client {
            core: &core,
            limits,
            buckets: &buckets,
        };
        c.serve(s, waiting)
    })
}

/// Token buckets of one uid.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    requests: f64,
    bytes: f64,
    at: Instant,
}

/// The caller, as it was when it connected.
struct Peer {
    pid: u32,
    uid: u32,
    /// Held so that the pid cannot be reused while we serve it; polls
    /// readable once the process has exited.
    pidfd: OwnedFd,
    caps: u64,
}

impl Peer {
    fn of(s: &UnixStream) -> io::Result<Self> {
        let cred = rustix::net::sockopt::socket_peercred(s)?;
        let pid = cred.pid.as_raw_nonzero().get() as u32;
        let pidfd = rustix::process::pidfd_open(cred.pid, rustix::process::PidfdFlags::empty())?;
        let caps = status_field(pid, "CapEff:")
            .and_then(|v| u64::from_str_radix(&v, 16).ok())
            .unwrap_or(0);
        let peer = Self {
            pid,
            uid: cred.uid.as_raw(),
            pidfd,
            caps,
        };
        // What /proc said was about this process, not a successor.
        if !peer.alive() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(peer)
    }

    fn alive(&self) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        matches!(poll(&mut fds, Some(&zero)), Ok(0))
    }
}

/// Whether a caller with capabilities `caps` and uid `uid` may advise the
/// memory of another process (of uid `target`, once known), as
/// `process_madvise(2)` allows: `CAP_SYS_NICE`, and the same uid or
/// `CAP_SYS_PTRACE`.
///
/// # Errors
///
/// `EPERM` when it may not.
pub fn may_advise_other(caps: u64, uid: u32, target: Option<u32>) -> Result<(), (i32, ErrorCode)> {
    let has = |cap: u32| caps & (1 << cap) != 0;
    let denied = (-libc::EPERM, ErrorCode::PermissionDenied);
    if !has(CAP_SYS_NICE) {
        return Err(denied);
    }
    match target {
        Some(t) if t != uid && !has(CAP_SYS_PTRACE) => Err(denied),
        _ => Ok(()),
    }
}

/// A field of `/proc/<pid>/status`, trimmed.
fn status_field(pid: u32, key: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
}

struct Client<'a> {
    core: &'a CoreHandle,
    limits: Limits,
    buckets: &'a Mutex<HashMap<u32, Bucket>>,
}

impl Client<'_> {
    fn serve(&mut self, s: &mut UnixStream, waiting: &dyn Fn(bool)) -> io::Result<()> {
        let peer = match Peer::of(s) {
            Ok(p) => p,
            Err(_) => return error(s, -libc::ESRCH, ErrorCode::NotFound),
        };
        let mut hello = false;
        loop {
            waiting(true);
            let next = serve::read_frame(s)?;
            waiting(false);
            let frame = match next {
                None => return Ok(()),
                Some(Ok(f)) => f,
                Some(Err(e)) => return serve::refuse(s, &e),
            };
            match frame {
                Frame::Hello {
                    min_version,
                    max_version,
                    ..
                } => {
                    if !serve::hello(s, min_version, max_version)? {
                        return Ok(());
                    }
                    hello = true;
                }
                _ if !hello => return error(s, -libc::EPROTO, ErrorCode::BadFrame),
                Frame::Advise {
                    pid,
                    advice,
                    addr,
                    len,
                } => match self.advise(&peer, pid, advice, addr, len) {
                    Ok(r) => send(s, Frame::AdviseReply(r))?,
                    Err((errno, code)) => error(s, errno, code)?,
                },
                Frame::Residency { pid, addr, len } => {
                    match self.residency(&peer, pid, addr, len) {
                        Ok(pages) => s.write_all_frame(&pages)?,
                        Err((errno, code)) => error(s, errno, code)?,
                    }
                }
                // Admin frames are on the admin socket.
                Frame::Stats
                | Frame::Metrics
                | Frame::Drain { .. }
                | Frame::Evict(_)
                | Frame::PolicyGet { .. }
                | Frame::PolicySet(_) => {
                    error(s, -libc::EPERM, ErrorCode::PermissionDenied)?;
                }
                // Replies are not requests.
                _ => return error(s, -libc::EPROTO, ErrorCode::BadFrame),
            }
        }
    }

    /// Charge one request of `bytes` to the caller's uid.
    fn charge(&self, uid: u32, bytes: u64) -> Result<(), Refusal> {
        let now = Instant::now();
        let mut g = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (rps, bps) = (
            f64::from(self.limits.requests_per_s),
            self.limits.advise_bytes_per_s as f64,
        );
        let b = g.entry(uid).or_insert(Bucket {
            requests: rps,
            bytes: bps,
            at: now,
        });
        let dt = now.duration_since(b.at).as_secs_f64();
        b.requests = (b.requests + dt * rps).min(rps);
        b.bytes = (b.bytes + dt * bps).min(bps);
        b.at = now;
        if b.requests < 1.0 || b.bytes < bytes as f64 {
            return Err((-libc::EAGAIN, ErrorCode::Busy));
        }
        b.requests -= 1.0;
        b.bytes -= bytes as f64;
        Ok(())
    }

    /// The process a request names, checked as `process_madvise(2)`
    /// would: its pid and a pidfd that holds it.
    fn target(&self, peer: &Peer, pid: u32) -> Result<Option<OwnedFd>, Refusal> {
        if pid == 0 || pid == peer.pid {
            return if peer.alive() {
                Ok(None)
            } else {
                Err((-libc::ESRCH, ErrorCode::NotFound))
            };
        }
        may_advise_other(peer.caps, peer.uid, None)?;
        let p = rustix::process::Pid::from_raw(pid as i32)
            .ok_or((-libc::ESRCH, ErrorCode::NotFound))?;
        let fd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())
            .map_err(|_| (-libc::ESRCH, ErrorCode::NotFound))?;
        let uid = status_field(pid, "Uid:")
            .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok())
            .ok_or((-libc::ESRCH, ErrorCode::NotFound))?;
        may_advise_other(peer.caps, peer.uid, Some(uid))?;
        Ok(Some(fd))
    }

    /// The page addresses of a request's range.
    fn pages(addr: u64, len: u64) -> Result<Vec<u64>, Refusal> {
        let invalid = (-libc::EINVAL, ErrorCode::Invalid);
        if !addr.is_multiple_of(PAGE_SIZE as u64) || addr.checked_add(len).is_none() {
            return Err(invalid);
        }
        let n = len.div_ceil(PAGE_SIZE as u64);
        if n > MAX_REQUEST_PAGES {
            return Err(invalid);
        }
        Ok((0..n).map(|i| addr + i * PAGE_SIZE as u64).collect())
    }

    fn advise(
        &self,
        peer: &Peer,
        pid: u32,
        advice: Advice,
        addr: u64,
        len: u64,
    ) -> Result<AdviseReplyRec, Refusal> {
        let addrs = Self::pages(addr, len)?;
        let _held = self.target(peer, pid)?;
        let target = if pid == 0 { peer.pid } else { pid };
        self.charge(peer.uid, len)?;
        let mut r = AdviseReplyRec {
            pages: addrs.len() as u64,
            ..AdviseReplyRec::default()
        };
        if advice == Advice::Normal || addrs.is_empty() {
            return Ok(r);
        }
        let mut status = vec![0; addrs.len()];
        move_pages(target, &addrs, None, &mut status).map_err(os_refusal)?;
        let managed = |n: i32| n >= 0 && self.core.managed.contains(&(n as u16));
        let (want, node): (Vec<u64>, u16) = if advice == Advice::Cold {
            r.already = status.iter().filter(|&&n| managed(n)).count() as u64;
            let present: Vec<u64> = addrs
                .iter()
                .zip(&status)
                .filter(|&(_, &n)| n >= 0 && !managed(n))
                .map(|(&a, _)| a)
                .collect();
            // Never a locked page (KeepFast, or any mlock): reclaim keeps
            // them off the node, and so does the server, whoever asks.
            let locked =
                locked_pages(target, &present).map_err(|_| (-libc::ESRCH, ErrorCode::NotFound))?;
            let want = present
                .into_iter()
                .zip(locked)
                .filter(|&(_, l)| !l)
                .map(|(a, _)| a)
                .collect();
            (want, self.core.managed[0])
        } else {
            r.already = status.iter().filter(|&&n| n >= 0 && !managed(n)).count() as u64;
            let want = addrs
                .iter()
                .zip(&status)
                .filter(|&(_, &n)| managed(n))
                .map(|(&a, _)| a)
                .collect();
            (want, self.core.fast)
        };
        let mut want = want;
        if !want.is_empty() {
            let cold = advice == Advice::Cold;
            let mut begun = 0;
            if cold {
                let (n, b) = self.reserve(node, want.len() as u64);
                begun = b;
                match n {
                    Ok(n) => want.truncate(n as usize),
                    Err(e) => {
                        for _ in 0..begun {
                            self.core.end_move(node);
                        }
                        return Err(e);
                    }
                }
            }
            let mut st = vec![0; want.len()];
            let moved = if want.is_empty() {
                Ok(0)
            } else {
                move_pages(target, &want, Some(i32::from(node)), &mut st)
            };
            for _ in 0..begun {
                self.core.end_move(node);
            }
            moved.map_err(os_refusal)?;
            r.moved = st.iter().filter(|&&n| n == i32::from(node)).count() as u64;
        }
        r.skipped = r.pages - r.moved - r.already;
        tracing::debug!(
            peer = peer.pid,
            target,
            ?advice,
            pages = r.pages,
            moved = r.moved,
            already = r.already,
            "advice"
        );
        Ok(r)
    }

    /// Reserve room for up to `pages` on `node`, waiting up to
    /// [`MOVE_WAIT`] while the server makes room (takes its credit back
    /// from the kernel) or cannot place pages yet.  Returns the pages
    /// reserved (or the refusal) and how many reservations were begun:
    /// end each with `end_move` after the move.
    fn reserve(&self, node: u16, pages: u64) -> (Result<u64, Refusal>, u32) {
        let busy = (-libc::EAGAIN, ErrorCode::Busy);
        let deadline = Instant::now() + MOVE_WAIT;
        let (mut got, mut begun) = (0, 0);
        loop {
            let more = match self.core.begin_move(node, pages - got) {
                Ok(Ok((n, more))) => {
                    begun += 1;
                    got += n;
                    more
                }
                // Not now (books being rebuilt, evicting, just started).
                Ok(Err(MoveRefused::NotNow)) => true,
                Ok(Err(MoveRefused::NotManaged)) => {
                    return (Err((-libc::ENODEV, ErrorCode::NotFound)), begun);
                }
                Err(_) => {
                    // The loop may still take the request: end it too.
                    return (Err(busy), begun + 1);
                }
            };
            if got == pages || !more || Instant::now() >= deadline {
                return (if got == 0 && more { Err(busy) } else { Ok(got) }, begun);
            }
            std::thread::sleep(MOVE_RETRY);
        }
    }

    fn residency(
        &self,
        peer: &Peer,
        pid: u32,
        addr: u64,
        len: u64,
    ) -> Result<Vec<PageResidency>, Refusal> {
        let addrs = Self::pages(addr, len)?;
        let _held = self.target(peer, pid)?;
        let target = if pid == 0 { peer.pid } else { pid };
        self.charge(peer.uid, 0)?;
        let mut status = vec![0; addrs.len()];
        if !addrs.is_empty() {
            move_pages(target, &addrs, None, &mut status).map_err(os_refusal)?;
        }
        let mut out: Vec<PageResidency> = status
            .iter()
            .map(|&node| PageResidency {
                node,
                bytes: SIZE_UNKNOWN,
            })
            .collect();
        for &nid in &self.core.managed {
            let on: Vec<usize> = (0..out.len())
                .filter(|&i| out[i].node == i32::from(nid))
                .collect();
            if on.is_empty() {
                continue;
            }
            let pfns = pfns_of(target, on.iter().map(|&i| addrs[i]))
                .map_err(|_| (-libc::ESRCH, ErrorCode::NotFound))?;
            let sizes = self
                .core
                .sizes(nid, pfns)
                .map_err(|_| (-libc::EAGAIN, ErrorCode::Busy))?;
            for (&i, size) in on.iter().zip(sizes) {
                out[i].bytes = size.unwrap_or(SIZE_UNKNOWN);
            }
        }
        Ok(out)
    }
}

/// The pfn of each virtual address of process `pid` (0 where none), from
/// its `/proc/<pid>/pagemap` (the server is root, so pfns are shown).
fn pfns_of(pid: u32, addrs: impl Iterator<Item = u64>) -> io::Result<Vec<u64>> {
    const PRESENT: u64 = 1 << 63;
    const PFN_MASK: u64 = (1 << 55) - 1;
    let f = File::open(format!("/proc/{pid}/pagemap"))?;
    let mut buf = [0u8; 8];
    addrs
        .map(|a| {
            f.read_exact_at(&mut buf, a / PAGE_SIZE as u64 * 8)?;
            let e = u64::from_ne_bytes(buf);
            Ok(if e & PRESENT != 0 { e & PFN_MASK } else { 0 })
        })
        .collect()
}

/// Whether each page at `addrs` of process `pid` is locked in memory
/// (`KPF_MLOCKED` or `KPF_UNEVICTABLE` in `/proc/kpageflags`).
fn locked_pages(pid: u32, addrs: &[u64]) -> io::Result<Vec<bool>> {
    const KPF_UNEVICTABLE: u64 = 1 << 18;
    const KPF_MLOCKED: u64 = 1 << 33;
    let pfns = pfns_of(pid, addrs.iter().copied())?;
    let f = File::open("/proc/kpageflags")?;
    let mut buf = [0u8; 8];
    pfns.iter()
        .map(|&pfn| {
            if pfn == 0 {
                return Ok(false);
            }
            f.read_exact_at(&mut buf, pfn * 8)?;
            Ok(u64::from_ne_bytes(buf) & (KPF_MLOCKED | KPF_UNEVICTABLE) != 0)
        })
        .collect()
}

/// A whole call's failure of `move_pages(2)` as a refusal.
fn os_refusal(e: io::Error) -> Refusal {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    let code = match errno {
        libc::ESRCH => ErrorCode::NotFound,
        libc::EPERM | libc::EACCES => ErrorCode::PermissionDenied,
        libc::EINVAL | libc::EFAULT => ErrorCode::Invalid,
        _ => ErrorCode::Busy,
    };
    (-errno, code)
}

/// Writing a `ResidencyReply` frame.
trait WriteFrame {
    fn write_all_frame(&mut self, pages: &[PageResidency]) -> io::Result<()>;
}

impl WriteFrame for UnixStream {
    fn write_all_frame(&mut self, pages: &[PageResidency]) -> io::Result<()> {
        use std::io::Write as _;
        let body = pages.as_bytes();
        let mut out = vec![0u8; HEADER_SIZE + body.len()];
        Frame::ResidencyReply {
            count: pages.len() as u32,
        }
        .encode(&mut out);
        out[HEADER_SIZE..].copy_from_slice(body);
        self.write_all(&out)
    }
}
