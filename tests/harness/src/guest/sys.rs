//! Thin wrappers over the system calls the guest scenarios need.
#![allow(unsafe_code)]

use std::io;
use std::ptr::NonNull;

use anyhow::{Context, Result, bail};

pub const PAGE_SIZE: usize = 4096;

/// Read a sysfs/procfs file, trimmed.
pub fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .with_context(|| format!("cannot read {path}"))
}

/// Write a sysfs/procfs/cgroup file.
pub fn write(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("cannot write `{value}` to {path}"))
}

/// An anonymous private mapping, unmapped on drop.
pub struct Anon {
    ptr: NonNull<u8>,
    len: usize,
}

impl Anon {
    pub fn new(len: usize) -> Result<Self> {
        // SAFETY: a fresh anonymous private mapping; no existing memory is
        // affected.  The result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()).context("mmap");
        }
        let ptr = NonNull::new(p.cast::<u8>()).context("mmap returned null")?;
        Ok(Self { ptr, len })
    }

    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, and
        // lives as long as `self`; `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as in as_mut_slice; shared borrow of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The node of every page (`move_pages(2)` with `nodes == NULL`);
    /// negative values are errnos (e.g. `-ENOENT` for a page not present).
    pub fn page_nodes(&self) -> Result<Vec<i32>> {
        let pages: Vec<*mut libc::c_void> = (0..self.len / PAGE_SIZE)
            .map(|i| (self.addr() + i * PAGE_SIZE) as *mut libc::c_void)
            .collect();
        let mut status = vec![i32::MIN; pages.len()];
        // SAFETY: pages and status are valid arrays of pages.len()
        // elements; with nodes == NULL move_pages only queries and writes
        // status.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_pages,
                0,
                pages.len() as libc::c_ulong,
                pages.as_ptr(),
                std::ptr::null::<i32>(),
                status.as_mut_ptr(),
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error()).context("move_pages(query)");
        }
        Ok(status)
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in new().
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Count pages per node: (node0, node1, other/absent).
pub fn histogram(nodes: &[i32]) -> (usize, usize, usize) {
    let mut h = (0, 0, 0);
    for &n in nodes {
        match n {
            0 => h.0 += 1,
            1 => h.1 += 1,
            _ => h.2 += 1,
        }
    }
    h
}

/// Fill `buf` with a pattern derived from the page index and `seed`.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    for (i, page) in buf.chunks_mut(PAGE_SIZE).enumerate() {
        let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
        for (j, w) in page.chunks_mut(8).enumerate() {
            let x = v.wrapping_add(j as u64).to_ne_bytes();
            w.copy_from_slice(&x[..w.len()]);
        }
    }
}

/// Index of the first page that does not hold the pattern.
pub fn check_pattern(buf: &[u8], seed: u64) -> Option<usize> {
    let mut expect = vec![0u8; PAGE_SIZE];
    buf.chunks(PAGE_SIZE).enumerate().find_map(|(i, page)| {
        let e = &mut expect[..page.len()];
        let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
        for (j, w) in e.chunks_mut(8).enumerate() {
            let x = v.wrapping_add(j as u64).to_ne_bytes();
            w.copy_from_slice(&x[..w.len()]);
        }
        (page != e).then_some(i)
    })
}

/// Fail unless `cond`.
pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond { Ok(()) } else { bail!("{}", msg()) }
}
