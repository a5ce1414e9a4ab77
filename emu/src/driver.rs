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
use crate::kernels::{self, Kernel};
use crate::stream;
use cudarc::driver::sys::{
    cudaError_enum as CUresult, CUcontext, CUdevice, CUdevice_attribute as DevAttr, CUdeviceptr, CUevent, CUfunction,
    CUfunction_attribute as FuncAttr, CUmodule, CUstream, CUuuid,
};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// The emulated card: what `cuDeviceGetAttribute` reports and the launch limits enforce.
#[derive(Debug, Clone)]
pub struct Card {
    pub name: &'static str,
    pub cc: (i32, i32),
    pub sm_count: i32,
    pub total_mem: usize,
    /// Dynamic + static shared memory a block may have after opting in (cuFuncSetAttribute).
    pub smem_optin_per_block: i32,
    pub smem_per_sm: i32,
    pub l2_bytes: i32,
    pub clock_khz: i32,
    pub mem_clock_khz: i32,
    pub bus_width: i32,
}

/// Shared memory a block may use without opting in (every architecture since Fermi).
pub const SMEM_DEFAULT_PER_BLOCK: i32 = 48 * 1024;
/// 32-bit registers per block and per SM (sm_80 and sm_90).
pub const REGS_PER_BLOCK: i32 = 64 * 1024;
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;
const MAX_BLOCK_DIM: [u32; 3] = [1024, 1024, 64];
const MAX_GRID_DIM: [u32; 3] = [i32::MAX as u32, 65_535, 65_535];

impl Card {
    pub fn h100() -> Card {
        Card {
            name: "NVIDIA H100 80GB HBM3 (emulated)",
            cc: (9, 0),
            sm_count: 132,
            total_mem: 80 << 30,
            smem_optin_per_block: 227 * 1024,
            smem_per_sm: 228 * 1024,
            l2_bytes: 50 << 20,
            clock_khz: 1_980_000,
            mem_clock_khz: 2_619_000,
            bus_width: 5120,
        }
    }
    pub fn a100() -> Card {
        Card {
            name: "NVIDIA A100-SXM4-80GB (emulated)",
            cc: (8, 0),
            sm_count: 108,
            total_mem: 80 << 30,
            smem_optin_per_block: 163 * 1024,
            smem_per_sm: 164 * 1024,
            l2_bytes: 40 << 20,
            clock_khz: 1_410_000,
            mem_clock_khz: 1_593_000,
            bus_width: 5120,
        }
    }
    /// The card `LLAMA_CPT_EMU_DEVICE` names (`h100` when unset). An unknown name is a
    /// configuration error: reported once, and `cuInit` fails.
    fn from_env() -> Result<Card, String> {
        match std::env::var("LLAMA_CPT_EMU_DEVICE").as_deref() {
            Err(_) | Ok("") | Ok("h100") => Ok(Card::h100()),
            Ok("a100") => Ok(Card::a100()),
            Ok(other) => Err(format!("LLAMA_CPT_EMU_DEVICE={other}: unknown emulated card (h100 or a100)")),
        }
    }
    /// The `sm` number ptxas' register counts are keyed by (80, 90).
    pub fn sm(&self) -> u32 {
        (self.cc.0 * 10 + self.cc.1) as u32
    }
    fn attribute(&self, a: DevAttr) -> Option<i32> {
        use DevAttr::*;
        Some(match a {
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR => self.cc.0,
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR => self.cc.1,
            CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT => self.sm_count,
            CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK => MAX_THREADS_PER_BLOCK as i32,
            CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X => MAX_BLOCK_DIM[0] as i32,
            CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y => MAX_BLOCK_DIM[1] as i32,
            CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z => MAX_BLOCK_DIM[2] as i32,
            CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X => MAX_GRID_DIM[0] as i32,
            CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y => MAX_GRID_DIM[1] as i32,
            CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z => MAX_GRID_DIM[2] as i32,
            CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK => SMEM_DEFAULT_PER_BLOCK,
            CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN => self.smem_optin_per_block,
            CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR => self.smem_per_sm,
            CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK | CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR => {
                REGS_PER_BLOCK
            }
            CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR => 2048,
            CU_DEVICE_ATTRIBUTE_WARP_SIZE => 32,
            CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY => 64 * 1024,
            CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE => self.l2_bytes,
            CU_DEVICE_ATTRIBUTE_CLOCK_RATE => self.clock_khz,
            CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE => self.mem_clock_khz,
            CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH => self.bus_width,
            CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED
            | CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING
            | CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS
            | CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY => 1,
            CU_DEVICE_ATTRIBUTE_INTEGRATED
            | CU_DEVICE_ATTRIBUTE_TCC_DRIVER
            | CU_DEVICE_ATTRIBUTE_KERNEL_EXEC_TIMEOUT
            | CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID
            | CU_DEVICE_ATTRIBUTE_PCI_BUS_ID
            | CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID => 0,
            _ => return None,
        })
    }
}

