//! Global gradient L2 norm (over every tensor) and clipping by it, as
//! `torch.nn.utils.clip_grad_norm_` defines it.

/// Sum of squares of one tensor, accumulated in f64 in a fixed order.
pub fn sum_squares(x: &[f32]) -> f64 {
    x.iter().map(|&v| (v as f64) * (v as f64)).sum()
}

/// `sqrt(Σ over tensors of Σ g²)`.
pub fn global_norm<'a>(grads: impl IntoIterator<Item = &'a [f32]>) -> f64 {
    grads.into_iter().map(sum_squares).sum::<f64>().sqrt()
}

/// The factor gradients are multiplied by: `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_scale(norm: f64, max_norm: f64) -> f32 {
    (max_norm / (norm + 1e-6)).min(1.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_and_clip() {
        let a = [3.0f32];
        let b = [0.0f32, 4.0];
        let n = global_norm([&a[..], &b[..]]);
        assert_eq!(n, 5.0);
        assert!((clip_scale(n, 1.0) as f64 - 1.0 / (5.0 + 1e-6)).abs() < 1e-7);
        assert_eq!(clip_scale(n, 10.0), 1.0);
    }
}
