//! `pretrain --dry-run`: a few real optimizer steps of a config's shapes — its model, micro-batch,
//! accumulation, checkpointing, ZeRO stage and precision, every stage's trainable set — without
//! its data or its weights, to measure what one rank of the real job holds. The batches are
//! synthetic (the config's shape), the parameters are made on the device uninitialised, nothing
//! is written. On the emulated device's shapes mode (`LLAMA_CPT_EMU_MODE=shapes`) with a virtual
//! world (`--world N`), the 7B–70B jobs of 64 GPUs run on a laptop: device memory is address
//! space only and nothing executes. On a real GPU the same command measures the real peak.
use super::config::TrainConfig;
use super::setup::loader_config;
use super::trainer::{check_batch_split, new_data_parallel};
use crate::backend::{Backend, MemStats, MemoryUse, PROFILE_TRAIN_STEP};
use crate::batch::Batch;
use crate::config::LlamaConfig;
use crate::dist::StepChecks;
use crate::model::{Llama, StepOptions};
use anyhow::{Context, Result};
use llama_cpt_parallel::plan::{self, Card, ModelShape, PlanInput, Precision};
use llama_cpt_parallel::{Communicator, TrafficCount};
use std::fmt::Write;

/// What one stage's steps held and moved on this rank.
#[derive(Clone, Debug)]
pub struct StageMeasure {
    pub name: String,
    /// In use when the stage's steps began (parameters, optimizer state, cached uploads).
    pub before_steps: MemStats,
    /// The counts after its steps: the peaks are those of the steps.
    pub after_steps: MemStats,
    /// Bytes this rank handed to collectives per step (payload: all-reduce, reduce-scatter and
    /// broadcast inputs, all-gather outputs), in all and by kind.
    pub collective_bytes_per_step: u64,
    pub collectives_per_step: TrafficCount,
    /// Model FLOPs of this rank per step (6N + attention per token, recomputation not counted).
    pub flops_per_step: f64,
    /// Steps whose update was applied (all: a dry run updates whatever the loss it reads).
    pub applied: usize,
    pub steps: usize,
    /// The plan's per-rank memory for the same configuration (`zero-plan`'s model).
    pub plan: plan::Memory,
}

/// The model shape a config names: `model.config`, or `model.from`'s `config.json`.
fn model_config(cfg: &TrainConfig) -> Result<LlamaConfig> {
    let path = match (&cfg.model.config, &cfg.model.from) {
        (Some(c), _) => c.clone(),
        (None, Some(dir)) => dir.join("config.json"),
        (None, None) => unreachable!("validated"),
    };
    LlamaConfig::from_file(&path).with_context(|| format!("the dry run's model shape ({})", path.display()))
}

/// A micro-batch of the config's shape: whole rows, every token predicted.
fn synthetic_batch(rows: usize, seq_len: usize, vocab: usize) -> Batch {
    let tokens: Vec<u32> = (0..rows * seq_len).map(|i| ((i * 7919) % vocab) as u32).collect();
    let labels: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    Batch::from_rows(rows, seq_len, tokens, &labels)
}

/// The plan's input for stage `si` of `cfg` at this world size, on `card`.
fn plan_input(cfg: &TrainConfig, c: &LlamaConfig, si: usize, world: usize, mixed: bool, card: Card) -> PlanInput {
    let model = ModelShape {
        name: "dry run".into(),
        hidden: c.hidden_size as u64,
        layers: c.num_hidden_layers as u64,
        heads: c.num_attention_heads as u64,
        kv_heads: c.num_key_value_heads as u64,
        head_dim: c.head_dim as u64,
        ffn: c.intermediate_size as u64,
        vocab: c.vocab_size as u64,
        tied_embeddings: c.tie_word_embeddings,
    };
    let links = card.default_links(8);
    PlanInput {
        model,
        world: world as u64,
        stage: cfg.parallel.stage(),
        micro_batch: cfg.data.micro_batch_rows as u64,
        seq: cfg.data.seq_len as u64,
        global_batch_tokens: (cfg.stages[si].global_batch_rows * cfg.data.seq_len) as u64,
        precision: if mixed { Precision::Bf16 } else { Precision::Fp32 },
        checkpoint_layers: cfg.model.checkpoint_layers,
        card,
        links,
        mfu: 0.45,
        bucket_elems: cfg.parallel.bucket_elems() as u64,
        // The measurement itemises everything it allocates; the plan's unitemised reserve is left out.
        reserve_bytes: 0,
    }
}

