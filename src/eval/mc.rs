//! Multiple-choice benchmarks scored by the first predicted token: the answer is the argmax over
//! the choice letters' logits (per letter, the max over its token ids). Two prompt styles:
//! - `colossal` (default): byte for byte ColossalEval's prompts for base models, its few-shot
//!   truncation and its letter token ids ([`super::colossal`]), so scores sit beside its tables;
//! - `original`: the benchmarks' own layouts — a subject header, the dev examples as shots (fewer
//!   when the context would overflow), `Answer:` / `答案：`, letters spaced and unspaced.
//!
//! Layouts read (as published):
//! - MMLU: `{dev,test}/{subject}_{dev,test}.csv`, no header: question, A, B, C, D, answer;
//! - CMMLU: `{dev,test}/{subject}.csv`, header `,Question,A,B,C,D,Answer`;
//! - C-Eval: `{dev,val}/{subject}_{dev,val}.csv`, header `id,question,A,B,C,D,answer[,explanation]`
//!   (its test split has no answers; the val split is scored);
//! - AGIEval: `{task}.jsonl` with `passage`, `question`, `options` (`"(A)…"`), `label`, scored
//!   zero-shot (it ships no dev split);
//! - GAOKAO-Bench multiple-choice JSON: `{"example": [{"question" (options inline), "answer":
//!   ["A"]}]}` per file, zero-shot.
//!
//! Bad rows (missing columns, an answer outside A–D) are reported with file and line and skipped.
use crate::backend::Backend;
use crate::batch::Batch;
use crate::data::tokenizer::TextTokenizer;
use crate::generate::{generate, Sampling};
use crate::model::Llama;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

pub const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Format {
    Mmlu,
    Cmmlu,
    Ceval,
    Agieval,
    Gaokao,
}

impl std::str::FromStr for Format {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "mmlu" => Format::Mmlu,
            "cmmlu" => Format::Cmmlu,
            "ceval" | "c-eval" => Format::Ceval,
            "agieval" => Format::Agieval,
            "gaokao" | "gaokao-bench" => Format::Gaokao,
            _ => bail!("unknown benchmark format {s:?} (mmlu, cmmlu, ceval, agieval, gaokao)"),
        })
    }
}

/// How prompts are written and which token ids stand for the letters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptStyle {
    #[default]
    Colossal,
    Original,
}

impl std::str::FromStr for PromptStyle {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "colossal" => Ok(PromptStyle::Colossal),
            "original" => Ok(PromptStyle::Original),
            _ => bail!("unknown prompt style {s:?} (colossal, original)"),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Question {
    pub question: String,
    /// Choice texts, or empty when the options are inline in the question (GAOKAO).
    pub choices: Vec<String>,
    /// 0 = A … 3 = D.
    pub answer: usize,
    /// `file:line`.
    pub origin: String,
    /// The record's own id (C-Eval's `id`, CMMLU's first column), else its 0-based index in the file.
    pub id: String,
    /// The record as ColossalEval's loader writes it, before the answer (see [`super::colossal`]).
    pub colossal_query: String,
    /// What ColossalEval puts after the query in a shot and counts in the few-shot budget: the
    /// answer as written (empty for C-Eval records outside `dev`, as ColossalEval does).
    pub colossal_target: String,
}

#[derive(Clone, Debug, Default)]
pub struct Subject {
    /// The file stem.
    pub name: String,
    /// The name ColossalEval's prompts use (title-cased, or Chinese from its subject tables).
    pub title: String,
    pub dev: Vec<Question>,
    pub test: Vec<Question>,
}

fn letter_index(s: &str) -> Option<usize> {
    LETTERS.iter().position(|l| *l == s.trim())
}

fn has_cjk(s: &str) -> bool {
    s.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c))
}

