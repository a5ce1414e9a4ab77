//! `import-gguf`: a LLaMA GGUF file (llama.cpp) → a Hugging Face model directory that pretrain
//! (`model.from`), evaluate, generate, extend-vocab and transformers open: config.json, F32
//! model.safetensors (dequantised, Q/K rotary permutation undone), tokenizer.json,
//! tokenizer_config.json, generation_config.json.
#![warn(clippy::too_many_lines)] // no function over 80 code lines (clippy.toml)
use anyhow::Result;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use llama_cpt::gguf::{import::import, GgufFile};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Convert a LLaMA GGUF file into a Hugging Face model directory (F32 safetensors + tokenizer.json)")]
struct Args {
    /// The .gguf file (F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors).
    gguf: PathBuf,
    /// The model directory to write (must not exist, unless --force).
    out_dir: PathBuf,
    /// Replace an existing out_dir (only after the new one is complete).
    #[arg(long)]
    force: bool,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let t0 = Instant::now();
    {
        let g = GgufFile::open(&a.gguf)?;
        let name = g.get("general.name").and_then(|v| v.as_str()).unwrap_or("?");
        let arch = g.get("general.architecture").and_then(|v| v.as_str()).unwrap_or("?");
        println!(
            "{}: GGUF v{}, {arch} \"{name}\", {} tensors, {} metadata keys",
            a.gguf.display(),
            g.version,
            g.tensors.len(),
            g.metadata.len()
        );
    }
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}").unwrap().progress_chars("=> "));
    bar.set_prefix("dequantising");
    let summary = import(&a.gguf, &a.out_dir, a.force, &mut |i, n, name| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
        bar.set_message(name.to_string());
    })?;
    bar.finish_and_clear();
    let c = &summary.config;
    let types: Vec<String> = summary.tensor_types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "model: {} layers, hidden {}, {} heads ({} KV), head_dim {}, FFN {}, vocab {}, θ {}, ε {}, context {}, {} embeddings",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size,
        c.rope_theta,
        c.rms_norm_eps,
        c.max_position_embeddings,
        if c.tie_word_embeddings { "tied" } else { "untied" }
    );
    println!("weights: {:.1}M parameters from {} → F32", summary.params as f64 / 1e6, types.join(", "));
    println!(
        "tokenizer: byte-level BPE, {} tokens, {} merges, pre-tokenizer {:?}, {} special tokens{}",
        summary.tokens,
        summary.merges,
        summary.pre,
        summary.special.len(),
        if summary.chat_template { ", chat template" } else { "" }
    );
    for w in &summary.warnings {
        println!("warning: {w}");
    }
    println!("wrote {} in {:.1} s", a.out_dir.display(), t0.elapsed().as_secs_f64());
    Ok(())
}
