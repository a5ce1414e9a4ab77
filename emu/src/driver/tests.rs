//! The driver's tests: the card, contexts, memory, error names, launch limits.
use super::*;
use crate::{kernels, stream};
use cudarc::driver::sys::{CUdevice_attribute as DevAttr, CUfunction_attribute as FuncAttr};
use std::ffi::{c_char, CStr, CString};

fn setup() {
    assert_eq!(cuInit(0), CUresult::CUDA_SUCCESS);
    let mut ctx = std::ptr::null_mut();
    assert_eq!(unsafe { cuDevicePrimaryCtxRetain(&mut ctx, 0) }, CUresult::CUDA_SUCCESS);
    assert_eq!(cuCtxSetCurrent(ctx), CUresult::CUDA_SUCCESS);
}

#[test]
fn the_default_card_is_an_h100() {
    setup();
    let attr = |a| {
        let mut v = -1;
        assert_eq!(unsafe { cuDeviceGetAttribute(&mut v, a, 0) }, CUresult::CUDA_SUCCESS);
        v
    };
    assert_eq!(attr(DevAttr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR), 9);
    assert_eq!(attr(DevAttr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT), 132);
    assert_eq!(attr(DevAttr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN), 232_448);
    let mut name = [0 as c_char; 64];
    assert_eq!(unsafe { cuDeviceGetName(name.as_mut_ptr(), 64, 0) }, CUresult::CUDA_SUCCESS);
    assert!(unsafe { CStr::from_ptr(name.as_ptr()) }.to_str().unwrap().starts_with("NVIDIA H100"));
    let mut dev = 0;
    assert_eq!(unsafe { cuDeviceGet(&mut dev, 1) }, CUresult::CUDA_ERROR_INVALID_DEVICE);
}

#[test]
fn no_context_no_memory() {
    assert_eq!(cuInit(0), CUresult::CUDA_SUCCESS);
    // A fresh thread has no current context, as on a GPU.
    let r = std::thread::spawn(|| {
        let mut p = 0;
        unsafe { cuMemAlloc_v2(&mut p, 16) }
    })
    .join()
    .unwrap();
    assert_eq!(r, CUresult::CUDA_ERROR_INVALID_CONTEXT);
}

#[test]
fn copies_stay_inside_allocations_and_fresh_memory_is_nan() {
    setup();
    let mut p = 0;
    assert_eq!(unsafe { cuMemAlloc_v2(&mut p, 64) }, CUresult::CUDA_SUCCESS);
    assert_eq!(p % 256, 0);
    let mut host = [0f32; 16];
    assert_eq!(unsafe { cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), p, 64) }, CUresult::CUDA_SUCCESS);
    assert!(host.iter().all(|v| v.is_nan()), "fresh device memory reads as NaN");
    // One byte past the end, and a pointer that was never allocated.
    assert_eq!(unsafe { cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), p + 4, 64) }, CUresult::CUDA_ERROR_INVALID_VALUE);
    assert_eq!(cuMemsetD32_v2(p + 64, 0, 1), CUresult::CUDA_ERROR_INVALID_VALUE);
    let data: Vec<f32> = (0..16).map(|i| i as f32).collect();
    assert_eq!(unsafe { cuMemcpyHtoD_v2(p, data.as_ptr().cast(), 64) }, CUresult::CUDA_SUCCESS);
    assert_eq!(unsafe { cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), p, 64) }, CUresult::CUDA_SUCCESS);
    assert_eq!(host.to_vec(), data);
    assert_eq!(cuMemFree_v2(p), CUresult::CUDA_SUCCESS);
    assert_eq!(cuMemFree_v2(p), CUresult::CUDA_ERROR_INVALID_VALUE, "double free");
}

#[test]
fn a_pageable_upload_is_staged_before_the_call_returns() {
    setup();
    let s = stream::create();
    let mut p = 0;
    assert_eq!(unsafe { cuMemAlloc_v2(&mut p, 4) }, CUresult::CUDA_SUCCESS);
    // Hold the stream busy so the copy runs after the source was overwritten.
    stream::enqueue(
        s,
        Box::new(|| {
            std::thread::sleep(std::time::Duration::from_millis(30));
            Ok(())
        }),
    )
    .unwrap();
    let mut src = 7u32;
    assert_eq!(unsafe { cuMemcpyHtoDAsync_v2(p, (&src as *const u32).cast(), 4, s) }, CUresult::CUDA_SUCCESS);
    src = 9;
    let _ = src;
    let mut back = 0u32;
    assert_eq!(unsafe { cuMemcpyDtoHAsync_v2((&mut back as *mut u32).cast(), p, 4, s) }, CUresult::CUDA_SUCCESS);
    assert_eq!(back, 7, "the device got the value at call time, and the download waited for it");
    stream::destroy(s).unwrap();
    assert_eq!(cuMemFree_v2(p), CUresult::CUDA_SUCCESS);
}

