//! AGIEval: one JSON-lines file per task, read as ColossalEval's `dataset/agieval.py` reads it, and
//! its few-shot examples from the published `few_shot_prompts.csv` (a header row of task names,
//! then rows `sample 1`, `explanation 1`, … `sample 5`, `explanation 5`; a sample cell is a Python
//! dict literal with `passage`, `question`, `options`, `label`).
use super::{file_stem, files_with_extension, read_text, titled};
use crate::eval::prompt::colossal;
use crate::eval::pyliteral;
use crate::eval::questions::{has_cjk, letter_index, letter_range, Format, Question, Subject};
use anyhow::Result;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// ColossalEval's option letters for AGIEval (`option_string`): at most seven.
const MAX_CLASSES: usize = 7;
const FEW_SHOT_FILE: &str = "few_shot_prompts.csv";

pub(super) fn load(dir: &Path, shots: usize, issues: &mut Vec<String>) -> Result<Vec<Subject>> {
    let few_shot = if shots == 0 {
        None
    } else if dir.join(FEW_SHOT_FILE).exists() {
        Some(FewShotTable::read(&dir.join(FEW_SHOT_FILE), issues)?)
    } else {
        issues.push(format!(
            "{}: no {FEW_SHOT_FILE} (AGIEval's published few-shot file) beside the tasks; every task runs zero-shot",
            dir.display()
        ));
        None
    };
    let mut subjects = Vec::new();
    for file in files_with_extension(dir, "jsonl")? {
        let name = file_stem(&file);
        let chinese_task = colossal::agieval_is_chinese(&name);
        let (test, classes) = read_task(&file, chinese_task, issues)?;
        let dev = match &few_shot {
            Some(table) if chinese_task.is_some() => table.examples(&name, chinese_task == Some(true), issues),
            _ => vec![],
        };
        let (title, known) = titled(Format::Agieval, &name);
        subjects.push(Subject { name, title, title_known: known && chinese_task.is_some(), classes, dev, test });
    }
    Ok(subjects)
}

/// The task's questions and its letter count: the options of its first record, as ColossalEval
/// takes `all_classes` from the first line for the whole file.
fn read_task(file: &Path, chinese_task: Option<bool>, issues: &mut Vec<String>) -> Result<(Vec<Question>, usize)> {
    let (text, bom) = read_text(file)?;
    if bom {
        issues.push(format!(
            "{}: starts with a UTF-8 byte-order mark, on which ColossalEval's json.loads fails; read without it",
            file.display()
        ));
    }
    let mut records = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let origin = format!("{}:{}", file.display(), i + 1);
        if l.trim().is_empty() {
            issues.push(format!("{origin}: blank line, on which ColossalEval's json.loads fails; passed over"));
            continue;
        }
        match serde_json::from_str::<Value>(l) {
            Ok(v) => records.push((i, origin, v)),
            Err(e) => issues.push(format!("{origin}: invalid JSON ({e}); skipped")),
        }
    }
    let classes = records.first().map_or(4, |(_, _, v)| v["options"].as_array().map_or(0, Vec::len).min(MAX_CLASSES));
    let mut test = Vec::new();
    let mut several = 0;
    for (i, origin, v) in &records {
        match question(v, *i, origin, chinese_task, classes) {
            Ok(q) => test.push(q),
            Err(Refused::SeveralAnswers) => several += 1,
            Err(Refused::Other(why)) => issues.push(format!("{origin}: {why}; skipped")),
        }
    }
    if several > 0 {
        issues.push(format!(
            "{}: {several} of {} records have several answers (scored by generation only in ColossalEval); refused",
            file.display(),
            records.len()
        ));
    }
    Ok((test, classes))
}

enum Refused {
    SeveralAnswers,
    Other(String),
}

/// The letters of a label: `"B"`, `["B"]`, or several (`["A", "D"]`, `"AD"`).
fn label_letters(label: &Value) -> Vec<String> {
    match label {
        Value::String(s) => s.split_whitespace().flat_map(|w| w.chars().map(String::from)).collect(),
        Value::Array(a) => a.iter().filter_map(|x| x.as_str()).map(|s| s.trim().to_string()).collect(),
        _ => vec![],
    }
}

/// An option without its `(A)` prefix (the original prompt writes its own letters).
fn option_text(option: &str) -> String {
    let mut c = option.chars();
    match (c.next(), c.next(), c.next()) {
        (Some('('), Some(l), Some(')')) if l.is_ascii_uppercase() => c.as_str().trim().to_string(),
        _ => option.trim().to_string(),
    }
}

/// One record (line `i` of its file) scored over `classes` letters, or why it is not.
fn question(
    v: &Value,
    i: usize,
    origin: &str,
    chinese_task: Option<bool>,
    classes: usize,
) -> Result<Question, Refused> {
    let raw_opts: Vec<&str> =
        v["options"].as_array().map(|a| a.iter().filter_map(|o| o.as_str()).collect()).unwrap_or_default();
    let letters = label_letters(&v["label"]);
    if letters.len() > 1 {
        return Err(Refused::SeveralAnswers);
    }
    let label = letters.first().map_or("", String::as_str);
    let Some(answer) = letter_index(label, classes) else {
        return Err(Refused::Other(format!(
            "label {:?} is not one of the task's letters {} (from its first record's {classes} options)",
            v["label"].to_string(),
            letter_range(classes.max(1))
        )));
    };
    let passage = v["passage"].as_str().unwrap_or("");
    let q = v["question"].as_str().unwrap_or("");
    let question = if passage.is_empty() { q.to_string() } else { format!("{passage}\n{q}") };
    let colossal_query = colossal::agieval_query(chinese_task.unwrap_or_else(|| has_cjk(q)), passage, q, &raw_opts);
    Ok(Question {
        question,
        choices: raw_opts.iter().map(|o| option_text(o)).collect(),
        answer,
        origin: origin.to_string(),
        id: i.to_string(),
        colossal_query,
        colossal_target: label.to_string(),
    })
}

