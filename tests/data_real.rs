//! The pipeline on real text (Debian's fortunes-zh and fortunes; run tools/fetch-corpora.sh
//! first): a tokenizer trained on it, prepare, loader round trip, the tokenizer report, and
//! token-for-token agreement with the Python `tokenizers` package when .venv exists.
mod data_common;

use std::collections::HashMap;

use data_common::*;
use llama_cpt::data::corpus::{CorpusOptions, TxtSplit};
use llama_cpt::data::prepare::{prepare_subset, PrepareConfig};
use llama_cpt::data::report::{load_texts, report};
use llama_cpt::data::shard::ShardReader;
use llama_cpt::data::tokenizer::{SpecialTokenOptions, TextTokenizer};
use llama_cpt::data::{Loader, LoaderConfig, Ordering, SubsetSpec};

#[test]
fn real_corpora_prepare_pack_and_report() {
    let root = real_corpora();
    let d = tempdir("real");
    let opts = CorpusOptions { txt_split: TxtSplit::BlankLine };
    let mut issues = Vec::new();
    let mut texts = load_texts(&root.join("zh"), &opts, &mut issues).unwrap();
    let n_zh = texts.len();
    texts.extend(load_texts(&root.join("en"), &opts, &mut issues).unwrap());
    assert!(n_zh > 500 && texts.len() > n_zh + 1000, "corpora look too small: {n_zh} zh, {} total", texts.len());
    assert!(texts[..n_zh].iter().all(|t| !t.contains('\u{1b}')), "ANSI escapes must be stripped");
    let tokp = train_tokenizer(&d, &texts, 4000);
    let tok = TextTokenizer::load(&tokp, &SpecialTokenOptions { add_bos: Some(true), ..Default::default() }).unwrap();

    let mut subsets = Vec::new();
    let mut counts: HashMap<u32, i64> = HashMap::new();
    for lang in ["zh", "en"] {
        let cfg = PrepareConfig {
            name: lang.into(),
            input: root.join(lang),
            output: d.join("out"),
            shard_tokens: 200_000,
            corpus: opts.clone(),
            strict: false,
            progress: false,
        };
        let (m, _) = prepare_subset(&tok, &cfg).unwrap();
        assert!(m.n_tokens > 100_000, "{lang}: {} tokens", m.n_tokens);
        for s in &m.shards {
            let r = ShardReader::open(d.join("out").join(lang).join(&s.file)).unwrap();
            for i in 0..r.n_tokens() {
                *counts.entry(r.tokens().get(i)).or_default() += 1;
            }
        }
        subsets.push(SubsetSpec::new(d.join("out").join(lang), 1.0));
    }
    // Every token back exactly once over 3 ranks (one epoch; plain text has no all-masked row).
    for ws in [1usize, 3] {
        let mut left = counts.clone();
        let mut fed_rows = 0;
        for rank in 0..ws {
            let cfg = LoaderConfig {
                seq_len: 4096,
                global_batch_rows: 6,
                micro_batch_rows: 2,
                world_size: ws,
                rank,
                seed: 1,
                ordering: Ordering::Bucket { bins: 4 },
                max_epochs: Some(1),
                ..Default::default()
            };
            let mut l = Loader::new(&subsets, cfg, None).unwrap();
            while let Some(b) = l.next_micro_batch().unwrap() {
                fed_rows += b.rows;
                let pad_start: Vec<usize> = b
                    .cu_seqlens
                    .windows(2)
                    .filter(|w| {
                        b.targets[w[0] as usize..w[1] as usize].iter().all(|&t| t == -100)
                            && b.tokens[w[0] as usize] == 0
                    })
                    .map(|w| w[0] as usize)
                    .collect();
                for (i, &t) in b.tokens.iter().enumerate() {
                    if pad_start.iter().any(|&s| i >= s && b.tokens[s..=i].iter().all(|&x| x == 0)) {
                        continue;
                    }
                    *left.get_mut(&t).expect("unknown token fed") -= 1;
                }
            }
            assert_eq!(l.skipped_rows(), 0);
        }
        assert!(left.values().all(|&c| c == 0), "ws {ws}: tokens lost or duplicated");
        assert!(fed_rows > 50);
    }

    // Tokenizer report: Chinese costs more tokens per character than English with this small
    // byte-level BPE trained on both, and every number is positive.
    let (rows, _) = report(
        &[("bpe4k".into(), tokp.clone())],
        &[("zh".into(), root.join("zh")), ("en".into(), root.join("en"))],
        &opts,
    )
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.tokens_per_char > 0.0 && r.tokens_per_sample > 0.0));

    // Same ids as the Python `tokenizers` package.
    let py = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if !py.exists() {
        eprintln!("note: .venv/bin/python missing; skipping the Python comparison");
        return;
    }
    let sample: Vec<&String> = texts.iter().step_by(37).collect();
    let input = d.join("sample.json");
    std::fs::write(&input, serde_json::to_string(&sample).unwrap()).unwrap();
    let out = std::process::Command::new(py)
        .arg("-c")
        .arg("import json,sys\nfrom tokenizers import Tokenizer\nt=Tokenizer.from_file(sys.argv[1])\nprint(json.dumps([e.ids for e in t.encode_batch(json.load(open(sys.argv[2])), add_special_tokens=False)]))")
        .arg(&tokp)
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let py_ids: Vec<Vec<u32>> = serde_json::from_slice(&out.stdout).unwrap();
    for (t, p) in sample.iter().zip(&py_ids) {
        assert_eq!(&tok.encode_text(t).unwrap(), p, "Rust and Python tokenizers disagree on {t:?}");
    }
}
