//! The client socket's client: advice about memory, and where it lives.

use std::fmt;
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::path::{Path, PathBuf};

use mm_upcall_proto::socket::{self, Advice, Frame, MAX_REQUEST_PAGES, SIZE_UNKNOWN};

use crate::conn::Conn;
use crate::{Error, Result};

/// Where mm-server's client socket is by default (`server.client_socket`);
/// `$MM_UPCALL_SOCKET` overrides it.
pub const DEFAULT_CLIENT_SOCKET: &str = "/run/mm-upcall/client.sock";

const PAGE: usize = 4096;
/// Bytes per request frame; longer ranges are split.
const CHUNK: usize = MAX_REQUEST_PAGES as usize * PAGE;

/// What the server did with a range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Advised {
    /// Pages in the range.
    pub pages: u64,
    /// Pages moved (onto the compressed node for `Cold`, off it for `Hot`
    /// and `KeepFast`).
    pub moved: u64,
    /// Pages already where the advice wants them.
    pub already: u64,
    /// Pages not moved: not present, not movable (shared, pinned, file
    /// pages), or no room on the compressed node.
    pub skipped: u64,
}

impl std::ops::AddAssign for Advised {
    fn add_assign(&mut self, o: Self) {
        self.pages += o.pages;
        self.moved += o.moved;
        self.already += o.already;
        self.skipped += o.skipped;
    }
}

/// Where one page lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Page {
    /// On NUMA node `node`; on a compressed node, `compressed` is its
    /// measured size in bytes (`None`: not measured yet, or writable in
    /// place).
    Resident { node: u16, compressed: Option<u32> },
    /// Mapped but not present (never touched, or swapped out).
    NotPresent,
    /// Not mapped.
    NotMapped,
    /// Another errno from `move_pages(2)`.
    Error { errno: i32 },
}

impl Page {
    fn from_wire(r: &socket::PageResidency, managed: bool) -> Self {
        match r.node {
            n if n >= 0 => Page::Resident {
                node: n as u16,
                compressed: (managed && r.bytes != SIZE_UNKNOWN).then_some(r.bytes),
            },
            n if n == -libc::ENOENT => Page::NotPresent,
            n if n == -libc::EFAULT => Page::NotMapped,
            n => Page::Error { errno: -n },
        }
    }

    /// The node, if resident.
    pub fn node(&self) -> Option<u16> {
        match *self {
            Page::Resident { node, .. } => Some(node),
            _ => None,
        }
    }
}

impl fmt::Display for Page {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Page::Resident {
                node,
                compressed: Some(b),
            } => write!(f, "node {node}, {b} bytes compressed"),
            Page::Resident { node, .. } => write!(f, "node {node}"),
            Page::NotPresent => f.write_str("not present"),
            Page::NotMapped => f.write_str("not mapped"),
            Page::Error { errno } => write!(f, "{}", std::io::Error::from_raw_os_error(errno)),
        }
    }
}

/// A range locked for `KeepFast`.
struct Locked {
    start: usize,
    end: usize,
    _guard: region::LockGuard,
}

impl fmt::Debug for Locked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Locked({:#x}..{:#x})", self.start, self.end)
    }
}

const _: () = {
    const fn send<T: Send>() {}
    send::<Client>();
};

/// A connection to mm-server's client socket.
///
/// `KeepFast` ranges stay locked for as long as this value lives (or
/// until `Normal`, `Hot` or `Cold` advice covers them).
#[derive(Debug)]
pub struct Client {
    c: Conn,
    locked: Vec<Locked>,
}

/// The client socket's path: `$MM_UPCALL_SOCKET`, else the default.
pub fn client_socket() -> PathBuf {
    std::env::var_os("MM_UPCALL_SOCKET")
        .map_or_else(|| PathBuf::from(DEFAULT_CLIENT_SOCKET), PathBuf::from)
}

impl Client {
    /// Connect to the client socket ([`DEFAULT_CLIENT_SOCKET`] or
    /// `$MM_UPCALL_SOCKET`).
    ///
    /// # Errors
    ///
    /// No server answers, this user may not open the socket, or the
    /// server speaks no common version.
    pub fn connect() -> Result<Self> {
        Self::connect_to(&client_socket())
    }

    /// Connect to the client socket at `path`.
    ///
    /// # Errors
    ///
    /// As [`Client::connect`].
    pub fn connect_to(path: &Path) -> Result<Self> {
        Ok(Self {
            c: Conn::connect(path)?,
            locked: Vec::new(),
        })
    }

    /// The socket protocol version agreed with the server.
    pub fn version(&self) -> u16 {
        self.c.version
    }

