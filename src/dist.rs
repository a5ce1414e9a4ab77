//! Data parallelism with ZeRO over a [`Communicator`]: every rank runs the same model on its own
//! rows of the global batch, gradients are summed across ranks, and the optimizer state is
//! replicated (ZeRO-0) or sharded (ZeRO-1: optimizer state; ZeRO-2: gradients too).
//!
//! Gradients travel in **buckets**: runs of whole parameters, taken in the order the backward
//! finishes them (last layer first), of about `bucket_elems` elements, each padded to a multiple
//! of the world size. A bucket's collective is launched as soon as its last gradient is final,
//! while the backward of earlier layers goes on; buckets are always launched in the same order on
//! every rank. Rank `r` owns slice `r` of every bucket (`padded / world` elements): with ZeRO-1/2
//! it keeps an fp32 master copy, AdamW moments and the reduced gradient of exactly that slice,
//! updates it, and the parameters are all-gathered bucket by bucket after the step.
//!
//! | stage | per micro-step | per step | optimizer state per rank |
//! |---|---|---|---|
//! | 0 | local accumulation | all-reduce of the gradients (after the last micro-step) | 8 bytes × Ψ (moments; parameters are the masters); 12 in mixed precision (+ fp32 masters) |
//! | 1 | local accumulation | reduce-scatter (after the last micro-step), update, all-gather | 12 bytes × Ψ/N (master, moments) |
//! | 2 | reduce-scatter, only the shard accumulates | update, all-gather | 12 bytes × Ψ/N |
//!
//! Only parameters that train in the current stage are in the layout (a frozen stage reduces and
//! stores nothing for the rest). The loss of each micro-batch is weighted by its share of the
//! *global* count of target tokens, so the summed gradient is that of the global mean loss and the
//! result does not depend on the world size beyond f32 summation order.
//!
//! In mixed precision ([`Backend::mixed_precision`]) the parameters are bf16 working copies:
//! gradients are still reduced in f32, every segment keeps an fp32 master, and the all-gather of
//! ZeRO-1/2 moves bf16 parameters.
use crate::backend::{memory_scope, AdamWConfig, Backend, MemoryUse};
use crate::batch::Batch;
use crate::model::{Llama, Param, StepOptions};
use crate::optim::AdamW;
use anyhow::Result;
use llama_cpt_ops::cross_entropy::count_valid;
pub use llama_cpt_parallel::buckets::{Bucket, Layout, Piece};
pub use llama_cpt_parallel::plan::ZeroStage;
use llama_cpt_parallel::{Communicator, Pending};
use std::time::{Duration, Instant};

/// What a step is checked against before its update, and the faults tests inject. The values
/// compared are the reduced ones, so every rank decides alike.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepChecks {
    /// Skip the update when the loss or the pre-clip gradient norm is above these (a spike).
    pub max_loss: f64,
    pub max_grad_norm: f64,
    /// Fault injection: the loss is NaN.
    pub poison_loss: bool,
    /// Fault injection: every gradient is multiplied by this (1: none).
    pub scale_gradients: f64,
    /// Update whatever the loss and norm are: a dry run on a device that executes nothing reads
    /// back zeros (`pretrain --dry-run`), and its update must still run to be measured.
    pub always_update: bool,
}

impl Default for StepChecks {
    fn default() -> Self {
        StepChecks {
            max_loss: f64::INFINITY,
            max_grad_norm: f64::INFINITY,
            poison_loss: false,
            scale_gradients: 1.0,
            always_update: false,
        }
    }
}

/// What one data-parallel step did.
#[derive(Clone, Copy, Debug)]
pub struct StepResult {
    /// Mean loss over the global batch's target tokens (NaN when there were none).
    pub loss: f64,
    /// Target tokens in the global batch.
    pub target_tokens: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when the loss or the norm was not finite or above [`StepChecks`]' bounds: nothing
    /// was updated, on any rank.
    pub applied: bool,
    /// The update was skipped as a spike (finite, above a bound).
    pub spike: bool,
    /// Time spent waiting for collectives (the part of communication not hidden by compute).
    pub comm_wait: Duration,
}

pub struct DataParallel<'c, B: Backend> {
    pub comm: &'c dyn Communicator<B::Buf>,
    pub stage: ZeroStage,
    pub layout: Layout,
    /// What this rank updates, one [`crate::optim::Segment`] of `opt` per piece.
    pub pieces: Vec<Piece>,
    pub opt: AdamW<B>,
}

