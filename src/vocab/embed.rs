//! Embedding growth (mean of old sub-token rows) and the extended model directory.
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::base::BaseTokenizer;
use super::{extend_tokenizer, ExtendReport, NewToken, PieceSource, REAL_VOCAB_KEY, REPORT_FILE};
use crate::config::LlamaConfig;
use crate::cpu::Cpu;
use crate::model::Llama;
use crate::tensor::Tensor;
use crate::weights::StoreDtype;

/// Options of [`extend_model`].
#[derive(Clone, Debug)]
pub struct ExtendOptions {
    /// The embedding's row count is rounded up to a multiple of this.
    pub pad_to_multiple: usize,
    /// Write into an existing, non-empty output directory.
    pub overwrite: bool,
}

impl Default for ExtendOptions {
    fn default() -> Self {
        ExtendOptions { pad_to_multiple: 64, overwrite: false }
    }
}

fn stored_dtype(dir: &Path) -> StoreDtype {
    let probe = || -> Option<StoreDtype> {
        let file = if dir.join(crate::weights::SINGLE_FILE).exists() {
            dir.join(crate::weights::SINGLE_FILE)
        } else {
            let idx: Value = serde_json::from_slice(&std::fs::read(dir.join(crate::weights::INDEX_FILE)).ok()?).ok()?;
            dir.join(idx.pointer("/weight_map/model.embed_tokens.weight")?.as_str()?)
        };
        let bytes = std::fs::read(file).ok()?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
        let info = meta.info("model.embed_tokens.weight")?;
        Some(if info.dtype == safetensors::Dtype::BF16 { StoreDtype::BF16 } else { StoreDtype::F32 })
    };
    probe().unwrap_or(StoreDtype::F32)
}

/// Grows a `[rows, h]` matrix to `new_rows`: old rows kept bit for bit, each new token's row the
/// mean of the old rows of its old ids (all old rows' mean when it has none), padding rows zero.
fn grow(old: &[f32], rows: usize, h: usize, new_rows: usize, real_old: usize, new_tokens: &[NewToken]) -> Vec<f32> {
    let mut out = vec![0f32; new_rows * h];
    out[..rows * h].copy_from_slice(old);
    let mut all = vec![0f64; h];
    for r in 0..real_old.min(rows) {
        for (a, x) in all.iter_mut().zip(&old[r * h..(r + 1) * h]) {
            *a += *x as f64;
        }
    }
    let n_all = real_old.min(rows).max(1) as f64;
    for t in new_tokens {
        let ids: Vec<usize> = t.old_ids.iter().map(|&i| i as usize).filter(|&i| i < rows).collect();
        let row = &mut out[t.id as usize * h..(t.id as usize + 1) * h];
        if ids.is_empty() {
            for (o, a) in row.iter_mut().zip(&all) {
                *o = (*a / n_all) as f32;
            }
            continue;
        }
        let mut acc = vec![0f64; h];
        for &i in &ids {
            for (a, x) in acc.iter_mut().zip(&old[i * h..(i + 1) * h]) {
                *a += *x as f64;
            }
        }
        for (o, a) in row.iter_mut().zip(&acc) {
            *o = (*a / ids.len() as f64) as f32;
        }
    }
    out
}

