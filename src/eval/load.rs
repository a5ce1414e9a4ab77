//! Benchmarks read from their published layouts into [`Subject`]s, each question with the query
//! ColossalEval's loaders would write for it ([`colossal`]).
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
use super::prompt::colossal;
use super::questions::{has_cjk, letter_index, Format, Question, Subject, LETTERS};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

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
        let colossal_query = colossal::csv_query(format, raw(0), &[raw(1), raw(2), raw(3), raw(4)]);
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

/// The files of `dir` ending in `.{ext}`, sorted.
fn files_with_extension(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    Ok(files)
}

fn file_stem(file: &Path) -> String {
    file.file_stem().unwrap().to_string_lossy().into()
}

/// Loads a benchmark from its published layout. Problems with single rows or subjects go to
/// `issues` (`file:line: what`); the rest is returned.
pub fn load(format: Format, dir: &Path, issues: &mut Vec<String>) -> Result<Vec<Subject>> {
    let mut subjects = match format {
        Format::Mmlu | Format::Cmmlu | Format::Ceval => load_csv_benchmark(format, dir, issues)?,
        Format::Agieval => load_agieval(dir, issues)?,
        Format::Gaokao => load_gaokao(dir, issues)?,
    };
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

/// MMLU, CMMLU, C-Eval: one CSV per subject in the scored split, its shots from `dev/`.
fn load_csv_benchmark(format: Format, dir: &Path, issues: &mut Vec<String>) -> Result<Vec<Subject>> {
    let test_dir = if format == Format::Ceval { "val" } else { "test" };
    let mut subjects = Vec::new();
    for file in files_with_extension(&dir.join(test_dir), "csv")? {
        let stem = file_stem(&file);
        let name = stem.strip_suffix(&format!("_{test_dir}")).unwrap_or(&stem).to_string();
        let test = read_csv(&file, format, false, issues)?;
        let dev_name = if format == Format::Cmmlu { format!("{name}.csv") } else { format!("{name}_dev.csv") };
        let dev_path = dir.join("dev").join(dev_name);
        let dev = if dev_path.exists() { read_csv(&dev_path, format, true, issues)? } else { vec![] };
        let title = titled(format, &name, &file, issues);
        subjects.push(Subject { name, title, dev, test });
    }
    Ok(subjects)
}

/// AGIEval: one JSON-lines file per task, zero-shot.
fn load_agieval(dir: &Path, issues: &mut Vec<String>) -> Result<Vec<Subject>> {
    let mut subjects = Vec::new();
    for file in files_with_extension(dir, "jsonl")? {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let name = file_stem(&file);
        let chinese_task = colossal::agieval_is_chinese(&name);
        if chinese_task.is_none() {
            issues.push(format!("{}: {name:?} is not one of ColossalEval's AGIEval tasks; its colossal prompt is in Chinese where the question has Chinese characters", file.display()));
        }
        let mut test = Vec::new();
        for (i, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let origin = format!("{}:{}", file.display(), i + 1);
            match agieval_question(l, i, &origin, chinese_task) {
                Ok(q) => test.push(q),
                Err(why) => issues.push(format!("{origin}: {why}")),
            }
        }
        let title = titled(Format::Agieval, &name, &file, issues);
        subjects.push(Subject { name, title, dev: vec![], test });
    }
    Ok(subjects)
}

/// One AGIEval record (line `i` of its file), or why it cannot be scored.
fn agieval_question(line: &str, i: usize, origin: &str, chinese_task: Option<bool>) -> Result<Question, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let raw_opts: Vec<&str> =
        v["options"].as_array().map(|a| a.iter().filter_map(|o| o.as_str()).collect()).unwrap_or_default();
    let opts: Vec<String> = raw_opts
        .iter()
        .map(|o| o.trim_start_matches(|c| c == '(' || ('A'..='E').contains(&c) || c == ')').trim().to_string())
        .collect();
    let label = v["label"]
        .as_str()
        .or_else(|| v["label"].as_array().and_then(|a| a.first()).and_then(|x| x.as_str()))
        .unwrap_or("");
    let (Some(answer), 4) = (letter_index(label), opts.len()) else {
        return Err(format!("needs 4 options and a label in A–D (found {} options, label {label:?})", opts.len()));
    };
    let passage = v["passage"].as_str().unwrap_or("");
    let q = v["question"].as_str().unwrap_or("");
    let question = if passage.is_empty() { q.to_string() } else { format!("{passage}\n{q}") };
    let colossal_query = colossal::agieval_query(chinese_task.unwrap_or_else(|| has_cjk(q)), passage, q, &raw_opts);
    Ok(Question {
        question,
        choices: opts,
        answer,
        origin: origin.to_string(),
        id: i.to_string(),
        colossal_query,
        colossal_target: label.to_string(),
    })
}

/// GAOKAO-Bench: one JSON file per subject (`{"example": [...]}`), options inline, zero-shot.
fn load_gaokao(dir: &Path, issues: &mut Vec<String>) -> Result<Vec<Subject>> {
    let mut subjects = Vec::new();
    for file in files_with_extension(dir, "json")? {
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
                colossal_query: colossal::gaokao_query(raw),
                colossal_target: LETTERS[answer].to_string(),
            });
        }
        let name = file_stem(&file);
        let title = titled(Format::Gaokao, &name, &file, issues);
        subjects.push(Subject { name, title, dev: vec![], test });
    }
    Ok(subjects)
}

/// ColossalEval's name for subject `stem`; the file stem, with an issue, where its tables lack it.
fn titled(format: Format, stem: &str, file: &Path, issues: &mut Vec<String>) -> String {
    colossal::subject_title(format, stem).unwrap_or_else(|| {
        issues.push(format!("{}: subject {stem:?} is not in ColossalEval's {format:?} subject table; its colossal prompt names it {stem:?}", file.display()));
        stem.to_string()
    })
}
