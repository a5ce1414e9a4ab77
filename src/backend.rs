//! The device interface: one method per operator (forward and backward), the unit a CUDA kernel
//! implements. The CPU backend ([`crate::cpu::Cpu`]) calls the `ops` crate's reference for each.
//!
//! Buffers are flat; shapes live in [`crate::tensor::Tensor`]. Activations are `[tokens, features]`,
//! attention tensors `[tokens, heads, head_dim]`, linear weights `[out, in]`.
pub use llama_cpt_ops::adamw::AdamWConfig;
pub use llama_cpt_ops::attention::AttnShape;

/// One tensor of a multi-tensor AdamW step ([`Backend::adamw_steps`]): the f32 parameter or
/// master, its gradient and moments, and optionally its working-precision copy to write.
pub struct AdamWTensor<'a, Buf> {
    pub param: &'a mut Buf,
    pub grad: &'a Buf,
    pub m: &'a mut Buf,
    pub v: &'a mut Buf,
    pub working: Option<&'a mut Buf>,
    pub decay: bool,
}

/// The sizes one forward hands to the ops, checked against what a backend's ops can take before
/// any of them runs ([`Backend::check_forward_shape`]).
#[derive(Clone, Copy, Debug)]
pub struct ForwardShape {
    /// Tokens in the forward (all rows, or the KV cache plus the new tokens).
    pub tokens: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub attn: AttnShape,
}

/// Limits every backend shares: token ids, positions and document offsets are `u32`, targets `i32`.
pub fn check_common_limits(s: &ForwardShape) -> anyhow::Result<()> {
    let AttnShape { heads, kv_heads, head_dim } = s.attn;
    if kv_heads == 0 || heads % kv_heads != 0 {
        anyhow::bail!("attention: {kv_heads} KV heads must divide the {heads} query heads");
    }
    if head_dim == 0 || head_dim % 2 != 0 {
        anyhow::bail!("rope: head_dim {head_dim} must be even (rotary pairs)");
    }
    if s.tokens > u32::MAX as usize {
        anyhow::bail!(
            "batch: {} tokens in one forward; positions and document offsets are u32 (at most {})",
            s.tokens,
            u32::MAX
        );
    }
    if s.vocab > i32::MAX as usize {
        anyhow::bail!("cross_entropy: vocabulary {} beyond the i32 targets' limit {}", s.vocab, i32::MAX);
    }
    Ok(())
}

/// The profile range of one optimizer step ([`Backend::profile_range`]): data, forward, backward,
/// reduction, update, the loss download; the report gives its counts per step.
pub const PROFILE_TRAIN_STEP: &str = "train step";

/// What a device allocation is for, as the memory report splits the peak (`pretrain --dry-run`).
/// The trainer names it around its phases ([`memory_scope`]); a backend that counts its memory
/// files every block under the use current when the block was handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MemoryUse {
    /// The model's working parameters (bf16 in mixed precision).
    Parameters,
    /// fp32 masters and AdamW moments.
    Optimizer,
    /// Reduced gradients kept until the update (ZeRO-1/2: this rank's shard).
    Gradients,
    /// Flat buffers handed to collectives: gradient buckets, all-gathered parameters.
    Communication,
    /// The forward and backward: activations, their gradients, the local weight gradients.
    Activations,
    /// Everything else: cached uploads, library workspace, the optimizer's temporaries.
    #[default]
    Other,
}

impl MemoryUse {
    pub const COUNT: usize = 6;
    pub const ALL: [MemoryUse; MemoryUse::COUNT] = [
        MemoryUse::Parameters,
        MemoryUse::Optimizer,
        MemoryUse::Gradients,
        MemoryUse::Communication,
        MemoryUse::Activations,
        MemoryUse::Other,
    ];
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn name(self) -> &'static str {
        match self {
            MemoryUse::Parameters => "parameters",
            MemoryUse::Optimizer => "optimizer state (fp32 masters, moments)",
            MemoryUse::Gradients => "reduced gradients",
            MemoryUse::Communication => "communication buffers (gradient buckets, gathers)",
            MemoryUse::Activations => "forward/backward (activations, local gradients)",
            MemoryUse::Other => "other (workspace, cached uploads)",
        }
    }
}

