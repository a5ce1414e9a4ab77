#!/usr/bin/env python3
"""transformers' side of tests/eval_transformers.rs: for the same model directory and token ids,
the per-letter first-token logits of multiple-choice prompts and greedy generations.

    python tools/hf_eval_reference.py REQUEST.json RESPONSE.json

REQUEST: {"model": dir, "prompts": [[ids]], "letters": [[ids of A], [B], [C], [D]],
          "gen_prompts": [[ids]], "max_new_tokens": n, "eos": id}
RESPONSE: {"letter_logits": [[4 floats]], "generations": [[ids]], "seconds": s, "generated": n}
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    req = json.load(open(sys.argv[1]))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=torch.float32, attn_implementation="eager").eval()
    out = {"letter_logits": [], "generations": []}
    with torch.no_grad():
        for ids in req["prompts"]:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            out["letter_logits"].append([max(logits[i].item() for i in group) for group in req["letters"]])
        t = time.perf_counter()
        n = 0
        for ids in req["gen_prompts"]:
            g = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=False, max_new_tokens=req["max_new_tokens"], eos_token_id=req["eos"],
                               pad_token_id=req["eos"])
            new = g[0, len(ids):].tolist()
            n += len(new)
            out["generations"].append(new)
        out["seconds"] = time.perf_counter() - t
        out["generated"] = n
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
