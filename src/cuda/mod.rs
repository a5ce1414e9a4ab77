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
//! f32 (default) | tf32 | bf16 (how f32 GEMMs multiply); `LLAMA_CPT_ATTN` = simple (the simple
//! attention kernels) | tiled (the first tensor-core kernels) | deterministic (no atomics in the
//! backward, see `AttnKernel`); `LLAMA_CPT_CUDA_SYNC=1` synchronises and checks after every launch;
//! `LLAMA_CPT_CUDA_EXACT_ALLOC=1` allocates every block at exactly its size (`alloc`);
//! `LLAMA_CPT_CUDA_POISON=huge` poisons tests' buffers with 3.4e38 instead of NaN.
/// Kernel arguments: each expression's address, as `cuLaunchKernel` wants them. The values must
/// have the exact C types of the kernel's parameters (u64 for pointers and 64-bit sizes, i32 for
/// int, f32 for float).
macro_rules! args {
    ($($x:expr),* $(,)?) => { &mut [$( &$x as *const _ as *mut c_void ),*] };
}

pub mod alloc;
mod attention;
mod backend;
pub mod gemm;
mod launch;
pub mod limits;
pub mod nccl;
pub mod profile;

pub use crate::backend::MemStats;
pub use alloc::{CudaBuf, DType};
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
    "attn_bwd_fused_d64",
    "attn_bwd_fused_d128",
    "attn_delta",
    "attn_fwd_simple",
    "attn_bwd_dq_simple",
    "attn_bwd_dkdv_simple",
];

/// Kernel entry points with fixed types.
const UNTYPED_KERNELS: &[&str] = &[
    "cast_f32_to_bf16",
    "cast_bf16_to_f32",
    "rmsnorm_bwd_dw_reduce",
    "adamw_multi",
    "attn_fa2_fwd_d64_bf16",
    "attn_fa2_fwd_d128_bf16",
];

/// Every kernel entry point of the module.
fn kernel_names() -> Vec<String> {
    let typed = TYPED_KERNELS.iter().flat_map(|k| [DType::F32, DType::Bf16].map(|t| format!("{k}_{}", t.suffix())));
    typed.chain(UNTYPED_KERNELS.iter().map(|k| k.to_string())).collect()
}

/// Which attention kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// Tensor-core FlashAttention-2 kernels for head_dim 64 and 128 (the pipelined forward
    /// cuda/attention_fa2.cu for bf16 storage), the simple ones otherwise.
    Auto = 0,
    /// The simple f32 kernels (any even head_dim up to 256).
    Simple = 1,
    /// The first tensor-core kernels (cuda/attention.cu) for every storage type: the reference
    /// the pipelined ones are tested and timed against (the backward: seven matmuls, dQ in its own
    /// kernel, no atomics).
    Tiled = 2,
    /// Auto's forward with Tiled's backward: bit-identical results run to run (Auto's fused
    /// backward adds dQ with atomics, in the hardware's order).
    Deterministic = 3,
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
    /// The poison is 3.4e38, not NaN (`LLAMA_CPT_CUDA_POISON=huge`): what `fmaxf` and comparisons
    /// skip as NaN, they do not skip as a huge value.
    poison_huge: bool,
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
        attention::allow_attention_smem(&funcs)?;
        let home = Arc::new(Home {
            pool: Mutex::new(Pool::new(std::env::var("LLAMA_CPT_CUDA_EXACT_ALLOC").as_deref() == Ok("1"))),
            ctx: ctx.clone(),
            stream: stream.clone(),
            profile: Default::default(),
        });
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
            attn_kernel: AtomicU8::new(match std::env::var("LLAMA_CPT_ATTN").as_deref() {
                Ok("simple") => AttnKernel::Simple as u8,
                Ok("tiled") => AttnKernel::Tiled as u8,
                Ok("deterministic") => AttnKernel::Deterministic as u8,
                _ => AttnKernel::Auto as u8,
            }),
            mixed_precision: AtomicBool::new(std::env::var("LLAMA_CPT_PRECISION").as_deref() == Ok("bf16")),
            sync_each_launch: AtomicBool::new(std::env::var("LLAMA_CPT_CUDA_SYNC").as_deref() == Ok("1")),
            poison: AtomicBool::new(false),
            poison_huge: std::env::var("LLAMA_CPT_CUDA_POISON").as_deref() == Ok("huge"),
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
        match self.inner.attn_kernel.load(Ordering::Relaxed) {
            1 => AttnKernel::Simple,
            2 => AttnKernel::Tiled,
            3 => AttnKernel::Deterministic,
            _ => AttnKernel::Auto,
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
    /// Counting of launches, GEMMs, copies and host syncs ([`profile::Profile`]) on or off.
    pub fn set_profiling(&self, on: bool) {
        self.inner.home.profile.set(on);
    }
    /// Counts from now on go to range `name` (see [`profile`]).
    pub fn profile_range(&self, name: &'static str) {
        self.inner.home.profile.enter(name);
    }
    /// The counts by range since profiling was first turned on.
    pub fn profile(&self) -> std::collections::BTreeMap<&'static str, profile::Profile> {
        self.inner.home.profile.snapshot()
    }
    pub fn memory_stats(&self) -> MemStats {
        self.inner.home.pool.lock().unwrap().stats
    }
    pub fn reset_peak_memory(&self) {
        let mut p = self.inner.home.pool.lock().unwrap();
        p.stats.peak_in_use = p.stats.in_use;
        p.stats.peak_by_use = p.stats.by_use;
        p.stats.peak_during = p.current_use;
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
    #[track_caller]
    pub fn synchronize(&self) -> Result<()> {
        self.inner.home.profile.sync(std::panic::Location::caller(), "synchronize");
        self.bind();
        self.inner.home.stream.synchronize().map_err(|e| anyhow::anyhow!("CUDA error: {e}"))
    }
    /// Returns the cached free blocks to the driver.
    pub fn empty_cache(&self) -> Result<()> {
        self.bind();
        self.inner.home.pool.lock().unwrap().release_cached(self.stream()).map_err(|e| anyhow::anyhow!("{e}"))
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
