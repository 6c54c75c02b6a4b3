//! The admin socket: a stream Unix socket speaking the frames of
//! `mm_upcall_proto::socket`.  A client sends `Hello` first, then `Stats`
//! (fixed-layout counters) or `Metrics` (Prometheus text).  Only root may
//! connect (the socket is mode 0600 and the peer's uid is checked); client
//! hints (`Hint`, `Query`) are answered `Unsupported` until they exist.
//!
//! The socket is served by its own thread from a [`Snapshot`] the event
//! loop publishes, so a slow or hostile client never delays a verdict.
//! Every connection has a read timeout and a thread of its own, at most
//! [`MAX_CLIENTS`] at a time.  When all are taken, a new client does not
//! get `Busy` while another waits: the connection that has waited longest
//! for its next frame (idle, trickling, or not reading its reply) is
//! closed to make room.  Only connections being answered at that moment
//! are never closed, and `Busy` goes out only when all are.

use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mm_upcall_proto::DecodeError;
use mm_upcall_proto::socket::{
    self, ErrorCode, Frame, HEADER_SIZE, MAX_FRAME_SIZE, MAX_METRICS_TEXT,
};

use crate::driver::Published;
use crate::metrics::Snapshot;

/// Connections served at once; more are refused with `Busy`.
pub const MAX_CLIENTS: usize = 8;
/// How long a client may take to send a frame.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Bind the admin socket at `path` (replacing a stale one) with mode 0600.
///
/// # Errors
///
/// A live server already listens there (`AddrInUse`), or binding failed.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another mm-server answers on {}; stop it first",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serve `listener` from `snapshot` on a new thread, for the life of the
/// process, to root only.
pub fn spawn(listener: UnixListener, snapshot: Published) -> io::Result<()> {
    spawn_for(listener, snapshot, 0)
}

/// As [`spawn`], for clients of uid `allowed_uid` (root: 0).  Tests give
/// their own uid, so that every check runs whoever runs them.
pub fn spawn_for(listener: UnixListener, snapshot: Published, allowed_uid: u32) -> io::Result<()> {
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let conns = Arc::new(Conns::default());
            for conn in listener.incoming() {
                let Ok(mut s) = conn else {
                    // EMFILE and the like: do not spin.
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                };
                let Some(id) = conns.admit(&s) else {
                    let _ = send(
                        &mut s,
                        Frame::Error {
                            errno: -libc::EBUSY,
                            code: ErrorCode::Busy,
                        },
                    );
                    continue;
                };
                let snap = Arc::clone(&snapshot);
                let cs = Arc::clone(&conns);
                let spawned = std::thread::Builder::new()
                    .name("admin-client".into())
                    .spawn(move || {
                        let waiting = |w: bool| cs.set_waiting(id, w);
                        if let Err(e) = client(&mut s, &snap, allowed_uid, &waiting) {
                            tracing::debug!("admin client: {e}");
                        }
                        cs.remove(id);
                    });
                if spawned.is_err() {
                    conns.remove(id);
                }
            }
        })
        .map(|_| ())
}

/// The connections being served.
#[derive(Default)]
struct Conns {
    inner: Mutex<ConnsInner>,
}

#[derive(Default)]
struct ConnsInner {
    next_id: u64,
    /// Id, a handle to close it, and since when it waits for a frame
    /// (`None` while it is being answered).
    list: Vec<(u64, UnixStream, Option<Instant>)>,
}

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConnsInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Take a slot for `s`, closing the connection that has waited
    /// longest if all are taken; `None` when every one is being answered.
    fn admit(&self, s: &UnixStream) -> Option<u64> {
        let handle = s.try_clone().ok()?;
        let mut g = self.lock();
        if g.list.len() >= MAX_CLIENTS {
            let (k, _) = g
                .list
                .iter()
                .enumerate()
                .filter_map(|(k, c)| c.2.map(|since| (k, since)))
                .min_by_key(|&(_, since)| since)?;
            let (_, victim, _) = g.list.swap_remove(k);
            // Its thread's read (or write) ends; the thread then leaves.
            let _ = victim.shutdown(std::net::Shutdown::Both);
        }
        let id = g.next_id;
        g.next_id += 1;
        g.list.push((id, handle, Some(Instant::now())));
        Some(id)
    }

    fn set_waiting(&self, id: u64, waiting: bool) {
        if let Some(c) = self.lock().list.iter_mut().find(|c| c.0 == id) {
            c.2 = waiting.then(Instant::now);
        }
    }

    fn remove(&self, id: u64) {
        self.lock().list.retain(|c| c.0 != id);
    }
}

fn send(s: &mut UnixStream, f: Frame) -> io::Result<()> {
    let mut buf = [0u8; MAX_FRAME_SIZE];
    let n = f.encode(&mut buf);
    s.write_all(&buf[..n])
}

fn error(s: &mut UnixStream, errno: i32, code: ErrorCode) -> io::Result<()> {
    send(s, Frame::Error { errno, code })
}

