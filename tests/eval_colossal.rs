//! Evaluation as ColossalEval does it on messy inputs (tests/fixtures/eval/messy: invented
//! questions under real subject names): files saved with CRLF, a byte-order mark, blank lines and
//! spaced answers, read as its Python reads them; the middle cut decoded as transformers decodes
//! (`clean_up_tokenization_spaces` on, off, absent); AGIEval's few-shot file and five-option tasks;
//! GAOKAO-Bench's published layout; the unknown-subject note; the letter read from a greedy
//! answer. The oracle is tools/colossal_eval_reference.py (Python's csv, pandas, transformers, re).
mod common;
#[path = "common/eval_model.rs"]
mod eval_model;
use eval_model::{fixtures, model_dir, tokenizer};
use llama_cpt::cpu::Cpu;
use llama_cpt::data::tokenizer::{SpecialTokenOptions, TextTokenizer};
use llama_cpt::eval::questions::{Format, Prompt, Subject};
use llama_cpt::eval::{load, mc, prompt};
use llama_cpt::model::Llama;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn messy(dir: &str) -> PathBuf {
    fixtures().join("messy").join(dir)
}

fn load_messy(format: Format, dir: &str, shots: usize) -> (Vec<Subject>, Vec<String>) {
    let mut issues = vec![];
    let subjects = load::load(format, &messy(dir), shots, &mut issues).unwrap();
    (subjects, issues)
}

/// Runs the Python oracle on `request` and returns its answer.
fn oracle(name: &str, request: Value) -> Value {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let (req, resp) = (tmp.join(format!("{name}-req.json")), tmp.join(format!("{name}-resp.json")));
    std::fs::write(&req, request.to_string()).unwrap();
    common::run_python("colossal_eval_reference.py", &[&req, &resp]);
    serde_json::from_str(&std::fs::read_to_string(resp).unwrap()).unwrap()
}

fn colossal(tok: &TextTokenizer, format: Format, s: &Subject, q: usize, shots: usize, max: usize) -> Prompt {
    prompt::prompt(tok, prompt::PromptStyle::Colossal, format, s, &s.test[q], shots, max).unwrap()
}

/// Python's `csv.reader` over `open(path, encoding="utf-8")` turns CRLF (also inside quotes) into
/// `\n`, keeps a BOM as U+FEFF in MMLU's first question, gives an empty row for a blank line (on
/// which ColossalEval's loader stops) and keeps the spaces around an answer letter, which the
/// shot text shows and the scorer ignores.
#[test]
fn messy_csv_files_read_as_colossal_eval_s_python_reads_them() {
    let (mmlu, issues) = load_messy(Format::Mmlu, "mmlu", 5);
    let astronomy = &mmlu[0];
    let files = ["mmlu/test/astronomy_test.csv", "mmlu/dev/astronomy_dev.csv"].map(messy);
    let python = oracle("csv", json!({"csv": files}));
    for (file, ours) in files.iter().zip([&astronomy.test, &astronomy.dev]) {
        let rows: Vec<Vec<String>> = serde_json::from_value(python["csv"][file.to_str().unwrap()].clone()).unwrap();
        let rows: Vec<&Vec<String>> = rows.iter().filter(|r| !r.is_empty()).collect();
        assert_eq!(rows.len(), ours.len(), "{}", file.display());
        for (row, q) in rows.iter().zip(ours.iter()) {
            let query =
                format!("Question: {}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer: ", row[0], row[1], row[2], row[3], row[4]);
            assert_eq!(q.colossal_query, query, "{}", q.origin);
            assert_eq!(q.colossal_target, row[5], "{}", q.origin);
        }
    }
    assert!(astronomy.test[0].colossal_query.starts_with("Question: \u{feff}Which planet"));
    assert_eq!(
        astronomy.test[0].question, "Which planet is known as the red planet?",
        "the original style drops the BOM"
    );
    assert_eq!(astronomy.test[2].answer, 1, "\" B \" is B");
    let joined = issues.join("\n");
    assert!(joined.contains("astronomy_test.csv: starts with a UTF-8 byte-order mark"), "{joined}");
    assert!(joined.contains("astronomy_test.csv: blank line(s) 4 — ColossalEval's loader stops there"), "{joined}");
    assert_eq!(issues.len(), 2, "{joined}");
    let tok = tokenizer();
    assert_eq!(
        colossal(&tok, Format::Mmlu, astronomy, 1, 5, 2048).text,
        "The following are multiple choice questions (with answers) about Astronomy.\n\n\
         Question: Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer:  B\n\n\
         Question: Is a comet's tail\nmade of ice and dust?\nA. Yes\nB. No\nC. Only ice\nD. Only dust\nAnswer: A\n\n\
         Question: Which of these, seen from Earth,\nis brightest at night?\nA. The Moon\nB. Sirius\nC. Venus\nD. Mars\nAnswer: "
    );
    let (cmmlu, issues) = load_messy(Format::Cmmlu, "cmmlu", 5);
    assert!(issues.is_empty(), "{issues:?}");
    let file = messy("cmmlu/test/chinese_literature.csv");
    let python = oracle("csv-cmmlu", json!({"csv": [file]}));
    let row = &python["csv"][file.to_str().unwrap()][1];
    assert_eq!(
        cmmlu[0].test[0].colossal_query,
        format!(
            "题目：{}\nA. {}\nB. {}\nC. {}\nD. {}\n答案：",
            row[1].as_str().unwrap(),
            row[2].as_str().unwrap(),
            row[3].as_str().unwrap(),
            row[4].as_str().unwrap(),
            row[5].as_str().unwrap()
        )
    );
    assert!(!cmmlu[0].test[0].colossal_query.contains('\r'));
}

