//! The server's end of one queue: a ring, its slots and control commands.
//!
//! Unsafe is allowed here only for pushing control commands, whose reply
//! buffers the kernel writes to; everything else goes through `sys`.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _};
use std::os::fd::AsFd as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use mm_upcall_proto::DecodeError;
use mm_upcall_proto::control::{self, Control, HelloReply};
use mm_upcall_proto::event::{self, Event};
use mm_upcall_proto::raw::{self, CTRL_CMD_SIZE};
use mm_upcall_proto::upcall::Request;
use mm_upcall_proto::verdict::{IoCommand, Verdict};
use slab::Slab;
use zerocopy::IntoBytes as _;

use crate::sys::{self, DescMap};
use crate::{DEVICE_PATH, Error};

/// `user_data` of control commands starts here; slots use `0..depth`.
pub const CTRL_TAG: u64 = 1 << 32;
/// `user_data` of file descriptors watched with [`Transport::watch`].
pub const WATCH_TAG: u64 = 2 << 32;

/// How to open the transport.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: String,
    /// Queues to negotiate; this transport serves queue 0, and
    /// [`QueueOpener::open`] the others (one thread each).
    pub nr_queues: u16,
    /// Slots per queue.
    pub queue_depth: u16,
    /// Longest time any task waits on us; 0 = kernel default.
    pub timeout_ms: u32,
    /// `MM_UPCALL_F_*` to ask for.
    pub features: raw::Features,
    /// Features without which `open` fails.
    pub required: raw::Features,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            path: DEVICE_PATH.to_string(),
            nr_queues: 1,
            queue_depth: 64,
            timeout_ms: 0,
            features: raw::Features::ALL,
            required: raw::Features::empty(),
        }
    }
}

/// Names a control command submitted with [`Transport::submit_control`];
/// its [`Completion::Control`] carries the same token.  A token is reused
/// once its command completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtrlToken(usize);

/// Result of a control command.
#[derive(Debug)]
pub struct ControlOutcome {
    pub name: &'static str,
    /// The CQE result (>= 0), or the kernel's error.
    pub result: Result<i32, Error>,
    /// The reply record the kernel wrote (empty for commands without one).
    pub reply: Box<[u8]>,
}

/// What [`Transport::wait`] reports.
#[derive(Debug)]
pub enum Completion {
    /// An upcall on `slot`: answer it with [`Transport::commit`].
    Upcall { slot: u16, request: Request },
    /// The descriptor on `slot` did not decode; answer `Default` with `seq`.
    Malformed {
        slot: u16,
        seq: u32,
        error: DecodeError,
    },
    /// The kernel rejected a FETCH/COMMIT on `slot`; the slot is idle now and
    /// can be re-armed with [`Transport::fetch`].
    SlotFailed { slot: u16, error: Error },
    /// A control command submitted with [`Transport::submit_control`] ended.
    Control {
        token: CtrlToken,
        outcome: ControlOutcome,
    },
    /// The kernel is tearing this server down (`-ENODEV`/`-ECANCELED`).
    Teardown { slot: u16 },
    /// A descriptor watched with [`Transport::watch`] became readable (or
    /// the poll failed: `result` < 0).  The watch is one-shot.
    Readable { token: u32, result: i32 },
}

struct CtrlOp {
    name: &'static str,
    reply: Box<[u8]>,
}

/// One queue of the upcall transport.
pub struct Transport {
    dev: File,
    q_id: u16,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    descs: Option<DescMap>,
    hello: HelloReply,
    ctrl: Slab<CtrlOp>,
    ready: VecDeque<Completion>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("hello", &self.hello)
            .field("ctrl_in_flight", &self.ctrl.len())
            .finish_non_exhaustive()
    }
}

fn ctrl_name(cmd_op: u32) -> &'static str {
    raw::ctrl_op::name(cmd_op).unwrap_or("control command")
}

