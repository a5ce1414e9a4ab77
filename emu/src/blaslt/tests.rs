//! cuBLASLt's tests: products against ops::matmul, the fast compute types, refusals, TF32 rounding.
use super::*;
use crate::{driver, stream};
use cudarc::cublaslt::sys::{
    cublasComputeType_t as Compute, cublasLtMatmulDescAttributes_t as DescAttr, cublasLtMatmulDesc_t,
    cublasLtMatmulHeuristicResult_t, cublasLtMatrixLayout_t, cudaStream_t,
};
use cudarc::driver::sys::cudaError_enum as CUresult;
use std::ffi::c_void;

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

/// Sets `desc`'s TRANSA and TRANSB (cublasOperation_t: N = 0, T = 1).
unsafe fn set_transposes(desc: cublasLtMatmulDesc_t, opa: i32, opb: i32) {
    unsafe {
        assert_eq!(
            cublasLtMatmulDescSetAttribute(desc, DescAttr::CUBLASLT_MATMUL_DESC_TRANSA, (&opa as *const i32).cast(), 4),
            Status::CUBLAS_STATUS_SUCCESS
        );
        assert_eq!(
            cublasLtMatmulDescSetAttribute(desc, DescAttr::CUBLASLT_MATMUL_DESC_TRANSB, (&opb as *const i32).cast(), 4),
            Status::CUBLAS_STATUS_SUCCESS
        );
    }
}

/// The column-major layouts of `lt_rowmajor`'s product: its first operand (row-major B), its
/// second (row-major A), and C/D.
unsafe fn layouts(
    (ab, cd): (Elem, Elem),
    (m, k, n): (usize, usize, usize),
    a_t: bool,
    b_t: bool,
) -> (cublasLtMatrixLayout_t, cublasLtMatrixLayout_t, cublasLtMatrixLayout_t) {
    let cuda = |e: Elem| if e == Elem::F32 { DataType::CUDA_R_32F } else { DataType::CUDA_R_16BF };
    let (mut la, mut lb, mut lc) = (std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut());
    // First operand (row-major B): stored k×n row-major = col-major n×k (or transposed).
    let (r1, c1) = if b_t { (k, n) } else { (n, k) };
    let (r2, c2) = if a_t { (m, k) } else { (k, m) };
    unsafe {
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
    }
    (la, lb, lc)
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
    unsafe {
        assert_eq!(cublasLtCreate(&mut h), Status::CUBLAS_STATUS_SUCCESS);
        let st = cublasLtMatmulDescCreate(&mut desc, compute, DataType::CUDA_R_32F);
        if st != Status::CUBLAS_STATUS_SUCCESS {
            return Err(st);
        }
        // Column-major: first operand is B (n×k col-major as row-major k×n is B itself).
        set_transposes(desc, b_t as i32, a_t as i32);
        let (la, lb, lc) = layouts(types, (m, k, n), a_t, b_t);
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
    let got =
        lt_rowmajor(Compute::CUBLAS_COMPUTE_32F, (Elem::Bf16, Elem::Bf16), &a, &b, &c0b, (m, k, n), false, true, 1.0)
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
