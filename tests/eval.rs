//! Evaluation and generation: agreement with transformers on choice logits, chosen answers and
//! greedy generations; the published layouts read from the sample sets; bad rows reported.
mod common;
#[path = "common/eval_model.rs"]
mod eval_model;
use eval_model::{fixtures, model_dir, tokenizer};
use llama_cpt::cpu::Cpu;
use llama_cpt::data::tokenizer::TextTokenizer;
use llama_cpt::eval::{load, mc, ppl, prompt, questions};
use llama_cpt::generate::{generate, Sampling};
use llama_cpt::model::Llama;
use std::path::PathBuf;
use std::time::Instant;

#[test]
fn choice_logits_answers_and_greedy_generation_agree_with_transformers() {
    let dir = model_dir();
    let model = Llama::load(&Cpu, dir).unwrap();
    let tok = tokenizer();
    let style = prompt::PromptStyle::Colossal;
    let letters = prompt::letter_ids(&tok, style, 4).unwrap();
    let mut prompts = Vec::new();
    let mut ours = Vec::new();
    for (format, sub) in [(questions::Format::Mmlu, "mmlu"), (questions::Format::Cmmlu, "cmmlu")] {
        let mut issues = vec![];
        let subjects = load::load(format, &fixtures().join(sub), 5, &mut issues).unwrap();
        assert!(issues.is_empty(), "{issues:?}");
        let r = mc::evaluate(&model, &Cpu, &tok, format, style, &subjects, 5, 2048, 700, vec![]).unwrap();
        for s in &subjects {
            for q in &s.test {
                prompts.push(prompt::prompt(&tok, style, format, s, q, 5, 2048).unwrap().ids);
            }
        }
        ours.extend(r.per_question);
    }
    assert_eq!(prompts.len(), 11);
    let gen_prompts: Vec<Vec<u32>> = prompts.iter().take(3).map(|p| p[..p.len().min(40)].to_vec()).collect();
    let t = Instant::now();
    let mut our_gen = Vec::new();
    for p in &gen_prompts {
        our_gen.push(generate(&model, &Cpu, p, 24, &Sampling::GREEDY, &[1], None, |_| {}).unwrap());
    }
    let our_secs = t.elapsed().as_secs_f64();
    let our_tokens: usize = our_gen.iter().map(|g| g.len()).sum();
    let req = serde_json::json!({"model": dir, "prompts": prompts, "letters": letters, "gen_prompts": gen_prompts, "max_new_tokens": 24, "eos": 1});
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(tmp.join("eval-req.json"), req.to_string()).unwrap();
    common::run_python("hf_eval_reference.py", &[&tmp.join("eval-req.json"), &tmp.join("eval-resp.json")]);
    let resp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.join("eval-resp.json")).unwrap()).unwrap();
    let mut worst = 0.0f64;
    for (q, theirs) in ours.iter().zip(resp["letter_logits"].as_array().unwrap()) {
        let (origin, per) = (&q.origin, &q.letter_logits);
        let pick = questions::LETTERS.iter().position(|l| *l == q.pick).unwrap();
        let theirs: Vec<f64> = theirs.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let scale = theirs.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (a, b) in per.iter().zip(&theirs) {
            worst = worst.max((*a as f64 - b).abs() / scale);
        }
        let their_pick = (0..4).fold(0, |best, i| if theirs[i] > theirs[best] { i } else { best });
        assert_eq!(pick, their_pick, "{origin}: llama-cpt picks {pick}, transformers {their_pick}");
    }
    assert!(worst <= 1e-4, "choice logits relative error {worst:e}");
    let theirs: Vec<Vec<u32>> = resp["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect();
    assert_eq!(our_gen, theirs, "greedy generations differ");
    let their_secs = resp["seconds"].as_f64().unwrap();
    println!(
        "choice logits max relative error {worst:.2e}; greedy generation: llama-cpt {:.1} tokens/s, transformers generate {:.1} tokens/s ({our_tokens} tokens)",
        our_tokens as f64 / our_secs,
        resp["generated"].as_f64().unwrap() / their_secs
    );
}

