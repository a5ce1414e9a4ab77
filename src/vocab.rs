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
//! token is checked again with the `tokenizers` crate on the written tokenizer.json.
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::punctuation::Punctuation;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::{
    AddedToken, DecoderWrapper, Model, ModelWrapper, NormalizerWrapper, OffsetReferential, OffsetType, PostProcessorWrapper,
    PreTokenizedString, PreTokenizer, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer, TokenizerBuilder, TokenizerImpl,
};

use crate::config::LlamaConfig;
use crate::cpu::Cpu;
use crate::model::Llama;
use crate::tensor::Tensor;
use crate::weights::StoreDtype;

/// The config.json key holding the tokenizer's real size (ids at or above it are padding rows).
pub const REAL_VOCAB_KEY: &str = "llama_cpt_real_vocab_size";
/// The report written next to the extended model.
pub const REPORT_FILE: &str = "vocab_extension.json";

/// How a tokenizer maps text to the strings its BPE model sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum TokenizerKind {
    /// GPT-2/LLaMA-3 style: bytes mapped to printable characters (`Ġ` = space).
    ByteLevel,
    /// SentencePiece style (LLaMA-2): spaces become `▁`, a `▁` is prepended to the text, unknown
    /// characters fall back to `<0xXX>` byte tokens.
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
        Value::Object(o) => o.get("type").and_then(Value::as_str) == Some(ty) || o.values().any(|x| json_has_type(x, ty)),
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
        let tok = Tokenizer::from_bytes(text.as_bytes()).map_err(|e| anyhow!("loading tokenizer {}: {e}", path.display()))?;
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

    fn bpe(&self) -> &BPE {
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

    /// How many pre-tokens the tokenizer's pre-tokenizer makes of `text` (a piece must be one).
    fn pre_token_count(&self, text: &str) -> Result<usize> {
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
    fn merges(&self) -> Result<Vec<(String, String)>> {
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
    pub new_tokens: Vec<NewToken>,
}

/// Where new pieces come from.
pub enum PieceSource {
    /// Pieces of text, in order of preference.
    Pieces(Vec<String>),
    /// Learn pieces on a corpus with the `tokenizers` BPE trainer until the tokenizer has
    /// `target_size` ids.
    Corpus { texts: Vec<String>, target_size: usize },
}

/// The extender's working state: vocabulary, merges and a BPE simulator.
struct Extender<'a> {
    base: &'a BaseTokenizer,
    vocab: HashMap<String, u32>,
    id_tok: HashMap<u32, String>,
    merges: Vec<(String, String)>,
    merge_map: HashMap<(u32, u32), (u32, u32)>,
    next_id: u32,
    byte_ids: Vec<Option<u32>>,
    byte_fallback: bool,
    unk: Option<u32>,
    added_contents: HashSet<String>,
    new: Vec<(u32, String, bool)>,
}

#[derive(Clone, Copy)]
struct Mark {
    new: usize,
    merges: usize,
    next_id: u32,
}

enum Outcome {
    Added,
    Present,
    Failed(Vec<String>),
}

impl<'a> Extender<'a> {
    fn new(base: &'a BaseTokenizer) -> Result<Self> {
        let bpe = base.bpe();
        let vocab: HashMap<String, u32> = bpe.get_vocab().into_iter().collect();
        let id_tok: HashMap<u32, String> = vocab.iter().map(|(k, &v)| (v, k.clone())).collect();
        let merges = base.merges()?;
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) else {
                bail!("{}: merge ({a:?}, {b:?}) uses a token outside the vocabulary", base.path.display());
            };
            let Some(&r) = vocab.get(&format!("{a}{b}")) else {
                bail!("{}: merge ({a:?}, {b:?}) produces a token outside the vocabulary", base.path.display());
            };
            merge_map.entry((ia, ib)).or_insert((rank as u32, r));
        }
        let byte_ids = (0..256).map(|b| vocab.get(&format!("<0x{b:02X}>")).copied()).collect();
        let unk = bpe.unk_token.as_ref().and_then(|u| vocab.get(u).copied());
        let added_contents = base.tok.get_added_tokens_decoder().values().map(|t| t.content.clone()).collect();
        Ok(Extender {
            base,
            vocab,
            id_tok,
            merges,
            merge_map,
            next_id: base.size,
            byte_ids,
            byte_fallback: bpe.byte_fallback,
            unk,
            added_contents,
            new: Vec::new(),
        })
    }

    fn mark(&self) -> Mark {
        Mark { new: self.new.len(), merges: self.merges.len(), next_id: self.next_id }
    }

    fn rollback(&mut self, m: Mark) {
        for (a, b) in self.merges.drain(m.merges..) {
            self.merge_map.remove(&(self.vocab[&a], self.vocab[&b]));
        }
        for (id, tok, _) in self.new.drain(m.new..) {
            self.vocab.remove(&tok);
            self.id_tok.remove(&id);
        }
        self.next_id = m.next_id;
    }

    fn add_token(&mut self, tok: &str, requested: bool) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.vocab.insert(tok.to_string(), id);
        self.id_tok.insert(id, tok.to_string());
        self.new.push((id, tok.to_string(), requested));
        id
    }

    /// The BPE model's first split: characters, byte fallback, unknown.
    fn initial(&self, w: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4];
        for c in w.chars() {
            let s = c.encode_utf8(&mut buf);
            if let Some(&id) = self.vocab.get(&*s) {
                out.push(id);
                continue;
            }
            if self.byte_fallback {
                let ids: Option<Vec<u32>> = s.bytes().map(|b| self.byte_ids[b as usize]).collect();
                if let Some(ids) = ids {
                    out.extend(ids);
                    continue;
                }
            }
            out.push(self.unk.unwrap_or(u32::MAX));
        }
        out
    }

    /// BPE merging as the `tokenizers` crate does it: the lowest-ranked pair first, leftmost on ties.
    fn merge_all(&self, mut syms: Vec<u32>) -> Vec<u32> {
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                if let Some(&(rank, new)) = self.merge_map.get(&(syms[i], syms[i + 1])) {
                    if best.is_none_or(|b| rank < b.0) {
                        best = Some((rank, i, new));
                    }
                }
            }
            let Some((_, i, new)) = best else { return syms };
            syms[i] = new;
            syms.remove(i + 1);
        }
    }

    fn tokenize(&self, w: &str) -> Vec<u32> {
        if let Some(&id) = self.vocab.get(w) {
            if self.base.bpe().ignore_merges {
                return vec![id];
            }
        }
        self.merge_all(self.initial(w))
    }

    fn names(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|i| self.id_tok.get(i).cloned().unwrap_or_else(|| "<unk>".into())).collect()
    }

    /// Split points of a merge tree over `parts` (strategy 0: fewest new intermediates; 1:
    /// balanced; 2: left chain; 3: right chain). `split[i][j]` = where span i..j splits.
    fn plan(&self, parts: &[String], strategy: usize) -> Vec<Vec<usize>> {
        let n = parts.len();
        let mut split = vec![vec![0usize; n + 1]; n + 1];
        let span = |i: usize, j: usize| parts[i..j].concat();
        match strategy {
            0 => {
                let mut cost = vec![vec![0usize; n + 1]; n + 1];
                for len in 2..=n {
                    for i in 0..=n - len {
                        let j = i + len;
                        let own = usize::from(!self.vocab.contains_key(&span(i, j)));
                        let (k, c) = (i + 1..j).map(|k| (k, cost[i][k] + cost[k][j])).min_by_key(|&(_, c)| c).unwrap();
                        cost[i][j] = c + own;
                        split[i][j] = k;
                    }
                }
            }
            1 => {
                for i in 0..n {
                    for j in i + 2..=n {
                        split[i][j] = i + (j - i) / 2;
                    }
                }
            }
            2 => {
                for i in 0..n {
                    for j in i + 2..=n {
                        split[i][j] = j - 1;
                    }
                }
            }
            _ => {
                for i in 0..n {
                    for j in i + 2..=n {
                        split[i][j] = i + 1;
                    }
                }
            }
        }
        split
    }

    fn emit(&mut self, syms: &[u32], split: &[Vec<usize>], i: usize, j: usize) -> u32 {
        if j - i == 1 {
            return syms[i];
        }
        let k = split[i][j];
        let l = self.emit(syms, split, i, k);
        let r = self.emit(syms, split, k, j);
        if let Some(&(_, res)) = self.merge_map.get(&(l, r)) {
            return res;
        }
        let (a, b) = (self.id_tok[&l].clone(), self.id_tok[&r].clone());
        let joined = format!("{a}{b}");
        let res = match self.vocab.get(&joined) {
            Some(&id) => id,
            None => self.add_token(&joined, false),
        };
        self.merge_map.insert((l, r), (self.merges.len() as u32, res));
        self.merges.push((a, b));
        res
    }

    /// Adds one piece (internal form) so that the BPE model gives it as one token.
    fn add_piece(&mut self, piece: &str) -> Outcome {
        if self.vocab.contains_key(piece) || self.added_contents.contains(piece) {
            return Outcome::Present;
        }
        let start = self.mark();
        let mut buf = [0u8; 4];
        for c in piece.chars() {
            let s = c.encode_utf8(&mut buf).to_string();
            if !self.vocab.contains_key(&s) {
                self.add_token(&s, false);
            }
        }
        let after_chars = self.mark();
        let syms = self.tokenize(piece);
        let mut got = self.names(&syms);
        if syms.len() > 1 {
            let parts = got.clone();
            for strategy in 0..4 {
                let split = self.plan(&parts, strategy);
                self.emit(&syms, &split, 0, parts.len());
                let out = self.tokenize(piece);
                if out.len() == 1 && self.id_tok[&out[0]] == piece {
                    break;
                }
                got = self.names(&out);
                self.rollback(after_chars);
            }
        }
        match self.vocab.get(piece) {
            Some(&id) if self.tokenize(piece) == [id] => {
                if let Some(t) = self.new.iter_mut().find(|t| t.0 == id) {
                    t.2 = true;
                }
                Outcome::Added
            }
            _ => {
                self.rollback(start);
                Outcome::Failed(got)
            }
        }
    }
}

