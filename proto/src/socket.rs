//! Frames of the client/admin Unix socket of mm-server.
//!
//! Every frame is a 16-byte [`FrameHeader`] followed by a fixed-size payload
//! whose length is determined by the opcode.  The first frame a client sends
//! must be `Hello`; the server answers `HelloReply` with the version it
//! chose, or `Error(BadVersion)`.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{DecodeError, read_prefix, reserved_zero};

/// Frame magic, `"MMUP"` read as a native-endian `u32` on little-endian.
pub const MAGIC: u32 = 0x5055_4d4d;
/// Version of the frame format carried in every header.
pub const VERSION: u16 = 1;
/// Lowest and highest socket protocol versions this crate speaks.
pub const MIN_VERSION: u16 = 1;
pub const MAX_VERSION: u16 = 1;

/// Frame opcodes.
pub mod op {
    pub const HELLO: u16 = 1;
    pub const HELLO_REPLY: u16 = 2;
    pub const ADVISE: u16 = 3;
    pub const RESIDENCY: u16 = 4;
    pub const RESIDENCY_REPLY: u16 = 5;
    pub const STATS: u16 = 6;
    pub const STATS_REPLY: u16 = 7;
    pub const OK: u16 = 8;
    pub const ERROR: u16 = 9;
    pub const METRICS: u16 = 10;
    pub const METRICS_REPLY: u16 = 11;
    pub const ADVISE_REPLY: u16 = 12;
    pub const DRAIN: u16 = 13;
    pub const EVICT: u16 = 14;
    pub const EVICT_REPLY: u16 = 15;
    pub const POLICY_GET: u16 = 16;
    pub const POLICY: u16 = 17;
    pub const POLICY_SET: u16 = 18;
}

/// Longest text a `MetricsReply` may carry.
pub const MAX_METRICS_TEXT: usize = 1 << 20;
/// Most pages one `Advise` or `Residency` request may cover (64 MiB of
/// 4 KiB pages); the client library splits longer ranges.
pub const MAX_REQUEST_PAGES: u64 = 16384;

macro_rules! record {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
    };
}

record!(
    /// Header of every frame.
    FrameHeader {
        magic: u32,
        version: u16,
        op: u16,
        /// Payload bytes after the header.
        len: u32,
        reserved: u32,
    }
);

record!(
    /// `Hello` payload: the versions the client speaks.
    HelloRec {
        min_version: u16,
        max_version: u16,
        reserved0: u32,
        features: u64,
    }
);

record!(
    /// `HelloReply` payload: the version the server chose.
    HelloReplyRec {
        version: u16,
        reserved0: u16,
        reserved1: u32,
        features: u64,
    }
);

record!(
    /// `Advise` payload.
    AdviseRec {
        /// Target process; 0 = the caller.
        pid: u32,
        advice: u32,
        addr: u64,
        len: u64,
        reserved: u64,
    }
);

record!(
    /// `AdviseReply` payload: what the server did with the range.
    AdviseReplyRec {
        /// Pages in the range.
        pages: u64,
        /// Pages the server moved (to the compressed node for `Cold`,
        /// off it for `Hot`).
        moved: u64,
        /// Pages already where the advice wants them.
        already: u64,
        /// Pages not moved: not present, not movable (pinned, shared, file
        /// pages), or no room on the compressed node.
        skipped: u64,
    }
);

record!(
    /// `Drain` and `PolicyGet` payload: a node.
    NodeRec {
        nid: u16,
        reserved0: u16,
        reserved1: u32,
    }
);

record!(
    /// `Evict` payload: evict pages of one memory cgroup that have been on
    /// node `nid` at least `min_age_s` seconds, the oldest first, at most
    /// `max_bytes` of memory.
    EvictRec {
        /// Inode number of the cgroup's directory (as `/proc/kpagecgroup`
        /// reports it).
        cgroup_ino: u64,
        max_bytes: u64,
        min_age_s: u32,
        nid: u16,
        reserved: u16,
    }
);

record!(
    /// `EvictReply` payload.
    EvictReplyRec {
        /// Pages queued for eviction.
        pages: u64,
        /// Pages of the node old enough (of any cgroup).
        aged: u64,
    }
);

