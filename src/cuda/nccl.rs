//! The NCCL communicator: collectives on device buffers, on a stream of their own. A collective
//! waits (on the device) for the work queued so far on the compute stream, runs on the
//! communication stream, and its [`Pending::wait`] makes the compute stream wait for it — the host
//! never blocks, and the backward keeps queueing kernels while gradients travel. The NCCL unique
//! id goes from rank 0 to the others through the TCP rendezvous at `MASTER_ADDR:MASTER_PORT`, so
//! no MPI library is needed. libnccl is loaded at run time (cudarc `dynamic-loading`).
//!
//! A dead or stalled peer must stop the job, not hang it (as production trainers do): the
//! communicator is created non-blocking and its init polled against the timeout, and a watchdog
//! thread polls `ncclCommGetAsyncError` and the completion of every collective in flight (an event
//! before and after it on the communication stream). A collective that started but did not finish
//! within the timeout, or an asynchronous NCCL error, makes the watchdog abort the communicator
//! (`ncclCommAbort` ends the NCCL kernels, so no stream waits forever) and record an error naming
//! the collective (a NCCL call that fails aborts it the same way); every later call,
//! [`Pending::wait`] and the host syncs here return the error, and the
//! trainer exits with the last checkpoint intact. Should the process still be alive one more
//! timeout later, the watchdog ends it.
use super::alloc::{CudaBuf, DType, Home};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{result, CudaEvent, CudaStream};
use cudarc::nccl::{result as nccl, sys as ncclsys};
use llama_cpt_parallel::launch::Launch;
use llama_cpt_parallel::{Collective, Communicator, Pending, Traffic, TrafficCount};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the watchdog looks at the collectives in flight.
const WATCH_EVERY: Duration = Duration::from_millis(50);

pub struct Nccl {
    comm: CommHandle,
    rank: usize,
    world: usize,
    home: Arc<Home>,
    comm_stream: Arc<CudaStream>,
    /// NCCL calls on one communicator must not be issued concurrently; counts the collectives.
    issue: Mutex<u64>,
    traffic: Traffic,
    watch: Arc<Watch>,
    watchdog: Option<JoinHandle<()>>,
}

/// The raw communicator, movable to the watchdog thread. NCCL calls on it are serialised by
/// `Nccl::issue`, except `ncclCommGetAsyncError` and `ncclCommAbort`, which NCCL allows from
/// another thread.
#[derive(Clone, Copy)]
struct CommHandle(ncclsys::ncclComm_t);

// SAFETY: see `CommHandle`; buffers are ordered by streams.
unsafe impl Send for CommHandle {}
unsafe impl Sync for CommHandle {}

/// What the watchdog thread and the communicator share.
struct Watch {
    state: Mutex<WatchState>,
    wake: Condvar,
    rank: usize,
    timeout: Duration,
}

#[derive(Default)]
struct WatchState {
    in_flight: VecDeque<InFlight>,
    /// Set once, by the watchdog: why the communicator was aborted.
    failure: Option<String>,
    stop: bool,
}

/// A collective queued on the communication stream: events just before and just after it.
struct InFlight {
    what: String,
    started: CudaEvent,
    done: CudaEvent,
    /// When the watchdog first saw `started` complete: the timeout counts from there, so time
    /// spent waiting for this rank's own compute stream is not held against the peers.
    started_at: Option<Instant>,
}

/// How every message about a failed communicator ends.
const ABORTED: &str = " (NCCL communicator aborted)";

impl Watch {
    /// Records the failure (once) and aborts the communicator. The error is recorded before the
    /// abort, so whoever the abort releases sees it.
    fn fail(&self, state: &mut WatchState, comm: CommHandle, message: String) {
        if state.failure.is_some() {
            return;
        }
        eprintln!("{message}{ABORTED}");
        state.failure = Some(format!("{message}{ABORTED}"));
        state.in_flight.clear();
        unsafe { ncclsys::ncclCommAbort(comm.0) };
    }

