//! zero-plan: per-rank memory, communication and the exposed share of a data-parallel ZeRO step
//! for a LLaMA shape on a GPU cluster. The model is `llama_cpt_parallel::plan`; the formulas and
//! the LLaMA-2-7B answer are in docs/parallel-plan.md.
//!
//!     zero-plan --model llama2-7b --vocab 69104 --world 64 --gpus-per-node 8 --stage 1 \
//!         --micro-batch 1 --seq 4096 --card a800 [--nics-per-node 8] [--checkpoint-layers] [--json]
#![warn(clippy::too_many_lines)] // no function over 80 code lines (clippy.toml)
use anyhow::{bail, Context, Result};
use clap::Parser;
use llama_cpt_parallel::plan::{self, Bottleneck, Card, ModelShape, Plan, PlanInput, Precision, ZeroStage, GIB};

#[derive(Parser, Debug)]
#[command(
    name = "zero-plan",
    about = "Per-rank memory, communication volume and time, and the exposed share of a ZeRO data-parallel step"
)]
struct Args {
    /// Model preset (llama2-7b, smollm2-135m) or "custom" (then give every shape flag).
    #[arg(long, default_value = "llama2-7b")]
    model: String,
    #[arg(long)]
    hidden: Option<u64>,
    #[arg(long)]
    layers: Option<u64>,
    #[arg(long)]
    heads: Option<u64>,
    #[arg(long)]
    kv_heads: Option<u64>,
    /// Default: hidden / heads.
    #[arg(long)]
    head_dim: Option<u64>,
    #[arg(long)]
    ffn: Option<u64>,
    /// Vocabulary size (e.g. 69104 for Colossal-LLaMA-2's extended LLaMA-2).
    #[arg(long)]
    vocab: Option<u64>,
    /// Tied input/output embeddings (true/false).
    #[arg(long)]
    tied: Option<bool>,

    /// Data-parallel ranks (GPUs).
    #[arg(long, default_value_t = 64)]
    world: u64,
    #[arg(long, default_value_t = 8)]
    gpus_per_node: u64,
    /// ZeRO stage: 0, 1, 2, or "all" (one plan per stage and a summary).
    #[arg(long, default_value = "1")]
    stage: String,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 1)]
    micro_batch: u64,
    #[arg(long, default_value_t = 4096)]
    seq: u64,
    /// Tokens per optimizer step over all ranks [default: 512 rows × seq, rounded up to a
    /// multiple of world × micro-batch × seq].
    #[arg(long)]
    global_batch_tokens: Option<u64>,
    /// bf16 (mixed precision: bf16 weights/grads/activations, fp32 master + AdamW moments) or
    /// fp32 (everything f32, as the engine runs today).
    #[arg(long, default_value = "bf16")]
    precision: String,
    /// Recompute every layer in the backward (keep only each layer's input).
    #[arg(long)]
    checkpoint_layers: bool,

    /// a800, a100 or h100 (memory, bf16 peak, HBM bandwidth and node defaults).
    #[arg(long, default_value = "a800")]
    card: String,
    /// Override the card's memory, GiB.
    #[arg(long)]
    mem_gib: Option<f64>,
    /// Override the card's dense bf16 peak, TFLOP/s.
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Override the card's HBM bandwidth, GB/s.
    #[arg(long)]
    hbm_gbs: Option<f64>,
    /// Bandwidth an NCCL ring achieves over NVLink, GB/s per GPU and direction [a800 160, a100
    /// 240, h100 370].
    #[arg(long)]
    nvlink_gbs: Option<f64>,
    /// InfiniBand line rate per NIC, Gb/s [a800/a100 200, h100 400].
    #[arg(long)]
    ib_gbps: Option<f64>,
    /// InfiniBand NICs per node [a800 4, a100/h100 8].
    #[arg(long)]
    nics_per_node: Option<u64>,
    /// Fraction of the IB line rate a collective achieves.
    #[arg(long, default_value_t = 0.9)]
    ib_efficiency: f64,
    /// Base latency of a collective, µs (NCCL's ring/Simple model).
    #[arg(long, default_value_t = 8.4)]
    base_latency_us: f64,
    /// Latency per ring step inside a node, µs.
    #[arg(long, default_value_t = 3.4)]
    nvlink_hop_us: f64,
    /// Latency per ring step between nodes, µs.
    #[arg(long, default_value_t = 9.6)]
    ib_hop_us: f64,
    /// Pessimistic inter-node bound: each GPU gets only nics × rate / gpus-per-node.
    #[arg(long)]
    ib_per_gpu_share: bool,

    /// Fraction of the peak achieved on the executed FLOPs (= MFU without recomputation).
    #[arg(long, default_value_t = 0.45)]
    mfu: f64,
    /// The trainer's gradient bucket size, MiB of f32 (`parallel.bucket_mib`; elements =
    /// MiB · 2²⁰ / 4, as the trainer converts it).
    #[arg(long, default_value_t = 32.0)]
    bucket_mib: f64,
    /// Memory not itemised (CUDA context, cuBLAS workspace, NCCL buffers, fragmentation), GiB.
    #[arg(long, default_value_t = 4.0)]
    reserve_gib: f64,
    /// Print the plan(s) as JSON.
    #[arg(long)]
    json: bool,
    /// Print only the one-line-per-stage summary.
    #[arg(long)]
    summary: bool,
}

