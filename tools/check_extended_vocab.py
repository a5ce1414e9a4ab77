#!/usr/bin/env python3
"""The transformers side of the vocabulary-extension check: opens a model directory written by
`extend-vocab` exactly as the seed card's usage snippet does (AutoTokenizer + AutoModelForCausalLM),
tokenizes each text and runs the model.

    python tools/check_extended_vocab.py MODEL_DIR TEXTS.json OUT.safetensors

TEXTS.json is a JSON list of strings. OUT gets, per text i, `ids_i` (int64 [n], what
`tokenizer(text)` gives, special tokens included) and `logits_i` (float32 [n, vocab]). Prints the
tokenizer class and the vocabulary sizes.
"""
import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    model_dir, texts_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    texts = json.load(open(texts_path, encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tensors = {}
    with torch.no_grad():
        for i, text in enumerate(texts):
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            tensors[f"ids_{i}"] = ids[0].to(torch.int64).contiguous()
            tensors[f"logits_{i}"] = model(input_ids=ids).logits[0].float().contiguous()
    save_file(tensors, out)
    print(f"{type(tokenizer).__name__}: {len(tokenizer)} tokens; model vocab {model.config.vocab_size}")


if __name__ == "__main__":
    main()
