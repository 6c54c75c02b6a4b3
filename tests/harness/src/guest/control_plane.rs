//! Scenario `control-plane`: `/dev/mm_upcall` is a capability of the
//! server's process, not of whoever holds a copy of its descriptor
//! (finding 3 of the transport review, issue 14).
//!
//! - *passed descriptor*: the server sends its descriptor over
//!   `SCM_RIGHTS` to a child that dropped to uid 65534, and to a root
//!   child; every control command, FETCH, `read` and `mmap` they try is
//!   refused with its precise errno (`EPERM` without `CAP_SYS_ADMIN`,
//!   `EBADFD` from another process), and the server's node is still
//!   attached with its credit afterwards.
//! - *launcher*: a process opens the device and execs the server, which
//!   sends HELLO on the inherited descriptor; a second `open` is then
//!   refused with `EBUSY` (the server is the exec'd process, not the dead
//!   mm of the opener), and the launched server's commands still work.
//! - *denial after a re-attach* (finding 9): a node whose server said DENY
//!   is detached and attached again with no credit; reclaim must ask the
//!   server for credit again.
//! - *window* (findings 1 and 6): the node window shows the server's
//!   anonymous pages on the node and nothing else: a page-cache page put
//!   on node 1 before the attach, a slab page and a free page of the node
//!   read as not shown; after DETACH, and after the server is ejected
//!   (killed while its process lives on with the mapping), the pages it
//!   showed before are not shown either.  Mapping the whole node costs no
//!   page tables until pages are read.
//! - *window and memory offline* (finding 1): the server reads its pages
//!   on node 1 through the window, then a memory block of node 1 that
//!   holds some of them goes offline (the kernel migrates them to node 0):
//!   none of that block's frames may be readable through the old mapping.
//! - *parked FETCHes of a killed server* (finding 7): a server with two
//!   queues, each on its own ring, is ejected while its process and rings
//!   live on; the FETCHes parked on both rings must complete (`ENODEV`)
//!   instead of waiting forever.
//! - *ATTACH racing mmap* (finding 2): for 10 s one thread maps and unmaps
//!   the window while another attaches node 1 with its reply going to a
//!   page never touched (the copy faults) and detaches it.  Nothing may
//!   hang; on the debug kernel lockdep must report nothing (the console is
//!   checked for splats after every scenario).
//! - *restarts with a fragmented node 0* (finding 4): node 0 is
//!   fragmented until it has no free block of order 6 or more (large
//!   folios are faulted in, so they take the big blocks, then all but
//!   every eighth page of each is freed and that one is mlocked, which
//!   compaction may not move); then 200 servers in a row open the device,
//!   send HELLO, attach node 1 and close.  Every one must succeed.
//! - *PID namespace* (finding 5): the test server runs as PID 1 of a new
//!   PID namespace; the write faults and PLACED events of this process,
//!   which it cannot see, must carry tgid 0, and its own placements tgid
//!   1, never the initial namespace's numbers.
//! - *descriptor mapping* (finding 14): the descriptor array cannot be
//!   mapped executable, and `MADV_DOFORK` cannot make a child inherit it.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read as _};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mm_upcall_kernel::proto::control::Control;
use mm_upcall_kernel::proto::raw::{self, CTRL_CMD_SIZE, ctrl_op, io_op};
use mm_upcall_kernel::{Completion, Config, Transport};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use zerocopy::IntoBytes as _;

use crate::managed::Server;
use crate::sys::{self, Anon, Cgroup, ensure};

const NODE: u32 = 1;
/// The credit the server sets; a refused SET_CREDIT must not change it.
const CREDIT: u64 = 4096;
/// Where the launched server finds its inherited descriptor.
const FD_ENV: &str = "MM_GUEST_DEVICE_FD";

/// Every part runs, and the scenario fails with all their failures.
pub fn run() -> Result<()> {
    type Part = (&'static str, fn() -> Result<()>);
    let parts: [Part; 10] = [
        ("passed descriptor", passed_descriptor),
        ("launcher", launcher),
        ("denial after a re-attach", denial_after_reattach),
        ("window", window),
        ("window and memory offline", window_and_memory_offline),
        (
            "parked FETCHes of a killed server",
            parked_fetches_of_a_killed_server,
        ),
        ("ATTACH racing mmap", attach_racing_mmap),
        (
            "restarts with a fragmented node 0",
            restarts_with_fragmented_node_0,
        ),
        ("PID namespace", pid_namespace),
        ("descriptor mapping", descriptor_mapping),
    ];
    let failed: Vec<String> = parts
        .into_iter()
        .filter_map(|(name, part)| part().err().map(|e| format!("{name}: {e:#}")))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("{}", failed.join("; "))
    }
}