fn model(a: &Args) -> Result<ModelShape> {
    let mut m = match ModelShape::preset(&a.model) {
        Some(m) => m,
        None if a.model == "custom" => {
            let need = |v: Option<u64>, flag: &str| v.with_context(|| format!("--model custom needs --{flag}"));
            let (hidden, heads) = (need(a.hidden, "hidden")?, need(a.heads, "heads")?);
            ModelShape {
                name: "custom".into(),
                hidden,
                layers: need(a.layers, "layers")?,
                heads,
                kv_heads: a.kv_heads.unwrap_or(heads),
                head_dim: a.head_dim.unwrap_or(hidden / heads.max(1)),
                ffn: need(a.ffn, "ffn")?,
                vocab: need(a.vocab, "vocab")?,
                tied_embeddings: a.tied.unwrap_or(false),
            }
        }
        None => bail!("unknown model {:?}: expected one of {:?} or custom", a.model, ModelShape::PRESETS),
    };
    let heads_changed = a.heads.is_some() || a.hidden.is_some();
    m.hidden = a.hidden.unwrap_or(m.hidden);
    m.layers = a.layers.unwrap_or(m.layers);
    m.heads = a.heads.unwrap_or(m.heads);
    m.kv_heads = a.kv_heads.unwrap_or(m.kv_heads);
    m.head_dim = a.head_dim.unwrap_or(if heads_changed { m.hidden / m.heads.max(1) } else { m.head_dim });
    m.ffn = a.ffn.unwrap_or(m.ffn);
    m.vocab = a.vocab.unwrap_or(m.vocab);
    m.tied_embeddings = a.tied.unwrap_or(m.tied_embeddings);
    if [m.hidden, m.layers, m.heads, m.kv_heads, m.head_dim, m.ffn, m.vocab].contains(&0) || m.heads % m.kv_heads != 0 {
        bail!("inconsistent model shape {m:?}: sizes must be positive and heads a multiple of kv-heads");
    }
    Ok(m)
}

