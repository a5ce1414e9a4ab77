//! Resumable checkpoints: `<out>/checkpoints/step-NNNNNNNN/` holding the model (HF safetensors,
//! f32), the optimizer state (`optimizer.json`, a manifest of which parameter pieces each
//! `optimizer-rankNNNNN.safetensors` file holds: under ZeRO-1/2 every rank writes its own shard,
//! under ZeRO-0 rank 0 writes everything), the trainer state (`trainer_state.json`: stage, steps,
//! loader state, counters) and the tokenizer. Rank 0 makes a temporary folder; every rank copies
//! its part to host memory and writes it there on a background thread ([`start_save`]; training
//! goes on), with each file's size and XXH64; [`PendingSave::finish`] waits for every rank, and
//! rank 0 collects the sums (`checksums.json`), syncs, marks the folder `COMPLETE` and renames it
//! into place; a folder without the marker is never read, and a resume
//! first verifies the files (rank 0, its choice shared): a damaged checkpoint is named and the
//! previous complete one is used. Only the newest `keep` complete checkpoints are kept. Loading reads the
//! pieces a rank needs from whichever files hold them, so a run resumes at any world size and
//! ZeRO stage (a shared filesystem is assumed across nodes).
use crate::backend::Backend;
use crate::data::LoaderState;
use crate::dist::{DataParallel, Piece, ZeroStage};
use crate::model::Llama;
use crate::optim::Segment;
use crate::train::spikes::SpikeWindow;
use crate::weights::{HostModel, StoreDtype};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MARKER: &str = "COMPLETE";

/// Every other file of a checkpoint with its size and XXH64, written last before the marker and
/// checked before a resume reads anything.
pub const CHECKSUMS: &str = "checksums.json";

/// One file's entry in [`CHECKSUMS`].
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct FileSum {
    bytes: u64,
    xxh64: String,
}

/// Everything besides tensors that a resume needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Stage being run (== number of stages when all are done).
    pub stage: usize,
    /// Optimizer steps taken in this stage (skipped ones included).
    pub stage_step: u64,
    /// Optimizer steps over all stages.
    pub global_step: u64,
    /// Updates the optimizer applied in this stage (AdamW's bias-correction count).
    pub optimizer_updates: u64,
    pub tokens_seen: u64,
    pub skipped_steps: u64,
    pub consecutive_skips: u32,
    /// The loader's position in this stage's data (None at a stage start).
    pub loader: Option<LoaderState>,
    /// Updates skipped as loss or gradient-norm spikes, over all stages.
    #[serde(default)]
    pub spikes: u64,
    /// The stage's recent loss and gradient norms the spike bounds come from.
    #[serde(default)]
    pub spike_window: SpikeWindow,
    /// The steps of the checkpoints rolled back to after too many spikes, over all stages.
    #[serde(default)]
    pub rollbacks: Vec<u64>,
    /// Steps whose batches were read and dropped, as `[first, last]` global steps: after a
    /// rollback (the steps it undid) or where `run.skip_step_ranges` asked (never dropped twice).
    #[serde(default)]
    pub skipped_data: Vec<[u64; 2]>,
}

impl TrainerState {
    /// Which global batch of the run's data the next step trains on (1-based): its step, plus
    /// every batch dropped before it.
    pub fn next_batch_number(&self) -> u64 {
        self.global_step + 1 + self.skipped_data.iter().map(|[first, last]| last + 1 - first).sum::<u64>()
    }

    pub fn fresh() -> Self {
        TrainerState {
            stage: 0,
            stage_step: 0,
            global_step: 0,
            optimizer_updates: 0,
            tokens_seen: 0,
            skipped_steps: 0,
            consecutive_skips: 0,
            loader: None,
            spikes: 0,
            spike_window: SpikeWindow::default(),
            rollbacks: vec![],
            skipped_data: vec![],
        }
    }
}

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        std::fs::File::open(&p).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", p.display()))?;
    }
    sync_dir(dir)
}

