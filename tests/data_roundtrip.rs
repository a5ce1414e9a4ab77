//! Packing + ordering + loader on synthetic data with unique token ids: round trip at several
//! world sizes, resume, determinism, all-masked rows — in both packing modes.
mod data_common;

use std::collections::HashMap;
use std::sync::Arc;

use data_common::*;
use llama_cpt::batch::Batch;
use llama_cpt::data::order::Catalog;
use llama_cpt::data::prepare::write_subset;
use llama_cpt::data::{Loader, LoaderConfig, LoaderState, Ordering, Packing};
use llama_cpt_ops::IGNORE_INDEX;

const VOCAB: u64 = 1 << 20; // > 65,536: u32 tokens on disk

struct Data {
    _dir: std::path::PathBuf,
    cat: Arc<Catalog>,
    docs: Vec<(Vec<u32>, Vec<u8>)>,
    where_: HashMap<u32, (usize, usize)>,
}

/// Two plain sub-datasets and a QA one; `with_masked` adds long all-masked documents.
fn data(name: &str, with_masked: bool) -> Data {
    let dir = tempdir(name);
    let mut next = 1u32;
    let mut all = Vec::new();
    let mut specs = Vec::new();
    for (i, (n, kind)) in [(70usize, 0u8), (45, 0), (30, 1)].into_iter().enumerate() {
        let mut lens: Vec<(usize, u8)> = lengths(i as u64 + 7, n, 150).into_iter().map(|l| (l.max(2), kind)).collect();
        if with_masked && i == 2 {
            lens.push((300, 2));
            lens.push((5, 2));
        }
        let docs = synth_docs(&mut next, &lens);
        let name = format!("sub{i}");
        write_subset(&dir, &name, VOCAB, 1500, docs.clone()).unwrap();
        specs.push((dir.join(&name), 1.0));
        all.extend(docs);
    }
    let cat = Arc::new(Catalog::open(&specs, true).unwrap());
    let mut where_ = HashMap::new();
    for (d, (ids, _)) in all.iter().enumerate() {
        for (p, &t) in ids.iter().enumerate() {
            where_.insert(t, (d, p));
        }
    }
    Data { _dir: dir, cat, docs: all, where_ }
}

fn cfg(ws: usize, rank: usize, m: usize) -> LoaderConfig {
    LoaderConfig {
        seq_len: 64,
        global_batch_rows: 24,
        micro_batch_rows: m,
        world_size: ws,
        rank,
        seed: 42,
        ordering: Ordering::Bucket { bins: 3 },
        packing: Packing::Concat,
        max_epochs: Some(1),
        prefetch: 2,
        pad_id: 0,
        verify_checksums: true,
    }
}

/// Runs every rank to the end; returns per-rank micro-batch lists.
fn run_all(d: &Data, base: &LoaderConfig) -> Vec<Vec<Batch>> {
    (0..base.world_size)
        .map(|r| {
            let mut l = Loader::with_catalog(d.cat.clone(), LoaderConfig { rank: r, ..base.clone() }, None).unwrap();
            let mut v = Vec::new();
            while let Some(b) = l.next_micro_batch().unwrap() {
                v.push(b);
            }
            v
        })
        .collect()
}

/// Reassembles the global row sequence (each row as its token vector) from per-rank batches.
fn global_rows(per_rank: &[Vec<Batch>], steps: usize) -> Vec<Vec<u32>> {
    let n = per_rank[0].len();
    assert!(per_rank.iter().all(|v| v.len() == n), "ranks got different numbers of micro-batches");
    assert_eq!(n % steps, 0);
    let mut rows = Vec::new();
    for g in 0..n / steps {
        for rank in per_rank {
            for b in &rank[g * steps..(g + 1) * steps] {
                for r in 0..b.rows {
                    rows.push(b.tokens[r * b.seq_len..(r + 1) * b.seq_len].to_vec());
                }
            }
        }
    }
    rows
}

