//! Stream-ordered caching allocator and the device buffer type.
//!
//! Every kernel, copy and GEMM of a [`super::Cuda`] runs on its one stream, so a block freed by a
//! dropped buffer can be handed to the next allocation at once: whatever the new owner enqueues
//! runs after the work that still reads the old contents. Blocks are cached by size class and never
//! returned to the driver during training; `cuMemAlloc` is called only when no cached block of the
//! class is free (so not at all once two training steps have run: the first creates the backend's
//! cached uploads of positions, ids and targets after some of its temporaries, so the second's peak
//! is a little higher), and on out-of-memory the cache
//! is released (after a stream synchronize) and the allocation retried.
//!
//! A block that another stream reads (the input of a collective on the communication stream) is
//! *retired* instead of freed: it goes back to the free lists once an event recorded behind its
//! reader has completed (checked at every allocation), or when the compute stream has been
//! ordered after the reader — whichever comes first; never while the reader may still run. Before
//! the free lists, an allocation takes the oldest retired block of its class but the newest
//! retired block, in stream order: the compute stream is made to wait (on the device, not the
//! host) for that block's event first. Without this a host that runs ahead of the device (the
//! normal case on a GPU training a large model) would keep every gradient bucket of a backward
//! alive at once; with it at most the newest of a class is held back, so the last collective
//! still overlaps the compute that follows.
//!
//! `LLAMA_CPT_CUDA_EXACT_ALLOC=1` makes every block exactly the requested size (cached by that
//! size): the emulated compute-sanitizer (tools/emu-sanitize.sh) needs it, so that a kernel
//! reading or writing past the end of its buffer lands in a red zone, not in a size class's slack.
//!
//! Every block is counted under the [`MemoryUse`] that was current when it was handed out (set by
//! the trainer through [`crate::backend::memory_scope`]), and the split is kept at the peak.
use crate::backend::{MemStats, MemoryUse};
use cudarc::driver::{result, sys, CudaEvent};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// A block waiting for its reader on another stream (see the module comment).
struct Retiring {
    ticket: u64,
    ptr: sys::CUdeviceptr,
    class: usize,
    usage: MemoryUse,
    /// Recorded on the reader's stream after the last work that reads the block.
    after: CudaEvent,
}

/// Names one retired block, to free it once its reader is known to be ordered before the compute
/// stream (tickets are never reused, unlike addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RetireTicket(u64);

#[derive(Default)]
pub(crate) struct Pool {
    free: HashMap<usize, Vec<sys::CUdeviceptr>>,
    retiring: VecDeque<Retiring>,
    tickets: u64,
    pub(crate) stats: MemStats,
    /// What the blocks handed out now are for.
    pub(crate) current_use: MemoryUse,
    /// Blocks of exactly the requested size (see the module comment).
    exact_sizes: bool,
}

/// The size class of a request: multiples of 512 B up to 64 KiB, then an eighth of the next power
/// of two (less than 25% waste).
pub(crate) fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    if bytes <= 64 << 10 {
        return bytes.div_ceil(512) * 512;
    }
    let step = bytes.next_power_of_two() / 8;
    bytes.div_ceil(step) * step
}

impl Pool {
    /// An empty pool; `exact_sizes`: blocks of exactly the requested size (module comment).
    pub(crate) fn new(exact_sizes: bool) -> Pool {
        Pool { exact_sizes, ..Pool::default() }
    }

