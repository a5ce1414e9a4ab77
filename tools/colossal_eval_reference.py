#!/usr/bin/env python3
"""ColossalEval's reading rules, run by Python itself, for tests/eval_colossal.rs: how its loaders
(hpcaitech/ColossalAI applications/ColossalEval, dataset/*.py) read benchmark files, how
`_get_truncated_prompts` (models/huggingface.py) cuts a long prompt with transformers' decode, and
how `single_choice_accuracy` (evaluate/dataset_evaluator/metrics.py) reads a letter from an answer.
Written from those rules; the Python standard library, pandas and transformers do the reading.

    python tools/colossal_eval_reference.py REQUEST.json RESPONSE.json

REQUEST: {"csv": [path], "few_shot": {"path": csv, "tasks": [name]},
          "cuts": [{"tokenizer_dir": d, "text": s, "bos": id or null, "limit": n}],
          "letters": {"classes": "ABCD", "answers": [s]}}  (every key optional)
RESPONSE: {"csv": {path: [[field]]}, "few_shot": {task: [shot text]},
           "cuts": [{"text": s, "clean_up": bool}], "letters": [letter or null]}
"""
import ast
import csv
import json
import re
import sys


def read_csv(path):
    # As the MMLU/CMMLU/C-Eval loaders do: text mode (universal newlines), utf-8, no newline="".
    with open(path, encoding="utf-8") as f:
        return [row for row in csv.reader(f)]


# `combine_prompt` of dataset/agieval.py: which tasks are English and Chinese.
ENGLISH = ["lsat-ar", "lsat-lr", "lsat-rc", "logiqa-en", "sat-math", "sat-en", "aqua-rat",
           "sat-en-without-passage", "gaokao-english"]
CHINESE = ["logiqa-zh", "jec-qa-kd", "jec-qa-ca", "gaokao-chinese", "gaokao-geography", "gaokao-history",
           "gaokao-biology", "gaokao-chemistry", "gaokao-physics", "gaokao-mathqa"]


def few_shot(path, task):
    import pandas as pd

    column, skip_passage = ("sat-en", True) if task == "sat-en-without-passage" else (task, False)
    samples = pd.read_csv(path, header=0, skiprows=lambda x: x not in [0, 1, 3, 5, 7, 9], keep_default_na=False)
    notes = pd.read_csv(path, header=0, skiprows=lambda x: x not in [0, 2, 4, 6, 8, 10], keep_default_na=False)
    contexts = [ast.literal_eval(c) for c in samples[column] if c]
    explanations = [e for e in notes[column] if e]
    shots = []
    for con, _ in zip(contexts, explanations):
        passage = con["passage"] if con["passage"] is not None and not skip_passage else ""
        options = " ".join(con["options"] if con["options"] is not None else "")
        label = con["label"] if con["label"] is not None else ""
        if task in ENGLISH:
            shots.append("Question: " + passage + " " + con["question"] + "\n"
                         + "Choose from the following options: " + options + "\n" + "Answer: {}".format(label))
        else:
            shots.append("问题：" + passage + " " + con["question"] + "\n" + "从以下选项中选择：" + options + "\n"
                         + "答案：{}".format(label))
    return shots


def cut(req):
    from transformers import AutoTokenizer

    # ColossalEval runs on transformers 4.x, which tidies spaces for every tokenizer model; 5.x
    # passes over BPE models unless this flag is set.
    tok = AutoTokenizer.from_pretrained(
        req["tokenizer_dir"], clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    ids = ([req["bos"]] if req["bos"] is not None else []) + tok(req["text"], add_special_tokens=False).input_ids
    limit = req["limit"]
    text = req["text"]
    if len(ids) > limit:
        half = limit // 2
        text = tok.decode(ids[:half], skip_special_tokens=True) + tok.decode(ids[-half:], skip_special_tokens=True)
    return {"text": text, "clean_up": bool(tok.clean_up_tokenization_spaces)}


def first_letter(classes, answer):
    pattern = f"(?<![a-z])[{classes[0]}-{classes[-1]}](?![a-z])"
    found = re.findall(pattern, answer)[0:1]
    return found[0] if found else None


def main():
    req = json.load(open(sys.argv[1], encoding="utf-8"))
    out = {}
    if "csv" in req:
        out["csv"] = {p: read_csv(p) for p in req["csv"]}
    if "few_shot" in req:
        out["few_shot"] = {t: few_shot(req["few_shot"]["path"], t) for t in req["few_shot"]["tasks"]}
    if "cuts" in req:
        out["cuts"] = [cut(c) for c in req["cuts"]]
    if "letters" in req:
        out["letters"] = [first_letter(req["letters"]["classes"], a) for a in req["letters"]["answers"]]
    json.dump(out, open(sys.argv[2], "w", encoding="utf-8"), ensure_ascii=False)


if __name__ == "__main__":
    main()
