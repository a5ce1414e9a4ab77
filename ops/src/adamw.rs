//! AdamW with decoupled weight decay and bias correction, step for step as
//! `torch.optim.AdamW` (single-tensor path) computes it.

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The continual pre-training defaults: betas (0.9, 0.95), eps 1e-8, weight decay 0.1.
    fn default() -> Self {
        AdamWConfig { lr: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// The per-step scalars of an update, computed once (in f64, as torch does) and shared by every
/// implementation (this reference and the CUDA kernel) so that they cannot drift apart.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `lr / (1 − β₁ᵗ)`.
    pub step_size: f32,
    /// `√(1 − β₂ᵗ)`.
    pub bc2_sqrt: f32,
    /// `1 − lr·weight_decay`, or 1 without decay.
    pub decay_factor: f32,
}

impl AdamWScalars {
    pub fn new(cfg: &AdamWConfig, lr: f64, step: u64, decay: bool) -> Self {
        assert!(step >= 1, "adamw: steps count from 1");
        let bc1 = 1.0 - cfg.beta1.powi(step as i32);
        let bc2 = 1.0 - cfg.beta2.powi(step as i32);
        AdamWScalars {
            beta1: cfg.beta1 as f32,
            beta2: cfg.beta2 as f32,
            eps: cfg.eps as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            decay_factor: if decay { (1.0 - lr * cfg.weight_decay) as f32 } else { 1.0 },
        }
    }
}

/// One update of `param` from `grad · grad_scale` (the scale carries gradient clipping), with the
/// f32 moments `m`, `v`. `step` counts from 1. `decay` false skips weight decay (norms, biases).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    cfg: &AdamWConfig,
    lr: f64,
    step: u64,
    decay: bool,
    grad_scale: f32,
) {
    assert!(param.len() == grad.len() && m.len() == grad.len() && v.len() == grad.len());
    let AdamWScalars { beta1: b1, beta2: b2, eps, step_size, bc2_sqrt, decay_factor } =
        AdamWScalars::new(cfg, lr, step, decay);
    for i in 0..param.len() {
        let g = grad[i] * grad_scale;
        param[i] *= decay_factor;
        m[i] += (g - m[i]) * (1.0 - b1);
        v[i] = v[i] * b2 + g * g * (1.0 - b2);
        let denom = v[i].sqrt() / bc2_sqrt + eps;
        param[i] -= step_size * (m[i] / denom);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_textbook_formula_over_several_steps() {
        let cfg = AdamWConfig { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let mut p = vec![0.5f32, -1.0, 2.0];
        let (mut m, mut v) = (vec![0.0f32; 3], vec![0.0f32; 3]);
        let mut pd: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let (mut md, mut vd) = (vec![0.0f64; 3], vec![0.0f64; 3]);
        for step in 1..=5u64 {
            let g = [0.1f32 * step as f32, -0.2, 0.3];
            adamw_step(&mut p, &g, &mut m, &mut v, &cfg, cfg.lr, step, true, 1.0);
            for i in 0..3 {
                let gi = g[i] as f64;
                pd[i] *= 1.0 - cfg.lr * cfg.weight_decay;
                md[i] = 0.9 * md[i] + 0.1 * gi;
                vd[i] = 0.95 * vd[i] + 0.05 * gi * gi;
                let mh = md[i] / (1.0 - 0.9f64.powi(step as i32));
                let vh = vd[i] / (1.0 - 0.95f64.powi(step as i32));
                pd[i] -= cfg.lr * mh / (vh.sqrt() + cfg.eps);
            }
        }
        for i in 0..3 {
            assert!((p[i] as f64 - pd[i]).abs() < 1e-6, "{i}: {} vs {}", p[i], pd[i]);
        }
    }

    #[test]
    fn no_decay_and_grad_scale() {
        let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.5, ..Default::default() };
        let (mut p1, mut p2) = (vec![1.0f32], vec![1.0f32]);
        let (mut m1, mut v1, mut m2, mut v2) = (vec![0.0f32], vec![0.0f32], vec![0.0f32], vec![0.0f32]);
        adamw_step(&mut p1, &[0.0], &mut m1, &mut v1, &cfg, cfg.lr, 1, false, 1.0);
        assert_eq!(p1[0], 1.0, "zero gradient and no decay leaves the parameter");
        adamw_step(&mut p2, &[4.0], &mut m2, &mut v2, &cfg, cfg.lr, 1, false, 0.5);
        assert_eq!(m2[0], (2.0f32 - 0.0) * (1.0 - 0.9));
    }
}
