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

    /// Drain managed node `nid`: evict every page, show it empty, detach
    /// it.  Returns once the drain started; `mm_server_node_state` shows
    /// its progress (3: detached).
    ///
    /// # Errors
    ///
    /// The server's refusal: `ENODEV` not managed, `EBUSY` draining
    /// already, `ESHUTDOWN` the server is stopping.
    pub fn drain(&mut self, nid: u16) -> Result<()> {
        match self.c.call("Drain", Frame::Drain { nid })? {
            (Frame::Ok, _) => Ok(()),
            (other, _) => Err(self
                .c
                .protocol(format!("unexpected reply to Drain: {other:?}"))),
        }
    }

    /// Evict pages of the memory cgroup whose directory has inode
    /// `cgroup_ino` that have been on node `nid` at least `min_age_s`
    /// seconds (at most 2048), the oldest first, up to `max_bytes`.
    ///
    /// # Errors
    ///
    /// The server's refusal (`EINVAL` for an age over 2048 s).
    pub fn evict(
        &mut self,
        nid: u16,
        cgroup_ino: u64,
        max_bytes: u64,
        min_age_s: u32,
    ) -> Result<socket::EvictReplyRec> {
        let f = Frame::Evict(socket::EvictRec {
            cgroup_ino,
            max_bytes,
            min_age_s,
            nid,
            reserved: 0,
        });
        match self.c.call("Evict", f)? {
            (Frame::EvictReply(r), _) => Ok(r),
            (other, _) => Err(self
                .c
                .protocol(format!("unexpected reply to Evict: {other:?}"))),
        }
    }

    /// The run-time policy and node `nid`'s watermarks.
    ///
    /// # Errors
    ///
    /// The server's refusal (`ENODEV`: not managed).
    pub fn policy(&mut self, nid: u16) -> Result<socket::PolicyRec> {
        match self.c.call("PolicyGet", Frame::PolicyGet { nid })? {
            (Frame::Policy(r), _) => Ok(r),
            (other, _) => Err(self
                .c
                .protocol(format!("unexpected reply to PolicyGet: {other:?}"))),
        }
    }

    /// Set the run-time policy and node `p.nid`'s watermarks.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Invalid`] with the reason when `p` does not pass
    /// [`socket::PolicyRec::check`]; the server's refusal.
    pub fn set_policy(&mut self, p: socket::PolicyRec) -> Result<()> {
        p.check()
            .map_err(|e| crate::Error::Invalid(e.to_string()))?;
        match self.c.call("PolicySet", Frame::PolicySet(p))? {
            (Frame::Ok, _) => Ok(()),
            (other, _) => Err(self
                .c
                .protocol(format!("unexpected reply to PolicySet: {other:?}"))),
        }
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
