//! The only module that talks to the kernel with `unsafe`: the read-only
//! descriptor mapping and SQE submission.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd};
use std::ptr::NonNull;

use io_uring::{IoUring, cqueue, squeue};
use mm_upcall_proto::raw::{self, Desc};
use zerocopy::FromBytes;

use crate::Error;

/// A new shared read-only mapping of `len` bytes of the device at `offset`.
fn map_read_only(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<NonNull<u8>> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a new mapping at an address the kernel chooses, aliasing
    // nothing; the kernel validates offset, length and protection.  The
    // result is checked for MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))
}

/// A queue's descriptor array, mapped read-only from the device.
#[derive(Debug)]
pub struct DescMap {
    ptr: NonNull<u8>,
    len: usize,
    depth: u16,
}

// SAFETY: the mapping is plain shared memory; reads through `&self` are
// volatile copies and nothing hands out references into it.
unsafe impl Send for DescMap {}

const DESC_SIZE: usize = size_of::<Desc>();

impl DescMap {
    /// Map queue `q_id`'s `depth` descriptors.
    ///
    /// # Errors
    ///
    /// [`Error::Mmap`] with the kernel's errno.
    pub fn map(fd: BorrowedFd<'_>, q_id: u16, depth: u16) -> Result<Self, Error> {
        let page = 4096;
        let len = (usize::from(depth) * DESC_SIZE).div_ceil(page) * page;
        let ptr = map_read_only(fd, len, raw::desc_offset(q_id))
            .map_err(|source| Error::Mmap { q_id, source })?;
        Ok(Self { ptr, len, depth })
    }

    /// Copy out the descriptor of `slot`.
    ///
    /// # Panics
    ///
    /// If `slot` is not below the queue depth.
    pub fn read(&self, slot: u16) -> Desc {
        assert!(slot < self.depth, "slot {slot} out of range");
        let mut bytes = [0u8; DESC_SIZE];
        let base = usize::from(slot) * DESC_SIZE;
        for (i, b) in bytes.iter_mut().enumerate() {
            // SAFETY: base + i < depth * DESC_SIZE <= len, inside the live
            // mapping; volatile because the kernel writes it.
            *b = unsafe { self.ptr.as_ptr().add(base + i).read_volatile() };
        }
        Desc::read_from_bytes(&bytes).expect("DESC_SIZE bytes make a Desc")
    }
}

impl Drop for DescMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in map().
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Push an SQE.
///
/// # Safety
///
/// Every buffer the entry points to (a control command's `reply_addr`) must
/// stay valid and unmoved until its completion is reaped.
pub unsafe fn push(
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
    entry: &squeue::Entry128,
) -> Result<(), Error> {
    let mut sq = ring.submission();
    if sq.is_full() {
        drop(sq);
        ring.submit().map_err(Error::Enter)?;
        sq = ring.submission();
    }
    // SAFETY: the caller guarantees the buffers outlive the operation.
    unsafe { sq.push(entry) }.map_err(|_| Error::SqFull)
}

/// Push an SQE whose command carries no user address (the hot-path
/// commands): the kernel reads only the SQE itself.
pub fn push_no_buffers(
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
    entry: &squeue::Entry128,
) -> Result<(), Error> {
    // SAFETY: the entry references no memory of this process.
    unsafe { push(ring, entry) }
}

/// A managed node's memory, mapped read-only from the device (the server's
/// "DAX" view, `MM_UPCALL_F_NODE_MMAP`): the node window, which the kernel
/// fills page by page and shows only the node's anonymous pages through;
/// read it with [`NodeMap::read_page`].
#[derive(Debug)]
pub struct NodeMap {
    ptr: NonNull<u8>,
    len: usize,
    start_pfn: u64,
}

// SAFETY: reads are copies the kernel makes into private buffers, and no
// reference into the mapping is handed out.
unsafe impl Send for NodeMap {}

/// Bytes in a base page.
pub const PAGE_SIZE: usize = 4096;

impl NodeMap {
    /// Map `info.spanned_pages` pages of the node at `info.mmap_offset`.
    ///
    /// # Errors
    ///
    /// [`Error::NodeMmap`] with the kernel's errno (`EOPNOTSUPP` without
    /// `MM_UPCALL_F_NODE_MMAP`, `ENOENT` for a node that is not attached).
    pub fn map(fd: BorrowedFd<'_>, info: &raw::NodeInfo) -> Result<Self, Error> {
        let fail = |source| Error::NodeMmap {
            nid: info.nid,
            source,
        };
        let len = usize::try_from(info.spanned_pages)
            .ok()
            .and_then(|n| n.checked_mul(PAGE_SIZE))
            .filter(|&n| n > 0)
            .ok_or_else(|| fail(io::Error::from_raw_os_error(libc::EINVAL)))?;
        let ptr = map_read_only(fd, len, info.mmap_offset).map_err(fail)?;
        Ok(Self {
            ptr,
            len,
            start_pfn: info.start_pfn,
        })
    }

