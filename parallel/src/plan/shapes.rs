//! Model shapes, precision, cards (part of the `plan` model; see mod.rs).

use super::*;

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
    /// Gradients are reduced and kept in f32 in both precisions, as the engine does (dist.rs:
    /// bf16 gradients would lose the small updates of a long run).
    pub fn grad_bytes(self) -> u64 {
        4
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
