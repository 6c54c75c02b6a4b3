//! Scenario `upcall-bad-input`: every malformed or unauthorised use of
//! `/dev/mm_upcall` gets its precise errno, and the kernel keeps working
//! (the ping scenario passes afterwards in the same boot).
#![allow(unsafe_code)]

use std::os::fd::AsRawFd as _;

use anyhow::{Context, Result, bail};
use io_uring::{IoUring, opcode, types};
use mm_upcall_kernel::proto::control::Control;
use mm_upcall_kernel::proto::raw::{self, CTRL_CMD_SIZE, ctrl_op, io_op};
use mm_upcall_kernel::proto::upcall::Upcall;
use mm_upcall_kernel::proto::verdict::Verdict;
use mm_upcall_kernel::{Completion, Config, Error, Transport};
use zerocopy::IntoBytes as _;

use crate::sys::ensure;

fn errno_of(r: Result<i32, Error>) -> i32 {
    match r {
        Ok(v) => v,
        Err(e) => e.errno(),
    }
}

fn expect(what: &str, got: i32, want: i32) -> Result<()> {
    let name = |e: i32| std::io::Error::from_raw_os_error(-e).to_string();
    ensure(got == want, || {
        format!(
            "{what}: got {got} ({}), want {want} ({})",
            if got < 0 { name(got) } else { "ok".into() },
            name(want)
        )
    })?;
    println!(
        "upcall-bad-input: {what}: {} as expected",
        if want < 0 { name(want) } else { "ok".into() }
    );
    Ok(())
}

fn hello_area(mut h: raw::Hello) -> [u8; CTRL_CMD_SIZE] {
    let mut a = [0u8; CTRL_CMD_SIZE];
    if h.queue_depth == 0 {
        h.queue_depth = 8;
    }
    a[..size_of::<raw::Hello>()].copy_from_slice(h.as_bytes());
    a
}

fn good_hello() -> raw::Hello {
    raw::Hello {
        api_version: raw::API_VERSION,
        nr_queues: 1,
        queue_depth: 8,
        features: raw::Features::ALL.bits(),
        ..raw::Hello::default()
    }
}

/// Submit one hot-path command on the transport and return its CQE result.
fn io_result(t: &mut Transport, cmd_op: u32, c: raw::IoCmd) -> Result<i32> {
    let mut area = [0u8; 16];
    area.copy_from_slice(c.as_bytes());
    t.raw_io(cmd_op, area, c.slot)?;
    let mut out = Vec::new();
    while out.is_empty() {
        t.wait(&mut out)?;
    }
    match out.remove(0) {
        Completion::SlotFailed { error, .. } => Ok(error.errno()),
        Completion::Teardown { .. } => Ok(-libc::ENODEV),
        other => bail!("unexpected completion {other:?}"),
    }
}

