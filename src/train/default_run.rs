//! The embedded default: with no config, `pretrain` builds everything it needs from a corpus the
//! project generates itself — a small invented world (people, towns, foods, pets) described in
//! plain text for stage 1 (knowledge injection) and asked about in question/answer records for
//! stage 2 (knowledge replay, prompt tokens masked) — trains a byte-level BPE tokenizer on it,
//! prepares shards, and returns the config of a two-stage run of a tiny LLaMA (about a minute on
//! two CPU cores).
use super::config::TrainConfig;
use crate::data::prepare::{prepare_subset, PrepareConfig};
use crate::data::tokenizer::{SpecialTokenOptions, TextTokenizer};
use anyhow::{anyhow, Context, Result};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::{sequence::Sequence, template::TemplateProcessing};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder,
};

const PEOPLE: [&str; 16] = [
    "Alda", "Boren", "Cima", "Dovik", "Elsa", "Farro", "Gint", "Hessa", "Ilo", "Jura", "Kesh", "Lumi", "Moro", "Nessa",
    "Orin", "Pavo",
];
const TOWNS: [&str; 8] = ["Pelmor", "Quist", "Rundle", "Sorra", "Tavel", "Umber", "Vesk", "Wyre"];
const FOODS: [&str; 8] =
    ["plums", "barley bread", "goat cheese", "river fish", "honey cakes", "green beans", "salted nuts", "apple soup"];
const PETS: [&str; 8] = [
    "a grey cat",
    "a green owl",
    "a small dog",
    "two hens",
    "a black goat",
    "a tame fox",
    "a blue parrot",
    "an old horse",
];
const PLACES: [&str; 6] = ["the market", "the mill", "the harbour", "the school", "the bakery", "the old bridge"];

/// The invented world: person i lives in one town, likes one food, keeps one pet, works at a place.
fn facts(i: usize) -> (&'static str, &'static str, &'static str, &'static str, &'static str) {
    (
        PEOPLE[i],
        TOWNS[(i * 5 + 1) % TOWNS.len()],
        FOODS[(i * 3 + 2) % FOODS.len()],
        PETS[(i * 7 + 3) % PETS.len()],
        PLACES[(i * 11) % PLACES.len()],
    )
}

fn fact_sentences(i: usize) -> Vec<String> {
    let (p, t, f, pet, w) = facts(i);
    vec![
        format!("{p} lives in {t}."),
        format!("{p} likes {f}."),
        format!("{p} keeps {pet}."),
        format!("{p} works at {w} in {t}."),
    ]
}

/// A plain-text paragraph about a few people.
fn story(rng: &mut StdRng) -> String {
    let mut idx: Vec<usize> = (0..PEOPLE.len()).collect();
    idx.shuffle(rng);
    let mut sentences: Vec<String> = idx[..rng.gen_range(2..5)].iter().flat_map(|&i| fact_sentences(i)).collect();
    sentences.shuffle(rng);
    let t = TOWNS[rng.gen_range(0..TOWNS.len())];
    sentences.push(format!("In {t} the days are long and the people are kind."));
    sentences.join(" ")
}

/// One question about the invented world.
#[derive(Clone, Debug, PartialEq)]
pub struct WorldQuestion {
    /// "Where does Alda live?"
    pub question: String,
    /// The answer as a sentence: "Alda lives in Quist."
    pub sentence: String,
    /// The short answer: "Quist".
    pub answer: &'static str,
    /// Every possible answer of this kind of question (the towns, …), the right one included:
    /// where multiple-choice alternatives come from.
    pub pool: &'static [&'static str],
}

/// Question `kind` (0 home town, 1 food, 2 pet, 3 workplace) about person `i`.
pub fn world_question(i: usize, kind: usize) -> WorldQuestion {
    let (p, t, f, pet, w) = facts(i);
    let (question, sentence, answer, pool): (_, _, _, &'static [&'static str]) = match kind {
        0 => (format!("Where does {p} live?"), format!("{p} lives in {t}."), t, &TOWNS),
        1 => (format!("What does {p} like?"), format!("{p} likes {f}."), f, &FOODS),
        2 => (format!("What does {p} keep?"), format!("{p} keeps {pet}."), pet, &PETS),
        _ => (format!("Where does {p} work?"), format!("{p} works at {w}."), w, &PLACES),
    };
    WorldQuestion { question, sentence, answer, pool }
}