    /// Advise `len` bytes at `addr` of this process (`addr` page-aligned,
    /// `len` rounded up to whole pages), like `madvise(2)`:
    /// - `Cold`: move the range to the compressed node now, as far as the
    ///   server has room for it;
    /// - `Hot`: move it off the compressed node now;
    /// - `KeepFast`: lock the range (`mlock(2)`; reclaim, and so demotion,
    ///   never takes locked pages), then move it off the compressed node;
    ///   it stays off until `Normal`, `Hot` or `Cold` advice covers it, or
    ///   this `Client` is dropped;
    /// - `Normal`: undo `KeepFast`.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for an unaligned or wrapping range;
    /// [`Error::Lock`] if `KeepFast` could not lock; the server's refusal
    /// ([`Error::Refused`]: `Busy` over the rate limits or while the
    /// server cannot place pages; retry later).
    pub fn advise(&mut self, addr: usize, len: usize, advice: Advice) -> Result<Advised> {
        let end = check_range(addr, len)?;
        self.unlock(addr, end);
        if advice == Advice::KeepFast && len > 0 {
            let guard = region::lock(addr as *const u8, end - addr)
                .map_err(|e| Error::Lock(e.to_string()))?;
            self.locked.push(Locked {
                start: addr,
                end,
                _guard: guard,
            });
        }
        let r = self.advise_pid(0, addr, len, advice)?;
        if advice == Advice::KeepFast && r.skipped > 0 {
            // Locked pages are all present: a skipped one failed to move
            // and may still be on the compressed node.
            return Err(Error::Refused {
                what: "KeepFast (some pages could not leave the compressed node; the range \
                       stays locked: advise it again)",
                code: socket::ErrorCode::Busy,
                errno: -libc::EBUSY,
            });
        }
        Ok(r)
    }

    /// As [`Client::advise`], on the process `pidfd` refers to: allowed
    /// with `CAP_SYS_NICE`, and the target's uid or `CAP_SYS_PTRACE`, as
    /// `process_madvise(2)` is.  `KeepFast` is not possible (only the
    /// process itself can lock its memory).
    ///
    /// # Errors
    ///
    /// As [`Client::advise`]; [`Error::Refused`] with `EPERM` without
    /// the privilege, `ESRCH` when the process is gone.
    pub fn advise_process(
        &mut self,
        pidfd: BorrowedFd<'_>,
        addr: usize,
        len: usize,
        advice: Advice,
    ) -> Result<Advised> {
        if advice == Advice::KeepFast {
            return Err(Error::Unsupported(
                "KeepFast locks the range, which only the process itself can do: call \
                 advise(KeepFast) in that process"
                    .into(),
            ));
        }
        check_range(addr, len)?;
        let pid = pid_of(pidfd)?;
        self.advise_pid(pid, addr, len, advice)
    }

    fn advise_pid(&mut self, pid: u32, addr: usize, len: usize, advice: Advice) -> Result<Advised> {
        let mut total = Advised::default();
        for (a, l) in chunks(addr, len) {
            let f = Frame::Advise {
                pid,
                advice,
                addr: a as u64,
                len: l as u64,
            };
            match self.c.call("Advise", f)? {
                (Frame::AdviseReply(r), _) => {
                    total += Advised {
                        pages: r.pages,
                        moved: r.moved,
                        already: r.already,
                        skipped: r.skipped,
                    };
                }
                (other, _) => {
                    return Err(self
                        .c
                        .protocol(format!("unexpected reply to Advise: {other:?}")));
                }
            }
        }
        Ok(total)
    }

    /// Release the locks of `KeepFast` ranges within `[start, end)`;
    /// parts of them outside it stay locked.
    fn unlock(&mut self, start: usize, end: usize) {
        let (hit, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.locked)
            .into_iter()
            .partition(|l| l.start < end && start < l.end);
        self.locked = keep;
        for l in hit {
            let (s, e) = (l.start, l.end);
            drop(l);
            for (a, b) in [(s, start.max(s)), (end.min(e), e)] {
                if a < b
                    && let Ok(g) = region::lock(a as *const u8, b - a)
                {
                    self.locked.push(Locked {
                        start: a,
                        end: b,
                        _guard: g,
                    });
                }
            }
        }
    }

    /// Where each page of `len` bytes at `addr` of this process lives.
    ///
    /// # Errors
    ///
    /// As [`Client::advise`].
    pub fn residency(&mut self, addr: usize, len: usize) -> Result<Vec<Page>> {
        check_range(addr, len)?;
        self.residency_pid(0, addr, len)
    }

    /// As [`Client::residency`], of the process `pidfd` refers to (same
    /// privilege as [`Client::advise_process`]).
    ///
    /// # Errors
    ///
    /// As [`Client::advise_process`].
    pub fn residency_process(
        &mut self,
        pidfd: BorrowedFd<'_>,
        addr: usize,
        len: usize,
    ) -> Result<Vec<Page>> {
        check_range(addr, len)?;
        let pid = pid_of(pidfd)?;
        self.residency_pid(pid, addr, len)
    }