/// Reads a piece list: Colossal's JSONL (`{"piece": "..."}` per line) or plain lines (taken
/// verbatim, without the line break). Empty or whitespace-only pieces are errors.
pub fn read_pieces(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading piece list {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let piece = if line.trim_start().starts_with('{') {
            let v: Value = serde_json::from_str(line).with_context(|| format!("{}:{}: not valid JSON", path.display(), n + 1))?;
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

fn pre_tokenizer_for_training(base: &BaseTokenizer) -> PreTokenizerWrapper {
    match (base.kind, base.tok.get_pre_tokenizer()) {
        (TokenizerKind::ByteLevel, Some(pt)) => pt.clone(),
        (TokenizerKind::ByteLevel, None) => ByteLevel::default().add_prefix_space(false).into(),
        (TokenizerKind::Metaspace, _) => sentencepiece_training_pre_tokenizer(),
        (TokenizerKind::Plain, Some(pt)) => pt.clone(),
        (TokenizerKind::Plain, None) => tokenizers::pre_tokenizers::whitespace::Whitespace.into(),
    }
}

/// Pieces never cross spaces, punctuation or digits (as SentencePiece's defaults for LLaMA).
fn sentencepiece_training_pre_tokenizer() -> PreTokenizerWrapper {
    PreSequence::new(vec![
        Metaspace::new('▁', PrependScheme::First, true).into(),
        Punctuation::new(SplitDelimiterBehavior::Isolated).into(),
        Digits::new(true).into(),
    ])
    .into()
}

type TrainTok = TokenizerImpl<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>;

/// Trains BPE on `texts` with this pre-tokenizer; returns the alphabet, the merge results in
/// the order learnt, and how often each token occurs when the trained tokenizer encodes `texts`.
fn learn_merges(pre: PreTokenizerWrapper, alphabet: HashSet<char>, texts: &[String], vocab_size: usize) -> Result<(Vec<String>, Vec<String>, HashMap<String, u64>)> {
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(alphabet)
        .build();
    let mut tok: TrainTok = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(pre))
        .with_post_processor(None)
        .with_decoder(None)
        .build()
        .map_err(|e| anyhow!("building the training tokenizer: {e}"))?;
    tok.train(&mut trainer, texts.iter()).map_err(|e| anyhow!("training BPE on the corpus: {e}"))?;
    let json: Value = serde_json::from_str(&tok.to_string(false).map_err(|e| anyhow!("{e}"))?)?;
    let mut vocab: Vec<(String, u64)> = json
        .pointer("/model/vocab")
        .and_then(Value::as_object)
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default();
    vocab.sort_by_key(|x| x.1);
    let merges: Vec<String> = json
        .pointer("/model/merges")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|m| match m {
                    Value::Array(p) => Some(format!("{}{}", p[0].as_str()?, p[1].as_str()?)),
                    Value::String(s) => Some(s.replacen(' ', "", 1)),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let n_alpha = vocab.len() - merges.len();
    let counts: Vec<HashMap<u32, u64>> = {
        use rayon::prelude::*;
        texts
            .par_chunks(256)
            .map(|chunk| {
                let mut m = HashMap::new();
                for t in chunk {
                    if let Ok(e) = tok.encode(t.as_str(), false) {
                        for &id in e.get_ids() {
                            *m.entry(id).or_insert(0) += 1;
                        }
                    }
                }
                m
            })
            .collect()
    };
    let mut freq: HashMap<String, u64> = HashMap::new();
    for m in counts {
        for (id, c) in m {
            if let Some(t) = tok.id_to_token(id) {
                *freq.entry(t).or_insert(0) += c;
            }
        }
    }
    Ok((vocab.into_iter().take(n_alpha).map(|x| x.0).collect(), merges, freq))
}

/// Extends a tokenizer; returns the new tokenizer (not yet written) and the report.
pub fn extend_tokenizer(base: &BaseTokenizer, source: &PieceSource) -> Result<(Tokenizer, ExtendReport)> {
    let mut ex = Extender::new(base)?;
    let mut report = ExtendReport { kind: Some(base.kind), base_tokenizer_size: base.size, ..Default::default() };
    let mut seen = HashSet::new();
    let mut requested: Vec<String> = Vec::new();
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
                    report.rejected.push(Rejected { piece: p.clone(), reason: format!("the pre-tokenizer splits it into {n} parts, so it can never be one token") });
                    continue;
                }
                match ex.add_piece(&internal) {
                    Outcome::Added => requested.push(internal),
                    Outcome::Present => report.already_present += 1,
                    Outcome::Failed(got) => report.rejected.push(Rejected { piece: p.clone(), reason: format!("no merge plan yields one token (got {got:?})") }),
                }
            }
        }
        PieceSource::Corpus { texts, target_size } => {
            if (*target_size as u64) < base.size as u64 {
                bail!("target size {target_size} is smaller than the base tokenizer's {} ids; it must be at least that", base.size);
            }
            if texts.is_empty() {
                bail!("the corpus to learn pieces from is empty");
            }
            let need = target_size - base.size as usize;
            let alphabet: HashSet<char> = match base.kind {
                TokenizerKind::ByteLevel => ByteLevel::alphabet().into_iter().collect(),
                _ => HashSet::new(),
            };
            let distinct_chars = texts.iter().flat_map(|t| t.chars()).collect::<HashSet<char>>().len() + 2;
            let mut n_merges = need * 2 + 256;
            loop {
                let (alpha, merges, freq) = learn_merges(pre_tokenizer_for_training(base), alphabet.clone(), texts, distinct_chars + 256 + n_merges)?;
                let exhausted = merges.len() < n_merges;
                // Most useful first: how many tokens each learnt piece saves where the trained
                // tokenizer uses it (occurrences × (old tokens − 1)); ties in merge order.
                // Characters the base lacks count too (a SentencePiece-style base spells them in
                // byte-fallback tokens).
                let mut scored: Vec<(u64, usize, String)> = merges
                    .into_iter()
                    .chain(alpha)
                    .enumerate()
                    .filter(|(_, c)| !c.is_empty() && !ex.vocab.contains_key(c))
                    .map(|(i, c)| {
                        let old = base.tok.get_model().tokenize(&c).map(|t| t.len()).unwrap_or(1) as u64;
                        (freq.get(&c).copied().unwrap_or(0) * old.saturating_sub(1), i, c)
                    })
                    .collect();
                scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                let candidates: Vec<String> = scored.into_iter().map(|x| x.2).collect();
                let start = ex.mark();
                let mut local_requested = Vec::new();
                let mut local = ExtendReport::default();
                for c in &candidates {
                    if ex.next_id as usize >= *target_size {
                        break;
                    }
                    if !seen.insert(c.clone()) {
                        local.duplicates += 1;
                        continue;
                    }
                    let m = ex.mark();
                    match ex.add_piece(c) {
                        Outcome::Added if ex.next_id as usize <= *target_size => local_requested.push(c.clone()),
                        Outcome::Added => ex.rollback(m),
                        Outcome::Present => local.already_present += 1,
                        Outcome::Failed(got) => local.rejected.push(Rejected { piece: c.clone(), reason: format!("no merge plan yields one token (got {got:?})") }),
                    }
                }
                if ex.next_id as usize >= *target_size || exhausted || n_merges > 64 * (need + 256) {
                    report.candidates = candidates.len();
                    report.already_present = local.already_present;
                    report.rejected = local.rejected;
                    report.duplicates = local.duplicates;
                    requested = local_requested;
                    break;
                }
                ex.rollback(start);
                seen.clear();
                n_merges *= 4;
            }
        }
    }

    // The new tokenizer: the base with its BPE model rebuilt on the extended vocabulary and merges.
    let bpe0 = base.bpe();
    let mut vocab: tokenizers::models::bpe::Vocab = Default::default();
    for (k, &v) in &ex.vocab {
        vocab.insert(k.clone(), v);
    }
    let mut b = BPE::builder().vocab_and_merges(vocab, ex.merges.clone()).fuse_unk(bpe0.fuse_unk).byte_fallback(bpe0.byte_fallback).ignore_merges(bpe0.ignore_merges);
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
        let mut old_ids: Vec<u32> = old_model.tokenize(t).map_err(|e| anyhow!("old tokenizer on {t:?}: {e}"))?.iter().map(|x| x.id).collect();
        if old_ids.len() > 1 {
            old_ids.retain(|&i| Some(i) != old_unk && Some(i) != marker);
        }
        report.new_tokens.push(NewToken { id: *id, token: t.clone(), text: base.text(t), requested: *req, old_ids });
    }
    verify(base, &tok, &requested, &mut report)?;
    Ok((tok, report))
}

