//! `mm-server`: the user-mode memory manager for compressed memory nodes.
//!
//! - [`capacity`]: the compressed-node allocator's capacity model;
//! - [`policy`]: the verdict for each upcall;
//! - [`daemon`]: the io_uring event loop over the kernel transport;
//! - [`admin`] and [`metrics`]: the admin socket and what it serves;
//! - [`config`]: the TOML configuration and its checks;
//! - [`transport`]: the trait the policy is driven through, with the
//!   kernel transport and an in-process [`fake::FakeKernel`] (tests and
//!   benchmarks only).

#![deny(unsafe_code)]

pub mod admin;
pub mod capacity;
pub mod config;
pub mod daemon;
pub mod fake;
pub mod metrics;
pub mod policy;
pub mod sys;
pub mod transport;

pub use mm_upcall_proto as proto;
