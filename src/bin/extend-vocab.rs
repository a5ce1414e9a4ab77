//! Extends a model's vocabulary (Colossal-LLaMA-2 step 1): new pieces appended to tokenizer.json
//! with the merges that produce them; embeddings (and an untied LM head) grown, each new row the
//! mean of the old rows of the piece's old tokens.
//!
//! ```text
//! extend-vocab --base MODEL --out NEW --pieces pieces.jsonl            # {"piece": ...} or plain lines
//! extend-vocab --base MODEL --out NEW --corpus data/corpora/zh --target-size 40000 [--keep-script Han]
//!              [--pad-to-multiple 64] [--measure zh=data/corpora/zh --measure en=data/corpora/en]
//! ```
#![warn(clippy::too_many_lines)] // no function over 80 code lines (clippy.toml)
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Parser;
use llama_cpt::data::corpus::CorpusOptions;
use llama_cpt::data::report::{load_texts, measure, to_markdown};
use llama_cpt::vocab::{
    extend_model, read_pieces, unchanged_outside_kept_scripts, ExtendOptions, ExtendReport, PieceSource, Script,
    ScriptFilter, REPORT_FILE,
};

#[derive(Parser, Debug)]
#[command(about = "Extend a LLaMA model's vocabulary: tokenizer.json pieces + merges, grown embeddings")]
struct Args {
    /// Base model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    base: PathBuf,
    /// Output model directory.
    #[arg(long)]
    out: PathBuf,
    /// Pieces to add: JSONL `{"piece": "..."}` or one piece per line.
    #[arg(long, conflicts_with = "corpus")]
    pieces: Option<PathBuf>,
    /// Corpus (.jsonl/.json/.txt file or directory, repeatable) to learn pieces on.
    #[arg(long, requires = "target_size")]
    corpus: Vec<PathBuf>,
    /// Tokenizer size to reach (ids, special tokens included) when learning on a corpus.
    #[arg(long)]
    target_size: Option<usize>,
    /// Learn only pieces of this script (repeatable: Han, Hiragana, Katakana, Hangul, Latin, …);
    /// default: the scripts the base spends more than one token per letter on in the corpus.
    #[arg(long, conflicts_with = "pieces")]
    keep_script: Vec<String>,
    /// Round the embedding rows up to a multiple of this (rows past the tokenizer are padding).
    #[arg(long, default_value_t = 64)]
    pad_to_multiple: usize,
    /// Write into an existing non-empty output directory.
    #[arg(long)]
    overwrite: bool,
    /// LANGUAGE=PATH: report tokens per character before and after (repeatable).
    #[arg(long)]
    measure: Vec<String>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let copts = CorpusOptions::default();
    let source = piece_source(&a, &copts)?;
    let report = extend_model(
        &a.base,
        &a.out,
        &source,
        &ExtendOptions { pad_to_multiple: a.pad_to_multiple, overwrite: a.overwrite },
    )?;
    print_report(&report, &a.out);
    if !a.measure.is_empty() {
        measure_before_after(&a, &report, &copts)?;
    }
    if !report.failures.is_empty() {
        std::process::exit(2);
    }
    Ok(())
}

/// Where the new pieces come from: a list, or corpora to learn them on.
fn piece_source(a: &Args, copts: &CorpusOptions) -> Result<PieceSource> {
    Ok(match (&a.pieces, a.corpus.is_empty()) {
        (Some(p), true) => PieceSource::Pieces(read_pieces(p)?),
        (None, false) => {
            let mut issues = Vec::new();
            let mut texts = Vec::new();
            for c in &a.corpus {
                texts.extend(load_texts(c, copts, &mut issues)?);
            }
            for i in &issues {
                eprintln!("skipped: {i}");
            }
            let keep = if a.keep_script.is_empty() {
                None
            } else {
                Some(a.keep_script.iter().map(|s| Script::parse(s)).collect::<Result<Vec<_>>>()?)
            };
            PieceSource::Corpus { texts, target_size: a.target_size.unwrap(), keep }
        }
        _ => bail!("give either --pieces FILE or --corpus PATH with --target-size N"),
    })
}

/// What the extension did, one line per finding.
fn print_report(report: &ExtendReport, out: &Path) {
    println!(
        "{:?} tokenizer: {} → {} ids ({} pieces, {} intermediates; {} already present, {} duplicates, {} rejected); embedding rows {} → {}",
        report.kind.unwrap(),
        report.base_tokenizer_size,
        report.new_tokenizer_size,
        report.added_pieces,
        report.added_intermediates,
        report.already_present,
        report.duplicates,
        report.rejected.len(),
        report.old_model_vocab,
        report.new_model_vocab
    );
    if !report.kept_scripts.is_empty() {
        let costs: Vec<String> = report
            .script_costs
            .iter()
            .map(|c| format!("{} {:.3} ({} letters)", c.script, c.tokens_per_char, c.chars))
            .collect();
        println!(
            "kept scripts: {}; base tokens per letter on the corpus: {}",
            ScriptFilter::new(report.kept_scripts.clone()).names(),
            costs.join(", ")
        );
    }
    for r in report.rejected.iter().take(20) {
        println!("rejected {:?}: {}", r.piece, r.reason);
    }
    for f in &report.failures {
        println!("CHECK FAILED ({}) {:?} (id {}): encodes as {:?}", f.check, f.piece, f.id, f.got);
    }
    if report.word_start_merges > 0 {
        println!("{} pieces merge with the prepended ▁ when encoded alone at the start of a text (they are whole inside text)", report.word_start_merges);
    }
    println!(
        "every new token checked with the tokenizers crate: {} failures; details in {}",
        report.failures.len(),
        out.join(REPORT_FILE).display()
    );
}

/// Tokens per character before and after on each `--measure` set, and whether text outside the
/// kept scripts still tokenizes as before.
fn measure_before_after(a: &Args, report: &ExtendReport, copts: &CorpusOptions) -> Result<()> {
    let old = tokenizers::Tokenizer::from_file(a.base.join("tokenizer.json")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let new = tokenizers::Tokenizer::from_file(a.out.join("tokenizer.json")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut rows = Vec::new();
    for m in &a.measure {
        let Some((lang, path)) = m.split_once('=') else { bail!("--measure must be LANGUAGE=PATH, got {m:?}") };
        let texts = load_texts(path.as_ref(), copts, &mut Vec::new())?;
        rows.push(measure(&old, "before", lang, &texts)?);
        rows.push(measure(&new, "after", lang, &texts)?);
        // The promise: text without a character of the kept scripts tokenizes exactly as before.
        if !report.kept_scripts.is_empty() {
            let filter = ScriptFilter::new(report.kept_scripts.clone());
            let (untouched, changed, _) = unchanged_outside_kept_scripts(&old, &new, &filter, &texts)?;
            println!("{lang}: {changed} of {untouched} documents without {} characters changed ids", filter.names());
        }
    }
    print!("{}", to_markdown(&rows));
    Ok(())
}
