//! User-space end of the `/dev/mm_upcall` transport.
//!
//! [`Transport::open`] opens the device, negotiates with `HELLO`, maps the
//! queue's descriptor array read-only and arms one `FETCH` per slot on an
//! io_uring created with `IORING_SETUP_SQE128` (control commands need the
//! 80-byte command area; the hot-path commands fit either size).
//!
//! The server loop is: [`Transport::wait`] for completions, answer every
//! [`Completion::Upcall`] with [`Transport::commit`] (which queues a
//! `COMMIT_AND_FETCH` that also re-arms the slot), repeat. The kernel never
//! waits longer than the negotiated timeout, so a slow server costs latency,
//! not correctness. `-ENODEV` / `-ECANCELED` on a slot mean the kernel is
//! tearing the server down ([`Completion::Teardown`]), not an error.
//!
//! SQE `user_data`: a slot's commands use the slot number; control commands
//! use a `slab` key offset by [`CTRL_TAG`], so the two ranges never meet.
//!
//! Unsafe code lives only in `sys` (mmap, reading the mapping, pushing SQEs
//! that reference buffers); each block states the invariant it relies on.

#![deny(unsafe_code)]

mod error;
mod sys;
mod transport;

pub use error::Error;
pub use mm_upcall_proto as proto;
pub use sys::{NodeMap, PAGE_SIZE, move_pages, peer_cred, peer_pidfd, poll_hung_up};
pub use transport::{
    CTRL_TAG, Completion, Config, ControlOutcome, CtrlToken, DROP_WAIT, QueueOpener, Transport,
    WATCH_TAG, ping_reply,
};

/// Path of the device node the kernel series creates.
pub const DEVICE_PATH: &str = "/dev/mm_upcall";
