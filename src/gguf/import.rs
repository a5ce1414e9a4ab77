//! A LLaMA GGUF → a Hugging Face model directory: `config.json` (transformers'
//! `LlamaForCausalLM` layout), F32 `model.safetensors` (dequantised, with llama.cpp's rotary
//! row permutation of Q and K undone), `tokenizer.json` rebuilt from the GGUF vocabulary,
//! `tokenizer_config.json` (special tokens, chat template) and `generation_config.json`.
use super::{GgufFile, TensorInfo, Value};
use crate::config::LlamaConfig;
use crate::cpu::Cpu;
use crate::model::{param_specs, Llama};
use crate::weights::StoreDtype;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use super::tokenizer::{build_tokenizer, pre_tokenizer, GgufTokenizer};

/// The metadata value of `key`, or an error naming the file and the key.
fn meta<'a>(g: &'a GgufFile, key: &str) -> Result<&'a Value> {
    g.get(key).with_context(|| format!("{}: missing metadata `{key}`", g.path.display()))
}

fn meta_u64(g: &GgufFile, key: &str) -> Result<u64> {
    let v = meta(g, key)?;
    v.as_u64().with_context(|| {
        format!("{}: metadata `{key}` must be a non-negative integer, found {} {v:?}", g.path.display(), v.type_name())
    })
}

fn meta_f64(g: &GgufFile, key: &str) -> Result<f64> {
    let v = meta(g, key)?;
    v.as_f64().with_context(|| {
        format!("{}: metadata `{key}` must be a number, found {} {v:?}", g.path.display(), v.type_name())
    })
}

pub(super) fn meta_str<'a>(g: &'a GgufFile, key: &str) -> Result<&'a str> {
    let v = meta(g, key)?;
    v.as_str()
        .with_context(|| format!("{}: metadata `{key}` must be a string, found {}", g.path.display(), v.type_name()))
}

pub(super) fn opt_u64(g: &GgufFile, key: &str) -> Result<Option<u64>> {
    g.get(key).map(|_| meta_u64(g, key)).transpose()
}

/// An array of strings (`tokenizer.ggml.tokens`, `.merges`).
pub(super) fn meta_strings<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let v = meta(g, key)?;
    let items = v
        .as_array()
        .with_context(|| format!("{}: metadata `{key}` must be an array, found {}", g.path.display(), v.type_name()))?;
    items
        .iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_str().with_context(|| {
                format!("{}: metadata `{key}[{i}]` must be a string, found {}", g.path.display(), x.type_name())
            })
        })
        .collect()
}

/// f32 metadata (θ, ε) as the shortest decimal that rounds to it: 1e-5, not 9.999999747e-6.
fn tidy_f32(x: f64) -> f64 {
    (x as f32).to_string().parse().unwrap_or(x)
}

/// The `config.json` of the GGUF's model. Only plain LLaMA (no experts, no RoPE scaling, full
/// rotary head) is accepted; errors name the file and the metadata key.
pub fn llama_config(g: &GgufFile) -> Result<LlamaConfig> {
    let origin = g.path.display().to_string();
    check_plain_llama(g, &origin)?;
    let hidden = meta_u64(g, &llama_key("embedding_length"))?;
    let (heads, kv_heads, head_dim) = attention_shape(g, &origin, hidden)?;
    let vocab = vocab_rows(g, &origin, hidden)?;
    let tie = g.tensor("output.weight").is_none();
    let k = llama_key;
    let rope_theta = match g.get(&k("rope.freq_base")) {
        Some(_) => tidy_f32(meta_f64(g, &k("rope.freq_base"))?),
        None => 10_000.0, // llama.cpp's default
    };
    let id = |key: &str| opt_u64(g, &format!("tokenizer.ggml.{key}"));
    let mut cfg = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta_u64(g, &k("feed_forward_length"))?,
        "num_hidden_layers": meta_u64(g, &k("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": tidy_f32(meta_f64(g, &k("attention.layer_norm_rms_epsilon"))?),
        "rope_theta": rope_theta,
        "max_position_embeddings": meta_u64(g, &k("context_length"))?,
        "tie_word_embeddings": tie,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "initializer_range": 0.02,
        "dtype": "float32",
    });
    for (field, key) in
        [("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")]
    {
        if let Some(v) = id(key)? {
            cfg[field] = v.into();
        }
    }
    if let Some(name) = g.get("general.name").and_then(Value::as_str) {
        cfg["llama_cpt_imported_from"] = json!({"gguf": g.path.file_name().map(|n| n.to_string_lossy()), "name": name});
    }
    LlamaConfig::from_json(cfg, &format!("{origin} (as config.json)"))
}

/// The metadata key `llama.<s>`.
fn llama_key(s: &str) -> String {
    format!("llama.{s}")
}

