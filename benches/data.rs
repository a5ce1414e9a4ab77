//! Data-pipeline throughput.
//!
//! * `prepare/1-thread`: `prepare_subset` (read JSONL, tokenize, write shards) on one core, over
//!   the real corpora (tools/fetch-corpora.sh) or generated text when they are missing; then, in
//!   the same run, the Python `tokenizers` package encoding the same texts with `encode_batch`
//!   (tools/bench_tokenize_python.py, via .venv/bin/python), single-threaded and on all cores.
//! * `loader/8x4096`: one 8 × 4,096-token step from the loader (prefetch thread running), and
//!   the prefetch thread's own build time per step.
//!
//! `cargo bench --bench data`; the summary lines start with `data-bench:`.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use llama_cpt::data::corpus::{CorpusOptions, TxtSplit};
use llama_cpt::data::prepare::{prepare_subset, write_subset, PrepareConfig};
use llama_cpt::data::report::load_texts;
use llama_cpt::data::tokenizer::{SpecialTokenOptions, TextTokenizer};
use llama_cpt::data::{Loader, LoaderConfig, Ordering, SubsetSpec};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn work() -> PathBuf {
    let d = std::env::temp_dir().join(format!("lcpt-bench-data-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The corpus folder: data/corpora if fetched, else generated JSONL.
fn corpus(work: &Path) -> PathBuf {
    let real = root().join("data/corpora");
    if real.join("zh").is_dir() && real.join("en").is_dir() {
        return real;
    }
    eprintln!("data-bench: data/corpora missing (tools/fetch-corpora.sh); using generated text");
    let d = work.join("gen");
    std::fs::create_dir_all(&d).unwrap();
    let w = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "数据", "模型", "训练", "。"];
    let mut s = String::new();
    let mut x = 1u64;
    for _ in 0..20_000 {
        let mut t = Vec::new();
        for _ in 0..60 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            t.push(w[(x >> 33) as usize % w.len()]);
        }
        s += &serde_json::json!({ "text": t.join(" ") }).to_string();
        s.push('\n');
    }
    std::fs::write(d.join("gen.jsonl"), s).unwrap();
    d
}

fn train_tokenizer(work: &Path, texts: &[String]) -> PathBuf {
    let p = work.join("tokenizer.json");
    llama_cpt::train::default_run::train_bpe_tokenizer(&p, texts, 8000, false).unwrap();
    p
}

fn python(tokenizer: &Path, input: &Path, threads: usize) -> Option<serde_json::Value> {
    let py = root().join(".venv/bin/python");
    let out = std::process::Command::new(if py.exists() { py } else { "python3".into() })
        .arg(root().join("tools/bench_tokenize_python.py"))
        .args(["--tokenizer", tokenizer.to_str()?, "--input", input.to_str()?, "--threads", &threads.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("data-bench: python baseline failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn bench_prepare(c: &mut Criterion) {
    let work = work();
    let input = corpus(&work);
    let opts = CorpusOptions { txt_split: TxtSplit::BlankLine };
    let mut issues = Vec::new();
    let texts = load_texts(&input, &opts, &mut issues).unwrap();
    let tokp = train_tokenizer(&work, &texts);
    let tok = TextTokenizer::load(&tokp, &SpecialTokenOptions::default()).unwrap();
    let cfg = PrepareConfig {
        name: "bench".into(),
        input: input.clone(),
        output: work.join("out"),
        shard_tokens: 1 << 24,
        corpus: opts,
        strict: false,
        progress: false,
    };
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let (m, _) = one.install(|| prepare_subset(&tok, &cfg)).unwrap();
    let mut g = c.benchmark_group("prepare");
    g.sample_size(10).throughput(Throughput::Elements(m.n_tokens));
    let mut best_tok = f64::INFINITY;
    let mut best_total = f64::INFINITY;
    g.bench_function("1-thread", |b| {
        b.iter(|| {
            let (_, st) = one.install(|| prepare_subset(&tok, &cfg)).unwrap();
            best_tok = best_tok.min(st.tokenize_secs);
            best_total = best_total.min(st.total_secs);
        })
    });
    g.finish();
    let all = rayon::current_num_threads();
    let (_, st_all) = prepare_subset(&tok, &cfg).unwrap();
    let n = m.n_tokens as f64;
    // BOS/EOS-free count for a like-for-like comparison with Python (which adds none).
    let text_tokens = n - m.n_docs as f64 * (tok.add_bos as u8 + tok.add_eos as u8) as f64;
    eprintln!(
        "data-bench: prepare-data 1 thread: {:.0} tokens/s tokenizing, {:.0} tokens/s end to end (read+tokenize+write), {} tokens, {} docs",
        text_tokens / best_tok,
        n / best_total,
        m.n_tokens,
        m.n_docs
    );
    eprintln!(
        "data-bench: prepare-data {all} threads: {:.0} tokens/s tokenizing ({:.0} per core), {:.0} end to end",
        text_tokens / st_all.tokenize_secs,
        text_tokens / st_all.tokenize_secs / all as f64,
        n / st_all.total_secs
    );
    for threads in [1usize, 0] {
        match python(&tokp, &input, threads) {
            Some(v) => eprintln!(
                "data-bench: python tokenizers {} encode_batch ({} threads): {:.0} tokens/s, {} tokens (rust: {})",
                v["tokenizers_version"].as_str().unwrap_or("?"),
                v["threads"],
                v["tokens_per_s"].as_f64().unwrap_or(0.0),
                v["tokens"],
                text_tokens
            ),
            None => eprintln!("data-bench: python baseline unavailable"),
        }
    }
    std::fs::remove_dir_all(work.join("out")).ok();
}

fn bench_loader(c: &mut Criterion) {
    let work = work();
    // ~20M tokens, vocab 69,104 (u32 on disk), documents of 50–6,000 tokens, 2 sub-datasets.
    let mut x = 7u64;
    let mut rnd = move |n: u64| {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) % n
    };
    let mut specs = Vec::new();
    for (s, n_docs) in [("a", 6000usize), ("b", 3000)] {
        let docs: Vec<(Vec<u32>, Vec<u8>)> = (0..n_docs)
            .map(|_| {
                let len = 50 + rnd(6000) as usize;
                let ids = (0..len).map(|_| rnd(69_104) as u32).collect();
                let src = if s == "b" { len / 4 } else { 0 };
                (ids, (0..len).map(|i| u8::from(i >= src)).collect())
            })
            .collect();
        write_subset(&work.join("loader"), s, 69_104, 1 << 23, docs).unwrap();
        specs.push(SubsetSpec::new(work.join("loader").join(s), 1.0));
    }
    let cfg = LoaderConfig {
        seq_len: 4096,
        global_batch_rows: 8,
        micro_batch_rows: 8,
        ordering: Ordering::Bucket { bins: 8 },
        ..Default::default()
    };
    let mut l = Loader::new(&specs, cfg, None).unwrap();
    let mut g = c.benchmark_group("loader");
    g.throughput(Throughput::Elements(8 * 4096));
    g.bench_function("8x4096", |b| b.iter(|| l.next_micro_batch().unwrap().unwrap()));
    g.finish();
    let st = l.stats();
    eprintln!(
        "data-bench: loader 8x4096 step: consumer {:.1} µs/step waiting (prefetch on), producer {:.1} µs/step building, over {} steps",
        st.wait.as_secs_f64() * 1e6 / st.micro_batches as f64,
        st.produce.as_secs_f64() * 1e6 / st.micro_batches as f64,
        st.micro_batches
    );
    // Synchronous cost (no prefetch benefit): time each call after the queue is drained.
    let mut l = Loader::new(&specs, LoaderConfig { prefetch: 1, ..l.config().clone() }, None).unwrap();
    let t = Instant::now();
    let steps = 200;
    for _ in 0..steps {
        l.next_micro_batch().unwrap().unwrap();
    }
    let per = t.elapsed() / steps;
    eprintln!(
        "data-bench: loader 8x4096 back-to-back (no compute to hide behind): {:.1} µs/step",
        per.as_secs_f64() * 1e6
    );
    let _ = Duration::ZERO;
    std::fs::remove_dir_all(&work).ok();
}

criterion_group!(benches, bench_prepare, bench_loader);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
