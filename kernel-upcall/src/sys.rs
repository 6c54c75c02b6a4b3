//! The only module that talks to the kernel with `unsafe`: the read-only
//! descriptor mapping and SQE submission.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use io_uring::{IoUring, cqueue, squeue};
use mm_upcall_proto::raw::{self, Desc};
use zerocopy::FromBytes;

use crate::Error;

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
        let offset = raw::desc_offset(q_id);
        // SAFETY: a new shared read-only mapping of the device; the kernel
        // validates offset and length.  The result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Mmap {
                q_id,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast()).ok_or(Error::Mmap {
            q_id,
            source: io::Error::from_raw_os_error(libc::EFAULT),
        })?;
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
