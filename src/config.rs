//! The Hugging Face `config.json` of a LLaMA-family model.
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// What llama-cpt needs from `config.json`. The original JSON is kept so that saving writes back
/// every field it did not understand (a checkpoint round-trips through llama-cpt unchanged).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The JSON it was read from (or an empty object for configs built in code).
    pub raw: Map<String, Value>,
}

fn field<'a>(obj: &'a Map<String, Value>, key: &str, origin: &str) -> Result<&'a Value> {
    obj.get(key).with_context(|| format!("{origin}: missing field `{key}`"))
}

fn positive(obj: &Map<String, Value>, key: &str, origin: &str) -> Result<usize> {
    let v = field(obj, key, origin)?;
    match v.as_u64() {
        Some(n) if n > 0 => Ok(n as usize),
        _ => bail!("{origin}: field `{key}` must be a positive integer, found {v}"),
    }
}

fn opt_positive(obj: &Map<String, Value>, key: &str, origin: &str) -> Result<Option<usize>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => positive(obj, key, origin).map(Some),
    }
}

fn number(v: &Value, key: &str, origin: &str) -> Result<f64> {
    match v.as_f64() {
        Some(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => bail!("{origin}: field `{key}` must be a positive number, found {v}"),
    }
}

fn token_ids(v: Option<&Value>, key: &str, origin: &str) -> Result<Vec<u32>> {
    let one = |v: &Value| {
        v.as_u64().map(|n| n as u32).with_context(|| format!("{origin}: field `{key}` must hold token ids, found {v}"))
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// RoPE θ: transformers ≥ 5 nests rope settings in `rope_parameters`; earlier versions use
/// `rope_theta` and `rope_scaling`. Only plain (unscaled) RoPE is implemented.
fn rope_theta(obj: &Map<String, Value>, origin: &str) -> Result<f64> {
    Ok(match obj.get("rope_parameters") {
        Some(Value::Object(rp)) => {
            if let Some(t) = rp.get("rope_type").and_then(Value::as_str) {
                if t != "default" {
                    bail!("{origin}: field `rope_parameters.rope_type` is {t:?}; only \"default\" RoPE is supported");
                }
            }
            number(
                field(rp, "rope_theta", origin).context("in `rope_parameters`")?,
                "rope_parameters.rope_theta",
                origin,
            )?
        }
        Some(Value::Null) | None => match obj.get("rope_theta") {
            Some(v) => number(v, "rope_theta", origin)?,
            None => 10_000.0,
        },
        Some(v) => bail!("{origin}: field `rope_parameters` must be an object, found {v}"),
    })
}

/// Fields that would make a model other than plain LLaMA: scaled RoPE, biases, an activation
/// other than SiLU.
fn check_unsupported_features(obj: &Map<String, Value>, origin: &str) -> Result<()> {
    if let Some(v) = obj.get("rope_scaling") {
        if !v.is_null() {
            bail!("{origin}: field `rope_scaling` is set ({v}); scaled RoPE is not supported");
        }
    }
    for key in ["attention_bias", "mlp_bias"] {
        if obj.get(key).and_then(Value::as_bool) == Some(true) {
            bail!("{origin}: field `{key}` is true; llama-cpt's LLaMA has no biases");
        }
    }
    if let Some(act) = obj.get("hidden_act") {
        if act.as_str() != Some("silu") {
            bail!("{origin}: field `hidden_act` is {act}; only \"silu\" (SwiGLU) is supported");
        }
    }
    Ok(())
}

impl LlamaConfig {
    /// Reads and checks `config.json`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<LlamaConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_json(value, &path.display().to_string())
    }

    /// Parses a config object; `origin` names where it came from in errors.
    pub fn from_json(value: Value, origin: &str) -> Result<LlamaConfig> {
        let Value::Object(obj) = value else { bail!("{origin}: expected a JSON object") };
        if let Some(mt) = obj.get("model_type").and_then(Value::as_str) {
            if !matches!(mt, "llama" | "mistral" | "qwen2") && !mt.is_empty() {
                bail!("{origin}: field `model_type` is {mt:?}; llama-cpt runs LLaMA-architecture models");
            }
        }
        let vocab_size = positive(&obj, "vocab_size", origin)?;
        let hidden_size = positive(&obj, "hidden_size", origin)?;
        let intermediate_size = positive(&obj, "intermediate_size", origin)?;
        let num_hidden_layers = positive(&obj, "num_hidden_layers", origin)?;
        let num_attention_heads = positive(&obj, "num_attention_heads", origin)?;
        let num_key_value_heads = opt_positive(&obj, "num_key_value_heads", origin)?.unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            bail!("{origin}: field `num_key_value_heads` ({num_key_value_heads}) must divide `num_attention_heads` ({num_attention_heads})");
        }
        let head_dim = match opt_positive(&obj, "head_dim", origin)? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => bail!("{origin}: field `hidden_size` ({hidden_size}) is not a multiple of `num_attention_heads` ({num_attention_heads})"),
        };
        if head_dim % 2 != 0 {
            bail!("{origin}: field `head_dim` ({head_dim}) must be even for rotary embeddings");
        }
        let rms_norm_eps = number(field(&obj, "rms_norm_eps", origin)?, "rms_norm_eps", origin)?;
        let rope_theta = rope_theta(&obj, origin)?;
        check_unsupported_features(&obj, origin)?;
        let max_position_embeddings = opt_positive(&obj, "max_position_embeddings", origin)?.unwrap_or(4096);
        let tie_word_embeddings = match obj.get("tie_word_embeddings") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => bail!("{origin}: field `tie_word_embeddings` must be true or false, found {v}"),
        };
        let bos = token_ids(obj.get("bos_token_id"), "bos_token_id", origin)?;
        let eos_token_ids = token_ids(obj.get("eos_token_id"), "eos_token_id", origin)?;
        for &id in bos.iter().chain(&eos_token_ids) {
            if id as usize >= vocab_size {
                bail!("{origin}: special token id {id} is outside the vocabulary (vocab_size {vocab_size})");
            }
        }
        Ok(LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings,
            tie_word_embeddings,
            bos_token_id: bos.first().copied(),
            eos_token_ids,
            raw: obj,
        })
    }

    /// The JSON transformers reads: the original fields with ours written over them. RoPE θ goes
    /// both to `rope_parameters` (transformers ≥ 5) and `rope_theta` (earlier versions).
    pub fn to_json(&self) -> Value {
        let mut obj = self.raw.clone();
        let mut set = |k: &str, v: Value| {
            obj.insert(k.to_string(), v);
        };
        set("architectures", serde_json::json!(["LlamaForCausalLM"]));
        set("model_type", "llama".into());
        set("vocab_size", self.vocab_size.into());
        set("hidden_size", self.hidden_size.into());
        set("intermediate_size", self.intermediate_size.into());
        set("num_hidden_layers", self.num_hidden_layers.into());
        set("num_attention_heads", self.num_attention_heads.into());
        set("num_key_value_heads", self.num_key_value_heads.into());
        set("head_dim", self.head_dim.into());
        set("rms_norm_eps", self.rms_norm_eps.into());
        set("rope_theta", self.rope_theta.into());
        set("rope_parameters", serde_json::json!({"rope_theta": self.rope_theta, "rope_type": "default"}));
        set("max_position_embeddings", self.max_position_embeddings.into());
        set("tie_word_embeddings", self.tie_word_embeddings.into());
        set("hidden_act", "silu".into());
        set("attention_bias", false.into());
        set("mlp_bias", false.into());
        if let Some(b) = self.bos_token_id {
            set("bos_token_id", b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => set("eos_token_id", (*one).into()),
            many => set("eos_token_id", many.to_vec().into()),
        }
        Value::Object(obj)
    }

    /// Writes `config.json` into `dir` (atomically: temporary file, then rename).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.to_json())?;
        crate::fsutil::write_atomic(&dir.join("config.json"), text.as_bytes())
    }

    /// A small config built in code (tests, random initialisation).
    #[allow(clippy::too_many_arguments)]
    pub fn small(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        tie: bool,
    ) -> LlamaConfig {
        let value = serde_json::json!({
            "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
            "tie_word_embeddings": tie, "bos_token_id": 1.min(vocab_size - 1), "eos_token_id": 2.min(vocab_size - 1),
        });
        LlamaConfig::from_json(value, "built-in config").expect("a valid built-in config")
    }

    /// Parameters that are not embeddings or the output head (the `N` of 6·N FLOPs per token).
    pub fn non_embedding_params(&self) -> usize {
        let (h, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let attn = h * hd * (self.num_attention_heads * 2 + self.num_key_value_heads * 2);
        self.num_hidden_layers * (attn + 3 * h * f + 2 * h) + h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"vocab_size": 100, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
               "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "eos_token_id": [2, 3]})
    }

    #[test]
    fn reads_transformers_5_and_4_layouts() {
        let c = LlamaConfig::from_json(base(), "t").unwrap();
        assert_eq!((c.rope_theta, c.head_dim, c.eos_token_ids.clone()), (500000.0, 4, vec![2, 3]));
        let mut old = base();
        old.as_object_mut().unwrap().remove("rope_parameters");
        old["rope_theta"] = json!(10000.0);
        assert_eq!(LlamaConfig::from_json(old, "t").unwrap().rope_theta, 10000.0);
        let back = LlamaConfig::from_json(c.to_json(), "t").unwrap();
        assert_eq!(back.rope_theta, c.rope_theta);
        assert_eq!(back.to_json(), c.to_json());
    }

    #[test]
    fn bad_fields_are_named() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("hidden_size", Value::Null, "missing field `hidden_size`"),
            ("hidden_size", json!(-3), "`hidden_size` must be a positive integer"),
            ("num_key_value_heads", json!(3), "must divide"),
            ("rms_norm_eps", json!("small"), "`rms_norm_eps` must be a positive number"),
            ("rope_scaling", json!({"type": "linear", "factor": 2.0}), "`rope_scaling`"),
            ("hidden_act", json!("gelu"), "`hidden_act`"),
            ("eos_token_id", json!(500), "outside the vocabulary"),
        ];
        for (key, val, want) in cases {
            let mut v = base();
            if val.is_null() {
                v.as_object_mut().unwrap().remove(key);
            } else {
                v[key] = val;
            }
            let err = format!("{:#}", LlamaConfig::from_json(v, "dir/config.json").unwrap_err());
            assert!(err.contains(want) && err.contains("dir/config.json"), "{key}: {err}");
        }
    }
}
