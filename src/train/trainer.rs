//! The training loop as the recipe reads: for each stage → for each step → batch, forward and
//! backward, reduce, optimizer step, log, checkpoint. [`Trainer`] holds what lives across steps
//! (model, data-parallel optimizer, trainer state, logs); each phase is one method.
use super::checkpoint::{self, TrainerState};
use super::config::{StageConfig, TrainConfig};
use super::observe::{line, redraw_plot, traffic_delta, validate, Metrics, TextSets};
use super::schedule;
use super::setup::{adamw_config, flops_per_token, loader_config, subsets, trainable};
use crate::backend::Backend;
use crate::batch::Batch;
use crate::config::LlamaConfig;
use crate::data::Loader;
use crate::dist::{DataParallel, StepChecks, StepResult};
use crate::model::{Llama, StepOptions};
use crate::weights::StoreDtype;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use llama_cpt_parallel::Communicator;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::Instant;

/// How a run ended.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The HF model directory of the last finished stage (None if none finished).
    pub final_model: Option<PathBuf>,
    /// Stopped early by a signal or `run.stop_after_steps` (a checkpoint was written).
    pub interrupted: bool,
    pub global_step: u64,
    pub last_loss: Option<f64>,
}

/// One rank's run: every rank holds one, rank 0 (the leader) logs and writes the model files.
pub(super) struct Trainer<'a, B: Backend> {
    backend: &'a B,
    comm: &'a dyn Communicator<B::Buf>,
    cfg: &'a TrainConfig,
    interrupt: &'a AtomicBool,
    leader: bool,
    model: Llama<B>,
    dp: DataParallel<'a, B>,
    pub(super) state: TrainerState,
    tokenizer: Option<PathBuf>,
    text_sets: Option<TextSets>,
    metrics: Option<Metrics>,
    flops_per_token: f64,
    final_model: Option<PathBuf>,
    last_loss: Option<f64>,
    /// The checkpoint a background thread is writing (`run.async_checkpoint`).
    pending_save: Option<checkpoint::PendingSave>,
}

