//! Vocabulary extension (`extend-vocab`, `llama_cpt::vocab`): pieces become single tokens, old ids
//! and embedding rows stay bit for bit, logits of old-token text are unchanged, transformers opens
//! the result with the same ids and logits, real Chinese text gets much shorter (byte-level BPE and
//! SentencePiece-style bases), and bad inputs fail clearly. Needs data/corpora (tools/fetch-corpora.sh)
//! and the oracle Python (.venv or LLAMA_CPT_PYTHON).
mod common;

use std::path::{Path, PathBuf};

use common::*;
use llama_cpt::batch::Batch;
use llama_cpt::config::LlamaConfig;
use llama_cpt::cpu::Cpu;
use llama_cpt::data::corpus::CorpusOptions;
use llama_cpt::data::report::{load_texts, measure, to_markdown};
use llama_cpt::model::Llama;
use llama_cpt::vocab::*;
use llama_cpt::weights::StoreDtype;
use safetensors::SafeTensors;
use tokenizers::{Model, Tokenizer};

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lcpt-vocab-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn corpus(lang: &str) -> Vec<String> {
    let p = repo_root().join("data/corpora").join(lang);
    assert!(p.exists(), "{} is missing: run tools/fetch-corpora.sh first", p.display());
    let texts = load_texts(&p, &CorpusOptions::default(), &mut Vec::new()).unwrap();
    assert!(texts.len() > 500, "{lang} corpus too small");
    texts
}

/// (training part, every 10th text held out).
fn split(texts: &[String]) -> (Vec<String>, Vec<String>) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (i, t) in texts.iter().enumerate() {
        if i % 10 == 9 { b.push(t.clone()) } else { a.push(t.clone()) }
    }
    (a, b)
}

/// An English-centred base tokenizer (as LLaMA's is): English text plus a little Chinese.
fn base_texts() -> Vec<String> {
    let (en, _) = split(&corpus("en"));
    let (zh, _) = split(&corpus("zh"));
    en.into_iter().chain(zh.into_iter().step_by(30)).collect()
}

/// A base model directory: the tokenizer, a random tiny LLaMA, and a file to be copied.
fn make_base(dir: &Path, kind: TokenizerKind, tied: bool, vocab: usize) -> Tokenizer {
    std::fs::create_dir_all(dir).unwrap();
    let limit = if kind == TokenizerKind::Metaspace { Some(600) } else { None };
    let tok = train_base_tokenizer(kind, &base_texts(), vocab, limit).unwrap();
    tok.save(dir.join("tokenizer.json"), true).unwrap();
    let size = tok.get_vocab_size(true);
    let mut cfg = LlamaConfig::small(size.div_ceil(64) * 64, 32, 64, 2, 4, 2, tied);
    cfg.bos_token_id = tok.token_to_id("<s>");
    cfg.eos_token_ids = vec![tok.token_to_id("</s>").unwrap()];
    Llama::random(&Cpu, cfg, 7).save(&Cpu, dir, StoreDtype::F32, None).unwrap();
    std::fs::write(dir.join("generation_config.json"), "{\"do_sample\": false}").unwrap();
    tok
}

fn raw_tensor(dir: &Path, name: &str) -> (Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    (t.shape().to_vec(), t.data().to_vec())
}

fn logits_of(model: &Llama<Cpu>, ids: &[u32]) -> Vec<f32> {
    let labels = vec![-100i32; ids.len()];
    model.logits(&Cpu, &Batch::from_rows(1, ids.len(), ids.to_vec(), &labels)).unwrap()
}

