//! The distributed loader: per-rank micro-batches, resumable state, background prefetch.
//!
//! Global batch `b` is the next `global_batch_rows` rows of the packed stream ([`super::pack`])
//! that carry at least one loss target; rows whose targets are all `IGNORE_INDEX` are skipped
//! and counted (never fed: an all-masked sample gives a NaN mean loss, Colossal issue 5370).
//! Every rank walks the same global rows (checking masks only, which is cheap) so all ranks agree
//! on the skips; rank `w` of `W` then materialises rows `[w·G/W, (w+1)·G/W)` of the global batch
//! and cuts them into micro-batches of `micro_batch_rows`. The global token order therefore does
//! not depend on `W`, and a [`LoaderState`] taken at a global-batch boundary resumes exactly at
//! any world size with the same `global_batch_rows`.
//!
//! With `max_epochs = None` the stream is endless (epoch after epoch, rows cut across epoch
//! boundaries, nothing dropped; `packing` decides whether documents may straddle rows). With
//! `Some(n)` the stream ends after epoch `n - 1`: the last row
//! is padded, and the last global batch may be short; each rank still gets exactly
//! `G / (W·m)` micro-batches for it, but they may hold fewer than `m` rows, or none
//! (`rows == 0`, `cu_seqlens == [0]`). After it, every rank's `next_micro_batch` returns `None`.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Result};

use super::order::Catalog;
pub use super::order::Ordering;
pub use super::pack::Packing;
use super::pack::{materialize, row_has_loss, RowSpec, Stream};
use crate::batch::Batch;

/// A prepared sub-dataset folder and its sampling weight.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SubsetSpec {
    pub dir: PathBuf,
    pub weight: f64,
}

impl SubsetSpec {
    pub fn new(dir: impl Into<PathBuf>, weight: f64) -> Self {
        SubsetSpec { dir: dir.into(), weight }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoaderConfig {
    /// Tokens per row (4,096 by default).
    pub seq_len: usize,
    /// Rows per optimizer step, over all ranks.
    pub global_batch_rows: usize,
    /// Rows per micro-batch (gradient accumulation step) on one rank.
    pub micro_batch_rows: usize,
    pub world_size: usize,
    pub rank: usize,
    pub seed: u64,
    pub ordering: Ordering,
    /// Whether documents may straddle rows ([`Packing`]).
    pub packing: Packing,
    /// `None`: endless. `Some(n)`: stop after `n` epochs.
    pub max_epochs: Option<u64>,
    /// Micro-batches prepared ahead on the background thread.
    pub prefetch: usize,
    /// Token id of padding (row ends in `WholeDocs` packing, the last row of a finite stream).
    pub pad_id: u32,
    /// Hash every shard when opening (reads all data once).
    pub verify_checksums: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            seq_len: 4096,
            global_batch_rows: 8,
            micro_batch_rows: 1,
            world_size: 1,
            rank: 0,
            seed: 0,
            ordering: Ordering::Bucket { bins: 8 },
            packing: Packing::Concat,
            max_epochs: None,
            prefetch: 4,
            pad_id: 0,
            verify_checksums: true,
        }
    }
}

impl LoaderConfig {
    /// Micro-batches per global batch on each rank.
    pub fn micro_steps(&self) -> usize {
        self.global_batch_rows / (self.world_size * self.micro_batch_rows)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.seq_len > 0, "seq_len must be positive");
        ensure!(
            self.world_size > 0 && self.rank < self.world_size,
            "rank {} outside world size {}",
            self.rank,
            self.world_size
        );
        ensure!(self.micro_batch_rows > 0, "micro_batch_rows must be positive");
        ensure!(
            self.global_batch_rows > 0
                && self.global_batch_rows.is_multiple_of(self.world_size * self.micro_batch_rows),
            "global_batch_rows ({}) must be a positive multiple of world_size × micro_batch_rows ({} × {})",
            self.global_batch_rows,
            self.world_size,
            self.micro_batch_rows
        );
        ensure!(self.seq_len <= u32::MAX as usize / self.micro_batch_rows, "micro-batch too large for u32 cu_seqlens");
        if let Ordering::Bucket { bins } = self.ordering {
            ensure!(bins > 0, "bucket ordering needs at least one bin");
        }
        Ok(())
    }
}

