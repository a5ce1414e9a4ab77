//! The training configuration (TOML), with `--set key.path=value` overrides. Relative paths are
//! resolved against the config file's folder. Unknown keys and bad values are errors that name
//! the key's path (`stages[1].lr`).
use crate::data::Packing;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelConfig,
    #[serde(default)]
    pub data: DataConfig,
    pub stages: Vec<StageConfig>,
    #[serde(default)]
    pub run: RunConfig,
    #[serde(default)]
    pub parallel: ParallelConfig,
}

/// Data parallelism (used when the process was launched as one of several ranks).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// 0: replicated optimizer, gradients all-reduced; 1: optimizer state sharded (gradients
    /// reduce-scattered); 2: gradients sharded too (reduce-scattered after every micro-step).
    pub zero_stage: u8,
    /// Gradients are reduced in buckets of about this many MiB (f32), launched as the backward
    /// finishes them.
    pub bucket_mib: f64,
    /// A collective that has not finished after this many seconds stops the run (a rank died).
    pub timeout_s: u64,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig { zero_stage: 0, bucket_mib: 32.0, timeout_s: 600 }
    }
}

impl ParallelConfig {
    pub fn stage(&self) -> crate::dist::ZeroStage {
        use crate::dist::ZeroStage;
        [ZeroStage::Zero0, ZeroStage::Zero1, ZeroStage::Zero2][self.zero_stage.min(2) as usize]
    }
    /// Bucket size in f32 elements.
    pub fn bucket_elems(&self) -> usize {
        ((self.bucket_mib * 1024.0 * 1024.0 / 4.0) as usize).max(1)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face model directory to continue from (config.json + safetensors).
    pub from: Option<PathBuf>,
    /// Or a config.json to initialise randomly from.
    pub config: Option<PathBuf>,
    /// tokenizer.json copied into every checkpoint (default: `from`'s tokenizer.json, if any).
    pub tokenizer: Option<PathBuf>,
    /// Seed of the random initialisation.
    #[serde(default)]
    pub seed: u64,
    /// Recompute each decoder layer in the backward instead of keeping its activations.
    #[serde(default)]
    pub checkpoint_layers: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub seq_len: usize,
    /// Rows per micro-batch (the gradient-accumulation unit).
    pub micro_batch_rows: usize,
    pub seed: u64,
    /// "bucket" (Colossal's bucket-based order) or "shuffle".
    pub ordering: String,
    /// Bins per sub-dataset for bucket ordering.
    pub bins: usize,
    /// "concat" (default: rows cut the concatenated documents) or "whole_docs" (a document that
    /// fits in a row never straddles rows; for QA/SFT records).
    pub packing: Packing,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            seq_len: 4096,
            micro_batch_rows: 1,
            seed: 42,
            ordering: "bucket".into(),
            bins: 8,
            packing: Packing::Concat,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetRef {
    /// A sub-dataset written by `prepare-data` (a folder with manifest.json and shards).
    pub dir: PathBuf,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub name: String,
    pub datasets: Vec<DatasetRef>,
    /// Length of the stage in optimizer steps, or …
    pub steps: Option<u64>,
    /// … in tokens (rounded up to whole steps).
    pub tokens: Option<u64>,
    /// Rows per optimizer step over all ranks (the global batch is this × seq_len tokens).
    pub global_batch_rows: usize,
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    /// Cosine decay ends at `min_lr_ratio × lr` (Colossal: 0.1).
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Global-norm clipping threshold; 0 disables clipping.
    #[serde(default = "one")]
    pub max_grad_norm: f64,
    /// Train only the embeddings and the LM head (Colossal's first step after growing the
    /// vocabulary).
    #[serde(default)]
    pub freeze_non_embeddings: bool,
}

fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_weight_decay() -> f64 {
    0.1
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub out_dir: PathBuf,
    /// Save a resumable checkpoint every N optimizer steps (0: only at stage ends).
    pub checkpoint_every: u64,
    /// Resumable checkpoints kept (the newest ones).
    pub keep_checkpoints: usize,
    /// Write checkpoints on a background thread: the state is copied to host memory and training
    /// goes on while it is written; at most one save is in flight (the next save, a rollback and
    /// the end of the run wait for it).
    pub async_checkpoint: bool,
    /// What a failed periodic save does: `"stop"` the run with the error, or `"continue"` training
    /// (the failure is logged; the earlier checkpoints stay). A final save (a stop, the end of a
    /// stage) always stops on failure.
    pub on_save_failure: String,
    /// Print and log metrics every N steps.
    pub log_every: u64,
    /// Stop after this many non-finite steps in a row (each one is skipped).
    pub max_consecutive_skips: u32,
    /// Validation: sub-datasets held out of training, evaluated every `eval_every` steps on
    /// `eval_batches` micro-batches (0 disables).
    #[serde(default)]
    pub eval_datasets: Vec<DatasetRef>,
    #[serde(default)]
    pub eval_every: u64,
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    /// Validation: held-out text sets (JSONL `{"text"}` / `source`+`target`, or `.txt`, file or
    /// folder; named by their file stem) scored for bits per character every `eval_every` steps,
    /// as `evaluate --text` scores them (windows of `data.seq_len` tokens).
    #[serde(default)]
    pub eval_texts: Vec<PathBuf>,
    /// Stop (with a checkpoint) after this many global steps — for tests and time-boxed runs.
    #[serde(default)]
    pub stop_after_steps: Option<u64>,
    /// Fault injection for tests: global steps (1-based) whose loss is replaced by NaN.
    #[serde(default)]
    pub inject_nan_at_steps: Vec<u64>,
    /// Loss spikes: a step whose loss or pre-clip gradient norm lies more than `spike_zscore`
    /// standard deviations above the mean of the stage's last `spike_window` applied steps is
    /// skipped like a non-finite one (judged once 16 steps, or the whole window, are known; the
    /// deviation is at least 5% of the mean, so a flat series does not flag noise). 0: off.
    pub spike_window: usize,
    pub spike_zscore: f64,
    /// After `spike_limit` spikes within `spike_limit_steps` steps, roll back to the newest
    /// checkpoint of the stage older than the first of them and go on with the data after the
    /// last (the batches in between are dropped, as PaLM does); with no such checkpoint, stop.
    pub spike_limit: u32,
    pub spike_limit_steps: u64,
    /// Batches to drop, as `[first, last]` global steps (Megatron's skip-train-iteration-range):
    /// when the run reaches step `first`, the batches of steps `first..=last` are read and
    /// dropped, and step `first` trains on the batch after them. Recorded in the trainer state,
    /// so a resume never drops them twice.
    #[serde(default)]
    pub skip_step_ranges: Vec<[u64; 2]>,
    /// Fault injection for tests: bad batches, numbered as the steps of a run that drops none
    /// (1-based), whose gradients are scaled by 1000 (a gradient-norm spike); the fault travels
    /// with the batch, so a run that dropped it never meets it.
    #[serde(default)]
    pub inject_spike_at_steps: Vec<u64>,
}

fn default_eval_batches() -> usize {
    4
}

impl RunConfig {
    /// `eval_texts` with their names (file stem, or folder name).
    pub fn eval_text_sets(&self) -> Vec<(String, PathBuf)> {
        self.eval_texts
            .iter()
            .map(|p| {
                (p.file_stem().map_or_else(|| p.display().to_string(), |s| s.to_string_lossy().into_owned()), p.clone())
            })
            .collect()
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            out_dir: "runs/default".into(),
            checkpoint_every: 0,
            keep_checkpoints: 2,
            async_checkpoint: true,
            on_save_failure: "stop".into(),
            log_every: 1,
            max_consecutive_skips: 5,
            eval_datasets: vec![],
            eval_every: 0,
            eval_batches: default_eval_batches(),
            eval_texts: vec![],
            stop_after_steps: None,
            inject_nan_at_steps: vec![],
            spike_window: 128,
            spike_zscore: 6.0,
            spike_limit: 4,
            spike_limit_steps: 64,
            skip_step_ranges: vec![],
            inject_spike_at_steps: vec![],
        }
    }
}

/// Sets `path` (dot-separated keys, numbers index arrays: `stages.1.lr`) to `value`, parsed as a
/// TOML value when it is one (`3`, `1e-4`, `true`, `"x"`, `[1, 2]`), else taken as a string.
pub fn apply_override(root: &mut toml::Value, assignment: &str) -> Result<()> {
    let (path, raw) =
        assignment.split_once('=').with_context(|| format!("override `{assignment}`: expected key.path=value"))?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let keys: Vec<&str> = path.split('.').collect();
    let mut node = root;
    for (i, key) in keys.iter().enumerate() {
        let last = i + 1 == keys.len();
        node = match node {
            toml::Value::Table(t) => {
                if last {
                    t.insert(key.to_string(), value);
                    return Ok(());
                }
                t.entry(key.to_string()).or_insert_with(|| toml::Value::Table(Default::default()))
            }
            toml::Value::Array(a) => {
                let idx: usize = key.parse().with_context(|| format!("override `{path}`: `{key}` must be an index"))?;
                let len = a.len();
                let slot =
                    a.get_mut(idx).with_context(|| format!("override `{path}`: index {idx} beyond {len} items"))?;
                if last {
                    *slot = value;
                    return Ok(());
                }
                slot
            }
            _ => bail!("override `{path}`: `{key}` is inside a value that is not a table"),
        };
    }
    unreachable!("the loop returns at the last key")
}

impl TrainConfig {
    /// Parses TOML text; `origin` names the source in errors, `base` resolves relative paths.
    pub fn parse(text: &str, origin: &str, base: &Path, overrides: &[String]) -> Result<TrainConfig> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| anyhow!("{origin}: {e}"))?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let mut cfg: TrainConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            anyhow!("{origin}: key `{path}`: {}", e.into_inner())
        })?;
        cfg.resolve_paths(base);
        cfg.validate().with_context(|| origin.to_string())?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path, overrides: &[String]) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, &path.display().to_string(), path.parent().unwrap_or(Path::new(".")), overrides)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            *p = crate::fsutil::join_normalized(base, p);
        };
        for p in [&mut self.model.from, &mut self.model.config, &mut self.model.tokenizer].into_iter().flatten() {
            fix(p);
        }
        for d in self.stages.iter_mut().flat_map(|s| s.datasets.iter_mut()).chain(self.run.eval_datasets.iter_mut()) {
            fix(&mut d.dir);
        }
        self.run.eval_texts.iter_mut().for_each(fix);
        fix(&mut self.run.out_dir);
    }

    /// Checks that every file and folder the config names is there — every stage's data, not only
    /// the first's — so that a missing one stops the run before its first step. The error lists
    /// each missing path with the key it came from.
    pub fn check_inputs(&self) -> Result<()> {
        let mut missing = Vec::new();
        let mut need = |key: String, path: &Path, what: &str| {
            if !path.exists() {
                missing.push(format!("key `{key}`: {what} {} does not exist", path.display()));
            }
        };
        if let Some(dir) = &self.model.from {
            need("model.from".into(), &dir.join("config.json"), "the model's");
        }
        if let Some(p) = &self.model.config {
            need("model.config".into(), p, "the model config");
        }
        if let Some(p) = &self.model.tokenizer {
            need("model.tokenizer".into(), p, "the tokenizer");
        }
        let manifest = crate::data::prepare::MANIFEST;
        for (i, s) in self.stages.iter().enumerate() {
            for (j, d) in s.datasets.iter().enumerate() {
                need(format!("stages[{i}].datasets[{j}].dir"), &d.dir.join(manifest), "the prepared data's");
            }
        }
        for (j, d) in self.run.eval_datasets.iter().enumerate() {
            need(format!("run.eval_datasets[{j}].dir"), &d.dir.join(manifest), "the prepared data's");
        }
        for (j, p) in self.run.eval_texts.iter().enumerate() {
            need(format!("run.eval_texts[{j}]"), p, "the text set");
        }
        if !missing.is_empty() {
            bail!(
                "{} input(s) missing (paths in a config file are relative to its folder):\n  {}",
                missing.len(),
                missing.join("\n  ")
            );
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        match (&self.model.from, &self.model.config) {
            (Some(_), Some(_)) => bail!("key `model`: give `from` (a checkpoint) or `config` (random init), not both"),
            (None, None) => {
                bail!("key `model`: give `from` (a checkpoint directory) or `config` (a config.json for random init)")
            }
            _ => {}
        }
        let d = &self.data;
        if d.seq_len == 0 || d.micro_batch_rows == 0 {
            bail!("key `data`: `seq_len` and `micro_batch_rows` must be positive");
        }
        if d.ordering != "bucket" && d.ordering != "shuffle" {
            bail!("key `data.ordering`: {:?} is neither \"bucket\" nor \"shuffle\"", d.ordering);
        }
        if d.ordering == "bucket" && d.bins == 0 {
            bail!("key `data.bins` must be positive for bucket ordering");
        }
        if self.stages.is_empty() {
            bail!("key `stages`: at least one stage is needed");
        }
        for (i, s) in self.stages.iter().enumerate() {
            s.validate(i, d.micro_batch_rows)?;
            if self.stages[..i].iter().any(|o| o.name == s.name) {
                bail!("key `stages[{i}].name`: {:?} names two stages", s.name);
            }
        }
        if self.run.log_every == 0 {
            bail!("key `run.log_every` must be positive");
        }
        if !(self.run.spike_zscore > 0.0 && self.run.spike_zscore.is_finite()) {
            bail!("key `run.spike_zscore`: {} is not a positive number of standard deviations", self.run.spike_zscore);
        }
        if self.run.spike_limit == 0 || self.run.spike_limit_steps == 0 {
            bail!("key `run.spike_limit` and `run.spike_limit_steps` must be positive");
        }
        for (i, [first, last]) in self.run.skip_step_ranges.iter().enumerate() {
            if *first == 0 || first > last {
                bail!("key `run.skip_step_ranges[{i}]`: [{first}, {last}] is not a range of global steps (1-based, first ≤ last)");
            }
        }
        if self.parallel.zero_stage > 2 {
            bail!("key `parallel.zero_stage`: {} is not 0, 1 or 2", self.parallel.zero_stage);
        }
        if !(self.parallel.bucket_mib > 0.0 && self.parallel.bucket_mib.is_finite()) || self.parallel.timeout_s == 0 {
            bail!("key `parallel.bucket_mib` and `parallel.timeout_s` must be positive");
        }
        let sets = self.run.eval_text_sets();
        for (i, (name, _)) in sets.iter().enumerate() {
            if sets[..i].iter().any(|(n, _)| n == name) {
                bail!("key `run.eval_texts[{i}]`: another text set is also named {name:?} (sets are named by their file stem)");
            }
        }
        if !sets.is_empty() && self.model.tokenizer.is_none() && self.model.from.is_none() {
            bail!("key `run.eval_texts`: scoring text needs a tokenizer; set `model.tokenizer`");
        }
        if self.run.on_save_failure != "stop" && self.run.on_save_failure != "continue" {
            bail!("key `run.on_save_failure`: {:?} is neither \"stop\" nor \"continue\"", self.run.on_save_failure);
        }
        if self.run.keep_checkpoints == 0 {
            bail!("key `run.keep_checkpoints` must be at least 1");
        }
        Ok(())
    }

    /// Optimizer steps in stage `i`.
    pub fn stage_steps(&self, i: usize) -> u64 {
        let s = &self.stages[i];
        s.steps.unwrap_or_else(|| {
            let per_step = (s.global_batch_rows * self.data.seq_len) as u64;
            s.tokens.unwrap().div_ceil(per_step)
        })
    }
}

