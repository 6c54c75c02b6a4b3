//! Scenario `topology`: the guest sees the two-tier NUMA test bed, and the
//! kernel facilities mm-upcall builds on (io_uring, userfaultfd) work.
#![allow(unsafe_code)]

use std::io::{self, Read as _};
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;

use anyhow::{Context, Result, bail};
use io_uring::{IoUring, cqueue, opcode, squeue};

use crate::sys::{self, Anon, PAGE_SIZE, ensure, histogram};

pub fn run() -> Result<()> {
    nodes()?;
    tiers()?;
    demotion_target_logged()?;
    demotion_moves_pages()?;
    io_uring_works()?;
    userfaultfd_works()?;
    Ok(())
}

/// `xtask demo`: print the topology without asserting.
pub fn show() -> Result<()> {
    println!(
        "online nodes: {}",
        sys::read("/sys/devices/system/node/online")?
    );
    for n in 0..2 {
        let cpus = sys::read(&format!("/sys/devices/system/node/node{n}/cpulist"))?;
        let mem = sys::read(&format!("/sys/devices/system/node/node{n}/meminfo"))?;
        let total = mem
            .lines()
            .find(|l| l.contains("MemTotal"))
            .unwrap_or("")
            .trim();
        println!("node {n}: cpus [{cpus}] {total}");
    }
    for (tier, nodes) in memory_tiers()? {
        println!("memory_tier{tier}: nodes {nodes}");
    }
    if let Some(l) = kernel_log()?
        .into_iter()
        .find(|l| l.contains("Demotion targets for Node 0"))
    {
        println!("kernel: {l}");
    }
    Ok(())
}

fn nodes() -> Result<()> {
    let online = sys::read("/sys/devices/system/node/online")?;
    ensure(online == "0-1", || {
        format!("online nodes are `{online}`, want `0-1`")
    })?;
    let cpus0 = sys::read("/sys/devices/system/node/node0/cpulist")?;
    let cpus1 = sys::read("/sys/devices/system/node/node1/cpulist")?;
    ensure(!cpus0.is_empty(), || "node 0 has no CPUs".into())?;
    ensure(cpus1.is_empty(), || {
        format!("node 1 has CPUs `{cpus1}`, want none")
    })?;
    let has_memory = sys::read("/sys/devices/system/node/has_memory")?;
    ensure(has_memory == "0-1", || {
        format!("nodes with memory: `{has_memory}`, want `0-1`")
    })?;
    println!("topology: nodes 0-1 online, node 0 cpus {cpus0}, node 1 memory-only");
    Ok(())
}

/// (tier id, nodelist) of every memory tier.
fn memory_tiers() -> Result<Vec<(u32, String)>> {
    let dir = "/sys/devices/virtual/memory_tiering";
    let mut tiers = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {dir}"))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(id) = name
            .strip_prefix("memory_tier")
            .and_then(|s| s.parse().ok())
        {
            tiers.push((id, sys::read(&format!("{dir}/{name}/nodelist"))?));
        }
    }
    tiers.sort();
    Ok(tiers)
}

fn tier_of(tiers: &[(u32, String)], nid: u32) -> Option<u32> {
    tiers
        .iter()
        .find_map(|(t, list)| node_in_list(list, nid).then_some(*t))
}

/// Whether `nid` is in a kernel node list such as `0`, `0-1` or `0,2-3`.
fn node_in_list(list: &str, nid: u32) -> bool {
    list.split(',')
        .filter(|s| !s.is_empty())
        .any(|part| match part.split_once('-') {
            Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) => (a..=b).contains(&nid),
                _ => false,
            },
            None => part.parse() == Ok(nid),
        })
}

fn tiers() -> Result<()> {
    let tiers = memory_tiers()?;
    let t0 = tier_of(&tiers, 0).context("node 0 is in no memory tier")?;
    let t1 = tier_of(&tiers, 1).context("node 1 is in no memory tier")?;
    // A higher tier id means a slower tier (larger abstract distance).
    ensure(t1 > t0, || {
        format!("node 1 is in memory_tier{t1}, node 0 in memory_tier{t0}: want node 1 lower")
    })?;
    println!("topology: node 0 in memory_tier{t0}, node 1 in memory_tier{t1}");
    Ok(())
}