fn denial_after_reattach() -> Result<()> {
    const LEN: usize = 16 << 20;
    // Credit 0, and the test server answers DEMOTE_CREDIT with DENY.
    let mut srv = Server::start(0)?;
    let cg = Cgroup::enter("mm-guest-control-plane")?;
    let mut mem = Anon::new(LEN)?;
    sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
    sys::fill_pattern(mem.as_mut_slice(), 0x5d);
    cg.leave()?;
    let asks = |srv: &mut Server| -> Result<u64> {
        for _ in 0..4 {
            cg.reclaim(2 * LEN);
            // The request is asynchronous: let the server answer it.
            std::thread::sleep(Duration::from_millis(100));
        }
        srv.stat("creq")
    };
    let first = asks(&mut srv)?;
    ensure(first >= 1, || {
        "reclaim with no credit asked the server for none".into()
    })?;
    for (cmd, what) in [("detach", "DETACH_NODE"), ("attach 0", "ATTACH_NODE")] {
        let r = srv.result(cmd)?;
        ensure(r == 0, || format!("{what} 1: {}", errno_name(r)))?;
    }
    let again = asks(&mut srv)? - first;
    println!(
        "control-plane: DEMOTE_CREDIT requests: {first} before DETACH and ATTACH (denied), {again} \
         after"
    );
    ensure(again >= 1, || {
        "after DENY, DETACH_NODE and ATTACH_NODE with no credit, reclaim never asked for credit \
         again: the detached node's DENY stuck"
            .into()
    })?;
    drop(cg);
    if let Some(i) = sys::check_pattern(mem.as_slice(), 0x5d) {
        bail!("page {i} lost its contents");
    }
    drop(mem);
    srv.quit()
}

/// `/proc/kpageflags` bits of kernel-owned frames: slab, free (buddy),
/// page table.
const KPF_SLAB: u64 = 1 << 7;
const KPF_BUDDY: u64 = 1 << 10;

/// The first frame in `start..start + pages` whose kpageflags have a bit
/// of `mask`.
fn frame_with(start: u64, pages: u64, mask: u64) -> Result<Option<u64>> {
    use std::io::{Seek as _, SeekFrom};
    let mut f = File::open("/proc/kpageflags").context("open /proc/kpageflags")?;
    f.seek(SeekFrom::Start(start * 8))?;
    let mut buf = vec![0u8; pages as usize * 8];
    f.read_exact(&mut buf).context("read /proc/kpageflags")?;
    Ok(buf
        .chunks(8)
        .position(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")) & mask != 0)
        .map(|i| start + i as u64))
}

/// The pfn behind `addr` in this process (`/proc/self/pagemap`).
fn pfn_at(addr: usize) -> Result<u64> {
    use std::io::{Seek as _, SeekFrom};
    let mut f = File::open("/proc/self/pagemap").context("open pagemap")?;
    f.seek(SeekFrom::Start((addr / 4096 * 8) as u64))?;
    let mut b = [0u8; 8];
    f.read_exact(&mut b)?;
    let v = u64::from_ne_bytes(b);
    ensure(v & (1 << 63) != 0, || format!("{addr:#x} is not present"))?;
    Ok(v & ((1 << 55) - 1))
}

/// `VmPTE` of this process, in kB.
fn vm_pte_kb() -> Result<u64> {
    sys::read("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("VmPTE:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmPTE in /proc/self/status")
}

fn window() -> Result<()> {
    // 16 MiB: enough pages that the page-table cost per page read shows.
    const PAGES: usize = 4096;
    const PAGE: usize = 4096;
    // A page-cache (shmem) page on node 1, made while the node is
    // ordinary memory.
    // SAFETY: plain system calls; the mapping is checked and unmapped
    // at the end of this function.
    let fd = unsafe { libc::memfd_create(c"mm-guest-window".as_ptr(), 0) };
    ensure(fd >= 0, || {
        format!("memfd_create: {}", std::io::Error::last_os_error())
    })?;
    // SAFETY: fd is ours from here on.
    let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
    ensure(
        // SAFETY: plain system call on our descriptor.
        unsafe { libc::ftruncate(memfd.as_raw_fd(), PAGE as libc::off_t) } == 0,
        || "ftruncate of the memfd".into(),
    )?;
    // SAFETY: a new shared mapping of the memfd, unmapped below.
    let shm = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            memfd.as_raw_fd(),
            0,
        )
    };
    ensure(shm != libc::MAP_FAILED, || "mmap of the memfd".into())?;
    let r = sys::set_mempolicy(libc::MPOL_BIND, NODE as i32);
    ensure(r == 0, || {
        format!("set_mempolicy(BIND, 1): {}", errno_name(r))
    })?;
    // SAFETY: the first page of the shared mapping made above.
    unsafe { std::ptr::write_bytes(shm.cast::<u8>(), 0xa5, PAGE) };
    sys::set_mempolicy(libc::MPOL_DEFAULT, -1);
    let cache_pfn = pfn_at(shm as usize)?;

    let mut t =
        crate::upcall::open_retry(&Config::default()).context("open the device as the server")?;
    let info = crate::node::attach(&mut t, NODE)?
        .map_err(|e| anyhow::anyhow!("ATTACH_NODE 1: {}", errno_name(e)))?;
    let end = info.start_pfn + info.spanned_pages;
    ensure((info.start_pfn..end).contains(&cache_pfn), || {
        format!("the page-cache page is at pfn {cache_pfn:#x}, not on node 1")
    })?;
    // The server's own anonymous pages, moved to node 1 (it may).
    let mut mem = Anon::new(PAGES * PAGE)?;
    sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
    sys::fill_pattern(mem.as_mut_slice(), 0x77);
    let (r, status) = sys::move_pages(0, mem.addr(), PAGES, NODE as i32);
    ensure(r == 0 && status.iter().all(|&s| s == NODE as i32), || {
        format!(
            "move_pages of the server's pages to node 1: {r}, {:?}",
            &status[..4]
        )
    })?;
    let pfns = sys::pfns(&mem)?;
    let pte0 = vm_pte_kb()?;
    let map = t.map_node(&info).context("map node 1's window")?;
    let pte_mapped = vm_pte_kb()?;
    let mut page = [0u8; PAGE];
    let shown =
        |map: &mm_upcall_kernel::NodeMap, pfn: u64, page: &mut [u8; PAGE]| map.read_page(pfn, page);
    let mut want = vec![0u8; PAGES * PAGE];
    sys::fill_pattern(&mut want, 0x77);
    for (i, &pfn) in pfns.iter().enumerate() {
        ensure(shown(&map, pfn, &mut page), || {
            format!("the server's anonymous page {i} on node 1 (pfn {pfn:#x}) is not shown")
        })?;
        ensure(page[..] == want[i * PAGE..(i + 1) * PAGE], || {
            format!("page {i} (pfn {pfn:#x}) differs through the window")
        })?;
    }
    let pte_read = vm_pte_kb()?;
    let gib = |pages: u64, kb: u64| kb as f64 * (1u64 << 18) as f64 / pages as f64;
    println!(
        "control-plane: window of {} pages: VmPTE {pte0} kB before the mmap, {pte_mapped} kB \
         after it ({:.0} kB per GiB of node), {pte_read} kB after reading {PAGES} pages ({:.0} kB \
         per GiB read)",
        info.spanned_pages,
        gib(info.spanned_pages, pte_mapped.saturating_sub(pte0)),
        gib(PAGES as u64, pte_read.saturating_sub(pte_mapped)),
    );
    let mut failures = Vec::new();
    if pte_mapped > pte0 + 4 {
        failures.push(format!(
            "mapping the window built page tables ({pte0} kB -> {pte_mapped} kB)"
        ));
    }
    let mut not_shown = |what: &str, pfn: Option<u64>, page: &mut [u8; PAGE]| match pfn {
        None => failures.push(format!("no {what} found on node 1")),
        Some(pfn) if shown(&map, pfn, page) => {
            failures.push(format!(
                "{what} (pfn {pfn:#x}) is readable through the window"
            ));
        }
        Some(_) => {}
    };
    not_shown("the page-cache page", Some(cache_pfn), &mut page);
    not_shown(
        "a slab page",
        frame_with(info.start_pfn, info.spanned_pages, KPF_SLAB)?,
        &mut page,
    );
    not_shown(
        "a free page",
        frame_with(info.start_pfn, info.spanned_pages, KPF_BUDDY)?,
        &mut page,
    );
    // DETACH: the node is ordinary memory again.
    let out = t.control_sync(Control::DetachNode { nid: NODE })?;
    out.result.context("DETACH_NODE 1")?;
    if let Some(i) = pfns.iter().position(|&pfn| shown(&map, pfn, &mut page)) {
        failures.push(format!("after DETACH_NODE, page {i} is still shown"));
    }
    drop(map);
    // Attach again, read, then eject the server: its process and mapping
    // live on, and show nothing.
    let info = crate::node::attach(&mut t, NODE)?
        .map_err(|e| anyhow::anyhow!("ATTACH_NODE 1 again: {}", errno_name(e)))?;
    let map = t.map_node(&info).context("map node 1's window again")?;
    ensure(shown(&map, pfns[0], &mut page), || {
        "after a re-attach, the server's page is not shown".into()
    })?;
    sys::write("/sys/kernel/debug/mm_upcall/eject", "1")?;
    if let Some(i) = pfns.iter().position(|&pfn| shown(&map, pfn, &mut page)) {
        failures.push(format!(
            "after the server was ejected, page {i} is still shown"
        ));
    }
    drop(map);
    drop(t);
    // SAFETY: unmapping the memfd mapping made above.
    unsafe { libc::munmap(shm, PAGE) };
    if let Some(i) = sys::check_pattern(mem.as_slice(), 0x77) {
        failures.push(format!("page {i} lost its contents"));
    }
    ensure(failures.is_empty(), || failures.join("; "))?;
    println!(
        "control-plane: the window showed the server's {PAGES} pages, not a page-cache, slab or \
         free page of node 1, and nothing after DETACH or after an eject"
    );
    Ok(())
}

