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

use mm_upcall_proto::socket::{ErrorCode, Frame, HEADER_SIZE, MAX_METRICS_TEXT};

use crate::driver::Published;
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
pub fn spawn(listener: UnixListener, snapshot: Published) -> io::Result<()> {
    spawn_for(listener, snapshot, 0)
}

/// As [`spawn`], for clients of uid `allowed_uid` (root: 0).  Tests give
/// their own uid, so that every check runs whoever runs them.
///
/// # Errors
///
/// The thread could not be started.
pub fn spawn_for(listener: UnixListener, snapshot: Published, allowed_uid: u32) -> io::Result<()> {
    serve::spawn(listener, "admin", MAX_CLIENTS, move |s, waiting| {
        client(s, &snapshot, allowed_uid, waiting)
    })
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
    waiting: &dyn Fn(bool),
) -> io::Result<()> {
    if crate::sys::peer_uid(s)? != allowed_uid {
        return error(s, -libc::EPERM, ErrorCode::PermissionDenied);
    }
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
            Frame::Stats => {
                let st = lock(snap).stats();
                send(s, Frame::StatsReply(st))?;
            }
            Frame::Metrics => {
                let text = lock(snap).render();
                s.write_all(&metrics_frame(&text))?;
            }
            // Application advice goes to the client socket.
            Frame::Advise { .. } | Frame::Residency { .. } => {
                error(s, -libc::EOPNOTSUPP, ErrorCode::Unsupported)?;
            }
            // Replies are not requests.
            _ => return error(s, -libc::EPROTO, ErrorCode::BadFrame),
        }
    }
}

/// The latest snapshot: the lock is held only to clone the `Arc`, so
/// rendering never delays the loop that publishes.
fn lock(m: &Mutex<Arc<Snapshot>>) -> Arc<Snapshot> {
    // A panic elsewhere cannot leave the pointer half-written.
    Arc::clone(&m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
}