impl Transport {
    /// Open the device, negotiate, map the descriptors and arm every slot.
    ///
    /// # Errors
    ///
    /// [`Error::Open`] (`EPERM` without `CAP_SYS_ADMIN`, `EBUSY` when
    /// another server is attached), [`Error::Command`] for HELLO,
    /// [`Error::Features`], [`Error::Mmap`], ring errors.
    pub fn open(cfg: &Config) -> Result<Self, Error> {
        let mut t = Self::connect(cfg)?;
        t.negotiate(cfg)?;
        Ok(t)
    }

    /// Open the device and set up the ring, without negotiating (tests of
    /// the kernel's validation use this; servers use [`Transport::open`]).
    ///
    /// # Errors
    ///
    /// [`Error::Open`], [`Error::Ring`].
    pub fn connect(cfg: &Config) -> Result<Self, Error> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&cfg.path)
            .map_err(|source| Error::Open {
                path: cfg.path.clone(),
                source,
            })?;
        Self::from_device(dev, cfg)
    }

    /// Set up a ring over a device descriptor this process did not open:
    /// a launcher opened `/dev/mm_upcall` (it needs `CAP_SYS_ADMIN`) and
    /// exec'd the server with the descriptor inherited, or passed it over
    /// a socket.  Nothing is negotiated: [`Transport::negotiate`] sends
    /// HELLO, which binds the device to this process; from then on the
    /// kernel refuses every use from another process with `EBADFD`.
    ///
    /// # Errors
    ///
    /// [`Error::Ring`].
    pub fn from_device(dev: File, cfg: &Config) -> Result<Self, Error> {
        let ring = new_ring(cfg.queue_depth)?;
        Ok(Transport {
            dev,
            q_id: 0,
            ring,
            descs: None,
            hello: HelloReply {
                nr_queues: 0,
                queue_depth: 0,
                desc_size: 0,
                timeout_ms: 0,
                features: raw::Features::empty(),
            },
            ctrl: Slab::new(),
            ready: VecDeque::new(),
        })
    }

    /// HELLO, map the descriptors, arm every slot.
    ///
    /// # Errors
    ///
    /// [`Error::Command`] for HELLO, [`Error::Features`], [`Error::Mmap`],
    /// ring errors.
    pub fn negotiate(&mut self, cfg: &Config) -> Result<(), Error> {
        let out = self.control_sync(Control::Hello {
            nr_queues: cfg.nr_queues,
            queue_depth: cfg.queue_depth,
            timeout_ms: cfg.timeout_ms,
            features: cfg.features,
            reply_addr: 0,
        })?;
        out.result?;
        self.hello = HelloReply::decode(&out.reply)?;
        let missing = cfg.required.difference(self.hello.features);
        if !missing.is_empty() {
            return Err(Error::Features { missing });
        }
        self.arm()
    }

    fn arm(&mut self) -> Result<(), Error> {
        self.descs = Some(DescMap::map(
            self.dev.as_fd(),
            self.q_id,
            self.hello.queue_depth,
        )?);
        for slot in 0..self.hello.queue_depth {
            self.fetch(slot)?;
        }
        self.flush()
    }

    /// A handle that opens this server's other queues, each on its own
    /// ring; send it to the thread that will serve the queue.
    ///
    /// # Errors
    ///
    /// Duplicating the device descriptor failed.
    pub fn queue_opener(&self) -> Result<QueueOpener, Error> {
        Ok(QueueOpener {
            dev: self.dev.try_clone().map_err(|source| Error::Open {
                path: DEVICE_PATH.to_string(),
                source,
            })?,
            hello: self.hello,
        })
    }

    /// The queue this transport serves.
    pub fn q_id(&self) -> u16 {
        self.q_id
    }

    /// What the kernel granted.
    pub fn hello(&self) -> &HelloReply {
        &self.hello
    }

    /// The device file (events are read from it).
    pub fn device(&self) -> &File {
        &self.dev
    }

    fn push_io(&mut self, cmd: IoCommand, slot: u16) -> Result<(), Error> {
        let mut area = [0u8; 16];
        area.copy_from_slice(cmd.to_raw().as_bytes());
        self.raw_io(cmd.cmd_op(), area, slot)
    }

    /// Queue a FETCH that arms `slot` (after [`Completion::SlotFailed`]).
    ///
    /// # Errors
    ///
    /// Ring errors.
    pub fn fetch(&mut self, slot: u16) -> Result<(), Error> {
        self.push_io(
            IoCommand::Fetch {
                q_id: self.q_id,
                slot,
            },
            slot,
        )
    }

    /// Queue the answer to the upcall `seq` on `slot`; it also re-arms the
    /// slot.  Sent with the next [`Transport::wait`] or [`Transport::flush`].
    ///
    /// # Errors
    ///
    /// Ring errors.
    pub fn commit(&mut self, slot: u16, seq: u32, verdict: Verdict) -> Result<(), Error> {
        self.push_io(
            IoCommand::CommitAndFetch {
                q_id: self.q_id,
                slot,
                seq,
                verdict,
            },
            slot,
        )
    }

    /// Submit whatever is queued without waiting.
    ///
    /// # Errors
    ///
    /// [`Error::Enter`].
    pub fn flush(&mut self) -> Result<(), Error> {
        self.ring.submit().map(|_| ()).map_err(Error::Enter)
    }

    /// Submit a control command; a reply buffer of the size of the
    /// command's reply record ([`Control::reply_len`]) is patched into its
    /// `reply_addr`, so the kernel can never write past it.  Its result
    /// arrives as [`Completion::Control`] with the returned token.
    ///
    /// # Errors
    ///
    /// Ring errors.
    pub fn submit_control(&mut self, ctrl: Control) -> Result<CtrlToken, Error> {
        let mut op = CtrlOp {
            name: ctrl_name(ctrl.cmd_op()),
            reply: vec![0u8; ctrl.reply_len()].into_boxed_slice(),
        };
        let addr = op.reply.as_mut_ptr() as u64;
        let ctrl = match ctrl {
            Control::Hello {
                nr_queues,
                queue_depth,
                timeout_ms,
                features,
                ..
            } => Control::Hello {
                nr_queues,
                queue_depth,
                timeout_ms,
                features,
                reply_addr: addr,
            },
            Control::AttachNode {
                nid, credit_pages, ..
            } => Control::AttachNode {
                nid,
                credit_pages,
                reply_addr: addr,
            },
            Control::Ping {
                nr_upcalls,
                nr_threads,
                events,
                ..
            } => Control::Ping {
                nr_upcalls,
                nr_threads,
                events,
                reply_addr: addr,
            },
            other => other,
        };
        // SAFETY: the only user address in the command is the reply buffer
        // of `op`, patched in above.
        unsafe { self.submit_raw_control(ctrl.cmd_op(), ctrl.encode(), op) }
    }

    /// # Safety
    ///
    /// Any user address in `area` must be 0, or the reply buffer of `op`,
    /// or otherwise valid for the kernel to write to.
    unsafe fn submit_raw_control(
        &mut self,
        cmd_op: u32,
        area: [u8; CTRL_CMD_SIZE],
        op: CtrlOp,
    ) -> Result<CtrlToken, Error> {
        let entry = self.ctrl.vacant_entry();
        let token = entry.key();
        // IOSQE_ASYNC: control commands run in io-wq anyway (the kernel
        // refuses them non-blocking), and forcing it makes io_uring copy
        // the SQE when it is submitted.  Without it, Linux 6.12 punts the
        // command to io-wq still pointing at the SQ ring, where a later
        // submission may have rewritten the slot: seen as a SET_CREDIT
        // that failed with ENXIO (a garbage node id) in server-restart.
        let sqe = opcode::UringCmd80::new(types::Fd(self.dev.as_raw_fd()), cmd_op)
            .cmd(area)
            .build()
            .flags(squeue::Flags::ASYNC)
            .user_data(CTRL_TAG + token as u64);
        // The box's heap buffer does not move when the op moves into the slab.
        entry.insert(op);
        // SAFETY: the reply buffer is owned by the slab entry `token`, which
        // is removed only when this command's CQE is reaped in `drain`.
        if let Err(e) = unsafe { sys::push(&mut self.ring, &sqe) } {
            self.ctrl.remove(token);
            return Err(e);
        }
        Ok(CtrlToken(token))
    }

    /// Submit a control command with an arbitrary `cmd_op` and command area
    /// and wait for its result (for tests of the kernel's validation).
    ///
    /// # Errors
    ///
    /// [`Error::Command`] with the kernel's errno, ring errors.
    ///
    /// # Safety
    ///
    /// Any user address inside `area` (a `reply_addr`) must be 0 or valid
    /// for the kernel to write the command's reply record to.
    pub unsafe fn raw_control(
        &mut self,
        cmd_op: u32,
        area: [u8; CTRL_CMD_SIZE],
    ) -> Result<i32, Error> {
        let op = CtrlOp {
            name: ctrl_name(cmd_op),
            reply: Box::new([]),
        };
        // SAFETY: forwarded from this function's contract.
        let token = unsafe { self.submit_raw_control(cmd_op, area, op) }?;
        self.wait_control(token)?.result
    }

    /// Submit a hot-path command with an arbitrary `cmd_op` and payload on
    /// behalf of `slot` (for tests).  Its failure arrives as
    /// [`Completion::SlotFailed`].
    ///
    /// # Errors
    ///
    /// Ring errors.
    pub fn raw_io(&mut self, cmd_op: u32, payload: [u8; 16], slot: u16) -> Result<(), Error> {
        let sqe = opcode::UringCmd16::new(types::Fd(self.dev.as_raw_fd()), cmd_op)
            .cmd(payload)
            .build()
            .user_data(u64::from(slot))
            .into();
        sys::push_no_buffers(&mut self.ring, &sqe)
    }

    /// Watch `fd` for readability (one shot): when it is readable,
    /// [`Transport::wait`] reports [`Completion::Readable`] with `token`.
    /// This is how a server loop that sleeps in the ring learns of signals
    /// (an eventfd) or other work.
    ///
    /// # Errors
    ///
    /// Ring errors.
    pub fn watch(&mut self, fd: std::os::fd::BorrowedFd<'_>, token: u32) -> Result<(), Error> {
        let sqe = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(WATCH_TAG + u64::from(token))
            .into();
        sys::push_no_buffers(&mut self.ring, &sqe)
    }

    /// Watch the device for queued events (one shot), as
    /// [`Transport::watch`] does for other descriptors: the loop then
    /// sleeps until an event arrives instead of polling on a tick.  When
    /// the server is torn down the watch fires too; check
    /// [`crate::poll_hung_up`].
    ///
    /// # Errors
    ///
    /// Ring errors.
    pub fn watch_events(&mut self, token: u32) -> Result<(), Error> {
        let sqe = opcode::PollAdd::new(types::Fd(self.dev.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(WATCH_TAG + u64::from(token))
            .into();
        sys::push_no_buffers(&mut self.ring, &sqe)
    }

    /// Map the memory of the attached node `info` read-only (needs
    /// `MM_UPCALL_F_NODE_MMAP`).
    ///
    /// # Errors
    ///
    /// [`Error::NodeMmap`].
    pub fn map_node(&self, info: &raw::NodeInfo) -> Result<sys::NodeMap, Error> {
        sys::NodeMap::map(self.dev.as_fd(), info)
    }

    /// Submit a control command and wait for it, keeping every other
    /// completion for the next [`Transport::wait`].
    ///
    /// # Errors
    ///
    /// Ring errors; the command's own result is in the outcome.
    pub fn control_sync(&mut self, ctrl: Control) -> Result<ControlOutcome, Error> {
        let token = self.submit_control(ctrl)?;
        self.wait_control(token)
    }

    fn wait_control(&mut self, token: CtrlToken) -> Result<ControlOutcome, Error> {
        loop {
            if let Some(i) = self
                .ready
                .iter()
                .position(|c| matches!(c, Completion::Control { token: t, .. } if *t == token))
            {
                match self.ready.remove(i) {
                    Some(Completion::Control { outcome, .. }) => return Ok(outcome),
                    _ => unreachable!("position() matched a Control"),
                }
            }
            self.submit_and_wait()?;
            self.drain();
        }
    }

    fn submit_and_wait(&mut self) -> Result<(), Error> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(Error::Enter(e)),
            }
        }
    }

    fn drain(&mut self) {
        let cqes: Vec<cqueue::Entry> = self.ring.completion().collect();
        for cqe in cqes {
            let c = self.complete(cqe.user_data(), cqe.result());
            self.ready.push_back(c);
        }
    }

    fn complete(&mut self, user_data: u64, res: i32) -> Completion {
        if user_data >= WATCH_TAG {
            return Completion::Readable {
                token: (user_data - WATCH_TAG) as u32,
                result: res,
            };
        }
        if user_data >= CTRL_TAG {
            let token = (user_data - CTRL_TAG) as usize;
            let op = self.ctrl.try_remove(token).unwrap_or(CtrlOp {
                name: "unknown control command",
                reply: Box::new([]),
            });
            let result = if res >= 0 {
                Ok(res)
            } else {
                Err(Error::command(op.name, res))
            };
            return Completion::Control {
                token: CtrlToken(token),
                outcome: ControlOutcome {
                    name: op.name,
                    result,
                    reply: op.reply,
                },
            };
        }
        let slot = user_data as u16;
        if res == -libc::ENODEV || res == -libc::ECANCELED {
            return Completion::Teardown { slot };
        }
        if res < 0 {
            return Completion::SlotFailed {
                slot,
                error: Error::command("FETCH/COMMIT_AND_FETCH", res),
            };
        }
        let Some(descs) = self.descs.as_ref() else {
            // A FETCH cannot succeed before HELLO; treat it as a protocol error.
            return Completion::SlotFailed {
                slot,
                error: Error::command("FETCH", -libc::EPROTO),
            };
        };
        if slot >= self.hello.queue_depth {
            return Completion::SlotFailed {
                slot,
                error: Error::command("FETCH", -libc::ERANGE),
            };
        }
        let desc = descs.read(slot);
        match Request::from_raw(&desc) {
            Ok(request) => Completion::Upcall { slot, request },
            Err(error) => Completion::Malformed {
                slot,
                seq: desc.seq,
                error,
            },
        }
    }

    /// Submit what is queued, wait for at least one completion and move
    /// every available completion into `out`.
    ///
    /// # Errors
    ///
    /// [`Error::Enter`].
    pub fn wait(&mut self, out: &mut Vec<Completion>) -> Result<(), Error> {
        if self.ready.is_empty() {
            self.submit_and_wait()?;
        } else {
            self.flush()?;
        }
        self.drain();
        out.extend(self.ready.drain(..));
        Ok(())
    }

    /// As [`Transport::wait`], but return after `timeout` even if nothing
    /// completed (for servers with periodic work).
    ///
    /// # Errors
    ///
    /// [`Error::Enter`].
    pub fn wait_timeout(
        &mut self,
        out: &mut Vec<Completion>,
        timeout: std::time::Duration,
    ) -> Result<(), Error> {
        if self.ready.is_empty() {
            let ts = types::Timespec::from(timeout);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                    ) => {}
                Err(e) => return Err(Error::Enter(e)),
            }
        } else {
            self.flush()?;
        }
        self.drain();
        out.extend(self.ready.drain(..));
        Ok(())
    }

    /// Read the events queued now (non-blocking); empty when none.
    ///
    /// # Errors
    ///
    /// The read's error (other than `EAGAIN`); malformed events are
    /// returned as `Err` items.
    pub fn read_events(&self) -> io::Result<Vec<Result<Event, DecodeError>>> {
        let mut buf = vec![0u8; 256 * event::EVENT_SIZE];
        let n = match (&self.dev).read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(event::decode_batch(&buf[..n]).collect())
    }
}

