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

/// Real, effective, saved and filesystem ids, as `/proc/<pid>/status`
/// lists them.
type Ids = [u32; 4];

/// The caller, as it was when it connected.
struct Peer {
    /// Its pid in the server's PID namespace.
    pid: u32,
    uids: Ids,
    gids: Ids,
    /// The process that connected (`SO_PEERPIDFD`): it polls readable
    /// once that process has exited, and never names a successor.
    pidfd: OwnedFd,
    /// Its effective capabilities, honoured only when it shares the
    /// server's user namespace (0 otherwise).
    caps: u64,
    /// It shares the server's PID namespace: the pids it names are ours.
    same_pid_ns: bool,
}

impl Peer {
    fn of(s: &UnixStream) -> io::Result<Self> {
        use std::os::fd::AsFd as _;
        let (raw_pid, _, _) = mm_upcall_kernel::peer_cred(s.as_fd())?;
        let pidfd = match mm_upcall_kernel::peer_pidfd(s.as_fd()) {
            Ok(fd) => fd,
            // Before Linux 6.5: the pid, with the race that implies.
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
                let p = rustix::process::Pid::from_raw(raw_pid)
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
                rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())?
            }
            Err(e) => return Err(e),
        };
        let pid = pidfd_pid(&pidfd)?;
        let ids =
            |key| status_ids(pid, key).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH));
        let (uids, gids) = (ids("Uid:")?, ids("Gid:")?);
        let same_user_ns = same_ns(pid, "user");
        let caps = status_field(pid, "CapEff:")
            .and_then(|v| u64::from_str_radix(&v, 16).ok())
            .filter(|_| same_user_ns)
            .unwrap_or(0);
        let peer = Self {
            pid,
            uids,
            gids,
            pidfd,
            caps,
            same_pid_ns: same_ns(pid, "pid"),
        };
        // What /proc said was about this process, not a successor.
        if !peer.alive() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(peer)
    }

    fn alive(&self) -> bool {
        alive(&self.pidfd)
    }
}

/// Whether the process of `pidfd` still runs.
fn alive(pidfd: &OwnedFd) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&zero)), Ok(0))
}

/// The pid (in the server's PID namespace) of the process `pidfd` refers
/// to, from its `fdinfo`.
fn pidfd_pid(pidfd: &OwnedFd) -> io::Result<u32> {
    use std::os::fd::AsRawFd as _;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|&p| p > 0)
        .map(|p| p as u32)
        // -1: exited; 0: not visible from here.
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))
}

/// Whether process `pid` shares the server's namespace of `kind` (a
/// kernel built without that kind of namespace has only one).
fn same_ns(pid: u32, kind: &str) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let ino = |p: String| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    match (
        ino(format!("/proc/{pid}/ns/{kind}")),
        ino(format!("/proc/self/ns/{kind}")),
    ) {
        (Ok(a), Ok(b)) => a == b,
        (Err(a), Err(b)) => {
            a.kind() == io::ErrorKind::NotFound && b.kind() == io::ErrorKind::NotFound
        }
        _ => false,
    }
}

/// The four ids of a `Uid:` or `Gid:` line of `/proc/<pid>/status`.
fn status_ids(pid: u32, key: &str) -> Option<Ids> {
    let v: Vec<u32> = status_field(pid, key)?
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    v.try_into().ok()
}

