//! The memory and communication model of data parallelism with ZeRO: what the engine sends per
//! step ([`step_payload`], checked against [`crate::Communicator::traffic`] by the trainer's MPI
//! tests) and the planning model behind the `zero-plan` tool ([`plan`]): per-rank memory, ring
//! wire bytes and times over NVLink/InfiniBand, compute time from FLOPs, and the share of the
//! step that communication leaves exposed. docs/parallel-plan.md derives every formula and gives
//! the answer for LLaMA-2-7B on 64 A800s and 64 H100s.
//!
//! Units: element counts and bytes are `u64`; times are seconds and rates bytes (or FLOPs) per
//! second as `f64`. "GB" is 10⁹ bytes, "GiB" 2³⁰.
use crate::{Collective, TrafficCount};
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

// ---------------------------------------------------------------------------------------------
// What the engine sends
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Ring collectives and links
// ---------------------------------------------------------------------------------------------

/// Bytes one rank sends (and receives) in a ring collective whose payload, as `traffic` counts it,
/// is `payload`: all-reduce 2(N−1)/N·S, reduce-scatter and all-gather (N−1)/N·S, broadcast (a
/// pipelined chain) S. Zero at N = 1.
pub fn ring_wire_bytes(kind: Collective, payload: f64, world: u64) -> f64 {
    if world <= 1 {
        return 0.0;
    }
    let n = world as f64;
    match kind {
        Collective::AllReduce => 2.0 * (n - 1.0) / n * payload,
        Collective::ReduceScatter | Collective::AllGather => (n - 1.0) / n * payload,
        Collective::Broadcast => payload,
    }
}

/// Sequential ring steps (each paying one hop latency): 2(N−1) for all-reduce, N−1 otherwise.
pub fn ring_steps(kind: Collective, world: u64) -> u64 {
    if world <= 1 {
        return 0;
    }
    match kind {
        Collective::AllReduce => 2 * (world - 1),
        _ => world - 1,
    }
}

/// The network of a cluster of identical nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Links {
    pub gpus_per_node: u64,
    /// Bandwidth a ring achieves over NVLink, per GPU and direction (nccl-tests' bus bandwidth),
    /// GB/s.
    pub nvlink_gbs: f64,
    /// Line rate of one InfiniBand NIC, Gb/s (bits).
    pub ib_gbps: f64,
    pub nics_per_node: u64,
    /// Fraction of the IB line rate a collective achieves.
    pub ib_efficiency: f64,
    /// NCCL's latency model of a ring (Simple protocol): a base latency per collective plus one
    /// hop latency per ring step, NVLink for steps inside a node and network for steps between
    /// nodes, µs.
    pub base_latency_us: f64,
    pub nvlink_hop_us: f64,
    pub ib_hop_us: f64,
    /// Pessimistic variant: give each GPU only its share of the node's NICs (as if every rank's
    /// traffic left the node separately) instead of the node's aggregate (what a ring needs).
    pub ib_per_gpu_share: bool,
}

impl Links {
    pub fn crosses_nodes(&self, world: u64) -> bool {
        world > self.gpus_per_node
    }

    pub fn nodes(&self, world: u64) -> u64 {
        world.div_ceil(self.gpus_per_node.max(1))
    }

    /// Achieved InfiniBand bandwidth out of one node, bytes/s.
    pub fn ib_node_bytes_per_s(&self) -> f64 {
        self.nics_per_node as f64 * self.ib_gbps / 8.0 * self.ib_efficiency * 1e9
    }

    /// The bottleneck bandwidth of a ring over `world` ranks, bytes/s per rank and direction, and
    /// which link it is.
    ///
    /// Inside a node the ring runs over NVLink. Across nodes NCCL builds one ring per channel,
    /// each entering and leaving every node once through its own NIC; a ring's rank-to-rank
    /// traffic is the same on every edge, so the node's NICs together carry one rank's worth of
    /// the ring traffic: the inter-node bound is the node's aggregate NIC bandwidth (not divided by
    /// the GPUs per node, unless `ib_per_gpu_share`), and the bottleneck is the smaller of that
    /// and NVLink.
    pub fn ring_bandwidth(&self, world: u64) -> (f64, Bottleneck) {
        let nvlink = self.nvlink_gbs * 1e9;
        if !self.crosses_nodes(world) {
            return (nvlink, Bottleneck::NvLink);
        }
        let mut ib = self.ib_node_bytes_per_s();
        if self.ib_per_gpu_share {
            ib /= self.gpus_per_node as f64;
        }
        if ib < nvlink {
            (ib, Bottleneck::InfiniBand)
        } else {
            (nvlink, Bottleneck::NvLink)
        }
    }

    /// Latency of one ring collective, seconds: base + (steps − inter-node steps) · NVLink hop +
    /// inter-node steps · network hop, where a ring over M nodes has M − 1 inter-node steps per
    /// pass (NCCL's own model in `tuning.cc`).
    pub fn latency_s(&self, kind: Collective, world: u64) -> f64 {
        if world <= 1 {
            return 0.0;
        }
        let steps = ring_steps(kind, world);
        let passes = if kind == Collective::AllReduce { 2 } else { 1 };
        let inter = passes * (self.nodes(world) - 1);
        1e-6 * (self.base_latency_us + (steps - inter) as f64 * self.nvlink_hop_us + inter as f64 * self.ib_hop_us)
    }