    fn residency_pid(&mut self, pid: u32, addr: usize, len: usize) -> Result<Vec<Page>> {
        let managed = managed_nodes();
        let mut out = Vec::with_capacity(len.div_ceil(PAGE));
        for (a, l) in chunks(addr, len) {
            let f = Frame::Residency {
                pid,
                addr: a as u64,
                len: l as u64,
            };
            let (frame, buf) = self.c.call("Residency", f)?;
            let Frame::ResidencyReply { .. } = frame else {
                return Err(self
                    .c
                    .protocol(format!("unexpected reply to Residency: {frame:?}")));
            };
            let recs = socket::residency_pages(&buf)
                .ok_or_else(|| self.c.protocol("malformed ResidencyReply".into()))?;
            if recs.len() != l.div_ceil(PAGE) {
                return Err(self.c.protocol(format!(
                    "ResidencyReply has {} pages for {}",
                    recs.len(),
                    l.div_ceil(PAGE)
                )));
            }
            out.extend(recs.iter().map(|r| {
                let m = r.node >= 0 && managed.contains(&(r.node as u16));
                Page::from_wire(r, m || r.bytes != SIZE_UNKNOWN)
            }));
        }
        Ok(out)
    }
}

/// `addr + len` rounded up to a page, checked.
fn check_range(addr: usize, len: usize) -> Result<usize> {
    if !addr.is_multiple_of(PAGE) {
        return Err(Error::Invalid(format!(
            "address {addr:#x} is not page-aligned (as madvise(2), the range must start on a page)"
        )));
    }
    len.div_ceil(PAGE)
        .checked_mul(PAGE)
        .and_then(|l| addr.checked_add(l))
        .ok_or_else(|| Error::Invalid(format!("range {addr:#x}+{len:#x} wraps around")))
}

/// `[addr, addr + len)` in pieces of at most one frame's worth.
fn chunks(addr: usize, len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len.div_ceil(CHUNK)).map(move |i| {
        let off = i * CHUNK;
        (addr + off, (len - off).min(CHUNK))
    })
}

/// The pid a pidfd refers to (its `fdinfo`'s `Pid:` line).
fn pid_of(pidfd: BorrowedFd<'_>) -> Result<u32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
        .map_err(|e| Error::Invalid(format!("not a pidfd: {e}")))?;
    match info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .map(str::trim)
    {
        Some("-1") => Err(Error::Refused {
            what: "the pidfd",
            code: socket::ErrorCode::NotFound,
            errno: -libc::ESRCH,
        }),
        Some(p) => {
            p.parse().ok().filter(|&p| p > 0).ok_or_else(|| {
                Error::Invalid(format!("pidfd names pid {p}, not in this namespace"))
            })
        }
        None => Err(Error::Invalid("not a pidfd (no Pid: in its fdinfo)".into())),
    }
}

/// NUMA nodes with memory and no CPUs (where compressed memory lives), from
/// sysfs; used to tell a compressed size from none.
fn managed_nodes() -> Vec<u16> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    parse_list(&read("/sys/devices/system/node/has_memory"))
        .into_iter()
        .filter(|n| !parse_list(&read("/sys/devices/system/node/has_cpu")).contains(n))
        .collect()
}

/// A kernel cpu/node list (`0-2,4`), as sysfs writes them.
pub fn parse_list(s: &str) -> Vec<u16> {
    s.trim()
        .split(',')
        .filter(|p| !p.is_empty())
        .flat_map(|p| {
            let (a, b) = p.split_once('-').unwrap_or((p, p));
            let (a, b) = (a.parse().unwrap_or(1), b.parse().unwrap_or(0));
            a..=b
        })
        .collect()
}

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Probe {
    /// The kernel has the mm_upcall feature (`/dev/mm_upcall` exists).
    pub kernel: bool,
    /// A server answers on the client socket.
    pub server: bool,
    /// The socket protocol version agreed with it.
    pub version: Option<u16>,
    /// Why the server could not be reached, if it could not.
    pub error: Option<String>,
}

/// What this machine offers, like `numa_available()`: whether the kernel
/// has the feature, whether a server answers, and which protocol version.
pub fn probe() -> Probe {
    let kernel = Path::new("/dev/mm_upcall").exists();
    match Client::connect() {
        Ok(c) => Probe {
            kernel,
            server: true,
            version: Some(c.version()),
            error: None,
        },
        Err(e) => Probe {
            kernel,
            server: false,
            version: None,
            error: Some(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_into_frames() {
        let v: Vec<_> = chunks(0x1000, CHUNK * 2 + 5).collect();
        assert_eq!(
            v,
            vec![
                (0x1000, CHUNK),
                (0x1000 + CHUNK, CHUNK),
                (0x1000 + 2 * CHUNK, 5)
            ]
        );
        assert_eq!(chunks(0, 0).count(), 0);
    }

    #[test]
    fn bad_ranges_are_refused_before_the_server() {
        assert!(matches!(check_range(0x1001, 1), Err(Error::Invalid(_))));
        assert!(matches!(
            check_range(usize::MAX & !0xfff, 0x2000),
            Err(Error::Invalid(_))
        ));
        assert_eq!(check_range(0x1000, 1).unwrap(), 0x2000);
    }

    #[test]
    fn node_lists_parse() {
        assert_eq!(parse_list("0-2,4\n"), vec![0, 1, 2, 4]);
        assert_eq!(parse_list("\n"), Vec::<u16>::new());
    }
}
