//! The continual pre-training loop: stages run back to back, each with its own data, schedule and
//! frozen set; gradient accumulation to a global batch; AdamW with clipping; non-finite steps
//! skipped; resumable checkpoints; metrics as JSONL, TensorBoard events, a loss plot
//! (`loss.png`) and a progress bar.
pub mod checkpoint;
pub mod config;
pub mod default_run;
pub mod dry_run;
mod observe;
pub mod plot;
pub mod schedule;
mod setup;
pub mod spikes;
pub mod tensorboard;
mod trainer;

use crate::backend::Backend;
use anyhow::Result;
use config::TrainConfig;
use llama_cpt_parallel::{Communicator, SingleProcess};
use std::sync::atomic::AtomicBool;
use trainer::Trainer;

pub use setup::flops_per_token;
pub use trainer::Outcome;

/// Runs (or resumes) every stage of `cfg` in this one process. `interrupt` is polled after each
/// step: when set, a checkpoint is written and the run returns with `interrupted`.
pub fn run<B: Backend>(backend: &B, cfg: &TrainConfig, interrupt: &AtomicBool) -> Result<Outcome> {
    run_parallel(backend, &SingleProcess::default(), cfg, interrupt)
}

/// [`run`] as one rank of a data-parallel group: every rank calls it with the same config; rank 0
/// logs, shows progress and writes the model files; every rank writes its optimizer shard.
pub fn run_parallel<B: Backend>(
    backend: &B,
    comm: &dyn Communicator<B::Buf>,
    cfg: &TrainConfig,
    interrupt: &AtomicBool,
) -> Result<Outcome> {
    let mut trainer = Trainer::start(backend, comm, cfg, interrupt)?;
    while trainer.state.stage < cfg.stages.len() {
        if let Some(stopped) = trainer.run_stage()? {
            return Ok(stopped);
        }
        if let Some(stopped) = trainer.finish_stage()? {
            return Ok(stopped);
        }
    }
    trainer.finished()
}
