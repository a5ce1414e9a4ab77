//! The LLaMA decoder (transformers' `LlamaForCausalLM`), on any [`Backend`].
use crate::autograd::{Graph, Var};
use crate::backend::{AttnShape, Backend, ForwardShape, StepLoss};
use crate::batch::Batch;
use crate::config::LlamaConfig;
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::{Arc, Mutex};

/// One parameter tensor, named as transformers names it.
pub struct Param<B: Backend> {
    pub name: String,
    pub value: Tensor<B>,
    /// Whether weight decay applies (matrices yes, norm weights no).
    pub decay: bool,
}

/// Parameters in a fixed order: the embedding, then nine per layer ([`LAYER_PARAMS`]), the final
/// norm and, when untied, the output head.
pub struct Llama<B: Backend> {
    pub config: LlamaConfig,
    pub params: Vec<Param<B>>,
}

/// The per-layer parameters, in the order they are stored.
pub const LAYER_PARAMS: [&str; 9] = [
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Name and shape of every parameter of a model with this config, in storage order.
pub fn param_specs(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let mut specs = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..c.num_hidden_layers {
        let shapes =
            [vec![h], vec![q, h], vec![kv, h], vec![kv, h], vec![h, q], vec![h], vec![f, h], vec![f, h], vec![h, f]];
        for (name, shape) in LAYER_PARAMS.iter().zip(shapes) {
            specs.push((format!("model.layers.{l}.{name}.weight"), shape));
        }
    }
    specs.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        specs.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    specs
}

/// How attention sees other tokens.
enum AttnMode<B: Backend> {
    /// Causal inside each document of a packed batch (training, scoring).
    Varlen(Arc<Vec<u32>>),
    /// New tokens of one sequence against its KV cache (generation).
    Cached(Arc<Mutex<KvCache<B>>>),
}

impl<B: Backend> Clone for AttnMode<B> {
    fn clone(&self) -> Self {
        match self {
            AttnMode::Varlen(c) => AttnMode::Varlen(c.clone()),
            AttnMode::Cached(c) => AttnMode::Cached(c.clone()),
        }
    }
}

/// What a decoder layer needs besides its parameters; cheap to clone into a checkpoint closure.
struct LayerCtx<B: Backend> {
    eps: f64,
    theta: f64,
    shape: AttnShape,
    positions: Arc<Vec<u32>>,
    attn: AttnMode<B>,
}

impl<B: Backend> Clone for LayerCtx<B> {
    fn clone(&self) -> Self {
        LayerCtx {
            eps: self.eps,
            theta: self.theta,
            shape: self.shape,
            positions: self.positions.clone(),
            attn: self.attn.clone(),
        }
    }
}

/// Keys and values of every layer for the tokens of one sequence seen so far.
pub struct KvCache<B: Backend> {
    k: Vec<Option<B::Buf>>,
    v: Vec<Option<B::Buf>>,
    /// Tokens cached.
    pub len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(layers: usize) -> Self {
        KvCache { k: vec![None; layers], v: vec![None; layers], len: 0 }
    }
}

/// One decoder layer: `x + attn(norm(x))`, then `h + mlp(norm(h))`. `p` in [`LAYER_PARAMS`] order.
fn decoder_layer<B: Backend>(g: &Graph<B>, x: &Var<B>, p: &[Var<B>], c: &LayerCtx<B>, layer: usize) -> Var<B> {
    let AttnShape { heads, kv_heads, head_dim } = c.shape;
    let n = g.rmsnorm(x, &p[0], c.eps);
    let q = g.rope(&g.linear(&n, &p[1]), c.positions.clone(), heads, head_dim, c.theta);
    let k = g.rope(&g.linear(&n, &p[2]), c.positions.clone(), kv_heads, head_dim, c.theta);
    let v = g.linear(&n, &p[3]);
    let a = match &c.attn {
        AttnMode::Varlen(cu) => g.attention(&q, &k, &v, cu.clone(), c.shape),
        AttnMode::Cached(cache) => {
            let mut cache = cache.lock().expect("KV cache lock");
            let (ks, vs) = (cache.k[layer].take(), cache.v[layer].take());
            let (kb, vb) = (&k.value.buf, &v.value.buf);
            let be = g.backend();
            let kk = ks.map_or_else(|| (**kb).clone(), |old| be.concat(&old, kb));
            let vv = vs.map_or_else(|| (**vb).clone(), |old| be.concat(&old, vb));
            let out = g.attention_decode(&q, &kk, &vv, c.shape);
            cache.k[layer] = Some(kk);
            cache.v[layer] = Some(vv);
            out
        }
    };
    let (h, n2) = g.add_rmsnorm(x, &g.linear(&a, &p[4]), &p[5], c.eps);
    let s = g.swiglu(&g.linear(&n2, &p[6]), &g.linear(&n2, &p[7]));
    g.add(&h, &g.linear(&s, &p[8]))
}

/// Options of one forward/backward.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepOptions {
    /// Recompute each decoder layer in the backward instead of keeping its activations.
    pub checkpoint_layers: bool,
}

