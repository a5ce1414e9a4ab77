//! tools/recipe-smollm2.sh end to end with tiny settings (docs/recipe-smollm2.md): the real
//! SmolLM2-135M-Instruct imported, its vocabulary extended with Chinese pieces, two short
//! training stages, base and result evaluated side by side. Checks that results.json has every
//! field with finite numbers, that the extension lowers Chinese tokens per character, that the
//! short run leaves English bits per character near the base, that the split keeps 离离原上草
//! in training, and that a rerun skips every finished step. Needs the model and corpora
//! (tools/fetch-model.sh, tools/fetch-corpora.sh: `.ci/run` fetches them; the script runs both,
//! which return at once when the files are there) and python3 (standard library only).
mod common;
use common::repo_root;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// A folder of links to the binaries cargo built for this test (BIN_DIR for the script).
fn bin_dir(root: &Path) -> PathBuf {
    let dir = root.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, path) in [
        ("import-gguf", env!("CARGO_BIN_EXE_import-gguf")),
        ("extend-vocab", env!("CARGO_BIN_EXE_extend-vocab")),
        ("prepare-data", env!("CARGO_BIN_EXE_prepare-data")),
        ("pretrain", env!("CARGO_BIN_EXE_pretrain")),
        ("evaluate", env!("CARGO_BIN_EXE_evaluate")),
        ("generate", env!("CARGO_BIN_EXE_generate")),
        ("tokenizer-report", env!("CARGO_BIN_EXE_tokenizer-report")),
    ] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(path, &link).unwrap();
    }
    dir
}

fn run_recipe(root: &Path, out: &Path) -> (String, f64) {
    let t0 = Instant::now();
    let o = Command::new("bash")
        .arg(repo_root().join("tools/recipe-smollm2.sh"))
        .env("OUT", out)
        .env("BIN_DIR", bin_dir(root))
        .env("STAGE1_STEPS", "2")
        .env("STAGE2_STEPS", "3")
        .env("SEQ_LEN", "64")
        .env("ROWS", "1")
        .env("MICRO_ROWS", "1")
        .env("TARGET_VOCAB", "53248")
        .env("EVAL_ZH_DOCS", "4")
        .env("EVAL_EN_DOCS", "8")
        .env("MC_SHOTS", "0")
        .env("EVAL_EXTENDED", "0")
        .env("MACHINE_NOTE", "cargo test --test recipe (tiny settings)")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("starting bash tools/recipe-smollm2.sh");
    let secs = t0.elapsed().as_secs_f64();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "tools/recipe-smollm2.sh failed ({}):\n{text}", o.status);
    (text, secs)
}

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('.') {
        cur = match key.parse::<usize>() {
            Ok(i) => cur.get(i),
            Err(_) => cur.get(key),
        }
        .unwrap_or_else(|| panic!("results.json has no `{path}` (missing `{key}`)"));
    }
    cur
}

fn num(v: &Value, path: &str) -> f64 {
    let x = get(v, path).as_f64().unwrap_or_else(|| panic!("results.json `{path}` is not a number: {}", get(v, path)));
    assert!(x.is_finite(), "results.json `{path}` = {x}");
    x
}

/// Every number anywhere in the document is finite.
fn all_finite(v: &Value, path: &str) {
    match v {
        Value::Number(n) => assert!(n.as_f64().is_some_and(f64::is_finite), "{path} = {n}"),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| all_finite(x, &format!("{path}[{i}]"))),
        Value::Object(m) => m.iter().for_each(|(k, x)| all_finite(x, &format!("{path}.{k}"))),
        _ => {}
    }
}

