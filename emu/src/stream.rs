//! Streams and events: each stream runs its work in order on its own worker thread (the shared
//! interface every other module of the emulator enqueues through).
//!
//! Contract (used by driver/, blaslt/, nccl/):
//! - `enqueue(stream, job)`: queue `job` behind everything already queued on `stream` and return
//!   at once. A job returns `Ok(())` or the `CUresult` it failed with; the first failure is sticky
//!   (later jobs of that stream are skipped and `synchronize` returns it), as a CUDA context
//!   error is. Skipped jobs still release their events (see below), so another stream waiting on
//!   an event of a failed stream does not hang.
//! - `synchronize(stream)`: block until the stream's queue is empty; its sticky error or success.
//! - A null stream is the context's default stream (one worker like the others; it does not
//!   implicitly synchronise with the other streams: the backend creates its streams non-blocking).
//! - Events: `event_record(e, s)` queues a marker on `s` that completes the event's newest record;
//!   `stream_wait_event(s, e)` queues a job on `s` that blocks `s`'s worker until the record taken
//!   at call time completes (an event never recorded is complete, as in CUDA).
//! - Streams really run concurrently, so a missing event wait shows up as a wrong result rather
//!   than passing by luck; `LLAMA_CPT_EMU_JOB_DELAY_US=N` sleeps N µs before every job to widen
//!   such windows when hunting a race.
use crate::mode;
use cudarc::driver::sys::{cudaError_enum as CUresult, CUevent, CUstream};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One unit of stream work; runs on the stream's worker thread.
pub type Job = Box<dyn FnOnce() -> Result<(), CUresult> + Send + 'static>;

struct Queued {
    job: Job,
    /// Runs even after the stream failed (event markers), so waiters are released.
    always: bool,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Queued>,
    /// A job is being executed by the worker right now.
    busy: bool,
    error: Option<CUresult>,
    shutdown: bool,
}

struct Inner {
    state: Mutex<State>,
    /// Signals the worker (new job, shutdown) and the synchronizers (queue drained).
    changed: Condvar,
}

/// A stream: its queue and the worker thread that drains it. A `CUstream` handle is a pointer to
/// a leaked `Stream` (`create`) or null (the default stream).
pub struct Stream {
    inner: Arc<Inner>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

fn job_delay() -> Option<Duration> {
    static DELAY: OnceLock<Option<Duration>> = OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("LLAMA_CPT_EMU_JOB_DELAY_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&us| us > 0)
            .map(Duration::from_micros)
    })
}

impl Stream {
    fn spawn() -> Stream {
        let inner = Arc::new(Inner { state: Mutex::new(State::default()), changed: Condvar::new() });
        let for_worker = inner.clone();
        let worker = std::thread::Builder::new()
            .name("emu-stream".into())
            .spawn(move || run_worker(&for_worker))
            .expect("spawning an emulated stream's worker thread");
        Stream { inner, worker: Mutex::new(Some(worker)) }
    }

    fn push(&self, job: Job, always: bool) {
        let mut st = self.inner.state.lock().unwrap();
        st.jobs.push_back(Queued { job, always });
        self.inner.changed.notify_all();
    }

    fn synchronize(&self) -> Result<(), CUresult> {
        let mut st = self.inner.state.lock().unwrap();
        while !st.jobs.is_empty() || st.busy {
            st = self.inner.changed.wait(st).unwrap();
        }
        st.error.map_or(Ok(()), Err)
    }

    fn is_idle(&self) -> bool {
        let st = self.inner.state.lock().unwrap();
        st.jobs.is_empty() && !st.busy
    }

    fn shutdown(&self) {
        {
            let mut st = self.inner.state.lock().unwrap();
            st.shutdown = true;
            self.inner.changed.notify_all();
        }
        if let Some(w) = self.worker.lock().unwrap().take() {
            let _ = w.join();
        }
    }
}

