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
use crate::stream;
use cudarc::driver::sys::CUstream;
use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclResult_t, ncclUniqueId};
use half::{bf16, f16};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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

/// Process-shared header at the start of the segment (zeroed by `ftruncate`).
#[repr(C)]
struct Header {
    ready: AtomicU64,
    nranks: AtomicU32,
    /// Ranks attached so far (a futex word during init).
    attached: AtomicU32,
    /// The central barrier: arrivals in this round, and the round number (the futex word).
    arrivals: AtomicU32,
    round: AtomicU32,
    /// 1 + the first rank that aborted or failed; 0 while all is well.
    failed: AtomicU32,
    /// 1 + the first rank found dead, so that every survivor names it (not a survivor that
    /// exited after it with its own error).
    dead: AtomicU32,
    pids: [AtomicI32; MAX_RANKS],
}

const SLOTS_OFFSET: usize = std::mem::size_of::<Header>().next_multiple_of(4096);

fn segment_len(nranks: usize) -> usize {
    SLOTS_OFFSET + nranks * SLOT_BYTES
}

/// A mapping of the shared segment.
struct Segment {
    base: *mut u8,
    len: usize,
}

// SAFETY: the header is accessed through atomics only; the slots are written by their own rank
// and read by others only between barriers.
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

impl Drop for Segment {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.base as *mut c_void, self.len) };
    }
}

impl Segment {
    fn map(fd: c_int, len: usize) -> std::io::Result<Segment> {
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Segment { base: base as *mut u8, len })
    }
    fn header(&self) -> &Header {
        unsafe { &*(self.base as *const Header) }
    }
    fn slot(&self, rank: usize) -> *mut u8 {
        unsafe { self.base.add(SLOTS_OFFSET + rank * SLOT_BYTES) }
    }
}

/// Why a collective or the init stopped: the NCCL code and a message for `ncclGetLastError`.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: ncclResult_t,
    pub message: String,
}

fn failure(code: ncclResult_t, message: impl Into<String>) -> Failure {
    Failure { code, message: message.into() }
}

/// The element types and reductions collectives accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    I8,
    U8,
    I32,
    U32,
    I64,
    U64,
    F16,
    F32,
    F64,
    Bf16,
}