record!(
    /// `Policy` and `PolicySet` payload: the run-time policy knobs, and the
    /// watermarks of node `nid` (percent of its capacity).
    PolicyRec {
        writable_budget: u64,
        promote_rate_limit_mbps: u64,
        credit_chunk_pages: u64,
        hot_window_ms: u32,
        nid: u16,
        hot_threshold: u8,
        low: u8,
        high: u8,
        critical: u8,
        reserved0: u16,
        reserved1: u32,
    }
);

impl PolicyRec {
    /// Check the knobs as the configuration file's are checked.
    ///
    /// # Errors
    ///
    /// The first problem, in the configuration's words.
    pub fn check(&self) -> Result<(), &'static str> {
        if !(10..=3_600_000).contains(&self.hot_window_ms) {
            return Err("policy.hot_window_ms must be 10..=3600000");
        }
        if self.hot_threshold == 0 {
            return Err("policy.hot_threshold must be at least 1");
        }
        if self.credit_chunk_pages == 0 {
            return Err("policy.credit_chunk_pages must be at least 1");
        }
        if self.promote_rate_limit_mbps == 0 {
            return Err("policy.promote_rate_limit_mbps must be at least 1");
        }
        if !(0 < self.low
            && self.low < self.high
            && self.high < self.critical
            && self.critical <= 100)
        {
            return Err("watermarks must be 0 < low < high < critical <= 100 (percent)");
        }
        Ok(())
    }
}

record!(
    /// `Residency` payload.
    ResidencyRec {
        pid: u32,
        reserved: u32,
        addr: u64,
        len: u64,
    }
);

record!(
    /// One page of a `ResidencyReply`.
    PageResidency {
        /// The page's NUMA node, or a negative errno: `-ENOENT` not
        /// present (never touched, or swapped out), `-EFAULT` not mapped.
        node: i32,
        /// On a compressed node, the page's measured compressed size in
        /// bytes; [`SIZE_UNKNOWN`] elsewhere or not measured yet.
        bytes: u32,
    }
);

/// [`PageResidency::bytes`] of a page with no measured size.
pub const SIZE_UNKNOWN: u32 = u32::MAX;

record!(
    /// `StatsReply` payload: server counters.
    StatsRec {
        upcalls: u64,
        write_faults: u64,
        hint_faults: u64,
        credit_requests: u64,
        promotions: u64,
        placements: u64,
        denials: u64,
        evictions: u64,
        physical_used_bytes: u64,
        physical_capacity_bytes: u64,
        resident_pages: u64,
        zero_pages: u64,
    }
);

record!(
    /// `Error` payload.
    ErrorRec {
        /// A negative errno.
        errno: i32,
        code: u16,
        reserved: u16,
    }
);

/// Advice about a range of memory, after `madvise(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// Undo earlier advice: the kernel and the server decide as usual.
    Normal,
    /// Move the range off the compressed node now.
    Hot,
    /// Move the range to the compressed node now, within the server's
    /// capacity.
    Cold,
    /// Move the range off the compressed node now and keep it off while
    /// the advice stands.  The client library keeps it off by locking the
    /// range (`mlock(2)`); the server only moves it.
    KeepFast,
}

impl Advice {
    pub fn code(self) -> u32 {
        match self {
            Advice::Normal => 1,
            Advice::Hot => 2,
            Advice::Cold => 3,
            Advice::KeepFast => 4,
        }
    }

    /// The advice of a wire code.
    ///
    /// # Errors
    ///
    /// [`DecodeError::Unknown`] for a code no advice has.
    pub fn from_code(v: u32) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Advice::Normal,
            2 => Advice::Hot,
            3 => Advice::Cold,
            4 => Advice::KeepFast,
            other => {
                return Err(DecodeError::Unknown {
                    what: "advice",
                    value: other,
                });
            }
        })
    }
}

/// Error codes of an `Error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadVersion,
    BadFrame,
    PermissionDenied,
    Invalid,
    NotFound,
    Busy,
    Unsupported,
}

