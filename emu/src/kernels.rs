//! The C ABI of the host-compiled kernels (emu/cxx/emu_abi.h, built by emu/build.rs) and safe
//! wrappers for the driver: kernels are known by name and index; a launch runs the whole grid on
//! the calling thread (every CUDA thread a fiber, see emu/cxx/runtime.cpp).
use std::ffi::{c_char, c_int, c_void, CStr, CString};

mod ffi {
    use std::ffi::{c_char, c_int, c_void};
    extern "C" {
        pub fn lcpt_emu_kernel_count() -> c_int;
        pub fn lcpt_emu_vector_accesses() -> u64;
        pub fn lcpt_emu_poison_byte() -> u8;
        pub fn lcpt_emu_kernel_name(i: c_int) -> *const c_char;
        pub fn lcpt_emu_kernel_find(name: *const c_char) -> c_int;
        pub fn lcpt_emu_kernel_static_smem(i: c_int) -> c_int;
        pub fn lcpt_emu_kernel_registers(i: c_int, sm: c_int) -> c_int;
        pub fn lcpt_emu_kernel_max_threads(i: c_int) -> c_int;
        pub fn lcpt_emu_kernel_param_count(i: c_int) -> c_int;
        pub fn lcpt_emu_kernel_param_size(i: c_int, k: c_int) -> usize;
        #[allow(clippy::too_many_arguments)]
        pub fn lcpt_emu_launch(
            i: c_int,
            gx: u32,
            gy: u32,
            gz: u32,
            bx: u32,
            by: u32,
            bz: u32,
            dyn_smem: u32,
            params: *mut *mut c_void,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn lcpt_emu_test_mma(d: *mut f32, a: *const u32, b: *const u32, err: *mut c_char, errlen: usize) -> c_int;
        pub fn lcpt_emu_self_test(
            which: *const c_char,
            threads: u32,
            out: *mut f32,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
    }
}

/// A failed launch: the `CUresult` code and what went wrong (kernel, block, thread, what it waited for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchError {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (CUresult {})", self.message, self.code)
    }
}

/// A host-compiled kernel entry point (an index into the generated registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kernel(c_int);

/// Number of kernel entry points compiled for the host.
pub fn count() -> usize {
    unsafe { ffi::lcpt_emu_kernel_count() as usize }
}

/// The 16- and 8-byte global accesses (cuda/common.cuh's packs) that launches on this thread have
/// made so far: a test reads it before and after a launch to see which path a kernel took.
pub fn vector_accesses() -> u64 {
    unsafe { ffi::lcpt_emu_vector_accesses() }
}

/// The byte device and shared memory hold before anything writes them (0xff, NaN, unless
/// `LLAMA_CPT_EMU_POISON` says otherwise; emu/cxx/emu_abi.h).
pub fn poison_byte() -> u8 {
    unsafe { ffi::lcpt_emu_poison_byte() }
}

/// Every kernel, in registry order.
pub fn all() -> impl Iterator<Item = Kernel> {
    (0..count() as c_int).map(Kernel)
}

/// The kernel named `name` (its `extern "C"` name in cuda/*.cu).
pub fn find(name: &str) -> Option<Kernel> {
    let c = CString::new(name).ok()?;
    let i = unsafe { ffi::lcpt_emu_kernel_find(c.as_ptr()) };
    (i >= 0).then_some(Kernel(i))
}

impl Kernel {
    pub fn name(self) -> &'static str {
        // The registry's names are string literals of the library: 'static.
        unsafe { CStr::from_ptr(ffi::lcpt_emu_kernel_name(self.0)) }.to_str().unwrap_or("?")
    }
    /// Static shared memory in bytes (ptxas' report for sm_90; 0 when unknown).
    pub fn static_smem(self) -> u32 {
        unsafe { ffi::lcpt_emu_kernel_static_smem(self.0) as u32 }
    }
    /// Registers per thread on `sm` (80 or 90) from ptxas' report, `None` when the build had no nvcc.
    pub fn registers(self, sm: u32) -> Option<u32> {
        let r = unsafe { ffi::lcpt_emu_kernel_registers(self.0, sm as c_int) };
        (r > 0).then_some(r as u32)
    }
    /// `__launch_bounds__` of the kernel, else 1024.
    pub fn max_threads(self) -> u32 {
        unsafe { ffi::lcpt_emu_kernel_max_threads(self.0) as u32 }
    }
    /// The size in bytes of each parameter, in order (from the kernel's C++ signature).
    pub fn param_sizes(self) -> Vec<usize> {
        let n = unsafe { ffi::lcpt_emu_kernel_param_count(self.0) };
        (0..n).map(|k| unsafe { ffi::lcpt_emu_kernel_param_size(self.0, k) }).collect()
    }

    /// Runs the grid to completion on the calling thread.
    ///
    /// # Safety
    /// `params` must hold one pointer per kernel parameter, each to a value of that parameter's
    /// type, and every device pointer among them must be valid for what the kernel accesses.
    pub unsafe fn launch(
        self,
        grid: [u32; 3],
        block: [u32; 3],
        dyn_smem: u32,
        params: &mut [*mut c_void],
    ) -> Result<(), LaunchError> {
        let expected = unsafe { ffi::lcpt_emu_kernel_param_count(self.0) };
        if params.len() != expected as usize {
            return Err(LaunchError {
                code: 1, // CUDA_ERROR_INVALID_VALUE
                message: format!(
                    "kernel {}: {} parameters given, its signature has {expected}",
                    self.name(),
                    params.len()
                ),
            });
        }
        let mut err = [0 as c_char; 1024];
        let code = unsafe {
            ffi::lcpt_emu_launch(
                self.0,
                grid[0],
                grid[1],
                grid[2],
                block[0],
                block[1],
                block[2],
                dyn_smem,
                params.as_mut_ptr(),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        result(code, &err)
    }
}

fn result(code: c_int, err: &[c_char]) -> Result<(), LaunchError> {
    if code == 0 {
        return Ok(());
    }
    let message = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
    Err(LaunchError { code, message })
}

/// One warp's `mma.m16n8k16.row.col.f32.bf16.bf16.f32` through the emulated instruction (tests):
/// lane l passes `a[l]`, `b[l]` and its accumulators `d[l]`, which receive its results.
pub fn test_mma(d: &mut [[f32; 4]; 32], a: &[[u32; 4]; 32], b: &[[u32; 2]; 32]) -> Result<(), LaunchError> {
    let mut err = [0 as c_char; 1024];
    let code = unsafe {
        ffi::lcpt_emu_test_mma(d.as_mut_ptr().cast(), a.as_ptr().cast(), b.as_ptr().cast(), err.as_mut_ptr(), err.len())
    };
    result(code, &err)
}

/// Runs one block of `threads` threads of the emulator's self-test kernel `which`
/// (emu/cxx/self_test.cpp: barrier, shuffle, missing_lane, deadlock) writing `out`.
pub fn self_test(which: &str, threads: u32, out: &mut [f32]) -> Result<(), LaunchError> {
    let needed = threads as usize * 4;
    assert!(out.len() >= needed, "self_test {which}: out holds {} floats, needs {needed}", out.len());
    let c = CString::new(which).unwrap();
    let mut err = [0 as c_char; 1024];
    let code = unsafe { ffi::lcpt_emu_self_test(c.as_ptr(), threads, out.as_mut_ptr(), err.as_mut_ptr(), err.len()) };
    result(code, &err)
}
