//! The trainer end to end on the embedded default (shortened): exact resume after stops and
//! after kill -9, NaN skipping, prompt masking in the replay stage, validation bits per
//! character, the loss plot, and the output loading in transformers.
mod common;
use llama_cpt::cpu::Cpu;
use llama_cpt::model::Llama;
use llama_cpt::train::{self, checkpoint, config::TrainConfig, default_run};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;
use std::time::Duration;

/// Short settings: 2 stages of 6 and 4 steps on 4 rows × 32 tokens.
const SHORT: [&str; 10] = [
    "data.seq_len=32",
    "data.micro_batch_rows=2",
    "stages.0.steps=6",
    "stages.0.global_batch_rows=4",
    "stages.0.warmup_steps=2",
    "stages.1.steps=4",
    "stages.1.global_batch_rows=4",
    "stages.1.warmup_steps=1",
    "run.log_every=1",
    "run.eval_every=0",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("train")
}

/// The default corpus, tokenizer and shards, prepared once for every test.
fn prepared() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = root().join("prepared");
        let _ = std::fs::remove_dir_all(&dir);
        default_run::prepare(&dir, &[]).unwrap();
        dir
    })
}

fn config(out: &Path, extra: &[&str]) -> TrainConfig {
    let mut o: Vec<String> = SHORT.iter().map(|s| s.to_string()).collect();
    o.extend(extra.iter().map(|s| s.to_string()));
    o.push(format!("run.out_dir={}", toml::Value::String(out.display().to_string())));
    TrainConfig::from_file(&prepared().join("data/default.toml"), &o).unwrap()
}

fn losses(out: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap().to_bits())
        })
        .collect()
}

fn weights(dir: &Path) -> Vec<Vec<u32>> {
    let m = Llama::load(&Cpu, dir).unwrap();
    m.params.iter().map(|p| p.value.buf.iter().map(|x| x.to_bits()).collect()).collect()
}

fn fresh(name: &str) -> PathBuf {
    let d = root().join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The uninterrupted reference run.
fn reference() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = fresh("reference");
        let o = train::run(&Cpu, &config(&out, &[]), &AtomicBool::new(false)).unwrap();
        assert!(!o.interrupted && o.global_step == 10);
        out
    })
}

#[test]
fn loss_falls_and_the_result_loads_in_transformers() {
    let out = reference();
    let l: Vec<f64> = losses(out).iter().map(|(_, b)| f64::from_bits(*b)).collect();
    assert_eq!(l.len(), 10);
    assert!(l[5] < l[0] * 0.9 && l[9] < l[0] * 0.85, "loss did not fall: {l:?}");
    let model_dir = out.join("stage-knowledge-replay");
    assert!(model_dir.join("tokenizer.json").exists());
    let model = Llama::load(&Cpu, &model_dir).unwrap();
    let expected = root().join("default-expected.safetensors");
    let tokens: Vec<u32> = (0..16).map(|i| (i * 13 % 300) as u32).collect();
    let batch = llama_cpt::batch::Batch::from_rows(2, 8, tokens.clone(), &[-100; 16]);
    let logits = model.logits(&Cpu, &batch).unwrap();
    let ids: Vec<u8> = tokens.iter().flat_map(|&t| (t as i64).to_le_bytes()).collect();
    let lg: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    let views = vec![
        ("input_ids", safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![2, 8], &ids).unwrap()),
        (
            "logits",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 8, model.config.vocab_size], &lg)
                .unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &expected).unwrap();
    print!("{}", common::run_python("check_hf_load.py", &[&model_dir, &expected]));
}

/// The (step, value) points of the `loss` tag, as the tensorboard package reads the event files
/// in `dir`, and its whole output (for assertion messages).
fn tensorboard_losses(dir: &Path) -> (Vec<(u64, f64)>, String) {
    let text = common::run_python("read_tensorboard.py", &[dir]);
    let loss = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["tag"] == "loss")
        .map(|v| (v["step"].as_u64().unwrap(), v["value"].as_f64().unwrap()))
        .collect();
    (loss, text)
}

#[test]
fn tensorboard_reads_the_event_files() {
    let out = reference();
    let (loss, text) = tensorboard_losses(&out.join("tensorboard"));
    let want: Vec<(u64, f64)> = losses(out).iter().map(|(s, b)| (*s, f64::from_bits(*b))).collect();
    assert_eq!(loss.len(), want.len(), "{text}");
    for ((s1, a), (s2, b)) in loss.iter().zip(&want) {
        assert_eq!(s1, s2);
        assert!((a - b).abs() <= 1e-6 * b.abs(), "step {s1}: {a} vs {b}");
    }
}