impl Elem {
    fn from_nccl(t: u32) -> Option<Elem> {
        Some(match t {
            0 => Elem::I8,
            1 => Elem::U8,
            2 => Elem::I32,
            3 => Elem::U32,
            4 => Elem::I64,
            5 => Elem::U64,
            6 => Elem::F16,
            7 => Elem::F32,
            8 => Elem::F64,
            9 => Elem::Bf16,
            _ => return None, // fp8: not used by llama-cpt
        })
    }
    pub fn size(self) -> usize {
        match self {
            Elem::I8 | Elem::U8 => 1,
            Elem::F16 | Elem::Bf16 => 2,
            Elem::I32 | Elem::U32 | Elem::F32 => 4,
            Elem::I64 | Elem::U64 | Elem::F64 => 8,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    Prod,
    Max,
    Min,
}

impl Reduce {
    fn from_nccl(op: u32) -> Option<Reduce> {
        Some(match op {
            0 => Reduce::Sum,
            1 => Reduce::Prod,
            2 => Reduce::Max,
            3 => Reduce::Min,
            _ => return None, // avg and user-defined ops: not used by llama-cpt
        })
    }
}

/// Sum and product as NCCL computes them: IEEE for floats, wrapping for integers.
trait Arith: Copy + PartialOrd {
    fn add(self, b: Self) -> Self;
    fn mul(self, b: Self) -> Self;
}

macro_rules! arith {
    (float: $($t:ty),*; int: $($i:ty),*) => {
        $(impl Arith for $t {
            fn add(self, b: Self) -> Self { self + b }
            fn mul(self, b: Self) -> Self { self * b }
        })*
        $(impl Arith for $i {
            fn add(self, b: Self) -> Self { self.wrapping_add(b) }
            fn mul(self, b: Self) -> Self { self.wrapping_mul(b) }
        })*
    };
}
arith!(float: f32, f64; int: i8, u8, i32, u32, i64, u64);

/// `dst[i] = dst[i] ∘ src[i]` for `len` elements of `T`, each step computed in `W` (the type
/// itself, or f32 for the 16-bit floats, rounded back after every step).
///
/// # Safety
/// Both pointers must be valid for `len` elements (element-aligned or not).
unsafe fn combine_as<T: Copy, W: Arith>(
    dst: *mut u8,
    src: *const u8,
    len: usize,
    op: Reduce,
    widen: impl Fn(T) -> W,
    narrow: impl Fn(W) -> T,
) {
    let (d, s) = (dst as *mut T, src as *const T);
    for i in 0..len {
        let (a, b) = (widen(d.add(i).read_unaligned()), widen(s.add(i).read_unaligned()));
        let r = match op {
            Reduce::Sum => a.add(b),
            Reduce::Prod => a.mul(b),
            Reduce::Max => {
                if b > a {
                    b
                } else {
                    a
                }
            }
            Reduce::Min => {
                if b < a {
                    b
                } else {
                    a
                }
            }
        };
        d.add(i).write_unaligned(narrow(r));
    }
}

/// `dst[i] = dst[i] ∘ src[i]` for `len` elements.
///
/// # Safety
/// Both pointers must be valid for `len` elements (element-aligned or not).
unsafe fn combine(dst: *mut u8, src: *const u8, len: usize, elem: Elem, op: Reduce) {
    fn id<T>(x: T) -> T {
        x
    }
    match elem {
        Elem::I8 => combine_as::<i8, i8>(dst, src, len, op, id, id),
        Elem::U8 => combine_as::<u8, u8>(dst, src, len, op, id, id),
        Elem::I32 => combine_as::<i32, i32>(dst, src, len, op, id, id),
        Elem::U32 => combine_as::<u32, u32>(dst, src, len, op, id, id),
        Elem::I64 => combine_as::<i64, i64>(dst, src, len, op, id, id),
        Elem::U64 => combine_as::<u64, u64>(dst, src, len, op, id, id),
        Elem::F32 => combine_as::<f32, f32>(dst, src, len, op, id, id),
        Elem::F64 => combine_as::<f64, f64>(dst, src, len, op, id, id),
        // half's conversions round to nearest even, as the device's do.
        Elem::F16 => combine_as::<f16, f32>(dst, src, len, op, f16::to_f32, f16::from_f32),
        Elem::Bf16 => combine_as::<bf16, f32>(dst, src, len, op, bf16::to_f32, bf16::from_f32),
    }
}

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
    fn name(self) -> &'static str {
        match self {
            Kind::AllReduce => "all-reduce",
            Kind::ReduceScatter => "reduce-scatter",
            Kind::AllGather => "all-gather",
            Kind::Broadcast => "broadcast",
        }
    }
}

/// A communicator: one rank's view of the shared segment. `ncclComm_t` is a pointer made by
/// `Arc::into_raw`; jobs still queued hold clones, so destroying the handle never frees what a
/// job uses.
pub struct Comm {
    rank: usize,
    nranks: usize,
    segment: OnceLock<Segment>,
    /// `ncclInProgress` during a non-blocking init, then `ncclSuccess` or the first error.
    status: AtomicU32,
    aborted: AtomicBool,
    /// One collective of this communicator at a time (NCCL requires one order across ranks).
    running: Mutex<()>,
    /// Collectives issued so far, for messages.
    issued: AtomicU64,
    backstop: Duration,
}

/// The backstop that bounds every wait, whatever the caller does.
fn backstop() -> Duration {
    let secs = std::env::var("LLAMA_CPT_EMU_NCCL_TIMEOUT_S")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(900.0);
    Duration::from_secs_f64(secs)
}

fn last_error() -> &'static Mutex<CString> {
    static LAST: OnceLock<Mutex<CString>> = OnceLock::new();
    LAST.get_or_init(|| Mutex::new(CString::default()))
}

fn remember(message: &str) {
    *last_error().lock().unwrap() = CString::new(message.replace('\0', " ")).unwrap_or_default();
}

/// Whether process `pid` still runs (a zombie does not).
fn alive(pid: i32) -> bool {
    if unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    // "pid (comm) S ...": the state follows the last ')'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_none_or(|s| s != 'Z' && s != 'X'),
        Err(_) => true, // no /proc: trust kill()
    }
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // Shared (not FUTEX_PRIVATE): the word lives in memory mapped by several processes.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, &ts as *const libc::timespec) };
}

