//! How a config becomes the run's pieces: each stage's loader settings for this rank, its dataset
//! list, AdamW settings and trainable set, and the FLOPs a trained token costs.
use super::config::{DatasetRef, StageConfig, TrainConfig};
use crate::backend::{AdamWConfig, Backend};
use crate::config::LlamaConfig;
use crate::data::{LoaderConfig, Ordering, SubsetSpec};
use crate::model::Llama;

/// Training FLOPs per token: 6·N (non-embedding parameters: forward 2N, backward 4N) plus
/// attention's 12·layers·hidden·seq (scores and weighted sum, forward and backward; causal masking
/// not discounted), as in the PaLM/Megatron accounting.
pub fn flops_per_token(c: &LlamaConfig, seq_len: usize) -> f64 {
    6.0 * c.non_embedding_params() as f64 + 12.0 * (c.num_hidden_layers * c.hidden_size * seq_len) as f64
}

pub(super) fn loader_config(cfg: &TrainConfig, stage_index: usize, rank: usize, world_size: usize) -> LoaderConfig {
    let d = &cfg.data;
    LoaderConfig {
        seq_len: d.seq_len,
        global_batch_rows: cfg.stages[stage_index].global_batch_rows,
        micro_batch_rows: d.micro_batch_rows,
        world_size,
        rank,
        // Each stage orders its data with its own seed.
        seed: d.seed.wrapping_add(stage_index as u64),
        ordering: if d.ordering == "shuffle" { Ordering::Shuffle } else { Ordering::Bucket { bins: d.bins } },
        packing: d.packing,
        max_epochs: None,
        ..LoaderConfig::default()
    }
}

pub(super) fn subsets(datasets: &[DatasetRef]) -> Vec<SubsetSpec> {
    datasets.iter().map(|d| SubsetSpec::new(&d.dir, d.weight)).collect()
}

pub(super) fn adamw_config(s: &StageConfig) -> AdamWConfig {
    AdamWConfig { lr: s.lr, beta1: s.beta1, beta2: s.beta2, eps: s.eps, weight_decay: s.weight_decay }
}

/// Which parameters a stage updates.
pub(super) fn trainable<B: Backend>(model: &Llama<B>, stage: &StageConfig) -> Vec<bool> {
    model
        .params
        .iter()
        .map(|p| !stage.freeze_non_embeddings || p.name == "model.embed_tokens.weight" || p.name == "lm_head.weight")
        .collect()
}