    /// Time of one ring collective of `payload` bytes (as `traffic` counts them): latency + wire
    /// bytes / bottleneck bandwidth. Zero at world 1.
    pub fn collective_time(&self, kind: Collective, payload: f64, world: u64) -> f64 {
        if world <= 1 {
            return 0.0;
        }
        self.latency_s(kind, world) + ring_wire_bytes(kind, payload, world) / self.ring_bandwidth(world).0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Bottleneck {
    NvLink,
    InfiniBand,
}

// ---------------------------------------------------------------------------------------------
// Model shapes, precision, cards
// ---------------------------------------------------------------------------------------------

/// A LLaMA decoder: per layer RMSNorm → Q/K/V/O (GQA) → RMSNorm → SwiGLU MLP; embedding, final
/// norm and (untied) LM head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    pub name: String,
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub ffn: u64,
    pub vocab: u64,
    pub tied_embeddings: bool,
}

impl ModelShape {
    /// LLaMA-2-7B (vocabulary 32,000; Colossal-LLaMA-2 extends it to 69,104).
    pub fn llama2_7b() -> Self {
        ModelShape {
            name: "llama2-7b".into(),
            hidden: 4096,
            layers: 32,
            heads: 32,
            kv_heads: 32,
            head_dim: 128,
            ffn: 11008,
            vocab: 32000,
            tied_embeddings: false,
        }
    }

    /// SmolLM2-135M (GQA 9:3, tied embeddings).
    pub fn smollm2_135m() -> Self {
        ModelShape {
            name: "smollm2-135m".into(),
            hidden: 576,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            ffn: 1536,
            vocab: 49152,
            tied_embeddings: true,
        }
    }

    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "llama2-7b" => Some(Self::llama2_7b()),
            "smollm2-135m" => Some(Self::smollm2_135m()),
            _ => None,
        }
    }

    pub const PRESETS: [&'static str; 2] = ["llama2-7b", "smollm2-135m"];

    pub fn q_dim(&self) -> u64 {
        self.heads * self.head_dim
    }

    pub fn kv_dim(&self) -> u64 {
        self.kv_heads * self.head_dim
    }

    /// Elements of one layer's parameters in the model's order: input norm, q, k, v, o,
    /// post-attention norm, gate, up, down.
    pub fn layer_param_sizes(&self) -> [u64; 9] {
        let (h, q, kv, f) = (self.hidden, self.q_dim(), self.kv_dim(), self.ffn);
        [h, q * h, kv * h, kv * h, h * q, h, f * h, f * h, h * f]
    }

    pub fn layer_params(&self) -> u64 {
        self.layer_param_sizes().iter().sum()
    }

    /// Every parameter's elements in model order (embedding, layers, final norm, LM head if
    /// untied), as the trainer lists them.
    pub fn param_sizes(&self) -> Vec<u64> {
        let mut sizes = vec![self.vocab * self.hidden];
        for _ in 0..self.layers {
            sizes.extend(self.layer_param_sizes());
        }
        sizes.push(self.hidden);
        if !self.tied_embeddings {
            sizes.push(self.vocab * self.hidden);
        }
        sizes
    }

    pub fn total_params(&self) -> u64 {
        self.non_embedding_params() + self.embedding_params()
    }

    /// Layers and final norm: what the 6·N FLOP rule counts.
    pub fn non_embedding_params(&self) -> u64 {
        self.layers * self.layer_params() + self.hidden
    }

    /// Embedding and (untied) LM head.
    pub fn embedding_params(&self) -> u64 {
        self.vocab * self.hidden * if self.tied_embeddings { 1 } else { 2 }
    }

    /// Model FLOPs per trained token at sequence length `seq`: 6·N(non-embedding) for the matmuls
    /// (forward 2, backward 4), 12·L·(heads·head_dim)·seq for QKᵀ and PV (the usual convention
    /// counts them without the causal halving), 6·h·V for the LM head.
    pub fn model_flops_per_token(&self, seq: u64) -> f64 {
        6.0 * self.non_embedding_params() as f64
            + 12.0 * (self.layers * self.q_dim() * seq) as f64
            + 6.0 * (self.hidden * self.vocab) as f64
    }

    /// Extra FLOPs per token when every layer is recomputed in the backward (one more forward of
    /// the layers: 2·N(layers) + 4·L·q·seq).
    pub fn recompute_flops_per_token(&self, seq: u64) -> f64 {
        2.0 * (self.layers * self.layer_params()) as f64 + 4.0 * (self.layers * self.q_dim() * seq) as f64
    }

    /// Activation elements one layer keeps per token for its backward (FlashAttention, fused
    /// RMSNorm/RoPE/SwiGLU, no dropout): the layer input x and its RMSNorm output (h + h), Q and
    /// K after RoPE and V (q + 2·kv), the attention output O (q; also the input of o_proj), the
    /// residual after attention and its RMSNorm output (h + h), gate and up outputs (2·f) and
    /// their SwiGLU product, the input of down_proj (f): 4h + 2q + 2kv + 3f.
    pub fn layer_activation_elems_per_token(&self) -> u64 {
        4 * self.hidden + 2 * self.q_dim() + 2 * self.kv_dim() + 3 * self.ffn
    }

    /// fp32 statistics one layer keeps per token: the attention's log-sum-exp per head and the two
    /// RMSNorms' reciprocal RMS.
    pub fn layer_stat_bytes_per_token(&self) -> u64 {
        4 * self.heads + 2 * 4
    }
}

/// Element sizes of the training state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    /// Mixed precision: bf16 parameters, gradients and activations; fp32 master copy and AdamW
    /// moments (12 bytes per parameter) at every stage.
    Bf16,
    /// Everything f32, as the engine runs today: the parameters are the masters under ZeRO-0
    /// (8 bytes of moments per parameter), a sharded stage keeps an f32 master of its shard (12).
    Fp32,
}

impl Precision {
    pub fn param_bytes(self) -> u64 {
        match self {
            Precision::Bf16 => 2,
            Precision::Fp32 => 4,
        }
    }
    pub fn grad_bytes(self) -> u64 {
        self.param_bytes()
    }
    pub fn act_bytes(self) -> u64 {
        self.param_bytes()
    }
    /// Optimizer bytes per parameter it updates (master copy + AdamW moments).
    pub fn optimizer_bytes(self, stage: ZeroStage) -> u64 {
        match (self, stage) {
            (Precision::Fp32, ZeroStage::Zero0) => 8,
            _ => 12,
        }
    }
}

