//! The continual pre-training loop: stages run back to back, each with its own data, schedule and
//! frozen set; gradient accumulation to a global batch; AdamW with clipping; non-finite steps
//! skipped; resumable checkpoints; metrics as JSONL, TensorBoard events, a loss plot
//! (`loss.png`) and a progress bar.
pub mod checkpoint;
pub mod config;
pub mod default_run;
pub mod plot;
pub mod schedule;
pub mod tensorboard;

use crate::backend::{AdamWConfig, Backend};
use crate::batch::Batch;
use crate::config::LlamaConfig;
use crate::data::tokenizer::TextTokenizer;
use crate::data::{Loader, LoaderConfig, Ordering, SubsetSpec};
use crate::dist::DataParallel;
use crate::eval;
use crate::model::{Llama, StepOptions};
use crate::weights::StoreDtype;
use anyhow::{bail, Context, Result};
use checkpoint::TrainerState;
use config::{DatasetRef, StageConfig, TrainConfig};
use indicatif::{ProgressBar, ProgressStyle};
use llama_cpt_ops::cross_entropy::count_valid;
use llama_cpt_parallel::{Communicator, SingleProcess, TrafficCount};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::Instant;

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    /// The HF model directory of the last finished stage (None if none finished).
    pub final_model: Option<PathBuf>,
    /// Stopped early by a signal or `run.stop_after_steps` (a checkpoint was written).
    pub interrupted: bool,
    pub global_step: u64,
    pub last_loss: Option<f64>,
}

/// Training FLOPs per token: 6·N (non-embedding parameters: forward 2N, backward 4N) plus
/// attention's 12·layers·hidden·seq (scores and weighted sum, forward and backward; causal masking
/// not discounted), as in the PaLM/Megatron accounting.
pub fn flops_per_token(c: &LlamaConfig, seq_len: usize) -> f64 {
    6.0 * c.non_embedding_params() as f64 + 12.0 * (c.num_hidden_layers * c.hidden_size * seq_len) as f64
}

