//! Launches: the checks against the card's limits, the copied arguments, `cuLaunchKernel`.
use super::api;
use super::card::{card, Card, MAX_BLOCK_DIM, MAX_GRID_DIM, MAX_THREADS_PER_BLOCK, REGS_PER_BLOCK};
use super::device::need_context;
use super::module::{regs_per_warp, resolve_function};
use crate::kernels::Kernel;
use crate::mode::shapes_only;
use crate::stream;
use cudarc::driver::sys::{cudaError_enum as CUresult, CUfunction, CUstream};
use std::ffi::{c_uint, c_void};
use std::sync::atomic::Ordering;

/// What a launch is checked against: the kernel's own limits (from the build) on one card.
#[derive(Debug, Clone, Copy)]
pub struct KernelLimits {
    /// `__launch_bounds__`, else 1024.
    pub max_threads: u32,
    pub static_smem: u32,
    /// ptxas' registers per thread for the card's architecture (`None`: built without nvcc).
    pub registers: Option<u32>,
}

impl KernelLimits {
    pub(super) fn of(k: Kernel, card: &Card) -> KernelLimits {
        KernelLimits { max_threads: k.max_threads(), static_smem: k.static_smem(), registers: k.registers(card.sm()) }
    }
}

/// Checks a launch configuration against what the hardware enforces; the driver's error code
/// and why.
pub fn check_launch(
    k: KernelLimits,
    card: &Card,
    grid: [u32; 3],
    block: [u32; 3],
    dyn_smem: u32,
    max_dyn_smem: u32,
) -> Result<(), (CUresult, String)> {
    let invalid = |why: String| Err((CUresult::CUDA_ERROR_INVALID_VALUE, why));
    if grid.contains(&0) || block.contains(&0) {
        return invalid(format!("grid {grid:?} or block {block:?} has a zero dimension"));
    }
    if let Some(d) = (0..3).find(|&d| block[d] > MAX_BLOCK_DIM[d]) {
        return invalid(format!("block dimension {d} is {} (at most {})", block[d], MAX_BLOCK_DIM[d]));
    }
    if let Some(d) = (0..3).find(|&d| grid[d] > MAX_GRID_DIM[d]) {
        return invalid(format!("grid dimension {d} is {} (at most {})", grid[d], MAX_GRID_DIM[d]));
    }
    let threads = block.iter().map(|&b| b as u64).product::<u64>();
    if threads > MAX_THREADS_PER_BLOCK as u64 {
        return invalid(format!("{threads} threads per block (at most {MAX_THREADS_PER_BLOCK})"));
    }
    if threads > k.max_threads as u64 {
        return invalid(format!("{threads} threads per block, the kernel's __launch_bounds__ allow {}", k.max_threads));
    }
    if dyn_smem > max_dyn_smem {
        return invalid(format!(
            "{dyn_smem} B of dynamic shared memory, the function allows {max_dyn_smem} (opt in with cuFuncSetAttribute up to {} B minus the static {} B)",
            card.smem_optin_per_block, k.static_smem
        ));
    }
    if let Some(regs) = k.registers {
        let needed = regs_per_warp(regs) as u64 * threads.div_ceil(32);
        if needed > REGS_PER_BLOCK as u64 {
            return Err((
                CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                format!("{threads} threads × {regs} registers (ptxas, sm_{}) need {needed} registers, a block has {REGS_PER_BLOCK}", card.sm()),
            ));
        }
    }
    Ok(())
}

/// A launch error's code from the host runtime as a `CUresult` (unknown codes: launch failed).
fn launch_code(code: i32) -> CUresult {
    use CUresult::*;
    [
        CUDA_ERROR_INVALID_VALUE,
        CUDA_ERROR_NOT_FOUND,
        CUDA_ERROR_ILLEGAL_ADDRESS,
        CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
        CUDA_ERROR_LAUNCH_TIMEOUT,
        CUDA_ERROR_ASSERT,
        CUDA_ERROR_ILLEGAL_INSTRUCTION,
        CUDA_ERROR_MISALIGNED_ADDRESS,
        CUDA_ERROR_LAUNCH_FAILED,
    ]
    .into_iter()
    .find(|&c| c as i32 == code)
    .unwrap_or(CUDA_ERROR_LAUNCH_FAILED)
}

/// The launch's arguments, copied out of the caller's `kernelParams` (which live only during
/// the call), each at a 16-byte aligned offset of one buffer.
struct Args {
    bytes: Vec<u128>,
    offsets: Vec<usize>,
}

impl Args {
    unsafe fn copy(params: *mut *mut c_void, sizes: &[usize]) -> Args {
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut total = 0;
        for &s in sizes {
            offsets.push(total);
            total += s.div_ceil(16) * 16;
        }
        let mut bytes = vec![0u128; total / 16];
        let base = bytes.as_mut_ptr() as *mut u8;
        for (k, (&s, &o)) in sizes.iter().zip(&offsets).enumerate() {
            unsafe { std::ptr::copy_nonoverlapping(*params.add(k) as *const u8, base.add(o), s) };
        }
        Args { bytes, offsets }
    }
    fn pointers(&mut self) -> Vec<*mut c_void> {
        let base = self.bytes.as_mut_ptr() as *mut u8;
        self.offsets.iter().map(|&o| unsafe { base.add(o) } as *mut c_void).collect()
    }
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cuLaunchKernel(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    dyn_smem: c_uint,
    s: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    api(|| {
        need_context()?;
        let func = resolve_function(f)?;
        let c = card()?;
        let k = func.kernel;
        let (grid, block) = ([gx, gy, gz], [bx, by, bz]);
        if let Err((code, why)) = check_launch(
            KernelLimits::of(k, c),
            c,
            grid,
            block,
            dyn_smem,
            func.max_dynamic_smem.load(Ordering::Relaxed),
        ) {
            eprintln!("emulated CUDA: launch of {} refused: {why}", k.name());
            return Err(code);
        }
        // Arguments packed in `extra` are not used by the backend: refused, not guessed.
        if !extra.is_null() {
            return Err(CUresult::CUDA_ERROR_NOT_SUPPORTED);
        }
        let sizes = k.param_sizes();
        if params.is_null() && !sizes.is_empty() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let mut args = unsafe { Args::copy(params, &sizes) };
        if shapes_only() {
            return Ok(());
        }
        let seq = crate::launch_log::next_launch();
        stream::enqueue(
            s,
            Box::new(move || {
                let mut ptrs = args.pointers();
                unsafe { k.launch(grid, block, dyn_smem, &mut ptrs) }.map_err(|e| {
                    eprintln!("emulated CUDA: kernel {} failed: {e}", k.name());
                    launch_code(e.code)
                })?;
                crate::launch_log::ran(k, seq, (grid, block, dyn_smem), &ptrs, &sizes);
                Ok(())
            }),
        )
    })
}