/// The prepared `default.toml` names its files relative to its own folder: `pretrain --config` runs
/// it from another working directory, and a relative `--out` is relative to that directory.
#[test]
fn the_default_config_runs_as_is_from_anywhere() {
    let cfg_path = prepared().join("data/default.toml");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(!text.contains(&*prepared().to_string_lossy()), "absolute paths in {}:\n{text}", cfg_path.display());
    let elsewhere = fresh("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let mut args: Vec<String> = vec!["--config".into(), cfg_path.display().to_string(), "--out".into(), "x".into()];
    for s in SHORT.iter().chain(&["stages.0.steps=1", "stages.1.steps=1"]) {
        args.push("--set".into());
        args.push(s.to_string());
    }
    let o = Command::new(env!("CARGO_BIN_EXE_pretrain")).args(&args).current_dir(&elsewhere).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(elsewhere.join("x/stage-knowledge-replay/config.json").exists());
}

/// Every stage's data is checked before the first step: a missing second-stage dataset stops the
/// run at once, the error naming its key.
#[test]
fn missing_data_of_a_later_stage_stops_the_run_before_the_first_step() {
    let out = fresh("missing-stage-2");
    let cfg = config(&out, &["stages.1.datasets.0.dir=\"no-such-data\"", "run.eval_texts=[\"gone.jsonl\"]"]);
    let err = format!("{:#}", train::run(&Cpu, &cfg, &AtomicBool::new(false)).unwrap_err());
    assert!(err.contains("key `stages[1].datasets[0].dir`") && err.contains("no-such-data"), "{err}");
    assert!(err.contains("key `run.eval_texts[0]`") && err.contains("gone.jsonl"), "{err}");
    assert!(!out.join("metrics.jsonl").exists(), "a step ran before the check");
}

/// A resume from a checkpoint older than the last logged step replays steps; TensorBoard (read
/// with its own EventAccumulator) must still show each step once, with the replayed values.
#[test]
fn tensorboard_shows_each_step_once_after_a_resume_that_replays_steps() {
    let out = fresh("tensorboard-resume");
    let o = train::run(
        &Cpu,
        &config(&out, &["run.stop_after_steps=8", "run.checkpoint_every=3", "run.keep_checkpoints=3"]),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert!(o.interrupted && o.global_step == 8);
    // Drop the stop's checkpoint: the next run resumes from step 6 and logs steps 7 and 8 again.
    let newest = checkpoint::complete_checkpoints(&out).unwrap().pop().unwrap();
    assert!(newest.ends_with("step-00000008"), "{}", newest.display());
    std::fs::remove_dir_all(&newest).unwrap();
    let o =
        train::run(&Cpu, &config(&out, &["run.checkpoint_every=3", "run.keep_checkpoints=3"]), &AtomicBool::new(false))
            .unwrap();
    assert!(!o.interrupted && o.global_step == 10);
    let files = std::fs::read_dir(out.join("tensorboard")).unwrap().count();
    assert_eq!(files, 2, "one event file per run");
    let (loss, text) = tensorboard_losses(&out.join("tensorboard"));
    assert_eq!(loss.iter().map(|x| x.0).collect::<Vec<_>>(), (1..=10).collect::<Vec<u64>>(), "{text}");
    for ((step, tb), (_, want)) in loss.iter().zip(losses(&out)) {
        let want = f64::from_bits(want);
        assert!((tb - want).abs() <= 1e-6 * want.abs(), "step {step}: TensorBoard {tb} vs metrics.jsonl {want}");
    }
}

#[test]
fn stopping_and_resuming_is_bit_identical() {
    let want_losses = losses(reference());
    let want = weights(&reference().join("stage-knowledge-replay"));
    let out = fresh("resumed");
    // Stop inside stage 1, at the stage boundary, inside stage 2, then finish.
    for stop in [3u64, 6, 8] {
        let o = train::run(&Cpu, &config(&out, &[&format!("run.stop_after_steps={stop}")]), &AtomicBool::new(false))
            .unwrap();
        assert!(o.interrupted, "stop at {stop}");
        assert_eq!(o.global_step, stop);
    }
    let o = train::run(&Cpu, &config(&out, &[]), &AtomicBool::new(false)).unwrap();
    assert!(!o.interrupted && o.global_step == 10);
    assert_eq!(losses(&out), want_losses, "per-step losses differ from the uninterrupted run");
    assert_eq!(weights(&out.join("stage-knowledge-replay")), want, "final weights differ");
}

#[test]
fn kill_9_at_random_moments_then_resume_is_bit_identical() {
    // Longer stages than the other tests so that the kills land all over the run.
    let longer = ["stages.0.steps=24", "stages.1.steps=16"];
    let reference = fresh("kill-reference");
    train::run(&Cpu, &config(&reference, &longer), &AtomicBool::new(false)).unwrap();
    let want = weights(&reference.join("stage-knowledge-replay"));
    let out = fresh("killed");
    let cfg_path = prepared().join("data/default.toml");
    let mut args: Vec<String> =
        vec!["--config".into(), cfg_path.display().to_string(), "--out".into(), out.display().to_string()];
    for s in SHORT.iter().chain(&longer).chain(&["run.checkpoint_every=1", "run.keep_checkpoints=2"]) {
        args.push("--set".into());
        args.push(s.to_string());
    }
    let mut kills = 0;
    let mut seed = 12345u64;
    for attempt in 0..100 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pretrain"))
            .args(&args)
            .env("RUST_BACKTRACE", "0")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let wait_ms = 60 + (seed >> 33) % 400;
        std::thread::sleep(Duration::from_millis(wait_ms));
        if child.try_wait().unwrap().is_some() {
            assert!(child.wait().unwrap().success(), "attempt {attempt}: pretrain failed");
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        // Whatever the moment, every complete checkpoint must be loadable.
        for ck in checkpoint::complete_checkpoints(&out).unwrap() {
            Llama::<Cpu>::load(&Cpu, &ck).unwrap_or_else(|e| panic!("unreadable checkpoint after kill {kills}: {e:#}"));
        }
    }
    let status = Command::new(env!("CARGO_BIN_EXE_pretrain")).args(&args).env("RUST_BACKTRACE", "0").status().unwrap();
    assert!(status.success());
    println!("killed {kills} times");
    assert!(kills >= 3, "the run finished before it could be killed three times");
    assert_eq!(weights(&out.join("stage-knowledge-replay")), want, "final weights differ after kill -9 and resume");
}

#[test]
fn non_finite_steps_are_skipped_and_too_many_stop_the_run() {
    let out = fresh("nan-skip");
    let o = train::run(&Cpu, &config(&out, &["run.inject_nan_at_steps=[3, 4]"]), &AtomicBool::new(false)).unwrap();
    assert!(!o.interrupted);
    let m: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(m.last().unwrap()["skipped_steps"], 2);
    assert_eq!(m[2]["applied"], false);
    let out = fresh("nan-stop");
    let err = train::run(
        &Cpu,
        &config(&out, &["run.inject_nan_at_steps=[3, 4, 5]", "run.max_consecutive_skips=3", "run.checkpoint_every=2"]),
        &AtomicBool::new(false),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("3 non-finite steps in a row") && msg.contains("step-00000002"), "{msg}");
    assert!(!out.join("checkpoints/step-00000004").exists(), "no checkpoint inside a run of skipped steps");
    Llama::<Cpu>::load(&Cpu, &out.join("checkpoints/step-00000002")).unwrap();
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A gradient-norm spike (step 20's gradients × 1000, after 19 steps of statistics) is caught by
/// the z-score bound: that update is skipped, the run ends with the weights of a run whose step 20
/// was skipped as non-finite (bit for bit), and normal training flags nothing. Off when asked.
/// Too many spikes close together roll the run back to a checkpoint before them, the batches in
/// between dropped; without such a checkpoint, they stop it.
#[test]
fn a_spike_skips_its_update_and_too_many_roll_the_run_back() {
    let long = ["stages.0.steps=24", "stages.1.steps=2"];
    let run = |name: &str, extra: &[&str]| {
        let out = fresh(name);
        let r = train::run(&Cpu, &config(&out, &[&long[..], extra].concat()), &AtomicBool::new(false));
        (out, r)
    };
    let (spiked, r) = run("spike", &["run.inject_spike_at_steps=[20]"]);
    r.unwrap();
    let m = metrics(&spiked);
    assert_eq!(
        (m[19]["step"].as_u64(), m[19]["applied"].as_bool(), m[19]["spike"].as_bool()),
        (Some(20), Some(false), Some(true))
    );
    assert!(m[19]["grad_norm"].as_f64().unwrap() > 10.0 * m[18]["grad_norm"].as_f64().unwrap());
    assert_eq!(m.last().unwrap()["spikes"], 1);
    let (nan, r) = run("spike-as-nan", &["run.inject_nan_at_steps=[20]"]);
    r.unwrap();
    assert_eq!(metrics(&nan).last().unwrap()["spikes"], 0, "26 steps of normal training: no spike");
    assert_eq!(
        weights(&spiked.join("stage-knowledge-replay")),
        weights(&nan.join("stage-knowledge-replay")),
        "the spiked step's update was skipped, nothing else changed"
    );
    let (off, r) = run("spike-off", &["run.inject_spike_at_steps=[20]", "run.spike_window=0"]);
    r.unwrap();
    assert_eq!(metrics(&off)[19]["applied"], true, "spike_window = 0: the clipped update is applied");
    // Three spikes within 5 steps and no checkpoint of the stage before the first: a stop.
    let three = ["run.inject_spike_at_steps=[18, 20, 21]", "run.spike_limit=3", "run.spike_limit_steps=5"];
    let (_, r) = run("spike-stop", &three);
    let msg = format!("{:#}", r.unwrap_err());
    assert!(msg.contains("3 loss or gradient-norm spikes within 5 steps") && msg.contains("no checkpoint"), "{msg}");

    // With checkpoints every 4 steps: back to step 16, the batches of steps 17–21 dropped; the
    // result is the run that was told to drop them (Megatron's skip range), bit for bit.
    let (rolled, r) = run("spike-rollback", &[&three[..], &["run.checkpoint_every=4"]].concat());
    r.unwrap();
    let (told, r) = run("skip-range", &["run.skip_step_ranges=[[17, 21]]", "run.checkpoint_every=4"]);
    r.unwrap();
    assert_eq!(weights(&rolled.join("stage-knowledge-replay")), weights(&told.join("stage-knowledge-replay")));
    let steps: Vec<u64> = metrics(&rolled).iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=26).collect::<Vec<_>>(), "each step logged once, the undone ones replaced");
    let loss_bits = |out: &Path| -> Vec<Option<u64>> {
        metrics(out).iter().map(|r| r["loss"].as_f64().map(f64::to_bits)).collect()
    };
    let (rolled_losses, plain_losses) = (loss_bits(&rolled), loss_bits(&nan));
    assert_eq!(rolled_losses[..16], plain_losses[..16]);
    assert_ne!(rolled_losses[16], plain_losses[16], "step 17 trains on the batch after step 21's");
    // Spikes again right after a rollback to the same checkpoint, with new data: a stop.
    let again = ["run.inject_spike_at_steps=[18, 20, 21, 22, 23, 24]", "run.checkpoint_every=16"];
    let (_, r) = run("spike-again", &[&three[1..], &again[..]].concat());
    let msg = format!("{:#}", r.unwrap_err());
    assert!(msg.contains("spikes again after a rollback to step 16"), "{msg}");
    for (out, rollbacks) in [(&rolled, vec![16]), (&told, vec![])] {
        let state = checkpoint::read_state(checkpoint::complete_checkpoints(out).unwrap().last().unwrap()).unwrap();
        assert_eq!((state.rollbacks, state.skipped_data), (rollbacks, vec![[17, 21]]), "{}", out.display());
    }
}

#[test]
fn replay_stage_trains_only_on_answers() {
    use llama_cpt::data::{Loader, LoaderConfig, SubsetSpec};
    let dir = prepared();
    let tok = tokenizers::Tokenizer::from_file(dir.join("data/tokenizer.json")).unwrap();
    let cfg = LoaderConfig {
        seq_len: 64,
        global_batch_rows: 4,
        micro_batch_rows: 4,
        max_epochs: Some(1),
        ..Default::default()
    };
    let mut loader = Loader::new(&[SubsetSpec::new(dir.join("data/shards/qa"), 1.0)], cfg, None).unwrap();
    let (mut counted, mut batches) = (0, 0);
    while let Some(b) = loader.next_micro_batch().unwrap() {
        batches += 1;
        let ids: Vec<u32> = b.targets.iter().filter(|&&t| t >= 0).map(|&t| t as u32).collect();
        counted += ids.len();
        let text = tok.decode(&ids, false).unwrap();
        assert!(!text.contains("Question") && !text.contains("Answer"), "prompt tokens carry loss: {text}");
        assert!(text.contains("lives") || text.contains("likes") || text.contains("keeps") || text.contains("works"));
    }
    assert!(batches > 10 && counted > 1000);
}

/// A checkpoint proves itself before a resume reads it: a flipped byte or a truncated file is
/// named, and the run falls back to the previous complete checkpoint; with none intact it stops
/// rather than start again from scratch. The resumed run ends bit-identical to the uninterrupted one.
#[test]
fn a_corrupt_or_truncated_checkpoint_is_named_and_the_previous_one_resumed() {
    let want_losses = losses(reference());
    let want = weights(&reference().join("stage-knowledge-replay"));
    let out = fresh("corrupt-checkpoint");
    let keep = ["run.checkpoint_every=3", "run.keep_checkpoints=3"];
    let o =
        train::run(&Cpu, &config(&out, &[&keep[..], &["run.stop_after_steps=8"]].concat()), &AtomicBool::new(false))
            .unwrap();
    assert!(o.interrupted && o.global_step == 8);
    let ckpt = |step: u64| out.join(format!("checkpoints/step-{step:08}"));
    assert_eq!(checkpoint::complete_checkpoints(&out).unwrap(), vec![ckpt(3), ckpt(6), ckpt(8)]);
    for step in [3, 6, 8] {
        checkpoint::verify(&ckpt(step)).unwrap();
    }
    // Step 8: one flipped byte in the optimizer shard. Step 6: the model file cut short.
    let shard = ckpt(8).join("optimizer-rank00000.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&shard, &bytes).unwrap();
    let model = ckpt(6).join("model.safetensors");
    let full = std::fs::read(&model).unwrap();
    std::fs::write(&model, &full[..full.len() - 100]).unwrap();
    let e8 = format!("{:#}", checkpoint::verify(&ckpt(8)).unwrap_err());
    assert!(e8.contains("optimizer-rank00000.safetensors") && e8.contains("corrupt"), "{e8}");
    let e6 = format!("{:#}", checkpoint::verify(&ckpt(6)).unwrap_err());
    assert!(e6.contains("model.safetensors") && e6.contains("truncated"), "{e6}");
    // Step 3 damaged as well: no intact checkpoint, and the run refuses to start from scratch.
    let state = ckpt(3).join("trainer_state.json");
    let good_state = std::fs::read(&state).unwrap();
    std::fs::write(&state, b"{}").unwrap();
    let err = format!("{:#}", train::run(&Cpu, &config(&out, &keep), &AtomicBool::new(false)).unwrap_err());
    assert!(err.contains("no intact checkpoint") && err.contains("trainer_state.json"), "{err}");
    // Step 3 mended: the run resumes there and ends as the uninterrupted run did.
    std::fs::write(&state, good_state).unwrap();
    let o = train::run(&Cpu, &config(&out, &keep), &AtomicBool::new(false)).unwrap();
    assert!(!o.interrupted && o.global_step == 10);
    let resumed: Vec<(u64, u64)> = losses(&out);
    assert_eq!(resumed.iter().map(|x| x.0).collect::<Vec<_>>(), (1..=10).collect::<Vec<u64>>());
    assert_eq!(resumed, want_losses, "per-step losses differ from the uninterrupted run");
    assert_eq!(weights(&out.join("stage-knowledge-replay")), want, "final weights differ");
}

/// A disk that fills up during a save (a 14 MiB tmpfs: room for one 9 MiB checkpoint, not two)
/// fails that save with the system's error, removes its partial folder and keeps the earlier
/// checkpoint whole. Mounting needs root: elsewhere the test says it was skipped.
#[test]
fn a_full_disk_fails_the_save_and_keeps_the_earlier_checkpoint() {
    let out = fresh("full-disk");
    std::fs::create_dir_all(&out).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=14m", "tmpfs"])
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs at {} (needs root)", out.display());
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(out.clone());
    let o = train::run(&Cpu, &config(&out, &["run.stop_after_steps=2"]), &AtomicBool::new(false)).unwrap();
    assert!(o.interrupted && o.global_step == 2);
    let good = out.join("checkpoints/step-00000002");
    checkpoint::verify(&good).unwrap();
    let err = train::run(&Cpu, &config(&out, &["run.stop_after_steps=4"]), &AtomicBool::new(false)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("step-00000004") && msg.contains("earlier checkpoints are intact"), "{msg}");
    assert!(msg.contains("No space left on device"), "{msg}");
    assert_eq!(checkpoint::complete_checkpoints(&out).unwrap(), vec![good.clone()]);
    let left: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(left, ["step-00000002"], "the partial folder is removed");
    checkpoint::verify(&good).unwrap();
}

#[test]
fn a_failed_checkpoint_write_leaves_the_previous_one_intact() {
    let out = fresh("failed-save");
    let o = train::run(&Cpu, &config(&out, &["run.stop_after_steps=2"]), &AtomicBool::new(false)).unwrap();
    assert!(o.interrupted);
    let good = out.join("checkpoints/step-00000002");
    assert!(good.join(checkpoint::MARKER).exists());
    // A file where the next checkpoint's temporary folder goes makes its write fail (as a full
    // disk or an unwritable folder would): the run stops with an error, step 2 stays readable.
    let blocker = out.join("checkpoints/.step-00000004.tmp");
    std::fs::write(&blocker, "in the way").unwrap();
    let err = train::run(&Cpu, &config(&out, &["run.stop_after_steps=4"]), &AtomicBool::new(false)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("step-00000004") && msg.contains("earlier checkpoints are intact"), "{msg}");
    assert_eq!(checkpoint::complete_checkpoints(&out).unwrap(), vec![good.clone()]);
    Llama::<Cpu>::load(&Cpu, &good).unwrap();
    // Once the obstacle is gone the run resumes from step 2.
    std::fs::remove_file(&blocker).unwrap();
    let o = train::run(&Cpu, &config(&out, &["run.stop_after_steps=4"]), &AtomicBool::new(false)).unwrap();
    assert_eq!(o.global_step, 4);
}

#[test]
fn a_vocabulary_extended_model_trains_with_only_its_embeddings_unfrozen() {
    use llama_cpt::vocab::{extend_model, ExtendOptions, PieceSource};
    let base = reference().join("stage-knowledge-replay");
    let extended = fresh("extended");
    let pieces = vec!["Zanzibarian".to_string(), "离离原上草".to_string()];
    let report = extend_model(
        &base,
        &extended,
        &PieceSource::Pieces(pieces),
        &ExtendOptions { pad_to_multiple: 64, overwrite: true },
    )
    .unwrap();
    assert!(report.failures.is_empty() && report.new_model_vocab > report.old_model_vocab, "{report:?}");
    let out = fresh("frozen");
    // The default config initialises randomly; continue from the extended model instead.
    let text = std::fs::read_to_string(prepared().join("data/default.toml")).unwrap();
    let cfg_line = text.lines().find(|l| l.starts_with("config = ")).unwrap();
    let text = text.replace(cfg_line, &format!("from = {}", toml::Value::String(extended.display().to_string())));
    let text = text.replace(text.lines().find(|l| l.starts_with("tokenizer = ")).unwrap(), "");
    let mut o: Vec<String> = SHORT.iter().map(|s| s.to_string()).collect();
    for s in [
        "stages.0.freeze_non_embeddings=true",
        "stages.0.steps=3",
        "stages.1.steps=1",
        "stages.1.freeze_non_embeddings=true",
    ] {
        o.push(s.to_string());
    }
    o.push(format!("run.out_dir={}", toml::Value::String(out.display().to_string())));
    let cfg = TrainConfig::parse(&text, "test config", &prepared().join("data"), &o).unwrap();
    train::run(&Cpu, &cfg, &AtomicBool::new(false)).unwrap();
    let before = Llama::load(&Cpu, &extended).unwrap();
    let after = Llama::load(&Cpu, &out.join("stage-knowledge-replay")).unwrap();
    assert_eq!(after.config.vocab_size, before.config.vocab_size);
    for (a, b) in after.params.iter().zip(&before.params) {
        let same = a.value.buf.iter().zip(b.value.buf.iter()).all(|(x, y)| x.to_bits() == y.to_bits());
        if a.name == "model.embed_tokens.weight" || a.name == "lm_head.weight" {
            assert!(!same, "{} did not train", a.name);
        } else {
            assert!(same, "{} changed although frozen", a.name);
        }
    }
}

#[test]
fn validation_bits_per_character_are_logged_fall_and_match_evaluate() {
    use llama_cpt::config::LlamaConfig;
    use llama_cpt::data::tokenizer::TextTokenizer;
    use llama_cpt::eval::ppl;
    let out = fresh("val-bpc");
    let cfg = config(&out, &["run.eval_every=5"]);
    train::run(&Cpu, &cfg, &AtomicBool::new(false)).unwrap();
    // Logged at steps 5, 6 (the end of stage 1) and 10, in metrics.jsonl and TensorBoard.
    let logged: Vec<(u64, f64)> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v["val_bpc"]["heldout-text"].as_f64().map(|b| (v["step"].as_u64().unwrap(), b)))
        .collect();
    assert_eq!(logged.iter().map(|x| x.0).collect::<Vec<_>>(), [5, 6, 10], "{logged:?}");
    let tb = common::run_python("read_tensorboard.py", &[&out.join("tensorboard")]);
    let tb_steps: Vec<u64> = tb
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["tag"] == "val_bpc/heldout-text")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(tb_steps, [5, 6, 10], "{tb}");
    // The number is what `evaluate --text` gives for the stage's model (windows of seq_len).
    let texts_path = prepared().join("data/heldout-text.jsonl");
    let (texts, issues) = ppl::read_texts(&texts_path).unwrap();
    assert!(issues.is_empty() && texts.len() == 32);
    let model_dir = out.join("stage-knowledge-replay");
    let tok = TextTokenizer::for_model(&model_dir, None).unwrap();
    let (len, rows) = (cfg.data.seq_len, cfg.data.micro_batch_rows);
    let final_bpc = ppl::score_texts(&Llama::load(&Cpu, &model_dir).unwrap(), &Cpu, &tok, &texts, len, len * rows)
        .unwrap()
        .bits_per_char;
    // (serde_json reads floats back to within an ulp.)
    assert!(
        (final_bpc - logged[2].1).abs() <= 1e-12 * final_bpc,
        "step 10's val_bpc {} differs from evaluate's bits per character {final_bpc}",
        logged[2].1
    );
    // And it falls: from the untrained model (the run's initialisation) through training.
    let untrained =
        Llama::random(&Cpu, LlamaConfig::from_file(cfg.model.config.as_ref().unwrap()).unwrap(), cfg.model.seed);
    let before = ppl::score_texts(&untrained, &Cpu, &tok, &texts, len, len * rows).unwrap().bits_per_char;
    println!(
        "validation bits per character: untrained {before:.4}, steps 5/6/10: {:.4} {:.4} {:.4}",
        logged[0].1, logged[1].1, logged[2].1
    );
    assert!(
        logged[0].1 < 0.9 * before && logged[2].1 < logged[0].1,
        "bits per character did not fall: {before} then {logged:?}"
    );
}

#[test]
fn each_run_draws_a_readable_loss_plot() {
    // The reference run wrote loss.png at the end of each stage.
    let png = reference().join("loss.png");
    let img = image::open(&png).unwrap_or_else(|e| panic!("{}: not a readable PNG: {e}", png.display())).to_rgb8();
    assert_eq!(img.dimensions(), (960, 540));
    let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
    // Not blank: the training curve's colour, both stage bands, and text or axes in dark pixels.
    assert!(count([31, 119, 180]) > 200, "no training-loss line");
    assert!(count([232, 240, 252]) > 10_000 && count([252, 244, 226]) > 10_000, "no shading for the two stages");
    let dark = img.pixels().filter(|p| p.0.iter().all(|&x| x < 90)).count();
    assert!(dark > 500, "no axes or text ({dark} dark pixels)");
    assert!(!reference().join(".loss-tmp.png").exists(), "the temporary file was left behind");
}

#[test]
fn mixed_precision_trains_like_f32_keeps_fp32_masters_and_resumes_bit_identically() {
    use llama_cpt_ops::convert::round_to_bf16;
    let bf16 = Cpu::bf16();
    let f32_losses: Vec<f64> = losses(reference()).iter().map(|(_, b)| f64::from_bits(*b)).collect();
    let out = fresh("bf16");
    let o = train::run(&bf16, &config(&out, &[]), &AtomicBool::new(false)).unwrap();
    assert!(!o.interrupted && o.global_step == 10);
    let want_losses = losses(&out);
    let l: Vec<f64> = want_losses.iter().map(|(_, b)| f64::from_bits(*b)).collect();
    // bf16 parameters and activations change the numbers, not the course of training.
    for (i, (a, b)) in l.iter().zip(&f32_losses).enumerate() {
        assert!((a - b).abs() <= 0.03 * b, "step {}: bf16 loss {a} vs f32 {b}", i + 1);
    }
    assert_ne!(l, f32_losses, "the bf16 run must round something");
    let worst = l.iter().zip(&f32_losses).map(|(a, b)| (a - b).abs() / b).fold(0.0, f64::max);
    eprintln!("bf16 (emulated) vs f32 losses: max relative difference {worst:.2e} over 10 steps; bf16 {:.4} -> {:.4}, f32 {:.4} -> {:.4}", l[0], l[9], f32_losses[0], f32_losses[9]);
    // The exported weights are the bf16 working parameters; the checkpoint keeps fp32 masters.
    let final_weights = weights(&out.join("stage-knowledge-replay"));
    assert!(
        final_weights.iter().flatten().all(|&w| round_to_bf16(f32::from_bits(w)).to_bits() == w),
        "weights are bf16 values"
    );
    // Every checkpoint (mid-stage and at the stage boundary) holds the masters' extra precision.
    for ck in checkpoint::complete_checkpoints(&out).unwrap() {
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ck.join("optimizer.json")).unwrap()).unwrap();
        assert!(manifest["files"][0]["pieces"].as_array().unwrap().iter().all(|p| p["master"] == true));
        let masters = common::read_tensors(&ck.join("optimizer-rank00000.safetensors"));
        let off_grid = masters
            .iter()
            .filter(|(k, _)| k.ends_with(".master"))
            .flat_map(|(_, (_, v))| v)
            .filter(|&&x| round_to_bf16(x as f32) as f64 != x)
            .count();
        assert!(
            off_grid > 1000,
            "{}: the masters hold more than bf16 precision ({off_grid} values off the bf16 grid)",
            ck.display()
        );
    }
    // Resumed in f32 (ZeRO-0 keeps no masters), the parameters take the stored fp32 masters.
    {
        use llama_cpt::backend::AdamWConfig;
        use llama_cpt::dist::{DataParallel, ZeroStage};
        let ck = checkpoint::complete_checkpoints(&out).unwrap().remove(0);
        let mut model = Llama::load(&Cpu, &ck).unwrap();
        let single = llama_cpt_parallel::SingleProcess::default();
        let mut dp = DataParallel::new(
            &Cpu,
            &single,
            &model.params,
            &vec![true; model.params.len()],
            ZeroStage::Zero0,
            1 << 20,
            AdamWConfig::default(),
        );
        checkpoint::load(&ck, &Cpu, &mut model, &mut dp).unwrap();
        let masters = common::read_tensors(&ck.join("optimizer-rank00000.safetensors"));
        for p in &model.params {
            let want: Vec<f32> = masters[&format!("{}@0.master", p.name)].1.iter().map(|&x| x as f32).collect();
            assert_eq!(p.value.to_host(&Cpu), want, "{}: f32 resume from a mixed-precision checkpoint", p.name);
        }
    }
    // Stops inside stage 1, at the boundary and inside stage 2 resume onto the same trajectory.
    let resumed = fresh("bf16-resumed");
    for stop in [3u64, 6, 8] {
        let o =
            train::run(&bf16, &config(&resumed, &[&format!("run.stop_after_steps={stop}")]), &AtomicBool::new(false))
                .unwrap();
        assert!(o.interrupted && o.global_step == stop);
    }
    train::run(&bf16, &config(&resumed, &[]), &AtomicBool::new(false)).unwrap();
    assert_eq!(losses(&resumed), want_losses, "per-step losses after resuming");
    assert_eq!(weights(&resumed.join("stage-knowledge-replay")), final_weights, "final weights after resuming");
    // ZeRO-1 (one process) gathers bf16 parameters from its masters: the same numbers again.
    let zero1 = fresh("bf16-zero1");
    train::run(&bf16, &config(&zero1, &["parallel.zero_stage=1"]), &AtomicBool::new(false)).unwrap();
    assert_eq!(losses(&zero1), want_losses, "ZeRO-1 in mixed precision");
}

