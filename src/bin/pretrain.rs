//! `pretrain`: continual pre-training of a LLaMA-family model through the stages of a TOML config.
//! With no `--config` it runs the embedded default (a tiny model on a generated corpus, about a
//! minute on two CPU cores). A run finds its newest complete checkpoint in the output folder and
//! resumes from it; Ctrl-C / SIGTERM write a checkpoint and exit.
//!
//! Launched by `mpirun`/`srun` (or with torchrun-style `RANK`/`WORLD_SIZE`), every process is one
//! data-parallel rank: rank 0 logs and writes the model, every rank writes its optimizer shard.
#![warn(clippy::too_many_lines)] // no function over 80 code lines (clippy.toml)
use anyhow::{Context, Result};
use clap::Parser;
use llama_cpt::backend::Backend;
use llama_cpt::device::{on_device_index, OnBackend, Precision};
use llama_cpt::train::{self, config::TrainConfig, default_run};
use llama_cpt_parallel::launch::Launch;
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
    /// `f32`, or `bf16`: mixed precision (bf16 parameters and activations, fp32 master weights,
    /// moments and gradients; emulated on the CPU). Default: bf16 on `cuda` (tensor-core GEMMs,
    /// as every GPU trainer), f32 on the CPU.
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// Count what each optimizer step asks of the device (kernel launches, GEMMs by shape, copies
    /// and memsets, host syncs by call site, the allocator's peak) and print it per step at the
    /// end (CUDA backend; also on the emulated device).
    #[arg(long)]
    profile: bool,
    /// Measure instead of train: a few optimizer steps of every stage at the config's real shapes
    /// (model, micro-batch, accumulation, checkpointing, ZeRO stage, precision) on synthetic
    /// batches and uninitialised weights; prints each stage's peak memory on this rank by what
    /// holds it, beside `zero-plan`'s figure, with the step's launches and collectives. Writes
    /// nothing. For 7B–70B on a machine without a GPU: `LLAMA_CPT_EMU_MODE=shapes` on the
    /// emulated device, with `--world`.
    #[arg(long)]
    dry_run: bool,
    /// Optimizer steps per stage of `--dry-run` (the second and later are the steady state).
    #[arg(long, default_value_t = 3, requires = "dry_run")]
    dry_run_steps: usize,
    /// `--dry-run` as rank 0 of N ranks that are never started (a virtual world: the emulated
    /// device's shapes mode only; no launcher, no rendezvous).
    #[arg(long, requires = "dry_run")]
    world: Option<usize>,
    /// The card `--dry-run`'s plan column is computed for: a800, a100 or h100.
    #[arg(long, default_value = "h100", requires = "dry_run")]
    plan_card: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
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
    let launch = match args.world {
        Some(0) => anyhow::bail!("--world 0: a world has at least one rank"),
        Some(n) => Launch::virtual_world(n),
        None => Launch::from_env()?,
    };
    if launch.world_size > 1 && launch.launcher != llama_cpt_parallel::launch::VIRTUAL_WORLD {
        // One line per rank, as torchrun prints: which process landed where (the GPU is the local rank).
        // One write, so that the ranks' lines do not interleave on the launcher's shared stderr.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let line = format!(
            "rank {} of {}: local rank {} on {} ({} launch)\n",
            launch.rank,
            launch.world_size,
            launch.local_rank,
            host.trim(),
            launch.launcher
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    }
    let outcome = on_device_index(
        &args.device,
        launch.local_rank,
        args.precision.unwrap_or(Precision::default_for(&args.device)),
        Train { args: &args, launch: &launch, interrupt: &interrupt },
    )?;
    if launch.rank != 0 || args.dry_run {
        return Ok(());
    }
    match (&outcome.final_model, outcome.interrupted) {
        (_, true) => eprintln!("interrupted at step {}; run the same command to resume", outcome.global_step),
        (Some(dir), false) => match outcome.last_loss {
            Some(l) => {
                eprintln!("done after {} steps (last loss {l:.4}); final model: {}", outcome.global_step, dir.display())
            }
            None => eprintln!("done after {} steps; final model: {}", outcome.global_step, dir.display()),
        },
        (None, false) => eprintln!("done after {} steps", outcome.global_step),
    }
    Ok(())
}

