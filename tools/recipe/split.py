#!/usr/bin/env python3
"""Deterministic train / held-out split for tools/recipe-smollm2.sh.

    split.py CORPORA_DIR OUT_DIR EVAL_ZH_DOCS EVAL_EN_DOCS

Chinese (CORPORA_DIR/zh): the poems of tang300.jsonl then song100.jsonl, numbered from 0 in that
order; entry i is held out when i % 10 == 9 (every 10th), except any poem containing 离离原上草
(《赋得古原草送别》), which always stays in training. chinese.jsonl is all training.
English (CORPORA_DIR/en/*.jsonl in sorted order, numbered from 0 across files): entry i is held
out when i % 20 == 19 (every 20th fortune).

Writes OUT_DIR/{zh-train,en-train,zh-heldout,en-heldout}.jsonl, the evaluation subsets
eval-zh.jsonl / eval-en.jsonl (EVAL_*_DOCS evenly spaced held-out entries; 0 = all),
grass.jsonl (the 离离原上草 poem, a training document) and split.json (counts and characters).
"""
import json
import os
import sys

corpora, out, eval_zh, eval_en = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
GRASS = "离离原上草"


def read(path):
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                docs.append(json.loads(line)["text"])
    return docs


def write(name, docs):
    path = os.path.join(out, name)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return {"documents": len(docs), "chars": sum(len(d) for d in docs)}


def spaced(docs, n):
    if n <= 0 or n >= len(docs):
        return list(docs)
    return [docs[(k * len(docs)) // n] for k in range(n)]


os.makedirs(out, exist_ok=True)
poems = read(os.path.join(corpora, "zh", "tang300.jsonl")) + read(os.path.join(corpora, "zh", "song100.jsonl"))
zh_train, zh_held = [], []
for i, p in enumerate(poems):
    (zh_held if i % 10 == 9 and GRASS not in p else zh_train).append(p)
zh_train += read(os.path.join(corpora, "zh", "chinese.jsonl"))
grass = [p for p in poems if GRASS in p][:1]
if not grass:
    sys.exit(f"split.py: no poem containing {GRASS} in {corpora}/zh")

en_files = sorted(f for f in os.listdir(os.path.join(corpora, "en")) if f.endswith(".jsonl"))
en_train, en_held = [], []
i = 0
for name in en_files:
    for d in read(os.path.join(corpora, "en", name)):
        (en_held if i % 20 == 19 else en_train).append(d)
        i += 1

assert not any(GRASS in p for p in zh_held)
report = {
    "zh-train": write("zh-train.jsonl", zh_train),
    "zh-heldout": write("zh-heldout.jsonl", zh_held),
    "en-train": write("en-train.jsonl", en_train),
    "en-heldout": write("en-heldout.jsonl", en_held),
    "eval-zh": write("eval-zh.jsonl", spaced(zh_held, eval_zh)),
    "eval-en": write("eval-en.jsonl", spaced(en_held, eval_en)),
    "grass": write("grass.jsonl", grass),
}
with open(os.path.join(out, "split.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
for k, v in report.items():
    print(f"split: {k}: {v['documents']} documents, {v['chars']} chars")
