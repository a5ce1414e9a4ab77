//! The plan (part of the `plan` model; see mod.rs).

use super::*;

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
    /// After the backward (ZeRO-1/2): parameters, optimizer state, and the gradient shard (during
    /// the update) or two gathered buckets (after it), whichever is larger.
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
    // The engine gathers two buckets at a time, each cut into the parameters before the next but
    // one goes out, after the gradient shards are dropped.
    let update_peak = if input.stage.shards_optimizer() {
        params + optimizer + (shard * p.grad_bytes()).max(2 * largest * p.param_bytes()) + reserve
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
    let compute = Compute::new(input, micro_steps);
    let comm = comm(input, micro_steps, &compute);
    let optimizer_s = optimizer_time(input, comm.reduced_elems);
    let timing = timing(input, micro_steps, &compute, optimizer_s, comm.exposed_s);
    Ok(Plan {
        input: input.clone(),
        total_params: m.total_params(),
        non_embedding_params: m.non_embedding_params(),
        memory: memory(input, input.micro_batch),
        comm,
        timing,
    })
}

/// One micro-step's compute at the executed rate, which the communication has to hide behind.
struct Compute {
    model_fpt: f64,
    executed_fpt: f64,
    forward_s: f64,
    /// When each parameter's gradient is final in the backward ([`backward_ready_times`]).
    ready: Vec<f64>,
    backward_s: f64,
    /// All micro-steps of the optimizer step.
    compute_s: f64,
}

impl Compute {
    /// The forward and backward of one micro-step at `input.mfu` of the card's peak.
    fn new(input: &PlanInput, micro_steps: u64) -> Self {
        let m = &input.model;
        let rate = input.mfu * input.card.peak_flops;
        let tokens = input.micro_batch * input.seq;
        let model_fpt = m.model_flops_per_token(input.seq);
        let executed_fpt =
            model_fpt + if input.checkpoint_layers { m.recompute_flops_per_token(input.seq) } else { 0.0 };
        let forward_flops = tokens as f64
            * (2.0 * m.non_embedding_params() as f64
                + 4.0 * (m.layers * m.q_dim() * input.seq) as f64
                + 2.0 * (m.hidden * m.vocab) as f64);
        let forward_s = forward_flops / rate;
        let (ready, backward_s) = backward_ready_times(m, tokens, input.seq, input.checkpoint_layers, rate);
        let compute_s = micro_steps as f64 * (forward_s + backward_s);
        Compute { model_fpt, executed_fpt, forward_s, ready, backward_s, compute_s }
    }
}

/// One rank's collectives per step, and how much of them the backward does not hide.
fn comm(input: &PlanInput, micro_steps: u64, compute: &Compute) -> Comm {
    let p = input.precision;
    let n = input.world;
    let buckets = bucket_layout(&input.model.param_sizes(), input.bucket_elems, n);
    let reduced_elems: u64 = buckets.iter().map(|b| b.padded as u64).sum();
    let payload = step_payload(input.stage, reduced_elems, n, micro_steps, p.grad_bytes(), p.param_bytes());
    let mut rows =
        vec![gradient_row(input, micro_steps, compute, &buckets, payload.all_reduce + payload.reduce_scatter)];
    if input.stage.shards_optimizer() {
        rows.push(parameter_row(input, &buckets, payload.all_gather));
    }
    rows.push(scalar_row(input));
    let total_s: f64 = rows.iter().map(|r| r.time_s).sum();
    let exposed_s: f64 = rows.iter().map(|r| r.exposed_s).sum();
    let (bandwidth, bottleneck) = input.links.ring_bandwidth(n);
    Comm {
        reduced_elems,
        buckets: buckets.len() as u64,
        largest_bucket: buckets.iter().map(|b| b.padded as u64).max().unwrap_or(0),
        bandwidth_bytes_per_s: bandwidth,
        bottleneck,
        payload: payload.into(),
        rows,
        total_s,
        exposed_s,
    }
}

