//! `mm-server`: the user-mode memory manager for compressed memory nodes.
//!
//! Status: the capacity model of the compressed-node allocator
//! ([`capacity`]), the placement [`policy`], the [`transport`] trait with
//! the real kernel transport and an in-process [`fake::FakeKernel`] (tests
//! and benchmarks only) exist. The daemon (event loop, configuration, admin
//! socket, metrics, recovery) does not exist yet; there is no `mm-server`
//! binary.

#![deny(unsafe_code)]

pub mod capacity;
pub mod config;
pub mod fake;
pub mod policy;
pub mod transport;

pub use mm_upcall_proto as proto;
