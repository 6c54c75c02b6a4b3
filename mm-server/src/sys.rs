//! The few system calls the server makes that std does not wrap, through
//! rustix and signal-hook (no unsafe code here): stop signals delivered
//! through a socket pair the event loop watches, `mlockall`, peer
//! credentials of the admin socket and the systemd readiness
//! notification.

use std::io::{self, Read as _};
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixStream};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};

/// What the stop signals leave for the event loop.
#[derive(Debug)]
pub struct StopSignals {
    /// The read end of the socket each stop signal writes a byte to.
    pub socket: UnixStream,
    /// Set by SIGUSR2: stop, but leave the nodes managed (fenced, with
    /// their pages) for the next server, whatever `detach_on_stop` says;
    /// what a restart wants (the unit's `RestartKillSignal`).
    pub keep_nodes: Arc<AtomicBool>,
}

/// Route SIGINT, SIGTERM and SIGUSR2 to a socket: each signal writes one
/// byte to the write end (async-signal-safe); the read end is what the
/// event loop watches and [`drain_signals`] reads; SIGUSR2 also sets
/// [`StopSignals::keep_nodes`] (before its byte).  SIGHUP is ignored
/// (the server has no configuration to reload at run time, and a closed
/// terminal must not stop a memory manager).
///
/// signal-hook rather than `ctrlc`: `ctrlc`'s `termination` feature also
/// stops on SIGHUP, and it runs a closure on a thread of its own where a
/// pipe write is all that is needed.
///
/// # Errors
///
/// Creating the socket pair or installing a handler.
pub fn stop_signals() -> io::Result<StopSignals> {
    let (read, write) = UnixStream::pair()?;
    read.set_nonblocking(true)?;
    write.set_nonblocking(true)?;
    let keep_nodes = Arc::new(AtomicBool::new(false));
    // Handlers of one signal run in the order registered: the flag first.
    signal_hook::flag::register(SIGUSR2, Arc::clone(&keep_nodes))?;
    for sig in [SIGINT, SIGTERM, SIGUSR2] {
        signal_hook::low_level::pipe::register(sig, write.try_clone()?)?;
    }
    // A handler that only sets a flag nobody reads: SIGHUP's default
    // action (terminate) no longer applies.
    signal_hook::flag::register(SIGHUP, Arc::new(AtomicBool::new(false)))?;
    Ok(StopSignals {
        socket: read,
        keep_nodes,
    })
}

/// Read every pending byte of the signal socket; returns how many signals
/// arrived.
pub fn drain_signals(mut s: &UnixStream) -> u64 {
    let mut buf = [0u8; 64];
    let mut n = 0u64;
    while let Ok(k @ 1..) = s.read(&mut buf) {
        n += k as u64;
    }
    n
}

/// Lock every current and future page of the process in memory, so the
/// memory manager is never itself paged out or demoted.
///
/// # Errors
///
/// `mlockall(2)`'s (`EPERM` without `CAP_IPC_LOCK`, `ENOMEM` over
/// `RLIMIT_MEMLOCK`).
pub fn mlockall() -> io::Result<()> {
    use rustix::mm::MlockAllFlags;
    rustix::mm::mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE)?;
    Ok(())
}

/// The uid of the process at the other end of a Unix stream.
///
/// # Errors
///
/// `getsockopt(SO_PEERCRED)`'s.
pub fn peer_uid(s: &UnixStream) -> io::Result<u32> {
    // Not rustix's socket_peercred: its Pid cannot hold the 0 a peer in
    // another PID namespace gets.
    use std::os::fd::AsFd as _;
    Ok(mm_upcall_kernel::peer_cred(s.as_fd())?.1)
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