/// What one optimizer step did, for the console, the metrics and the trainer state.
struct StepDone {
    report: StepResult,
    lr: f64,
    /// Tokens of this rank's micro-batches.
    tokens: usize,
    /// The whole global batch's tokens over the step's time (batching, step and accounting).
    tokens_per_s: f64,
    traffic: serde_json::Value,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// Checks the config, writes the resolved copy, loads (or resumes) the model and its optimizer.
    pub(super) fn start(
        backend: &'a B,
        comm: &'a dyn Communicator<B::Buf>,
        cfg: &'a TrainConfig,
        interrupt: &'a AtomicBool,
    ) -> Result<Self> {
        let out = &cfg.run.out_dir;
        let leader = comm.rank() == 0;
        cfg.check_inputs()?;
        check_batch_split(cfg, comm.world_size())?;
        if leader {
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            crate::fsutil::write_atomic(&out.join("config.resolved.toml"), toml::to_string_pretty(cfg)?.as_bytes())?;
        }
        let mut model = match (&cfg.model.from, &cfg.model.config) {
            (Some(dir), _) => Llama::load(backend, dir)?,
            (None, Some(c)) => Llama::random(backend, LlamaConfig::from_file(c)?, cfg.model.seed),
            _ => unreachable!("validated"),
        };
        // Shapes the backend cannot run are refused here, before any data is read.
        model.check_forward(backend, cfg.data.micro_batch_rows * cfg.data.seq_len)?;
        let tokenizer = cfg
            .model
            .tokenizer
            .clone()
            .or_else(|| cfg.model.from.as_ref().map(|d| d.join("tokenizer.json")).filter(|p| p.exists()));
        if leader {
            remove_unfinished_checkpoints(out);
        }
        let resume = agreed_resume(out, comm)?;
        let first_stage = match &resume {
            Some(dir) => checkpoint::read_state(dir)?.stage.min(cfg.stages.len() - 1),
            None => 0,
        };
        let mut dp = new_data_parallel(backend, comm, cfg, &model, first_stage);
        let state = match resume {
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
        let metrics = if leader { Some(Metrics::open(out, state.global_step)?) } else { None };
        let trainer = Trainer {
            backend,
            comm,
            cfg,
            interrupt,
            leader,
            flops_per_token: flops_per_token(&model.config, cfg.data.seq_len),
            model,
            dp,
            state,
            tokenizer,
            text_sets,
            metrics,
            final_model: None,
            last_loss: None,
            pending_save: None,
        };
        if leader {
            trainer.print_setup();
        }
        Ok(trainer)
    }

    fn print_setup(&self) {
        let (c, backend) = (&self.model.config, self.backend);
        eprintln!(
            "data parallel: {} (rank {}), ZeRO-{}, {} gradient buckets, optimizer state {:.1} MiB on this rank",
            self.comm.name(),
            self.comm.rank(),
            self.cfg.parallel.zero_stage,
            self.dp.layout.buckets.len(),
            self.dp.opt.state_bytes(backend) as f64 / (1 << 20) as f64
        );
        eprintln!(
            "model: {} parameters ({} non-embedding), {} layers, hidden {}, vocab {}; {:.3} GFLOP per trained token; backend {}",
            self.model.num_params(),
            c.non_embedding_params(),
            c.num_hidden_layers,
            c.hidden_size,
            c.vocab_size,
            self.flops_per_token / 1e9,
            backend.name()
        );
    }

    /// The steps of the current stage, from where the state stands. `Some` when the run stops
    /// inside the stage (a signal or `run.stop_after_steps`; a checkpoint was written).
    pub(super) fn run_stage(&mut self) -> Result<Option<Outcome>> {
        let cfg = self.cfg;
        let si = self.state.stage;
        let stage = &cfg.stages[si];
        let total = cfg.stage_steps(si);
        let lc = loader_config(cfg, si, self.comm.rank(), self.comm.world_size());
        let micro_steps = lc.micro_steps();
        let mut loader = Loader::new(&subsets(&stage.datasets), lc, self.state.loader.clone())
            .with_context(|| format!("stage {:?}: opening its data", stage.name))?;
        self.dp.opt.config = adamw_config(stage);
        let bar = self.stage_bar(si, total);
        while self.state.stage_step < total {
            self.backend.profile_range(crate::backend::PROFILE_TRAIN_STEP);
            self.drop_requested_batches(&mut loader, micro_steps, stage, &bar)?;
            let started = Instant::now();
            let batches = global_batch(&mut loader, micro_steps, stage, self.state.stage_step)?;
            let mut done = self.optimizer_step(&batches, stage, total)?;
            if let Some(first_spike) = self.count_step(&done, &bar)? {
                self.roll_back(first_spike, &loader, &bar)?;
                continue;
            }
            done.tokens_per_s = (done.tokens * self.comm.world_size()) as f64 / started.elapsed().as_secs_f64();
            let mut record = self.progress(&done, &loader, stage, &bar);
            self.backend.profile_range("evaluation");
            let evaluated = self.evaluate_if_due(&mut record, total, &bar)?;
            self.backend.profile_range("logging");
            self.log_if_due(record, evaluated, total, &done, stage, &bar)?;
            self.state.loader = Some(loader.state());
            self.backend.profile_range("checkpoint");
            let saved = self.checkpoint_if_due(total, &bar);
            self.backend.profile_range("other");
            if let Some(stopped) = saved? {
                return Ok(Some(stopped));
            }
        }
        bar.finish();
        Ok(None)
    }

    fn stage_bar(&self, si: usize, total: u64) -> ProgressBar {
        let (cfg, stage) = (self.cfg, &self.cfg.stages[si]);
        let bar = if self.leader { ProgressBar::new(total) } else { ProgressBar::hidden() }
            .with_position(self.state.stage_step);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .unwrap()
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("stage {}/{} {}", si + 1, cfg.stages.len(), stage.name));
        if self.leader {
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
        bar
    }

    /// Forward, backward, gradient reduction and the optimizer update over one global batch.
    fn optimizer_step(&mut self, batches: &[Batch], stage: &StageConfig, total: u64) -> Result<StepDone> {
        let state = &self.state;
        let lr = schedule::lr_at(state.stage_step, total, stage.lr, stage.warmup_steps, stage.min_lr_ratio);
        let clip = (stage.max_grad_norm > 0.0).then_some(stage.max_grad_norm);
        let run = &self.cfg.run;
        let next = state.global_step + 1;
        let (loss_bound, grad_bound) = state.spike_window.bounds(run.spike_window, run.spike_zscore);
        let checks = StepChecks {
            max_loss: loss_bound.map_or(f64::INFINITY, |b| b.limit),
            max_grad_norm: grad_bound.map_or(f64::INFINITY, |b| b.limit),
            poison_loss: run.inject_nan_at_steps.contains(&next),
            scale_gradients: if run.inject_spike_at_steps.contains(&state.next_batch_number()) { 1000.0 } else { 1.0 },
            always_update: false,
        };
        let step_opts = StepOptions { checkpoint_layers: self.cfg.model.checkpoint_layers };
        let traffic_before = self.comm.traffic();
        // A failed collective names its step (the communicators know only their own counts).
        let report = self
            .dp
            .step(self.backend, &mut self.model, batches, step_opts, lr, clip, &checks)
            .with_context(|| format!("step {}", state.global_step + 1))?;
        let traffic = traffic_delta(traffic_before, self.comm.traffic());
        let tokens = batches.iter().map(|b| b.num_tokens()).sum();
        Ok(StepDone { report, lr, tokens, tokens_per_s: 0.0, traffic })
    }

    /// Advances the trainer state past a step; stops the run after too many skipped in a row.
    /// `Some(first spike)` when spikes call for a rollback.
    fn count_step(&mut self, done: &StepDone, bar: &ProgressBar) -> Result<Option<u64>> {
        let (state, report) = (&mut self.state, &done.report);
        state.stage_step += 1;
        state.global_step += 1;
        // Every rank counts the whole global batch's tokens.
        state.tokens_seen += (done.tokens * self.comm.world_size()) as u64;
        if report.applied {
            state.consecutive_skips = 0;
            state.optimizer_updates = self.dp.opt.step;
            state.spike_window.push(report.loss, report.grad_norm, self.cfg.run.spike_window);
            self.last_loss = Some(report.loss);
            return Ok(None);
        }
        state.skipped_steps += 1;
        if report.spike {
            return self.count_spike(report, bar);
        }
        state.consecutive_skips += 1;
        if self.leader {
            line(
                bar,
                format!(
                    "step {}: loss {}, gradient norm {} — not finite, step skipped ({} in a row)",
                    state.global_step, report.loss, report.grad_norm, state.consecutive_skips
                ),
            );
        }
        if state.consecutive_skips >= self.cfg.run.max_consecutive_skips {
            let skips = state.consecutive_skips;
            // Every rank stops here alike: the save in flight (of a good step) is published first.
            self.settle_save(false)?;
            bail!(
                "stopping: {skips} non-finite steps in a row; the last good checkpoint is {}",
                last_good_checkpoint(&self.cfg.run.out_dir)?
            );
        }
        Ok(None)
    }

    /// A step skipped as a spike: says which value and by how much; after `run.spike_limit`
    /// within `run.spike_limit_steps` steps, `Some(the first of them)`: time to roll back.
    fn count_spike(&mut self, report: &StepResult, bar: &ProgressBar) -> Result<Option<u64>> {
        let run = &self.cfg.run;
        let state = &mut self.state;
        let (loss_bound, grad_bound) = state.spike_window.bounds(run.spike_window, run.spike_zscore);
        state.spikes += 1;
        let recent = state.spike_window.record_spike(state.global_step, run.spike_limit_steps);
        if self.leader {
            let over = [("loss", report.loss, loss_bound), ("gradient norm", report.grad_norm, grad_bound)]
                .into_iter()
                .filter_map(|(what, x, b)| b.filter(|b| x > b.limit).map(|b| (what, x, b)))
                .map(|(what, x, b)| {
                    format!(
                        "{what} {x:.4} is {:.1} deviations above the mean {:.4} (limit {:.4})",
                        b.z(x),
                        b.mean,
                        b.limit
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            line(
                bar,
                format!(
                    "step {}: spike — {over}; update skipped ({recent} in the last {} steps, {} in the run)",
                    state.global_step, run.spike_limit_steps, state.spikes
                ),
            );
        }
        Ok((recent >= run.spike_limit as usize).then(|| state.spike_window.recent_spikes[0]))
    }

    /// After too many spikes: back to the newest checkpoint of this stage older than the first
    /// of them, the data going on from where it is (the undone steps' batches are dropped, and
    /// recorded as such). Stops the run when there is no such checkpoint.
    fn roll_back(&mut self, first_spike: u64, loader: &Loader, bar: &ProgressBar) -> Result<()> {
        // The checkpoint being written may be the one to go back to.
        self.settle_save(true)?;
        let (run, si, now) = (&self.cfg.run, self.state.stage, self.state.global_step);
        let out = &run.out_dir;
        let before: Vec<PathBuf> = checkpoint::complete_checkpoints(out)?
            .into_iter()
            .filter(|d| checkpoint::read_state(d).is_ok_and(|s| s.stage == si && s.global_step < first_spike))
            .collect();
        let Some(dir) = agreed_checkpoint(&before, out, self.comm)? else {
            bail!(
                "stopping: {} loss or gradient-norm spikes within {} steps (run.spike_limit) from step {first_spike}, and no \
                 checkpoint of this stage before it to roll back to; the last good checkpoint is {}",
                run.spike_limit,
                run.spike_limit_steps,
                last_good_checkpoint(out)?
            );
        };
        let to_step = checkpoint::read_state(&dir)?.global_step;
        if self.state.rollbacks.contains(&to_step) {
            bail!(
                "stopping: spikes again after a rollback to step {to_step} ({}) with new data: they do not come \
                 from the data; lower the learning rate or raise run.spike_zscore, then resume",
                dir.display()
            );
        }
        let mut state = checkpoint::load(&dir, self.backend, &mut self.model, &mut self.dp)?;
        self.dp.refresh_params(self.backend, &mut self.model.params)?;
        let undone = [state.global_step + 1, now];
        state.loader = Some(loader.state());
        state.spikes = self.state.spikes;
        state.rollbacks = std::mem::take(&mut self.state.rollbacks);
        state.rollbacks.push(to_step);
        state.skipped_data = std::mem::take(&mut self.state.skipped_data);
        state.skipped_data.push(undone);
        state.spike_window.recent_spikes.clear();
        if self.leader {
            // The checkpoints of the undone steps belong to a timeline that no longer exists.
            for newer in checkpoint::complete_checkpoints(out)?
                .into_iter()
                .filter(|d| checkpoint::read_state(d).is_ok_and(|s| (s.stage, s.global_step) > (si, state.global_step)))
            {
                checkpoint::discard(&newer)?;
            }
            self.metrics = Some(Metrics::open(out, state.global_step)?);
            line(
                bar,
                format!(
                    "step {now}: {} spikes within {} steps — rolled back to {} (step {}); the batches of steps {}–{} are dropped",
                    run.spike_limit,
                    run.spike_limit_steps,
                    dir.display(),
                    state.global_step,
                    undone[0],
                    undone[1]
                ),
            );
        }
        self.comm.barrier()?;
        self.state = state;
        bar.set_position(self.state.stage_step);
        Ok(())
    }

    /// Drops the batches `run.skip_step_ranges` names when the run reaches the first of them
    /// (once: the trainer state remembers).
    fn drop_requested_batches(
        &mut self,
        loader: &mut Loader,
        micro_steps: usize,
        stage: &StageConfig,
        bar: &ProgressBar,
    ) -> Result<()> {
        let next = self.state.global_step + 1;
        for &range in &self.cfg.run.skip_step_ranges {
            if range[0] != next || self.state.skipped_data.contains(&range) {
                continue;
            }
            for _ in range[0]..=range[1] {
                global_batch(loader, micro_steps, stage, self.state.stage_step)?;
            }
            self.state.skipped_data.push(range);
            if self.leader {
                line(bar, format!("steps {}–{}: their batches dropped (run.skip_step_ranges)", range[0], range[1]));
            }
        }
        Ok(())
    }

    /// The progress bar's message and the step's metrics record.
    fn progress(&self, done: &StepDone, loader: &Loader, stage: &StageConfig, bar: &ProgressBar) -> serde_json::Value {
        let (state, report, lr, world) = (&self.state, &done.report, done.lr, self.comm.world_size());
        let (loss, tok_s) = (report.loss, done.tokens_per_s);
        let flops = self.flops_per_token * tok_s;
        let mfu = self.backend.peak_flops().map(|p| flops / p);
        bar.set_position(state.stage_step);
        bar.set_message(format!(
            "loss {loss:.4} lr {lr:.2e} {tok_s:.0} tok/s {}",
            mfu.map_or(format!("{:.1} GFLOP/s", flops / 1e9), |m| format!("MFU {:.1}%", 100.0 * m))
        ));
        serde_json::json!({
            "step": state.global_step, "stage": stage.name, "stage_step": state.stage_step, "loss": loss,
            "lr": lr, "grad_norm": report.grad_norm, "applied": report.applied, "tokens": state.tokens_seen,
            "tokens_per_s": tok_s, "flops_per_s": flops, "mfu": mfu, "skipped_steps": state.skipped_steps,
            "spike": report.spike, "spikes": state.spikes,
            "skipped_rows": loader.skipped_rows(), "loader_wait_s": loader.stats().wait.as_secs_f64(),
            "world_size": world, "comm_wait_s": report.comm_wait.as_secs_f64(), "comm_bytes": done.traffic,
        })
    }

    /// Validation loss and the text sets' bits per character, every `run.eval_every` steps and at
    /// the stage's end; whether they ran.
    fn evaluate_if_due(&self, record: &mut serde_json::Value, total: u64, bar: &ProgressBar) -> Result<bool> {
        let (cfg, state) = (self.cfg, &self.state);
        let due = cfg.run.eval_every > 0 && (state.global_step % cfg.run.eval_every == 0 || state.stage_step == total);
        if !due {
            return Ok(false);
        }
        if let Some(v) = validate(self.backend, &self.model, cfg, self.comm)? {
            record["val_loss"] = v.into();
            if self.leader {
                line(bar, format!("step {}: validation loss {v:.4}", state.global_step));
            }
        }
        // Rank 0 alone scores the text sets (no collectives inside).
        if let Some(ts) = &self.text_sets {
            let bpc = ts.bits_per_char(self.backend, &self.model, cfg)?;
            let shown: Vec<String> =
                bpc.iter().map(|(n, v)| format!("{n} {:.4}", v.as_f64().unwrap_or(f64::NAN))).collect();
            line(bar, format!("step {}: validation bits per character: {}", state.global_step, shown.join(", ")));
            record["val_bpc"] = bpc.into();
        }
        Ok(true)
    }

    /// Writes the record every `run.log_every` steps, at the stage's end and with validation
    /// results, with every rank's measured optimizer-state bytes.
    fn log_if_due(
        &mut self,
        mut record: serde_json::Value,
        evaluated: bool,
        total: u64,
        done: &StepDone,
        stage: &StageConfig,
        bar: &ProgressBar,
    ) -> Result<()> {
        let state = &self.state;
        if !(evaluated || state.global_step.is_multiple_of(self.cfg.run.log_every) || state.stage_step == total) {
            return Ok(());
        }
        // Measured optimizer-state bytes of every rank (one slot each, summed).
        let mut per_rank = vec![0.0; self.comm.world_size()];
        per_rank[self.comm.rank()] = self.dp.opt.state_bytes(self.backend) as f64;
        self.comm.all_reduce_scalars(&mut per_rank).with_context(|| format!("step {}", state.global_step))?;
        record["optimizer_state_bytes"] = per_rank.into();
        if let Some(metrics) = self.metrics.as_mut() {
            metrics.log(record)?;
            if bar.is_hidden() {
                eprintln!(
                    "step {} stage {} loss {:.4} lr {:.2e} grad_norm {:.3} {:.0} tok/s",
                    state.global_step, stage.name, done.report.loss, done.lr, done.report.grad_norm, done.tokens_per_s
                );
            }
        }
        Ok(())
    }

    /// A checkpoint every `run.checkpoint_every` steps inside a stage, and when the run stops
    /// (a signal on any rank, or `run.stop_after_steps`): then `Some`.
    fn checkpoint_if_due(&mut self, total: u64, bar: &ProgressBar) -> Result<Option<Outcome>> {
        let (cfg, state) = (self.cfg, &self.state);
        // A signal may reach only some ranks: all stop if one does.
        let mut stop = [if self.interrupt.load(AtomicOrdering::SeqCst) { 1.0 } else { 0.0 }];
        self.comm.all_reduce_scalars(&mut stop).with_context(|| format!("step {}", state.global_step))?;
        let stop_now = stop[0] > 0.0 || cfg.run.stop_after_steps.is_some_and(|s| state.global_step >= s);
        // No periodic checkpoint inside a run of skipped steps: the last one stays the last good one.
        let periodic = cfg.run.checkpoint_every > 0
            && state.global_step % cfg.run.checkpoint_every == 0
            && state.consecutive_skips == 0;
        if state.stage_step >= total || !(periodic || stop_now) {
            return Ok(None);
        }
        let p = self.save_checkpoint(!stop_now)?;
        if !stop_now {
            return Ok(None);
        }
        // The run stops on this checkpoint: it must be on disk.
        self.settle_save(false)?;
        bar.abandon();
        if self.leader {
            redraw_plot(&cfg.run.out_dir);
            eprintln!("stopped at step {}; checkpoint {} (run again to resume)", self.state.global_step, p.display());
        }
        Ok(Some(self.outcome(true)))
    }

    /// Starts a checkpoint of the current state, after the one in flight is finished (at most one
    /// save in flight); written synchronously unless `run.async_checkpoint`. `periodic`: a failure
    /// may let the run go on (`run.on_save_failure = "continue"`).
    fn save_checkpoint(&mut self, periodic: bool) -> Result<PathBuf> {
        self.settle_save(periodic)?;
        let cfg = self.cfg;
        let tokenizer = self.tokenizer.as_deref();
        let started = checkpoint::start_save(
            &cfg.run.out_dir,
            cfg.run.keep_checkpoints,
            self.backend,
            &self.model,
            &self.dp,
            &self.state,
            tokenizer,
        );
        let pending = match started {
            Ok(p) => p,
            Err(e) => return self.save_failed(e, periodic).map(|()| PathBuf::new()),
        };
        let path = pending.path().to_path_buf();
        self.pending_save = Some(pending);
        if !cfg.run.async_checkpoint {
            self.settle_save(periodic)?;
        }
        Ok(path)
    }

    /// Waits for the checkpoint in flight, if any, and publishes it (every rank).
    pub(super) fn settle_save(&mut self, periodic: bool) -> Result<()> {
        let Some(pending) = self.pending_save.take() else { return Ok(()) };
        match pending.finish(&self.dp) {
            Ok(_) => Ok(()),
            Err(e) => self.save_failed(e, periodic),
        }
    }

    /// A failed save: the error, or under `run.on_save_failure = "continue"` (periodic saves) a
    /// warning and on with training. The decision is the same on every rank (the failure was agreed).
    fn save_failed(&self, e: anyhow::Error, periodic: bool) -> Result<()> {
        if !(periodic && self.cfg.run.on_save_failure == "continue") {
            return Err(e);
        }
        if self.leader {
            eprintln!(
                "warning: {e:#}; training goes on (run.on_save_failure = \"continue\"), the last good checkpoint is {}",
                last_good_checkpoint(&self.cfg.run.out_dir)?
            );
        }
        Ok(())
    }

    /// Stage end: an HF model directory, then a checkpoint positioned at the next stage. `Some`
    /// when the run stops here (a signal or `run.stop_after_steps`).
    pub(super) fn finish_stage(&mut self) -> Result<Option<Outcome>> {
        let (cfg, backend) = (self.cfg, self.backend);
        let stage = &cfg.stages[self.state.stage];
        let stage_dir = cfg.run.out_dir.join(format!("stage-{}", stage.name));
        if self.leader {
            self.model.save(backend, &stage_dir, StoreDtype::F32, None)?;
            if let Some(t) = &self.tokenizer {
                std::fs::copy(t, stage_dir.join("tokenizer.json"))
                    .with_context(|| format!("copying {}", t.display()))?;
            }
            eprintln!("stage {:?} done: model written to {}", stage.name, stage_dir.display());
            redraw_plot(&cfg.run.out_dir);
        }
        self.final_model = Some(stage_dir);
        let state = &mut self.state;
        state.stage += 1;
        state.stage_step = 0;
        state.optimizer_updates = 0;
        state.loader = None;
        // New data, new statistics: spikes are judged against this stage's own steps.
        state.spike_window = Default::default();
        // Mixed precision: the next stage's masters start from these fp32 masters, not from bf16.
        self.dp.params_from_masters(backend, &mut self.model.params)?;
        let next = self.state.stage.min(cfg.stages.len() - 1);
        self.dp = new_data_parallel(backend, self.comm, cfg, &self.model, next);
        self.dp.refresh_params(backend, &mut self.model.params)?;
        self.save_checkpoint(false)?;
        let stop = self.interrupt.load(AtomicOrdering::SeqCst)
            || cfg.run.stop_after_steps.is_some_and(|s| self.state.global_step >= s);
        if stop {
            self.settle_save(false)?;
        }
        Ok(stop.then(|| self.outcome(self.state.stage < cfg.stages.len())))
    }

    pub(super) fn outcome(&self, interrupted: bool) -> Outcome {
        Outcome {
            final_model: self.final_model.clone(),
            interrupted,
            global_step: self.state.global_step,
            last_loss: self.last_loss,
        }
    }

    /// The outcome of a run that went through every stage (resumed after the last: its model).
    pub(super) fn finished(&mut self) -> Result<Outcome> {
        // The run ends on the last stage's checkpoint: it must be on disk.
        self.settle_save(false)?;
        let mut outcome = self.outcome(false);
        if outcome.final_model.is_none() {
            outcome.final_model =
                self.cfg.stages.last().map(|s| self.cfg.run.out_dir.join(format!("stage-{}", s.name)));
        }
        Ok(outcome)
    }
}

/// Every stage's global batch must split evenly into the ranks' micro-batches.
pub(super) fn check_batch_split(cfg: &TrainConfig, world: usize) -> Result<()> {
    for (i, s) in cfg.stages.iter().enumerate() {
        if s.global_batch_rows % (world * cfg.data.micro_batch_rows) != 0 {
            bail!(
                "key `stages[{i}].global_batch_rows`: {} is not a multiple of {world} ranks × data.micro_batch_rows {}",
                s.global_batch_rows,
                cfg.data.micro_batch_rows
            );
        }
    }
    Ok(())
}

/// Removes checkpoint writes that were cut off (`*.tmp`), so that resuming sees complete ones only.
fn remove_unfinished_checkpoints(out: &Path) {
    if let Ok(entries) = std::fs::read_dir(checkpoint::checkpoints_dir(out)) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The data-parallel optimizer for stage `si` (its trainable set and AdamW settings).
pub(super) fn new_data_parallel<'a, B: Backend>(
    backend: &B,
    comm: &'a dyn Communicator<B::Buf>,
    cfg: &TrainConfig,
    model: &Llama<B>,
    si: usize,
) -> DataParallel<'a, B> {
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
}

/// This rank's micro-batches of the next global batch.
fn global_batch(loader: &mut Loader, micro_steps: usize, stage: &StageConfig, stage_step: u64) -> Result<Vec<Batch>> {
    let mut batches = Vec::with_capacity(micro_steps);
    for _ in 0..micro_steps {
        match loader.next_micro_batch()? {
            Some(b) => batches.push(b),
            None => bail!("stage {:?}: its data ended before step {}", stage.name, stage_step),
        }
    }
    Ok(batches)
}

/// The newest complete checkpoint of `out`, as a stop message names it.
fn last_good_checkpoint(out: &Path) -> Result<String> {
    let last = checkpoint::complete_checkpoints(out)?.pop();
    Ok(last.map_or("none (no checkpoint was written yet)".into(), |p| p.display().to_string()))
}

/// The checkpoint every rank resumes from: rank 0 verifies the newest complete ones and its choice
/// is shared (one sum of scalars), so that no rank reads a checkpoint the others passed over.
fn agreed_resume<Buf>(out: &Path, comm: &dyn Communicator<Buf>) -> Result<Option<PathBuf>> {
    agreed_checkpoint(&checkpoint::complete_checkpoints(out)?, out, comm)
}

/// The newest intact of `all` (complete checkpoints of `out`, oldest first), as rank 0 finds it.
fn agreed_checkpoint<Buf>(all: &[PathBuf], out: &Path, comm: &dyn Communicator<Buf>) -> Result<Option<PathBuf>> {
    let chosen = if comm.rank() == 0 { checkpoint::newest_intact(all) } else { Ok(None) };
    // Rank 0's index + 1 (0: none), or -1 where it found none intact; the others add 0.
    let mut pick = [match &chosen {
        Ok(Some(i)) => (*i + 1) as f64,
        Ok(None) => 0.0,
        Err(_) => -1.0,
    }];
    comm.all_reduce_scalars(&mut pick)?;
    chosen?;
    if pick[0] < 0.0 {
        bail!("rank 0 found no intact checkpoint in {} (see its log)", checkpoint::checkpoints_dir(out).display());
    }
    let index = pick[0] as usize;
    Ok((index > 0).then(|| all[index - 1].clone()))
}
