#!/usr/bin/env python3
"""Checks a model directory that llama-cpt's import-gguf wrote against transformers.

    python tools/check_gguf_import.py MODEL_DIR FILE.gguf EXPECTED.json EXPECTED.safetensors

EXPECTED.json: {"texts": [...], "ids": [[...], ...]} -- llama-cpt's token ids for each text.
EXPECTED.safetensors: "logits.<i>" float32 [1, len(ids[i]), vocab] -- llama-cpt's logits.

Checks, printing each result, and exits 1 if any fails:
  * transformers' AutoTokenizer on MODEL_DIR and on the GGUF itself (gguf_file=) give llama-cpt's ids;
  * AutoModelForCausalLM on MODEL_DIR gives llama-cpt's logits (relative error max|a-b|/max|b| <= 1e-4);
  * AutoModelForCausalLM on the GGUF itself (transformers' own dequantisation and Q/K un-permutation)
    holds bitwise the weights of MODEL_DIR.
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

TOL = 1e-4


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def main():
    model_dir, gguf_path, expected_json, expected_st = sys.argv[1:5]
    with open(expected_json, encoding="utf-8") as f:
        expected = json.load(f)
    ref = load_file(expected_st)
    gguf_dir, gguf_file = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    torch.set_num_threads(2)
    failures = []

    tok = AutoTokenizer.from_pretrained(model_dir)
    gguf_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    for i, (text, ids) in enumerate(zip(expected["texts"], expected["ids"])):
        a = tok(text, add_special_tokens=False)["input_ids"]
        b = gguf_tok(text, add_special_tokens=False)["input_ids"]
        print(f"text {i} ({len(ids)} tokens): ids equal transformers on tokenizer.json: {a == ids}, "
              f"transformers reading the GGUF: {b == ids}")
        if a != ids or b != ids:
            failures.append(f"text {i} ids: llama-cpt {ids}, tokenizer.json {a}, GGUF {b}")

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32,
                                                      attn_implementation="eager").eval()
    ours, theirs = model.state_dict(), gguf_model.state_dict()
    differing = [k for k in ours if k not in theirs or not torch.equal(ours[k], theirs[k])]
    print(f"weights: {len(ours) - len(differing)} of {len(ours)} tensors bitwise equal to transformers' own GGUF loading")
    if differing:
        failures.append(f"weights differ from transformers' GGUF loading: {differing[:5]}")

    with torch.no_grad():
        for i, ids in enumerate(expected["ids"]):
            x = torch.tensor([ids])
            err = rel_err(model(input_ids=x).logits, ref[f"logits.{i}"])
            print(f"text {i}: llama-cpt vs transformers logits relative error {err:.3e}")
            if not err <= TOL:
                failures.append(f"text {i} logits relative error {err:e}")

    for f in failures:
        print("FAIL:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
