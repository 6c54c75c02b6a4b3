//! The few system calls the daemon makes that std does not wrap: an
//! eventfd for signals, `mlockall`, peer credentials of the admin socket
//! and the systemd readiness notification.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixStream};

/// A non-blocking eventfd: the signal handler writes it, the event loop
/// watches it through io_uring.
///
/// # Errors
///
/// `eventfd(2)`'s.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Add one to an eventfd (async-signal-safe: a single `write`).
pub fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64.  A full counter (EAGAIN) is
    // fine: the fd is readable anyway.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
}

/// Reset an eventfd's counter to zero (so a new watch waits for a new
/// signal); returns the count it had.
pub fn eventfd_clear(fd: BorrowedFd<'_>) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64; EAGAIN (already zero) leaves
    // it 0.
    let _ = unsafe { libc::read(fd.as_raw_fd(), (&raw mut v).cast(), 8) };
    v
}

/// Lock every current and future page of the process in memory, so the
/// memory manager is never itself paged out or demoted.
///
/// # Errors
///
/// `mlockall(2)`'s (`EPERM` without `CAP_IPC_LOCK`, `ENOMEM` over
/// `RLIMIT_MEMLOCK`).
pub fn mlockall() -> io::Result<()> {
    // SAFETY: no pointers.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The uid of the process at the other end of a Unix stream.
///
/// # Errors
///
/// `getsockopt(SO_PEERCRED)`'s.
pub fn peer_uid(s: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are live and sized for SO_PEERCRED.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Tell systemd we are ready (`READY=1` to `$NOTIFY_SOCKET`), if it asked.
/// Returns whether a notification was sent.
///
/// # Errors
///
/// The socket's.
pub fn notify_ready() -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    let addr = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        SocketAddr::from_abstract_name(name)?
    } else {
        SocketAddr::from_pathname(&path)?
    };
    sock.send_to_addr(b"READY=1\nSTATUS=serving\n", &addr)?;
    Ok(true)
}