impl<B: Backend> Llama<B> {
    /// Builds a model from host tensors in [`param_specs`] order.
    pub fn from_host(backend: &B, config: LlamaConfig, tensors: Vec<Vec<f32>>) -> Result<Self> {
        let _scope = crate::backend::memory_scope(backend, crate::backend::MemoryUse::Parameters);
        let specs = param_specs(&config);
        if tensors.len() != specs.len() {
            bail!("expected {} parameter tensors, got {}", specs.len(), tensors.len());
        }
        let mut params = Vec::with_capacity(specs.len());
        for ((name, shape), data) in specs.into_iter().zip(tensors) {
            if data.len() != shape.iter().product::<usize>() {
                bail!("tensor `{name}`: {} values for shape {shape:?}", data.len());
            }
            let decay = shape.len() == 2;
            params.push(Param { name, value: Tensor::from_host(backend, &data, &shape), decay });
        }
        Ok(Llama { config, params })
    }

    /// Parameters of `config`'s shapes whose values are whatever the backend's zero-fill gives,
    /// made on the device with no host copy: for a dry run that measures a step's memory
    /// (`pretrain --dry-run`), where a 70B model's values cannot be made on the host.
    pub fn uninitialised(backend: &B, config: LlamaConfig) -> Self {
        let _scope = crate::backend::memory_scope(backend, crate::backend::MemoryUse::Parameters);
        let params = param_specs(&config)
            .into_iter()
            .map(|(name, shape)| Param { decay: shape.len() == 2, value: Tensor::zeros(backend, &shape), name })
            .collect();
        Llama { config, params }
    }

