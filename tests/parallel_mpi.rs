//! Data parallelism for real: the `pretrain` binary under `mpirun` (several processes, MPI
//! collectives), checked against one process. Needs `--features mpi` and Open MPI's `mpirun`
//! (`.ci/run` installs both). Every run uses one rayon thread per rank so four ranks fit two cores.
//!
//! With `--features cuda`, the `#[ignore]`d tests run `pretrain --device cuda` under mpirun: NCCL
//! between the ranks (one GPU each, the local rank's). They need GPUs — or the emulated device:
//! `tools/emu-check.sh` runs them with the emulator's libraries on `LD_LIBRARY_PATH`.
#![cfg(feature = "mpi")]

mod mpi_common;

use llama_cpt::dist::{Layout, ZeroStage};
use llama_cpt_parallel::plan::step_payload;
use mpi_common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn stage(z: usize) -> ZeroStage {
    ZeroStage::ALL[z]
}

#[test]
fn world_sizes_1_2_4_and_zero_stages_0_1_2_train_alike() {
    let _serial = serial();
    // 16 rows per step, 4 per micro-batch: 4, 2 and 1 micro-steps at 1, 2 and 4 ranks.
    let common = ["stages.0.steps=6", "stages.1.steps=4", "data.micro_batch_rows=4"];
    let reference = root().join("w1-z0");
    let _ = std::fs::remove_dir_all(&reference);
    let args = |z: usize| -> Vec<String> {
        common.iter().map(|s| s.to_string()).chain([format!("parallel.zero_stage={z}")]).collect()
    };
    run(1, &reference, &args(0).iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let want = losses(&reference);
    let want_params = final_params(&reference);
    let sizes: Vec<usize> = want_params.iter().map(|(_, v)| v.len()).collect();
    let psi: usize = sizes.iter().sum();
    let bucket_elems = (0.05 * 1024.0 * 1024.0 / 4.0) as usize;
    let mut report = Vec::new();
    for world in [1usize, 2, 4] {
        for z in 0..3 {
            let out = root().join(format!("w{world}-z{z}"));
            if (world, z) != (1, 0) {
                let _ = std::fs::remove_dir_all(&out);
                run(world, &out, &args(z).iter().map(|s| s.as_str()).collect::<Vec<_>>());
            }
            let what = format!("{world} ranks, ZeRO-{z}");
            let loss_err = assert_losses_agree(&what, &losses(&out), &want);
            let param_err = assert_params_agree(&what, &final_params(&out), &want_params);
            if world == 1 {
                // One rank: sharding changes nothing at all.
                assert_eq!(param_err, 0.0, "{what}");
            }
            // Optimizer state as each rank measured it: 8Ψ replicated, 12Ψ/N sharded (each bucket
            // padded to a multiple of N).
            let m = metrics(&out);
            let per_rank: Vec<u64> =
                m[0]["optimizer_state_bytes"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as u64).collect();
            assert_eq!(per_rank.len(), world);
            let layout = Layout::new(&sizes_in_model_order(&out), &vec![true; sizes.len()], bucket_elems, world);
            let padded = layout.reduced_elems();
            for &b in &per_rank {
                if z == 0 {
                    assert_eq!(b, 8 * psi as u64, "{what}");
                } else {
                    assert_eq!(b, 12 * (padded / world) as u64, "{what}");
                    assert!(
                        (b as f64 - 12.0 * psi as f64 / world as f64).abs() <= 12.0 * layout.buckets.len() as f64,
                        "{what}: {b} vs 12Ψ/N"
                    );
                }
            }
            // Bytes handed to MPI per step, as the plan predicts them.
            let micro = (16 / (world * 4)) as u64;
            let predicted = step_payload(stage(z), padded as u64, world as u64, micro, 4, 4);
            for rec in &m {
                let c = &rec["comm_bytes"];
                let counted = [
                    c["all_reduce"].as_u64().unwrap(),
                    c["reduce_scatter"].as_u64().unwrap(),
                    c["all_gather"].as_u64().unwrap(),
                ];
                let expect = if world == 1 {
                    [0, 0, 0]
                } else {
                    [predicted.all_reduce, predicted.reduce_scatter, predicted.all_gather]
                };
                assert_eq!(counted, expect, "{what}: step {}", rec["step"]);
            }
            report.push(format!(
                "{what}: loss ≤ {loss_err:.1e}, params ≤ {param_err:.1e}, optimizer bytes/rank {}",
                per_rank[0]
            ));
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn mixed_precision_at_2_ranks_with_zero_1_follows_one_process() {
    use llama_cpt_ops::convert::round_to_bf16;
    let _serial = serial();
    let common = ["stages.0.steps=6", "stages.1.steps=4", "data.micro_batch_rows=4", "--precision=bf16"];
    let one = root().join("bf16-w1");
    let two = root().join("bf16-w2-z1");
    for d in [&one, &two] {
        let _ = std::fs::remove_dir_all(d);
    }
    run(1, &one, &common);
    run(2, &two, &[&common[..], &["parallel.zero_stage=1"]].concat());
    // bf16 parameters are the masters rounded: a master that differs in its last f32 bits (the
    // order of the gradient sums) can round to a neighbouring bf16 value, hence a looser bound.
    let worst = losses(&two)
        .iter()
        .zip(&losses(&one))
        .map(|((s, a), (_, b))| {
            let rel = (a - b).abs() / b.abs();
            assert!(rel <= 1e-3, "mixed precision, 2 ranks ZeRO-1: step {s} loss {a} vs {b}");
            rel
        })
        .fold(0.0, f64::max);
    // Parameters: a bf16 step near the largest value is 2⁻⁸ of it, and an element whose rounding
    // flipped early follows a slightly different Adam path: a few such steps, no more.
    let mut param_err: f32 = 0.0;
    for ((name, a), (_, b)) in final_params(&two).iter().zip(&final_params(&one)) {
        assert!(
            a.iter().all(|&x| round_to_bf16(x).to_bits() == x.to_bits()),
            "{name}: the working parameters are bf16 values"
        );
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
        assert!(d <= 3e-2, "{name} differs by {d:.2e} of its max");
        param_err = param_err.max(d);
    }
    let m = metrics(&two);
    let psi: u64 = final_params(&two).iter().map(|(_, v)| v.len() as u64).sum();
    for b in m[0]["optimizer_state_bytes"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()) {
        assert!(
            (b - 6.0 * psi as f64).abs() <= 0.01 * b,
            "ZeRO-1 at 2 ranks keeps 12Ψ/2 bytes (master + moments): {b}"
        );
    }
    eprintln!("mixed precision (bf16 emulated), 2 ranks ZeRO-1 vs 1 rank: loss ≤ {worst:.1e}, params ≤ {param_err:.1e} of max");
}

/// Parameter sizes in model order (the safetensors listing is alphabetical).
/// Spikes under MPI at 2 ranks, ZeRO-2: every rank skips the same updates and rolls back to the
/// same checkpoint (the bounds are judged on the reduced loss and norm, the checkpoint chosen by
/// rank 0); the result is the 2-rank run told to drop those steps' batches, bit for bit.
#[test]
fn spikes_roll_back_every_rank_alike() {
    let _serial = serial();
    let common = ["stages.0.steps=24", "stages.1.steps=2", "data.micro_batch_rows=4", "parallel.zero_stage=2"];
    let spiky = [
        "run.inject_spike_at_steps=[18, 20, 21]",
        "run.spike_limit=3",
        "run.spike_limit_steps=5",
        "run.checkpoint_every=4",
    ];
    let rolled = root().join("spikes-w2");
    let told = root().join("skip-range-w2");
    for (out, extra) in
        [(&rolled, &spiky[..]), (&told, &["run.skip_step_ranges=[[17, 21]]", "run.checkpoint_every=4"][..])]
    {
        let _ = std::fs::remove_dir_all(out);
        let o = run(2, out, &[&common[..], extra].concat());
        if out == &rolled {
            let text = String::from_utf8_lossy(&o.stderr);
            assert!(
                text.contains("rolled back to") && text.contains("the batches of steps 17–21 are dropped"),
                "{text}"
            );
        }
    }
    assert_eq!(final_params(&rolled), final_params(&told), "2 ranks: rollback = the run told to drop steps 17–21");
    let steps: Vec<u64> = metrics(&rolled).iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=26).collect::<Vec<_>>());
    assert_eq!(metrics(&rolled).last().unwrap()["spikes"], 3);
}

fn sizes_in_model_order(out: &Path) -> Vec<usize> {
    let c = llama_cpt::config::LlamaConfig::from_file(&out.join("stage-knowledge-replay/config.json")).unwrap();
    llama_cpt::model::param_specs(&c).iter().map(|(_, s)| s.iter().product()).collect()
}

#[test]
fn a_checkpoint_from_4_ranks_resumes_at_2_and_3_ranks_and_other_zero_stages() {
    let _serial = serial();
    // 24 rows per step, 2 per micro-batch: divisible by 1, 2, 3 and 4 ranks.
    let common = [
        "stages.0.steps=6",
        "stages.1.steps=4",
        "data.micro_batch_rows=2",
        "stages.0.global_batch_rows=24",
        "stages.1.global_batch_rows=24",
        "run.checkpoint_every=100",
    ];
    let with = |more: &[&str]| -> Vec<String> { common.iter().chain(more).map(|s| s.to_string()).collect() };
    let full = root().join("reshard-full");
    let _ = std::fs::remove_dir_all(&full);
    run(4, &full, &strs(&with(&["parallel.zero_stage=1"])));
    let want = losses(&full);
    for (np, z) in [(2usize, 1usize), (3, 2), (3, 0)] {
        let out = root().join(format!("reshard-{np}-{z}"));
        let _ = std::fs::remove_dir_all(&out);
        // Stop after step 4 (a checkpoint written by 4 ranks under ZeRO-1) ...
        run(4, &out, &strs(&with(&["parallel.zero_stage=1", "run.stop_after_steps=4"])));
        let manifest: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("checkpoints/step-00000004/optimizer.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(manifest["world_size"], 4);
        assert_eq!(manifest["files"].as_array().unwrap().len(), 4, "every rank wrote its shard");
        // ... then resume at another world size and stage.
        let z_set = format!("parallel.zero_stage={z}");
        run(np, &out, &strs(&with(&[&z_set])));
        let what = format!("saved at 4 ranks ZeRO-1, resumed at {np} ranks ZeRO-{z}");
        assert_losses_agree(&what, &losses(&out), &want);
    }
}

#[test]
fn a_rank_that_dies_or_stalls_stops_the_others_and_the_run_resumes() {
    let _serial = serial();
    let args = ["stages.0.steps=40", "stages.1.steps=4", "data.micro_batch_rows=4", "run.checkpoint_every=3"];
    stop_one_rank_then_resume(2, "fault", &args, 5, 44);
}

/// Starts `np` ranks training into `root()/name`; once a new checkpoint is complete, stops
/// (SIGSTOP) and later kills (SIGKILL) rank 1 of a fresh job each: the other ranks must fail on
/// their own within `timeout_s` plus a margin, with an error that names the collective and the
/// step. Then a job without the short timeout resumes from the last checkpoint and logs every one
/// of the `total_steps` once.
fn stop_one_rank_then_resume(np: usize, name: &str, args: &[&str], timeout_s: u64, total_steps: u64) {
    let out = root().join(name);
    let _ = std::fs::remove_dir_all(&out);
    let timeout_set = format!("parallel.timeout_s={timeout_s}");
    let with_timeout: Vec<&str> = args.iter().copied().chain([timeout_set.as_str()]).collect();
    for signal in ["STOP", "KILL"] {
        let before = llama_cpt::train::checkpoint::complete_checkpoints(&out).unwrap();
        let mut child = mpirun(np, &out, &with_timeout).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        // Wait for a new checkpoint, then hit rank 1.
        let t0 = Instant::now();
        while llama_cpt::train::checkpoint::complete_checkpoints(&out).unwrap().last() == before.last() {
            if t0.elapsed() > Duration::from_secs(300) || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                let o = child.wait_with_output().unwrap();
                panic!("no new checkpoint appeared; the job said:\n{}", String::from_utf8_lossy(&o.stderr));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let Some(rank1) = rank_pid(&out, 1) else {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("rank 1's process not found; the job said:\n{}", String::from_utf8_lossy(&o.stderr));
        };
        assert!(Command::new("kill").args([&format!("-{signal}"), &rank1.to_string()]).status().unwrap().success());
        let t1 = Instant::now();
        let o = child.wait_with_output().unwrap();
        let waited = t1.elapsed();
        let text = String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout);
        assert!(!o.status.success(), "SIG{signal}: the job must fail:\n{text}");
        assert!(waited < Duration::from_secs(timeout_s + 55), "SIG{signal}: the others took {waited:?} to stop");
        if signal == "STOP" {
            // The others gave up on their own: the collective's timeout, with a message saying
            // why and at which step.
            assert!(text.contains(&format!("did not complete within {timeout_s} s")), "SIG{signal}:\n{text}");
            assert!(text.contains("Error: step "), "SIG{signal}: the error names the step:\n{text}");
            let why: Vec<&str> = text.lines().filter(|l| l.contains("did not complete within")).collect();
            eprintln!("{name}: SIG{signal}: {}", why.join(" | "));
            let _ = Command::new("kill").args(["-KILL", &rank1.to_string()]).status();
        }
        eprintln!("{name}: SIG{signal} to rank 1 of {np}: job stopped after {waited:.1?}");
    }
    // Resume from the last checkpoint and finish.
    let before = llama_cpt::train::checkpoint::complete_checkpoints(&out).unwrap();
    assert!(!before.is_empty());
    run(np, &out, args);
    let steps: Vec<u64> = metrics(&out).iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=total_steps).collect::<Vec<_>>(), "every step logged once");
    assert!(out.join("stage-knowledge-replay/model.safetensors").exists());
}

/// The CUDA runs, short enough for the emulated device: 6 rows of 32 tokens per step in
/// micro-batches of 1 (6, 3 and 2 micro-steps at 1, 2 and 3 ranks), 3 steps over both stages, in
/// f32 (not the GPU's bf16 default) so that the ranks' sums agree to f32 round-off.
#[cfg(feature = "cuda")]
const CUDA_SHORT: [&str; 8] = [
    "--device=cuda",
    "--precision=f32",
    "data.seq_len=32",
    "stages.0.steps=2",
    "stages.1.steps=1",
    "data.micro_batch_rows=1",
    "stages.0.global_batch_rows=6",
    "stages.1.global_batch_rows=6",
];

#[test]
#[cfg(feature = "cuda")]
#[ignore = "needs 3 CUDA GPUs and libnccl, or the emulated device (tools/emu-check.sh)"]
fn nccl_at_2_and_3_ranks_with_zero_1_and_2_follows_one_process() {
    let _serial = serial();
    let one = root().join("nccl-w1");
    let _ = std::fs::remove_dir_all(&one);
    run(1, &one, &CUDA_SHORT);
    let want = losses(&one);
    let want_params = final_params(&one);
    let mut report = Vec::new();
    for (np, z) in [(2usize, 1usize), (2, 2), (3, 1), (3, 2)] {
        let out = root().join(format!("nccl-w{np}-z{z}"));
        let _ = std::fs::remove_dir_all(&out);
        let zero = format!("parallel.zero_stage={z}");
        let t0 = Instant::now();
        let o = run(np, &out, &[&CUDA_SHORT[..], &[zero.as_str()]].concat());
        let text = String::from_utf8_lossy(&o.stderr);
        assert!(
            text.contains(&format!("nccl ({np} ranks)")),
            "{np} ranks, ZeRO-{z}: the CUDA backend's communicator is NCCL:\n{text}"
        );
        let what = format!("NCCL {np} ranks, ZeRO-{z}");
        let loss_err = assert_losses_agree(&what, &losses(&out), &want);
        let param_err = assert_params_agree(&what, &final_params(&out), &want_params);
        report.push(format!(
            "{what}: loss ≤ {loss_err:.1e}, params ≤ {param_err:.1e} ({:.0} s)",
            t0.elapsed().as_secs_f64()
        ));
    }
    eprintln!("{}", report.join("\n"));
}

/// `pretrain --profile` under NCCL at 2 ranks: three host syncs per optimizer step (the token
/// count's all-reduce, the one download of the losses and Σg², the all-reduce of what the ranks
/// share), at 4 and 8 layers, under ZeRO-0 and ZeRO-2, in the GPU's default bf16.
#[test]
#[cfg(feature = "cuda")]
#[ignore = "needs 2 CUDA GPUs and libnccl, or the emulated device (tools/emu-check.sh)"]
fn nccl_steps_sync_the_host_three_times_at_any_depth() {
    let _serial = serial();
    let source = config().parent().unwrap().join("config.json");
    let mut model: Value = serde_json::from_str(&std::fs::read_to_string(&source).unwrap()).unwrap();
    let mut report = Vec::new();
    for layers in [4u64, 8] {
        model["num_hidden_layers"] = layers.into();
        let model_config = root().join(format!("profile-{layers}-layers.json"));
        std::fs::write(&model_config, model.to_string()).unwrap();
        let set_model = format!("model.config={:?}", model_config.display().to_string());
        for z in [0, 2] {
            let out = root().join(format!("nccl-profile-{layers}-z{z}"));
            let _ = std::fs::remove_dir_all(&out);
            let zero = format!("parallel.zero_stage={z}");
            let args: Vec<&str> = CUDA_SHORT
                .iter()
                .copied()
                .filter(|a| !a.starts_with("--precision"))
                .chain(["--profile", &zero, &set_model])
                .collect();
            let text = String::from_utf8_lossy(&run(2, &out, &args).stderr).to_string();
            assert!(text.contains("bf16 mixed precision"), "the GPU's default precision is bf16:\n{text}");
            let line = text.lines().find(|l| l.starts_with("| host syncs |")).unwrap_or_else(|| panic!("{text}"));
            let syncs: f64 =
                line.trim_matches(|c| c == '|' || c == ' ').rsplit('|').next().unwrap().trim().parse().unwrap();
            assert_eq!(syncs, 3.0, "{layers} layers, ZeRO-{z}: host syncs per step\n{text}");
            report.push(format!("NCCL 2 ranks, {layers} layers, ZeRO-{z}: {syncs} host syncs per step"));
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
#[cfg(feature = "cuda")]
#[ignore = "needs 3 CUDA GPUs and libnccl, or the emulated device (tools/emu-check.sh)"]
fn a_dead_or_stalled_nccl_rank_stops_the_others_and_the_run_resumes() {
    let _serial = serial();
    // A checkpoint every step (one row of 32 tokens per rank): each fault comes right after one.
    let args = [
        "--device=cuda",
        "--precision=f32",
        "data.seq_len=32",
        "stages.0.steps=6",
        "stages.1.steps=1",
        "data.micro_batch_rows=1",
        "stages.0.global_batch_rows=3",
        "stages.1.global_batch_rows=3",
        "run.checkpoint_every=1",
        "parallel.zero_stage=1",
    ];
    stop_one_rank_then_resume(3, "nccl-fault", &args, 10, 7);
}

#[test]
#[cfg(feature = "cuda")]
#[ignore = "needs 3 CUDA GPUs and libnccl, or the emulated device (tools/emu-check.sh)"]
fn a_killed_nccl_rank_is_named_by_the_others_without_a_launcher_to_end_them() {
    // Ranks started by hand (torchrun-style variables), so no mpirun tears the job down: the
    // others must notice on their own (NCCL's asynchronous error) and say which rank died.
    let _serial = serial();
    let out = root().join("nccl-kill-by-hand");
    let _ = std::fs::remove_dir_all(&out);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let sets = [
        "data.seq_len=32",
        "stages.0.steps=40",
        "stages.1.steps=1",
        "data.micro_batch_rows=1",
        "stages.0.global_batch_rows=3",
        "stages.1.global_batch_rows=3",
        "run.log_every=1",
        "run.eval_every=0",
        "parallel.timeout_s=120",
    ];
    let mut ranks: Vec<std::process::Child> = (0..3)
        .map(|r| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_pretrain"));
            c.args(["--device", "cuda", "--config"])
                .arg(config())
                .arg("--set")
                .arg(format!("run.out_dir={:?}", out.display().to_string()));
            for s in sets {
                c.args(["--set", s]);
            }
            let rank = r.to_string();
            c.envs([
                ("RANK", rank.as_str()),
                ("LOCAL_RANK", rank.as_str()),
                ("WORLD_SIZE", "3"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", &port.to_string()),
                ("RAYON_NUM_THREADS", "1"),
                ("RUST_BACKTRACE", "0"),
            ]);
            c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    // Two steps logged: every rank is inside the training loop.
    let t0 = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |m| m.lines().count()) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(300) && ranks.iter_mut().all(|c| c.try_wait().unwrap().is_none()),
            "the job did not get to step 2"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ranks[1].kill().unwrap();
    let t1 = Instant::now();
    for (r, c) in ranks.into_iter().enumerate().filter(|(r, _)| *r != 1) {
        let o = c.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "rank {r} must fail:\n{text}");
        assert!(
            text.contains("exited") && text.contains("NCCL communicator aborted"),
            "rank {r}: the error says a rank exited:\n{text}"
        );
        assert!(text.contains("Error: step "), "rank {r}: the error names the step:\n{text}");
    }
    let waited = t1.elapsed();
    // Far below the 120 s timeout: the death itself is noticed.
    assert!(waited < Duration::from_secs(30), "the others took {waited:?}");
    eprintln!("nccl-kill-by-hand: SIGKILL to rank 1 of 3 (no launcher): the others stopped after {waited:.1?}");
}