impl FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bf16" => Ok(Precision::Bf16),
            "fp32" | "f32" => Ok(Precision::Fp32),
            _ => bail!("unknown precision {s:?}: expected bf16 or fp32"),
        }
    }
}

/// A GPU and the node it sits in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Card {
    pub name: String,
    pub mem_bytes: u64,
    /// Dense bf16 tensor-core peak, FLOP/s.
    pub peak_flops: f64,
    /// HBM bandwidth, bytes/s.
    pub hbm_bytes_per_s: f64,
    /// Node defaults: achieved NVLink ring bandwidth (GB/s per direction), NIC line rate (Gb/s),
    /// NICs per node.
    pub nvlink_gbs: f64,
    pub ib_gbps: f64,
    pub nics_per_node: u64,
}

const MIB: u64 = 1 << 20;
pub const GIB: f64 = (1u64 << 30) as f64;

impl Card {
    /// A800 80GB SXM: A100 compute (312 TFLOP/s bf16, 2.04 TB/s HBM2e) with NVLink cut to 400 GB/s
    /// bidirectional (8 links, 200 GB/s per direction; a ring achieves ≈ 80%: 160). Node default:
    /// 4 × 200 Gb/s HDR (Colossal-LLaMA-2's launch script names four HCAs).
    pub fn a800() -> Self {
        Card {
            name: "A800".into(),
            mem_bytes: 81920 * MIB,
            peak_flops: 312e12,
            hbm_bytes_per_s: 2.039e12,
            nvlink_gbs: 160.0,
            ib_gbps: 200.0,
            nics_per_node: 4,
        }
    }
    /// A100 80GB SXM: NVLink 600 GB/s bidirectional (300 per direction, ring ≈ 240), 8 × 200 Gb/s.
    pub fn a100() -> Self {
        Card {
            name: "A100".into(),
            mem_bytes: 81920 * MIB,
            peak_flops: 312e12,
            hbm_bytes_per_s: 2.039e12,
            nvlink_gbs: 240.0,
            ib_gbps: 200.0,
            nics_per_node: 8,
        }
    }
    /// H100 80GB SXM: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, NVLink 900 GB/s bidirectional (450
    /// per direction; a ring achieves ≈ 370), 8 × 400 Gb/s NDR.
    pub fn h100() -> Self {
        Card {
            name: "H100".into(),
            mem_bytes: 81559 * MIB,
            peak_flops: 989e12,
            hbm_bytes_per_s: 3.35e12,
            nvlink_gbs: 370.0,
            ib_gbps: 400.0,
            nics_per_node: 8,
        }
    }
    pub fn preset(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "a800" => Some(Self::a800()),
            "a100" => Some(Self::a100()),
            "h100" => Some(Self::h100()),
            _ => None,
        }
    }
    pub const PRESETS: [&'static str; 3] = ["a800", "a100", "h100"];

    /// The card's node, IB at 90% of line rate, and NCCL's ring latencies for the Simple protocol
    /// (8.4 µs base, 3.4 µs per NVLink step, 9.6 µs per network step).
    pub fn default_links(&self, gpus_per_node: u64) -> Links {
        Links {
            gpus_per_node,
            nvlink_gbs: self.nvlink_gbs,
            ib_gbps: self.ib_gbps,
            nics_per_node: self.nics_per_node,
            ib_efficiency: 0.9,
            base_latency_us: 8.4,
            nvlink_hop_us: 3.4,
            ib_hop_us: 9.6,
            ib_per_gpu_share: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The plan
// ---------------------------------------------------------------------------------------------

/// Fraction of HBM bandwidth the (memory-bound) AdamW update achieves.
pub const OPTIMIZER_HBM_EFFICIENCY: f64 = 0.7;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanInput {
    pub model: ModelShape,
    pub world: u64,
    pub stage: ZeroStage,
    /// Rows per micro-batch.
    pub micro_batch: u64,
    pub seq: u64,
    /// Tokens in one optimizer step over all ranks (a multiple of world · micro_batch · seq).
    pub global_batch_tokens: u64,
    pub precision: Precision,
    pub checkpoint_layers: bool,
    pub card: Card,
    pub links: Links,
    /// Fraction of the card's peak achieved on the FLOPs executed (the MFU of a step without
    /// recomputation; with checkpointing the recomputed forward costs extra time at this rate).
    pub mfu: f64,
    /// The engine's gradient bucket size, elements.
    pub bucket_elems: u64,
    /// Memory the model does not itemise: CUDA context, cuBLAS workspace, NCCL buffers, allocator
    /// fragmentation.
    pub reserve_bytes: u64,
}

/// Per-rank memory, bytes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Memory {
    pub params: u64,
    pub grads: u64,
    pub optimizer: u64,
    /// The layers' saved activations of one micro-batch (with checkpointing: every layer's input
    /// plus one layer recomputed) and the backward's working set of one layer.
    pub activations: u64,
    /// Final norm input/output, logits and their gradient.
    pub head: u64,
    /// Two gradient buckets in flight.
    pub buckets: u64,
    pub reserve: u64,
    /// Through the backward: everything above.
    pub backward_peak: u64,
    /// After the backward (ZeRO-1/2): parameters, gradient shard, optimizer state and the
    /// all-gathered parameters before they replace the old ones.
    pub update_peak: u64,
    pub peak: u64,
    pub card: u64,
    pub fits: bool,
    /// The largest micro-batch (rows) whose peak fits the card; 0 if none.
    pub max_micro_batch: u64,
}

/// One kind of collective in a step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CommRow {
    pub what: String,
    pub kind: String,
    pub calls: u64,
    /// Payload bytes as `traffic` counts them.
    pub payload: u64,
    pub wire: f64,
    pub time_s: f64,
    pub exposed_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comm {
    pub reduced_elems: u64,
    pub buckets: u64,
    pub largest_bucket: u64,
    pub bandwidth_bytes_per_s: f64,
    pub bottleneck: Bottleneck,
    /// Traffic one rank's communicator should count per step.
    pub payload: Payload,
    pub rows: Vec<CommRow>,
    pub total_s: f64,
    pub exposed_s: f64,
}

/// [`TrafficCount`] in a serialisable form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Payload {
    pub all_reduce: u64,
    pub reduce_scatter: u64,
    pub all_gather: u64,
    pub broadcast: u64,
    pub calls: u64,
}

impl From<TrafficCount> for Payload {
    fn from(t: TrafficCount) -> Self {
        Payload {
            all_reduce: t.all_reduce,
            reduce_scatter: t.reduce_scatter,
            all_gather: t.all_gather,
            broadcast: t.broadcast,
            calls: t.calls,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Timing {
    pub micro_steps: u64,
    pub tokens_per_rank: u64,
    pub model_flops_per_token: f64,
    pub executed_flops_per_token: f64,
    pub forward_s: f64,
    /// Backward (with the recomputed forward when checkpointing) of one micro-step.
    pub backward_s: f64,
    pub compute_s: f64,
    pub optimizer_s: f64,
    pub exposed_comm_s: f64,
    pub step_s: f64,
    /// Exposed communication / step.
    pub exposed_share: f64,
    pub tokens_per_s_per_gpu: f64,
    /// Model FLOPs per second over the card's peak, for the whole step.
    pub mfu: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub input: PlanInput,
    pub total_params: u64,
    pub non_embedding_params: u64,
    pub memory: Memory,
    pub comm: Comm,
    pub timing: Timing,
}

/// Micro-steps per optimizer step: the global batch's rows per rank over the micro-batch.
pub fn micro_steps(input: &PlanInput) -> Result<u64> {
    ensure!(
        input.world >= 1 && input.micro_batch >= 1 && input.seq >= 1,
        "world, micro-batch and sequence length must be at least 1"
    );
    let per_micro = input.world * input.micro_batch * input.seq;
    ensure!(
        input.global_batch_tokens >= per_micro && input.global_batch_tokens.is_multiple_of(per_micro),
        "the global batch ({} tokens) is not a multiple of world × micro-batch × seq = {} × {} × {} = {} tokens",
        input.global_batch_tokens,
        input.world,
        input.micro_batch,
        input.seq,
        per_micro
    );
    Ok(input.global_batch_tokens / per_micro)
}

/// Per-rank memory at micro-batch `rows` (the rest of `input` as given).
pub fn memory(input: &PlanInput, rows: u64) -> Memory {
    let m = &input.model;
    let p = input.precision;
    let n = input.world.max(1);
    let buckets = bucket_layout(&m.param_sizes(), input.bucket_elems, n);
    let padded: u64 = buckets.iter().map(|b| b.padded as u64).sum();
    let shard = padded / n;
    let total = m.total_params();
    let params = total * p.param_bytes();
    let grads = if input.stage.shards_gradients() { shard * p.grad_bytes() } else { total * p.grad_bytes() };
    let optimizer = if input.stage.shards_optimizer() { shard } else { total } * p.optimizer_bytes(input.stage);
    let t = rows * input.seq;
    let a = p.act_bytes();
    let layer = t * (m.layer_activation_elems_per_token() * a + m.layer_stat_bytes_per_token());
    // The backward's working set inside one layer: the incoming gradient and the input gradient
    // (2h) and the SwiGLU gradients (3f).
    let scratch = t * (2 * m.hidden + 3 * m.ffn) * a;
    let activations =
        if input.checkpoint_layers { m.layers * t * m.hidden * a + layer } else { m.layers * layer } + scratch;
    let head = t * (2 * m.hidden + 2 * m.vocab) * a;
    let largest = buckets.iter().map(|b| b.padded as u64).max().unwrap_or(0);
    let bucket_bytes = 2 * largest.min(padded) * p.grad_bytes();
    let reserve = input.reserve_bytes;
    let backward_peak = params + grads + optimizer + activations + head + bucket_bytes + reserve;
    let update_peak = if input.stage.shards_optimizer() {
        params + shard * p.grad_bytes() + optimizer + padded * p.param_bytes() + reserve
    } else {
        params + grads + optimizer + reserve
    };
    let peak = backward_peak.max(update_peak);
    let card = input.card.mem_bytes;
    let fits = peak <= card;
    // Memory is affine in the rows: the largest micro-batch whose backward peak fits.
    let per_row = (activations + head) / rows.max(1);
    let fixed = backward_peak - (activations + head);
    let max_micro_batch = if update_peak > card || fixed > card { 0 } else { (card - fixed) / per_row.max(1) };
    Memory {
        params,
        grads,
        optimizer,
        activations,
        head,
        buckets: bucket_bytes,
        reserve,
        backward_peak,
        update_peak,
        peak,
        card,
        fits,
        max_micro_batch,
    }
}

/// When each parameter's gradient is final in one micro-step's backward, in seconds from its
/// start, and the backward's length. Costs in FLOPs at the executed rate: the LM head first,
/// then each layer from the last (its recomputed forward first when checkpointing), MLP weights,
/// o_proj, the attention core, v/k/q; the embedding's gradient is final at the very end.
pub fn backward_ready_times(
    m: &ModelShape,
    tokens: u64,
    seq: u64,
    checkpoint: bool,
    flops_per_s: f64,
) -> (Vec<f64>, f64) {
    let t = tokens as f64;
    let (h, f, v) = (m.hidden as f64, m.ffn as f64, m.vocab as f64);
    let (q, kv) = (m.q_dim() as f64, m.kv_dim() as f64);
    let sizes = m.param_sizes();
    let mut ready = vec![0.0; sizes.len()];
    let mut c = 0.0;
    let last = sizes.len() - 1;
    c += 4.0 * t * h * v; // LM head: dX and dW
    let norm = if m.tied_embeddings { last } else { last - 1 };
    if !m.tied_embeddings {
        ready[last] = c;
    }
    ready[norm] = c;
    for l in (0..m.layers as usize).rev() {
        let base = 1 + 9 * l;
        if checkpoint {
            c += t * m.recompute_flops_per_token(seq) / m.layers as f64;
        }
        // down, up, gate
        for i in [8, 7, 6] {
            c += 4.0 * t * h * f;
            ready[base + i] = c;
        }
        ready[base + 5] = c; // post-attention norm
        c += 4.0 * t * h * q; // o_proj
        ready[base + 4] = c;
        c += 8.0 * t * q * seq as f64; // attention core (QKᵀ, PV) backward
        for i in [3, 2] {
            c += 4.0 * t * kv * h; // v, k
            ready[base + i] = c;
        }
        c += 4.0 * t * q * h; // q
        ready[base + 1] = c;
        ready[base] = c; // input norm
    }
    ready[0] = c; // embedding
    let scale = 1.0 / flops_per_s;
    (ready.iter().map(|r| r * scale).collect(), c * scale)
}

/// Buckets reduced on one stream in order, each launched once its gradients are final and the
/// previous one is launched: when the last one ends, and how far past `backward_s` that is.
pub fn overlap_tail(ready_and_time: &[(f64, f64)], backward_s: f64) -> (f64, f64) {
    let mut end: f64 = 0.0;
    for &(ready, time) in ready_and_time {
        end = end.max(ready) + time;
    }
    (end, (end - backward_s).max(0.0))
}

pub fn plan(input: &PlanInput) -> Result<Plan> {
    let micro_steps = micro_steps(input)?;
    ensure!(input.mfu > 0.0 && input.mfu <= 1.0, "the MFU must be in (0, 1], got {}", input.mfu);
    ensure!(input.links.gpus_per_node >= 1, "gpus per node must be at least 1");
    let m = &input.model;
    let p = input.precision;
    let n = input.world;
    let rate = input.mfu * input.card.peak_flops;
    let tokens = input.micro_batch * input.seq;

    // Compute.
    let model_fpt = m.model_flops_per_token(input.seq);
    let executed_fpt = model_fpt + if input.checkpoint_layers { m.recompute_flops_per_token(input.seq) } else { 0.0 };
    let forward_flops = tokens as f64
        * (2.0 * m.non_embedding_params() as f64
            + 4.0 * (m.layers * m.q_dim() * input.seq) as f64
            + 2.0 * (m.hidden * m.vocab) as f64);
    let forward_s = forward_flops / rate;
    let (ready, backward_s) = backward_ready_times(m, tokens, input.seq, input.checkpoint_layers, rate);
    let compute_s = micro_steps as f64 * (forward_s + backward_s);

    // Communication.
    let buckets = bucket_layout(&m.param_sizes(), input.bucket_elems, n);
    let reduced_elems: u64 = buckets.iter().map(|b| b.padded as u64).sum();
    let payload = step_payload(input.stage, reduced_elems, n, micro_steps, p.grad_bytes(), p.param_bytes());
    let links = &input.links;
    let grad_kind = if input.stage.shards_optimizer() { Collective::ReduceScatter } else { Collective::AllReduce };
    let schedule: Vec<(f64, f64)> = buckets
        .iter()
        .map(|b| {
            let r = b.params.iter().map(|&i| ready[i]).fold(0.0, f64::max);
            (r, links.collective_time(grad_kind, ((b.padded as u64) * p.grad_bytes()) as f64, n))
        })
        .collect();
    let per_reduction: f64 = schedule.iter().map(|s| s.1).sum();
    let (_, tail) = overlap_tail(&schedule, backward_s);
    let reductions = if input.stage.shards_gradients() { micro_steps } else { 1 };
    let mut rows = vec![CommRow {
        what: "gradients".into(),
        kind: if grad_kind == Collective::AllReduce { "all-reduce" } else { "reduce-scatter" }.into(),
        calls: reductions * buckets.len() as u64,
        payload: payload.all_reduce + payload.reduce_scatter,
        wire: reductions as f64 * ring_wire_bytes(grad_kind, (reduced_elems * p.grad_bytes()) as f64, n),
        time_s: reductions as f64 * per_reduction,
        // The engine waits for a reduction's buckets at the end of its micro-step.
        exposed_s: reductions as f64 * tail,
    }];
    if input.stage.shards_optimizer() {
        let time: f64 = buckets
            .iter()
            .map(|b| links.collective_time(Collective::AllGather, ((b.padded as u64) * p.param_bytes()) as f64, n))
            .sum();
        rows.push(CommRow {
            what: "parameters".into(),
            kind: "all-gather".into(),
            calls: buckets.len() as u64,
            payload: payload.all_gather,
            wire: ring_wire_bytes(Collective::AllGather, payload.all_gather as f64, n),
            time_s: time,
            // Issued after the update and waited for before the next forward: nothing to hide it.
            exposed_s: time,
        });
    }
    // Target-token count and loss sum (and the squared gradient norm when sharded): blocking.
    let scalar_calls = if input.stage.shards_optimizer() { 3 } else { 2 };
    let scalar_time = scalar_calls as f64 * links.collective_time(Collective::AllReduce, 8.0, n);
    rows.push(CommRow {
        what: "scalars".into(),
        kind: "all-reduce".into(),
        calls: scalar_calls,
        payload: 0,
        wire: 0.0,
        time_s: scalar_time,
        exposed_s: scalar_time,
    });
    let total_s: f64 = rows.iter().map(|r| r.time_s).sum();
    let exposed_s: f64 = rows.iter().map(|r| r.exposed_s).sum();
    let (bandwidth, bottleneck) = links.ring_bandwidth(n);
    let comm = Comm {
        reduced_elems,
        buckets: buckets.len() as u64,
        largest_bucket: buckets.iter().map(|b| b.padded as u64).max().unwrap_or(0),
        bandwidth_bytes_per_s: bandwidth,
        bottleneck,
        payload: payload.into(),
        rows,
        total_s,
        exposed_s,
    };

    // The update: AdamW over this rank's part, HBM-bound: read the gradient twice (norm, update),
    // read and write master and moments, write the working parameter.
    let updated = if input.stage.shards_optimizer() { reduced_elems / n.max(1) } else { m.total_params() };
    let optimizer_s = (updated * (2 * p.grad_bytes() + 24 + p.param_bytes())) as f64
        / (OPTIMIZER_HBM_EFFICIENCY * input.card.hbm_bytes_per_s);

    let step_s = compute_s + optimizer_s + exposed_s;
    let tokens_per_rank = micro_steps * tokens;
    let timing = Timing {
        micro_steps,
        tokens_per_rank,
        model_flops_per_token: model_fpt,
        executed_flops_per_token: executed_fpt,
        forward_s,
        backward_s,
        compute_s,
        optimizer_s,
        exposed_comm_s: exposed_s,
        step_s,
        exposed_share: exposed_s / step_s,
        tokens_per_s_per_gpu: tokens_per_rank as f64 / step_s,
        mfu: tokens_per_rank as f64 * model_fpt / step_s / input.card.peak_flops,
    };
    Ok(Plan {
        input: input.clone(),
        total_params: m.total_params(),
        non_embedding_params: m.non_embedding_params(),
        memory: memory(input, input.micro_batch),
        comm,
        timing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(stage: ZeroStage, world: u64) -> PlanInput {
        let card = Card::h100();
        PlanInput {
            model: ModelShape::llama2_7b(),
            world,
            stage,
            micro_batch: 1,
            seq: 4096,
            global_batch_tokens: 512 * 4096,
            precision: Precision::Bf16,
            checkpoint_layers: false,
            links: card.default_links(8),
            card,
            mfu: 0.45,
            bucket_elems: 8 << 20, // 32 MiB of f32: the trainer's parallel.bucket_mib default
            reserve_bytes: 0,
        }
    }

    #[test]
    fn zero_stage_parses_and_prints_as_digits() {
        for s in ZeroStage::ALL {
            assert_eq!(s.to_string().parse::<ZeroStage>().unwrap(), s);
        }
        assert_eq!("ZeRO-2".parse::<ZeroStage>().unwrap(), ZeroStage::Zero2);
        assert_eq!("zero1".parse::<ZeroStage>().unwrap(), ZeroStage::Zero1);
        assert!("3".parse::<ZeroStage>().is_err());
        assert_eq!(ZeroStage::Zero1.to_string(), "1");
    }

    #[test]
    fn preset_parameter_counts_match_the_published_models() {
        assert_eq!(ModelShape::llama2_7b().total_params(), 6_738_415_616);
        let colossal = ModelShape { vocab: 69_104, ..ModelShape::llama2_7b() };
        assert_eq!(colossal.total_params(), 7_042_371_584);
        assert_eq!(ModelShape::smollm2_135m().total_params(), 134_515_008);
        let m = ModelShape::llama2_7b();
        assert_eq!(m.param_sizes().iter().sum::<u64>(), m.total_params());
        assert_eq!(m.param_sizes().len(), 1 + 9 * 32 + 2);
    }

    #[test]
    fn step_payload_follows_the_engine_schedule() {
        let (e, n, k) = (1_000, 4, 3);
        let z0 = step_payload(ZeroStage::Zero0, e, n, k, 4, 4);
        assert_eq!(z0, TrafficCount { all_reduce: 4_000, ..Default::default() });
        let z1 = step_payload(ZeroStage::Zero1, e, n, k, 2, 2);
        assert_eq!(z1, TrafficCount { reduce_scatter: 2_000, all_gather: 2_000, ..Default::default() });
        let z2 = step_payload(ZeroStage::Zero2, e, n, k, 4, 2);
        assert_eq!(z2, TrafficCount { reduce_scatter: 12_000, all_gather: 2_000, ..Default::default() });
        // One micro-step: ZeRO-1 and ZeRO-2 send the same.
        assert_eq!(step_payload(ZeroStage::Zero2, e, n, 1, 4, 4), step_payload(ZeroStage::Zero1, e, n, 1, 4, 4));
        // World 1: the same formulas.
        assert_eq!(step_payload(ZeroStage::Zero1, 10, 1, 2, 4, 4).all_gather, 40);
        assert_eq!(step_calls(ZeroStage::Zero0, 5, 3), 5);
        assert_eq!(step_calls(ZeroStage::Zero1, 5, 3), 10);
        assert_eq!(step_calls(ZeroStage::Zero2, 5, 3), 20);
    }

    #[test]
    fn bucket_layout_follows_the_backward_and_pads_to_the_world() {
        let sizes = [10, 3, 7, 5, 1, 9];
        for world in 1..=4 {
            let b = bucket_layout(&sizes, 8, world);
            let order: Vec<Vec<usize>> = b.iter().map(|b| b.params.clone()).collect();
            assert_eq!(order, vec![vec![5], vec![4, 3, 2], vec![1, 0]]);
            assert!(b
                .iter()
                .all(|b| b.padded % world as usize == 0 && b.padded >= b.len && b.padded < b.len + world as usize));
            assert_eq!(b.iter().map(|b| b.len as u64).sum::<u64>(), 35);
        }
        // 7B: every size is a multiple of 64, so nothing is padded at 64 ranks.
        let m = ModelShape::llama2_7b();
        let b = bucket_layout(&m.param_sizes(), 50_000_000, 64);
        assert_eq!(b.iter().map(|b| b.padded as u64).sum::<u64>(), m.total_params());
    }

    #[test]
    fn ring_factors_vanish_at_one_rank_and_approach_the_payload() {
        for kind in [Collective::AllReduce, Collective::ReduceScatter, Collective::AllGather, Collective::Broadcast] {
            assert_eq!(ring_wire_bytes(kind, 1e9, 1), 0.0);
            assert_eq!(ring_steps(kind, 1), 0);
        }
        assert_eq!(ring_wire_bytes(Collective::AllReduce, 64.0, 2), 64.0);
        assert_eq!(ring_wire_bytes(Collective::AllReduce, 64.0, 64), 126.0);
        assert_eq!(ring_wire_bytes(Collective::ReduceScatter, 64.0, 64), 63.0);
        assert_eq!(ring_wire_bytes(Collective::AllGather, 64.0, 8), 56.0);
        assert_eq!(ring_steps(Collective::AllReduce, 64), 126);
        let links = Card::h100().default_links(8);
        assert_eq!(links.collective_time(Collective::AllReduce, 1e9, 1), 0.0);
        // NCCL's latency: 64 ranks on 8 nodes, reduce-scatter: 8.4 + 56 · 3.4 + 7 · 9.6 µs.
        assert!((links.latency_s(Collective::ReduceScatter, 64) - 266.0e-6).abs() < 1e-9);
        assert!((links.latency_s(Collective::AllReduce, 64) - 523.6e-6).abs() < 1e-9);
        assert!((links.latency_s(Collective::AllGather, 8) - (8.4 + 7.0 * 3.4) * 1e-6).abs() < 1e-9);
    }

    #[test]
    fn ring_bottleneck_is_nvlink_inside_a_node_and_the_node_nics_across() {
        let h = Card::h100().default_links(8);
        assert_eq!(h.ring_bandwidth(8), (370e9, Bottleneck::NvLink));
        // 8 × 400 Gb/s × 0.9 = 360 GB/s < 370.
        let (bw, which) = h.ring_bandwidth(64);
        assert!((bw - 360e9).abs() < 1.0 && which == Bottleneck::InfiniBand);
        // A800, 4 × 200 Gb/s: 90 GB/s; with 8 NICs 180 GB/s > NVLink's 160.
        let a = Card::a800().default_links(8);
        assert!((a.ring_bandwidth(64).0 - 90e9).abs() < 1.0);
        let a8 = Links { nics_per_node: 8, ..a.clone() };
        assert_eq!(a8.ring_bandwidth(64), (160e9, Bottleneck::NvLink));
        let share = Links { ib_per_gpu_share: true, ..h };
        assert!((share.ring_bandwidth(64).0 - 45e9).abs() < 1.0);
    }

    #[test]
    fn zero1_memory_of_7b_on_64_ranks_matches_hand_arithmetic() {
        let i = input(ZeroStage::Zero1, 64);
        let mem = memory(&i, 1);
        let psi: u64 = 6_738_415_616;
        assert_eq!(mem.params, 2 * psi); // 13.48 GB
        assert_eq!(mem.grads, 2 * psi);
        assert_eq!(mem.optimizer, 12 * psi / 64); // 1.26 GB
        assert_eq!(12 * psi / 64, 1_263_452_928);
        // Activations, bf16, one row of 4,096 tokens: (12h + 4kv + 6f) bytes + fp32 stats
        // (4·heads + 8) per token per layer, plus one layer's backward working set (2h + 3f).
        let per_layer = 4096 * (12 * 4096 + 4 * 4096 + 6 * 11008 + 4 * 32 + 8);
        assert_eq!(per_layer, 4096 * 131_720);
        assert_eq!(mem.activations, 32 * per_layer + 4096 * 2 * (2 * 4096 + 3 * 11008));
        assert_eq!(mem.head, 4096 * 2 * (2 * 4096 + 2 * 32000));
        let z0 = memory(&input(ZeroStage::Zero0, 64), 1);
        assert_eq!(z0.params + z0.grads + z0.optimizer, 16 * psi);
        assert!(!z0.fits && mem.fits);
    }

    #[test]
    fn zero2_shrinks_gradients_by_the_world_and_keeps_the_optimizer_shard() {
        for n in [2, 8, 64] {
            let z1 = memory(&input(ZeroStage::Zero1, n), 1);
            let z2 = memory(&input(ZeroStage::Zero2, n), 1);
            assert_eq!(z2.grads, z1.grads / n);
            assert_eq!(z2.optimizer, z1.optimizer);
            assert_eq!(z2.params, z1.params);
        }
        // fp32 (the engine today): ZeRO-0 keeps 8 bytes of moments, a shard 12 of master + moments.
        let f0 = memory(&PlanInput { precision: Precision::Fp32, ..input(ZeroStage::Zero0, 2) }, 1);
        assert_eq!(f0.optimizer, 8 * 6_738_415_616);
        assert_eq!(f0.params, 4 * 6_738_415_616);
    }

    #[test]
    fn checkpointing_keeps_one_layer_input_per_layer() {
        let i = input(ZeroStage::Zero1, 64);
        let full = memory(&i, 1);
        let ckpt = memory(&PlanInput { checkpoint_layers: true, ..i }, 1);
        let layer = 4096 * 131_720;
        let scratch = 4096 * 2 * (2 * 4096 + 3 * 11008);
        assert_eq!(ckpt.activations, 32 * 4096 * 4096 * 2 + layer + scratch);
        assert!(ckpt.max_micro_batch > full.max_micro_batch);
    }

    #[test]
    fn flops_per_token_follow_the_6n_rule_plus_attention_and_head() {
        let m = ModelShape::llama2_7b();
        let n = 32 * 202_383_360 + 4096;
        assert_eq!(m.non_embedding_params(), n);
        let want = 6.0 * n as f64 + 12.0 * 32.0 * 4096.0 * 4096.0 + 6.0 * 4096.0 * 32000.0;
        assert_eq!(m.model_flops_per_token(4096), want);
        // The backward timeline is 2/3 of the model FLOPs (the forward the other third).
        let (ready, bwd) = backward_ready_times(&m, 1, 4096, false, 1.0);
        let fwd = 2.0 * n as f64 + 4.0 * 32.0 * 4096.0 * 4096.0 + 2.0 * 4096.0 * 32000.0;
        assert!((bwd / (fwd + bwd) - 2.0 / 3.0).abs() < 1e-4);
        // The LM head is final first, the embedding last, layer 31 before layer 0.
        assert!(ready[ready.len() - 1] < ready[1 + 9 * 31] && ready[1 + 9 * 31] < ready[1] && ready[0] == bwd);
    }

    #[test]
    fn overlap_hides_all_but_the_last_bucket_on_fast_links() {
        // Four buckets ready at 1, 2, 3, 4 s of a 4 s backward.
        let fast: Vec<(f64, f64)> = (1..=4).map(|i| (i as f64, 0.5)).collect();
        assert_eq!(overlap_tail(&fast, 4.0), (4.5, 0.5));
        // Slow links: the comm stream falls behind; 4 × 2 s starting at 1 s end at 9 s.
        let slow: Vec<(f64, f64)> = (1..=4).map(|i| (i as f64, 2.0)).collect();
        assert_eq!(overlap_tail(&slow, 4.0), (9.0, 5.0));
    }

    #[test]
    fn plan_of_7b_on_64_h100s_reports_traffic_and_a_small_exposed_share() {
        for stage in ZeroStage::ALL {
            let p = plan(&input(stage, 64)).unwrap();
            assert_eq!(p.timing.micro_steps, 8);
            let g = 2 * 6_738_415_616u64;
            let want = step_payload(stage, 6_738_415_616, 64, 8, 2, 2);
            assert_eq!(p.comm.payload, Payload::from(want));
            let grads = &p.comm.rows[0];
            assert_eq!(grads.payload, if stage == ZeroStage::Zero2 { 8 * g } else { g });
            assert!(
                p.timing.exposed_share > 0.0 && p.timing.exposed_share < 0.05,
                "{stage:?}: {}",
                p.timing.exposed_share
            );
            assert!(p.comm.exposed_s <= p.comm.total_s + 1e-12);
        }
        // World 1: no communication at all, same compute.
        let one = plan(&PlanInput { global_batch_tokens: 8 * 4096, ..input(ZeroStage::Zero1, 1) }).unwrap();
        assert_eq!(one.comm.total_s, 0.0);
        assert!(plan(&PlanInput { global_batch_tokens: 1000, ..input(ZeroStage::Zero1, 64) }).is_err());
    }
}

/// The payload formula against what the MPI communicator counts, for the engine's schedule
/// (src/dist.rs: buckets launched in order, waited for at the end of each reducing micro-step,
/// then one all-gather per bucket). Needs ranks: build with `--features mpi`, then
/// `mpirun -np 3 <test binary> --ignored --exact plan::mpi_check::traffic_matches_step_payload`.
#[cfg(all(test, feature = "mpi"))]
mod mpi_check {
    use super::*;
    use crate::mpi::Mpi;
    use crate::Communicator;
    use std::time::Duration;

    #[test]
    #[ignore = "run under mpirun with 2 or more ranks"]
    fn traffic_matches_step_payload() {
        let comm = Mpi::init(Duration::from_secs(60)).unwrap();
        let n = comm.world_size() as u64;
        assert!(n >= 2, "run under mpirun -np N with N ≥ 2");
        // Vocabulary 1,001 and norms of 64: buckets that need padding at 3 ranks.
        let model = ModelShape {
            name: "tiny".into(),
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            ffn: 176,
            vocab: 1001,
            tied_embeddings: false,
        };
        let buckets = bucket_layout(&model.param_sizes(), 10_000, n);
        let reduced: u64 = buckets.iter().map(|b| b.padded as u64).sum();
        let micro_steps = 3;
        for stage in ZeroStage::ALL {
            let before = comm.traffic();
            for j in 0..micro_steps {
                if !(j + 1 == micro_steps || stage.shards_gradients()) {
                    continue; // local accumulation only
                }
                let pending: Vec<_> = buckets
                    .iter()
                    .map(|b| {
                        let flat = vec![1f32; (b.padded as u64) as usize];
                        if stage.shards_optimizer() {
                            comm.reduce_scatter(flat)
                        } else {
                            comm.all_reduce(flat)
                        }
                    })
                    .collect();
                for (b, p) in buckets.iter().zip(pending) {
                    let r = p.wait().unwrap();
                    assert_eq!(
                        r.len() as u64,
                        if stage.shards_optimizer() { (b.padded as u64) / n } else { b.padded as u64 }
                    );
                    assert!(r.iter().all(|&x| x == n as f32));
                }
            }
            if stage.shards_optimizer() {
                let pending: Vec<_> = buckets
                    .iter()
                    .map(|b| comm.all_gather(vec![comm.rank() as f32; ((b.padded as u64) / n) as usize]))
                    .collect();
                for (b, p) in buckets.iter().zip(pending) {
                    assert_eq!(p.wait().unwrap().len() as u64, (b.padded as u64));
                }
            }
            let after = comm.traffic();
            let counted = TrafficCount {
                all_reduce: after.all_reduce - before.all_reduce,
                reduce_scatter: after.reduce_scatter - before.reduce_scatter,
                all_gather: after.all_gather - before.all_gather,
                broadcast: after.broadcast - before.broadcast,
                calls: 0,
            };
            assert_eq!(counted, step_payload(stage, reduced, n, micro_steps, 4, 4), "{stage:?} at {n} ranks");
            assert_eq!(after.calls - before.calls, step_calls(stage, buckets.len() as u64, micro_steps));
            if comm.rank() == 0 {
                eprintln!(
                    "{} at {n} ranks: counted {counted:?} = step_payload ({} buckets, {reduced} elements)",
                    stage.label(),
                    buckets.len()
                );
            }
        }
    }
}
