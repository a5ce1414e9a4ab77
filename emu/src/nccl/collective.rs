//! One collective's arguments and how a rank runs it, round by round, through the slots.
use super::comm::Comm;
use super::reduce::{combine, Elem, Reduce};
use super::{failure, Failure, SLOT_BYTES};
use cudarc::nccl::sys::ncclResult_t;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// One collective's arguments (device pointers are host addresses in the emulator).
#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub kind: Kind,
    pub send: usize,
    pub recv: usize,
    /// Elements: all-reduce and broadcast: of the buffer; reduce-scatter: of the output (per
    /// rank); all-gather: of the input (per rank).
    pub count: usize,
    pub elem: Elem,
    pub reduce: Reduce,
    pub root: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
}

impl Kind {
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::AllReduce => "all-reduce",
            Kind::ReduceScatter => "reduce-scatter",
            Kind::AllGather => "all-gather",
            Kind::Broadcast => "broadcast",
        }
    }
}

impl Comm {
    /// Runs one collective to completion on the calling thread (the stream's worker).
    pub fn run(&self, op: &Op) -> Result<(), Failure> {
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.issued.fetch_add(1, Ordering::Relaxed) + 1;
        let what = format!("{} #{seq} of {} × {:?}", op.kind.name(), op.count, op.elem);
        let seg = self.segment.get().ok_or_else(|| {
            failure(ncclResult_t::ncclInvalidUsage, format!("{what}: the communicator is not initialised"))
        })?;
        self.check(Some(seg), &what, Instant::now())?;
        let (n, me, es) = (self.nranks, self.rank, op.elem.size());
        let copy =
            |dst: *mut u8, src: *const u8, elems: usize| unsafe { std::ptr::copy_nonoverlapping(src, dst, elems * es) };
        let send = |i: usize| (op.send + i * es) as *const u8;
        let recv = |i: usize| (op.recv + i * es) as *mut u8;
        // Output = slot 0, then ∘ slot 1, ∘ slot 2, ... : rank order, the same on every rank.
        let reduce_slots = |dst: *mut u8, offset: usize, elems: usize| {
            copy(dst, unsafe { seg.slot(0).add(offset) }, elems);
            for r in 1..n {
                unsafe { combine(dst, seg.slot(r).add(offset), elems, op.elem, op.reduce) };
            }
        };
        let per_round = |split: usize| (SLOT_BYTES / (es * split)).max(1);
        let rounds = |total: usize, step: usize| (0..total).step_by(step).map(move |a| (a, step.min(total - a)));
        match op.kind {
            Kind::AllReduce => {
                for (a, len) in rounds(op.count, per_round(1)) {
                    copy(seg.slot(me), send(a), len);
                    self.barrier(seg, &what)?;
                    reduce_slots(recv(a), 0, len);
                    self.barrier(seg, &what)?;
                }
            }
            Kind::Broadcast => {
                for (a, len) in rounds(op.count, per_round(1)) {
                    if me == op.root {
                        copy(seg.slot(me), send(a), len);
                    }
                    self.barrier(seg, &what)?;
                    copy(recv(a), seg.slot(op.root), len);
                    self.barrier(seg, &what)?;
                }
            }
            Kind::AllGather => {
                for (a, len) in rounds(op.count, per_round(1)) {
                    copy(seg.slot(me), send(a), len);
                    self.barrier(seg, &what)?;
                    for q in 0..n {
                        copy(recv(q * op.count + a), seg.slot(q), len);
                    }
                    self.barrier(seg, &what)?;
                }
            }
            Kind::ReduceScatter => {
                // Each round stages, for every destination rank q, elements [a, a+len) of q's part.
                for (a, len) in rounds(op.count, per_round(n)) {
                    for q in 0..n {
                        copy(unsafe { seg.slot(me).add(q * len * es) }, send(q * op.count + a), len);
                    }
                    self.barrier(seg, &what)?;
                    reduce_slots(recv(a), me * len * es, len);
                    self.barrier(seg, &what)?;
                }
            }
        }
        Ok(())
    }
}