fn loader_config(cfg: &TrainConfig, stage_index: usize, rank: usize, world_size: usize) -> LoaderConfig {
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

fn subsets(datasets: &[DatasetRef]) -> Vec<SubsetSpec> {
    datasets.iter().map(|d| SubsetSpec::new(&d.dir, d.weight)).collect()
}

fn adamw_config(s: &StageConfig) -> AdamWConfig {
    AdamWConfig { lr: s.lr, beta1: s.beta1, beta2: s.beta2, eps: s.eps, weight_decay: s.weight_decay }
}

/// Which parameters a stage updates.
fn trainable<B: Backend>(model: &Llama<B>, stage: &StageConfig) -> Vec<bool> {
    model
        .params
        .iter()
        .map(|p| !stage.freeze_non_embeddings || p.name == "model.embed_tokens.weight" || p.name == "lm_head.weight")
        .collect()
}

/// Appends JSON lines to `metrics.jsonl` and scalars to TensorBoard event files in `tensorboard/`.
struct Metrics {
    file: std::fs::File,
    events: tensorboard::EventWriter,
}

impl Metrics {
    /// Opens the log, dropping lines past `keep_through_step` (written after the checkpoint a
    /// resumed run starts from, so every step is logged once).
    fn open(out: &Path, keep_through_step: u64) -> Result<Metrics> {
        let path = out.join("metrics.jsonl");
        if path.exists() {
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= keep_through_step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            crate::fsutil::write_atomic(&path, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let events = tensorboard::EventWriter::create(&out.join("tensorboard"), keep_through_step + 1)?;
        Ok(Metrics { file, events })
    }

    fn log(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").context("writing metrics.jsonl")?;
        let step = v["step"].as_u64().unwrap_or(0);
        let mut scalars: Vec<(String, f64)> =
            ["loss", "lr", "grad_norm", "tokens_per_s", "flops_per_s", "val_loss", "skipped_steps"]
                .iter()
                .filter_map(|k| v[*k].as_f64().map(|x| (k.to_string(), x)))
                .collect();
        // One TensorBoard tag per text set: `val_bpc/NAME`.
        if let Some(sets) = v["val_bpc"].as_object() {
            scalars.extend(sets.iter().filter_map(|(name, x)| x.as_f64().map(|x| (format!("val_bpc/{name}"), x))));
        }
        let tags: Vec<(&str, f64)> = scalars.iter().map(|(k, x)| (k.as_str(), *x)).collect();
        self.events.scalars(step, &tags)
    }
}

/// Mean loss over `eval_batches` global batches of held-out data (token-weighted), each rank
/// scoring its rows.
fn validate<B: Backend>(
    backend: &B,
    model: &Llama<B>,
    cfg: &TrainConfig,
    comm: &dyn Communicator<B::Buf>,
) -> Result<Option<f64>> {
    if cfg.run.eval_datasets.is_empty() {
        return Ok(None);
    }
    let world = comm.world_size();
    let lc = LoaderConfig {
        global_batch_rows: cfg.data.micro_batch_rows * world,
        max_epochs: Some(1),
        ordering: Ordering::Shuffle,
        seed: 0,
        ..loader_config(cfg, 0, comm.rank(), world)
    };
    let mut loader = Loader::new(&subsets(&cfg.run.eval_datasets), lc, None)?;
    let (mut sum, mut n) = (0.0, 0usize);
    for _ in 0..cfg.run.eval_batches {
        let Some(b) = loader.next_micro_batch()? else { break };
        let k = count_valid(&b.targets);
        if b.rows == 0 || k == 0 {
            continue;
        }
        sum += model.loss(backend, &b)? * k as f64;
        n += k;
    }
    let mut totals = [sum, n as f64];
    comm.all_reduce_scalars(&mut totals)?;
    Ok((totals[1] > 0.0).then(|| totals[0] / totals[1]))
}

/// The held-out text sets of `run.eval_texts`, read once, with the tokenizer to score them.
struct TextSets {
    tok: TextTokenizer,
    sets: Vec<(String, Vec<String>)>,
}

impl TextSets {
    fn load(cfg: &TrainConfig, tokenizer: Option<&Path>) -> Result<Option<TextSets>> {
        let named = cfg.run.eval_text_sets();
        if named.is_empty() {
            return Ok(None);
        }
        let tok_path = tokenizer.context("key `run.eval_texts`: no tokenizer (set `model.tokenizer`)")?;
        let model_config = cfg
            .model
            .from
            .as_ref()
            .map_or_else(|| cfg.model.config.clone().expect("validated"), |d| d.join("config.json"));
        // The `evaluate` binary's tokenizer for this model (BOS as tokenizer and config say).
        let tok = TextTokenizer::for_inference(tok_path, &model_config)?;
        let mut sets = Vec::new();
        for (name, path) in named {
            let (texts, issues) = eval::ppl::read_texts(&path)
                .with_context(|| format!("key `run.eval_texts`: reading {}", path.display()))?;
            for i in &issues {
                eprintln!("eval text set {name}: skipped {i}");
            }
            anyhow::ensure!(!texts.is_empty(), "key `run.eval_texts`: {} holds no document", path.display());
            sets.push((name, texts));
        }
        Ok(Some(TextSets { tok, sets }))
    }

    /// Bits per character of each set, scored as `evaluate --text` does, windows of `seq_len`.
    fn bits_per_char<B: Backend>(
        &self,
        backend: &B,
        model: &Llama<B>,
        cfg: &TrainConfig,
    ) -> Result<serde_json::Map<String, serde_json::Value>> {
        let (len, rows) = (cfg.data.seq_len, cfg.data.micro_batch_rows);
        let mut out = serde_json::Map::new();
        for (name, texts) in &self.sets {
            let s = eval::ppl::score_texts(model, backend, &self.tok, texts, len, len * rows)?;
            out.insert(name.clone(), s.bits_per_char.into());
        }
        Ok(out)
    }
}

/// Redraws `out/loss.png`. A plot that cannot be written is reported, not fatal: the run matters more.
fn plot(out: &Path) {
    if let Err(e) = plot::write_loss_png(out) {
        eprintln!("warning: {e:#}");
    }
}

fn line(bar: &ProgressBar, text: String) {
    if bar.is_hidden() {
        eprintln!("{text}");
    } else {
        bar.println(text);
    }
}

/// Runs (or resumes) every stage of `cfg` in this one process. `interrupt` is polled after each
/// step: when set, a checkpoint is written and the run returns with `interrupted`.
pub fn run<B: Backend>(backend: &B, cfg: &TrainConfig, interrupt: &AtomicBool) -> Result<Outcome> {
    run_parallel(backend, &SingleProcess::default(), cfg, interrupt)
}

fn traffic_delta(a: TrafficCount, b: TrafficCount) -> serde_json::Value {
    serde_json::json!({"all_reduce": b.all_reduce - a.all_reduce, "reduce_scatter": b.reduce_scatter - a.reduce_scatter, "all_gather": b.all_gather - a.all_gather})
}

/// [`run`] as one rank of a data-parallel group: every rank calls it with the same config; rank 0
/// logs, shows progress and writes the model files; every rank writes its optimizer shard.
pub fn run_parallel<B: Backend>(
    backend: &B,
    comm: &dyn Communicator<B::Buf>,
    cfg: &TrainConfig,
    interrupt: &AtomicBool,
) -> Result<Outcome> {
    let out = &cfg.run.out_dir;
    let (rank, world) = (comm.rank(), comm.world_size());
    let leader = rank == 0;
    cfg.check_inputs()?;
    for (i, s) in cfg.stages.iter().enumerate() {
        if s.global_batch_rows % (world * cfg.data.micro_batch_rows) != 0 {
            bail!(
                "key `stages[{i}].global_batch_rows`: {} is not a multiple of {world} ranks × data.micro_batch_rows {}",
                s.global_batch_rows,
                cfg.data.micro_batch_rows
            );
        }
    }
    if leader {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        crate::fsutil::write_atomic(&out.join("config.resolved.toml"), toml::to_string_pretty(cfg)?.as_bytes())?;
    }
    let mut model = match (&cfg.model.from, &cfg.model.config) {
        (Some(dir), _) => Llama::load(backend, dir)?,
        (None, Some(c)) => Llama::random(backend, LlamaConfig::from_file(c)?, cfg.model.seed),
        _ => unreachable!("validated"),
    };
    let tokenizer = cfg
        .model
        .tokenizer
        .clone()
        .or_else(|| cfg.model.from.as_ref().map(|d| d.join("tokenizer.json")).filter(|p| p.exists()));
    // Clean up a checkpoint write that was cut off, then resume from the newest complete one.
    if leader {
        if let Ok(entries) = std::fs::read_dir(checkpoint::checkpoints_dir(out)) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let resume = checkpoint::complete_checkpoints(out)?.pop();
    let first_stage = match &resume {
        Some(dir) => checkpoint::read_state(dir)?.stage.min(cfg.stages.len() - 1),
        None => 0,
    };
    let new_dp = |model: &Llama<B>, si: usize| {
        let stage = &cfg.stages[si];
        DataParallel::new(
            backend,
            comm,
            &model.params,
            &trainable(model, stage),
            cfg.parallel.stage(),
            cfg.parallel.bucket_elems(),
            adamw_config(stage),
        )
    };
    let mut dp = new_dp(&model, first_stage);
    let mut state = match resume {
        Some(dir) => {
            let s = checkpoint::load(&dir, backend, &mut model, &mut dp)?;
            if leader {
                eprintln!("resuming from {} (stage {}, step {})", dir.display(), s.stage, s.global_step);
            }
            s
        }
        None => TrainerState::fresh(),
    };
    // Mixed precision: the masters are taken (or restored) in fp32; now the bf16 working copies.
    dp.refresh_params(backend, &mut model.params)?;
    comm.barrier()?;
    let text_sets = if leader { TextSets::load(cfg, tokenizer.as_deref())? } else { None };
    let mut metrics = if leader { Some(Metrics::open(out, state.global_step)?) } else { None };
    let c = &model.config;
    let fpt = flops_per_token(c, cfg.data.seq_len);
    if leader {
        eprintln!(
            "data parallel: {} (rank {rank}), ZeRO-{}, {} gradient buckets, optimizer state {:.1} MiB on this rank",
            comm.name(),
            cfg.parallel.zero_stage,
            dp.layout.buckets.len(),
            dp.opt.state_bytes(backend) as f64 / (1 << 20) as f64
        );
    }
    if leader {
        eprintln!(
        "model: {} parameters ({} non-embedding), {} layers, hidden {}, vocab {}; {:.3} GFLOP per trained token; backend {}",
        model.num_params(),
        c.non_embedding_params(),
        c.num_hidden_layers,
        c.hidden_size,
        c.vocab_size,
        fpt / 1e9,
        backend.name()
    );
    }
    let step_opts = StepOptions { checkpoint_layers: cfg.model.checkpoint_layers };
    let mut final_model = None;
    let mut last_loss = None;
    let save_ckpt = |model: &Llama<B>, dp: &DataParallel<B>, state: &TrainerState| {
        checkpoint::save(out, cfg.run.keep_checkpoints, backend, model, dp, state, tokenizer.as_deref())
    };

    while state.stage < cfg.stages.len() {
        let si = state.stage;
        let stage = &cfg.stages[si];
        let total = cfg.stage_steps(si);
        let lc = loader_config(cfg, si, rank, world);
        let micro_steps = lc.micro_steps();
        let mut loader = Loader::new(&subsets(&stage.datasets), lc, state.loader.clone())
            .with_context(|| format!("stage {:?}: opening its data", stage.name))?;
        dp.opt.config = adamw_config(stage);
        let bar = if leader { ProgressBar::new(total) } else { ProgressBar::hidden() }.with_position(state.stage_step);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .unwrap()
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("stage {}/{} {}", si + 1, cfg.stages.len(), stage.name));
        if leader {
            line(
                &bar,
                format!(
                    "stage {:?}: {total} steps of {} rows × {} tokens, lr {:e}{}",
                    stage.name,
                    stage.global_batch_rows,
                    cfg.data.seq_len,
                    stage.lr,
                    if stage.freeze_non_embeddings { ", only embeddings and LM head train" } else { "" }
                ),
            );
        }

        while state.stage_step < total {
            let t0 = Instant::now();
            let mut batches: Vec<Batch> = Vec::with_capacity(micro_steps);
            for _ in 0..micro_steps {
                match loader.next_micro_batch()? {
                    Some(b) => batches.push(b),
                    None => bail!("stage {:?}: its data ended before step {}", stage.name, state.stage_step),
                }
            }
            let tokens: usize = batches.iter().map(|b| b.num_tokens()).sum();
            let lr = schedule::lr_at(state.stage_step, total, stage.lr, stage.warmup_steps, stage.min_lr_ratio);
            let clip = (stage.max_grad_norm > 0.0).then_some(stage.max_grad_norm);
            let poison = cfg.run.inject_nan_at_steps.contains(&(state.global_step + 1));
            let traffic_before = comm.traffic();
            // A failed collective names its step (the communicators know only their own counts).
            let report = dp
                .step(backend, &mut model, &batches, step_opts, lr, clip, poison)
                .with_context(|| format!("step {}", state.global_step + 1))?;
            let traffic = traffic_delta(traffic_before, comm.traffic());
            let loss = report.loss;
            state.stage_step += 1;
            state.global_step += 1;
            // Every rank counts the whole global batch's tokens.
            state.tokens_seen += (tokens * world) as u64;
            if report.applied {
                state.consecutive_skips = 0;
                state.optimizer_updates = dp.opt.step;
                last_loss = Some(loss);
            } else {
                state.skipped_steps += 1;
                state.consecutive_skips += 1;
                if leader {
                    line(
                        &bar,
                        format!(
                            "step {}: loss {loss}, gradient norm {} — not finite, step skipped ({} in a row)",
                            state.global_step, report.grad_norm, state.consecutive_skips
                        ),
                    );
                }
                if state.consecutive_skips >= cfg.run.max_consecutive_skips {
                    let last = checkpoint::complete_checkpoints(out)?.pop();
                    bail!(
                        "stopping: {} non-finite steps in a row; the last good checkpoint is {}",
                        state.consecutive_skips,
                        last.map_or("none (no checkpoint was written yet)".into(), |p| p.display().to_string())
                    );
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            let tok_s = (tokens * world) as f64 / secs;
            let flops = fpt * tok_s;
            let mfu = backend.peak_flops().map(|p| flops / p);
            bar.set_position(state.stage_step);
            bar.set_message(format!(
                "loss {loss:.4} lr {lr:.2e} {tok_s:.0} tok/s {}",
                mfu.map_or(format!("{:.1} GFLOP/s", flops / 1e9), |m| format!("MFU {:.1}%", 100.0 * m))
            ));
            let mut record = serde_json::json!({
                "step": state.global_step, "stage": stage.name, "stage_step": state.stage_step, "loss": loss,
                "lr": lr, "grad_norm": report.grad_norm, "applied": report.applied, "tokens": state.tokens_seen,
                "tokens_per_s": tok_s, "flops_per_s": flops, "mfu": mfu, "skipped_steps": state.skipped_steps,
                "skipped_rows": loader.skipped_rows(), "loader_wait_s": loader.stats().wait.as_secs_f64(),
                "world_size": world, "comm_wait_s": report.comm_wait.as_secs_f64(), "comm_bytes": traffic,
            });
            let evaluate =
                cfg.run.eval_every > 0 && (state.global_step % cfg.run.eval_every == 0 || state.stage_step == total);
            if evaluate {
                if let Some(v) = validate(backend, &model, cfg, comm)? {
                    record["val_loss"] = v.into();
                    if leader {
                        line(&bar, format!("step {}: validation loss {v:.4}", state.global_step));
                    }
                }
                // Rank 0 alone scores the text sets (no collectives inside).
                if let Some(ts) = &text_sets {
                    let bpc = ts.bits_per_char(backend, &model, cfg)?;
                    let shown: Vec<String> =
                        bpc.iter().map(|(n, v)| format!("{n} {:.4}", v.as_f64().unwrap_or(f64::NAN))).collect();
                    line(
                        &bar,
                        format!("step {}: validation bits per character: {}", state.global_step, shown.join(", ")),
                    );
                    record["val_bpc"] = bpc.into();
                }
            }
            // A step with validation results is always logged.
            let log_now = evaluate || state.global_step % cfg.run.log_every == 0 || state.stage_step == total;
            if log_now {
                // Measured optimizer-state bytes of every rank (one slot each, summed).
                let mut per_rank = vec![0.0; world];
                per_rank[rank] = dp.opt.state_bytes(backend) as f64;
                comm.all_reduce_scalars(&mut per_rank).with_context(|| format!("step {}", state.global_step))?;
                record["optimizer_state_bytes"] = per_rank.into();
            }
            if let (Some(metrics), true) = (metrics.as_mut(), log_now) {
                metrics.log(record)?;
                if bar.is_hidden() {
                    eprintln!(
                        "step {} stage {} loss {loss:.4} lr {lr:.2e} grad_norm {:.3} {tok_s:.0} tok/s",
                        state.global_step, stage.name, report.grad_norm
                    );
                }
            }
            state.loader = Some(loader.state());
            // A signal may reach only some ranks: all stop if one does.
            let mut stop = [if interrupt.load(AtomicOrdering::SeqCst) { 1.0 } else { 0.0 }];
            comm.all_reduce_scalars(&mut stop).with_context(|| format!("step {}", state.global_step))?;
            let stop_now = stop[0] > 0.0 || cfg.run.stop_after_steps.is_some_and(|s| state.global_step >= s);
            // No periodic checkpoint inside a run of skipped steps: the last one stays the last good one.
            let periodic = cfg.run.checkpoint_every > 0
                && state.global_step % cfg.run.checkpoint_every == 0
                && state.consecutive_skips == 0;
            if state.stage_step < total && (periodic || stop_now) {
                let p = save_ckpt(&model, &dp, &state)?;
                if stop_now {
                    bar.abandon();
                    if leader {
                        plot(out);
                        eprintln!(
                            "stopped at step {}; checkpoint {} (run again to resume)",
                            state.global_step,
                            p.display()
                        );
                    }
                    return Ok(Outcome { final_model, interrupted: true, global_step: state.global_step, last_loss });
                }
            }
        }
        bar.finish();
        // Stage end: an HF model directory, then a checkpoint positioned at the next stage.
        let stage_dir = out.join(format!("stage-{}", stage.name));
        if leader {
            model.save(backend, &stage_dir, StoreDtype::F32, None)?;
            if let Some(t) = &tokenizer {
                std::fs::copy(t, stage_dir.join("tokenizer.json"))
                    .with_context(|| format!("copying {}", t.display()))?;
            }
            eprintln!("stage {:?} done: model written to {}", stage.name, stage_dir.display());
        }
        if leader {
            plot(out);
        }
        final_model = Some(stage_dir);
        state.stage += 1;
        state.stage_step = 0;
        state.optimizer_updates = 0;
        state.loader = None;
        // Mixed precision: the next stage's masters start from these fp32 masters, not from bf16.
        dp.params_from_masters(backend, &mut model.params)?;
        dp = new_dp(&model, state.stage.min(cfg.stages.len() - 1));
        dp.refresh_params(backend, &mut model.params)?;
        save_ckpt(&model, &dp, &state)?;
        if interrupt.load(AtomicOrdering::SeqCst) || cfg.run.stop_after_steps.is_some_and(|s| state.global_step >= s) {
            return Ok(Outcome {
                final_model,
                interrupted: state.stage < cfg.stages.len(),
                global_step: state.global_step,
                last_loss,
            });
        }
    }
    if final_model.is_none() {
        final_model = cfg.stages.last().map(|s| out.join(format!("stage-{}", s.name)));
    }
    Ok(Outcome { final_model, interrupted: false, global_step: state.global_step, last_loss })
}
