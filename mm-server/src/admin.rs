//! The admin socket: a stream Unix socket speaking the frames of
//! `mm_upcall_proto::socket`.  A client sends `Hello` first, then `Stats`
//! (fixed-layout counters) or `Metrics` (Prometheus text).  Only root may
//! connect (the socket is mode 0600 and the peer's uid is checked);
//! application advice (`Advise`, `Residency`) is answered `Unsupported`
//! here: it goes to the client socket ([`crate::clients`]).
//!
//! The socket is served by its own thread from a [`Snapshot`] the event
//! loop publishes, so a slow or hostile client never delays a verdict.
//! Every connection has a read timeout and a thread of its own, at most
//! [`MAX_CLIENTS`] at a time, and idle or trickling clients cannot lock
//! others out (see [`crate::serve`]).

use std::io::{self, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use mm_upcall_proto::socket::{self, ErrorCode, Frame, HEADER_SIZE, MAX_METRICS_TEXT};

use crate::capacity::MAX_AGE_S;
use crate::core::{NodeRefused, RuntimePolicy};
use crate::driver::{CoreHandle, Published};
use crate::metrics::Snapshot;
use crate::serve::{self, error, send};

pub use crate::serve::READ_TIMEOUT;

/// Connections served at once; more are refused with `Busy`.
pub const MAX_CLIENTS: usize = 8;

/// Bind the admin socket at `path` (replacing a stale one) with mode 0600.
///
/// # Errors
///
/// A live server already listens there (`AddrInUse`), or binding failed.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    serve::bind(path, 0o600)
}

/// Serve `listener` from `snapshot` on a new thread, for the life of the
/// process, to root only.
///
/// # Errors
///
/// The thread could not be started.
pub fn spawn(
    listener: UnixListener,
    snapshot: Published,
    core: CoreHandle,
    tenants: crate::tenants::Published,
) -> io::Result<()> {
    serve::spawn(listener, "admin", MAX_CLIENTS, move |s, waiting| {
        client(s, &snapshot, 0, Some(&core), Some(&tenants), waiting)
    })
}

/// As [`spawn`], for clients of uid `allowed_uid` (root: 0).  Tests give
/// their own uid, so that every check runs whoever runs them; with no
/// `core`, the commands that change things are answered `Unsupported`.
///
/// # Errors
///
/// The thread could not be started.
pub fn spawn_for(
    listener: UnixListener,
    snapshot: Published,
    allowed_uid: u32,
    core: Option<CoreHandle>,
) -> io::Result<()> {
    serve::spawn(listener, "admin", MAX_CLIENTS, move |s, waiting| {
        client(s, &snapshot, allowed_uid, core.as_ref(), None, waiting)
    })
}

type Refusal = (i32, ErrorCode);

fn node_refusal(r: NodeRefused) -> Refusal {
    match r {
        NodeRefused::NotManaged => (-libc::ENODEV, ErrorCode::NotFound),
        NodeRefused::Draining => (-libc::EBUSY, ErrorCode::Busy),
        NodeRefused::Stopping => (-libc::ESHUTDOWN, ErrorCode::Busy),
    }
}

fn loop_gone(_: io::Error) -> Refusal {
    (-libc::EAGAIN, ErrorCode::Busy)
}

/// A command that changes things: through the server's loop.
fn command(core: &CoreHandle, f: Frame) -> Result<Frame, Refusal> {
    match f {
        Frame::Drain { nid } => {
            core.drain(nid).map_err(loop_gone)?.map_err(node_refusal)?;
            Ok(Frame::Ok)
        }
        Frame::Evict(r) => evict(core, &r),
        Frame::PolicyGet { nid } => {
            let p = core
                .policy_get(nid)
                .map_err(loop_gone)?
                .map_err(node_refusal)?;
            Ok(Frame::Policy(p.to_rec()))
        }
        Frame::PolicySet(r) => {
            let invalid = (-libc::EINVAL, ErrorCode::Invalid);
            r.check().map_err(|_| invalid)?;
            let p = RuntimePolicy {
                writable_budget: r.writable_budget,
                hot_threshold: r.hot_threshold,
                promote_rate_limit_mbps: r.promote_rate_limit_mbps,
                credit_chunk_pages: r.credit_chunk_pages,
                hot_window_ms: r.hot_window_ms,
                nid: r.nid,
                watermarks: (r.low, r.high, r.critical),
            };
            core.policy_set(p).map_err(loop_gone)?.map_err(|e| {
                tracing::warn!("policy set refused: {e}");
                invalid
            })?;
            Ok(Frame::Ok)
        }
        _ => Err((-libc::EPROTO, ErrorCode::BadFrame)),
    }
}