fn parked_fetches_of_a_killed_server() -> Result<()> {
    const DEPTH: u16 = 4;
    let mut t = Transport::open(&Config {
        nr_queues: 2,
        queue_depth: DEPTH,
        ..Config::default()
    })
    .context("open the device as the server")?;
    let mut q1 = t.queue_opener()?.open(1).context("open queue 1")?;
    // Let both rings park their FETCHes (task work runs on the next enter).
    let mut out = Vec::new();
    t.wait_timeout(&mut out, Duration::from_millis(50))?;
    q1.wait_timeout(&mut out, Duration::from_millis(50))?;
    ensure(out.is_empty(), || {
        format!("completions before the kill: {out:?}")
    })?;
    // Root ejects the server: it is killed while its process and both
    // rings live on.
    sys::write("/sys/kernel/debug/mm_upcall/eject", "1")?;
    let t0 = std::time::Instant::now();
    let mut ended = 0;
    while ended < 2 * DEPTH && t0.elapsed() < Duration::from_secs(5) {
        for ring in [&mut t, &mut q1] {
            out.clear();
            ring.wait_timeout(&mut out, Duration::from_millis(100))?;
            for c in out.drain(..) {
                match c {
                    Completion::Teardown { .. } => ended += 1,
                    other => bail!("after the eject: unexpected completion {other:?}"),
                }
            }
        }
    }
    println!(
        "control-plane: after the server was ejected, {ended} of the {} FETCHes parked on its \
         two rings ended in {:.2} s",
        2 * DEPTH,
        t0.elapsed().as_secs_f64()
    );
    ensure(ended == 2 * DEPTH, || {
        format!(
            "the server was killed, and {} of the {} FETCHes parked on its two rings never \
             completed (5 s)",
            2 * DEPTH - ended,
            2 * DEPTH
        )
    })
}