impl<'c, B: Backend> DataParallel<'c, B> {
    pub fn new(
        backend: &B,
        comm: &'c dyn Communicator<B::Buf>,
        params: &[Param<B>],
        trainable: &[bool],
        stage: ZeroStage,
        bucket_elems: usize,
        config: AdamWConfig,
    ) -> Self {
        let sizes: Vec<usize> = params.iter().map(|p| p.value.numel()).collect();
        let layout = Layout::new(&sizes, trainable, bucket_elems.max(1), comm.world_size());
        let sharded = stage != ZeroStage::Zero0;
        let pieces = if sharded { layout.shard_pieces(comm.rank()) } else { layout.whole_pieces(&sizes) };
        let spans: Vec<(usize, usize, usize)> = pieces.iter().map(|p| (p.param, p.start, p.len)).collect();
        let _scope = memory_scope(backend, MemoryUse::Optimizer);
        let opt = AdamW::for_pieces(backend, params, config, &spans, sharded);
        DataParallel { comm, stage, layout, pieces, opt }
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn sharded(&self) -> bool {
        self.stage != ZeroStage::Zero0
    }

    /// Forward and backward over this rank's micro-batches of one global batch, gradient
    /// reduction, clipping by the global norm and the AdamW update (then the all-gather of the
    /// parameters under ZeRO-1/2), unless `checks` call for a skip.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        backend: &B,
        model: &mut Llama<B>,
        batches: &[Batch],
        opts: StepOptions,
        lr: f64,
        max_grad_norm: Option<f64>,
        checks: &StepChecks,
    ) -> Result<StepResult> {
        let mut scalars = [batches.iter().map(|b| count_valid(&b.targets)).sum::<usize>() as f64];
        self.comm.all_reduce_scalars(&mut scalars)?;
        let target_tokens = scalars[0] as usize;
        let mut reducer = Reducer::new(backend, self.comm, &self.layout, self.stage, model.params.len());
        let forward_backward = memory_scope(backend, MemoryUse::Activations);
        // Each micro-step's loss with its target count; read after the last, with the norm.
        let mut losses = Vec::with_capacity(batches.len());
        let mut counts = Vec::with_capacity(batches.len());
        for (j, b) in batches.iter().enumerate() {
            reducer.reduce_now = j + 1 == batches.len() || self.stage == ZeroStage::Zero2;
            let k = count_valid(&b.targets);
            if b.rows > 0 {
                let share = if target_tokens > 0 { k as f64 / target_tokens as f64 } else { 0.0 };
                let share = share * checks.scale_gradients;
                losses.push(model.loss_and_streamed_grads(backend, b, share, opts, &mut |i, g| reducer.ready(i, g))?);
                counts.push(k);
            }
            reducer.finish_micro_step()?;
        }
        drop(forward_backward);
        let mut reduced = reducer.reduced;
        let mut comm_wait = reducer.waited;
        let gradients = memory_scope(backend, MemoryUse::Gradients);
        // Each bucket is dropped once its last piece is cut out: the pieces and the buckets
        // never stand side by side whole (under ZeRO-0 that would be 4 bytes × Ψ more).
        let mut last_piece = vec![0; reduced.len()];
        for (i, p) in self.pieces.iter().enumerate() {
            last_piece[p.bucket] = i;
        }
        let mut grads: Vec<B::Buf> = Vec::with_capacity(self.pieces.len());
        for (i, p) in self.pieces.iter().enumerate() {
            let bucket = reduced[p.bucket].as_ref().expect("every bucket is reduced");
            grads.push(backend.slice(bucket, p.shard_offset, p.len));
            if last_piece[p.bucket] == i {
                reduced[p.bucket] = None;
            }
        }
        drop((reduced, gradients));
        // One host sync for the losses and this rank's Σg², one all-reduce for what ranks share.
        let (means, sq) = backend.losses_and_sum_squares(&losses, &grads.iter().collect::<Vec<_>>());
        let loss_sum: f64 = means.iter().zip(&counts).map(|(mean, &k)| mean * k as f64).sum();
        let mut scalars = if self.sharded() { vec![loss_sum, sq] } else { vec![loss_sum] };
        self.comm.all_reduce_scalars(&mut scalars)?;
        let sq = if self.sharded() { scalars[1] } else { sq };
        let mut loss = if target_tokens > 0 { scalars[0] / target_tokens as f64 } else { f64::NAN };
        if checks.poison_loss {
            loss = f64::NAN;
        }
        let grad_norm = if loss.is_finite() { sq.sqrt() } else { f64::NAN };
        if !grad_norm.is_finite() && !checks.always_update {
            return Ok(StepResult { loss, target_tokens, grad_norm, applied: false, spike: false, comm_wait });
        }
        if loss > checks.max_loss || grad_norm > checks.max_grad_norm {
            return Ok(StepResult { loss, target_tokens, grad_norm, applied: false, spike: true, comm_wait });
        }
        let scale = match max_grad_norm {
            Some(max) if grad_norm.is_finite() => llama_cpt_ops::gradnorm::clip_scale(grad_norm, max),
            _ => 1.0,
        };
        let refs: Vec<Option<&B::Buf>> = grads.iter().map(Some).collect();
        // The update writes the new working parameters (mixed precision, unsharded segments).
        let scope = memory_scope(backend, MemoryUse::Parameters);
        self.opt.update(backend, &mut model.params, &refs, lr, scale);
        drop(refs);
        drop((grads, scope));
        if self.sharded() {
            comm_wait += self.gather_params(backend, &mut model.params)?;
        }
        Ok(StepResult { loss, target_tokens, grad_norm, applied: true, spike: false, comm_wait })
    }

