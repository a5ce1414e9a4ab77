//! The exported C API (what cudarc's nccl::sys resolves in libnccl.so): the `nccl*` entry points
//! and the validation that queues a collective on its stream.
use super::collective::{Kind, Op};
use super::comm::{finish_init, prepare, Comm};
use super::reduce::{Elem, Reduce};
use super::segment::new_unique_id;
use super::{failure, last_error, remember, Failure, CONFIG_MAGIC, CONFIG_UNDEF_INT, VERSION};
use crate::stream;
use cudarc::driver::sys::CUstream;
use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclResult_t, ncclUniqueId};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

/// The communicator behind a handle, without taking the handle's reference.
pub(super) unsafe fn comm_ref<'a>(comm: ncclComm_t) -> Option<&'a Comm> {
    (comm as *const Comm).as_ref()
}

fn report(f: Failure) -> ncclResult_t {
    remember(&f.message);
    f.code
}

#[no_mangle]
pub unsafe extern "C" fn ncclGetVersion(version: *mut c_int) -> ncclResult_t {
    if version.is_null() {
        return ncclResult_t::ncclInvalidArgument;
    }
    *version = VERSION;
    ncclResult_t::ncclSuccess
}

#[no_mangle]
pub unsafe extern "C" fn ncclGetUniqueId(id: *mut ncclUniqueId) -> ncclResult_t {
    if id.is_null() {
        return ncclResult_t::ncclInvalidArgument;
    }
    id.write(new_unique_id());
    ncclResult_t::ncclSuccess
}