/// Every question about the world: each person, each kind (64).
pub fn world_questions() -> Vec<WorldQuestion> {
    (0..PEOPLE.len()).flat_map(|i| (0..4).map(move |k| world_question(i, k))).collect()
}

/// A question/answer record: `source` is the prompt (no loss), `target` the answer.
fn qa(rng: &mut StdRng) -> serde_json::Value {
    let i = rng.gen_range(0..PEOPLE.len());
    // An i32 draw, as this always was: the generated corpus stays the same.
    let q = world_question(i, rng.gen_range(0..4i32) as usize);
    serde_json::json!({"source": format!("Question: {}\nAnswer:", q.question), "target": format!(" {}", q.sentence), "category": "world"})
}

fn write_jsonl(path: &Path, lines: impl Iterator<Item = serde_json::Value>) -> Result<()> {
    std::fs::create_dir_all(path.parent().unwrap())?;
    let text: String = lines.map(|v| format!("{v}\n")).collect();
    crate::fsutil::write_atomic(path, text.as_bytes())
}

/// Trains a byte-level BPE tokenizer (with `<s>` = 0 and `</s>` = 1) on `texts` and saves it.
/// With `prepend_bos` its post-processor adds `<s>` as LLaMA's does, so that inference
/// (`TextTokenizer::for_model`: evaluate, generate, the trainer's bits per character) starts
/// texts with BOS like the training data.
pub fn train_bpe_tokenizer(path: &Path, texts: &[String], vocab_size: usize, prepend_bos: bool) -> Result<()> {
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from("<s>", true), AddedToken::from("</s>", true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok =
        TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
            .with_post_processor(Some(ByteLevel::default().into()))
            .with_decoder(Some(ByteLevel::default().into()))
            .build()
            .map_err(|e| anyhow!("building a tokenizer: {e}"))?;
    tok.train(&mut trainer, texts.iter()).map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    if prepend_bos {
        let bos = TemplateProcessing::builder()
            .try_single("<s> $A")
            .and_then(|b| b.try_pair("<s> $A <s> $B"))
            .map_err(|e| anyhow!("a BOS template: {e}"))?
            .special_tokens(vec![("<s>", 0)])
            .build()
            .map_err(|e| anyhow!("a BOS template: {e}"))?;
        tok.with_post_processor(Some(Sequence::new(vec![ByteLevel::default().into(), bos.into()])));
    }
    tok.save(path, true).map_err(|e| anyhow!("writing {}: {e}", path.display()))
}

/// Generates the corpus, tokenizer, shards and model config under `out/data`, writes the run's
/// config there (`default.toml`, its paths relative to its own folder, so that it runs as is from
/// any directory and as a starting point for other runs) and returns it, with `overrides` applied.
pub fn prepare(out: &Path, overrides: &[String]) -> Result<TrainConfig> {
    let data = out.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let (stories, qas) = write_raw_corpora(&data)?;
    let tok_path = data.join("tokenizer.json");
    let tok = train_default_tokenizer(&tok_path, &stories, &qas)?;
    for name in ["world", "qa", "heldout"] {
        let cfg = PrepareConfig {
            name: name.into(),
            input: data.join("raw").join(name),
            output: data.join("shards"),
            shard_tokens: 1 << 20,
            corpus: Default::default(),
            strict: true,
            progress: false,
        };
        prepare_subset(&tok, &cfg).with_context(|| format!("preparing the default {name} data"))?;
    }
    write_model_config(&data, &tok)?;
    let text = config_text(tok_path.strip_prefix(&data).unwrap_or(&tok_path));
    crate::fsutil::write_atomic(&config_path(out), text.as_bytes())?;
    TrainConfig::parse(&text, &config_path(out).display().to_string(), &data, overrides)
}

/// The invented world's stories, held-out stories (some also as a text set) and QA records, as
/// JSON lines under `data/raw/`; returns the stories and the QA records.
fn write_raw_corpora(data: &Path) -> Result<(Vec<String>, Vec<serde_json::Value>)> {
    let mut rng = StdRng::seed_from_u64(20231);
    let stories: Vec<String> = (0..2400).map(|_| story(&mut rng)).collect();
    let heldout: Vec<String> = (0..200).map(|_| story(&mut rng)).collect();
    let qas: Vec<serde_json::Value> = (0..1200).map(|_| qa(&mut rng)).collect();
    write_jsonl(&data.join("raw/world/stories.jsonl"), stories.iter().map(|s| serde_json::json!({"text": s})))?;
    write_jsonl(&data.join("raw/heldout/stories.jsonl"), heldout.iter().map(|s| serde_json::json!({"text": s})))?;
    // A few of the held-out stories as text, scored for bits per character during training.
    write_jsonl(&data.join("heldout-text.jsonl"), heldout[..32].iter().map(|s| serde_json::json!({"text": s})))?;
    write_jsonl(&data.join("raw/qa/qa.jsonl"), qas.iter().cloned())?;
    Ok((stories, qas))
}

/// A 448-piece byte-level BPE learnt on the stories and QA texts, BOS and EOS added.
fn train_default_tokenizer(tok_path: &Path, stories: &[String], qas: &[serde_json::Value]) -> Result<TextTokenizer> {
    let mut texts = stories.to_vec();
    texts.extend(qas.iter().map(|q| format!("{}{}", q["source"].as_str().unwrap(), q["target"].as_str().unwrap())));
    train_bpe_tokenizer(tok_path, &texts, 448, true)?;
    TextTokenizer::load(tok_path, &SpecialTokenOptions { model_config: None, add_bos: Some(true), add_eos: Some(true) })
}

/// The tiny LLaMA's HF `config.json` (GQA 2:1, tied embeddings; vocabulary padded to a multiple of
/// 64). Two heads of 64, not four of 32: the same parameters, and a head_dim the CUDA tensor-core
/// attention kernels serve, so that the default run on `--device cuda` exercises them.
fn write_model_config(data: &Path, tok: &TextTokenizer) -> Result<()> {
    let vocab = (tok.vocab_size as usize).div_ceil(64) * 64;
    let model_config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 1024, "tie_word_embeddings": true, "bos_token_id": tok.bos, "eos_token_id": tok.eos,
        "hidden_act": "silu",
    });
    crate::fsutil::write_atomic(&data.join("config.json"), serde_json::to_string_pretty(&model_config)?.as_bytes())
}

