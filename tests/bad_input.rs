//! Broken model directories give errors that name the file and the field or tensor; none panics.
use llama_cpt::config::LlamaConfig;
use llama_cpt::cpu::Cpu;
use llama_cpt::model::Llama;
use llama_cpt::weights::StoreDtype;
use std::path::{Path, PathBuf};

fn fresh(name: &str, shards: Option<usize>) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bad-input").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let model = Llama::random(&Cpu, LlamaConfig::small(64, 16, 32, 2, 2, 1, false), 1);
    model.save(&Cpu, &dir, StoreDtype::F32, shards).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match Llama::<Cpu>::load(&Cpu, dir) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error does not mention {p:?}: {err}");
    }
}

#[test]
fn config_missing_or_invalid_field() {
    let dir = fresh("config-missing", None);
    edit_config(&dir, |v| {
        v.as_object_mut().unwrap().remove("num_hidden_layers");
    });
    assert_mentions(&load_err(&dir), &["config.json", "num_hidden_layers"]);
    let dir = fresh("config-invalid", None);
    edit_config(&dir, |v| v["rms_norm_eps"] = serde_json::json!("tiny"));
    assert_mentions(&load_err(&dir), &["config.json", "rms_norm_eps"]);
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert_mentions(&load_err(&dir), &["config.json", "not valid JSON"]);
}

#[test]
fn tensor_with_wrong_shape() {
    let dir = fresh("wrong-shape", None);
    edit_config(&dir, |v| v["intermediate_size"] = serde_json::json!(48));
    assert_mentions(
        &load_err(&dir),
        &["model.safetensors", "model.layers.0.mlp.", "has shape [16, 32], the config needs"],
    );
}

#[test]
fn tensor_with_wrong_dtype() {
    let dir = fresh("wrong-dtype", None);
    let bytes = vec![0u8; 16 * 4];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![16], &bytes).unwrap();
    safetensors::serialize_to_file(vec![("model.norm.weight", view)], None, &dir.join("model.safetensors")).unwrap();
    let err = load_err(&dir);
    assert_mentions(&err, &["model.safetensors", "model.norm.weight", "I32"]);
}

#[test]
fn truncated_safetensors_file() {
    let dir = fresh("truncated", None);
    let p = dir.join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 100).unwrap();
    assert_mentions(&load_err(&dir), &["model.safetensors", "truncated"]);
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(5).unwrap();
    assert_mentions(&load_err(&dir), &["model.safetensors"]);
}

#[test]
fn index_naming_a_missing_shard() {
    let dir = fresh("missing-shard", Some(4096));
    let shard = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("model-00002"))
        .expect("a second shard");
    std::fs::remove_file(&shard).unwrap();
    assert_mentions(&load_err(&dir), &["model.safetensors.index.json", "model-00002-of-"]);
}

#[test]
fn missing_tensor_and_unexpected_tensor() {
    let dir = fresh("missing-tensor", None);
    edit_config(&dir, |v| v["num_hidden_layers"] = serde_json::json!(3));
    assert_mentions(&load_err(&dir), &["model.layers.2.", "missing"]);
    let dir = fresh("extra-tensor", None);
    edit_config(&dir, |v| v["num_hidden_layers"] = serde_json::json!(1));
    assert_mentions(&load_err(&dir), &["model.layers.1.", "does not have"]);
}

#[test]
fn empty_directory() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bad-input/empty");
    std::fs::create_dir_all(&dir).unwrap();
    assert_mentions(&load_err(&dir), &["config.json"]);
}

#[test]
fn saving_to_an_unwritable_place_is_an_error() {
    let file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bad-input/a-file");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "x").unwrap();
    let model = Llama::random(&Cpu, LlamaConfig::small(64, 16, 32, 1, 2, 1, true), 1);
    let err = model.save(&Cpu, &file.join("model"), StoreDtype::F32, None).unwrap_err();
    assert!(format!("{err:#}").contains("a-file"), "{err:#}");
}
