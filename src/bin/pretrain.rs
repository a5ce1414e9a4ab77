//! `pretrain`: continual pre-training of a LLaMA-family model through the stages of a TOML config.
//! With no `--config` it runs the embedded default (a tiny model on a generated corpus, about a
//! minute on two CPU cores). A run finds its newest complete checkpoint in the output folder and
//! resumes from it; Ctrl-C / SIGTERM write a checkpoint and exit.
use anyhow::Result;
use clap::Parser;
use llama_cpt::backend::Backend;
use llama_cpt::device::{on_device, OnBackend};
use llama_cpt::train::{self, config::TrainConfig, default_run};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(version, about = "Continual pre-training of LLaMA-family models (Colossal-LLaMA-2 recipe)")]
struct Args {
    /// Training config (TOML). Without it, the embedded default runs.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. `--set stages.0.steps=10 --set run.out_dir=/tmp/run`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Output folder (same as `--set run.out_dir=...`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Require a checkpoint to resume from (a run resumes from one anyway when it finds one).
    #[arg(long)]
    resume: bool,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// `cpu`, or `cuda` (GPU 0; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    }
    let mut overrides = args.overrides.clone();
    if let Some(out) = &args.out {
        overrides.push(format!("run.out_dir={}", toml::Value::String(out.display().to_string())));
    }
    let cfg = match &args.config {
        Some(path) => TrainConfig::from_file(path, &overrides)?,
        None => {
            let out = args.out.clone().unwrap_or_else(default_run::default_out_dir);
            eprintln!("no --config: running the embedded default (tiny LLaMA, generated corpus) into {}", out.display());
            default_run::prepare(&out, &overrides)?
        }
    };
    if args.resume && train::checkpoint::complete_checkpoints(&cfg.run.out_dir)?.is_empty() {
        anyhow::bail!("--resume: no complete checkpoint in {}", train::checkpoint::checkpoints_dir(&cfg.run.out_dir).display());
    }
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("interrupt: writing a checkpoint after this step…");
    })?;
    let outcome = on_device(&args.device, Train { cfg: &cfg, interrupt: &interrupt })?;
    match (&outcome.final_model, outcome.interrupted) {
        (_, true) => eprintln!("interrupted at step {}; run the same command to resume", outcome.global_step),
        (Some(dir), false) => match outcome.last_loss {
            Some(l) => eprintln!("done after {} steps (last loss {l:.4}); final model: {}", outcome.global_step, dir.display()),
            None => eprintln!("done after {} steps; final model: {}", outcome.global_step, dir.display()),
        },
        (None, false) => eprintln!("done after {} steps", outcome.global_step),
    }
    Ok(())
}

struct Train<'a> {
    cfg: &'a TrainConfig,
    interrupt: &'a AtomicBool,
}

impl OnBackend for Train<'_> {
    type Output = train::Outcome;
    fn run<B: Backend>(self, backend: &B) -> Result<train::Outcome> {
        train::run(backend, self.cfg, self.interrupt)
    }
}
