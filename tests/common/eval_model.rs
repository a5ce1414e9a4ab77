//! The evaluation tests' model: a random LLaMA with a byte-level BPE tokenizer trained on the
//! fixture questions, saved as an HF directory (one per test binary).
#![allow(dead_code)]
use llama_cpt::config::LlamaConfig;
use llama_cpt::cpu::Cpu;
use llama_cpt::data::tokenizer::{SpecialTokenOptions, TextTokenizer};
use llama_cpt::model::Llama;
use llama_cpt::train::default_run;
use llama_cpt::weights::StoreDtype;
use std::path::PathBuf;
use std::sync::OnceLock;

pub fn fixtures() -> PathBuf {
    crate::common::repo_root().join("tests/fixtures/eval")
}

/// A random model (weights ×5 so that logits are well separated) with a byte-level BPE tokenizer
/// trained on English and Chinese text, saved as an HF directory.
pub fn model_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(concat!("eval-model-", env!("CARGO_CRATE_NAME")));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut texts: Vec<String> = Vec::new();
        for f in ["mmlu/dev/astronomy_dev.csv", "mmlu/test/astronomy_test.csv", "cmmlu/dev/chinese_literature.csv", "cmmlu/test/chinese_literature.csv"] {
            texts.extend(std::fs::read_to_string(fixtures().join(f)).unwrap().lines().map(String::from));
        }
        texts.push("The following are multiple choice questions (with answers) about astronomy. Answer: A B C D 以下是关于的单项选择题，请直接给出正确答案的选项。答案：".into());
        default_run::train_bpe_tokenizer(&dir.join("tokenizer.json"), &texts, 600, false).unwrap();
        let tok = TextTokenizer::load(&dir.join("tokenizer.json"), &SpecialTokenOptions::default()).unwrap();
        let vocab = (tok.vocab_size as usize).div_ceil(64) * 64;
        let mut config = LlamaConfig::small(vocab, 64, 128, 2, 4, 2, false);
        config.bos_token_id = Some(0);
        config.eos_token_ids = vec![1];
        config.max_position_embeddings = 2048;
        let mut m = Llama::random(&Cpu, config, 11);
        for p in m.params.iter_mut().filter(|p| p.decay) {
            p.value.buf_mut().iter_mut().for_each(|x| *x *= 5.0);
        }
        m.save(&Cpu, &dir, StoreDtype::F32, None).unwrap();
        dir
    })
}

pub fn tokenizer() -> TextTokenizer {
    let d = model_dir();
    TextTokenizer::load(
        &d.join("tokenizer.json"),
        &SpecialTokenOptions { model_config: Some(d.join("config.json")), add_bos: Some(true), add_eos: Some(false) },
    )
    .unwrap()
}