#[test]
fn round_trip_every_token_once_at_world_sizes_1_2_3_8() {
    let d = data("rt", false);
    let total: usize = d.docs.iter().map(|x| x.0.len()).sum();
    let mut reference: Option<Vec<Vec<u32>>> = None;
    for (ws, m) in [(1, 1), (1, 4), (2, 1), (2, 4), (3, 1), (3, 8), (8, 1), (8, 3)] {
        let c = cfg(ws, 0, m);
        let per_rank = run_all(&d, &c);
        let mut seen = vec![0u32; d.where_.len() + 1];
        for rank in &per_rank {
            for b in rank {
                assert!(b.rows <= m);
                for t in check_batch(b, &d.where_, &d.docs) {
                    seen[t as usize] += 1;
                }
                // A fed row always has a loss target.
                for r in 0..b.rows {
                    assert!(b.targets[r * b.seq_len..(r + 1) * b.seq_len].iter().any(|&t| t != IGNORE_INDEX));
                }
            }
        }
        assert!(seen[1..].iter().all(|&c| c == 1), "ws {ws} m {m}: a token was lost or duplicated");
        assert_eq!(seen[1..].len(), total);
        let rows = global_rows(&per_rank, c.micro_steps());
        assert_eq!(rows.len(), total.div_ceil(64));
        match &reference {
            None => reference = Some(rows),
            Some(r) => assert_eq!(r, &rows, "global order differs at world size {ws}, micro {m}"),
        }
    }
}

#[test]
fn whole_docs_never_splits_a_document_that_fits_at_world_sizes_1_2_4() {
    let d = data("whole", false);
    let total: usize = d.docs.iter().map(|x| x.0.len()).sum();
    assert!(d.docs.iter().any(|x| x.0.len() > 64) && d.docs.iter().any(|x| x.0.len() <= 64));
    let mut reference: Option<Vec<Vec<u32>>> = None;
    for (ws, m) in [(1, 1), (1, 4), (2, 3), (4, 1), (4, 2)] {
        let c = LoaderConfig { packing: Packing::WholeDocs, ..cfg(ws, 0, m) };
        let per_rank = run_all(&d, &c);
        let mut seen = vec![0u32; d.where_.len() + 1];
        for b in per_rank.iter().flatten() {
            for t in check_batch(b, &d.where_, &d.docs) {
                seen[t as usize] += 1;
            }
            for w in b.cu_seqlens.windows(2) {
                let (s, e) = (w[0] as usize, w[1] as usize);
                if b.tokens[s] == 0 {
                    continue; // padding
                }
                let (doc, p0) = d.where_[&b.tokens[s]];
                let len = d.docs[doc].0.len();
                if len <= 64 {
                    assert_eq!((p0, e - s), (0, len), "ws {ws}: document {doc} ({len} tokens) was split");
                } else {
                    assert_eq!(
                        (p0 % 64, e - s),
                        (0, (len - p0).min(64)),
                        "ws {ws}: long document {doc} not cut into 64-token pieces"
                    );
                }
            }
        }
        // No token is lost: each is fed once, except the one-token tail of a long document when the
        // next document does not fit beside it — that row has no target and is skipped, and the
        // token was already the target of the row before.
        let targets: std::collections::HashSet<i32> =
            per_rank.iter().flatten().flat_map(|b| b.targets.iter().copied()).collect();
        for (t, &n) in seen.iter().enumerate().skip(1) {
            let (doc, p) = d.where_[&(t as u32)];
            let ok = n == 1 || (n == 0 && p + 1 == d.docs[doc].0.len() && p % 64 == 0 && targets.contains(&(t as i32)));
            assert!(ok, "ws {ws} m {m}: token {t} (document {doc}, position {p}) fed {n} times");
        }
        let rows = global_rows(&per_rank, c.micro_steps());
        // A row is padded only when the document that starts the next row did not fit in it.
        for pair in rows.windows(2) {
            let pad = pair[0].iter().rev().take_while(|&&t| t == 0).count();
            if pad > 0 {
                let (doc, p0) = d.where_[&pair[1][0]];
                assert!(p0 == 0 && d.docs[doc].0.len() > pad, "a row was padded although the next document fitted");
            }
        }
        assert!(rows.len() > total.div_ceil(64), "whole_docs should pad some rows");
        match &reference {
            None => reference = Some(rows),
            Some(r) => assert_eq!(r, &rows, "global order differs at world size {ws}, micro {m}"),
        }
    }
}

#[test]
fn resume_exactly_at_another_world_size() {
    let d = data("resume", true);
    for packing in [Packing::Concat, Packing::WholeDocs] {
        resume_exactly(&d, LoaderConfig { max_epochs: None, ordering: Ordering::Shuffle, packing, ..cfg(1, 0, 1) });
    }
}