    /// The error that stopped the communicator, if one has.
    fn check(&self) -> Result<()> {
        match &self.state.lock().unwrap().failure {
            Some(f) => Err(anyhow!("{f}")),
            None => Ok(()),
        }
    }
}

fn nccl_err(what: &str) -> impl Fn(nccl::NcclError) -> anyhow::Error + '_ {
    move |e| anyhow!("NCCL {what}: {}", error_name(e.0))
}

/// NCCL's description of a result code.
fn error_name(code: ncclsys::ncclResult_t) -> String {
    let text = unsafe { std::ffi::CStr::from_ptr(ncclsys::ncclGetErrorString(code)) };
    format!("{code:?} ({})", text.to_string_lossy())
}

/// `ncclCommGetAsyncError`: `Ok(true)` when idle and healthy, `Ok(false)` while an operation
/// (the non-blocking init) is in progress, or the error.
fn async_state(comm: CommHandle) -> Result<bool, ncclsys::ncclResult_t> {
    let mut state = ncclsys::ncclResult_t::ncclSuccess;
    let call = unsafe { ncclsys::ncclCommGetAsyncError(comm.0, &mut state) };
    match (call, state) {
        (ncclsys::ncclResult_t::ncclSuccess, ncclsys::ncclResult_t::ncclSuccess) => Ok(true),
        (ncclsys::ncclResult_t::ncclSuccess, ncclsys::ncclResult_t::ncclInProgress) => Ok(false),
        (ncclsys::ncclResult_t::ncclSuccess, e) | (e, _) => Err(e),
    }
}

/// NCCL's own message for the last failure, when the library has one.
fn last_error(comm: CommHandle) -> String {
    let text = unsafe { ncclsys::ncclGetLastError(comm.0) };
    if text.is_null() {
        return String::new();
    }
    let text = unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy().trim().to_string();
    if text.is_empty() {
        text
    } else {
        format!(": {text}")
    }
}

