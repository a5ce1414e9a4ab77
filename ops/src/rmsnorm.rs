//! RMSNorm as in LLaMA: `y = x / sqrt(mean(x²) + eps) * w`, statistics in the compute type.
use crate::Real;
use rayon::prelude::*;

/// Normalises each row of `dim` values; writes `y` and the per-row reciprocal RMS `rstd`
/// (kept for the backward).
pub fn rmsnorm_forward<T: Real>(y: &mut [T], rstd: &mut [T], x: &[T], w: &[T], dim: usize, eps: f64) {
    assert_eq!(w.len(), dim);
    assert_eq!(x.len(), y.len());
    assert_eq!(rstd.len(), x.len() / dim);
    let eps = T::from_f64(eps);
    let inv_dim = T::from_f64(1.0 / dim as f64);
    y.par_chunks_mut(dim).zip(x.par_chunks(dim)).zip(rstd.par_iter_mut()).for_each(|((yr, xr), r)| {
        let ms = crate::real::dot(xr, xr) * inv_dim;
        let inv = T::ONE / (ms + eps).sqrt();
        *r = inv;
        for ((yi, &xi), &wi) in yr.iter_mut().zip(xr).zip(w) {
            *yi = wi * (xi * inv);
        }
    });
}

/// Backward: `dx` overwritten, `dw` accumulated (rows are summed in order: deterministic).
pub fn rmsnorm_backward<T: Real>(dx: &mut [T], dw: &mut [T], dy: &[T], x: &[T], w: &[T], rstd: &[T], dim: usize) {
    let inv_dim = T::from_f64(1.0 / dim as f64);
    dx.par_chunks_mut(dim).zip(dy.par_chunks(dim)).zip(x.par_chunks(dim)).zip(rstd.par_iter()).for_each(
        |(((dxr, dyr), xr), &r)| {
            // g = dy·w; dx = r·g − x·r³·mean(g·x)
            let mut gx = T::ZERO;
            for i in 0..dim {
                gx += dyr[i] * w[i] * xr[i];
            }
            let c = r * r * r * gx * inv_dim;
            for i in 0..dim {
                dxr[i] = r * dyr[i] * w[i] - xr[i] * c;
            }
        },
    );
    for ((dyr, xr), &r) in dy.chunks_exact(dim).zip(x.chunks_exact(dim)).zip(rstd) {
        for i in 0..dim {
            dw[i] += dyr[i] * xr[i] * r;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_gradient, random_vec};

    #[test]
    fn gradients_match_finite_differences() {
        for &(rows, dim) in &[(1, 1), (3, 7), (5, 24)] {
            let x = random_vec(rows * dim, 1);
            let w = random_vec(dim, 2);
            let dy = random_vec(rows * dim, 3);
            let eps = 1e-5;
            let fwd = |x: &[f64], w: &[f64]| {
                let mut y = vec![0.0; rows * dim];
                let mut r = vec![0.0; rows];
                rmsnorm_forward(&mut y, &mut r, x, w, dim, eps);
                (y, r)
            };
            let (_, r) = fwd(&x, &w);
            let mut dx = vec![f64::NAN; x.len()];
            let mut dw = vec![0.0; dim];
            rmsnorm_backward(&mut dx, &mut dw, &dy, &x, &w, &r, dim);
            check_gradient("rmsnorm dx", &x, &dx, &dy, |x| fwd(x, &w).0);
            check_gradient("rmsnorm dw", &w, &dw, &dy, |w| fwd(&x, w).0);
        }
    }

    #[test]
    fn forward_matches_definition() {
        let x = [3.0f64, 4.0];
        let w = [1.0, 2.0];
        let mut y = [0.0; 2];
        let mut r = [0.0; 1];
        rmsnorm_forward(&mut y, &mut r, &x, &w, 2, 0.5);
        let rms = (12.5f64 + 0.5).sqrt();
        assert!((y[0] - 3.0 / rms).abs() < 1e-15 && (y[1] - 8.0 / rms).abs() < 1e-15);
    }
}