/// Reads one CSV file of `format`: `skip_cols` leading columns (an id), then question, A–D, answer.
/// `dev` tells whether the answer belongs in ColossalEval's shot text for C-Eval.
fn read_csv(path: &Path, format: Format, dev: bool, issues: &mut Vec<String>) -> Result<Vec<Question>> {
    let (header, skip_cols) = if format == Format::Mmlu { (false, 0) } else { (true, 1) };
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(header)
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (index, rec) in rdr.records().enumerate() {
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                issues.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        let line = rec.position().map_or(0, |p| p.line());
        let origin = format!("{}:{line}", path.display());
        if rec.len() < skip_cols + 6 {
            issues.push(format!(
                "{origin}: expected {} columns (question, A, B, C, D, answer), found {}",
                skip_cols + 6,
                rec.len()
            ));
            continue;
        }
        let f = |i: usize| rec[skip_cols + i].trim().to_string();
        let Some(answer) = letter_index(&f(5)) else {
            issues.push(format!("{origin}: answer {:?} is not one of A, B, C, D", f(5)));
            continue;
        };
        if f(0).is_empty() {
            issues.push(format!("{origin}: empty question"));
            continue;
        }
        // ColossalEval's text keeps the fields as read, untrimmed.
        let raw = |i: usize| &rec[skip_cols + i];
        let colossal_query = super::colossal::csv_query(format, raw(0), &[raw(1), raw(2), raw(3), raw(4)]);
        let colossal_target = if format == Format::Ceval && !dev { String::new() } else { raw(5).to_string() };
        let id = if skip_cols > 0 && !rec[0].trim().is_empty() { rec[0].trim().to_string() } else { index.to_string() };
        out.push(Question {
            question: f(0),
            choices: (1..5).map(f).collect(),
            answer,
            origin,
            id,
            colossal_query,
            colossal_target,
        });
    }
    Ok(out)
}

fn csv_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "csv"))
        .collect();
    files.sort();
    Ok(files)
}

/// Loads a benchmark from its published layout. Problems with single rows or subjects go to
/// `issues` (`file:line: what`); the rest is returned.
pub fn load(format: Format, dir: &Path, issues: &mut Vec<String>) -> Result<Vec<Subject>> {
    let mut subjects: Vec<Subject> = Vec::new();
    match format {
        Format::Mmlu | Format::Cmmlu | Format::Ceval => {
            let test_dir = if format == Format::Ceval { "val" } else { "test" };
            for file in csv_files(&dir.join(test_dir))? {
                let stem = file.file_stem().unwrap().to_string_lossy().to_string();
                let name = stem.strip_suffix(&format!("_{test_dir}")).unwrap_or(&stem).to_string();
                let test = read_csv(&file, format, false, issues)?;
                let dev_name = if format == Format::Cmmlu { format!("{name}.csv") } else { format!("{name}_dev.csv") };
                let dev_path = dir.join("dev").join(dev_name);
                let dev = if dev_path.exists() { read_csv(&dev_path, format, true, issues)? } else { vec![] };
                let title = titled(format, &name, &file, issues);
                subjects.push(Subject { name, title, dev, test });
            }
        }
        Format::Agieval => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
                .collect();
            files.sort();
            for file in files {
                let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                let name: String = file.file_stem().unwrap().to_string_lossy().into();
                let chinese_task = super::colossal::agieval_is_chinese(&name);
                if chinese_task.is_none() {
                    issues.push(format!("{}: {name:?} is not one of ColossalEval's AGIEval tasks; its colossal prompt is in Chinese where the question has Chinese characters", file.display()));
                }
                let mut test = Vec::new();
                for (i, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                    let origin = format!("{}:{}", file.display(), i + 1);
                    let v: serde_json::Value = match serde_json::from_str(l) {
                        Ok(v) => v,
                        Err(e) => {
                            issues.push(format!("{origin}: invalid JSON: {e}"));
                            continue;
                        }
                    };
                    let raw_opts: Vec<&str> = v["options"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|o| o.as_str()).collect())
                        .unwrap_or_default();
                    let opts: Vec<String> = raw_opts
                        .iter()
                        .map(|o| {
                            o.trim_start_matches(|c| c == '(' || ('A'..='E').contains(&c) || c == ')')
                                .trim()
                                .to_string()
                        })
                        .collect();
                    let label = v["label"]
                        .as_str()
                        .or_else(|| v["label"].as_array().and_then(|a| a.first()).and_then(|x| x.as_str()))
                        .unwrap_or("");
                    let (Some(answer), 4) = (letter_index(label), opts.len()) else {
                        issues.push(format!(
                            "{origin}: needs 4 options and a label in A–D (found {} options, label {label:?})",
                            opts.len()
                        ));
                        continue;
                    };
                    let passage = v["passage"].as_str().unwrap_or("");
                    let q = v["question"].as_str().unwrap_or("");
                    let question = if passage.is_empty() { q.to_string() } else { format!("{passage}\n{q}") };
                    let colossal_query = super::colossal::agieval_query(
                        chinese_task.unwrap_or_else(|| has_cjk(q)),
                        passage,
                        q,
                        &raw_opts,
                    );
                    test.push(Question {
                        question,
                        choices: opts,
                        answer,
                        origin,
                        id: i.to_string(),
                        colossal_query,
                        colossal_target: label.to_string(),
                    });
                }
                let title = titled(format, &name, &file, issues);
                subjects.push(Subject { name, title, dev: vec![], test });
            }
        }
        Format::Gaokao => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect();
            files.sort();
            for file in files {
                let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", file.display()))?;
                let mut test = Vec::new();
                for (i, ex) in v["example"].as_array().map(|a| a.as_slice()).unwrap_or(&[]).iter().enumerate() {
                    let origin = format!("{}:example[{i}]", file.display());
                    let ans = ex["answer"]
                        .as_array()
                        .and_then(|a| a.first())
                        .and_then(|x| x.as_str())
                        .or_else(|| ex["answer"].as_str())
                        .unwrap_or("");
                    let Some(answer) = letter_index(ans) else {
                        issues.push(format!("{origin}: answer {ans:?} is not one of A, B, C, D"));
                        continue;
                    };
                    let raw = ex["question"].as_str().unwrap_or("");
                    let id = ex["index"].as_u64().map_or(i.to_string(), |n| n.to_string());
                    test.push(Question {
                        question: raw.trim().to_string(),
                        choices: vec![],
                        answer,
                        origin,
                        id,
                        colossal_query: super::colossal::gaokao_query(raw),
                        colossal_target: LETTERS[answer].to_string(),
                    });
                }
                let name: String = file.file_stem().unwrap().to_string_lossy().into();
                let title = titled(format, &name, &file, issues);
                subjects.push(Subject { name, title, dev: vec![], test });
            }
        }
    }
    subjects.retain(|s| {
        if s.test.is_empty() {
            issues.push(format!("{}: subject {:?} has no usable questions", dir.display(), s.name));
        }
        !s.test.is_empty()
    });
    if subjects.is_empty() {
        bail!("{}: no {format:?} questions found", dir.display());
    }
    Ok(subjects)
}

