//! Test helpers: random inputs and central finite differences in f64.
use rand::{rngs::StdRng, Rng, SeedableRng};

pub fn random_vec(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

/// Max |a-b| / max(|b|, floor) over the whole tensor.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    if a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    diff / scale
}

pub fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

/// Checks `analytic` = d<f(x), dy>/dx by central differences (h = 1e-6) at up to 400 coordinates
/// spread over the input (all of them when there are fewer).
pub fn check_gradient(what: &str, x: &[f64], analytic: &[f64], dy: &[f64], f: impl Fn(&[f64]) -> Vec<f64>) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient has the wrong length");
    let h = 1e-6;
    let loss = |x: &[f64]| -> f64 { f(x).iter().zip(dy).map(|(a, b)| a * b).sum() };
    let stride = x.len().div_ceil(400).max(1);
    let mut xp = x.to_vec();
    let mut numeric = Vec::new();
    let mut picked = Vec::new();
    for i in (0..x.len()).step_by(stride) {
        xp[i] = x[i] + h;
        let lp = loss(&xp);
        xp[i] = x[i] - h;
        let lm = loss(&xp);
        xp[i] = x[i];
        numeric.push((lp - lm) / (2.0 * h));
        picked.push(analytic[i]);
    }
    // Relative to the largest numeric gradient, floored at 1e-2 so that a tensor whose gradient
    // is tiny everywhere is judged by absolute error instead of amplified round-off.
    let scale = numeric.iter().fold(1e-2f64, |m, v| m.max(v.abs()));
    let diff = picked.iter().zip(&numeric).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(picked.iter().all(|v| v.is_finite()), "{what}: non-finite analytic gradient");
    assert!(diff / scale <= 1e-6, "{what}: relative error {:e} > 1e-6", diff / scale);
}