    /// Random initialisation as transformers does it: weights ~ N(0, 0.02²), norm weights 1.
    pub fn random(backend: &B, config: LlamaConfig, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let tensors = param_specs(&config)
            .iter()
            .map(|(_, shape)| {
                let n = shape.iter().product();
                if shape.len() == 1 {
                    vec![1.0; n]
                } else {
                    (0..n).map(|_| normal(&mut rng) * 0.02).collect()
                }
            })
            .collect();
        Self::from_host(backend, config, tensors).expect("shapes come from the config")
    }

    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.value.numel()).sum()
    }

    /// The sizes a forward over `tokens` tokens hands to the backend's ops.
    fn forward_shape(&self, tokens: usize) -> ForwardShape {
        let c = &self.config;
        ForwardShape {
            tokens,
            hidden: c.hidden_size,
            ffn: c.intermediate_size,
            vocab: c.vocab_size,
            attn: AttnShape { heads: c.num_attention_heads, kv_heads: c.num_key_value_heads, head_dim: c.head_dim },
        }
    }

    /// Whether `backend` can run a forward of `tokens` tokens through this model (the op and the
    /// limit when it cannot).
    pub fn check_forward(&self, backend: &B, tokens: usize) -> Result<()> {
        backend.check_forward_shape(&self.forward_shape(tokens))
    }

    fn check_batch(&self, backend: &B, batch: &Batch) -> Result<()> {
        let t = batch.rows * batch.seq_len;
        self.check_forward(backend, t)?;
        if batch.tokens.len() != t || batch.targets.len() != t || batch.positions.len() != t {
            bail!("batch: tokens, targets and positions must each hold rows×seq_len = {t} values");
        }
        let v = self.config.vocab_size;
        if let Some(&id) = batch.tokens.iter().find(|&&id| id as usize >= v) {
            bail!("batch: token id {id} is outside the model's vocabulary ({v})");
        }
        if let Some(&id) =
            batch.targets.iter().find(|&&id| id != llama_cpt_ops::IGNORE_INDEX && (id < 0 || id as usize >= v))
        {
            bail!("batch: target {id} is neither a token id below {v} nor the ignore index");
        }
        let cu = &batch.cu_seqlens;
        if cu.first() != Some(&0) || cu.last() != Some(&(t as u32)) || cu.windows(2).any(|w| w[0] > w[1]) {
            bail!("batch: cu_seqlens must rise from 0 to {t}");
        }
        Ok(())
    }

    fn layer_ctx(&self, positions: Vec<u32>, attn: AttnMode<B>) -> LayerCtx<B> {
        let c = &self.config;
        LayerCtx {
            eps: c.rms_norm_eps,
            theta: c.rope_theta,
            shape: self.forward_shape(0).attn,
            positions: Arc::new(positions),
            attn,
        }
    }

    /// Embedding and decoder layers: the hidden states before the final norm.
    fn trunk(&self, g: &Graph<B>, vars: &[Var<B>], tokens: &[u32], ctx: &LayerCtx<B>, opts: StepOptions) -> Var<B> {
        let mut x = g.embedding(&vars[0], Arc::new(tokens.to_vec()));
        for l in 0..self.config.num_hidden_layers {
            let p = &vars[1 + 9 * l..10 + 9 * l];
            x = if opts.checkpoint_layers {
                let inputs: Vec<&Var<B>> = std::iter::once(&x).chain(p).collect();
                let ctx = ctx.clone();
                g.checkpoint(&inputs, move |g, v| decoder_layer(g, &v[0], &v[1..], &ctx, l))
            } else {
                decoder_layer(g, &x, p, ctx, l)
            };
        }
        x
    }

    /// Final norm and LM head: logits of the rows of `h`.
    fn head(&self, g: &Graph<B>, vars: &[Var<B>], h: &Var<B>) -> Var<B> {
        let c = &self.config;
        let norm = &vars[1 + 9 * c.num_hidden_layers];
        let head = if c.tie_word_embeddings { &vars[0] } else { &vars[2 + 9 * c.num_hidden_layers] };
        g.linear(&g.rmsnorm(h, norm, c.rms_norm_eps), head)
    }

    /// Records the forward on `g`; returns the parameter variables and the logits `[tokens, vocab]`.
    pub fn forward(&self, g: &Graph<B>, batch: &Batch, opts: StepOptions) -> Result<(Vec<Var<B>>, Var<B>)> {
        self.check_batch(g.backend(), batch)?;
        let vars: Vec<Var<B>> = self.params.iter().map(|p| g.leaf(p.value.clone())).collect();
        let ctx = self.layer_ctx(batch.positions.clone(), AttnMode::Varlen(Arc::new(batch.cu_seqlens.clone())));
        let h = self.trunk(g, &vars, &batch.tokens, &ctx, opts);
        let logits = self.head(g, &vars, &h);
        Ok((vars, logits))
    }

    /// Logits `[rows.len(), vocab]` at the given token indices of the batch only (scoring: the
    /// LM head runs on those rows alone).
    pub fn logits_at(&self, backend: &B, batch: &Batch, rows: &[usize]) -> Result<Vec<f32>> {
        self.check_batch(backend, batch)?;
        let g = Graph::inference(backend);
        let vars: Vec<Var<B>> = self.params.iter().map(|p| g.leaf(p.value.clone())).collect();
        let ctx = self.layer_ctx(batch.positions.clone(), AttnMode::Varlen(Arc::new(batch.cu_seqlens.clone())));
        let h = self.trunk(&g, &vars, &batch.tokens, &ctx, StepOptions::default());
        let logits = self.head(&g, &vars, &select_rows(&g, &h, rows)?);
        Ok(logits.value.to_host(backend))
    }

    /// Feeds `tokens` (the next ones of a sequence) through the model with a KV cache and returns
    /// the logits after the last of them (`[vocab]`).
    pub fn forward_cached(&self, backend: &B, tokens: &[u32], cache: &mut KvCache<B>) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            bail!("forward_cached: no tokens");
        }
        let v = self.config.vocab_size;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= v) {
            bail!("token id {id} is outside the model's vocabulary ({v})");
        }
        let start = cache.len;
        self.check_forward(backend, start + tokens.len())?;
        let shared = Arc::new(Mutex::new(std::mem::replace(cache, KvCache::new(0))));
        let g = Graph::inference(backend);
        let vars: Vec<Var<B>> = self.params.iter().map(|p| g.leaf(p.value.clone())).collect();
        let positions = (start..start + tokens.len()).map(|p| p as u32).collect();
        let ctx = self.layer_ctx(positions, AttnMode::Cached(shared.clone()));
        let h = self.trunk(&g, &vars, tokens, &ctx, StepOptions::default());
        let logits = self.head(&g, &vars, &select_rows(&g, &h, &[tokens.len() - 1])?);
        drop(ctx);
        *cache =
            Arc::try_unwrap(shared).ok().expect("the cache is no longer shared").into_inner().expect("KV cache lock");
        cache.len = start + tokens.len();
        Ok(logits.value.to_host(backend))
    }

    /// Logits `[tokens, vocab]` without recording a tape.
    pub fn logits(&self, backend: &B, batch: &Batch) -> Result<Vec<f32>> {
        let g = Graph::inference(backend);
        let (_, logits) = self.forward(&g, batch, StepOptions::default())?;
        Ok(logits.value.to_host(backend))
    }

    /// Mean loss of the batch and the gradient of `loss_scale · loss` for every parameter (in
    /// [`Llama::params`] order). `loss_scale` weights micro-batches in gradient accumulation.
    pub fn loss_and_grads(
        &self,
        backend: &B,
        batch: &Batch,
        loss_scale: f64,
        opts: StepOptions,
    ) -> Result<(f64, Vec<B::Buf>)> {
        let mut grads: Vec<Option<B::Buf>> = vec![None; self.params.len()];
        let loss = self.loss_and_streamed_grads(backend, batch, loss_scale, opts, &mut |i, g| grads[i] = Some(g))?;
        let loss = backend.losses_and_sum_squares(&[loss], &[]).0[0];
        Ok((loss, grads.into_iter().map(|g| g.expect("every parameter's gradient is handed over")).collect()))
    }

    /// Like [`Llama::loss_and_grads`], but hands each parameter's gradient (by index) to `ready`
    /// as soon as the backward has finished it: the last layers' first, so data parallelism can
    /// reduce them while the earlier layers are still being differentiated. The loss may still be
    /// on the device: [`Backend::losses_and_sum_squares`] reads it.
    pub fn loss_and_streamed_grads(
        &self,
        backend: &B,
        batch: &Batch,
        loss_scale: f64,
        opts: StepOptions,
        ready: &mut dyn FnMut(usize, B::Buf),
    ) -> Result<StepLoss<B::Buf>> {
        let g = Graph::new(backend);
        let (vars, logits) = self.forward(&g, batch, opts)?;
        let (loss_var, loss) = g.cross_entropy_seeded(&logits, &batch.targets, loss_scale);
        drop(logits);
        let watch: Vec<&Var<B>> = vars.iter().collect();
        g.backward_streaming_from_scalar(&loss_var, loss_scale, &watch, ready);
        Ok(loss)
    }

    /// Mean loss without gradients.
    pub fn loss(&self, backend: &B, batch: &Batch) -> Result<f64> {
        let g = Graph::inference(backend);
        let (_, logits) = self.forward(&g, batch, StepOptions::default())?;
        Ok(g.cross_entropy(&logits, Arc::new(batch.targets.clone())).1)
    }
}

