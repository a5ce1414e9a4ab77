//! The checks of a written extension: every new token one token for the BPE model, every requested
//! piece one token through the whole pipeline.
use std::collections::HashSet;

use anyhow::{anyhow, Result};
use tokenizers::{Model, Tokenizer};

use super::base::{BaseTokenizer, TokenizerKind};
use super::{CheckFailure, ExtendReport};

/// Checks every new token with the `tokenizers` crate on the new tokenizer (the model alone, and
/// for requested pieces the whole pipeline on the piece's text).
pub(super) fn verify(base: &BaseTokenizer, tok: &Tokenizer, requested: &[String], report: &mut ExtendReport) -> Result<()> {
    let requested: HashSet<&String> = requested.iter().collect();
    let model = tok.get_model();
    let marker = model.token_to_id("▁");
    let names = |ids: &[u32]| ids.iter().map(|&i| tok.id_to_token(i).unwrap_or_default()).collect::<Vec<_>>();
    for t in &report.new_tokens {
        let ids: Vec<u32> = model.tokenize(&t.token).map_err(|e| anyhow!("{e}"))?.iter().map(|x| x.id).collect();
        if ids != [t.id] {
            report.failures.push(CheckFailure { piece: t.token.clone(), id: t.id, check: "model".into(), got: names(&ids) });
            continue;
        }
        let (Some(text), true) = (&t.text, requested.contains(&t.token)) else { continue };
        let enc = tok.encode(text.as_str(), false).map_err(|e| anyhow!("encoding {text:?}: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        if base.kind == TokenizerKind::Metaspace && !text.starts_with(' ') {
            if ids.len() == 2 && Some(ids[0]) == marker {
                ids.remove(0);
            } else if ids != [t.id] {
                report.word_start_merges += 1;
                continue;
            }
        }
        if ids != [t.id] {
            report.failures.push(CheckFailure { piece: text.clone(), id: t.id, check: "text".into(), got: names(&ids) });
        }
    }
    Ok(())
}
