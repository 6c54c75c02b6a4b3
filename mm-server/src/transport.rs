//! The seam between the server and a kernel: real (`/dev/mm_upcall`) or
//! fake (in-process, for tests and benchmarks).

use mm_upcall_proto::upcall::Request;
use mm_upcall_proto::verdict::Verdict;

/// An upcall waiting for its verdict in `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub slot: u16,
    pub request: Request,
}

/// What the server needs from a kernel.
pub trait Transport {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Wait for upcalls and append them to `out`.
    ///
    /// # Errors
    ///
    /// The transport's error; a torn-down transport reports it here.
    fn recv(&mut self, out: &mut Vec<Pending>) -> Result<(), Self::Error>;

    /// Answer the upcall `seq` in `slot`.
    ///
    /// # Errors
    ///
    /// The transport's error.
    fn commit(&mut self, slot: u16, seq: u32, verdict: Verdict) -> Result<(), Self::Error>;
}

/// The kernel transport of `mm-upcall-kernel`, upcalls only (control
/// completions and failed slots are handled by the daemon).
impl Transport for mm_upcall_kernel::Transport {
    type Error = mm_upcall_kernel::Error;

    fn recv(&mut self, out: &mut Vec<Pending>) -> Result<(), Self::Error> {
        let mut done = Vec::new();
        self.wait(&mut done)?;
        for c in done {
            match c {
                mm_upcall_kernel::Completion::Upcall { slot, request } => {
                    out.push(Pending { slot, request });
                }
                mm_upcall_kernel::Completion::Malformed { slot, seq, .. } => {
                    // Answer what we cannot read with the kernel's default.
                    self.commit(slot, seq, Verdict::Default)?;
                }
                mm_upcall_kernel::Completion::SlotFailed { slot, .. } => self.fetch(slot)?,
                mm_upcall_kernel::Completion::Teardown { .. } => {
                    return Err(mm_upcall_kernel::Error::Shutdown);
                }
                mm_upcall_kernel::Completion::Control { .. }
                | mm_upcall_kernel::Completion::Readable { .. } => {}
            }
        }
        Ok(())
    }

    fn commit(&mut self, slot: u16, seq: u32, verdict: Verdict) -> Result<(), Self::Error> {
        mm_upcall_kernel::Transport::commit(self, slot, seq, verdict)
    }
}
