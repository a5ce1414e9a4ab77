//! SwiGLU: `out = silu(gate) · up`, `silu(g) = g·σ(g)`.
use crate::Real;
use rayon::prelude::*;

const CHUNK: usize = 4096;

#[inline(always)]
fn sigmoid<T: Real>(g: T) -> T {
    T::ONE / (T::ONE + (-g).exp())
}

pub fn swiglu_forward<T: Real>(out: &mut [T], gate: &[T], up: &[T]) {
    assert!(out.len() == gate.len() && gate.len() == up.len());
    out.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))).for_each(|(o, (g, u))| {
        for i in 0..o.len() {
            o[i] = g[i] * sigmoid(g[i]) * u[i];
        }
    });
}

/// `dgate`, `dup` overwritten.
pub fn swiglu_backward<T: Real>(dgate: &mut [T], dup: &mut [T], dout: &[T], gate: &[T], up: &[T]) {
    assert!(dgate.len() == dout.len() && dup.len() == dout.len());
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(dout.par_chunks(CHUNK).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))))
        .for_each(|((dg, du), (d, (g, u)))| {
            for i in 0..d.len() {
                let s = sigmoid(g[i]);
                let silu = g[i] * s;
                du[i] = d[i] * silu;
                dg[i] = d[i] * u[i] * s * (T::ONE + g[i] * (T::ONE - s));
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_gradient, random_vec};

    #[test]
    fn gradients_match_finite_differences() {
        let n = 37;
        let g: Vec<f64> = random_vec(n, 1).iter().map(|v| v * 6.0).collect();
        let u = random_vec(n, 2);
        let dy = random_vec(n, 3);
        let mut dg = vec![0.0; n];
        let mut du = vec![0.0; n];
        swiglu_backward(&mut dg, &mut du, &dy, &g, &u);
        let f = |g: &[f64], u: &[f64]| {
            let mut o = vec![0.0; n];
            swiglu_forward(&mut o, g, u);
            o
        };
        check_gradient("swiglu dgate", &g, &dg, &dy, |g| f(g, &u));
        check_gradient("swiglu dup", &u, &du, &dy, |u| f(&g, u));
    }
}
