//! NCCL across the processes of one machine (one emulated GPU each).
//!
//! - The unique id names a POSIX shared-memory segment (`/dev/shm/lcpt-nccl-<pid>-<time>-<n>`);
//!   rank 0 creates it, the others open it, and rank 0 removes the name once every rank is
//!   attached (the mapping lives on until the last process lets go, so nothing is left behind).
//! - The segment holds a header (ranks' pids, a process-shared barrier, a failure flag) and one
//!   staging slot per rank. A collective runs in rounds of at most a slot: every rank copies its
//!   part into its slot, all meet at the barrier, every rank computes its output from the slots in
//!   rank order (so results are deterministic and identical on every rank, as NCCL's are not
//!   promised to be but ours are), and all meet again before the slots are reused.
//! - A collective is a job on the caller's stream (stream.rs), so it is ordered by events like
//!   any kernel. Waits spin briefly, then sleep on a futex in the segment, and between sleeps they
//!   notice: `ncclCommAbort` of this communicator (from another thread), a peer that aborted, a
//!   peer process that has exited, and a backstop timeout (`LLAMA_CPT_EMU_NCCL_TIMEOUT_S`, default
//!   900 s) so that a test can never hang. A failure does not poison the CUDA stream (an aborted
//!   NCCL kernel on a GPU does not either): it becomes the communicator's asynchronous error
//!   (`ncclCommGetAsyncError`), later collectives of that communicator do nothing, and the
//!   message is kept for `ncclGetLastError`.
//! - `ncclCommInitRankConfig` with `blocking = 0` returns `ncclInProgress` and attaches on a
//!   thread of its own; `ncclCommGetAsyncError` says `ncclInProgress` until it is done.
//! - Sums of bf16/f16 round to the type after each rank's addition (as a ring does per hop).
// The exported functions are NCCL's C API; their safety contract is NCCL's documentation.
#![allow(clippy::missing_safety_doc)]
mod api;
mod collective;
mod comm;
mod reduce;
mod segment;
#[cfg(test)]
mod tests;

pub use api::*;
pub use collective::{Kind, Op};
pub use comm::{init, Comm};
pub use reduce::{Elem, Reduce};
pub use segment::new_unique_id;

use cudarc::nccl::sys::ncclResult_t;
use std::ffi::{c_int, CString};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The version this library reports: NCCL 2.30.0, the API cudarc's bindings describe.
const VERSION: c_int = 2 * 10000 + 30 * 100;
/// `NCCL_CONFIG_INITIALIZER`'s magic and the "not set" value of its integer fields (nccl.h).
const CONFIG_MAGIC: u32 = 0xcafe_beef;
const CONFIG_UNDEF_INT: c_int = c_int::MIN;
/// Prefix of our unique ids, so a foreign id is an error rather than a wrong segment name.
const ID_TAG: &[u8; 8] = b"lcptnccl";
/// Written last by rank 0: the header is initialised.
const SEGMENT_READY: u64 = 0x6c63_7074_6e63_636c;
const MAX_RANKS: usize = 256;
/// Bytes each rank stages per round; larger collectives take several rounds.
pub const SLOT_BYTES: usize = 1 << 20;
/// How long a waiter sleeps between checks of abort, dead peers and the backstop.
const CHECK_EVERY: Duration = Duration::from_millis(20);

/// Why a collective or the init stopped: the NCCL code and a message for `ncclGetLastError`.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: ncclResult_t,
    pub message: String,
}

fn failure(code: ncclResult_t, message: impl Into<String>) -> Failure {
    Failure { code, message: message.into() }
}

fn last_error() -> &'static Mutex<CString> {
    static LAST: OnceLock<Mutex<CString>> = OnceLock::new();
    LAST.get_or_init(|| Mutex::new(CString::default()))
}

fn remember(message: &str) {
    *last_error().lock().unwrap() = CString::new(message.replace('\0', " ")).unwrap_or_default();
}

fn last_message() -> String {
    last_error().lock().unwrap().to_string_lossy().into_owned()
}