fn futex_wake_all(word: &AtomicU32) {
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

/// The segment name inside a unique id.
fn id_name(id: &ncclUniqueId) -> Option<CString> {
    let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
    let rest = bytes.strip_prefix(&ID_TAG[..])?;
    let end = rest.iter().position(|&b| b == 0)?;
    CString::new(&rest[..end]).ok().filter(|n| n.as_bytes().starts_with(b"/"))
}

/// A fresh unique id: a segment name no other communicator of this machine uses.
pub fn new_unique_id() -> ncclUniqueId {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let name = format!("/lcpt-nccl-{}-{nanos}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut id = ncclUniqueId { internal: [0; 128] };
    for (d, s) in id.internal.iter_mut().zip(ID_TAG.iter().chain(name.as_bytes())) {
        *d = *s as c_char;
    }
    id
}

impl Comm {
    fn new(rank: usize, nranks: usize) -> Comm {
        Comm {
            rank,
            nranks,
            segment: OnceLock::new(),
            status: AtomicU32::new(ncclResult_t::ncclInProgress as u32),
            aborted: AtomicBool::new(false),
            running: Mutex::new(()),
            issued: AtomicU64::new(0),
            backstop: backstop(),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// `ncclSuccess`, `ncclInProgress` (init running) or the error that ended the communicator.
    pub fn status(&self) -> ncclResult_t {
        match self.status.load(Ordering::Acquire) {
            0 => ncclResult_t::ncclSuccess,
            1 => ncclResult_t::ncclUnhandledCudaError,
            2 => ncclResult_t::ncclSystemError,
            3 => ncclResult_t::ncclInternalError,
            4 => ncclResult_t::ncclInvalidArgument,
            5 => ncclResult_t::ncclInvalidUsage,
            6 => ncclResult_t::ncclRemoteError,
            7 => ncclResult_t::ncclInProgress,
            _ => ncclResult_t::ncclTimeout,
        }
    }

    /// Records the first failure: the communicator's asynchronous error from now on. Peers learn
    /// that this rank failed (they stop waiting for it with `ncclRemoteError`).
    fn fail(&self, f: &Failure) {
        let healthy = |s: u32| s == ncclResult_t::ncclSuccess as u32 || s == ncclResult_t::ncclInProgress as u32;
        if self
            .status
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| healthy(s).then_some(f.code as u32))
            .is_err()
        {
            return; // the first error stays
        }
        let message = format!("emulated NCCL, rank {} of {}: {}", self.rank, self.nranks, f.message);
        eprintln!("{message}");
        remember(&message);
        self.tell_peers();
    }

    fn tell_peers(&self) {
        if let Some(seg) = self.segment.get() {
            let h = seg.header();
            let _ = h.failed.compare_exchange(0, self.rank as u32 + 1, Ordering::AcqRel, Ordering::Acquire);
            futex_wake_all(&h.round);
            futex_wake_all(&h.attached);
        }
    }

    /// `ncclCommAbort`: every wait of this communicator ends, now and later.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
        self.tell_peers();
    }

    /// Why waiting must stop, if it must: abort, a peer that failed or exited, the backstop.
    fn check(&self, seg: Option<&Segment>, what: &str, since: Instant) -> Result<(), Failure> {
        if self.aborted.load(Ordering::Acquire) {
            return Err(failure(ncclResult_t::ncclInvalidUsage, format!("{what}: the communicator was aborted")));
        }
        if let Some(seg) = seg {
            let h = seg.header();
            // A dead rank first: when one dies, another may fail before us, and the death is the cause.
            let exited = |r: usize| {
                failure(
                    ncclResult_t::ncclRemoteError,
                    format!("{what}: rank {r} (pid {}) has exited", h.pids[r].load(Ordering::Acquire)),
                )
            };
            let dead = h.dead.load(Ordering::Acquire);
            if dead != 0 {
                return Err(exited(dead as usize - 1));
            }
            for r in (0..self.nranks).filter(|&r| r != self.rank) {
                let pid = h.pids[r].load(Ordering::Acquire);
                if pid != 0 && !alive(pid) {
                    let first = match h.dead.compare_exchange(0, r as u32 + 1, Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => r,
                        Err(earlier) => earlier as usize - 1,
                    };
                    return Err(exited(first));
                }
            }
            let failed = h.failed.load(Ordering::Acquire);
            if failed != 0 && failed as usize != self.rank + 1 {
                return Err(failure(
                    ncclResult_t::ncclRemoteError,
                    format!("{what}: rank {} aborted its communicator or failed", failed - 1),
                ));
            }
        }
        if since.elapsed() > self.backstop {
            return Err(failure(
                ncclResult_t::ncclTimeout,
                format!(
                    "{what}: no progress for {:.0} s (the emulator's backstop, LLAMA_CPT_EMU_NCCL_TIMEOUT_S)",
                    self.backstop.as_secs_f64()
                ),
            ));
        }
        Ok(())
    }

    /// Waits until `done(word)`, checking for reasons to give up between futex sleeps.
    fn wait(&self, seg: &Segment, word: &AtomicU32, what: &str, done: impl Fn(u32) -> bool) -> Result<(), Failure> {
        let since = Instant::now();
        for spin in 0.. {
            let v = word.load(Ordering::Acquire);
            if done(v) {
                return Ok(());
            }
            // Yield a little first (the peer is usually about to arrive), then sleep.
            if spin < 64 {
                std::thread::yield_now();
                continue;
            }
            self.check(Some(seg), what, since)?;
            futex_wait(word, v, CHECK_EVERY);
        }
        unreachable!()
    }

    fn barrier(&self, seg: &Segment, what: &str) -> Result<(), Failure> {
        let h = seg.header();
        let round = h.round.load(Ordering::Acquire);
        if h.arrivals.fetch_add(1, Ordering::AcqRel) + 1 == self.nranks as u32 {
            h.arrivals.store(0, Ordering::Relaxed);
            h.round.fetch_add(1, Ordering::Release);
            futex_wake_all(&h.round);
            return Ok(());
        }
        self.wait(seg, &h.round, what, |v| v != round)
    }

    /// Creates (rank 0) or opens the segment named by the id and waits for every rank.
    fn attach(&self, name: &CStr) -> Result<(), Failure> {
        let what = format!("init ({} ranks, {})", self.nranks, name.to_string_lossy());
        let len = segment_len(self.nranks);
        let since = Instant::now();
        let sys = |e: std::io::Error, doing: &str| {
            failure(ncclResult_t::ncclSystemError, format!("{what}: {doing} /dev/shm{}: {e}", name.to_string_lossy()))
        };
        let seg = if self.rank == 0 {
            let fd = unsafe { libc::shm_open(name.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600) };
            if fd < 0 {
                return Err(sys(std::io::Error::last_os_error(), "creating"));
            }
            let seg = if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Segment::map(fd, len)
            };
            unsafe { libc::close(fd) };
            let seg = seg.map_err(|e| sys(e, "sizing and mapping"))?;
            seg.header().nranks.store(self.nranks as u32, Ordering::Relaxed);
            seg.header().ready.store(SEGMENT_READY, Ordering::Release);
            seg
        } else {
            loop {
                let fd = unsafe { libc::shm_open(name.as_ptr(), libc::O_RDWR, 0) };
                if fd >= 0 {
                    let mut st: libc::stat = unsafe { std::mem::zeroed() };
                    let sized = unsafe { libc::fstat(fd, &mut st) } == 0 && st.st_size as usize >= len;
                    let seg = if sized { Some(Segment::map(fd, len)) } else { None };
                    unsafe { libc::close(fd) };
                    if let Some(seg) = seg {
                        let seg = seg.map_err(|e| sys(e, "mapping"))?;
                        if seg.header().ready.load(Ordering::Acquire) == SEGMENT_READY {
                            break seg;
                        }
                    }
                }
                // Rank 0 has not created it yet.
                self.check(None, &what, since)?;
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let h = seg.header();
        let made_for = h.nranks.load(Ordering::Relaxed) as usize;
        if made_for != self.nranks {
            return Err(failure(
                ncclResult_t::ncclInvalidUsage,
                format!("{what}: rank 0 created the communicator for {made_for} ranks"),
            ));
        }
        if h.pids[self.rank].swap(std::process::id() as i32, Ordering::AcqRel) != 0 {
            return Err(failure(ncclResult_t::ncclInvalidUsage, format!("{what}: rank {} attached twice", self.rank)));
        }
        h.attached.fetch_add(1, Ordering::AcqRel);
        futex_wake_all(&h.attached);
        let seg = self.segment.get_or_init(|| seg);
        let n = self.nranks as u32;
        let everyone = self.wait(seg, &seg.header().attached, &what, |v| v >= n);
        // Once all are attached, or never: the name goes either way, so nothing is left in /dev/shm.
        if self.rank == 0 {
            unsafe { libc::shm_unlink(name.as_ptr()) };
        }
        everyone
    }

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

/// Attaches a communicator for `rank` of `nranks` to the segment named by `id` (blocking); the
/// emulator's own tests call this directly with threads or processes as ranks.
pub fn init(id: &ncclUniqueId, nranks: usize, rank: usize) -> Result<Arc<Comm>, Failure> {
    let (comm, name) = prepare(id, nranks, rank)?;
    finish_init(&comm, &name);
    match comm.status() {
        ncclResult_t::ncclSuccess => Ok(comm),
        code => Err(failure(code, last_message())),
    }
}

fn prepare(id: &ncclUniqueId, nranks: usize, rank: usize) -> Result<(Arc<Comm>, CString), Failure> {
    let name = id_name(id).ok_or_else(|| {
        failure(
            ncclResult_t::ncclInvalidArgument,
            "ncclCommInitRank: the unique id was not made by this library's ncclGetUniqueId",
        )
    })?;
    if nranks == 0 || nranks > MAX_RANKS || rank >= nranks {
        return Err(failure(
            ncclResult_t::ncclInvalidArgument,
            format!("ncclCommInitRank: rank {rank} of {nranks} ranks (at most {MAX_RANKS})"),
        ));
    }
    Ok((Arc::new(Comm::new(rank, nranks)), name))
}

fn finish_init(comm: &Comm, name: &CStr) {
    match comm.attach(name) {
        Ok(()) => {
            let _ = comm.status.compare_exchange(
                ncclResult_t::ncclInProgress as u32,
                ncclResult_t::ncclSuccess as u32,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        Err(f) => comm.fail(&f),
    }
}

fn last_message() -> String {
    last_error().lock().unwrap().to_string_lossy().into_owned()
}

// ---- The exported C API (what cudarc's nccl::sys resolves in libnccl.so) ----

/// The communicator behind a handle, without taking the handle's reference.
unsafe fn comm_ref<'a>(comm: ncclComm_t) -> Option<&'a Comm> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranks as threads of this process: `body(rank, comm)` on each, results in rank order.
    fn ranks<T: Send + 'static>(n: usize, body: impl Fn(usize, Arc<Comm>) -> T + Send + Sync + 'static) -> Vec<T> {
        let id = new_unique_id();
        let body = Arc::new(body);
        let threads: Vec<_> = (0..n)
            .rev() // the others start before rank 0 creates the segment
            .map(|r| {
                let body = body.clone();
                std::thread::spawn(move || body(r, init(&id, n, r).unwrap()))
            })
            .collect();
        let mut out: Vec<T> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        out.reverse();
        out
    }

    fn op(kind: Kind, send: &[f32], recv: &mut [f32], count: usize) -> Op {
        Op {
            kind,
            send: send.as_ptr() as usize,
            recv: recv.as_mut_ptr() as usize,
            count,
            elem: Elem::F32,
            reduce: Reduce::Sum,
            root: 0,
        }
    }

    /// Distinct values per rank and index whose f32 sums depend on the order of addition.
    fn data(rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7 + rank * 13) % 101) as f32 * 0.1 + (rank as f32 + 1.0) * 1e-7 * i as f32).collect()
    }

    /// Sum over ranks in rank order, as a plain loop.
    fn rank_order_sum(n: usize, len: usize) -> Vec<f32> {
        let all: Vec<Vec<f32>> = (0..n).map(|r| data(r, len)).collect();
        (0..len).map(|i| (1..n).fold(all[0][i], |acc, r| acc + all[r][i])).collect()
    }

    #[test]
    fn the_four_collectives_over_three_ranks_match_a_rank_order_reference() {
        // More than a slot per rank, so every collective takes several rounds.
        let len = SLOT_BYTES / 4 * 3 + 123;
        let n = 3;
        let results = ranks(n, move |r, comm| {
            let mine = data(r, len);
            let mut sum = vec![0f32; len];
            comm.run(&op(Kind::AllReduce, &mine, &mut sum, len)).unwrap();
            // Reduce-scatter of n·k elements: rank r keeps part r of the sum.
            let k = len / n;
            let mut part = vec![0f32; k];
            comm.run(&op(Kind::ReduceScatter, &mine[..n * k], &mut part, k)).unwrap();
            let mut gathered = vec![0f32; n * k];
            comm.run(&op(Kind::AllGather, &part, &mut gathered, k)).unwrap();
            // Broadcast in place: only the root's buffer is read.
            let mut from_root = if r == 0 { mine.clone() } else { vec![0f32; len] };
            let p = from_root.as_mut_ptr() as usize;
            comm.run(&Op { send: p, recv: p, ..op(Kind::Broadcast, &[], &mut [], len) }).unwrap();
            // In place: the send buffer is the receive buffer.
            let mut inplace = mine.clone();
            let p = inplace.as_mut_ptr() as usize;
            comm.run(&Op { send: p, recv: p, ..op(Kind::AllReduce, &[], &mut [], len) }).unwrap();
            (sum, part, gathered, from_root, inplace)
        });
        let want = rank_order_sum(n, len);
        let k = len / n;
        for (r, (sum, part, gathered, from_root, inplace)) in results.iter().enumerate() {
            assert!(
                sum.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "rank {r}: all-reduce is not the rank-order sum"
            );
            assert_eq!(inplace, sum, "rank {r}: in-place all-reduce");
            assert!(
                part.iter().zip(&want[r * k..]).all(|(a, b)| a.to_bits() == b.to_bits()),
                "rank {r}: reduce-scatter part"
            );
            assert!(
                gathered.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "rank {r}: all-gather of the parts"
            );
            assert_eq!(from_root, &data(0, len), "rank {r}: broadcast from rank 0");
        }
    }

    #[test]
    fn bf16_sums_round_after_each_rank_and_other_types_reduce() {
        let n = 3;
        let results = ranks(n, move |r, comm| {
            let mine: Vec<bf16> =
                (0..1000).map(|i| bf16::from_f32(1.0 + (i as f32) * 0.37 + r as f32 * 0.011)).collect();
            let mut out = vec![bf16::ZERO; 1000];
            let o = Op {
                kind: Kind::AllReduce,
                send: mine.as_ptr() as usize,
                recv: out.as_mut_ptr() as usize,
                count: 1000,
                elem: Elem::Bf16,
                reduce: Reduce::Sum,
                root: 0,
            };
            comm.run(&o).unwrap();
            let ints = [r as i64 - 5, 1 << 40];
            let mut max = [0i64; 2];
            comm.run(&Op {
                elem: Elem::I64,
                reduce: Reduce::Max,
                send: ints.as_ptr() as usize,
                recv: max.as_mut_ptr() as usize,
                count: 2,
                ..o
            })
            .unwrap();
            let scalars = [0.1f64 * (r + 1) as f64];
            let mut total = [0f64];
            comm.run(&Op {
                elem: Elem::F64,
                send: scalars.as_ptr() as usize,
                recv: total.as_mut_ptr() as usize,
                count: 1,
                ..o
            })
            .unwrap();
            (out, max, total)
        });
        for (out, max, total) in &results {
            for (i, got) in out.iter().enumerate() {
                let v = |r: usize| bf16::from_f32(1.0 + (i as f32) * 0.37 + r as f32 * 0.011);
                let want = bf16::from_f32(bf16::from_f32(v(0).to_f32() + v(1).to_f32()).to_f32() + v(2).to_f32());
                assert_eq!(got.to_bits(), want.to_bits(), "element {i}");
            }
            assert_eq!(*max, [-3, 1 << 40]);
            assert_eq!(total[0], (0.1f64 + 0.2) + 0.30000000000000004);
        }
    }

    #[test]
    fn abort_from_another_thread_ends_a_wait_and_the_peer_learns_of_it() {
        let id = new_unique_id();
        let peer = std::thread::spawn(move || init(&id, 2, 1).unwrap());
        let comm = init(&id, 2, 0).unwrap();
        let peer = peer.join().unwrap();
        let aborter = {
            let comm = comm.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                comm.abort();
            })
        };
        // Rank 1 never joins: only the abort can end this.
        let (x, mut y) = (vec![1f32; 10], vec![0f32; 10]);
        let t0 = Instant::now();
        let err = comm.run(&op(Kind::AllReduce, &x, &mut y, 10)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert!(err.message.contains("aborted"), "{}", err.message);
        aborter.join().unwrap();
        let err = peer.run(&op(Kind::AllReduce, &x, &mut y, 10)).unwrap_err();
        assert_eq!(err.code, ncclResult_t::ncclRemoteError);
        assert!(err.message.contains("rank 0 aborted"), "{}", err.message);
    }

    #[test]
    fn non_blocking_init_reports_in_progress_then_success() {
        let mut id = ncclUniqueId { internal: [0; 128] };
        assert_eq!(unsafe { ncclGetUniqueId(&mut id) }, ncclResult_t::ncclSuccess);
        let config = || {
            let mut c: ncclConfig_t = unsafe { std::mem::zeroed() };
            c.size = std::mem::size_of::<ncclConfig_t>();
            c.magic = CONFIG_MAGIC;
            c.version = VERSION as u32;
            c.blocking = 0;
            c
        };
        let handles: Vec<usize> = (0..2)
            .map(|r| {
                let mut comm: ncclComm_t = std::ptr::null_mut();
                let mut cfg = config();
                assert_eq!(
                    unsafe { ncclCommInitRankConfig(&mut comm, 2, id, r, &mut cfg) },
                    ncclResult_t::ncclInProgress
                );
                comm as usize
            })
            .collect();
        let t0 = Instant::now();
        for &h in &handles {
            loop {
                let mut state = ncclResult_t::ncclInternalError;
                assert_eq!(unsafe { ncclCommGetAsyncError(h as ncclComm_t, &mut state) }, ncclResult_t::ncclSuccess);
                if state == ncclResult_t::ncclSuccess {
                    break;
                }
                assert_eq!(state, ncclResult_t::ncclInProgress);
                assert!(t0.elapsed() < Duration::from_secs(10), "init never completed");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let mut bad = config();
        bad.magic = 0;
        let mut comm: ncclComm_t = std::ptr::null_mut();
        assert_eq!(unsafe { ncclCommInitRankConfig(&mut comm, 2, id, 0, &mut bad) }, ncclResult_t::ncclInvalidArgument);
        for h in handles {
            assert_eq!(unsafe { ncclCommDestroy(h as ncclComm_t) }, ncclResult_t::ncclSuccess);
        }
    }

    #[test]
    fn collectives_queued_on_streams_run_in_order_and_a_failure_becomes_the_async_error() {
        let mut id = ncclUniqueId { internal: [0; 128] };
        assert_eq!(unsafe { ncclGetUniqueId(&mut id) }, ncclResult_t::ncclSuccess);
        let rank = move |r: i32| {
            let mut comm: ncclComm_t = std::ptr::null_mut();
            assert_eq!(unsafe { ncclCommInitRank(&mut comm, 2, id, r) }, ncclResult_t::ncclSuccess);
            let s = stream::create();
            let x: Vec<f32> = (0..5000).map(|i| (i as f32) * (r as f32 + 1.0)).collect();
            let mut y = vec![0f32; 5000];
            let mut z = vec![0f32; 10000];
            unsafe {
                // The all-gather reads what the all-reduce wrote: only stream order makes it right.
                assert_eq!(
                    ncclAllReduce(x.as_ptr() as _, y.as_mut_ptr() as _, 5000, 7, 0, comm, s as _),
                    ncclResult_t::ncclSuccess
                );
                assert_eq!(
                    ncclAllGather(y.as_ptr() as _, z.as_mut_ptr() as _, 5000, 7, comm, s as _),
                    ncclResult_t::ncclSuccess
                );
            }
            stream::synchronize(s).unwrap();
            (comm as usize, s as usize, y, z)
        };
        let peer = std::thread::spawn(move || rank(1));
        let (c0, s0, y, mut z) = rank(0);
        let (c1, _, y1, _) = peer.join().unwrap();
        let want: Vec<f32> = (0..5000).map(|i| i as f32 + i as f32 * 2.0).collect();
        assert_eq!((&y, &y1), (&want, &want));
        assert_eq!(z, [&want[..], &want[..]].concat());
        // Rank 1 aborts; rank 0's next collective fails without poisoning its stream.
        assert_eq!(unsafe { ncclCommAbort(c1 as ncclComm_t) }, ncclResult_t::ncclSuccess);
        let (c0, s0) = (c0 as ncclComm_t, s0 as CUstream);
        assert_eq!(
            unsafe { ncclAllReduce(y.as_ptr() as _, z.as_mut_ptr() as _, 5000, 7, 0, c0, s0 as _) },
            ncclResult_t::ncclSuccess
        );
        stream::synchronize(s0).unwrap();
        let mut state = ncclResult_t::ncclSuccess;
        assert_eq!(unsafe { ncclCommGetAsyncError(c0, &mut state) }, ncclResult_t::ncclSuccess);
        assert_eq!(state, ncclResult_t::ncclRemoteError);
        let last = unsafe { CStr::from_ptr(ncclGetLastError(c0)) }.to_string_lossy().into_owned();
        assert!(last.contains("rank 1 aborted"), "{last}");
        // Later calls report the error at once.
        assert_eq!(
            unsafe { ncclAllReduce(y.as_ptr() as _, z.as_mut_ptr() as _, 5000, 7, 0, c0, s0 as _) },
            ncclResult_t::ncclRemoteError
        );
        assert_eq!(unsafe { ncclCommDestroy(c0) }, ncclResult_t::ncclSuccess);
    }

    #[test]
    fn an_init_whose_peer_never_comes_ends_on_abort_and_leaves_no_segment_behind() {
        let id = new_unique_id();
        let name = id_name(&id).unwrap();
        let mut comm: ncclComm_t = std::ptr::null_mut();
        let mut cfg: ncclConfig_t = unsafe { std::mem::zeroed() };
        cfg.magic = CONFIG_MAGIC;
        cfg.blocking = 0;
        assert_eq!(unsafe { ncclCommInitRankConfig(&mut comm, 2, id, 0, &mut cfg) }, ncclResult_t::ncclInProgress);
        let c = unsafe { comm_ref(comm) }.unwrap() as *const Comm as usize;
        std::thread::sleep(Duration::from_millis(100));
        let shm = std::path::Path::new("/dev/shm").join(&name.to_str().unwrap()[1..]);
        assert!(shm.exists(), "rank 0 created {name:?}");
        assert_eq!(unsafe { ncclCommGetAsyncError(comm, &mut ncclResult_t::ncclSuccess) }, ncclResult_t::ncclSuccess);
        // Keep the communicator alive past the abort to read its final state.
        unsafe { Arc::increment_strong_count(c as *const Comm) };
        let kept = unsafe { Arc::from_raw(c as *const Comm) };
        assert_eq!(unsafe { ncclCommAbort(comm) }, ncclResult_t::ncclSuccess);
        let t0 = Instant::now();
        while kept.status() == ncclResult_t::ncclInProgress {
            assert!(t0.elapsed() < Duration::from_secs(5), "the init did not notice the abort");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_ne!(kept.status(), ncclResult_t::ncclSuccess);
        assert!(!shm.exists(), "{name:?} left behind");
    }

    /// How a rank in another process is told what to do (see `child_rank`).
    const CHILD: &str = "LLAMA_CPT_EMU_NCCL_TEST_CHILD";

    fn hex(id: &ncclUniqueId) -> String {
        id.internal.iter().map(|&c| format!("{:02x}", c as u8)).collect()
    }

    fn spawn_child(id: &ncclUniqueId, rank: usize, nranks: usize, scenario: &str) -> std::process::Child {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "nccl::tests::child_rank", "--nocapture", "--test-threads=1"])
            .env(CHILD, format!("{rank} {nranks} {scenario} {}", hex(id)))
            .spawn()
            .unwrap()
    }

    /// A rank in a process of its own, when started by a test below; otherwise nothing.
    #[test]
    fn child_rank() {
        let Ok(spec) = std::env::var(CHILD) else { return };
        let parts: Vec<&str> = spec.split(' ').collect();
        let (rank, nranks, scenario) = (parts[0].parse().unwrap(), parts[1].parse().unwrap(), parts[2]);
        let mut id = ncclUniqueId { internal: [0; 128] };
        for (i, d) in id.internal.iter_mut().enumerate() {
            *d = u8::from_str_radix(&parts[3][2 * i..2 * i + 2], 16).unwrap() as c_char;
        }
        let comm = init(&id, nranks, rank).unwrap();
        match scenario {
            "sum" => {
                let len = SLOT_BYTES / 4 + 17;
                let mut out = vec![0f32; len];
                comm.run(&op(Kind::AllReduce, &data(rank, len), &mut out, len)).unwrap();
                assert_eq!(out, rank_order_sum(nranks, len));
            }
            // Attach, then die without joining the collective the others wait in.
            "exit" => std::process::exit(0),
            other => panic!("unknown scenario {other}"),
        }
    }

    #[test]
    fn ranks_in_separate_processes_sum_in_rank_order() {
        let id = new_unique_id();
        let children: Vec<_> = (1..3).map(|r| spawn_child(&id, r, 3, "sum")).collect();
        let comm = init(&id, 3, 0).unwrap();
        let len = SLOT_BYTES / 4 + 17;
        let mut out = vec![0f32; len];
        comm.run(&op(Kind::AllReduce, &data(0, len), &mut out, len)).unwrap();
        assert_eq!(out, rank_order_sum(3, len));
        for mut c in children {
            assert!(c.wait().unwrap().success(), "a child rank failed");
        }
        // Rank 0 removed the segment's name once everyone was attached.
        let name = id_name(&id).unwrap();
        assert!(!std::path::Path::new("/dev/shm").join(&name.to_str().unwrap()[1..]).exists(), "{name:?} left behind");
    }

    #[test]
    fn a_peer_process_that_exits_ends_the_wait_with_a_remote_error() {
        let id = new_unique_id();
        let mut child = spawn_child(&id, 1, 2, "exit");
        let comm = init(&id, 2, 0).unwrap();
        assert!(child.wait().unwrap().success());
        let (x, mut y) = (vec![1f32; 10], vec![0f32; 10]);
        let t0 = Instant::now();
        let err = comm.run(&op(Kind::AllReduce, &x, &mut y, 10)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert_eq!(err.code, ncclResult_t::ncclRemoteError);
        assert!(err.message.contains("rank 1") && err.message.contains("has exited"), "{}", err.message);
    }
}