#[test]
fn every_published_layout_loads_from_the_samples() {
    let counts = [
        ("mmlu", questions::Format::Mmlu, 7),
        ("cmmlu", questions::Format::Cmmlu, 4),
        ("ceval", questions::Format::Ceval, 3),
        ("agieval", questions::Format::Agieval, 5),
        ("gaokao", questions::Format::Gaokao, 2),
    ];
    for (dir, format, n) in counts {
        let mut issues = vec![];
        let subjects = load::load(format, &fixtures().join(dir), 0, &mut issues).unwrap();
        assert!(issues.is_empty(), "{dir}: {issues:?}");
        assert_eq!(subjects.iter().map(|s| s.test.len()).sum::<usize>(), n, "{dir}");
    }
    let mut issues = vec![];
    let s = load::load(questions::Format::Ceval, &fixtures().join("ceval"), 5, &mut issues).unwrap();
    assert_eq!(
        (s[0].name.as_str(), s[0].title.as_str(), s[0].dev.len(), s[0].test[1].answer, s[0].test[1].id.as_str()),
        ("high_school_geography", "高中地理", 2, 1, "1")
    );
}

#[test]
fn bad_rows_are_reported_with_file_and_line_and_the_rest_scored() {
    let mut issues = vec![];
    let subjects = load::load(questions::Format::Mmlu, &fixtures().join("bad"), 5, &mut issues).unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].test.len(), 2);
    let joined = issues.join("\n");
    assert!(
        joined.contains("broken_test.csv:2") && joined.contains("5 columns where ColossalEval's loader asserts 6"),
        "{joined}"
    );
    assert!(joined.contains("broken_test.csv:3") && joined.contains("\"E\" is not one of"), "{joined}");
    assert!(joined.contains("\"empty\" has no usable questions"), "{joined}");
    let model = Llama::load(&Cpu, model_dir()).unwrap();
    let r = mc::evaluate(
        &model,
        &Cpu,
        &tokenizer(),
        questions::Format::Mmlu,
        prompt::PromptStyle::Colossal,
        &subjects,
        5,
        2048,
        4096,
        issues,
    )
    .unwrap();
    assert_eq!(r.questions, 2);
    assert!(mc::table(&r).contains("broken"));
}

#[test]
fn bits_per_character_counts_every_token_once() {
    let model = Llama::load(&Cpu, model_dir()).unwrap();
    let tok = tokenizer();
    let texts = vec!["Which planet is closest to the Sun?".to_string(), "“床前明月光”的下一句是？".to_string()];
    let whole = ppl::score_texts(&model, &Cpu, &tok, &texts, 2048, 4096).unwrap();
    // Batching does not change the result; windows shorter than the texts predict fewer tokens.
    let one_by_one = ppl::score_texts(&model, &Cpu, &tok, &texts, 2048, 1).unwrap();
    assert_eq!(whole.tokens, one_by_one.tokens);
    assert!((whole.nll_nats - one_by_one.nll_nats).abs() < 1e-3 * whole.nll_nats);
    let n_tokens: usize = texts.iter().map(|t| tok.encode_text(t).unwrap().len()).sum();
    assert_eq!(whole.tokens, n_tokens, "with BOS every text token is predicted once");
    assert_eq!(whole.chars, texts.iter().map(|t| t.chars().count()).sum::<usize>());
    assert!((whole.bits_per_char - whole.nll_nats / std::f64::consts::LN_2 / whole.chars as f64).abs() < 1e-12);
}

/// Loads a fixture folder that should hold no problems (`shots`: 0 to leave AGIEval's few-shot
/// file out).
fn load(format: questions::Format, dir: &str, shots: usize) -> Vec<questions::Subject> {
    let mut issues = vec![];
    let subjects = load::load(format, &fixtures().join(dir), shots, &mut issues).unwrap();
    assert!(issues.is_empty(), "{dir}: {issues:?}");
    subjects
}

fn colossal_prompt(
    format: questions::Format,
    subject: &questions::Subject,
    question: usize,
    shots: usize,
    max_tokens: usize,
) -> questions::Prompt {
    prompt::prompt(
        &tokenizer(),
        prompt::PromptStyle::Colossal,
        format,
        subject,
        &subject.test[question],
        shots,
        max_tokens,
    )
    .unwrap()
}

