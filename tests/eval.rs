//! Evaluation and generation: agreement with transformers on choice logits, chosen answers and
//! greedy generations; the published layouts read from the sample sets; bad rows reported.
mod common;
use llama_cpt::config::LlamaConfig;
use llama_cpt::cpu::Cpu;
use llama_cpt::data::tokenizer::{SpecialTokenOptions, TextTokenizer};
use llama_cpt::eval::{mc, ppl};
use llama_cpt::generate::{generate, Sampling};
use llama_cpt::model::Llama;
use llama_cpt::train::default_run;
use llama_cpt::weights::StoreDtype;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

fn fixtures() -> PathBuf {
    common::repo_root().join("tests/fixtures/eval")
}

/// A random model (weights ×5 so that logits are well separated) with a byte-level BPE tokenizer
/// trained on English and Chinese text, saved as an HF directory.
fn model_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("eval-model");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut texts: Vec<String> = Vec::new();
        for f in ["mmlu/dev/astronomy_dev.csv", "mmlu/test/astronomy_test.csv", "cmmlu/dev/chinese_poetry.csv", "cmmlu/test/chinese_poetry.csv"] {
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

fn tokenizer() -> TextTokenizer {
    let d = model_dir();
    TextTokenizer::load(&d.join("tokenizer.json"), &SpecialTokenOptions { model_config: Some(d.join("config.json")), add_bos: Some(true), add_eos: Some(false) }).unwrap()
}

#[test]
fn choice_logits_answers_and_greedy_generation_agree_with_transformers() {
    let dir = model_dir();
    let model = Llama::load(&Cpu, dir).unwrap();
    let tok = tokenizer();
    let letters = mc::letter_ids(&tok).unwrap();
    let mut prompts = Vec::new();
    let mut ours = Vec::new();
    for (format, sub) in [(mc::Format::Mmlu, "mmlu"), (mc::Format::Cmmlu, "cmmlu")] {
        let mut issues = vec![];
        let subjects = mc::load(format, &fixtures().join(sub), &mut issues).unwrap();
        assert!(issues.is_empty(), "{issues:?}");
        let r = mc::evaluate(&model, &Cpu, &tok, format, &subjects, 5, 2048, 700, vec![]).unwrap();
        for s in &subjects {
            for q in &s.test {
                prompts.push(mc::prompt(&tok, s, q, 5, 2048).unwrap().0);
            }
        }
        ours.extend(r.choices);
    }
    assert_eq!(prompts.len(), 11);
    let gen_prompts: Vec<Vec<u32>> = prompts.iter().take(3).map(|p| p[..p.len().min(40)].to_vec()).collect();
    let t = Instant::now();
    let mut our_gen = Vec::new();
    for p in &gen_prompts {
        our_gen.push(generate(&model, &Cpu, p, 24, &Sampling::GREEDY, &[1], None, |_| {}).unwrap());
    }
    let our_secs = t.elapsed().as_secs_f64();
    let our_tokens: usize = our_gen.iter().map(|g| g.len()).sum();
    let req = serde_json::json!({"model": dir, "prompts": prompts, "letters": letters, "gen_prompts": gen_prompts, "max_new_tokens": 24, "eos": 1});
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(tmp.join("eval-req.json"), req.to_string()).unwrap();
    common::run_python("hf_eval_reference.py", &[&tmp.join("eval-req.json"), &tmp.join("eval-resp.json")]);
    let resp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.join("eval-resp.json")).unwrap()).unwrap();
    let mut worst = 0.0f64;
    for ((origin, pick, per), theirs) in ours.iter().zip(resp["letter_logits"].as_array().unwrap()) {
        let theirs: Vec<f64> = theirs.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let scale = theirs.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (a, b) in per.iter().zip(&theirs) {
            worst = worst.max((*a as f64 - b).abs() / scale);
        }
        let their_pick = (0..4).fold(0, |best, i| if theirs[i] > theirs[best] { i } else { best });
        assert_eq!(*pick, their_pick, "{origin}: llama-cpt picks {pick}, transformers {their_pick}");
    }
    assert!(worst <= 1e-4, "choice logits relative error {worst:e}");
    let theirs: Vec<Vec<u32>> = resp["generations"].as_array().unwrap().iter().map(|g| g.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()).collect();
    assert_eq!(our_gen, theirs, "greedy generations differ");
    let their_secs = resp["seconds"].as_f64().unwrap();
    println!(
        "choice logits max relative error {worst:.2e}; greedy generation: llama-cpt {:.1} tokens/s, transformers generate {:.1} tokens/s ({our_tokens} tokens)",
        our_tokens as f64 / our_secs,
        resp["generated"].as_f64().unwrap() / their_secs
    );
}

