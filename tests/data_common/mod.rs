//! Helpers shared by the data-pipeline integration tests.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use llama_cpt::batch::Batch;
use llama_cpt_ops::IGNORE_INDEX;

/// A fresh temporary directory for one test.
pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lcpt-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Trains a small byte-level BPE tokenizer with `<s>`, `</s>` on `texts`; returns its
/// tokenizer.json path (written into `dir`).
pub fn train_tokenizer(dir: &Path, texts: &[String], vocab_size: usize) -> PathBuf {
    let p = dir.join("tokenizer.json");
    llama_cpt::train::default_run::train_bpe_tokenizer(&p, texts, vocab_size, false).unwrap();
    p
}

/// `data/corpora/{zh,en}` from tools/fetch-corpora.sh, or a panic naming the script.
pub fn real_corpora() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/corpora");
    for lang in ["zh", "en"] {
        let p = root.join(lang);
        let ok = std::fs::read_dir(&p).map(|mut d| d.next().is_some()).unwrap_or(false);
        assert!(
            ok,
            "real-text corpus {} is missing: run tools/fetch-corpora.sh first (it downloads Debian's \
             fortunes-zh and fortunes packages into data/corpora)",
            p.display()
        );
    }
    root
}

/// Checks the invariants of a packed batch against the documents it came from. `docs` maps a
/// token id to (document, position); ids are unique over the data set, `0` is padding.
/// Returns the non-pad token ids, in order.
pub fn check_batch(b: &Batch, where_: &HashMap<u32, (usize, usize)>, docs: &[(Vec<u32>, Vec<u8>)]) -> Vec<u32> {
    let n = b.rows * b.seq_len;
    assert_eq!(b.tokens.len(), n);
    assert_eq!(b.targets.len(), n);
    assert_eq!(b.positions.len(), n);
    assert_eq!(b.cu_seqlens.first(), Some(&0));
    assert_eq!(*b.cu_seqlens.last().unwrap() as usize, n);
    assert!(b.cu_seqlens.windows(2).all(|w| w[0] < w[1]) || n == 0, "cu_seqlens not increasing");
    for r in 0..=b.rows {
        assert!(b.cu_seqlens.contains(&((r * b.seq_len) as u32)), "row boundary {r} missing from cu_seqlens");
    }
    let mut out = Vec::new();
    for w in b.cu_seqlens.windows(2) {
        let (s, e) = (w[0] as usize, w[1] as usize);
        if b.tokens[s] == 0 {
            // padding segment
            assert!(b.tokens[s..e].iter().all(|&t| t == 0));
            assert!(b.targets[s..e].iter().all(|&t| t == IGNORE_INDEX));
            continue;
        }
        let (d, p0) = where_[&b.tokens[s]];
        let (ids, mask) = &docs[d];
        for i in s..e {
            let p = p0 + (i - s);
            assert_eq!(b.tokens[i], ids[p], "segment leaves its document");
            assert_eq!(b.positions[i] as usize, i - s, "positions must restart per segment");
            let want = if p + 1 < ids.len() && mask[p + 1] == 1 { ids[p + 1] as i32 } else { IGNORE_INDEX };
            assert_eq!(b.targets[i], want, "target at doc {d} pos {p}");
            out.push(b.tokens[i]);
        }
    }
    out
}

/// Synthetic documents with globally unique ids starting at `*next` (never 0).
/// `kind`: 0 = plain (mask all 1), 1 = QA (first third masked), 2 = all masked.
pub fn synth_docs(next: &mut u32, lens: &[(usize, u8)]) -> Vec<(Vec<u32>, Vec<u8>)> {
    lens.iter()
        .map(|&(len, kind)| {
            let ids: Vec<u32> = (0..len as u32).map(|i| *next + i).collect();
            *next += len as u32;
            let mask = (0..len)
                .map(|i| match kind {
                    0 => 1,
                    1 => u8::from(i >= len / 3),
                    _ => 0,
                })
                .collect();
            (ids, mask)
        })
        .collect()
}

/// Deterministic pseudo-random lengths.
pub fn lengths(seed: u64, n: usize, max: usize) -> Vec<usize> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            1 + ((s >> 33) as usize % max)
        })
        .collect()
}
