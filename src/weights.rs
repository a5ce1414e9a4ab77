//! Model directories in the Hugging Face layout: `config.json` plus `model.safetensors`, or shards
//! listed by `model.safetensors.index.json`; tensors named as transformers names them, stored as
//! F32, BF16 or F16.
use crate::backend::Backend;
use crate::config::LlamaConfig;
use crate::fsutil::write_atomic;
use crate::model::{param_specs, Llama};
use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// How tensors are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    BF16,
}

/// Tensors that checkpoints may carry and a model rebuilds itself.
fn ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// Which file holds each tensor.
fn weight_map(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let index = dir.join(INDEX_FILE);
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        let bytes = std::fs::read(&single).with_context(|| format!("reading {}", single.display()))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", single.display()))?;
        return Ok(meta.tensors().into_keys().map(|k| (k, single.clone())).collect());
    }
    if !index.exists() {
        bail!("{}: neither {SINGLE_FILE} nor {INDEX_FILE} found", dir.display());
    }
    let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: missing field `weight_map`", index.display()))?;
    let mut out = BTreeMap::new();
    for (name, file) in map {
        let file =
            file.as_str().with_context(|| format!("{}: `weight_map.{name}` must be a file name", index.display()))?;
        let path = dir.join(file);
        if !path.exists() {
            bail!("{}: tensor `{name}` is in shard {file}, which does not exist", index.display());
        }
        out.insert(name.clone(), path);
    }
    Ok(out)
}

fn to_f32(view: &TensorView, name: &str, file: &Path) -> Result<Vec<f32>> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => bail!("{}: tensor `{name}` has dtype {other:?}; expected F32, BF16 or F16", file.display()),
    })
}

/// Reads the tensors named in `specs` (checking each shape), in that order.
pub fn load_tensors(dir: &Path, specs: &[(String, Vec<usize>)]) -> Result<Vec<Vec<f32>>> {
    let map = weight_map(dir)?;
    let wanted: HashMap<&str, usize> = specs.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
    let unexpected: Vec<&String> = map.keys().filter(|k| !wanted.contains_key(k.as_str()) && !ignorable(k)).collect();
    // A tied model may still carry lm_head.weight (some exporters write it); it is the embedding.
    let unexpected: Vec<&String> = unexpected.into_iter().filter(|k| k.as_str() != "lm_head.weight").collect();
    if !unexpected.is_empty() {
        bail!("{}: tensors this LLaMA config does not have: {unexpected:?}", dir.display());
    }
    let mut out: Vec<Option<Vec<f32>>> = vec![None; specs.len()];
    let mut files: BTreeMap<&PathBuf, Vec<&str>> = BTreeMap::new();
    for (name, file) in &map {
        if wanted.contains_key(name.as_str()) {
            files.entry(file).or_default().push(name);
        }
    }
    for (file, names) in files {
        let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        // SAFETY: the file is only read; a concurrent writer would be a misuse we cannot prevent.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("mapping {}", file.display()))?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| {
            anyhow::anyhow!("{}: not a valid safetensors file (truncated or corrupt?): {e}", file.display())
        })?;
        for name in names {
            let i = wanted[name];
            let view = st.tensor(name).map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e}", file.display()))?;
            if view.shape() != specs[i].1.as_slice() {
                bail!(
                    "{}: tensor `{name}` has shape {:?}, the config needs {:?}",
                    file.display(),
                    view.shape(),
                    specs[i].1
                );
            }
            out[i] = Some(to_f32(&view, name, file)?);
        }
    }
    specs
        .iter()
        .zip(out)
        .map(|((name, _), t)| t.with_context(|| format!("{}: tensor `{name}` is missing", dir.display())))
        .collect()
}