/// Checks every new token with the `tokenizers` crate on the new tokenizer (the model alone, and
/// for requested pieces the whole pipeline on the piece's text).
fn verify(base: &BaseTokenizer, tok: &Tokenizer, requested: &[String], report: &mut ExtendReport) -> Result<()> {
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

/// Options of [`extend_model`].
#[derive(Clone, Debug)]
pub struct ExtendOptions {
    /// The embedding's row count is rounded up to a multiple of this.
    pub pad_to_multiple: usize,
    /// Write into an existing, non-empty output directory.
    pub overwrite: bool,
}

impl Default for ExtendOptions {
    fn default() -> Self {
        ExtendOptions { pad_to_multiple: 64, overwrite: false }
    }
}

fn stored_dtype(dir: &Path) -> StoreDtype {
    let probe = || -> Option<StoreDtype> {
        let file = if dir.join(crate::weights::SINGLE_FILE).exists() {
            dir.join(crate::weights::SINGLE_FILE)
        } else {
            let idx: Value = serde_json::from_slice(&std::fs::read(dir.join(crate::weights::INDEX_FILE)).ok()?).ok()?;
            dir.join(idx.pointer("/weight_map/model.embed_tokens.weight")?.as_str()?)
        };
        let bytes = std::fs::read(file).ok()?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
        let info = meta.info("model.embed_tokens.weight")?;
        Some(if info.dtype == safetensors::Dtype::BF16 { StoreDtype::BF16 } else { StoreDtype::F32 })
    };
    probe().unwrap_or(StoreDtype::F32)
}

/// Grows a `[rows, h]` matrix to `new_rows`: old rows kept bit for bit, each new token's row the
/// mean of the old rows of its old ids (all old rows' mean when it has none), padding rows zero.
fn grow(old: &[f32], rows: usize, h: usize, new_rows: usize, real_old: usize, new_tokens: &[NewToken]) -> Vec<f32> {
    let mut out = vec![0f32; new_rows * h];
    out[..rows * h].copy_from_slice(old);
    let mut all = vec![0f64; h];
    for r in 0..real_old.min(rows) {
        for (a, x) in all.iter_mut().zip(&old[r * h..(r + 1) * h]) {
            *a += *x as f64;
        }
    }
    let n_all = real_old.min(rows).max(1) as f64;
    for t in new_tokens {
        let ids: Vec<usize> = t.old_ids.iter().map(|&i| i as usize).filter(|&i| i < rows).collect();
        let row = &mut out[t.id as usize * h..(t.id as usize + 1) * h];
        if ids.is_empty() {
            for (o, a) in row.iter_mut().zip(&all) {
                *o = (*a / n_all) as f32;
            }
            continue;
        }
        let mut acc = vec![0f64; h];
        for &i in &ids {
            for (a, x) in acc.iter_mut().zip(&old[i * h..(i + 1) * h]) {
                *a += *x as f64;
            }
        }
        for (o, a) in row.iter_mut().zip(&acc) {
            *o = (*a / ids.len() as f64) as f32;
        }
    }
    out
}

/// The whole extension: reads the base model directory, writes the extended one, returns the report
/// (also written to `out/vocab_extension.json`).
pub fn extend_model(base_dir: &Path, out: &Path, source: &PieceSource, opts: &ExtendOptions) -> Result<ExtendReport> {
    if opts.pad_to_multiple == 0 {
        bail!("--pad-to-multiple must be at least 1");
    }
    if !base_dir.is_dir() {
        bail!("base model directory {} does not exist", base_dir.display());
    }
    let tok_path = base_dir.join("tokenizer.json");
    if !tok_path.exists() {
        bail!("{}: no tokenizer.json in the base model directory (extend-vocab needs the fast-tokenizer file; convert a tokenizer.model with transformers first)", base_dir.display());
    }
    let cfg_path = base_dir.join("config.json");
    if !cfg_path.exists() {
        bail!("{}: no config.json in the base model directory", base_dir.display());
    }
    if out.exists() && std::fs::read_dir(out)?.next().is_some() && !opts.overwrite {
        bail!("output directory {} exists and is not empty (pass --overwrite to write into it)", out.display());
    }
    if out.exists() && base_dir.canonicalize()? == out.canonicalize()? {
        bail!("the output directory must differ from the base directory");
    }
    let config = LlamaConfig::from_file(&cfg_path)?;
    let base = BaseTokenizer::load(&tok_path)?;
    if base.size as usize > config.vocab_size {
        bail!("{}: the tokenizer has {} ids but the model's vocab_size is {}", base_dir.display(), base.size, config.vocab_size);
    }
    let (tok, mut report) = extend_tokenizer(&base, source)?;
    let real = report.new_tokenizer_size as usize;
    let new_vocab = real.div_ceil(opts.pad_to_multiple) * opts.pad_to_multiple;
    let new_vocab = new_vocab.max(config.vocab_size);
    report.old_model_vocab = config.vocab_size;
    report.new_model_vocab = new_vocab;

    let cpu = Cpu;
    let mut model = Llama::load(&cpu, base_dir)?;
    let h = model.config.hidden_size;
    let old_rows = model.config.vocab_size;
    for p in model.params.iter_mut() {
        if p.name == "model.embed_tokens.weight" || p.name == "lm_head.weight" {
            let old = p.value.to_host(&cpu);
            let grown = grow(&old, old_rows, h, new_vocab, base.size as usize, &report.new_tokens);
            p.value = Tensor::from_host(&cpu, &grown, &[new_vocab, h]);
        }
    }
    model.config.vocab_size = new_vocab;
    model.config.raw.insert(REAL_VOCAB_KEY.into(), real.into());

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Everything else of the base directory is copied (not weights, config or tokenizer; not a
    // SentencePiece tokenizer.model, which would still hold the old vocabulary).
    for entry in std::fs::read_dir(base_dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
        let skip = matches!(name.as_str(), "config.json" | "tokenizer.json" | "tokenizer.model" | REPORT_FILE)
            || name == crate::weights::SINGLE_FILE
            || name == crate::weights::INDEX_FILE
            || (name.starts_with("model-") && name.ends_with(".safetensors"));
        if skip || !path.is_file() {
            continue;
        }
        std::fs::copy(&path, out.join(&name)).with_context(|| format!("copying {} to {}", path.display(), out.display()))?;
    }
    let shard = if base_dir.join(crate::weights::INDEX_FILE).exists() && !base_dir.join(crate::weights::SINGLE_FILE).exists() {
        Some(5_000_000_000)
    } else {
        None
    };
    model.save(&cpu, out, stored_dtype(base_dir), shard)?;
    let text = tok.to_string(true).map_err(|e| anyhow!("serialising the tokenizer: {e}"))?;
    crate::fsutil::write_atomic(&out.join("tokenizer.json"), text.as_bytes())?;
    // The written file, read back, must give the same checks.
    let written = BaseTokenizer::load(&out.join("tokenizer.json"))?;
    if written.size != report.new_tokenizer_size {
        bail!("the written tokenizer has {} ids, expected {}", written.size, report.new_tokenizer_size);
    }
    crate::fsutil::write_atomic(&out.join(REPORT_FILE), serde_json::to_string_pretty(&report)?.as_bytes())?;
    Ok(report)
}

/// The real vocabulary size of a model directory's config (padding rows excluded): the
/// `llama_cpt_real_vocab_size` key when present, else `vocab_size`.
pub fn real_vocab_size(config: &LlamaConfig) -> usize {
    config.raw.get(REAL_VOCAB_KEY).and_then(Value::as_u64).map_or(config.vocab_size, |v| v as usize)
}

/// Trains a small base tokenizer of either kind (tests and experiments): byte-level BPE (GPT-2
/// pre-tokenization, `<s>`/`</s>`), or SentencePiece-style like LLaMA-2's tokenizer.json (BPE with
/// byte fallback over `<0x00>`..`<0xFF>`, `<unk>`/`<s>`/`</s>` at ids 0..3, Metaspace `▁`
/// prepended once, BOS added by the post-processor; at most `limit_alphabet` characters).
pub fn train_base_tokenizer(kind: TokenizerKind, texts: &[String], vocab_size: usize, limit_alphabet: Option<usize>) -> Result<Tokenizer> {
    match kind {
        TokenizerKind::ByteLevel => {
            let dir = std::env::temp_dir().join(format!("llama-cpt-bpe-{}-{:?}", std::process::id(), std::thread::current().id()));
            std::fs::create_dir_all(&dir)?;
            let p = dir.join("tokenizer.json");
            crate::train::default_run::train_bpe_tokenizer(&p, texts, vocab_size, false)?;
            let t = Tokenizer::from_file(&p).map_err(|e| anyhow!("{e}"))?;
            let _ = std::fs::remove_dir_all(&dir);
            Ok(t)
        }
        TokenizerKind::Metaspace => {
            let specials = ["<unk>", "<s>", "</s>"];
            let mut builder = BpeTrainerBuilder::new().vocab_size(vocab_size - 256).min_frequency(2).show_progress(false);
            if let Some(l) = limit_alphabet {
                builder = builder.limit_alphabet(l);
            }
            let mut trainer = builder.build();
            let mut t: TrainTok = TokenizerBuilder::new()
                .with_model(BPE::default())
                .with_normalizer(None)
                .with_pre_tokenizer(Some(sentencepiece_training_pre_tokenizer()))
                .with_post_processor(None)
                .with_decoder(None)
                .build()
                .map_err(|e| anyhow!("{e}"))?;
            t.train(&mut trainer, texts.iter()).map_err(|e| anyhow!("training: {e}"))?;
            let json: Value = serde_json::from_str(&t.to_string(false).map_err(|e| anyhow!("{e}"))?)?;
            let mut learnt: Vec<(String, u64)> = json["model"]["vocab"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect();
            learnt.sort_by_key(|x| x.1);
            let mut vocab: tokenizers::models::bpe::Vocab = Default::default();
            for s in specials {
                let n = vocab.len() as u32;
                vocab.insert(s.to_string(), n);
            }
            for b in 0..256 {
                let n = vocab.len() as u32;
                vocab.insert(format!("<0x{b:02X}>"), n);
            }
            for (k, _) in learnt {
                let n = vocab.len() as u32;
                vocab.entry(k).or_insert(n);
            }
            let merges: Vec<(String, String)> = json["model"]["merges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| match m {
                    Value::Array(p) => (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()),
                    Value::String(s) => {
                        let (a, b) = s.split_once(' ').unwrap();
                        (a.to_string(), b.to_string())
                    }
                    _ => unreachable!(),
                })
                .collect();
            let bpe = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .unk_token("<unk>".into())
                .fuse_unk(true)
                .byte_fallback(true)
                .build()
                .map_err(|e| anyhow!("{e}"))?;
            let decoder: DecoderWrapper = tokenizers::decoders::sequence::Sequence::new(vec![
                tokenizers::normalizers::replace::Replace::new("▁", " ").map_err(|e| anyhow!("{e}"))?.into(),
                tokenizers::decoders::byte_fallback::ByteFallback::default().into(),
                tokenizers::decoders::fuse::Fuse::default().into(),
                tokenizers::decoders::strip::Strip::new(' ', 1, 0).into(),
            ])
            .into();
            let post = tokenizers::processors::template::TemplateProcessing::builder()
                .try_single("<s> $A")
                .map_err(|e| anyhow!("{e}"))?
                .try_pair("<s> $A <s> $B")
                .map_err(|e| anyhow!("{e}"))?
                .special_tokens(vec![("<s>".to_string(), 1u32)])
                .build()
                .map_err(|e| anyhow!("{e}"))?;
            let mut tok = Tokenizer::new(bpe);
            tok.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
            tok.with_decoder(Some(decoder));
            tok.with_post_processor(Some(post));
            tok.add_special_tokens(&specials.map(|s| AddedToken::from(s, true)));
            Ok(tok)
        }
        TokenizerKind::Plain => bail!("train_base_tokenizer: choose ByteLevel or Metaspace"),
    }
}