/// Where the loader stands; the trainer checkpoints it as JSON.
///
/// `next_row` is the raw row (skipped rows included) where global batch `global_batches` starts;
/// `micro_in_batch` counts the micro-batches this rank already consumed from it (0 at a
/// global-batch boundary, the only place a resume at another world size is allowed).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoaderState {
    pub version: u32,
    pub seed: u64,
    /// Epoch of the first token of global batch `global_batches` (informational).
    pub epoch: u64,
    /// Completed global batches (optimizer steps) of the data.
    pub global_batches: u64,
    pub next_row: u64,
    pub micro_in_batch: u64,
    /// All-masked rows skipped before `next_row`.
    pub skipped_rows: u64,
    /// Shape the state was taken under.
    pub seq_len: usize,
    pub global_batch_rows: usize,
    pub world_size: usize,
    pub micro_batch_rows: usize,
    pub ordering: Ordering,
    /// Absent in states written before packing modes existed: those were `Concat`.
    #[serde(default)]
    pub packing: Packing,
    /// [`Catalog::fingerprint`] as hex.
    pub data_fingerprint: String,
}

/// Throughput counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoaderStats {
    pub micro_batches: u64,
    /// Time `next_micro_batch` spent blocked waiting for the prefetch thread.
    pub wait: Duration,
    /// Time the prefetch thread spent building this rank's micro-batches (row walking, mask
    /// checks for the whole global batch, materialisation).
    pub produce: Duration,
    /// All-masked rows skipped so far (global count, identical on every rank).
    pub skipped_rows: u64,
}

struct Item {
    batch: Batch,
    global_batch: u64,
    micro: u64,
    /// Raw row and epoch where this global batch starts, skipped count before it.
    start_row: u64,
    start_epoch: u64,
    skipped_before: u64,
    /// Raw row and epoch after it, skipped count after it.
    end_row: u64,
    end_epoch: u64,
    skipped_after: u64,
    produce: Duration,
}

enum Msg {
    Item(Box<Item>),
    End,
    Err(anyhow::Error),
}

pub struct Loader {
    cfg: LoaderConfig,
    catalog: Arc<Catalog>,
    state: LoaderState,
    skipped_seen: u64,
    stats: LoaderStats,
    rx: Option<Receiver<Msg>>,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
    finished: bool,
}

impl Loader {
    /// Opens the sub-datasets and starts the prefetch thread at `state` (or the beginning).
    pub fn new(subsets: &[SubsetSpec], cfg: LoaderConfig, state: Option<LoaderState>) -> Result<Loader> {
        cfg.validate()?;
        let specs: Vec<(PathBuf, f64)> = subsets.iter().map(|s| (s.dir.clone(), s.weight)).collect();
        let catalog = Arc::new(Catalog::open(&specs, cfg.verify_checksums)?);
        Self::with_catalog(catalog, cfg, state)
    }

