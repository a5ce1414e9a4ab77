//! ColossalEval's multiple-choice prompts for base models (hpcaitech/ColossalAI,
//! `applications/ColossalEval`), written from its rules so that our scores sit beside tables made
//! with it:
//! - the query of each record as its dataset loaders write it (`dataset/{mmlu,cmmlu,ceval,agieval,
//!   gaokaobench}.py`): `Question: …\nA. …\nAnswer: ` (MMLU), `题目：…\nA. …\n答案：` (CMMLU,
//!   C-Eval), AGIEval's `Question: … Choose from the following options: (A)… (B)…\nAnswer: ` or
//!   `问题：… 从以下选项中选择：…\n答案：` after the passage, GAOKAO's `question.strip()\n答案：`;
//! - the subject as named in its tables (MMLU title-cased, CMMLU/C-Eval in Chinese);
//! - the "plain" template (no system text, no separators) that base models get
//!   (`utils/conversation.py`), zero-shot as `instruction\n\ninput`, few-shot as the header and the
//!   dev records each followed by `\n\n` (`get_few_shot_prefix`), then the query;
//! - AGIEval's shots from its `few_shot_prompts.csv` (`combine_prompt`) under the header
//!   `Here are the answers for the problems in the exam.` / `以下是考试中各个问题的答案。`;
//! - the few-shot budget (the model length minus the query-plus-answer tokens), and the middle cut
//!   of a prompt longer than the model length minus 32 new tokens (`models/huggingface.py`), its
//!   halves decoded as transformers decodes them (`clean_up_tokenization_spaces` included);
//! - the choice token ids: the last token of `Answer: X` and of `答案：X`, the larger logit of the
//!   two, over the subject's letters (`all_classes`: A–D, or as many as AGIEval's and GAOKAO's
//!   first record has).
use crate::data::tokenizer::TextTokenizer;
use crate::eval::questions::{encode_prompt, Format, Prompt, Question, Subject, LETTERS};
use anyhow::{anyhow, Result};

/// ColossalEval generates up to 32 tokens (`max_new_tokens` of every dataset here) and keeps the
/// prompt under `model_max_length - 32`.
pub const MAX_NEW_TOKENS: usize = 32;

/// `ceval_subject_mapping` (C-Eval file stem → the Chinese name used in its prompt).
const CEVAL_SUBJECTS: &[(&str, &str)] = &[
    ("computer_network", "计算机网络"),
    ("operating_system", "操作系统"),
    ("computer_architecture", "计算机组成"),
    ("college_programming", "大学编程"),
    ("college_physics", "大学物理"),
    ("college_chemistry", "大学化学"),
    ("advanced_mathematics", "高等数学"),
    ("probability_and_statistics", "概率统计"),
    ("discrete_mathematics", "离散数学"),
    ("electrical_engineer", "注册电气工程师"),
    ("metrology_engineer", "注册计量师"),
    ("high_school_mathematics", "高中数学"),
    ("high_school_physics", "高中物理"),
    ("high_school_chemistry", "高中化学"),
    ("high_school_biology", "高中生物"),
    ("middle_school_mathematics", "初中数学"),
    ("middle_school_biology", "初中生物"),
    ("middle_school_physics", "初中物理"),
    ("middle_school_chemistry", "初中化学"),
    ("veterinary_medicine", "兽医学"),
    ("college_economics", "大学经济学"),
    ("business_administration", "工商管理"),
    ("marxism", "马克思主义基本原理"),
    ("mao_zedong_thought", "毛泽东思想和中国特色社会主义理论体系概论"),
    ("education_science", "教育学"),
    ("teacher_qualification", "教师资格"),
    ("high_school_politics", "高中政治"),
    ("high_school_geography", "高中地理"),
    ("middle_school_politics", "初中政治"),
    ("middle_school_geography", "初中地理"),
    ("modern_chinese_history", "近代史纲要"),
    ("ideological_and_moral_cultivation", "思想道德修养与法律基础"),
    ("logic", "逻辑学"),
    ("law", "法学"),
    ("chinese_language_and_literature", "中国语言文学"),
    ("art_studies", "艺术学"),
    ("professional_tour_guide", "导游资格"),
    ("legal_professional", "法律职业资格"),
    ("high_school_chinese", "高中语文"),
    ("high_school_history", "高中历史"),
    ("middle_school_history", "初中历史"),
    ("civil_servant", "公务员"),
    ("sports_science", "体育学"),
    ("plant_protection", "植物保护"),
    ("basic_medicine", "基础医学"),
    ("clinical_medicine", "临床医学"),
    ("urban_and_rural_planner", "注册城乡规划师"),
    ("accountant", "注册会计师"),
    ("fire_engineer", "注册消防工程师"),
    ("environmental_impact_assessment_engineer", "环境影响评价工程师"),
    ("tax_accountant", "税务师"),
    ("physician", "医师资格"),
];