/// A copy of the test tokenizer whose `tokenizer_config.json` sets `clean_up_tokenization_spaces`
/// to `clean_up` (or leaves it out).
fn tokenizer_dir(name: &str, clean_up: Option<bool>) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(model_dir().join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let mut config = json!({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": null, "eos_token": null});
    if let Some(c) = clean_up {
        config["clean_up_tokenization_spaces"] = json!(c);
    }
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

fn load_tokenizer(dir: &Path) -> TextTokenizer {
    let opts = SpecialTokenOptions {
        model_config: Some(model_dir().join("config.json")),
        add_bos: Some(true),
        add_eos: Some(false),
    };
    TextTokenizer::load(&dir.join("tokenizer.json"), &opts).unwrap()
}

/// `_get_truncated_prompts`: a prompt longer than the model length minus 32 keeps its first and last
/// `limit / 2` tokens, each half decoded by transformers (tidied when the tokenizer config asks).
#[test]
fn cut_prompts_decode_as_transformers_with_clean_up_on_and_off() {
    let (mmlu, _) = load_messy(Format::Mmlu, "mmlu", 0);
    let logic = mmlu.iter().find(|s| s.name == "formal_logic").unwrap();
    let mut cuts = Vec::new();
    let mut ours = Vec::new();
    for (name, clean_up) in [("clean-up-on", Some(true)), ("clean-up-off", Some(false)), ("clean-up-absent", None)] {
        let dir = tokenizer_dir(name, clean_up);
        let tok = load_tokenizer(&dir);
        assert_eq!(tok.clean_up_tokenization_spaces, clean_up == Some(true), "{name}");
        let whole = colossal(&tok, Format::Mmlu, logic, 0, 0, 4096);
        let max = whole.ids.len() / 2 + 32;
        let cut = colossal(&tok, Format::Mmlu, logic, 0, 0, max);
        assert!(cut.ids.len() <= max - 32, "{name}: {} tokens", cut.ids.len());
        cuts.push(json!({"tokenizer_dir": dir, "text": whole.text, "bos": tok.bos, "limit": max - 32}));
        ours.push(cut.text);
    }
    let theirs = oracle("cuts", json!({ "cuts": cuts }));
    for (i, ours) in ours.iter().enumerate() {
        assert_eq!(ours, theirs["cuts"][i]["text"].as_str().unwrap(), "cut {i}");
        assert_eq!(theirs["cuts"][i]["clean_up"], i == 0, "transformers reads the setting of cut {i}");
    }
    assert!(ours[0].contains("question, or") && ours[0].contains("It's"), "{}", ours[0]);
    assert!(!ours[0].contains(" ,") && !ours[0].contains(" ?") && !ours[0].contains(" 's"), "{}", ours[0]);
    assert!(ours[1].contains("question , or") && ours[1].contains("It 's"), "{}", ours[1]);
    assert_eq!(ours[1], ours[2], "absent means off (transformers' default)");
}

/// ColossalEval's prompt for the first lsat-ar question with the shots of the messy few-shot file.
const LSAT_AR_FIVE_SHOT: &str = "Here are the answers for the problems in the exam.\n\n\
    Question: Six dogs, L, M, N, O, P and Q, sit in a row. M sits next to \"the oldest\" dog. Which dog can't sit first?\n\
    Choose from the following options: (A)L (B)M (C)N (D)O (E)P\nAnswer: B\n\n\
    Question: A shelf holds four books. Which book is on the left?\n\
    Choose from the following options: (A)W (B)X (C)Y (D)Z (E)None\nAnswer: E\n\n\
    Five runners, F, G, H, J and K, finish a race one after another.\n\n\
    Question: If G finishes right after F, which runner could finish first? Choose from the following options: (A)G (B)H (C)J (D)K (E)F\nAnswer: ";

/// AGIEval's few-shot file read as ColossalEval's `combine_prompt` reads it with pandas, a
/// five-option task scored over A–E, records with several answers refused with a count.
#[test]
fn agieval_few_shot_file_and_five_option_tasks_follow_colossal_eval() {
    let (subjects, issues) = load_messy(Format::Agieval, "agieval", 5);
    let joined = issues.join("\n");
    assert!(joined.contains("logiqa-zh.jsonl:2: blank line, on which ColossalEval's json.loads fails"), "{joined}");
    assert!(
        joined.contains(
            "lsat-ar.jsonl: 1 of 3 records have several answers (scored by generation only in ColossalEval); refused"
        ),
        "{joined}"
    );
    assert_eq!(issues.len(), 2, "{joined}");
    let tasks = ["logiqa-zh", "lsat-ar", "sat-en-without-passage"];
    assert_eq!(subjects.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), tasks);
    assert_eq!(subjects.iter().map(|s| (s.classes, s.test.len())).collect::<Vec<_>>(), [(4, 2), (5, 2), (4, 1)]);
    let python =
        oracle("few-shot", json!({"few_shot": {"path": messy("agieval/few_shot_prompts.csv"), "tasks": tasks}}));
    for s in &subjects {
        let theirs: Vec<String> = serde_json::from_value(python["few_shot"][&s.name].clone()).unwrap();
        let ours: Vec<String> = s.dev.iter().map(|d| format!("{}{}", d.colossal_query, d.colossal_target)).collect();
        assert_eq!(ours, theirs, "{}", s.name);
    }
    assert_eq!(subjects[1].dev.len(), 2, "the third sample has no explanation");
    let tok = tokenizer();
    assert_eq!(colossal(&tok, Format::Agieval, &subjects[1], 0, 5, 2048).text, LSAT_AR_FIVE_SHOT);
    assert_eq!(
        colossal(&tok, Format::Agieval, &subjects[2], 0, 5, 2048).text,
        "Here are the answers for the problems in the exam.\n\n\
         Question:  The author mentions rain mainly to\nChoose from the following options: (A)warn (B)explain (C)praise (D)doubt\nAnswer: B\n\n\
         Question: As used in line 3, \"bright\" most nearly means Choose from the following options: (A)shiny (B)clever (C)loud (D)early\nAnswer: "
    );
    assert!(colossal(&tok, Format::Agieval, &subjects[0], 0, 5, 2048).text.starts_with(
        "以下是考试中各个问题的答案。\n\n问题： 所有的鸟都会飞吗？\u{3000}（\u{3000}）\n从以下选项中选择：(A)会"
    ));
    // Scored over A–E: five letter logits, the answer E found.
    let model = Llama::load(&Cpu, model_dir()).unwrap();
    let r = mc::evaluate(
        &model,
        &Cpu,
        &tok,
        Format::Agieval,
        prompt::PromptStyle::Colossal,
        &subjects,
        5,
        2048,
        4096,
        vec![],
    )
    .unwrap();
    let lsat: Vec<_> = r.per_question.iter().filter(|q| q.subject == "lsat-ar").collect();
    assert_eq!((lsat[0].letter_logits.len(), lsat[0].answer.as_str(), lsat[0].shots), (5, "E", 2));
    assert!(r.per_question.iter().filter(|q| q.subject != "lsat-ar").all(|q| q.letter_logits.len() == 4));
    assert_eq!(r.questions, 5);
}

/// GAOKAO-Bench in its published `data/Multiple-choice_Questions/` layout: the letters counted from
/// the first question as `get_all_classes` does (A–E here), several answers refused with a count,
/// an answer outside the letters named.
#[test]
fn gaokao_published_layout_counts_its_letters_and_refuses_several_answers() {
    let (subjects, issues) = load_messy(Format::Gaokao, "gaokao", 5);
    let joined = issues.join("\n");
    assert!(joined.contains("2010-2022_Math_I_MCQs.json: starts with a UTF-8 byte-order mark"), "{joined}");
    assert!(
        joined.contains("1 of 4 questions have several answers (scored by generation only in ColossalEval); refused"),
        "{joined}"
    );
    assert!(joined.contains("example[3]: answer \"F\" is not one of the subject's letters A–E"), "{joined}");
    assert_eq!(issues.len(), 3, "{joined}");
    let s = &subjects[0];
    assert_eq!((s.title.as_str(), s.classes, s.test.len(), s.test[1].answer), ("Math I MCQs", 5, 2, 4));
    assert_eq!(
        colossal(&tokenizer(), Format::Gaokao, s, 1, 5, 2048).text,
        "下列数中最大的是（　）\nA．1\nB．2\nC．3\nD．4\nE．5\n答案："
    );
}

/// A C-Eval-layout subject outside ColossalEval's table: the colossal style says which name its
/// prompt uses, the original style says nothing; both score it.
#[test]
fn unknown_subject_note_matches_the_prompt_style() {
    let (subjects, issues) = load_messy(Format::Ceval, "ceval", 5);
    assert!(issues.is_empty(), "{issues:?}");
    let model = Llama::load(&Cpu, model_dir()).unwrap();
    let tok = tokenizer();
    for style in [prompt::PromptStyle::Colossal, prompt::PromptStyle::Original] {
        let r = mc::evaluate(&model, &Cpu, &tok, Format::Ceval, style, &subjects, 5, 2048, 4096, vec![]).unwrap();
        assert_eq!(r.questions, 1, "{style:?}");
        let notes: Vec<&String> = r.issues.iter().filter(|i| i.contains("space_science")).collect();
        match style {
            prompt::PromptStyle::Colossal => assert_eq!(notes, [&"subject \"space_science\" is not in ColossalEval's Ceval subject table: its colossal prompt names it \"space_science\"".to_string()]),
            prompt::PromptStyle::Original => assert!(notes.is_empty(), "{notes:?}"),
        }
    }
    assert!(colossal(&tok, Format::Ceval, &subjects[0], 0, 5, 2048)
        .text
        .starts_with("以下是中国关于space_science考试的单项选择题"));
}

/// `single_choice_accuracy`'s regular expression `(?<![a-z])[A-D](?![a-z])`, first match, run by
/// Python's `re`, against ours on answers a base model might give.
#[test]
fn greedy_answers_are_read_as_single_choice_accuracy_reads_them() {
    let answers = [
        "The answer is B",
        "Because C.",
        "答案：D",
        "a",
        "BA",
        "It's A or B",
        "Eh, E is right",
        "(C)",
        "xAy",
        "Ax",
        "DEF",
        "",
        "  b B",
        "Answer:C",
        "ÄB",
    ];
    for classes in ["ABCD", "ABCDE"] {
        let theirs = oracle("letters", json!({"letters": {"classes": classes, "answers": answers}}));
        for (a, t) in answers.iter().zip(theirs["letters"].as_array().unwrap()) {
            let ours = mc::first_choice_letter(a, classes.len()).map(|i| classes[i..i + 1].to_string());
            assert_eq!(ours.as_deref(), t.as_str(), "{a:?} over {classes}");
        }
    }
}

/// `evaluate --dump-prompts` writes those prompts (AGIEval few-shot with five options, GAOKAO from
/// its published layout, CRLF MMLU) and says what happened to each refused row.
#[test]
fn evaluate_dumps_colossal_eval_s_prompts_for_the_messy_sets() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("eval-messy");
    let _ = std::fs::remove_dir_all(&out);
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_evaluate"))
        .args(["--model", model_dir().to_str().unwrap(), "--shots", "5"])
        .args(["--mc", &format!("agieval={}", messy("agieval").display())])
        .args(["--mc", &format!("gaokao={}", messy("gaokao").display())])
        .args(["--mc", &format!("mmlu={}", messy("mmlu").display())])
        .args(["--dump-prompts", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let read = |p: &str| std::fs::read_to_string(out.join(p)).unwrap();
    assert_eq!(read("1-agieval/lsat-ar/0.txt"), LSAT_AR_FIVE_SHOT);
    assert_eq!(
        read("2-gaokao/2010-2022_Math_I_MCQs/1.txt"),
        "下列数中最大的是（　）\nA．1\nB．2\nC．3\nD．4\nE．5\n答案："
    );
    assert!(read("3-mmlu/astronomy/1.txt").ends_with("Question: Which of these, seen from Earth,\nis brightest at night?\nA. The Moon\nB. Sirius\nC. Venus\nD. Mars\nAnswer: "));
    assert!(
        stderr.contains("agieval: ")
            && stderr.contains("several answers (scored by generation only in ColossalEval); refused"),
        "{stderr}"
    );
    assert!(!stderr.contains("skipped subject"), "{stderr}");
}
