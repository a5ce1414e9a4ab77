//! `generate`: continue a prompt with a model directory (HF layout + tokenizer.json), streaming
//! tokens as they come. KV-cached; greedy by default, or temperature / top-k / top-p sampling.
#![warn(clippy::too_many_lines)] // no function over 80 code lines (clippy.toml)
use anyhow::Result;
use clap::Parser;
use llama_cpt::backend::Backend;
use llama_cpt::data::tokenizer::TextTokenizer;
use llama_cpt::device::{on_device, OnBackend};
use llama_cpt::generate::{generate, Sampling};
use llama_cpt::model::Llama;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Continue a prompt with a LLaMA model directory")]
struct Args {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// tokenizer.json (default: the model directory's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print token ids instead of text (and the timing) as JSON.
    #[arg(long)]
    ids: bool,
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
    let mut prompt = Vec::new();
    if tok.add_bos {
        prompt.extend(tok.bos);
    }
    prompt.extend(tok.encode_text(&a.prompt)?);
    let stop: Vec<u32> = if model.config.eos_token_ids.is_empty() {
        tok.eos.into_iter().collect()
    } else {
        model.config.eos_token_ids.clone()
    };
    // Padding rows of a grown vocabulary are never produced.
    let limit = Some(llama_cpt::vocab::real_vocab_size(&model.config));
    let sampling = Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    let t0 = Instant::now();
    let mut out = std::io::stdout();
    if !a.ids {
        print!("{}", a.prompt);
    }
    let mut produced: Vec<u32> = Vec::new();
    let mut shown = String::new();
    let ids = generate(&model, backend, &prompt, a.max_new_tokens, &sampling, &stop, limit, |t| {
        produced.push(t);
        if !a.ids {
            // Decode the whole continuation each time so multi-byte characters print whole.
            let text = tok.decode(&produced, true).unwrap_or_default();
            if text.len() > shown.len() && text.starts_with(shown.as_str()) && !text.ends_with('\u{fffd}') {
                print!("{}", &text[shown.len()..]);
                let _ = out.flush();
                shown = text;
            }
        }
    })?;
    let secs = t0.elapsed().as_secs_f64();
    if a.ids {
        println!(
            "{}",
            serde_json::json!({"prompt_ids": prompt, "ids": ids, "seconds": secs, "tokens_per_s": ids.len() as f64 / secs})
        );
    } else {
        let text = tok.decode(&produced, true).unwrap_or_default();
        println!("{}", &text[shown.len().min(text.len())..]);
        eprintln!("[{} tokens in {secs:.2}s: {:.1} tokens/s]", ids.len(), ids.len() as f64 / secs);
    }
    Ok(())
}