    /// Brings the model's parameters in line with this optimizer's masters after it was built or
    /// restored, in mixed precision: every parameter becomes a bf16 working copy, of its master
    /// where this rank holds it whole, and the sharded ones are gathered from the masters
    /// (ZeRO-1/2). In f32 the parameters already are the masters' values.
    pub fn refresh_params(&self, backend: &B, params: &mut [Param<B>]) -> Result<()> {
        if backend.mixed_precision() {
            self.opt.refresh_working(backend, params);
            if self.sharded() {
                self.gather_params(backend, params)?;
            }
        }
        // The blocks of what was loaded or replaced (f32 parameters: 4 bytes × Ψ) are of sizes
        // the step never asks for again: back to the driver, so that the step's sizes get them.
        backend.release_cached_memory();
        Ok(())
    }

    /// Mixed precision, at the end of a stage: the parameters this optimizer trains take their
    /// fp32 masters' values (gathered under ZeRO-1/2), so that the next stage's optimizer starts
    /// its masters from them rather than from the bf16 copies. Nothing to do in f32.
    pub fn params_from_masters(&self, backend: &B, params: &mut [Param<B>]) -> Result<()> {
        if !backend.mixed_precision() {
            return Ok(());
        }
        if self.sharded() {
            self.gather(backend, params, false)?;
        } else {
            // Unsharded segments are whole parameters: the f32 master replaces the bf16 buffer.
            for s in self.opt.segments.iter() {
                if let Some(master) = &s.master {
                    *params[s.param].value.buf_mut() = master.clone();
                }
            }
        }
        Ok(())
    }

    /// ZeRO-1/2: every rank's updated masters → everyone's working parameters. Returns the time
    /// spent waiting.
    pub fn gather_params(&self, backend: &B, params: &mut [Param<B>]) -> Result<Duration> {
        self.gather(backend, params, backend.mixed_precision())
    }

    /// All-gathers the masters into `params`, as working copies (bf16) when `working`. At most
    /// [`IN_FLIGHT`] gathers are outstanding: each is waited for and cut into its parameters
    /// before the next but one is launched, so the gathered copies never stand beside all of
    /// the old parameters at once (2 bytes × Ψ at bf16).
    fn gather(&self, backend: &B, params: &mut [Param<B>], working: bool) -> Result<Duration> {
        let world = self.world_size();
        let _scope = memory_scope(backend, MemoryUse::Communication);
        let mut pending: std::collections::VecDeque<(usize, Pending<B::Buf>)> = Default::default();
        let mut waited = Duration::ZERO;
        let mut settle = |bi: usize, p: Pending<B::Buf>, params: &mut [Param<B>]| -> Result<()> {
            let t = Instant::now();
            let full = p.wait()?;
            waited += t.elapsed();
            let b = &self.layout.buckets[bi];
            let _params = memory_scope(backend, MemoryUse::Parameters);
            for ((&param, &off), &n) in b.params.iter().zip(&b.offsets).zip(&b.sizes) {
                *params[param].value.buf_mut() = backend.slice(&full, off, n);
            }
            Ok(())
        };
        for (bi, b) in self.layout.buckets.iter().enumerate() {
            let parts: Vec<(usize, &B::Buf)> = self
                .pieces
                .iter()
                .zip(&self.opt.segments)
                .filter(|(p, _)| p.bucket == bi)
                .map(|(p, s)| (p.shard_offset, s.master.as_ref().expect("sharded segments keep masters")))
                .collect();
            let shard = backend.assemble(b.padded / world, &parts);
            // In mixed precision the working parameters travel in bf16 (2 bytes × Ψ, not 4).
            let shard = if working { backend.to_working(&shard) } else { shard };
            pending.push_back((bi, self.comm.all_gather(shard)));
            while pending.len() > IN_FLIGHT {
                let (bi, p) = pending.pop_front().expect("not empty");
                settle(bi, p, params)?;
            }
        }
        for (bi, p) in pending {
            settle(bi, p, params)?;
        }
        Ok(waited)
    }
}

/// Gradient collectives a backward keeps in flight before it waits for the oldest: enough for
/// the newest to overlap the compute that follows, few enough that their buffers stay small.
const IN_FLIGHT: usize = 2;

