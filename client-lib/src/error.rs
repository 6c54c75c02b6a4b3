//! Errors of the client library, each with the errno the C ABI returns.

use std::io;
use std::path::PathBuf;

use mm_upcall_proto::socket::ErrorCode;

/// Why a call failed.  [`Error::errno`] is the C ABI's `-errno`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No server answers at the socket.
    #[error(
        "cannot connect to {}: {source}; is mm-server running (`mmctl doctor` checks), \
         and may this user open the socket?",
        path.display()
    )]
    Connect { path: PathBuf, source: io::Error },
    /// The socket failed or timed out mid-conversation.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The server refused the request.
    #[error("mm-server refused {what}: {} ({code:?}){}", io::Error::from_raw_os_error(-errno), hint(*code, *errno))]
    Refused {
        what: &'static str,
        code: ErrorCode,
        errno: i32,
    },
    /// The server said something this library does not understand.
    #[error("{}: protocol error: {detail}", path.display())]
    Protocol { path: PathBuf, detail: String },
    /// Bad arguments, found before asking the server.
    #[error("{0}")]
    Invalid(String),
    /// The advice is not possible here.
    #[error("{0}")]
    Unsupported(String),
    /// `KeepFast` could not lock the range.
    #[error(
        "KeepFast locks the range in memory (mlock), which failed: {0}; raise RLIMIT_MEMLOCK \
         (`ulimit -l`) or grant CAP_IPC_LOCK"
    )]
    Lock(String),
}

fn hint(code: ErrorCode, errno: i32) -> &'static str {
    match code {
        ErrorCode::PermissionDenied if errno == -libc::EPERM => {
            "; another process's memory needs CAP_SYS_NICE (and its uid, or CAP_SYS_PTRACE), \
             admin commands need the admin socket"
        }
        ErrorCode::Busy => "; try again later",
        ErrorCode::BadVersion => "; this library and mm-server speak no common version",
        _ => "",
    }
}

impl Error {
    /// The positive errno of this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Connect { source, .. } | Error::Io { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            Error::Refused { errno, .. } => errno.checked_neg().unwrap_or(libc::EIO),
            Error::Protocol { .. } => libc::EPROTO,
            Error::Invalid(_) => libc::EINVAL,
            Error::Unsupported(_) => libc::EOPNOTSUPP,
            Error::Lock(_) => libc::ENOMEM,
        }
    }
}
