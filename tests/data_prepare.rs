//! prepare-data on generated text with a tokenizer trained in the test: determinism, masks,
//! BOS/EOS, bad input, corrupted shards, the CLI.
mod data_common;

use std::path::{Path, PathBuf};

use data_common::*;
use llama_cpt::data::corpus::{CorpusOptions, TxtSplit};
use llama_cpt::data::prepare::{prepare_subset, read_manifest, PrepareConfig};
use llama_cpt::data::shard::ShardReader;
use llama_cpt::data::tokenizer::{SpecialTokenOptions, TextTokenizer};
use llama_cpt::data::{Loader, LoaderConfig, Ordering, SubsetSpec};

fn words(seed: u64, n: usize) -> String {
    const W: &[&str] = &[
        "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "数据", "模型", "训练", "中文", ".",
    ];
    lengths(seed, n, W.len()).into_iter().map(|i| W[i - 1]).collect::<Vec<_>>().join(" ")
}

/// A corpus folder with JSONL text, Colossal QA records and .txt files.
fn corpus(dir: &Path) -> Vec<String> {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let mut texts = Vec::new();
    let mut jl = String::new();
    for i in 0..300 {
        let t = words(i, 5 + (i as usize * 7) % 60);
        jl += &serde_json::json!({ "text": t }).to_string();
        jl.push('\n');
        texts.push(t);
    }
    std::fs::write(dir.join("a.jsonl"), jl).unwrap();
    let mut qa = String::new();
    for i in 0..100 {
        let (s, t) = (format!("问题 {}：", words(1000 + i, 6)), words(2000 + i, 9));
        qa += &serde_json::json!({ "source": s, "target": t, "category": "replay" }).to_string();
        qa.push('\n');
        texts.push(s + &t);
    }
    std::fs::write(dir.join("sub/qa.jsonl"), qa).unwrap();
    let mut txt = String::new();
    for i in 0..50 {
        let t = words(3000 + i, 30);
        txt += &t;
        txt += "\n\n";
        texts.push(t);
    }
    std::fs::write(dir.join("b.txt"), txt).unwrap();
    texts
}

fn tokenizer(dir: &Path, texts: &[String]) -> TextTokenizer {
    let p = train_tokenizer(dir, texts, 300);
    TextTokenizer::load(&p, &SpecialTokenOptions { add_bos: Some(true), ..Default::default() }).unwrap()
}