/// `NCCL_CONFIG_INITIALIZER` (nccl.h) with `blocking` set: every other field "undefined"
/// (`INT_MIN` / null) so that NCCL picks its defaults; `version` is that of the header cudarc's
/// layout of the struct comes from (NCCL 2.30), as a C caller compiled against it would pass.
fn nccl_config(blocking: bool) -> ncclsys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    ncclsys::ncclConfig_t {
        size: std::mem::size_of::<ncclsys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 2 * 10000 + 30 * 100,
        blocking: blocking as i32,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

impl Nccl {
    pub(crate) fn new(home: Arc<Home>, launch: &Launch, timeout: Duration) -> Result<Nccl> {
        if !unsafe { ncclsys::is_culib_present() } {
            bail!("libnccl.so not found on the library path (a symlink libnccl.so -> libnccl.so.2 may be needed)");
        }
        let (rank, world) = (launch.rank, launch.world_size);
        let mut id = if rank == 0 {
            nccl::get_uniqueid().map_err(nccl_err("get unique id"))?
        } else {
            ncclsys::ncclUniqueId { internal: [0; 128] }
        };
        let virtual_world = launch.launcher == llama_cpt_parallel::launch::VIRTUAL_WORLD;
        if world > 1 && !virtual_world {
            let (host, port) = launch
                .master
                .as_ref()
                .context("a multi-GPU launch needs MASTER_ADDR and MASTER_PORT (rank 0 hands out the NCCL id there)")?;
            let mine: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            let shared = llama_cpt_parallel::rendezvous::share(
                (host, *port),
                rank,
                world,
                (rank == 0).then_some(&mine[..]),
                timeout,
            )?;
            if shared.len() != 128 {
                bail!("rendezvous: the NCCL id has {} bytes, not 128", shared.len());
            }
            for (d, s) in id.internal.iter_mut().zip(shared) {
                *d = s as _;
            }
        }
        home.ctx.bind_to_thread().map_err(|e| anyhow!("binding the CUDA context: {e}"))?;
        let comm = Self::init(id, rank, world, timeout).with_context(|| {
            if virtual_world {
                format!("a virtual world of {world} ranks (a dry run) needs an NCCL that runs without peers: the emulated device in its shapes mode (LLAMA_CPT_EMU_MODE=shapes)")
            } else {
                format!("NCCL, rank {rank} of {world}")
            }
        })?;
        let comm_stream = home.ctx.new_stream().context("creating the communication stream")?;
        let watch = Arc::new(Watch { state: Mutex::default(), wake: Condvar::new(), rank, timeout });
        let watchdog = {
            let (watch, ctx) = (watch.clone(), home.ctx.clone());
            std::thread::Builder::new().name("nccl-watchdog".into()).spawn(move || {
                let _ = ctx.bind_to_thread();
                watchdog(&watch, comm)
            })
        };
        let watchdog = match watchdog {
            Ok(w) => w,
            Err(e) => {
                unsafe { ncclsys::ncclCommAbort(comm.0) };
                bail!("starting the NCCL watchdog thread: {e}");
            }
        };
        Ok(Nccl {
            comm,
            rank,
            world,
            home,
            comm_stream,
            issue: Mutex::new(0),
            traffic: Traffic::default(),
            watch,
            watchdog: Some(watchdog),
        })
    }

    /// A non-blocking `ncclCommInitRankConfig`, polled until ready; aborted after `timeout`.
    fn init(id: ncclsys::ncclUniqueId, rank: usize, world: usize, timeout: Duration) -> Result<CommHandle> {
        let mut raw: ncclsys::ncclComm_t = std::ptr::null_mut();
        let mut config = nccl_config(false);
        let started = unsafe { nccl::comm_init_rank_config(&mut raw, world as i32, id, rank as i32, &mut config) };
        if let Err(e) = started {
            if !raw.is_null() {
                unsafe { ncclsys::ncclCommAbort(raw) };
            }
            bail!("rank {rank}: NCCL communicator init ({world} ranks): {}", error_name(e.0));
        }
        let comm = CommHandle(raw);
        let deadline = Instant::now() + timeout;
        loop {
            match async_state(comm) {
                Ok(true) => return Ok(comm),
                Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Ok(false) => {
                    unsafe { ncclsys::ncclCommAbort(comm.0) };
                    bail!("rank {rank}: the NCCL communicator of {world} ranks was not ready within {:.0} s; another rank has probably died or never started", timeout.as_secs_f64());
                }
                Err(e) => {
                    let detail = last_error(comm);
                    unsafe { ncclsys::ncclCommAbort(comm.0) };
                    bail!("rank {rank}: NCCL communicator init ({world} ranks) failed: {}{detail}", error_name(e));
                }
            }
        }
    }

    /// Runs `op(input, output, stream)` on the communication stream after the compute stream's
    /// queued work; the result is usable on the compute stream once waited for.
    /// `kind` is counted in the traffic (scalar all-reduces are not: `None`).
    fn launch(
        &self,
        kind: Option<Collective>,
        input: CudaBuf,
        out_len: usize,
        op: impl FnOnce(u64, u64, ncclsys::cudaStream_t) -> Result<()>,
    ) -> Pending<CudaBuf> {
        let dtype = input.dtype;
        if let Some(kind) = kind {
            let bytes = (dtype.size() * if kind == Collective::AllGather { out_len } else { input.len }) as u64;
            self.traffic.count(kind, bytes);
        }
        let output = CudaBuf::alloc(&self.home, out_len, dtype);
        // Set once `op` may have enqueued a read of `input` on the communication stream.
        let mut handed_over = false;
        let run = || -> Result<()> {
            let mut issued = self.issue.lock().unwrap();
            // After the watchdog aborted the communicator, no NCCL call may touch it.
            self.watch.check()?;
            *issued += 1;
            let what = format!(
                "{} #{} of {} bytes",
                kind.map_or("all-reduce of scalars", collective_name),
                *issued,
                dtype.size() * input.len
            );
            self.comm_stream.join(&self.home.stream).map_err(|e| anyhow!("{e}"))?;
            let started = self.comm_stream.record_event(None).map_err(|e| anyhow!("{e}"))?;
            handed_over = true;
            if let Err(e) = op(input.ptr, output.ptr, self.comm_stream.cu_stream() as ncclsys::cudaStream_t) {
                // A failed NCCL call leaves the communicator unusable: abort it, as the watchdog would.
                let message = format!("rank {}: {what}: {e:#}{}", self.rank, last_error(self.comm));
                self.watch.fail(&mut self.watch.state.lock().unwrap(), self.comm, message.clone());
                bail!("{message}{ABORTED}");
            }
            let done = self.comm_stream.record_event(None).map_err(|e| anyhow!("{e}"))?;
            self.watch.state.lock().unwrap().in_flight.push_back(InFlight { what, started, done, started_at: None });
            Ok(())
        };
        let launched = run();
        // The input goes back to the pool when the collective has finished reading it (so a
        // backward's gradient buckets do not all stay alive until their waits), never before: a
        // block handed to the communication stream is retired behind an event recorded there.
        let retired = if handed_over {
            match self.comm_stream.record_event(None) {
                Ok(read) => Some(input.free_after(read)),
                // No event, no proof the read is over: the block is never reused.
                Err(_) => {
                    std::mem::forget(input);
                    None
                }
            }
        } else {
            None
        };
        if let Err(e) = launched {
            return Pending::new(move || Err(e));
        }
        let (compute, comm, watch, home) =
            (self.home.stream.clone(), self.comm_stream.clone(), self.watch.clone(), self.home.clone());
        Pending::new(move || {
            compute.join(&comm).map_err(|e| anyhow!("{e}"))?;
            // The compute stream is now ordered after the collective: its input may be reused.
            if let Some(ticket) = retired {
                home.pool.lock().unwrap().free_retired(ticket);
            }
            watch.check()?;
            Ok(output)
        })
    }
}

fn collective_name(kind: Collective) -> &'static str {
    match kind {
        Collective::AllReduce => "all-reduce",
        Collective::ReduceScatter => "reduce-scatter",
        Collective::AllGather => "all-gather",
        Collective::Broadcast => "broadcast",
    }
}