impl ErrorCode {
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::BadVersion => 1,
            ErrorCode::BadFrame => 2,
            ErrorCode::PermissionDenied => 3,
            ErrorCode::Invalid => 4,
            ErrorCode::NotFound => 5,
            ErrorCode::Busy => 6,
            ErrorCode::Unsupported => 7,
        }
    }

    fn from_code(v: u16) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => ErrorCode::BadVersion,
            2 => ErrorCode::BadFrame,
            3 => ErrorCode::PermissionDenied,
            4 => ErrorCode::Invalid,
            5 => ErrorCode::NotFound,
            6 => ErrorCode::Busy,
            7 => ErrorCode::Unsupported,
            other => {
                return Err(DecodeError::Unknown {
                    what: "error code",
                    value: other.into(),
                });
            }
        })
    }
}

/// A decoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    Hello {
        min_version: u16,
        max_version: u16,
        features: u64,
    },
    HelloReply {
        version: u16,
        features: u64,
    },
    /// Advice about `len` bytes at `addr` of process `pid` (0: the
    /// caller).
    Advise {
        pid: u32,
        advice: Advice,
        addr: u64,
        len: u64,
    },
    AdviseReply(AdviseReplyRec),
    /// Where each page of `len` bytes at `addr` of process `pid` lives.
    Residency {
        pid: u32,
        addr: u64,
        len: u64,
    },
    /// Admin: drain node `nid` (evict everything, then detach it).
    Drain {
        nid: u16,
    },
    /// Admin: evict a cgroup's old pages.
    Evict(EvictRec),
    EvictReply(EvictReplyRec),
    /// Admin: the policy, and node `nid`'s watermarks.
    PolicyGet {
        nid: u16,
    },
    Policy(PolicyRec),
    /// Admin: set the policy and node `nid`'s watermarks (validated as the
    /// configuration is).
    PolicySet(PolicyRec),
    /// `count` [`PageResidency`] records follow the header (use
    /// [`residency_pages`]); like `MetricsReply`, [`Frame::encode`]
    /// writes the header and the caller appends the records.
    ResidencyReply {
        count: u32,
    },
    Stats,
    StatsReply(StatsRec),
    Ok,
    Error {
        errno: i32,
        code: ErrorCode,
    },
    /// Ask for the server's metrics in the Prometheus text format.
    Metrics,
    /// The metrics: `len` bytes of UTF-8 text follow the header.  The text
    /// is the only variable-length payload of the protocol; [`Frame::encode`]
    /// writes the header and the caller appends the text.
    MetricsReply {
        len: u32,
    },
}

/// Size of the frame header.
pub const HEADER_SIZE: usize = core::mem::size_of::<FrameHeader>();
/// Size of the largest frame.
pub const MAX_FRAME_SIZE: usize = HEADER_SIZE + core::mem::size_of::<StatsRec>();

fn payload_len(op: u16) -> Option<usize> {
    Some(match op {
        op::HELLO => core::mem::size_of::<HelloRec>(),
        op::HELLO_REPLY => core::mem::size_of::<HelloReplyRec>(),
        op::ADVISE => core::mem::size_of::<AdviseRec>(),
        op::ADVISE_REPLY => core::mem::size_of::<AdviseReplyRec>(),
        op::RESIDENCY => core::mem::size_of::<ResidencyRec>(),
        op::DRAIN | op::POLICY_GET => core::mem::size_of::<NodeRec>(),
        op::EVICT => core::mem::size_of::<EvictRec>(),
        op::EVICT_REPLY => core::mem::size_of::<EvictReplyRec>(),
        op::POLICY | op::POLICY_SET => core::mem::size_of::<PolicyRec>(),
        op::STATS | op::OK => 0,
        op::STATS_REPLY => core::mem::size_of::<StatsRec>(),
        op::ERROR => core::mem::size_of::<ErrorRec>(),
        op::METRICS => 0,
        _ => return None,
    })
}

