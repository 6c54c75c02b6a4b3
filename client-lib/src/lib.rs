//! The application side of mm-upcall: advice about memory for the
//! compressed memory tier, after `madvise(2)`, and the admin client.
//!
//! ```no_run
//! use mm_upcall_client::{Advice, Client};
//!
//! let buf = vec![0u8; 64 << 20];
//! let mut c = Client::connect()?;
//! let r = c.advise(buf.as_ptr() as usize, buf.len(), Advice::Cold)?;
//! println!("{} of {} pages moved to the compressed node", r.moved, r.pages);
//! for page in c.residency(buf.as_ptr() as usize, 4096)? {
//!     println!("{page}");
//! }
//! # Ok::<(), mm_upcall_client::Error>(())
//! ```
//!
//! - [`Client`] talks to mm-server's client socket
//!   ([`DEFAULT_CLIENT_SOCKET`], or `$MM_UPCALL_SOCKET`);
//! - [`probe`] says what this machine has, like `numa_available()`;
//! - [`AdminClient`] reads the server's counters and metrics from its
//!   admin socket (root only);
//! - the C ABI (`libmmclient.so`, `mm_client.h`) is the `capi` crate
//!   beside this one.

#![forbid(unsafe_code)]

mod admin;
mod client;
mod conn;
mod error;

pub use admin::{AdminClient, DEFAULT_ADMIN_SOCKET};
pub use client::{
    Advised, Client, DEFAULT_CLIENT_SOCKET, Page, Probe, client_socket, parse_list, probe,
};
pub use error::Error;
pub use mm_upcall_proto::socket::{self, Advice};

/// Result of this crate's calls.
pub type Result<T> = std::result::Result<T, Error>;