/// The files of a checkpoint folder (name → bytes), the checksum list and marker included.
fn checkpoint_files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap())
        })
        .collect()
}

/// A checkpoint written on the background thread is byte for byte the one written in place, and
/// a run with asynchronous saves ends where one with synchronous saves does.
#[test]
fn asynchronous_checkpoints_equal_synchronous_ones() {
    let run = |name: &str, async_save: bool| {
        let out = fresh(name);
        let set = format!("run.async_checkpoint={async_save}");
        let o = train::run(
            &Cpu,
            &config(&out, &["run.checkpoint_every=2", "run.keep_checkpoints=3", &set]),
            &AtomicBool::new(false),
        )
        .unwrap();
        assert_eq!(o.global_step, 10);
        out
    };
    let (a, s) = (run("async-save", true), run("sync-save", false));
    let steps: Vec<String> = checkpoint::complete_checkpoints(&a)
        .unwrap()
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        steps,
        ["step-00000006", "step-00000008", "step-00000010"],
        "saved at 2, 4, 6 (also the stage end), 8 and 10; the newest 3 kept"
    );
    for step in &steps {
        let (fa, fs) =
            (checkpoint_files(&a.join("checkpoints").join(step)), checkpoint_files(&s.join("checkpoints").join(step)));
        assert_eq!(fa.keys().collect::<Vec<_>>(), fs.keys().collect::<Vec<_>>(), "{step}: the same files");
        for (name, bytes) in &fa {
            assert!(bytes == &fs[name], "{step}/{name} differs between the asynchronous and the synchronous save");
        }
        checkpoint::verify(&a.join("checkpoints").join(step)).unwrap();
    }
    assert_eq!(losses(&a), losses(&s));
}