/// Refuses what llama-cpt does not run: another architecture, experts, scaled RoPE.
fn check_plain_llama(g: &GgufFile, origin: &str) -> Result<()> {
    let k = llama_key;
    let arch = meta_str(g, "general.architecture")?;
    if arch != "llama" {
        bail!("{origin}: metadata `general.architecture` is {arch:?}; import-gguf converts \"llama\" models only");
    }
    if opt_u64(g, &k("expert_count"))?.unwrap_or(0) > 0 {
        bail!(
            "{origin}: metadata `llama.expert_count` is set: a mixture-of-experts model, which llama-cpt does not run"
        );
    }
    if let Some(v) = g.get(&k("rope.scaling.type")) {
        if v.as_str() != Some("none") {
            bail!("{origin}: metadata `llama.rope.scaling.type` is {v:?}; scaled RoPE is not supported");
        }
    }
    if g.tensor("rope_freqs.weight").is_some() {
        bail!("{origin}: tensor `rope_freqs.weight` (LLaMA-3.1 RoPE frequency scaling) is not supported");
    }
    Ok(())
}

/// (heads, KV heads, head size), checked against each other and the full rotary head.
fn attention_shape(g: &GgufFile, origin: &str, hidden: u64) -> Result<(u64, u64, u64)> {
    let k = llama_key;
    let heads = meta_u64(g, &k("attention.head_count"))?;
    let kv_heads = opt_u64(g, &k("attention.head_count_kv"))?.unwrap_or(heads);
    if heads == 0 {
        bail!("{origin}: metadata `llama.attention.head_count` is 0");
    }
    let head_dim = match opt_u64(g, &k("attention.key_length"))? {
        Some(d) => d,
        None if hidden.is_multiple_of(heads) => hidden / heads,
        None => bail!("{origin}: metadata `llama.embedding_length` ({hidden}) is not a multiple of `llama.attention.head_count` ({heads})"),
    };
    if let Some(v) = opt_u64(g, &k("attention.value_length"))? {
        if v != head_dim {
            bail!("{origin}: metadata `llama.attention.value_length` ({v}) differs from the key length ({head_dim})");
        }
    }
    if let Some(r) = opt_u64(g, &k("rope.dimension_count"))? {
        if r != head_dim {
            bail!("{origin}: metadata `llama.rope.dimension_count` ({r}) is not the head size ({head_dim}); partial rotary embeddings are not supported");
        }
    }
    Ok((heads, kv_heads, head_dim))
}

/// The vocabulary size: the rows of `token_embd.weight`, which `llama.vocab_size` must match.
fn vocab_rows(g: &GgufFile, origin: &str, hidden: u64) -> Result<u64> {
    let embd =
        g.tensor("token_embd.weight").with_context(|| format!("{origin}: tensor `token_embd.weight` is missing"))?;
    if embd.dims.len() != 2 || embd.dims[0] != hidden {
        bail!("{origin}: tensor `token_embd.weight` has dimensions {:?}; expected [{hidden}, vocab]", embd.dims);
    }
    let vocab = embd.dims[1];
    if let Some(v) = opt_u64(g, &llama_key("vocab_size"))? {
        if v != vocab {
            bail!("{origin}: metadata `llama.vocab_size` ({v}) differs from the rows of `token_embd.weight` ({vocab})");
        }
    }
    Ok(vocab)
}

/// The GGUF name of a transformers parameter (llama.cpp's `tensor_mapping.py`, for LLaMA).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let g = match part.strip_suffix(".weight")? {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.weight"))
}

