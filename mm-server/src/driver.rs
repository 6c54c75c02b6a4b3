//! The driver: the io_uring loop that carries the [`Core`]'s decisions to
//! the kernel and the kernel's news to the core.  All the server's logic
//! is in the core; this module does only I/O.
//!
//! One thread, one ring.  The loop sleeps in the ring and wakes for an
//! upcall, a control command's completion, the device becoming readable
//! (events queued), a stop signal, or the tick.  Each turn:
//!
//! 1. answer every upcall with the core's verdict;
//! 2. hand the completed control commands to the core;
//! 3. read every queued event into the core, then
//!    [`Core::events_applied`];
//! 4. measure pages the core asks for (LZ4 through the read-only node
//!    mapping) for at most `MEASURE_SLICE` (3 ms);
//! 5. on the tick: the free memory of the fast nodes, [`Core::tick`], and
//!    a new metrics snapshot for the admin socket;
//! 6. submit the control commands the core asked for.
//!
//! The loop ends when the core's [`Phase`] is `Done` (after the drain that
//! the first SIGINT/SIGTERM starts) or on a fatal error.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::fd::AsFd as _;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use mm_upcall_kernel::proto::control::{Control, decode_node_info};
use mm_upcall_kernel::proto::raw::{self, NodeInfo};
use mm_upcall_kernel::proto::verdict::Verdict;
use mm_upcall_kernel::{Completion, ControlOutcome, CtrlToken, NodeMap, PAGE_SIZE, Transport};

use crate::capacity::{self, NodeAccount};
use crate::config::Config;
use crate::core::{CmdId, Core, CoreConfig, Move, MoveRefused, NodeRefused, Phase, RuntimePolicy};
use crate::metrics::Snapshot;

/// Features the server needs from the kernel.
pub const FEATURES: raw::Features = raw::Features::WRITE_FAULT
    .union(raw::Features::HINT_FAULT)
    .union(raw::Features::DEMOTE_CREDIT)
    .union(raw::Features::EVENTS)
    .union(raw::Features::NODE_MMAP);

/// Longest measuring slice per turn.
const MEASURE_SLICE: Duration = Duration::from_millis(3);
/// Longest sleep while draining (the drain has deadlines of its own).
const DRAIN_WAIT: Duration = Duration::from_millis(10);
/// Token of the stop signals' watch.
const STOP_TOKEN: u32 = 0;
/// Token of the device's watch (events queued).
const EVENTS_TOKEN: u32 = 1;
/// Token of the client requests' wake-up socket.
const REQUESTS_TOKEN: u32 = 2;
/// How long a client thread waits for the loop to answer it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a client-socket thread asks of the core; the loop answers between
/// two turns, after reading the kernel's events.
#[derive(Debug)]
enum Request {
    BeginMove {
        pages: u64,
        reply: mpsc::SyncSender<Result<Move, MoveRefused>>,
    },
    EndMove {
        ticket: u64,
    },
    Sizes {
        nid: u16,
        pfns: Vec<u64>,
        reply: mpsc::SyncSender<Vec<Option<u32>>>,
    },
    Drain {
        nid: u16,
        reply: mpsc::SyncSender<Result<(), NodeRefused>>,
    },
    Aged {
        nid: u16,
        min_age_s: u32,
        max: usize,
        reply: mpsc::SyncSender<Vec<u64>>,
    },
    Evict {
        nid: u16,
        pfns: Vec<u64>,
        reply: mpsc::SyncSender<Result<(), NodeRefused>>,
    },
    Costed {
        nid: u16,
        from_pfn: u64,
        max: usize,
        reply: mpsc::SyncSender<(Vec<crate::capacity::Costed>, Option<u64>)>,
    },
    PolicyGet {
        nid: u16,
        reply: mpsc::SyncSender<Result<RuntimePolicy, NodeRefused>>,
    },
    PolicySet {
        policy: RuntimePolicy,
        reply: mpsc::SyncSender<Result<(), &'static str>>,
    },
}