/// ColossalEval's name for subject `stem`; the file stem, with an issue, where its tables lack it.
fn titled(format: Format, stem: &str, file: &Path, issues: &mut Vec<String>) -> String {
    super::colossal::subject_title(format, stem).unwrap_or_else(|| {
        issues.push(format!("{}: subject {stem:?} is not in ColossalEval's {format:?} subject table; its colossal prompt names it {stem:?}", file.display()));
        stem.to_string()
    })
}

/// A prompt as scored: its text, its token ids (BOS first where the tokenizer adds one) and the
/// number of dev examples it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    pub text: String,
    pub ids: Vec<u32>,
    pub shots: usize,
}

/// A prompt's ids as the model sees them: BOS (where the tokenizer adds one), then the text.
pub fn encode_prompt(tok: &TextTokenizer, text: &str) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    if tok.add_bos {
        ids.extend(tok.bos);
    }
    ids.extend(tok.encode_text(text)?);
    Ok(ids)
}

fn render(q: &Question, chinese: bool, answer: Option<usize>) -> String {
    let mut s = q.question.clone();
    for (l, c) in LETTERS.iter().zip(&q.choices) {
        s.push_str(&format!("\n{l}. {c}"));
    }
    s.push_str(if chinese { "\n答案：" } else { "\nAnswer:" });
    if let Some(a) = answer {
        s.push_str(&format!("{}{}\n\n", if chinese { "" } else { " " }, LETTERS[a]));
    }
    s
}

/// The prompt of `q` in `style` with up to `shots` dev examples, within `max_tokens`.
pub fn prompt(
    tok: &TextTokenizer,
    style: PromptStyle,
    format: Format,
    subject: &Subject,
    q: &Question,
    shots: usize,
    max_tokens: usize,
) -> Result<Prompt> {
    match style {
        PromptStyle::Colossal => super::colossal::prompt(tok, format, subject, q, shots, max_tokens),
        PromptStyle::Original => original_prompt(tok, subject, q, shots, max_tokens),
    }
}

