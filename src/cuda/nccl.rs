//! The NCCL communicator: collectives on device buffers, on a stream of their own. A collective
//! waits (on the device) for the work queued so far on the compute stream, runs on the
//! communication stream, and its [`Pending::wait`] makes the compute stream wait for it — the host
//! never blocks, and the backward keeps queueing kernels while gradients travel. The NCCL unique
//! id goes from rank 0 to the others through the TCP rendezvous at `MASTER_ADDR:MASTER_PORT`, so
//! no MPI library is needed. libnccl is loaded at run time (cudarc `dynamic-loading`).
use super::alloc::{CudaBuf, DType, Home};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{result, CudaStream};
use cudarc::nccl::{result as nccl, sys as ncclsys};
use llama_cpt_parallel::launch::Launch;
use llama_cpt_parallel::{Collective, Communicator, Pending, Traffic, TrafficCount};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Nccl {
    comm: ncclsys::ncclComm_t,
    rank: usize,
    world: usize,
    home: Arc<Home>,
    comm_stream: Arc<CudaStream>,
    /// NCCL calls on one communicator must not be issued concurrently.
    issue: Mutex<()>,
    traffic: Traffic,
}

// SAFETY: the communicator handle is only used under `issue`; buffers are ordered by streams.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

fn nccl_err(what: &str) -> impl Fn(nccl::NcclError) -> anyhow::Error + '_ {
    move |e| anyhow!("NCCL {what}: {e:?}")
}

impl Nccl {
    pub(crate) fn new(home: Arc<Home>, launch: &Launch, timeout: Duration) -> Result<Nccl> {
        if !unsafe { ncclsys::is_culib_present() } {
            bail!("libnccl.so not found on the library path (a symlink libnccl.so -> libnccl.so.2 may be needed)");
        }
        let (rank, world) = (launch.rank, launch.world_size);
        let mut id = if rank == 0 { nccl::get_uniqueid().map_err(nccl_err("get unique id"))? } else { ncclsys::ncclUniqueId { internal: [0; 128] } };
        if world > 1 {
            let (host, port) = launch.master.as_ref().context("a multi-GPU launch needs MASTER_ADDR and MASTER_PORT (rank 0 hands out the NCCL id there)")?;
            let mine: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            let shared = llama_cpt_parallel::rendezvous::share((host, *port), rank, world, (rank == 0).then_some(&mine[..]), timeout)?;
            if shared.len() != 128 {
                bail!("rendezvous: the NCCL id has {} bytes, not 128", shared.len());
            }
            for (d, s) in id.internal.iter_mut().zip(shared) {
                *d = s as _;
            }
        }
        home.ctx.bind_to_thread().map_err(|e| anyhow!("binding the CUDA context: {e}"))?;
        let mut comm: ncclsys::ncclComm_t = std::ptr::null_mut();
        unsafe { nccl::comm_init_rank(&mut comm, world as i32, id, rank as i32) }.map_err(nccl_err("init rank"))?;
        let comm_stream = home.ctx.new_stream().context("creating the communication stream")?;
        Ok(Nccl { comm, rank, world, home, comm_stream, issue: Mutex::new(()), traffic: Traffic::default() })
    }

    /// Runs `op(input, output, stream)` on the communication stream after the compute stream's
    /// queued work; the result is usable on the compute stream once waited for.
    /// `kind` is counted in the traffic (scalar all-reduces are not: `None`).
    fn launch(&self, kind: Option<Collective>, input: CudaBuf, out_len: usize, op: impl FnOnce(u64, u64, ncclsys::cudaStream_t) -> Result<()>) -> Pending<CudaBuf> {
        let dtype = input.dtype;
        if let Some(kind) = kind {
            let bytes = (dtype.size() * if kind == Collective::AllGather { out_len } else { input.len }) as u64;
            self.traffic.count(kind, bytes);
        }
        let output = CudaBuf::alloc(&self.home, out_len, dtype);
        let run = || -> Result<()> {
            let _guard = self.issue.lock().unwrap();
            self.comm_stream.join(&self.home.stream).map_err(|e| anyhow!("{e}"))?;
            op(input.ptr, output.ptr, self.comm_stream.cu_stream() as ncclsys::cudaStream_t)
        };
        if let Err(e) = run() {
            return Pending::new(move || Err(e));
        }
        let (compute, comm) = (self.home.stream.clone(), self.comm_stream.clone());
        Pending::new(move || {
            compute.join(&comm).map_err(|e| anyhow!("{e}"))?;
            // `input` may go back to the pool only now: the compute stream is ordered after the
            // collective that reads it.
            drop(input);
            Ok(output)
        })
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        let _ = self.comm_stream.synchronize();
        unsafe {
            let _ = nccl::comm_destroy(self.comm);
        }
    }
}

