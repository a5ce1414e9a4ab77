//! MMLU, CMMLU and C-Eval: one CSV per subject, read as ColossalEval's loaders read it (Python's
//! `csv.reader` over `open(path, encoding="utf-8")`).
use super::{file_stem, files_with_extension, read_text, titled};
use crate::eval::prompt::colossal;
use crate::eval::questions::{letter_index, Format, Question, Subject};
use anyhow::Result;
use std::path::Path;

/// One CSV per subject in the scored split, its shots from `dev/`.
pub(super) fn load_benchmark(format: Format, dir: &Path, issues: &mut Vec<String>) -> Result<Vec<Subject>> {
    let test_dir = if format == Format::Ceval { "val" } else { "test" };
    let mut subjects = Vec::new();
    for file in files_with_extension(&dir.join(test_dir), "csv")? {
        let stem = file_stem(&file);
        let name = stem.strip_suffix(&format!("_{test_dir}")).unwrap_or(&stem).to_string();
        let test = read_csv(&file, format, false, issues)?;
        let dev_name = if format == Format::Cmmlu { format!("{name}.csv") } else { format!("{name}_dev.csv") };
        let dev_path = dir.join("dev").join(dev_name);
        let dev = if dev_path.exists() { read_csv(&dev_path, format, true, issues)? } else { vec![] };
        let (title, title_known) = titled(format, &name);
        subjects.push(Subject { name, title, title_known, classes: 4, dev, test });
    }
    Ok(subjects)
}

/// The columns ColossalEval's loader asserts: MMLU exactly 6, CMMLU exactly 7 (an index first),
/// C-Eval at least 7 in the splits with answers (id first, an explanation may follow).
fn width_ok(format: Format, width: usize) -> bool {
    match format {
        Format::Mmlu => width == 6,
        Format::Cmmlu => width == 7,
        _ => width >= 7,
    }
}

/// Reads one CSV file of `format`. `dev` tells whether the answer belongs in ColossalEval's shot
/// text for C-Eval.
fn read_csv(path: &Path, format: Format, dev: bool, issues: &mut Vec<String>) -> Result<Vec<Question>> {
    let (text, bom) = read_text(path)?;
    let header = format != Format::Mmlu;
    if bom && !header {
        issues.push(format!("{}: starts with a UTF-8 byte-order mark; ColossalEval keeps it as U+FEFF at the start of the first question, and so does the colossal prompt (the original prompt drops it)", path.display()));
    }
    let mut rdr = ::csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(text.as_bytes());
    let mut records = Vec::new();
    for rec in rdr.records() {
        match rec {
            Ok(r) => records.push(r),
            Err(e) => issues.push(format!("{}: {e}; skipped", path.display())),
        }
    }
    report_blank_lines(path, &text, issues);
    let skip_cols = usize::from(header);
    let mut out = Vec::new();
    for (index, rec) in records.iter().skip(usize::from(header)).enumerate() {
        let line = rec.position().map_or(0, |p| p.line());
        let origin = format!("{}:{line}", path.display());
        if !width_ok(format, rec.len()) {
            issues.push(format!(
                "{origin}: {} columns where ColossalEval's loader asserts {} (question, A, B, C, D, answer); skipped",
                rec.len(),
                if format == Format::Ceval {
                    format!("{} or more", skip_cols + 6)
                } else {
                    (skip_cols + 6).to_string()
                }
            ));
            continue;
        }
        let f = |i: usize| rec[skip_cols + i].trim().to_string();
        let Some(answer) = letter_index(&f(5), 4) else {
            issues.push(format!("{origin}: answer {:?} is not one of A, B, C, D; skipped", f(5)));
            continue;
        };
        if f(0).is_empty() {
            issues.push(format!("{origin}: empty question; skipped"));
            continue;
        }
        // ColossalEval's text keeps the fields as read, untrimmed (with the BOM on MMLU's first).
        let raw = |i: usize| &rec[skip_cols + i];
        let first_question =
            if bom && !header && out.is_empty() { format!("\u{feff}{}", raw(0)) } else { raw(0).to_string() };
        let colossal_query = colossal::csv_query(format, &first_question, &[raw(1), raw(2), raw(3), raw(4)]);
        let colossal_target = if format == Format::Ceval && !dev { String::new() } else { raw(5).to_string() };
        let id = if header && !rec[0].trim().is_empty() { rec[0].trim().to_string() } else { index.to_string() };
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

/// Python's `csv.reader` yields an empty row for a blank line, and ColossalEval's width assertion
/// stops the whole run there; the Rust reader passes over it. Each one is named (1-based lines of
/// the newline-translated text; a newline inside a quoted field does not end a line of records).
fn report_blank_lines(path: &Path, text: &str, issues: &mut Vec<String>) {
    let (mut blank, mut line) = (Vec::new(), 1u64);
    let (mut quoted, mut field_start, mut line_start) = (false, true, true);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' && chars.next_if_eq(&'"').is_none() {
                quoted = false;
            }
        } else if c == '"' && field_start {
            quoted = true;
        } else if c == '\n' && line_start {
            blank.push(line);
        }
        if c == '\n' {
            line += 1;
        }
        field_start = !quoted && (c == ',' || c == '\n');
        line_start = !quoted && c == '\n';
    }
    if !blank.is_empty() {
        let lines: Vec<String> = blank.iter().map(u64::to_string).collect();
        issues.push(format!("{}: blank line(s) {} — ColossalEval's loader stops there (Python's csv reader gives an empty row, which fails its column check); passed over", path.display(), lines.join(", ")));
    }
}
