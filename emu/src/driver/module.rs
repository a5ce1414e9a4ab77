//! Modules and functions: loading a fatbin, looking kernels up by name, function attributes.
use super::card::{card, Card, MAX_THREADS_PER_BLOCK, REGS_PER_BLOCK, SMEM_DEFAULT_PER_BLOCK};
use super::device::need_context;
use super::{api, out};
use crate::kernels::{self, Kernel};
use cudarc::driver::sys::{cudaError_enum as CUresult, CUfunction, CUfunction_attribute as FuncAttr, CUmodule};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// The fatbin wrapper's magic number (first 4 bytes of what nvcc -fatbin writes).
const FATBIN_MAGIC: u32 = 0xBA55_ED50;

/// A loaded module: a token (kernels are looked up in the host build by name).
struct Module;

/// A kernel handle: the host entry point and the dynamic shared memory it opted into.
pub(super) struct Function {
    pub(super) kernel: Kernel,
    pub(super) max_dynamic_smem: AtomicU32,
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

pub(super) fn resolve_function(f: CUfunction) -> Result<&'static Function, CUresult> {
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

pub(super) fn regs_per_warp(regs_per_thread: u32) -> u32 {
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
