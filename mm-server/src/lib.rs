//! `mm-server`: the user-mode memory manager for compressed memory nodes.
//!
//! - [`core`]: the server's logic as a state machine with no I/O (books,
//!   credit, eviction, RESYNC, drain);
//! - [`driver`]: the io_uring loop that connects the core to the kernel;
//! - [`capacity`]: the compressed-node allocator's capacity model;
//! - [`policy`]: the verdict for each fault;
//! - [`admin`] and [`metrics`]: the admin socket and what it serves;
//! - [`config`]: the TOML configuration and its checks;
//! - [`sys`]: signals, `mlockall`, peer credentials, systemd readiness.

#![forbid(unsafe_code)]

pub mod admin;
pub mod capacity;
pub mod clients;
pub mod config;
pub mod core;
pub mod driver;
pub mod metrics;
pub mod policy;
pub mod serve;
pub mod sys;
pub mod tenants;

pub use mm_upcall_proto as proto;
