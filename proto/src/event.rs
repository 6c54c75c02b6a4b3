//! Asynchronous events, read(2) from the device in batches.

use zerocopy::FromBytes;

use crate::raw::{self, ev, reason};
use crate::{DecodeError, read_prefix, reserved_zero};

/// Size of one event record.
pub const EVENT_SIZE: usize = core::mem::size_of::<raw::Event>();

/// Why a folio was placed on a managed node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaceReason {
    /// Reclaim-time demotion (within credit).
    Demotion,
    /// A migration requested by the server itself.
    Migration,
    /// Re-reported by RESYNC.
    Resync,
}

impl PlaceReason {
    fn code(self) -> u16 {
        match self {
            PlaceReason::Demotion => reason::DEMOTION,
            PlaceReason::Migration => reason::MIGRATION,
            PlaceReason::Resync => reason::RESYNC,
        }
    }
}

/// A decoded event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A folio arrived on managed node `nid`; `tgid`/`vaddr` are 0 when unknown.
    Placed {
        nid: u16,
        pfn: u64,
        order: u32,
        tgid: u32,
        vaddr: u64,
        reason: PlaceReason,
    },
    /// A folio on managed node `nid` was freed.
    Freed { nid: u16, pfn: u64, order: u32 },
    /// Base pages `pfn..pfn + pages` on managed node `nid` were freed:
    /// frees the kernel folded into one record (`FREED` with `count`).
    FreedRange { nid: u16, pfn: u64, pages: u64 },
    /// The folio at `pfn` on `nid` was migrated to `target_nid`.
    Promoted {
        nid: u16,
        target_nid: u16,
        pfn: u64,
        order: u32,
    },
    /// `lost` events were dropped because the queue was full: RESYNC.
    Overflow { lost: u64 },
    /// Synthetic event posted by PING with `MM_UPCALL_PING_F_EVENTS`.
    Ping { cookie: u64 },
}

impl Event {
    /// Decode one event from the start of `buf`.
    ///
    /// # Errors
    ///
    /// [`DecodeError::Short`], [`DecodeError::Unknown`] (type or reason),
    /// [`DecodeError::ReservedNonZero`] for fields the type does not use.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        Self::from_raw(&read_prefix::<raw::Event>(buf)?)
    }

    /// Validate and convert a raw event.
    ///
    /// # Errors
    ///
    /// As [`Event::decode`], except `Short`.
    pub fn from_raw(e: &raw::Event) -> Result<Self, DecodeError> {
        let zero = |pairs: &[(&'static str, u64)]| {
            pairs.iter().try_for_each(|&(f, v)| reserved_zero(f, v))
        };
        match e.r#type {
            ev::PLACED => {
                zero(&[("target_nid", e.target_nid.into()), ("count", e.count)])?;
                let reason = match e.reason {
                    reason::DEMOTION => PlaceReason::Demotion,
                    reason::MIGRATION => PlaceReason::Migration,
                    reason::RESYNC => PlaceReason::Resync,
                    other => {
                        return Err(DecodeError::Unknown {
                            what: "placement reason",
                            value: other.into(),
                        });
                    }
                };
                Ok(Event::Placed {
                    nid: e.nid,
                    pfn: e.pfn,
                    order: e.order,
                    tgid: e.tgid,
                    vaddr: e.vaddr,
                    reason,
                })
            }
            ev::FREED => {
                zero(&[
                    ("reason", e.reason.into()),
                    ("target_nid", e.target_nid.into()),
                    ("tgid", e.tgid.into()),
                    ("vaddr", e.vaddr),
                ])?;
                if e.count == 0 {
                    return Ok(Event::Freed {
                        nid: e.nid,
                        pfn: e.pfn,
                        order: e.order,
                    });
                }
                // A range is of base pages: its order is 0.
                zero(&[("order", e.order.into())])?;
                Ok(Event::FreedRange {
                    nid: e.nid,
                    pfn: e.pfn,
                    pages: e.count,
                })
            }
            ev::PROMOTED => {
                zero(&[
                    ("reason", e.reason.into()),
                    ("tgid", e.tgid.into()),
                    ("vaddr", e.vaddr),
                    ("count", e.count),
                ])?;
                Ok(Event::Promoted {
                    nid: e.nid,
                    target_nid: e.target_nid,
                    pfn: e.pfn,
                    order: e.order,
                })
            }
            // Records that carry only `count`.
            ev::OVERFLOW | ev::PING => {
                zero(&[
                    ("reason", e.reason.into()),
                    ("nid", e.nid.into()),
                    ("target_nid", e.target_nid.into()),
                    ("order", e.order.into()),
                    ("tgid", e.tgid.into()),
                    ("pfn", e.pfn),
                    ("vaddr", e.vaddr),
                ])?;
                Ok(if e.r#type == ev::OVERFLOW {
                    Event::Overflow { lost: e.count }
                } else {
                    Event::Ping { cookie: e.count }
                })
            }
            other => Err(DecodeError::Unknown {
                what: "event type",
                value: other.into(),
            }),
        }
    }

    /// The raw record.
    pub fn to_raw(&self) -> raw::Event {
        match *self {
            Event::Placed {
                nid,
                pfn,
                order,
                tgid,
                vaddr,
                reason,
            } => raw::Event {
                r#type: ev::PLACED,
                reason: reason.code(),
                nid,
                order,
                tgid,
                pfn,
                vaddr,
                ..raw::Event::default()
            },
            Event::Freed { nid, pfn, order } => raw::Event {
                r#type: ev::FREED,
                nid,
                pfn,
                order,
                ..raw::Event::default()
            },
            Event::FreedRange { nid, pfn, pages } => raw::Event {
                r#type: ev::FREED,
                nid,
                pfn,
                count: pages,
                ..raw::Event::default()
            },
            Event::Promoted {
                nid,
                target_nid,
                pfn,
                order,
            } => raw::Event {
                r#type: ev::PROMOTED,
                nid,
                target_nid,
                pfn,
                order,
                ..raw::Event::default()
            },
            Event::Overflow { lost } => raw::Event {
                r#type: ev::OVERFLOW,
                count: lost,
                ..raw::Event::default()
            },
            Event::Ping { cookie } => raw::Event {
                r#type: ev::PING,
                count: cookie,
                ..raw::Event::default()
            },
        }
    }
}

/// Decode a batch as returned by read(2): whole records, back to back.
///
/// A trailing partial record yields one final [`DecodeError::Short`].
pub fn decode_batch(buf: &[u8]) -> impl Iterator<Item = Result<Event, DecodeError>> + '_ {
    let mut rest = buf;
    core::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match raw::Event::read_from_prefix(rest) {
            Ok((one, tail)) => {
                rest = tail;
                Some(Event::from_raw(&one))
            }
            Err(_) => {
                let got = rest.len();
                rest = &[];
                Some(Err(DecodeError::Short {
                    need: EVENT_SIZE,
                    got,
                }))
            }
        }
    })
}