fn inputs(a: &Args) -> Result<Vec<PlanInput>> {
    let model = model(a)?;
    let mut card = Card::preset(&a.card)
        .with_context(|| format!("unknown card {:?}: expected one of {:?}", a.card, Card::PRESETS))?;
    if let Some(g) = a.mem_gib {
        card.mem_bytes = (g * GIB) as u64;
    }
    if let Some(t) = a.peak_tflops {
        card.peak_flops = t * 1e12;
    }
    if let Some(h) = a.hbm_gbs {
        card.hbm_bytes_per_s = h * 1e9;
    }
    let mut links = card.default_links(a.gpus_per_node);
    links.nvlink_gbs = a.nvlink_gbs.unwrap_or(links.nvlink_gbs);
    links.ib_gbps = a.ib_gbps.unwrap_or(links.ib_gbps);
    links.nics_per_node = a.nics_per_node.unwrap_or(links.nics_per_node);
    links.ib_efficiency = a.ib_efficiency;
    links.base_latency_us = a.base_latency_us;
    links.nvlink_hop_us = a.nvlink_hop_us;
    links.ib_hop_us = a.ib_hop_us;
    links.ib_per_gpu_share = a.ib_per_gpu_share;
    let precision: Precision = a.precision.parse()?;
    let stages: Vec<ZeroStage> =
        if a.stage.eq_ignore_ascii_case("all") { ZeroStage::ALL.to_vec() } else { vec![a.stage.parse()?] };
    let per_micro = a.world.max(1) * a.micro_batch.max(1) * a.seq;
    let global_batch_tokens = a.global_batch_tokens.unwrap_or_else(|| (512 * a.seq).div_ceil(per_micro) * per_micro);
    Ok(stages
        .into_iter()
        .map(|stage| PlanInput {
            model: model.clone(),
            world: a.world,
            stage,
            micro_batch: a.micro_batch,
            seq: a.seq,
            global_batch_tokens,
            precision,
            checkpoint_layers: a.checkpoint_layers,
            card: card.clone(),
            links: links.clone(),
            mfu: a.mfu,
            bucket_elems: ((a.bucket_mib * 1024.0 * 1024.0 / 4.0) as u64).max(1),
            reserve_bytes: (a.reserve_gib * GIB) as u64,
        })
        .collect())
}