/// Records of the kernel log (`/dev/kmsg`), message text only.
fn kernel_log() -> Result<Vec<String>> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .context("cannot open /dev/kmsg")?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let rec = String::from_utf8_lossy(&buf[..n]);
                if let Some((_, msg)) = rec.split_once(';') {
                    out.push(msg.lines().next().unwrap_or("").to_string());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            // EPIPE: a record was overwritten while reading; keep going.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) => return Err(e).context("read /dev/kmsg"),
        }
    }
    Ok(out)
}

fn demotion_target_logged() -> Result<()> {
    let log = kernel_log()?;
    let line = log
        .iter()
        .rev()
        .find(|l| l.starts_with("Demotion targets for Node 0:"))
        .context("the kernel did not log demotion targets for node 0")?;
    ensure(line.contains("preferred: 1"), || {
        format!("kernel: `{line}`; want node 1 preferred")
    })?;
    println!("topology: kernel: {line}");
    Ok(())
}

/// Reclaim in a memory cgroup with demotion enabled moves anonymous pages
/// from node 0 to node 1, and their contents survive.
fn demotion_moves_pages() -> Result<()> {
    const LEN: usize = 64 << 20;
    sys::write("/sys/kernel/mm/numa/demotion_enabled", "true")?;
    let _ = sys::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory");
    let cg = "/sys/fs/cgroup/mm-guest-topology";
    if let Err(e) = std::fs::create_dir(cg)
        && e.kind() != io::ErrorKind::AlreadyExists
    {
        return Err(e).context("cannot create a memory cgroup");
    }
    sys::write(
        &format!("{cg}/cgroup.procs"),
        &std::process::id().to_string(),
    )?;

    let mut mem = Anon::new(LEN)?;
    sys::fill_pattern(mem.as_mut_slice(), 0x70f0);
    let (n0, n1, other) = histogram(&mem.page_nodes()?);
    ensure(n0 == LEN / PAGE_SIZE, || {
        format!("before reclaim: {n0} pages on node 0, {n1} on node 1, {other} elsewhere")
    })?;

    // memory.reclaim may report EAGAIN when it could not reclaim it all;
    // what matters is where the pages are afterwards.
    let _ = sys::write(
        &format!("{cg}/memory.reclaim"),
        &format!("{}", LEN + (LEN / 2)),
    );
    let (n0, n1, other) = histogram(&mem.page_nodes()?);
    println!(
        "topology: after memory.reclaim: {n0} pages on node 0, {n1} on node 1, {other} elsewhere"
    );
    ensure(n1 * 10 >= (LEN / PAGE_SIZE) * 9, || {
        format!(
            "reclaim demoted only {n1} of {} pages to node 1 ({n0} on node 0, {other} elsewhere)",
            LEN / PAGE_SIZE
        )
    })?;
    if let Some(page) = sys::check_pattern(mem.as_slice(), 0x70f0) {
        bail!("page {page} lost its contents across demotion");
    }
    drop(mem);
    sys::write(
        "/sys/fs/cgroup/cgroup.procs",
        &std::process::id().to_string(),
    )?;
    let _ = std::fs::remove_dir(cg);
    Ok(())
}

