//! cuBLASLt (`cublasLt*`): the matrix products `src/cuda/gemm.rs` asks for, written from NVIDIA's
//! cuBLASLt documentation.
//!
//! `D = alpha·op(A)·op(B) + beta·C`, every matrix column-major with a leading dimension (`ld ≥
//! rows`), `op` = identity or transpose (`CUBLASLT_MATMUL_DESC_TRANSA/B`), `op(A)` m×k, `op(B)`
//! k×n, C and D m×n of one type; alpha and beta are f32 host values read at call time, and C is
//! not read when beta is 0 (it may hold garbage). Supported, as in the documentation's table of
//! type combinations:
//! - compute `32F` (scale f32): A/B f32 with C/D f32; A/B bf16 with C/D bf16 or f32;
//! - compute `32F_FAST_TF32` / `32F_FAST_16BF` (scale f32): A/B/C/D f32, the inputs rounded to
//!   TF32 (round to nearest, ties away from zero, as PTX `cvt.rna.tf32.f32`) or to bf16 (round to
//!   nearest even, `cvt.rn.bf16.f32`) before the product.
//!
//! Anything else (other types, orders, epilogues, batching, pointer modes) is
//! `CUBLAS_STATUS_NOT_SUPPORTED`, not a guess. The product accumulates in f32 in a fixed order (8
//! interleaved partial sums over k, combined pairwise), so results are deterministic; tensor cores'
//! own order is unspecified, so only round-off-level agreement with a GPU is to be expected. A bf16
//! D is rounded to nearest even from the f32 result. The work runs on the call's stream.
// The exported functions are the C ABI of NVIDIA's library, called by cudarc under that API's
// documented contract: their safety rules are NVIDIA's documentation, not repeated per function.
#![allow(clippy::missing_safety_doc)]
use crate::driver::check_range;
use crate::stream;
use cudarc::cublaslt::sys::{
    cublasComputeType_t as Compute, cublasLtHandle_t, cublasLtMatmulAlgo_t, cublasLtMatmulDescAttributes_t as DescAttr,
    cublasLtMatmulDesc_t, cublasLtMatmulHeuristicResult_t, cublasLtMatmulPreferenceAttributes_t as PrefAttr,
    cublasLtMatmulPreference_t, cublasLtMatrixLayout_t, cublasStatus_t as Status, cudaDataType as DataType,
    cudaStream_t,
};
use std::collections::HashSet;
use std::ffi::{c_int, c_void};
use std::sync::{Mutex, OnceLock};

/// The element types the library handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    Bf16,
}

impl Elem {
    fn from_cuda(t: DataType) -> Option<Elem> {
        match t {
            DataType::CUDA_R_32F => Some(Elem::F32),
            DataType::CUDA_R_16BF => Some(Elem::Bf16),
            _ => None,
        }
    }
    fn bytes(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::Bf16 => 2,
        }
    }
    /// Element `i` of the array at `base`.
    unsafe fn read(self, base: usize, i: usize) -> f32 {
        match self {
            Elem::F32 => unsafe { (base as *const f32).add(i).read() },
            Elem::Bf16 => unsafe { (base as *const half::bf16).add(i).read() }.to_f32(),
        }
    }
    unsafe fn write(self, base: usize, i: usize, v: f32) {
        match self {
            Elem::F32 => unsafe { (base as *mut f32).add(i).write(v) },
            Elem::Bf16 => unsafe { (base as *mut half::bf16).add(i).write(half::bf16::from_f32(v)) },
        }
    }
}

/// How inputs are rounded before the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InputRounding {
    None,
    Tf32,
    Bf16,
}

/// f32 → TF32 (10 explicit mantissa bits), round to nearest with ties away from zero.
pub fn round_to_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    f32::from_bits((x.to_bits() + 0x1000) & 0xffff_e000)
}

