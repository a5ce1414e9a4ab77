//! What the engine sends (part of the `plan` model; see mod.rs).

use super::*;

/// How much of the training state is sharded over the data-parallel ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ZeroStage {
    /// Everything replicated: one all-reduce of the gradients per step.
    Zero0,
    /// Optimizer state (fp32 master, AdamW moments) sharded: reduce-scatter + all-gather per step.
    Zero1,
    /// Gradients sharded too: a reduce-scatter after every micro-step.
    Zero2,
}

impl ZeroStage {
    pub const ALL: [ZeroStage; 3] = [ZeroStage::Zero0, ZeroStage::Zero1, ZeroStage::Zero2];

    /// The optimizer state (and the fp32 master) lives in shards: ZeRO-1 and ZeRO-2.
    pub fn shards_optimizer(self) -> bool {
        self != ZeroStage::Zero0
    }

    /// Only the reduced gradient shard is kept between micro-steps: ZeRO-2.
    pub fn shards_gradients(self) -> bool {
        self == ZeroStage::Zero2
    }

    /// "ZeRO-1".
    pub fn label(self) -> &'static str {
        match self {
            ZeroStage::Zero0 => "ZeRO-0",
            ZeroStage::Zero1 => "ZeRO-1",
            ZeroStage::Zero2 => "ZeRO-2",
        }
    }
}

impl fmt::Display for ZeroStage {
    /// "0", "1" or "2" (what `parallel.zero_stage` and `--stage` take).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ZeroStage::Zero0 => "0",
            ZeroStage::Zero1 => "1",
            ZeroStage::Zero2 => "2",
        })
    }
}

impl FromStr for ZeroStage {
    type Err = anyhow::Error;
    /// "0", "1", "2" (also "zero1", "ZeRO-1", …).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let digit = t.strip_prefix("zero").map(|r| r.trim_start_matches(['-', '_'])).unwrap_or(&t);
        match digit {
            "0" => Ok(ZeroStage::Zero0),
            "1" => Ok(ZeroStage::Zero1),
            "2" => Ok(ZeroStage::Zero2),
            _ => bail!("unknown ZeRO stage {s:?}: expected 0, 1 or 2"),
        }
    }
}

/// Payload bytes per rank in one optimizer step, by collective kind, as `Communicator::traffic`
/// counts them (all-reduce and reduce-scatter: their input; all-gather: its output).
///
/// `reduced_elems` is what every rank hands to the gradient collective per reduction, padding
/// included (the engine's `Layout::reduced_elems`: every bucket rounded up to a multiple of
/// `world`); `micro_steps` the micro-batches of one step; `grad_bytes`/`param_bytes` the element
/// sizes of the reduced gradients and of the gathered parameters. The engine's schedule:
///
/// * ZeRO-0: gradients accumulate locally; one all-reduce of all of them after the last
///   micro-step → `all_reduce = reduced_elems · grad_bytes`.
/// * ZeRO-1: one reduce-scatter of the accumulated gradients after the last micro-step, the
///   update of the shard, one all-gather of the parameters →
///   `reduce_scatter = reduced_elems · grad_bytes`, `all_gather = reduced_elems · param_bytes`.
/// * ZeRO-2: a reduce-scatter after every micro-step (only the shard accumulates) and the same
///   all-gather → `reduce_scatter = micro_steps · reduced_elems · grad_bytes`.
///
/// `calls` is left 0 (it depends on the bucket count; see [`step_calls`]), `broadcast` is 0 (the
/// initial broadcast of the parameters is not part of a step), and the scalar all-reduces (token
/// counts, loss, gradient norm) are not counted by `traffic`. The formulas hold for `world = 1`
/// too, but the single-process communicator counts nothing, so compare at `world ≥ 2`.
pub fn step_payload(
    stage: ZeroStage,
    reduced_elems: u64,
    world: u64,
    micro_steps: u64,
    grad_bytes: u64,
    param_bytes: u64,
) -> TrafficCount {
    debug_assert!(
        world >= 1 && reduced_elems.is_multiple_of(world),
        "reduced_elems ({reduced_elems}) is the padded count, a multiple of the world size ({world})"
    );
    let grads = reduced_elems * grad_bytes;
    let params = reduced_elems * param_bytes;
    match stage {
        ZeroStage::Zero0 => TrafficCount { all_reduce: grads, ..TrafficCount::default() },
        ZeroStage::Zero1 => TrafficCount { reduce_scatter: grads, all_gather: params, ..TrafficCount::default() },
        ZeroStage::Zero2 => {
            TrafficCount { reduce_scatter: micro_steps * grads, all_gather: params, ..TrafficCount::default() }
        }
    }
}

/// Collective calls per step with `buckets` gradient buckets (one collective per bucket per
/// reduction, one all-gather per bucket after the update); scalar all-reduces excluded.
pub fn step_calls(stage: ZeroStage, buckets: u64, micro_steps: u64) -> u64 {
    match stage {
        ZeroStage::Zero0 => buckets,
        ZeroStage::Zero1 => 2 * buckets,
        ZeroStage::Zero2 => micro_steps * buckets + buckets,
    }
}

/// The engine's gradient buckets: whole parameters in reverse model order (the order the backward
/// finishes them), a bucket closed once it holds at least `bucket_elems` elements, each padded to a
/// multiple of `world`. `sizes` are element counts in model order (every parameter trains).
/// The engine's buckets over a model's parameters, all training ([`crate::buckets::Layout`]).
pub fn bucket_layout(sizes: &[u64], bucket_elems: u64, world: u64) -> Vec<crate::buckets::Bucket> {
    let sizes: Vec<usize> = sizes.iter().map(|&s| s as usize).collect();
    crate::buckets::Layout::new(&sizes, &vec![true; sizes.len()], bucket_elems.max(1) as usize, world.max(1) as usize)
        .buckets
}