/// `cmmlu_subject_mapping` (CMMLU file stem → the Chinese name used in its prompt).
const CMMLU_SUBJECTS: &[(&str, &str)] = &[
    ("agronomy", "农学"),
    ("anatomy", "解剖学"),
    ("ancient_chinese", "古汉语"),
    ("arts", "艺术学"),
    ("astronomy", "天文学"),
    ("business_ethics", "商业伦理"),
    ("chinese_civil_service_exam", "中国公务员考试"),
    ("chinese_driving_rule", "中国驾驶规则"),
    ("chinese_food_culture", "中国饮食文化"),
    ("chinese_foreign_policy", "中国外交政策"),
    ("chinese_history", "中国历史"),
    ("chinese_literature", "中国文学"),
    ("chinese_teacher_qualification", "中国教师资格"),
    ("clinical_knowledge", "临床知识"),
    ("college_actuarial_science", "大学精算学"),
    ("college_education", "大学教育学"),
    ("college_engineering_hydrology", "大学工程水文学"),
    ("college_law", "大学法律"),
    ("college_mathematics", "大学数学"),
    ("college_medical_statistics", "大学医学统计"),
    ("college_medicine", "大学医学"),
    ("computer_science", "计算机科学"),
    ("computer_security", "计算机安全"),
    ("conceptual_physics", "概念物理学"),
    ("construction_project_management", "建设工程管理"),
    ("economics", "经济学"),
    ("education", "教育学"),
    ("electrical_engineering", "电气工程"),
    ("elementary_chinese", "小学语文"),
    ("elementary_commonsense", "小学常识"),
    ("elementary_information_and_technology", "小学信息技术"),
    ("elementary_mathematics", "初等数学"),
    ("ethnology", "民族学"),
    ("food_science", "食品科学"),
    ("genetics", "遗传学"),
    ("global_facts", "全球事实"),
    ("high_school_biology", "高中生物"),
    ("high_school_chemistry", "高中化学"),
    ("high_school_geography", "高中地理"),
    ("high_school_mathematics", "高中数学"),
    ("high_school_physics", "高中物理学"),
    ("high_school_politics", "高中政治"),
    ("human_sexuality", "人类性行为"),
    ("international_law", "国际法学"),
    ("journalism", "新闻学"),
    ("jurisprudence", "法理学"),
    ("legal_and_moral_basis", "法律与道德基础"),
    ("logical", "逻辑学"),
    ("machine_learning", "机器学习"),
    ("management", "管理学"),
    ("marketing", "市场营销"),
    ("marxist_theory", "马克思主义理论"),
    ("modern_chinese", "现代汉语"),
    ("nutrition", "营养学"),
    ("philosophy", "哲学"),
    ("professional_accounting", "专业会计"),
    ("professional_law", "专业法学"),
    ("professional_medicine", "专业医学"),
    ("professional_psychology", "专业心理学"),
    ("public_relations", "公共关系"),
    ("security_study", "安全研究"),
    ("sociology", "社会学"),
    ("sports_science", "体育学"),
    ("traditional_chinese_medicine", "中医中药"),
    ("virology", "病毒学"),
    ("world_history", "世界历史"),
    ("world_religions", "世界宗教"),
];

/// AGIEval's English and Chinese single-answer tasks (`english_qa_datasets`, `chinese_qa_datasets`).
const AGIEVAL_ENGLISH: &[&str] = &[
    "lsat-ar",
    "lsat-lr",
    "lsat-rc",
    "logiqa-en",
    "sat-math",
    "sat-en",
    "aqua-rat",
    "sat-en-without-passage",
    "gaokao-english",
];
const AGIEVAL_CHINESE: &[&str] = &[
    "logiqa-zh",
    "jec-qa-kd",
    "jec-qa-ca",
    "gaokao-chinese",
    "gaokao-geography",
    "gaokao-history",
    "gaokao-biology",
    "gaokao-chemistry",
    "gaokao-physics",
    "gaokao-mathqa",
];

