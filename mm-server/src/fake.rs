//! `FakeKernel`: an in-process stand-in for `/dev/mm_upcall`, for tests and
//! benchmarks only.  It hands out upcalls as raw descriptors (so the server
//! decodes real bytes) and records every verdict.

use std::collections::VecDeque;
use std::convert::Infallible;

use mm_upcall_proto::raw::Desc;
use mm_upcall_proto::upcall::{Request, Upcall};
use mm_upcall_proto::verdict::Verdict;
use zerocopy::IntoBytes as _;

use crate::transport::{Pending, Transport};

/// The fake kernel.  Not a transport to ship: nothing here touches memory.
#[derive(Debug, Default)]
pub struct FakeKernel {
    queue: VecDeque<(u16, [u8; size_of::<Desc>()])>,
    next_seq: u32,
    depth: u16,
    /// Every verdict committed, in order: (seq, verdict).
    pub verdicts: Vec<(u32, Verdict)>,
}

impl FakeKernel {
    pub fn new(depth: u16) -> Self {
        Self {
            depth: depth.max(1),
            ..Self::default()
        }
    }

    /// Queue an upcall; returns its seq.
    pub fn post(&mut self, upcall: Upcall) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1);
        let seq = self.next_seq;
        let slot = (seq % u32::from(self.depth)) as u16;
        let desc = Request { seq, upcall }.to_raw();
        let mut bytes = [0u8; size_of::<Desc>()];
        bytes.copy_from_slice(desc.as_bytes());
        self.queue.push_back((slot, bytes));
        seq
    }

    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }
}

impl Transport for FakeKernel {
    type Error = Infallible;

    fn recv(&mut self, out: &mut Vec<Pending>) -> Result<(), Infallible> {
        let n = self.queue.len().min(usize::from(self.depth));
        for (slot, bytes) in self.queue.drain(..n) {
            // The fake only posts what it encoded itself.
            let request = Request::decode(&bytes).expect("fake descriptors decode");
            out.push(Pending { slot, request });
        }
        Ok(())
    }

    fn commit(&mut self, _slot: u16, seq: u32, verdict: Verdict) -> Result<(), Infallible> {
        self.verdicts.push((seq, verdict));
        Ok(())
    }
}

/// Serve every queued upcall once with `policy`; returns how many.
///
/// # Errors
///
/// The transport's.
pub fn serve_all<T: Transport>(
    t: &mut T,
    policy: &mut crate::policy::Policy,
    now_ns: u64,
) -> Result<usize, T::Error> {
    let mut batch = Vec::new();
    t.recv(&mut batch)?;
    for p in &batch {
        let v = policy.decide(&p.request.upcall, now_ns);
        t.commit(p.slot, p.request.seq, v)?;
    }
    Ok(batch.len())
}