/// How client-socket threads reach the core, which the loop owns: a
/// request queue and a socket whose byte wakes the loop.  Cheap to clone.
#[derive(Debug, Clone)]
pub struct CoreHandle {
    tx: mpsc::Sender<Request>,
    wake: Arc<UnixStream>,
    /// The managed nodes (`Cold` moves go to the first).
    pub managed: Vec<u16>,
    /// The node `Hot` moves go to.
    pub fast: u16,
}

impl CoreHandle {
    /// A **fake loop** for host tests of the client socket: a thread
    /// answers the requests from `core`, with no kernel and no clock (time
    /// stands at `now`).
    ///
    /// # Errors
    ///
    /// The socket pair or the thread could not be created.
    pub fn fake_loop(mut core: Core, now: u64) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let (wake, _) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        let handle = Self {
            tx,
            wake: Arc::new(wake),
            managed: core.nodes().iter().map(|n| n.nid).collect(),
            fast: core.fast_nodes()[0],
        };
        std::thread::Builder::new()
            .name("fake-loop".into())
            .spawn(move || {
                while let Ok(r) = rx.recv() {
                    answer(&mut core, r, now);
                }
            })?;
        Ok(handle)
    }
}

/// Answer one client request from the core.
fn answer(core: &mut Core, r: Request, now: u64) {
    match r {
        Request::BeginMove { pages, reply } => {
            let r = core.begin_move(pages, now);
            // A thread that stopped waiting never ends it: end it here.
            if reply.send(r).is_err()
                && let Ok(m) = r
            {
                core.end_move(m.ticket);
            }
        }
        Request::EndMove { ticket } => core.end_move(ticket),
        Request::Sizes { nid, pfns, reply } => {
            let sizes = pfns.iter().map(|&p| core.page_size(nid, p)).collect();
            let _ = reply.send(sizes);
        }
        Request::Drain { nid, reply } => {
            let _ = reply.send(core.drain_node(nid, now));
        }
        Request::Aged {
            nid,
            min_age_s,
            max,
            reply,
        } => {
            let _ = reply.send(core.aged_pages(nid, min_age_s, max));
        }
        Request::Evict { nid, pfns, reply } => {
            let _ = reply.send(core.evict_queued(nid, pfns, now));
        }
        Request::Costed {
            nid,
            from_pfn,
            max,
            reply,
        } => {
            let _ = reply.send(core.costed_pages(nid, from_pfn, max));
        }
        Request::PolicyGet { nid, reply } => {
            let _ = reply.send(core.policy_get(nid));
        }
        Request::PolicySet { policy, reply } => {
            let _ = reply.send(core.policy_set(&policy, now));
        }
    }
}

/// The loop's end of a [`CoreHandle`].
struct Inbox {
    rx: mpsc::Receiver<Request>,
    wake: UnixStream,
}

impl CoreHandle {
    fn send(&self, r: Request) -> std::io::Result<()> {
        self.tx
            .send(r)
            .map_err(|_| std::io::Error::other("mm-server is stopping"))?;
        // A full socket already holds a wake-up: nothing is lost.
        match (&*self.wake).write(&[1]) {
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(()),
        }
    }