/// Collects one micro-step's gradients as the backward hands them over, launching each bucket's
/// collective when its gradients are final (in bucket order), and accumulating the results.
struct Reducer<'a, B: Backend> {
    backend: &'a B,
    comm: &'a dyn Communicator<B::Buf>,
    layout: &'a Layout,
    stage: ZeroStage,
    /// Reduce at the end of this micro-step (else only accumulate locally).
    reduce_now: bool,
    /// Local gradients not yet handed to a collective.
    local: Vec<Option<B::Buf>>,
    /// Gradients of each bucket handed over in this micro-step.
    arrived: Vec<usize>,
    /// Next bucket to launch (collectives must be issued in the same order on every rank).
    next: usize,
    pending: Vec<(usize, Pending<B::Buf>)>,
    /// Reduced gradients per bucket: the whole bucket (ZeRO-0) or this rank's slice (ZeRO-1/2).
    reduced: Vec<Option<B::Buf>>,
    waited: Duration,
    /// A collective that failed during the backward (returned by `finish_micro_step`).
    failed: Option<anyhow::Error>,
}

impl<'a, B: Backend> Reducer<'a, B> {
    fn new(
        backend: &'a B,
        comm: &'a dyn Communicator<B::Buf>,
        layout: &'a Layout,
        stage: ZeroStage,
        num_params: usize,
    ) -> Self {
        let n = layout.buckets.len();
        Reducer {
            backend,
            comm,
            layout,
            stage,
            reduce_now: false,
            local: vec![None; num_params],
            arrived: vec![0; n],
            next: 0,
            pending: vec![],
            reduced: vec![None; n],
            waited: Duration::ZERO,
            failed: None,
        }
    }

    fn ready(&mut self, param: usize, grad: B::Buf) {
        let Some((bucket, _)) = self.layout.bucket_of[param] else { return };
        match self.local[param].as_mut() {
            Some(acc) => self.backend.add_assign(acc, &grad),
            None => self.local[param] = Some(grad),
        }
        if self.reduce_now && self.failed.is_none() {
            self.arrived[bucket] += 1;
            while self.next < self.layout.buckets.len()
                && self.arrived[self.next] == self.layout.buckets[self.next].params.len()
            {
                // The backward cannot take an error: kept for finish_micro_step.
                if let Err(e) = self.launch(self.next) {
                    self.failed = Some(e);
                    return;
                }
            }
        }
    }

    fn launch(&mut self, bi: usize) -> Result<()> {
        let b = &self.layout.buckets[bi];
        // A parameter the micro-batch never reached (an empty micro-batch) contributes zeros.
        let grads: Vec<(usize, B::Buf)> =
            b.params.iter().zip(&b.offsets).filter_map(|(&p, &off)| Some((off, self.local[p].take()?))).collect();
        let flat = {
            let _scope = memory_scope(self.backend, MemoryUse::Communication);
            self.backend.assemble(b.padded, &grads.iter().map(|(off, g)| (*off, g)).collect::<Vec<_>>())
        };
        let pending = {
            // The collective's output is the reduced gradient kept until the update.
            let _scope = memory_scope(self.backend, MemoryUse::Gradients);
            if self.stage == ZeroStage::Zero0 {
                self.comm.all_reduce(flat)
            } else {
                self.comm.reduce_scatter(flat)
            }
        };
        self.pending.push((bi, pending));
        self.next = bi + 1;
        while self.pending.len() > IN_FLIGHT {
            self.settle_oldest()?;
        }
        Ok(())
    }

    /// Launches what is left (in order) and waits for this micro-step's collectives.
    fn finish_micro_step(&mut self) -> Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if !self.reduce_now {
            return Ok(());
        }
        while self.next < self.layout.buckets.len() {
            self.launch(self.next)?;
        }
        while !self.pending.is_empty() {
            self.settle_oldest()?;
        }
        self.arrived.iter_mut().for_each(|a| *a = 0);
        self.next = 0;
        Ok(())
    }

    /// Waits for the oldest collective in flight and accumulates its result. On the device the
    /// wait orders the compute stream after it (no host wait), and its input and output go back
    /// to the pool: settled as the backward goes on, a backward holds [`IN_FLIGHT`] buckets'
    /// results beside the accumulated ones instead of a whole second set.
    fn settle_oldest(&mut self) -> Result<()> {
        let (bi, p) = self.pending.remove(0);
        let t = Instant::now();
        let r = p.wait()?;
        self.waited += t.elapsed();
        match self.reduced[bi].as_mut() {
            Some(acc) => self.backend.add_assign(acc, &r),
            None => self.reduced[bi] = Some(r),
        }
        Ok(())
    }
}
