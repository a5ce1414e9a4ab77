//! Learning-rate schedule: linear warmup, then cosine decay to a floor (Colossal-LLaMA-2's).

/// LR for optimizer step `step` (0-based) of a stage of `total` steps.
pub fn lr_at(step: u64, total: u64, peak: f64, warmup: u64, min_ratio: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup.min(step)) as f64 / decay_steps as f64).min(1.0);
    let floor = peak * min_ratio;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_floor() {
        let (peak, total, warm) = (1.0, 110, 10);
        assert!((lr_at(0, total, peak, warm, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, total, peak, warm, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, total, peak, warm, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(60, total, peak, warm, 0.1) - 0.55).abs() < 1e-12, "half way is the mid point");
        assert!((lr_at(110, total, peak, warm, 0.1) - 0.1).abs() < 1e-12);
        let mut prev = f64::INFINITY;
        for s in warm..total {
            let lr = lr_at(s, total, peak, warm, 0.1);
            assert!(lr <= prev && lr >= 0.1);
            prev = lr;
        }
    }
}