/// 1234567 → "1,234,567".
fn int(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn gib(b: u64) -> String {
    format!("{:.2}", b as f64 / GIB)
}

fn gb(b: f64) -> String {
    format!("{:.2} GB", b / 1e9)
}

fn time(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

/// The plan of one stage as a report: the setup, then memory, communication and time per step.
fn print(p: &Plan) {
    print_setup(p);
    println!();
    print_memory(p);
    println!();
    print_comm(p);
    print_ring(p);
    println!();
    print_time(p);
    println!();
    let (mem, t) = (&p.memory, &p.timing);
    println!(
        "Verdict: {} ({} of {} GiB at micro-batch {}); communication leaves {:.2}% of the step exposed.",
        if mem.fits { "fits" } else { "does NOT fit" },
        gib(mem.peak),
        gib(mem.card),
        p.input.micro_batch,
        t.exposed_share * 100.0
    );
}

/// "bf16" or "fp32", as the report names the precision.
fn precision_label(p: Precision) -> &'static str {
    match p {
        Precision::Bf16 => "bf16",
        Precision::Fp32 => "fp32",
    }
}

/// One row of the memory and time tables: what (and how), and a right-aligned value.
fn line(what: &str, how: &str, value: String) {
    println!("  {what:<18}{how:<56}{value:>10}");
}

/// The model's shape and size, and the stage, cluster and batch it runs with.
fn print_setup(p: &Plan) {
    let i = &p.input;
    let m = &i.model;
    let t = &p.timing;
    let n = i.world;
    println!(
        "{}: hidden {}, {} layers, {} heads ({} KV, head dim {}), FFN {}, vocab {}, {} embeddings",
        m.name,
        m.hidden,
        m.layers,
        m.heads,
        m.kv_heads,
        m.head_dim,
        m.ffn,
        int(m.vocab),
        if m.tied_embeddings { "tied" } else { "untied" }
    );
    println!(
        "  {} parameters ({} non-embedding); {:.1} GFLOP per token at {} (model FLOPs{})",
        int(p.total_params),
        int(p.non_embedding_params),
        t.model_flops_per_token / 1e9,
        int(i.seq),
        if i.checkpoint_layers {
            format!("; {:.1} executed with recomputation", t.executed_flops_per_token / 1e9)
        } else {
            String::new()
        }
    );
    println!(
        "{} on {} × {} ({} node{} × {}), {} {}, micro-batch {} × {}, {} micro-step{} (global batch {} tokens), checkpointing {}",
        i.stage.label(),
        n,
        i.card.name,
        i.links.nodes(n),
        if i.links.nodes(n) == 1 { "" } else { "s" },
        i.links.gpus_per_node.min(n),
        precision_label(i.precision),
        if i.precision == Precision::Bf16 { "mixed precision" } else { "throughout" },
        i.micro_batch,
        int(i.seq),
        t.micro_steps,
        if t.micro_steps == 1 { "" } else { "s" },
        int(i.global_batch_tokens),
        if i.checkpoint_layers { "on" } else { "off" }
    );
}

/// Per-rank memory by kind, the peaks, and whether (and up to which micro-batch) it fits.
fn print_memory(p: &Plan) {
    let i = &p.input;
    let m = &i.model;
    let mem = &p.memory;
    let n = i.world;
    let prec = precision_label(i.precision);
    let (pb, sb) = (i.precision.param_bytes(), i.precision.optimizer_bytes(i.stage));
    let shard = |k: u64| if k == 1 { "Ψ".to_string() } else { format!("Ψ/{n}") };
    let grad_div = if i.stage.shards_gradients() { n } else { 1 };
    let opt_div = if i.stage.shards_optimizer() { n } else { 1 };
    let opt_what = match (i.precision, i.stage) {
        (Precision::Fp32, ZeroStage::Zero0) => "fp32 AdamW m+v",
        _ => "fp32 master+m+v",
    };
    let rows_tok = format!("{} × {}", i.micro_batch, int(i.seq));
    println!("{:<76}{:>10}", "Per-rank memory", "GiB");
    line("parameters", &format!("{prec}, {pb}{}", shard(1)), gib(mem.params));
    let gb = i.precision.grad_bytes();
    line("gradients", &format!("fp32 (reduced in fp32), {gb}{}", shard(grad_div)), gib(mem.grads));
    line("optimizer", &format!("{opt_what}, {sb}{}", shard(opt_div)), gib(mem.optimizer));
    let act = if i.checkpoint_layers {
        format!("{} layer inputs + 1 layer, {rows_tok}", m.layers)
    } else {
        format!("{} layers, {rows_tok}", m.layers)
    };
    line("activations", &act, gib(mem.activations));
    line("logits and head", &format!("logits + gradient, final norm, {rows_tok}"), gib(mem.head));
    line("gradient buckets", "2 in flight", gib(mem.buckets));
    line("reserve", "context, workspace, NCCL, fragmentation", gib(mem.reserve));
    line("peak (backward)", &format!("of {} GiB", gib(mem.card)), gib(mem.backward_peak));
    if i.stage.shards_optimizer() {
        line("peak (update)", "params, optimizer, gradient shard or 2 gathered buckets", gib(mem.update_peak));
    }
    println!(
        "  → {}; largest micro-batch that fits: {}",
        if mem.fits { "fits" } else { "does NOT fit" },
        if mem.max_micro_batch == 0 { "none".to_string() } else { mem.max_micro_batch.to_string() }
    );
}

/// One rank's collectives per step: calls, bytes, time and the exposed part, and their total.
fn print_comm(p: &Plan) {
    println!(
        "{:<34}{:>8}{:>10}{:>10}{:>10}{:>10}",
        "Per-step communication (one rank)", "calls", "payload", "wire", "time", "exposed"
    );
    for r in &p.comm.rows {
        let (pay, wire) =
            if r.what == "scalars" { ("-".to_string(), "-".to_string()) } else { (gb(r.payload as f64), gb(r.wire)) };
        println!(
            "  {:<12}{:<20}{:>8}{:>10}{:>10}{:>10}{:>10}",
            r.what,
            r.kind,
            int(r.calls),
            pay,
            wire,
            time(r.time_s),
            time(r.exposed_s)
        );
    }
    println!(
        "  {:<32}{:>8}{:>10}{:>10}{:>10}{:>10}",
        "total",
        "",
        "",
        "",
        time(p.comm.total_s),
        time(p.comm.exposed_s)
    );
}

/// What bounds the ring (NVLink or InfiniBand), its latency model, and the bucketing.
fn print_ring(p: &Plan) {
    let i = &p.input;
    let n = i.world;
    let l = &i.links;
    let bw = p.comm.bandwidth_bytes_per_s / 1e9;
    if n <= 1 {
        println!("  one rank: no communication");
    } else if !l.crosses_nodes(n) {
        println!("  ring bottleneck: NVLink, {bw:.0} GB/s per GPU");
        println!("  latency: {} µs + {} µs per ring step", l.base_latency_us, l.nvlink_hop_us);
    } else {
        let which = match p.comm.bottleneck {
            Bottleneck::InfiniBand => "InfiniBand",
            Bottleneck::NvLink => "NVLink",
        };
        println!(
            "  ring bottleneck: {which}, {bw:.0} GB/s (IB {} × {} Gb/s × {:.2} = {:.0} GB/s per node{}; NVLink ring {} GB/s)",
            l.nics_per_node,
            l.ib_gbps,
            l.ib_efficiency,
            l.ib_node_bytes_per_s() / 1e9,
            if l.ib_per_gpu_share { format!(", ÷ {} GPUs (per-GPU share)", l.gpus_per_node) } else { String::new() },
            l.nvlink_gbs
        );
        println!(
            "  latency: {} µs + {} µs per NVLink ring step + {} µs per inter-node step",
            l.base_latency_us, l.nvlink_hop_us, l.ib_hop_us
        );
    }
    println!(
        "  {} buckets of ≥ {} elements; {} elements per reduction",
        p.comm.buckets,
        int(i.bucket_elems),
        int(p.comm.reduced_elems)
    );
}

/// The step's time by part (compute, update, exposed communication) and its throughput.
fn print_time(p: &Plan) {
    let i = &p.input;
    let t = &p.timing;
    println!("Per-step time");
    let compute = format!(
        "{} × (fwd {} + bwd {}) at {:.0}% of {:.0} TFLOP/s",
        t.micro_steps,
        time(t.forward_s),
        time(t.backward_s),
        i.mfu * 100.0,
        i.card.peak_flops / 1e12
    );
    line("compute", &compute, time(t.compute_s));
    let updated = if i.stage.shards_optimizer() { p.comm.reduced_elems / i.world.max(1) } else { p.total_params };
    line("optimizer", &format!("AdamW over {} parameters, HBM-bound", int(updated)), time(t.optimizer_s));
    line("communication", &format!("exposed, of {} in total", time(p.comm.total_s)), time(t.exposed_comm_s));
    line("step", "", time(t.step_s));
    println!(
        "  → {} tokens/s per GPU, MFU {:.1}%, exposed communication {:.2}% of the step",
        int(t.tokens_per_s_per_gpu.round() as u64),
        t.mfu * 100.0,
        t.exposed_share * 100.0
    );
}

/// One line per stage: memory (GiB), communication and time per step.
fn summary(plans: &[Plan]) {
    println!("Summary (memory in GiB per rank; times per step)");
    println!(
        "{:<7}{:>7}{:>7}{:>7}{:>7}{:>7}{:>7}  {:<5}{:>6}{:>10}{:>10}{:>9}{:>9}{:>11}",
        "stage",
        "params",
        "grads",
        "optim",
        "activ",
        "other",
        "peak",
        "fits",
        "max b",
        "comm",
        "exposed",
        "step",
        "exposed",
        "tok/s"
    );
    for p in plans {
        let m = &p.memory;
        println!(
            "{:<7}{:>7}{:>7}{:>7}{:>7}{:>7}{:>7}  {:<5}{:>6}{:>10}{:>10}{:>9}{:>8.2}%{:>11}",
            p.input.stage.label(),
            gib(m.params),
            gib(m.grads),
            gib(m.optimizer),
            gib(m.activations + m.head),
            gib(m.buckets + m.reserve),
            gib(m.peak),
            if m.fits { "yes" } else { "no" },
            m.max_micro_batch,
            time(p.comm.total_s),
            time(p.comm.exposed_s),
            time(p.timing.step_s),
            p.timing.exposed_share * 100.0,
            int(p.timing.tokens_per_s_per_gpu.round() as u64)
        );
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let plans = inputs(&args)?.iter().map(plan::plan).collect::<Result<Vec<Plan>>>()?;
    if args.json {
        let out = if plans.len() == 1 {
            serde_json::to_string_pretty(&plans[0])?
        } else {
            serde_json::to_string_pretty(&plans)?
        };
        println!("{out}");
        return Ok(());
    }
    if args.summary {
        summary(&plans);
        return Ok(());
    }
    for (k, p) in plans.iter().enumerate() {
        if k > 0 {
            println!("\n{}\n", "-".repeat(96));
        }
        print(p);
    }
    if plans.len() > 1 {
        println!("\n{}\n", "-".repeat(96));
        summary(&plans);
    }
    Ok(())
}