impl InputRounding {
    fn apply(self, x: f32) -> f32 {
        match self {
            InputRounding::None => x,
            InputRounding::Tf32 => round_to_tf32(x),
            InputRounding::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

struct Desc {
    compute: Compute,
    trans_a: bool,
    trans_b: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Layout {
    elem: Elem,
    rows: u64,
    cols: u64,
    ld: i64,
}

impl Layout {
    /// Elements a column-major rows×cols matrix with this leading dimension spans.
    fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.cols as usize - 1) * self.ld as usize + self.rows as usize
        }
    }
}

struct Preference {
    max_workspace: u64,
}

/// Live handles of one kind: the addresses this library handed out (anything else is refused).
struct Handles(OnceLock<Mutex<HashSet<usize>>>);

impl Handles {
    const fn new() -> Handles {
        Handles(OnceLock::new())
    }
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<usize>> {
        self.0.get_or_init(Default::default).lock().unwrap()
    }
    fn add<T>(&self, value: T) -> usize {
        let p = Box::into_raw(Box::new(value)) as usize;
        self.set().insert(p);
        p
    }
    fn get<T>(&self, p: usize) -> Result<&'static mut T, Status> {
        if p == 0 || !self.set().contains(&p) {
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        }
        Ok(unsafe { &mut *(p as *mut T) })
    }
    fn remove<T>(&self, p: usize) -> Status {
        if !self.set().remove(&p) {
            return Status::CUBLAS_STATUS_INVALID_VALUE;
        }
        drop(unsafe { Box::from_raw(p as *mut T) });
        Status::CUBLAS_STATUS_SUCCESS
    }
}

static LIBRARIES: Handles = Handles::new();
static DESCS: Handles = Handles::new();
static LAYOUTS: Handles = Handles::new();
static PREFS: Handles = Handles::new();

fn status(f: impl FnOnce() -> Result<(), Status>) -> Status {
    match f() {
        Ok(()) => Status::CUBLAS_STATUS_SUCCESS,
        Err(s) => s,
    }
}

unsafe fn out<T>(p: *mut T, v: T) -> Result<(), Status> {
    if p.is_null() {
        return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
    }
    unsafe { p.write(v) };
    Ok(())
}

/// The library's state behind a handle (nothing: every call carries what it needs).
struct Library;

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

/// A checked product: what the heuristic and the matmul both validate.
#[derive(Clone, Copy, Debug)]
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    a: Layout,
    b: Layout,
    c: Layout,
    rounding: InputRounding,
}

fn problem(
    desc: cublasLtMatmulDesc_t,
    a: cublasLtMatrixLayout_t,
    b: cublasLtMatrixLayout_t,
    c: cublasLtMatrixLayout_t,
    d: cublasLtMatrixLayout_t,
) -> Result<Problem, Status> {
    let desc = DESCS.get::<Desc>(desc as usize)?;
    let (a, b, c, d) = (
        *LAYOUTS.get::<Layout>(a as usize)?,
        *LAYOUTS.get::<Layout>(b as usize)?,
        *LAYOUTS.get::<Layout>(c as usize)?,
        *LAYOUTS.get::<Layout>(d as usize)?,
    );
    // D's layout equals C's (the library supports no other combination for these types).
    if c != d {
        return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED);
    }
    let (m, n) = (c.rows as usize, c.cols as usize);
    let (am, ak) = if desc.trans_a { (a.cols, a.rows) } else { (a.rows, a.cols) };
    let (bk, bn) = if desc.trans_b { (b.cols, b.rows) } else { (b.rows, b.cols) };
    if am as usize != m || bn as usize != n || ak != bk {
        return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
    }
    let rounding = match (desc.compute, a.elem, b.elem, c.elem) {
        (Compute::CUBLAS_COMPUTE_32F, Elem::F32, Elem::F32, Elem::F32) => InputRounding::None,
        (Compute::CUBLAS_COMPUTE_32F, Elem::Bf16, Elem::Bf16, _) => InputRounding::None,
        (Compute::CUBLAS_COMPUTE_32F_FAST_TF32, Elem::F32, Elem::F32, Elem::F32) => InputRounding::Tf32,
        (Compute::CUBLAS_COMPUTE_32F_FAST_16BF, Elem::F32, Elem::F32, Elem::F32) => InputRounding::Bf16,
        _ => return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED),
    };
    Ok(Problem { m, n, k: ak as usize, trans_a: desc.trans_a, trans_b: desc.trans_b, a, b, c, rounding })
}