/// llama.cpp's converter stores Q and K with each head's rows reordered for its interleaved
/// (GPT-J style) rotary: `w.reshape(n_head, 2, head_dim/2, cols).swapaxes(1, 2)`, so file row
/// `h·hd + 2i + j` is transformers' row `h·hd + j·hd/2 + i`. This maps the rows back.
pub fn unpermute_rows(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let (src, dst) = (h * hd + 2 * i + j, h * hd + j * half + i);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Every parameter of `config`, in [`param_specs`] order, decoded from the GGUF (Q and K rows
/// unpermuted). `on_tensor(i, n, name)` is called before each one. GGUF tensors the model has no
/// place for are an error (they would be silently dropped).
pub fn convert_tensors(
    g: &GgufFile,
    config: &LlamaConfig,
    on_tensor: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<Vec<f32>>> {
    let origin = g.path.display();
    let specs = param_specs(config);
    let mut used = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(specs.len());
    for (i, (hf, shape)) in specs.iter().enumerate() {
        let name = gguf_name(hf).expect("every LLaMA parameter has a GGUF name");
        on_tensor(i, specs.len(), &name);
        let t: &TensorInfo = g.tensor(&name).with_context(|| format!("{origin}: tensor `{name}` ({hf}) is missing"))?;
        if &t.shape() != shape {
            bail!(
                "{origin}: tensor `{name}` has shape {:?} (GGUF dims {:?}); the config needs {shape:?} for {hf}",
                t.shape(),
                t.dims
            );
        }
        let mut w = g.dequantize(t)?;
        if name.ends_with("attn_q.weight") {
            w = unpermute_rows(&w, config.num_attention_heads, config.hidden_size);
        } else if name.ends_with("attn_k.weight") {
            w = unpermute_rows(&w, config.num_key_value_heads, config.hidden_size);
        }
        used.insert(name);
        out.push(w);
    }
    let extra: Vec<&str> = g.tensors.iter().map(|t| t.name.as_str()).filter(|n| !used.contains(*n)).collect();
    if !extra.is_empty() {
        bail!("{origin}: tensors a LLaMA model has no place for: {extra:?}");
    }
    Ok(out)
}

/// What an import produced.
pub struct ImportSummary {
    pub config: LlamaConfig,
    pub params: usize,
    /// GGML type name → number of tensors.
    pub tensor_types: BTreeMap<String, usize>,
    pub tokens: usize,
    pub merges: usize,
    pub special: Vec<String>,
    pub pre: String,
    pub chat_template: bool,
    pub warnings: Vec<String>,
}

/// Removes a half-written output folder unless disarmed.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Imports `src` into the model directory `out`. Everything is written into a temporary folder
/// beside `out` and renamed into place at the end, so a failure leaves no half-written model.
/// An existing `out` is an error unless `force` (then it is replaced only once the new one is
/// complete). `on_tensor(i, n, name)` reports progress.
pub fn import(
    src: &Path,
    out: &Path,
    force: bool,
    on_tensor: &mut dyn FnMut(usize, usize, &str),
) -> Result<ImportSummary> {
    if out.exists() && !force {
        bail!("{}: already exists (remove it, or pass --force to replace it)", out.display());
    }
    let g = GgufFile::open(src)?;
    let config = llama_config(&g)?;
    let tok = build_tokenizer(&g)?;
    let tok_size = tok.tokenizer.get_vocab_size(true);
    if tok_size > config.vocab_size {
        bail!(
            "{}: the tokenizer has {tok_size} tokens but the embedding only {} rows",
            src.display(),
            config.vocab_size
        );
    }
    let tensors = convert_tensors(&g, &config, on_tensor)?;
    let mut tensor_types = BTreeMap::new();
    for t in &g.tensors {
        *tensor_types.entry(t.ggml_type.name()).or_insert(0) += 1;
    }

    let name = out.file_name().with_context(|| format!("{}: not a directory name", out.display()))?.to_string_lossy();
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.import-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut guard = TempDir(Some(tmp.clone()));

    let model = Llama::from_host(&Cpu, config.clone(), tensors)?;
    model.save(&Cpu, &tmp, StoreDtype::F32, None)?;
    let params = model.num_params();
    drop(model);
    let tok_json = tok.tokenizer.to_string(true).map_err(|e| anyhow!("serialising tokenizer.json: {e}"))?;
    crate::fsutil::write_atomic(&tmp.join("tokenizer.json"), tok_json.as_bytes())?;
    crate::fsutil::write_atomic(
        &tmp.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tok.tokenizer_config)?.as_bytes(),
    )?;
    let mut gen = json!({});
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = config.raw.get(key) {
            gen[key] = v.clone();
        }
    }
    crate::fsutil::write_atomic(&tmp.join("generation_config.json"), serde_json::to_string_pretty(&gen)?.as_bytes())?;

    if out.exists() {
        // --force: the old directory goes only after the new one is complete.
        let old = parent.join(format!(".{name}.replaced-{}", std::process::id()));
        std::fs::rename(out, &old).with_context(|| format!("moving the old {} aside", out.display()))?;
        std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    }
    guard.0 = None;
    Ok(ImportSummary {
        config,
        params,
        tensor_types,
        tokens: tok.tokens,
        merges: tok.merges,
        special: tok.special,
        pre: tok.pre,
        chat_template: tok.tokenizer_config.get("chat_template").is_some(),
        warnings: tok.warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's `permute(w, n_head)` on rows.
    fn permute_rows(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
        let rows = w.len() / cols;
        let (hd, half) = (rows / n_head, rows / n_head / 2);
        let mut out = vec![0f32; w.len()];
        // Source index (h, j, i) of shape (n_head, 2, half) goes to (h, i, j) of (n_head, half, 2).
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..half {
                    let (src, dst) = (h * hd + j * half + i, h * hd + i * 2 + j);
                    out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // One head of size 4, one column: rows [0 1 2 3] are stored as [0 2 1 3].
        assert_eq!(unpermute_rows(&[0., 2., 1., 3.], 1, 1), [0., 1., 2., 3.]);
        let (n_head, hd, cols) = (3, 8, 5);
        let w: Vec<f32> = (0..n_head * hd * cols).map(|x| x as f32).collect();
        let p = permute_rows(&w, n_head, cols);
        assert_ne!(p, w);
        assert_eq!(unpermute_rows(&p, n_head, cols), w);
    }

    #[test]
    fn gguf_names() {
        assert_eq!(gguf_name("model.layers.12.self_attn.o_proj.weight").as_deref(), Some("blk.12.attn_output.weight"));
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(gguf_name("lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(gguf_name("model.layers.0.mlp.experts.weight"), None);
    }
}