/// The benchmark's own layout, dropping shots until the prompt fits `max_tokens`.
fn original_prompt(
    tok: &TextTokenizer,
    subject: &Subject,
    q: &Question,
    shots: usize,
    max_tokens: usize,
) -> Result<Prompt> {
    let chinese = has_cjk(&q.question) || has_cjk(&subject.name);
    let name = subject.name.replace('_', " ");
    let header = if chinese {
        format!("以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n")
    } else {
        format!("The following are multiple choice questions (with answers) about {name}.\n\n")
    };
    let mut k = shots.min(subject.dev.len());
    loop {
        let mut text = header.clone();
        for ex in &subject.dev[..k] {
            text.push_str(&render(ex, chinese, Some(ex.answer)));
        }
        text.push_str(&render(q, chinese, None));
        let ids = encode_prompt(tok, &text)?;
        if ids.len() <= max_tokens || k == 0 {
            if ids.len() > max_tokens {
                bail!("{}: the question alone takes {} tokens, more than {max_tokens}", q.origin, ids.len());
            }
            return Ok(Prompt { text, ids, shots: k });
        }
        k -= 1;
    }
}

/// Token ids of each letter in `style`: ColossalEval's (after `Answer: ` and `答案：`), or the
/// original's (unspaced and spaced, those that are single tokens).
pub fn letter_ids(tok: &TextTokenizer, style: PromptStyle) -> Result<Vec<Vec<u32>>> {
    if style == PromptStyle::Colossal {
        return super::colossal::letter_ids(tok);
    }
    LETTERS
        .iter()
        .map(|l| {
            let mut ids: Vec<u32> = [l.to_string(), format!(" {l}")]
                .iter()
                .filter_map(|s| tok.encode_text(s).ok().filter(|v| v.len() == 1).map(|v| v[0]))
                .collect();
            ids.dedup();
            if ids.is_empty() {
                bail!("the tokenizer has no single token for the choice letter {l:?}");
            }
            Ok(ids)
        })
        .collect()
}

/// Per letter, the max logit over its ids; then the argmax letter.
pub fn choose(logits: &[f32], letters: &[Vec<u32>]) -> (usize, Vec<f32>) {
    let per: Vec<f32> =
        letters.iter().map(|ids| ids.iter().map(|&i| logits[i as usize]).fold(f32::NEG_INFINITY, f32::max)).collect();
    (crate::generate::argmax(&per), per)
}

#[derive(Clone, Debug, Serialize)]
pub struct SubjectScore {
    pub subject: String,
    pub questions: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// AGIEval/GAOKAO: also counting a greedy answer whose first capital A–D is right.
    pub combined_correct: Option<usize>,
    pub shots_used_min: usize,
}

