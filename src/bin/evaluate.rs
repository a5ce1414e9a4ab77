//! `evaluate`: perplexity / bits per character on text sets, and multiple-choice benchmarks
//! (MMLU, CMMLU, C-Eval, AGIEval, GAOKAO-Bench layouts) scored by first-token logits.
#![warn(clippy::too_many_lines)] // no function over 80 code lines (clippy.toml)
use anyhow::{Context, Result};
use clap::Parser;
use llama_cpt::backend::Backend;
use llama_cpt::data::tokenizer::TextTokenizer;
use llama_cpt::device::{on_device, OnBackend};
use llama_cpt::eval::{load, mc, ppl, prompt, questions};
use llama_cpt::model::Llama;
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Evaluate a LLaMA model directory: bits per character and multiple choice")]
struct Args {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Text set to score, NAME=PATH (JSONL {"text"} / .txt file or folder). Repeatable.
    #[arg(long = "text", value_name = "NAME=PATH")]
    texts: Vec<String>,
    /// Multiple-choice benchmark, FORMAT=DIR with FORMAT one of mmlu, cmmlu, ceval, agieval,
    /// gaokao (the published folder layout). Repeatable.
    #[arg(long = "mc", value_name = "FORMAT=DIR")]
    mcs: Vec<String>,
    #[arg(long, default_value_t = 5)]
    shots: usize,
    /// Multiple-choice prompts: `colossal` (ColossalEval's prompts and letter tokens, comparable
    /// with its tables) or `original` (the benchmarks' own layouts).
    #[arg(long, default_value = "colossal")]
    prompt_style: String,
    /// Longest prompt or text window in tokens (default: the model's max_position_embeddings).
    #[arg(long)]
    max_tokens: Option<usize>,
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
    /// Write the results as JSON here (they are also printed as tables): one entry per `--text`
    /// and `--mc` as given, multiple-choice runs with every question's prompt length, shots,
    /// letter logits, pick and answer.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write each multiple-choice prompt's text to DIR/<run>/<subject>/<id>.txt, where <run> is
    /// `<n>-<format>` for the n-th `--mc` (from 1).
    #[arg(long, value_name = "DIR")]
    dump_prompts: Option<PathBuf>,
    /// `cpu`, or `cuda` (GPU 0; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() -> Result<()> {
    let a = Args::parse();
    on_device(&a.device, Task(&a))
}

struct Task<'a>(&'a Args);

impl OnBackend for Task<'_> {
    type Output = ();
    fn run<B: Backend>(self, backend: &B) -> Result<()> {
        run(backend, self.0)
    }
}

fn run<B: Backend>(backend: &B, a: &Args) -> Result<()> {
    let model = Llama::load(backend, &a.model)?;
    let tok = TextTokenizer::for_model(&a.model, a.tokenizer.as_deref())?;
    let max_tokens = a.max_tokens.unwrap_or(model.config.max_position_embeddings);
    let style: prompt::PromptStyle = a.prompt_style.parse().context("--prompt-style")?;
    let mut results = serde_json::Map::new();
    for spec in &a.texts {
        let (name, path) = spec.split_once('=').with_context(|| format!("--text {spec}: expected NAME=PATH"))?;
        let (texts, issues) = ppl::read_texts(path.as_ref())?;
        for i in &issues {
            eprintln!("{name}: skipped {}:{}: {:?} {}", i.file.display(), i.line.unwrap_or(0), i.kind, i.detail);
        }
        let s = ppl::score_texts(&model, backend, &tok, &texts, max_tokens, a.batch_tokens)?;
        println!(
            "text {name}: {} documents, {} tokens, {} chars: perplexity {:.3}, {:.4} bits/token, {:.4} bits/char",
            s.documents, s.tokens, s.chars, s.perplexity, s.bits_per_token, s.bits_per_char
        );
        insert_unique(&mut results, format!("text:{name}"), path, serde_json::to_value(&s)?);
    }
    for (run, spec) in a.mcs.iter().enumerate() {
        let (fmt, dir) = spec.split_once('=').with_context(|| format!("--mc {spec}: expected FORMAT=DIR"))?;
        let format: questions::Format = fmt.parse()?;
        let mut issues = Vec::new();
        let subjects = load::load(format, dir.as_ref(), a.shots, &mut issues)?;
        let r =
            mc::evaluate(&model, backend, &tok, format, style, &subjects, a.shots, max_tokens, a.batch_tokens, issues)?;
        for i in &r.issues {
            eprintln!("{fmt}: {i}");
        }
        println!("{}", mc::table(&r));
        if let Some(root) = &a.dump_prompts {
            let dir = root.join(format!("{}-{}", run + 1, fmt.to_ascii_lowercase()));
            for q in &r.per_question {
                let path = dir.join(&q.subject).join(format!("{}.txt", file_safe(&q.id)));
                std::fs::create_dir_all(path.parent().unwrap())
                    .with_context(|| format!("--dump-prompts: creating {}", path.parent().unwrap().display()))?;
                llama_cpt::fsutil::write_atomic(&path, q.prompt.as_bytes())
                    .with_context(|| format!("--dump-prompts: writing {}", path.display()))?;
            }
        }
        insert_unique(&mut results, format!("mc:{fmt}"), dir, serde_json::to_value(&r)?);
    }
    if let Some(p) = &a.json {
        llama_cpt::fsutil::write_atomic(
            p,
            serde_json::to_string_pretty(&serde_json::Value::Object(results))?.as_bytes(),
        )?;
    }
    Ok(())
}

/// Keeps every run: the first of a key as `key`, the next ones as `key#2`, `key#3`, …, each with
/// the `path` it read.
fn insert_unique(
    results: &mut serde_json::Map<String, serde_json::Value>,
    key: String,
    path: &str,
    mut value: serde_json::Value,
) {
    if let Some(fields) = value.as_object_mut() {
        fields.insert("path".into(), path.into());
    }
    let mut unique = key.clone();
    let mut n = 1;
    while results.contains_key(&unique) {
        n += 1;
        unique = format!("{key}#{n}");
    }
    results.insert(unique, value);
}

/// A record id as a file name: path separators and other odd characters become `_`.
fn file_safe(id: &str) -> String {
    id.chars().map(|c| if c.is_alphanumeric() || c == '-' { c } else { '_' }).collect()
}