/// Byte counts of a device's caching allocator ([`Backend::memory_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    /// Bytes in live buffers (rounded up to their size class).
    pub in_use: usize,
    /// Highest `in_use` since the start or the last [`Backend::reset_peak_memory`].
    pub peak_in_use: usize,
    /// Bytes held from the driver (live and cached).
    pub reserved: usize,
    pub peak_reserved: usize,
    /// `cuMemAlloc` calls so far (constant once warm).
    pub driver_allocs: u64,
    /// Allocations served from the cache.
    pub cache_hits: u64,
    /// Bytes of retired blocks whose reader on another stream has not finished (part of `in_use`).
    pub retiring: usize,
    /// Retired blocks handed out again in stream order (the compute stream waits for the reader).
    pub reused_in_stream_order: u64,
    /// `in_use` by what holds it ([`MemoryUse::index`]), now and at the peak.
    pub by_use: [usize; MemoryUse::COUNT],
    pub peak_by_use: [usize; MemoryUse::COUNT],
    /// The use being allocated for when the peak was reached (which phase of the step peaks).
    pub peak_during: MemoryUse,
}

/// Files the allocations made while it lives under `what`, then restores the previous use.
pub struct MemoryScope<'a, B: Backend> {
    backend: &'a B,
    previous: MemoryUse,
}

pub fn memory_scope<B: Backend>(backend: &B, what: MemoryUse) -> MemoryScope<'_, B> {
    MemoryScope { backend, previous: backend.set_memory_use(what) }
}

impl<B: Backend> Drop for MemoryScope<'_, B> {
    fn drop(&mut self) {
        self.backend.set_memory_use(self.previous);
    }
}

/// A micro-step's mean cross-entropy: read already, or still on the device as each row's loss
/// (f32, 0 for ignored targets) over `valid` counted targets.
pub enum StepLoss<Buf> {
    Host(f64),
    Rows { rows: Buf, valid: usize },
}

/// The mean loss from each row's loss: summed in f64 in row order, over `valid` targets (0 when
/// there are none), as a device reports it.
pub fn mean_of_row_losses(rows: &[f32], valid: usize) -> f64 {
    if valid == 0 {
        0.0
    } else {
        rows.iter().map(|&l| l as f64).sum::<f64>() / valid as f64
    }
}