/// One scored question, for auditing a run.
#[derive(Clone, Debug, Serialize)]
pub struct QuestionResult {
    /// The subject's file stem.
    pub subject: String,
    pub id: String,
    /// `file:line` (or `file:example[i]`).
    pub origin: String,
    pub prompt_tokens: usize,
    pub shots: usize,
    /// Per letter A–D, the first predicted token's logit (the max over the letter's token ids).
    pub letter_logits: Vec<f32>,
    pub pick: String,
    pub answer: String,
    pub correct: bool,
    /// The prompt's text (written by `evaluate --dump-prompts`, not into the JSON).
    #[serde(skip)]
    pub prompt: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct McReport {
    pub format: Format,
    pub style: PromptStyle,
    pub subjects: Vec<SubjectScore>,
    pub questions: usize,
    pub correct: usize,
    /// Question-weighted over all subjects.
    pub accuracy: f64,
    pub combined_accuracy: Option<f64>,
    pub issues: Vec<String>,
    /// Every scored question, in subject then file order.
    pub per_question: Vec<QuestionResult>,
}

/// Scores every subject. Prompts are packed as separate documents into batches of about
/// `batch_tokens` tokens; only the last position of each runs the LM head.
#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: Backend>(
    model: &Llama<B>,
    backend: &B,
    tok: &TextTokenizer,
    format: Format,
    style: PromptStyle,
    subjects: &[Subject],
    shots: usize,
    max_tokens: usize,
    batch_tokens: usize,
    issues: Vec<String>,
) -> Result<McReport> {
    let letters = letter_ids(tok, style)?;
    let combined = matches!(format, Format::Agieval | Format::Gaokao);
    let mut report = McReport {
        format,
        style,
        subjects: vec![],
        questions: 0,
        correct: 0,
        accuracy: 0.0,
        combined_accuracy: None,
        issues,
        per_question: vec![],
    };
    let mut combined_total = 0;
    for s in subjects {
        if let Some(why) = super::colossal::not_first_token_scored(format, s).filter(|_| style == PromptStyle::Colossal)
        {
            report.issues.push(why);
            continue;
        }
        let mut prompts = Vec::new();
        let mut min_shots = usize::MAX;
        for q in &s.test {
            match prompt(tok, style, format, s, q, shots, max_tokens) {
                Ok(p) => {
                    min_shots = min_shots.min(p.shots);
                    prompts.push((q, p));
                }
                Err(e) => report.issues.push(format!("{e:#}")),
            }
        }
        let mut correct = 0;
        let mut comb = 0;
        for chunk in pack(&prompts, batch_tokens) {
            let tokens: Vec<u32> = chunk.iter().flat_map(|(_, p)| p.ids.iter().copied()).collect();
            let mut cu = vec![0u32];
            let mut positions = Vec::with_capacity(tokens.len());
            let mut last = Vec::new();
            for (_, p) in &chunk {
                positions.extend(0..p.ids.len() as u32);
                cu.push(cu.last().unwrap() + p.ids.len() as u32);
                last.push(*cu.last().unwrap() as usize - 1);
            }
            let n = tokens.len();
            let batch = Batch { rows: 1, seq_len: n, tokens, targets: vec![-100; n], cu_seqlens: cu, positions };
            let logits = model.logits_at(backend, &batch, &last)?;
            let v = model.config.vocab_size;
            for (i, (q, p)) in chunk.iter().enumerate() {
                let (pick, per) = choose(&logits[i * v..(i + 1) * v], &letters);
                let ok = pick == q.answer;
                correct += ok as usize;
                if combined {
                    let gen = generate(
                        model,
                        backend,
                        &p.ids,
                        8,
                        &Sampling::GREEDY,
                        &tok.eos.into_iter().collect::<Vec<_>>(),
                        None,
                        |_| {},
                    )?;
                    let text = tok.inner().decode(&gen, true).unwrap_or_default();
                    let first =
                        text.chars().find(|c| c.is_ascii_uppercase()).and_then(|c| letter_index(&c.to_string()));
                    comb += (ok || first == Some(q.answer)) as usize;
                }
                report.per_question.push(QuestionResult {
                    subject: s.name.clone(),
                    id: q.id.clone(),
                    origin: q.origin.clone(),
                    prompt_tokens: p.ids.len(),
                    shots: p.shots,
                    letter_logits: per,
                    pick: LETTERS[pick].to_string(),
                    answer: LETTERS[q.answer].to_string(),
                    correct: ok,
                    prompt: p.text.clone(),
                });
            }
        }
        let nq = prompts.len();
        report.questions += nq;
        report.correct += correct;
        combined_total += comb;
        report.subjects.push(SubjectScore {
            subject: s.name.clone(),
            questions: nq,
            correct,
            accuracy: if nq > 0 { correct as f64 / nq as f64 } else { 0.0 },
            combined_correct: combined.then_some(comb),
            shots_used_min: if min_shots == usize::MAX { 0 } else { min_shots },
        });
    }
    report.accuracy = if report.questions > 0 { report.correct as f64 / report.questions as f64 } else { 0.0 };
    if combined && report.questions > 0 {
        report.combined_accuracy = Some(combined_total as f64 / report.questions as f64);
    }
    Ok(report)
}

/// Groups prompts into batches of at most `budget` tokens (a longer prompt goes alone).
fn pack<'a>(prompts: &'a [(&'a Question, Prompt)], budget: usize) -> Vec<Vec<&'a (&'a Question, Prompt)>> {
    let mut out: Vec<Vec<&(&Question, Prompt)>> = vec![];
    let mut size = 0;
    for p in prompts {
        if out.is_empty() || size + p.1.ids.len() > budget {
            out.push(vec![]);
            size = 0;
        }
        size += p.1.ids.len();
        out.last_mut().unwrap().push(p);
    }
    out
}

/// A readable table of a report.
pub fn table(r: &McReport) -> String {
    let mut s = String::from("| subject | questions | accuracy |\n|---|---:|---:|\n");
    for x in &r.subjects {
        s.push_str(&format!("| {} | {} | {:.1}% |\n", x.subject, x.questions, 100.0 * x.accuracy));
    }
    s.push_str(&format!(
        "| **total ({:?}, {:?} prompts)** | {} | {:.1}% |\n",
        r.format,
        r.style,
        r.questions,
        100.0 * r.accuracy
    ));
    if let Some(c) = r.combined_accuracy {
        s.push_str(&format!("combined (first-token or greedy first capital): {:.1}%\n", 100.0 * c));
    }
    s
}
