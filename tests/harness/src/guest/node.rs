//! Scenario `node-mmap`: ATTACH_NODE / SET_CREDIT / DETACH_NODE validation,
//! and the server's read-only mapping of a managed node's memory (K8): the
//! contents of pages moved to node 1 read back through the mapping.
//!
//! This process is the server that attached node 1, which is why its
//! `move_pages` may place pages there (see `isolation` for everyone else).
#![allow(unsafe_code)]

use std::os::fd::AsRawFd as _;

use anyhow::{Context, Result, bail};
use mm_upcall_kernel::proto::control::{Control, decode_node_info};
use mm_upcall_kernel::proto::raw::NodeInfo;
use mm_upcall_kernel::{Config, Error, Transport};

use crate::sys::{self, Anon, PAGE_SIZE, ensure};

/// `<linux/mempolicy.h>`: move pages mapped only by this process.
const MPOL_MF_MOVE: libc::c_int = 1 << 1;

pub fn attach(t: &mut Transport, nid: u32) -> Result<Result<NodeInfo, i32>> {
    let out = t.control_sync(Control::AttachNode {
        nid,
        credit_pages: 128,
        reply_addr: 0,
    })?;
    Ok(match out.result {
        Ok(_) => Ok(decode_node_info(&out.reply)?),
        Err(e) => Err(e.errno()),
    })
}

pub fn simple(t: &mut Transport, c: Control) -> Result<i32> {
    let out = t.control_sync(c)?;
    Ok(out.result.unwrap_or_else(|e: Error| e.errno()))
}

fn expect(what: &str, got: i32, want: i32) -> Result<()> {
    sys::expect_eq("node-mmap", what, got, want)
}

/// Move every page of `mem` to `node`.
fn move_to(mem: &Anon, node: i32) -> Result<()> {
    let n = mem.as_slice().len() / PAGE_SIZE;
    let pages: Vec<*mut libc::c_void> = (0..n)
        .map(|i| (mem.addr() + i * PAGE_SIZE) as *mut _)
        .collect();
    let nodes = vec![node; n];
    let mut status = vec![0i32; n];
    // SAFETY: three arrays of n elements; MPOL_MF_MOVE of our own pages.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            n as libc::c_ulong,
            pages.as_ptr(),
            nodes.as_ptr(),
            status.as_mut_ptr(),
            MPOL_MF_MOVE,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("move_pages");
    }
    ensure(status.iter().all(|&s| s == node), || {
        format!("pages not moved: {status:?}")
    })
}

/// Node `nid`'s pfn span from `/proc/zoneinfo`: (start_pfn, spanned
/// pages, present pages) over its populated zones.
pub fn zoneinfo_span(nid: u32) -> Result<(u64, u64, u64)> {
    let text = sys::read("/proc/zoneinfo")?;
    let head = format!("Node {nid},");
    let (mut mine, mut spanned, mut present) = (false, 0u64, 0u64);
    let (mut start, mut end, mut total_present) = (u64::MAX, 0u64, 0u64);
    let num = |l: &str| -> Result<u64> {
        l.split_whitespace()
            .last()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("/proc/zoneinfo: {l:?}"))
    };
    for l in text.lines() {
        let t = l.trim_start();
        if l.starts_with("Node ") {
            mine = l.starts_with(&head);
            (spanned, present) = (0, 0);
            continue;
        }
        if !mine {
            continue;
        }
        if t.starts_with("spanned") {
            spanned = num(t)?;
        } else if t.starts_with("present") {
            present = num(t)?;
        } else if t.starts_with("start_pfn:") && spanned > 0 {
            let s = num(t)?;
            start = start.min(s);
            end = end.max(s + spanned);
            total_present += present;
        }
    }
    ensure(end > 0, || {
        format!("/proc/zoneinfo has no populated zone of node {nid}")
    })?;
    Ok((start, end - start, total_present))
}

