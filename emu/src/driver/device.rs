//! Init, the devices, the primary context (current per thread), and error names and strings.
use super::card::{card, Card};
use super::{api, out};
use crate::stream;
use cudarc::driver::sys::{cudaError_enum as CUresult, CUcontext, CUdevice, CUdevice_attribute as DevAttr, CUuuid};
use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, CStr, CString};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock};

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

pub(super) fn need_context() -> Result<(), CUresult> {
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
