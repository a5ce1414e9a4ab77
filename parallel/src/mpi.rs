//! The MPI communicator (rsmpi): the CPU backend's real multi-process engine, launched by
//! `mpirun`/`srun`. All MPI calls run on one dedicated thread (initialised there with
//! `MPI_THREAD_FUNNELED`), fed through a channel, so collectives proceed while the caller keeps
//! computing; `Pending::wait` gives up after `timeout` with an error naming the collective — a rank
//! that died leaves the others blocked inside MPI, and the trainer must exit rather than hang.
use crate::{Collective, Communicator, Pending, Traffic, TrafficCount};
use anyhow::{anyhow, bail, Result};
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::topology::Communicator as _;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The worker's answers to one submitted collective: f64 results, f32 results.
type Replies = (std::sync::mpsc::Receiver<Vec<f64>>, std::sync::mpsc::Receiver<Vec<f32>>);

enum Op {
    Vector(Collective, Vec<f32>, usize),
    Scalars(Vec<f64>),
    Barrier,
}

struct Job {
    op: Op,
    reply: Sender<Vec<f64>>,
    reply_f32: Sender<Vec<f32>>,
}

pub struct Mpi {
    rank: usize,
    size: usize,
    timeout: Duration,
    jobs: Mutex<Option<Sender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    traffic: Arc<Traffic>,
}

impl Mpi {
    /// Initialises MPI (on its own thread). `timeout` bounds every wait for a collective.
    pub fn init(timeout: Duration) -> Result<Mpi> {
        let (jobs, rx) = channel::<Job>();
        let (ready_tx, ready_rx) = channel::<Result<(usize, usize), String>>();
        let worker = std::thread::Builder::new().name("mpi".into()).spawn(move || {
            let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
                let _ = ready_tx.send(Err("MPI was already initialised".into()));
                return;
            };
            let world = universe.world();
            let _ = ready_tx.send(Ok((world.rank() as usize, world.size() as usize)));
            let n = world.size() as usize;
            for job in rx {
                match job.op {
                    Op::Vector(kind, buf, root) => {
                        let out = match kind {
                            Collective::AllReduce => {
                                let mut out = vec![0f32; buf.len()];
                                world.all_reduce_into(&buf[..], &mut out[..], SystemOperation::sum());
                                out
                            }
                            Collective::ReduceScatter => {
                                let mut out = vec![0f32; buf.len() / n];
                                world.reduce_scatter_block_into(&buf[..], &mut out[..], SystemOperation::sum());
                                out
                            }
                            Collective::AllGather => {
                                let mut out = vec![0f32; buf.len() * n];
                                world.all_gather_into(&buf[..], &mut out[..]);
                                out
                            }
                            Collective::Broadcast => {
                                let mut buf = buf;
                                world.process_at_rank(root as i32).broadcast_into(&mut buf[..]);
                                buf
                            }
                        };
                        let _ = job.reply_f32.send(out);
                    }
                    Op::Scalars(values) => {
                        let mut out = vec![0f64; values.len()];
                        world.all_reduce_into(&values[..], &mut out[..], SystemOperation::sum());
                        let _ = job.reply.send(out);
                    }
                    Op::Barrier => {
                        world.barrier();
                        let _ = job.reply.send(vec![]);
                    }
                }
            }
            // Dropping `universe` calls MPI_Finalize.
        })?;
        let (rank, size) =
            ready_rx.recv().map_err(|_| anyhow!("the MPI thread died while initialising"))?.map_err(|e| anyhow!(e))?;
        Ok(Mpi {
            rank,
            size,
            timeout,
            jobs: Mutex::new(Some(jobs)),
            worker: Mutex::new(Some(worker)),
            traffic: Arc::default(),
        })
    }

    fn submit(&self, op: Op) -> Result<Replies> {
        let (reply, rx) = channel();
        let (reply_f32, rx_f32) = channel();
        let jobs = self.jobs.lock().unwrap();
        let jobs = jobs.as_ref().ok_or_else(|| anyhow!("MPI was shut down"))?;
        jobs.send(Job { op, reply, reply_f32 }).map_err(|_| anyhow!("the MPI thread has stopped"))?;
        Ok((rx, rx_f32))
    }

    fn vector(&self, kind: Collective, buf: Vec<f32>, root: usize) -> Pending<Vec<f32>> {
        let n = self.size;
        let bytes = 4 * match kind {
            Collective::AllGather => buf.len() * n,
            _ => buf.len(),
        } as u64;
        if kind == Collective::ReduceScatter && !buf.len().is_multiple_of(n) {
            let len = buf.len();
            return Pending::new(move || bail!("reduce-scatter of {len} elements over {n} ranks: not a multiple"));
        }
        self.traffic.count(kind, bytes);
        let (timeout, rank) = (self.timeout, self.rank);
        match self.submit(Op::Vector(kind, buf, root)) {
            Ok((_, rx)) => Pending::new(move || {
                rx.recv_timeout(timeout).map_err(|_| anyhow!("rank {rank}: {kind:?} of {bytes} bytes did not complete within {:.0} s; another rank has probably died", timeout.as_secs_f64()))
            }),
            Err(e) => Pending::new(move || Err(e)),
        }
    }

    fn blocking(&self, op: Op, what: &str) -> Result<Vec<f64>> {
        let (rx, _) = self.submit(op)?;
        rx.recv_timeout(self.timeout).map_err(|_| {
            anyhow!(
                "rank {}: {what} did not complete within {:.0} s; another rank has probably died",
                self.rank,
                self.timeout.as_secs_f64()
            )
        })
    }
}

impl Drop for Mpi {
    /// Stops the MPI thread (finalising MPI) — unless a collective timed out, in which case the
    /// thread is stuck inside MPI and the process must simply exit.
    fn drop(&mut self) {
        drop(self.jobs.lock().unwrap().take());
        if let Some(worker) = self.worker.lock().unwrap().take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !worker.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if worker.is_finished() {
                let _ = worker.join();
            }
        }
    }
}

impl Communicator<Vec<f32>> for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn name(&self) -> String {
        format!("mpi ({} ranks)", self.size)
    }
    fn all_reduce(&self, buf: Vec<f32>) -> Pending<Vec<f32>> {
        self.vector(Collective::AllReduce, buf, 0)
    }
    fn reduce_scatter(&self, buf: Vec<f32>) -> Pending<Vec<f32>> {
        self.vector(Collective::ReduceScatter, buf, 0)
    }
    fn all_gather(&self, buf: Vec<f32>) -> Pending<Vec<f32>> {
        self.vector(Collective::AllGather, buf, 0)
    }
    fn broadcast(&self, buf: Vec<f32>, root: usize) -> Pending<Vec<f32>> {
        self.vector(Collective::Broadcast, buf, root)
    }
    fn all_reduce_scalars(&self, values: &mut [f64]) -> Result<()> {
        let out = self.blocking(Op::Scalars(values.to_vec()), "an all-reduce of scalars")?;
        values.copy_from_slice(&out);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.blocking(Op::Barrier, "a barrier").map(drop)
    }
    fn traffic(&self) -> TrafficCount {
        self.traffic.get()
    }
}
