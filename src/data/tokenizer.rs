//! Tokenization through the Hugging Face `tokenizers` crate, with BOS/EOS resolved from the
//! model's `config.json` and the tokenizer's own files.
//!
//! Every document becomes `[BOS] + tokens(source + target) + [EOS]` (Colossal-LLaMA-2's
//! pre-training layout). Text is encoded with `add_special_tokens = false` and BOS/EOS are added
//! here, so the result does not depend on the post-processor's template:
//!
//! * ids: `bos_token_id` / `eos_token_id` of the model `config.json` when given; otherwise the
//!   `bos_token` / `eos_token` of a `tokenizer_config.json` next to `tokenizer.json`; otherwise
//!   the first of `<s>`, `<|begin_of_text|>` (BOS) and `</s>`, `<|end_of_text|>`,
//!   `<|endoftext|>` (EOS) that the vocabulary holds.
//! * BOS is added when `tokenizer_config.json` says `add_bos_token: true`, or (without that key)
//!   when the tokenizer's post-processor itself prepends the BOS id.
//! * EOS is added whenever the tokenizer has one: packed documents need a separator, and the
//!   model must learn where a document ends (HF's `add_eos_token` defaults to false because HF
//!   does not pack; Colossal forces it on for pre-training). `--no-eos` turns it off.
//!
//! Loss mask: tokens whose byte span starts inside `source` (and the BOS of a record with a
//! source) get mask 0; every other token, EOS included, mask 1.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::Tokenizer;

use super::corpus::Document;

/// Overrides for BOS/EOS handling (`None` = as the model config and tokenizer say).
#[derive(Clone, Debug, Default)]
pub struct SpecialTokenOptions {
    pub model_config: Option<PathBuf>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
}

pub struct TextTokenizer {
    tok: Tokenizer,
    pub path: PathBuf,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    /// From the model config when given, else the tokenizer's size with added tokens.
    pub vocab_size: u64,
    /// XXH64 of the tokenizer.json bytes (recorded in manifests).
    pub checksum: u64,
    /// `clean_up_tokenization_spaces` of `tokenizer_config.json` (false when absent, transformers'
    /// default since 4.45): [`TextTokenizer::decode`] then tidies spaces before punctuation.
    pub clean_up_tokenization_spaces: bool,
}

