//! The admin socket's client: the server's counters and metrics.

use std::path::Path;

use mm_upcall_proto::socket::{self, Frame};

use crate::Result;
use crate::conn::Conn;

/// Where mm-server's admin socket is by default (`server.admin_socket`).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/mm-server.sock";

/// A connection to the admin socket (root only).
#[derive(Debug)]
pub struct AdminClient {
    c: Conn,
}

impl AdminClient {
    /// Connect to the admin socket at `path` and say Hello.
    ///
    /// # Errors
    ///
    /// Nobody listens there, the caller may not connect, or the server
    /// refused.
    pub fn connect(path: &Path) -> Result<Self> {
        Ok(Self {
            c: Conn::connect(path)?,
        })
    }

    /// The metrics text (Prometheus text format).
    ///
    /// # Errors
    ///
    /// Socket or protocol errors.
    pub fn metrics(&mut self) -> Result<String> {
        let (_, buf) = self.c.call("Metrics", Frame::Metrics)?;
        socket::metrics_text(&buf)
            .map(str::to_string)
            .ok_or_else(|| self.c.protocol("malformed MetricsReply".into()))
    }

    /// The fixed-layout counters.
    ///
    /// # Errors
    ///
    /// Socket or protocol errors.
    pub fn stats(&mut self) -> Result<socket::StatsRec> {
        match self.c.call("Stats", Frame::Stats)? {
            (Frame::StatsReply(r), _) => Ok(r),
            (other, _) => Err(self
                .c
                .protocol(format!("unexpected reply to Stats: {other:?}"))),
        }
    }
}
