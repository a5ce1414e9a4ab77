//! GAOKAO-Bench's multiple-choice files, read as ColossalEval's `dataset/gaokaobench.py` reads
//! them: the options inline in the question, the letters counted from the first question
//! (`get_all_classes`), zero-shot (ColossalEval has no few-shot prompts for it).
use super::{file_stem, files_with_extension, read_text, titled};
use crate::eval::prompt::colossal;
use crate::eval::questions::{letter_index, letter_range, Format, Question, Subject, LETTERS};
use anyhow::{Context, Result};
use serde_json::Value;
use std::path::Path;

/// Where the published repository keeps the multiple-choice files, below the folder given.
const PUBLISHED_DIR: &str = "data/Multiple-choice_Questions";

pub(super) fn load(dir: &Path, issues: &mut Vec<String>) -> Result<Vec<Subject>> {
    let published = dir.join(PUBLISHED_DIR);
    let dir = if published.is_dir() { published } else { dir.to_path_buf() };
    let mut subjects = Vec::new();
    for file in files_with_extension(&dir, "json")? {
        let (text, bom) = read_text(&file)?;
        if bom {
            issues.push(format!(
                "{}: starts with a UTF-8 byte-order mark, on which ColossalEval's json.load fails; read without it",
                file.display()
            ));
        }
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", file.display()))?;
        let examples = v["example"].as_array().map(|a| a.as_slice()).unwrap_or(&[]);
        let name = file_stem(&file);
        let (title, title_known) = titled(Format::Gaokao, &name);
        let first = examples.first().and_then(|e| e["question"].as_str()).unwrap_or("");
        let classes = all_classes(first);
        if classes == 0 {
            issues.push(format!("{}: the first question names no options (`A.` or `A．`), so ColossalEval finds no letters to score; skipped", file.display()));
            continue;
        }
        let mut test = Vec::new();
        let mut several = 0;
        for (i, ex) in examples.iter().enumerate() {
            let origin = format!("{}:example[{i}]", file.display());
            let letters = answer_letters(&ex["answer"]);
            if letters.len() > 1 {
                several += 1;
                continue;
            }
            let ans = letters.first().map_or("", String::as_str);
            let Some(answer) = letter_index(ans, classes) else {
                issues.push(format!("{origin}: answer {ans:?} is not one of the subject's letters {} (counted in its first question); skipped", letter_range(classes)));
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
        if several > 0 {
            issues.push(format!("{}: {several} of {} questions have several answers (scored by generation only in ColossalEval); refused", file.display(), examples.len()));
        }
        subjects.push(Subject { name, title, title_known, classes, dev: vec![], test });
    }
    Ok(subjects)
}

/// The letters of an answer: `["B"]`, `"B"`, or several (`["A", "C"]`, `"AC"`).
fn answer_letters(answer: &Value) -> Vec<String> {
    match answer {
        Value::Array(a) => a.iter().filter_map(|x| x.as_str()).map(|s| s.trim().to_string()).collect(),
        Value::String(s) => s.chars().filter(|c| !c.is_whitespace()).map(String::from).collect(),
        _ => vec![],
    }
}

/// `get_all_classes`: the capitals written as `X.`, `X. ` or `X．` in `question`, taken from `A`
/// on while they run on without a gap (at most the letters we know).
fn all_classes(question: &str) -> usize {
    let chars: Vec<char> = question.chars().collect();
    let mut seen = [false; 26];
    for w in chars.windows(2) {
        if w[0].is_ascii_uppercase() && (w[1] == '.' || w[1] == '．') {
            seen[(w[0] as u8 - b'A') as usize] = true;
        }
    }
    seen.iter().take_while(|s| **s).count().min(LETTERS.len())
}

#[cfg(test)]
mod tests {
    #[test]
    fn letters_are_counted_as_get_all_classes_counts_them() {
        assert_eq!(super::all_classes("问题（　）\nA．甲\nB．乙\nC．丙\nD．丁"), 4);
        assert_eq!(super::all_classes("Q? A. x B. y C.z D. w E. v"), 5);
        // A gap ends the run: A, B, D → A, B.
        assert_eq!(super::all_classes("A. x B. y D. z"), 2);
        assert_eq!(super::all_classes("no options here"), 0);
    }
}