/// `few_shot_prompts.csv` as ColossalEval reads it with pandas: record 0 names the columns,
/// records 1, 3, 5, 7, 9 hold the samples and 2, 4, 6, 8, 10 their explanations; a task gets as
/// many examples as it has both non-empty samples and explanations.
struct FewShotTable {
    path: String,
    /// Per task column: (samples, explanations), the non-empty cells in order.
    columns: BTreeMap<String, (Vec<(usize, String)>, usize)>,
}

impl FewShotTable {
    fn read(path: &Path, issues: &mut Vec<String>) -> Result<FewShotTable> {
        let (text, _) = read_text(path)?;
        let mut rdr = ::csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(text.as_bytes());
        let mut rows = Vec::new();
        for r in rdr.records() {
            match r {
                Ok(r) => rows.push(r),
                Err(e) => issues.push(format!("{}: {e}; skipped", path.display())),
            }
        }
        let mut columns = BTreeMap::new();
        if let Some(header) = rows.first() {
            for (c, task) in header.iter().enumerate().skip(1) {
                let cell = |r: usize| rows.get(r).and_then(|row| row.get(c)).unwrap_or("");
                let samples: Vec<(usize, String)> = [1, 3, 5, 7, 9]
                    .iter()
                    .filter(|&&r| !cell(r).is_empty())
                    .map(|&r| (rows[r].position().map_or(0, |p| p.line() as usize), cell(r).to_string()))
                    .collect();
                let explanations = [2, 4, 6, 8, 10].iter().filter(|&&r| !cell(r).is_empty()).count();
                columns.insert(task.to_string(), (samples, explanations));
            }
        }
        Ok(FewShotTable { path: path.display().to_string(), columns })
    }

    /// Task `name`'s examples as ColossalEval writes them (`combine_prompt`): the sample's passage,
    /// question, options and `Answer: {label}` (`答案：{label}` for Chinese tasks) in one text.
    fn examples(&self, name: &str, chinese: bool, issues: &mut Vec<String>) -> Vec<Question> {
        // `sat-en-without-passage` takes `sat-en`'s examples without their passages.
        let (column, skip_passage) = if name == "sat-en-without-passage" { ("sat-en", true) } else { (name, false) };
        let Some((samples, explanations)) = self.columns.get(column) else {
            issues.push(format!(
                "{}: no column {column:?} (ColossalEval's pandas lookup fails); {name} runs zero-shot",
                self.path
            ));
            return vec![];
        };
        let mut out = Vec::new();
        for (k, (line, cell)) in samples.iter().take(*explanations).enumerate() {
            let origin = format!("{}:{line} ({column}, sample {})", self.path, k + 1);
            match example(cell, chinese, skip_passage, &origin) {
                Ok(q) => out.push(q),
                Err(why) => issues.push(format!("{origin}: {why}; not used as a shot")),
            }
        }
        out
    }
}

/// One few-shot sample cell as a shot: `colossal_query` holds the whole text ColossalEval writes
/// (answer included), the other fields serve the original prompt.
fn example(cell: &str, chinese: bool, skip_passage: bool, origin: &str) -> Result<Question, String> {
    let v = pyliteral::parse(cell).map_err(|e| format!("not a Python literal ({e})"))?;
    let text = |key: &str| match &v[key] {
        Value::Null => String::new(),
        other => pyliteral::python_str(other),
    };
    let passage = if skip_passage { String::new() } else { text("passage") };
    let options: Vec<&str> =
        v["options"].as_array().map(|a| a.iter().filter_map(|o| o.as_str()).collect()).unwrap_or_default();
    let label = text("label");
    let shot = if chinese {
        format!("问题：{passage} {}\n从以下选项中选择：{}\n答案：{label}", text("question"), options.join(" "))
    } else {
        format!(
            "Question: {passage} {}\nChoose from the following options: {}\nAnswer: {label}",
            text("question"),
            options.join(" ")
        )
    };
    let answer = letter_index(&label, MAX_CLASSES).ok_or_else(|| format!("label {label:?} is not a single letter"))?;
    let question = if passage.is_empty() { text("question") } else { format!("{passage}\n{}", text("question")) };
    Ok(Question {
        question,
        choices: options.iter().map(|o| option_text(o)).collect(),
        answer,
        origin: origin.to_string(),
        id: origin.to_string(),
        colossal_query: shot,
        colossal_target: String::new(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_option_loses_only_its_own_letter_prefix() {
        assert_eq!(super::option_text("(A)Apple"), "Apple");
        assert_eq!(super::option_text("(E) Even"), "Even");
        assert_eq!(super::option_text("A. 阳台\tB. 客厅"), "A. 阳台\tB. 客厅");
    }
}