pub fn run() -> Result<()> {
    let mut t = Transport::open(&Config::default())?;
    expect(
        "ATTACH_NODE of node 0 (has CPUs)",
        attach(&mut t, 0)?.err().unwrap_or(0),
        -libc::EINVAL,
    )?;
    expect(
        "ATTACH_NODE of node 7 (does not exist)",
        attach(&mut t, 7)?.err().unwrap_or(0),
        -libc::ENXIO,
    )?;
    let info = attach(&mut t, 1)?.map_err(|e| anyhow::anyhow!("ATTACH_NODE 1: errno {e}"))?;
    println!(
        "node-mmap: node 1: start_pfn {:#x}, {} pages spanned, {} present, mmap offset {:#x}",
        info.start_pfn, info.spanned_pages, info.present_pages, info.mmap_offset
    );
    let meminfo = sys::read("/sys/devices/system/node/node1/meminfo")?;
    let total_kb: u64 = meminfo
        .lines()
        .find(|l| l.contains("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .context("node1 MemTotal")?;
    ensure(
        info.present_pages * 4 >= total_kb && info.spanned_pages >= info.present_pages,
        || format!("node info {info:?} does not cover MemTotal {total_kb} kB"),
    )?;
    let (start, spanned, present) = zoneinfo_span(1)?;
    println!(
        "node-mmap: /proc/zoneinfo: node 1 spans {spanned} pages from {start:#x}, {present} present"
    );
    ensure(
        (info.start_pfn, info.spanned_pages, info.present_pages) == (start, spanned, present),
        || {
            format!(
                "ATTACH_NODE says node 1 spans {} pages from {:#x} ({} present); /proc/zoneinfo \
                 says {spanned} from {start:#x} ({present})",
                info.spanned_pages, info.start_pfn, info.present_pages
            )
        },
    )?;
    expect(
        "ATTACH_NODE of node 1 again",
        attach(&mut t, 1)?.err().unwrap_or(0),
        -libc::EEXIST,
    )?;
    expect(
        "SET_CREDIT on node 1",
        simple(&mut t, Control::SetCredit { nid: 1, pages: 64 })?,
        0,
    )?;
    expect(
        "SET_CREDIT on node 0 (not attached)",
        simple(&mut t, Control::SetCredit { nid: 0, pages: 1 })?,
        -libc::ENOENT,
    )?;

    // Pages with known contents, moved to node 1, read back through the
    // server's mapping of node 1.
    let len = 4 << 20;
    let mut mem = Anon::new(len)?;
    sys::fill_pattern(mem.as_mut_slice(), 0xc0ffee);
    move_to(&mem, 1)?;
    let pfns = sys::pfns(&mem)?;
    let map_len = info.spanned_pages as usize * PAGE_SIZE;
    let fd = t.device().as_raw_fd();
    // SAFETY: a writable shared mapping request, which the kernel must refuse.
    let w = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            info.mmap_offset as libc::off_t,
        )
    };
    if w != libc::MAP_FAILED {
        bail!("a writable mapping of node memory was allowed");
    }
    expect(
        "writable mmap of node 1",
        -std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        -libc::EPERM,
    )?;
    // SAFETY: a read-only shared mapping of the node; checked for failure,
    // unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            info.mmap_offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error()).context("mmap of node 1");
    }
    // SAFETY: the mapping is map_len readable bytes until munmap below.
    let node = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), map_len) };
    // What was written, regenerated: the user mapping shows the same
    // physical page, so it could not tell a corrupted migration.
    let mut written = vec![0u8; len];
    sys::fill_pattern(&mut written, 0xc0ffee);
    let mut checked = 0;
    for (i, &pfn) in pfns.iter().enumerate() {
        ensure(
            pfn >= info.start_pfn && pfn < info.start_pfn + info.spanned_pages,
            || format!("page {i} at pfn {pfn:#x} is not on node 1"),
        )?;
        let off = (pfn - info.start_pfn) as usize * PAGE_SIZE;
        let want = &written[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
        ensure(&node[off..off + PAGE_SIZE] == want, || {
            format!("page {i} (pfn {pfn:#x}) differs through the mapping")
        })?;
        checked += 1;
    }
    // SAFETY: unmapping what was mapped above; `node` is not used after.
    unsafe { libc::munmap(p, map_len) };
    println!(
        "node-mmap: {checked} pages on node 1 read back intact through the server's read-only mapping"
    );

    expect(
        "DETACH_NODE 1",
        simple(&mut t, Control::DetachNode { nid: 1 })?,
        0,
    )?;
    expect(
        "DETACH_NODE 1 again",
        simple(&mut t, Control::DetachNode { nid: 1 })?,
        -libc::ENOENT,
    )?;
    // SAFETY: as above; the node is no longer managed, so this must fail.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE_SIZE,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            info.mmap_offset as libc::off_t,
        )
    };
    ensure(p == libc::MAP_FAILED, || {
        "a detached node could still be mapped".into()
    })?;
    Ok(())
}