/// Tasks whose answers may be several letters: ColossalEval scores them by generation only, never
/// by first-token letter logits (`multi_choice_datasets` of agieval.py and gaokaobench.py).
const AGIEVAL_MULTI_ANSWER: &[&str] = &["jec-qa-kd", "jec-qa-ca", "gaokao-physics", "gaokao-mathqa"];
const GAOKAO_MULTI_ANSWER: &[&str] = &[
    "Chinese Lang and Usage MCQs",
    "Chinese Modern Lit",
    "English Fill in Blanks",
    "English Reading Comp",
    "Geography MCQs",
    "Physics MCQs",
    "English Cloze Test",
];

/// The subject's name in ColossalEval's prompts and reports, or `None` when its table lacks it.
pub fn subject_title(format: Format, stem: &str) -> Option<String> {
    let table = |t: &[(&str, &str)]| t.iter().find(|(k, _)| *k == stem).map(|(_, v)| v.to_string());
    match format {
        // `" ".join(word.title() if word != "us" else "US")` over the `_`-separated words.
        Format::Mmlu => Some(
            stem.split('_')
                .map(|w| if w == "us" { "US".to_string() } else { python_title(w) })
                .collect::<Vec<_>>()
                .join(" "),
        ),
        Format::Cmmlu => table(CMMLU_SUBJECTS),
        Format::Ceval => table(CEVAL_SUBJECTS),
        Format::Agieval => Some(stem.to_string()),
        // `file[10:-5].split("_")` joined by spaces: the year range `2010-2022_` dropped.
        Format::Gaokao => Some(stem.chars().skip(10).collect::<String>().split('_').collect::<Vec<_>>().join(" ")),
    }
}