    /// A block of at least `bytes`; the caller holds the context current and the stream.
    pub(crate) fn alloc(
        &mut self,
        bytes: usize,
        stream: sys::CUstream,
    ) -> Result<(sys::CUdeviceptr, usize, MemoryUse), result::DriverError> {
        let class = if self.exact_sizes { bytes.max(1) } else { size_class(bytes) };
        self.reclaim_finished();
        // A retired block first: taking a free one instead would leave the retired one idle once
        // its reader finished, and a backward would hold a block per bucket, not per class.
        let ptr = if let Some(p) = self.reuse_retired(class, stream)? {
            p
        } else if let Some(p) = self.free.get_mut(&class).and_then(|v| v.pop()) {
            self.stats.cache_hits += 1;
            p
        } else {
            let p = match unsafe { result::malloc_sync(class) } {
                Ok(p) => p,
                Err(_) => {
                    // Out of memory (or fragmented): give the cache back and try once more.
                    self.release_cached(stream)?;
                    unsafe { result::malloc_sync(class) }?
                }
            };
            self.stats.driver_allocs += 1;
            self.stats.reserved += class;
            self.stats.peak_reserved = self.stats.peak_reserved.max(self.stats.reserved);
            p
        };
        let usage = self.current_use;
        self.stats.in_use += class;
        self.stats.by_use[usage.index()] += class;
        if self.stats.in_use > self.stats.peak_in_use {
            self.stats.peak_in_use = self.stats.in_use;
            self.stats.peak_by_use = self.stats.by_use;
            self.stats.peak_during = usage;
        }
        Ok((ptr, class, usage))
    }

    /// The oldest retired block of `class` but the newest, with `stream` ordered after its
    /// reader (the module comment); `None` when there is none.
    fn reuse_retired(
        &mut self,
        class: usize,
        stream: sys::CUstream,
    ) -> Result<Option<sys::CUdeviceptr>, result::DriverError> {
        let older = self.retiring.len().saturating_sub(1);
        let Some(i) = self.retiring.iter().take(older).position(|r| r.class == class) else { return Ok(None) };
        let wait = unsafe {
            result::stream::wait_event(
                stream,
                self.retiring[i].after.cu_event(),
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        };
        // Not ordered: the block stays retired (a new block is safer than a race).
        if wait.is_err() {
            return Ok(None);
        }
        let r = self.retiring.remove(i).expect("found above");
        self.stats.retiring -= r.class;
        self.stats.in_use -= r.class;
        self.stats.by_use[r.usage.index()] -= r.class;
        self.stats.reused_in_stream_order += 1;
        Ok(Some(r.ptr))
    }

    pub(crate) fn free(&mut self, ptr: sys::CUdeviceptr, class: usize, usage: MemoryUse) {
        self.stats.in_use -= class;
        self.stats.by_use[usage.index()] -= class;
        self.free.entry(class).or_default().push(ptr);
    }

    /// A retired block back to the free lists.
    fn release(&mut self, r: Retiring) {
        self.stats.retiring -= r.class;
        self.free(r.ptr, r.class, r.usage);
    }

    fn retire(&mut self, ptr: sys::CUdeviceptr, class: usize, usage: MemoryUse, after: CudaEvent) -> RetireTicket {
        self.tickets += 1;
        self.stats.retiring += class;
        self.retiring.push_back(Retiring { ticket: self.tickets, ptr, class, usage, after });
        RetireTicket(self.tickets)
    }

    /// Frees the retired block of `ticket` if it is still waiting (its reader is now ordered
    /// before everything the compute stream runs next).
    pub(crate) fn free_retired(&mut self, ticket: RetireTicket) {
        if let Some(r) = self.retiring.iter().position(|r| r.ticket == ticket.0).and_then(|i| self.retiring.remove(i)) {
            self.release(r);
        }
    }

    /// Frees the retired blocks whose readers have finished, oldest first, stopping at the first
    /// that has not (readers on one stream finish in order, so one query per allocation suffices
    /// in the steady state). A failed query keeps its block: a block lost to the cache is safer
    /// than one reused under a reader.
    fn reclaim_finished(&mut self) {
        while self.retiring.front().is_some_and(|r| r.after.try_is_complete().unwrap_or(false)) {
            let r = self.retiring.pop_front().expect("checked above");
            self.release(r);
        }
    }

    /// Returns every cached (free) block to the driver.
    pub(crate) fn release_cached(&mut self, stream: sys::CUstream) -> Result<(), result::DriverError> {
        unsafe { result::stream::synchronize(stream) }?;
        self.reclaim_finished();
        for (class, ptrs) in self.free.drain() {
            for p in ptrs {
                unsafe { result::free_sync(p) }?;
                self.stats.reserved -= class;
            }
        }
        Ok(())
    }
}

/// What a buffer needs to give its block back.
pub(crate) struct Home {
    pub(crate) pool: Mutex<Pool>,
    pub(crate) ctx: Arc<cudarc::driver::CudaContext>,
    pub(crate) stream: Arc<cudarc::driver::CudaStream>,
    pub(crate) profile: super::profile::Profiler,
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        if let Ok(mut p) = self.pool.lock() {
            let _ = p.release_cached(self.stream.cu_stream());
        }
    }
}

