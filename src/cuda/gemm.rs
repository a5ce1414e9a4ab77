//! Row-major GEMMs through cuBLASLt (column-major underneath: a row-major `[r, c]` matrix is a
//! column-major `[c, r]` one, so every product is computed transposed).
//!
//! Operands are f32 or bf16 in memory (each operand its own type: mixed precision multiplies bf16
//! activations by bf16 weights into a bf16 output, or into the f32 weight gradient). With f32
//! inputs the compute type is selectable ([`GemmPrecision`]): exact f32 (default), TF32 tensor
//! cores, or bf16 tensor cores (`CUBLAS_COMPUTE_32F_FAST_16BF`: inputs rounded to bf16, f32
//! accumulation); bf16 inputs always run on the bf16 tensor cores with f32 accumulation.
//! Descriptors, layouts and the chosen algorithm are cached per shape and types.
use super::alloc::DType;
use cudarc::cublaslt::{result as lt, sys as ltsys};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

/// Compute type of the linear layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum GemmPrecision {
    /// Plain f32 (no tensor cores): matches the CPU reference to round-off.
    #[default]
    F32,
    /// TF32 tensor cores, f32 accumulation.
    Tf32,
    /// bf16 tensor cores (inputs rounded to bf16), f32 accumulation.
    Bf16,
}

impl GemmPrecision {
    fn compute_type(self) -> ltsys::cublasComputeType_t {
        match self {
            GemmPrecision::F32 => ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            GemmPrecision::Tf32 => ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            GemmPrecision::Bf16 => ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
        }
    }

    /// From `LLAMA_CPT_GEMM` = f32 | tf32 | bf16.
    pub fn from_env() -> GemmPrecision {
        match std::env::var("LLAMA_CPT_GEMM").as_deref() {
            Ok("bf16") => GemmPrecision::Bf16,
            Ok("tf32") => GemmPrecision::Tf32,
            _ => GemmPrecision::F32,
        }
    }
}

/// (m, n, k, transa, transb, lda, ldb, ldc, precision, (A, B, C types)) of a column-major product.
type Key = (u64, u64, u64, bool, bool, i64, i64, i64, GemmPrecision, (DType, DType, DType));

fn cuda_type(t: DType) -> ltsys::cudaDataType {
    match t {
        DType::F32 => ltsys::cudaDataType::CUDA_R_32F,
        DType::Bf16 => ltsys::cudaDataType::CUDA_R_16BF,
    }
}

struct Plan {
    desc: ltsys::cublasLtMatmulDesc_t,
    a: ltsys::cublasLtMatrixLayout_t,
    b: ltsys::cublasLtMatrixLayout_t,
    c: ltsys::cublasLtMatrixLayout_t,
    algo: ltsys::cublasLtMatmulAlgo_t,
}

pub(crate) struct Gemm {
    handle: ltsys::cublasLtHandle_t,
    plans: Mutex<HashMap<Key, Plan>>,
    pub(crate) workspace: u64,
    pub(crate) workspace_bytes: usize,
}

// SAFETY: the handle and descriptors are used under the plans mutex or read-only, on one stream.
unsafe impl Send for Gemm {}
unsafe impl Sync for Gemm {}

fn err(e: lt::CublasError) -> anyhow::Error {
    anyhow::anyhow!("cuBLASLt: {e:?}")
}

impl Gemm {
    pub(crate) fn new(workspace: u64, workspace_bytes: usize) -> anyhow::Result<Gemm> {
        let handle = lt::create_handle().map_err(err)?;
        Ok(Gemm { handle, plans: Mutex::new(HashMap::new()), workspace, workspace_bytes })
    }

    /// Column-major `C[m,n] = op(A)·op(B) + beta·C`, the operands stored as `types` (A and B of
    /// one type). `A` is stored `[m,k]` (or `[k,m]` when `ta`) with leading dimension `lda`,
    /// likewise `B` `[k,n]` (or `[n,k]`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn matmul_colmajor(
        &self,
        stream: cudarc::driver::sys::CUstream,
        prec: GemmPrecision,
        (m, n, k): (usize, usize, usize),
        a: u64,
        ta: bool,
        lda: usize,
        b: u64,
        tb: bool,
        ldb: usize,
        c: u64,
        ldc: usize,
        beta: f32,
        types: (DType, DType, DType),
    ) -> anyhow::Result<()> {
        assert_eq!(types.0, types.1, "GEMM operands A and B must have one type");
        // bf16 inputs: plain f32 compute (tensor cores, f32 accumulation); the precision knob
        // only chooses how f32 inputs are multiplied.
        let prec = if types.0 == DType::Bf16 { GemmPrecision::F32 } else { prec };
        let key: Key = (m as u64, n as u64, k as u64, ta, tb, lda as i64, ldb as i64, ldc as i64, prec, types);
        let mut plans = self.plans.lock().unwrap();
        if let std::collections::hash_map::Entry::Vacant(e) = plans.entry(key) {
            let plan = self.plan(key)?;
            e.insert(plan);
        }
        let p = &plans[&key];
        let alpha = 1.0f32;
        lt::matmul(
            self.handle,
            p.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            a as *const c_void,
            p.a,
            b as *const c_void,
            p.b,
            c as *const c_void,
            p.c,
            c as *mut c_void,
            p.c,
            &p.algo,
            self.workspace as *mut c_void,
            self.workspace_bytes,
            stream as ltsys::cudaStream_t,
        )
        .map_err(err)
    }

    fn plan(&self, (m, n, k, ta, tb, lda, ldb, ldc, prec, types): Key) -> anyhow::Result<Plan> {
        let f32t = ltsys::cudaDataType::CUDA_R_32F;
        unsafe {
            let desc = lt::create_matmul_desc(prec.compute_type(), f32t).map_err(err)?;
            let (opa, opb): (i32, i32) = (ta as i32, tb as i32); // CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
            lt::set_matmul_desc_attribute(
                desc,
                ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &opa as *const i32 as *const c_void,
                4,
            )
            .map_err(err)?;
            lt::set_matmul_desc_attribute(
                desc,
                ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                &opb as *const i32 as *const c_void,
                4,
            )
            .map_err(err)?;
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            let a = lt::create_matrix_layout(cuda_type(types.0), ar, ac, lda).map_err(err)?;
            let b = lt::create_matrix_layout(cuda_type(types.1), br, bc, ldb).map_err(err)?;
            let c = lt::create_matrix_layout(cuda_type(types.2), m, n, ldc).map_err(err)?;
            let pref = lt::create_matmul_pref().map_err(err)?;
            let ws = self.workspace_bytes as u64;
            lt::set_matmul_pref_attribute(
                pref,
                ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
            .map_err(err)?;
            let heur = lt::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref);
            let _ = lt::destroy_matmul_pref(pref);
            let heur = heur.map_err(|e| {
                anyhow::anyhow!("cuBLASLt found no algorithm for {m}x{n}x{k} ({prec:?}, {types:?}): {e:?}")
            })?;
            Ok(Plan { desc, a, b, c, algo: heur.algo })
        }
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        unsafe {
            for (_, p) in self.plans.get_mut().unwrap().drain() {
                let _ = lt::destroy_matrix_layout(p.a);
                let _ = lt::destroy_matrix_layout(p.b);
                let _ = lt::destroy_matrix_layout(p.c);
                let _ = lt::destroy_matmul_desc(p.desc);
            }
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
