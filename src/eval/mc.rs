//! Multiple-choice benchmarks scored by the first predicted token: the answer is the argmax over
//! the choice letters' logits (per letter, the max over its token ids). The questions come from
//! [`super::load`], their prompts from [`super::prompt`] in either style.
use super::prompt::{self, colossal, PromptStyle};
use super::questions::{Format, Prompt, Question, Subject, LETTERS};
use crate::backend::Backend;
use crate::batch::Batch;
use crate::data::tokenizer::TextTokenizer;
use crate::generate::{generate, Sampling};
use crate::model::Llama;
use anyhow::Result;
use serde::Serialize;

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
    /// AGIEval/GAOKAO: also counting a greedy answer whose first choice letter is right
    /// (ColossalEval's `combined_single_choice_accuracy`).
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
    /// Per letter of the subject (A–D, or more for AGIEval and GAOKAO), the first predicted
    /// token's logit (the max over the letter's token ids).
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
    let most_classes = subjects.iter().map(|s| s.classes).max().unwrap_or(4);
    let scorer = Scorer {
        model,
        backend,
        tok,
        letters: prompt::letter_ids(tok, style, most_classes)?,
        combined: matches!(format, Format::Agieval | Format::Gaokao),
    };
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
        if style == PromptStyle::Colossal {
            if let Some(why) = colossal::not_first_token_scored(format, s) {
                report.issues.push(why);
                continue;
            }
            report.issues.extend(colossal::unknown_subject_note(format, s));
        }
        let mut prompts = Vec::new();
        for q in &s.test {
            match prompt::prompt(tok, style, format, s, q, shots, max_tokens) {
                Ok(p) => prompts.push((q, p)),
                Err(e) => report.issues.push(format!("{e:#}")),
            }
        }
        let (score, results) = scorer.subject(s, &prompts, batch_tokens)?;
        report.questions += score.questions;
        report.correct += score.correct;
        combined_total += score.combined_correct.unwrap_or(0);
        report.subjects.push(score);
        report.per_question.extend(results);
    }
    report.accuracy = if report.questions > 0 { report.correct as f64 / report.questions as f64 } else { 0.0 };
    if scorer.combined && report.questions > 0 {
        report.combined_accuracy = Some(combined_total as f64 / report.questions as f64);
    }
    Ok(report)
}

/// What scoring needs besides the prompts: the model, the letters' token ids (of the subject with
/// the most letters; each subject takes its first ones), and whether greedy answers count too
/// (AGIEval, GAOKAO).
struct Scorer<'a, B: Backend> {
    model: &'a Llama<B>,
    backend: &'a B,
    tok: &'a TextTokenizer,
    letters: Vec<Vec<u32>>,
    combined: bool,
}

impl<B: Backend> Scorer<'_, B> {
    /// Scores one subject's prompts, packed into batches of about `batch_tokens` tokens.
    fn subject(
        &self,
        s: &Subject,
        prompts: &[(&Question, Prompt)],
        batch_tokens: usize,
    ) -> Result<(SubjectScore, Vec<QuestionResult>)> {
        let mut results = Vec::with_capacity(prompts.len());
        let mut comb = 0;
        let v = self.model.config.vocab_size;
        for chunk in pack(prompts, batch_tokens) {
            let (batch, last) = packed_batch(&chunk);
            let logits = self.model.logits_at(self.backend, &batch, &last)?;
            for (i, (q, p)) in chunk.iter().enumerate() {
                let (pick, per) = choose(&logits[i * v..(i + 1) * v], &self.letters[..s.classes]);
                let ok = pick == q.answer;
                if self.combined {
                    comb += (ok || self.greedy_letter(&p.ids, s.classes)? == Some(q.answer)) as usize;
                }
                results.push(QuestionResult {
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
        let correct = results.iter().filter(|r| r.correct).count();
        let score = SubjectScore {
            subject: s.name.clone(),
            questions: nq,
            correct,
            accuracy: if nq > 0 { correct as f64 / nq as f64 } else { 0.0 },
            combined_correct: self.combined.then_some(comb),
            shots_used_min: prompts.iter().map(|(_, p)| p.shots).min().unwrap_or(0),
        };
        Ok((score, results))
    }

    /// The choice letter ColossalEval reads from its greedy answer to `ids` (32 new tokens,
    /// decoded as transformers decodes them).
    fn greedy_letter(&self, ids: &[u32], classes: usize) -> Result<Option<usize>> {
        let eos: Vec<u32> = self.tok.eos.into_iter().collect();
        let new_tokens = colossal::MAX_NEW_TOKENS;
        let gen = generate(self.model, self.backend, ids, new_tokens, &Sampling::GREEDY, &eos, None, |_| {})?;
        Ok(first_choice_letter(self.tok.decode(&gen, true)?.trim(), classes))
    }
}

/// `single_choice_accuracy`'s reading of an answer: the first of the `classes` letters that has no
/// lower-case ASCII letter on either side (`(?<![a-z])[A-D](?![a-z])`).
pub fn first_choice_letter(text: &str, classes: usize) -> Option<usize> {
    let chars: Vec<char> = text.chars().collect();
    let lower = |i: Option<usize>| i.and_then(|i| chars.get(i)).is_some_and(char::is_ascii_lowercase);
    (0..chars.len()).find_map(|i| {
        let letter = LETTERS[..classes].iter().position(|l| l.starts_with(chars[i]))?;
        (!lower(i.checked_sub(1)) && !lower(Some(i + 1))).then_some(letter)
    })
}

/// The prompts of `chunk` as separate documents of one row, and each one's last position.
fn packed_batch(chunk: &[&(&Question, Prompt)]) -> (Batch, Vec<usize>) {
    let tokens: Vec<u32> = chunk.iter().flat_map(|(_, p)| p.ids.iter().copied()).collect();
    let mut cu = vec![0u32];
    let mut positions = Vec::with_capacity(tokens.len());
    let mut last = Vec::new();
    for (_, p) in chunk {
        positions.extend(0..p.ids.len() as u32);
        cu.push(cu.last().unwrap() + p.ids.len() as u32);
        last.push(*cu.last().unwrap() as usize - 1);
    }
    let n = tokens.len();
    (Batch { rows: 1, seq_len: n, tokens, targets: vec![-100; n], cu_seqlens: cu, positions }, last)
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
        s.push_str(&format!(
            "combined (first-token, or the first choice letter of a 32-token greedy answer): {:.1}%\n",
            100.0 * c
        ));
    }
    s
}
