#!/usr/bin/env python3
"""Times the training step of benches/train_step.rs under PyTorch eager on the CPU: same model
(4 layers, hidden 256, 8 heads, FFN 688, vocab 32,000), batch 8 x seq 256, forward + backward +
AdamW, f32, SDPA attention, as many threads as llama-cpt uses (all cores unless set).

    python tools/torch_cpu_step.py [--threads N] [--steps N]

Prints `torch train_step seconds: S tokens/s: T`.
"""
import argparse
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count())))
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
                      rms_norm_eps=1e-5, max_position_embeddings=4096, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    rows, seq = 8, 256
    ids = (torch.arange(rows * seq) * 7919 % 32000).reshape(rows, seq)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    mean = sum(times) / len(times)
    print(f"torch {torch.__version__} threads {args.threads} train_step seconds: {mean:.4f} tokens/s: {rows * seq / mean:.0f}")


if __name__ == "__main__":
    main()
