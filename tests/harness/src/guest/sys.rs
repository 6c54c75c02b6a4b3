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
        page_nodes_at(self.addr(), self.len / PAGE_SIZE)
    }
}

/// The node of each of `n` pages from `addr` of this process
/// (`move_pages(2)` with `nodes == NULL`); negative values are errnos.
pub fn page_nodes_at(addr: usize, n: usize) -> Result<Vec<i32>> {
    let pages: Vec<*mut libc::c_void> = (0..n)
        .map(|i| (addr + i * PAGE_SIZE) as *mut libc::c_void)
        .collect();
    let mut status = vec![i32::MIN; n];
    // SAFETY: pages and status are valid arrays of n elements; with
    // nodes == NULL move_pages only queries and writes status.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            n as libc::c_ulong,
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

// SAFETY: an Anon owns its mapping exclusively; moving it to another thread
// moves that ownership, like a Vec.
unsafe impl Send for Anon {}

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

/// `kill(pid, sig)`.
pub fn signal(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: kill(2) takes no pointers.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("kill({pid}, {sig})"));
    }
    Ok(())
}

/// Fail unless `got == want`; print it under `scenario` when it holds.
pub fn expect_eq(scenario: &str, what: &str, got: i32, want: i32) -> Result<()> {
    ensure(got == want, || format!("{what}: got {got}, want {want}"))?;
    println!("{scenario}: {what}: {got} as expected");
    Ok(())
}

/// Fail unless `cond`.
pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond { Ok(()) } else { bail!("{}", msg()) }
}

/// `<linux/mempolicy.h>`
pub const MPOL_PREFERRED: i32 = 1;
pub const MPOL_BIND: i32 = 2;
/// `move_pages(2)` flag: move pages mapped only by the target process.
pub const MPOL_MF_MOVE: i32 = 1 << 1;

/// The errno of the last failed call, negated (`-EINVAL`).
pub fn neg_errno() -> i32 {
    -io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `set_mempolicy(mode, {node})` (`node < 0`: empty mask); 0 or `-errno`.
pub fn set_mempolicy(mode: i32, node: i32) -> i32 {
    let mask: libc::c_ulong = if node < 0 { 0 } else { 1 << node };
    // SAFETY: a one-word nodemask of 64 bits, read by the kernel only, or
    // none (NULL, 0) for an empty mask.
    let r = unsafe {
        if node < 0 {
            libc::syscall(
                libc::SYS_set_mempolicy,
                mode,
                std::ptr::null::<libc::c_ulong>(),
                0,
            )
        } else {
            libc::syscall(libc::SYS_set_mempolicy, mode, &raw const mask, 64)
        }
    };
    if r < 0 { neg_errno() } else { 0 }
}

/// `mbind(mem, mode, {node}, flags)`; 0 or `-errno`.
pub fn mbind(mem: &Anon, mode: i32, node: i32, flags: u32) -> i32 {
    let mask: libc::c_ulong = 1 << node;
    // SAFETY: the range is our own mapping; the nodemask is one word.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            mem.addr(),
            mem.as_slice().len(),
            mode,
            &raw const mask,
            64,
            flags,
        )
    };
    if r < 0 { neg_errno() } else { 0 }
}

/// `madvise(mem, advice)`.
pub fn madvise(mem: &Anon, advice: i32) -> Result<()> {
    // SAFETY: advice on our own mapping.
    let r = unsafe { libc::madvise(mem.addr() as *mut _, mem.as_slice().len(), advice) };
    if r < 0 {
        return Err(io::Error::last_os_error()).context("madvise");
    }
    Ok(())
}

/// `move_pages(pid, pages, node, MPOL_MF_MOVE)` for `n` pages from `addr`:
/// the syscall's result (0 or `-errno`) and the status of every page.
pub fn move_pages(pid: i32, addr: usize, n: usize, node: i32) -> (i32, Vec<i32>) {
    let pages: Vec<usize> = (0..n).map(|i| addr + i * PAGE_SIZE).collect();
    let nodes = vec![node; n];
    let mut status = vec![i32::MIN; n];
    // SAFETY: three arrays of n elements; the kernel reads pages and nodes
    // and writes status.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            pid,
            n as libc::c_ulong,
            pages.as_ptr(),
            nodes.as_ptr(),
            status.as_mut_ptr(),
            MPOL_MF_MOVE,
        )
    };
    (if r < 0 { neg_errno() } else { 0 }, status)
}

/// A node's meminfo value in kB (`"MemFree"`, `"AnonPages"`, ...).
pub fn node_meminfo(nid: u32, key: &str) -> Result<u64> {
    let text = read(&format!("/sys/devices/system/node/node{nid}/meminfo"))?;
    text.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace().skip(2);
            let k = it.next()?.trim_end_matches(':');
            (k == key).then(|| it.next()?.parse().ok())?
        })
        .with_context(|| format!("no {key} in node{nid}/meminfo"))
}