impl Frame {
    pub fn op(&self) -> u16 {
        match self {
            Frame::Hello { .. } => op::HELLO,
            Frame::HelloReply { .. } => op::HELLO_REPLY,
            Frame::Advise { .. } => op::ADVISE,
            Frame::AdviseReply(_) => op::ADVISE_REPLY,
            Frame::Residency { .. } => op::RESIDENCY,
            Frame::ResidencyReply { .. } => op::RESIDENCY_REPLY,
            Frame::Drain { .. } => op::DRAIN,
            Frame::Evict(_) => op::EVICT,
            Frame::EvictReply(_) => op::EVICT_REPLY,
            Frame::PolicyGet { .. } => op::POLICY_GET,
            Frame::Policy(_) => op::POLICY,
            Frame::PolicySet(_) => op::POLICY_SET,
            Frame::Stats => op::STATS,
            Frame::StatsReply(_) => op::STATS_REPLY,
            Frame::Ok => op::OK,
            Frame::Error { .. } => op::ERROR,
            Frame::Metrics => op::METRICS,
            Frame::MetricsReply { .. } => op::METRICS_REPLY,
        }
    }

    /// Whether a client sends this frame (a server sends the others).
    pub fn is_request(&self) -> bool {
        match self {
            Frame::Hello { .. }
            | Frame::Advise { .. }
            | Frame::Residency { .. }
            | Frame::Drain { .. }
            | Frame::Evict(_)
            | Frame::PolicyGet { .. }
            | Frame::PolicySet(_)
            | Frame::Stats
            | Frame::Metrics => true,
            Frame::HelloReply { .. }
            | Frame::AdviseReply(_)
            | Frame::ResidencyReply { .. }
            | Frame::EvictReply(_)
            | Frame::Policy(_)
            | Frame::StatsReply(_)
            | Frame::Ok
            | Frame::Error { .. }
            | Frame::MetricsReply { .. } => false,
        }
    }

    /// Encode into `out`; returns the number of bytes written.
    ///
    /// # Panics
    ///
    /// If `out` is shorter than [`MAX_FRAME_SIZE`].
    pub fn encode(&self, out: &mut [u8]) -> usize {
        fn put<T: IntoBytes + Immutable>(out: &mut [u8], op: u16, rec: Option<&T>) -> usize {
            let body = rec.map_or(&[][..], |r| r.as_bytes());
            let hdr = FrameHeader {
                magic: MAGIC,
                version: VERSION,
                op,
                len: body.len() as u32,
                reserved: 0,
            };
            out[..HEADER_SIZE].copy_from_slice(hdr.as_bytes());
            out[HEADER_SIZE..HEADER_SIZE + body.len()].copy_from_slice(body);
            HEADER_SIZE + body.len()
        }
        let op = self.op();
        match *self {
            Frame::Hello {
                min_version,
                max_version,
                features,
            } => put(
                out,
                op,
                Some(&HelloRec {
                    min_version,
                    max_version,
                    reserved0: 0,
                    features,
                }),
            ),
            Frame::HelloReply { version, features } => put(
                out,
                op,
                Some(&HelloReplyRec {
                    version,
                    features,
                    ..HelloReplyRec::default()
                }),
            ),
            Frame::Advise {
                pid,
                advice,
                addr,
                len,
            } => put(
                out,
                op,
                Some(&AdviseRec {
                    pid,
                    advice: advice.code(),
                    addr,
                    len,
                    reserved: 0,
                }),
            ),
            Frame::AdviseReply(r) => put(out, op, Some(&r)),
            Frame::Drain { nid } | Frame::PolicyGet { nid } => put(
                out,
                op,
                Some(&NodeRec {
                    nid,
                    ..NodeRec::default()
                }),
            ),
            Frame::Evict(r) => put(out, op, Some(&r)),
            Frame::EvictReply(r) => put(out, op, Some(&r)),
            Frame::Policy(r) | Frame::PolicySet(r) => put(out, op, Some(&r)),
            Frame::Residency { pid, addr, len } => put(
                out,
                op,
                Some(&ResidencyRec {
                    pid,
                    reserved: 0,
                    addr,
                    len,
                }),
            ),
            Frame::ResidencyReply { count } => {
                let hdr = FrameHeader {
                    magic: MAGIC,
                    version: VERSION,
                    op,
                    len: count * core::mem::size_of::<PageResidency>() as u32,
                    reserved: 0,
                };
                out[..HEADER_SIZE].copy_from_slice(hdr.as_bytes());
                HEADER_SIZE
            }
            Frame::Stats | Frame::Ok | Frame::Metrics => put::<ErrorRec>(out, op, None),
            Frame::MetricsReply { len } => {
                let hdr = FrameHeader {
                    magic: MAGIC,
                    version: VERSION,
                    op,
                    len,
                    reserved: 0,
                };
                out[..HEADER_SIZE].copy_from_slice(hdr.as_bytes());
                HEADER_SIZE
            }
            Frame::StatsReply(r) => put(out, op, Some(&r)),
            Frame::Error { errno, code } => put(
                out,
                op,
                Some(&ErrorRec {
                    errno,
                    code: code.code(),
                    reserved: 0,
                }),
            ),
        }
    }

