//! Which learnt pieces to add: a filter by writing system (script), and the default rule that
//! picks the scripts the base tokenizer encodes poorly on the corpus.
use std::collections::HashMap;
use std::fmt;

use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use tokenizers::Tokenizer;

/// A writing system a piece filter can keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Script {
    Han,
    Hiragana,
    Katakana,
    Hangul,
    Latin,
    Cyrillic,
    Greek,
    Arabic,
    Hebrew,
    Thai,
    Devanagari,
}

const ALL: [Script; 11] = [
    Script::Han,
    Script::Hiragana,
    Script::Katakana,
    Script::Hangul,
    Script::Latin,
    Script::Cyrillic,
    Script::Greek,
    Script::Arabic,
    Script::Hebrew,
    Script::Thai,
    Script::Devanagari,
];

/// Punctuation of the East Asian scripts: CJK symbols and punctuation (without the ideographic
/// space), vertical, compatibility and small forms, and the fullwidth ASCII punctuation.
const CJK_PUNCTUATION: &[(u32, u32)] = &[
    (0x3001, 0x3004),
    (0x3008, 0x3020),
    (0x3030, 0x3037),
    (0x303C, 0x303F),
    (0xFE10, 0xFE1F),
    (0xFE30, 0xFE6F),
    (0xFF01, 0xFF0F),
    (0xFF1A, 0xFF20),
    (0xFF3B, 0xFF40),
    (0xFF5B, 0xFF65),
];

impl Script {
    /// Parses a script name (case-insensitive), as `--keep-script` takes it.
    pub fn parse(name: &str) -> Result<Script> {
        ALL.into_iter().find(|s| s.name().eq_ignore_ascii_case(name.trim())).ok_or_else(|| {
            anyhow!("unknown script {name:?}; known: {}", ALL.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "))
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Script::Han => "Han",
            Script::Hiragana => "Hiragana",
            Script::Katakana => "Katakana",
            Script::Hangul => "Hangul",
            Script::Latin => "Latin",
            Script::Cyrillic => "Cyrillic",
            Script::Greek => "Greek",
            Script::Arabic => "Arabic",
            Script::Hebrew => "Hebrew",
            Script::Thai => "Thai",
            Script::Devanagari => "Devanagari",
        }
    }

    /// The script's letters (Unicode blocks, inclusive ranges).
    fn letters(self) -> &'static [(u32, u32)] {
        match self {
            Script::Han => &[
                (0x2E80, 0x2FDF),
                (0x3005, 0x3007),
                (0x3021, 0x3029),
                (0x3038, 0x303B),
                (0x3400, 0x4DBF),
                (0x4E00, 0x9FFF),
                (0xF900, 0xFAFF),
                (0x20000, 0x323AF),
            ],
            Script::Hiragana => &[(0x3041, 0x309F)],
            Script::Katakana => &[(0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F)],
            Script::Hangul => &[(0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF)],
            Script::Latin => &[(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x24F), (0x1E00, 0x1EFF)],
            Script::Cyrillic => &[(0x400, 0x52F)],
            Script::Greek => &[(0x370, 0x3FF), (0x1F00, 0x1FFF)],
            Script::Arabic => &[(0x600, 0x6FF), (0x750, 0x77F)],
            Script::Hebrew => &[(0x590, 0x5FF)],
            Script::Thai => &[(0xE00, 0xE7F)],
            Script::Devanagari => &[(0x900, 0x97F)],
        }
    }

    /// The script's own punctuation (only the East Asian scripts have punctuation of their own;
    /// the others share ASCII/general punctuation with English, which must stay untouched).
    fn punctuation(self) -> &'static [(u32, u32)] {
        match self {
            Script::Han | Script::Hiragana | Script::Katakana | Script::Hangul => CJK_PUNCTUATION,
            _ => &[],
        }
    }

    /// The script whose letter `c` is (`None`: digits, punctuation, symbols, spaces, others).
    pub fn of(c: char) -> Option<Script> {
        let c = c as u32;
        ALL.into_iter().find(|s| s.letters().iter().any(|&(a, b)| (a..=b).contains(&c)))
    }
}

impl fmt::Display for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn in_ranges(c: char, ranges: &[(u32, u32)]) -> bool {
    ranges.iter().any(|&(a, b)| (a..=b).contains(&(c as u32)))
}

/// The pieces an extension may add: made only of letters of the kept scripts and those scripts'
/// own punctuation, after at most one leading space (a word start, as SentencePiece spells it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ScriptFilter {
    pub scripts: Vec<Script>,
}

