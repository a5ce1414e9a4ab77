//! Vocabulary extension (Colossal-LLaMA-2's first step): new pieces appended to a BPE
//! `tokenizer.json` with the merges that produce them, and the model's embedding (and untied LM
//! head) grown to match. See docs/vocab-extension.md.
//!
//! How a piece becomes one token. New merges are appended after the old ones, so they have the
//! lowest priority: BPE first runs every old merge to completion (the old tokenization, unchanged)
//! and only then applies new merges. New tokens never occur in old merges, so on any text the new
//! tokenizer gives at most as many tokens as the old one, word by word. For each piece (its
//! *internal* form: byte-level characters for byte-level BPE, `▁` for spaces for SentencePiece-style
//! tokenizers) the extender simulates the current tokenizer (old + already-added merges), then plans
//! a binary merge tree from that tokenization up to the whole piece, preferring intermediates that
//! are already tokens; intermediates that are not get ids too. Characters missing from the vocabulary
//! (a SentencePiece-style tokenizer falls back to bytes for them) are added as tokens first, since
//! merges of byte-fallback tokens cannot spell a character. The plan is kept only if the simulation
//! then yields the piece as one token (other tree shapes are tried otherwise); at the end every new
//! token is checked again with the `tokenizers` crate on the new tokenizer, each requested piece as
//! it occurs in text.
//!
//! The parts: `base` (the base tokenizer.json and its layout), `script` (which pieces: the kept
//! scripts), `learn` (pieces learnt on a corpus), `plan` (the merge trees), `check` (the checks and
//! the invariant), `embed` (embedding growth and the model directory).
mod base;
mod check;
mod embed;
mod learn;
mod plan;
mod script;

use std::collections::HashSet;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::{Model, Tokenizer};

use crate::config::LlamaConfig;

pub use base::{byte_level_table, BaseTokenizer, TokenizerKind};
pub use check::{unchanged_outside_kept_scripts, verify};
pub use embed::{extend_model, ExtendOptions};
pub use learn::{train_base_tokenizer, SENTENCEPIECE_MAX_PIECE_CHARS};
use plan::{Extender, Outcome};
pub use script::{default_filter, script_costs, Script, ScriptCost, ScriptFilter, DEFAULT_MIN_SCRIPT_SHARE};

/// The config.json key holding the tokenizer's real size (ids at or above it are padding rows).
pub const REAL_VOCAB_KEY: &str = "llama_cpt_real_vocab_size";
/// The report written next to the extended model.
pub const REPORT_FILE: &str = "vocab_extension.json";

