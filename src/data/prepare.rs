//! Corpus directory → one tokenized sub-dataset: `shard-NNNNN.bin` files and `manifest.json`.
//!
//! Documents are read in a deterministic order (sorted paths, file order), tokenized in parallel
//! in chunks (rayon; the chunk's order is kept), and appended to shards of about
//! `shard_tokens` tokens (a document never straddles shards). The output bytes therefore do not
//! depend on the number of threads.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use rayon::prelude::*;

use super::corpus::{read_corpus, CorpusOptions, Document, Issue, IssueKind};
use super::shard::{ShardMeta, ShardWriter, TokenDtype};
use super::tokenizer::TextTokenizer;

pub const MANIFEST: &str = "manifest.json";

#[derive(Clone, Debug)]
pub struct PrepareConfig {
    /// Sub-dataset name (also the output folder's name under `output`).
    pub name: String,
    pub input: PathBuf,
    /// Parent folder; the sub-dataset goes to `output/name/`.
    pub output: PathBuf,
    /// Start a new shard once the current one holds this many tokens.
    pub shard_tokens: usize,
    pub corpus: CorpusOptions,
    /// Turn every skipped input into an error.
    pub strict: bool,
    pub progress: bool,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub n_tokens: u64,
    pub n_docs: u64,
    pub checksum: String,
}

/// `manifest.json` of a sub-dataset. Contains nothing run-dependent (no times, no thread counts)
/// so the same inputs give the same bytes.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SubsetManifest {
    pub format: String,
    pub version: u32,
    pub name: String,
    pub vocab_size: u64,
    pub dtype: TokenDtype,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub tokenizer_checksum: String,
    pub n_docs: u64,
    pub n_tokens: u64,
    /// Tokens with loss mask 1.
    pub n_loss_tokens: u64,
    pub shards: Vec<ShardEntry>,
    pub n_skipped: u64,
    /// Everything skipped, `file:line: kind: detail`.
    pub skipped: Vec<String>,
}

/// Run statistics (not written to the manifest).
#[derive(Clone, Debug, Default)]
pub struct PrepareStats {
    pub n_docs: u64,
    pub n_tokens: u64,
    pub text_bytes: u64,
    pub chars: u64,
    /// Wall time spent in tokenization (parallel section only).
    pub tokenize_secs: f64,
    pub total_secs: f64,
    pub threads: usize,
}

pub fn read_manifest(dir: &Path) -> Result<SubsetManifest> {
    let p = dir.join(MANIFEST);
    let bytes = std::fs::read(&p)
        .with_context(|| format!("reading {} (is {} a prepared sub-dataset?)", p.display(), dir.display()))?;
    let m: SubsetManifest = serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", p.display()))?;
    ensure!(m.format == "llama-cpt-subset", "{}: not a llama-cpt sub-dataset manifest", p.display());
    Ok(m)
}

struct Sink<'a> {
    tok: &'a TextTokenizer,
    dir: PathBuf,
    shard_tokens: usize,
    writer: Option<ShardWriter>,
    shards: Vec<ShardEntry>,
    n_loss: u64,
    strict: bool,
    stats: PrepareStats,
}