fn run_worker(inner: &Inner) {
    loop {
        let (queued, failed) = {
            let mut st = inner.state.lock().unwrap();
            loop {
                if let Some(q) = st.jobs.pop_front() {
                    st.busy = true;
                    break (q, st.error.is_some());
                }
                if st.shutdown {
                    return;
                }
                st = inner.changed.wait(st).unwrap();
            }
        };
        let outcome = if failed && !queued.always {
            Ok(())
        } else {
            if let Some(d) = job_delay() {
                std::thread::sleep(d);
            }
            // A panicking job (an emulator bug) must not take the worker down with the queue
            // half-drained: it becomes the stream's error.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(queued.job)).unwrap_or_else(|p| {
                let msg =
                    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                eprintln!("emulated CUDA: a stream job panicked: {}", msg.unwrap_or_default());
                Err(CUresult::CUDA_ERROR_UNKNOWN)
            })
        };
        let mut st = inner.state.lock().unwrap();
        if let Err(e) = outcome {
            st.error.get_or_insert(e);
        }
        st.busy = false;
        inner.changed.notify_all();
    }
}

fn default_stream() -> Arc<Stream> {
    static DEFAULT: OnceLock<Arc<Stream>> = OnceLock::new();
    DEFAULT.get_or_init(|| Arc::new(Stream::spawn())).clone()
}

/// Every stream alive, by handle. A caller working on a stream holds an `Arc`, so a concurrent
/// `destroy` cannot free it under the caller (cuCtxSynchronize against cuStreamDestroy).
fn live_streams() -> &'static Mutex<HashMap<usize, Arc<Stream>>> {
    static LIVE: OnceLock<Mutex<HashMap<usize, Arc<Stream>>>> = OnceLock::new();
    LIVE.get_or_init(Default::default)
}

/// The stream a handle names: null is the default stream, others come from `create`; anything
/// else is an invalid handle.
fn resolve(s: CUstream) -> Result<Arc<Stream>, CUresult> {
    // CU_STREAM_LEGACY (0x1) and CU_STREAM_PER_THREAD (0x2) name the default stream too.
    if (s as usize) <= 2 {
        return Ok(default_stream());
    }
    live_streams().lock().unwrap().get(&(s as usize)).cloned().ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)
}

/// A new stream with its own worker. The handle is the stream's address (unique while it lives).
pub fn create() -> CUstream {
    let stream = Arc::new(Stream::spawn());
    let handle = Arc::as_ptr(&stream) as usize;
    live_streams().lock().unwrap().insert(handle, stream);
    handle as CUstream
}

/// Waits for the stream's queued work, stops its worker and frees it. (CUDA lets destroy return
/// at once and finish the work later; waiting is indistinguishable to a correct caller.)
pub fn destroy(s: CUstream) -> Result<(), CUresult> {
    if (s as usize) <= 2 {
        return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
    }
    let stream = live_streams().lock().unwrap().remove(&(s as usize)).ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
    let _ = stream.synchronize();
    stream.shutdown();
    Ok(())
}

/// Queues `job` on `s` (see the module contract).
pub fn enqueue(s: CUstream, job: Job) -> Result<(), CUresult> {
    resolve(s)?.push(job, false);
    Ok(())
}

/// Blocks until `s` has run everything queued; its sticky error, if any.
pub fn synchronize(s: CUstream) -> Result<(), CUresult> {
    let r = resolve(s)?.synchronize();
    mode::host_waited();
    r
}

/// `CUDA_SUCCESS` when `s` has nothing left to run, `CUDA_ERROR_NOT_READY` otherwise.
pub fn query(s: CUstream) -> Result<(), CUresult> {
    let stream = resolve(s)?;
    if stream.is_idle() {
        stream.synchronize()
    } else {
        Err(CUresult::CUDA_ERROR_NOT_READY)
    }
}

/// Synchronises every stream (cuCtxSynchronize); the first sticky error met.
pub fn synchronize_all() -> Result<(), CUresult> {
    let mut first = default_stream().synchronize().err();
    let live: Vec<Arc<Stream>> = live_streams().lock().unwrap().values().cloned().collect();
    for s in live {
        if let Err(e) = s.synchronize() {
            first.get_or_insert(e);
        }
    }
    mode::host_waited();
    first.map_or(Ok(()), Err)
}