#[test]
fn every_published_layout_loads_from_the_samples() {
    let counts = [("mmlu", mc::Format::Mmlu, 7), ("cmmlu", mc::Format::Cmmlu, 4), ("ceval", mc::Format::Ceval, 3), ("agieval", mc::Format::Agieval, 5), ("gaokao", mc::Format::Gaokao, 2)];
    for (dir, format, n) in counts {
        let mut issues = vec![];
        let subjects = mc::load(format, &fixtures().join(dir), &mut issues).unwrap();
        assert!(issues.is_empty(), "{dir}: {issues:?}");
        assert_eq!(subjects.iter().map(|s| s.test.len()).sum::<usize>(), n, "{dir}");
    }
    let mut issues = vec![];
    let s = mc::load(mc::Format::Ceval, &fixtures().join("ceval"), &mut issues).unwrap();
    assert_eq!((s[0].name.as_str(), s[0].dev.len(), s[0].test[1].answer), ("high_school_geography", 2, 1));
}

#[test]
fn bad_rows_are_reported_with_file_and_line_and_the_rest_scored() {
    let mut issues = vec![];
    let subjects = mc::load(mc::Format::Mmlu, &fixtures().join("bad"), &mut issues).unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].test.len(), 2);
    let joined = issues.join("\n");
    assert!(joined.contains("broken_test.csv:2") && joined.contains("expected 6 columns"), "{joined}");
    assert!(joined.contains("broken_test.csv:3") && joined.contains("\"E\" is not one of"), "{joined}");
    assert!(joined.contains("\"empty\" has no usable questions"), "{joined}");
    let model = Llama::load(&Cpu, model_dir()).unwrap();
    let r = mc::evaluate(&model, &Cpu, &tokenizer(), mc::Format::Mmlu, &subjects, 5, 2048, 4096, issues).unwrap();
    assert_eq!(r.questions, 2);
    assert!(mc::table(&r).contains("broken"));
}

#[test]
fn bits_per_character_counts_every_token_once() {
    let model = Llama::load(&Cpu, model_dir()).unwrap();
    let tok = tokenizer();
    let texts = vec!["Which planet is closest to the Sun?".to_string(), "“床前明月光”的下一句是？".to_string()];
    let whole = ppl::score_texts(&model, &Cpu, &tok, &texts, 2048, 4096).unwrap();
    // Batching does not change the result; windows shorter than the texts predict fewer tokens.
    let one_by_one = ppl::score_texts(&model, &Cpu, &tok, &texts, 2048, 1).unwrap();
    assert_eq!(whole.tokens, one_by_one.tokens);
    assert!((whole.nll_nats - one_by_one.nll_nats).abs() < 1e-3 * whole.nll_nats);
    let n_tokens: usize = texts.iter().map(|t| tok.encode_text(t).unwrap().len()).sum();
    assert_eq!(whole.tokens, n_tokens, "with BOS every text token is predicted once");
    assert_eq!(whole.chars, texts.iter().map(|t| t.chars().count()).sum::<usize>());
    assert!((whole.bits_per_char - whole.nll_nats / std::f64::consts::LN_2 / whole.chars as f64).abs() < 1e-12);
}