/// Whether a caller with effective capabilities `caps` may advise the
/// memory of another process, as `process_madvise(2)` allows:
/// `CAP_SYS_NICE`, and either `CAP_SYS_PTRACE` or the right to ptrace it
/// without privilege (`ptrace_like`: the target's real, effective and
/// saved uids and gids are the caller's real ones, and it is dumpable).
///
/// # Errors
///
/// `EPERM` when it may not.
pub fn may_advise_other(caps: u64, ptrace_like: bool) -> Result<(), (i32, ErrorCode)> {
    let has = |cap: u32| caps & (1 << cap) != 0;
    if has(CAP_SYS_NICE) && (ptrace_like || has(CAP_SYS_PTRACE)) {
        Ok(())
    } else {
        Err((-libc::EPERM, ErrorCode::PermissionDenied))
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
        serve::session(s, waiting, |s, frame| {
            match frame {
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
                _ => error(s, -libc::EPERM, ErrorCode::PermissionDenied)?,
            }
            Ok(true)
        })
    }

    /// Charge one request of `bytes` to the caller's uid.
    fn charge(&self, uid: u32, bytes: u64) -> Result<(), Refusal> {
        let now = Instant::now();
        let mut g = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The burst holds at least one whole request (64 MiB), so a rate
        // below that slows requests down instead of refusing them all.
        let (rps, bps) = (
            f64::from(self.limits.requests_per_s),
            (self.limits.advise_bytes_per_s as f64)
                .max((MAX_REQUEST_PAGES * PAGE_SIZE as u64) as f64),
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
    /// would, and a pidfd that holds it (`None`: the caller itself).
    fn target(&self, peer: &Peer, pid: u32) -> Result<Option<OwnedFd>, Refusal> {
        let gone = (-libc::ESRCH, ErrorCode::NotFound);
        let denied = (-libc::EPERM, ErrorCode::PermissionDenied);
        if pid == 0 || (peer.same_pid_ns && pid == peer.pid) {
            return if peer.alive() { Ok(None) } else { Err(gone) };
        }
        // A pid named from another PID namespace is not ours to read.
        if !peer.same_pid_ns {
            return Err(denied);
        }
        may_advise_other(peer.caps, true)?;
        let p = rustix::process::Pid::from_raw(pid as i32).ok_or(gone)?;
        let fd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())
            .map_err(|_| gone)?;
        let (uids, gids) = (
            status_ids(pid, "Uid:").ok_or(gone)?,
            status_ids(pid, "Gid:").ok_or(gone)?,
        );
        // A process that is not dumpable has its /proc directory owned by
        // root, whatever its uid.
        let dumpable = {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == uids[1])
        };
        let ptrace_like = uids[..3].iter().all(|&u| u == peer.uids[0])
            && gids[..3].iter().all(|&g| g == peer.gids[0])
            && dumpable;
        if !alive(&fd) {
            return Err(gone);
        }
        tracing::debug!(
            peer = peer.pid,
            target = pid,
            caps = format_args!("{:#x}", peer.caps),
            ptrace_like,
            dumpable,
            ?uids,
            peer_uids = ?peer.uids,
            "advice on another process"
        );
        may_advise_other(peer.caps, ptrace_like)?;
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
        self.charge(peer.uids[0], len)?;
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
        let mut want: Vec<u64> = if advice == Advice::Cold {
            r.already = status.iter().filter(|&&n| managed(n)).count() as u64;
            let present: Vec<u64> = addrs
                .iter()
                .zip(&status)
                .filter(|&(_, &n)| n >= 0 && !managed(n))
                .map(|(&a, _)| a)
                .collect();
            // Never a locked page (KeepFast, or any mlock): reclaim keeps
            // them off the node, and so does the server, whoever asks.
            let locked = locked_pages(target, &present).map_err(|e| proc_error(target, &e))?;
            present
                .into_iter()
                .zip(locked)
                .filter(|&(_, l)| !l)
                .map(|(a, _)| a)
                .collect()
        } else {
            r.already = status.iter().filter(|&&n| n >= 0 && !managed(n)).count() as u64;
            addrs
                .iter()
                .zip(&status)
                .filter(|&(_, &n)| managed(n))
                .map(|(&a, _)| a)
                .collect()
        };
        // Hot and KeepFast go to the fast node; Cold to the node the core
        // reserves room on.
        let mut node = self.core.fast;
        if !want.is_empty() {
            let mut tickets = Vec::new();
            if advice == Advice::Cold {
                let (got, t) = self.reserve(want.len() as u64);
                tickets = t;
                match got {
                    Ok((nid, n)) => {
                        node = nid;
                        want.truncate(n as usize);
                    }
                    Err(e) => {
                        for t in tickets {
                            self.core.end_move(t);
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
            for t in tickets {
                self.core.end_move(t);
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

    /// Reserve room for up to `pages` on a managed node, waiting up to
    /// [`MOVE_WAIT`] while the server makes room (takes its credit back
    /// from the kernel) or cannot place pages yet.  Returns the node and
    /// the pages reserved (or the refusal), and the tickets to end with
    /// `end_move` after the move.
    fn reserve(&self, pages: u64) -> (Result<(u16, u64), Refusal>, Vec<u64>) {
        let busy = (-libc::EAGAIN, ErrorCode::Busy);
        let deadline = Instant::now() + MOVE_WAIT;
        let (mut got, mut node, mut tickets) = (0, None, Vec::new());
        loop {
            let more = match self.core.begin_move(pages - got) {
                Ok(Ok(m)) if node.is_none_or(|n| n == m.nid) => {
                    node = Some(m.nid);
                    tickets.push(m.ticket);
                    got += m.pages;
                    m.more
                }
                // The node changed (drained meanwhile): move what we have.
                Ok(Ok(m)) => {
                    self.core.end_move(m.ticket);
                    false
                }
                // Not now (books being rebuilt, evicting, just started).
                Ok(Err(MoveRefused::NotNow)) => true,
                Ok(Err(MoveRefused::NotManaged)) => {
                    return (Err((-libc::ENODEV, ErrorCode::NotFound)), tickets);
                }
                // The loop ends a late reservation itself.
                Err(_) => return (Err(busy), tickets),
            };
            if got == pages || !more || Instant::now() >= deadline {
                return match node {
                    Some(n) => (Ok((n, got)), tickets),
                    None => (Err(busy), tickets),
                };
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
        self.charge(peer.uids[0], 0)?;
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
                .map_err(|e| proc_error(target, &e))?;
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

/// The answer when a process's `pagemap` (or `/proc/kpageflags`) cannot be
/// read: the process is gone (`ESRCH`), or the server lacks what it needs
/// to read it, which the client cannot fix (`EIO`, and the server says
/// why in its log).
fn proc_error(pid: u32, e: &io::Error) -> (i32, ErrorCode) {
    if e.kind() == io::ErrorKind::NotFound {
        return (-libc::ESRCH, ErrorCode::NotFound);
    }
    tracing::warn!(
        pid,
        "cannot read /proc/{pid}/pagemap or /proc/kpageflags: {e}; mm-server needs \
         CAP_DAC_READ_SEARCH (to open another user's pagemap) and CAP_SYS_ADMIN (to see \
         its pfns)"
    );
    (-libc::EIO, ErrorCode::Unsupported)
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
