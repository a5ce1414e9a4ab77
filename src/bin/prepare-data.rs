//! Tokenizes corpora into shards. See docs/data-format.md.
//!
//! ```text
//! prepare-data --tokenizer TOKENIZER.json [--model-config config.json] --output OUT \
//!     --input zh=data/corpora/zh --input en=data/corpora/en [--input qa=replay.jsonl] \
//!     [--txt-split blank-line|file] [--shard-tokens 67108864] [--threads N] \
//!     [--bos|--no-bos] [--eos|--no-eos] [--strict] [--no-progress]
//! ```
//! Each `--input NAME=PATH` becomes the sub-dataset `OUT/NAME/` (shards + manifest.json).
#![warn(clippy::too_many_lines)] // no function over 80 code lines (clippy.toml)
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use llama_cpt::data::corpus::{CorpusOptions, TxtSplit};
use llama_cpt::data::prepare::{prepare_subset, PrepareConfig};
use llama_cpt::data::tokenizer::{SpecialTokenOptions, TextTokenizer};

#[derive(Parser, Debug)]
#[command(about = "Tokenize JSONL / text corpora into llama-cpt shards")]
struct Args {
    /// Hugging Face tokenizer.json.
    #[arg(long)]
    tokenizer: PathBuf,
    /// The model's config.json (bos_token_id, eos_token_id, vocab_size).
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// Output folder; each sub-dataset goes to OUTPUT/NAME.
    #[arg(long)]
    output: PathBuf,
    /// NAME=PATH: a sub-dataset from a file or directory of .jsonl/.json/.txt (repeatable).
    #[arg(long = "input", required = true)]
    inputs: Vec<String>,
    /// How .txt files are cut into documents.
    #[arg(long, value_enum, default_value = "blank-line")]
    txt_split: TxtSplit,
    /// Tokens per shard (a new shard starts once this many are written).
    #[arg(long, default_value_t = 1 << 26)]
    shard_tokens: usize,
    /// Tokenizer threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Force BOS on each document.
    #[arg(long, conflicts_with = "no_bos")]
    bos: bool,
    /// No BOS.
    #[arg(long)]
    no_bos: bool,
    /// Force EOS after each document (the default when the tokenizer has one).
    #[arg(long, conflicts_with = "no_eos")]
    eos: bool,
    /// No EOS.
    #[arg(long)]
    no_eos: bool,
    /// Fail on any skipped input instead of reporting it.
    #[arg(long)]
    strict: bool,
    #[arg(long)]
    no_progress: bool,
}

fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(t) = a.threads {
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global().context("building the thread pool")?;
    }
    let tri = |yes: bool, no: bool| {
        if yes {
            Some(true)
        } else if no {
            Some(false)
        } else {
            None
        }
    };
    let tok = TextTokenizer::load(
        &a.tokenizer,
        &SpecialTokenOptions {
            model_config: a.model_config.clone(),
            add_bos: tri(a.bos, a.no_bos),
            add_eos: tri(a.eos, a.no_eos),
        },
    )?;
    eprintln!(
        "tokenizer {}: vocab {}, bos {:?} (add: {}), eos {:?} (add: {})",
        a.tokenizer.display(),
        tok.vocab_size,
        tok.bos,
        tok.add_bos,
        tok.eos,
        tok.add_eos
    );
    let (mut tokens, mut secs, mut bytes) = (0u64, 0f64, 0u64);
    let mut names = std::collections::HashSet::new();
    for spec in &a.inputs {
        let Some((name, path)) = spec.split_once('=') else { bail!("--input must be NAME=PATH, got {spec:?}") };
        if !names.insert(name.to_string()) {
            bail!("sub-dataset name {name:?} given twice");
        }
        let cfg = PrepareConfig {
            name: name.into(),
            input: path.into(),
            output: a.output.clone(),
            shard_tokens: a.shard_tokens,
            corpus: CorpusOptions { txt_split: a.txt_split },
            strict: a.strict,
            progress: !a.no_progress,
        };
        let (m, st) =
            prepare_subset(&tok, &cfg).with_context(|| format!("preparing sub-dataset {name} from {path}"))?;
        for s in m.skipped.iter().take(20) {
            eprintln!("  skipped: {s}");
        }
        if m.skipped.len() > 20 {
            eprintln!("  … {} more in {}/{name}/manifest.json", m.skipped.len() - 20, a.output.display());
        }
        eprintln!(
            "{name}: {} documents, {} tokens ({} with loss), {} shard(s), {} skipped; {:.0} tokens/s on {} threads",
            m.n_docs,
            m.n_tokens,
            m.n_loss_tokens,
            m.shards.len(),
            m.n_skipped,
            st.n_tokens as f64 / st.tokenize_secs.max(1e-9),
            st.threads
        );
        tokens += st.n_tokens;
        secs += st.tokenize_secs;
        bytes += st.text_bytes;
    }
    let threads = rayon::current_num_threads();
    eprintln!(
        "total: {tokens} tokens from {bytes} bytes; tokenization {:.0} tokens/s, {:.0} tokens/s per core ({threads} threads)",
        tokens as f64 / secs.max(1e-9),
        tokens as f64 / secs.max(1e-9) / threads as f64
    );
    Ok(())
}