/// The whole extension: reads the base model directory, writes the extended one, returns the report
/// (also written to `out/vocab_extension.json`).
pub fn extend_model(base_dir: &Path, out: &Path, source: &PieceSource, opts: &ExtendOptions) -> Result<ExtendReport> {
    check_directories(base_dir, out, opts)?;
    let (tok_path, cfg_path) = (base_dir.join("tokenizer.json"), base_dir.join("config.json"));
    let config = LlamaConfig::from_file(&cfg_path)?;
    let base = BaseTokenizer::load(&tok_path)?;
    if base.size as usize > config.vocab_size {
        bail!(
            "{}: the tokenizer has {} ids but the model's vocab_size is {}",
            base_dir.display(),
            base.size,
            config.vocab_size
        );
    }
    let (tok, mut report) = extend_tokenizer(&base, source)?;
    let real = report.new_tokenizer_size as usize;
    let new_vocab = real.div_ceil(opts.pad_to_multiple) * opts.pad_to_multiple;
    let new_vocab = new_vocab.max(config.vocab_size);
    report.old_model_vocab = config.vocab_size;
    report.new_model_vocab = new_vocab;

    let cpu = Cpu;
    let mut model = Llama::load(&cpu, base_dir)?;
    let h = model.config.hidden_size;
    let old_rows = model.config.vocab_size;
    for p in model.params.iter_mut() {
        if p.name == "model.embed_tokens.weight" || p.name == "lm_head.weight" {
            let old = p.value.to_host(&cpu);
            let grown = grow(&old, old_rows, h, new_vocab, base.size as usize, &report.new_tokens);
            p.value = Tensor::from_host(&cpu, &grown, &[new_vocab, h]);
        }
    }
    model.config.vocab_size = new_vocab;
    model.config.raw.insert(REAL_VOCAB_KEY.into(), real.into());

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    copy_other_files(base_dir, out)?;
    let shard =
        if base_dir.join(crate::weights::INDEX_FILE).exists() && !base_dir.join(crate::weights::SINGLE_FILE).exists() {
            Some(5_000_000_000)
        } else {
            None
        };
    model.save(&cpu, out, stored_dtype(base_dir), shard)?;
    let text = tok.to_string(true).map_err(|e| anyhow!("serialising the tokenizer: {e}"))?;
    crate::fsutil::write_atomic(&out.join("tokenizer.json"), text.as_bytes())?;
    // The written file, read back, must give the same checks.
    let written = BaseTokenizer::load(&out.join("tokenizer.json"))?;
    if written.size != report.new_tokenizer_size {
        bail!("the written tokenizer has {} ids, expected {}", written.size, report.new_tokenizer_size);
    }
    crate::fsutil::write_atomic(&out.join(REPORT_FILE), serde_json::to_string_pretty(&report)?.as_bytes())?;
    Ok(report)
}

/// The inputs and the output folder are usable before any work starts.
fn check_directories(base_dir: &Path, out: &Path, opts: &ExtendOptions) -> Result<()> {
    if opts.pad_to_multiple == 0 {
        bail!("--pad-to-multiple must be at least 1");
    }
    if !base_dir.is_dir() {
        bail!("base model directory {} does not exist", base_dir.display());
    }
    let tok_path = base_dir.join("tokenizer.json");
    if !tok_path.exists() {
        bail!("{}: no tokenizer.json in the base model directory (extend-vocab needs the fast-tokenizer file; convert a tokenizer.model with transformers first)", base_dir.display());
    }
    let cfg_path = base_dir.join("config.json");
    if !cfg_path.exists() {
        bail!("{}: no config.json in the base model directory", base_dir.display());
    }
    if out.exists() && std::fs::read_dir(out)?.next().is_some() && !opts.overwrite {
        bail!("output directory {} exists and is not empty (pass --overwrite to write into it)", out.display());
    }
    if out.exists() && base_dir.canonicalize()? == out.canonicalize()? {
        bail!("the output directory must differ from the base directory");
    }
    Ok(())
}

/// Everything else of the base directory is copied: not weights, config or tokenizer, and not a
/// SentencePiece tokenizer.model, which would still hold the old vocabulary.
fn copy_other_files(base_dir: &Path, out: &Path) -> Result<()> {
    for entry in std::fs::read_dir(base_dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
        let skip = matches!(name.as_str(), "config.json" | "tokenizer.json" | "tokenizer.model" | REPORT_FILE)
            || name == crate::weights::SINGLE_FILE
            || name == crate::weights::INDEX_FILE
            || (name.starts_with("model-") && name.ends_with(".safetensors"));
        if skip || !path.is_file() {
            continue;
        }
        std::fs::copy(&path, out.join(&name))
            .with_context(|| format!("copying {} to {}", path.display(), out.display()))?;
    }
    Ok(())
}
