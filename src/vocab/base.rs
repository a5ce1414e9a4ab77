//! The base tokenizer: its layout (byte-level or SentencePiece-style), the internal form of text,
//! its merges.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::{ModelWrapper, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

/// How a tokenizer maps text to the strings its BPE model sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum TokenizerKind {
    /// GPT-2/LLaMA-3 style: bytes mapped to printable characters (`Ġ` = space).
    ByteLevel,
    /// SentencePiece style (LLaMA-1/2, Mistral): spaces become `▁`, a `▁` is prepended to the text,
    /// unknown characters fall back to `<0xXX>` byte tokens. Either layout: a normalizer
    /// (`Prepend("▁")` + `Replace(" ", "▁")`, `pre_tokenizer: null`, as Meta's Llama-2-7b-hf ships)
    /// or a Metaspace pre-tokenizer (`legacy: false` conversions).
    Metaspace,
    /// Anything else: pieces are used as they are.
    Plain,
}

/// The GPT-2 byte ↔ character table of byte-level BPE.
pub fn byte_level_table() -> [char; 256] {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut t = ['\0'; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        t[b as usize] = char::from_u32(c).unwrap();
    }
    t
}

fn json_has_type(v: &Value, ty: &str) -> bool {
    match v {
        Value::Object(o) => {
            o.get("type").and_then(Value::as_str) == Some(ty) || o.values().any(|x| json_has_type(x, ty))
        }
        Value::Array(a) => a.iter().any(|x| json_has_type(x, ty)),
        _ => false,
    }
}

fn json_mentions(v: &Value, s: &str) -> bool {
    match v {
        Value::String(x) => x == s,
        Value::Object(o) => o.values().any(|x| json_mentions(x, s)),
        Value::Array(a) => a.iter().any(|x| json_mentions(x, s)),
        _ => false,
    }
}

/// A base `tokenizer.json` (BPE model) and what the extender needs to know about it.
pub struct BaseTokenizer {
    pub path: PathBuf,
    pub tok: Tokenizer,
    pub kind: TokenizerKind,
    /// Number of ids in use (max id of the model vocabulary and added tokens, plus one).
    pub size: u32,
    json: Value,
    table: [char; 256],
    untable: HashMap<char, u8>,
}

impl BaseTokenizer {
    pub fn load(path: &Path) -> Result<BaseTokenizer> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading tokenizer {}", path.display()))?;
        let json: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let tok =
            Tokenizer::from_bytes(text.as_bytes()).map_err(|e| anyhow!("loading tokenizer {}: {e}", path.display()))?;
        let ModelWrapper::BPE(bpe) = tok.get_model() else {
            bail!("{}: the tokenizer model is not BPE; vocabulary extension supports BPE tokenizer.json files (LLaMA-2/3 style)", path.display());
        };
        if bpe.continuing_subword_prefix.is_some() || bpe.end_of_word_suffix.is_some() {
            bail!("{}: BPE with continuing_subword_prefix/end_of_word_suffix is not supported", path.display());
        }
        let pre = json.get("pre_tokenizer").cloned().unwrap_or(Value::Null);
        let norm = json.get("normalizer").cloned().unwrap_or(Value::Null);
        let kind = if json_has_type(&pre, "ByteLevel") {
            TokenizerKind::ByteLevel
        } else if json_has_type(&pre, "Metaspace") || json_mentions(&norm, "▁") {
            TokenizerKind::Metaspace
        } else {
            TokenizerKind::Plain
        };
        let max_model = bpe.get_vocab().values().copied().max();
        let max_added = tok.get_added_tokens_decoder().keys().copied().max();
        let size = max_model.max(max_added).map_or(0, |m| m + 1);
        let table = byte_level_table();
        let untable = table.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        Ok(BaseTokenizer { path: path.to_path_buf(), tok, kind, size, json, table, untable })
    }

    pub(super) fn bpe(&self) -> &BPE {
        match self.tok.get_model() {
            ModelWrapper::BPE(b) => b,
            _ => unreachable!(),
        }
    }

    /// The string the BPE model sees for a piece of text.
    pub fn internal(&self, text: &str) -> String {
        match self.kind {
            TokenizerKind::ByteLevel => text.bytes().map(|b| self.table[b as usize]).collect(),
            TokenizerKind::Metaspace => text.replace(' ', "▁"),
            TokenizerKind::Plain => text.to_string(),
        }
    }

    /// The text of an internal string (`None` when byte-level bytes are not valid UTF-8).
    pub fn text(&self, internal: &str) -> Option<String> {
        match self.kind {
            TokenizerKind::ByteLevel => {
                let bytes: Option<Vec<u8>> = internal.chars().map(|c| self.untable.get(&c).copied()).collect();
                String::from_utf8(bytes?).ok()
            }
            TokenizerKind::Metaspace => Some(internal.replace('▁', " ")),
            TokenizerKind::Plain => Some(internal.to_string()),
        }
    }

    /// Whether the base spells numbers one digit per token (no token holds two ASCII digits), as
    /// LLaMA-2's `split_digits` does; pieces are then learnt the same way.
    pub fn splits_digits(&self) -> bool {
        !self.bpe().get_vocab().keys().any(|t| t.chars().filter(char::is_ascii_digit).count() >= 2)
    }

    /// How many pre-tokens the tokenizer's pre-tokenizer makes of `text` (a piece must be one).
    pub(super) fn pre_token_count(&self, text: &str) -> Result<usize> {
        match self.tok.get_pre_tokenizer() {
            None => Ok(1),
            Some(pt) => {
                let mut s = PreTokenizedString::from(text);
                pt.pre_tokenize(&mut s).map_err(|e| anyhow!("pre-tokenizing {text:?}: {e}"))?;
                Ok(s.get_splits(OffsetReferential::Original, OffsetType::Byte).len())
            }
        }
    }

    /// The merges of the BPE model, in priority order (both JSON layouts: "a b" and ["a", "b"]).
    pub fn merges(&self) -> Result<Vec<(String, String)>> {
        let list = self.json.pointer("/model/merges").and_then(Value::as_array).cloned().unwrap_or_default();
        list.iter()
            .map(|m| match m {
                Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| anyhow!("{}: merge {s:?} is not \"a b\"", self.path.display())),
                Value::Array(a) if a.len() == 2 && a.iter().all(Value::is_string) => {
                    Ok((a[0].as_str().unwrap().to_string(), a[1].as_str().unwrap().to_string()))
                }
                other => bail!("{}: unexpected merge {other}", self.path.display()),
            })
            .collect()
    }
}
