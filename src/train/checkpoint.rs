//! Resumable checkpoints: `<out>/checkpoints/step-NNNNNNNN/` holding the model (HF safetensors,
//! f32 master weights), the optimizer moments (`optimizer.safetensors`), the trainer state
//! (`trainer_state.json`: stage, steps, loader state, counters) and the tokenizer. Each is written
//! into a temporary folder, synced, renamed into place and marked `COMPLETE`; a folder without the
//! marker is never read. Only the newest `keep` complete checkpoints are kept.
use crate::backend::Backend;
use crate::data::LoaderState;
use crate::model::Llama;
use crate::optim::AdamW;
use crate::weights::StoreDtype;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MARKER: &str = "COMPLETE";

/// Everything besides tensors that a resume needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Stage being run (== number of stages when all are done).
    pub stage: usize,
    /// Optimizer steps taken in this stage (skipped ones included).
    pub stage_step: u64,
    /// Optimizer steps over all stages.
    pub global_step: u64,
    /// Updates the optimizer applied in this stage (AdamW's bias-correction count).
    pub optimizer_updates: u64,
    pub tokens_seen: u64,
    pub skipped_steps: u64,
    pub consecutive_skips: u32,
    /// The loader's position in this stage's data (None at a stage start).
    pub loader: Option<LoaderState>,
}

impl TrainerState {
    pub fn fresh() -> Self {
        TrainerState { stage: 0, stage_step: 0, global_step: 0, optimizer_updates: 0, tokens_seen: 0, skipped_steps: 0, consecutive_skips: 0, loader: None }
    }
}

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        std::fs::File::open(&p).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", p.display()))?;
    }
    sync_dir(dir)
}

fn write_tensors(path: &Path, tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views = bytes.iter().map(|(n, s, b)| (n.as_str(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).expect("sizes match")));
    let data = safetensors::serialize(views, None)?;
    crate::fsutil::write_atomic(path, &data)
}

/// Writes a checkpoint for `state.global_step` and prunes old ones. On any error the partial
/// folder is removed and the earlier checkpoints are untouched.
pub fn save<B: Backend>(out: &Path, keep: usize, backend: &B, model: &Llama<B>, opt: &AdamW<B>, state: &TrainerState, tokenizer: Option<&Path>) -> Result<PathBuf> {
    let root = checkpoints_dir(out);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let name = format!("step-{:08}", state.global_step);
    let tmp = root.join(format!(".{name}.tmp"));
    let dst = root.join(&name);
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp)?;
        model.save(backend, &tmp, StoreDtype::F32, None)?;
        let mut moments = Vec::new();
        for (i, p) in model.params.iter().enumerate() {
            moments.push((format!("m.{}", p.name), p.value.shape.clone(), backend.download(&opt.m[i])));
            moments.push((format!("v.{}", p.name), p.value.shape.clone(), backend.download(&opt.v[i])));
        }
        write_tensors(&tmp.join("optimizer.safetensors"), moments)?;
        crate::fsutil::write_atomic(&tmp.join("trainer_state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
        if let Some(t) = tokenizer {
            std::fs::copy(t, tmp.join("tokenizer.json")).with_context(|| format!("copying {}", t.display()))?;
        }
        crate::fsutil::write_atomic(&tmp.join(MARKER), b"")?;
        sync_tree(&tmp)?;
        if dst.exists() {
            discard(&dst)?;
        }
        std::fs::rename(&tmp, &dst)?;
        sync_dir(&root)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("saving checkpoint {} (earlier checkpoints are intact)", dst.display())));
    }
    let mut all = complete_checkpoints(out)?;
    while all.len() > keep {
        discard(&all.remove(0))?;
    }
    Ok(dst)
}

/// Removes a checkpoint without ever leaving a half-deleted folder that still looks complete: it
/// is first renamed (atomically) to a `.tmp` name, which readers ignore and the next run cleans up.
fn discard(dir: &Path) -> Result<()> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint");
    let trash = dir.with_file_name(format!(".{name}.discarded.tmp"));
    let _ = std::fs::remove_dir_all(&trash);
    std::fs::rename(dir, &trash).with_context(|| format!("removing old checkpoint {}", dir.display()))?;
    std::fs::remove_dir_all(&trash).with_context(|| format!("removing old checkpoint {}", trash.display()))
}

/// Complete checkpoints, oldest first.
pub fn complete_checkpoints(out: &Path) -> Result<Vec<PathBuf>> {
    let root = checkpoints_dir(out);
    if !root.exists() {
        return Ok(vec![]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-")) && p.join(MARKER).exists())
        .collect();
    found.sort();
    Ok(found)
}

/// Restores the model, optimizer and state from checkpoint folder `dir`.
pub fn load<B: Backend>(dir: &Path, backend: &B, model: &mut Llama<B>, opt: &mut AdamW<B>) -> Result<TrainerState> {
    if !dir.join(MARKER).exists() {
        bail!("{}: not a complete checkpoint (no {MARKER} marker)", dir.display());
    }
    let loaded = Llama::load(backend, dir)?;
    if loaded.config.vocab_size != model.config.vocab_size || loaded.params.len() != model.params.len() {
        bail!("{}: the checkpoint's model does not match the configured one", dir.display());
    }
    model.params = loaded.params;
    let specs: Vec<(String, Vec<usize>)> = model
        .params
        .iter()
        .flat_map(|p| [(format!("m.{}", p.name), p.value.shape.clone()), (format!("v.{}", p.name), p.value.shape.clone())])
        .collect();
    let moments = load_optimizer(&dir.join("optimizer.safetensors"), &specs)?;
    for (i, pair) in moments.chunks_exact(2).enumerate() {
        opt.m[i] = backend.upload(&pair[0]);
        opt.v[i] = backend.upload(&pair[1]);
    }
    let p = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let state: TrainerState = serde_json::from_str(&text).with_context(|| format!("{}: invalid trainer state", p.display()))?;
    opt.step = state.optimizer_updates;
    Ok(state)
}

fn load_optimizer(path: &Path, specs: &[(String, Vec<usize>)]) -> Result<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    specs
        .iter()
        .map(|(name, shape)| {
            let v = st.tensor(name).map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
            if v.shape() != shape.as_slice() || v.dtype() != safetensors::Dtype::F32 {
                bail!("{}: tensor `{name}` is not F32 {shape:?}", path.display());
            }
            Ok(v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        })
        .collect()
}