    /// Copy the page at `pfn` into `out`; `false` if `pfn` is outside the
    /// node or the window does not show it.
    ///
    /// The window is filled on demand and shows a frame only while it holds
    /// an anonymous folio on the node (docs/PROTOCOL.md); touching any
    /// other frame would raise SIGBUS.  So the copy is made by the kernel
    /// (`process_vm_writev(2)` from the window to `out`, in this process),
    /// where such a frame is an `EFAULT` instead.  The kernel may free and
    /// reuse the page while it is copied: the copy is then a mix of old
    /// and new contents, which only misjudges a size the next PLACED of
    /// that pfn measures again.
    pub fn read_page(&self, pfn: u64, out: &mut [u8; PAGE_SIZE]) -> bool {
        let Some(off) = pfn
            .checked_sub(self.start_pfn)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| i.checked_mul(PAGE_SIZE))
            .filter(|&o| o.checked_add(PAGE_SIZE).is_some_and(|end| end <= self.len))
        else {
            return false;
        };
        let local = libc::iovec {
            iov_base: self.ptr.as_ptr().wrapping_add(off).cast(),
            iov_len: PAGE_SIZE,
        };
        let remote = libc::iovec {
            iov_base: out.as_mut_ptr().cast(),
            iov_len: PAGE_SIZE,
        };
        // SAFETY: `local` lies inside the live mapping (off + PAGE_SIZE <=
        // len) and is only read, by the kernel, which turns a frame the
        // window does not show into a short copy; `remote` is `out`, which
        // we borrow mutably, in this very process.
        let copied = unsafe {
            libc::process_vm_writev(std::process::id() as libc::pid_t, &local, 1, &remote, 1, 0)
        };
        copied == PAGE_SIZE as isize
    }
}

impl Drop for NodeMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in map().
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Whether the device reports hang-up (`POLLHUP`): the kernel tore the
/// server down and the event queue reads end of file.
pub fn poll_hung_up(dev: BorrowedFd<'_>) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(&dev, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
        && fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR)
}

// move_pages() passes addresses as u64: they must be pointer-sized.
const _: () = assert!(size_of::<u64>() == size_of::<*const u8>());

/// `MPOL_MF_MOVE`: move only pages mapped by this one process.
const MPOL_MF_MOVE: libc::c_int = 1 << 1;

/// `move_pages(2)` on process `pid` (0: the caller): with `node`, move
/// each page of `addrs` there (the server may name a node it attached,
/// which nobody else may); without, only ask where each page is.  Each
/// `status` entry is the page's node afterwards, or a negative errno
/// (`-ENOENT` not present, `-EFAULT` not mapped, `-EBUSY`/`-EACCES`/`-EPERM`
/// not movable there).  Only pages mapped by that process alone move
/// (`MPOL_MF_MOVE`).
///
/// Returns the number of pages that could not be moved (the syscall's
/// result).
///
/// # Errors
///
/// The call as a whole failed: `ESRCH` (no such process), `EPERM` (not
/// allowed to move its pages), `EACCES` (the node may not be named),
/// `ENOMEM`, `EINVAL`.
///
/// # Panics
///
/// `status` is not as long as `addrs`.
pub fn move_pages(
    pid: u32,
    addrs: &[u64],
    node: Option<i32>,
    status: &mut [i32],
) -> std::io::Result<usize> {
    assert_eq!(addrs.len(), status.len());
    let nodes: Option<Vec<libc::c_int>> = node.map(|n| vec![n; addrs.len()]);
    status.fill(i32::MIN);
    // SAFETY: `addrs` (as an array of pointers: u64 and pointers have the
    // same size here), `nodes` and `status` are arrays of `addrs.len()`
    // elements that outlive the call; the kernel only reads the first two
    // and writes the third.  The addresses are in the target process and
    // are never dereferenced here.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            libc::pid_t::try_from(pid).unwrap_or(libc::pid_t::MAX),
            addrs.len() as libc::c_ulong,
            addrs.as_ptr(),
            nodes.as_ref().map_or(std::ptr::null(), |n| n.as_ptr()),
            status.as_mut_ptr(),
            if node.is_some() { MPOL_MF_MOVE } else { 0 },
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// `SO_PEERPIDFD` (asm-generic, Linux 6.5).
const SO_PEERPIDFD: libc::c_int = 77;

/// The credentials of a Unix socket's peer when it connected
/// (`SO_PEERCRED`): pid (0 when the peer is not visible in this PID
/// namespace), uid, gid.
///
/// # Errors
///
/// `getsockopt(2)`'s.
pub fn peer_cred(sock: BorrowedFd<'_>) -> std::io::Result<(i32, u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a writable ucred and `len` its size; the kernel
    // writes at most `len` bytes and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((cred.pid, cred.uid, cred.gid))
}

/// A pidfd of the process that connected a Unix socket's peer end
/// (`SO_PEERPIDFD`): unlike a pid from `SO_PEERCRED`, it cannot name a
/// later process that reused the pid.
///
/// # Errors
///
/// `ENOPROTOOPT` before Linux 6.5; `getsockopt(2)`'s.
pub fn peer_pidfd(sock: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is a writable int and `len` its size.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: the kernel just installed `fd` for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