fn pcfg(name: &str, input: &Path, output: &Path) -> PrepareConfig {
    PrepareConfig {
        name: name.into(),
        input: input.into(),
        output: output.into(),
        shard_tokens: 2000,
        corpus: CorpusOptions { txt_split: TxtSplit::BlankLine },
        strict: false,
        progress: false,
    }
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn same_input_same_shard_bytes_at_any_thread_count() {
    let d = tempdir("prep-det");
    let texts = corpus(&d.join("in"));
    let tok = tokenizer(&d, &texts);
    let mut outs = Vec::new();
    for threads in [1, 2, 3] {
        let out = d.join(format!("out{threads}"));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let (m, st) = pool.install(|| prepare_subset(&tok, &pcfg("mix", &d.join("in"), &out))).unwrap();
        assert!(m.shards.len() >= 3, "expected several shards, got {}", m.shards.len());
        assert_eq!(m.n_docs, 450);
        assert_eq!(m.n_skipped, 0, "{:?}", m.skipped);
        assert!(st.n_tokens > 0);
        outs.push(files(&out.join("mix")));
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
    // Re-running into the same folder replaces the previous run exactly.
    let (m2, _) = prepare_subset(&tok, &pcfg("mix", &d.join("in"), &d.join("out1"))).unwrap();
    assert_eq!(files(&d.join("out1/mix")), outs[0]);
    assert_eq!(m2, read_manifest(&d.join("out1/mix")).unwrap());
}

#[test]
#[allow(clippy::needless_range_loop)] // document i of the shard is line i of the source
fn documents_get_bos_eos_and_source_tokens_no_loss() {
    let d = tempdir("prep-mask");
    let texts = corpus(&d.join("in"));
    let tok = tokenizer(&d, &texts);
    let (bos, eos) = (tok.bos.unwrap(), tok.eos.unwrap());
    prepare_subset(&tok, &pcfg("qa", &d.join("in/sub"), &d.join("out"))).unwrap();
    let r = ShardReader::open(d.join("out/qa/shard-00000.bin")).unwrap();
    let raw: Vec<&str> = std::fs::read_to_string(d.join("in/sub/qa.jsonl")).unwrap().leak().lines().collect();
    for i in 0..r.n_docs() {
        let (ids, mask) = r.doc(i);
        let ids = ids.to_vec();
        assert_eq!(ids[0], bos);
        assert_eq!(*ids.last().unwrap(), eos);
        assert_eq!(mask[0], 0, "BOS of a prompt record belongs to the prompt");
        assert_eq!(*mask.last().unwrap(), 1, "EOS carries loss");
        // mask = 0…0 1…1, and the masked tokens decode to the prompt.
        let n_src = mask.iter().take_while(|&&m| m == 0).count();
        assert!(mask[n_src..].iter().all(|&m| m == 1));
        let v: serde_json::Value = serde_json::from_str(raw[i]).unwrap();
        let src = tok.inner().decode(&ids[1..n_src], false).unwrap();
        assert_eq!(src, v["source"].as_str().unwrap());
        let tgt = tok.inner().decode(&ids[n_src..ids.len() - 1], false).unwrap();
        assert_eq!(tgt, v["target"].as_str().unwrap());
    }
    // Plain text: everything has loss.
    prepare_subset(&tok, &pcfg("plain", &d.join("in/a.jsonl"), &d.join("out"))).unwrap();
    let r = ShardReader::open(d.join("out/plain/shard-00000.bin")).unwrap();
    assert!(r.mask().iter().all(|&m| m == 1));
    // --no-eos / as-the-tokenizer-says: no tokenizer_config.json and a ByteLevel post-processor
    // that adds nothing → no BOS.
    let plain =
        TextTokenizer::load(&tok.path, &SpecialTokenOptions { add_eos: Some(false), ..Default::default() }).unwrap();
    assert!(!plain.add_bos && !plain.add_eos);
    // Model config ids win.
    std::fs::write(d.join("config.json"), r#"{"bos_token_id": 1, "eos_token_id": [0, 5], "vocab_size": 69104}"#)
        .unwrap();
    let t = TextTokenizer::load(
        &tok.path,
        &SpecialTokenOptions { model_config: Some(d.join("config.json")), ..Default::default() },
    )
    .unwrap();
    assert_eq!((t.bos, t.eos, t.vocab_size), (Some(1), Some(0), 69104));
}

#[test]
fn bad_input_is_skipped_and_reported_with_file_and_line() {
    let d = tempdir("prep-bad");
    let texts = corpus(&d.join("good"));
    let tok = tokenizer(&d, &texts);
    let inp = d.join("bad");
    std::fs::create_dir_all(&inp).unwrap();
    std::fs::write(
        inp.join("x.jsonl"),
        b"{\"text\": \"the cat\"}\n{\"text\": oops}\n{\"txt\": \"typo\"}\n{\"text\": \"caf\xc3\x28\"}\n{\"text\": \"   \"}\n{\"source\": \"q\", \"target\": \"\"}\n{\"text\": \"the dog\"}\n"
            .as_slice(),
    )
    .unwrap();
    std::fs::write(inp.join("empty.jsonl"), b"").unwrap();
    std::fs::write(inp.join("notes.md"), b"# not a corpus").unwrap();
    std::fs::write(inp.join("y.txt"), b"fine block\n\nbad \xff block\n\nlast block\n").unwrap();
    let (m, _) = prepare_subset(&tok, &pcfg("bad", &inp, &d.join("out"))).unwrap();
    assert_eq!(m.n_docs, 4, "{:?}", m.skipped);
    let x = inp.join("x.jsonl").display().to_string();
    let y = inp.join("y.txt").display().to_string();
    let expect = [
        format!("{}: EmptyFile", inp.join("empty.jsonl").display()),
        format!("{}: IgnoredFile", inp.join("notes.md").display()),
        format!("{x}:2: InvalidJson"),
        format!("{x}:3: MissingField"),
        format!("{x}:4: NotUtf8"),
        format!("{x}:5: EmptyDocument"),
        format!("{x}:6: EmptyDocument"),
        format!("{y}:3: NotUtf8"),
    ];
    assert_eq!(m.skipped.len(), expect.len(), "{:#?}", m.skipped);
    for e in &expect {
        assert!(m.skipped.iter().any(|s| s.starts_with(e.as_str())), "missing report {e:?} in {:#?}", m.skipped);
    }
    // Strict mode turns them into an error naming the file and line.
    let mut c = pcfg("bad", &inp, &d.join("out-strict"));
    c.strict = true;
    let err = format!("{:#}", prepare_subset(&tok, &c).unwrap_err());
    assert!(err.contains("strict") && err.contains("empty.jsonl"), "{err}");
    // A folder with nothing usable is an error, not an empty data set.
    let none = d.join("none");
    std::fs::create_dir_all(&none).unwrap();
    std::fs::write(none.join("e.jsonl"), b"").unwrap();
    assert!(prepare_subset(&tok, &pcfg("none", &none, &d.join("out"))).is_err());
}

fn corrupt(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(path).unwrap();
    f(&mut b);
    std::fs::write(path, b).unwrap();
}

#[test]
fn corrupted_shards_are_rejected_naming_the_shard() {
    let d = tempdir("prep-corrupt");
    let texts = corpus(&d.join("in"));
    let tok = tokenizer(&d, &texts);
    type Corrupt = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: [(&str, Corrupt, &str); 4] = [
        ("flip", Box::new(|b: &mut Vec<u8>| b[100] ^= 0x40), "checksum mismatch"),
        ("trunc", Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 9)), "truncated"),
        ("magic", Box::new(|b: &mut Vec<u8>| b[0] = b'X'), "bad magic"),
        ("header", Box::new(|b: &mut Vec<u8>| b.truncate(10)), "truncated"),
    ];
    for (name, f, msg) in cases {
        let out = d.join(format!("out-{name}"));
        prepare_subset(&tok, &pcfg("s", &d.join("in"), &out)).unwrap();
        let shard: PathBuf = out.join("s/shard-00001.bin");
        assert!(ShardReader::open(&shard).is_ok());
        corrupt(&shard, f);
        let err = ShardReader::open(&shard).err().expect("corrupted shard accepted").to_string();
        assert!(err.contains(msg) && err.contains("shard-00001.bin"), "{name}: {err}");
        let err = Loader::new(
            &[SubsetSpec::new(out.join("s"), 1.0)],
            LoaderConfig { seq_len: 32, ..Default::default() },
            None,
        )
        .err()
        .expect("loader accepted a corrupted shard");
        assert!(format!("{err:#}").contains("shard-00001.bin"), "{err:#}");
    }
}

#[test]
fn prepare_data_cli_then_loader() {
    let d = tempdir("prep-cli");
    let texts = corpus(&d.join("in"));
    let tokp = train_tokenizer(&d, &texts, 300);
    let out = d.join("out");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_prepare-data"))
        .args([
            "--tokenizer",
            tokp.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--no-progress",
            "--threads",
            "2",
        ])
        .args(["--input", &format!("web={}", d.join("in/a.jsonl").display())])
        .args(["--input", &format!("qa={}", d.join("in/sub").display())])
        .args(["--shard-tokens", "1000"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&st.stderr);
    assert!(st.status.success(), "{stderr}");
    assert!(stderr.contains("tokens/s per core"), "{stderr}");
    let subsets = [SubsetSpec::new(out.join("web"), 1.0), SubsetSpec::new(out.join("qa"), 2.0)];
    let cfg = LoaderConfig {
        seq_len: 128,
        global_batch_rows: 4,
        micro_batch_rows: 2,
        ordering: Ordering::Bucket { bins: 2 },
        max_epochs: Some(1),
        ..Default::default()
    };
    let mut l = Loader::new(&subsets, cfg, None).unwrap();
    let mut n = 0;
    while let Some(b) = l.next_micro_batch().unwrap() {
        assert_eq!(b.tokens.len(), b.rows * 128);
        n += b.rows;
    }
    let m0 = read_manifest(&out.join("web")).unwrap();
    let m1 = read_manifest(&out.join("qa")).unwrap();
    assert_eq!(n as u64 + l.skipped_rows(), (m0.n_tokens + 2 * m1.n_tokens).div_ceil(128));
    // Bad usage is a clear error.
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_prepare-data"))
        .args(["--tokenizer", tokp.to_str().unwrap(), "--output", out.to_str().unwrap(), "--input", "no-equals-sign"])
        .output()
        .unwrap();
    assert!(!st.status.success());
    assert!(String::from_utf8_lossy(&st.stderr).contains("NAME=PATH"));
}