/// The default run's TOML, its paths relative to the data folder (`tok`: the tokenizer's).
fn config_text(tok: &Path) -> String {
    format!(
        r#"
[model]
config = "{cfg}"
tokenizer = "{tok}"
seed = 1

[data]
seq_len = 128
micro_batch_rows = 8
seed = 7
ordering = "bucket"
bins = 4

# Stage 1, knowledge injection: plain text about the invented world.
[[stages]]
name = "knowledge-injection"
datasets = [{{ dir = "{world}" }}]
steps = 90
global_batch_rows = 16
lr = 3e-3
warmup_steps = 10

# Stage 2, knowledge replay: question/answer records, loss on the answers only, with a share of
# stage-1 text replayed.
[[stages]]
name = "knowledge-replay"
datasets = [{{ dir = "{qa}", weight = 3.0 }}, {{ dir = "{world}", weight = 1.0 }}]
steps = 40
global_batch_rows = 16
lr = 1e-3
warmup_steps = 4

[run]
out_dir = "{out}"
checkpoint_every = 25
keep_checkpoints = 2
log_every = 10
eval_datasets = [{{ dir = "{heldout}" }}]
eval_texts = ["{heldout_text}"]
eval_every = 30
eval_batches = 4
"#,
        cfg = "config.json",
        tok = tok.display(),
        world = "shards/world",
        qa = "shards/qa",
        heldout = "shards/heldout",
        heldout_text = "heldout-text.jsonl",
        // The run writes next to its data folder.
        out = "..",
    )
}

/// Where [`prepare`] writes the default run's config.
pub fn config_path(out: &Path) -> PathBuf {
    out.join("data").join("default.toml")
}

/// The config [`prepare`] wrote (for the other ranks of a data-parallel default run).
pub fn load_prepared(out: &Path, overrides: &[String]) -> Result<TrainConfig> {
    TrainConfig::from_file(&config_path(out), overrides)
}

/// Where the default run writes: `runs/default`.
pub fn default_out_dir() -> PathBuf {
    PathBuf::from("runs/default")
}