/// Python's `str.title()`: a letter after a non-letter is upper-cased, any other lower-cased.
fn python_title(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    let mut after_letter = false;
    for c in word.chars() {
        if after_letter {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        after_letter = c.is_alphabetic();
    }
    out
}

/// Whether AGIEval task `stem` is written in Chinese, or `None` when ColossalEval does not know it.
pub fn agieval_is_chinese(stem: &str) -> Option<bool> {
    if AGIEVAL_ENGLISH.contains(&stem) {
        Some(false)
    } else if AGIEVAL_CHINESE.contains(&stem) {
        Some(true)
    } else {
        None
    }
}

/// Why ColossalEval would not score this subject by first-token letter logits, if it would not.
pub fn not_first_token_scored(format: Format, subject: &Subject) -> Option<String> {
    let multi = match format {
        Format::Agieval => AGIEVAL_MULTI_ANSWER.contains(&subject.name.as_str()),
        Format::Gaokao => GAOKAO_MULTI_ANSWER.contains(&subject.title.as_str()),
        _ => false,
    };
    multi.then(|| format!("subject {:?}: ColossalEval scores it by generation only (answers may be several letters), so the colossal style skips its {} single-answer questions", subject.name, subject.test.len()))
}

/// What the colossal prompt does with a subject ColossalEval's tables lack, if it lacks it.
pub fn unknown_subject_note(format: Format, subject: &Subject) -> Option<String> {
    if subject.title_known {
        return None;
    }
    Some(match format {
        Format::Agieval => format!("subject {:?} is not one of ColossalEval's AGIEval tasks: its colossal prompt is in Chinese where the question has Chinese characters, with no shots", subject.name),
        _ => format!("subject {:?} is not in ColossalEval's {format:?} subject table: its colossal prompt names it {:?}", subject.name, subject.title),
    })
}

/// A CSV record's query (ColossalEval's `input`): MMLU in English, CMMLU and C-Eval in Chinese.
pub fn csv_query(format: Format, question: &str, choices: &[&str]) -> String {
    let choices = LETTERS.iter().zip(choices).map(|(l, c)| format!("{l}. {c}")).collect::<Vec<_>>().join("\n");
    match format {
        Format::Mmlu => format!("Question: {question}\n{choices}\nAnswer: "),
        _ => format!("题目：{question}\n{choices}\n答案："),
    }
}

/// An AGIEval record's query (its `instruction`): the options keep their `(A)` prefixes, joined by
/// spaces; a passage goes first, followed by a blank line.
pub fn agieval_query(chinese: bool, passage: &str, question: &str, options: &[&str]) -> String {
    let options = options.join(" ");
    let query = if chinese {
        format!("问题：{question} 从以下选项中选择：{options}\n答案：")
    } else {
        format!("Question: {question} Choose from the following options: {options}\nAnswer: ")
    };
    if passage.is_empty() {
        query
    } else {
        format!("{passage}\n\n{query}")
    }
}

/// A GAOKAO-Bench record's query (its `instruction`).
pub fn gaokao_query(question: &str) -> String {
    format!("{}\n答案：", question.trim())
}

/// The zero-shot instruction before a CSV record's query (AGIEval and GAOKAO have none).
fn instruction(format: Format, title: &str) -> Option<String> {
    match format {
        Format::Mmlu => Some(format!(
            "The following is a single-choice question on {title}. Answer the question by replying A, B, C or D."
        )),
        Format::Cmmlu => Some(format!("以下是关于{title}的单项选择题，请直接给出正确答案的选项。")),
        Format::Ceval => Some(format!("以下是中国关于{title}考试的单项选择题，请选出其中的正确答案。")),
        Format::Agieval | Format::Gaokao => None,
    }
}

/// The first line of a few-shot prompt (`get_few_shot_data`).
fn few_shot_header(format: Format, title: &str) -> Option<String> {
    match format {
        Format::Mmlu => Some(format!("The following are multiple choice questions (with answers) about {title}.")),
        Format::Cmmlu | Format::Ceval => instruction(format, title),
        // `combine_prompt`'s first line, by the task's language.
        Format::Agieval => agieval_is_chinese(title).map(|chinese| {
            if chinese {
                "以下是考试中各个问题的答案。"
            } else {
                "Here are the answers for the problems in the exam."
            }
            .to_string()
        }),
        // ColossalEval runs GAOKAO-Bench zero-shot.
        Format::Gaokao => None,
    }
}

/// The prompt of `q` for a base model of `model_max_length` tokens, with up to `shots` dev records.
pub fn prompt(
    tok: &TextTokenizer,
    format: Format,
    subject: &Subject,
    q: &Question,
    shots: usize,
    model_max_length: usize,
) -> Result<Prompt> {
    let dev = &subject.dev[..shots.min(subject.dev.len())];
    let header = few_shot_header(format, &subject.title).filter(|_| !dev.is_empty());
    let (text, shots_used) = match header {
        None => {
            let text = match instruction(format, &subject.title) {
                Some(i) => format!("{i}\n\n{}", q.colossal_query),
                None => q.colossal_query.clone(),
            };
            (text, 0)
        }
        Some(header) => {
            // Room for the shots: what the query and its answer leave of the model length.
            let budget = model_max_length as i64
                - encode_prompt(tok, &format!("{}{}", q.colossal_query, q.colossal_target))?.len() as i64;
            let mut prefix = format!("{header}\n\n");
            let mut fitting: Option<(String, usize)> = None;
            for (i, ex) in dev.iter().enumerate() {
                prefix.push_str(&format!("{}{}\n\n", ex.colossal_query, ex.colossal_target));
                if encode_prompt(tok, &prefix)?.len() as i64 <= budget {
                    fitting = Some((prefix.clone(), i + 1));
                } else {
                    break;
                }
            }
            // When not even the first shot fits, ColossalEval keeps the prefix that overflowed
            // (header and first shot): its `output` stays None and the loop's last prefix is returned.
            let (prefix, used) = fitting.unwrap_or((prefix, 1));
            (format!("{prefix}{}", q.colossal_query), used)
        }
    };
    let limit = model_max_length.checked_sub(MAX_NEW_TOKENS).filter(|l| *l > 1).ok_or_else(|| anyhow!("--max-tokens {model_max_length}: the colossal style needs more than {MAX_NEW_TOKENS} + 1 tokens (it keeps {MAX_NEW_TOKENS} for generation)"))?;
    let mut ids = encode_prompt(tok, &text)?;
    let mut text = text;
    if ids.len() > limit {
        // The middle goes: the first and last `limit / 2` tokens are decoded, joined and encoded
        // again, then cut to `limit` at the end (the tokenizer's right truncation).
        let half = limit / 2;
        let decode =
            |part: &[u32]| tok.decode(part, true).map_err(|e| anyhow!("{}: a truncated prompt: {e}", q.origin));
        text = format!("{}{}", decode(&ids[..half])?, decode(&ids[ids.len() - half..])?);
        ids = encode_prompt(tok, &text)?;
        ids.truncate(limit);
    }
    Ok(Prompt { text, ids, shots: shots_used })
}

/// Per letter of the first `classes`, the last token of `Answer: X` and of `答案：X` (one id when
/// they agree).
pub fn letter_ids(tok: &TextTokenizer, classes: usize) -> Result<Vec<Vec<u32>>> {
    LETTERS[..classes]
        .iter()
        .map(|l| {
            let mut ids = Vec::new();
            for context in [format!("Answer: {l}"), format!("答案：{l}")] {
                let id = *tok
                    .encode_text(&context)?
                    .last()
                    .ok_or_else(|| anyhow!("the tokenizer encodes {context:?} as nothing"))?;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            Ok(ids)
        })
        .collect()
}
