//! The CUDA backend: [`Cuda`] implements [`Backend`] with the hand-written kernels of `cuda/*.cu`
//! (compiled by build.rs into a fatbin embedded in the binary) and cuBLASLt for the linear layers.
//!
//! - Everything runs on one non-default stream of the device's primary context; buffers come from a
//!   stream-ordered caching allocator ([`alloc`]): no `cuMemAlloc` per step once warm, peak bytes
//!   tracked ([`Cuda::memory_stats`]).
//! - Buffers carry their element type ([`DType`]). In f32 training everything is f32 (the
//!   attention kernels round their tiles to bf16 for the tensor cores; the GEMMs can run on bf16
//!   tensor cores through [`GemmPrecision::Bf16`]). In mixed precision ([`Cuda::set_mixed_precision`],
//!   `LLAMA_CPT_PRECISION=bf16`) parameters and activations are bf16 and every kernel reads and
//!   writes bf16, while parameter gradients, rstd/lse statistics, moments and masters stay f32.
//!   Every accumulation is f32 (f64 for the loss sum and Σx²). An input of the other type is cast
//!   on the way in, so a stray f32 buffer costs a copy, never a wrong result.
//! - The CUDA libraries are loaded at run time (cudarc `dynamic-loading`): [`Cuda::new`] returns an
//!   error, not a panic, where there is no driver, no GPU, no cuBLASLt or no compiled kernels.
//!
//! Environment: `LLAMA_CPT_PRECISION` = f32 (default) | bf16 (mixed precision); `LLAMA_CPT_GEMM` =
//! f32 (default) | tf32 | bf16 (how f32 GEMMs multiply); `LLAMA_CPT_ATTN=simple` forces the simple
//! attention kernels; `LLAMA_CPT_CUDA_SYNC=1` synchronises and checks after every launch.
pub mod alloc;
pub mod gemm;
pub mod nccl;

pub use alloc::{CudaBuf, DType, MemStats};
pub use gemm::GemmPrecision;

use crate::backend::{AdamWConfig, AdamWTensor, AttnShape, Backend};
use alloc::{Home, Pool};
use anyhow::{bail, Context, Result};
use cudarc::driver::{result, sys, CudaContext};
use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// The kernels, as build.rs compiled them (empty when no nvcc was found at build time).
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

/// Kernel entry points that exist once per storage type (`name_f32`, `name_bf16`).
const TYPED_KERNELS: &[&str] = &[
    "add",
    "add_assign",
    "scale",
    "fill",
    "embedding_fwd",
    "embedding_bwd",
    "rmsnorm_fwd",
    "add_rmsnorm_fwd",
    "rmsnorm_bwd_dx",
    "rmsnorm_bwd_dw_partial",
    "rope_fwd",
    "swiglu_fwd",
    "swiglu_bwd",
    "cross_entropy_fwd",
    "cross_entropy_bwd",
    "sum_squares_partial",
    "attn_fwd_d64",
    "attn_fwd_d128",
    "attn_bwd_dq_d64",
    "attn_bwd_dq_d128",
    "attn_bwd_dkdv_d64",
    "attn_bwd_dkdv_d128",
    "attn_delta",
    "attn_fwd_simple",
    "attn_bwd_dq_simple",
    "attn_bwd_dkdv_simple",
];

/// Kernel entry points with fixed types.
const UNTYPED_KERNELS: &[&str] = &["cast_f32_to_bf16", "cast_bf16_to_f32", "rmsnorm_bwd_dw_reduce", "adamw_multi"];

/// Every kernel entry point of the module.
fn kernel_names() -> Vec<String> {
    let typed = TYPED_KERNELS.iter().flat_map(|k| [DType::F32, DType::Bf16].map(|t| format!("{k}_{}", t.suffix())));
    typed.chain(UNTYPED_KERNELS.iter().map(|k| k.to_string())).collect()
}

/// Tile sizes of the tensor-core attention kernels (must match cuda/attention.cu).
const ATTN_BM: usize = 64;
const ATTN_BN: usize = 64;
const ATTN_BMQ: usize = 32;

/// Which attention kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// Tensor-core FlashAttention-2 kernels for head_dim 64 and 128, the simple ones otherwise.
    Auto = 0,
    /// The simple f32 kernels (any even head_dim up to 256).
    Simple = 1,
}

/// Dynamic shared memory of the tensor-core attention kernels, in bytes.
fn attn_smem(kind: &str, d: usize) -> usize {
    let ld = d + 8;
    match kind {
        "fwd" => (ATTN_BM * ld + ATTN_BN * ld + d * (ATTN_BN + 8)) * 2,
        "dq" => (2 * ATTN_BM * ld + 2 * ATTN_BN * ld + d * (ATTN_BN + 8)) * 2,
        "dkdv" => (2 * ATTN_BN * ld + 2 * ATTN_BMQ * ld + 2 * d * (ATTN_BMQ + 8)) * 2 + 2 * ATTN_BMQ * 4,
        _ => unreachable!(),
    }
}

struct Inner {
    home: Arc<Home>,
    module: sys::CUmodule,
    funcs: HashMap<String, sys::CUfunction>,
    gemm: gemm::Gemm,
    _workspace: CudaBuf,
    /// Small host arrays (positions, ids, tile lists) already on the device, matched by content.
    host_cache: Mutex<Vec<(Vec<u32>, Arc<CudaBuf>)>>,
    prec: Mutex<GemmPrecision>,
    attn_kernel: AtomicU8,
    mixed_precision: AtomicBool,
    sync_each_launch: AtomicBool,
    poison: AtomicBool,
    device_name: String,
    cc: (i32, i32),
    sm_count: u32,
    ordinal: usize,
}

// SAFETY: the module and function handles are valid in the context from any thread; launches are
// ordered by the one stream.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.home.ctx.bind_to_thread();
        let _ = self.home.stream.synchronize();
        unsafe {
            let _ = result::module::unload(self.module);
        }
    }
}

/// The CUDA backend. Cheap to clone (shares the device state).
#[derive(Clone)]
pub struct Cuda {
    inner: Arc<Inner>,
}

