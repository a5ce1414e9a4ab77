//! llama-cpt against transformers' LlamaForCausalLM: logits, loss and every parameter's gradient
//! (f32, relative error max|a−b|/max|b| ≤ 1e-4), on models built by tools/make_parity_models.py;
//! and checkpoints written by llama-cpt loaded back by transformers.
mod common;
use common::*;
use llama_cpt::batch::Batch;
use llama_cpt::config::LlamaConfig;
use llama_cpt::cpu::Cpu;
use llama_cpt::model::{Llama, StepOptions};
use llama_cpt::weights::StoreDtype;
use std::path::PathBuf;
use std::sync::OnceLock;

const TOL: f64 = 1e-4;

fn models() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("parity-models");
        let _ = std::fs::remove_dir_all(&dir);
        print!("{}", run_python("make_parity_models.py", &[&dir]));
        dir
    })
}

fn check_case(name: &str, opts: StepOptions) {
    let dir = models().join(name);
    let model = Llama::load(&Cpu, &dir).unwrap();
    let reference = read_tensors(&dir.join("reference.safetensors"));
    let (shape, ids) = &reference["input_ids"];
    let (rows, seq) = (shape[0], shape[1]);
    let tokens: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let labels: Vec<i32> = reference["labels"].1.iter().map(|&x| x as i32).collect();
    let batch = Batch::from_rows(rows, seq, tokens, &labels);

    let logits = model.logits(&Cpu, &batch).unwrap();
    let e_logits = rel_err(&logits, &reference["logits"].1);
    let (loss, grads) = model.loss_and_grads(&Cpu, &batch, 1.0, opts).unwrap();
    let e_loss = (loss - reference["loss"].1[0]).abs() / reference["loss"].1[0].abs();
    let mut worst = (0.0f64, String::new());
    for (p, g) in model.params.iter().zip(&grads) {
        let (_, want) = reference
            .get(&format!("grad.{}", p.name))
            .unwrap_or_else(|| panic!("no reference gradient for {}", p.name));
        let e = rel_err(g, want);
        assert!(e <= TOL, "{name}: gradient of {} relative error {e:e}", p.name);
        if e > worst.0 {
            worst = (e, p.name.clone());
        }
    }
    println!(
        "parity {name} (checkpointing {}): logits {e_logits:.2e}, loss {e_loss:.2e}, worst gradient {:.2e} ({})",
        opts.checkpoint_layers, worst.0, worst.1
    );
    assert!(e_logits <= TOL, "{name}: logits relative error {e_logits:e}");
    assert!(e_loss <= TOL, "{name}: loss relative error {e_loss:e}");
}

#[test]
fn mha_untied_head_dim_12() {
    check_case("mha_untied_hd12", StepOptions::default());
}

#[test]
fn gqa_4_to_1_tied_theta_500k() {
    check_case("gqa4_tied_theta500k", StepOptions::default());
    check_case("gqa4_tied_theta500k", StepOptions { checkpoint_layers: true });
}

#[test]
fn gqa_2_to_1_vocab_above_65535_sharded_checkpoint() {
    check_case("gqa2_vocab70k_sharded", StepOptions::default());
}

#[test]
fn bf16_checkpoint() {
    check_case("gqa4_tied_bf16", StepOptions::default());
}

/// Writes `input_ids` and llama-cpt's logits for transformers to compare against.
fn write_expected(model: &Llama<Cpu>, path: &std::path::Path) {
    let (rows, seq) = (2usize, 7usize);
    let tokens: Vec<u32> = (0..rows * seq).map(|i| ((i * 37 + 11) % model.config.vocab_size) as u32).collect();
    let batch = Batch::from_rows(rows, seq, tokens.clone(), &vec![-100; rows * seq]);
    let logits = model.logits(&Cpu, &batch).unwrap();
    let ids: Vec<u8> = tokens.iter().flat_map(|&t| (t as i64).to_le_bytes()).collect();
    let lg: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    let v = model.config.vocab_size;
    let views = vec![
        ("input_ids", safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![rows, seq], &ids).unwrap()),
        ("logits", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, seq, v], &lg).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn checkpoints_saved_by_llama_cpt_load_in_transformers() {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("saved-by-llama-cpt");
    let _ = std::fs::remove_dir_all(&root);
    let mut config = LlamaConfig::small(300, 32, 80, 2, 4, 1, true);
    config.rope_theta = 500_000.0;
    let untied = LlamaConfig::small(300, 32, 80, 2, 4, 4, false);
    let cases = [
        ("tied_f32", config.clone(), StoreDtype::F32, None),
        ("untied_bf16_sharded", untied, StoreDtype::BF16, Some(20_000)),
    ];
    for (name, cfg, dtype, shard) in cases {
        let dir = root.join(name);
        let mut model = Llama::random(&Cpu, cfg, 5);
        for p in model.params.iter_mut().filter(|p| p.decay) {
            p.value.buf_mut().iter_mut().for_each(|x| *x *= 5.0);
        }
        model.save(&Cpu, &dir, dtype, shard).unwrap();
        if shard.is_some() {
            assert!(dir.join("model.safetensors.index.json").exists(), "{name}: expected shards");
        }
        // What transformers sees is what was stored: compare with the model read back.
        let reloaded = Llama::load(&Cpu, &dir).unwrap();
        let expected = root.join(format!("{name}.expected.safetensors"));
        write_expected(&reloaded, &expected);
        print!("{}", run_python("check_hf_load.py", &[&dir, &expected]));
    }
}
