//! The mm-upcall wire ABI.
//!
//! * [`raw`] mirrors `include/uapi/linux/mm_upcall.h` record for record
//!   (`#[repr(C)]` + zerocopy, so implicit padding is a compile error). The C
//!   header is the source of truth; `tests/abi` compiles it and compares
//!   every size, offset and constant with this crate.
//! * [`upcall`], [`verdict`], [`event`] and [`control`] are the typed views
//!   of those records: decoding validates opcodes, flags and reserved fields
//!   and returns a [`DecodeError`], never panics.
//! * [`socket`] holds the frames of the client/admin Unix socket, which is
//!   user space only.
//!
//! All integers are native-endian: every peer runs on the same machine.
//! See `docs/PROTOCOL.md` for the protocol and its changelog.

#![no_std]
#![forbid(unsafe_code)]

pub mod control;
mod error;
pub mod event;
pub mod raw;
pub mod socket;
pub mod upcall;
pub mod verdict;

pub use error::DecodeError;

use zerocopy::FromBytes;

/// Read a fixed-layout record from the start of `buf`.
pub(crate) fn read_prefix<T: FromBytes>(buf: &[u8]) -> Result<T, DecodeError> {
    let need = core::mem::size_of::<T>();
    T::read_from_prefix(buf)
        .map(|(v, _)| v)
        .map_err(|_| DecodeError::Short {
            need,
            got: buf.len(),
        })
}

/// Fail with [`DecodeError::ReservedNonZero`] unless `value` is zero.
pub(crate) fn reserved_zero(field: &'static str, value: u64) -> Result<(), DecodeError> {
    if value == 0 {
        Ok(())
    } else {
        Err(DecodeError::ReservedNonZero { field })
    }
}
