//! Streams and events: the driver calls over stream.rs.
use super::device::need_context;
use super::{api, out};
use crate::stream;
use cudarc::driver::sys::{cudaError_enum as CUresult, CUevent, CUstream};
use std::ffi::{c_int, c_uint};

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