/// The pfn of every page of `mem` (`/proc/self/pagemap`; root only).
pub fn pfns(mem: &Anon) -> Result<Vec<u64>> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut f = std::fs::File::open("/proc/self/pagemap").context("open pagemap")?;
    let n = mem.as_slice().len() / PAGE_SIZE;
    f.seek(SeekFrom::Start((mem.addr() / PAGE_SIZE * 8) as u64))?;
    let mut buf = vec![0u8; n * 8];
    f.read_exact(&mut buf)?;
    buf.chunks(8)
        .map(|c| {
            let v = u64::from_ne_bytes(c.try_into().expect("8 bytes"));
            if v & (1 << 63) == 0 {
                bail!("page not present");
            }
            Ok(v & ((1 << 55) - 1))
        })
        .collect()
}

/// A memory cgroup this process runs in until dropped.
pub struct Cgroup {
    path: String,
}

impl Cgroup {
    /// Create `/sys/fs/cgroup/<name>` and move this process into it, with
    /// reclaim-time demotion enabled.
    pub fn enter(name: &str) -> Result<Self> {
        write("/sys/kernel/mm/numa/demotion_enabled", "true")?;
        let _ = write("/sys/fs/cgroup/cgroup.subtree_control", "+memory");
        let path = format!("/sys/fs/cgroup/{name}");
        if let Err(e) = std::fs::create_dir(&path)
            && e.kind() != io::ErrorKind::AlreadyExists
        {
            return Err(e).with_context(|| format!("cannot create cgroup {path}"));
        }
        write(
            &format!("{path}/cgroup.procs"),
            &std::process::id().to_string(),
        )?;
        Ok(Self { path })
    }

    /// Ask the cgroup to reclaim `bytes`; with no swap, anonymous memory
    /// can only be demoted.  A partial reclaim (`EAGAIN`) is not an error:
    /// callers look at where the pages are.
    pub fn reclaim(&self, bytes: usize) {
        let _ = write(&format!("{}/memory.reclaim", self.path), &bytes.to_string());
    }

    /// Move this process into the cgroup again (after [`Cgroup::leave`]).
    pub fn rejoin(&self) -> Result<()> {
        write(
            &format!("{}/cgroup.procs", self.path),
            &std::process::id().to_string(),
        )
    }

    /// Move this process back to the root cgroup, keeping this one: pages
    /// already charged here stay charged here, and what the process
    /// allocates from now on (thread stacks, heap) is out of reach of
    /// [`Cgroup::reclaim`].
    pub fn leave(&self) -> Result<()> {
        write(
            "/sys/fs/cgroup/cgroup.procs",
            &std::process::id().to_string(),
        )
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = write(
            "/sys/fs/cgroup/cgroup.procs",
            &std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Go on as PID 1 of a new PID namespace: unshare it and fork; the parent
/// waits and exits with the child's status, and the child dies with it.
pub fn enter_new_pid_namespace() -> Result<()> {
    // SAFETY: plain system calls; this runs before the server starts any
    // thread, so the child of fork() may go on running Rust code.
    unsafe {
        if libc::unshare(libc::CLONE_NEWPID) != 0 {
            bail!("unshare(CLONE_NEWPID): {}", std::io::Error::last_os_error());
        }
        match libc::fork() {
            -1 => bail!("fork: {}", std::io::Error::last_os_error()),
            0 => {
                // Its parent is outside the namespace (getppid() is 0).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            }
            child => {
                let mut status = 0;
                libc::waitpid(child, &mut status, 0);
                libc::_exit(if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    1
                });
            }
        }
    }
}

/// `CAP_SYS_NICE`.
pub const CAP_SYS_NICE: u32 = 23;

/// Become uid `uid` and gid `gid` with no supplementary groups, keeping
/// only the capabilities `keep` (effective and permitted).
pub fn drop_to(uid: u32, gid: u32, keep: &[u32]) -> Result<()> {
    drop_to_in(uid, gid, &[], keep)
}

/// As [`drop_to`], with the supplementary groups `groups` (a user a group
/// was added to, as `adduser alice mm-upcall` does).
pub fn drop_to_in(uid: u32, gid: u32, groups: &[u32], keep: &[u32]) -> Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mask: u64 = keep.iter().fold(0, |m, &c| m | 1 << c);
    let hdr = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [
        Data {
            effective: mask as u32,
            permitted: mask as u32,
            inheritable: 0,
        },
        Data {
            effective: (mask >> 32) as u32,
            permitted: (mask >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: plain system calls on this process's credentials; capset
    // reads a header and two data records that live across the call.
    unsafe {
        if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0
            || libc::setgroups(groups.len(), groups.as_ptr()) != 0
            || libc::setresgid(gid, gid, gid) != 0
            || libc::setresuid(uid, uid, uid) != 0
            || libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) != 0
            // A credential change makes the process non-dumpable; a
            // process started as this user would be dumpable.
            || libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0
        {
            bail!("cannot become uid {uid}: {}", io::Error::last_os_error());
        }
    }
    Ok(())
}