#[test]
fn error_names_are_the_enum_names() {
    let mut s: *const c_char = std::ptr::null();
    assert_eq!(unsafe { cuGetErrorName(CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, &mut s) }, CUresult::CUDA_SUCCESS);
    assert_eq!(unsafe { CStr::from_ptr(s) }.to_str().unwrap(), "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES");
}

#[test]
fn launches_are_held_to_the_hardware_limits() {
    setup();
    // A fatbin header is all the module load looks at.
    let image = [0xBA55_ED50u64 as u32 as u64, 0];
    let mut module = std::ptr::null_mut();
    assert_eq!(unsafe { cuModuleLoadData(&mut module, image.as_ptr().cast()) }, CUresult::CUDA_SUCCESS);
    let mut f = std::ptr::null_mut();
    let name = CString::new("attn_fwd_d128_f32").unwrap();
    assert_eq!(unsafe { cuModuleGetFunction(&mut f, module, name.as_ptr()) }, CUresult::CUDA_SUCCESS);
    let missing = CString::new("no_such_kernel").unwrap();
    assert_eq!(
        unsafe { cuModuleGetFunction(&mut std::ptr::null_mut(), module, missing.as_ptr()) },
        CUresult::CUDA_ERROR_NOT_FOUND
    );
    let launch = |grid: [u32; 3], block: [u32; 3], smem: u32| unsafe {
        cuLaunchKernel(
            f,
            grid[0],
            grid[1],
            grid[2],
            block[0],
            block[1],
            block[2],
            smem,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    let invalid = CUresult::CUDA_ERROR_INVALID_VALUE;
    // Every one of these is refused before any argument is read.
    assert_eq!(launch([1, 1, 1], [1025, 1, 1], 0), invalid);
    assert_eq!(launch([1, 1, 1], [32, 33, 1], 0), invalid, "1056 threads");
    assert_eq!(launch([1, 65_536, 1], [128, 1, 1], 0), invalid);
    assert_eq!(launch([1, 1, 65_536], [128, 1, 1], 0), invalid);
    assert_eq!(launch([0, 1, 1], [128, 1, 1], 0), invalid);
    // Dynamic shared memory: 48 KiB minus the static part without opting in, then up to the
    // card's 227 KiB minus the static part.
    let mut stat = 0;
    assert_eq!(
        unsafe { cuFuncGetAttribute(&mut stat, FuncAttr::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, f) },
        CUresult::CUDA_SUCCESS
    );
    assert_eq!(launch([1, 1, 1], [128, 1, 1], (SMEM_DEFAULT_PER_BLOCK - stat + 1) as u32), invalid);
    let optin = 227 * 1024 - stat;
    assert_eq!(cuFuncSetAttribute(f, FuncAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, optin + 1), invalid);
    assert_eq!(
        cuFuncSetAttribute(f, FuncAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, optin),
        CUresult::CUDA_SUCCESS
    );
    assert_eq!(launch([1, 1, 1], [128, 1, 1], (optin + 1) as u32), invalid);
    assert_eq!(cuModuleUnload(module), CUresult::CUDA_SUCCESS);
}

#[test]
fn registers_times_threads_may_not_pass_the_register_file() {
    let card = Card::h100();
    let limits = |registers| KernelLimits { max_threads: 1024, static_smem: 0, registers: Some(registers) };
    let one = [1, 1, 1];
    // 64 registers × 1024 threads = 65,536: fits exactly; 65 registers are allocated as 72.
    assert!(check_launch(limits(64), &card, one, [1024, 1, 1], 0, 0).is_ok());
    assert_eq!(
        check_launch(limits(65), &card, one, [1024, 1, 1], 0, 0).unwrap_err().0,
        CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
    );
    // 255 registers (the most ptxas gives): 8 warps fit, 9 do not.
    assert!(check_launch(limits(255), &card, one, [256, 1, 1], 0, 0).is_ok());
    assert_eq!(
        check_launch(limits(255), &card, one, [257, 1, 1], 0, 0).unwrap_err().0,
        CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
    );
    // ptxas allocates registers within a kernel's __launch_bounds__, so every kernel that has
    // them fits its bound on both cards (a check of the register counts the build parsed).
    for card in [Card::h100(), Card::a100()] {
        for k in kernels::all().filter(|k| k.max_threads() < MAX_THREADS_PER_BLOCK) {
            let t = k.max_threads();
            if let Err((_, why)) = check_launch(KernelLimits::of(k, &card), &card, one, [t, 1, 1], 0, 0) {
                panic!("{} at its launch bounds ({t} threads) on {}: {why}", k.name(), card.name);
            }
        }
    }
}