fn attach_racing_mmap() -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const RUN: Duration = Duration::from_secs(10);
    let mut t =
        crate::upcall::open_retry(&Config::default()).context("open the device as the server")?;
    let dev = t.device().try_clone()?;
    let stop = AtomicBool::new(false);
    let (maps, mapped) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut cycles = 0u64;
    let result = std::thread::scope(|s| -> Result<()> {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                maps.fetch_add(1, Ordering::Relaxed);
                if try_mmap(&dev, node_offset(NODE)) == 0 {
                    mapped.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let t0 = std::time::Instant::now();
        let out = (|| -> Result<()> {
            while t0.elapsed() < RUN {
                // A fresh page for each reply: the kernel's copy faults.
                // SAFETY: a new private anonymous mapping, unmapped below.
                let g = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                ensure(g != libc::MAP_FAILED, || "mmap of a reply page".into())?;
                let area = Control::AttachNode {
                    nid: NODE,
                    credit_pages: 0,
                    reply_addr: g as u64,
                }
                .encode();
                // SAFETY: reply_addr is a writable page of ours, large
                // enough for the node info record.
                let got = unsafe { t.raw_control(ctrl_op::ATTACH_NODE, area) };
                let detached = t.control_sync(Control::DetachNode { nid: NODE });
                // SAFETY: unmapping the page mapped above.
                unsafe { libc::munmap(g, 4096) };
                ensure(got.is_ok(), || format!("ATTACH_NODE 1: {got:?}"))?;
                detached?.result.context("DETACH_NODE 1")?;
                cycles += 1;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        out
    });
    result?;
    let (maps, mapped) = (maps.into_inner(), mapped.into_inner());
    println!(
        "control-plane: {cycles} ATTACH/DETACH cycles raced {maps} mmaps of the window ({mapped} \
         made) for {} s",
        RUN.as_secs()
    );
    ensure(cycles > 0 && maps > 0, || "the race did not run".into())
}

fn errno_name(e: i32) -> String {
    if e >= 0 {
        "success".into()
    } else {
        std::io::Error::from_raw_os_error(-e).to_string()
    }
}

fn node_offset(nid: u32) -> u64 {
    raw::NODE_OFFSET_BASE * (u64::from(nid) + 1)
}

fn passed_descriptor() -> Result<()> {
    let mut t =
        crate::upcall::open_retry(&Config::default()).context("open the device as the server")?;
    let out = t.control_sync(Control::AttachNode {
        nid: NODE,
        credit_pages: CREDIT,
        reply_addr: 0,
    })?;
    out.result.context("ATTACH_NODE 1")?;
    for (who, unprivileged) in [("uid 65534", true), ("another root process", false)] {
        let (ours, theirs) = UnixStream::pair().context("socketpair")?;
        // SAFETY: fork in a single-threaded process; the child only makes
        // system calls and small allocations, then _exit()s.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("fork: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            drop(ours);
            let failures = match holder(&theirs, unprivileged) {
                Ok(f) => f,
                Err(e) => vec![format!("{e:#}")],
            };
            for f in &failures {
                println!("control-plane: {who}: {f}");
            }
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(i32::from(!failures.is_empty())) };
        }
        drop(theirs);
        send_fd(&ours, t.device().as_fd()).context("send the descriptor")?;
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        ensure(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            || {
                format!(
                    "a descriptor passed to {who} was not refused everywhere (status {status:#x}, \
                 lines above)"
                )
            },
        )?;
        println!(
            "control-plane: a descriptor passed to {who}: every control command, FETCH, read \
             and mmap refused"
        );
    }
    // The refused DETACH_NODE and SET_CREDIT changed nothing: the node is
    // still this server's, so detaching it works.
    let out = t.control_sync(Control::DetachNode { nid: NODE })?;
    ensure(out.result.is_ok(), || {
        format!(
            "the server's own DETACH_NODE 1 after the children: {:?} (a child's command took \
             effect)",
            out.result
        )
    })?;
    Ok(())
}

/// In a child: receive the server's descriptor, optionally drop to uid
/// 65534, and try everything.  Returns what was not refused as expected.
fn holder(sock: &UnixStream, unprivileged: bool) -> Result<Vec<String>> {
    let dev = File::from(recv_fd(sock).context("receive the descriptor")?);
    if unprivileged {
        // SAFETY: plain system calls changing only this child's credentials
        // (a change of uid from 0 clears the capability sets).
        if unsafe {
            libc::setresgid(65534, 65534, 65534) != 0 || libc::setresuid(65534, 65534, 65534) != 0
        } {
            bail!(
                "could not drop to uid 65534: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let priv_errno = if unprivileged {
        -libc::EPERM
    } else {
        -libc::EBADFD
    };
    let mut failures = Vec::new();
    let mut check = |what: &str, got: i32, want: i32| {
        if got != want {
            failures.push(format!(
                "{what}: got {} ({got}), want {} ({want})",
                errno_name(got),
                errno_name(want)
            ));
        }
    };
    let mut t = Transport::from_device(dev.try_clone()?, &Config::default())?;
    let hello = raw::Hello {
        api_version: raw::API_VERSION,
        nr_queues: 1,
        queue_depth: 8,
        features: raw::Features::ALL.bits(),
        ..raw::Hello::default()
    };
    let mut hello_area = [0u8; CTRL_CMD_SIZE];
    hello_area[..size_of::<raw::Hello>()].copy_from_slice(hello.as_bytes());
    let commands: [(&str, u32, [u8; CTRL_CMD_SIZE]); 7] = [
        ("HELLO", ctrl_op::HELLO, hello_area),
        ("ATTACH_NODE", ctrl_op::ATTACH_NODE, [0; CTRL_CMD_SIZE]),
        (
            "DETACH_NODE 1",
            ctrl_op::DETACH_NODE,
            Control::DetachNode { nid: NODE }.encode(),
        ),
        (
            "SET_CREDIT 1",
            ctrl_op::SET_CREDIT,
            Control::SetCredit {
                nid: NODE,
                pages: 1 << 30,
            }
            .encode(),
        ),
        ("PROMOTE_PFN", ctrl_op::PROMOTE_PFN, [0; CTRL_CMD_SIZE]),
        (
            "RESYNC 1",
            ctrl_op::RESYNC,
            Control::Resync {
                nid: NODE,
                start_pfn: 0,
                nr_pages: 1,
            }
            .encode(),
        ),
        ("PING", ctrl_op::PING, [0; CTRL_CMD_SIZE]),
    ];
    for (what, op, area) in commands {
        // SAFETY: every area has reply_addr 0.
        let got = match unsafe { t.raw_control(op, area) } {
            Ok(v) => v,
            Err(e) => e.errno(),
        };
        check(what, got, priv_errno);
    }
    // FETCH: the hot path checks the process, not the capability.
    let mut area = [0u8; 16];
    area.copy_from_slice(raw::IoCmd::default().as_bytes());
    t.raw_io(io_op::FETCH, area, 0)?;
    let mut out = Vec::new();
    while out.is_empty() {
        t.wait(&mut out)?;
    }
    let got = match out.remove(0) {
        Completion::SlotFailed { error, .. } => error.errno(),
        Completion::Teardown { .. } => -libc::ENODEV,
        other => bail!("FETCH: unexpected completion {other:?}"),
    };
    check("FETCH", got, -libc::EBADFD);
    // read(2) of the events (the descriptor is O_NONBLOCK).
    let mut buf = [0u8; 40 * 16];
    let got = match (&dev).read(&mut buf) {
        Ok(_) => 0,
        Err(e) => -e.raw_os_error().unwrap_or(0),
    };
    check("read of the events", got, priv_errno);
    for (what, off) in [
        ("mmap of the descriptors", raw::desc_offset(0)),
        ("mmap of node 1's window", node_offset(NODE)),
    ] {
        check(what, try_mmap(&dev, off), priv_errno);
    }
    Ok(failures)
}

/// mmap 4 KiB of the device read-only at `off`: 0 or -errno.
/// A new shared mapping of one page of the device at `off`.
fn map_page(dev: &File, off: u64, prot: i32) -> std::io::Result<*mut libc::c_void> {
    // SAFETY: a new shared mapping at an address the kernel chooses; the
    // caller unmaps it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            prot,
            libc::MAP_SHARED,
            dev.as_raw_fd(),
            off as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(p)
    }
}

fn try_mmap(dev: &File, off: u64) -> i32 {
    match map_page(dev, off, libc::PROT_READ) {
        Err(e) => -e.raw_os_error().unwrap_or(0),
        Ok(p) => {
            // SAFETY: unmapping what was just mapped.
            unsafe { libc::munmap(p, 4096) };
            0
        }
    }
}

fn send_fd(sock: &UnixStream, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    ensure(cmsg.push(SendAncillaryMessage::ScmRights(&fds)), || {
        "no room for SCM_RIGHTS".into()
    })?;
    sendmsg(sock, &[IoSlice::new(b"d")], &mut cmsg, SendFlags::empty())?;
    Ok(())
}

fn recv_fd(sock: &UnixStream) -> Result<OwnedFd> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut byte)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    for msg in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = msg
            && let Some(fd) = fds.next()
        {
            return Ok(fd);
        }
    }
    bail!("no descriptor arrived")
}