/// Everything check 1 and 3 ask of an extended directory.
fn check_extended(base: &Path, out: &Path, report: &ExtendReport, texts: &[&str]) {
    let old = Tokenizer::from_file(base.join("tokenizer.json")).unwrap();
    let new = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert!(report.failures.is_empty(), "pieces failing the single-token check: {:?}", report.failures);
    assert!(report.added_pieces > 0);
    // Old ids unchanged; new ids contiguous after them.
    for (tok, id) in old.get_vocab(true) {
        assert_eq!(new.token_to_id(&tok), Some(id), "old token {tok:?} changed id");
    }
    let ids: Vec<u32> = report.new_tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, (report.base_tokenizer_size..report.new_tokenizer_size).collect::<Vec<_>>());
    assert_eq!(new.get_vocab_size(true) as u32, report.new_tokenizer_size);
    // Each new token is one token for the BPE model (re-checked here, independent of the report).
    for t in &report.new_tokens {
        let got: Vec<u32> = new.get_model().tokenize(&t.token).unwrap().iter().map(|x| x.id).collect();
        assert_eq!(got, vec![t.id], "{:?}", t.token);
    }
    // Config: rounded size, real size recorded, other files copied.
    let cfg = LlamaConfig::from_file(&out.join("config.json")).unwrap();
    let old_cfg = LlamaConfig::from_file(&base.join("config.json")).unwrap();
    assert_eq!(cfg.vocab_size % 64, 0);
    assert!(cfg.vocab_size >= report.new_tokenizer_size as usize);
    assert_eq!(real_vocab_size(&cfg), report.new_tokenizer_size as usize);
    assert!(out.join("generation_config.json").exists());
    // Embedding rows: old bit for bit, new = mean of the old rows, padding zero.
    let h = cfg.hidden_size;
    let mut names = vec!["model.embed_tokens.weight"];
    if !cfg.tie_word_embeddings {
        names.push("lm_head.weight");
    }
    for name in names {
        let (s0, b0) = raw_tensor(base, name);
        let (s1, b1) = raw_tensor(out, name);
        assert_eq!(s1, vec![cfg.vocab_size, h]);
        let n_old = report.base_tokenizer_size as usize * h * 4;
        assert!(b1[..n_old] == b0[..n_old], "{name}: old rows changed");
        let f = |b: &[u8], r: usize| -> Vec<f32> { b[r * h * 4..(r + 1) * h * 4].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect() };
        for t in report.new_tokens.iter().step_by(37) {
            let want: Vec<f32> = (0..h)
                .map(|j| (t.old_ids.iter().map(|&i| f(&b0, i as usize)[j] as f64).sum::<f64>() / t.old_ids.len() as f64) as f32)
                .collect();
            assert!(!t.old_ids.is_empty());
            assert!(f(&b1, t.id as usize) == want, "{name}: row of {:?}", t.token);
        }
        for r in (report.new_tokenizer_size as usize).max(s0[0])..cfg.vocab_size {
            assert!(f(&b1, r).iter().all(|&x| x == 0.0), "{name}: padding row {r} is not zero");
        }
    }
    // Logits of old-token text unchanged on the old columns.
    let m0 = Llama::load(&Cpu, base).unwrap();
    let m1 = Llama::load(&Cpu, out).unwrap();
    let old_ids = old.encode("The quick brown fox — 我们的自由软件。", true).unwrap().get_ids().to_vec();
    let (l0, l1) = (logits_of(&m0, &old_ids), logits_of(&m1, &old_ids));
    let (v0, v1) = (old_cfg.vocab_size, cfg.vocab_size);
    let mut max_diff = 0f32;
    for t in 0..old_ids.len() {
        for j in 0..report.base_tokenizer_size as usize {
            max_diff = max_diff.max((l0[t * v0 + j] - l1[t * v1 + j]).abs());
        }
    }
    eprintln!("old-token logits: max |Δ| = {max_diff:e} over the old tokens' columns (old vocab {v0} rows → {v1})");
    assert!(max_diff <= 1e-5, "old-token logits changed by {max_diff}");

    // Check 3: transformers (AutoTokenizer + AutoModelForCausalLM) gives the same ids and logits.
    let texts_path = out.join("check-texts.json");
    std::fs::write(&texts_path, serde_json::to_string(texts).unwrap()).unwrap();
    let expected = out.join("check-out.safetensors");
    let log = run_python("check_extended_vocab.py", &[out, &texts_path, &expected]);
    eprintln!("{}", log.trim());
    let got = read_tensors(&expected);
    for (i, text) in texts.iter().enumerate() {
        let ours = new.encode(*text, true).unwrap().get_ids().to_vec();
        let theirs: Vec<u32> = got[&format!("ids_{i}")].1.iter().map(|&x| x as u32).collect();
        assert_eq!(theirs, ours, "token ids differ for {text:?}");
        let logits = logits_of(&m1, &ours);
        let err = rel_err(&logits, &got[&format!("logits_{i}")].1);
        assert!(err <= 1e-4, "logits differ from transformers for {text:?}: {err:e}");
    }
    std::fs::remove_file(expected).ok();
    std::fs::remove_file(texts_path).ok();
}

