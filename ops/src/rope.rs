//! Rotary position embedding in the layout transformers uses for LLaMA ("rotate half"):
//! for `i < d/2`, the pair `(x[i], x[i + d/2])` is rotated by `pos · θ^(−2i/d)`.
use crate::Real;
use rayon::prelude::*;

/// cos and sin of every (position, frequency) pair: `[positions.len(), head_dim/2]` each.
/// The inverse frequencies are computed in the compute type as transformers does in f32.
pub fn rope_tables<T: Real>(positions: &[u32], head_dim: usize, theta: f64) -> (Vec<T>, Vec<T>) {
    assert!(head_dim.is_multiple_of(2), "rope: head_dim {head_dim} must be even");
    let half = head_dim / 2;
    let base = T::from_f64(theta);
    let inv_freq: Vec<T> =
        (0..half).map(|i| T::ONE / base.powf(T::from_f64((2 * i) as f64) / T::from_f64(head_dim as f64))).collect();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &f in &inv_freq {
            let angle = T::from_f64(p as f64) * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}

/// Rotates `x` (`[tokens, heads, head_dim]`) in place by the angles of each token's position.
/// `inverse` rotates the other way, which is the backward (the rotation is orthogonal).
pub fn rope_apply<T: Real>(x: &mut [T], cos: &[T], sin: &[T], heads: usize, head_dim: usize, inverse: bool) {
    let half = head_dim / 2;
    let tokens = cos.len() / half.max(1);
    assert_eq!(x.len(), tokens * heads * head_dim, "rope: x does not match the tables");
    x.par_chunks_mut(heads * head_dim).enumerate().for_each(|(t, row)| {
        let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
        for h in row.chunks_exact_mut(head_dim) {
            let (lo, hi) = h.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                let si = if inverse { -s[i] } else { s[i] };
                lo[i] = a * c[i] - b * si;
                hi[i] = b * c[i] + a * si;
            }
        }
    });
}

/// Forward: `y = rope(x)`, out of place.
pub fn rope_forward<T: Real>(y: &mut [T], x: &[T], positions: &[u32], heads: usize, head_dim: usize, theta: f64) {
    let (cos, sin) = rope_tables::<T>(positions, head_dim, theta);
    y.copy_from_slice(x);
    rope_apply(y, &cos, &sin, heads, head_dim, false);
}

/// Backward: `dx = rope⁻¹(dy)`, out of place.
pub fn rope_backward<T: Real>(dx: &mut [T], dy: &[T], positions: &[u32], heads: usize, head_dim: usize, theta: f64) {
    let (cos, sin) = rope_tables::<T>(positions, head_dim, theta);
    dx.copy_from_slice(dy);
    rope_apply(dx, &cos, &sin, heads, head_dim, true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_gradient, random_vec};

    #[test]
    fn gradients_match_finite_differences_odd_head_dim_multiple() {
        // head_dim 6 (not a power of two), 3 heads, positions including large ones.
        let (heads, hd) = (3, 6);
        let pos = [0u32, 1, 7, 4095];
        let x = random_vec(pos.len() * heads * hd, 1);
        let dy = random_vec(x.len(), 2);
        for theta in [10_000.0, 500_000.0] {
            let mut dx = vec![0.0; x.len()];
            rope_backward(&mut dx, &dy, &pos, heads, hd, theta);
            check_gradient("rope", &x, &dx, &dy, |x| {
                let mut y = vec![0.0; x.len()];
                rope_forward(&mut y, x, &pos, heads, hd, theta);
                y
            });
        }
    }

    #[test]
    fn rotate_half_layout_matches_definition() {
        // One head of dim 4 at position 1, theta 100: frequencies 1 and 1/10.
        let x = [1.0f64, 2.0, 3.0, 4.0];
        let mut y = [0.0; 4];
        rope_forward(&mut y, &x, &[1], 1, 4, 100.0);
        let (c0, s0, c1, s1) = (1f64.cos(), 1f64.sin(), 0.1f64.cos(), 0.1f64.sin());
        let want = [1.0 * c0 - 3.0 * s0, 2.0 * c1 - 4.0 * s1, 3.0 * c0 + 1.0 * s0, 4.0 * c1 + 2.0 * s1];
        for i in 0..4 {
            assert!((y[i] - want[i]).abs() < 1e-12, "{i}: {} vs {}", y[i], want[i]);
        }
        // Position 0 is the identity.
        rope_forward(&mut y, &x, &[0], 1, 4, 100.0);
        assert_eq!(y, x);
    }
}
