//! The CUDA driver API (`cu*`) as the llama-cpt backend and cudarc's safe layer call it.
//!
//! - One device (`LLAMA_CPT_EMU_GPUS=N` for N, one per rank of an mpirun), an emulated card chosen
//!   by `LLAMA_CPT_EMU_DEVICE` (`h100`, the default: H100 SXM, sm_90, 132 SMs; `a100`: A100 SXM
//!   80GB, sm_80, 108 SMs), with the limits the hardware enforces.
//! - "Device" memory is host memory (256-byte aligned, filled with 0xff bytes so a read of memory
//!   nobody wrote gives NaN, not a lucky zero). Every allocation is registered, and copies and
//!   memsets must stay inside one (`CUDA_ERROR_INVALID_VALUE` otherwise, like the real driver).
//! - Work goes to the streams of stream.rs. Host memory is pageable (the backend pins none), so
//!   host-to-device copies are staged (the source is read before the call returns) and
//!   device-to-host copies return when the data has arrived, as CUDA documents for pageable memory.
//! - Calls that need a context fail with `CUDA_ERROR_INVALID_CONTEXT` on a thread where none is
//!   current, as on a GPU.
//! - A kernel that fails prints its message (kernel, block, thread, cause) to stderr; the stream
//!   keeps the error code, sticky.
// The exported functions are the C ABI of NVIDIA's library, called by cudarc under that API's
// documented contract: their safety rules are NVIDIA's documentation, not repeated per function.
#![allow(clippy::missing_safety_doc)]
mod card;
mod device;
mod launch;
mod memory;
mod module;
mod stream_event;
#[cfg(test)]
mod tests;

pub use card::{card, Card, MAX_THREADS_PER_BLOCK, REGS_PER_BLOCK, SMEM_DEFAULT_PER_BLOCK};
pub use device::*;
pub use launch::*;
pub use memory::*;
pub use module::*;
pub use stream_event::*;

use cudarc::driver::sys::cudaError_enum as CUresult;

/// Runs `f` and turns its `Result` into the `CUresult` the C caller gets.
fn api(f: impl FnOnce() -> Result<(), CUresult>) -> CUresult {
    match f() {
        Ok(()) => CUresult::CUDA_SUCCESS,
        Err(e) => e,
    }
}

/// Writes `value` through an out-pointer, `CUDA_ERROR_INVALID_VALUE` when it is null.
unsafe fn out<T>(p: *mut T, value: T) -> Result<(), CUresult> {
    if p.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    unsafe { p.write(value) };
    Ok(())
}