/// `start_save` copies the state to host memory before it returns: what training does next
/// (here: the weights overwritten) does not reach the checkpoint, which is published only by
/// `finish`.
#[test]
fn a_checkpoint_in_flight_holds_the_state_of_its_step() {
    use llama_cpt::backend::AdamWConfig;
    use llama_cpt::dist::{DataParallel, ZeroStage};
    let out = fresh("in-flight-save");
    let cfg = config(&out, &[]);
    let mut model =
        Llama::random(&Cpu, llama_cpt::config::LlamaConfig::from_file(cfg.model.config.as_ref().unwrap()).unwrap(), 3);
    let comm = llama_cpt_parallel::SingleProcess::default();
    let trainable = vec![true; model.params.len()];
    let dp =
        DataParallel::new(&Cpu, &comm, &model.params, &trainable, ZeroStage::Zero0, 1 << 20, AdamWConfig::default());
    let state = checkpoint::TrainerState { global_step: 7, ..checkpoint::TrainerState::fresh() };
    let before: Vec<Vec<f32>> = model.params.iter().map(|p| p.value.buf.to_vec()).collect();
    let pending = checkpoint::start_save(&out, 2, &Cpu, &model, &dp, &state, None).unwrap();
    for p in &mut model.params {
        let n = p.value.numel();
        *p.value.buf_mut() = vec![-7.0; n];
    }
    assert!(checkpoint::complete_checkpoints(&out).unwrap().is_empty(), "not published before finish");
    let dir = pending.finish(&dp).unwrap();
    assert_eq!(dir, out.join("checkpoints/step-00000007"));
    checkpoint::verify(&dir).unwrap();
    let saved = Llama::<Cpu>::load(&Cpu, &dir).unwrap();
    let after: Vec<Vec<f32>> = saved.params.iter().map(|p| p.value.buf.to_vec()).collect();
    assert!(after == before, "the checkpoint holds the weights of its step, not those written after start_save");
}

