//! Matrix multiply (through the `gemm` crate: blocked, SIMD, multithreaded) and the linear layer.
use crate::Real;
use gemm::{gemm, Parallelism};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// FLOPs (2·m·k·n per product) and wall-clock nanoseconds spent in [`matmul`] since the process
/// started: the speed benches report the achieved GEMM rate against the machine's peak from them.
static GEMM_FLOPS: AtomicU64 = AtomicU64::new(0);
static GEMM_NANOS: AtomicU64 = AtomicU64::new(0);

/// `(flops, seconds)` spent in [`matmul`] so far. The time is wall-clock per call, so it is the
/// GEMMs' share of a step only while one thread at a time calls `matmul` (as the CPU backend does).
pub fn gemm_totals() -> (u64, f64) {
    (GEMM_FLOPS.load(Ordering::Relaxed), GEMM_NANOS.load(Ordering::Relaxed) as f64 * 1e-9)
}

/// `c[m,n] = op(a)·op(b)` (or `+=` when `accumulate`), where `op(a)` is `[m,k]` (stored `[k,m]`
/// when `a_t`) and `op(b)` is `[k,n]` (stored `[n,k]` when `b_t`). All row-major.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Real>(
    c: &mut [T],
    a: &[T],
    b: &[T],
    m: usize,
    k: usize,
    n: usize,
    a_t: bool,
    b_t: bool,
    accumulate: bool,
) {
    assert_eq!(a.len(), m * k, "matmul: a has {} elements, expected {m}x{k}", a.len());
    assert_eq!(b.len(), k * n, "matmul: b has {} elements, expected {k}x{n}", b.len());
    assert_eq!(c.len(), m * n, "matmul: c has {} elements, expected {m}x{n}", c.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(T::ZERO);
        }
        return;
    }
    let (a_rs, a_cs) = if a_t { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if b_t { (1, k as isize) } else { (n as isize, 1) };
    let started = Instant::now();
    let threads = rayon::current_num_threads();
    // Small products are faster on one thread than through the pool.
    let par = if m * n * k < 64 * 64 * 64 || threads <= 1 { Parallelism::None } else { Parallelism::Rayon(threads) };
    // SAFETY: the three slices have exactly the extents described by (m, k, n) and the strides,
    // checked above; `c` does not alias `a` or `b` (it is a unique borrow).
    unsafe {
        gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        );
    }
    GEMM_FLOPS.fetch_add(2 * (m * k * n) as u64, Ordering::Relaxed);
    GEMM_NANOS.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// `y[m,n] = x[m,k]·w[n,k]ᵀ` (a PyTorch `Linear` without bias).
pub fn linear_forward<T: Real>(y: &mut [T], x: &[T], w: &[T], m: usize, k: usize, n: usize) {
    matmul(y, x, w, m, k, n, false, true, false);
}

/// Backward of [`linear_forward`]: `dx = dy·w` (overwritten) and `dw += dyᵀ·x` (accumulated, so
/// that gradient accumulation over micro-batches needs no extra pass).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<T: Real>(dx: &mut [T], dw: &mut [T], dy: &[T], x: &[T], w: &[T], m: usize, k: usize, n: usize) {
    matmul(dx, dy, w, m, n, k, false, false, false);
    matmul(dw, dy, x, n, m, k, true, false, true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_close, check_gradient, random_vec};

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize, a_t: bool, b_t: bool) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let av = if a_t { a[p * m + i] } else { a[i * k + p] };
                    let bv = if b_t { b[j * k + p] } else { b[p * n + j] };
                    c[i * n + j] += av * bv;
                }
            }
        }
        c
    }

    #[test]
    fn matmul_matches_naive_for_all_transposes_and_accumulates() {
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (17, 33, 9), (70, 65, 130)] {
            for a_t in [false, true] {
                for b_t in [false, true] {
                    let a = random_vec(m * k, 1);
                    let b = random_vec(k * n, 2);
                    let want = naive(&a, &b, m, k, n, a_t, b_t);
                    let mut c = vec![f64::NAN; m * n];
                    matmul(&mut c, &a, &b, m, k, n, a_t, b_t, false);
                    assert_close(&c, &want, 1e-12, "matmul");
                    let mut c2 = vec![1.0; m * n];
                    matmul(&mut c2, &a, &b, m, k, n, a_t, b_t, true);
                    let want2: Vec<f64> = want.iter().map(|v| v + 1.0).collect();
                    assert_close(&c2, &want2, 1e-12, "matmul accumulate");
                }
            }
        }
    }

    #[test]
    fn linear_gradients_match_finite_differences() {
        let (m, k, n) = (5, 7, 3);
        let x = random_vec(m * k, 3);
        let w = random_vec(n * k, 4);
        let dy = random_vec(m * n, 5);
        let mut dx = vec![0.0; m * k];
        let mut dw = vec![0.0; n * k];
        linear_backward(&mut dx, &mut dw, &dy, &x, &w, m, k, n);
        check_gradient("linear dx", &x, &dx, &dy, |x| {
            let mut y = vec![0.0; m * n];
            linear_forward(&mut y, x, &w, m, k, n);
            y
        });
        check_gradient("linear dw", &w, &dw, &dy, |w| {
            let mut y = vec![0.0; m * n];
            linear_forward(&mut y, &x, w, m, k, n);
            y
        });
    }
}