/// Dropping a transport with control commands in flight is sound: their
/// reply buffers are owned by the transport, and the kernel may still be
/// writing one (control commands run in io-wq workers, which closing the
/// ring does not stop at once).  So the drop first waits, up to
/// [`DROP_WAIT`], for those commands to complete; a buffer whose command
/// is still in flight after that is leaked, never freed, and the command's
/// result is lost (the command itself runs or is cancelled by the kernel
/// as the device closes).  Upcalls waiting in slots are answered by the
/// kernel's timeout; nothing else is left behind.
impl Drop for Transport {
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + DROP_WAIT;
        while !self.ctrl.is_empty() && std::time::Instant::now() < deadline {
            let ts = types::Timespec::from(std::time::Duration::from_millis(10));
            let args = types::SubmitArgs::new().timespec(&ts);
            if let Err(e) = self.ring.submitter().submit_with_args(1, &args)
                && !matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                )
            {
                break;
            }
            // Completing a command frees its slab entry (and buffer).
            self.drain();
        }
        for op in self.ctrl.drain() {
            // The kernel may still write it: leak it.
            std::mem::forget(op.reply);
        }
    }
}

/// How long dropping a [`Transport`] waits for its control commands.
pub const DROP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A ring for one queue.  One thread drives it, so the kernel can queue
/// our completions (the upcalls) as local work that runs when we wait,
/// instead of interrupting us with task-work signals.
fn new_ring(depth: u16) -> Result<IoUring<squeue::Entry128, cqueue::Entry>, Error> {
    let entries = (u32::from(depth) + 16).next_power_of_two();
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
        .map_err(Error::Ring)
}