pub trait Backend: Send + Sync + Sized + 'static {
    /// A device buffer (its element type is the backend's business: f32 on the CPU).
    type Buf: Clone + Send + Sync + 'static;

    /// Short human-readable name, e.g. "cpu (2 threads)".
    fn name(&self) -> String;
    /// Peak FLOP/s of the device for the compute type in use (for MFU), if known.
    fn peak_flops(&self) -> Option<f64>;

    /// Mixed precision: parameters and activations are held in bf16 (the "working" precision),
    /// the optimizer keeps an fp32 master of every parameter it updates, and gradients of the
    /// parameters, moments and every accumulation stay f32. False: everything is f32.
    fn mixed_precision(&self) -> bool {
        false
    }
    /// A copy of `x` in the working precision (bf16 under [`Backend::mixed_precision`], else an
    /// unchanged copy): how parameters are made from their fp32 masters.
    fn to_working(&self, x: &Self::Buf) -> Self::Buf {
        x.clone()
    }

    /// The collectives for this backend's buffers between the ranks of `launch` (one process:
    /// [`llama_cpt_parallel::SingleProcess`]). `timeout` bounds every wait for a collective.
    fn communicator(
        &self,
        launch: &llama_cpt_parallel::launch::Launch,
        timeout: std::time::Duration,
    ) -> anyhow::Result<Box<dyn llama_cpt_parallel::Communicator<Self::Buf>>> {
        let _ = timeout;
        if launch.world_size == 1 {
            return Ok(Box::new(llama_cpt_parallel::SingleProcess::default()));
        }
        anyhow::bail!(
            "{} ranks were launched ({}), but the {} backend has no multi-process communicator in this build",
            launch.world_size,
            launch.launcher,
            self.name()
        )
    }

    /// Counting of launches, copies and host syncs on (`pretrain --profile`), where the backend
    /// counts them (the CUDA backend; the CPU has nothing to count).
    fn set_profiling(&self, on: bool) {
        let _ = on;
    }
    /// Counts from now on belong to range `name` (the trainer names its train steps,
    /// evaluations and checkpoints).
    fn profile_range(&self, name: &'static str) {
        let _ = name;
    }
    /// The counts so far: per train step, and the other ranges' totals.
    fn profile_report(&self) -> Option<String> {
        None
    }
    /// The device allocator's counts, where the backend keeps them (the CUDA backend).
    fn memory_stats(&self) -> Option<MemStats> {
        None
    }
    /// The peaks of [`Backend::memory_stats`] start again from what is in use now.
    fn reset_peak_memory(&self) {}
    /// Gives the allocator's cached free blocks back to the device (after the work queued so far).
    fn release_cached_memory(&self) {}
    /// What allocations from now on are for (see [`memory_scope`]); returns the use before.
    fn set_memory_use(&self, what: MemoryUse) -> MemoryUse {
        what
    }

    /// Refuses sizes this backend's ops cannot take, naming the op and the limit, before any op
    /// runs (the model calls it on every batch). The CPU takes what [`check_common_limits`] allows.
    fn check_forward_shape(&self, s: &ForwardShape) -> anyhow::Result<()> {
        check_common_limits(s)
    }

    fn upload(&self, data: &[f32]) -> Self::Buf;
    #[track_caller] // a host sync on a device: counted where the model or optimizer asked
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    fn zeros(&self, len: usize) -> Self::Buf;
    fn len(&self, buf: &Self::Buf) -> usize;

    /// `a + b`.
    fn add(&self, a: &Self::Buf, b: &Self::Buf) -> Self::Buf;
    /// `a += b`.
    fn add_assign(&self, a: &mut Self::Buf, b: &Self::Buf);
    /// `a *= s`.
    fn scale_assign(&self, a: &mut Self::Buf, s: f32);

    /// `y[m,n] = x[m,k]·w[n,k]ᵀ`.
    fn linear(&self, x: &Self::Buf, w: &Self::Buf, m: usize, k: usize, n: usize) -> Self::Buf;
    /// Returns `dx = dy·w`; accumulates `dw += dyᵀ·x`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        dw: &mut Self::Buf,
        m: usize,
        k: usize,
        n: usize,
    ) -> Self::Buf;
    /// [`Backend::linear_backward`] onto a zero `dw`: returns `(dx, dw = dyᵀ·x)`. A device may
    /// write the new `dw` directly (β = 0) instead of filling it with zeros to accumulate onto.
    fn linear_backward_new_dw(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        m: usize,
        k: usize,
        n: usize,
    ) -> (Self::Buf, Self::Buf) {
        let mut dw = self.zeros(n * k);
        let dx = self.linear_backward(dy, x, w, &mut dw, m, k, n);
        (dx, dw)
    }

    fn embedding(&self, table: &Self::Buf, ids: &[u32], dim: usize) -> Self::Buf;
    /// Accumulates `dtable[ids[t]] += dout[t]`, deterministically.
    fn embedding_backward(&self, dout: &Self::Buf, ids: &[u32], dim: usize, dtable: &mut Self::Buf);

    /// Returns `(y, rstd)`.
    fn rmsnorm(&self, x: &Self::Buf, w: &Self::Buf, dim: usize, eps: f64) -> (Self::Buf, Self::Buf);
    /// Residual add fused with the RMSNorm that follows it: returns `(h, y, rstd)` with
    /// `h = x + r` and `(y, rstd) = rmsnorm(h, w)`. The default composes the two operators (the
    /// reference); a device may do it in one pass. The backward is that of the two operators.
    fn add_rmsnorm(
        &self,
        x: &Self::Buf,
        r: &Self::Buf,
        w: &Self::Buf,
        dim: usize,
        eps: f64,
    ) -> (Self::Buf, Self::Buf, Self::Buf) {
        let h = self.add(x, r);
        let (y, rstd) = self.rmsnorm(&h, w, dim, eps);
        (h, y, rstd)
    }
    /// Returns `dx`; accumulates `dw`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        dim: usize,
        dw: &mut Self::Buf,
    ) -> Self::Buf;

    /// Rotates `[tokens, heads, head_dim]` by each token's position (`inverse` for the backward).
    fn rope(
        &self,
        x: &Self::Buf,
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    ) -> Self::Buf;

    /// Returns `(out, lse)`.
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        cu_seqlens: &[u32],
        shape: AttnShape,
    ) -> (Self::Buf, Self::Buf);
    /// Returns `(dq, dk, dv)`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        cu_seqlens: &[u32],
        shape: AttnShape,
    ) -> (Self::Buf, Self::Buf, Self::Buf);

    /// Inference with a KV cache: `n` new queries (`[n, heads, head_dim]`) against all `t ≥ n`
    /// cached keys/values of one sequence, the queries being its last `n` positions. The default
    /// goes through the host and the `ops` reference (correct everywhere; a device may override it).
    fn attention_decode(&self, q: &Self::Buf, k: &Self::Buf, v: &Self::Buf, shape: AttnShape) -> Self::Buf {
        let (qh, kh, vh) = (self.download(q), self.download(k), self.download(v));
        let mut out = vec![0.0; qh.len()];
        llama_cpt_ops::attention::attention_decode(&mut out, &qh, &kh, &vh, shape);
        self.upload(&out)
    }

    /// `[a; b]`: `b`'s values after `a`'s (appending to a KV cache).
    fn concat(&self, a: &Self::Buf, b: &Self::Buf) -> Self::Buf {
        let mut h = self.download(a);
        h.extend(self.download(b));
        self.upload(&h)
    }

    /// Elements `[start, start + len)` of `buf` as a new buffer.
    fn slice(&self, buf: &Self::Buf, start: usize, len: usize) -> Self::Buf {
        self.upload(&self.download(buf)[start..start + len])
    }

    /// Overwrites elements `[start, start + len(src))` of `dst` with `src`.
    fn write_slice(&self, dst: &mut Self::Buf, start: usize, src: &Self::Buf) {
        let mut h = self.download(dst);
        let s = self.download(src);
        h[start..start + s.len()].copy_from_slice(&s);
        *dst = self.upload(&h);
    }

    /// A new f32 buffer of `len` elements holding each `(offset, part)` at its offset (parts do
    /// not overlap) and zeros elsewhere: a flat gradient bucket, a shard of masters. The default
    /// fills zeros first; a device sets only the gaps.
    fn assemble(&self, len: usize, parts: &[(usize, &Self::Buf)]) -> Self::Buf {
        let mut out = self.zeros(len);
        for &(offset, part) in parts {
            self.write_slice(&mut out, offset, part);
        }
        out
    }

    fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf) -> Self::Buf;
    /// Returns `(dgate, dup)`.
    fn swiglu_backward(&self, dout: &Self::Buf, gate: &Self::Buf, up: &Self::Buf) -> (Self::Buf, Self::Buf);

    /// Mean cross-entropy over targets that are not `IGNORE_INDEX` (0 when there are none), and
    /// each row's log-sum-exp.
    #[track_caller] // a host sync on a device: counted where the model or optimizer asked
    fn cross_entropy(&self, logits: &Self::Buf, targets: &[i32], vocab: usize) -> (f64, Self::Buf);
    fn cross_entropy_backward(
        &self,
        logits: &Self::Buf,
        lse: &Self::Buf,
        targets: &[i32],
        vocab: usize,
        dloss: f64,
    ) -> Self::Buf;
    /// The mean loss and, at once, the gradient of the logits for an upstream gradient `dloss`
    /// (the training path, where the loss scale is known before the backward). The default runs
    /// the two methods above; a backend may fuse them (the CPU computes each exponential once).
    #[track_caller]
    fn cross_entropy_with_grad(
        &self,
        logits: &Self::Buf,
        targets: &[i32],
        vocab: usize,
        dloss: f64,
    ) -> (f64, Self::Buf) {
        let (loss, lse) = self.cross_entropy(logits, targets, vocab);
        (loss, self.cross_entropy_backward(logits, &lse, targets, vocab, dloss))
    }

    /// [`Backend::cross_entropy_with_grad`] whose loss may stay on the device until
    /// [`Backend::losses_and_sum_squares`] reads it with the step's other scalars (the training
    /// path: no host sync per micro-step). The default reads it now.
    #[track_caller]
    fn cross_entropy_with_grad_deferred(
        &self,
        logits: &Self::Buf,
        targets: &[i32],
        vocab: usize,
        dloss: f64,
    ) -> (StepLoss<Self::Buf>, Self::Buf) {
        let (loss, dlogits) = self.cross_entropy_with_grad(logits, targets, vocab, dloss);
        (StepLoss::Host(loss), dlogits)
    }
    /// The mean of each of `losses`, and Σ x² over `xs` as [`Backend::sum_squares_all`] gives it:
    /// on a device, everything in one download (one host sync per optimizer step).
    #[track_caller]
    fn losses_and_sum_squares(&self, losses: &[StepLoss<Self::Buf>], xs: &[&Self::Buf]) -> (Vec<f64>, f64) {
        let means = losses
            .iter()
            .map(|l| match l {
                StepLoss::Host(mean) => *mean,
                StepLoss::Rows { rows, valid } => mean_of_row_losses(&self.download(rows), *valid),
            })
            .collect();
        (means, self.sum_squares_all(xs))
    }

    /// Σ x² in f64.
    #[track_caller] // a host sync on a device: counted where the model or optimizer asked
    fn sum_squares(&self, x: &Self::Buf) -> f64;
    /// Σ x² over all of `xs`, each buffer's sum in f64 added in order (the same value as summing
    /// [`Backend::sum_squares`] of each): the gradient norm in one host sync on a device, however
    /// many tensors.
    #[track_caller]
    fn sum_squares_all(&self, xs: &[&Self::Buf]) -> f64 {
        xs.iter().map(|x| self.sum_squares(x)).sum()
    }
    /// One AdamW update of the f32 `param` (a master, or the parameter itself in f32 training) from
    /// `grad · grad_scale`; `step` counts from 1. With `working`, the updated values are also
    /// written there in the working precision (the bf16 parameter of an fp32 master), in the
    /// same pass.
    #[allow(clippy::too_many_arguments)]
    fn adamw_step(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        cfg: &AdamWConfig,
        lr: f64,
        step: u64,
        decay: bool,
        grad_scale: f32,
        working: Option<&mut Self::Buf>,
    );
    /// [`Backend::adamw_step`] over many tensors at once (one launch on a device, instead of one
    /// per tensor). The default updates them one by one.
    fn adamw_steps(
        &self,
        tensors: &mut [AdamWTensor<'_, Self::Buf>],
        cfg: &AdamWConfig,
        lr: f64,
        step: u64,
        grad_scale: f32,
    ) {
        for t in tensors.iter_mut() {
            self.adamw_step(t.param, t.grad, t.m, t.v, cfg, lr, step, t.decay, grad_scale, t.working.as_deref_mut());
        }
    }
}