impl Sink<'_> {
    fn flush_shard(&mut self) -> Result<()> {
        if let Some(w) = self.writer.take() {
            if w.n_docs() == 0 {
                return Ok(());
            }
            let meta: ShardMeta = w.finish()?;
            let file = format!("shard-{:05}.bin", self.shards.len());
            self.shards.push(ShardEntry {
                file,
                n_tokens: meta.n_tokens,
                n_docs: meta.n_docs,
                checksum: format!("{:016x}", meta.checksum),
            });
        }
        Ok(())
    }

    fn tokenize_chunk(&mut self, docs: &mut Vec<Document>, issues: &mut Vec<Issue>) -> Result<()> {
        let t = Instant::now();
        let tok = self.tok;
        let encoded: Vec<Result<(Vec<u32>, Vec<u8>)>> = docs.par_iter().map(|d| tok.encode_doc(d)).collect();
        self.stats.tokenize_secs += t.elapsed().as_secs_f64();
        for (d, r) in docs.drain(..).zip(encoded) {
            let (ids, mask) = r?;
            if ids.is_empty() || !mask.contains(&1) {
                let issue = Issue {
                    file: d.file.as_ref().clone(),
                    line: Some(d.line),
                    kind: IssueKind::NoTokens,
                    detail: "the document tokenizes to no loss-bearing token".into(),
                };
                ensure!(!self.strict, "{issue}");
                issues.push(issue);
                continue;
            }
            self.stats.n_docs += 1;
            self.stats.n_tokens += ids.len() as u64;
            self.stats.text_bytes += d.text_len() as u64;
            self.stats.chars += (d.source.chars().count() + d.target.chars().count()) as u64;
            self.n_loss += mask.iter().map(|&m| m as u64).sum::<u64>();
            if self.writer.is_none() {
                let path = self.dir.join(format!("shard-{:05}.bin", self.shards.len()));
                self.writer = Some(ShardWriter::new(path, self.tok.vocab_size));
            }
            let w = self.writer.as_mut().unwrap();
            w.push_doc(&ids, &mask).with_context(|| format!("{}:{}", d.file.display(), d.line))?;
            if w.n_tokens() >= self.shard_tokens {
                self.flush_shard()?;
            }
        }
        Ok(())
    }

    /// The sub-dataset's manifest once every shard is written.
    fn manifest(&self, cfg: &PrepareConfig, issues: &[Issue]) -> SubsetManifest {
        let tok = self.tok;
        SubsetManifest {
            format: "llama-cpt-subset".into(),
            version: 1,
            name: cfg.name.clone(),
            vocab_size: tok.vocab_size,
            dtype: TokenDtype::for_vocab(tok.vocab_size),
            bos: tok.bos,
            eos: tok.eos,
            add_bos: tok.add_bos,
            add_eos: tok.add_eos,
            tokenizer_checksum: format!("{:016x}", tok.checksum),
            n_docs: self.stats.n_docs,
            n_tokens: self.stats.n_tokens,
            n_loss_tokens: self.n_loss,
            shards: self.shards.clone(),
            n_skipped: issues.len() as u64,
            skipped: issues.iter().map(|i| i.to_string()).collect(),
        }
    }
}

/// Tokenizes one corpus into `cfg.output/cfg.name/`.
pub fn prepare_subset(tok: &TextTokenizer, cfg: &PrepareConfig) -> Result<(SubsetManifest, PrepareStats)> {
    let start = Instant::now();
    ensure!(
        !cfg.name.is_empty() && !cfg.name.contains(['/', '\\']) && cfg.name != "." && cfg.name != "..",
        "bad sub-dataset name {:?}",
        cfg.name
    );
    ensure!(cfg.shard_tokens > 0, "shard_tokens must be positive");
    let dir = cfg.output.join(&cfg.name);
    clear_output_dir(&dir)?;
    let bar = progress_bar(cfg)?;
    let mut sink = Sink {
        tok,
        dir: dir.clone(),
        shard_tokens: cfg.shard_tokens,
        writer: None,
        shards: Vec::new(),
        n_loss: 0,
        strict: cfg.strict,
        stats: PrepareStats { threads: rayon::current_num_threads(), ..Default::default() },
    };
    let issues = read_and_tokenize(cfg, &mut sink, &bar)?;
    if cfg.strict {
        if let Some(i) = issues.first() {
            anyhow::bail!("{} input problem(s) in {} (strict mode); first: {i}", issues.len(), cfg.input.display());
        }
    }
    ensure!(
        sink.stats.n_docs > 0,
        "{}: no usable document in {} ({} skipped)",
        cfg.name,
        cfg.input.display(),
        issues.len()
    );
    let manifest = sink.manifest(cfg, &issues);
    let mp = dir.join(MANIFEST);
    let mut json = serde_json::to_string_pretty(&manifest)?;
    json.push('\n');
    std::fs::write(&mp, json).with_context(|| format!("writing {}", mp.display()))?;
    let mut stats = sink.stats;
    stats.total_secs = start.elapsed().as_secs_f64();
    Ok((manifest, stats))
}

/// Creates the sub-dataset folder, emptied of an earlier run's shards and manifest.
fn clear_output_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Remove shards of an earlier run so the folder holds exactly this run's output.
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if (n.starts_with("shard-") && (n.ends_with(".bin") || n.ends_with(".tmp"))) || n == MANIFEST {
            std::fs::remove_file(&p).with_context(|| format!("removing stale {}", p.display()))?;
        }
    }
    Ok(())
}