/// Opens the other queues of a negotiated server.  Create the queue's
/// [`Transport`] in the thread that serves it: its ring accepts
/// submissions from that thread only.
#[derive(Debug)]
pub struct QueueOpener {
    dev: File,
    hello: HelloReply,
}

impl QueueOpener {
    /// Open queue `q_id` (1..nr_queues): its own ring, descriptor mapping
    /// and armed slots.
    ///
    /// # Errors
    ///
    /// [`Error::Command`] with `ERANGE` for a queue that was not
    /// negotiated; ring and mapping errors.
    pub fn open(&self, q_id: u16) -> Result<Transport, Error> {
        if q_id == 0 || q_id >= self.hello.nr_queues {
            return Err(Error::command("open queue", -libc::ERANGE));
        }
        let dev = self.dev.try_clone().map_err(|source| Error::Open {
            path: DEVICE_PATH.to_string(),
            source,
        })?;
        let mut t = Transport {
            dev,
            q_id,
            ring: new_ring(self.hello.queue_depth)?,
            descs: None,
            hello: self.hello,
            ctrl: Slab::new(),
            ready: VecDeque::new(),
        };
        t.arm()?;
        Ok(t)
    }
}

/// Decode a PING reply from a control outcome.
///
/// # Errors
///
/// The command's error, or [`Error::Decode`].
pub fn ping_reply(outcome: ControlOutcome) -> Result<raw::PingReply, Error> {
    outcome.result?;
    Ok(control::decode_ping_reply(&outcome.reply)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_an_open_error_with_the_path() {
        let cfg = Config {
            path: "/nonexistent/mm_upcall".into(),
            ..Config::default()
        };
        match Transport::open(&cfg) {
            Err(Error::Open { path, source }) => {
                assert_eq!(path, "/nonexistent/mm_upcall");
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            }
            other => panic!("expected Error::Open, got {other:?}"),
        }
    }

    #[test]
    fn control_tags_never_collide_with_slot_numbers() {
        assert!(u64::from(raw::MAX_QUEUE_DEPTH) < CTRL_TAG);
        assert!(u64::from(u16::MAX) < CTRL_TAG);
        // Slab keys stay far below 2^32, so control tags stay below watches.
        assert_eq!(WATCH_TAG - CTRL_TAG, 1 << 32);
    }

    #[test]
    fn control_names_cover_every_control_opcode() {
        for (op, name) in raw::ctrl_op::ALL {
            assert_eq!(ctrl_name(op), name);
        }
        assert_eq!(ctrl_name(0), "control command");
    }
}