fn io_uring_works() -> Result<()> {
    let mut ring = IoUring::new(4).context("io_uring_setup")?;
    let nop = opcode::Nop::new().build().user_data(0x42);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }.context("submission queue full")?;
    ring.submit_and_wait(1).context("io_uring_enter")?;
    let cqe = ring.completion().next().context("no completion")?;
    ensure(cqe.user_data() == 0x42 && cqe.result() == 0, || {
        format!(
            "NOP completed with user_data {:#x} result {}",
            cqe.user_data(),
            cqe.result()
        )
    })?;
    // The control commands of mm_upcall need 128-byte SQEs.
    let mut big: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder()
        .build(4)
        .context("io_uring_setup with IORING_SETUP_SQE128")?;
    let nop = opcode::Nop::new().build().user_data(7).into();
    // SAFETY: a NOP references no memory.
    unsafe { big.submission().push(&nop) }.context("submission queue full")?;
    big.submit_and_wait(1)?;
    let cqe = big.completion().next().context("no completion (SQE128)")?;
    ensure(cqe.result() == 0, || {
        format!("SQE128 NOP result {}", cqe.result())
    })?;
    println!("topology: io_uring works (64- and 128-byte SQEs)");
    Ok(())
}

// <linux/userfaultfd.h>, which the libc crate does not carry.
const UFFD_API: u64 = 0xaa;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u64,
}

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xaa << 8) | nr
}
const UFFDIO_API: u64 = iowr(0x3f, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, size_of::<UffdioRegister>());
const UFFDIO_COPY: u64 = iowr(0x03, size_of::<UffdioCopy>());
const _: () = assert!(size_of::<UffdMsg>() == 32);

fn ioctl<T>(fd: &OwnedFd, req: u64, arg: &mut T, what: &str) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: `arg` is the exact struct the request's encoding names, valid
    // for reads and writes for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 {
        return Err(io::Error::last_os_error()).with_context(|| what.to_string());
    }
    Ok(())
}

/// A missing-page fault on a registered range is delivered to user space
/// and resolved with UFFDIO_COPY.
fn userfaultfd_works() -> Result<()> {
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("userfaultfd(2)");
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    ioctl(&uffd, UFFDIO_API, &mut api, "UFFDIO_API")?;
    let region = Anon::new(PAGE_SIZE)?;
    let mut reg = UffdioRegister {
        start: region.addr() as u64,
        len: PAGE_SIZE as u64,
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    ioctl(&uffd, UFFDIO_REGISTER, &mut reg, "UFFDIO_REGISTER")?;

    let addr = region.addr();
    let toucher = std::thread::spawn(move || {
        // SAFETY: addr is a mapped, readable page of `region`, which
        // outlives this thread (joined below).
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    });
    let mut msg = UffdMsg {
        event: 0,
        reserved1: 0,
        reserved2: 0,
        reserved3: 0,
        flags: 0,
        address: 0,
        ptid: 0,
    };
    // SAFETY: msg is a writable 32-byte uffd_msg; read blocks until the
    // toucher faults.
    let n = unsafe {
        use std::os::fd::AsRawFd as _;
        libc::read(
            uffd.as_raw_fd(),
            (&raw mut msg).cast(),
            size_of::<UffdMsg>(),
        )
    };
    ensure(n == size_of::<UffdMsg>() as isize, || {
        format!("read(userfaultfd) returned {n}")
    })?;
    ensure(
        msg.event == UFFD_EVENT_PAGEFAULT && msg.address as usize & !(PAGE_SIZE - 1) == addr,
        || {
            format!(
                "unexpected uffd event {:#x} at {:#x}",
                msg.event, msg.address
            )
        },
    )?;
    let src = vec![0x5au8; PAGE_SIZE];
    let mut copy = UffdioCopy {
        dst: addr as u64,
        src: src.as_ptr() as u64,
        len: PAGE_SIZE as u64,
        mode: 0,
        copy: 0,
    };
    ioctl(&uffd, UFFDIO_COPY, &mut copy, "UFFDIO_COPY")?;
    let byte = toucher
        .join()
        .map_err(|_| anyhow::anyhow!("fault thread panicked"))?;
    ensure(byte == 0x5a, || {
        format!("faulting read saw {byte:#x}, want 0x5a")
    })?;
    drop(region);
    println!(
        "topology: userfaultfd works (missing fault served; write-protect feature {})",
        if api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP != 0 {
            "available"
        } else {
            "absent"
        }
    );
    Ok(())
}