/// A launcher: a child opens the device (inheritable) and execs
/// `mm-guest --helper launched-server`, which sends HELLO on it.
fn launcher() -> Result<()> {
    let exe = CString::new(
        std::fs::read_link("/proc/self/exe")?
            .into_os_string()
            .into_encoded_bytes(),
    )?;
    let args = [
        exe.clone(),
        CString::new("--helper")?,
        CString::new("launched-server")?,
    ];
    let argv: Vec<*const libc::c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // SAFETY: fork in a single-threaded process (the passed-descriptor
    // part's server is gone); the child opens, sets one variable and execs.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: open without O_CLOEXEC, so that the exec'd server inherits
        // it; then exec (argv is NUL-terminated, built before the fork).
        unsafe {
            // The previous part's server is released when io_uring has
            // torn its ring down, which may take a moment: EBUSY until then.
            let mut fd = -1;
            for _ in 0..500 {
                fd = libc::open(c"/dev/mm_upcall".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK);
                if fd >= 0 || *libc::__errno_location() != libc::EBUSY {
                    break;
                }
                libc::usleep(10_000);
            }
            if fd < 0 {
                libc::_exit(90);
            }
            let val = CString::new(fd.to_string()).unwrap_or_default();
            let name = c"MM_GUEST_DEVICE_FD";
            libc::setenv(name.as_ptr(), val.as_ptr(), 1);
            libc::execv(argv[0], argv.as_ptr());
            libc::_exit(91);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    ensure(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        || {
            format!(
                "the launched server failed (status {status:#x}: 90 = open failed, 91 = exec \
             failed, 1 = lines above)"
            )
        },
    )?;
    println!(
        "control-plane: a server exec'd by its launcher negotiated on the inherited descriptor, \
         a second open got EBUSY, and its commands still work"
    );
    Ok(())
}

/// `mm-guest --helper launched-server`: the exec'd side of [`launcher`].
pub fn launched_server() -> Result<()> {
    let fd: i32 = std::env::var(FD_ENV)
        .context("no inherited descriptor")?
        .parse()
        .context("bad descriptor number")?;
    // SAFETY: the launcher opened this descriptor for us and nothing else
    // in this process owns it.
    let dev = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let cfg = Config::default();
    let mut t = Transport::from_device(dev, &cfg)?;
    t.negotiate(&cfg)
        .context("HELLO on the inherited descriptor")?;
    // SAFETY: the path is a NUL-terminated literal.
    let fd = unsafe { libc::open(c"/dev/mm_upcall".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    let second = if fd >= 0 {
        // SAFETY: closing what was just opened.
        unsafe { libc::close(fd) };
        0
    } else {
        -std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    };
    ensure(second == -libc::EBUSY, || {
        format!(
            "a second open while the launched server runs: {}, want EBUSY (the device was \
             bound to the launcher's dead mm, so the open took it over)",
            errno_name(second)
        )
    })?;
    // Still the holder: a node command gets ENOENT (node 1 is not ours),
    // not ENODEV (killed by a takeover).
    let out = t.control_sync(Control::SetCredit {
        nid: NODE,
        pages: 1,
    })?;
    let got = match out.result {
        Ok(v) => v,
        Err(e) => e.errno(),
    };
    ensure(got == -libc::ENOENT, || {
        format!(
            "the launched server's SET_CREDIT of a node it has not attached: {}, want ENOENT",
            errno_name(got)
        )
    })
}

/// Free blocks of order 6 or more in node 0's DMA32 and Normal zones
/// (`/proc/buddyinfo`).
fn node0_free_order6() -> Result<u64> {
    let text = sys::read("/proc/buddyinfo")?;
    let mut n = 0;
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        // "Node 0, zone   Normal   <order 0> <order 1> ..."
        if w.len() > 10 && w[1] == "0," && (w[3] == "DMA32" || w[3] == "Normal") {
            for c in &w[10..] {
                n += c.parse::<u64>().context("/proc/buddyinfo")?;
            }
        }
    }
    Ok(n)
}

/// Writes `value` to `path` and gives the old value back on drop.
struct Knob {
    path: String,
    old: String,
}

impl Knob {
    fn set(path: &str, value: &str) -> Result<Option<Self>> {
        let Ok(text) = sys::read(path) else {
            return Ok(None);
        };
        // THP knobs read as "always [madvise] never".
        let old = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
            .unwrap_or(text.trim())
            .to_string();
        sys::write(path, value)?;
        Ok(Some(Self {
            path: path.to_string(),
            old,
        }))
    }
}

impl Drop for Knob {
    fn drop(&mut self) {
        let _ = sys::write(&self.path, &self.old);
    }
}

fn restarts_with_fragmented_node_0() -> Result<()> {
    const RESTARTS: usize = 200;
    const CHUNK: usize = 32 << 20;
    const PAGE: usize = 4096;
    // Node 1 managed first, so that nothing the kernel allocates can go
    // there: it stays managed while no server runs.
    {
        // The previous part's server may still be going away (its ring
        // is torn down asynchronously): EBUSY is retried a while.
        let mut t = crate::upcall::open_retry(&Config::default()).context("open the device")?;
        crate::node::attach(&mut t, NODE)?
            .map_err(|e| anyhow::anyhow!("ATTACH_NODE 1: {}", errno_name(e)))?;
    }
    let mut knobs = Vec::new();
    // Compaction may not move mlocked pages, and anonymous faults take
    // the largest folios there are (64 KiB to 2 MiB blocks) first.
    knobs.push(Knob::set("/proc/sys/vm/compact_unevictable_allowed", "0")?);
    let thp = "/sys/kernel/mm/transparent_hugepage";
    knobs.push(Knob::set(&format!("{thp}/enabled"), "always")?);
    for kb in [64, 128, 256, 512, 1024, 2048] {
        knobs.push(Knob::set(
            &format!("{thp}/hugepages-{kb}kB/enabled"),
            "always",
        )?);
    }
    // Each locked page splits its mapping: 2048 mappings per chunk, past
    // the default limit of 65530 before node 0 runs out of large blocks
    // on some boots (mlock then fails with ENOMEM).  Kept raised until
    // the chunks are gone, as the servers below map their rings too.
    let maps = Knob::set("/proc/sys/vm/max_map_count", "1048576")?;
    let before = node0_free_order6()?;
    let mut chunks = Vec::new();
    let mut left = before;
    while left > 0 && sys::node_meminfo(0, "MemFree")? > 160 << 10 {
        let mut mem = Anon::new(CHUNK)?;
        sys::madvise(&mem, libc::MADV_HUGEPAGE)?;
        for page in mem.as_mut_slice().chunks_mut(PAGE) {
            page[0] = 1;
        }
        // Split the large folios, then keep every eighth page, locked.
        sys::write(
            "/sys/kernel/debug/split_huge_pages",
            &format!(
                "{},{:#x},{:#x}",
                std::process::id(),
                mem.addr(),
                mem.addr() + CHUNK
            ),
        )?;
        for group in (0..CHUNK).step_by(8 * PAGE) {
            let at = mem.addr() + group;
            // SAFETY: both ranges lie inside `mem`, which stays mapped.
            let (l, d) = unsafe {
                (
                    libc::mlock(at as *const libc::c_void, PAGE),
                    libc::madvise(
                        (at + PAGE) as *mut libc::c_void,
                        7 * PAGE,
                        libc::MADV_DONTNEED,
                    ),
                )
            };
            ensure(l == 0 && d == 0, || {
                format!(
                    "{}: {} (chunk {}, {} mappings)",
                    if l != 0 { "mlock" } else { "madvise" },
                    std::io::Error::last_os_error(),
                    chunks.len(),
                    sys::read("/proc/self/maps").map_or(0, |m| m.lines().count())
                )
            })?;
        }
        chunks.push(mem);
        left = node0_free_order6()?;
    }
    drop(knobs);
    let free_mib = sys::node_meminfo(0, "MemFree")? >> 10;
    let locked_mib = (chunks.len() * CHUNK / 8) >> 20;
    let mut failures = Vec::new();
    for i in 0..RESTARTS {
        // The previous server's ring may still be going away: EBUSY is
        // retried a while.
        let r = crate::upcall::open_retry(&Config::default())
            .context("open and HELLO")
            .and_then(|mut t| {
                crate::node::attach(&mut t, NODE)?
                    .map(|_| ())
                    .map_err(|e| anyhow::anyhow!("ATTACH_NODE 1: {}", errno_name(e)))
            });
        if let Err(e) = r {
            failures.push(format!("restart {i}: {e:#}"));
        }
    }
    let after = node0_free_order6()?;
    drop(chunks);
    drop(maps);
    // The last server: detach node 1 again for the parts that follow.
    let mut t = crate::upcall::open_retry(&Config::default()).context("open the device")?;
    crate::node::attach(&mut t, NODE)?
        .map_err(|e| anyhow::anyhow!("ATTACH_NODE 1: {}", errno_name(e)))?;
    t.control_sync(Control::DetachNode { nid: NODE })?
        .result
        .context("DETACH_NODE 1")?;
    println!(
        "control-plane: node 0 fragmented: free blocks of order >= 6 {before} -> {left} \
         ({locked_mib} MiB locked in every eighth page, {free_mib} MiB free); {} of {RESTARTS} \
         restarts failed; {after} such blocks after them",
        failures.len()
    );
    ensure(left == 0, || {
        format!("node 0 still had {left} free blocks of order >= 6: not fragmented")
    })?;
    ensure(failures.is_empty(), || {
        format!(
            "{} of {RESTARTS} restarts failed: {}",
            failures.len(),
            failures[..failures.len().min(3)].join("; ")
        )
    })
}

fn pid_namespace() -> Result<()> {
    const LEN: usize = 8 << 20;
    let mut srv = Server::start_with(1 << 16, "pidns")?;
    ensure(srv.pid == 1, || {
        format!(
            "the server started in a new PID namespace reports pid {}, not 1",
            srv.pid
        )
    })?;
    let cg = Cgroup::enter("mm-guest-control-plane-pidns")?;
    let mut mem = Anon::new(LEN)?;
    sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
    sys::fill_pattern(mem.as_mut_slice(), 0x91);
    cg.leave()?;
    cg.reclaim(2 * LEN);
    let (_, on_node1, _) = crate::managed::where_are(&mem)?;
    ensure(on_node1 > 0, || {
        "reclaim demoted none of the pages to node 1".into()
    })?;
    // Write every page: those on node 1 fault to the server.
    for page in mem.as_mut_slice().chunks_mut(4096) {
        // SAFETY: a byte of the page, written back as it is.
        unsafe { std::ptr::write_volatile(&raw mut page[0], page[0]) };
    }
    srv.cmd("self-write")?;
    let me = std::process::id();
    let (by_me, _) = srv.faults(me)?;
    let (by_nobody, _) = srv.faults(0)?;
    let placed = srv.cmd("placed-by")?;
    println!(
        "control-plane: server in a PID namespace: {on_node1} pages of pid {me} demoted; write \
         faults with tgid {me}: {by_me}, with tgid 0: {by_nobody}; PLACED pages by tgid: {}",
        placed.join(" ")
    );
    let mut failures = Vec::new();
    if by_me > 0 || by_nobody < on_node1 as u64 {
        failures.push(format!(
            "write faults of a process outside the server's namespace: {by_nobody} with tgid 0 \
             and {by_me} with its initial-namespace pid {me}; want at least {on_node1} and 0"
        ));
    }
    for w in &placed {
        let (tgid, pages) = w.split_once(':').context("placed-by")?;
        match tgid {
            "0" | "1" => {}
            _ => failures.push(format!(
                "{pages} pages placed with tgid {tgid}, which the server's namespace does not \
                 have (want 0 for this process, 1 for the server)"
            )),
        }
    }
    if !placed.iter().any(|w| w.starts_with("1:")) {
        failures.push("the server's own pages were not placed as tgid 1".into());
    }
    drop(cg);
    if let Some(i) = sys::check_pattern(mem.as_slice(), 0x91) {
        failures.push(format!("page {i} lost its contents"));
    }
    drop(mem);
    srv.quit()?;
    ensure(failures.is_empty(), || failures.join("; "))
}

fn descriptor_mapping() -> Result<()> {
    let t =
        crate::upcall::open_retry(&Config::default()).context("open the device as the server")?;
    let len = 4096;
    let off = raw::desc_offset(0);
    let mut failures = Vec::new();
    match map_page(t.device(), off, libc::PROT_READ | libc::PROT_EXEC) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        Err(e) => failures.push(format!("PROT_EXEC mapping: {e}, want EPERM")),
        Ok(exec) => {
            failures.push("the descriptors were mapped executable".into());
            // SAFETY: unmapping what was just mapped.
            unsafe { libc::munmap(exec, len) };
        }
    }
    let p = map_page(t.device(), off, libc::PROT_READ)
        .context("read-only mapping of the descriptors")?;
    // SAFETY: the mapping made above.
    let (x, fork) = unsafe {
        (
            libc::mprotect(p, len, libc::PROT_READ | libc::PROT_EXEC),
            libc::madvise(p, len, libc::MADV_DOFORK),
        )
    };
    if x == 0 {
        failures.push("mprotect(PROT_EXEC) of the descriptors succeeded".into());
    }
    if fork == 0 {
        failures.push("madvise(MADV_DOFORK) of the descriptors succeeded".into());
    }
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(p, len) };
    ensure(failures.is_empty(), || failures.join("; "))?;
    println!(
        "control-plane: the descriptor array cannot be mapped executable, made executable or \
         inherited (MADV_DOFORK refused)"
    );
    Ok(())
}