/// Marks an algorithm this library's heuristic returned.
const ALGO_TAG: u64 = 0x6c63_7074_656d_7531; // "lcptemu1"

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cublasLtMatmulAlgoGetHeuristic(
    handle: cublasLtHandle_t,
    desc: cublasLtMatmulDesc_t,
    a: cublasLtMatrixLayout_t,
    b: cublasLtMatrixLayout_t,
    c: cublasLtMatrixLayout_t,
    d: cublasLtMatrixLayout_t,
    pref: cublasLtMatmulPreference_t,
    requested: c_int,
    results: *mut cublasLtMatmulHeuristicResult_t,
    returned: *mut c_int,
) -> Status {
    status(|| {
        LIBRARIES.get::<Library>(handle as usize)?;
        PREFS.get::<Preference>(pref as usize)?;
        if requested < 1 || results.is_null() || returned.is_null() {
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        }
        problem(desc, a, b, c, d)?;
        let mut algo = cublasLtMatmulAlgo_t { data: [0; 8] };
        algo.data[0] = ALGO_TAG;
        unsafe {
            out(
                results,
                cublasLtMatmulHeuristicResult_t {
                    algo,
                    workspaceSize: 0,
                    state: Status::CUBLAS_STATUS_SUCCESS,
                    wavesCount: 1.0,
                    reserved: [0; 4],
                },
            )?;
            out(returned, 1)
        }
    })
}

/// One product on the calling thread. `a`, `b`, `c`, `d` are device (host) addresses.
unsafe fn run(p: Problem, alpha: f32, beta: f32, a: usize, b: usize, c: usize, d: usize) {
    let Problem { m, n, k, .. } = p;
    // op(A) row by row and op(B) column by column, rounded, each contiguous over k.
    let mut at = vec![0f32; m * k];
    for i in 0..m {
        for q in 0..k {
            let idx = if p.trans_a { q + i * p.a.ld as usize } else { i + q * p.a.ld as usize };
            at[i * k + q] = p.rounding.apply(unsafe { p.a.elem.read(a, idx) });
        }
    }
    let mut bt = vec![0f32; n * k];
    for j in 0..n {
        for q in 0..k {
            let idx = if p.trans_b { j + q * p.b.ld as usize } else { q + j * p.b.ld as usize };
            bt[j * k + q] = p.rounding.apply(unsafe { p.b.elem.read(b, idx) });
        }
    }
    let columns = |range: std::ops::Range<usize>| {
        for j in range {
            for i in 0..m {
                let at_i = &at[i * k..(i + 1) * k];
                let bt_j = &bt[j * k..(j + 1) * k];
                let idx = i + j * p.c.ld as usize;
                // beta = 0: C is not read (it may be uninitialised), as documented.
                let prior = if beta == 0.0 { 0.0 } else { beta * unsafe { p.c.elem.read(c, idx) } };
                unsafe { p.c.elem.write(d, idx, alpha * dot(at_i, bt_j) + prior) };
            }
        }
    };
    // Columns of D split among a few threads for large products (each column's arithmetic is
    // the same whatever the split, so the result does not depend on it).
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n);
    if threads <= 1 || m * n * k < (1 << 18) {
        columns(0..n);
    } else {
        let per = n.div_ceil(threads);
        std::thread::scope(|s| {
            for t in 0..threads {
                let range = (t * per).min(n)..((t + 1) * per).min(n);
                s.spawn(|| columns(range));
            }
        });
    }
}

