//! Perplexity and bits per character of a text set. Bits per character (total negative
//! log-likelihood in bits over the characters of the text) compares models whose tokenizers
//! differ, such as a base model and its vocabulary-extended successor.
use crate::backend::Backend;
use crate::batch::Batch;
use crate::data::corpus::{read_corpus, CorpusOptions, Issue};
use crate::data::tokenizer::TextTokenizer;
use crate::model::Llama;
use anyhow::Result;
use llama_cpt_ops::IGNORE_INDEX;
use serde::Serialize;
use std::path::Path;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TextScore {
    pub documents: usize,
    /// Tokens predicted (each window's first token has no prediction unless it is BOS-led).
    pub tokens: usize,
    pub chars: usize,
    pub nll_nats: f64,
    pub perplexity: f64,
    pub bits_per_token: f64,
    pub bits_per_char: f64,
}

/// The documents of a text set — a JSONL (`{"text"}`, or `source` + `target`) or `.txt` file or
/// folder, read as `prepare-data` reads it — and what was skipped.
pub fn read_texts(path: &Path) -> Result<(Vec<String>, Vec<Issue>)> {
    let (mut texts, mut issues) = (Vec::new(), Vec::new());
    read_corpus(path, &CorpusOptions::default(), &mut issues, |d| {
        texts.push(format!("{}{}", d.source, d.target));
        Ok(())
    })?;
    Ok((texts, issues))
}

/// Scores `texts`: each document is tokenized (with BOS if the tokenizer adds one), cut into
/// windows of at most `max_len` tokens, and windows are packed as separate documents into batches
/// of about `batch_tokens` tokens.
pub fn score_texts<B: Backend>(
    model: &Llama<B>,
    backend: &B,
    tok: &TextTokenizer,
    texts: &[String],
    max_len: usize,
    batch_tokens: usize,
) -> Result<TextScore> {
    let mut windows: Vec<Vec<u32>> = Vec::new();
    let mut chars = 0;
    for t in texts {
        chars += t.chars().count();
        let mut ids = Vec::new();
        if tok.add_bos {
            ids.extend(tok.bos);
        }
        ids.extend(tok.encode_text(t)?);
        windows.extend(ids.chunks(max_len.max(2)).filter(|w| w.len() >= 2).map(|w| w.to_vec()));
    }
    let (mut nll, mut count) = (0.0, 0usize);
    let mut i = 0;
    while i < windows.len() {
        let mut tokens = Vec::new();
        let (mut targets, mut positions, mut cu) = (Vec::new(), Vec::new(), vec![0u32]);
        while i < windows.len() && (tokens.is_empty() || tokens.len() + windows[i].len() <= batch_tokens) {
            let w = &windows[i];
            tokens.extend_from_slice(w);
            targets.extend(w[1..].iter().map(|&x| x as i32));
            targets.push(IGNORE_INDEX);
            positions.extend(0..w.len() as u32);
            cu.push(tokens.len() as u32);
            i += 1;
        }
        let n = tokens.len();
        let k = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        let batch = Batch { rows: 1, seq_len: n, tokens, targets, cu_seqlens: cu, positions };
        nll += model.loss(backend, &batch)? * k as f64;
        count += k;
    }
    let ln2 = std::f64::consts::LN_2;
    Ok(TextScore {
        documents: texts.len(),
        tokens: count,
        chars,
        nll_nats: nll,
        perplexity: (nll / count.max(1) as f64).exp(),
        bits_per_token: nll / ln2 / count.max(1) as f64,
        bits_per_char: nll / ln2 / chars.max(1) as f64,
    })
}