/// The memory blocks (`/sys/devices/system/memory/memory<n>`) of `nid`,
/// lowest first.
fn node_blocks(nid: u32) -> Result<Vec<u64>> {
    let mut blocks = Vec::new();
    for e in std::fs::read_dir(format!("/sys/devices/system/node/node{nid}"))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("memory").and_then(|n| n.parse().ok()) {
            blocks.push(n);
        }
    }
    blocks.sort_unstable();
    Ok(blocks)
}

fn window_and_memory_offline() -> Result<()> {
    // Enough pages to spill over several memory blocks of node 1: some
    // blocks cannot go offline (the last one of the node is refused with
    // EINVAL here, the first holds the node's memmap).
    const PAGES: usize = 48 << 10;
    const PAGE: usize = 4096;
    let block_size = sys::read("/sys/devices/system/memory/block_size_bytes")?;
    let block_pages = u64::from_str_radix(block_size.trim(), 16)? / PAGE as u64;
    // No events: this part reads none, and its 48 Ki placements and their
    // migration off the offlined block would overflow the queue.
    let mut t = Transport::open(&Config {
        features: raw::Features::ALL & !raw::Features::EVENTS,
        ..Config::default()
    })
    .context("open the device as the server")?;
    let info = crate::node::attach(&mut t, NODE)?
        .map_err(|e| anyhow::anyhow!("ATTACH_NODE 1: {}", errno_name(e)))?;
    let mut mem = Anon::new(PAGES * PAGE)?;
    sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
    sys::fill_pattern(mem.as_mut_slice(), 0x3c);
    let (r, status) = sys::move_pages(0, mem.addr(), PAGES, NODE as i32);
    ensure(r == 0 && status.iter().all(|&s| s == NODE as i32), || {
        format!("move_pages of the server's pages to node 1: {r}")
    })?;
    let pfns = sys::pfns(&mem)?;
    let map = t.map_node(&info).context("map node 1's window")?;
    let mut page = [0u8; PAGE];
    // Read every page: the window now maps them all.
    if let Some(i) = pfns.iter().position(|&pfn| !map.read_page(pfn, &mut page)) {
        bail!("the server's page {i} on node 1 is not shown");
    }
    // Offline a block of node 1 (not its first, which holds its memmap)
    // that holds some of those pages; the kernel migrates them to node 0.
    let mut offlined = None;
    let mut refused = Vec::new();
    for &b in node_blocks(NODE)?.iter().skip(1).rev() {
        let inside: Vec<u64> = pfns
            .iter()
            .copied()
            .filter(|p| p / block_pages == b)
            .collect();
        if inside.is_empty() {
            continue;
        }
        match sys::write(
            &format!("/sys/devices/system/memory/memory{b}/state"),
            "offline",
        ) {
            Ok(()) => {
                offlined = Some((b, inside));
                break;
            }
            Err(e) => refused.push(format!("memory{b}: {e:#}")),
        }
    }
    let Some((block, inside)) = offlined else {
        bail!(
            "no block of node 1 that holds the server's pages would go offline: {}",
            refused.join("; ")
        );
    };
    let still = inside
        .iter()
        .filter(|&&pfn| map.read_page(pfn, &mut page))
        .count();
    let online = sys::write(
        &format!("/sys/devices/system/memory/memory{block}/state"),
        "online",
    );
    drop(map);
    let mut failures = Vec::new();
    if still > 0 {
        failures.push(format!(
            "after memory{block} went offline, {still} of the {} frames the window showed in it \
             are still readable through the old mapping",
            inside.len()
        ));
    }
    if let Err(e) = online {
        failures.push(format!("memory{block} would not come online again: {e:#}"));
    }
    if let Some(i) = sys::check_pattern(mem.as_slice(), 0x3c) {
        failures.push(format!("page {i} lost its contents"));
    }
    t.control_sync(Control::DetachNode { nid: NODE })?
        .result
        .context("DETACH_NODE 1")?;
    println!(
        "control-plane: memory{block} of node 1 went offline with {} of the server's pages in \
         it, all shown through the window before; {still} shown after",
        inside.len()
    );
    ensure(failures.is_empty(), || failures.join("; "))
}