#[test]
fn vocab_extend_piece_list_byte_level_untied() {
    let d = tempdir("pieces-bl");
    let (base, out) = (d.join("base"), d.join("out"));
    let tok = make_base(&base, TokenizerKind::ByteLevel, false, 1200);
    let present = tok.decode(&[tok.token_to_id("Ġthe").unwrap()], false).unwrap();
    assert_eq!(present, " the");
    let pieces = ["中国", "我们", "人生", "的时候", "自由软件", "天下", "中国", "hello world", "程序员", "哈哈哈哈", "Debian"];
    let jsonl: String = pieces.iter().chain([&" the"]).map(|p| serde_json::json!({"piece": p}).to_string() + "\n").collect();
    std::fs::write(d.join("pieces.jsonl"), jsonl).unwrap();
    let list = read_pieces(&d.join("pieces.jsonl")).unwrap();
    assert_eq!(list.len(), pieces.len() + 1);
    let report = extend_model(&base, &out, &PieceSource::Pieces(list), &ExtendOptions::default()).unwrap();
    eprintln!("added {:?}", report.new_tokens.iter().map(|t| (t.id, t.text.clone(), t.requested)).collect::<Vec<_>>());
    assert_eq!(report.duplicates, 1);
    assert!(report.already_present >= 1, "\" the\" is in the base vocabulary");
    assert_eq!(report.rejected.len(), 1, "{:?}", report.rejected);
    assert!(report.rejected[0].piece == "hello world" && report.rejected[0].reason.contains("pre-tokenizer"));
    let new = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    for p in ["中国", "我们", "人生", "的时候", "自由软件", "天下", "程序员", "哈哈哈哈"] {
        let ids = new.encode(p, false).unwrap().get_ids().to_vec();
        assert_eq!(ids.len(), 1, "{p:?} → {:?}", new.encode(p, false).unwrap().get_tokens());
        assert!(ids[0] >= report.base_tokenizer_size);
    }
    check_extended(&base, &out, &report, &["中国的程序员说：自由软件。", "The quick brown fox jumps over the lazy dog.", "哈哈哈哈，Debian 天下"]);
    // A second run into the same directory needs --overwrite.
    let err = extend_model(&base, &out, &PieceSource::Pieces(vec!["中国".into()]), &ExtendOptions::default()).unwrap_err();
    assert!(format!("{err:#}").contains("not empty"), "{err:#}");
}

#[test]
fn vocab_extend_corpus_sentencepiece_style_tied() {
    let d = tempdir("corpus-sp");
    let (base, out) = (d.join("base"), d.join("out"));
    let tok = make_base(&base, TokenizerKind::Metaspace, true, 1500);
    assert!(tok.get_model().token_to_id("<0xE4>").is_some());
    let (zh, _) = split(&corpus("zh"));
    let target = tok.get_vocab_size(true) + 400;
    let report = extend_model(&base, &out, &PieceSource::Corpus { texts: zh, target_size: target, keep: None }, &ExtendOptions::default()).unwrap();
    eprintln!(
        "SentencePiece-style: {} → {} ({} pieces, {} intermediates, {} word-start merges), rows {} → {}",
        report.base_tokenizer_size, report.new_tokenizer_size, report.added_pieces, report.added_intermediates, report.word_start_merges, report.old_model_vocab, report.new_model_vocab
    );
    assert_eq!(report.new_tokenizer_size as usize, target);
    check_extended(&base, &out, &report, &["中国的程序员说：自由软件。", "The quick brown fox jumps over the lazy dog.", "  天下 大事，分久必合"]);
}

