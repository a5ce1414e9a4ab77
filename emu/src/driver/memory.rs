//! Device memory: allocations (registered, range-checked), copies and memsets.
use super::card::card;
use super::device::need_context;
use super::{api, out};
use crate::mode::shapes_only;
use crate::stream;
use cudarc::driver::sys::{cudaError_enum as CUresult, CUdeviceptr, CUstream};
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

/// Live allocations: start address → size in bytes.
fn allocations() -> &'static Mutex<BTreeMap<u64, usize>> {
    static ALLOCS: OnceLock<Mutex<BTreeMap<u64, usize>>> = OnceLock::new();
    ALLOCS.get_or_init(Default::default)
}

const ALLOC_ALIGN: usize = 256;

fn layout(bytes: usize) -> std::alloc::Layout {
    std::alloc::Layout::from_size_align(bytes, ALLOC_ALIGN).expect("allocation size overflows")
}

/// Bytes allocated, for cuMemGetInfo and the card's capacity.
fn allocated_bytes(allocs: &BTreeMap<u64, usize>) -> usize {
    allocs.values().sum()
}

pub fn alloc(bytes: usize) -> Result<CUdeviceptr, CUresult> {
    if bytes == 0 {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    let mut allocs = allocations().lock().unwrap();
    if allocated_bytes(&allocs) + bytes > card()?.total_mem {
        return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
    }
    let p = if shapes_only() {
        reserve(bytes)?
    } else {
        let p = unsafe { std::alloc::alloc(layout(bytes)) };
        if p.is_null() {
            return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        }
        // Device memory is never handed out zeroed: all-ones bytes (NaN as f32 and bf16) unless
        // LLAMA_CPT_EMU_POISON names another byte.
        unsafe { std::ptr::write_bytes(p, crate::kernels::poison_byte(), bytes) };
        p
    };
    allocs.insert(p as u64, bytes);
    Ok(p as CUdeviceptr)
}

/// The shapes mode's device memory: address space that no access may touch (it faults), so a
/// 70B model's allocations cost nothing on the host. mmap's pages are 4 KiB aligned, more than
/// the 256 B the driver promises.
fn reserve(bytes: usize) -> Result<*mut u8, CUresult> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let p = unsafe { libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_NONE, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
    }
    Ok(p as *mut u8)
}

fn free(ptr: CUdeviceptr) -> Result<(), CUresult> {
    let bytes = allocations().lock().unwrap().remove(&ptr).ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
    if shapes_only() {
        unsafe { libc::munmap(ptr as *mut c_void, bytes) };
    } else {
        unsafe { std::alloc::dealloc(ptr as *mut u8, layout(bytes)) };
    }
    Ok(())
}

/// The live allocations now: start address → size in bytes.
pub fn live_allocations() -> BTreeMap<u64, usize> {
    allocations().lock().unwrap().clone()
}

