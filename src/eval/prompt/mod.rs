//! Prompt styles: ColossalEval's prompts for base models ([`colossal`], the default) or the
//! benchmarks' own layouts ([`original`]), and the token ids that stand for the choice letters.
pub mod colossal;
pub mod original;

use super::questions::{Format, Prompt, Question, Subject};
use crate::data::tokenizer::TextTokenizer;
use anyhow::{bail, Result};
use serde::Serialize;

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
        PromptStyle::Colossal => colossal::prompt(tok, format, subject, q, shots, max_tokens),
        PromptStyle::Original => original::prompt(tok, subject, q, shots, max_tokens),
    }
}

/// Token ids of each of the first `classes` letters in `style`: ColossalEval's (after `Answer: `
/// and `答案：`), or the original's (unspaced and spaced, those that are single tokens).
pub fn letter_ids(tok: &TextTokenizer, style: PromptStyle, classes: usize) -> Result<Vec<Vec<u32>>> {
    match style {
        PromptStyle::Colossal => colossal::letter_ids(tok, classes),
        PromptStyle::Original => original::letter_ids(tok, classes),
    }
}
