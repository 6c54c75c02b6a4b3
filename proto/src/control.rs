//! Control commands (URING_CMD with `IORING_SETUP_SQE128`) and their replies.
//!
//! A command's payload sits at the start of the 80-byte command area of the
//! SQE; every byte after it must be zero.  Commands with output write a reply
//! record to the user address in their `reply_addr` field.

use zerocopy::{FromBytes, IntoBytes};

use crate::raw::{self, API_VERSION, CTRL_CMD_SIZE, ctrl_op};
use crate::{DecodeError, read_prefix, reserved_zero};

/// A decoded control command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Version and feature negotiation; must come first.
    Hello {
        nr_queues: u16,
        queue_depth: u16,
        /// Longest time any task waits on the server; 0 = kernel default.
        timeout_ms: u32,
        /// `MM_UPCALL_F_*` wanted; the kernel masks unknown bits off.
        features: raw::Features,
        reply_addr: u64,
    },
    /// Make memory-only node `nid` a managed node with initial credit.
    AttachNode {
        nid: u32,
        credit_pages: u64,
        reply_addr: u64,
    },
    /// Release managed node `nid`.
    DetachNode { nid: u32 },
    /// Set the demotion credit of `nid` to `pages`.
    SetCredit { nid: u32, pages: u64 },
    /// Answer every write fault on managed node `nid` with `standing`,
    /// without asking, until replaced.
    SetStanding { nid: u32, standing: Standing },
    /// Migrate the folio at `pfn` off its managed node to `nid`.
    PromotePfn { pfn: u64, nid: u32 },
    /// Re-report every resident folio in a pfn range as PLACED.
    Resync {
        nid: u32,
        start_pfn: u64,
        nr_pages: u64,
    },
    /// Issue `nr_upcalls` synthetic upcalls from `nr_threads` kernel threads;
    /// with `events`, each also posts an `Event::Ping`.
    Ping {
        nr_upcalls: u32,
        nr_threads: u16,
        events: bool,
        reply_addr: u64,
    },
}

/// A node's standing verdict for write faults (`SET_STANDING`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Ask the server per fault (verdict 0).
    Ask,
    /// The kernel's default: promote to the faulting CPU's node.
    Default,
    /// Promote to node `nid` (a node that is not managed).
    Promote(u32),
}

impl Standing {
    /// `(verdict, arg)` of `struct mm_upcall_set_standing`.
    pub const fn raw(self) -> (u16, u32) {
        match self {
            Standing::Ask => (raw::verdict::NONE, 0),
            Standing::Default => (raw::verdict::DEFAULT, 0),
            Standing::Promote(nid) => (raw::verdict::PROMOTE, nid),
        }
    }

    /// The standing verdict of a `(verdict, arg)` pair.
    ///
    /// # Errors
    ///
    /// [`DecodeError::Invalid`] for any other verdict (`ALLOW_IN_PLACE`
    /// is never standing), or an `arg` where none is taken.
    pub fn from_raw(verdict: u16, arg: u32) -> Result<Self, DecodeError> {
        match (verdict, arg) {
            (raw::verdict::NONE, 0) => Ok(Standing::Ask),
            (raw::verdict::DEFAULT, 0) => Ok(Standing::Default),
            (raw::verdict::PROMOTE, nid) => Ok(Standing::Promote(nid)),
            (raw::verdict::NONE | raw::verdict::DEFAULT, a) => Err(DecodeError::Invalid {
                field: "arg",
                value: a.into(),
            }),
            (v, _) => Err(DecodeError::Invalid {
                field: "verdict",
                value: v.into(),
            }),
        }
    }
}

impl Control {
    /// Bytes of the reply record the kernel writes to the command's
    /// `reply_addr` (0: the command has none).  A transport sizes the reply
    /// buffer from this, never from its caller.
    pub const fn reply_len(&self) -> usize {
        match self {
            Control::Hello { .. } => size_of::<raw::HelloReply>(),
            Control::AttachNode { .. } => size_of::<raw::NodeInfo>(),
            Control::Ping { .. } => size_of::<raw::PingReply>(),
            Control::DetachNode { .. }
            | Control::SetCredit { .. }
            | Control::SetStanding { .. }
            | Control::PromotePfn { .. }
            | Control::Resync { .. } => 0,
        }
    }
}

/// The 80-byte command area of a 128-byte SQE.
pub type CmdArea = [u8; CTRL_CMD_SIZE];

fn area_of<T: IntoBytes + zerocopy::Immutable>(rec: &T) -> CmdArea {
    let mut area = [0u8; CTRL_CMD_SIZE];
    let bytes = rec.as_bytes();
    area[..bytes.len()].copy_from_slice(bytes);
    area
}

/// Decode the record `T` at the start of `buf` and check the rest is zero.
fn record<T: FromBytes>(buf: &[u8]) -> Result<T, DecodeError> {
    let rec = read_prefix::<T>(buf)?;
    let end = core::mem::size_of::<T>();
    let tail = buf.get(end..CTRL_CMD_SIZE.min(buf.len())).unwrap_or(&[]);
    if tail.iter().any(|&b| b != 0) {
        return Err(DecodeError::ReservedNonZero { field: "tail" });
    }
    Ok(rec)
}