/// Element type of a device buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 4-byte elements: f32 (also u32/i32 index arrays).
    F32,
    /// bf16 (mixed precision: parameters and activations).
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
    /// The suffix of the kernel entry points for this storage type (`rmsnorm_fwd_bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
}

/// A device buffer of `len` elements of type `dtype` — the
/// [`Backend::Buf`](crate::backend::Backend::Buf) of the CUDA backend. Cloning copies the contents
/// (on the stream); dropping returns the block to the cache.
pub struct CudaBuf {
    pub(crate) ptr: sys::CUdeviceptr,
    pub(crate) len: usize,
    pub(crate) dtype: DType,
    pub(crate) class: usize,
    pub(crate) usage: MemoryUse,
    pub(crate) home: Arc<Home>,
}

// SAFETY: a CUdeviceptr is an address valid in the context from any thread; all access to the
// memory is ordered by the one stream, and the pool is behind a mutex.
unsafe impl Send for CudaBuf {}
unsafe impl Sync for CudaBuf {}

impl CudaBuf {
    pub(crate) fn alloc(home: &Arc<Home>, len: usize, dtype: DType) -> CudaBuf {
        home.ctx.bind_to_thread().expect("binding the CUDA context");
        let bytes = len * dtype.size();
        let (ptr, class, usage) = home
            .pool
            .lock()
            .unwrap()
            .alloc(bytes, home.stream.cu_stream())
            .unwrap_or_else(|e| panic!("CUDA allocation of {bytes} bytes failed: {e}"));
        CudaBuf { ptr, len, dtype, class, usage, home: home.clone() }
    }

    /// Gives the block back once `after` (recorded on another stream behind the work that reads
    /// this buffer) has completed, or earlier through [`Pool::free_retired`] with the ticket.
    pub(crate) fn free_after(self, after: CudaEvent) -> RetireTicket {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never used or dropped again; its `home` is moved out exactly once.
        let home = unsafe { std::ptr::read(&this.home) };
        let ticket = home.pool.lock().unwrap().retire(this.ptr, this.class, this.usage, after);
        ticket
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }

    /// The device address (for kernels and tests that launch by hand).
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Clone for CudaBuf {
    fn clone(&self) -> Self {
        let out = CudaBuf::alloc(&self.home, self.len, self.dtype);
        if self.len > 0 {
            self.home.profile.transfer("D2D", self.bytes());
            unsafe { result::memcpy_dtod_async(out.ptr, self.ptr, self.bytes(), self.home.stream.cu_stream()) }
                .expect("device copy");
        }
        out
    }
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        if let Ok(mut p) = self.home.pool.lock() {
            p.free(self.ptr, self.class, self.usage);
        }
    }
}

impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuf({} x {:?} at {:#x})", self.len, self.dtype, self.ptr)
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_the_request_with_little_waste() {
        for b in [1usize, 511, 512, 513, 65536, 65537, 1 << 20, (1 << 20) + 1, 3 << 30, 123_456_789] {
            let c = size_class(b);
            assert!(c >= b && (c - b) as f64 <= 0.25 * b as f64 + 512.0, "{b} -> {c}");
            assert_eq!(c % 256, 0);
        }
    }
}
