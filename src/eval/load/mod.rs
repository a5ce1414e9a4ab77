//! Benchmarks read from their published layouts into [`Subject`]s, each question with the query
//! ColossalEval's loaders would write for it ([`colossal`](super::prompt::colossal)).
//!
//! Layouts read (as published):
//! - MMLU: `{dev,test}/{subject}_{dev,test}.csv`, no header: question, A, B, C, D, answer;
//! - CMMLU: `{dev,test}/{subject}.csv`, header `,Question,A,B,C,D,Answer`;
//! - C-Eval: `{dev,val}/{subject}_{dev,val}.csv`, header `id,question,A,B,C,D,answer[,explanation]`
//!   (its test split has no answers; the val split is scored);
//! - AGIEval: `{task}.jsonl` with `passage`, `question`, `options` (`"(A)…"`), `label`; its
//!   shots from `few_shot_prompts.csv` beside them when present ([`agieval`]);
//! - GAOKAO-Bench multiple-choice JSON: `{"example": [{"question" (options inline), "answer":
//!   ["A"]}]}` per file, in `data/Multiple-choice_Questions/` or the folder itself, zero-shot as
//!   ColossalEval runs it ([`gaokao`]).
//!
//! Files are read as ColossalEval's Python reads them ([`read_text`]): UTF-8 with universal
//! newlines (`\r\n` and `\r` become `\n`, also inside quoted CSV fields). Where its loaders would
//! stop (a blank CSV line, a byte-order mark before JSON, a row of the wrong width), the row or mark
//! is reported and the rest read. Bad rows (missing columns, an answer outside the subject's
//! letters, several answers) are reported with file and line and skipped; every message says what
//! happened to the row.
mod agieval;
mod csv;
mod gaokao;

use super::questions::{Format, Subject};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A benchmark file's text as Python's `open(path, encoding="utf-8")` gives it: universal newlines
/// translated. A UTF-8 byte-order mark is taken off and reported through the second value (Python
/// keeps it as U+FEFF; each reader says what ColossalEval does with it).
pub(super) fn read_text(path: &Path) -> Result<(String, bool)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8(bytes).with_context(|| format!("{}: not UTF-8", path.display()))?;
    let (text, bom) = match text.strip_prefix('\u{feff}') {
        Some(rest) => (rest.to_string(), true),
        None => (text, false),
    };
    Ok((text.replace("\r\n", "\n").replace('\r', "\n"), bom))
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
/// `issues` (`file:line: what, and what was done`); the rest is returned. `shots` > 0 reads
/// AGIEval's few-shot file.
pub fn load(format: Format, dir: &Path, shots: usize, issues: &mut Vec<String>) -> Result<Vec<Subject>> {
    let mut subjects = match format {
        Format::Mmlu | Format::Cmmlu | Format::Ceval => csv::load_benchmark(format, dir, issues)?,
        Format::Agieval => agieval::load(dir, shots, issues)?,
        Format::Gaokao => gaokao::load(dir, issues)?,
    };
    subjects.retain(|s| {
        if s.test.is_empty() {
            issues.push(format!("{}: subject {:?} has no usable questions; skipped", dir.display(), s.name));
        }
        !s.test.is_empty()
    });
    if subjects.is_empty() {
        bail!("{}: no {format:?} questions found", dir.display());
    }
    Ok(subjects)
}

/// ColossalEval's name for subject `stem` and whether its tables know it (else the file stem).
fn titled(format: Format, stem: &str) -> (String, bool) {
    match super::prompt::colossal::subject_title(format, stem) {
        Some(title) => (title, true),
        None => (stem.to_string(), false),
    }
}
