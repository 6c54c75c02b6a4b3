//! What the admin and the client sockets share: binding a stream Unix
//! socket, one thread per connection with a read timeout, frame I/O, and
//! the connection table that keeps idle or trickling clients from locking
//! others out.
//!
//! When all `max` connections are taken, a new client does not get `Busy`
//! while another waits: the connection that has waited longest for its
//! next frame (idle, trickling, or not reading its reply) is closed to
//! make room.  Only connections being answered at that moment are never
//! closed, and `Busy` goes out only when all are.

use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mm_upcall_proto::DecodeError;
use mm_upcall_proto::socket::{ErrorCode, Frame, HEADER_SIZE, MAX_FRAME_SIZE};

/// How long a client may take to send a frame, or to read a reply.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Bind a socket at `path` (replacing a stale one) with `mode`.
///
/// # Errors
///
/// A live server already listens there (`AddrInUse`), or binding failed.
pub fn bind(path: &Path, mode: u32) -> io::Result<UnixListener> {
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}

/// Serve `listener` on a thread named `name`, for the life of the
/// process: each connection gets a thread running `client(stream,
/// waiting)`, at most `max` at a time.  `client` calls `waiting(true)`
/// before it waits for a frame and `waiting(false)` while it answers one.
///
/// # Errors
///
/// The thread could not be started.
pub fn spawn<F>(listener: UnixListener, name: &str, max: usize, client: F) -> io::Result<()>
where
    F: Fn(&mut UnixStream, &dyn Fn(bool)) -> io::Result<()> + Send + Sync + 'static,
{
    let client = Arc::new(client);
    let thread = format!("{name}-client");
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let conns = Arc::new(Conns::new(max));
            for conn in listener.incoming() {
                let Ok(mut s) = conn else {
                    // EMFILE and the like: do not spin.
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                let Some(id) = conns.admit(&s) else {
                    let _ = error(&mut s, -libc::EBUSY, ErrorCode::Busy);
                    continue;
                };
                let cs = Arc::clone(&conns);
                let f = Arc::clone(&client);
                let spawned = std::thread::Builder::new()
                    .name(thread.clone())
                    .spawn(move || {
                        let waiting = |w: bool| cs.set_waiting(id, w);
                        let r = s
                            .set_read_timeout(Some(READ_TIMEOUT))
                            .and_then(|()| s.set_write_timeout(Some(READ_TIMEOUT)))
                            .and_then(|()| f(&mut s, &waiting));
                        if let Err(e) = r {
                            tracing::debug!("socket client: {e}");
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
struct Conns {
    max: usize,
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
    fn new(max: usize) -> Self {
        Self {
            max,
            inner: Mutex::default(),
        }
    }

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
        if g.list.len() >= self.max {
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

/// Send one fixed-size frame.
///
/// # Errors
///
/// The write failed or timed out.
pub fn send(s: &mut UnixStream, f: Frame) -> io::Result<()> {
    let mut buf = [0u8; MAX_FRAME_SIZE];
    let n = f.encode(&mut buf);
    s.write_all(&buf[..n])
}

/// Send an `Error` frame.
///
/// # Errors
///
/// As [`send`].
pub fn error(s: &mut UnixStream, errno: i32, code: ErrorCode) -> io::Result<()> {
    send(s, Frame::Error { errno, code })
}

/// Read one request frame; `None` at a clean end of stream.  Frames
/// longer than any request (the variable-length replies) are refused
/// without reading their payload.
///
/// # Errors
///
/// The read failed, timed out, or the stream ended inside a frame.
pub fn read_frame(s: &mut UnixStream) -> io::Result<Option<Result<Frame, DecodeError>>> {
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
        // Only replies are longer: not a client frame.
        return Ok(Some(Err(DecodeError::BadLength {
            op: u16::from_ne_bytes([buf[6], buf[7]]),
            len: (total - HEADER_SIZE) as u32,
            expected: (MAX_FRAME_SIZE - HEADER_SIZE) as u32,
        })));
    }
    s.read_exact(&mut buf[HEADER_SIZE..total])?;
    Ok(Some(Frame::decode(&buf[..total]).map(|(f, _)| f)))
}

/// What a frame that did not decode gets: an `Error` frame, after which
/// the connection is closed.
///
/// # Errors
///
/// As [`send`].
pub fn refuse(s: &mut UnixStream, e: &DecodeError) -> io::Result<()> {
    match e {
        DecodeError::BadVersion { .. } => error(s, -libc::EPROTO, ErrorCode::BadVersion),
        _ => error(s, -libc::EPROTO, ErrorCode::BadFrame),
    }
}

/// Serve one connection: read frames until the client closes, refuse
/// what does not decode, answer `Hello`, and hand every other frame to
/// `answer` once `Hello` was answered.  `answer` returns whether to go on;
/// replies sent as requests end the connection with an error frame.
/// `waiting` is told when the connection waits for a frame (see
/// [`spawn`]).
///
/// # Errors
///
/// A read or write failed or timed out.
pub fn session<F>(s: &mut UnixStream, waiting: &dyn Fn(bool), mut answer: F) -> io::Result<()>
where
    F: FnMut(&mut UnixStream, Frame) -> io::Result<bool>,
{
    let mut hello = false;
    loop {
        waiting(true);
        let next = read_frame(s)?;
        waiting(false);
        let frame = match next {
            None => return Ok(()),
            Some(Ok(f)) => f,
            Some(Err(e)) => return refuse(s, &e),
        };
        let go_on = match frame {
            Frame::Hello {
                min_version,
                max_version,
                ..
            } => {
                hello = hello_reply(s, min_version, max_version)?;
                hello
            }
            // Before HELLO, and replies sent as requests.
            f if !hello || !f.is_request() => {
                error(s, -libc::EPROTO, ErrorCode::BadFrame)?;
                false
            }
            f => answer(s, f)?,
        };
        if !go_on {
            return Ok(());
        }
    }
}

/// Answer `Hello`: the version both sides speak, or `BadVersion`.
/// Returns whether the client may go on.
///
/// # Errors
///
/// As [`send`].
fn hello_reply(s: &mut UnixStream, min_version: u16, max_version: u16) -> io::Result<bool> {
    use mm_upcall_proto::socket::{MAX_VERSION, MIN_VERSION};
    let v = max_version.min(MAX_VERSION);
    if v < min_version.max(MIN_VERSION) {
        error(s, -libc::EPROTO, ErrorCode::BadVersion)?;
        return Ok(false);
    }
    send(
        s,
        Frame::HelloReply {
            version: v,
            features: 0,
        },
    )?;
    Ok(true)
}
