//! Verdicts and the hot-path FETCH / COMMIT_AND_FETCH commands.

use crate::raw::{self, IoCmd, io_op, op};
use crate::{DecodeError, read_prefix, reserved_zero};

/// The server's answer to an upcall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Migrate the folio to node `nid` (WRITE_FAULT, HINT_FAULT).
    Promote { nid: u16 },
    /// Make this one mapping writable where it is (WRITE_FAULT).
    AllowInPlace,
    /// Leave the folio where it is (HINT_FAULT).
    Stay,
    /// Add `pages` of demotion credit (DEMOTE_CREDIT).
    Grant { pages: u32 },
    /// No credit (DEMOTE_CREDIT).
    Deny,
    /// Whatever the kernel would do without a server (any upcall).
    Default,
    /// Answer to PING, echoing its cookie.
    Pong { cookie: u32 },
}

impl Verdict {
    /// The `MM_UPCALL_V_*` code and argument of this verdict.
    pub fn to_code_arg(self) -> (u16, u32) {
        match self {
            Verdict::Promote { nid } => (raw::verdict::PROMOTE, u32::from(nid)),
            Verdict::AllowInPlace => (raw::verdict::ALLOW_IN_PLACE, 0),
            Verdict::Stay => (raw::verdict::STAY, 0),
            Verdict::Grant { pages } => (raw::verdict::GRANT, pages),
            Verdict::Deny => (raw::verdict::DENY, 0),
            Verdict::Default => (raw::verdict::DEFAULT, 0),
            Verdict::Pong { cookie } => (raw::verdict::PONG, cookie),
        }
    }

    /// Decode a verdict code and its argument.
    ///
    /// # Errors
    ///
    /// [`DecodeError::Unknown`] for an unknown code,
    /// [`DecodeError::Invalid`] for a node id that does not fit,
    /// [`DecodeError::ReservedNonZero`] for an argument on a verdict that
    /// takes none.
    pub fn from_code_arg(code: u16, arg: u32) -> Result<Self, DecodeError> {
        let none = |v: Verdict| reserved_zero("arg", u64::from(arg)).map(|()| v);
        match code {
            raw::verdict::PROMOTE => u16::try_from(arg)
                .map(|nid| Verdict::Promote { nid })
                .map_err(|_| DecodeError::Invalid {
                    field: "arg",
                    value: u64::from(arg),
                }),
            raw::verdict::ALLOW_IN_PLACE => none(Verdict::AllowInPlace),
            raw::verdict::STAY => none(Verdict::Stay),
            raw::verdict::GRANT => Ok(Verdict::Grant { pages: arg }),
            raw::verdict::DENY => none(Verdict::Deny),
            raw::verdict::DEFAULT => none(Verdict::Default),
            raw::verdict::PONG => Ok(Verdict::Pong { cookie: arg }),
            other => Err(DecodeError::Unknown {
                what: "verdict",
                value: u32::from(other),
            }),
        }
    }

    /// Whether the kernel accepts this verdict for an upcall of opcode `op`.
    pub fn valid_for(self, upcall_op: u16) -> bool {
        matches!(
            (upcall_op, self),
            (_, Verdict::Default)
                | (
                    op::WRITE_FAULT,
                    Verdict::Promote { .. } | Verdict::AllowInPlace
                )
                | (op::HINT_FAULT, Verdict::Promote { .. } | Verdict::Stay)
                | (op::DEMOTE_CREDIT, Verdict::Grant { .. } | Verdict::Deny)
                | (op::PING, Verdict::Pong { .. })
        )
    }
}

/// A hot-path command on a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoCommand {
    /// Arm slot `slot` of queue `q_id` (first time).
    Fetch { q_id: u16, slot: u16 },
    /// Answer the upcall `seq` on the slot and re-arm it.
    CommitAndFetch {
        q_id: u16,
        slot: u16,
        seq: u32,
        verdict: Verdict,
    },
}

impl IoCommand {
    /// The URING_CMD `cmd_op` of this command.
    pub fn cmd_op(&self) -> u32 {
        match self {
            IoCommand::Fetch { .. } => io_op::FETCH,
            IoCommand::CommitAndFetch { .. } => io_op::COMMIT_AND_FETCH,
        }
    }

    /// The 16-byte payload.
    pub fn to_raw(&self) -> IoCmd {
        match *self {
            IoCommand::Fetch { q_id, slot } => IoCmd {
                q_id,
                slot,
                ..IoCmd::default()
            },
            IoCommand::CommitAndFetch {
                q_id,
                slot,
                seq,
                verdict,
            } => {
                let (code, arg) = verdict.to_code_arg();
                IoCmd {
                    q_id,
                    slot,
                    verdict: code,
                    reserved: 0,
                    seq,
                    arg,
                }
            }
        }
    }

    /// Decode a command from its `cmd_op` and payload (what the kernel does).
    ///
    /// # Errors
    ///
    /// [`DecodeError::Unknown`] for an unknown `cmd_op` or verdict,
    /// [`DecodeError::Short`] for a short payload,
    /// [`DecodeError::ReservedNonZero`] if `reserved`, or on FETCH any of
    /// `verdict`, `seq` and `arg`, is not zero.
    pub fn decode(cmd_op: u32, buf: &[u8]) -> Result<Self, DecodeError> {
        let c: IoCmd = read_prefix(buf)?;
        reserved_zero("reserved", u64::from(c.reserved))?;
        match cmd_op {
            io_op::FETCH => {
                reserved_zero("verdict", u64::from(c.verdict))?;
                reserved_zero("seq", u64::from(c.seq))?;
                reserved_zero("arg", u64::from(c.arg))?;
                Ok(IoCommand::Fetch {
                    q_id: c.q_id,
                    slot: c.slot,
                })
            }
            io_op::COMMIT_AND_FETCH => Ok(IoCommand::CommitAndFetch {
                q_id: c.q_id,
                slot: c.slot,
                seq: c.seq,
                verdict: Verdict::from_code_arg(c.verdict, c.arg)?,
            }),
            other => Err(DecodeError::Unknown {
                what: "io cmd_op",
                value: other,
            }),
        }
    }
}
