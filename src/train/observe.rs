//! What a run reports as it goes: metrics (JSON lines and TensorBoard), validation loss and the
//! held-out text sets' bits per character, the loss plot, and console lines beside the progress bar.
use super::config::TrainConfig;
use super::setup::{loader_config, subsets};
use super::{plot, tensorboard};
use crate::backend::Backend;
use crate::data::tokenizer::TextTokenizer;
use crate::data::{Loader, LoaderConfig, Ordering};
use crate::eval;
use crate::model::Llama;
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use llama_cpt_ops::cross_entropy::count_valid;
use llama_cpt_parallel::{Communicator, TrafficCount};
use std::io::Write;
use std::path::Path;

/// Appends JSON lines to `metrics.jsonl` and scalars to TensorBoard event files in `tensorboard/`.
pub(super) struct Metrics {
    file: std::fs::File,
    events: tensorboard::EventWriter,
}

impl Metrics {
    /// Opens the log, dropping lines past `keep_through_step` (written after the checkpoint a
    /// resumed run starts from, so every step is logged once).
    pub(super) fn open(out: &Path, keep_through_step: u64) -> Result<Metrics> {
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

    pub(super) fn log(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").context("writing metrics.jsonl")?;
        let step = v["step"].as_u64().unwrap_or(0);
        let mut scalars: Vec<(String, f64)> =
            ["loss", "lr", "grad_norm", "tokens_per_s", "flops_per_s", "val_loss", "skipped_steps", "spikes"]
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
pub(super) fn validate<B: Backend>(
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
pub(super) struct TextSets {
    tok: TextTokenizer,
    sets: Vec<(String, Vec<String>)>,
}

impl TextSets {
    pub(super) fn load(cfg: &TrainConfig, tokenizer: Option<&Path>) -> Result<Option<TextSets>> {
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
    pub(super) fn bits_per_char<B: Backend>(
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
pub(super) fn redraw_plot(out: &Path) {
    if let Err(e) = plot::write_loss_png(out) {
        eprintln!("warning: {e:#}");
    }
}

pub(super) fn line(bar: &ProgressBar, text: String) {
    if bar.is_hidden() {
        eprintln!("{text}");
    } else {
        bar.println(text);
    }
}

pub(super) fn traffic_delta(a: TrafficCount, b: TrafficCount) -> serde_json::Value {
    serde_json::json!({"all_reduce": b.all_reduce - a.all_reduce, "reduce_scatter": b.reduce_scatter - a.reduce_scatter, "all_gather": b.all_gather - a.all_gather})
}
