//! The checks of an extension, on the new tokenizer through the `tokenizers` crate: every new token
//! is one token for the BPE model, and every requested piece comes out as that one token where it
//! occurs in text — after a neutral prefix, through the real normalizer, pre-tokenizer and model.
use std::collections::HashSet;

use anyhow::{anyhow, Result};
use tokenizers::{Model, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

use super::base::{BaseTokenizer, TokenizerKind};
use super::script::ScriptFilter;
use super::{CheckFailure, ExtendReport};

/// Prefixes tried, in order, to put a piece inside text.
const PREFIX_CANDIDATES: [&str; 4] = ["\n", "\t", "\u{1}", "\u{7}"];

/// A prefix that cannot merge with what follows it: the pre-tokenizer makes it a pre-token of its
/// own before `text`, or the model spells it in tokens that take part in no merge (LLaMA-2 spells
/// a line break as the byte token `<0x0A>`, which no merge uses).
fn neutral_prefix(
    base: &BaseTokenizer,
    tok: &Tokenizer,
    in_merges: &HashSet<&str>,
    text: &str,
) -> Result<Option<&'static str>> {
    for prefix in PREFIX_CANDIDATES {
        if let Some(pt) = tok.get_pre_tokenizer() {
            let mut s = PreTokenizedString::from(format!("{prefix}{text}"));
            pt.pre_tokenize(&mut s).map_err(|e| anyhow!("pre-tokenizing {text:?}: {e}"))?;
            let splits = s.get_splits(OffsetReferential::Original, OffsetType::Byte);
            if splits.first().map(|x| x.1) == Some((0, prefix.len())) {
                return Ok(Some(prefix));
            }
        }
        let ids = tok.get_model().tokenize(&base.internal(prefix)).map_err(|e| anyhow!("{e}"))?;
        if ids.iter().all(|t| !in_merges.contains(t.value.as_str())) {
            return Ok(Some(prefix));
        }
    }
    Ok(None)
}

/// Checks every new token of `report` on the new tokenizer `tok` (whose merges are `merges`):
/// the BPE model alone must give the token; a requested piece encoded after a neutral prefix must
/// give the prefix's ids and then exactly the piece's id. Failures go to `report.failures`; pieces
/// of a SentencePiece-style tokenizer that merge with the `▁` prepended at the very start of a
/// text are counted in `report.word_start_merges` (not failures: inside text they are whole).
pub fn verify(
    base: &BaseTokenizer,
    tok: &Tokenizer,
    merges: &[(String, String)],
    report: &mut ExtendReport,
) -> Result<()> {
    let in_merges: HashSet<&str> = merges.iter().flat_map(|(a, b)| [a.as_str(), b.as_str()]).collect();
    let model = tok.get_model();
    let marker = model.token_to_id("▁");
    let names = |ids: &[u32]| ids.iter().map(|&i| tok.id_to_token(i).unwrap_or_default()).collect::<Vec<_>>();
    let encode = |text: &str| -> Result<Vec<u32>> {
        Ok(tok.encode(text, false).map_err(|e| anyhow!("encoding {text:?}: {e}"))?.get_ids().to_vec())
    };
    let mut failures = Vec::new();
    let mut word_start_merges = 0;
    for t in &report.new_tokens {
        let ids: Vec<u32> = model.tokenize(&t.token).map_err(|e| anyhow!("{e}"))?.iter().map(|x| x.id).collect();
        if ids != [t.id] {
            failures.push(CheckFailure { piece: t.token.clone(), id: t.id, check: "model".into(), got: names(&ids) });
            continue;
        }
        let (Some(text), true) = (&t.text, t.requested) else { continue };
        match neutral_prefix(base, tok, &in_merges, text)? {
            Some(prefix) => {
                let before = encode(prefix)?;
                let ids = encode(&format!("{prefix}{text}"))?;
                if !(ids.len() == before.len() + 1 && ids.starts_with(&before) && ids.last() == Some(&t.id)) {
                    failures.push(CheckFailure {
                        piece: text.clone(),
                        id: t.id,
                        check: "text".into(),
                        got: names(&ids),
                    });
                }
            }
            None => failures.push(CheckFailure {
                piece: text.clone(),
                id: t.id,
                check: "no neutral prefix".into(),
                got: Vec::new(),
            }),
        }
        if base.kind == TokenizerKind::Metaspace && !text.starts_with(' ') {
            let alone = encode(text)?;
            if alone != [t.id] && !(alone.len() == 2 && Some(alone[0]) == marker && alone[1] == t.id) {
                word_start_merges += 1;
            }
        }
    }
    report.failures.extend(failures);
    report.word_start_merges += word_start_merges;
    Ok(())
}

/// The extension's promise on `texts`: of the texts holding no character the filter keeps, how
/// many the new tokenizer encodes differently from the old (ids with special tokens, as training
/// sees them); returns (texts without a kept character, of them changed, the first one changed).
pub fn unchanged_outside_kept_scripts(
    old: &Tokenizer,
    new: &Tokenizer,
    filter: &ScriptFilter,
    texts: &[String],
) -> Result<(usize, usize, Option<String>)> {
    let ids = |tok: &Tokenizer, t: &str| -> Result<Vec<u32>> {
        Ok(tok.encode(t, true).map_err(|e| anyhow!("encoding {t:?}: {e}"))?.get_ids().to_vec())
    };
    let (mut outside, mut changed, mut first) = (0, 0, None);
    for t in texts.iter().filter(|t| !filter.touches(t)) {
        outside += 1;
        if ids(old, t)? != ids(new, t)? {
            changed += 1;
            first.get_or_insert_with(|| t.clone());
        }
    }
    Ok((outside, changed, first))
}
