//! One full training step (forward, backward, AdamW) of a small LLaMA on the CPU backend.
//! tools/cpu-side-by-side.sh times the same step (examples/cpu_step.rs `--shape bench`) beside
//! PyTorch and prints the ratio.
//! Shape: 4 layers, hidden 256, 8 heads, FFN 688, vocab 32,000, batch 8 × seq 256.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llama_cpt::backend::AdamWConfig;
use llama_cpt::batch::Batch;
use llama_cpt::config::LlamaConfig;
use llama_cpt::cpu::Cpu;
use llama_cpt::model::{Llama, StepOptions};
use llama_cpt::optim::AdamW;

pub const ROWS: usize = 8;
pub const SEQ: usize = 256;

fn bench(c: &mut Criterion) {
    llama_cpt::cpu::retain_freed_memory();
    let config = LlamaConfig::small(32_000, 256, 688, 4, 8, 8, false);
    let mut model = Llama::random(&Cpu, config, 0);
    let tokens: Vec<u32> = (0..ROWS * SEQ).map(|i| ((i * 7919) % 32_000) as u32).collect();
    let labels: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let batch = Batch::from_rows(ROWS, SEQ, tokens, &labels);
    let mut opt = AdamW::new(&Cpu, &model.params, AdamWConfig::default());
    let trainable = vec![true; model.params.len()];
    let mut group = c.benchmark_group("cpu");
    group.sample_size(10);
    group.throughput(Throughput::Elements((ROWS * SEQ) as u64));
    group.bench_function("train_step_4x256_seq256_batch8", |b| {
        b.iter(|| {
            let (_, grads) = model.loss_and_grads(&Cpu, &batch, 1.0, StepOptions::default()).unwrap();
            opt.step(&Cpu, &mut model.params, &grads, &trainable, 1e-4, Some(1.0));
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