#[derive(Default)]
struct EventState {
    /// Sequence number of the newest record call (0: never recorded).
    recorded: u64,
    /// Sequence number of the newest record that completed, and when.
    completed: u64,
    completed_at: Option<Instant>,
    /// Host waits before the newest record (the shapes mode's event model, mode.rs).
    recorded_after_waits: u64,
}

/// An event: record calls are numbered; completion of record n completes every record ≤ n (a
/// stream runs its markers in order, and markers of one event on different streams complete
/// only forwards).
pub struct Event {
    state: Mutex<EventState>,
    changed: Condvar,
}

fn live_events() -> &'static Mutex<Vec<usize>> {
    static LIVE: OnceLock<Mutex<Vec<usize>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(Vec::new()))
}

fn resolve_event(e: CUevent) -> Result<&'static Event, CUresult> {
    if e.is_null() || !live_events().lock().unwrap().contains(&(e as usize)) {
        return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
    }
    Ok(unsafe { &*(e as *const Event) })
}

pub fn event_create() -> CUevent {
    let ptr = Box::into_raw(Box::new(Event { state: Mutex::new(EventState::default()), changed: Condvar::new() }));
    live_events().lock().unwrap().push(ptr as usize);
    ptr as CUevent
}

/// Unregisters the event. Jobs already queued (markers, waits) may still point at it, so its
/// memory is leaked rather than freed under them (a few dozen bytes; the backend creates a
/// handful of events per run).
pub fn event_destroy(e: CUevent) -> Result<(), CUresult> {
    let mut live = live_events().lock().unwrap();
    let Some(pos) = live.iter().position(|&p| p == e as usize) else { return Err(CUresult::CUDA_ERROR_INVALID_HANDLE) };
    live.swap_remove(pos);
    Ok(())
}

/// Queues on `s` a marker that completes this record of `e`.
pub fn event_record(e: CUevent, s: CUstream) -> Result<(), CUresult> {
    let ev = resolve_event(e)?;
    let stream = resolve(s)?;
    let seq = {
        let mut st = ev.state.lock().unwrap();
        st.recorded += 1;
        st.recorded_after_waits = mode::host_waits();
        st.recorded
    };
    stream.push(
        Box::new(move || {
            let mut st = ev.state.lock().unwrap();
            if seq > st.completed {
                st.completed = seq;
                st.completed_at = Some(Instant::now());
            }
            ev.changed.notify_all();
            Ok(())
        }),
        true,
    );
    Ok(())
}

/// Queues on `s` a job that blocks `s` until the newest record of `e` (at call time) completes.
pub fn stream_wait_event(s: CUstream, e: CUevent) -> Result<(), CUresult> {
    let ev = resolve_event(e)?;
    let stream = resolve(s)?;
    let target = ev.state.lock().unwrap().recorded;
    if target == 0 {
        return Ok(());
    }
    stream.push(
        Box::new(move || {
            let mut st = ev.state.lock().unwrap();
            while st.completed < target {
                st = ev.changed.wait(st).unwrap();
            }
            Ok(())
        }),
        true,
    );
    Ok(())
}

/// Blocks the host until the newest record of `e` completes.
pub fn event_synchronize(e: CUevent) -> Result<(), CUresult> {
    let ev = resolve_event(e)?;
    let mut st = ev.state.lock().unwrap();
    let target = st.recorded;
    while st.completed < target {
        st = ev.changed.wait(st).unwrap();
    }
    mode::host_waited();
    Ok(())
}

/// `Ok` when the newest record of `e` completed, `CUDA_ERROR_NOT_READY` otherwise. In the shapes
/// mode a record is not seen complete before the host has waited for the device since (mode.rs).
pub fn event_query(e: CUevent) -> Result<(), CUresult> {
    let ev = resolve_event(e)?;
    let st = ev.state.lock().unwrap();
    let host_ahead = mode::shapes_only() && st.recorded > 0 && st.recorded_after_waits == mode::host_waits();
    if st.completed >= st.recorded && !host_ahead {
        Ok(())
    } else {
        Err(CUresult::CUDA_ERROR_NOT_READY)
    }
}

