//! Shared helpers of the integration tests.
#![allow(dead_code)]
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python with torch and transformers: `LLAMA_CPT_PYTHON`, else the repo's `.venv` (which
/// `.ci/run` creates from tools/requirements.txt).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("LLAMA_CPT_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo_root().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with torch/transformers: run .ci/run once, or `python3 -m venv .venv && .venv/bin/pip install -r tools/requirements.txt`, or set LLAMA_CPT_PYTHON"
    );
    venv
}

/// Runs a script under tools/ with the oracle Python; panics with its output if it fails.
pub fn run_python(script: &str, args: &[&Path]) -> String {
    let out = Command::new(python())
        .arg(repo_root().join("tools").join(script))
        .args(args)
        .output()
        .expect("starting python");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "tools/{script} failed:\n{text}");
    text
}

/// A safetensors file's tensors as (shape, f32 values); integer tensors are converted.
pub fn read_tensors(path: &Path) -> std::collections::HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let d = v.data();
            let vals: Vec<f64> = match v.dtype() {
                Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
                Dtype::I64 => d.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
                other => panic!("unexpected dtype {other:?}"),
            };
            (name, (v.shape().to_vec(), vals))
        })
        .collect()
}

/// max |a-b| / max |b|.
pub fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((*x as f64 - y).abs()));
    if a.iter().any(|x| !x.is_finite()) {
        f64::INFINITY
    } else {
        diff / scale
    }
}