struct Train<'a> {
    args: &'a Args,
    launch: &'a Launch,
    interrupt: &'a AtomicBool,
}

impl OnBackend for Train<'_> {
    type Output = train::Outcome;
    fn run<B: Backend>(self, backend: &B) -> Result<train::Outcome> {
        let args = self.args;
        let mut overrides = args.overrides.clone();
        if let Some(out) = &args.out {
            // `--out` is relative to the working directory, not to the config's folder.
            let out = std::path::absolute(out).with_context(|| format!("--out {}", out.display()))?;
            overrides.push(format!("run.out_dir={}", toml::Value::String(out.display().to_string())));
        }
        // The config's own timeout is not known yet: the communicator is needed to read it
        // consistently (rank 0 writes the embedded default's data). Take it from the overrides.
        let timeout =
            overrides.iter().rev().find_map(|o| o.strip_prefix("parallel.timeout_s=")?.parse().ok()).unwrap_or(600);
        let comm = backend.communicator(self.launch, std::time::Duration::from_secs(timeout))?;
        let leader = comm.rank() == 0;
        let cfg = match &args.config {
            Some(path) => TrainConfig::from_file(path, &overrides)?,
            None => {
                let out = args.out.clone().unwrap_or_else(default_run::default_out_dir);
                if leader {
                    eprintln!(
                        "no --config: running the embedded default (tiny LLaMA, generated corpus) into {}",
                        out.display()
                    );
                    default_run::prepare(&out, &overrides)?;
                }
                // The other ranks read what rank 0 generated.
                comm.barrier()?;
                default_run::load_prepared(&out, &overrides)?
            }
        };
        if args.resume && train::checkpoint::complete_checkpoints(&cfg.run.out_dir)?.is_empty() {
            anyhow::bail!(
                "--resume: no complete checkpoint in {}",
                train::checkpoint::checkpoints_dir(&cfg.run.out_dir).display()
            );
        }
        if args.dry_run {
            return dry_run(backend, comm.as_ref(), &cfg, args);
        }
        backend.set_profiling(args.profile);
        let outcome = train::run_parallel(backend, comm.as_ref(), &cfg, self.interrupt)?;
        if args.profile && leader {
            match backend.profile_report() {
                Some(report) => eprintln!("profile of rank 0 ({}):\n{report}", backend.name()),
                None => eprintln!("--profile: the {} backend counts nothing (use --device cuda)", backend.name()),
            }
        }
        Ok(outcome)
    }
}

/// `--dry-run`: measures, prints (rank 0) and returns an empty outcome.
fn dry_run<B: Backend>(
    backend: &B,
    comm: &dyn llama_cpt_parallel::Communicator<B::Buf>,
    cfg: &train::config::TrainConfig,
    args: &Args,
) -> Result<train::Outcome> {
    let card = llama_cpt_parallel::plan::Card::preset(&args.plan_card).with_context(|| {
        format!("--plan-card {:?}: expected one of {:?}", args.plan_card, llama_cpt_parallel::plan::Card::PRESETS)
    })?;
    if comm.rank() == 0 {
        eprintln!(
            "dry run: {} step(s) per stage as rank 0 of {} ({}), on {}",
            args.dry_run_steps,
            comm.world_size(),
            comm.name(),
            backend.name()
        );
    }
    backend.set_profiling(true);
    let started = std::time::Instant::now();
    let measures = train::dry_run::dry_run(backend, comm, cfg, args.dry_run_steps.max(1), card)?;
    if comm.rank() == 0 {
        println!("{}", train::dry_run::report(&measures, backend.peak_flops()));
        match backend.profile_report() {
            Some(r) => println!("\nwhat the steps asked of the device (all stages together):\n{r}"),
            None => println!("\n(the {} backend counts no launches or memory; use --device cuda)", backend.name()),
        }
        eprintln!("dry run took {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(train::Outcome::default())
}