/// Milliseconds between the completions of two events' newest records (host clock).
pub fn event_elapsed_ms(start: CUevent, end: CUevent) -> Result<f32, CUresult> {
    let (a, b) = (resolve_event(start)?, resolve_event(end)?);
    let read = |ev: &Event| {
        let st = ev.state.lock().unwrap();
        if st.recorded == 0 {
            Err(CUresult::CUDA_ERROR_INVALID_HANDLE)
        } else if st.completed < st.recorded {
            Err(CUresult::CUDA_ERROR_NOT_READY)
        } else {
            Ok(st.completed_at.expect("a completed record has a time"))
        }
    };
    let (ta, tb) = (read(a)?, read(b)?);
    Ok(if tb >= ta { (tb - ta).as_secs_f32() * 1e3 } else { -((ta - tb).as_secs_f32() * 1e3) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn jobs_run_in_order_and_errors_are_sticky() {
        let s = create();
        let log = Arc::new(Mutex::new(Vec::new()));
        for i in 0..5 {
            let log = log.clone();
            enqueue(
                s,
                Box::new(move || {
                    log.lock().unwrap().push(i);
                    if i == 2 {
                        Err(CUresult::CUDA_ERROR_LAUNCH_FAILED)
                    } else {
                        Ok(())
                    }
                }),
            )
            .unwrap();
        }
        assert_eq!(synchronize(s), Err(CUresult::CUDA_ERROR_LAUNCH_FAILED));
        assert_eq!(*log.lock().unwrap(), vec![0, 1, 2], "jobs after the failure are skipped");
        destroy(s).unwrap();
        assert_eq!(synchronize(s), Err(CUresult::CUDA_ERROR_INVALID_HANDLE));
    }

    #[test]
    fn event_wait_orders_two_streams_and_its_absence_is_visible() {
        // Producer stream writes 1 after a delay; the consumer reads. With the wait the consumer
        // sees 1; without it, it runs concurrently and sees 0.
        for with_wait in [true, false] {
            let (p, c) = (create(), create());
            let e = event_create();
            let cell = Arc::new(AtomicU32::new(0));
            let seen = Arc::new(AtomicU32::new(99));
            let w = cell.clone();
            enqueue(
                p,
                Box::new(move || {
                    std::thread::sleep(Duration::from_millis(50));
                    w.store(1, Ordering::SeqCst);
                    Ok(())
                }),
            )
            .unwrap();
            event_record(e, p).unwrap();
            if with_wait {
                stream_wait_event(c, e).unwrap();
            }
            let (r, out) = (cell.clone(), seen.clone());
            enqueue(
                c,
                Box::new(move || {
                    out.store(r.load(Ordering::SeqCst), Ordering::SeqCst);
                    Ok(())
                }),
            )
            .unwrap();
            synchronize(c).unwrap();
            assert_eq!(seen.load(Ordering::SeqCst), if with_wait { 1 } else { 0 });
            event_synchronize(e).unwrap();
            assert_eq!(event_query(e), Ok(()));
            destroy(p).unwrap();
            destroy(c).unwrap();
            event_destroy(e).unwrap();
        }
    }

    #[test]
    fn a_failed_stream_still_releases_its_events() {
        let (p, c) = (create(), create());
        let e = event_create();
        enqueue(p, Box::new(|| Err(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS))).unwrap();
        event_record(e, p).unwrap();
        stream_wait_event(c, e).unwrap();
        assert_eq!(synchronize(c), Ok(()));
        assert_eq!(synchronize(p), Err(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS));
        destroy(p).unwrap();
        destroy(c).unwrap();
    }

    #[test]
    fn elapsed_time_follows_the_host_clock() {
        let s = create();
        let (a, b) = (event_create(), event_create());
        event_record(a, s).unwrap();
        enqueue(
            s,
            Box::new(|| {
                std::thread::sleep(Duration::from_millis(20));
                Ok(())
            }),
        )
        .unwrap();
        event_record(b, s).unwrap();
        event_synchronize(b).unwrap();
        let ms = event_elapsed_ms(a, b).unwrap();
        assert!(ms >= 19.0, "{ms} ms");
        destroy(s).unwrap();
    }
}