pub fn run() -> Result<()> {
    non_root_open()?;

    // Before HELLO.
    let cfg = Config::default();
    let mut t = Transport::connect(&cfg)?;
    expect(
        "second server",
        Transport::connect(&cfg)
            .map(|_| 0)
            .unwrap_or_else(|e| e.errno()),
        -libc::EBUSY,
    )?;
    expect(
        "FETCH before HELLO",
        io_result(&mut t, io_op::FETCH, raw::IoCmd::default())?,
        -libc::ENOTCONN,
    )?;
    let ctrl = |t: &mut Transport, op: u32, a: [u8; CTRL_CMD_SIZE]| {
        // SAFETY: every area below has reply_addr 0, or 8 (which the
        // kernel must refuse with EFAULT before writing), or none.
        errno_of(unsafe { t.raw_control(op, a) })
    };
    expect(
        "ATTACH_NODE before HELLO",
        ctrl(&mut t, ctrl_op::ATTACH_NODE, [0; CTRL_CMD_SIZE]),
        -libc::ENOTCONN,
    )?;
    expect(
        "unknown control opcode",
        ctrl(&mut t, 0xb7ff, [0; CTRL_CMD_SIZE]),
        -libc::EOPNOTSUPP,
    )?;
    expect(
        "HELLO with API version 2",
        ctrl(
            &mut t,
            ctrl_op::HELLO,
            hello_area(raw::Hello {
                api_version: 2,
                ..good_hello()
            }),
        ),
        -libc::EPROTONOSUPPORT,
    )?;
    expect(
        "HELLO with non-zero reserved0",
        ctrl(
            &mut t,
            ctrl_op::HELLO,
            hello_area(raw::Hello {
                reserved0: 1,
                ..good_hello()
            }),
        ),
        -libc::EINVAL,
    )?;
    let mut tail = hello_area(good_hello());
    tail[CTRL_CMD_SIZE - 1] = 1;
    expect(
        "HELLO with non-zero bytes after the payload",
        ctrl(&mut t, ctrl_op::HELLO, tail),
        -libc::EINVAL,
    )?;
    expect(
        "HELLO with 65 queues",
        ctrl(
            &mut t,
            ctrl_op::HELLO,
            hello_area(raw::Hello {
                nr_queues: 65,
                ..good_hello()
            }),
        ),
        -libc::ERANGE,
    )?;
    expect(
        "HELLO with a bad reply address",
        ctrl(
            &mut t,
            ctrl_op::HELLO,
            hello_area(raw::Hello {
                reply_addr: 8,
                ..good_hello()
            }),
        ),
        -libc::EFAULT,
    )?;
    without_sqe128(&t)?;

    // A good HELLO, with unknown feature bits masked off and echoed.
    let out = t.control_sync(Control::Hello {
        nr_queues: 1,
        queue_depth: 8,
        timeout_ms: 0,
        features: raw::Features::from_bits_retain(u64::MAX),
        reply_addr: 0,
    })?;
    out.result?;
    let reply = mm_upcall_kernel::proto::control::HelloReply::decode(&out.reply)?;
    ensure(reply.features == raw::Features::ALL, || {
        format!(
            "granted features {:#x}, want MM_UPCALL_F_ALL {:#x}",
            reply.features.bits(),
            raw::Features::ALL.bits()
        )
    })?;
    println!(
        "upcall-bad-input: HELLO asking for every feature bit: granted exactly MM_UPCALL_F_ALL"
    );
    ensure(reply.timeout_ms == raw::DEFAULT_TIMEOUT_MS, || {
        format!("timeout {} ms, want the default", reply.timeout_ms)
    })?;
    expect(
        "second HELLO",
        ctrl(&mut t, ctrl_op::HELLO, hello_area(good_hello())),
        -libc::EALREADY,
    )?;
    drop(t);

    // Hot-path commands, on a server with every slot armed.
    let mut t = crate::upcall::open_retry(&Config {
        queue_depth: 8,
        ..Config::default()
    })?;

    // Hot-path commands.
    let fetch = |slot| raw::IoCmd {
        slot,
        ..raw::IoCmd::default()
    };
    expect(
        "FETCH with non-zero reserved",
        io_result(
            &mut t,
            io_op::FETCH,
            raw::IoCmd {
                reserved: 1,
                ..fetch(0)
            },
        )?,
        -libc::EINVAL,
    )?;
    expect(
        "FETCH carrying a verdict",
        io_result(
            &mut t,
            io_op::FETCH,
            raw::IoCmd {
                verdict: raw::verdict::STAY,
                ..fetch(0)
            },
        )?,
        -libc::EINVAL,
    )?;
    expect(
        "FETCH on queue 1 of 1",
        io_result(
            &mut t,
            io_op::FETCH,
            raw::IoCmd {
                q_id: 1,
                ..fetch(0)
            },
        )?,
        -libc::ERANGE,
    )?;
    expect(
        "FETCH on slot 8 of 8",
        io_result(&mut t, io_op::FETCH, fetch(8))?,
        -libc::ERANGE,
    )?;
    expect(
        "COMMIT on a slot with no request",
        io_result(&mut t, io_op::COMMIT_AND_FETCH, fetch(0))?,
        -libc::ENOENT,
    )?;
    expect(
        "unknown hot-path opcode",
        io_result(&mut t, 0xb7_42, fetch(0))?,
        -libc::EOPNOTSUPP,
    )?;
    expect(
        "FETCH on an armed slot",
        io_result(&mut t, io_op::FETCH, fetch(0))?,
        -libc::EBUSY,
    )?;
    writable_mapping(&t)?;
    bad_verdict(&mut t)?;
    stale_commit(&mut t)?;
    drop(t);

    println!("upcall-bad-input: the kernel still works; running upcall-ping in the same boot");
    crate::upcall::ping()
}

