//! The library handle, matmul descriptors, matrix layouts and preferences: their create,
//! destroy and set-attribute entry points.
use super::{out, status, Elem, Library, DESCS, LAYOUTS, LIBRARIES, PREFS};
use cudarc::cublaslt::sys::{
    cublasComputeType_t as Compute, cublasLtHandle_t, cublasLtMatmulDescAttributes_t as DescAttr, cublasLtMatmulDesc_t,
    cublasLtMatmulPreferenceAttributes_t as PrefAttr, cublasLtMatmulPreference_t, cublasLtMatrixLayout_t,
    cublasStatus_t as Status, cudaDataType as DataType,
};
use std::ffi::c_void;

pub(super) struct Desc {
    pub(super) compute: Compute,
    pub(super) trans_a: bool,
    pub(super) trans_b: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Layout {
    pub(super) elem: Elem,
    pub(super) rows: u64,
    pub(super) cols: u64,
    pub(super) ld: i64,
}

impl Layout {
    /// Elements a column-major rows×cols matrix with this leading dimension spans.
    pub(super) fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.cols as usize - 1) * self.ld as usize + self.rows as usize
        }
    }
}

pub(super) struct Preference {
    max_workspace: u64,
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtCreate(handle: *mut cublasLtHandle_t) -> Status {
    status(|| unsafe { out(handle, LIBRARIES.add(Library) as cublasLtHandle_t) })
}

#[no_mangle]
pub extern "C" fn cublasLtDestroy(handle: cublasLtHandle_t) -> Status {
    LIBRARIES.remove::<Library>(handle as usize)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescCreate(
    desc: *mut cublasLtMatmulDesc_t,
    compute: Compute,
    scale: DataType,
) -> Status {
    status(|| {
        let known = matches!(
            compute,
            Compute::CUBLAS_COMPUTE_32F | Compute::CUBLAS_COMPUTE_32F_FAST_TF32 | Compute::CUBLAS_COMPUTE_32F_FAST_16BF
        );
        if !known || scale != DataType::CUDA_R_32F {
            return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED);
        }
        unsafe { out(desc, DESCS.add(Desc { compute, trans_a: false, trans_b: false }) as cublasLtMatmulDesc_t) }
    })
}

#[no_mangle]
pub extern "C" fn cublasLtMatmulDescDestroy(desc: cublasLtMatmulDesc_t) -> Status {
    DESCS.remove::<Desc>(desc as usize)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescSetAttribute(
    desc: cublasLtMatmulDesc_t,
    attr: DescAttr,
    buf: *const c_void,
    size: usize,
) -> Status {
    status(|| {
        let d = DESCS.get::<Desc>(desc as usize)?;
        let slot = match attr {
            DescAttr::CUBLASLT_MATMUL_DESC_TRANSA => &mut d.trans_a,
            DescAttr::CUBLASLT_MATMUL_DESC_TRANSB => &mut d.trans_b,
            _ => return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED),
        };
        // cublasOperation_t, an int32: N = 0, T = 1 (C = 2, the conjugate, is for complex types).
        if buf.is_null() || size != 4 {
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        }
        *slot = match unsafe { (buf as *const i32).read_unaligned() } {
            0 => false,
            1 => true,
            _ => return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED),
        };
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutCreate(
    layout: *mut cublasLtMatrixLayout_t,
    ty: DataType,
    rows: u64,
    cols: u64,
    ld: i64,
) -> Status {
    status(|| {
        let elem = Elem::from_cuda(ty).ok_or(Status::CUBLAS_STATUS_NOT_SUPPORTED)?;
        // Column-major (the default order): a column is `rows` contiguous elements.
        if ld < rows.max(1) as i64 {
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        }
        unsafe { out(layout, LAYOUTS.add(Layout { elem, rows, cols, ld }) as cublasLtMatrixLayout_t) }
    })
}

#[no_mangle]
pub extern "C" fn cublasLtMatrixLayoutDestroy(layout: cublasLtMatrixLayout_t) -> Status {
    LAYOUTS.remove::<Layout>(layout as usize)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceCreate(pref: *mut cublasLtMatmulPreference_t) -> Status {
    status(|| unsafe { out(pref, PREFS.add(Preference { max_workspace: 0 }) as cublasLtMatmulPreference_t) })
}

#[no_mangle]
pub extern "C" fn cublasLtMatmulPreferenceDestroy(pref: cublasLtMatmulPreference_t) -> Status {
    PREFS.remove::<Preference>(pref as usize)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceSetAttribute(
    pref: cublasLtMatmulPreference_t,
    attr: PrefAttr,
    buf: *const c_void,
    size: usize,
) -> Status {
    status(|| {
        let p = PREFS.get::<Preference>(pref as usize)?;
        match attr {
            PrefAttr::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES => {
                if buf.is_null() || size != 8 {
                    return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
                }
                p.max_workspace = unsafe { (buf as *const u64).read_unaligned() };
                Ok(())
            }
            _ => Err(Status::CUBLAS_STATUS_NOT_SUPPORTED),
        }
    })
}