/// The watchdog thread: retires finished collectives, and aborts the communicator on an
/// asynchronous NCCL error or a collective that has run longer than the timeout.
fn watchdog(watch: &Watch, comm: CommHandle) {
    let mut state = watch.state.lock().unwrap();
    let mut failed_at: Option<Instant> = None;
    loop {
        state = watch.wake.wait_timeout(state, WATCH_EVERY).unwrap().0;
        if state.stop {
            return;
        }
        if let Some(t) = failed_at {
            // The error went to every caller, yet the process lives on (stuck somewhere no
            // error reaches): end it rather than hang.
            if t.elapsed() > watch.timeout {
                eprintln!(
                    "{}; the process did not stop within another {:.0} s after that, so the NCCL watchdog ends it",
                    state.failure.as_deref().unwrap_or_default(),
                    watch.timeout.as_secs_f64()
                );
                std::process::exit(1);
            }
            continue;
        }
        let now = Instant::now();
        for f in state.in_flight.iter_mut().filter(|f| f.started_at.is_none()) {
            if f.started.is_complete() {
                f.started_at = Some(now);
            }
        }
        let mut reason = None;
        while let Some(f) = state.in_flight.front() {
            match f.done.try_is_complete() {
                Ok(true) => drop(state.in_flight.pop_front()),
                Ok(false) => {
                    if f.started_at.is_some_and(|t| now - t > watch.timeout) {
                        reason = Some(format!(
                            "NCCL {} did not complete within {:.0} s; another rank has probably died or stalled",
                            f.what,
                            watch.timeout.as_secs_f64()
                        ));
                    }
                    break;
                }
                Err(e) => {
                    reason = Some(format!("CUDA error on the communication stream during NCCL {}: {e}", f.what));
                    break;
                }
            }
        }
        if reason.is_none() {
            if let Err(e) = async_state(comm) {
                let during = state.in_flight.front().map_or(String::new(), |f| format!(" during {}", f.what));
                reason = Some(format!("NCCL reported {}{during}{}", error_name(e), last_error(comm)));
            }
        }
        if let Some(reason) = reason {
            watch.fail(&mut state, comm, format!("rank {}: {reason}", watch.rank));
            failed_at = Some(Instant::now());
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        self.watch.state.lock().unwrap().stop = true;
        self.watch.wake.notify_all();
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        // After an abort too: the aborted collectives end, and buffers they read may then be freed.
        let _ = self.comm_stream.synchronize();
        if self.watch.check().is_err() {
            return; // aborted: the handle is gone
        }
        unsafe {
            let _ = nccl::comm_destroy(self.comm.0);
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
        let (n, comm, ty) = (buf.len, self.comm.0, nccl_type(&buf));
        self.launch(Some(Collective::AllReduce), buf, n, move |src, dst, s| {
            unsafe { nccl::all_reduce(src as _, dst as _, n, ty, ncclsys::ncclRedOp_t::ncclSum, comm, s) }
                .map(drop)
                .map_err(nccl_err("all-reduce"))
        })
    }
    fn reduce_scatter(&self, buf: CudaBuf) -> Pending<CudaBuf> {
        let (n, comm, w, ty) = (buf.len, self.comm.0, self.world, nccl_type(&buf));
        if n % w != 0 {
            return Pending::new(move || bail!("reduce-scatter of {n} elements over {w} ranks: not a multiple"));
        }
        self.launch(Some(Collective::ReduceScatter), buf, n / w, move |src, dst, s| {
            unsafe { nccl::reduce_scatter(src as _, dst as _, n / w, ty, ncclsys::ncclRedOp_t::ncclSum, comm, s) }
                .map(drop)
                .map_err(nccl_err("reduce-scatter"))
        })
    }
    fn all_gather(&self, buf: CudaBuf) -> Pending<CudaBuf> {
        let (n, comm, ty) = (buf.len, self.comm.0, nccl_type(&buf));
        self.launch(Some(Collective::AllGather), buf, n * self.world, move |src, dst, s| {
            unsafe { nccl::all_gather(src as _, dst as _, n, ty, comm, s) }.map(drop).map_err(nccl_err("all-gather"))
        })
    }
    fn broadcast(&self, buf: CudaBuf, root: usize) -> Pending<CudaBuf> {
        let (n, comm, ty) = (buf.len, self.comm.0, nccl_type(&buf));
        self.launch(Some(Collective::Broadcast), buf, n, move |src, dst, s| {
            unsafe { nccl::broadcast(src as _, dst as _, n, ty, root as i32, comm, s) }
                .map(drop)
                .map_err(nccl_err("broadcast"))
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
        let comm = self.comm.0;
        let out = self
            .launch(None, buf, 2 * n, move |src, dst, s| {
                unsafe {
                    nccl::all_reduce(
                        src as _,
                        dst as _,
                        n,
                        ncclsys::ncclDataType_t::ncclFloat64,
                        ncclsys::ncclRedOp_t::ncclSum,
                        comm,
                        s,
                    )
                }
                .map(drop)
                .map_err(nccl_err("all-reduce of scalars"))
            })
            .wait()?;
        unsafe { result::memcpy_dtoh_async(values, out.ptr, stream) }.map_err(|e| anyhow!("{e}"))?;
        self.home.profile.sync(std::panic::Location::caller(), "all-reduce of scalars");
        self.home.stream.synchronize().map_err(|e| anyhow!("CUDA error after an all-reduce of scalars: {e}"))?;
        // The sync may have returned because the watchdog aborted the collective: then `values`
        // are not sums.
        self.watch.check()
    }
    fn barrier(&self) -> Result<()> {
        self.all_reduce_scalars(&mut [0.0])
    }
    fn traffic(&self) -> TrafficCount {
        self.traffic.get()
    }
}