/// The card, read once from the environment.
pub fn card() -> Result<&'static Card, CUresult> {
    static CARD: OnceLock<Result<Card, String>> = OnceLock::new();
    match CARD.get_or_init(|| {
        let c = Card::from_env();
        if let Err(msg) = &c {
            eprintln!("emulated CUDA: {msg}");
        }
        c
    }) {
        Ok(c) => Ok(c),
        Err(_) => Err(CUresult::CUDA_ERROR_INVALID_DEVICE),
    }
}

// ---------------------------------------------------------------- context

/// The primary context: one per process, a non-null token.
static PRIMARY_CONTEXT: u8 = 0;
static PRIMARY_RETAINS: AtomicI32 = AtomicI32::new(0);

fn primary() -> CUcontext {
    &PRIMARY_CONTEXT as *const u8 as CUcontext
}

thread_local! {
    static CURRENT: Cell<CUcontext> = const { Cell::new(std::ptr::null_mut()) };
}

fn need_context() -> Result<(), CUresult> {
    if CURRENT.with(|c| c.get()).is_null() {
        Err(CUresult::CUDA_ERROR_INVALID_CONTEXT)
    } else {
        Ok(())
    }
}

/// Cards on the emulated node: `LLAMA_CPT_EMU_GPUS` (default 1), so that the ranks of one
/// `mpirun -np N` can each take the card of their local rank, as on a multi-GPU node.
fn gpu_count() -> i32 {
    static COUNT: OnceLock<i32> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::env::var("LLAMA_CPT_EMU_GPUS").ok().and_then(|s| s.trim().parse().ok()).filter(|&n| n >= 1).unwrap_or(1)
    })
}

fn check_device(dev: CUdevice) -> Result<&'static Card, CUresult> {
    let c = card()?;
    if dev < 0 || dev >= gpu_count() {
        return Err(CUresult::CUDA_ERROR_INVALID_DEVICE);
    }
    Ok(c)
}

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

static INITIALIZED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn need_init() -> Result<(), CUresult> {
    if INITIALIZED.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(CUresult::CUDA_ERROR_NOT_INITIALIZED)
    }
}

