//! The communicator: its state, failures and aborts, the waits and the barrier, and the init
//! that attaches it to the segment.
use super::segment::{alive, futex_wait, futex_wake_all, id_name, segment_len, Segment};
use super::{failure, last_message, remember, Failure, CHECK_EVERY, MAX_RANKS, SEGMENT_READY};
use cudarc::nccl::sys::{ncclResult_t, ncclUniqueId};
use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A communicator: one rank's view of the shared segment. `ncclComm_t` is a pointer made by
/// `Arc::into_raw`; jobs still queued hold clones, so destroying the handle never frees what a
/// job uses.
pub struct Comm {
    pub(super) rank: usize,
    pub(super) nranks: usize,
    pub(super) segment: OnceLock<Segment>,
    /// `ncclInProgress` during a non-blocking init, then `ncclSuccess` or the first error.
    status: AtomicU32,
    pub(super) aborted: AtomicBool,
    /// One collective of this communicator at a time (NCCL requires one order across ranks).
    pub(super) running: Mutex<()>,
    /// Collectives issued so far, for messages.
    pub(super) issued: AtomicU64,
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
    pub(super) fn fail(&self, f: &Failure) {
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
    pub(super) fn check(&self, seg: Option<&Segment>, what: &str, since: Instant) -> Result<(), Failure> {
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

    pub(super) fn barrier(&self, seg: &Segment, what: &str) -> Result<(), Failure> {
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

pub(super) fn prepare(id: &ncclUniqueId, nranks: usize, rank: usize) -> Result<(Arc<Comm>, CString), Failure> {
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

impl Comm {
    /// The shapes mode's virtual world: ready at once, with no segment (collectives never run).
    pub(super) fn ready_without_peers(&self) {
        self.status.store(ncclResult_t::ncclSuccess as u32, Ordering::Release);
    }
}

pub(super) fn finish_init(comm: &Comm, name: &CStr) {
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
