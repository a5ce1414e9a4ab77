//! The product: checking a problem, the heuristic, the f32 arithmetic, and `cublasLtMatmul` on a stream.
use super::descriptors::{Desc, Layout, Preference};
use super::{out, status, Elem, InputRounding, Library, DESCS, LAYOUTS, LIBRARIES, PREFS};
use crate::driver::check_range;
use crate::stream;
use cudarc::cublaslt::sys::{
    cublasComputeType_t as Compute, cublasLtHandle_t, cublasLtMatmulAlgo_t, cublasLtMatmulDesc_t,
    cublasLtMatmulHeuristicResult_t, cublasLtMatmulPreference_t, cublasLtMatrixLayout_t, cublasStatus_t as Status,
    cudaStream_t,
};
use std::ffi::{c_int, c_void};

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
        if crate::mode::shapes_only() {
            return Ok(());
        }
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