/// A repeated COMMIT (transport review finding 11): the first COMMIT of
/// a PING's upcall re-arms its slot and the kernel delivers the second
/// upcall in that same slot; a second COMMIT with the first upcall's `seq`
/// must fail alone (`EINVAL`) and leave the second upcall to its own
/// COMMIT, not give it the default.
fn stale_commit(t: &mut Transport) -> Result<()> {
    let token = t.submit_control(Control::Ping {
        nr_upcalls: 2,
        nr_threads: 1,
        events: false,
        reply_addr: 0,
    })?;
    let mut out = Vec::new();
    let mut first: Option<(u16, u32, u32)> = None;
    let mut stale = None;
    loop {
        out.clear();
        t.wait(&mut out)?;
        for c in out.drain(..) {
            match c {
                Completion::Upcall { slot, request } => {
                    let Upcall::Ping { cookie } = request.upcall else {
                        bail!("unexpected upcall {:?}", request.upcall);
                    };
                    if let Some((s0, seq0, cookie0)) = first {
                        ensure(slot == s0, || {
                            format!(
                                "the second upcall came in slot {slot}, not in the re-armed \
                                 slot {s0}: nothing to test"
                            )
                        })?;
                        // The stale COMMIT, then the right one.
                        t.commit(slot, seq0, Verdict::Pong { cookie: cookie0 })?;
                    }
                    t.commit(slot, request.seq, Verdict::Pong { cookie })?;
                    first.get_or_insert((slot, request.seq, cookie));
                }
                Completion::SlotFailed { error, .. } => {
                    stale.get_or_insert(error.errno());
                }
                Completion::Control { token: tk, outcome } if tk == token => {
                    let r = mm_upcall_kernel::ping_reply(outcome)?;
                    ensure(r.answered == 2 && r.defaulted == 0, || {
                        format!(
                            "after a repeated COMMIT: {} answered, {} defaulted; want 2, 0 (the \
                             stale COMMIT defaulted the next upcall in its slot; the COMMITs \
                             failed first with {:?})",
                            r.answered, r.defaulted, stale
                        )
                    })?;
                    return expect(
                        "a second COMMIT of an answered upcall",
                        stale.unwrap_or(0),
                        -libc::EINVAL,
                    );
                }
                other => bail!("unexpected completion {other:?}"),
            }
        }
    }
}

/// Run `f` in a forked child and return its exit code.
fn in_child(f: impl FnOnce() -> i32) -> Result<i32> {
    // SAFETY: fork in a single-threaded process; the child runs `f`, which
    // makes only system calls, then _exit()s without unwinding.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        let code = f();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Ok(libc::WEXITSTATUS(status))
}

/// errno of open("/dev/mm_upcall"), as an exit code (0: it opened).
fn open_errno() -> i32 {
    // SAFETY: the path is a NUL-terminated literal.
    let fd = unsafe { libc::open(c"/dev/mm_upcall".as_ptr(), libc::O_RDWR) };
    if fd >= 0 {
        0
    } else {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(99)
            .min(99)
    }
}

const CAP_SYS_ADMIN: u32 = 21;