/// Most pages one `Evict` looks at.
const MAX_AGED: usize = 1 << 22;

/// Evict the old pages of one cgroup: the oldest first, at most
/// `max_bytes`; the cgroup of each page from `/proc/kpagecgroup`.
fn evict(core: &CoreHandle, r: &socket::EvictRec) -> Result<Frame, Refusal> {
    use std::os::unix::fs::FileExt as _;
    if r.min_age_s > MAX_AGE_S {
        return Err((-libc::EINVAL, ErrorCode::Invalid));
    }
    let aged = core.aged(r.nid, r.min_age_s, MAX_AGED).map_err(loop_gone)?;
    let want = (r.max_bytes / 4096) as usize;
    let f = std::fs::File::open("/proc/kpagecgroup")
        .map_err(|_| (-libc::ENOENT, ErrorCode::NotFound))?;
    let mut buf = [0u8; 8];
    let mut chosen = Vec::new();
    for &pfn in &aged {
        if chosen.len() >= want {
            break;
        }
        if f.read_exact_at(&mut buf, pfn * 8).is_ok() && u64::from_ne_bytes(buf) == r.cgroup_ino {
            chosen.push(pfn);
        }
    }
    let pages = chosen.len() as u64;
    core.evict(r.nid, chosen)
        .map_err(loop_gone)?
        .map_err(node_refusal)?;
    tracing::info!(
        nid = r.nid,
        cgroup_ino = r.cgroup_ino,
        min_age_s = r.min_age_s,
        pages,
        aged = aged.len(),
        "evicting a cgroup's old pages"
    );
    Ok(Frame::EvictReply(socket::EvictReplyRec {
        pages,
        aged: aged.len() as u64,
    }))
}

/// A whole `MetricsReply` frame with `text`, cut on a line boundary at the
/// protocol's limit.
pub fn metrics_frame(text: &str) -> Vec<u8> {
    let mut body = text.as_bytes();
    if body.len() > MAX_METRICS_TEXT {
        let cut = body[..MAX_METRICS_TEXT]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        body = &body[..cut];
    }
    let mut out = vec![0u8; HEADER_SIZE + body.len()];
    Frame::MetricsReply {
        len: body.len() as u32,
    }
    .encode(&mut out);
    out[HEADER_SIZE..].copy_from_slice(body);
    out
}

/// Serve one connection; `waiting(true)` when it starts waiting for a
/// frame (it may then be closed for a newcomer), `waiting(false)` while a
/// frame is answered.
fn client(
    s: &mut UnixStream,
    snap: &Mutex<Arc<Snapshot>>,
    allowed_uid: u32,
    core: Option<&CoreHandle>,
    tenants: Option<&crate::tenants::Published>,
    waiting: &dyn Fn(bool),
) -> io::Result<()> {
    if crate::sys::peer_uid(s)? != allowed_uid {
        return error(s, -libc::EPERM, ErrorCode::PermissionDenied);
    }
    serve::session(s, waiting, |s, frame| {
        match frame {
            Frame::Stats => {
                let st = lock(snap).stats();
                send(s, Frame::StatsReply(st))?;
            }
            Frame::Metrics => {
                let mut text = lock(snap).render();
                if let Some(t) = tenants {
                    text.push_str(&t.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
                }
                s.write_all(&metrics_frame(&text))?;
            }
            // Application advice goes to the client socket.
            Frame::Advise { .. } | Frame::Residency { .. } => {
                error(s, -libc::EOPNOTSUPP, ErrorCode::Unsupported)?;
            }
            // Drain, Evict, PolicyGet, PolicySet.
            _ => {
                let r = match core {
                    Some(c) => command(c, frame),
                    None => Err((-libc::EOPNOTSUPP, ErrorCode::Unsupported)),
                };
                match r {
                    Ok(f) => send(s, f)?,
                    Err((errno, code)) => error(s, errno, code)?,
                }
            }
        }
        Ok(true)
    })
}

/// The latest snapshot: the lock is held only to clone the `Arc`, so
/// rendering never delays the loop that publishes.
fn lock(m: &Mutex<Arc<Snapshot>>) -> Arc<Snapshot> {
    // A panic elsewhere cannot leave the pointer half-written.
    Arc::clone(&m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
}