    fn wait<T>(rx: &mpsc::Receiver<T>) -> std::io::Result<T> {
        rx.recv_timeout(REQUEST_TIMEOUT).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "mm-server's loop did not answer (stopping or overloaded)",
            )
        })
    }

    /// Reserve room for moving up to `pages` pages onto a managed node
    /// ([`Core::begin_move`]); end every reservation with
    /// [`Self::end_move`] after the move.  A reservation whose answer
    /// comes too late is ended by the loop itself.
    ///
    /// # Errors
    ///
    /// The loop is stopping or did not answer in time.
    pub fn begin_move(&self, pages: u64) -> std::io::Result<Result<Move, MoveRefused>> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Request::BeginMove { pages, reply })?;
        Self::wait(&rx)
    }

    /// The move of `ticket` ended (its pages' events are queued: the loop
    /// reads them before releasing the reservation).
    pub fn end_move(&self, ticket: u64) {
        // A stopping loop releases everything anyway.
        let _ = self.send(Request::EndMove { ticket });
    }

    /// Start draining node `nid` ([`Core::drain_node`]).
    ///
    /// # Errors
    ///
    /// The loop is stopping or did not answer in time.
    pub fn drain(&self, nid: u16) -> std::io::Result<Result<(), NodeRefused>> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Request::Drain { nid, reply })?;
        Self::wait(&rx)
    }

    /// Pages of node `nid` at least `min_age_s` old ([`Core::aged_pages`]).
    ///
    /// # Errors
    ///
    /// The loop is stopping or did not answer in time.
    pub fn aged(&self, nid: u16, min_age_s: u32, max: usize) -> std::io::Result<Vec<u64>> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Request::Aged {
            nid,
            min_age_s,
            max,
            reply,
        })?;
        Self::wait(&rx)
    }

    /// About `max` resident pages of node `nid` from `from_pfn` on, with
    /// their cost and age, and where to go on ([`Core::costed_pages`]).
    ///
    /// # Errors
    ///
    /// The loop is stopping or did not answer in time.
    pub fn costed(
        &self,
        nid: u16,
        from_pfn: u64,
        max: usize,
    ) -> std::io::Result<(Vec<crate::capacity::Costed>, Option<u64>)> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Request::Costed {
            nid,
            from_pfn,
            max,
            reply,
        })?;
        Self::wait(&rx)
    }

    /// Queue `pfns` of node `nid` for eviction ([`Core::evict_queued`]).
    ///
    /// # Errors
    ///
    /// The loop is stopping or did not answer in time.
    pub fn evict(&self, nid: u16, pfns: Vec<u64>) -> std::io::Result<Result<(), NodeRefused>> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Request::Evict { nid, pfns, reply })?;
        Self::wait(&rx)
    }

    /// The run-time policy ([`Core::policy_get`]).
    ///
    /// # Errors
    ///
    /// The loop is stopping or did not answer in time.
    pub fn policy_get(&self, nid: u16) -> std::io::Result<Result<RuntimePolicy, NodeRefused>> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Request::PolicyGet { nid, reply })?;
        Self::wait(&rx)
    }

    /// Set the run-time policy ([`Core::policy_set`]).
    ///
    /// # Errors
    ///
    /// The loop is stopping or did not answer in time.
    pub fn policy_set(&self, policy: RuntimePolicy) -> std::io::Result<Result<(), &'static str>> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Request::PolicySet { policy, reply })?;
        Self::wait(&rx)
    }

    /// The measured sizes of pages `pfns` of managed node `nid`.
    ///
    /// # Errors
    ///
    /// The loop is stopping or did not answer in time.
    pub fn sizes(&self, nid: u16, pfns: Vec<u64>) -> std::io::Result<Vec<Option<u32>>> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Request::Sizes { nid, pfns, reply })?;
        Self::wait(&rx)
    }
}

/// The metrics snapshot the admin socket serves: replaced on every tick;
/// readers clone the `Arc` under the lock and render outside it.
pub type Published = Arc<Mutex<Arc<Snapshot>>>;

fn errno_of(out: &ControlOutcome) -> i32 {
    match &out.result {
        Ok(v) => *v,
        Err(e) => e.errno(),
    }
}

fn os_error(errno: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(-errno)
}

/// Open the device, retrying while a previous server is still going away.
fn open(cfg: &Config) -> Result<Transport> {
    let tcfg = mm_upcall_kernel::Config {
        path: cfg.server.device.display().to_string(),
        nr_queues: 1,
        queue_depth: cfg.server.queue_depth,
        timeout_ms: cfg.server.timeout_ms,
        features: FEATURES,
        required: FEATURES,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Transport::open(&tcfg) {
            Ok(t) => return Ok(t),
            Err(e) if e.is_busy() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) if e.is_busy() => {
                return Err(e)
                    .context(format!("another server holds {}: stop it first", tcfg.path));
            }
            Err(mm_upcall_kernel::Error::Features { missing }) => bail!(
                "the kernel lacks features {missing:?} that mm-server needs: \
                 boot a kernel with the whole kernel-upcall series"
            ),
            Err(e) => return Err(e).context(format!("cannot open {}", tcfg.path)),
        }
    }
}