impl<B: Backend> Llama<B> {
    /// Loads `config.json` and the weights of a Hugging Face model directory.
    pub fn load(backend: &B, dir: &Path) -> Result<Self> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let tensors = load_tensors(dir, &param_specs(&config))?;
        Llama::from_host(backend, config, tensors)
    }

    /// Writes `config.json` and the weights into `dir` (created if needed): one file, or shards
    /// of at most `max_shard_bytes` with an index. Each file is written atomically; weight files
    /// of an earlier save in another layout are removed afterwards so transformers cannot pick them.
    pub fn save(&self, backend: &B, dir: &Path, dtype: StoreDtype, max_shard_bytes: Option<usize>) -> Result<()> {
        self.to_host(backend).save(dir, dtype, max_shard_bytes)
    }

    /// The model's config and every parameter copied to host memory, to be written later (or on
    /// another thread: an asynchronous checkpoint).
    pub fn to_host(&self, backend: &B) -> HostModel {
        let tensors =
            self.params.iter().map(|p| (p.name.clone(), p.value.shape.clone(), p.value.to_host(backend))).collect();
        HostModel { config: self.config.clone(), tensors }
    }
}

/// A model's config and parameters in host memory (`Llama::to_host`), written as `Llama::save`
/// writes them.
pub struct HostModel {
    pub config: LlamaConfig,
    /// Name, shape, values (f32).
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl HostModel {
    /// See `Llama::save`.
    pub fn save(&self, dir: &Path, dtype: StoreDtype, max_shard_bytes: Option<usize>) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let elem = match dtype {
            StoreDtype::F32 => 4,
            StoreDtype::BF16 => 2,
        };
        let encoded: Vec<(&String, &Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(name, shape, host)| {
                let bytes: Vec<u8> = match dtype {
                    StoreDtype::F32 => host.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    StoreDtype::BF16 => host.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
                };
                (name, shape, bytes)
            })
            .collect();
        let mut shards: Vec<Vec<usize>> = vec![vec![]];
        let mut size = 0;
        for (i, (_, shape, _)) in encoded.iter().enumerate() {
            let bytes = shape.iter().product::<usize>() * elem;
            if let Some(max) = max_shard_bytes {
                if size > 0 && size + bytes > max {
                    shards.push(vec![]);
                    size = 0;
                }
            }
            size += bytes;
            shards.last_mut().unwrap().push(i);
        }
        let st_dtype = if dtype == StoreDtype::F32 { Dtype::F32 } else { Dtype::BF16 };
        let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        let names: Vec<String> = if shards.len() == 1 {
            vec![SINGLE_FILE.to_string()]
        } else {
            (1..=shards.len()).map(|i| format!("model-{i:05}-of-{:05}.safetensors", shards.len())).collect()
        };
        let mut weight_map = serde_json::Map::new();
        for (shard, file) in shards.iter().zip(&names) {
            let views: Vec<(&str, TensorView)> = shard
                .iter()
                .map(|&i| {
                    let (name, shape, bytes) = &encoded[i];
                    weight_map.insert(name.to_string(), file.clone().into());
                    (name.as_str(), TensorView::new(st_dtype, shape.to_vec(), bytes).expect("sizes match"))
                })
                .collect();
            let bytes = safetensors::serialize(views, metadata.clone())?;
            write_atomic(&dir.join(file), &bytes)?;
        }
        if shards.len() > 1 {
            let total: usize = encoded.iter().map(|(_, _, b)| b.len()).sum();
            let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            write_atomic(&dir.join(INDEX_FILE), serde_json::to_string_pretty(&index)?.as_bytes())?;
        }
        let mut keep = names;
        if shards.len() > 1 {
            keep.push(INDEX_FILE.to_string());
        }
        remove_stale_weight_files(dir, &keep)?;
        self.config.save(dir)
    }
}

/// Removes weight files of another layout (written before), after the new ones are in place.
fn remove_stale_weight_files(dir: &Path, keep: &[String]) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if keep.iter().any(|k| k == name) {
            continue;
        }
        if name == SINGLE_FILE || name == INDEX_FILE || (name.starts_with("model-") && name.ends_with(".safetensors")) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}