fn token_str(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// A JSON file (a model config, a tokenizer config), with its path in every error.
fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

fn first_id(v: Option<&serde_json::Value>) -> Option<u32> {
    match v? {
        serde_json::Value::Number(n) => n.as_u64().map(|x| x as u32),
        serde_json::Value::Array(a) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

impl TextTokenizer {
    pub fn load(tokenizer_json: &Path, opts: &SpecialTokenOptions) -> Result<TextTokenizer> {
        let bytes =
            std::fs::read(tokenizer_json).with_context(|| format!("reading tokenizer {}", tokenizer_json.display()))?;
        let tok = Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow!("loading tokenizer {}: {e}", tokenizer_json.display()))?;
        let checksum = super::hash::xxh64(&bytes, 0);

        let model_cfg = opts.model_config.as_deref().map(read_json).transpose()?;
        let tc_path = tokenizer_json.with_file_name("tokenizer_config.json");
        let tok_cfg = if tc_path.exists() { Some(read_json(&tc_path)?) } else { None };
        let resolve = |cfg_key: &str, tc_key: &str, fallbacks: &[&str]| -> Option<u32> {
            if let Some(id) = model_cfg.as_ref().and_then(|c| first_id(c.get(cfg_key))) {
                return Some(id);
            }
            if let Some(s) = tok_cfg.as_ref().and_then(|c| c.get(tc_key)).and_then(token_str) {
                if let Some(id) = tok.token_to_id(&s) {
                    return Some(id);
                }
            }
            fallbacks.iter().find_map(|s| tok.token_to_id(s))
        };
        let bos = resolve("bos_token_id", "bos_token", &["<s>", "<|begin_of_text|>"]);
        let eos = resolve("eos_token_id", "eos_token", &["</s>", "<|end_of_text|>", "<|endoftext|>"]);

        let add_bos = match opts.add_bos {
            Some(b) => b,
            None => match tok_cfg.as_ref().and_then(|c| c.get("add_bos_token")).and_then(|v| v.as_bool()) {
                Some(b) => b,
                None => match bos {
                    Some(b) => {
                        let e = tok.encode("a", true).map_err(|e| anyhow!("probing post-processor: {e}"))?;
                        e.get_ids().first() == Some(&b)
                    }
                    None => false,
                },
            },
        };
        let add_eos = opts.add_eos.unwrap_or(eos.is_some());
        if add_bos && bos.is_none() {
            bail!("{}: BOS requested but the tokenizer has no BOS token", tokenizer_json.display());
        }
        if add_eos && eos.is_none() {
            bail!("{}: EOS requested but the tokenizer has no EOS token", tokenizer_json.display());
        }
        let tok_vocab = tok.get_vocab_size(true) as u64;
        let vocab_size = match model_cfg.as_ref().and_then(|c| c.get("vocab_size")).and_then(|v| v.as_u64()) {
            Some(v) => {
                if v < tok_vocab {
                    // Some ids of the tokenizer would not fit the embedding; the writer rejects them.
                    eprintln!(
                        "warning: model vocab_size {v} < tokenizer size {tok_vocab} ({})",
                        tokenizer_json.display()
                    );
                }
                v
            }
            None => tok_vocab,
        };
        let clean_up_tokenization_spaces = tok_cfg
            .as_ref()
            .and_then(|c| c.get("clean_up_tokenization_spaces"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(TextTokenizer {
            tok,
            path: tokenizer_json.to_path_buf(),
            bos,
            eos,
            add_bos,
            add_eos,
            vocab_size,
            checksum,
            clean_up_tokenization_spaces,
        })
    }

    /// The tokenizer of a model directory for inference (evaluation, generation): `tokenizer`
    /// or the directory's tokenizer.json, BOS as the tokenizer and config.json say, no EOS.
    pub fn for_model(model_dir: &Path, tokenizer: Option<&Path>) -> Result<TextTokenizer> {
        let path = tokenizer.map_or_else(|| model_dir.join("tokenizer.json"), Path::to_path_buf);
        Self::for_inference(&path, &model_dir.join("config.json"))
    }

    /// As [`TextTokenizer::for_model`] with the two files named (the trainer's validation, before
    /// any model directory exists).
    pub fn for_inference(tokenizer_json: &Path, model_config: &Path) -> Result<TextTokenizer> {
        let opts =
            SpecialTokenOptions { model_config: Some(model_config.to_path_buf()), add_bos: None, add_eos: Some(false) };
        Self::load(tokenizer_json, &opts)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tok
    }

    /// Ids to text as transformers' `decode` gives it (special tokens skipped when asked), spaces
    /// tidied when the tokenizer config asks for it. transformers 4.x (ColossalAI pins 4.51.3)
    /// tidies for every tokenizer model; 5.x passes over BPE models unless
    /// `clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output` is set; this
    /// follows 4.x, as ColossalEval runs on it.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self.tok.decode(ids, skip_special_tokens).map_err(|e| anyhow!("decoding: {e}"))?;
        Ok(if self.clean_up_tokenization_spaces { clean_up_tokenization(&text) } else { text })
    }

    /// Plain encoding of a text, no special tokens.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let e = self.tok.encode_fast(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(e.get_ids().to_vec())
    }

    /// Tokens and loss mask of one document (BOS/EOS included as configured).
    pub fn encode_doc(&self, doc: &Document) -> Result<(Vec<u32>, Vec<u8>)> {
        let ctx = || format!("tokenizing {}:{}", doc.file.display(), doc.line);
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        if self.add_bos {
            ids.push(self.bos.unwrap());
            mask.push(if doc.source.is_empty() { 1 } else { 0 });
        }
        if doc.source.is_empty() {
            let e = self.tok.encode_fast(doc.target.as_str(), false).map_err(|e| anyhow!("{e}")).with_context(ctx)?;
            ids.extend_from_slice(e.get_ids());
            mask.resize(ids.len(), 1);
        } else {
            let full = format!("{}{}", doc.source, doc.target);
            let e = self.tok.encode(full.as_str(), false).map_err(|e| anyhow!("{e}")).with_context(ctx)?;
            let n_src = doc.source.len();
            ids.extend_from_slice(e.get_ids());
            mask.extend(e.get_offsets().iter().map(|&(start, _)| u8::from(start >= n_src)));
        }
        if self.add_eos {
            ids.push(self.eos.unwrap());
            mask.push(1);
        }
        Ok((ids, mask))
    }
}

/// transformers' `clean_up_tokenization`: the space before `.`, `?`, `!`, `,` and English
/// contractions goes, in this order.
pub fn clean_up_tokenization(text: &str) -> String {
    [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ]
    .iter()
    .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
}
