//! Which documents an epoch holds, and in what order.
//!
//! * Weights: sub-dataset `i` with weight `w` contributes `floor(w)` full copies of its documents
//!   plus a seeded random `frac(w)` share of them, per epoch (so weights scale the tokens it
//!   contributes; 0.5 = half of it each epoch, a different half every epoch).
//! * [`Ordering::Bucket`]: each sub-dataset's selection is shuffled, then cut into `bins`
//!   contiguous bins of (nearly) equal token counts. Bucket `k` is bin `k` of every sub-dataset,
//!   shuffled; buckets are consumed in order 0, 1, …, so every stretch of training sees the same
//!   mixture (Colossal-LLaMA-2's bucket-based training).
//! * [`Ordering::Shuffle`]: one global shuffle of the whole selection.
//!
//! Every random choice comes from [`SplitMix64`] keyed by (seed, epoch, purpose, sub-dataset
//! name or bucket), so the same config always yields the same order, on any machine and at any
//! world size.
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use super::hash::{str_key, SplitMix64};
use super::prepare::read_manifest;
use super::shard::ShardReader;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Ordering {
    /// Bucket-based ordering with this many bins per sub-dataset.
    Bucket { bins: usize },
    /// A global shuffle per epoch.
    Shuffle,
}

/// One document: sub-dataset, shard, document index in the shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocRef {
    pub subset: u32,
    pub shard: u32,
    pub doc: u32,
}

pub struct Subset {
    pub name: String,
    pub dir: PathBuf,
    pub weight: f64,
    pub shards: Vec<ShardReader>,
}

/// All opened sub-datasets.
pub struct Catalog {
    pub subsets: Vec<Subset>,
}

impl Catalog {
    /// Opens prepared sub-dataset folders (see [`super::prepare`]); `verify` hashes every shard.
    pub fn open(specs: &[(PathBuf, f64)], verify: bool) -> Result<Catalog> {
        ensure!(!specs.is_empty(), "no sub-dataset given");
        let mut subsets = Vec::new();
        let mut vocab = None;
        for (dir, weight) in specs {
            ensure!(weight.is_finite() && *weight >= 0.0, "{}: weight {weight} must be finite and ≥ 0", dir.display());
            let m = read_manifest(dir)?;
            let mut shards = Vec::new();
            for e in &m.shards {
                let p = dir.join(&e.file);
                let r = if verify { ShardReader::open(&p)? } else { ShardReader::open_unverified(&p)? };
                ensure!(
                    format!("{:016x}", r.meta().checksum) == e.checksum && r.meta().n_tokens == e.n_tokens,
                    "shard {}: does not match {}/manifest.json (stale or replaced file)",
                    p.display(),
                    dir.display()
                );
                shards.push(r);
            }
            match vocab {
                None => vocab = Some(m.vocab_size),
                Some(v) => ensure!(
                    v == m.vocab_size,
                    "{}: vocab size {} differs from the other sub-datasets' {v}",
                    dir.display(),
                    m.vocab_size
                ),
            }
            ensure!(!subsets.iter().any(|s: &Subset| s.name == m.name), "two sub-datasets are named {:?}", m.name);
            subsets.push(Subset { name: m.name, dir: dir.clone(), weight: *weight, shards });
        }
        Ok(Catalog { subsets })
    }

    /// Convenience: open a catalog from directories and weights given as `Path`s.
    pub fn open_dirs(dirs: &[(&Path, f64)], verify: bool) -> Result<Catalog> {
        Self::open(&dirs.iter().map(|(p, w)| (p.to_path_buf(), *w)).collect::<Vec<_>>(), verify)
    }

    pub fn shard(&self, d: DocRef) -> &ShardReader {
        &self.subsets[d.subset as usize].shards[d.shard as usize]
    }
    pub fn doc_len(&self, d: DocRef) -> usize {
        self.shard(d).doc_len(d.doc as usize)
    }

    /// Every document of sub-dataset `s`, in storage order.
    pub fn docs_of(&self, s: usize) -> Vec<DocRef> {
        let mut v = Vec::new();
        for (si, sh) in self.subsets[s].shards.iter().enumerate() {
            v.extend((0..sh.n_docs()).map(|d| DocRef { subset: s as u32, shard: si as u32, doc: d as u32 }));
        }
        v
    }

