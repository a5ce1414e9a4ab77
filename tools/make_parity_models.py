#!/usr/bin/env python3
"""Builds random small LlamaForCausalLM models with transformers and records, for one batch with
ignored labels, the logits, the loss and every parameter's gradient (float32, eager attention).

    python tools/make_parity_models.py OUT_DIR

writes OUT_DIR/<case>/ (a save_pretrained model directory) and OUT_DIR/<case>/reference.safetensors
with input_ids, labels, logits, loss and grad.<parameter name>. The Rust test
tests/parity_transformers.rs compares llama-cpt against these.
"""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

CASES = {
    # name: (config overrides, save options)
    "mha_untied_hd12": (dict(vocab_size=512, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0,
                             tie_word_embeddings=False), {}),
    "gqa4_tied_theta500k": (dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                                 tie_word_embeddings=True), {}),
    "gqa2_vocab70k_sharded": (dict(vocab_size=70000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                                   tie_word_embeddings=False), dict(max_shard_size="4MB")),
    "gqa4_tied_bf16": (dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                            tie_word_embeddings=True), dict(bf16=True)),
}

ROWS, SEQ = 2, 11


def build(name, overrides, opts, out_dir, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(rms_norm_eps=1e-5, max_position_embeddings=256, initializer_range=0.1,
                      bos_token_id=1, eos_token_id=2, attn_implementation="eager", **overrides)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # norm weights away from 1 so that they are tested too
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    if opts.get("bf16"):  # stored in bf16; the reference runs on the bf16 values in float32
        with torch.no_grad():  # parameters only: Module.to() would also round RoPE's inv_freq
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    ids = torch.randint(0, cfg.vocab_size, (ROWS, SEQ), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 5] = -100
    labels[1, -1] = -100
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    d = os.path.join(out_dir, name)
    ref = {"input_ids": ids.contiguous(), "labels": labels.contiguous(),
           "logits": out.logits.detach().float().contiguous(), "loss": out.loss.detach().reshape(1).float()}
    for n, p in model.named_parameters():
        ref["grad." + n] = p.grad.detach().float().clone().contiguous()
    if opts.get("bf16"):
        model = model.to(torch.bfloat16)  # in place, gradients too: hence the copies above
    model.save_pretrained(d, max_shard_size=opts.get("max_shard_size", "10GB"))
    save_file(ref, os.path.join(d, "reference.safetensors"))
    print(f"{name}: loss {out.loss.item():.6f}, {sum(p.numel() for p in model.parameters())} parameters")


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(1)
    for i, (name, (overrides, opts)) in enumerate(CASES.items()):
        build(name, overrides, opts, out_dir, seed=100 + i)


if __name__ == "__main__":
    main()
