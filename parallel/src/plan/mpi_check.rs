//! The payload formula against what the MPI communicator counts, for the engine's schedule
//! (src/dist.rs: buckets launched in order, waited for at the end of each reducing micro-step,
//! then one all-gather per bucket). Needs ranks: build with `--features mpi`, then
//! `mpirun -np 3 <test binary> --ignored --exact plan::mpi_check::traffic_matches_step_payload`.
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