unsafe fn init_rank(
    comm: *mut ncclComm_t,
    nranks: c_int,
    id: ncclUniqueId,
    rank: c_int,
    blocking: bool,
) -> ncclResult_t {
    if comm.is_null() || nranks < 1 || rank < 0 {
        return report(failure(
            ncclResult_t::ncclInvalidArgument,
            format!("ncclCommInitRank: rank {rank} of {nranks}, communicator pointer {comm:?}"),
        ));
    }
    let (c, name) = match prepare(&id, nranks as usize, rank as usize) {
        Ok(v) => v,
        Err(f) => return report(f),
    };
    *comm = Arc::into_raw(c.clone()) as ncclComm_t;
    if crate::mode::shapes_only() {
        // A virtual world (mode.rs): no segment, no peers to wait for.
        c.ready_without_peers();
        return if blocking { ncclResult_t::ncclSuccess } else { ncclResult_t::ncclInProgress };
    }
    if blocking {
        finish_init(&c, &name);
        return c.status();
    }
    let spawned = std::thread::Builder::new().name(format!("nccl-init-{rank}")).spawn(move || finish_init(&c, &name));
    match spawned {
        Ok(_) => ncclResult_t::ncclInProgress,
        Err(e) => report(failure(
            ncclResult_t::ncclSystemError,
            format!("ncclCommInitRankConfig: starting the init thread: {e}"),
        )),
    }
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRank(
    comm: *mut ncclComm_t,
    nranks: c_int,
    id: ncclUniqueId,
    rank: c_int,
) -> ncclResult_t {
    init_rank(comm, nranks, id, rank, true)
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRankConfig(
    comm: *mut ncclComm_t,
    nranks: c_int,
    id: ncclUniqueId,
    rank: c_int,
    config: *mut ncclConfig_t,
) -> ncclResult_t {
    let blocking = match config.as_ref() {
        None => true,
        Some(c) if c.magic != CONFIG_MAGIC => {
            return report(failure(
                ncclResult_t::ncclInvalidArgument,
                "ncclCommInitRankConfig: the config was not set up by NCCL_CONFIG_INITIALIZER (wrong magic)",
            ))
        }
        Some(c) => c.blocking == CONFIG_UNDEF_INT || c.blocking != 0,
    };
    init_rank(comm, nranks, id, rank, blocking)
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommGetAsyncError(comm: ncclComm_t, async_error: *mut ncclResult_t) -> ncclResult_t {
    match (comm_ref(comm), async_error.is_null()) {
        (Some(c), false) => {
            *async_error = c.status();
            ncclResult_t::ncclSuccess
        }
        _ => ncclResult_t::ncclInvalidArgument,
    }
}

/// Releases the handle's reference; queued collectives keep theirs.
unsafe fn release(comm: ncclComm_t) -> ncclResult_t {
    if comm.is_null() {
        return ncclResult_t::ncclInvalidArgument;
    }
    drop(Arc::from_raw(comm as *const Comm));
    ncclResult_t::ncclSuccess
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommFinalize(comm: ncclComm_t) -> ncclResult_t {
    // Collectives run on stream workers and finish on their own; nothing to flush.
    match comm_ref(comm) {
        Some(_) => ncclResult_t::ncclSuccess,
        None => ncclResult_t::ncclInvalidArgument,
    }
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommDestroy(comm: ncclComm_t) -> ncclResult_t {
    release(comm)
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommAbort(comm: ncclComm_t) -> ncclResult_t {
    match comm_ref(comm) {
        Some(c) => c.abort(),
        None => return ncclResult_t::ncclInvalidArgument,
    }
    release(comm)
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommCount(comm: ncclComm_t, count: *mut c_int) -> ncclResult_t {
    match (comm_ref(comm), count.is_null()) {
        (Some(c), false) => {
            *count = c.nranks as c_int;
            ncclResult_t::ncclSuccess
        }
        _ => ncclResult_t::ncclInvalidArgument,
    }
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommUserRank(comm: ncclComm_t, rank: *mut c_int) -> ncclResult_t {
    match (comm_ref(comm), rank.is_null()) {
        (Some(c), false) => {
            *rank = c.rank as c_int;
            ncclResult_t::ncclSuccess
        }
        _ => ncclResult_t::ncclInvalidArgument,
    }
}

#[no_mangle]
pub extern "C" fn ncclGetErrorString(result: ncclResult_t) -> *const c_char {
    let s: &'static CStr = match result {
        ncclResult_t::ncclSuccess => c"no error",
        ncclResult_t::ncclUnhandledCudaError => c"unhandled cuda error (run with NCCL_DEBUG=INFO for details)",
        ncclResult_t::ncclSystemError => c"unhandled system error (run with NCCL_DEBUG=INFO for details)",
        ncclResult_t::ncclInternalError => c"internal error - please report this issue to the NCCL developers",
        ncclResult_t::ncclInvalidArgument => c"invalid argument (run with NCCL_DEBUG=WARN for details)",
        ncclResult_t::ncclInvalidUsage => c"invalid usage (run with NCCL_DEBUG=WARN for details)",
        ncclResult_t::ncclRemoteError => c"remote process exited or there was a network error",
        ncclResult_t::ncclInProgress => c"NCCL operation in progress",
        ncclResult_t::ncclTimeout => c"timeout",
        _ => c"unknown result code",
    };
    s.as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn ncclGetLastError(_comm: ncclComm_t) -> *const c_char {
    // The pointer stays valid until the next failure replaces the message (as NCCL's does).
    last_error().lock().unwrap().as_ptr()
}

/// Group calls: every collective is queued on its stream when it is called, so a group changes
/// nothing about ordering; the depth is kept only to reject an unmatched `ncclGroupEnd`.
static GROUP_DEPTH: AtomicI32 = AtomicI32::new(0);

#[no_mangle]
pub extern "C" fn ncclGroupStart() -> ncclResult_t {
    GROUP_DEPTH.fetch_add(1, Ordering::AcqRel);
    ncclResult_t::ncclSuccess
}

#[no_mangle]
pub extern "C" fn ncclGroupEnd() -> ncclResult_t {
    if GROUP_DEPTH.fetch_sub(1, Ordering::AcqRel) <= 0 {
        GROUP_DEPTH.fetch_add(1, Ordering::AcqRel);
        return report(failure(ncclResult_t::ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart"));
    }
    ncclResult_t::ncclSuccess
}

/// Validates a collective's arguments and queues it on `stream`.
#[allow(clippy::too_many_arguments)]
unsafe fn enqueue(
    comm: ncclComm_t,
    kind: Kind,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    datatype: u32,
    op: u32,
    root: c_int,
    stream: *mut c_void,
) -> ncclResult_t {
    let call = kind.name();
    if comm.is_null() {
        return report(failure(ncclResult_t::ncclInvalidArgument, format!("{call}: null communicator")));
    }
    let c = comm_ref(comm).unwrap();
    match c.status() {
        ncclResult_t::ncclSuccess => {}
        ncclResult_t::ncclInProgress => {
            return report(failure(
                ncclResult_t::ncclInvalidUsage,
                format!("{call}: the communicator's non-blocking init has not completed"),
            ))
        }
        code => return code,
    }
    let Some(elem) = Elem::from_nccl(datatype) else {
        return report(failure(
            ncclResult_t::ncclInvalidArgument,
            format!("{call}: data type {datatype} is not supported by the emulator"),
        ));
    };
    let Some(reduce) = Reduce::from_nccl(op) else {
        return report(failure(
            ncclResult_t::ncclInvalidArgument,
            format!("{call}: reduction {op} is not supported by the emulator"),
        ));
    };
    if root < 0 || root as usize >= c.nranks {
        return report(failure(
            ncclResult_t::ncclInvalidArgument,
            format!("{call}: root {root} of {} ranks", c.nranks),
        ));
    }
    if count > 0 && (recv.is_null() || (send.is_null() && !(kind == Kind::Broadcast && root as usize != c.rank))) {
        return report(failure(ncclResult_t::ncclInvalidArgument, format!("{call}: null buffer")));
    }
    let op = Op { kind, send: send as usize, recv: recv as usize, count, elem, reduce, root: root as usize };
    if count == 0 {
        return ncclResult_t::ncclSuccess;
    }
    if crate::mode::shapes_only() {
        return check_buffers(&op, c.nranks);
    }
    // The job's own reference: the handle may be destroyed before the job runs.
    Arc::increment_strong_count(comm as *const Comm);
    let handle = Arc::from_raw(comm as *const Comm);
    let job: stream::Job = Box::new(move || {
        // A failed or aborted communicator does nothing: the error is reported through
        // ncclCommGetAsyncError, and the CUDA stream goes on (as after an aborted NCCL kernel).
        if handle.status() == ncclResult_t::ncclSuccess && !handle.aborted.load(Ordering::Acquire) {
            if let Err(f) = handle.run(&op) {
                handle.fail(&f);
            }
        }
        Ok(())
    });
    match stream::enqueue(stream as CUstream, job) {
        Ok(()) => ncclResult_t::ncclSuccess,
        Err(e) => {
            report(failure(ncclResult_t::ncclUnhandledCudaError, format!("{call}: queueing on the stream: {e:?}")))
        }
    }
}

/// The shapes mode's collective: both buffers inside live device allocations of the sizes the
/// collective reads and writes; nothing moves (mode.rs).
fn check_buffers(op: &Op, nranks: usize) -> ncclResult_t {
    let es = op.elem.size();
    let (send_elems, recv_elems) = match op.kind {
        Kind::AllReduce | Kind::Broadcast => (op.count, op.count),
        Kind::ReduceScatter => (op.count * nranks, op.count),
        Kind::AllGather => (op.count, op.count * nranks),
    };
    // Null only where allowed (a broadcast's non-root send, validated by the caller).
    let send_ok = op.send == 0 || crate::driver::check_range(op.send as u64, send_elems * es).is_ok();
    if !send_ok || crate::driver::check_range(op.recv as u64, recv_elems * es).is_err() {
        return report(failure(
            ncclResult_t::ncclInvalidArgument,
            format!(
                "{}: a buffer of {} × {:?} lies outside every device allocation",
                op.kind.name(),
                op.count,
                op.elem
            ),
        ));
    }
    ncclResult_t::ncclSuccess
}

#[no_mangle]
pub unsafe extern "C" fn ncclAllReduce(
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    datatype: u32,
    op: u32,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    enqueue(comm, Kind::AllReduce, send, recv, count, datatype, op, 0, stream)
}

#[no_mangle]
pub unsafe extern "C" fn ncclReduceScatter(
    send: *const c_void,
    recv: *mut c_void,
    recvcount: usize,
    datatype: u32,
    op: u32,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    enqueue(comm, Kind::ReduceScatter, send, recv, recvcount, datatype, op, 0, stream)
}

#[no_mangle]
pub unsafe extern "C" fn ncclAllGather(
    send: *const c_void,
    recv: *mut c_void,
    sendcount: usize,
    datatype: u32,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    enqueue(comm, Kind::AllGather, send, recv, sendcount, datatype, 0, 0, stream)
}

#[no_mangle]
pub unsafe extern "C" fn ncclBroadcast(
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    datatype: u32,
    root: c_int,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    enqueue(comm, Kind::Broadcast, send, recv, count, datatype, 0, root, stream)
}