/// The nodes among `nids` whose free memory is under 2 % of their total
/// (`/sys/devices/system/node/node<N>/meminfo`); unreadable ones are not
/// reported short.
fn low_on_memory(nids: &[u16]) -> Vec<u16> {
    let kb = |text: &str, key: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.split_whitespace().nth(2) == Some(key))?
            .split_whitespace()
            .nth(3)?
            .parse()
            .ok()
    };
    nids.iter()
        .copied()
        .filter(|n| {
            let path = format!("/sys/devices/system/node/node{n}/meminfo");
            let Ok(text) = std::fs::read_to_string(path) else {
                return false;
            };
            matches!(
                (kb(&text, "MemFree:"), kb(&text, "MemTotal:")),
                (Some(free), Some(total)) if free * 50 < total
            )
        })
        .collect()
}

fn attach(t: &mut Transport, nid: u16) -> Result<NodeInfo> {
    let out = t.control_sync(Control::AttachNode {
        nid: u32::from(nid),
        credit_pages: 0,
        reply_addr: 0,
    })?;
    match errno_of(&out) {
        0.. => Ok(decode_node_info(&out.reply)?),
        e if e == -libc::ENXIO => bail!(
            "ATTACH_NODE {nid}: node {nid} does not exist, is offline or has no memory; \
             fix `nid` in [[node]]"
        ),
        e if e == -libc::EINVAL => {
            bail!("ATTACH_NODE {nid}: node {nid} has CPUs; a managed node must be memory-only")
        }
        e if e == -libc::EEXIST => bail!("ATTACH_NODE {nid}: node {nid} is attached already"),
        e => Err(os_error(e)).context(format!("ATTACH_NODE {nid}")),
    }
}

/// The running server: the ring, the node mappings and the core.
pub struct Driver {
    t: Transport,
    core: Core,
    maps: Vec<NodeMap>,
    /// Control commands with the kernel: ring token to the core's id.
    tokens: HashMap<CtrlToken, CmdId>,
    stop: UnixStream,
    /// SIGUSR2 came: leave the nodes managed at stop.
    keep_nodes: Arc<std::sync::atomic::AtomicBool>,
    inbox: Inbox,
    handle: CoreHandle,
    /// The requests' socket polled readable.
    requests_waiting: bool,
    published: Published,
    epoch: Instant,
    page: Box<[u8; PAGE_SIZE]>,
}

