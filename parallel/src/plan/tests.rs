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
    assert_eq!(mem.grads, 4 * psi); // f32, as the engine reduces them
    assert_eq!(mem.optimizer, 12 * psi / 64); // 1.26 GB
    assert_eq!(12 * psi / 64, 1_263_452_928);
    // Activations, bf16, one row of 4,096 tokens: (12h + 4kv + 6f) bytes + fp32 stats
    // (4·heads + 8) per token per layer, plus one layer's backward working set (2h + 3f).
    let per_layer = 4096 * (12 * 4096 + 4 * 4096 + 6 * 11008 + 4 * 32 + 8);
    assert_eq!(per_layer, 4096 * 131_720);
    assert_eq!(mem.activations, 32 * per_layer + 4096 * 2 * (2 * 4096 + 3 * 11008));
    assert_eq!(mem.head, 4096 * 2 * (2 * 4096 + 2 * 32000));
    let z0 = memory(&input(ZeroStage::Zero0, 64), 1);
    assert_eq!(z0.params + z0.grads + z0.optimizer, 18 * psi);
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
        let g = 4 * 6_738_415_616u64;
        let want = step_payload(stage, 6_738_415_616, 64, 8, 4, 2);
        assert_eq!(p.comm.payload, Payload::from(want));
        let grads = &p.comm.rows[0];
        assert_eq!(grads.payload, if stage == ZeroStage::Zero2 { 8 * g } else { g });
        assert!(p.timing.exposed_share > 0.0 && p.timing.exposed_share < 0.05, "{stage:?}: {}", p.timing.exposed_share);
        assert!(p.comm.exposed_s <= p.comm.total_s + 1e-12);
    }
    // World 1: no communication at all, same compute.
    let one = plan(&PlanInput { global_batch_tokens: 8 * 4096, ..input(ZeroStage::Zero1, 1) }).unwrap();
    assert_eq!(one.comm.total_s, 0.0);
    assert!(plan(&PlanInput { global_batch_tokens: 1000, ..input(ZeroStage::Zero1, 64) }).is_err());
}