/// A progress bar over the corpus's bytes (hidden unless `cfg.progress`).
fn progress_bar(cfg: &PrepareConfig) -> Result<indicatif::ProgressBar> {
    let total_bytes: u64 = {
        let mut tmp = Vec::new();
        super::corpus::list_files(&cfg.input, &mut tmp)?
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum()
    };
    Ok(if cfg.progress {
        let b = indicatif::ProgressBar::new(total_bytes);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        b.set_prefix(cfg.name.clone());
        b
    } else {
        indicatif::ProgressBar::hidden()
    })
}

/// Reads the corpus into `sink` in chunks (tokenized in parallel, written in order); returns
/// everything skipped, in file/line order.
fn read_and_tokenize(cfg: &PrepareConfig, sink: &mut Sink<'_>, bar: &indicatif::ProgressBar) -> Result<Vec<Issue>> {
    const CHUNK_DOCS: usize = 8192;
    const CHUNK_BYTES: usize = 16 << 20;
    let mut issues: Vec<Issue> = Vec::new();
    let mut chunk: Vec<Document> = Vec::new();
    let mut chunk_bytes = 0usize;
    let mut chunk_issues: Vec<Issue> = Vec::new();
    read_corpus(&cfg.input, &cfg.corpus, &mut issues, |d| {
        chunk_bytes += d.text_len();
        bar.inc(d.text_len() as u64);
        chunk.push(d);
        if chunk.len() >= CHUNK_DOCS || chunk_bytes >= CHUNK_BYTES {
            sink.tokenize_chunk(&mut chunk, &mut chunk_issues)?;
            chunk_bytes = 0;
        }
        Ok(())
    })?;
    sink.tokenize_chunk(&mut chunk, &mut chunk_issues)?;
    sink.flush_shard()?;
    bar.finish_and_clear();
    issues.extend(chunk_issues);
    // Corpus-reading issues and tokenization issues, in file/line order.
    issues.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    Ok(issues)
}

/// Writes already tokenized documents as sub-dataset `output/name/` (shards + manifest), without
/// a tokenizer: for tests, synthetic data and conversions. BOS/EOS fields are left empty.
pub fn write_subset(
    output: &Path,
    name: &str,
    vocab_size: u64,
    shard_tokens: usize,
    docs: impl IntoIterator<Item = (Vec<u32>, Vec<u8>)>,
) -> Result<SubsetManifest> {
    ensure!(shard_tokens > 0, "shard_tokens must be positive");
    let dir = output.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut shards = Vec::new();
    let mut w: Option<ShardWriter> = None;
    let (mut n_docs, mut n_tokens, mut n_loss) = (0u64, 0u64, 0u64);
    let finish = |w: ShardWriter, shards: &mut Vec<ShardEntry>| -> Result<()> {
        let meta = w.finish()?;
        shards.push(ShardEntry {
            file: format!("shard-{:05}.bin", shards.len()),
            n_tokens: meta.n_tokens,
            n_docs: meta.n_docs,
            checksum: format!("{:016x}", meta.checksum),
        });
        Ok(())
    };
    for (ids, mask) in docs {
        let wr =
            w.get_or_insert_with(|| ShardWriter::new(dir.join(format!("shard-{:05}.bin", shards.len())), vocab_size));
        wr.push_doc(&ids, &mask)?;
        n_docs += 1;
        n_tokens += ids.len() as u64;
        n_loss += mask.iter().map(|&m| m as u64).sum::<u64>();
        if wr.n_tokens() >= shard_tokens {
            finish(w.take().unwrap(), &mut shards)?;
        }
    }
    if let Some(wr) = w.take() {
        finish(wr, &mut shards)?;
    }
    ensure!(n_docs > 0, "{name}: no documents");
    let manifest = SubsetManifest {
        format: "llama-cpt-subset".into(),
        version: 1,
        name: name.into(),
        vocab_size,
        dtype: TokenDtype::for_vocab(vocab_size),
        bos: None,
        eos: None,
        add_bos: false,
        add_eos: false,
        tokenizer_checksum: String::new(),
        n_docs,
        n_tokens,
        n_loss_tokens: n_loss,
        shards,
        n_skipped: 0,
        skipped: Vec::new(),
    };
    let mut json = serde_json::to_string_pretty(&manifest)?;
    json.push('\n');
    std::fs::write(dir.join(MANIFEST), json).with_context(|| format!("writing {}", dir.join(MANIFEST).display()))?;
    Ok(manifest)
}