/// 30 global batches in one go vs. in three legs at world sizes 2, 3 and 8.
fn resume_exactly(d: &Data, base: LoaderConfig) {
    // Reference: one rank, 30 global batches (several epochs: the stream is endless).
    let reference = {
        let mut l = Loader::with_catalog(d.cat.clone(), base.clone(), None).unwrap();
        let b: Vec<Batch> = (0..30 * 24).map(|_| l.next_micro_batch().unwrap().unwrap()).collect();
        global_rows(&[b], 24)
    };
    let tokens: usize = d.docs.iter().map(|x| x.0.len()).sum();
    assert!(30 * 24 * 64 > 2 * tokens, "the test should cross epochs");

    // 2 ranks for 11 global batches, then 3 ranks (micro 2) from the saved state, then 8 ranks.
    let mut rows = Vec::new();
    let mut state: Option<LoaderState> = None;
    for (ws, m, steps) in [(2usize, 1usize, 11usize), (3, 2, 9), (8, 3, 10)] {
        let c = LoaderConfig { world_size: ws, micro_batch_rows: m, ..base.clone() };
        let mut per_rank = Vec::new();
        let mut states = Vec::new();
        for r in 0..ws {
            let json = state.as_ref().map(|s| serde_json::to_string(s).unwrap());
            let st = json.map(|j| serde_json::from_str::<LoaderState>(&j).unwrap());
            let mut l = Loader::with_catalog(d.cat.clone(), LoaderConfig { rank: r, ..c.clone() }, st).unwrap();
            let v: Vec<Batch> = (0..steps * c.micro_steps()).map(|_| l.next_micro_batch().unwrap().unwrap()).collect();
            per_rank.push(v);
            states.push(l.state());
        }
        assert!(states.windows(2).all(|w| w[0] == w[1]), "ranks disagree on the state at a step boundary");
        assert_eq!(states[0].micro_in_batch, 0);
        rows.extend(global_rows(&per_rank, c.micro_steps()));
        state = Some(states[0].clone());
    }
    assert_eq!(state.as_ref().unwrap().global_batches, 30);
    assert!(state.as_ref().unwrap().epoch >= 1);
    assert_eq!(rows, reference, "{:?}", base.packing);
}

#[test]
fn mid_batch_state_resumes_only_at_same_world_size() {
    let d = data("midbatch", false);
    let c = LoaderConfig { max_epochs: None, ..cfg(2, 1, 3) }; // 4 micro-steps per global batch
    let mut l = Loader::with_catalog(d.cat.clone(), c.clone(), None).unwrap();
    let first: Vec<Batch> = (0..6).map(|_| l.next_micro_batch().unwrap().unwrap()).collect();
    let st = l.state();
    assert_eq!((st.global_batches, st.micro_in_batch), (1, 2));
    let rest: Vec<Batch> = (0..5).map(|_| l.next_micro_batch().unwrap().unwrap()).collect();
    let mut l2 = Loader::with_catalog(d.cat.clone(), c.clone(), Some(st.clone())).unwrap();
    let rest2: Vec<Batch> = (0..5).map(|_| l2.next_micro_batch().unwrap().unwrap()).collect();
    assert_eq!(rest, rest2);
    assert!(!first.is_empty());
    let other = LoaderConfig { world_size: 4, rank: 0, micro_batch_rows: 1, ..c.clone() };
    let err = Loader::with_catalog(d.cat.clone(), other, Some(st.clone())).err().expect("must refuse");
    assert!(err.to_string().contains("middle of a global batch"), "{err}");
    let other_packing = LoaderConfig { packing: Packing::WholeDocs, ..c.clone() };
    let err = Loader::with_catalog(d.cat.clone(), other_packing, Some(st.clone())).err().expect("must refuse");
    assert!(err.to_string().contains("packing"), "{err}");
    // A state saved before packing modes existed has no `packing` key: it was concat.
    let mut old = serde_json::to_value(&st).unwrap();
    old.as_object_mut().unwrap().remove("packing").unwrap();
    assert_eq!(serde_json::from_value::<LoaderState>(old).unwrap(), st);
    let other_seed = LoaderConfig { seed: 7, ..c };
    assert!(Loader::with_catalog(d.cat.clone(), other_seed, Some(st)).is_err());
}

