//! `mm-server`: the user-mode memory manager for compressed memory nodes.
//!
//! Status: not implemented yet (tracked by the "mm-server" issue). This crate
//! exists so the workspace has its final shape; it provides no daemon and no
//! binary yet.

#![deny(unsafe_code)]

pub use mm_upcall_proto as proto;
