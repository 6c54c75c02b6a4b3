//! Upcalls: requests from the kernel, read from a slot's descriptor.

use crate::raw::{Desc, DescFlags, op};
use crate::{DecodeError, read_prefix, reserved_zero};

/// Where a fault happened: the folio on the managed node and the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Node holding the folio (a managed node).
    pub nid: u16,
    /// Node of the CPU that faulted.
    pub cpu_nid: u16,
    /// Folio order (0 for a base page).
    pub order: u32,
    /// The folio is PMD-mapped (THP).
    pub thp: bool,
    pub tgid: u32,
    pub tid: u32,
    pub pfn: u64,
    pub vaddr: u64,
}

/// A decoded upcall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upcall {
    /// A write to a folio on a managed node: answer `Promote` or `AllowInPlace`.
    WriteFault(Fault),
    /// A NUMA hint fault on a managed folio: answer `Promote` or `Stay`;
    /// nobody waits for the answer (a `Promote` is carried out later).
    HintFault {
        fault: Fault,
        /// Reserved for the time since the folio was last scanned; the
        /// kernel of API version 1 sends 0.
        since_scan_ms: u64,
    },
    /// Demotion into `nid` ran out of credit; nobody waits for the answer.
    DemoteCredit { nid: u16, wanted_pages: u64 },
    /// Synthetic upcall for tests and benchmarks: answer `Pong(cookie)`.
    Ping { cookie: u32 },
}

/// An upcall with its sequence number, which the verdict must echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub seq: u32,
    pub upcall: Upcall,
}

impl Upcall {
    /// The `MM_UPCALL_OP_*` of this upcall.
    pub fn op(&self) -> u16 {
        match self {
            Upcall::WriteFault(_) => op::WRITE_FAULT,
            Upcall::HintFault { .. } => op::HINT_FAULT,
            Upcall::DemoteCredit { .. } => op::DEMOTE_CREDIT,
            Upcall::Ping { .. } => op::PING,
        }
    }
}

impl Request {
    /// Decode a descriptor from the start of `buf`.
    ///
    /// # Errors
    ///
    /// [`DecodeError::Short`] if `buf` is shorter than a descriptor,
    /// [`DecodeError::Unknown`] for an unknown opcode,
    /// [`DecodeError::ReservedNonZero`] if a reserved field, a field the
    /// opcode does not use, or an undefined flag is set.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        Self::from_raw(&read_prefix::<Desc>(buf)?)
    }

    /// Validate and convert a raw descriptor.
    ///
    /// # Errors
    ///
    /// As [`Request::decode`], except `Short`.
    pub fn from_raw(d: &Desc) -> Result<Self, DecodeError> {
        reserved_zero("reserved", d.reserved)?;
        let flags = DescFlags::from_bits_retain(d.flags);
        reserved_zero("flags", u64::from(flags.difference(DescFlags::ALL).bits()))?;
        let fault = || Fault {
            nid: d.nid,
            cpu_nid: d.cpu_nid,
            order: d.order,
            thp: flags.contains(DescFlags::THP),
            tgid: d.tgid,
            tid: d.tid,
            pfn: d.pfn,
            vaddr: d.vaddr,
        };
        let upcall = match d.op {
            op::WRITE_FAULT => {
                reserved_zero("arg", d.arg)?;
                reserved_zero("flags", u64::from((flags & DescFlags::NO_WAIT).bits()))?;
                Upcall::WriteFault(fault())
            }
            op::HINT_FAULT => {
                // Nobody waits for a hint fault's verdict: NO_WAIT is set.
                no_wait_set(d)?;
                Upcall::HintFault {
                    fault: fault(),
                    since_scan_ms: d.arg,
                }
            }
            op::DEMOTE_CREDIT => {
                unused_zero(d, &["cpu_nid", "order", "tgid", "tid", "pfn", "vaddr"])?;
                reserved_zero("flags", u64::from((flags & DescFlags::THP).bits()))?;
                no_wait_set(d)?;
                Upcall::DemoteCredit {
                    nid: d.nid,
                    wanted_pages: d.arg,
                }
            }
            op::PING => {
                unused_zero(
                    d,
                    &["nid", "cpu_nid", "order", "tgid", "tid", "pfn", "vaddr"],
                )?;
                reserved_zero("flags", u64::from(d.flags))?;
                let cookie = u32::try_from(d.arg).map_err(|_| DecodeError::Invalid {
                    field: "arg",
                    value: d.arg,
                })?;
                Upcall::Ping { cookie }
            }
            other => {
                return Err(DecodeError::Unknown {
                    what: "upcall opcode",
                    value: u32::from(other),
                });
            }
        };
        Ok(Request { seq: d.seq, upcall })
    }

    /// The raw descriptor (what the kernel writes; used by the fake kernel).
    pub fn to_raw(&self) -> Desc {
        let mut d = Desc {
            op: self.upcall.op(),
            seq: self.seq,
            ..Desc::default()
        };
        let put_fault = |d: &mut Desc, f: &Fault| {
            d.nid = f.nid;
            d.cpu_nid = f.cpu_nid;
            d.order = f.order;
            d.flags = if f.thp { DescFlags::THP.bits() } else { 0 };
            d.tgid = f.tgid;
            d.tid = f.tid;
            d.pfn = f.pfn;
            d.vaddr = f.vaddr;
        };
        match &self.upcall {
            Upcall::WriteFault(f) => put_fault(&mut d, f),
            Upcall::HintFault {
                fault,
                since_scan_ms,
            } => {
                put_fault(&mut d, fault);
                d.flags |= DescFlags::NO_WAIT.bits();
                d.arg = *since_scan_ms;
            }
            Upcall::DemoteCredit { nid, wanted_pages } => {
                d.nid = *nid;
                d.flags = DescFlags::NO_WAIT.bits();
                d.arg = *wanted_pages;
            }
            Upcall::Ping { cookie } => d.arg = u64::from(*cookie),
        }
        d
    }
}

/// Requests nobody waits for (hints, credit) always carry `NO_WAIT`.
fn no_wait_set(d: &Desc) -> Result<(), DecodeError> {
    if !DescFlags::from_bits_retain(d.flags).contains(DescFlags::NO_WAIT) {
        return Err(DecodeError::Invalid {
            field: "flags",
            value: u64::from(d.flags),
        });
    }
    Ok(())
}

fn unused_zero(d: &Desc, fields: &[&'static str]) -> Result<(), DecodeError> {
    for &f in fields {
        let v = match f {
            "nid" => u64::from(d.nid),
            "cpu_nid" => u64::from(d.cpu_nid),
            "order" => u64::from(d.order),
            "tgid" => u64::from(d.tgid),
            "tid" => u64::from(d.tid),
            "pfn" => d.pfn,
            "vaddr" => d.vaddr,
            _ => 0,
        };
        reserved_zero(f, v)?;
    }
    Ok(())
}