/// Read one frame; `None` at a clean end of stream.
fn read_frame(s: &mut UnixStream) -> io::Result<Option<Result<Frame, DecodeError>>> {
    let mut buf = [0u8; MAX_FRAME_SIZE];
    let mut got = 0;
    while got < HEADER_SIZE {
        let n = s.read(&mut buf[got..HEADER_SIZE])?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        got += n;
    }
    let total = match Frame::decode_header(&buf[..HEADER_SIZE]) {
        Ok((_, total)) => total,
        Err(e) => return Ok(Some(Err(e))),
    };
    if total > MAX_FRAME_SIZE {
        // Only replies are longer (MetricsReply): not a client frame.
        return Ok(Some(Err(DecodeError::BadLength {
            op: u16::from_ne_bytes([buf[6], buf[7]]),
            len: (total - HEADER_SIZE) as u32,
            expected: (MAX_FRAME_SIZE - HEADER_SIZE) as u32,
        })));
    }
    s.read_exact(&mut buf[HEADER_SIZE..total])?;
    Ok(Some(Frame::decode(&buf[..total]).map(|(f, _)| f)))
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
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    s.set_write_timeout(Some(READ_TIMEOUT))?;
    if crate::sys::peer_uid(s)? != allowed_uid {
        return error(s, -libc::EPERM, ErrorCode::PermissionDenied);
    }
    let mut hello = false;
    loop {
        waiting(true);
        let next = read_frame(s)?;
        waiting(false);
        let frame = match next {
            None => return Ok(()),
            Some(Ok(f)) => f,
            Some(Err(DecodeError::BadVersion { .. })) => {
                return error(s, -libc::EPROTO, ErrorCode::BadVersion);
            }
            Some(Err(_)) => return error(s, -libc::EPROTO, ErrorCode::BadFrame),
        };
        match frame {
            Frame::Hello {
                min_version,
                max_version,
                ..
            } => {
                let v = max_version.min(socket::MAX_VERSION);
                if v < min_version.max(socket::MIN_VERSION) {
                    return error(s, -libc::EPROTO, ErrorCode::BadVersion);
                }
                hello = true;
                send(
                    s,
                    Frame::HelloReply {
                        version: v,
                        features: 0,
                    },
                )?;
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
            Frame::Hint { .. } | Frame::Query { .. } => {
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

/// A client of the admin socket (for `mm-server metrics` and tests).
#[derive(Debug)]
pub struct AdminClient {
    s: UnixStream,
    path: PathBuf,
}

impl AdminClient {
    /// Connect and say Hello.
    ///
    /// # Errors
    ///
    /// Connecting, or the server's refusal.
    pub fn connect(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let s = UnixStream::connect(path).with_context(|| {
            format!(
                "cannot connect to the admin socket {}: is mm-server running (and are you root)?",
                path.display()
            )
        })?;
        s.set_read_timeout(Some(READ_TIMEOUT))?;
        let mut c = Self {
            s,
            path: path.to_path_buf(),
        };
        match c.call(Frame::Hello {
            min_version: socket::MIN_VERSION,
            max_version: socket::MAX_VERSION,
            features: 0,
        })? {
            (Frame::HelloReply { .. }, _) => Ok(c),
            (other, _) => {
                anyhow::bail!("{}: unexpected reply to Hello: {other:?}", c.path.display())
            }
        }
    }

    fn call(&mut self, f: Frame) -> anyhow::Result<(Frame, Vec<u8>)> {
        send(&mut self.s, f)?;
        let mut hdr = [0u8; HEADER_SIZE];
        self.s.read_exact(&mut hdr)?;
        let (_, total) = Frame::decode_header(&hdr)?;
        let mut buf = hdr.to_vec();
        buf.resize(total, 0);
        self.s.read_exact(&mut buf[HEADER_SIZE..])?;
        let (frame, _) = Frame::decode(&buf)?;
        if let Frame::Error { errno, code } = frame {
            anyhow::bail!(
                "{}: the server answered {code:?} ({})",
                self.path.display(),
                io::Error::from_raw_os_error(-errno)
            );
        }
        Ok((frame, buf))
    }

    /// The metrics text.
    ///
    /// # Errors
    ///
    /// Socket or protocol errors.
    pub fn metrics(&mut self) -> anyhow::Result<String> {
        let (_, buf) = self.call(Frame::Metrics)?;
        socket::metrics_text(&buf)
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("the server's Metrics reply is malformed"))
    }

    /// The fixed-layout counters.
    ///
    /// # Errors
    ///
    /// Socket or protocol errors.
    pub fn stats(&mut self) -> anyhow::Result<socket::StatsRec> {
        match self.call(Frame::Stats)? {
            (Frame::StatsReply(r), _) => Ok(r),
            (other, _) => anyhow::bail!("unexpected reply to Stats: {other:?}"),
        }
    }
}