impl ScriptFilter {
    pub fn new(mut scripts: Vec<Script>) -> ScriptFilter {
        scripts.sort();
        scripts.dedup();
        ScriptFilter { scripts }
    }

    /// A character of a kept script (letter or punctuation).
    pub fn keeps_char(&self, c: char) -> bool {
        self.scripts.iter().any(|&s| in_ranges(c, s.letters()) || in_ranges(c, s.punctuation()))
    }

    /// A piece (text form) made only of kept characters, after at most one leading space.
    pub fn keeps_piece(&self, text: &str) -> bool {
        let body = text.strip_prefix(' ').unwrap_or(text);
        !body.is_empty() && body.chars().all(|c| self.keeps_char(c))
    }

    /// Whether `text` holds any kept character (text without one must tokenize as before).
    pub fn touches(&self, text: &str) -> bool {
        text.chars().any(|c| self.keeps_char(c))
    }

    pub fn names(&self) -> String {
        self.scripts.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
    }
}

/// How a base tokenizer encodes one script's letters on a corpus.
#[derive(Clone, Debug, Serialize)]
pub struct ScriptCost {
    pub script: Script,
    pub chars: u64,
    /// Tokens per letter: each token's count shared equally among the characters it covers.
    pub tokens_per_char: f64,
}

/// Tokens per letter of each script on `texts` with the base tokenizer (scripts with letters only).
pub fn script_costs(tok: &Tokenizer, texts: &[String]) -> Result<Vec<ScriptCost>> {
    use rayon::prelude::*;
    let per_chunk: Vec<HashMap<Script, (u64, f64)>> = texts
        .par_chunks(256)
        .map(|chunk| -> Result<HashMap<Script, (u64, f64)>> {
            let mut m: HashMap<Script, (u64, f64)> = HashMap::new();
            for t in chunk {
                let chars: Vec<char> = t.chars().collect();
                let mut weight = vec![0f64; chars.len()];
                let enc = tok
                    .encode_char_offsets(t.as_str(), false)
                    .map_err(|e| anyhow!("encoding the corpus with the base tokenizer: {e}"))?;
                for &(a, b) in enc.get_offsets() {
                    let (a, b) = (a.min(chars.len()), b.min(chars.len()));
                    if b > a {
                        for w in &mut weight[a..b] {
                            *w += 1.0 / (b - a) as f64;
                        }
                    }
                }
                for (c, w) in chars.iter().zip(weight) {
                    if let Some(s) = Script::of(*c) {
                        let e = m.entry(s).or_default();
                        e.0 += 1;
                        e.1 += w;
                    }
                }
            }
            Ok(m)
        })
        .collect::<Result<_>>()?;
    let mut total: HashMap<Script, (u64, f64)> = HashMap::new();
    for m in per_chunk {
        for (s, (n, w)) in m {
            let e = total.entry(s).or_default();
            e.0 += n;
            e.1 += w;
        }
    }
    let mut out: Vec<ScriptCost> = total
        .into_iter()
        .map(|(script, (chars, w))| ScriptCost { script, chars, tokens_per_char: w / chars.max(1) as f64 })
        .collect();
    out.sort_by_key(|c| c.script);
    Ok(out)
}

/// Scripts with fewer letters than this share of the corpus's letters are never chosen by default
/// (a few Greek letters in a Chinese corpus, spelt in bytes, are not a language to add).
pub const DEFAULT_MIN_SCRIPT_SHARE: f64 = 0.01;

/// The default filter when learning on a corpus: the scripts whose letters the base tokenizer
/// spends more than one token each on (byte fallback, or characters it never merges), among those
/// holding at least [`DEFAULT_MIN_SCRIPT_SHARE`] of the corpus's letters.
pub fn default_filter(costs: &[ScriptCost]) -> Result<ScriptFilter> {
    let letters: u64 = costs.iter().map(|c| c.chars).sum();
    let poor: Vec<Script> = costs
        .iter()
        .filter(|c| c.tokens_per_char > 1.0 && c.chars as f64 >= DEFAULT_MIN_SCRIPT_SHARE * letters as f64)
        .map(|c| c.script)
        .collect();
    if poor.is_empty() {
        let seen =
            costs.iter().map(|c| format!("{} {:.3}", c.script, c.tokens_per_char)).collect::<Vec<_>>().join(", ");
        bail!(
            "the base tokenizer spends at most one token per letter on every script that holds {}% of the corpus's letters ({seen}); name the scripts to add pieces of with --keep-script",
            DEFAULT_MIN_SCRIPT_SHARE * 100.0
        );
    }
    Ok(ScriptFilter::new(poor))
}
