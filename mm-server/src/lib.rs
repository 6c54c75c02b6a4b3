//! `mm-server`: the user-mode memory manager for compressed memory nodes.
//!
//! Status: the capacity model of the compressed-node allocator
//! ([`capacity`]) exists, with property tests against a plain model and a
//! benchmark. The daemon (event loop over `mm-upcall-kernel`, policy,
//! configuration, admin socket, metrics) does not exist yet; there is no
//! `mm-server` binary.

#![deny(unsafe_code)]

pub mod capacity;

pub use mm_upcall_proto as proto;
