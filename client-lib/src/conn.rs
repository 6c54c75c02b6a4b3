//! One connection to an mm-server socket: Hello first, then a frame and
//! its reply at a time.

use std::io::Read as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mm_upcall_proto::socket::{self, Frame, HEADER_SIZE, MAX_FRAME_SIZE};

use crate::{Error, Result};

/// How long to wait for a reply: the server answers at once, or moves at
/// most 64 MiB for one frame.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(crate) struct Conn {
    s: UnixStream,
    pub(crate) path: PathBuf,
    pub(crate) version: u16,
}

impl Conn {
    pub(crate) fn connect(path: &Path) -> Result<Self> {
        let s = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        s.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        s.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        let mut c = Self {
            s,
            path: path.to_path_buf(),
            version: 0,
        };
        match c.call(
            "Hello",
            Frame::Hello {
                min_version: socket::MIN_VERSION,
                max_version: socket::MAX_VERSION,
                features: 0,
            },
        )? {
            (Frame::HelloReply { version, .. }, _) => {
                c.version = version;
                Ok(c)
            }
            (other, _) => Err(c.protocol(format!("unexpected reply to Hello: {other:?}"))),
        }
    }

    pub(crate) fn protocol(&self, detail: String) -> Error {
        Error::Protocol {
            path: self.path.clone(),
            detail,
        }
    }

    /// Send `f`, read its reply (the whole frame, variable-length ones
    /// included); an `Error` frame becomes [`Error::Refused`].  The server
    /// closes connections idle for 5 s (or when it needs the slot): then
    /// this connects again, says Hello, and sends `f` once more.
    pub(crate) fn call(&mut self, what: &'static str, f: Frame) -> Result<(Frame, Vec<u8>)> {
        match self.call_once(what, f) {
            Err(Error::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::UnexpectedEof
                ) && !matches!(f, Frame::Hello { .. }) =>
            {
                *self = Self::connect(&self.path.clone())?;
                self.call_once(what, f)
            }
            r => r,
        }
    }

    fn call_once(&mut self, what: &'static str, f: Frame) -> Result<(Frame, Vec<u8>)> {
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        let mut out = [0u8; MAX_FRAME_SIZE];
        let n = f.encode(&mut out);
        // MSG_NOSIGNAL: a closed connection is an error, not a SIGPIPE
        // that kills a C program using the library.
        let mut sent = 0;
        while sent < n {
            sent += rustix::net::send(&self.s, &out[sent..n], rustix::net::SendFlags::NOSIGNAL)
                .map_err(|e| io(e.into()))?;
        }
        let mut hdr = [0u8; HEADER_SIZE];
        self.s.read_exact(&mut hdr).map_err(io)?;
        let (_, total) =
            Frame::decode_header(&hdr).map_err(|e| self.protocol(format!("reply header: {e}")))?;
        let mut buf = hdr.to_vec();
        buf.resize(total, 0);
        self.s.read_exact(&mut buf[HEADER_SIZE..]).map_err(io)?;
        let (frame, _) =
            Frame::decode(&buf).map_err(|e| self.protocol(format!("reply to {what}: {e}")))?;
        if let Frame::Error { errno, code } = frame {
            return Err(Error::Refused { what, code, errno });
        }
        Ok((frame, buf))
    }
}