/// Runs `steps` optimizer steps of every stage of `cfg` as rank `comm.rank()` of
/// `comm.world_size()`, and measures them. `card` is the card the plan is computed for.
pub fn dry_run<B: Backend>(
    backend: &B,
    comm: &dyn Communicator<B::Buf>,
    cfg: &TrainConfig,
    steps: usize,
    card: Card,
) -> Result<Vec<StageMeasure>> {
    let world = comm.world_size();
    check_batch_split(cfg, world)?;
    let config = model_config(cfg)?;
    let mut model = Llama::uninitialised(backend, config.clone());
    model.check_forward(backend, cfg.data.micro_batch_rows * cfg.data.seq_len)?;
    let opts = StepOptions { checkpoint_layers: cfg.model.checkpoint_layers };
    let mut measures = Vec::new();
    for (si, stage) in cfg.stages.iter().enumerate() {
        backend.profile_range("setup");
        let mut dp = new_data_parallel(backend, comm, cfg, &model, si);
        dp.refresh_params(backend, &mut model.params)?;
        let micro_steps = loader_config(cfg, si, comm.rank(), world).micro_steps();
        let batch = synthetic_batch(cfg.data.micro_batch_rows, cfg.data.seq_len, config.vocab_size);
        let batches = vec![batch; micro_steps];
        let before_steps = backend.memory_stats().unwrap_or_default();
        backend.reset_peak_memory();
        let traffic_before = comm.traffic();
        let mut applied = 0;
        for step in 0..steps {
            backend.profile_range(PROFILE_TRAIN_STEP);
            let clip = (stage.max_grad_norm > 0.0).then_some(stage.max_grad_norm);
            let done = dp
                .step(
                    backend,
                    &mut model,
                    &batches,
                    opts,
                    stage.lr,
                    clip,
                    &StepChecks { always_update: true, ..StepChecks::default() },
                )
                .with_context(|| format!("dry run, stage {:?}, step {}", stage.name, step + 1))?;
            applied += done.applied as usize;
        }
        backend.profile_range("other");
        let after_steps = backend.memory_stats().unwrap_or_default();
        let (now, n) = (comm.traffic(), steps.max(1) as u64);
        let per_step = TrafficCount {
            all_reduce: (now.all_reduce - traffic_before.all_reduce) / n,
            reduce_scatter: (now.reduce_scatter - traffic_before.reduce_scatter) / n,
            all_gather: (now.all_gather - traffic_before.all_gather) / n,
            broadcast: (now.broadcast - traffic_before.broadcast) / n,
            calls: (now.calls - traffic_before.calls) / n,
        };
        let tokens = micro_steps * cfg.data.micro_batch_rows * cfg.data.seq_len;
        let plan_in = plan_input(cfg, &config, si, world, backend.mixed_precision(), card.clone());
        measures.push(StageMeasure {
            name: stage.name.clone(),
            before_steps,
            after_steps,
            applied,
            steps,
            collective_bytes_per_step: per_step.all_reduce
                + per_step.reduce_scatter
                + per_step.all_gather
                + per_step.broadcast,
            collectives_per_step: per_step,
            flops_per_step: super::flops_per_token(&config, cfg.data.seq_len) * tokens as f64,
            plan: plan::memory(&plan_in, plan_in.micro_batch),
        });
        // As the trainer ends a stage: the next stage's masters start from fp32 values.
        dp.params_from_masters(backend, &mut model.params)?;
        drop(dp);
    }
    Ok(measures)
}

const GIB: f64 = (1u64 << 30) as f64;

