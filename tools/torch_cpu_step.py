#!/usr/bin/env python3
"""Times the training step of examples/cpu_step.rs under PyTorch on the CPU: the same model and
batch for each shape name, forward + backward + clip 1.0 + AdamW, f32, SDPA attention, as many
threads as llama-cpt uses (all cores unless set). With --compile the model runs under
torch.compile (inductor); the compile happens in the warm-up steps, which are not timed.

    python tools/torch_cpu_step.py [--shape bench|smollm2|smoke] [--compile] [--threads N] [--steps N] [--warmup N]

Prints `torch <version> <shape> <eager|compile> threads T seconds S tokens/s X peak_rss_mib M`.
"""
import argparse
import os
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# name: (vocab, hidden, ffn, layers, heads, kv heads, tied embeddings, rows, seq): as examples/cpu_step.rs.
SHAPES = {
    "bench": (32000, 256, 688, 4, 8, 8, False, 8, 256),
    "smollm2": (49152, 576, 1536, 30, 9, 3, True, 4, 512),
    "smoke": (512, 64, 128, 2, 4, 2, True, 2, 32),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count())))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab, hidden, ffn, layers, heads, kv_heads, tied, rows, seq = SHAPES[args.shape]
    # rope_theta 10000 and max positions 4096: as LlamaConfig::small on the Rust side.
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                      rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    forward = torch.compile(model) if args.compile else model
    ids = (torch.arange(rows * seq) * 7919 % vocab).reshape(rows, seq)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    if not torch.isfinite(torch.tensor(loss)):
        raise SystemExit(f"torch_cpu_step: the loss is {loss}: the timed steps did not train")
    mean = sum(times) / len(times)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    mode = "compile" if args.compile else "eager"
    print(f"torch {torch.__version__} {args.shape} {mode} threads {args.threads} seconds {mean:.4f} "
          f"tokens/s {rows * seq / mean:.0f} peak_rss_mib {peak_mib:.0f} loss {loss:.4f}")


if __name__ == "__main__":
    main()
