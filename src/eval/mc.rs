//! Multiple-choice benchmarks scored the ColossalEval way: a subject header, the dev examples as
//! shots (5 by default, fewer when the context would overflow), `Answer:` / `答案：` before the
//! choice, and the answer = argmax over the first predicted token's logits of the choice letters
//! (per letter, the max over its spaced and unspaced token ids).
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

#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    pub question: String,
    /// Choice texts, or empty when the options are inline in the question (GAOKAO).
    pub choices: Vec<String>,
    /// 0 = A … 3 = D.
    pub answer: usize,
    /// `file:line`.
    pub origin: String,
}

#[derive(Clone, Debug, Default)]
pub struct Subject {
    pub name: String,
    pub dev: Vec<Question>,
    pub test: Vec<Question>,
}

fn letter_index(s: &str) -> Option<usize> {
    LETTERS.iter().position(|l| *l == s.trim())
}

fn has_cjk(s: &str) -> bool {
    s.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c))
}

/// Reads one CSV file: `skip_cols` leading columns, then question, A–D, answer.
fn read_csv(path: &Path, header: bool, skip_cols: usize, issues: &mut Vec<String>) -> Result<Vec<Question>> {
    let mut rdr = csv::ReaderBuilder::new().has_headers(header).flexible(true).from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for rec in rdr.records() {
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
            issues.push(format!("{origin}: expected {} columns (question, A, B, C, D, answer), found {}", skip_cols + 6, rec.len()));
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
        out.push(Question { question: f(0), choices: (1..5).map(f).collect(), answer, origin });
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
            let (test_dir, header, skip) = match format {
                Format::Mmlu => ("test", false, 0),
                Format::Cmmlu => ("test", true, 1),
                _ => ("val", true, 1),
            };
            for file in csv_files(&dir.join(test_dir))? {
                let stem = file.file_stem().unwrap().to_string_lossy().to_string();
                let name = stem.strip_suffix(&format!("_{test_dir}")).unwrap_or(&stem).to_string();
                let test = read_csv(&file, header, skip, issues)?;
                let dev_name = if format == Format::Cmmlu { format!("{name}.csv") } else { format!("{name}_dev.csv") };
                let dev_path = dir.join("dev").join(dev_name);
                let dev = if dev_path.exists() { read_csv(&dev_path, header, skip, issues)? } else { vec![] };
                subjects.push(Subject { name, dev, test });
            }
        }
        Format::Agieval => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "jsonl")).collect();
            files.sort();
            for file in files {
                let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
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
                    let opts: Vec<String> = v["options"].as_array().map(|a| a.iter().filter_map(|o| o.as_str()).map(|o| o.trim_start_matches(|c| c == '(' || ('A'..='E').contains(&c) || c == ')').trim().to_string()).collect()).unwrap_or_default();
                    let label = v["label"].as_str().or_else(|| v["label"].as_array().and_then(|a| a.first()).and_then(|x| x.as_str())).unwrap_or("");
                    let (Some(answer), 4) = (letter_index(label), opts.len()) else {
                        issues.push(format!("{origin}: needs 4 options and a label in A–D (found {} options, label {label:?})", opts.len()));
                        continue;
                    };
                    let passage = v["passage"].as_str().unwrap_or("");
                    let q = v["question"].as_str().unwrap_or("");
                    let question = if passage.is_empty() { q.to_string() } else { format!("{passage}\n{q}") };
                    test.push(Question { question, choices: opts, answer, origin });
                }
                subjects.push(Subject { name: file.file_stem().unwrap().to_string_lossy().into(), dev: vec![], test });
            }
        }
        Format::Gaokao => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "json")).collect();
            files.sort();
            for file in files {
                let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", file.display()))?;
                let mut test = Vec::new();
                for (i, ex) in v["example"].as_array().map(|a| a.as_slice()).unwrap_or(&[]).iter().enumerate() {
                    let origin = format!("{}:example[{i}]", file.display());
                    let ans = ex["answer"].as_array().and_then(|a| a.first()).and_then(|x| x.as_str()).or_else(|| ex["answer"].as_str()).unwrap_or("");
                    let Some(answer) = letter_index(ans) else {
                        issues.push(format!("{origin}: answer {ans:?} is not one of A, B, C, D"));
                        continue;
                    };
                    let question = ex["question"].as_str().unwrap_or("").trim().to_string();
                    test.push(Question { question, choices: vec![], answer, origin });
                }
                subjects.push(Subject { name: file.file_stem().unwrap().to_string_lossy().into(), dev: vec![], test });
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

/// The prompt for `q` with up to `shots` dev examples, dropping shots until it fits `max_tokens`.
pub fn prompt(tok: &TextTokenizer, subject: &Subject, q: &Question, shots: usize, max_tokens: usize) -> Result<(Vec<u32>, usize)> {
    let chinese = has_cjk(&q.question) || has_cjk(&subject.name);
    let name = subject.name.replace('_', " ");
    let header = if chinese { format!("以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n") } else { format!("The following are multiple choice questions (with answers) about {name}.\n\n") };
    let mut k = shots.min(subject.dev.len());
    loop {
        let mut text = header.clone();
        for ex in &subject.dev[..k] {
            text.push_str(&render(ex, chinese, Some(ex.answer)));
        }
        text.push_str(&render(q, chinese, None));
        let mut ids = Vec::new();
        if tok.add_bos {
            ids.extend(tok.bos);
        }
        ids.extend(tok.encode_text(&text)?);
        if ids.len() <= max_tokens || k == 0 {
            if ids.len() > max_tokens {
                bail!("{}: the question alone takes {} tokens, more than {max_tokens}", q.origin, ids.len());
            }
            return Ok((ids, k));
        }
        k -= 1;
    }
}

/// Token ids of each letter, unspaced and spaced (those that are single tokens).
pub fn letter_ids(tok: &TextTokenizer) -> Result<Vec<Vec<u32>>> {
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
    let per: Vec<f32> = letters.iter().map(|ids| ids.iter().map(|&i| logits[i as usize]).fold(f32::NEG_INFINITY, f32::max)).collect();
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

#[derive(Clone, Debug, Serialize)]
pub struct McReport {
    pub format: Format,
    pub subjects: Vec<SubjectScore>,
    pub questions: usize,
    pub correct: usize,
    /// Question-weighted over all subjects.
    pub accuracy: f64,
    pub combined_accuracy: Option<f64>,
    pub issues: Vec<String>,
    /// Per question: (origin, chosen letter, per-letter logits) — for agreement checks.
    #[serde(skip)]
    pub choices: Vec<(String, usize, Vec<f32>)>,
}

/// Scores every subject. Prompts are packed as separate documents into batches of about
/// `batch_tokens` tokens; only the last position of each runs the LM head.
#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: Backend>(model: &Llama<B>, backend: &B, tok: &TextTokenizer, format: Format, subjects: &[Subject], shots: usize, max_tokens: usize, batch_tokens: usize, issues: Vec<String>) -> Result<McReport> {
    let letters = letter_ids(tok)?;
    let combined = matches!(format, Format::Agieval | Format::Gaokao);
    let mut report = McReport { format, subjects: vec![], questions: 0, correct: 0, accuracy: 0.0, combined_accuracy: None, issues, choices: vec![] };
    let mut combined_total = 0;
    for s in subjects {
        let mut prompts = Vec::new();
        let mut min_shots = usize::MAX;
        for q in &s.test {
            match prompt(tok, s, q, shots, max_tokens) {
                Ok((ids, k)) => {
                    min_shots = min_shots.min(k);
                    prompts.push((q, ids));
                }
                Err(e) => report.issues.push(format!("{e:#}")),
            }
        }
        let mut correct = 0;
        let mut comb = 0;
        for chunk in pack(&prompts, batch_tokens) {
            let tokens: Vec<u32> = chunk.iter().flat_map(|(_, ids)| ids.iter().copied()).collect();
            let mut cu = vec![0u32];
            let mut positions = Vec::with_capacity(tokens.len());
            let mut last = Vec::new();
            for (_, ids) in &chunk {
                positions.extend(0..ids.len() as u32);
                cu.push(cu.last().unwrap() + ids.len() as u32);
                last.push(*cu.last().unwrap() as usize - 1);
            }
            let n = tokens.len();
            let batch = Batch { rows: 1, seq_len: n, tokens, targets: vec![-100; n], cu_seqlens: cu, positions };
            let logits = model.logits_at(backend, &batch, &last)?;
            let v = model.config.vocab_size;
            for (i, (q, ids)) in chunk.iter().enumerate() {
                let (pick, per) = choose(&logits[i * v..(i + 1) * v], &letters);
                let ok = pick == q.answer;
                correct += ok as usize;
                if combined {
                    let gen = generate(model, backend, ids, 8, &Sampling::GREEDY, &tok.eos.into_iter().collect::<Vec<_>>(), None, |_| {})?;
                    let text = tok.inner().decode(&gen, true).unwrap_or_default();
                    let first = text.chars().find(|c| c.is_ascii_uppercase()).and_then(|c| letter_index(&c.to_string()));
                    comb += (ok || first == Some(q.answer)) as usize;
                }
                report.choices.push((q.origin.clone(), pick, per));
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
fn pack<'a>(prompts: &'a [(&'a Question, Vec<u32>)], budget: usize) -> Vec<Vec<&'a (&'a Question, Vec<u32>)>> {
    let mut out: Vec<Vec<&(&Question, Vec<u32>)>> = vec![];
    let mut size = 0;
    for p in prompts {
        if out.is_empty() || size + p.1.len() > budget {
            out.push(vec![]);
            size = 0;
        }
        size += p.1.len();
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
    s.push_str(&format!("| **total ({:?})** | {} | {:.1}% |\n", r.format, r.questions, 100.0 * r.accuracy));
    if let Some(c) = r.combined_accuracy {
        s.push_str(&format!("combined (first-token or greedy first capital): {:.1}%\n", 100.0 * c));
    }
    s
}
