//! Shared helpers of the integration tests.
#![allow(dead_code)]
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root, found at run time: `LLAMA_CPT_REPO`, else the working directory (cargo
/// runs tests from the package root; tools/device-check.sh runs a test binary built on another
/// machine from the repository root of the GPU machine, so no build-time path may be used).
pub fn repo_root() -> PathBuf {
    let root = match std::env::var_os("LLAMA_CPT_REPO") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::current_dir().expect("reading the working directory"),
    };
    assert!(
        root.join("tools").is_dir() && root.join("Cargo.toml").is_file(),
        "{} is not the llama-cpt repository (no tools/ or Cargo.toml): run the tests from its root, or set LLAMA_CPT_REPO",
        root.display()
    );
    root
}

/// The Python with torch and transformers, chosen at run time: `LLAMA_CPT_PYTHON`, else the
/// repo's `.venv` (which `.ci/run` creates from tools/requirements.txt), else `python3` on the
/// PATH if it imports torch (a GPU image has no `.venv`).
pub fn python() -> PathBuf {
    static FOUND: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("LLAMA_CPT_PYTHON") {
                return PathBuf::from(p);
            }
            let venv = repo_root().join(".venv/bin/python");
            if venv.exists() {
                return venv;
            }
            let system = PathBuf::from("python3");
            let has_torch = Command::new(&system).args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success());
            assert!(
                has_torch,
                "no Python with torch/transformers (no LLAMA_CPT_PYTHON, no {}, and python3 cannot import torch): run .ci/run once, or `python3 -m venv .venv && .venv/bin/pip install -r tools/requirements.txt`, or set LLAMA_CPT_PYTHON",
                venv.display()
            );
            system
        })
        .clone()
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