    /// A fingerprint of the data (names, weights, shard checksums), stored in the loader state
    /// so a resume against different data is refused.
    pub fn fingerprint(&self) -> u64 {
        let mut h = super::hash::Xxh64::new(0);
        for s in &self.subsets {
            h.update(s.name.as_bytes());
            h.update(&s.weight.to_le_bytes());
            for sh in &s.shards {
                h.update(&sh.meta().checksum.to_le_bytes());
            }
        }
        h.digest()
    }
}

const PURPOSE_SUBSAMPLE: u64 = 1;
const PURPOSE_SUBSET_SHUFFLE: u64 = 2;
const PURPOSE_BUCKET_SHUFFLE: u64 = 3;
const PURPOSE_GLOBAL_SHUFFLE: u64 = 4;

/// The documents of sub-dataset `s` selected for `epoch` by its weight.
fn select(cat: &Catalog, s: usize, seed: u64, epoch: u64) -> Vec<DocRef> {
    let all = cat.docs_of(s);
    let w = cat.subsets[s].weight;
    let whole = w.floor() as usize;
    let frac = w - w.floor();
    let mut out = Vec::with_capacity(all.len() * whole + (frac * all.len() as f64).ceil() as usize);
    for _ in 0..whole {
        out.extend_from_slice(&all);
    }
    let n_frac = (frac * all.len() as f64).round() as usize;
    if n_frac > 0 {
        let mut perm = all;
        SplitMix64::from_keys(&[seed, epoch, PURPOSE_SUBSAMPLE, str_key(&cat.subsets[s].name)]).shuffle(&mut perm);
        perm.truncate(n_frac);
        perm.sort(); // storage order; the ordering step shuffles
        out.extend_from_slice(&perm);
    }
    out
}

/// The document order of one epoch.
pub fn epoch_order(cat: &Catalog, ordering: Ordering, seed: u64, epoch: u64) -> Result<Vec<DocRef>> {
    match ordering {
        Ordering::Shuffle => {
            let mut all = Vec::new();
            for s in 0..cat.subsets.len() {
                all.extend(select(cat, s, seed, epoch));
            }
            SplitMix64::from_keys(&[seed, epoch, PURPOSE_GLOBAL_SHUFFLE]).shuffle(&mut all);
            Ok(all)
        }
        Ordering::Bucket { bins } => {
            ensure!(bins >= 1, "bucket ordering needs at least one bin");
            let mut buckets: Vec<Vec<DocRef>> = vec![Vec::new(); bins];
            for s in 0..cat.subsets.len() {
                let mut docs = select(cat, s, seed, epoch);
                SplitMix64::from_keys(&[seed, epoch, PURPOSE_SUBSET_SHUFFLE, str_key(&cat.subsets[s].name)])
                    .shuffle(&mut docs);
                let total: u64 = docs.iter().map(|&d| cat.doc_len(d) as u64).sum();
                // Document i goes to the bin holding the token offset of its start.
                let mut acc = 0u64;
                for d in docs {
                    let k = if total == 0 { 0 } else { ((acc as u128 * bins as u128) / total as u128) as usize };
                    buckets[k.min(bins - 1)].push(d);
                    acc += cat.doc_len(d) as u64;
                }
            }
            let mut out = Vec::new();
            for (k, mut b) in buckets.into_iter().enumerate() {
                SplitMix64::from_keys(&[seed, epoch, PURPOSE_BUCKET_SHUFFLE, k as u64]).shuffle(&mut b);
                out.extend(b);
            }
            Ok(out)
        }
    }
}

/// Total tokens of an order.
pub fn order_tokens(cat: &Catalog, order: &[DocRef]) -> u64 {
    order.iter().map(|&d| cat.doc_len(d) as u64).sum()
}

/// Parses `bucket:N` / `shuffle`.
impl std::str::FromStr for Ordering {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Ordering> {
        if s == "shuffle" {
            return Ok(Ordering::Shuffle);
        }
        if let Some(n) = s.strip_prefix("bucket:") {
            let bins = n.parse().with_context(|| format!("bad bin count in {s:?}"))?;
            return Ok(Ordering::Bucket { bins });
        }
        anyhow::bail!("ordering must be `shuffle` or `bucket:N`, got {s:?}")
    }
}