    /// Decode and validate a frame header; returns the header and the total
    /// frame size, so a stream reader knows how much more to read.
    ///
    /// # Errors
    ///
    /// [`DecodeError::Short`], [`DecodeError::BadMagic`],
    /// [`DecodeError::BadVersion`], [`DecodeError::ReservedNonZero`],
    /// [`DecodeError::Unknown`] (opcode), [`DecodeError::BadLength`].
    pub fn decode_header(buf: &[u8]) -> Result<(FrameHeader, usize), DecodeError> {
        let h: FrameHeader = read_prefix(buf)?;
        if h.magic != MAGIC {
            return Err(DecodeError::BadMagic { got: h.magic });
        }
        if h.version != VERSION {
            return Err(DecodeError::BadVersion {
                got: h.version,
                min: VERSION,
                max: VERSION,
            });
        }
        reserved_zero("reserved", h.reserved.into())?;
        if h.op == op::METRICS_REPLY {
            if h.len as usize > MAX_METRICS_TEXT {
                return Err(DecodeError::BadLength {
                    op: h.op,
                    len: h.len,
                    expected: MAX_METRICS_TEXT as u32,
                });
            }
            return Ok((h, HEADER_SIZE + h.len as usize));
        }
        if h.op == op::RESIDENCY_REPLY {
            let rec = core::mem::size_of::<PageResidency>();
            let max = MAX_REQUEST_PAGES as usize * rec;
            if h.len as usize > max || !(h.len as usize).is_multiple_of(rec) {
                return Err(DecodeError::BadLength {
                    op: h.op,
                    len: h.len,
                    expected: max as u32,
                });
            }
            return Ok((h, HEADER_SIZE + h.len as usize));
        }
        let expected = payload_len(h.op).ok_or(DecodeError::Unknown {
            what: "frame opcode",
            value: h.op.into(),
        })?;
        if h.len as usize != expected {
            return Err(DecodeError::BadLength {
                op: h.op,
                len: h.len,
                expected: expected as u32,
            });
        }
        Ok((h, HEADER_SIZE + expected))
    }