impl Driver {
    /// Open the device, attach and map every configured node, and start
    /// the core (which begins by rebuilding the books with RESYNC).
    /// `stop` is the read end the signal handlers write a byte to.
    ///
    /// # Errors
    ///
    /// Opening the device, attaching or mapping a node; each error says
    /// what to fix.
    pub fn start(
        cfg: &Config,
        signals: crate::sys::StopSignals,
        published: Published,
    ) -> Result<Self> {
        let crate::sys::StopSignals {
            socket: stop,
            keep_nodes,
        } = signals;
        let mut t = open(cfg)?;
        let mut maps = Vec::new();
        let mut nodes = Vec::new();
        for n in &cfg.node {
            let info = attach(&mut t, n.nid)?;
            let map = t
                .map_node(&info)
                .with_context(|| format!("node {}", n.nid))?;
            let pages = usize::try_from(info.spanned_pages).context("node size")?;
            let account = NodeAccount::new(n.geometry(), info.start_pfn, pages)
                .with_context(|| format!("[[node]] nid {}", n.nid))?;
            tracing::info!(
                nid = n.nid,
                start_pfn = format_args!("{:#x}", info.start_pfn),
                pages = info.spanned_pages,
                capacity_mib = n.capacity_mib,
                "attached"
            );
            maps.push(map);
            nodes.push((n.nid, account));
        }
        let core_cfg = CoreConfig {
            policy: cfg.policy(),
            hot_window_ns: u64::from(cfg.policy.hot_window_ms) * 1_000_000,
            drain_timeout_ns: u64::from(cfg.server.drain_timeout_ms) * 1_000_000,
            detach_on_stop: cfg.server.detach_on_stop,
        };
        let epoch = Instant::now();
        let core = Core::new(core_cfg, nodes, 0).map_err(anyhow::Error::msg)?;
        stop.set_nonblocking(true).context("signal pipe")?;
        t.watch(stop.as_fd(), STOP_TOKEN)?;
        t.watch_events(EVENTS_TOKEN)?;
        let (tx, rx) = mpsc::channel();
        let (wake_r, wake_w) = UnixStream::pair().context("client request socket")?;
        wake_r.set_nonblocking(true)?;
        wake_w.set_nonblocking(true)?;
        t.watch(wake_r.as_fd(), REQUESTS_TOKEN)?;
        let handle = CoreHandle {
            tx,
            wake: Arc::new(wake_w),
            managed: core.nodes().iter().map(|n| n.nid).collect(),
            fast: core.fast_nodes()[0],
        };
        Ok(Self {
            t,
            core,
            maps,
            tokens: HashMap::new(),
            stop,
            keep_nodes,
            inbox: Inbox { rx, wake: wake_r },
            handle,
            requests_waiting: false,
            published,
            epoch,
            page: Box::new([0u8; PAGE_SIZE]),
        })
    }