/// Neither a non-root user nor root without CAP_SYS_ADMIN can open it.
fn non_root_open() -> Result<()> {
    let code = in_child(|| {
        // SAFETY: plain system calls changing only this child's credentials.
        if unsafe { libc::setgid(65534) != 0 || libc::setuid(65534) != 0 } {
            return 100;
        }
        open_errno()
    })?;
    ensure(code != 100, || "could not drop privileges".into())?;
    // The node is root-only (0600): the VFS refuses before the driver.
    expect("open as uid 65534", -code, -libc::EACCES)?;

    let code = in_child(|| {
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
        let mut hdr = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let mut data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        // SAFETY: capget/capset with a v3 header and two data words, as
        // capget(2) specifies.
        unsafe {
            if libc::syscall(libc::SYS_capget, &raw mut hdr, data.as_mut_ptr()) != 0 {
                return 101;
            }
            data[0].effective &= !(1 << CAP_SYS_ADMIN);
            data[0].permitted &= !(1 << CAP_SYS_ADMIN);
            if libc::syscall(libc::SYS_capset, &raw mut hdr, data.as_ptr()) != 0 {
                return 102;
            }
        }
        open_errno()
    })?;
    ensure(code < 100, || {
        format!("could not drop CAP_SYS_ADMIN (code {code})")
    })?;
    expect("open as root without CAP_SYS_ADMIN", -code, -libc::EPERM)
}

/// A control command on a ring without SQE128.
fn without_sqe128(t: &Transport) -> Result<()> {
    let mut ring = IoUring::new(4).context("io_uring_setup")?;
    let mut area = [0u8; 16];
    area.copy_from_slice(&hello_area(good_hello())[..16]);
    let sqe = opcode::UringCmd16::new(types::Fd(t.device().as_raw_fd()), ctrl_op::HELLO)
        .cmd(area)
        .build()
        .user_data(1);
    // SAFETY: the command references no memory of this process.
    unsafe { ring.submission().push(&sqe) }.context("submission queue full")?;
    ring.submit_and_wait(1)?;
    let res = ring.completion().next().context("no completion")?.result();
    expect("HELLO on a ring without SQE128", res, -libc::EMSGSIZE)
}

/// The descriptor array cannot be mapped writable.
fn writable_mapping(t: &Transport) -> Result<()> {
    // SAFETY: a new mapping request; the kernel must refuse it, and if it
    // did not, we unmap it at once.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            t.device().as_raw_fd(),
            0,
        )
    };
    let res = if p == libc::MAP_FAILED {
        -std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        // SAFETY: unmapping what was just mapped.
        unsafe { libc::munmap(p, 4096) };
        0
    };
    expect("writable mmap of the descriptors", res, -libc::EPERM)
}

/// A verdict that does not fit the upcall fails the commit with EINVAL and
/// the waiter gets the default.
fn bad_verdict(t: &mut Transport) -> Result<()> {
    let token = t.submit_control(Control::Ping {
        nr_upcalls: 1,
        nr_threads: 1,
        events: false,
        reply_addr: 0,
    })?;
    let mut out = Vec::new();
    let mut failed = None;
    loop {
        out.clear();
        t.wait(&mut out)?;
        for c in out.drain(..) {
            match c {
                Completion::Upcall { slot, request } => {
                    t.commit(
                        slot,
                        request.seq,
                        mm_upcall_kernel::proto::verdict::Verdict::Grant { pages: 1 },
                    )?;
                }
                Completion::SlotFailed { error, .. } => failed = Some(error.errno()),
                Completion::Control { token: tk, outcome } if tk == token => {
                    let r = mm_upcall_kernel::ping_reply(outcome)?;
                    expect(
                        "GRANT as the answer to a PING",
                        failed.unwrap_or(0),
                        -libc::EINVAL,
                    )?;
                    ensure(r.defaulted == 1 && r.answered == 0, || {
                        format!(
                            "after a bad verdict: {} defaulted, {} answered; want 1, 0",
                            r.defaulted, r.answered
                        )
                    })?;
                    return Ok(());
                }
                other => bail!("unexpected completion {other:?}"),
            }
        }
    }
}
