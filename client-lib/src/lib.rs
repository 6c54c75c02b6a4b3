//! Application hint API for mm-upcall.
//!
//! Status: not implemented yet. The socket frames it will speak are defined
//! in [`mm_upcall_proto::socket`].

#![deny(unsafe_code)]

pub use mm_upcall_proto::socket;
