//! AdamW over a model's parameters with global-norm gradient clipping.
use crate::backend::{AdamWConfig, Backend};
use crate::model::Param;

pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// First and second moments, one pair per parameter (f32 on every backend).
    pub m: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
    /// Updates applied so far (bias correction uses it).
    pub step: u64,
}

/// What one optimizer step saw and did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// False when the norm was NaN or infinite: nothing was updated.
    pub applied: bool,
}

impl<B: Backend> AdamW<B> {
    pub fn new(backend: &B, params: &[Param<B>], config: AdamWConfig) -> Self {
        let zeros = || params.iter().map(|p| backend.zeros(p.value.numel())).collect();
        AdamW { config, m: zeros(), v: zeros(), step: 0 }
    }

    /// Clips by the global norm (when `max_grad_norm` is set) and updates every parameter whose
    /// `trainable` flag is set. A non-finite norm skips the update and leaves all state untouched.
    pub fn step(&mut self, backend: &B, params: &mut [Param<B>], grads: &[B::Buf], trainable: &[bool], lr: f64, max_grad_norm: Option<f64>) -> StepReport {
        assert!(params.len() == grads.len() && trainable.len() == grads.len());
        let sq: f64 = grads.iter().zip(trainable).filter(|(_, &t)| t).map(|(g, _)| backend.sum_squares(g)).sum();
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return StepReport { grad_norm, applied: false };
        }
        let scale = max_grad_norm.map_or(1.0, |max| llama_cpt_ops::gradnorm::clip_scale(grad_norm, max));
        self.step += 1;
        for (i, p) in params.iter_mut().enumerate() {
            if trainable[i] {
                let decay = p.decay;
                backend.adamw_step(p.value.buf_mut(), &grads[i], &mut self.m[i], &mut self.v[i], &self.config, lr, self.step, decay, scale);
            }
        }
        StepReport { grad_norm, applied: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Batch;
    use crate::config::LlamaConfig;
    use crate::cpu::Cpu;
    use crate::model::{Llama, StepOptions};

    #[test]
    fn training_a_tiny_model_lowers_its_loss_and_nan_skips() {
        let mut m = Llama::random(&Cpu, LlamaConfig::small(32, 32, 64, 2, 4, 2, true), 1);
        let tokens: Vec<u32> = (0..4 * 16).map(|i| ((i * 5) % 32) as u32).collect();
        let labels: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let batch = Batch::from_rows(4, 16, tokens, &labels);
        let mut opt = AdamW::new(&Cpu, &m.params, AdamWConfig { lr: 1e-2, ..Default::default() });
        let trainable = vec![true; m.params.len()];
        let first = m.loss(&Cpu, &batch).unwrap();
        for _ in 0..30 {
            let (_, grads) = m.loss_and_grads(&Cpu, &batch, 1.0, StepOptions::default()).unwrap();
            assert!(opt.step(&Cpu, &mut m.params, &grads, &trainable, 1e-2, Some(1.0)).applied);
        }
        let last = m.loss(&Cpu, &batch).unwrap();
        assert!(last < first * 0.5, "loss {first} -> {last}");
        // A NaN gradient changes nothing.
        let before: Vec<Vec<f32>> = m.params.iter().map(|p| p.value.to_host(&Cpu)).collect();
        let (_, mut grads) = m.loss_and_grads(&Cpu, &batch, 1.0, StepOptions::default()).unwrap();
        grads[3][0] = f32::NAN;
        let r = opt.step(&Cpu, &mut m.params, &grads, &trainable, 1e-2, Some(1.0));
        assert!(!r.applied && r.grad_norm.is_nan());
        assert_eq!(opt.step, 30);
        for (p, b) in m.params.iter().zip(before) {
            assert_eq!(p.value.to_host(&Cpu), b);
        }
    }
}