/// The expected strings were written by hand from ColossalEval's source (hpcaitech/ColossalAI,
/// applications/ColossalEval/colossal_eval), applied to the fixture rows:
/// - MMLU: `dataset/mmlu.py` — `MMLUDataset.load` (subject `" ".join(word.title())`, `input`
///   `Question: {q}\nA. …\nAnswer: `, zero-shot `instruction`) and `get_few_shot_data` (header);
/// - CMMLU: `dataset/cmmlu.py` — `cmmlu_subject_mapping`, `input` `题目：{q}\n…\n答案：`,
///   `get_few_shot_data`;
/// - C-Eval: `dataset/ceval.py` — `ceval_subject_mapping[...][1]`, `get_few_shot_data`
///   (`以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。`);
/// - AGIEval: `dataset/agieval.py` — `get_prompt` (english/chinese_qa_datasets; passage + `\n\n`);
/// - GAOKAO: `dataset/gaokaobench.py` — `instruction` = `question.strip() + "\n答案："`;
/// - assembly: `utils/conversation.py` — `get_batch_prompt` (few-shot: prefix + input; zero-shot:
///   `instruction + "\n\n" + input`, or the instruction alone when input is empty),
///   `get_few_shot_prefix` (header + `\n\n`, each shot `input + target + "\n\n"`), and the `plain`
///   template (`conv_plain`: no system text, messages concatenated).
#[test]
fn colossal_prompts_are_colossal_eval_s_byte_for_byte() {
    let mmlu = load(questions::Format::Mmlu, "mmlu", 5);
    let five_shot = colossal_prompt(questions::Format::Mmlu, &mmlu[0], 0, 5, 2048);
    assert_eq!(
        five_shot.text,
        "The following are multiple choice questions (with answers) about Astronomy.\n\n\
         Question: Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer: B\n\n\
         Question: What keeps the Moon in orbit around the Earth?\nA. Magnetism\nB. Solar wind\nC. Gravity\nD. Friction\nAnswer: C\n\n\
         Question: Which of these is a star?\nA. The Sun\nB. The Moon\nC. Jupiter\nD. Halley's comet\nAnswer: A\n\n\
         Question: How many days does Earth take to orbit the Sun, roughly?\nA. 30\nB. 100\nC. 365\nD. 1000\nAnswer: C\n\n\
         Question: What is a light-year a measure of?\nA. Time\nB. Brightness\nC. Mass\nD. Distance\nAnswer: D\n\n\
         Question: Which planet has the most prominent rings?\nA. Mars\nB. Saturn\nC. Mercury\nD. Venus\nAnswer: "
    );
    assert_eq!(five_shot.shots, 5);
    let tok = tokenizer();
    assert_eq!(five_shot.ids, questions::encode_prompt(&tok, &five_shot.text).unwrap());
    assert_eq!(
        five_shot.ids[0],
        tok.bos.unwrap(),
        "the prompt starts with BOS, as transformers' tokenizer(prompt) does for LLaMA"
    );
    assert_eq!(
        colossal_prompt(questions::Format::Mmlu, &mmlu[1], 2, 0, 2048).text,
        "The following is a single-choice question on Cooking. Answer the question by replying A, B, C or D.\n\n\
         Question: Which utensil is used to flip pancakes?\nA. A spatula\nB. A whisk\nC. A sieve\nD. A funnel\nAnswer: "
    );
    let cmmlu = load(questions::Format::Cmmlu, "cmmlu", 5);
    assert_eq!(
        colossal_prompt(questions::Format::Cmmlu, &cmmlu[0], 1, 1, 2048).text,
        "以下是关于中国文学的单项选择题，请直接给出正确答案的选项。\n\n\
         题目：“床前明月光”的下一句是？\nA. 疑是地上霜\nB. 举头望明月\nC. 低头思故乡\nD. 春眠不觉晓\n答案：A\n\n\
         题目：《登鹳雀楼》的作者是？\nA. 王之涣\nB. 王昌龄\nC. 李白\nD. 杜甫\n答案："
    );
    assert_eq!(
        colossal_prompt(questions::Format::Cmmlu, &cmmlu[0], 3, 0, 2048).text,
        "以下是关于中国文学的单项选择题，请直接给出正确答案的选项。\n\n题目：“举头望明月”的下一句是？\nA. 低头思故乡\nB. 疑是地上霜\nC. 床前明月光\nD. 夜来风雨声\n答案："
    );
    let ceval = load(questions::Format::Ceval, "ceval", 5);
    assert_eq!(
        colossal_prompt(questions::Format::Ceval, &ceval[0], 0, 5, 2048).text,
        "以下是中国关于高中地理考试的单项选择题，请选出其中的正确答案。\n\n\
         题目：世界上面积最大的大洋是？\nA. 大西洋\nB. 印度洋\nC. 太平洋\nD. 北冰洋\n答案：C\n\n\
         题目：长江注入哪个海？\nA. 东海\nB. 黄海\nC. 南海\nD. 渤海\n答案：A\n\n\
         题目：中国最长的河流是？\nA. 黄河\nB. 长江\nC. 珠江\nD. 淮河\n答案："
    );
    let agieval = load(questions::Format::Agieval, "agieval", 0);
    assert_eq!(
        colossal_prompt(questions::Format::Agieval, &agieval[0], 0, 5, 2048).text,
        "Tom has three apples. He gives one to Anna and buys two more.\n\n\
         Question: How many apples does Tom have now? Choose from the following options: (A)2 (B)3 (C)4 (D)5\nAnswer: "
    );
    assert_eq!(colossal_prompt(questions::Format::Agieval, &agieval[0], 2, 5, 2048).text, "Question: If all cats are animals and Mia is a cat, then Mia is Choose from the following options: (A)an animal (B)a dog (C)a plant (D)nothing\nAnswer: ");
    assert_eq!(
        colossal_prompt(questions::Format::Agieval, &agieval[1], 1, 5, 2048).text,
        "问题：下列哪个数是偶数？ 从以下选项中选择：(A)3 (B)7 (C)8 (D)11\n答案："
    );
    let gaokao = load(questions::Format::Gaokao, "gaokao", 5);
    assert_eq!(gaokao[0].title, "Sample Chinese MCQs");
    assert_eq!(
        colossal_prompt(questions::Format::Gaokao, &gaokao[0], 0, 5, 2048).text,
        "下列词语中，书写完全正确的一项是（　）\nA．再接再厉\nB．迫不急待\nC．一愁莫展\nD．谈笑风声\n答案："
    );
}

