//! Learning pieces on a corpus (the `tokenizers` BPE trainer), and small base tokenizers for tests.
//!
//! For the SentencePiece-style layouts pieces are learnt as SentencePiece learns them: never across
//! a line break (or any whitespace but the space), within whitespace-separated words (`▁` only at a
//! piece's start), at most [`SENTENCEPIECE_MAX_PIECE_CHARS`] characters, digits split when the base
//! splits them. Only pieces the [`ScriptFilter`] keeps become candidates.
use std::collections::{HashMap, HashSet};

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::punctuation::Punctuation;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, Model, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior, Tokenizer, TokenizerBuilder, TokenizerImpl,
};

use super::base::{BaseTokenizer, TokenizerKind};
use super::plan::{Extender, Outcome};
use super::script::{default_filter, script_costs, Script, ScriptFilter};
use super::{ExtendReport, Rejected};

/// SentencePiece's default `max_piece_length`.
pub const SENTENCEPIECE_MAX_PIECE_CHARS: usize = 16;

pub(super) fn pre_tokenizer_for_training(base: &BaseTokenizer) -> PreTokenizerWrapper {
    match (base.kind, base.tok.get_pre_tokenizer()) {
        (TokenizerKind::ByteLevel, Some(pt)) => pt.clone(),
        (TokenizerKind::ByteLevel, None) => ByteLevel::default().add_prefix_space(false).into(),
        (TokenizerKind::Metaspace, _) => sentencepiece_training_pre_tokenizer(base.splits_digits()),
        (TokenizerKind::Plain, Some(pt)) => pt.clone(),
        (TokenizerKind::Plain, None) => tokenizers::pre_tokenizers::whitespace::Whitespace.into(),
    }
}

/// Pieces never cross line breaks (SentencePiece trains line by line) or other whitespace, start a
/// word with `▁` only at their start (split_by_whitespace), never cross punctuation, and hold one
/// digit each when `split_digits` (LLaMA-2's split_digits).
fn sentencepiece_training_pre_tokenizer(split_digits: bool) -> PreTokenizerWrapper {
    let line_breaks = Split::new(SplitPattern::Regex(r"[^\S ]+".into()), SplitDelimiterBehavior::Removed, false)
        .expect("a valid regex");
    let mut steps: Vec<PreTokenizerWrapper> = vec![
        line_breaks.into(),
        Metaspace::new('▁', PrependScheme::First, true).into(),
        Punctuation::new(SplitDelimiterBehavior::Isolated).into(),
    ];
    if split_digits {
        steps.push(Digits::new(true).into());
    }
    PreSequence::new(steps).into()
}

type TrainTok = TokenizerImpl<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>;

/// What a BPE training run learnt: its alphabet, the merge results in the order learnt, and each
/// token's occurrences in the corpus.
type Learnt = (Vec<String>, Vec<String>, HashMap<String, u64>);