/// Kernel arguments: each expression's address, as `cuLaunchKernel` wants them. The values must
/// have the exact C types of the kernel's parameters (u64 for pointers and 64-bit sizes, i32 for
/// int, f32 for float).
macro_rules! args {
    ($($x:expr),* $(,)?) => { &mut [$( &$x as *const _ as *mut c_void ),*] };
}

fn div_ceil(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

impl Cuda {
    /// The backend on device `ordinal`. Errors (never panics) where there is no CUDA driver, no such
    /// device, no cuBLASLt library, or no compiled kernels.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        if !unsafe { sys::is_culib_present() } {
            bail!("no CUDA driver found (libcuda.so could not be loaded)");
        }
        if FATBIN.is_empty() {
            bail!("the CUDA kernels were not compiled: no nvcc at build time (run tools/install-cuda-toolchain.sh and rebuild with --features cuda)");
        }
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            bail!("cuBLASLt (libcublasLt.so) not found on the library path (LD_LIBRARY_PATH)");
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow::anyhow!("no usable CUDA device {ordinal}: {e}"))?;
        let stream = ctx.new_stream().context("creating a CUDA stream")?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let attr = |a| ctx.attribute(a).unwrap_or(0);
        let cc = (
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        );
        if cc.0 < 8 {
            bail!("{device_name} has compute capability {}.{}; the kernels need 8.0 or newer", cc.0, cc.1);
        }
        let sm_count = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).max(1) as u32;
        // The fatbin must be 8-byte aligned for the loader.
        let mut image = vec![0u64; FATBIN.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut image)[..FATBIN.len()].copy_from_slice(FATBIN);
        let module = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
            .map_err(|e| anyhow::anyhow!("loading the CUDA kernels on {device_name} (sm_{}{}): {e}", cc.0, cc.1))?;
        let mut funcs = HashMap::new();
        for name in kernel_names() {
            let f = unsafe { result::module::get_function(module, CString::new(name.as_str()).unwrap()) }
                .map_err(|e| anyhow::anyhow!("kernel {name} missing from the module: {e}"))?;
            funcs.insert(name, f);
        }
        for (base, kind, d) in [
            ("attn_fwd_d64", "fwd", 64),
            ("attn_fwd_d128", "fwd", 128),
            ("attn_bwd_dq_d64", "dq", 64),
            ("attn_bwd_dq_d128", "dq", 128),
            ("attn_bwd_dkdv_d64", "dkdv", 64),
            ("attn_bwd_dkdv_d128", "dkdv", 128),
        ]
        .into_iter()
        .flat_map(|(b, k, d)| [DType::F32, DType::Bf16].map(|t| (format!("{b}_{}", t.suffix()), k, d)))
        {
            let name = base.as_str();
            let bytes = attn_smem(kind, d);
            unsafe {
                result::function::set_function_attribute(
                    funcs[name],
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
            }
            .map_err(|e| anyhow::anyhow!("{name}: {bytes} B of dynamic shared memory: {e}"))?;
        }
        let home = Arc::new(Home { pool: Mutex::new(Pool::default()), ctx: ctx.clone(), stream: stream.clone() });
        const WORKSPACE: usize = 32 << 20;
        let workspace = CudaBuf::alloc(&home, WORKSPACE / 4, DType::F32);
        let gemm = gemm::Gemm::new(workspace.ptr, WORKSPACE)?;
        let inner = Inner {
            home,
            module,
            funcs,
            gemm,
            _workspace: workspace,
            host_cache: Mutex::new(Vec::new()),
            prec: Mutex::new(GemmPrecision::from_env()),
            attn_kernel: AtomicU8::new(if std::env::var("LLAMA_CPT_ATTN").as_deref() == Ok("simple") { 1 } else { 0 }),
            mixed_precision: AtomicBool::new(std::env::var("LLAMA_CPT_PRECISION").as_deref() == Ok("bf16")),
            sync_each_launch: AtomicBool::new(std::env::var("LLAMA_CPT_CUDA_SYNC").as_deref() == Ok("1")),
            poison: AtomicBool::new(false),
            device_name,
            cc,
            sm_count,
            ordinal,
        };
        Ok(Cuda { inner: Arc::new(inner) })
    }

    pub fn device_name(&self) -> &str {
        &self.inner.device_name
    }
    pub fn compute_capability(&self) -> (i32, i32) {
        self.inner.cc
    }
    pub fn gemm_precision(&self) -> GemmPrecision {
        *self.inner.prec.lock().unwrap()
    }
    pub fn set_gemm_precision(&self, p: GemmPrecision) {
        *self.inner.prec.lock().unwrap() = p;
    }
    pub fn attention_kernel(&self) -> AttnKernel {
        if self.inner.attn_kernel.load(Ordering::Relaxed) == 1 {
            AttnKernel::Simple
        } else {
            AttnKernel::Auto
        }
    }
    pub fn set_attention_kernel(&self, k: AttnKernel) {
        self.inner.attn_kernel.store(k as u8, Ordering::Relaxed);
    }
    /// Mixed precision on (bf16 parameters and activations) or off (all f32). Buffers made before
    /// the switch keep their type; operators cast what they are given.
    pub fn set_mixed_precision(&self, on: bool) {
        self.inner.mixed_precision.store(on, Ordering::Relaxed);
    }
    /// Storage type of activations (and working parameters): bf16 in mixed precision.
    pub fn act_dtype(&self) -> DType {
        if self.inner.mixed_precision.load(Ordering::Relaxed) {
            DType::Bf16
        } else {
            DType::F32
        }
    }
    /// Synchronise and check for errors after every launch (slow; for debugging).
    pub fn set_sync_each_launch(&self, on: bool) {
        self.inner.sync_each_launch.store(on, Ordering::Relaxed);
    }
    pub fn memory_stats(&self) -> MemStats {
        self.inner.home.pool.lock().unwrap().stats
    }
    pub fn reset_peak_memory(&self) {
        let mut p = self.inner.home.pool.lock().unwrap();
        p.stats.peak_in_use = p.stats.in_use;
        p.stats.peak_reserved = p.stats.reserved;
    }
    /// An NCCL communicator of this device for the ranks of `launch` (also at world size 1, to
    /// test the NCCL path on one GPU).
    pub fn nccl(
        &self,
        launch: &llama_cpt_parallel::launch::Launch,
        timeout: std::time::Duration,
    ) -> Result<nccl::Nccl> {
        nccl::Nccl::new(self.inner.home.clone(), launch, timeout)
    }
    /// Waits for all queued work; surfaces asynchronous kernel errors.
    pub fn synchronize(&self) -> Result<()> {
        self.bind();
        self.inner.home.stream.synchronize().map_err(|e| anyhow::anyhow!("CUDA error: {e}"))
    }
    /// Returns the cached free blocks to the driver.
    pub fn empty_cache(&self) -> Result<()> {
        self.bind();
        self.inner.home.pool.lock().unwrap().release_cached(self.stream()).map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn bind(&self) {
        self.inner.home.ctx.bind_to_thread().expect("binding the CUDA context to this thread");
    }
    fn stream(&self) -> sys::CUstream {
        self.inner.home.stream.cu_stream()
    }
    fn alloc(&self, len: usize) -> CudaBuf {
        self.alloc_as(len, DType::F32)
    }
    fn alloc_act(&self, len: usize) -> CudaBuf {
        self.alloc_as(len, self.act_dtype())
    }
    fn alloc_as(&self, len: usize, dtype: DType) -> CudaBuf {
        let b = CudaBuf::alloc(&self.inner.home, len, dtype);
        if len > 0 && self.inner.poison.load(Ordering::Relaxed) {
            // Quiet NaN in every element: a kernel that leaves an output element unwritten shows.
            match dtype {
                DType::F32 => unsafe { sys::cuMemsetD32Async(b.ptr, 0x7fc0_0000, len, self.stream()) },
                DType::Bf16 => unsafe { sys::cuMemsetD16Async(b.ptr, 0x7fc0, len, self.stream()) },
            }
            .result()
            .expect("poisoning a buffer");
        }
        b
    }

    /// `x` as `dtype`: itself, or a cast copy.
    fn as_type<'a>(&self, x: &'a CudaBuf, dtype: DType) -> Cow<'a, CudaBuf> {
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
    fn act<'a>(&self, x: &'a CudaBuf) -> Cow<'a, CudaBuf> {
        self.as_type(x, self.act_dtype())
    }
    /// The entry point of a typed kernel for storage type `t`.
    fn typed(base: &str, t: DType) -> String {
        format!("{base}_{}", t.suffix())
    }

    /// Fill every newly allocated buffer with NaN before the kernel that writes it (for tests).
    pub fn set_poison_allocations(&self, on: bool) {
        self.inner.poison.store(on, Ordering::Relaxed);
    }

    fn launch(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: &mut [*mut c_void]) {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return;
        }
        let f = *self.inner.funcs.get(name).unwrap_or_else(|| panic!("unknown kernel {name}"));
        unsafe { result::launch_kernel(f, grid, block, smem, self.stream(), args) }
            .unwrap_or_else(|e| panic!("launching {name} grid {grid:?} block {block:?} smem {smem}: {e}"));
        if self.inner.sync_each_launch.load(Ordering::Relaxed) {
            unsafe { result::stream::synchronize(self.stream()) }
                .unwrap_or_else(|e| panic!("kernel {name} failed: {e}"));
        }
    }

    /// Blocks for a grid-stride loop over `n` elements.
    fn blocks_for(&self, n: usize, threads: usize) -> u32 {
        div_ceil(n, threads).clamp(1, self.inner.sm_count as usize * 16) as u32
    }

    fn elementwise(&self, name: &str, n: usize, args: &mut [*mut c_void]) {
        if n > 0 {
            self.launch(name, (self.blocks_for(n, 256), 1, 1), (256, 1, 1), 0, args);
        }
    }

    /// A 4-byte-element host array on the device, reused when the same contents come again.
    fn upload_cached(&self, data: &[u32]) -> Arc<CudaBuf> {
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

    fn upload_raw<T: bytemuck::Pod>(&self, data: &[T]) -> CudaBuf {
        assert_eq!(std::mem::size_of::<T>(), 4, "4-byte elements (f32, u32, i32)");
        self.bind();
        let buf = self.alloc(data.len());
        if !data.is_empty() {
            // Pageable source: the call returns once the data is staged, so `data` may go.
            unsafe { result::memcpy_htod_async(buf.ptr, data, self.stream()) }.expect("host-to-device copy");
        }
        buf
    }

    fn download_raw<T: bytemuck::Pod + Default>(&self, ptr: u64, n: usize) -> Vec<T> {
        self.bind();
        let mut out = vec![T::default(); n];
        if n > 0 {
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
    pub fn download_bf16(&self, x: &CudaBuf) -> Vec<half::bf16> {
        assert_eq!(x.dtype, DType::Bf16, "download_bf16 of a {:?} buffer", x.dtype);
        self.download_raw::<u16>(x.ptr, x.len).into_iter().map(half::bf16::from_bits).collect()
    }

    /// `C = op(A)·op(B) (+ C)` for row-major operands, through cuBLASLt.
    #[allow(clippy::too_many_arguments)]
    fn gemm_colmajor(
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

    fn memset_zero(&self, buf: &CudaBuf) {
        if buf.len > 0 {
            unsafe { result::memset_d8_async(buf.ptr, 0, buf.bytes(), self.stream()) }.expect("memset");
        }
    }

    /// Tiles of `block` tokens that never cross a document: `[doc_start, doc_end, tile_start, 0]`.
    fn doc_tiles(&self, cu_seqlens: &[u32], tokens: usize, block: usize) -> (Arc<CudaBuf>, usize) {
        let docs = llama_cpt_ops::attention::documents(cu_seqlens, tokens);
        let mut tiles = Vec::new();
        for (s0, s1) in docs {
            for t in (s0..s1).step_by(block) {
                tiles.extend_from_slice(&[s0 as u32, s1 as u32, t as u32, 0]);
            }
        }
        let n = tiles.len() / 4;
        (self.upload_cached(&tiles), n)
    }

    /// Per-token document start and end, for the simple attention kernels.
    fn doc_bounds(&self, cu_seqlens: &[u32], tokens: usize) -> (Arc<CudaBuf>, Arc<CudaBuf>) {
        let docs = llama_cpt_ops::attention::documents(cu_seqlens, tokens);
        let (mut start, mut end) = (vec![0u32; tokens], vec![0u32; tokens]);
        for (s0, s1) in docs {
            for t in s0..s1 {
                start[t] = s0 as u32;
                end[t] = s1 as u32;
            }
        }
        (self.upload_cached(&start), self.upload_cached(&end))
    }

    fn use_mma(&self, shape: AttnShape) -> bool {
        self.attention_kernel() == AttnKernel::Auto && (shape.head_dim == 64 || shape.head_dim == 128)
    }

    fn check_attn(shape: AttnShape, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf) -> usize {
        let AttnShape { heads, kv_heads, head_dim: d } = shape;
        assert!(kv_heads > 0 && heads % kv_heads == 0, "attention: kv_heads {kv_heads} must divide heads {heads}");
        assert!(d % 2 == 0 && d <= 256 && d > 0, "attention: head_dim {d} must be even and at most 256");
        let tokens = q.len / (heads * d);
        assert_eq!(q.len, tokens * heads * d);
        assert_eq!(k.len, tokens * kv_heads * d);
        assert_eq!(v.len, k.len);
        tokens
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;

    fn name(&self) -> String {
        let arithmetic = if self.mixed_precision() {
            "bf16 mixed precision".to_string()
        } else {
            format!("f32, gemm {:?}", self.gemm_precision())
        };
        format!(
            "cuda:{} ({}, sm_{}{}, {arithmetic})",
            self.inner.ordinal, self.inner.device_name, self.inner.cc.0, self.inner.cc.1
        )
    }

    /// Dense tensor-core peak of the GEMM compute type in use, for the cards we know.
    fn peak_flops(&self) -> Option<f64> {
        let name = self.inner.device_name.to_ascii_uppercase();
        let (bf16, tf32, f32) = if name.contains("H100") || name.contains("H200") || name.contains("GH200") {
            if name.contains("PCIE") {
                (756e12, 378e12, 51e12)
            } else {
                (989e12, 494e12, 67e12)
            }
        } else if name.contains("A100") {
            (312e12, 156e12, 19.5e12)
        } else {
            return None;
        };
        if self.mixed_precision() {
            return Some(bf16);
        }
        Some(match self.gemm_precision() {
            GemmPrecision::Bf16 => bf16,
            GemmPrecision::Tf32 => tf32,
            GemmPrecision::F32 => f32,
        })
    }

    /// NCCL between processes (one GPU each, the local rank's).
    fn communicator(
        &self,
        launch: &llama_cpt_parallel::launch::Launch,
        timeout: std::time::Duration,
    ) -> Result<Box<dyn llama_cpt_parallel::Communicator<CudaBuf>>> {
        if launch.world_size == 1 {
            return Ok(Box::new(llama_cpt_parallel::SingleProcess::default()));
        }
        Ok(Box::new(self.nccl(launch, timeout)?))
    }
    fn mixed_precision(&self) -> bool {
        self.act_dtype() == DType::Bf16
    }
    fn to_working(&self, x: &CudaBuf) -> CudaBuf {
        self.bind();
        self.act(x).into_owned()
    }
    fn slice(&self, buf: &CudaBuf, start: usize, len: usize) -> CudaBuf {
        assert!(start + len <= buf.len, "slice [{start}, {}) of {} elements", start + len, buf.len);
        self.bind();
        let out = self.alloc_as(len, buf.dtype);
        let es = buf.dtype.size();
        if len > 0 {
            unsafe { result::memcpy_dtod_async(out.ptr, buf.ptr + (es * start) as u64, es * len, self.stream()) }
                .expect("device copy");
        }
        out
    }
    fn write_slice(&self, dst: &mut CudaBuf, start: usize, src: &CudaBuf) {
        assert!(start + src.len <= dst.len, "write [{start}, {}) into {} elements", start + src.len, dst.len);
        self.bind();
        let src = self.as_type(src, dst.dtype);
        let es = dst.dtype.size();
        if src.len > 0 {
            unsafe { result::memcpy_dtod_async(dst.ptr + (es * start) as u64, src.ptr, es * src.len, self.stream()) }
                .expect("device copy");
        }
    }
    fn upload(&self, data: &[f32]) -> CudaBuf {
        self.upload_raw(data)
    }
    fn download(&self, buf: &CudaBuf) -> Vec<f32> {
        match buf.dtype {
            DType::F32 => self.download_raw(buf.ptr, buf.len),
            DType::Bf16 => self.download_bf16(buf).into_iter().map(f32::from).collect(),
        }
    }
    fn zeros(&self, len: usize) -> CudaBuf {
        self.bind();
        let b = self.alloc(len);
        self.memset_zero(&b);
        b
    }
    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }

    fn add(&self, a: &CudaBuf, b: &CudaBuf) -> CudaBuf {
        assert_eq!(a.len, b.len);
        self.bind();
        let (a, b) = (self.act(a), self.act(b));
        let out = self.alloc_act(a.len);
        let (o, x, y, n) = (out.ptr, a.ptr, b.ptr, a.len as u64);
        self.elementwise(&Self::typed("add", out.dtype), a.len, args![o, x, y, n]);
        out
    }
    fn add_assign(&self, a: &mut CudaBuf, b: &CudaBuf) {
        assert_eq!(a.len, b.len);
        self.bind();
        let b = self.as_type(b, a.dtype);
        let (x, y, n) = (a.ptr, b.ptr, a.len as u64);
        self.elementwise(&Self::typed("add_assign", a.dtype), a.len, args![x, y, n]);
    }
    fn scale_assign(&self, a: &mut CudaBuf, s: f32) {
        self.bind();
        let (x, n) = (a.ptr, a.len as u64);
        self.elementwise(&Self::typed("scale", a.dtype), a.len, args![x, s, n]);
    }

    fn linear(&self, x: &CudaBuf, w: &CudaBuf, m: usize, k: usize, n: usize) -> CudaBuf {
        assert_eq!(x.len, m * k, "linear: x has {} elements, expected {m}x{k}", x.len);
        assert_eq!(w.len, n * k, "linear: w has {} elements, expected {n}x{k}", w.len);
        self.bind();
        let (x, w) = (self.act(x), self.act(w));
        let y = self.alloc_act(m * n);
        if m == 0 || n == 0 {
            return y;
        }
        if k == 0 {
            self.memset_zero(&y);
            return y;
        }
        // yᵀ[n,m] = w[n,k]·xᵀ[k,m] in column-major terms.
        self.gemm_colmajor((n, m, k), &w, true, k, &x, false, k, &y, n, 0.0);
        y
    }

    fn linear_backward(
        &self,
        dy: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        dw: &mut CudaBuf,
        m: usize,
        k: usize,
        n: usize,
    ) -> CudaBuf {
        assert_eq!(dy.len, m * n);
        assert_eq!(x.len, m * k);
        assert_eq!(w.len, n * k);
        assert_eq!(dw.len, n * k);
        self.bind();
        let (dy, x, w) = (self.act(dy), self.act(x), self.act(w));
        let dx = self.alloc_act(m * k);
        if m == 0 || k == 0 {
            return dx;
        }
        if n == 0 {
            self.memset_zero(&dx);
            return dx;
        }
        // dxᵀ[k,m] = wᵀ[k,n]·dyᵀ[n,m]
        self.gemm_colmajor((k, m, n), &w, false, k, &dy, false, n, &dx, k, 0.0);
        // dwᵀ[k,n] += xᵀ[k,m]·dy[m,n], accumulated in dw's own type (f32 in mixed precision).
        self.gemm_colmajor((k, n, m), &x, false, k, &dy, true, n, dw, k, 1.0);
        dx
    }

    fn embedding(&self, table: &CudaBuf, ids: &[u32], dim: usize) -> CudaBuf {
        let vocab = table.len / dim;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            panic!("embedding: token id {id} >= vocab {vocab}");
        }
        self.bind();
        let table = self.act(table);
        let out = self.alloc_act(ids.len() * dim);
        let dids = self.upload_cached(ids);
        let (o, t, i, d) = (out.ptr, table.ptr, dids.ptr, dim as i32);
        self.launch(
            &Self::typed("embedding_fwd", out.dtype),
            (ids.len() as u32, div_ceil(dim, 256) as u32, 1),
            (256, 1, 1),
            0,
            args![o, t, i, d],
        );
        out
    }

    fn embedding_backward(&self, dout: &CudaBuf, ids: &[u32], dim: usize, dtable: &mut CudaBuf) {
        assert_eq!(dout.len, ids.len() * dim);
        assert_eq!(dtable.dtype, DType::F32, "embedding: the gradient table accumulates in f32");
        let vocab = dtable.len / dim;
        assert!(ids.iter().all(|&id| (id as usize) < vocab), "embedding: token id >= vocab {vocab}");
        if ids.is_empty() {
            return;
        }
        self.bind();
        let dout = self.act(dout);
        // Token indices grouped by id, each group in token order (a stable sort).
        let mut order: Vec<u32> = (0..ids.len() as u32).collect();
        order.sort_by_key(|&t| ids[t as usize]);
        let (mut seg_start, mut seg_ids) = (Vec::new(), Vec::new());
        for (n, &t) in order.iter().enumerate() {
            if n == 0 || ids[t as usize] != ids[order[n - 1] as usize] {
                seg_start.push(n as u32);
                seg_ids.push(ids[t as usize]);
            }
        }
        seg_start.push(order.len() as u32);
        let segs = seg_ids.len();
        let (o, s, i) = (self.upload_cached(&order), self.upload_cached(&seg_start), self.upload_cached(&seg_ids));
        let (dt, dy, op, sp, ip, d) = (dtable.ptr, dout.ptr, o.ptr, s.ptr, i.ptr, dim as i32);
        self.launch(
            &Self::typed("embedding_bwd", dout.dtype),
            (segs as u32, div_ceil(dim, 256) as u32, 1),
            (256, 1, 1),
            0,
            args![dt, dy, op, sp, ip, d],
        );
    }

    fn rmsnorm(&self, x: &CudaBuf, w: &CudaBuf, dim: usize, eps: f64) -> (CudaBuf, CudaBuf) {
        assert_eq!(w.len, dim);
        assert_eq!(x.len % dim, 0);
        let rows = x.len / dim;
        self.bind();
        let (x, w) = (self.act(x), self.act(w));
        let (y, rstd) = (self.alloc_act(x.len), self.alloc(rows));
        let (yp, rp, xp, wp, d, e, inv) =
            (y.ptr, rstd.ptr, x.ptr, w.ptr, dim as i32, eps as f32, (1.0 / dim as f64) as f32);
        self.launch(
            &Self::typed("rmsnorm_fwd", y.dtype),
            (rows as u32, 1, 1),
            (256, 1, 1),
            0,
            args![yp, rp, xp, wp, d, e, inv],
        );
        (y, rstd)
    }

    fn add_rmsnorm(&self, x: &CudaBuf, r: &CudaBuf, w: &CudaBuf, dim: usize, eps: f64) -> (CudaBuf, CudaBuf, CudaBuf) {
        assert!(w.len == dim && x.len == r.len && x.len.is_multiple_of(dim));
        let rows = x.len / dim;
        self.bind();
        let (x, r, w) = (self.act(x), self.act(r), self.act(w));
        let (h, y, rstd) = (self.alloc_act(x.len), self.alloc_act(x.len), self.alloc(rows));
        let (hp, yp, rsp, xp, rp, wp, d, e, inv) =
            (h.ptr, y.ptr, rstd.ptr, x.ptr, r.ptr, w.ptr, dim as i32, eps as f32, (1.0 / dim as f64) as f32);
        self.launch(
            &Self::typed("add_rmsnorm_fwd", h.dtype),
            (rows as u32, 1, 1),
            (256, 1, 1),
            0,
            args![hp, yp, rsp, xp, rp, wp, d, e, inv],
        );
        (h, y, rstd)
    }

    fn rmsnorm_backward(
        &self,
        dy: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        rstd: &CudaBuf,
        dim: usize,
        dw: &mut CudaBuf,
    ) -> CudaBuf {
        let rows = x.len / dim;
        assert!(dy.len == x.len && w.len == dim && rstd.len == rows && dw.len == dim);
        assert!(rstd.dtype == DType::F32 && dw.dtype == DType::F32, "rmsnorm: rstd and dw are f32");
        self.bind();
        let (dy, x, w) = (self.act(dy), self.act(x), self.act(w));
        let t = self.act_dtype();
        let dx = self.alloc_act(x.len);
        if rows == 0 {
            return dx;
        }
        let (dxp, dyp, xp, wp, rp, d, inv) =
            (dx.ptr, dy.ptr, x.ptr, w.ptr, rstd.ptr, dim as i32, (1.0 / dim as f64) as f32);
        self.launch(
            &Self::typed("rmsnorm_bwd_dx", t),
            (rows as u32, 1, 1),
            (256, 1, 1),
            0,
            args![dxp, dyp, xp, wp, rp, d, inv],
        );
        let rows_per_chunk = div_ceil(rows, 128).max(16).min(rows);
        let chunks = div_ceil(rows, rows_per_chunk);
        let partial = self.alloc(chunks * dim);
        let (pp, nrows, rpc, nch) = (partial.ptr, rows as u64, rows_per_chunk as i32, chunks as i32);
        let cols = div_ceil(dim, 256) as u32;
        self.launch(
            &Self::typed("rmsnorm_bwd_dw_partial", t),
            (cols, chunks as u32, 1),
            (256, 1, 1),
            0,
            args![pp, dyp, xp, rp, nrows, d, rpc],
        );
        let dwp = dw.ptr;
        self.launch("rmsnorm_bwd_dw_reduce", (cols, 1, 1), (256, 1, 1), 0, args![dwp, pp, nch, d]);
        dx
    }

    fn rope(
        &self,
        x: &CudaBuf,
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    ) -> CudaBuf {
        assert!(head_dim.is_multiple_of(2), "rope: head_dim {head_dim} must be even");
        let tokens = positions.len();
        assert_eq!(x.len, tokens * heads * head_dim, "rope: x does not match the positions");
        self.bind();
        let x = self.act(x);
        let y = self.alloc_act(x.len);
        let pos = self.upload_cached(positions);
        // Inverse frequencies exactly as ops::rope::rope_tables computes them (f32 powf).
        let base = theta as f32;
        let inv_freq: Vec<u32> =
            (0..head_dim / 2).map(|i| (1.0f32 / base.powf((2 * i) as f32 / head_dim as f32)).to_bits()).collect();
        let freqs = self.upload_cached(&inv_freq);
        let (yp, xp, pp, fp, t, h, d, inv) =
            (y.ptr, x.ptr, pos.ptr, freqs.ptr, tokens as u64, heads as i32, head_dim as i32, inverse as i32);
        self.elementwise(&Self::typed("rope_fwd", y.dtype), x.len / 2, args![yp, xp, pp, fp, t, h, d, inv]);
        y
    }

    fn attention(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        cu_seqlens: &[u32],
        shape: AttnShape,
    ) -> (CudaBuf, CudaBuf) {
        let tokens = Self::check_attn(shape, q, k, v);
        let AttnShape { heads, kv_heads, head_dim: d } = shape;
        self.bind();
        let (q, k, v) = (self.act(q), self.act(k), self.act(v));
        let t = self.act_dtype();
        let (out, lse) = (self.alloc_act(q.len), self.alloc(tokens * heads));
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let (op, lp, qp, kp, vp, h, kvh) = (out.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, heads as i32, kv_heads as i32);
        if self.use_mma(shape) {
            let (tiles, n) = self.doc_tiles(cu_seqlens, tokens, ATTN_BM);
            let (tp, sl2) = (tiles.ptr, scale * std::f32::consts::LOG2_E);
            let name = Self::typed(if d == 64 { "attn_fwd_d64" } else { "attn_fwd_d128" }, t);
            self.launch(
                &name,
                (n as u32, heads as u32, 1),
                (128, 1, 1),
                attn_smem("fwd", d) as u32,
                args![op, lp, qp, kp, vp, tp, h, kvh, sl2],
            );
        } else {
            let (start, _) = self.doc_bounds(cu_seqlens, tokens);
            let (sp, nt, dd) = (start.ptr, tokens as u64, d as i32);
            let warps = tokens * heads;
            self.launch(
                &Self::typed("attn_fwd_simple", t),
                (div_ceil(warps * 32, 256) as u32, 1, 1),
                (256, 1, 1),
                0,
                args![op, lp, qp, kp, vp, sp, nt, h, kvh, dd, scale],
            );
        }
        (out, lse)
    }

    fn attention_backward(
        &self,
        dout: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        cu_seqlens: &[u32],
        shape: AttnShape,
    ) -> (CudaBuf, CudaBuf, CudaBuf) {
        let tokens = Self::check_attn(shape, q, k, v);
        let AttnShape { heads, kv_heads, head_dim: d } = shape;
        assert!(dout.len == q.len && out.len == q.len && lse.len == tokens * heads && lse.dtype == DType::F32);
        self.bind();
        let (dout, q, k, v, out) = (self.act(dout), self.act(q), self.act(k), self.act(v), self.act(out));
        let t = self.act_dtype();
        let (dq, dk, dv) = (self.alloc_act(q.len), self.alloc_act(k.len), self.alloc_act(v.len));
        let delta = self.alloc(tokens * heads);
        let rows = tokens * heads;
        let (delp, dop, outp, nrows, dd) = (delta.ptr, dout.ptr, out.ptr, rows as u64, d as i32);
        self.launch(
            &Self::typed("attn_delta", t),
            (div_ceil(rows * 32, 256) as u32, 1, 1),
            (256, 1, 1),
            0,
            args![delp, dop, outp, nrows, dd],
        );
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let (dqp, dkp, dvp, qp, kp, vp, lp, h, kvh) =
            (dq.ptr, dk.ptr, dv.ptr, q.ptr, k.ptr, v.ptr, lse.ptr, heads as i32, kv_heads as i32);
        if self.use_mma(shape) {
            let (tiles, n) = self.doc_tiles(cu_seqlens, tokens, ATTN_BM);
            let (tp, sl2) = (tiles.ptr, scale * std::f32::consts::LOG2_E);
            let (dq_name, dkdv_name) = if d == 64 {
                ("attn_bwd_dq_d64", "attn_bwd_dkdv_d64")
            } else {
                ("attn_bwd_dq_d128", "attn_bwd_dkdv_d128")
            };
            self.launch(
                &Self::typed(dq_name, t),
                (n as u32, heads as u32, 1),
                (128, 1, 1),
                attn_smem("dq", d) as u32,
                args![dqp, qp, kp, vp, dop, lp, delp, tp, h, kvh, scale, sl2],
            );
            // Key tiles are the same 64-token cuts of each document (ATTN_BN == ATTN_BM).
            self.launch(
                &Self::typed(dkdv_name, t),
                (n as u32, kv_heads as u32, 1),
                (128, 1, 1),
                attn_smem("dkdv", d) as u32,
                args![dkp, dvp, qp, kp, vp, dop, lp, delp, tp, h, kvh, scale, sl2],
            );
        } else {
            let (start, end) = self.doc_bounds(cu_seqlens, tokens);
            let (sp, ep, nt) = (start.ptr, end.ptr, tokens as u64);
            self.launch(
                &Self::typed("attn_bwd_dq_simple", t),
                (div_ceil(tokens * heads * 32, 256) as u32, 1, 1),
                (256, 1, 1),
                0,
                args![dqp, qp, kp, vp, dop, lp, delp, sp, nt, h, kvh, dd, scale],
            );
            self.launch(
                &Self::typed("attn_bwd_dkdv_simple", t),
                (div_ceil(tokens * kv_heads * 32, 256) as u32, 1, 1),
                (256, 1, 1),
                0,
                args![dkp, dvp, qp, kp, vp, dop, lp, delp, ep, nt, h, kvh, dd, scale],
            );
        }
        (dq, dk, dv)
    }

    fn swiglu(&self, gate: &CudaBuf, up: &CudaBuf) -> CudaBuf {
        assert_eq!(gate.len, up.len);
        self.bind();
        let (gate, up) = (self.act(gate), self.act(up));
        let out = self.alloc_act(gate.len);
        let (o, g, u, n) = (out.ptr, gate.ptr, up.ptr, gate.len as u64);
        self.elementwise(&Self::typed("swiglu_fwd", out.dtype), gate.len, args![o, g, u, n]);
        out
    }

    fn swiglu_backward(&self, dout: &CudaBuf, gate: &CudaBuf, up: &CudaBuf) -> (CudaBuf, CudaBuf) {
        assert!(dout.len == gate.len && gate.len == up.len);
        self.bind();
        let (dout, gate, up) = (self.act(dout), self.act(gate), self.act(up));
        let (dg, du) = (self.alloc_act(gate.len), self.alloc_act(gate.len));
        let (dgp, dup, dp, g, u, n) = (dg.ptr, du.ptr, dout.ptr, gate.ptr, up.ptr, gate.len as u64);
        self.elementwise(&Self::typed("swiglu_bwd", dg.dtype), gate.len, args![dgp, dup, dp, g, u, n]);
        (dg, du)
    }

    fn cross_entropy(&self, logits: &CudaBuf, targets: &[i32], vocab: usize) -> (f64, CudaBuf) {
        let rows = targets.len();
        assert_eq!(logits.len, rows * vocab);
        self.bind();
        let logits = self.act(logits);
        let lse = self.alloc(rows);
        let loss = self.alloc(rows);
        let t = self.upload_cached(bytemuck::cast_slice(targets));
        let (lp, lsp, xp, tp, v) = (lse.ptr, loss.ptr, logits.ptr, t.ptr, vocab as i32);
        self.launch(
            &Self::typed("cross_entropy_fwd", logits.dtype),
            (rows as u32, 1, 1),
            (512, 1, 1),
            0,
            args![lp, lsp, xp, tp, v],
        );
        let losses: Vec<f32> = self.download_raw(loss.ptr, rows);
        let n = llama_cpt_ops::cross_entropy::count_valid(targets);
        if let Some(r) = losses.iter().position(|l| l.is_nan()) {
            if targets[r] != llama_cpt_ops::IGNORE_INDEX && (targets[r] < 0 || targets[r] as usize >= vocab) {
                panic!("cross_entropy: target {} outside 0..{vocab}", targets[r]);
            }
        }
        let total: f64 = losses.iter().map(|&l| l as f64).sum();
        (if n == 0 { 0.0 } else { total / n as f64 }, lse)
    }

    fn cross_entropy_backward(
        &self,
        logits: &CudaBuf,
        lse: &CudaBuf,
        targets: &[i32],
        vocab: usize,
        dloss: f64,
    ) -> CudaBuf {
        let rows = targets.len();
        assert!(logits.len == rows * vocab && lse.len == rows && lse.dtype == DType::F32);
        self.bind();
        let logits = self.act(logits);
        let d = self.alloc_act(logits.len);
        let n = llama_cpt_ops::cross_entropy::count_valid(targets);
        let scale = if n == 0 { 0.0f32 } else { (dloss / n as f64) as f32 };
        let t = self.upload_cached(bytemuck::cast_slice(targets));
        let (dp, xp, lp, tp, v) = (d.ptr, logits.ptr, lse.ptr, t.ptr, vocab as i32);
        self.launch(
            &Self::typed("cross_entropy_bwd", d.dtype),
            (rows as u32, 1, 1),
            (512, 1, 1),
            0,
            args![dp, xp, lp, tp, v, scale],
        );
        d
    }

    fn sum_squares(&self, x: &CudaBuf) -> f64 {
        if x.len == 0 {
            return 0.0;
        }
        self.bind();
        let blocks = div_ceil(x.len, 4096).clamp(1, 1024);
        let partial = self.alloc(blocks * 2);
        let (pp, xp, n) = (partial.ptr, x.ptr, x.len as u64);
        self.launch(
            &Self::typed("sum_squares_partial", x.dtype),
            (blocks as u32, 1, 1),
            (256, 1, 1),
            0,
            args![pp, xp, n],
        );
        self.download_raw::<f64>(partial.ptr, blocks).iter().sum()
    }

    fn adamw_step(
        &self,
        param: &mut CudaBuf,
        grad: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        cfg: &AdamWConfig,
        lr: f64,
        step: u64,
        decay: bool,
        grad_scale: f32,
        working: Option<&mut CudaBuf>,
    ) {
        self.adamw_steps(&mut [AdamWTensor { param, grad, m, v, working, decay }], cfg, lr, step, grad_scale);
    }

    /// Every tensor in one `adamw_multi` launch (per 65,535 tensors, the grid's y limit): a table
    /// of `{param, bf16 copy or null, grad, m, v, n, decay_factor}` (cuda/adamw.cu
    /// `AdamWTensorDesc`, 56 bytes each). A working copy that is not bf16 is copied from the
    /// updated values after the launch.
    fn adamw_steps(
        &self,
        tensors: &mut [AdamWTensor<'_, CudaBuf>],
        cfg: &AdamWConfig,
        lr: f64,
        step: u64,
        grad_scale: f32,
    ) {
        self.bind();
        // Gradients of another type are cast first; the casts live until the launch.
        let mut casts = Vec::new();
        let mut table: Vec<u64> = Vec::new();
        let mut max_n = 0usize;
        for t in tensors.iter() {
            assert!(t.param.len == t.grad.len && t.m.len == t.grad.len && t.v.len == t.grad.len);
            assert!(
                t.param.dtype == DType::F32 && t.m.dtype == DType::F32 && t.v.dtype == DType::F32,
                "adamw: parameters (masters) and moments are f32"
            );
            if t.param.len == 0 {
                continue;
            }
            let grad = match self.as_type(t.grad, DType::F32) {
                Cow::Borrowed(g) => g.ptr,
                Cow::Owned(g) => {
                    let ptr = g.ptr;
                    casts.push(g);
                    ptr
                }
            };
            let working = match t.working.as_deref() {
                Some(w) if w.dtype == DType::Bf16 => {
                    assert_eq!(w.len, t.param.len);
                    w.ptr
                }
                _ => 0,
            };
            let decay_factor = llama_cpt_ops::adamw::AdamWScalars::new(cfg, lr, step, t.decay).decay_factor;
            table.extend_from_slice(&[
                t.param.ptr,
                working,
                grad,
                t.m.ptr,
                t.v.ptr,
                t.param.len as u64,
                decay_factor.to_bits() as u64,
            ]);
            max_n = max_n.max(t.param.len);
        }
        // The same scalars as the ops reference; all but the decay factor are shared by every tensor.
        let llama_cpt_ops::adamw::AdamWScalars { beta1: b1, beta2: b2, eps, step_size, bc2_sqrt, .. } =
            llama_cpt_ops::adamw::AdamWScalars::new(cfg, lr, step, false);
        const PER_TENSOR: usize = 7;
        for chunk in table.chunks(PER_TENSOR * 65_535) {
            let count = chunk.len() / PER_TENSOR;
            let desc = self.upload_raw::<u32>(bytemuck::cast_slice(chunk));
            let (dp, gs) = (desc.ptr, grad_scale);
            self.launch(
                "adamw_multi",
                (self.blocks_for(max_n, 256), count as u32, 1),
                (256, 1, 1),
                0,
                args![dp, b1, b2, eps, step_size, bc2_sqrt, gs],
            );
        }
        drop(casts);
        for t in tensors.iter_mut() {
            if let Some(w) = t.working.as_deref_mut().filter(|w| w.dtype != DType::Bf16) {
                self.write_slice(w, 0, t.param);
            }
        }
    }
}

impl Cuda {
    /// Fills a buffer with `value` (tests poison outputs with NaN).
    pub fn fill(&self, buf: &mut CudaBuf, value: f32) {
        self.bind();
        let (p, n) = (buf.ptr, buf.len as u64);
        self.elementwise(&Self::typed("fill", buf.dtype), buf.len, args![p, value, n]);
    }

    /// Uploads 4-byte integers (ids, targets) as a device buffer.
    pub fn upload_u32(&self, data: &[u32]) -> CudaBuf {
        self.upload_raw(data)
    }
}

#[cfg(test)]
mod tests {
    /// Every entry point the backend loads was compiled, for every architecture (ptxas names each
    /// one it compiles), and nothing compiled goes unused: a kernel renamed in a `.cu` file fails
    /// here, in CI, rather than at `Cuda::new` on a GPU. Without nvcc there are no kernels to check.
    #[test]
    fn every_kernel_the_backend_loads_was_compiled() {
        if super::FATBIN.is_empty() {
            eprintln!("no kernels were compiled (no nvcc at build time): nothing to check");
            return;
        }
        let report = std::fs::read_to_string(concat!(env!("OUT_DIR"), "/ptxas-report.txt"))
            .expect("build.rs writes the ptxas report with the fatbin");
        let mut compiled: std::collections::BTreeMap<String, usize> = Default::default();
        for line in report.lines() {
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                *compiled.entry(rest.split('\'').next().unwrap().to_string()).or_default() += 1;
            }
        }
        let archs = compiled.values().copied().max().unwrap_or(0);
        assert!(archs >= 2, "expected cubins for sm_80 and sm_90a: {compiled:?}");
        let wanted = super::kernel_names();
        for name in &wanted {
            assert_eq!(
                compiled.get(name),
                Some(&archs),
                "kernel {name}: compiled for {:?} of {archs} architectures",
                compiled.get(name)
            );
        }
        let unused: Vec<&String> = compiled.keys().filter(|k| !wanted.contains(k)).collect();
        assert!(unused.is_empty(), "compiled but never loaded: {unused:?}");
    }
}