/// `get_few_shot_prefix` / `get_batch_prompt` (utils/conversation.py): shots are added while the
/// prefix fits the model length minus the query-with-answer tokens; when not even the first fits,
/// the prefix holding it is kept anyway. `_get_truncated_prompts` (models/huggingface.py) then cuts
/// the middle of a prompt longer than the model length minus 32.
#[test]
fn colossal_few_shot_budget_and_middle_truncation_follow_colossal_eval() {
    let tok = tokenizer();
    let mmlu = load(questions::Format::Mmlu, "mmlu", 5);
    let full = colossal_prompt(questions::Format::Mmlu, &mmlu[0], 0, 5, 2048);
    let query_and_answer =
        questions::encode_prompt(&tok, &format!("{}B", mmlu[0].test[0].colossal_query)).unwrap().len();
    // The prefix with two shots: the header line and the first two shots, as in the full prompt.
    let two_shots: String = full.text.split_inclusive("\n\n").take(3).collect();
    let budget_for_two = questions::encode_prompt(&tok, &two_shots).unwrap().len();
    let p = colossal_prompt(questions::Format::Mmlu, &mmlu[0], 0, 5, query_and_answer + budget_for_two);
    assert_eq!(p.shots, 2);
    // That prompt is longer than the length minus 32: the middle went (decoded halves encoded again
    // may merge a token or two), the length is within the limit.
    let limit = query_and_answer + budget_for_two - 32;
    assert!(p.ids.len() <= limit && p.ids.len() + 3 >= limit, "{} tokens for a limit of {limit}", p.ids.len());
    assert!(p.text.starts_with("The following are multiple choice questions"), "{}", p.text);
    // One token short of the first shot: ColossalEval still keeps it.
    let one_shot: String = full.text.split_inclusive("\n\n").take(2).collect();
    let budget_for_one = questions::encode_prompt(&tok, &one_shot).unwrap().len();
    let p = colossal_prompt(questions::Format::Mmlu, &mmlu[0], 0, 5, query_and_answer + budget_for_one - 1);
    assert_eq!(p.shots, 1);
    // Room enough: every shot, nothing cut.
    assert_eq!((full.shots, full.ids.len()), (5, questions::encode_prompt(&tok, &full.text).unwrap().len()));
}

