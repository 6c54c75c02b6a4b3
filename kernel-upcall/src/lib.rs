//! User-space end of the `/dev/mm_upcall` transport.
//!
//! Status: not implemented yet (tracked by the "Kernel upcall transport"
//! issue). It will open the device, negotiate with `HELLO`, set up the
//! io_uring, arm one FETCH per slot and expose a safe API to receive upcalls
//! and commit verdicts. For now it only re-exports the ABI it will speak.

#![deny(unsafe_code)]

pub use mm_upcall_proto as proto;

/// Path of the device node the kernel series creates.
pub const DEVICE_PATH: &str = "/dev/mm_upcall";
