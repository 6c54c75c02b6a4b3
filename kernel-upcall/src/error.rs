use std::io;

use mm_upcall_proto::DecodeError;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device could not be opened.
    #[error("cannot open {path} (is the mm_upcall kernel running, and are we root?)")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    /// io_uring_setup failed.
    #[error("cannot set up the io_uring")]
    Ring(#[source] io::Error),
    /// io_uring_enter failed.
    #[error("io_uring_enter failed")]
    Enter(#[source] io::Error),
    /// The submission queue is full (more commands queued than the ring holds).
    #[error("submission queue full")]
    SqFull,
    /// A command was rejected by the kernel.
    #[error("{cmd} failed")]
    Command {
        cmd: &'static str,
        #[source]
        source: io::Error,
    },
    /// Mapping the descriptor array failed.
    #[error("cannot map the descriptor array of queue {q_id}")]
    Mmap {
        q_id: u16,
        #[source]
        source: io::Error,
    },
    /// Mapping a managed node's memory failed.
    #[error("cannot map the memory of node {nid}")]
    NodeMmap {
        nid: u32,
        #[source]
        source: io::Error,
    },
    /// The kernel sent a record this build does not understand.
    #[error("malformed record from the kernel")]
    Decode(#[from] DecodeError),
    /// The kernel granted fewer features than required.
    #[error("the kernel does not grant features {missing:?}")]
    Features {
        missing: mm_upcall_proto::raw::Features,
    },
    /// The server is being torn down (device released or commands cancelled).
    #[error("the transport is shutting down")]
    Shutdown,
}

impl Error {
    /// A negative errno for this error, for completing kernel commands.
    pub fn errno(&self) -> i32 {
        let os = |e: &io::Error| -e.raw_os_error().unwrap_or(libc::EIO);
        match self {
            Error::Open { source, .. }
            | Error::Ring(source)
            | Error::Enter(source)
            | Error::Command { source, .. }
            | Error::Mmap { source, .. }
            | Error::NodeMmap { source, .. } => os(source),
            Error::SqFull => -libc::EBUSY,
            Error::Decode(_) => -libc::EPROTO,
            Error::Features { .. } => -libc::EOPNOTSUPP,
            Error::Shutdown => -libc::ENODEV,
        }
    }

    /// Another server holds the device (`EBUSY` on open): retry after it
    /// went away.
    pub fn is_busy(&self) -> bool {
        self.errno() == -libc::EBUSY && !matches!(self, Error::SqFull)
    }

    /// A command error from a CQE result.
    pub(crate) fn command(cmd: &'static str, res: i32) -> Self {
        Error::Command {
            cmd,
            source: io::Error::from_raw_os_error(-res),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_a_negative_errno() {
        let errs = [
            Error::Open {
                path: "/x".into(),
                source: io::Error::from_raw_os_error(libc::EBUSY),
            },
            Error::Ring(io::Error::from_raw_os_error(libc::ENOMEM)),
            Error::Enter(io::Error::other("no errno")),
            Error::SqFull,
            Error::command("HELLO", -libc::EPROTONOSUPPORT),
            Error::Decode(DecodeError::ReservedNonZero { field: "reserved" }),
            Error::Features {
                missing: mm_upcall_proto::raw::Features::WRITE_FAULT,
            },
            Error::Shutdown,
        ];
        let want = [
            -libc::EBUSY,
            -libc::ENOMEM,
            -libc::EIO,
            -libc::EBUSY,
            -libc::EPROTONOSUPPORT,
            -libc::EPROTO,
            -libc::EOPNOTSUPP,
            -libc::ENODEV,
        ];
        for (e, w) in errs.iter().zip(want) {
            assert_eq!(e.errno(), w, "{e}");
        }
    }

    #[test]
    fn command_error_names_the_command_and_keeps_the_errno_as_source() {
        let e = Error::command("PING", -libc::EBUSY);
        assert_eq!(e.to_string(), "PING failed");
        let src = std::error::Error::source(&e).expect("has a source");
        assert_eq!(
            src.to_string(),
            io::Error::from_raw_os_error(libc::EBUSY).to_string()
        );
    }
}