#[test]
fn recipe_smollm2_tiny() {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("recipe-smollm2");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let out = root.join("out");

    let (log, secs) = run_recipe(&root, &out);
    println!("{log}");
    println!("recipe (tiny settings) took {secs:.1} s");

    // Every step ran and was printed.
    for s in [
        "fetch",
        "import",
        "split",
        "extend",
        "prepare",
        "pretrain",
        "tokenizers",
        "eval_base",
        "eval_extended",
        "eval_result",
    ] {
        assert!(log.contains(&format!("== recipe: [{s}] done in")), "step {s} did not run:\n{log}");
    }

    let text = std::fs::read_to_string(out.join("results.json")).expect("results.json");
    let r: Value = serde_json::from_str(&text).expect("results.json is not JSON (a NaN?)");
    all_finite(&r, "results");

    // Every field.
    for k in [
        "model",
        "finished_utc",
        "settings",
        "machine",
        "split",
        "tokens_per_char",
        "bits_per_char",
        "mc_accuracy",
        "generations",
        "training",
        "step_seconds",
        "targets",
    ] {
        get(&r, k);
    }
    assert_eq!(get(&r, "settings.stage1_steps").as_u64(), Some(2));
    assert_eq!(get(&r, "settings.stage2_steps").as_u64(), Some(3));
    assert_eq!(get(&r, "settings.seq_len").as_u64(), Some(64));
    assert!(get(&r, "machine.cpu").is_string() && num(&r, "machine.cores") >= 1.0);
    for lang in ["zh", "en"] {
        for k in ["base", "extended", "change"] {
            num(&r, &format!("tokens_per_char.{lang}.{k}"));
        }
    }
    for set in ["zh_heldout", "en_heldout", "grass"] {
        for k in ["base", "result", "change", "chars", "base_tokens", "result_tokens"] {
            num(&r, &format!("bits_per_char.{set}.{k}"));
        }
        assert!(
            num(&r, &format!("bits_per_char.{set}.base")) > 0.0
                && num(&r, &format!("bits_per_char.{set}.result")) > 0.0
        );
    }
    for mc in ["mmlu", "cmmlu", "ceval", "agieval", "gaokao"] {
        assert!(num(&r, &format!("mc_accuracy.{mc}.questions")) >= 1.0, "{mc}");
        assert_eq!(
            get(&r, &format!("mc_accuracy.{mc}.style")).as_str(),
            Some("colossal"),
            "{mc}: evaluate's default prompt style"
        );
        for k in ["base", "result"] {
            let acc = num(&r, &format!("mc_accuracy.{mc}.{k}"));
            assert!((0.0..=1.0).contains(&acc), "{mc} {k} accuracy {acc}");
        }
    }
    let gens = get(&r, "generations").as_array().unwrap();
    assert_eq!(gens.len(), 2);
    assert_eq!(get(&r, "generations.0.prompt").as_str(), Some("离离原上草，"));
    for (i, g) in gens.iter().enumerate() {
        for k in ["prompt", "base", "result"] {
            assert!(g.get(k).is_some_and(Value::is_string), "generations[{i}].{k}");
        }
    }
    for stage in ["embeddings", "zh-cpt"] {
        for k in ["first_loss", "last_loss", "tokens_per_s"] {
            assert!(num(&r, &format!("training.{stage}.{k}")) > 0.0, "training.{stage}.{k}");
        }
    }
    assert_eq!(num(&r, "training.embeddings.steps"), 2.0);
    assert_eq!(num(&r, "training.zh-cpt.steps"), 3.0);
    assert_eq!(num(&r, "training.tokens"), (5 * 64) as f64);
    assert!(num(&r, "training.seconds_per_step") > 0.0);
    for t in [
        "zh_tokens_per_char_down_40pct",
        "zh_heldout_bpc_below_base",
        "en_heldout_bpc_within_2pct",
        "grass_poem_continued",
        "grass_poem_bpc_falls",
    ] {
        assert!(get(&r, &format!("targets.{t}")).is_boolean(), "targets.{t}");
    }

    // The extension makes Chinese cheaper and leaves English alone.
    let (zh_b, zh_e) = (num(&r, "tokens_per_char.zh.base"), num(&r, "tokens_per_char.zh.extended"));
    assert!(zh_e < zh_b, "Chinese tokens/char {zh_b} → {zh_e}");
    let (en_b, en_e) = (num(&r, "tokens_per_char.en.base"), num(&r, "tokens_per_char.en.extended"));
    assert!(en_e <= en_b * 1.001, "English tokens/char {en_b} → {en_e}");
    // Five tiny steps must not destroy English.
    let (bpc_b, bpc_r) = (num(&r, "bits_per_char.en_heldout.base"), num(&r, "bits_per_char.en_heldout.result"));
    assert!(bpc_r < 1.5 * bpc_b, "English bits/char {bpc_b} → {bpc_r}");
    println!(
        "zh tokens/char {zh_b:.3} → {zh_e:.3}; en bits/char {bpc_b:.4} → {bpc_r:.4}; zh bits/char {:.3} → {:.3}",
        num(&r, "bits_per_char.zh_heldout.base"),
        num(&r, "bits_per_char.zh_heldout.result")
    );

    // The split: 离离原上草 stays in training, held-out sets are every 10th / 20th.
    let read = |f: &str| std::fs::read_to_string(out.join("data").join(f)).unwrap();
    assert!(!read("zh-heldout.jsonl").contains("离离原上草"));
    assert!(read("zh-train.jsonl").contains("离离原上草"));
    assert!(read("grass.jsonl").contains("一岁一枯荣"));
    let n = |f: &str| read(f).lines().count();
    // tang300 + song100: 409 poems → 40 held out.
    assert!((35..=45).contains(&n("zh-heldout.jsonl")), "zh held-out: {} poems", n("zh-heldout.jsonl"));
    let en_total = n("en-train.jsonl") + n("en-heldout.jsonl");
    assert_eq!(n("en-heldout.jsonl"), en_total / 20);
    assert_eq!((n("eval-zh.jsonl"), n("eval-en.jsonl")), (4, 8));

    // results.md: the table, the generations, settings and machine.
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    for s in [
        "| metric | base |",
        "zh tokens/char",
        "bits/char: held-out English",
        "## Greedy generations",
        "离离原上草，",
        "## Settings",
        "## Machine",
    ] {
        assert!(md.contains(s), "results.md lacks {s:?}:\n{md}");
    }

    // A rerun with the same settings skips every step (and rewrites the report).
    let (log2, secs2) = run_recipe(&root, &out);
    for s in ["import", "extend", "prepare", "pretrain", "eval_base", "eval_result"] {
        assert!(log2.contains(&format!("== recipe: [{s}] up to date, skipped")), "rerun did not skip {s}:\n{log2}");
    }
    assert!(secs2 < 60.0, "rerun took {secs2:.1} s:\n{log2}");
    println!("rerun (everything skipped) took {secs2:.1} s");

    // The model directories and checkpoints are 5 GB: keep only the results, logs and data.
    for d in ["models", "train", "prepared"] {
        let _ = std::fs::remove_dir_all(out.join(d));
    }
}
