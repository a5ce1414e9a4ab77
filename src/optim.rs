//! AdamW over a model's parameters, or over the pieces of them one ZeRO rank owns, with
//! global-norm gradient clipping.
use crate::backend::{AdamWConfig, AdamWTensor, Backend};
use crate::model::Param;

/// Elements `[start, start + len)` of parameter `param`, updated by this rank, with its moments.
/// A sharded segment (ZeRO-1/2) also keeps an fp32 master copy of its elements: the update goes
/// there and the working parameters are all-gathered from the masters. A whole, unsharded segment
/// updates the parameter in place in f32 training; in mixed precision it keeps a master too and
/// the update writes the bf16 parameter from it.
pub struct Segment<B: Backend> {
    pub param: usize,
    pub start: usize,
    pub len: usize,
    pub master: Option<B::Buf>,
    pub m: B::Buf,
    pub v: B::Buf,
}

pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    pub segments: Vec<Segment<B>>,
    /// Segments are ZeRO shards: the parameters are gathered from the masters after an update,
    /// not written by it.
    pub sharded: bool,
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
    /// Every parameter whole (one process, or ZeRO-0 where every rank keeps all optimizer state).
    pub fn new(backend: &B, params: &[Param<B>], config: AdamWConfig) -> Self {
        let pieces: Vec<(usize, usize, usize)> =
            params.iter().enumerate().map(|(i, p)| (i, 0, p.value.numel())).collect();
        Self::for_pieces(backend, params, config, &pieces, false)
    }

    /// The given `(param, start, len)` pieces (ZeRO shards when `sharded`), each with moments and
    /// — when sharded or in mixed precision — an fp32 master copy taken from the current
    /// parameters.
    pub fn for_pieces(
        backend: &B,
        params: &[Param<B>],
        config: AdamWConfig,
        pieces: &[(usize, usize, usize)],
        sharded: bool,
    ) -> Self {
        let masters = sharded || backend.mixed_precision();
        let segments = pieces
            .iter()
            .map(|&(param, start, len)| Segment {
                param,
                start,
                len,
                master: masters.then(|| backend.slice(&params[param].value.buf, start, len)),
                m: backend.zeros(len),
                v: backend.zeros(len),
            })
            .collect();
        AdamW { config, segments, sharded, step: 0 }
    }

    /// Bytes of optimizer state this rank holds (moments and masters), counted from the buffers.
    pub fn state_bytes(&self, backend: &B) -> usize {
        let bufs = self.segments.iter().flat_map(|s| [Some(&s.m), Some(&s.v), s.master.as_ref()]).flatten();
        bufs.map(|b| 4 * backend.len(b)).sum()
    }

    /// One AdamW update of every segment from its gradient (of the segment's length) scaled by
    /// `grad_scale` (the clipping factor); a segment given `None` is not updated (frozen this
    /// stage). Counts the step.
    pub fn update(
        &mut self,
        backend: &B,
        params: &mut [Param<B>],
        grads: &[Option<&B::Buf>],
        lr: f64,
        grad_scale: f32,
    ) {
        assert_eq!(grads.len(), self.segments.len());
        self.step += 1;
        let decay: Vec<bool> = params.iter().map(|p| p.decay).collect();
        // The parameters an update writes: unsharded segments (whole parameters, one each) that
        // train this step. Sharded segments write their masters only.
        let mut written = vec![false; params.len()];
        if !self.sharded {
            for (s, g) in self.segments.iter().zip(grads) {
                written[s.param] |= g.is_some();
            }
        }
        let mut param_bufs: Vec<Option<&mut B::Buf>> =
            params.iter_mut().zip(&written).map(|(p, &w)| w.then(|| p.value.buf_mut())).collect();
        let mut tensors = Vec::with_capacity(self.segments.len());
        for (s, g) in self.segments.iter_mut().zip(grads) {
            let Some(grad) = *g else { continue };
            let (param, working) = match s.master.as_mut() {
                Some(master) if self.sharded => (master, None),
                Some(master) => (master, Some(param_bufs[s.param].take().expect("one segment per parameter"))),
                None => (param_bufs[s.param].take().expect("one segment per parameter"), None),
            };
            tensors.push(AdamWTensor { param, grad, m: &mut s.m, v: &mut s.v, working, decay: decay[s.param] });
        }
        backend.adamw_steps(&mut tensors, &self.config, lr, self.step, grad_scale);
    }

    /// Makes every parameter a working-precision copy (bf16 in mixed precision): from its master
    /// where this optimizer holds it whole, else from its current value. Under ZeRO the caller
    /// then gathers the updated parameters from the masters.
    pub fn refresh_working(&self, backend: &B, params: &mut [Param<B>]) {
        let mut from_master: Vec<Option<&B::Buf>> = vec![None; params.len()];
        if !self.sharded {
            // Unsharded segments are whole parameters.
            for s in &self.segments {
                from_master[s.param] = s.master.as_ref();
            }
        }
        for (p, m) in params.iter_mut().zip(from_master) {
            let w = backend.to_working(m.unwrap_or(&*p.value.buf));
            *p.value.buf_mut() = w;
        }
    }

    /// Whole-parameter optimizer ([`AdamW::new`]): clips by the global norm of the trainable
    /// gradients (when `max_grad_norm` is set) and updates every parameter whose `trainable` flag
    /// is set. A non-finite norm skips the update and leaves all state untouched.
    pub fn step(
        &mut self,
        backend: &B,
        params: &mut [Param<B>],
        grads: &[B::Buf],
        trainable: &[bool],
        lr: f64,
        max_grad_norm: Option<f64>,
    ) -> StepReport {
        assert!(params.len() == grads.len() && trainable.len() == grads.len());
        let trained: Vec<&B::Buf> = grads.iter().zip(trainable).filter(|(_, &t)| t).map(|(g, _)| g).collect();
        let sq = backend.sum_squares_all(&trained);
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return StepReport { grad_norm, applied: false };
        }
        let scale = max_grad_norm.map_or(1.0, |max| llama_cpt_ops::gradnorm::clip_scale(grad_norm, max));
        let per_segment: Vec<Option<&B::Buf>> =
            self.segments.iter().map(|s| trainable[s.param].then(|| &grads[s.param])).collect();
        self.update(backend, params, &per_segment, lr, scale);
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