impl StageConfig {
    /// The checks of one stage, `stages[i]` of the config.
    fn validate(&self, i: usize, micro_batch_rows: usize) -> Result<()> {
        let at = |k: &str| format!("key `stages[{i}].{k}`");
        if self.steps.is_some() == self.tokens.is_some() {
            bail!("{}: give exactly one of `steps` and `tokens`", at("steps"));
        }
        if self.steps == Some(0) || self.tokens == Some(0) {
            bail!("{}: the stage must be longer than 0", at("steps"));
        }
        if self.global_batch_rows == 0 || !self.global_batch_rows.is_multiple_of(micro_batch_rows) {
            bail!(
                "{}: {} must be a positive multiple of data.micro_batch_rows ({})",
                at("global_batch_rows"),
                self.global_batch_rows,
                micro_batch_rows
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("{}: must be a positive number, found {}", at("lr"), self.lr);
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            bail!("{}: must lie in [0, 1], found {}", at("min_lr_ratio"), self.min_lr_ratio);
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            bail!("{}: betas must lie in [0, 1)", at("beta1"));
        }
        if self.weight_decay < 0.0 || self.max_grad_norm < 0.0 || self.eps <= 0.0 {
            bail!("{}: weight_decay and max_grad_norm must be ≥ 0 and eps > 0", at("weight_decay"));
        }
        if self.datasets.is_empty() {
            bail!("{}: at least one dataset is needed", at("datasets"));
        }
        for (j, ds) in self.datasets.iter().enumerate() {
            if !(ds.weight > 0.0 && ds.weight.is_finite()) {
                bail!("{}: must be positive, found {}", at(&format!("datasets[{j}].weight")), ds.weight);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [model]
        config = "cfg.json"
        [data]
        seq_len = 64
        micro_batch_rows = 2
        seed = 1
        ordering = "bucket"
        bins = 2
        [[stages]]
        name = "a"
        datasets = [{ dir = "d1" }]
        steps = 10
        global_batch_rows = 4
        lr = 1e-3
        [[stages]]
        name = "b"
        datasets = [{ dir = "d2", weight = 2.0 }]
        tokens = 1000
        global_batch_rows = 4
        lr = 1e-4
    "#;

    #[test]
    fn parses_resolves_and_overrides() {
        let c = TrainConfig::parse(
            GOOD,
            "t.toml",
            Path::new("/base"),
            &["stages.1.lr=5e-5".into(), "run.out_dir=out".into()],
        )
        .unwrap();
        assert_eq!(c.data.packing, Packing::Concat, "the default packing");
        assert_eq!(c.stages[1].lr, 5e-5);
        assert_eq!(c.run.out_dir, PathBuf::from("/base/out"));
        assert_eq!(c.stages[0].datasets[0].dir, PathBuf::from("/base/d1"));
        assert_eq!(c.stage_steps(1), 4); // 1000 tokens / (4 × 64) rounded up
        assert_eq!(c.stages[0].min_lr_ratio, 0.1);
    }

    #[test]
    fn errors_name_the_key() {
        let bad_key = GOOD.replace("lr = 1e-4", "lr = 1e-4\nlrr = 3");
        let e = format!("{:#}", TrainConfig::parse(&bad_key, "t.toml", Path::new("."), &[]).unwrap_err());
        assert!(e.contains("t.toml") && e.contains("stages[1]") && e.contains("lrr"), "{e}");
        let bad_val = GOOD.replace("seq_len = 64", "seq_len = \"long\"");
        let e = format!("{:#}", TrainConfig::parse(&bad_val, "t.toml", Path::new("."), &[]).unwrap_err());
        assert!(e.contains("data.seq_len"), "{e}");
        let e = format!(
            "{:#}",
            TrainConfig::parse(GOOD, "t.toml", Path::new("."), &["data.packing=whole".into()]).unwrap_err()
        );
        assert!(e.contains("data.packing") && e.contains("whole_docs"), "{e}");
        let c = TrainConfig::parse(GOOD, "t.toml", Path::new("."), &["data.packing=whole_docs".into()]).unwrap();
        assert_eq!(c.data.packing, Packing::WholeDocs);
        let texts = r#"run.eval_texts=["a/heldout.jsonl", "b/heldout"]"#.to_string();
        let e = format!(
            "{:#}",
            TrainConfig::parse(GOOD, "t.toml", Path::new("."), &[texts, "model.tokenizer=t.json".into()]).unwrap_err()
        );
        assert!(e.contains("run.eval_texts[1]") && e.contains("\"heldout\""), "{e}");
        let e = format!(
            "{:#}",
            TrainConfig::parse(GOOD, "t.toml", Path::new("."), &[r#"run.eval_texts=["x.jsonl"]"#.into()]).unwrap_err()
        );
        assert!(e.contains("run.eval_texts") && e.contains("model.tokenizer"), "{e}");
        let e = format!(
            "{:#}",
            TrainConfig::parse(GOOD, "t.toml", Path::new("."), &["stages.0.lr=-1".into()]).unwrap_err()
        );
        assert!(e.contains("stages[0].lr"), "{e}");
        let e = format!(
            "{:#}",
            TrainConfig::parse(GOOD, "t.toml", Path::new("."), &["stages.0.tokens=5".into()]).unwrap_err()
        );
        assert!(e.contains("exactly one of `steps` and `tokens`"), "{e}");
    }
}