/// The rows of the peak by holder, measured beside planned.
fn holders_table(s: &mut String, a: &MemStats, p: &plan::Memory) {
    let planned = |u: MemoryUse| match u {
        MemoryUse::Parameters => Some(p.params),
        MemoryUse::Optimizer => Some(p.optimizer),
        MemoryUse::Gradients => Some(p.grads),
        MemoryUse::Communication => Some(p.buckets),
        MemoryUse::Activations => Some(p.activations + p.head),
        MemoryUse::Other => None,
    };
    let gib = |b: u64| format!("{:.2}", b as f64 / GIB);
    let _ = writeln!(s, "| held by | measured at the peak | plan |\n|---|---:|---:|");
    for u in MemoryUse::ALL {
        let plan = planned(u).map_or("—".into(), gib);
        let _ = writeln!(s, "| {} | {} | {plan} |", u.name(), gib(a.peak_by_use[u.index()] as u64));
    }
}

/// The measurement beside the plan, per stage, as a Markdown table; with the step time a
/// compute roofline at `peak_flops` gives.
pub fn report(measures: &[StageMeasure], peak_flops: Option<f64>) -> String {
    let mut s = String::new();
    for m in measures {
        let (a, p) = (&m.after_steps, &m.plan);
        let gib = |b: u64| format!("{:.2}", b as f64 / GIB);
        let _ = writeln!(s, "\nstage {:?}: per GPU (GiB), {} of {} updates applied\n", m.name, m.applied, m.steps);
        holders_table(&mut s, a, p);
        let plan_peak = p.peak.saturating_sub(p.reserve);
        let ratio = a.peak_in_use as f64 / plan_peak.max(1) as f64;
        let _ = writeln!(
            s,
            "| **peak in use** | **{}** | **{}** (measured / plan = {ratio:.3}) |",
            gib(a.peak_in_use as u64),
            gib(plan_peak)
        );
        let _ = writeln!(s, "| reserved from the driver (peak) | {} | |", gib(a.peak_reserved as u64));
        // The plan's default allowance for what no allocation shows: CUDA context, NCCL's own
        // buffers, fragmentation of a real allocator.
        let unitemised = 4u64 << 30;
        let need = a.peak_in_use as u64 + unitemised;
        let verdict = match (need <= p.card, a.peak_reserved as u64 + unitemised <= p.card) {
            (true, true) => "fits",
            (true, false) => "fits, after the allocator gives its cache back once (its release-and-retry)",
            (false, _) => "does NOT fit",
        };
        let _ = writeln!(
            s,
            "\nverdict: {verdict} the plan's card ({} GiB): peak in use + {} GiB not itemised = {} GiB",
            gib(p.card),
            unitemised >> 30,
            gib(need)
        );
        let _ = writeln!(
            s,
            "\nthe peak came while allocating for: {}; before the steps {} GiB in use, {} GiB reserved; retired collective inputs reused in stream order: {}; cuMemAlloc calls: {}",
            a.peak_during.name(),
            gib(m.before_steps.in_use as u64),
            gib(m.before_steps.reserved as u64),
            a.reused_in_stream_order,
            a.driver_allocs
        );
        let _ = write!(
            s,
            "per step: {:.1} TFLOP of model FLOPs on this rank, {:.2} GiB handed to {} collectives (all-reduce {:.2}, reduce-scatter {:.2}, all-gather {:.2}, broadcast {:.2})",
            m.flops_per_step / 1e12,
            m.collective_bytes_per_step as f64 / GIB,
            m.collectives_per_step.calls,
            m.collectives_per_step.all_reduce as f64 / GIB,
            m.collectives_per_step.reduce_scatter as f64 / GIB,
            m.collectives_per_step.all_gather as f64 / GIB,
            m.collectives_per_step.broadcast as f64 / GIB
        );
        match peak_flops {
            Some(peak) => {
                let _ = writeln!(
                    s,
                    "; at the card's peak {:.0} TFLOP/s: {:.2} s (at 45% MFU {:.2} s)",
                    peak / 1e12,
                    m.flops_per_step / peak,
                    m.flops_per_step / peak / 0.45
                );
            }
            None => s.push('\n'),
        }
        let _ = writeln!(
            s,
            "dry-run summary: stage={:?} measured_gib={:.3} plan_gib={:.3} ratio={ratio:.3} reserved_gib={:.3} fits={}",
            m.name,
            a.peak_in_use as f64 / GIB,
            plan_peak as f64 / GIB,
            a.peak_reserved as f64 / GIB,
            need <= p.card
        );
    }
    s
}
