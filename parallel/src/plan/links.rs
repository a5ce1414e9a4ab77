//! Ring collectives and links (part of the `plan` model; see mod.rs).

use super::*;

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