/// NCCL's name for a buffer's element type.
fn nccl_type(b: &CudaBuf) -> ncclsys::ncclDataType_t {
    match b.dtype {
        DType::F32 => ncclsys::ncclDataType_t::ncclFloat32,
        DType::Bf16 => ncclsys::ncclDataType_t::ncclBfloat16,
    }
}

impl Communicator<CudaBuf> for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn name(&self) -> String {
        format!("nccl ({} ranks)", self.world)
    }
    fn all_reduce(&self, buf: CudaBuf) -> Pending<CudaBuf> {
        let (n, comm, ty) = (buf.len, self.comm, nccl_type(&buf));
        self.launch(Some(Collective::AllReduce), buf, n, move |src, dst, s| {
            unsafe { nccl::all_reduce(src as _, dst as _, n, ty, ncclsys::ncclRedOp_t::ncclSum, comm, s) }.map(drop).map_err(nccl_err("all-reduce"))
        })
    }
    fn reduce_scatter(&self, buf: CudaBuf) -> Pending<CudaBuf> {
        let (n, comm, w, ty) = (buf.len, self.comm, self.world, nccl_type(&buf));
        if n % w != 0 {
            return Pending::new(move || bail!("reduce-scatter of {n} elements over {w} ranks: not a multiple"));
        }
        self.launch(Some(Collective::ReduceScatter), buf, n / w, move |src, dst, s| {
            unsafe { nccl::reduce_scatter(src as _, dst as _, n / w, ty, ncclsys::ncclRedOp_t::ncclSum, comm, s) }.map(drop).map_err(nccl_err("reduce-scatter"))
        })
    }
    fn all_gather(&self, buf: CudaBuf) -> Pending<CudaBuf> {
        let (n, comm, ty) = (buf.len, self.comm, nccl_type(&buf));
        self.launch(Some(Collective::AllGather), buf, n * self.world, move |src, dst, s| {
            unsafe { nccl::all_gather(src as _, dst as _, n, ty, comm, s) }.map(drop).map_err(nccl_err("all-gather"))
        })
    }
    fn broadcast(&self, buf: CudaBuf, root: usize) -> Pending<CudaBuf> {
        let (n, comm, ty) = (buf.len, self.comm, nccl_type(&buf));
        self.launch(Some(Collective::Broadcast), buf, n, move |src, dst, s| {
            unsafe { nccl::broadcast(src as _, dst as _, n, ty, root as i32, comm, s) }.map(drop).map_err(nccl_err("broadcast"))
        })
    }
    fn all_reduce_scalars(&self, values: &mut [f64]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        // f64 on the device: two 4-byte elements each.
        let buf = CudaBuf::alloc(&self.home, 2 * values.len(), DType::F32);
        let stream = self.home.stream.cu_stream();
        unsafe { result::memcpy_htod_async(buf.ptr, values, stream) }.map_err(|e| anyhow!("{e}"))?;
        let n = values.len();
        let comm = self.comm;
        let out = self
            .launch(None, buf, 2 * n, move |src, dst, s| {
                unsafe { nccl::all_reduce(src as _, dst as _, n, ncclsys::ncclDataType_t::ncclFloat64, ncclsys::ncclRedOp_t::ncclSum, comm, s) }.map(drop).map_err(nccl_err("all-reduce of scalars"))
            })
            .wait()?;
        unsafe { result::memcpy_dtoh_async(values, out.ptr, stream) }.map_err(|e| anyhow!("{e}"))?;
        self.home.stream.synchronize().map_err(|e| anyhow!("CUDA error after an all-reduce of scalars: {e}"))
    }
    fn barrier(&self) -> Result<()> {
        self.all_reduce_scalars(&mut [0.0])
    }
    fn traffic(&self) -> TrafficCount {
        self.traffic.get()
    }
}
