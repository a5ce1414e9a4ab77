//! Times full training steps (forward, backward, global-norm clip 1.0, AdamW) on the CPU backend,
//! for tools/cpu-side-by-side.sh; tools/torch_cpu_step.py times the same step under PyTorch.
//!
//!     cargo run --release --example cpu_step -- --shape bench|smollm2|smoke [--steps N] [--warmup N]
//!
//! Prints one line: `llama-cpt <shape> threads T seconds S tokens/s X peak_rss_mib M gemm_gflop G
//! gemm_seconds GS` (seconds per timed step; the GEMM totals cover the timed steps only).
use anyhow::{bail, Context, Result};
use llama_cpt::backend::AdamWConfig;
use llama_cpt::batch::Batch;
use llama_cpt::config::LlamaConfig;
use llama_cpt::cpu::Cpu;
use llama_cpt::model::{Llama, StepOptions};
use llama_cpt::optim::AdamW;
use llama_cpt_ops::matmul::gemm_totals;
use std::time::Instant;

/// A model and batch shape: the one PyTorch's peer (tools/torch_cpu_step.py) builds under the same name.
struct Shape {
    config: LlamaConfig,
    rows: usize,
    seq: usize,
}

fn shape(name: &str) -> Result<Shape> {
    // (vocab, hidden, ffn, layers, heads, kv heads, tied embeddings), rows × seq.
    let (config, rows, seq) = match name {
        // benches/train_step.rs.
        "bench" => (LlamaConfig::small(32_000, 256, 688, 4, 8, 8, false), 8, 256),
        // SmolLM2-135M (the recipe's model) at the recipe's batch.
        "smollm2" => (LlamaConfig::small(49_152, 576, 1536, 30, 9, 3, true), 4, 512),
        // Tiny: checks the script end to end in seconds.
        "smoke" => (LlamaConfig::small(512, 64, 128, 2, 4, 2, true), 2, 32),
        _ => bail!("--shape {name}: expected bench, smollm2 or smoke"),
    };
    Ok(Shape { config, rows, seq })
}

/// Peak resident memory of this process (VmHWM), in MiB.
fn peak_rss_mib() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("/proc/self/status has no VmHWM line")?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("/proc/self/status: unreadable VmHWM line {line:?}"))?;
    Ok(kib / 1024.0)
}

fn main() -> Result<()> {
    let mut name = String::from("bench");
    let (mut steps, mut warmup) = (5usize, 2usize);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--shape" => name = value()?,
            "--steps" => steps = value()?.parse().context("--steps: not a number")?,
            "--warmup" => warmup = value()?.parse().context("--warmup: not a number")?,
            _ => bail!("unknown argument {flag} (expected --shape, --steps, --warmup)"),
        }
    }
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    llama_cpt::cpu::retain_freed_memory();
    let Shape { config, rows, seq } = shape(&name)?;
    let vocab = config.vocab_size;
    let mut model = Llama::random(&Cpu, config, 0);
    let tokens: Vec<u32> = (0..rows * seq).map(|i| ((i * 7919) % vocab) as u32).collect();
    let labels: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let batch = Batch::from_rows(rows, seq, tokens, &labels);
    let mut opt = AdamW::new(&Cpu, &model.params, AdamWConfig::default());
    let trainable = vec![true; model.params.len()];
    let mut step = |model: &mut Llama<Cpu>| -> Result<f64> {
        let (loss, grads) = model.loss_and_grads(&Cpu, &batch, 1.0, StepOptions::default())?;
        opt.step(&Cpu, &mut model.params, &grads, &trainable, 1e-4, Some(1.0));
        Ok(loss)
    };
    for _ in 0..warmup {
        step(&mut model)?;
    }
    let (flops0, gemm_s0) = gemm_totals();
    let started = Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = step(&mut model)?;
    }
    let seconds = started.elapsed().as_secs_f64() / steps as f64;
    let (flops1, gemm_s1) = gemm_totals();
    if !loss.is_finite() {
        bail!("the loss is {loss}: the timed steps did not train");
    }
    println!(
        "llama-cpt {name} threads {} seconds {seconds:.4} tokens/s {:.0} peak_rss_mib {:.0} gemm_gflop {:.2} gemm_seconds {:.4} loss {loss:.4}",
        rayon::current_num_threads(),
        (rows * seq) as f64 / seconds,
        peak_rss_mib()?,
        (flops1 - flops0) as f64 / 1e9 / steps as f64,
        (gemm_s1 - gemm_s0) / steps as f64,
    );
    Ok(())
}