/// f32 dot product in a fixed order: 8 interleaved partial sums, combined pairwise.
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (xs, ys) in xc.zip(yc) {
        for l in 0..8 {
            lanes[l] += xs[l] * ys[l];
        }
    }
    for (l, (a, b)) in xr.iter().zip(yr).enumerate() {
        lanes[l] += a * b;
    }
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
}

/// `CUBLAS_STATUS_INVALID_VALUE` unless the matrix lies inside one device allocation.
fn check_matrix(what: &str, ptr: usize, l: &Layout) -> Result<(), Status> {
    check_range(ptr as u64, l.span() * l.elem.bytes()).map_err(|_| {
        eprintln!(
            "emulated cuBLASLt: matrix {what} at {ptr:#x} ({}x{}, ld {}, {:?}) is not inside one device allocation",
            l.rows, l.cols, l.ld, l.elem
        );
        Status::CUBLAS_STATUS_INVALID_VALUE
    })
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cublasLtMatmul(
    handle: cublasLtHandle_t,
    desc: cublasLtMatmulDesc_t,
    alpha: *const c_void,
    a: *const c_void,
    a_layout: cublasLtMatrixLayout_t,
    b: *const c_void,
    b_layout: cublasLtMatrixLayout_t,
    beta: *const c_void,
    c: *const c_void,
    c_layout: cublasLtMatrixLayout_t,
    d: *mut c_void,
    d_layout: cublasLtMatrixLayout_t,
    algo: *const cublasLtMatmulAlgo_t,
    _workspace: *mut c_void,
    _workspace_bytes: usize,
    s: cudaStream_t,
) -> Status {
    status(|| {
        LIBRARIES.get::<Library>(handle as usize)?;
        let p = problem(desc, a_layout, b_layout, c_layout, d_layout)?;
        if alpha.is_null() || beta.is_null() {
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        }
        // An algorithm from elsewhere than this library's heuristic (null = the library picks).
        if !algo.is_null() && unsafe { (*algo).data[0] } != ALGO_TAG {
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        }
        // Host pointer mode (the default): the scalars are read now.
        let (alpha, beta) = unsafe { ((alpha as *const f32).read_unaligned(), (beta as *const f32).read_unaligned()) };
        if p.m == 0 || p.n == 0 {
            return Ok(());
        }
        let (a, b, c, d) = (a as usize, b as usize, c as usize, d as usize);
        if p.k > 0 {
            check_matrix("A", a, &p.a)?;
            check_matrix("B", b, &p.b)?;
        }
        if beta != 0.0 {
            check_matrix("C", c, &p.c)?;
        }
        check_matrix("D", d, &p.c)?;
        stream::enqueue(
            s as cudarc::driver::sys::CUstream,
            Box::new(move || {
                unsafe { run(p, alpha, beta, a, b, c, d) };
                Ok(())
            }),
        )
        .map_err(|_| Status::CUBLAS_STATUS_EXECUTION_FAILED)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver;
    use cudarc::driver::sys::cudaError_enum as CUresult;

    /// A device buffer holding `data` in the element type `e`.
    fn upload(e: Elem, data: &[f32]) -> u64 {
        assert_eq!(driver::cuInit(0), CUresult::CUDA_SUCCESS);
        let p = driver::alloc(data.len().max(1) * e.bytes()).unwrap();
        for (i, &v) in data.iter().enumerate() {
            unsafe { e.write(p as usize, i, v) };
        }
        p
    }
    fn download(e: Elem, p: u64, n: usize) -> Vec<f32> {
        (0..n).map(|i| unsafe { e.read(p as usize, i) }).collect()
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // A small deterministic generator: values in [-1, 1) with full mantissas.
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Row-major `C[r,c] (+)= op(A)·op(B)` through cuBLASLt exactly as src/cuda/gemm.rs maps it
    /// (a row-major matrix is its column-major transpose, so the column-major product is
    /// `Cᵀ = op(B)ᵀ·op(A)ᵀ`): returns D downloaded as f32.
    #[allow(clippy::too_many_arguments)]
    fn lt_rowmajor(
        compute: Compute,
        types: (Elem, Elem),
        a: &[f32],
        b: &[f32],
        c0: &[f32],
        (m, k, n): (usize, usize, usize),
        a_t: bool,
        b_t: bool,
        beta: f32,
    ) -> Result<Vec<f32>, Status> {
        let (ab, cd) = types;
        let (pa, pb, pc) = (upload(ab, a), upload(ab, b), upload(cd, c0));
        let s = stream::create();
        let mut h = std::ptr::null_mut();
        let mut desc = std::ptr::null_mut();
        let cuda = |e: Elem| if e == Elem::F32 { DataType::CUDA_R_32F } else { DataType::CUDA_R_16BF };
        unsafe {
            assert_eq!(cublasLtCreate(&mut h), Status::CUBLAS_STATUS_SUCCESS);
            let st = cublasLtMatmulDescCreate(&mut desc, compute, DataType::CUDA_R_32F);
            if st != Status::CUBLAS_STATUS_SUCCESS {
                return Err(st);
            }
            // Column-major: first operand is B (n×k col-major as row-major k×n is B itself).
            let (opa, opb) = (b_t as i32, a_t as i32);
            assert_eq!(
                cublasLtMatmulDescSetAttribute(
                    desc,
                    DescAttr::CUBLASLT_MATMUL_DESC_TRANSA,
                    (&opa as *const i32).cast(),
                    4
                ),
                Status::CUBLAS_STATUS_SUCCESS
            );
            assert_eq!(
                cublasLtMatmulDescSetAttribute(
                    desc,
                    DescAttr::CUBLASLT_MATMUL_DESC_TRANSB,
                    (&opb as *const i32).cast(),
                    4
                ),
                Status::CUBLAS_STATUS_SUCCESS
            );
            let (mut la, mut lb, mut lc) = (std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut());
            // First operand (row-major B): stored k×n row-major = col-major n×k (or transposed).
            let (r1, c1) = if b_t { (k, n) } else { (n, k) };
            let (r2, c2) = if a_t { (m, k) } else { (k, m) };
            assert_eq!(
                cublasLtMatrixLayoutCreate(&mut la, cuda(ab), r1 as u64, c1 as u64, r1 as i64),
                Status::CUBLAS_STATUS_SUCCESS
            );
            assert_eq!(
                cublasLtMatrixLayoutCreate(&mut lb, cuda(ab), r2 as u64, c2 as u64, r2 as i64),
                Status::CUBLAS_STATUS_SUCCESS
            );
            assert_eq!(
                cublasLtMatrixLayoutCreate(&mut lc, cuda(cd), n as u64, m as u64, n as i64),
                Status::CUBLAS_STATUS_SUCCESS
            );
            let mut pref = std::ptr::null_mut();
            assert_eq!(cublasLtMatmulPreferenceCreate(&mut pref), Status::CUBLAS_STATUS_SUCCESS);
            let mut heur = std::mem::zeroed::<cublasLtMatmulHeuristicResult_t>();
            let mut count = 0;
            let st = cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, lc, lc, pref, 1, &mut heur, &mut count);
            if st != Status::CUBLAS_STATUS_SUCCESS {
                return Err(st);
            }
            let alpha = 1.0f32;
            let st = cublasLtMatmul(
                h,
                desc,
                (&alpha as *const f32).cast(),
                pb as *const c_void,
                la,
                pa as *const c_void,
                lb,
                (&beta as *const f32).cast(),
                pc as *const c_void,
                lc,
                pc as *mut c_void,
                lc,
                &heur.algo,
                std::ptr::null_mut(),
                0,
                s as cudaStream_t,
            );
            assert_eq!(st, Status::CUBLAS_STATUS_SUCCESS);
            stream::synchronize(s).unwrap();
            stream::destroy(s).unwrap();
        }
        Ok(download(cd, pc, m * n))
    }

    fn round_all(x: &[f32], f: impl Fn(f32) -> f32) -> Vec<f32> {
        x.iter().map(|&v| f(v)).collect()
    }

    /// Largest |x - y| relative to the reference's sum of |a||b| (the f32 round-off scale).
    fn check(got: &[f32], want: &[f32], scale: &[f32], tol: f32, what: &str) {
        for (i, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
            assert!((g - w).abs() <= tol * s.max(1e-30), "{what}: element {i}: got {g}, want {w} (bound {})", tol * s);
        }
    }

    #[test]
    fn f32_products_follow_ops_matmul_with_transposes_and_accumulation() {
        let (m, k, n) = (7, 37, 5);
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let (a, b, c0) = (values(m * k, 1), values(k * n, 2), values(m * n, 3));
            let abs = |x: &[f32]| round_all(x, f32::abs);
            for beta in [0.0, 1.0] {
                let got = lt_rowmajor(
                    Compute::CUBLAS_COMPUTE_32F,
                    (Elem::F32, Elem::F32),
                    &a,
                    &b,
                    &c0,
                    (m, k, n),
                    a_t,
                    b_t,
                    beta,
                )
                .unwrap();
                let mut want = if beta == 1.0 { c0.clone() } else { vec![0.0; m * n] };
                llama_cpt_ops::matmul::matmul(&mut want, &a, &b, m, k, n, a_t, b_t, beta == 1.0);
                let mut scale = if beta == 1.0 { abs(&c0) } else { vec![0.0; m * n] };
                llama_cpt_ops::matmul::matmul(&mut scale, &abs(&a), &abs(&b), m, k, n, a_t, b_t, true);
                // Two f32 summations of k+1 terms in different orders: each within (k+1)·u·Σ|ab|.
                check(
                    &got,
                    &want,
                    &scale,
                    2.0 * (k as f32 + 1.0) * f32::EPSILON / 2.0,
                    &format!("a_t={a_t} b_t={b_t} beta={beta}"),
                );
            }
        }
    }

    #[test]
    fn fast_compute_types_round_the_inputs() {
        let (m, k, n) = (4, 64, 3);
        let (a, b, c0) = (values(m * k, 4), values(k * n, 5), vec![f32::NAN; m * n]);
        let abs = |x: &[f32]| round_all(x, f32::abs);
        let mut scale = vec![0.0; m * n];
        llama_cpt_ops::matmul::matmul(&mut scale, &abs(&a), &abs(&b), m, k, n, false, false, false);
        let bf = |x: f32| half::bf16::from_f32(x).to_f32();
        for (compute, round) in [
            (Compute::CUBLAS_COMPUTE_32F_FAST_16BF, &bf as &dyn Fn(f32) -> f32),
            (Compute::CUBLAS_COMPUTE_32F_FAST_TF32, &round_to_tf32),
        ] {
            // beta = 0 with C full of NaN: C must not be read.
            let got = lt_rowmajor(compute, (Elem::F32, Elem::F32), &a, &b, &c0, (m, k, n), false, false, 0.0).unwrap();
            let mut want = vec![0.0; m * n];
            llama_cpt_ops::matmul::matmul(
                &mut want,
                &round_all(&a, round),
                &round_all(&b, round),
                m,
                k,
                n,
                false,
                false,
                false,
            );
            check(&got, &want, &scale, (k as f32 + 1.0) * f32::EPSILON, &format!("{compute:?} against rounded inputs"));
            let mut exact = vec![0.0; m * n];
            llama_cpt_ops::matmul::matmul(&mut exact, &a, &b, m, k, n, false, false, false);
            assert!(
                got.iter().zip(&exact).any(|(g, e)| (g - e).abs() > 10.0 * (k as f32) * f32::EPSILON * 1.0),
                "{compute:?}: the inputs were not rounded"
            );
        }
    }

    #[test]
    fn bf16_operands_into_bf16_and_f32_outputs() {
        let (m, k, n) = (6, 40, 9);
        let bf = |x: f32| half::bf16::from_f32(x).to_f32();
        let (a, b) = (round_all(&values(m * k, 6), bf), round_all(&values(k * n, 7), bf));
        let c0 = values(m * n, 8);
        let abs = |x: &[f32]| round_all(x, f32::abs);
        let mut scale = abs(&c0);
        llama_cpt_ops::matmul::matmul(&mut scale, &abs(&a), &abs(&b), m, k, n, false, true, true);
        let mut want = c0.clone();
        llama_cpt_ops::matmul::matmul(&mut want, &a, &b, m, k, n, false, true, true);
        // f32 C/D (the weight gradient, beta = 1): f32 round-off only.
        let got =
            lt_rowmajor(Compute::CUBLAS_COMPUTE_32F, (Elem::Bf16, Elem::F32), &a, &b, &c0, (m, k, n), false, true, 1.0)
                .unwrap();
        check(&got, &want, &scale, (k as f32 + 1.0) * f32::EPSILON, "bf16·bf16 + f32");
        // bf16 C/D: C rounded on upload, D rounded to nearest even once (half an ulp of bf16).
        let c0b = round_all(&c0, bf);
        let mut want = c0b.clone();
        llama_cpt_ops::matmul::matmul(&mut want, &a, &b, m, k, n, false, true, true);
        let got = lt_rowmajor(
            Compute::CUBLAS_COMPUTE_32F,
            (Elem::Bf16, Elem::Bf16),
            &a,
            &b,
            &c0b,
            (m, k, n),
            false,
            true,
            1.0,
        )
        .unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let bound = w.abs() * 2f32.powi(-8) + (k as f32 + 1.0) * f32::EPSILON * scale[i];
            assert!((g - w).abs() <= bound, "bf16 D element {i}: got {g}, want {w}");
            assert_eq!(*g, bf(*g), "D holds bf16 values");
        }
    }

    #[test]
    fn unsupported_combinations_are_refused() {
        let (m, k, n) = (2, 3, 4);
        let (a, b, c) = (values(m * k, 9), values(k * n, 10), values(m * n, 11));
        // Fast compute types take f32 operands only; bf16 operands need compute 32F.
        assert_eq!(
            lt_rowmajor(
                Compute::CUBLAS_COMPUTE_32F_FAST_16BF,
                (Elem::Bf16, Elem::F32),
                &a,
                &b,
                &c,
                (m, k, n),
                false,
                false,
                0.0
            ),
            Err(Status::CUBLAS_STATUS_NOT_SUPPORTED)
        );
        // f32 operands into a bf16 D are not a documented combination.
        assert_eq!(
            lt_rowmajor(Compute::CUBLAS_COMPUTE_32F, (Elem::F32, Elem::Bf16), &a, &b, &c, (m, k, n), false, false, 0.0),
            Err(Status::CUBLAS_STATUS_NOT_SUPPORTED)
        );
        let mut desc = std::ptr::null_mut();
        assert_eq!(
            unsafe { cublasLtMatmulDescCreate(&mut desc, Compute::CUBLAS_COMPUTE_16F, DataType::CUDA_R_32F) },
            Status::CUBLAS_STATUS_NOT_SUPPORTED
        );
        let mut layout = std::ptr::null_mut();
        assert_eq!(
            unsafe { cublasLtMatrixLayoutCreate(&mut layout, DataType::CUDA_R_32F, 8, 2, 4) },
            Status::CUBLAS_STATUS_INVALID_VALUE,
            "ld < rows"
        );
    }

    #[test]
    fn tf32_rounds_to_nearest_ties_away() {
        // 1 + 2^-11 lies exactly between two TF32 values (ulp 2^-10): away from zero.
        assert_eq!(round_to_tf32(1.0 + 2f32.powi(-11)), 1.0 + 2f32.powi(-10));
        assert_eq!(round_to_tf32(-(1.0 + 2f32.powi(-11))), -(1.0 + 2f32.powi(-10)));
        assert_eq!(round_to_tf32(1.0 + 2f32.powi(-12)), 1.0);
        assert!(round_to_tf32(f32::NAN).is_nan());
    }
}
