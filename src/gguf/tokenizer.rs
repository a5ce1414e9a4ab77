//! The tokenizer half of the GGUF import: a byte-level BPE `tokenizer.json` and its
//! `tokenizer_config.json`, rebuilt from the GGUF's `tokenizer.*` metadata as llama.cpp reads it.
//! Public through [`super::import`].
use super::import::{meta_str, meta_strings, opt_u64};
use super::{GgufFile, Value};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// GPT-2's split (the `tokenizers` ByteLevel pre-tokenizer's own regex).
fn gpt2_split() -> PreTokenizerWrapper {
    ByteLevel::new(false, true, true).into()
}

/// A regex split before a ByteLevel that only maps bytes.
fn regex_split(pattern: &str) -> Result<PreTokenizerWrapper> {
    let split = Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| anyhow!("split regex: {e}"))?;
    Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` name (llama-vocab.cpp), and
/// whether BPE takes a word that is itself a token whole (llama.cpp's `ignore_merges`, LLaMA-3).
pub fn pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    Ok(match pre {
        "gpt2" | "mpt" | "olmo" | "jais" | "trillion" => (gpt2_split(), false),
        // Every digit on its own, then GPT-2's split.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            (Sequence::new(vec![Digits::new(true).into(), gpt2_split()]).into(), false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => (regex_split(LLAMA3_SPLIT)?, true),
        "qwen2" | "deepseek-r1-qwen" => (regex_split(QWEN2_SPLIT)?, false),
        other => bail!(
            "pre-tokenizer {other:?} is not supported (supported: gpt2, mpt, olmo, jais, trillion, smollm, starcoder, refact, command-r, \
             codeshell, exaone, minerva, llama3, llama-v3, llama-bpe, falcon3, qwen2, deepseek-r1-qwen)"
        ),
    })
}

/// llama.cpp's token types.
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// A tokenizer rebuilt from GGUF metadata.
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    /// `tokenizer_config.json`: special tokens, BOS/EOS flags, chat template.
    pub tokenizer_config: serde_json::Value,
    pub tokens: usize,
    pub merges: usize,
    /// Control tokens (added as special tokens).
    pub special: Vec<String>,
    /// `tokenizer.ggml.pre`.
    pub pre: String,
    pub warnings: Vec<String>,
}

/// The byte-level BPE tokenizer (`tokenizer.ggml.model` "gpt2") the GGUF describes: its tokens
/// (already in the byte-to-character spelling) and merges, the split of its `tokenizer.ggml.pre`,
/// control tokens as added special tokens, BOS/EOS added as `tokenizer.ggml.add_*_token` say.
pub fn build_tokenizer(g: &GgufFile) -> Result<GgufTokenizer> {
    let origin = g.path.display().to_string();
    let model = meta_str(g, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!("{origin}: metadata `tokenizer.ggml.model` is {model:?}; import-gguf builds byte-level BPE tokenizers (\"gpt2\") only");
    }
    let mut warnings = vec![];
    let pre = pre_name(g, &mut warnings)?;
    let (pre_tok, ignore_merges) =
        pre_tokenizer(&pre).with_context(|| format!("{origin}: metadata `tokenizer.ggml.pre`"))?;

    let tokens = meta_strings(g, "tokenizer.ggml.tokens")?;
    let types = token_types(g, &origin, tokens.len())?;
    let (bpe, n_merges) = bpe_model(g, &origin, &tokens, ignore_merges, &mut warnings)?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre_tok));
    tok.with_decoder(Some(ByteLevelDecoder::default()));

    let ids = SpecialIds::read(g, &origin, tokens.len())?;
    let special = add_tokens(&mut tok, &tokens, &types);
    tok.with_post_processor(Some(post_processor(&origin, &tokens, &ids)?));
    let config = tokenizer_config(g, &tokens, &ids)?;
    Ok(GgufTokenizer {
        tokenizer: tok,
        tokenizer_config: config,
        tokens: tokens.len(),
        merges: n_merges,
        special,
        pre,
        warnings,
    })
}

/// `tokenizer.ggml.pre`, or GPT-2's (with a warning) for a GGUF older than the key.
fn pre_name(g: &GgufFile, warnings: &mut Vec<String>) -> Result<String> {
    Ok(match g.get("tokenizer.ggml.pre") {
        Some(_) => meta_str(g, "tokenizer.ggml.pre")?.to_string(),
        None => {
            warnings.push("no `tokenizer.ggml.pre` (a GGUF from before May 2024): using GPT-2's pre-tokenizer".into());
            "gpt2".into()
        }
    })
}

/// llama.cpp's type of each token (`tokenizer.ggml.token_type`; all normal when absent).
fn token_types(g: &GgufFile, origin: &str, n_tokens: usize) -> Result<Vec<i64>> {
    Ok(match g.get("tokenizer.ggml.token_type") {
        None => vec![1; n_tokens],
        Some(v) => {
            let a = v
                .as_array()
                .with_context(|| format!("{origin}: metadata `tokenizer.ggml.token_type` must be an array"))?;
            if a.len() != n_tokens {
                bail!("{origin}: metadata `tokenizer.ggml.token_type` has {} entries for {} tokens", a.len(), n_tokens);
            }
            a.iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_i64().with_context(|| {
                        format!("{origin}: metadata `tokenizer.ggml.token_type[{i}]` must be an integer")
                    })
                })
                .collect::<Result<_>>()?
        }
    })
}

/// The BPE model of `tokens` and `tokenizer.ggml.merges`, and the number of merges. A token
/// that appears twice keeps its first id (with a warning).
fn bpe_model(
    g: &GgufFile,
    origin: &str,
    tokens: &[&str],
    ignore_merges: bool,
    warnings: &mut Vec<String>,
) -> Result<(BPE, usize)> {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if let Some(first) = vocab.get(*t) {
            warnings.push(format!("token {t:?} appears twice (ids {first} and {i}); the first id is kept"));
        } else {
            vocab.insert(t.to_string(), i as u32);
        }
    }
    let merges_raw = meta_strings(g, "tokenizer.ggml.merges")?;
    let merges: Vec<(String, String)> = merges_raw
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).with_context(|| {
                format!(
                    "{origin}: metadata `tokenizer.ggml.merges[{i}]` ({m:?}) is not two tokens separated by a space"
                )
            })
        })
        .collect::<Result<_>>()?;
    let n_merges = merges.len();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| anyhow!("{origin}: building the BPE model from `tokenizer.ggml.tokens` and `.merges`: {e}"))?;
    Ok((bpe, n_merges))
}

/// The special token ids the GGUF names, and whether BOS/EOS are added to every sequence.
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

impl SpecialIds {
    /// `tokenizer.ggml.*_token_id` (each inside the vocabulary) and `.add_*_token`.
    fn read(g: &GgufFile, origin: &str, n_tokens: usize) -> Result<SpecialIds> {
        let id = |key: &str| -> Result<Option<u32>> {
            let Some(v) = opt_u64(g, &format!("tokenizer.ggml.{key}"))? else { return Ok(None) };
            if v as usize >= n_tokens {
                bail!(
                    "{origin}: metadata `tokenizer.ggml.{key}` ({v}) is outside the vocabulary ({} tokens)",
                    n_tokens
                );
            }
            Ok(Some(v as u32))
        };
        let flag = |key: &str| g.get(&format!("tokenizer.ggml.{key}")).and_then(Value::as_bool).unwrap_or(false);
        let (bos, eos, pad, unk) =
            (id("bos_token_id")?, id("eos_token_id")?, id("padding_token_id")?, id("unknown_token_id")?);
        let (add_bos, add_eos) = (flag("add_bos_token"), flag("add_eos_token"));
        Ok(SpecialIds { bos, eos, pad, unk, add_bos, add_eos })
    }
}

/// Adds the control tokens (as special tokens) and the user-defined ones to `tok`; returns the
/// control tokens.
fn add_tokens(tok: &mut Tokenizer, tokens: &[&str], types: &[i64]) -> Vec<String> {
    let special: Vec<String> =
        tokens.iter().zip(types).filter(|(_, &t)| t == TOKEN_CONTROL).map(|(s, _)| s.to_string()).collect();
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &t)| t == TOKEN_USER_DEFINED)
        .map(|(s, _)| AddedToken::from(s.to_string(), false).normalized(false))
        .collect();
    tok.add_special_tokens(
        &special.iter().map(|s| AddedToken::from(s.clone(), true).normalized(false)).collect::<Vec<_>>(),
    );
    tok.add_tokens(&user);
    special
}

/// The post-processor: a template adding BOS/EOS where the GGUF says so, else GPT-2's (which
/// leaves ids alone).
fn post_processor(origin: &str, tokens: &[&str], ids: &SpecialIds) -> Result<PostProcessorWrapper> {
    if (ids.add_bos && ids.bos.is_none()) || (ids.add_eos && ids.eos.is_none()) {
        bail!("{origin}: `tokenizer.ggml.add_bos_token`/`add_eos_token` is set but the matching token id is missing");
    }
    // The tokens the template adds, as (text, id).
    let added = |on: bool, id: Option<u32>| id.filter(|_| on).map(|i| (tokens[i as usize].to_string(), i));
    let (b, e) = (added(ids.add_bos, ids.bos), added(ids.add_eos, ids.eos));
    if b.is_some() || e.is_some() {
        let wrap = |seq: &str, type_id: u32| {
            let mut parts: Vec<String> = b.iter().map(|(t, _)| format!("{t}:{type_id}")).collect();
            parts.push(format!("${seq}:{type_id}"));
            parts.extend(e.iter().map(|(t, _)| format!("{t}:{type_id}")));
            parts.join(" ")
        };
        let post = TemplateProcessing::builder()
            .try_single(wrap("A", 0))
            .and_then(|t| t.try_pair(format!("{} {}", wrap("A", 0), wrap("B", 1))))
            .map_err(|err| anyhow!("{origin}: BOS/EOS template: {err}"))?
            .special_tokens(b.iter().chain(&e).cloned().collect::<Vec<_>>())
            .build()
            .map_err(|err| anyhow!("{origin}: BOS/EOS template: {err}"))?;
        Ok(post.into())
    } else {
        // GPT-2's own post-processor: leaves ids alone.
        Ok(ByteLevel::new(true, false, true).into())
    }
}

/// `tokenizer_config.json`: the BOS/EOS flags, the special tokens by name, the context length
/// and the chat template.
fn tokenizer_config(g: &GgufFile, tokens: &[&str], ids: &SpecialIds) -> Result<serde_json::Value> {
    let name = |i: Option<u32>| i.map(|i| tokens[i as usize].to_string());
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": ids.add_bos,
        "add_eos_token": ids.add_eos,
        "clean_up_tokenization_spaces": false,
        "model_max_length": opt_u64(g, "llama.context_length")?.unwrap_or(4096),
    });
    for (field, v) in [
        ("bos_token", name(ids.bos)),
        ("eos_token", name(ids.eos)),
        ("pad_token", name(ids.pad)),
        ("unk_token", name(ids.unk)),
    ] {
        if let Some(v) = v {
            config[field] = v.into();
        }
    }
    if let Some(t) = g.get("tokenizer.chat_template").and_then(Value::as_str) {
        config["chat_template"] = t.into();
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_tokenizers_split_as_llama_cpp() {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let split = |pre: &str, text: &str| -> Vec<String> {
            let (p, _) = pre_tokenizer(pre).unwrap();
            let mut s = PreTokenizedString::from(text);
            p.pre_tokenize(&mut s).unwrap();
            s.get_splits(OffsetReferential::Original, OffsetType::Byte).iter().map(|(s, _, _)| s.to_string()).collect()
        };
        // Byte-level spelling: Ġ is a space.
        assert_eq!(split("gpt2", "in 2024 we're"), ["in", "Ġ2024", "Ġwe", "'re"]);
        assert_eq!(split("smollm", "in 2024"), ["in", "Ġ", "2", "0", "2", "4"]);
        assert_eq!(split("llama-bpe", "in 12345"), ["in", "Ġ", "123", "45"]);
        assert_eq!(split("qwen2", "x 12"), ["x", "Ġ", "1", "2"]);
        assert!(pre_tokenizer("unknown-pre").unwrap_err().to_string().contains("\"unknown-pre\""));
    }
}