    /// As [`Loader::new`] with an already opened catalog (shared by several loaders, e.g. one per
    /// simulated rank in tests).
    pub fn with_catalog(catalog: Arc<Catalog>, cfg: LoaderConfig, state: Option<LoaderState>) -> Result<Loader> {
        cfg.validate()?;
        let fp = format!("{:016x}", catalog.fingerprint());
        let state = match state {
            None => LoaderState {
                version: 1,
                seed: cfg.seed,
                epoch: 0,
                global_batches: 0,
                next_row: 0,
                micro_in_batch: 0,
                skipped_rows: 0,
                seq_len: cfg.seq_len,
                global_batch_rows: cfg.global_batch_rows,
                world_size: cfg.world_size,
                micro_batch_rows: cfg.micro_batch_rows,
                ordering: cfg.ordering,
                packing: cfg.packing,
                data_fingerprint: fp.clone(),
            },
            Some(s) => {
                ensure!(s.version == 1, "loader state version {} not supported", s.version);
                ensure!(s.seed == cfg.seed, "loader state has seed {}, config {}", s.seed, cfg.seed);
                ensure!(
                    s.seq_len == cfg.seq_len && s.global_batch_rows == cfg.global_batch_rows && s.ordering == cfg.ordering && s.packing == cfg.packing,
                    "loader state was taken with seq_len {}, global_batch_rows {}, ordering {:?}, packing {:?}; the config has {}, {}, {:?}, {:?}",
                    s.seq_len,
                    s.global_batch_rows,
                    s.ordering,
                    s.packing,
                    cfg.seq_len,
                    cfg.global_batch_rows,
                    cfg.ordering,
                    cfg.packing
                );
                ensure!(
                    s.data_fingerprint == fp,
                    "loader state was taken on different data (fingerprint {} vs {fp})",
                    s.data_fingerprint
                );
                if s.micro_in_batch > 0 {
                    ensure!(
                        s.world_size == cfg.world_size && s.micro_batch_rows == cfg.micro_batch_rows,
                        "loader state is in the middle of a global batch (micro-batch {}); it can only resume with \
                         the same world_size and micro_batch_rows ({} and {})",
                        s.micro_in_batch,
                        s.world_size,
                        s.micro_batch_rows
                    );
                }
                LoaderState { world_size: cfg.world_size, micro_batch_rows: cfg.micro_batch_rows, ..s }
            }
        };
        let mut l = Loader {
            skipped_seen: state.skipped_rows,
            stats: LoaderStats { skipped_rows: state.skipped_rows, ..Default::default() },
            cfg,
            catalog,
            state,
            rx: None,
            stop: Arc::new(AtomicBool::new(false)),
            worker: None,
            finished: false,
        };
        l.start()?;
        Ok(l)
    }

    fn start(&mut self) -> Result<()> {
        // Seek on this thread so errors surface from `new`.
        let stream = Stream::seek(
            self.catalog.clone(),
            self.cfg.ordering,
            self.cfg.packing,
            self.cfg.seed,
            self.cfg.max_epochs,
            self.cfg.seq_len,
            self.state.next_row,
        )?;
        let (tx, rx) = sync_channel(self.cfg.prefetch.max(1));
        let w = Worker {
            cat: self.catalog.clone(),
            cfg: self.cfg.clone(),
            stream,
            global_batch: self.state.global_batches,
            first_micro: self.state.micro_in_batch,
            skipped: self.state.skipped_rows,
            stop: self.stop.clone(),
        };
        self.worker = Some(
            std::thread::Builder::new()
                .name(format!("data-prefetch-{}", self.cfg.rank))
                .spawn(move || w.run(tx))
                .map_err(|e| anyhow!("spawning the prefetch thread: {e}"))?,
        );
        self.rx = Some(rx);
        Ok(())
    }

    /// The next micro-batch of this rank, or `None` once a finite stream is exhausted.
    pub fn next_micro_batch(&mut self) -> Result<Option<Batch>> {
        if self.finished {
            return Ok(None);
        }
        let t = Instant::now();
        let msg = self.rx.as_ref().unwrap().recv().unwrap_or_else(|_| Msg::Err(anyhow!("the prefetch thread died")));
        self.stats.wait += t.elapsed();
        match msg {
            Msg::End => {
                self.finished = true;
                Ok(None)
            }
            Msg::Err(e) => {
                self.finished = true;
                Err(e)
            }
            Msg::Item(it) => {
                self.stats.micro_batches += 1;
                self.stats.produce += it.produce;
                self.skipped_seen = it.skipped_after;
                self.stats.skipped_rows = it.skipped_after;
                if it.micro + 1 == self.cfg.micro_steps() as u64 {
                    self.state.global_batches = it.global_batch + 1;
                    self.state.next_row = it.end_row;
                    self.state.epoch = it.end_epoch;
                    self.state.micro_in_batch = 0;
                    self.state.skipped_rows = it.skipped_after;
                } else {
                    self.state.global_batches = it.global_batch;
                    self.state.next_row = it.start_row;
                    self.state.epoch = it.start_epoch;
                    self.state.micro_in_batch = it.micro + 1;
                    self.state.skipped_rows = it.skipped_before;
                }
                Ok(Some(it.batch))
            }
        }
    }