impl Control {
    /// The URING_CMD `cmd_op` of this command.
    pub fn cmd_op(&self) -> u32 {
        match self {
            Control::Hello { .. } => ctrl_op::HELLO,
            Control::AttachNode { .. } => ctrl_op::ATTACH_NODE,
            Control::DetachNode { .. } => ctrl_op::DETACH_NODE,
            Control::SetCredit { .. } => ctrl_op::SET_CREDIT,
            Control::SetStanding { .. } => ctrl_op::SET_STANDING,
            Control::PromotePfn { .. } => ctrl_op::PROMOTE_PFN,
            Control::Resync { .. } => ctrl_op::RESYNC,
            Control::Ping { .. } => ctrl_op::PING,
        }
    }

    /// The command area to put in the SQE.
    pub fn encode(&self) -> CmdArea {
        match *self {
            Control::Hello {
                nr_queues,
                queue_depth,
                timeout_ms,
                features,
                reply_addr,
            } => area_of(&raw::Hello {
                api_version: API_VERSION,
                nr_queues,
                queue_depth,
                timeout_ms,
                features: features.bits(),
                reply_addr,
                ..raw::Hello::default()
            }),
            Control::AttachNode {
                nid,
                credit_pages,
                reply_addr,
            } => area_of(&raw::AttachNode {
                nid,
                credit_pages,
                reply_addr,
                ..raw::AttachNode::default()
            }),
            Control::DetachNode { nid } => area_of(&raw::DetachNode {
                nid,
                ..raw::DetachNode::default()
            }),
            Control::SetCredit { nid, pages } => area_of(&raw::SetCredit {
                nid,
                flags: 0,
                pages,
            }),
            Control::SetStanding { nid, standing } => {
                let (verdict, arg) = standing.raw();
                area_of(&raw::SetStanding {
                    nid,
                    verdict,
                    arg,
                    ..raw::SetStanding::default()
                })
            }
            Control::PromotePfn { pfn, nid } => area_of(&raw::PromotePfn { pfn, nid, flags: 0 }),
            Control::Resync {
                nid,
                start_pfn,
                nr_pages,
            } => area_of(&raw::Resync {
                nid,
                start_pfn,
                nr_pages,
                ..raw::Resync::default()
            }),
            Control::Ping {
                nr_upcalls,
                nr_threads,
                events,
                reply_addr,
            } => area_of(&raw::Ping {
                nr_upcalls,
                nr_threads,
                flags: if events { raw::ping::F_EVENTS } else { 0 },
                reply_addr,
                reserved: 0,
            }),
        }
    }

