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
use crate::eval;
use crate::model::{Llama, StepOptions};
use crate::optim::AdamW;
use crate::weights::StoreDtype;
use anyhow::{bail, Context, Result};
use checkpoint::TrainerState;
use config::{DatasetRef, StageConfig, TrainConfig};
use indicatif::{ProgressBar, ProgressStyle};
use llama_cpt_ops::cross_entropy::count_valid;
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

fn loader_config(cfg: &TrainConfig, stage_index: usize) -> LoaderConfig {
    let d = &cfg.data;
    LoaderConfig {
        seq_len: d.seq_len,
        global_batch_rows: cfg.stages[stage_index].global_batch_rows,
        micro_batch_rows: d.micro_batch_rows,
        world_size: 1,
        rank: 0,
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
                .filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s <= keep_through_step))
                .map(|l| format!("{l}\n"))
                .collect();
            crate::fsutil::write_atomic(&path, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        let events = tensorboard::EventWriter::create(&out.join("tensorboard"))?;
        Ok(Metrics { file, events })
    }

    fn log(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").context("writing metrics.jsonl")?;
        let step = v["step"].as_u64().unwrap_or(0);
        let mut scalars: Vec<(String, f64)> = ["loss", "lr", "grad_norm", "tokens_per_s", "flops_per_s", "val_loss", "skipped_steps"]
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

/// Mean loss over `batches` micro-batches of held-out data (token-weighted).
fn validate<B: Backend>(backend: &B, model: &Llama<B>, cfg: &TrainConfig) -> Result<Option<f64>> {
    if cfg.run.eval_datasets.is_empty() {
        return Ok(None);
    }
    let lc = LoaderConfig { global_batch_rows: cfg.data.micro_batch_rows, max_epochs: Some(1), ordering: Ordering::Shuffle, seed: 0, ..loader_config(cfg, 0) };
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
    Ok((n > 0).then(|| sum / n as f64))
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
        let model_config = cfg.model.from.as_ref().map_or_else(|| cfg.model.config.clone().expect("validated"), |d| d.join("config.json"));
        // The `evaluate` binary's tokenizer for this model (BOS as tokenizer and config say).
        let tok = TextTokenizer::for_inference(tok_path, &model_config)?;
        let mut sets = Vec::new();
        for (name, path) in named {
            let (texts, issues) = eval::ppl::read_texts(&path).with_context(|| format!("key `run.eval_texts`: reading {}", path.display()))?;
            for i in &issues {
                eprintln!("eval text set {name}: skipped {i}");
            }
            anyhow::ensure!(!texts.is_empty(), "key `run.eval_texts`: {} holds no document", path.display());
            sets.push((name, texts));
        }
        Ok(Some(TextSets { tok, sets }))
    }

    /// Bits per character of each set, scored as `evaluate --text` does, windows of `seq_len`.
    fn bits_per_char<B: Backend>(&self, backend: &B, model: &Llama<B>, cfg: &TrainConfig) -> Result<serde_json::Map<String, serde_json::Value>> {
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

/// Runs (or resumes) every stage of `cfg`. `interrupt` is polled after each step: when set, a
/// checkpoint is written and the run returns with `interrupted`.
pub fn run<B: Backend>(backend: &B, cfg: &TrainConfig, interrupt: &AtomicBool) -> Result<Outcome> {
    let out = &cfg.run.out_dir;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::fsutil::write_atomic(&out.join("config.resolved.toml"), toml::to_string_pretty(cfg)?.as_bytes())?;
    let mut model = match (&cfg.model.from, &cfg.model.config) {
        (Some(dir), _) => Llama::load(backend, dir)?,
        (None, Some(c)) => Llama::random(backend, LlamaConfig::from_file(c)?, cfg.model.seed),
        _ => unreachable!("validated"),
    };
    let tokenizer = cfg.model.tokenizer.clone().or_else(|| cfg.model.from.as_ref().map(|d| d.join("tokenizer.json")).filter(|p| p.exists()));
    let mut opt = AdamW::new(backend, &model.params, adamw_config(&cfg.stages[0]));
    // Clean up a checkpoint write that was cut off, then resume from the newest complete one.
    if let Ok(entries) = std::fs::read_dir(checkpoint::checkpoints_dir(out)) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let mut state = match checkpoint::complete_checkpoints(out)?.pop() {
        Some(dir) => {
            let s = checkpoint::load(&dir, backend, &mut model, &mut opt)?;
            eprintln!("resuming from {} (stage {}, step {})", dir.display(), s.stage, s.global_step);
            s
        }
        None => TrainerState::fresh(),
    };
    let text_sets = TextSets::load(cfg, tokenizer.as_deref())?;
    let mut metrics = Metrics::open(out, state.global_step)?;
    let c = &model.config;
    let fpt = flops_per_token(c, cfg.data.seq_len);
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
    let step_opts = StepOptions { checkpoint_layers: cfg.model.checkpoint_layers };
    let mut final_model = None;
    let mut last_loss = None;
    let save_ckpt = |model: &Llama<B>, opt: &AdamW<B>, state: &TrainerState| checkpoint::save(out, cfg.run.keep_checkpoints, backend, model, opt, state, tokenizer.as_deref());

    while state.stage < cfg.stages.len() {
        let si = state.stage;
        let stage = &cfg.stages[si];
        let total = cfg.stage_steps(si);
        let lc = loader_config(cfg, si);
        let micro_steps = lc.micro_steps();
        let mut loader = Loader::new(&subsets(&stage.datasets), lc, state.loader.clone()).with_context(|| format!("stage {:?}: opening its data", stage.name))?;
        opt.config = adamw_config(stage);
        let train_mask = trainable(&model, stage);
        let bar = ProgressBar::new(total).with_position(state.stage_step);
        bar.set_style(ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}").unwrap().progress_chars("=> "));
        bar.set_prefix(format!("stage {}/{} {}", si + 1, cfg.stages.len(), stage.name));
        line(&bar, format!("stage {:?}: {total} steps of {} rows × {} tokens, lr {:e}{}", stage.name, stage.global_batch_rows, cfg.data.seq_len, stage.lr, if stage.freeze_non_embeddings { ", only embeddings and LM head train" } else { "" }));

        while state.stage_step < total {
            let t0 = Instant::now();
            let mut batches: Vec<Batch> = Vec::with_capacity(micro_steps);
            for _ in 0..micro_steps {
                match loader.next_micro_batch()? {
                    Some(b) => batches.push(b),
                    None => bail!("stage {:?}: its data ended before step {}", stage.name, state.stage_step),
                }
            }
            let n_valid: usize = batches.iter().map(|b| count_valid(&b.targets)).sum();
            let tokens: usize = batches.iter().map(|b| b.num_tokens()).sum();
            let mut grads: Option<Vec<B::Buf>> = None;
            let mut loss_sum = 0.0;
            for b in batches.iter().filter(|b| b.rows > 0) {
                let k = count_valid(&b.targets);
                // Weight each micro-batch by its share of counted tokens: the accumulated gradient
                // is that of the mean loss over the whole global batch.
                let share = if n_valid > 0 { k as f64 / n_valid as f64 } else { 0.0 };
                let (loss, g) = model.loss_and_grads(backend, b, share, step_opts)?;
                loss_sum += loss * k as f64;
                match grads.as_mut() {
                    None => grads = Some(g),
                    Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, x)| backend.add_assign(a, x)),
                }
            }
            let mut loss = if n_valid > 0 { loss_sum / n_valid as f64 } else { f64::NAN };
            if cfg.run.inject_nan_at_steps.contains(&(state.global_step + 1)) {
                loss = f64::NAN;
            }
            let lr = schedule::lr_at(state.stage_step, total, stage.lr, stage.warmup_steps, stage.min_lr_ratio);
            let clip = (stage.max_grad_norm > 0.0).then_some(stage.max_grad_norm);
            let report = match (&grads, loss.is_finite()) {
                (Some(g), true) => opt.step(backend, &mut model.params, g, &train_mask, lr, clip),
                _ => crate::optim::StepReport { grad_norm: f64::NAN, applied: false },
            };
            state.stage_step += 1;
            state.global_step += 1;
            state.tokens_seen += tokens as u64;
            if report.applied {
                state.consecutive_skips = 0;
                state.optimizer_updates = opt.step;
                last_loss = Some(loss);
            } else {
                state.skipped_steps += 1;
                state.consecutive_skips += 1;
                line(&bar, format!("step {}: loss {loss}, gradient norm {} — not finite, step skipped ({} in a row)", state.global_step, report.grad_norm, state.consecutive_skips));
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
            let tok_s = tokens as f64 / secs;
            let flops = fpt * tok_s;
            let mfu = backend.peak_flops().map(|p| flops / p);
            bar.set_position(state.stage_step);
            bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tok_s:.0} tok/s {}", mfu.map_or(format!("{:.1} GFLOP/s", flops / 1e9), |m| format!("MFU {:.1}%", 100.0 * m))));
            let mut record = serde_json::json!({
                "step": state.global_step, "stage": stage.name, "stage_step": state.stage_step, "loss": loss,
                "lr": lr, "grad_norm": report.grad_norm, "applied": report.applied, "tokens": state.tokens_seen,
                "tokens_per_s": tok_s, "flops_per_s": flops, "mfu": mfu, "skipped_steps": state.skipped_steps,
                "skipped_rows": loader.skipped_rows(), "loader_wait_s": loader.stats().wait.as_secs_f64(),
            });
            let evaluate = cfg.run.eval_every > 0 && (state.global_step % cfg.run.eval_every == 0 || state.stage_step == total);
            if evaluate {
                if let Some(v) = validate(backend, &model, cfg)? {
                    record["val_loss"] = v.into();
                    line(&bar, format!("step {}: validation loss {v:.4}", state.global_step));
                }
                if let Some(ts) = &text_sets {
                    let bpc = ts.bits_per_char(backend, &model, cfg)?;
                    let shown: Vec<String> = bpc.iter().map(|(n, v)| format!("{n} {:.4}", v.as_f64().unwrap_or(f64::NAN))).collect();
                    line(&bar, format!("step {}: validation bits per character: {}", state.global_step, shown.join(", ")));
                    record["val_bpc"] = bpc.into();
                }
            }
            // A step with validation results is always logged.
            if evaluate || state.global_step % cfg.run.log_every == 0 || state.stage_step == total {
                metrics.log(record)?;
                if bar.is_hidden() {
                    eprintln!("step {} stage {} loss {loss:.4} lr {lr:.2e} grad_norm {:.3} {tok_s:.0} tok/s", state.global_step, stage.name, report.grad_norm);
                }
            }
            state.loader = Some(loader.state());
            let stop_now = interrupt.load(AtomicOrdering::SeqCst) || cfg.run.stop_after_steps.is_some_and(|s| state.global_step >= s);
            // No periodic checkpoint inside a run of skipped steps: the last one stays the last good one.
            let periodic = cfg.run.checkpoint_every > 0 && state.global_step % cfg.run.checkpoint_every == 0 && state.consecutive_skips == 0;
            if state.stage_step < total && (periodic || stop_now) {
                let p = save_ckpt(&model, &opt, &state)?;
                if stop_now {
                    bar.abandon();
                    plot(out);
                    eprintln!("stopped at step {}; checkpoint {} (run again to resume)", state.global_step, p.display());
                    return Ok(Outcome { final_model, interrupted: true, global_step: state.global_step, last_loss });
                }
            }
        }
        bar.finish();
        // Stage end: an HF model directory, then a checkpoint positioned at the next stage.
        let stage_dir = out.join(format!("stage-{}", stage.name));
        model.save(backend, &stage_dir, StoreDtype::F32, None)?;
        if let Some(t) = &tokenizer {
            std::fs::copy(t, stage_dir.join("tokenizer.json")).with_context(|| format!("copying {}", t.display()))?;
        }
        eprintln!("stage {:?} done: model written to {}", stage.name, stage_dir.display());
        plot(out);
        final_model = Some(stage_dir);
        state.stage += 1;
        state.stage_step = 0;
        state.optimizer_updates = 0;
        state.loader = None;
        opt = AdamW::new(backend, &model.params, opt.config);
        save_ckpt(&model, &opt, &state)?;
        if interrupt.load(AtomicOrdering::SeqCst) || cfg.run.stop_after_steps.is_some_and(|s| state.global_step >= s) {
            return Ok(Outcome { final_model, interrupted: state.stage < cfg.stages.len(), global_step: state.global_step, last_loss });
        }
    }
    if final_model.is_none() {
        final_model = cfg.stages.last().map(|s| out.join(format!("stage-{}", s.name)));
    }
    Ok(Outcome { final_model, interrupted: false, global_step: state.global_step, last_loss })
}
