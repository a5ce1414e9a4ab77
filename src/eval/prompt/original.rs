//! The benchmarks' own layouts: a subject header, the dev examples as shots (fewer when the context
//! would overflow), `Answer:` / `答案：`, letters spaced and unspaced.
use crate::data::tokenizer::TextTokenizer;
use crate::eval::questions::{encode_prompt, has_cjk, Prompt, Question, Subject, LETTERS};
use anyhow::{bail, Result};

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

/// The benchmark's own layout, dropping shots until the prompt fits `max_tokens`.
pub fn prompt(tok: &TextTokenizer, subject: &Subject, q: &Question, shots: usize, max_tokens: usize) -> Result<Prompt> {
    let chinese = has_cjk(&q.question) || has_cjk(&subject.name);
    let name = subject.name.replace('_', " ");
    let header = if chinese {
        format!("以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n")
    } else {
        format!("The following are multiple choice questions (with answers) about {name}.\n\n")
    };
    let mut k = shots.min(subject.dev.len());
    loop {
        let mut text = header.clone();
        for ex in &subject.dev[..k] {
            text.push_str(&render(ex, chinese, Some(ex.answer)));
        }
        text.push_str(&render(q, chinese, None));
        let ids = encode_prompt(tok, &text)?;
        if ids.len() <= max_tokens || k == 0 {
            if ids.len() > max_tokens {
                bail!("{}: the question alone takes {} tokens, more than {max_tokens}", q.origin, ids.len());
            }
            return Ok(Prompt { text, ids, shots: k });
        }
        k -= 1;
    }
}

/// Per letter of the first `classes`, its unspaced and spaced forms that are single tokens.
pub fn letter_ids(tok: &TextTokenizer, classes: usize) -> Result<Vec<Vec<u32>>> {
    LETTERS[..classes]
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
