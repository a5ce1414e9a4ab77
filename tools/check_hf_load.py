#!/usr/bin/env python3
"""Loads a model directory written by llama-cpt with transformers and compares its logits with the
ones llama-cpt computed for the same tokens.

    python tools/check_hf_load.py MODEL_DIR EXPECTED.safetensors

EXPECTED holds input_ids (int64 [rows, seq]) and logits (float32 [rows, seq, vocab]). Prints the
relative error (max |a-b| / max |b|) and exits 1 above 1e-4.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    model_dir, expected = sys.argv[1], sys.argv[2]
    ref = load_file(expected)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    err = ((logits - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()
    print(f"{model_dir}: transformers vs llama-cpt logits relative error {err:.3e}")
    sys.exit(0 if err <= 1e-4 else 1)


if __name__ == "__main__":
    main()