    /// The handle client-socket threads reach the core with.
    pub fn handle(&self) -> CoreHandle {
        self.handle.clone()
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Serve until the core is done (after a stop signal and the drain).
    ///
    /// # Errors
    ///
    /// The transport failed, the kernel tore the server down, or the core
    /// gave up (its reason).
    pub fn run(&mut self) -> Result<()> {
        let mut batch = Vec::new();
        self.submit_commands()?;
        while self.core.phase() != Phase::Done {
            let now = self.now();
            let mut wait = Duration::from_nanos(self.core.wait_ns(now));
            if self.core.phase() != Phase::Serving {
                wait = wait.min(DRAIN_WAIT);
            }
            self.t.wait_timeout(&mut batch, wait)?;
            for c in batch.drain(..) {
                self.complete(c)?;
            }
            self.t.flush()?;
            self.read_events()?;
            let now = self.now();
            self.core.events_applied(now);
            if std::mem::take(&mut self.requests_waiting) {
                self.requests()?;
            }
            if let Some(why) = self.core.take_fatal() {
                bail!(why);
            }
            self.measure();
            let now = self.now();
            if self.core.tick_due(now) {
                let low = low_on_memory(self.core.fast_nodes());
                self.core.tick(now, low);
                self.publish(now);
            }
            if self.core.take_ready() {
                match crate::sys::notify_ready() {
                    Ok(true) => tracing::info!("serving; READY=1 sent to systemd"),
                    Ok(false) => tracing::info!("serving"),
                    Err(e) => tracing::warn!("serving, but READY=1 could not be sent: {e}"),
                }
            }
            self.submit_commands()?;
        }
        self.publish(self.now());
        Ok(())
    }

    fn complete(&mut self, c: Completion) -> Result<()> {
        match c {
            Completion::Upcall { slot, request } => {
                let t0 = Instant::now();
                let v = self.core.upcall(&request.upcall, self.now());
                self.t.commit(slot, request.seq, v)?;
                self.core.observe_latency(t0.elapsed().as_nanos() as u64);
            }
            Completion::Malformed { slot, seq, error } => {
                self.core.malformed();
                tracing::warn!(slot, seq, "malformed upcall ({error}): answered DEFAULT");
                self.t.commit(slot, seq, Verdict::Default)?;
            }
            Completion::SlotFailed { slot, error } => {
                self.core.slot_failed();
                tracing::warn!(slot, "slot failed ({error}): re-arming");
                self.t.fetch(slot)?;
            }
            Completion::Control { token, outcome } => {
                if let Some(id) = self.tokens.remove(&token) {
                    let now = self.now();
                    self.core.completed(id, errno_of(&outcome), now);
                }
            }
            Completion::Teardown { .. } => {
                bail!("the kernel tore the server down (another server took the device?)")
            }
            Completion::Readable { token, result } => {
                if result < 0 {
                    bail!("watching a descriptor failed: {}", os_error(result));
                }
                match token {
                    STOP_TOKEN => {
                        let mut count = crate::sys::drain_signals(&self.stop).max(1);
                        let now = self.now();
                        if self
                            .keep_nodes
                            .swap(false, std::sync::atomic::Ordering::AcqRel)
                        {
                            // SIGUSR2: a stop that keeps the nodes, and
                            // never the second signal that hurries a drain.
                            let serving = self.core.serving();
                            self.core.keep_nodes_on_stop();
                            count = count - 1 + u64::from(serving);
                        }
                        if count > 0 {
                            self.core.signal(count, now);
                        }
                        self.t.watch(self.stop.as_fd(), STOP_TOKEN)?;
                    }
                    REQUESTS_TOKEN => {
                        crate::sys::drain_signals(&self.inbox.wake);
                        self.requests_waiting = true;
                        self.t.watch(self.inbox.wake.as_fd(), REQUESTS_TOKEN)?;
                    }
                    EVENTS_TOKEN => {
                        if mm_upcall_kernel::poll_hung_up(self.t.device().as_fd()) {
                            bail!("the kernel tore the server down (the event queue hung up)");
                        }
                        // Re-armed before reading, so that an event queued
                        // after the read wakes the next wait.
                        self.t.watch_events(EVENTS_TOKEN)?;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Answer the client threads' requests: those queued now, after
    /// reading every event queued by then, so that a move's `PLACED`
    /// reports are in the books before its reservation is released.
    fn requests(&mut self) -> Result<()> {
        let queued: Vec<Request> = self.inbox.rx.try_iter().collect();
        if queued.is_empty() {
            return Ok(());
        }
        self.read_events()?;
        let now = self.now();
        self.core.events_applied(now);
        for r in queued {
            answer(&mut self.core, r, now);
        }
        Ok(())
    }

    /// Apply every queued event to the core.
    fn read_events(&mut self) -> Result<()> {
        let now = self.now();
        self.core.clock(now);
        loop {
            let batch = self.t.read_events().context("read events")?;
            if batch.is_empty() {
                return Ok(());
            }
            for e in batch {
                match e {
                    Ok(ev) => self.core.event(&ev),
                    Err(err) => {
                        tracing::warn!("malformed event ({err}): resyncing");
                        self.core.event_undecodable();
                    }
                }
            }
        }
    }

    /// Measure the pages the core asks for, for at most [`MEASURE_SLICE`].
    fn measure(&mut self) {
        let t0 = Instant::now();
        while let Some((i, pfn)) = self.core.pop_measure() {
            let bytes = self.maps[i].read_page(pfn, &mut self.page).then(|| {
                let g = *self.core.nodes()[i].account.geometry();
                capacity::measure(&g, &self.page[..])
            });
            self.core.measured(i, pfn, bytes);
            if t0.elapsed() >= MEASURE_SLICE {
                return;
            }
        }
    }

    fn submit_commands(&mut self) -> Result<()> {
        while let Some((id, ctrl)) = self.core.poll_command() {
            let token = self.t.submit_control(ctrl)?;
            self.tokens.insert(token, id);
        }
        Ok(())
    }

    fn publish(&self, now: u64) {
        let snap = Arc::new(self.core.snapshot(now));
        *self
            .published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = snap;
    }
}
