//! The benchmark records every prompt style and the scorer share: the formats, a question and its
//! subject as loaded, and a prompt as scored.
use crate::data::tokenizer::TextTokenizer;
use anyhow::{bail, Result};
use serde::Serialize;

/// Choice letters: MMLU, CMMLU and C-Eval use A–D; AGIEval (up to G) and GAOKAO (as many as its
/// first question names) may use more ([`Subject::classes`]).
pub const LETTERS: [&str; 26] = [
    "A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "K", "L", "M", "N", "O", "P", "Q", "R", "S", "T", "U", "V", "W",
    "X", "Y", "Z",
];

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

/// One multiple-choice question as loaded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Question {
    pub question: String,
    /// Choice texts, or empty when the options are inline in the question (GAOKAO).
    pub choices: Vec<String>,
    /// 0 = A, 1 = B, … (below the subject's [`Subject::classes`]).
    pub answer: usize,
    /// `file:line`.
    pub origin: String,
    /// The record's own id (C-Eval's `id`, CMMLU's first column), else its 0-based index in the file.
    pub id: String,
    /// The record as ColossalEval's loader writes it, before the answer (see [`super::prompt::colossal`]).
    pub colossal_query: String,
    /// What ColossalEval puts after the query in a shot and counts in the few-shot budget: the
    /// answer as written (empty for C-Eval records outside `dev`, as ColossalEval does).
    pub colossal_target: String,
}

#[derive(Clone, Debug)]
pub struct Subject {
    /// The file stem.
    pub name: String,
    /// The name ColossalEval's prompts use (title-cased, or Chinese from its subject tables).
    pub title: String,
    /// Whether ColossalEval's tables know the subject (else `title` is the file stem).
    pub title_known: bool,
    /// How many letters the answer is chosen from (4: A–D; AGIEval and GAOKAO count the options
    /// of their first record, as ColossalEval does).
    pub classes: usize,
    pub dev: Vec<Question>,
    pub test: Vec<Question>,
}

impl Default for Subject {
    /// No questions, scored over A–D.
    fn default() -> Self {
        Subject { name: String::new(), title: String::new(), title_known: true, classes: 4, dev: vec![], test: vec![] }
    }
}

/// 0 for `A`, 1 for `B`, … below `classes` (surrounding spaces ignored, as ColossalEval's scorer
/// finds the letter by a regular expression).
pub fn letter_index(s: &str, classes: usize) -> Option<usize> {
    LETTERS[..classes].iter().position(|l| *l == s.trim())
}

/// `A–D` for 4 classes.
pub fn letter_range(classes: usize) -> String {
    format!("{}–{}", LETTERS[0], LETTERS[classes - 1])
}

/// Whether `s` holds a CJK unified ideograph (the prompts' language switch).
pub fn has_cjk(s: &str) -> bool {
    s.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c))
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