/// `_get_choices_indices` (models/huggingface.py): per letter the last token of `Answer: X` and
/// of `答案：X`; the letter's score is the larger logit (`torch.max` over the two).
#[test]
fn colossal_letter_ids_are_the_tokens_after_answer() {
    let tok = tokenizer();
    let ids = prompt::letter_ids(&tok, prompt::PromptStyle::Colossal, 4).unwrap();
    for (letter, ids) in questions::LETTERS.iter().zip(&ids) {
        let en = *tok.encode_text(&format!("Answer: {letter}")).unwrap().last().unwrap();
        let zh = *tok.encode_text(&format!("答案：{letter}")).unwrap().last().unwrap();
        assert!(ids.contains(&en) && ids.contains(&zh) && ids.len() <= 2, "{letter}: {ids:?} vs {en} {zh}");
        assert_eq!(tok.inner().decode(&[en], false).unwrap().trim(), *letter);
    }
    let mut logits = vec![0.0f32; tok.vocab_size as usize + 64];
    logits[*ids[2].last().unwrap() as usize] = 3.0;
    assert_eq!(mc::choose(&logits, &ids).0, 2);
}

#[test]
fn evaluate_json_keeps_every_run_and_every_question_and_dumps_prompts() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("eval-json");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let mmlu = fixtures().join("mmlu");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_evaluate"))
        .args(["--model", model_dir().to_str().unwrap(), "--shots", "2"])
        .args([
            "--mc",
            &format!("mmlu={}", mmlu.display()),
            "--mc",
            &format!("mmlu={}", fixtures().join("bad").display()),
        ])
        .args(["--json", out.join("r.json").to_str().unwrap(), "--dump-prompts", out.join("prompts").to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("r.json")).unwrap()).unwrap();
    let (first, second) = (&r["mc:mmlu"], &r["mc:mmlu#2"]);
    assert_eq!((first["questions"].as_u64(), second["questions"].as_u64()), (Some(7), Some(2)), "{r:#}");
    assert_eq!(first["path"].as_str(), Some(mmlu.to_str().unwrap()));
    assert_eq!(first["style"].as_str(), Some("colossal"));
    let per = first["per_question"].as_array().unwrap();
    assert_eq!(per.len(), 7);
    let q = &per[0];
    assert_eq!(
        (q["subject"].as_str(), q["id"].as_str(), q["shots"].as_u64(), q["answer"].as_str()),
        (Some("astronomy"), Some("0"), Some(2), Some("B"))
    );
    assert_eq!(q["letter_logits"].as_array().unwrap().len(), 4);
    let correct = per.iter().filter(|q| q["pick"] == q["answer"]).count();
    assert_eq!(correct as u64, first["correct"].as_u64().unwrap());
    let text = std::fs::read_to_string(out.join("prompts/1-mmlu/astronomy/0.txt")).unwrap();
    let subjects = load(questions::Format::Mmlu, "mmlu", 5);
    let expected = colossal_prompt(questions::Format::Mmlu, &subjects[0], 0, 2, 2048);
    assert_eq!(text, expected.text);
    // Counted with the tokenizer `evaluate` loads (the model directory's own settings).
    let tok = TextTokenizer::for_model(model_dir(), None).unwrap();
    assert_eq!(q["prompt_tokens"].as_u64(), Some(questions::encode_prompt(&tok, &text).unwrap().len() as u64));
    // Ids are row indices in the file: the broken rows 1 and 2 keep their numbers.
    assert!(out.join("prompts/2-mmlu/broken/0.txt").exists() && out.join("prompts/2-mmlu/broken/3.txt").exists());
}