/// `run.on_save_failure = "continue"`: a periodic save that fails is reported and training goes
/// on; the final save of the stop still has to succeed, and does.
#[test]
fn a_failed_periodic_save_lets_the_run_go_on_when_asked() {
    let out = fresh("save-failure-continue");
    std::fs::create_dir_all(out.join("checkpoints")).unwrap();
    // A file where step 4's temporary folder goes: that save fails.
    std::fs::write(out.join("checkpoints/.step-00000004.tmp"), "in the way").unwrap();
    let settings = ["run.checkpoint_every=2", "run.stop_after_steps=6", "run.on_save_failure=continue"];
    let o = train::run(&Cpu, &config(&out, &settings), &AtomicBool::new(false)).unwrap();
    assert!(o.interrupted && o.global_step == 6);
    let names: Vec<PathBuf> = checkpoint::complete_checkpoints(&out).unwrap();
    assert_eq!(names, vec![out.join("checkpoints/step-00000002"), out.join("checkpoints/step-00000006")]);
    // The default stops at the failed save, with the earlier checkpoint intact.
    let out = fresh("save-failure-stop");
    std::fs::create_dir_all(out.join("checkpoints")).unwrap();
    std::fs::write(out.join("checkpoints/.step-00000004.tmp"), "in the way").unwrap();
    let err = train::run(&Cpu, &config(&out, &settings[..2]), &AtomicBool::new(false)).unwrap_err();
    assert!(format!("{err:#}").contains("step-00000004"), "{err:#}");
    assert_eq!(checkpoint::complete_checkpoints(&out).unwrap(), vec![out.join("checkpoints/step-00000002")]);
    let bad =
        TrainConfig::from_file(&prepared().join("data/default.toml"), &["run.on_save_failure=ignore".to_string()]);
    assert!(format!("{:#}", bad.unwrap_err()).contains("run.on_save_failure"));
}