/// The gradient reductions: each bucket launched once its gradients are final in the backward.
fn gradient_row(
    input: &PlanInput,
    micro_steps: u64,
    compute: &Compute,
    buckets: &[crate::buckets::Bucket],
    payload: u64,
) -> CommRow {
    let p = input.precision;
    let n = input.world;
    let reduced_elems: u64 = buckets.iter().map(|b| b.padded as u64).sum();
    let grad_kind = if input.stage.shards_optimizer() { Collective::ReduceScatter } else { Collective::AllReduce };
    let schedule: Vec<(f64, f64)> = buckets
        .iter()
        .map(|b| {
            let r = b.params.iter().map(|&i| compute.ready[i]).fold(0.0, f64::max);
            (r, input.links.collective_time(grad_kind, ((b.padded as u64) * p.grad_bytes()) as f64, n))
        })
        .collect();
    let per_reduction: f64 = schedule.iter().map(|s| s.1).sum();
    let (_, tail) = overlap_tail(&schedule, compute.backward_s);
    let reductions = if input.stage.shards_gradients() { micro_steps } else { 1 };
    CommRow {
        what: "gradients".into(),
        kind: if grad_kind == Collective::AllReduce { "all-reduce" } else { "reduce-scatter" }.into(),
        calls: reductions * buckets.len() as u64,
        payload,
        wire: reductions as f64 * ring_wire_bytes(grad_kind, (reduced_elems * p.grad_bytes()) as f64, n),
        time_s: reductions as f64 * per_reduction,
        // The engine waits for a reduction's buckets at the end of its micro-step.
        exposed_s: reductions as f64 * tail,
    }
}

/// The all-gather of the updated parameters after a sharded update (ZeRO-1/2).
fn parameter_row(input: &PlanInput, buckets: &[crate::buckets::Bucket], payload: u64) -> CommRow {
    let n = input.world;
    let time: f64 = buckets
        .iter()
        .map(|b| {
            input.links.collective_time(
                Collective::AllGather,
                ((b.padded as u64) * input.precision.param_bytes()) as f64,
                n,
            )
        })
        .sum();
    CommRow {
        what: "parameters".into(),
        kind: "all-gather".into(),
        calls: buckets.len() as u64,
        payload,
        wire: ring_wire_bytes(Collective::AllGather, payload as f64, n),
        time_s: time,
        // Issued after the update and waited for before the next forward: nothing to hide it.
        exposed_s: time,
    }
}

/// The blocking scalar all-reduces of a step.
fn scalar_row(input: &PlanInput) -> CommRow {
    // Target-token count and loss sum (and the squared gradient norm when sharded): blocking.
    let scalar_calls = if input.stage.shards_optimizer() { 3 } else { 2 };
    let scalar_time = scalar_calls as f64 * input.links.collective_time(Collective::AllReduce, 8.0, input.world);
    CommRow {
        what: "scalars".into(),
        kind: "all-reduce".into(),
        calls: scalar_calls,
        payload: 0,
        wire: 0.0,
        time_s: scalar_time,
        exposed_s: scalar_time,
    }
}

/// The AdamW update's time: memory-bound, so bytes moved over the achievable HBM bandwidth.
fn optimizer_time(input: &PlanInput, reduced_elems: u64) -> f64 {
    let p = input.precision;
    // The update: AdamW over this rank's part, HBM-bound: read the gradient twice (norm, update),
    // read and write master and moments, write the working parameter.
    let updated =
        if input.stage.shards_optimizer() { reduced_elems / input.world.max(1) } else { input.model.total_params() };
    (updated * (2 * p.grad_bytes() + 24 + p.param_bytes())) as f64
        / (OPTIMIZER_HBM_EFFICIENCY * input.card.hbm_bytes_per_s)
}

/// The step's time and throughput from its compute, update and exposed communication.
fn timing(input: &PlanInput, micro_steps: u64, compute: &Compute, optimizer_s: f64, exposed_s: f64) -> Timing {
    let step_s = compute.compute_s + optimizer_s + exposed_s;
    let tokens_per_rank = micro_steps * (input.micro_batch * input.seq);
    Timing {
        micro_steps,
        tokens_per_rank,
        model_flops_per_token: compute.model_fpt,
        executed_flops_per_token: compute.executed_fpt,
        forward_s: compute.forward_s,
        backward_s: compute.backward_s,
        compute_s: compute.compute_s,
        optimizer_s,
        exposed_comm_s: exposed_s,
        step_s,
        exposed_share: exposed_s / step_s,
        tokens_per_s_per_gpu: tokens_per_rank as f64 / step_s,
        mfu: tokens_per_rank as f64 * compute.model_fpt / step_s / input.card.peak_flops,
    }
}
