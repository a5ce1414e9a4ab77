//! Tokenizer comparison: tokens per character and average tokens per sample, per language
//! (the seed card's table: LLaMA-2 1.205 → Colossal 0.659 tokens/char on their set).
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use rayon::prelude::*;

use super::corpus::{read_corpus, CorpusOptions, Issue};

#[derive(Clone, Debug, serde::Serialize)]
pub struct ReportRow {
    pub tokenizer: String,
    pub language: String,
    pub samples: u64,
    pub chars: u64,
    pub tokens: u64,
    pub tokens_per_char: f64,
    pub tokens_per_sample: f64,
}

/// The texts of a corpus (source + target of each document).
pub fn load_texts(path: &Path, opts: &CorpusOptions, issues: &mut Vec<Issue>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    read_corpus(path, opts, issues, |d| {
        out.push(d.source + &d.target);
        Ok(())
    })?;
    Ok(out)
}

/// Encodes every text without special tokens and counts.
pub fn measure(tok: &tokenizers::Tokenizer, name: &str, language: &str, texts: &[String]) -> Result<ReportRow> {
    let counts: Vec<Result<(u64, u64)>> = texts
        .par_iter()
        .map(|t| {
            let e = tok.encode_fast(t.as_str(), false).map_err(|e| anyhow!("{name}: {e}"))?;
            Ok((t.chars().count() as u64, e.len() as u64))
        })
        .collect();
    let (mut chars, mut tokens) = (0u64, 0u64);
    for c in counts {
        let (c, t) = c?;
        chars += c;
        tokens += t;
    }
    let samples = texts.len() as u64;
    Ok(ReportRow {
        tokenizer: name.to_string(),
        language: language.to_string(),
        samples,
        chars,
        tokens,
        tokens_per_char: if chars > 0 { tokens as f64 / chars as f64 } else { 0.0 },
        tokens_per_sample: if samples > 0 { tokens as f64 / samples as f64 } else { 0.0 },
    })
}

/// The full report: every tokenizer on every language set.
pub fn report(
    tokenizers: &[(String, PathBuf)],
    sets: &[(String, PathBuf)],
    opts: &CorpusOptions,
) -> Result<(Vec<ReportRow>, Vec<Issue>)> {
    let mut issues = Vec::new();
    let mut texts = Vec::new();
    for (lang, p) in sets {
        texts.push((lang.clone(), load_texts(p, opts, &mut issues)?));
    }
    let mut rows = Vec::new();
    for (name, p) in tokenizers {
        let tok = tokenizers::Tokenizer::from_file(p).map_err(|e| anyhow!("loading tokenizer {}: {e}", p.display()))?;
        for (lang, t) in &texts {
            rows.push(measure(&tok, name, lang, t)?);
        }
    }
    Ok((rows, issues))
}

/// A Markdown table of the rows.
pub fn to_markdown(rows: &[ReportRow]) -> String {
    let mut s = String::from("| tokenizer | language | samples | chars | tokens | tokens/char | tokens/sample |\n|---|---|---:|---:|---:|---:|---:|\n");
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | {:.3} | {:.1} |\n",
            r.tokenizer, r.language, r.samples, r.chars, r.tokens, r.tokens_per_char, r.tokens_per_sample
        );
    }
    s
}