#[no_mangle]
pub extern "C" fn cuInit(flags: c_uint) -> CUresult {
    api(|| {
        if flags != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        card()?;
        INITIALIZED.store(true, Ordering::Release);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    api(|| unsafe { out(version, 13000) })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    api(|| {
        need_init()?;
        unsafe { out(count, gpu_count()) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    api(|| {
        need_init()?;
        check_device(ordinal)?;
        unsafe { out(device, ordinal) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    api(|| {
        need_init()?;
        let c = check_device(dev)?;
        if name.is_null() || len <= 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // Truncated to the buffer, always NUL-terminated.
        let bytes = c.name.as_bytes();
        let n = bytes.len().min(len as usize - 1);
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), name as *mut u8, n);
            *name.add(n) = 0;
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    api(|| {
        need_init()?;
        let c = check_device(dev)?;
        unsafe { out(bytes, c.total_mem) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut CUuuid, dev: CUdevice) -> CUresult {
    api(|| {
        need_init()?;
        check_device(dev)?;
        // A fixed id that says what it is ("llama-cpt emu" + version).
        let mut bytes = [0 as c_char; 16];
        for (b, s) in bytes.iter_mut().zip(b"llama-cpt-emu\x00\x00\x01") {
            *b = *s as c_char;
        }
        unsafe { out(uuid, CUuuid { bytes }) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut CUuuid, dev: CUdevice) -> CUresult {
    unsafe { cuDeviceGetUuid_v2(uuid, dev) }
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(value: *mut c_int, attrib: DevAttr, dev: CUdevice) -> CUresult {
    api(|| {
        need_init()?;
        let c = check_device(dev)?;
        // An attribute this table does not model is refused rather than guessed.
        let v = c.attribute(attrib).ok_or(CUresult::CUDA_ERROR_NOT_SUPPORTED)?;
        unsafe { out(value, v) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    api(|| {
        need_init()?;
        check_device(dev)?;
        PRIMARY_RETAINS.fetch_add(1, Ordering::AcqRel);
        unsafe { out(ctx, primary()) }
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    api(|| {
        need_init()?;
        check_device(dev)?;
        if PRIMARY_RETAINS.fetch_sub(1, Ordering::AcqRel) <= 0 {
            PRIMARY_RETAINS.fetch_add(1, Ordering::AcqRel);
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    api(|| {
        need_init()?;
        if !ctx.is_null() && ctx != primary() {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        CURRENT.with(|c| c.set(ctx));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut CUcontext) -> CUresult {
    api(|| {
        need_init()?;
        unsafe { out(ctx, CURRENT.with(|c| c.get())) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(dev: *mut CUdevice) -> CUresult {
    api(|| {
        need_context()?;
        unsafe { out(dev, 0) }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    api(|| {
        need_context()?;
        stream::synchronize_all()
    })
}

// ---------------------------------------------------------------- errors

fn describe(e: CUresult) -> &'static str {
    use CUresult::*;
    match e {
        CUDA_SUCCESS => "no error",
        CUDA_ERROR_INVALID_VALUE => "invalid argument",
        CUDA_ERROR_OUT_OF_MEMORY => "out of memory",
        CUDA_ERROR_NOT_INITIALIZED => "initialization error",
        CUDA_ERROR_INVALID_DEVICE => "invalid device ordinal",
        CUDA_ERROR_INVALID_IMAGE => "device kernel image is invalid",
        CUDA_ERROR_INVALID_CONTEXT => "invalid device context",
        CUDA_ERROR_INVALID_HANDLE => "invalid resource handle",
        CUDA_ERROR_NOT_FOUND => "named symbol not found",
        CUDA_ERROR_NOT_READY => "device not ready",
        CUDA_ERROR_NOT_SUPPORTED => "operation not supported",
        CUDA_ERROR_ILLEGAL_ADDRESS => "an illegal memory access was encountered",
        CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES => "too many resources requested for launch",
        CUDA_ERROR_LAUNCH_FAILED => "unspecified launch failure",
        CUDA_ERROR_ASSERT => "device-side assert triggered",
        _ => "unknown error",
    }
}

/// Leaks one C string per distinct text (a few dozen at most), so callers may keep the pointer.
fn static_cstr(text: String) -> *const c_char {
    static STRINGS: OnceLock<Mutex<HashMap<String, &'static CStr>>> = OnceLock::new();
    let mut map = STRINGS.get_or_init(Default::default).lock().unwrap();
    let s =
        map.entry(text.clone()).or_insert_with(|| Box::leak(CString::new(text).unwrap_or_default().into_boxed_c_str()));
    s.as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(error: CUresult, text: *mut *const c_char) -> CUresult {
    api(|| unsafe { out(text, static_cstr(format!("{error:?}"))) })
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(error: CUresult, text: *mut *const c_char) -> CUresult {
    api(|| unsafe { out(text, static_cstr(describe(error).to_string())) })
}

// ---------------------------------------------------------------- memory

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
    let p = unsafe { std::alloc::alloc(layout(bytes)) };
    if p.is_null() {
        return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
    }
    // Device memory is never handed out zeroed: all-ones bytes are NaN as f32 and bf16.
    unsafe { std::ptr::write_bytes(p, 0xff, bytes) };
    allocs.insert(p as u64, bytes);
    Ok(p as CUdeviceptr)
}

fn free(ptr: CUdeviceptr) -> Result<(), CUresult> {
    let bytes = allocations().lock().unwrap().remove(&ptr).ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
    unsafe { std::alloc::dealloc(ptr as *mut u8, layout(bytes)) };
    Ok(())
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
                unsafe { std::ptr::copy_nonoverlapping(src as *const u8, d.0 as *mut u8, bytes) };
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

// ---------------------------------------------------------------- streams and events

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(s: *mut CUstream, _flags: c_uint) -> CUresult {
    api(|| {
        need_context()?;
        if s.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        unsafe { out(s, stream::create()) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(s: *mut CUstream, flags: c_uint, _priority: c_int) -> CUresult {
    unsafe { cuStreamCreate(s, flags) }
}

#[no_mangle]
pub extern "C" fn cuStreamDestroy_v2(s: CUstream) -> CUresult {
    api(|| stream::destroy(s))
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(s: CUstream) -> CUresult {
    api(|| stream::synchronize(s))
}

#[no_mangle]
pub extern "C" fn cuStreamQuery(s: CUstream) -> CUresult {
    api(|| stream::query(s))
}

#[no_mangle]
pub extern "C" fn cuStreamWaitEvent(s: CUstream, e: CUevent, _flags: c_uint) -> CUresult {
    api(|| stream::stream_wait_event(s, e))
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(e: *mut CUevent, _flags: c_uint) -> CUresult {
    api(|| {
        need_context()?;
        if e.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        unsafe { out(e, stream::event_create()) }
    })
}

#[no_mangle]
pub extern "C" fn cuEventDestroy_v2(e: CUevent) -> CUresult {
    api(|| stream::event_destroy(e))
}

#[no_mangle]
pub extern "C" fn cuEventRecord(e: CUevent, s: CUstream) -> CUresult {
    api(|| stream::event_record(e, s))
}

#[no_mangle]
pub extern "C" fn cuEventSynchronize(e: CUevent) -> CUresult {
    api(|| stream::event_synchronize(e))
}

#[no_mangle]
pub extern "C" fn cuEventQuery(e: CUevent) -> CUresult {
    api(|| stream::event_query(e))
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(ms: *mut f32, start: CUevent, end: CUevent) -> CUresult {
    api(|| {
        let t = stream::event_elapsed_ms(start, end)?;
        unsafe { out(ms, t) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: CUevent, end: CUevent) -> CUresult {
    unsafe { cuEventElapsedTime_v2(ms, start, end) }
}

// ---------------------------------------------------------------- modules and kernels

/// The fatbin wrapper's magic number (first 4 bytes of what nvcc -fatbin writes).
const FATBIN_MAGIC: u32 = 0xBA55_ED50;

/// A loaded module: a token (kernels are looked up in the host build by name).
struct Module;

/// A kernel handle: the host entry point and the dynamic shared memory it opted into.
struct Function {
    kernel: Kernel,
    max_dynamic_smem: AtomicU32,
}

fn live_modules() -> &'static Mutex<Vec<usize>> {
    static LIVE: OnceLock<Mutex<Vec<usize>>> = OnceLock::new();
    LIVE.get_or_init(Default::default)
}

/// One handle per kernel name, for the life of the process (CUfunction handles are never freed
/// by the API either; they die with the module, and the backend loads one module).
fn functions() -> &'static Mutex<HashMap<String, usize>> {
    static FUNCS: OnceLock<Mutex<HashMap<String, usize>>> = OnceLock::new();
    FUNCS.get_or_init(Default::default)
}

fn resolve_function(f: CUfunction) -> Result<&'static Function, CUresult> {
    if f.is_null() || !functions().lock().unwrap().values().any(|&p| p == f as usize) {
        return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
    }
    Ok(unsafe { &*(f as *const Function) })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void) -> CUresult {
    api(|| {
        need_context()?;
        if image.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // The image itself is not run (the host build is), but it must be what the real
        // driver accepts: a fatbin, 8-byte aligned.
        if !(image as usize).is_multiple_of(8) || unsafe { (image as *const u32).read() } != FATBIN_MAGIC {
            return Err(CUresult::CUDA_ERROR_INVALID_IMAGE);
        }
        let m = Box::into_raw(Box::new(Module)) as usize;
        live_modules().lock().unwrap().push(m);
        unsafe { out(module, m as CUmodule) }
    })
}

#[no_mangle]
pub extern "C" fn cuModuleUnload(module: CUmodule) -> CUresult {
    api(|| {
        let mut live = live_modules().lock().unwrap();
        let pos = live.iter().position(|&p| p == module as usize).ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        live.swap_remove(pos);
        drop(unsafe { Box::from_raw(module as *mut Module) });
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(f: *mut CUfunction, module: CUmodule, name: *const c_char) -> CUresult {
    api(|| {
        need_context()?;
        if !live_modules().lock().unwrap().contains(&(module as usize)) {
            return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
        }
        if name.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let name = unsafe { CStr::from_ptr(name) }.to_str().map_err(|_| CUresult::CUDA_ERROR_NOT_FOUND)?;
        let kernel = kernels::find(name).ok_or(CUresult::CUDA_ERROR_NOT_FOUND)?;
        let mut funcs = functions().lock().unwrap();
        let handle = *funcs.entry(name.to_string()).or_insert_with(|| {
            let default = (SMEM_DEFAULT_PER_BLOCK as u32).saturating_sub(kernel.static_smem());
            Box::into_raw(Box::new(Function { kernel, max_dynamic_smem: AtomicU32::new(default) })) as usize
        });
        unsafe { out(f, handle as CUfunction) }
    })
}

/// Most threads a block of `k` may have on `card`: the launch bounds, the hardware, and the
/// register file (per warp, registers are allocated in units of 256).
fn max_threads(k: Kernel, card: &Card) -> u32 {
    let mut t = k.max_threads().min(MAX_THREADS_PER_BLOCK);
    if let Some(regs) = k.registers(card.sm()) {
        let warps = REGS_PER_BLOCK as u32 / regs_per_warp(regs);
        t = t.min(warps * 32);
    }
    t
}

fn regs_per_warp(regs_per_thread: u32) -> u32 {
    (regs_per_thread * 32).div_ceil(256) * 256
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(value: *mut c_int, attrib: FuncAttr, f: CUfunction) -> CUresult {
    api(|| {
        let func = resolve_function(f)?;
        let c = card()?;
        let k = func.kernel;
        let v = match attrib {
            FuncAttr::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK => max_threads(k, c) as i32,
            FuncAttr::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES => k.static_smem() as i32,
            FuncAttr::CU_FUNC_ATTRIBUTE_NUM_REGS => k.registers(c.sm()).unwrap_or(0) as i32,
            FuncAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES => {
                func.max_dynamic_smem.load(Ordering::Relaxed) as i32
            }
            FuncAttr::CU_FUNC_ATTRIBUTE_PTX_VERSION | FuncAttr::CU_FUNC_ATTRIBUTE_BINARY_VERSION => c.sm() as i32,
            FuncAttr::CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES | FuncAttr::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES => 0,
            _ => return Err(CUresult::CUDA_ERROR_NOT_SUPPORTED),
        };
        unsafe { out(value, v) }
    })
}

#[no_mangle]
pub extern "C" fn cuFuncSetAttribute(f: CUfunction, attrib: FuncAttr, value: c_int) -> CUresult {
    api(|| {
        let func = resolve_function(f)?;
        let c = card()?;
        match attrib {
            FuncAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES => {
                // Static plus dynamic shared memory may not pass the card's opt-in limit.
                let room = c.smem_optin_per_block - func.kernel.static_smem() as i32;
                if value < 0 || value > room {
                    return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
                }
                func.max_dynamic_smem.store(value as u32, Ordering::Relaxed);
                Ok(())
            }
            FuncAttr::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT if (-1..=100).contains(&value) => Ok(()),
            _ => Err(CUresult::CUDA_ERROR_NOT_SUPPORTED),
        }
    })
}

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
    fn of(k: Kernel, card: &Card) -> KernelLimits {
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
        stream::enqueue(
            s,
            Box::new(move || {
                let mut ptrs = args.pointers();
                unsafe { k.launch(grid, block, dyn_smem, &mut ptrs) }.map_err(|e| {
                    eprintln!("emulated CUDA: kernel {} failed: {e}", k.name());
                    launch_code(e.code)
                })
            }),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            unsafe { cuGetErrorName(CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, &mut s) },
            CUresult::CUDA_SUCCESS
        );
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
        assert_eq!(
            cuFuncSetAttribute(f, FuncAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, optin + 1),
            invalid
        );
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
}