    /// Decode a command from its `cmd_op` and command area (the kernel's
    /// validation, mirrored for tests and tools).
    ///
    /// # Errors
    ///
    /// [`DecodeError::Unknown`] for an unknown `cmd_op`, [`DecodeError::Short`],
    /// [`DecodeError::BadVersion`] for a HELLO of another API version,
    /// [`DecodeError::ReservedNonZero`] for reserved fields, flags or a
    /// non-zero tail, [`DecodeError::Invalid`] for out-of-range values.
    pub fn decode(cmd_op: u32, buf: &[u8]) -> Result<Self, DecodeError> {
        match cmd_op {
            ctrl_op::HELLO => {
                let h: raw::Hello = record(buf)?;
                if h.api_version != API_VERSION {
                    return Err(DecodeError::BadVersion {
                        got: h.api_version,
                        min: API_VERSION,
                        max: API_VERSION,
                    });
                }
                reserved_zero("reserved0", h.reserved0.into())?;
                reserved_zero("reserved1", h.reserved1.into())?;
                if h.nr_queues == 0 || h.nr_queues > raw::MAX_QUEUES {
                    return Err(DecodeError::Invalid {
                        field: "nr_queues",
                        value: h.nr_queues.into(),
                    });
                }
                if h.queue_depth == 0 || h.queue_depth > raw::MAX_QUEUE_DEPTH {
                    return Err(DecodeError::Invalid {
                        field: "queue_depth",
                        value: h.queue_depth.into(),
                    });
                }
                if h.timeout_ms > raw::MAX_TIMEOUT_MS {
                    return Err(DecodeError::Invalid {
                        field: "timeout_ms",
                        value: h.timeout_ms.into(),
                    });
                }
                Ok(Control::Hello {
                    nr_queues: h.nr_queues,
                    queue_depth: h.queue_depth,
                    timeout_ms: h.timeout_ms,
                    features: raw::Features::from_bits_retain(h.features),
                    reply_addr: h.reply_addr,
                })
            }
            ctrl_op::ATTACH_NODE => {
                let a: raw::AttachNode = record(buf)?;
                reserved_zero("flags", a.flags.into())?;
                reserved_zero("reserved", a.reserved)?;
                Ok(Control::AttachNode {
                    nid: a.nid,
                    credit_pages: a.credit_pages,
                    reply_addr: a.reply_addr,
                })
            }
            ctrl_op::DETACH_NODE => {
                let d: raw::DetachNode = record(buf)?;
                reserved_zero("flags", d.flags.into())?;
                reserved_zero("reserved", d.reserved)?;
                Ok(Control::DetachNode { nid: d.nid })
            }
            ctrl_op::SET_CREDIT => {
                let s: raw::SetCredit = record(buf)?;
                reserved_zero("flags", s.flags.into())?;
                Ok(Control::SetCredit {
                    nid: s.nid,
                    pages: s.pages,
                })
            }
            ctrl_op::SET_STANDING => {
                let s: raw::SetStanding = record(buf)?;
                reserved_zero("flags", s.flags.into())?;
                reserved_zero("reserved", s.reserved.into())?;
                Ok(Control::SetStanding {
                    nid: s.nid,
                    standing: Standing::from_raw(s.verdict, s.arg)?,
                })
            }
            ctrl_op::PROMOTE_PFN => {
                let p: raw::PromotePfn = record(buf)?;
                reserved_zero("flags", p.flags.into())?;
                Ok(Control::PromotePfn {
                    pfn: p.pfn,
                    nid: p.nid,
                })
            }
            ctrl_op::RESYNC => {
                let r: raw::Resync = record(buf)?;
                reserved_zero("flags", r.flags.into())?;
                reserved_zero("reserved", r.reserved)?;
                Ok(Control::Resync {
                    nid: r.nid,
                    start_pfn: r.start_pfn,
                    nr_pages: r.nr_pages,
                })
            }
            ctrl_op::PING => {
                let p: raw::Ping = record(buf)?;
                reserved_zero("flags", (p.flags & !raw::ping::F_ALL).into())?;
                reserved_zero("reserved", p.reserved)?;
                if p.nr_threads == 0 || p.nr_threads > raw::ping::MAX_THREADS {
                    return Err(DecodeError::Invalid {
                        field: "nr_threads",
                        value: p.nr_threads.into(),
                    });
                }
                if p.nr_upcalls > raw::ping::MAX_UPCALLS {
                    return Err(DecodeError::Invalid {
                        field: "nr_upcalls",
                        value: p.nr_upcalls.into(),
                    });
                }
                Ok(Control::Ping {
                    nr_upcalls: p.nr_upcalls,
                    nr_threads: p.nr_threads,
                    events: p.flags & raw::ping::F_EVENTS != 0,
                    reply_addr: p.reply_addr,
                })
            }
            other => Err(DecodeError::Unknown {
                what: "control cmd_op",
                value: other,
            }),
        }
    }
}

/// Decoded HELLO reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloReply {
    pub nr_queues: u16,
    pub queue_depth: u16,
    pub desc_size: u16,
    pub timeout_ms: u32,
    /// Features granted: a subset of those asked for.
    pub features: raw::Features,
}

impl HelloReply {
    /// Decode the kernel's HELLO reply.
    ///
    /// # Errors
    ///
    /// [`DecodeError::Short`], [`DecodeError::BadVersion`],
    /// [`DecodeError::ReservedNonZero`], [`DecodeError::Invalid`] if the
    /// descriptor size is not the one this crate was built with.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let r: raw::HelloReply = read_prefix(buf)?;
        if r.api_version != API_VERSION {
            return Err(DecodeError::BadVersion {
                got: r.api_version,
                min: API_VERSION,
                max: API_VERSION,
            });
        }
        reserved_zero("reserved0", r.reserved0.into())?;
        reserved_zero("reserved1", r.reserved1)?;
        if usize::from(r.desc_size) != core::mem::size_of::<raw::Desc>() {
            return Err(DecodeError::Invalid {
                field: "desc_size",
                value: r.desc_size.into(),
            });
        }
        Ok(HelloReply {
            nr_queues: r.nr_queues,
            queue_depth: r.queue_depth,
            desc_size: r.desc_size,
            timeout_ms: r.timeout_ms,
            features: raw::Features::from_bits_retain(r.features),
        })
    }
}

/// Decode the kernel's ATTACH_NODE reply.
///
/// # Errors
///
/// [`DecodeError::Short`], [`DecodeError::ReservedNonZero`].
pub fn decode_node_info(buf: &[u8]) -> Result<raw::NodeInfo, DecodeError> {
    let n: raw::NodeInfo = read_prefix(buf)?;
    reserved_zero("reserved0", n.reserved0.into())?;
    reserved_zero("reserved1", n.reserved1)?;
    Ok(n)
}

/// Decode the kernel's PING reply.
///
/// # Errors
///
/// [`DecodeError::Short`], [`DecodeError::ReservedNonZero`].
pub fn decode_ping_reply(buf: &[u8]) -> Result<raw::PingReply, DecodeError> {
    let p: raw::PingReply = read_prefix(buf)?;
    reserved_zero("reserved", p.reserved)?;
    Ok(p)
}