fn tokens_per_char(kind: TokenizerKind, base_size: usize, extra: usize) -> Vec<llama_cpt::data::report::ReportRow> {
    let d = tempdir(&format!("tpc-{kind:?}"));
    let limit = if kind == TokenizerKind::Metaspace { Some(600) } else { None };
    let tok = train_base_tokenizer(kind, &base_texts(), base_size, limit).unwrap();
    tok.save(d.join("tokenizer.json"), true).unwrap();
    let base = BaseTokenizer::load(&d.join("tokenizer.json")).unwrap();
    let (zh_train, zh_held) = split(&corpus("zh"));
    let (_, en_held) = split(&corpus("en"));
    let target = base.size as usize + extra;
    let (new, report) = extend_tokenizer(&base, &PieceSource::Corpus { texts: zh_train, target_size: target, keep: None }).unwrap();
    assert!(report.failures.is_empty(), "{:?}", &report.failures[..report.failures.len().min(10)]);
    assert_eq!(report.new_tokenizer_size as usize, target);
    eprintln!(
        "{kind:?}: {} → {} ids: {} pieces + {} intermediates, {} word-start merges",
        report.base_tokenizer_size, report.new_tokenizer_size, report.added_pieces, report.added_intermediates, report.word_start_merges
    );
    let name = |s: &str| format!("{kind:?} {s}");
    vec![
        measure(&base.tok, &name("before"), "zh", &zh_held).unwrap(),
        measure(&new, &name("after"), "zh", &zh_held).unwrap(),
        measure(&base.tok, &name("before"), "en", &en_held).unwrap(),
        measure(&new, &name("after"), "en", &en_held).unwrap(),
    ]
}

#[test]
fn vocab_real_chinese_tokens_per_char() {
    let mut rows = Vec::new();
    for kind in [TokenizerKind::ByteLevel, TokenizerKind::Metaspace] {
        let r = tokens_per_char(kind, 4000, 3000);
        let (zh0, zh1, en0, en1) = (r[0].tokens_per_char, r[1].tokens_per_char, r[2].tokens_per_char, r[3].tokens_per_char);
        assert!(zh1 < 0.8 * zh0, "{kind:?}: zh tokens/char {zh0:.3} → {zh1:.3}, expected a substantial drop");
        assert!(r[3].tokens <= r[2].tokens, "{kind:?}: English got worse: {en0:.4} → {en1:.4}");
        rows.extend(r);
    }
    eprintln!("held-out tokens per character (base 4000 ids, +3000 learnt on the zh training split):\n{}", to_markdown(&rows));
}

#[test]
fn vocab_bad_inputs() {
    let d = tempdir("bad");
    let base = d.join("base");
    make_base(&base, TokenizerKind::ByteLevel, true, 600);
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_extend-vocab")).args(args).output().unwrap();
        assert!(!o.status.success(), "extend-vocab {args:?} should fail");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let b = base.to_str().unwrap();
    // Empty / whitespace pieces, plain and JSONL.
    for (file, body) in [("empty.txt", "中国\n\n天下\n"), ("space.txt", "中国\n   \n"), ("space.jsonl", "{\"piece\": \"中国\"}\n{\"piece\": \" \\t\"}\n")] {
        std::fs::write(d.join(file), body).unwrap();
        let err = run(&["--base", b, "--out", d.join("o1").to_str().unwrap(), "--pieces", d.join(file).to_str().unwrap()]);
        assert!(err.contains("empty or whitespace-only piece") && err.contains(":2:"), "{file}: {err}");
    }
    // Plain lines are read verbatim (a leading space is part of the piece).
    std::fs::write(d.join("plain.txt"), " 中国\n天下\r\n").unwrap();
    assert_eq!(read_pieces(&d.join("plain.txt")).unwrap(), vec![" 中国".to_string(), "天下".to_string()]);
    // A base directory without tokenizer.json.
    let nt = d.join("no-tok");
    std::fs::create_dir_all(&nt).unwrap();
    std::fs::copy(base.join("config.json"), nt.join("config.json")).unwrap();
    std::fs::copy(base.join("model.safetensors"), nt.join("model.safetensors")).unwrap();
    let err = run(&["--base", nt.to_str().unwrap(), "--out", d.join("o2").to_str().unwrap(), "--pieces", d.join("plain.txt").to_str().unwrap()]);
    assert!(err.contains("no tokenizer.json"), "{err}");
    // A target size below the base vocabulary.
    let zh = repo_root().join("data/corpora/zh");
    let err = run(&["--base", b, "--out", d.join("o3").to_str().unwrap(), "--corpus", zh.to_str().unwrap(), "--target-size", "100"]);
    assert!(err.contains("target size 100 is smaller than the base tokenizer"), "{err}");
    // Neither pieces nor corpus.
    let err = run(&["--base", b, "--out", d.join("o4").to_str().unwrap()]);
    assert!(err.contains("--pieces") , "{err}");
    assert!(!d.join("o3").exists() && !d.join("o4").exists(), "nothing is written on errors");
}