    /// Decode one frame from the start of `buf`; returns it and the bytes
    /// it took.
    ///
    /// # Errors
    ///
    /// As [`Frame::decode_header`], plus payload errors: `Unknown` (hint
    /// kind, error code), `ReservedNonZero`, `Invalid` (empty version range).
    pub fn decode(buf: &[u8]) -> Result<(Frame, usize), DecodeError> {
        let (h, total) = Self::decode_header(buf)?;
        if buf.len() < total {
            return Err(DecodeError::Short {
                need: total,
                got: buf.len(),
            });
        }
        let p = &buf[HEADER_SIZE..total];
        let frame = match h.op {
            op::HELLO => {
                let r: HelloRec = read_prefix(p)?;
                reserved_zero("reserved0", r.reserved0.into())?;
                if r.min_version == 0 || r.min_version > r.max_version {
                    return Err(DecodeError::Invalid {
                        field: "min_version",
                        value: r.min_version.into(),
                    });
                }
                Frame::Hello {
                    min_version: r.min_version,
                    max_version: r.max_version,
                    features: r.features,
                }
            }
            op::HELLO_REPLY => {
                let r: HelloReplyRec = read_prefix(p)?;
                reserved_zero("reserved0", r.reserved0.into())?;
                reserved_zero("reserved1", r.reserved1.into())?;
                if !(MIN_VERSION..=MAX_VERSION).contains(&r.version) {
                    return Err(DecodeError::BadVersion {
                        got: r.version,
                        min: MIN_VERSION,
                        max: MAX_VERSION,
                    });
                }
                Frame::HelloReply {
                    version: r.version,
                    features: r.features,
                }
            }
            op::ADVISE => {
                let r: AdviseRec = read_prefix(p)?;
                reserved_zero("reserved", r.reserved)?;
                Frame::Advise {
                    pid: r.pid,
                    advice: Advice::from_code(r.advice)?,
                    addr: r.addr,
                    len: r.len,
                }
            }
            op::ADVISE_REPLY => Frame::AdviseReply(read_prefix(p)?),
            op::RESIDENCY => {
                let r: ResidencyRec = read_prefix(p)?;
                reserved_zero("reserved", r.reserved.into())?;
                Frame::Residency {
                    pid: r.pid,
                    addr: r.addr,
                    len: r.len,
                }
            }
            op::DRAIN | op::POLICY_GET => {
                let r: NodeRec = read_prefix(p)?;
                reserved_zero("reserved0", r.reserved0.into())?;
                reserved_zero("reserved1", r.reserved1.into())?;
                if h.op == op::DRAIN {
                    Frame::Drain { nid: r.nid }
                } else {
                    Frame::PolicyGet { nid: r.nid }
                }
            }
            op::EVICT => {
                let r: EvictRec = read_prefix(p)?;
                reserved_zero("reserved", r.reserved.into())?;
                Frame::Evict(r)
            }
            op::EVICT_REPLY => Frame::EvictReply(read_prefix(p)?),
            op::POLICY | op::POLICY_SET => {
                let r: PolicyRec = read_prefix(p)?;
                reserved_zero("reserved0", r.reserved0.into())?;
                reserved_zero("reserved1", r.reserved1.into())?;
                if h.op == op::POLICY {
                    Frame::Policy(r)
                } else {
                    Frame::PolicySet(r)
                }
            }
            op::RESIDENCY_REPLY => Frame::ResidencyReply {
                count: h.len / core::mem::size_of::<PageResidency>() as u32,
            },
            op::STATS => Frame::Stats,
            op::STATS_REPLY => Frame::StatsReply(read_prefix(p)?),
            op::OK => Frame::Ok,
            op::METRICS => Frame::Metrics,
            op::METRICS_REPLY => {
                if core::str::from_utf8(p).is_err() {
                    return Err(DecodeError::Invalid {
                        field: "metrics text",
                        value: p.len() as u64,
                    });
                }
                Frame::MetricsReply { len: h.len }
            }
            op::ERROR => {
                let r: ErrorRec = read_prefix(p)?;
                reserved_zero("reserved", r.reserved.into())?;
                if r.errno >= 0 {
                    return Err(DecodeError::Invalid {
                        field: "errno",
                        value: r.errno as u64,
                    });
                }
                Frame::Error {
                    errno: r.errno,
                    code: ErrorCode::from_code(r.code)?,
                }
            }
            // decode_header rejected every other opcode.
            other => {
                return Err(DecodeError::Unknown {
                    what: "frame opcode",
                    value: other.into(),
                });
            }
        };
        Ok((frame, total))
    }
}

/// The text of a decoded `MetricsReply` frame: the `len` bytes after the
/// header of `buf` (which [`Frame::decode`] checked are UTF-8).
pub fn metrics_text(buf: &[u8]) -> Option<&str> {
    let (h, total) = Frame::decode_header(buf).ok()?;
    if h.op != op::METRICS_REPLY || buf.len() < total {
        return None;
    }
    core::str::from_utf8(&buf[HEADER_SIZE..total]).ok()
}

/// The records of a decoded `ResidencyReply` frame (which
/// [`Frame::decode`] checked are whole).
pub fn residency_pages(buf: &[u8]) -> Option<&[PageResidency]> {
    let (h, total) = Frame::decode_header(buf).ok()?;
    if h.op != op::RESIDENCY_REPLY || buf.len() < total {
        return None;
    }
    <[PageResidency]>::ref_from_bytes(&buf[HEADER_SIZE..total]).ok()
}