/// The rows `rows` of `x` as a new (untracked) variable, through the host.
fn select_rows<B: Backend>(g: &Graph<B>, x: &Var<B>, rows: &[usize]) -> Result<Var<B>> {
    let cols = x.value.cols();
    let host = x.value.to_host(g.backend());
    let mut out = Vec::with_capacity(rows.len() * cols);
    for &r in rows {
        if r >= x.value.rows() {
            bail!("row {r} is outside the {} tokens", x.value.rows());
        }
        out.extend_from_slice(&host[r * cols..(r + 1) * cols]);
    }
    Ok(g.leaf(Tensor::from_host(g.backend(), &out, &[rows.len(), cols])))
}

/// A standard normal sample (Box–Muller), so initialisation needs no extra crate.
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Cpu;

    /// A tiny model with weights ~N(0, 0.3²) so that attention is far from uniform and every
    /// gradient is well above f32 round-off.
    fn tiny(tie: bool) -> Llama<Cpu> {
        let mut m = Llama::random(&Cpu, LlamaConfig::small(50, 24, 40, 2, 4, 2, tie), 7);
        for p in m.params.iter_mut().filter(|p| p.decay) {
            p.value.buf_mut().iter_mut().for_each(|x| *x *= 15.0);
        }
        m
    }

    fn batch() -> Batch {
        let tokens: Vec<u32> = (0..2 * 9).map(|i| (i * 7 % 50) as u32).collect();
        let mut labels: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        labels[4] = -100;
        let mut b = Batch::from_rows(2, 9, tokens, &labels);
        // Two documents in the second row.
        b.cu_seqlens = vec![0, 9, 13, 18];
        for i in 13..18 {
            b.positions[i] = (i - 13) as u32;
        }
        b.targets[12] = -100;
        b
    }

    #[test]
    fn checkpointed_layers_give_bit_identical_gradients() {
        for tie in [false, true] {
            let m = tiny(tie);
            let (l1, g1) = m.loss_and_grads(&Cpu, &batch(), 1.0, StepOptions { checkpoint_layers: false }).unwrap();
            let (l2, g2) = m.loss_and_grads(&Cpu, &batch(), 1.0, StepOptions { checkpoint_layers: true }).unwrap();
            assert_eq!(l1.to_bits(), l2.to_bits());
            for (p, (a, b)) in m.params.iter().zip(g1.iter().zip(&g2)) {
                assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{} differs", p.name);
                assert!(a.iter().any(|&x| x != 0.0), "{} has no gradient", p.name);
            }
        }
    }

    #[test]
    #[allow(clippy::needless_range_loop)] // pi indexes the parameters and their gradients alike
    fn whole_model_gradient_matches_finite_differences() {
        // Directional derivative of the f32 loss along a random direction of each tensor, by
        // central differences: a coarse end-to-end check that the tape wires every backward.
        let m = tiny(false);
        let b = batch();
        let (_, grads) = m.loss_and_grads(&Cpu, &b, 1.0, StepOptions::default()).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        for pi in 0..m.params.len() {
            let n = m.params[pi].value.numel();
            let dir: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let rms = (m.params[pi].value.buf.iter().map(|x| x * x).sum::<f32>() / n as f32).sqrt();
            let h = 1e-2 * rms;
            let eval = |sign: f32| {
                let mut mm = tiny(false);
                mm.params[pi].value.buf_mut().iter_mut().zip(&dir).for_each(|(p, d)| *p += sign * h * d);
                mm.loss(&Cpu, &b).unwrap()
            };
            let numeric = (eval(1.0) - eval(-1.0)) / (2.0 * h as f64);
            let analytic: f64 = grads[pi].iter().zip(&dir).map(|(g, d)| (*g as f64) * (*d as f64)).sum();
            assert!(
                (numeric - analytic).abs() <= 1e-2 * analytic.abs().max(1e-3),
                "{}: numeric {numeric} analytic {analytic}",
                m.params[pi].name
            );
        }
    }

    #[test]
    fn bad_batches_are_errors() {
        let m = tiny(true);
        let mut b = batch();
        b.tokens[3] = 50;
        assert!(format!("{}", m.loss(&Cpu, &b).unwrap_err()).contains("outside the model's vocabulary"));
        let mut b = batch();
        b.targets[0] = 99;
        assert!(m.loss(&Cpu, &b).is_err());
        let mut b = batch();
        b.cu_seqlens = vec![0, 5];
        assert!(m.loss(&Cpu, &b).is_err());
    }

    #[test]
    fn all_ignored_batch_has_zero_loss_and_gradients() {
        let m = tiny(true);
        let mut b = batch();
        b.targets.iter_mut().for_each(|t| *t = -100);
        let (loss, grads) = m.loss_and_grads(&Cpu, &b, 1.0, StepOptions::default()).unwrap();
        assert_eq!(loss, 0.0);
        assert!(grads.iter().all(|g| g.iter().all(|&x| x == 0.0)));
    }
}