fn write_tensors(path: &Path, tensors: &[(String, Vec<f32>)]) -> Result<()> {
    let bytes: Vec<(&String, usize, &[u8])> =
        tensors.iter().map(|(n, v)| (n, v.len(), bytemuck::cast_slice(v))).collect();
    let views = bytes.iter().map(|(n, len, b)| {
        (n.as_str(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*len], b).expect("sizes match"))
    });
    let data = safetensors::serialize(views, None)?;
    crate::fsutil::write_atomic(path, &data)
}

/// `optimizer.json`: where each rank's optimizer pieces are.
#[derive(Debug, Serialize, Deserialize)]
struct OptimizerManifest {
    world_size: usize,
    zero_stage: ZeroStage,
    files: Vec<ShardFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ShardFile {
    file: String,
    pieces: Vec<StoredPiece>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredPiece {
    param: String,
    start: usize,
    len: usize,
    /// Holds an fp32 master copy (ZeRO-1/2, mixed precision); otherwise the weights are the masters.
    master: bool,
}

fn shard_file_name(rank: usize) -> String {
    format!("optimizer-rank{rank:05}.safetensors")
}

fn tensor_name(param: &str, start: usize, what: &str) -> String {
    format!("{param}@{start}.{what}")
}

/// The pieces every rank writes (ZeRO-0: rank 0 alone, everything).
fn manifest<B: Backend>(model: &Llama<B>, dp: &DataParallel<B>) -> OptimizerManifest {
    let sharded = dp.stage != ZeroStage::Zero0;
    let sizes: Vec<usize> = model.params.iter().map(|p| p.value.numel()).collect();
    let writers = if sharded { dp.world_size() } else { 1 };
    let files = (0..writers)
        .map(|r| {
            let pieces = if sharded { dp.layout.shard_pieces(r) } else { dp.layout.whole_pieces(&sizes) };
            // Masters are stored wherever the optimizer keeps them (ZeRO-1/2, mixed precision).
            let master = sharded || dp.opt.segments.iter().any(|s| s.master.is_some());
            let pieces = pieces
                .iter()
                .map(|p| StoredPiece { param: model.params[p.param].name.clone(), start: p.start, len: p.len, master })
                .collect();
            ShardFile { file: shard_file_name(r), pieces }
        })
        .collect();
    OptimizerManifest { world_size: dp.world_size(), zero_stage: dp.stage, files }
}

/// Every rank reports whether its part succeeded; all fail together if one did.
fn agree<B: Backend>(dp: &DataParallel<B>, part: Result<()>) -> Result<()> {
    let mut failed = [if part.is_err() { 1.0 } else { 0.0 }];
    dp.comm.all_reduce_scalars(&mut failed)?;
    part?;
    if failed[0] > 0.0 {
        bail!("{} other rank(s) failed to write their part", failed[0]);
    }
    Ok(())
}

/// A checkpoint whose files a background thread is writing ([`start_save`]); [`PendingSave::finish`]
/// waits for it and publishes it.
pub struct PendingSave {
    /// The writer thread, or why it could not be started (reported by `finish`, where every rank
    /// agrees on the outcome).
    writer: Result<std::thread::JoinHandle<Result<Sums>>, String>,
    out: PathBuf,
    root: PathBuf,
    tmp: PathBuf,
    dst: PathBuf,
    keep: usize,
    rank: usize,
}

type Sums = std::collections::BTreeMap<String, FileSum>;

/// What one rank writes, copied to host memory so that training may go on meanwhile.
struct Part {
    tmp: PathBuf,
    rank: usize,
    /// Rank 0: the model, `optimizer.json`, `trainer_state.json` and the tokenizer to copy.
    leader: Option<(HostModel, String, String, Option<PathBuf>)>,
    /// The optimizer shard (every rank under ZeRO-1/2, rank 0 alone under ZeRO-0).
    shard: Option<Vec<(String, Vec<f32>)>>,
}

/// Starts a checkpoint for `state.global_step` (every rank calls this): rank 0 makes the temporary folder, every rank copies its part of
/// the state to host memory (the device is read here, on the calling thread) and starts a thread
/// that writes it, syncs it and lists its files' checksums. Errors here are the folder's and the
/// device's; the writer's come from [`PendingSave::finish`].
pub fn start_save<B: Backend>(
    out: &Path,
    keep: usize,
    backend: &B,
    model: &Llama<B>,
    dp: &DataParallel<B>,
    state: &TrainerState,
    tokenizer: Option<&Path>,
) -> Result<PendingSave> {
    let root = checkpoints_dir(out);
    let name = format!("step-{:08}", state.global_step);
    let tmp = root.join(format!(".{name}.tmp"));
    let dst = root.join(&name);
    let rank = dp.rank();
    let prepared = agree(dp, if rank == 0 { prepare_folder(&root, &tmp) } else { Ok(()) });
    if let Err(e) = prepared {
        return Err(e.context(format!("saving checkpoint {} (earlier checkpoints are intact)", dst.display())));
    }
    let leader = (rank == 0).then(|| {
        let manifest = serde_json::to_string_pretty(&manifest(model, dp)).expect("a manifest serialises");
        let state = serde_json::to_string_pretty(state).expect("a trainer state serialises");
        (model.to_host(backend), manifest, state, tokenizer.map(Path::to_path_buf))
    });
    let writes_shard = rank == 0 || dp.stage != ZeroStage::Zero0;
    let shard = writes_shard.then(|| optimizer_tensors(backend, model, dp));
    let part = Part { tmp: tmp.clone(), rank, leader, shard };
    let writer = std::thread::Builder::new()
        .name("checkpoint-writer".into())
        .spawn(move || write_part(&part))
        .map_err(|e| format!("starting the checkpoint writer thread: {e}"));
    Ok(PendingSave { writer, out: out.to_path_buf(), root, tmp, dst, keep, rank })
}

impl PendingSave {
    /// The checkpoint's folder once published.
    pub fn path(&self) -> &Path {
        &self.dst
    }

    /// Waits for this rank's writer, agrees with the others that every part is on disk, and (rank
    /// 0) writes the checksums and the marker, renames the folder into place and prunes old
    /// checkpoints. On any error the partial folder is removed; earlier checkpoints are untouched.
    pub fn finish<B: Backend>(self, dp: &DataParallel<B>) -> Result<PathBuf> {
        let written = match self.writer {
            Ok(w) => w.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the checkpoint writer thread panicked"))),
            Err(e) => Err(anyhow::anyhow!(e)),
        };
        let (part, sums) = match written {
            Ok(sums) => (Ok(()), sums),
            Err(e) => (Err(e), Sums::new()),
        };
        let rank = self.rank;
        // Published and pruned before the last agreement: no rank reads the checkpoint list while
        // rank 0 is still changing it.
        let publish_and_prune = || -> Result<()> {
            publish(&self.tmp, &self.dst, &self.root, sums)?;
            let mut all = complete_checkpoints(&self.out)?;
            while all.len() > self.keep {
                discard(&all.remove(0))?;
            }
            Ok(())
        };
        let result = agree(dp, part).and_then(|()| agree(dp, if rank == 0 { publish_and_prune() } else { Ok(()) }));
        if let Err(e) = result {
            if rank == 0 {
                let _ = std::fs::remove_dir_all(&self.tmp);
            }
            return Err(e.context(format!("saving checkpoint {} (earlier checkpoints are intact)", self.dst.display())));
        }
        Ok(self.dst)
    }
}

/// Rank 0, first: an empty temporary folder under `root` (left over ones are removed).
fn prepare_folder(root: &Path, tmp: &Path) -> Result<()> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let _ = std::fs::remove_dir_all(tmp);
    std::fs::create_dir_all(tmp).with_context(|| format!("creating {}", tmp.display()))
}

/// The sums of the files rank `rank` wrote, beside the shards, for rank 0 to collect.
fn sums_file_name(rank: usize) -> String {
    format!(".sums-rank{rank:05}.json")
}

/// Whether `name` in the temporary folder is one of rank `rank`'s files: its shard, and for rank
/// 0 everything that is not another rank's shard or sums.
fn written_by(name: &str, rank: usize) -> bool {
    name == shard_file_name(rank)
        || (rank == 0
            && !name.starts_with("optimizer-rank")
            && !name.starts_with(".sums-rank")
            && !name.ends_with(".tmp")
            && name != MARKER
            && name != CHECKSUMS)
}

/// On the writer thread: this rank's files into the temporary folder, then their sizes and
/// XXH64 (rank 0 keeps its own; the others leave theirs in a sums file).
fn write_part(part: &Part) -> Result<Sums> {
    if let Some((model, manifest, state, tokenizer)) = &part.leader {
        model.save(&part.tmp, StoreDtype::F32, None)?;
        crate::fsutil::write_atomic(&part.tmp.join("optimizer.json"), manifest.as_bytes())?;
        crate::fsutil::write_atomic(&part.tmp.join("trainer_state.json"), state.as_bytes())?;
        if let Some(t) = tokenizer {
            std::fs::copy(t, part.tmp.join("tokenizer.json")).with_context(|| format!("copying {}", t.display()))?;
        }
    }
    if let Some(tensors) = &part.shard {
        write_tensors(&part.tmp.join(shard_file_name(part.rank)), tensors)?;
    }
    let mut sums = Sums::new();
    for e in std::fs::read_dir(&part.tmp).with_context(|| format!("listing {}", part.tmp.display()))? {
        let path = e?.path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if written_by(&name, part.rank) {
            let (bytes, hash) = file_sum(&path)?;
            sums.insert(name, FileSum { bytes, xxh64: format!("{hash:016x}") });
        }
    }
    if part.rank != 0 {
        let text = serde_json::to_string(&sums)?;
        crate::fsutil::write_atomic(&part.tmp.join(sums_file_name(part.rank)), text.as_bytes())?;
    }
    Ok(sums)
}

/// This rank's optimizer pieces (moments, and masters where it keeps them), read from the device.
fn optimizer_tensors<B: Backend>(backend: &B, model: &Llama<B>, dp: &DataParallel<B>) -> Vec<(String, Vec<f32>)> {
    let mut tensors = Vec::new();
    for (p, s) in dp.pieces.iter().zip(&dp.opt.segments) {
        let pname = &model.params[p.param].name;
        tensors.push((tensor_name(pname, p.start, "m"), backend.download(&s.m)));
        tensors.push((tensor_name(pname, p.start, "v"), backend.download(&s.v)));
        if let Some(master) = &s.master {
            tensors.push((tensor_name(pname, p.start, "master"), backend.download(master)));
        }
    }
    tensors
}

/// Rank 0, once every part is written: collects every rank's checksums (its own in `sums`, the
/// others' from their sums files, which it removes), checks that they name every file, writes
/// them and the marker, syncs and renames `tmp` to `dst`.
fn publish(tmp: &Path, dst: &Path, root: &Path, mut sums: Sums) -> Result<()> {
    for e in std::fs::read_dir(tmp).with_context(|| format!("listing {}", tmp.display()))? {
        let path = e?.path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with(".sums-rank") {
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let theirs: Sums =
                serde_json::from_str(&text).with_context(|| format!("{}: not a checksum list", path.display()))?;
            sums.extend(theirs);
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    for e in std::fs::read_dir(tmp).with_context(|| format!("listing {}", tmp.display()))? {
        let name = e?.file_name().to_string_lossy().to_string();
        if !sums.contains_key(&name) {
            bail!("{}: no rank reported writing it", tmp.join(&name).display());
        }
    }
    crate::fsutil::write_atomic(&tmp.join(CHECKSUMS), serde_json::to_string_pretty(&sums)?.as_bytes())?;
    crate::fsutil::write_atomic(&tmp.join(MARKER), b"")?;
    sync_tree(tmp)?;
    if dst.exists() {
        discard(dst)?;
    }
    std::fs::rename(tmp, dst)?;
    sync_dir(root)
}

/// The length and XXH64 of one file, read in 8 MiB pieces.
fn file_sum(path: &Path) -> Result<(u64, u64)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hash = crate::data::hash::Xxh64::new(0);
    let mut buf = vec![0u8; 8 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok((bytes, hash.digest()));
        }
        hash.update(&buf[..n]);
        bytes += n as u64;
    }
}

/// Checks every file of checkpoint folder `dir` against its [`CHECKSUMS`]: a missing, truncated
/// or altered file is named. A checkpoint written before checksums existed passes, with a warning.
pub fn verify(dir: &Path) -> Result<()> {
    let path = dir.join(CHECKSUMS);
    if !path.exists() {
        eprintln!(
            "warning: {} has no {CHECKSUMS} (written by an older version): its files are not verified",
            dir.display()
        );
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let want: std::collections::BTreeMap<String, FileSum> =
        serde_json::from_str(&text).with_context(|| format!("{}: not a valid checksum list", path.display()))?;
    for (name, sum) in &want {
        let file = dir.join(name);
        if !file.exists() {
            bail!("{}: missing (listed in {CHECKSUMS})", file.display());
        }
        let (bytes, hash) = file_sum(&file)?;
        if bytes != sum.bytes {
            bail!("{}: {bytes} bytes where {} were written (truncated or overwritten)", file.display(), sum.bytes);
        }
        if format!("{hash:016x}") != sum.xxh64 {
            bail!("{}: checksum {hash:016x} where {} was written (the file is corrupt)", file.display(), sum.xxh64);
        }
    }
    Ok(())
}

/// The newest of `candidates` (complete checkpoints, oldest first) whose files verify, as an index;
/// each one passed over is named with what is wrong. An error when there are checkpoints and none
/// verifies: a run never silently starts again from scratch.
pub fn newest_intact(candidates: &[PathBuf]) -> Result<Option<usize>> {
    let mut rejected = Vec::new();
    for (i, dir) in candidates.iter().enumerate().rev() {
        match verify(dir) {
            Ok(()) => return Ok(Some(i)),
            Err(e) => {
                eprintln!("checkpoint {} is damaged ({e:#}); falling back to the previous complete one", dir.display());
                rejected.push(format!("{e:#}"));
            }
        }
    }
    if rejected.is_empty() {
        return Ok(None);
    }
    bail!(
        "no intact checkpoint to resume from ({} damaged: {}); move them away to start from scratch",
        rejected.len(),
        rejected.join("; ")
    )
}

/// Removes a checkpoint without ever leaving a half-deleted folder that still looks complete: it
/// is first renamed (atomically) to a `.tmp` name, which readers ignore and the next run cleans up.
pub fn discard(dir: &Path) -> Result<()> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint");
    let trash = dir.with_file_name(format!(".{name}.discarded.tmp"));
    let _ = std::fs::remove_dir_all(&trash);
    std::fs::rename(dir, &trash).with_context(|| format!("removing old checkpoint {}", dir.display()))?;
    std::fs::remove_dir_all(&trash).with_context(|| format!("removing old checkpoint {}", trash.display()))
}

/// Complete checkpoints, oldest first.
pub fn complete_checkpoints(out: &Path) -> Result<Vec<PathBuf>> {
    let root = checkpoints_dir(out);
    if !root.exists() {
        return Ok(vec![]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-")) && p.join(MARKER).exists()
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Restores the model, this rank's optimizer pieces and the trainer state from checkpoint folder
/// `dir`, whatever world size and ZeRO stage wrote it.
pub fn load<B: Backend>(
    dir: &Path,
    backend: &B,
    model: &mut Llama<B>,
    dp: &mut DataParallel<B>,
) -> Result<TrainerState> {
    if !dir.join(MARKER).exists() {
        bail!("{}: not a complete checkpoint (no {MARKER} marker)", dir.display());
    }
    let loaded = Llama::load(backend, dir)?;
    if loaded.config.vocab_size != model.config.vocab_size || loaded.params.len() != model.params.len() {
        bail!("{}: the checkpoint's model does not match the configured one", dir.display());
    }
    model.params = loaded.params;
    let mut shards = Shards::open(dir)?;
    let pieces: Vec<Piece> = dp.pieces.clone();
    for (p, seg) in pieces.iter().zip(dp.opt.segments.iter_mut()) {
        restore_piece(backend, model, p, seg, &mut shards)?;
    }
    let state = read_state(dir)?;
    dp.opt.step = state.optimizer_updates;
    Ok(state)
}

/// A checkpoint's optimizer manifest and its shard files, each mapped when first read.
struct Shards<'a> {
    dir: &'a Path,
    manifest_path: PathBuf,
    manifest: OptimizerManifest,
    maps: Vec<Option<memmap2::Mmap>>,
}

impl<'a> Shards<'a> {
    fn open(dir: &'a Path) -> Result<Self> {
        let manifest_path = dir.join("optimizer.json");
        let text =
            std::fs::read_to_string(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?;
        let manifest: OptimizerManifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid optimizer manifest", manifest_path.display()))?;
        let maps = (0..manifest.files.len()).map(|_| None).collect();
        Ok(Shards { dir, manifest_path, manifest, maps })
    }

    /// The bytes of shard file `fi`, mapped on first use.
    fn bytes(&mut self, fi: usize) -> Result<&[u8]> {
        if self.maps[fi].is_none() {
            let path = self.dir.join(&self.manifest.files[fi].file);
            let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: checkpoint files are never modified after they are complete.
            self.maps[fi] =
                Some(unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?);
        }
        Ok(self.maps[fi].as_ref().unwrap())
    }
}

/// Piece `p`'s moments (and master, or parameter values) from whichever stored pieces overlap it.
fn restore_piece<B: Backend>(
    backend: &B,
    model: &mut Llama<B>,
    p: &Piece,
    seg: &mut Segment<B>,
    shards: &mut Shards,
) -> Result<()> {
    let pname = model.params[p.param].name.clone();
    let mut m = vec![f32::NAN; p.len];
    let mut v = vec![f32::NAN; p.len];
    // Without a master of its own (f32, ZeRO-0) a piece still takes stored masters, when the
    // checkpoint has them (it was written in mixed precision), as its parameter values.
    let keeps_master = seg.master.is_some();
    let current = || backend.download(&backend.slice(&model.params[p.param].value.buf, p.start, p.len));
    let mut master = keeps_master.then(current);
    let mut covered = 0;
    for fi in 0..shards.manifest.files.len() {
        let stored: Vec<StoredPiece> =
            shards.manifest.files[fi].pieces.iter().filter(|sp| sp.param == pname).cloned().collect();
        for sp in stored {
            let (lo, hi) = (sp.start.max(p.start), (sp.start + sp.len).min(p.start + p.len));
            if lo >= hi {
                continue;
            }
            let path = shards.dir.join(&shards.manifest.files[fi].file);
            let st = safetensors::SafeTensors::deserialize(shards.bytes(fi)?)
                .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
            let copy = |what: &str, dst: &mut [f32]| -> Result<()> {
                let name = tensor_name(&pname, sp.start, what);
                let t = st.tensor(&name).map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
                if t.dtype() != safetensors::Dtype::F32 || t.shape() != [sp.len] {
                    bail!("{}: tensor `{name}` is not F32 [{}]", path.display(), sp.len);
                }
                let src = &t.data()[4 * (lo - sp.start)..4 * (hi - sp.start)];
                for (d, b) in dst[lo - p.start..hi - p.start].iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                Ok(())
            };
            copy("m", &mut m)?;
            copy("v", &mut v)?;
            if sp.master {
                copy("master", master.get_or_insert_with(current))?;
            }
            covered += hi - lo;
        }
    }
    if covered != p.len {
        bail!(
            "{}: optimizer state for `{pname}`[{}..{}] is incomplete ({covered} of {} elements)",
            shards.manifest_path.display(),
            p.start,
            p.start + p.len,
            p.len
        );
    }
    seg.m = backend.upload(&m);
    seg.v = backend.upload(&v);
    let master = master.map(|h| backend.upload(&h));
    if keeps_master {
        seg.master = master;
    } else if let Some(values) = master {
        backend.write_slice(model.params[p.param].value.buf_mut(), p.start, &values);
    }
    Ok(())
}

/// The trainer state of checkpoint folder `dir`.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid trainer state", p.display()))
}
