//! Tokens per character and per sample, per language, for one or more tokenizers.
//!
//! ```text
//! tokenizer-report --tokenizer llama2=a/tokenizer.json --tokenizer colossal=b/tokenizer.json \
//!     --set zh=data/corpora/zh --set en=data/corpora/en [--json]
//! ```
#![warn(clippy::too_many_lines)] // no function over 80 code lines (clippy.toml)
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;
use llama_cpt::data::corpus::{CorpusOptions, TxtSplit};
use llama_cpt::data::report::{report, to_markdown};

#[derive(Parser, Debug)]
#[command(about = "Compare tokenizers: tokens per character and per sample, per language")]
struct Args {
    /// NAME=tokenizer.json (repeatable).
    #[arg(long = "tokenizer", required = true)]
    tokenizers: Vec<String>,
    /// LANGUAGE=PATH of .jsonl/.json/.txt (repeatable).
    #[arg(long = "set", required = true)]
    sets: Vec<String>,
    #[arg(long, value_enum, default_value = "blank-line")]
    txt_split: TxtSplit,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    json: bool,
}

fn pairs(v: &[String], what: &str) -> Result<Vec<(String, PathBuf)>> {
    v.iter()
        .map(|s| match s.split_once('=') {
            Some((a, b)) => Ok((a.to_string(), PathBuf::from(b))),
            None => bail!("--{what} must be NAME=PATH, got {s:?}"),
        })
        .collect()
}

fn main() -> Result<()> {
    let a = Args::parse();
    let (rows, issues) = report(
        &pairs(&a.tokenizers, "tokenizer")?,
        &pairs(&a.sets, "set")?,
        &CorpusOptions { txt_split: a.txt_split },
    )?;
    for i in &issues {
        eprintln!("skipped: {i}");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", to_markdown(&rows));
    }
    Ok(())
}