#[test]
fn all_masked_rows_are_skipped_and_counted() {
    let d = data("masked", true);
    let total: usize = d.docs.iter().map(|x| x.0.len()).sum();
    for packing in [Packing::Concat, Packing::WholeDocs] {
        let c = LoaderConfig { seq_len: 64, packing, ..cfg(1, 0, 1) };
        let per_rank = run_all(&d, &c);
        let mut fed = 0usize;
        for b in &per_rank[0] {
            for r in 0..b.rows {
                assert!(
                    b.targets[r * 64..(r + 1) * 64].iter().any(|&t| t != IGNORE_INDEX),
                    "{packing:?}: an all-masked row was fed"
                );
            }
            fed += check_batch(b, &d.where_, &d.docs).len();
        }
        let mut l = Loader::with_catalog(d.cat.clone(), c, None).unwrap();
        while l.next_micro_batch().unwrap().is_some() {}
        let skipped = l.skipped_rows();
        assert!(
            skipped >= 3,
            "{packing:?}: the 300-token all-masked document must produce skipped rows, got {skipped}"
        );
        assert_eq!(l.stats().skipped_rows, skipped);
        // Every token is either fed or inside a skipped row (full and unpadded in concat).
        assert!(fed + skipped as usize * 64 >= total, "{packing:?}");
        if packing == Packing::Concat {
            assert!(fed + (skipped as usize - 1) * 64 < total);
        }
    }
}

#[test]
fn same_config_same_order_and_seed_changes_it() {
    let d = data("det", false);
    for ordering in [Ordering::Bucket { bins: 4 }, Ordering::Shuffle] {
        let c = LoaderConfig { ordering, ..cfg(2, 1, 2) };
        assert_eq!(run_all(&d, &c), run_all(&d, &c));
        let other = LoaderConfig { seed: 43, ..c.clone() };
        assert_ne!(run_all(&d, &c), run_all(&d, &other));
    }
}

#[test]
fn bucket_ordering_mixes_subsets_per_bucket() {
    // With bins = 3, the first third of the stream holds about a third of each sub-dataset.
    let d = data("bucket", false);
    let c = LoaderConfig { ordering: Ordering::Bucket { bins: 3 }, ..cfg(1, 0, 1) };
    let rows = global_rows(&run_all(&d, &c), 24);
    let first: Vec<u32> = rows[..rows.len() / 3].concat();
    let bounds: Vec<u32> = {
        // first id of sub1 and sub2
        let n0: usize = d.docs[..70].iter().map(|x| x.0.len()).sum();
        let n1: usize = d.docs[70..115].iter().map(|x| x.0.len()).sum();
        vec![1 + n0 as u32, 1 + (n0 + n1) as u32]
    };
    let count = |lo: u32, hi: u32| first.iter().filter(|&&t| t >= lo && t < hi).count();
    for (lo, hi, n) in [(1, bounds[0], bounds[0] - 1), (bounds[0], bounds[1], bounds[1] - bounds[0])] {
        let frac = count(lo, hi) as f64 / n as f64;
        assert!((0.2..0.47).contains(&frac), "bucket 0 holds {frac:.2} of a sub-dataset, expected ≈ 1/3");
    }
}

#[test]
fn weights_scale_contributions() {
    let d = data("weights", false);
    let dirs: Vec<(std::path::PathBuf, f64)> =
        d.cat.subsets.iter().zip([2.0, 0.5, 0.0]).map(|(s, w)| (s.dir.clone(), w)).collect();
    let cat = Arc::new(Catalog::open(&dirs, false).unwrap());
    let c = LoaderConfig { max_epochs: Some(1), ..cfg(1, 0, 1) };
    let mut l = Loader::with_catalog(cat, c, None).unwrap();
    let mut counts: HashMap<u32, usize> = HashMap::new();
    while let Some(b) = l.next_micro_batch().unwrap() {
        for &t in &b.tokens {
            *counts.entry(t).or_default() += 1;
        }
    }
    // sub0 twice, sub2 never.
    assert_eq!(counts.get(&1), Some(&2));
    let n: usize = d.docs[..115].iter().map(|x| x.0.len()).sum();
    assert!(!counts.contains_key(&(n as u32 + 1)));
}
