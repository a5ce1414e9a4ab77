//! Data-parallel plumbing that knows nothing about models: the [`Communicator`] trait and its
//! single-process and MPI implementations (NCCL's lives with the CUDA backend, which owns device
//! buffers), rank bootstrap from launcher environments ([`launch`]), a TCP rendezvous for sharing
//! an NCCL unique id without MPI ([`rendezvous`]), and the memory/communication model behind the
//! multi-GPU plan ([`plan`]).
//!
//! Collectives take and return owned buffers and come back as [`Pending`]: the caller may keep
//! computing (the next layer's backward) while the reduction runs, and waits only when it needs
//! the result. Every collective is a sum where it reduces.
#![warn(clippy::too_many_lines)] // no function over 80 code lines (clippy.toml)
use anyhow::Result;
use std::sync::atomic::{AtomicU64, Ordering};

pub mod buckets;
pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod plan;
pub mod rendezvous;

/// A collective in flight; `wait` returns its result (or the error that ended it, e.g. a timeout
/// because another rank died).
#[must_use = "a collective's result must be waited for"]
pub struct Pending<T>(Box<dyn FnOnce() -> Result<T> + Send>);

impl<T: Send + 'static> Pending<T> {
    /// An already finished collective.
    pub fn ready(value: T) -> Self {
        Pending(Box::new(move || Ok(value)))
    }
    pub fn new(wait: impl FnOnce() -> Result<T> + Send + 'static) -> Self {
        Pending(Box::new(wait))
    }
    pub fn wait(self) -> Result<T> {
        (self.0)()
    }
}

/// Collectives over the ranks of one data-parallel group, on buffers of type `Buf` (host vectors
/// for MPI, device buffers for NCCL). Buffer lengths must agree across ranks.
pub trait Communicator<Buf>: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// e.g. "mpi (4 ranks)".
    fn name(&self) -> String;
    /// Element-wise sum over ranks, on every rank.
    fn all_reduce(&self, buf: Buf) -> Pending<Buf>;
    /// Input of `world·k` elements; rank `r` gets the sum over ranks of elements `[r·k, (r+1)·k)`.
    fn reduce_scatter(&self, buf: Buf) -> Pending<Buf>;
    /// Input of `k` elements; every rank gets the `world·k` concatenation in rank order.
    fn all_gather(&self, buf: Buf) -> Pending<Buf>;
    /// Every rank gets `root`'s buffer.
    fn broadcast(&self, buf: Buf, root: usize) -> Pending<Buf>;
    /// Sum of a few host scalars over ranks (loss sums, token counts, flags), blocking.
    #[track_caller] // a host sync on a device: counted where the caller asked
    fn all_reduce_scalars(&self, values: &mut [f64]) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Bytes handed to each kind of collective so far on this rank.
    fn traffic(&self) -> TrafficCount;
}

/// Payload bytes per kind of collective on one rank: the input of all-reduce, reduce-scatter and
/// broadcast, the *output* of all-gather (what a ring moves is proportional to these; see [`plan`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCount {
    pub all_reduce: u64,
    pub reduce_scatter: u64,
    pub all_gather: u64,
    pub broadcast: u64,
    pub calls: u64,
}

/// Thread-safe counters behind [`Communicator::traffic`].
#[derive(Default)]
pub struct Traffic {
    all_reduce: AtomicU64,
    reduce_scatter: AtomicU64,
    all_gather: AtomicU64,
    broadcast: AtomicU64,
    calls: AtomicU64,
}

/// The kind of a collective, for counting and for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collective {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
}

impl Traffic {
    pub fn count(&self, kind: Collective, bytes: u64) {
        let c = match kind {
            Collective::AllReduce => &self.all_reduce,
            Collective::ReduceScatter => &self.reduce_scatter,
            Collective::AllGather => &self.all_gather,
            Collective::Broadcast => &self.broadcast,
        };
        c.fetch_add(bytes, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> TrafficCount {
        TrafficCount {
            all_reduce: self.all_reduce.load(Ordering::Relaxed),
            reduce_scatter: self.reduce_scatter.load(Ordering::Relaxed),
            all_gather: self.all_gather.load(Ordering::Relaxed),
            broadcast: self.broadcast.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
        }
    }
}

/// One process: every collective is the identity. Works on any buffer type, so the trainer runs
/// the same data-parallel code path at world size 1 on every backend.
#[derive(Default)]
pub struct SingleProcess {
    traffic: Traffic,
}

impl<Buf: Send + 'static> Communicator<Buf> for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn name(&self) -> String {
        "single process".into()
    }
    fn all_reduce(&self, buf: Buf) -> Pending<Buf> {
        Pending::ready(buf)
    }
    fn reduce_scatter(&self, buf: Buf) -> Pending<Buf> {
        Pending::ready(buf)
    }
    fn all_gather(&self, buf: Buf) -> Pending<Buf> {
        Pending::ready(buf)
    }
    fn broadcast(&self, buf: Buf, _root: usize) -> Pending<Buf> {
        Pending::ready(buf)
    }
    fn all_reduce_scalars(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn traffic(&self) -> TrafficCount {
        self.traffic.get()
    }
}