/// `CUDA_ERROR_INVALID_VALUE` unless `[ptr, ptr + bytes)` lies inside one live allocation.
pub fn check_range(ptr: CUdeviceptr, bytes: usize) -> Result<(), CUresult> {
    let allocs = allocations().lock().unwrap();
    match allocs.range(..=ptr).next_back() {
        Some((&start, &size)) if ptr + bytes as u64 <= start + size as u64 => Ok(()),
        _ => Err(CUresult::CUDA_ERROR_INVALID_VALUE),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytes: usize) -> CUresult {
    api(|| {
        need_context()?;
        let p = alloc(bytes)?;
        unsafe { out(dptr, p) }
    })
}

/// Allocates at once (memory that exists earlier than CUDA promises is indistinguishable).
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(dptr: *mut CUdeviceptr, bytes: usize, s: CUstream) -> CUresult {
    api(|| {
        need_context()?;
        stream::query(s).or_else(|e| if e == CUresult::CUDA_ERROR_NOT_READY { Ok(()) } else { Err(e) })?;
        let p = alloc(bytes)?;
        unsafe { out(dptr, p) }
    })
}

/// Frees after everything queued so far (any stream may still use the memory).
#[no_mangle]
pub extern "C" fn cuMemFree_v2(ptr: CUdeviceptr) -> CUresult {
    api(|| {
        need_context()?;
        check_range(ptr, 0)?;
        let _ = stream::synchronize_all();
        free(ptr)
    })
}

#[no_mangle]
pub extern "C" fn cuMemFreeAsync(ptr: CUdeviceptr, s: CUstream) -> CUresult {
    api(|| {
        need_context()?;
        check_range(ptr, 0)?;
        stream::enqueue(s, Box::new(move || free(ptr)))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free_bytes: *mut usize, total: *mut usize) -> CUresult {
    api(|| {
        need_context()?;
        let t = card()?.total_mem;
        let used = allocated_bytes(&allocations().lock().unwrap());
        unsafe {
            out(free_bytes, t.saturating_sub(used))?;
            out(total, t)
        }
    })
}

/// A host address the stream worker may use (raw pointers are not `Send`).
#[derive(Clone, Copy)]
struct HostPtr(usize);

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
    s: CUstream,
) -> CUresult {
    api(|| {
        need_context()?;
        check_range(dst, bytes)?;
        if bytes > 0 && src.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        if shapes_only() {
            return Ok(());
        }
        // Pageable source: staged now, so the caller may reuse its buffer when this returns.
        let staged: Vec<u8> = unsafe { std::slice::from_raw_parts(src as *const u8, bytes) }.to_vec();
        stream::enqueue(
            s,
            Box::new(move || {
                unsafe { std::ptr::copy_nonoverlapping(staged.as_ptr(), dst as *mut u8, bytes) };
                Ok(())
            }),
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    bytes: usize,
    s: CUstream,
) -> CUresult {
    api(|| {
        need_context()?;
        check_range(src, bytes)?;
        if bytes > 0 && dst.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // Pageable destination: returns when the copy is done (in stream order).
        let d = HostPtr(dst as usize);
        stream::enqueue(
            s,
            Box::new(move || {
                // The shapes mode has no contents to deliver: zeros (finite, so a loss or norm
                // read back lets the caller go on).
                match shapes_only() {
                    true => unsafe { std::ptr::write_bytes(d.0 as *mut u8, 0, bytes) },
                    false => unsafe { std::ptr::copy_nonoverlapping(src as *const u8, d.0 as *mut u8, bytes) },
                }
                Ok(())
            }),
        )?;
        stream::synchronize(s)
    })
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoDAsync_v2(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize, s: CUstream) -> CUresult {
    api(|| {
        need_context()?;
        check_range(dst, bytes)?;
        check_range(src, bytes)?;
        if shapes_only() {
            return Ok(());
        }
        stream::enqueue(
            s,
            Box::new(move || {
                // Overlapping device copies are undefined in CUDA; memmove keeps the emulator calm.
                unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
                Ok(())
            }),
        )
    })
}

/// The synchronous copies and memsets: the async form on the default stream, then wait.
fn sync_on_default(r: CUresult) -> CUresult {
    if r != CUresult::CUDA_SUCCESS {
        return r;
    }
    api(|| stream::synchronize(std::ptr::null_mut()))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: CUdeviceptr, src: *const c_void, bytes: usize) -> CUresult {
    sync_on_default(unsafe { cuMemcpyHtoDAsync_v2(dst, src, bytes, std::ptr::null_mut()) })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, bytes: usize) -> CUresult {
    unsafe { cuMemcpyDtoHAsync_v2(dst, src, bytes, std::ptr::null_mut()) }
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) -> CUresult {
    sync_on_default(cuMemcpyDtoDAsync_v2(dst, src, bytes, std::ptr::null_mut()))
}

/// Queues a fill of `n` elements of `value`'s width (1, 2 or 4 bytes) at `dst`.
fn memset<T: Copy + Send + 'static>(dst: CUdeviceptr, value: T, n: usize, s: CUstream) -> CUresult {
    api(|| {
        need_context()?;
        let width = std::mem::size_of::<T>();
        if !dst.is_multiple_of(width as u64) {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        check_range(dst, n * width)?;
        if shapes_only() {
            return Ok(());
        }
        stream::enqueue(
            s,
            Box::new(move || {
                unsafe { std::slice::from_raw_parts_mut(dst as *mut T, n) }.fill(value);
                Ok(())
            }),
        )
    })
}

#[no_mangle]
pub extern "C" fn cuMemsetD8Async(dst: CUdeviceptr, value: u8, n: usize, s: CUstream) -> CUresult {
    memset(dst, value, n, s)
}
#[no_mangle]
pub extern "C" fn cuMemsetD16Async(dst: CUdeviceptr, value: u16, n: usize, s: CUstream) -> CUresult {
    memset(dst, value, n, s)
}
#[no_mangle]
pub extern "C" fn cuMemsetD32Async(dst: CUdeviceptr, value: u32, n: usize, s: CUstream) -> CUresult {
    memset(dst, value, n, s)
}
#[no_mangle]
pub extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, value: u8, n: usize) -> CUresult {
    sync_on_default(memset(dst, value, n, std::ptr::null_mut()))
}
#[no_mangle]
pub extern "C" fn cuMemsetD32_v2(dst: CUdeviceptr, value: u32, n: usize) -> CUresult {
    sync_on_default(memset(dst, value, n, std::ptr::null_mut()))
}
