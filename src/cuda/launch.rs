//! The backend's own plumbing: allocation (poisoned on request), casts, kernel launches, host
//! uploads and downloads, and the cuBLASLt GEMM call.
use super::*;

impl Cuda {
    pub(super) fn bind(&self) {
        self.inner.home.ctx.bind_to_thread().expect("binding the CUDA context to this thread");
    }
    pub(super) fn stream(&self) -> sys::CUstream {
        self.inner.home.stream.cu_stream()
    }
    pub(super) fn alloc(&self, len: usize) -> CudaBuf {
        self.alloc_as(len, DType::F32)
    }
    pub(super) fn alloc_act(&self, len: usize) -> CudaBuf {
        self.alloc_as(len, self.act_dtype())
    }
    pub(super) fn alloc_as(&self, len: usize, dtype: DType) -> CudaBuf {
        let b = CudaBuf::alloc(&self.inner.home, len, dtype);
        if len > 0 && self.inner.poison.load(Ordering::Relaxed) {
            // Quiet NaN in every element (3.4e38 with LLAMA_CPT_CUDA_POISON=huge): a kernel that
            // leaves an output element unwritten, or reads one before writing it, shows.
            let huge = self.inner.poison_huge;
            match dtype {
                DType::F32 => unsafe {
                    sys::cuMemsetD32Async(b.ptr, if huge { 0x7f7f_7f7f } else { 0x7fc0_0000 }, len, self.stream())
                },
                DType::Bf16 => unsafe {
                    sys::cuMemsetD16Async(b.ptr, if huge { 0x7f7f } else { 0x7fc0 }, len, self.stream())
                },
            }
            .result()
            .expect("poisoning a buffer");
        }
        b
    }