/// A token the extension added.
#[derive(Clone, Debug, Serialize)]
pub struct NewToken {
    pub id: u32,
    /// The token as the BPE model spells it.
    pub token: String,
    /// Its text (`None` for byte-level tokens that are not whole UTF-8 characters).
    pub text: Option<String>,
    /// A requested/learnt piece (false: an intermediate or a character its merges needed).
    pub requested: bool,
    /// The old tokenizer's ids for it (their mean embedding initialises its row).
    pub old_ids: Vec<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Rejected {
    pub piece: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckFailure {
    pub piece: String,
    pub id: u32,
    /// "model": the BPE model does not give the piece as one token; "text": encoding the piece
    /// alone through the whole pipeline does not.
    pub check: String,
    pub got: Vec<String>,
}

/// What an extension did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExtendReport {
    pub kind: Option<TokenizerKind>,
    pub base_tokenizer_size: u32,
    pub new_tokenizer_size: u32,
    pub old_model_vocab: usize,
    pub new_model_vocab: usize,
    pub candidates: usize,
    pub added_pieces: usize,
    pub added_intermediates: usize,
    pub already_present: usize,
    pub duplicates: usize,
    /// Pieces not added (split by the pre-tokenizer, no merge plan, over the target size).
    pub rejected: Vec<Rejected>,
    /// Pieces added but failing a check of the written tokenizer.json.
    pub failures: Vec<CheckFailure>,
    /// SentencePiece-style only: requested pieces that, encoded alone, merge with the `▁` the
    /// tokenizer prepends (an old `▁x` merge wins); inside text they still come out whole.
    pub word_start_merges: usize,
    /// Corpus learning only: the scripts whose pieces were kept, and the base's tokens per letter
    /// of each script on the corpus (what the default choice of scripts is made from).
    pub kept_scripts: Vec<Script>,
    pub script_costs: Vec<ScriptCost>,
    pub new_tokens: Vec<NewToken>,
}

/// Where new pieces come from.
pub enum PieceSource {
    /// Pieces of text, in order of preference.
    Pieces(Vec<String>),
    /// Learn pieces on a corpus with the `tokenizers` BPE trainer until the tokenizer has
    /// `target_size` ids, keeping only pieces of the `keep` scripts (`None`: the scripts the base
    /// encodes poorly on the corpus, see [`default_filter`]).
    Corpus { texts: Vec<String>, target_size: usize, keep: Option<Vec<Script>> },
}

/// Reads a piece list: Colossal's JSONL (`{"piece": "..."}` per line) or plain lines (taken
/// verbatim, without the line break). Empty or whitespace-only pieces are errors.
pub fn read_pieces(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading piece list {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let piece = if line.trim_start().starts_with('{') {
            let v: Value =
                serde_json::from_str(line).with_context(|| format!("{}:{}: not valid JSON", path.display(), n + 1))?;
            v.get("piece")
                .and_then(Value::as_str)
                .with_context(|| format!("{}:{}: expected {{\"piece\": \"...\"}}", path.display(), n + 1))?
                .to_string()
        } else {
            line.to_string()
        };
        if piece.trim().is_empty() {
            bail!("{}:{}: empty or whitespace-only piece {piece:?}", path.display(), n + 1);
        }
        out.push(piece);
    }
    if out.is_empty() {
        bail!("{}: no pieces", path.display());
    }
    Ok(out)
}

/// Extends a tokenizer; returns the new tokenizer (not yet written) and the report.
pub fn extend_tokenizer(base: &BaseTokenizer, source: &PieceSource) -> Result<(Tokenizer, ExtendReport)> {
    let mut ex = Extender::new(base)?;
    let mut report = ExtendReport { kind: Some(base.kind), base_tokenizer_size: base.size, ..Default::default() };
    let mut seen = HashSet::new();
    match source {
        PieceSource::Pieces(pieces) => {
            report.candidates = pieces.len();
            for p in pieces {
                if p.trim().is_empty() {
                    bail!("empty or whitespace-only piece {p:?}");
                }
                let internal = base.internal(p);
                if !seen.insert(internal.clone()) {
                    report.duplicates += 1;
                    continue;
                }
                let n = base.pre_token_count(p)?;
                if n != 1 {
                    report.rejected.push(Rejected {
                        piece: p.clone(),
                        reason: format!("the pre-tokenizer splits it into {n} parts, so it can never be one token"),
                    });
                    continue;
                }
                match ex.add_piece(&internal) {
                    Outcome::Added => {}
                    Outcome::Present => report.already_present += 1,
                    Outcome::Failed(got) => report.rejected.push(Rejected {
                        piece: p.clone(),
                        reason: format!("no merge plan yields one token (got {got:?})"),
                    }),
                }
            }
        }
        PieceSource::Corpus { texts, target_size, keep } => {
            learn::add_learnt_pieces(&mut ex, base, texts, *target_size, keep.as_deref(), &mut seen, &mut report)?;
        }
    }

    // The new tokenizer: the base with its BPE model rebuilt on the extended vocabulary and merges.
    let bpe0 = base.bpe();
    let mut vocab: tokenizers::models::bpe::Vocab = Default::default();
    for (k, &v) in &ex.vocab {
        vocab.insert(k.clone(), v);
    }
    let mut b = BPE::builder()
        .vocab_and_merges(vocab, ex.merges.clone())
        .fuse_unk(bpe0.fuse_unk)
        .byte_fallback(bpe0.byte_fallback)
        .ignore_merges(bpe0.ignore_merges);
    if let Some(u) = &bpe0.unk_token {
        b = b.unk_token(u.clone());
    }
    if let Some(d) = bpe0.dropout {
        b = b.dropout(d);
    }
    let bpe = b.build().map_err(|e| anyhow!("building the extended BPE model: {e}"))?;
    let mut tok = base.tok.clone();
    tok.with_model(bpe);

    report.new_tokenizer_size = ex.next_id;
    report.added_pieces = ex.new.iter().filter(|t| t.2).count();
    report.added_intermediates = ex.new.len() - report.added_pieces;
    let old_model = base.tok.get_model();
    let marker = match base.kind {
        TokenizerKind::Metaspace => old_model.token_to_id("▁"),
        _ => None,
    };
    let old_unk = ex.unk;
    for (id, t, req) in &ex.new {
        let mut old_ids: Vec<u32> =
            old_model.tokenize(t).map_err(|e| anyhow!("old tokenizer on {t:?}: {e}"))?.iter().map(|x| x.id).collect();
        if old_ids.len() > 1 {
            old_ids.retain(|&i| Some(i) != old_unk && Some(i) != marker);
        }
        report.new_tokens.push(NewToken { id: *id, token: t.clone(), text: base.text(t), requested: *req, old_ids });
    }
    verify(base, &tok, &ex.merges, &mut report)?;
    Ok((tok, report))
}

/// The real vocabulary size of a model directory's config (padding rows excluded): the
/// `llama_cpt_real_vocab_size` key when present, else `vocab_size`.
pub fn real_vocab_size(config: &LlamaConfig) -> usize {
    config.raw.get(REAL_VOCAB_KEY).and_then(Value::as_u64).map_or(config.vocab_size, |v| v as usize)
}