/// Trains BPE on `texts` with this pre-tokenizer; returns the alphabet, the merge results in
/// the order learnt, and how often each token occurs when the trained tokenizer encodes `texts`.
pub(super) fn learn_merges(
    pre: PreTokenizerWrapper,
    alphabet: HashSet<char>,
    texts: &[String],
    vocab_size: usize,
    max_piece_chars: Option<usize>,
    min_frequency: u64,
) -> Result<Learnt> {
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .max_token_length(max_piece_chars)
        .min_frequency(min_frequency)
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

/// Learns pieces on `texts` and adds those `keep` allows (the default filter when `None`), most
/// useful first, until the tokenizer has `target_size` ids.
pub(super) fn add_learnt_pieces(
    ex: &mut Extender,
    base: &BaseTokenizer,
    texts: &[String],
    target_size: usize,
    keep: Option<&[Script]>,
    seen: &mut HashSet<String>,
    report: &mut ExtendReport,
) -> Result<()> {
    if (target_size as u64) < base.size as u64 {
        bail!(
            "target size {target_size} is smaller than the base tokenizer's {} ids; it must be at least that",
            base.size
        );
    }
    if texts.is_empty() {
        bail!("the corpus to learn pieces from is empty");
    }
    report.script_costs = script_costs(&base.tok, texts)?;
    let filter = match keep {
        Some([]) => bail!("--keep-script needs at least one script"),
        Some(scripts) => ScriptFilter::new(scripts.to_vec()),
        None => default_filter(&report.script_costs)?,
    };
    report.kept_scripts = filter.scripts.clone();
    let need = target_size - base.size as usize;
    let alphabet: HashSet<char> = match base.kind {
        TokenizerKind::ByteLevel => ByteLevel::alphabet().into_iter().collect(),
        _ => HashSet::new(),
    };
    let max_piece_chars = (base.kind == TokenizerKind::Metaspace).then_some(SENTENCEPIECE_MAX_PIECE_CHARS);
    let distinct_chars = texts.iter().flat_map(|t| t.chars()).collect::<HashSet<char>>().len() + 2;
    let mut n_merges = need * 2 + 256;
    // Pairs seen once are merged only when the others run out (SentencePiece's BPE trainer also
    // goes on merging them); they rank last, as they save the fewest tokens.
    let mut min_frequency = 2;
    loop {
        let (alpha, merges, freq) = learn_merges(
            pre_tokenizer_for_training(base),
            alphabet.clone(),
            texts,
            distinct_chars + 256 + n_merges,
            max_piece_chars,
            min_frequency,
        )?;
        let exhausted = merges.len() < n_merges || n_merges > 64 * (need + 256);
        let candidates = ranked_candidates(ex, base, &filter, merges, alpha, &freq);
        let start = ex.mark();
        let local = add_candidates(ex, &candidates, target_size, seen);
        if ex.next_id as usize >= target_size {
            report.candidates = candidates.len();
            report.already_present = local.already_present;
            report.rejected = local.rejected;
            report.duplicates = local.duplicates;
            return Ok(());
        }
        if exhausted && min_frequency == 1 {
            bail!(
                "the corpus gives only {} candidate pieces made of {} characters: added with their intermediates they bring the tokenizer to {} ids, short of --target-size {target_size}; lower the target size, keep more scripts (--keep-script), or learn on more text",
                candidates.len(),
                filter.names(),
                ex.next_id
            );
        }
        ex.rollback(start);
        seen.clear();
        if exhausted {
            min_frequency = 1;
        } else {
            n_merges *= 4;
        }
    }
}

/// The learnt pieces of the kept scripts not yet in the vocabulary, most useful first: how many
/// tokens each saves where the trained tokenizer uses it (occurrences × (old tokens − 1)); ties in
/// merge order. Characters the base lacks count too (a SentencePiece-style base spells them in
/// byte-fallback tokens).
fn ranked_candidates(
    ex: &Extender,
    base: &BaseTokenizer,
    filter: &ScriptFilter,
    merges: Vec<String>,
    alpha: Vec<String>,
    freq: &HashMap<String, u64>,
) -> Vec<String> {
    let mut scored: Vec<(u64, usize, String)> = merges
        .into_iter()
        .chain(alpha)
        .enumerate()
        .filter(|(_, c)| {
            !c.is_empty() && !ex.vocab.contains_key(c) && base.text(c).is_some_and(|t| filter.keeps_piece(&t))
        })
        .map(|(i, c)| {
            let old = base.tok.get_model().tokenize(&c).map(|t| t.len()).unwrap_or(1) as u64;
            (freq.get(&c).copied().unwrap_or(0) * old.saturating_sub(1), i, c)
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|x| x.2).collect()
}

/// Adds `candidates` in order until the tokenizer has `target_size` ids; counts what was passed over.
fn add_candidates(
    ex: &mut Extender,
    candidates: &[String],
    target_size: usize,
    seen: &mut HashSet<String>,
) -> ExtendReport {
    let mut local = ExtendReport::default();
    for c in candidates {
        if ex.next_id as usize >= target_size {
            break;
        }
        if !seen.insert(c.clone()) {
            local.duplicates += 1;
            continue;
        }
        let m = ex.mark();
        match ex.add_piece(c) {
            Outcome::Added if ex.next_id as usize <= target_size => {}
            Outcome::Added => ex.rollback(m),
            Outcome::Present => local.already_present += 1,
            Outcome::Failed(got) => local
                .rejected
                .push(Rejected { piece: c.clone(), reason: format!("no merge plan yields one token (got {got:?})") }),
        }
    }
    local
}

/// Trains a small base tokenizer of either kind (tests and experiments): byte-level BPE (GPT-2
/// pre-tokenization, `<s>`/`</s>`), or SentencePiece-style like LLaMA-2's tokenizer.json (BPE with
/// byte fallback over `<0x00>`..`<0xFF>`, `<unk>`/`<s>`/`</s>` at ids 0..3, Metaspace `▁`
/// prepended once, BOS added by the post-processor; at most `limit_alphabet` characters).
pub fn train_base_tokenizer(
    kind: TokenizerKind,
    texts: &[String],
    vocab_size: usize,
    limit_alphabet: Option<usize>,
) -> Result<Tokenizer> {
    match kind {
        TokenizerKind::ByteLevel => train_byte_level_base(texts, vocab_size),
        TokenizerKind::Metaspace => train_sentencepiece_base(texts, vocab_size, limit_alphabet),
        TokenizerKind::Plain => bail!("train_base_tokenizer: choose ByteLevel or Metaspace"),
    }
}

/// Byte-level BPE as the default run trains it, read back from a scratch file.
fn train_byte_level_base(texts: &[String], vocab_size: usize) -> Result<Tokenizer> {
    let dir =
        std::env::temp_dir().join(format!("llama-cpt-bpe-{}-{:?}", std::process::id(), std::thread::current().id()));
    std::fs::create_dir_all(&dir)?;
    let p = dir.join("tokenizer.json");
    crate::train::default_run::train_bpe_tokenizer(&p, texts, vocab_size, false)?;
    let t = Tokenizer::from_file(&p).map_err(|e| anyhow!("{e}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(t)
}

/// SentencePiece-style BPE: byte fallback, `<unk>`/`<s>`/`</s>`, Metaspace prepended once.
fn train_sentencepiece_base(texts: &[String], vocab_size: usize, limit_alphabet: Option<usize>) -> Result<Tokenizer> {
    let specials = ["<unk>", "<s>", "</s>"];
    let mut builder = BpeTrainerBuilder::new().vocab_size(vocab_size - 256).min_frequency(2).show_progress(false);
    if let Some(l) = limit_alphabet {
        builder = builder.limit_alphabet(l);
    }
    let mut trainer = builder.build();
    let mut t: TrainTok = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(sentencepiece_training_pre_tokenizer(true)))
        .with_post_processor(None)
        .with_decoder(None)
        .build()
        .map_err(|e| anyhow!("{e}"))?;
    t.train(&mut trainer, texts.iter()).map_err(|e| anyhow!("training: {e}"))?;
    let (vocab, merges) = sentencepiece_vocab_and_merges(&t, &specials)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token("<unk>".into())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| anyhow!("{e}"))?;
    let (decoder, post) = sentencepiece_decoder_and_post_processor()?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
    tok.with_decoder(Some(decoder));
    tok.with_post_processor(Some(post));
    tok.add_special_tokens(&specials.map(|s| AddedToken::from(s, true)));
    Ok(tok)
}

/// The trained model's vocabulary after the specials and the 256 byte tokens, and its merges.
fn sentencepiece_vocab_and_merges(
    t: &TrainTok,
    specials: &[&str],
) -> Result<(tokenizers::models::bpe::Vocab, Vec<(String, String)>)> {
    let json: Value = serde_json::from_str(&t.to_string(false).map_err(|e| anyhow!("{e}"))?)?;
    let mut learnt: Vec<(String, u64)> =
        json["model"]["vocab"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect();
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
    Ok((vocab, merges))
}

/// LLaMA-2's decoder (▁ → space, byte fallback, fuse, strip one leading space) and its BOS template.
fn sentencepiece_decoder_and_post_processor(
) -> Result<(DecoderWrapper, tokenizers::processors::template::TemplateProcessing)> {
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
    Ok((decoder, post))
}
