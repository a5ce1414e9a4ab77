//! cuBLASLt (`cublasLt*`): the matrix products `src/cuda/gemm.rs` asks for, written from NVIDIA's
//! cuBLASLt documentation.
//!
//! `D = alpha·op(A)·op(B) + beta·C`, every matrix column-major with a leading dimension (`ld ≥
//! rows`), `op` = identity or transpose (`CUBLASLT_MATMUL_DESC_TRANSA/B`), `op(A)` m×k, `op(B)`
//! k×n, C and D m×n of one type; alpha and beta are f32 host values read at call time, and C is
//! not read when beta is 0 (it may hold garbage). Supported, as in the documentation's table of
//! type combinations:
//! - compute `32F` (scale f32): A/B f32 with C/D f32; A/B bf16 with C/D bf16 or f32;
//! - compute `32F_FAST_TF32` / `32F_FAST_16BF` (scale f32): A/B/C/D f32, the inputs rounded to
//!   TF32 (round to nearest, ties away from zero, as PTX `cvt.rna.tf32.f32`) or to bf16 (round to
//!   nearest even, `cvt.rn.bf16.f32`) before the product.
//!
//! Anything else (other types, orders, epilogues, batching, pointer modes) is
//! `CUBLAS_STATUS_NOT_SUPPORTED`, not a guess. The product accumulates in f32 in a fixed order (8
//! interleaved partial sums over k, combined pairwise), so results are deterministic; tensor cores'
//! own order is unspecified, so only round-off-level agreement with a GPU is to be expected. A bf16
//! D is rounded to nearest even from the f32 result. The work runs on the call's stream.
// The exported functions are the C ABI of NVIDIA's library, called by cudarc under that API's
// documented contract: their safety rules are NVIDIA's documentation, not repeated per function.
#![allow(clippy::missing_safety_doc)]
mod descriptors;
mod matmul;
#[cfg(test)]
mod tests;

pub use descriptors::*;
pub use matmul::*;

use cudarc::cublaslt::sys::{cublasStatus_t as Status, cudaDataType as DataType};
use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

/// The element types the library handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    Bf16,
}

impl Elem {
    fn from_cuda(t: DataType) -> Option<Elem> {
        match t {
            DataType::CUDA_R_32F => Some(Elem::F32),
            DataType::CUDA_R_16BF => Some(Elem::Bf16),
            _ => None,
        }
    }
    fn bytes(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::Bf16 => 2,
        }
    }
    /// Element `i` of the array at `base`.
    unsafe fn read(self, base: usize, i: usize) -> f32 {
        match self {
            Elem::F32 => unsafe { (base as *const f32).add(i).read() },
            Elem::Bf16 => unsafe { (base as *const half::bf16).add(i).read() }.to_f32(),
        }
    }
    unsafe fn write(self, base: usize, i: usize, v: f32) {
        match self {
            Elem::F32 => unsafe { (base as *mut f32).add(i).write(v) },
            Elem::Bf16 => unsafe { (base as *mut half::bf16).add(i).write(half::bf16::from_f32(v)) },
        }
    }
}

/// How inputs are rounded before the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InputRounding {
    None,
    Tf32,
    Bf16,
}

/// f32 → TF32 (10 explicit mantissa bits), round to nearest with ties away from zero.
pub fn round_to_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    f32::from_bits((x.to_bits() + 0x1000) & 0xffff_e000)
}

impl InputRounding {
    fn apply(self, x: f32) -> f32 {
        match self {
            InputRounding::None => x,
            InputRounding::Tf32 => round_to_tf32(x),
            InputRounding::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

/// Live handles of one kind: the addresses this library handed out (anything else is refused).
struct Handles(OnceLock<Mutex<HashSet<usize>>>);

impl Handles {
    const fn new() -> Handles {
        Handles(OnceLock::new())
    }
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<usize>> {
        self.0.get_or_init(Default::default).lock().unwrap()
    }
    fn add<T>(&self, value: T) -> usize {
        let p = Box::into_raw(Box::new(value)) as usize;
        self.set().insert(p);
        p
    }
    fn get<T>(&self, p: usize) -> Result<&'static mut T, Status> {
        if p == 0 || !self.set().contains(&p) {
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        }
        Ok(unsafe { &mut *(p as *mut T) })
    }
    fn remove<T>(&self, p: usize) -> Status {
        if !self.set().remove(&p) {
            return Status::CUBLAS_STATUS_INVALID_VALUE;
        }
        drop(unsafe { Box::from_raw(p as *mut T) });
        Status::CUBLAS_STATUS_SUCCESS
    }
}

static LIBRARIES: Handles = Handles::new();
static DESCS: Handles = Handles::new();
static LAYOUTS: Handles = Handles::new();
static PREFS: Handles = Handles::new();

fn status(f: impl FnOnce() -> Result<(), Status>) -> Status {
    match f() {
        Ok(()) => Status::CUBLAS_STATUS_SUCCESS,
        Err(s) => s,
    }
}

unsafe fn out<T>(p: *mut T, v: T) -> Result<(), Status> {
    if p.is_null() {
        return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
    }
    unsafe { p.write(v) };
    Ok(())
}

/// The library's state behind a handle (nothing: every call carries what it needs).
struct Library;