    /// The state after the last micro-batch returned.
    pub fn state(&self) -> LoaderState {
        self.state.clone()
    }
    /// All-masked rows skipped so far (over the whole global stream, same on every rank).
    pub fn skipped_rows(&self) -> u64 {
        self.skipped_seen
    }
    pub fn stats(&self) -> LoaderStats {
        self.stats.clone()
    }
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, AtomicOrdering::Relaxed);
        drop(self.rx.take()); // unblocks a send
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
    }
}

struct Worker {
    cat: Arc<Catalog>,
    cfg: LoaderConfig,
    stream: Stream,
    global_batch: u64,
    first_micro: u64,
    skipped: u64,
    stop: Arc<AtomicBool>,
}

impl Worker {
    fn run(mut self, tx: SyncSender<Msg>) {
        match self.run_inner(&tx) {
            Ok(()) => {
                let _ = tx.send(Msg::End);
            }
            Err(e) => {
                let _ = tx.send(Msg::Err(e));
            }
        }
    }

    /// Collects the next global batch's rows. Returns `None` at the end of the stream.
    fn next_global_rows(&mut self) -> Result<Option<Vec<RowSpec>>> {
        let g = self.cfg.global_batch_rows;
        let mut rows = Vec::with_capacity(g);
        while rows.len() < g {
            match self.stream.next_row()? {
                None => break,
                Some(r) => {
                    if row_has_loss(&self.cat, &r) {
                        rows.push(r);
                    } else {
                        self.skipped += 1;
                    }
                }
            }
        }
        Ok(if rows.is_empty() { None } else { Some(rows) })
    }

    fn run_inner(&mut self, tx: &SyncSender<Msg>) -> Result<()> {
        let (w, ws, m) = (self.cfg.rank, self.cfg.world_size, self.cfg.micro_batch_rows);
        let steps = self.cfg.micro_steps();
        loop {
            let t0 = Instant::now();
            let start_row = self.stream.row_index();
            let start_epoch = self.stream.epoch();
            let skipped_before = self.skipped;
            let Some(rows) = self.next_global_rows()? else { return Ok(()) };
            let g = rows.len();
            let mine = &rows[w * g / ws..(w + 1) * g / ws];
            let mut walk = Some(t0.elapsed());
            for micro in self.first_micro as usize..steps {
                if self.stop.load(AtomicOrdering::Relaxed) {
                    return Ok(());
                }
                let t = Instant::now();
                let lo = (micro * m).min(mine.len());
                let hi = ((micro + 1) * m).min(mine.len());
                let batch = materialize(&self.cat, &mine[lo..hi], self.cfg.seq_len, self.cfg.pad_id);
                let produce = t.elapsed() + walk.take().unwrap_or_default();
                let item = Item {
                    batch,
                    global_batch: self.global_batch,
                    micro: micro as u64,
                    start_row,
                    start_epoch,
                    skipped_before,
                    end_row: self.stream.row_index(),
                    end_epoch: self.stream.epoch(),
                    skipped_after: self.skipped,
                    produce,
                };
                if tx.send(Msg::Item(Box::new(item))).is_err() {
                    return Ok(()); // the loader was dropped
                }
            }
            self.first_micro = 0;
            self.global_batch += 1;
        }
    }
}

/// Parses `DIR` or `DIR:WEIGHT`.
impl std::str::FromStr for SubsetSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<SubsetSpec> {
        if let Some((d, w)) = s.rsplit_once(':') {
            if let Ok(w) = w.parse::<f64>() {
                return Ok(SubsetSpec::new(d, w));
            }
        }
        if s.is_empty() {
            bail!("empty sub-dataset path");
        }
        Ok(SubsetSpec::new(s, 1.0))
    }
}