    /// `x` as `dtype`: itself, or a cast copy.
    pub(super) fn as_type<'a>(&self, x: &'a CudaBuf, dtype: DType) -> Cow<'a, CudaBuf> {
        if x.dtype == dtype {
            return Cow::Borrowed(x);
        }
        let out = self.alloc_as(x.len, dtype);
        let (o, i, n) = (out.ptr, x.ptr, x.len as u64);
        let kernel = if dtype == DType::Bf16 { "cast_f32_to_bf16" } else { "cast_bf16_to_f32" };
        self.elementwise(kernel, x.len, args![o, i, n]);
        Cow::Owned(out)
    }
    /// `x` in the activation type.
    pub(super) fn act<'a>(&self, x: &'a CudaBuf) -> Cow<'a, CudaBuf> {
        self.as_type(x, self.act_dtype())
    }
    /// The entry point of a typed kernel for storage type `t`.
    pub(super) fn typed(base: &str, t: DType) -> String {
        format!("{base}_{}", t.suffix())
    }

    /// Fill every newly allocated buffer with NaN (or 3.4e38, `LLAMA_CPT_CUDA_POISON=huge`) before
    /// the kernel that writes it (for tests).
    pub fn set_poison_allocations(&self, on: bool) {
        self.inner.poison.store(on, Ordering::Relaxed);
    }

    pub(super) fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &mut [*mut c_void],
    ) {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return;
        }
        let f = *self.inner.funcs.get(name).unwrap_or_else(|| panic!("unknown kernel {name}"));
        self.inner.home.profile.launch(name);
        unsafe { result::launch_kernel(f, grid, block, smem, self.stream(), args) }
            .unwrap_or_else(|e| panic!("launching {name} grid {grid:?} block {block:?} smem {smem}: {e}"));
        if self.inner.sync_each_launch.load(Ordering::Relaxed) {
            unsafe { result::stream::synchronize(self.stream()) }
                .unwrap_or_else(|e| panic!("kernel {name} failed: {e}"));
        }
    }

    /// Blocks for a grid-stride loop over `n` elements.
    pub(super) fn blocks_for(&self, n: usize, threads: usize) -> u32 {
        div_ceil(n, threads).clamp(1, self.inner.sm_count as usize * 16) as u32
    }

    /// A grid-stride kernel over `n` elements: a thread per 16-byte pack (4 f32, 8 bf16; the
    /// kernels' unit of access, cuda/common.cuh), at most 16 blocks per SM.
    pub(super) fn elementwise(&self, name: &str, n: usize, args: &mut [*mut c_void]) {
        self.grid_stride(name, div_ceil(n, 4), args);
    }

    /// A grid-stride kernel over `units` units of work, one thread each, at most 16 blocks per SM.
    pub(super) fn grid_stride(&self, name: &str, units: usize, args: &mut [*mut c_void]) {
        if units > 0 {
            self.launch(name, (self.blocks_for(units, 256), 1, 1), (256, 1, 1), 0, args);
        }
    }

    /// Resident threads the device can hold (its SMs × 2,048): the parallelism a memory-bound
    /// kernel needs to cover HBM latency.
    pub(super) fn resident_threads(&self) -> usize {
        self.inner.sm_count as usize * 2048
    }

    /// A 4-byte-element host array on the device, reused when the same contents come again.
    pub(super) fn upload_cached(&self, data: &[u32]) -> Arc<CudaBuf> {
        let mut cache = self.inner.host_cache.lock().unwrap();
        if let Some(i) = cache.iter().position(|(h, _)| h.as_slice() == data) {
            let e = cache.remove(i);
            let buf = e.1.clone();
            cache.insert(0, e);
            return buf;
        }
        let buf = Arc::new(self.upload_raw(data));
        cache.insert(0, (data.to_vec(), buf.clone()));
        cache.truncate(32);
        buf
    }

    pub(super) fn upload_raw<T: bytemuck::Pod>(&self, data: &[T]) -> CudaBuf {
        assert_eq!(std::mem::size_of::<T>(), 4, "4-byte elements (f32, u32, i32)");
        self.bind();
        let buf = self.alloc(data.len());
        if !data.is_empty() {
            // Pageable source: the call returns once the data is staged, so `data` may go.
            self.inner.home.profile.transfer("H2D", std::mem::size_of_val(data));
            unsafe { result::memcpy_htod_async(buf.ptr, data, self.stream()) }.expect("host-to-device copy");
        }
        buf
    }

    /// A blocking copy to the host: a host sync, counted at the caller's call site.
    #[track_caller]
    pub(super) fn download_raw<T: bytemuck::Pod + Default>(&self, ptr: u64, n: usize) -> Vec<T> {
        self.bind();
        let mut out = vec![T::default(); n];
        self.inner.home.profile.sync(std::panic::Location::caller(), "download");
        if n > 0 {
            self.inner.home.profile.transfer("D2H", std::mem::size_of_val(out.as_slice()));
            unsafe { result::memcpy_dtoh_async(&mut out, ptr, self.stream()) }.expect("device-to-host copy");
        }
        unsafe { result::stream::synchronize(self.stream()) }.unwrap_or_else(|e| panic!("CUDA error: {e}"));
        out
    }

    /// bf16 copy of a buffer (round to nearest even).
    pub fn to_bf16(&self, x: &CudaBuf) -> CudaBuf {
        self.bind();
        self.as_type(x, DType::Bf16).into_owned()
    }

    /// f32 copy of a buffer.
    pub fn to_f32(&self, x: &CudaBuf) -> CudaBuf {
        self.bind();
        self.as_type(x, DType::F32).into_owned()
    }

    /// The values of a bf16 buffer, on the host.
    #[track_caller]
    pub fn download_bf16(&self, x: &CudaBuf) -> Vec<half::bf16> {
        assert_eq!(x.dtype, DType::Bf16, "download_bf16 of a {:?} buffer", x.dtype);
        self.download_raw::<u16>(x.ptr, x.len).into_iter().map(half::bf16::from_bits).collect()
    }

    /// `C = op(A)·op(B) (+ C)` for row-major operands, through cuBLASLt.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_colmajor(
        &self,
        mnk: (usize, usize, usize),
        a: &CudaBuf,
        ta: bool,
        lda: usize,
        b: &CudaBuf,
        tb: bool,
        ldb: usize,
        c: &CudaBuf,
        ldc: usize,
        beta: f32,
    ) {
        let prec = self.gemm_precision();
        let types = (a.dtype, b.dtype, c.dtype);
        self.inner.home.profile.gemm(|| {
            let op = |t: bool| if t { "T" } else { "N" };
            format!("{}×{}×{} {}{} {:?}", mnk.0, mnk.1, mnk.2, op(ta), op(tb), types)
        });
        unsafe {
            self.inner.gemm.matmul_colmajor(
                self.stream(),
                prec,
                mnk,
                a.ptr,
                ta,
                lda,
                b.ptr,
                tb,
                ldb,
                c.ptr,
                ldc,
                beta,
                types,
            )
        }
        .unwrap_or_else(|e| panic!("GEMM {mnk:?}: {e}"));
        if self.inner.sync_each_launch.load(Ordering::Relaxed) {
            unsafe { result::stream::synchronize(self.stream()) }
                .unwrap_or_else(|e| panic!("GEMM {mnk:?} failed: {e}"));
        }
    }

    pub(super) fn memset_zero(&self, buf: &CudaBuf) {
        self.memset_zero_range(buf, 0, buf.len);
    }
    /// Zeros elements `[start, start + len)` of `buf`.
    pub(super) fn memset_zero_range(&self, buf: &CudaBuf, start: usize, len: usize) {
        assert!(start + len <= buf.len, "zero [{start}, {}) of {} elements", start + len, buf.len);
        if len > 0 {
            let es = buf.dtype.size();
            self.inner.home.profile.transfer("memset", es * len);
            let ptr = buf.ptr + (es * start) as u64;
            unsafe { result::memset_d8_async(ptr, 0, es * len, self.stream()) }.expect("memset");
        }
    }
}

impl Cuda {
    /// Uploads 4-byte integers (ids, targets) as a device buffer.
    pub fn upload_u32(&self, data: &[u32]) -> CudaBuf {
        self.upload_raw(data)
    }
}
