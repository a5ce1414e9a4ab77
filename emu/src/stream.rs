//! Streams: each runs its work in order on its own worker thread (the shared interface every
//! other module of the emulator enqueues through).
//!
//! Contract (used by driver.rs, blaslt.rs, nccl.rs):
//! - `enqueue(stream, job)`: queue `job` behind everything already queued on `stream` and return
//!   at once. A job returns `Ok(())` or the `CUresult` it failed with; the first failure is sticky
//!   (later jobs of that stream are skipped and `synchronize` returns it), as a CUDA context
//!   error is.
//! - `synchronize(stream)`: block until the stream's queue is empty; its sticky error or success.
//! - A null stream is the context's default stream (one worker like the others).
